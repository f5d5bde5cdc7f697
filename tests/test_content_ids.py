"""Content ids (issue 26, false negatives): equal content -> equal id, across paths, processes and collators.

References are plain: a BLAKE2b written out here for a text item, ``content_id`` per item in a loop for
a collated batch, a Python loop for ``scatter_negative_ids``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny_models import word_tokenizer
from PIL import Image
from transformers import CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vembed_blocks.data.collate import (
    DualEncoderCollator,
    FixedNegatives,
    TextCollator,
    VLMCollator,
    WithScores,
    scatter_negative_ids,
)
from vembed_blocks.data.content_ids import _file_digest, content_id, content_ids
from vembed_blocks.data.images import ImageLoadError, ShardImage
from vembed_blocks.data.records import Item, Record
from vembed_blocks.demo.vlm import CHAT_WORDS, QWEN_CHAT, QWEN_SPECIALS
from vembed_blocks.vlm import qwen_vl_processor

WORDS = "a the red blue cat dog bird photo sky query passage".split()


def _jpeg(path, seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.fixture
def images(tmp_path):
    """Three image files: ``a.jpg`` and ``copy.png`` (same bytes, another name), ``b.jpg`` (other bytes)."""
    data = _jpeg(tmp_path / "a.jpg", 0)
    (tmp_path / "copy.png").write_bytes(data)
    _jpeg(tmp_path / "b.jpg", 1)
    return {n: str(tmp_path / n) for n in ("a.jpg", "copy.png", "b.jpg")}


def test_text_ids_are_a_plain_blake2b_and_none_is_not_empty():
    def reference(text: str) -> int:  # the documented layout: tag "t", 8-byte length, UTF-8 text
        raw = text.encode()
        h = hashlib.blake2b(b"t" + len(raw).to_bytes(8, "little") + raw, digest_size=8, person=b"vembed.content")
        return int.from_bytes(h.digest(), "little") >> 1

    for text in ("a red cat", "", "é ü 猫", "a red cat "):
        assert content_id(Item(text=text)) == reference(text)
        assert 0 <= content_id(Item(text=text)) < 2**63
    assert content_id(Item(text="a red cat")) == content_id(Item(text="a red cat"))
    assert content_id(Item(text="a red cat")) != content_id(Item(text="a red dog"))
    assert content_id(Item(text=None)) != content_id(Item(text=""))  # no text vs an empty text
    assert content_id(Item(text="\ud800")) >= 0  # a lone surrogate (JSON escape) still hashes


def test_the_same_image_bytes_under_two_names_are_one_id(images):
    a, copy, b = images["a.jpg"], images["copy.png"], images["b.jpg"]
    assert content_id(Item(images=(a,))) == content_id(Item(images=(copy,)))
    assert content_id(Item(images=(a,))) != content_id(Item(images=(b,)))
    # A tar member / Parquet cell with the same bytes is the same image as the file.
    with open(a, "rb") as f:
        member = ShardImage("/data/00001.tar:x.jpg", f.read())
    assert content_id(Item(images=(member,))) == content_id(Item(images=(a,)))
    assert content_id(Item(text="a", images=(member,))) == content_id(Item(text="a", images=(copy,)))


def test_text_and_image_parts_are_kept_apart(images, tmp_path):
    a, b = images["a.jpg"], images["b.jpg"]
    (tmp_path / "x.txt").write_bytes(b"a red cat")
    assert content_id(Item(text="a red cat")) != content_id(Item(images=(str(tmp_path / "x.txt"),)))
    ids = [content_id(it) for it in (Item(text="a"), Item(images=(a,)), Item(text="a", images=(a,)))]
    assert len(set(ids)) == 3  # text only, image only, both
    assert content_id(Item(images=(a, b))) != content_id(Item(images=(b, a)))  # order is content for a VLM
    assert content_id(Item(images=(a, a))) != content_id(Item(images=(a,)))


def test_file_digest_is_cached_and_a_rewritten_file_is_read_again(tmp_path):
    path = tmp_path / "im.jpg"
    _jpeg(path, 0)
    first = content_id(Item(images=(str(path),)))
    hits = _file_digest.cache_info().hits
    assert content_id(Item(images=(str(path),))) == first
    assert _file_digest.cache_info().hits == hits + 1  # not read again
    _jpeg(path, 5, size=(30, 30))  # other bytes and size: a new cache key
    assert content_id(Item(images=(str(path),))) != first


def test_decoded_pictures_hash_their_pixels_and_missing_files_fail(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    one = ShardImage("ds:0.png", None, Image.fromarray(pixels))
    same = ShardImage("ds:7.png", None, Image.fromarray(pixels.copy()))
    other = ShardImage("ds:1.png", None, Image.fromarray(255 - pixels))
    assert content_id(Item(images=(one,))) == content_id(Item(images=(same,)))
    assert content_id(Item(images=(one,))) != content_id(Item(images=(other,)))
    with pytest.raises(ImageLoadError, match=r"f\.jsonl:3: cannot load image .*gone\.jpg: file not found"):
        content_id(Item(images=(str(tmp_path / "gone.jpg"),)), "f.jsonl:3")


def test_ids_are_the_same_in_another_process_with_another_hash_seed(images):
    items = [Item(text="a red cat"), Item(text=""), Item(images=(images["a.jpg"],)), Item("sky", (images["b.jpg"],))]
    code = (
        "import json, sys\nfrom vembed_blocks.data.content_ids import content_id\n"
        "from vembed_blocks.data.records import Item\n"
        "items = [Item(t, tuple(i)) for t, i in json.loads(sys.argv[1])]\n"
        "print(json.dumps([hash('a red cat'), [content_id(it) for it in items]]))"
    )
    seed = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
    arg = json.dumps([[it.text, list(it.images)] for it in items])
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    salted, got = json.loads(out.stdout.splitlines()[-1])
    assert salted != hash("a red cat")  # Python's own hash differs there...
    assert got == [content_id(it) for it in items]  # ...the content ids do not


def _record(query, positive, negatives=(), source="f:1") -> Record:
    return Record(query=query, positive=positive, negatives=list(negatives), source=source)


def _want(items) -> list[int]:
    return [content_id(it) for it in items]


def test_text_collator_ids_per_side_with_a_duplicate_positive():
    t = lambda s: Item(text=s)
    recs = [
        _record(t("red cat"), t("a cat photo"), [t("a dog photo"), t("the sky")]),
        _record(t("cat photo"), t("a cat photo")),  # the same positive as row 0
        _record(t("blue bird"), t("a bird"), [t("a cat photo")]),  # row 0's positive as a hard negative
    ]
    collate = TextCollator(word_tokenizer(WORDS), query_instruction="query: ", doc_instruction="passage: ")
    ids = collate(recs)["content_ids"]
    assert set(ids) == {"query", "positive", "negatives"}
    assert ids["query"].dtype == torch.long and ids["query"].shape == ids["positive"].shape == (3,)
    assert ids["query"].tolist() == _want(r.query for r in recs)  # the text as given: no instruction
    assert ids["positive"].tolist() == _want(r.positive for r in recs)
    assert ids["negatives"].tolist() == _want(n for r in recs for n in r.negatives)  # [M], row-major
    assert ids["positive"][0] == ids["positive"][1] == ids["negatives"][2]
    assert "negatives" not in collate([_record(t("a"), t("b"))])["content_ids"]  # K = 0


def test_dual_encoder_and_vlm_collators_hash_image_bytes(images):
    tok = word_tokenizer(WORDS, template="[BOS] $A [EOS]", bos_token="[BOS]", eos_token="[EOS]")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    im = lambda n: Item(images=(images[n],))
    recs = [
        _record(Item(text="red cat"), im("a.jpg"), [im("b.jpg")]),
        _record(Item(text="blue dog"), im("copy.png"), [im("a.jpg")]),  # a.jpg's bytes under another name
    ]
    ids = DualEncoderCollator(CLIPProcessor(image_processor=ip, tokenizer=tok))(recs)["content_ids"]
    assert ids["positive"][0] == ids["positive"][1] == ids["negatives"][1]
    assert ids["negatives"].tolist() == _want([im("b.jpg"), im("a.jpg")])

    qtok = word_tokenizer(
        (*WORDS, *CHAT_WORDS), ("[PAD]", "[UNK]", *QWEN_SPECIALS), eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIALS),
    )  # fmt: skip
    qip = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    vlm = VLMCollator(qwen_vl_processor(qtok, qip, QWEN_CHAT))
    both = Item(text="red cat", images=(images["a.jpg"],))
    recs = [_record(both, Item(text="a cat photo")), _record(Item(text="red cat", images=(images["copy.png"],)), both)]
    ids = vlm(recs)["content_ids"]
    assert ids["query"][0] == ids["query"][1] == ids["positive"][1]  # text + the same image bytes
    assert ids["query"][0] != content_id(Item(text="red cat")) and "negatives" not in ids


def test_fixed_negatives_ids_follow_its_padding_and_cutting():
    t = lambda s: Item(text=s)
    recs = [
        _record(t("a"), t("b"), [t("c"), t("d"), t("e")]),
        _record(t("f"), t("g")),
        _record(t("h"), t("i"), [t("j")]),
    ]
    batch = WithScores(FixedNegatives(TextCollator(word_tokenizer(WORDS)), 2))(recs)
    ids = batch["content_ids"]
    # One id per encoded slot, as batch["negatives"] is laid out: cut to 2, padded with the positive.
    assert ids["negatives"].tolist() == _want(t(s) for s in ["c", "d", "g", "g", "j", "i"])
    assert len(ids["negatives"]) == len(batch["negatives"]["input_ids"])
    laid = scatter_negative_ids(ids["negatives"], batch["negatives_mask"])
    assert laid.tolist() == [_want([t("c"), t("d")]), [-1, -1], [content_id(t("j")), -1]]


def _scatter_loop(ids: list[int], mask: list[list[bool]]) -> list[list[int]]:
    it, out = iter(ids), []
    for row in mask:
        out.append([next(it) if m else -1 for m in row])
    return out


def test_scatter_negative_ids_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    for b, k in ((1, 1), (3, 4), (5, 2)):
        mask = torch.rand(b, k, generator=gen) < 0.6
        ids = torch.randint(0, 2**62, (int(mask.sum()),), generator=gen)
        assert scatter_negative_ids(ids, mask).tolist() == _scatter_loop(ids.tolist(), mask.tolist())
        full = torch.randint(0, 2**62, (b * k,), generator=gen)  # FixedNegatives: every slot has an id
        want = [
            [v if m else -1 for v, m in zip(row, mrow)] for row, mrow in zip(full.view(b, k).tolist(), mask.tolist())
        ]
        assert scatter_negative_ids(full, mask).tolist() == want
    with pytest.raises(ValueError, match="marks 1 real negatives of 4 slots but got 2 ids"):
        scatter_negative_ids(torch.tensor([1, 2]), torch.tensor([[True, False], [False, False]]))
    assert content_ids([]).shape == (0,) and content_ids([]).dtype == torch.long
