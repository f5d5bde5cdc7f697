"""Collators on tiny real processors, run through tiny models of the same architecture."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLModel,
    Qwen3VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vembed_blocks.data.collate import DualEncoderCollator, TextCollator, VLMCollator, scatter_negatives
from vembed_blocks.data.images import ImageLoadError
from vembed_blocks.data.records import Item, Record, RecordError, read_records

WORDS = "a an the red blue green cat dog bird photo of sky sunset make it query passage represent user input".split()
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials, wrap=None, **kw):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", *specials, *WORDS, "system", "assistant", ".", "'s", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    if wrap:  # e.g. CLIP's <bos> text <eos>: its text tower pools at the eos token
        bos, eos = wrap
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", **kw)


def _save_load(model_cls, config, tmp_path):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path / "model")
    return model_cls.from_pretrained(tmp_path / "model").eval()


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (64, 64), (30, 50), (48, 36), (33, 33)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.jpg")
    return tmp_path


def _records(d, rows, name="d.jsonl", **kw):
    (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return list(read_records(str(d / name), **kw))


def test_text_collator_through_bert(data, tmp_path):
    tok = _tokenizer(["[CLS]", "[SEP]"])
    recs = _records(
        data,
        [
            {
                "query": "red cat",
                "positive": "a photo of a red cat",
                "negatives": ["dog", "blue bird", "sky"],
                "label": "x",
            },
            {"query": "dog", "positive": "a dog", "label": "y"},
            {"query": "bird", "positive": "the bird", "negatives": ["cat"], "label": "x"},
        ],
    )
    batch = TextCollator(tok, max_length=6, query_instruction="query: ")(recs)
    assert set(batch) == {"query", "positive", "negatives", "negatives_mask", "labels", "content_ids"}
    assert batch["query"]["input_ids"].shape == (3, 3)  # "query: red cat" = 3 tokens ("query:" is one unknown word)
    assert batch["positive"]["input_ids"].shape == (3, 6)  # "a photo of a red cat" = 6, the max_length
    assert batch["negatives"]["input_ids"].shape[0] == 4  # 3 + 0 + 1 real negatives
    assert batch["negatives_mask"].tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    x, y = (int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") >> 1 for v in "xy")
    assert batch["labels"].tolist() == [x, y, x]
    assert batch["query"]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    bert = _save_load(BertModel, cfg, tmp_path)
    with torch.no_grad():
        neg = bert(**batch["negatives"]).last_hidden_state[:, 0]
    full = scatter_negatives(neg, batch["negatives_mask"])
    assert full.shape == (3, 3, 16) and torch.equal(full[0, 1], neg[1]) and torch.equal(full[2, 0], neg[3])
    assert not full[1].any() and not full[2, 1:].any()


def test_labels_mean_the_same_in_every_batch_rank_and_run(data):
    tok = _tokenizer(["[CLS]", "[SEP]"])
    collate = TextCollator(tok)
    rank0 = collate(_records(data, [{"query": q, "positive": "a", "label": q} for q in ("cat", "dog", "cat")]))[
        "labels"
    ]
    rank1 = collate(_records(data, [{"query": q, "positive": "a", "label": q} for q in ("dog", "cat", "bird")]))[
        "labels"
    ]
    assert rank0[0] == rank0[2] == rank1[1] and rank0[1] == rank1[0]  # by first appearance: cat 0 vs 1
    assert len({*rank0.tolist(), *rank1.tolist()}) == 3 and min(rank0.tolist() + rank1.tolist()) >= 0
    # another process with another hash seed computes the same ids
    code = "from vembed_blocks.data.collate import label_id; print(label_id('cat'), label_id('dog'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONHASHSEED": "123"}, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [str(rank0[0].item()), str(rank0[1].item())]


def test_rows_without_a_label_are_marked_not_dropped(data):
    collate = TextCollator(_tokenizer(["[CLS]", "[SEP]"]))
    rows = [
        {"query": "a", "positive": "b", "label": 3},
        {"query": "c", "positive": "d"},
        {"query": "e", "positive": "f", "label": 0},
    ]
    assert collate(_records(data, rows))["labels"].tolist() == [3, -1, 0]
    named = collate(_records(data, [{"query": "a", "positive": "b", "label": "cat"}, {"query": "c", "positive": "d"}]))
    assert named["labels"][1] == -1 and named["labels"][0] >= 0
    with pytest.raises(RecordError, match=r"d.jsonl:1: integer labels must be >= 0, got -2"):
        collate(_records(data, [{"query": "a", "positive": "b", "label": -2}]))
    with pytest.raises(RecordError, match=r"d.jsonl:1: label must be an int or a string, got float 0.5"):
        _records(data, [{"query": "a", "positive": "b", "label": 0.5}, {"query": "c", "positive": "d"}])
    built = [Record(query=Item(text="a"), positive=Item(text="b"), label=0.5, source="code:1")]
    built.append(Record(query=Item(text="c"), positive=Item(text="d"), source="code:2"))
    with pytest.raises(RecordError, match=r"code:2: record has no numeric label"):  # floats built in code
        collate(built)


def _clip_processor():
    tok = _tokenizer(
        ["<|startoftext|>", "<|endoftext|>"],
        wrap=("<|startoftext|>", "<|endoftext|>"),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=ip, tokenizer=tok)


def test_dual_encoder_collator_through_clip(data, tmp_path):
    proc = _clip_processor()
    recs = _records(
        data,
        [
            {"query": "a red cat", "positive": "im0.jpg", "negatives": ["im1.jpg", "im2.jpg"]},
            {"query": "a dog", "positive": "im3.jpg"},
        ],
    )
    batch = DualEncoderCollator(proc)(recs)
    assert set(batch) == {"query", "positive", "negatives", "negatives_mask", "content_ids"}
    assert set(batch["query"]) == {"input_ids", "attention_mask"} and batch["query"]["input_ids"].shape == (2, 5)
    assert batch["query"]["input_ids"][:, 0].tolist() == [proc.tokenizer.bos_token_id] * 2
    assert set(batch["positive"]) == {"pixel_values"} and batch["positive"]["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["negatives"]["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["negatives_mask"].tolist() == [[True, True], [False, False]]
    tok = proc.tokenizer
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            pad_token_id=0,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=8,
    )
    clip = _save_load(CLIPModel, cfg, tmp_path)
    with torch.no_grad():
        q = clip.get_text_features(**batch["query"])
        p = clip.get_image_features(**batch["positive"])
        n = clip.get_image_features(**batch["negatives"])
    q, p, n = (getattr(x, "pooler_output", x) for x in (q, p, n))
    assert q.shape == p.shape == (2, 8) and scatter_negatives(n, batch["negatives_mask"]).shape == (2, 2, 8)
    # M2I: both towers' inputs on the query side; SigLIP-style fixed-length padding.
    m2i = _records(data, [{"query_image": "im0.jpg", "query": "make it blue", "positive": "im1.jpg"}], "m2i.jsonl")
    q = DualEncoderCollator(proc, padding="max_length", max_length=8)(m2i)["query"]
    assert set(q) == {"input_ids", "attention_mask", "pixel_values"} and q["input_ids"].shape == (1, 8)


def test_dual_encoder_collator_errors_name_the_record(data):
    proc = _clip_processor()
    mixed = _records(data, [{"query": "a cat", "positive": "a dog"}], "t.jsonl") + _records(
        data, [{"query": "a cat", "positive": "im0.jpg"}], "i.jsonl"
    )
    with pytest.raises(RecordError, match=r"i.jsonl:1: this record has no text"):
        DualEncoderCollator(proc)(mixed)
    (data / "im4.jpg").write_bytes((data / "im4.jpg").read_bytes()[:60])  # truncated after read_records stat'ed it
    recs = _records(data, [{"query": "a cat", "positive": "im0.jpg"}, {"query": "a dog", "positive": "im4.jpg"}])
    with pytest.raises(ImageLoadError, match=r"d.jsonl:2: cannot load image .*im4.jpg"):
        DualEncoderCollator(proc)(recs)


def test_encode_one_side_with_and_without_sources(data):
    """encode(items, is_query, sources=None): no made-up sources; errors then name the item's position."""
    from vembed_blocks.data.records import Item

    tok = _tokenizer(["[CLS]", "[SEP]"])
    collator = TextCollator(tok, query_instruction="query: ")
    items = [Item(text="red cat"), Item(text="a dog")]
    q, d = collator.encode(items, is_query=True), collator.encode(items, False)
    assert q["input_ids"].shape[1] == d["input_ids"].shape[1] + 1  # the query prefix is one more word
    assert all(torch.equal(a, b) for a, b in zip(collator.encode(items, True, ["f:1", "f:2"]).values(), q.values()))
    bad = [Item(text="a cat"), Item(images=(str(data / "im0.jpg"),))]
    with pytest.raises(RecordError, match=r"^items\[1\]: TextCollator needs text-only records"):
        collator.encode(bad, True)
    with pytest.raises(RecordError, match=r"^f:9: TextCollator needs text-only records"):
        collator.encode(bad, True, ["f:8", "f:9"])
    with pytest.raises(ValueError, match="2 items but 1 sources"):
        collator.encode(items, True, ["f:1"])
    with pytest.raises(ImageLoadError, match=r"items\[0\]: cannot load image .*missing.jpg"):
        DualEncoderCollator(_clip_processor()).encode([Item(images=(str(data / "missing.jpg"),))], False)


class _TinyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor (its base class needs torchvision to type-check)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _qwen():
    tok = _tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIALS)
    ip = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    proc = _TinyQwen3VLProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=32,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return proc, cfg


def test_vlm_collator_through_qwen3_vl(data, tmp_path):
    proc, cfg = _qwen()
    image_pad = cfg.image_token_id
    edit = _records(
        data,
        [
            {"source_image": ["im0.jpg", "im1.jpg"], "target_image": "im2.jpg", "instruction": "make it blue"},
            {"source_image": None, "target_image": "im3.jpg", "instruction": "a red cat"},
            {
                "source_image": "im4.jpg",
                "target_image": "im0.jpg",
                "instruction": "sunset",
                "inverse_instruction": "the sky",
            },
        ],
    )
    assert len(edit) == 4  # the third row also gives an inverse record
    batch = VLMCollator(proc, query_instruction="represent the user input .")(edit)
    assert set(batch) == {"query", "positive", "content_ids"}
    q = batch["query"]
    assert set(q) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert (q["attention_mask"][:, -1] == 1).all() and (q["attention_mask"][:, 0] == 0).any()  # left padded
    # Images per query row: 2, 0, 1, 1 (the inverse query holds the target image).
    assert q["image_grid_thw"].shape == (4, 3)
    tokens_per_image = (q["image_grid_thw"].prod(1) // 4).tolist()  # merge_size 2 -> 4 patches per token
    per_row = [sum(tokens_per_image[0:2]), 0, tokens_per_image[2], tokens_per_image[3]]
    assert (q["input_ids"] == image_pad).sum(1).tolist() == per_row
    assert q["pixel_values"].shape == (int(q["image_grid_thw"].prod(1).sum()), 3 * 2 * 16 * 16)
    assert torch.equal(q["mm_token_type_ids"] == 1, q["input_ids"] == image_pad)
    model = _save_load(Qwen3VLModel, cfg, tmp_path)
    with torch.no_grad():
        hq = model(**q).last_hidden_state
        hp = model(**batch["positive"]).last_hidden_state
    assert hq.shape == (4, q["input_ids"].shape[1], 32) and hp.shape[0] == 4 and torch.isfinite(hq[:, -1]).all()


def test_vlm_collator_text_only_side_and_negatives(data, tmp_path):
    proc, cfg = _qwen()
    recs = _records(
        data,
        [
            {"query": "a red cat", "positive": "im0.jpg", "negatives": ["im1.jpg", "im2.jpg"]},
            {"query": "a dog", "positive": "im3.jpg", "negatives": ["im4.jpg"]},
        ],
    )
    batch = VLMCollator(proc)(recs)
    assert set(batch["query"]) == {"input_ids", "attention_mask", "mm_token_type_ids"}  # no images on this side
    assert batch["negatives"]["image_grid_thw"].shape == (3, 3) and batch["negatives_mask"].tolist() == [
        [True, True],
        [True, False],
    ]
    model = _save_load(Qwen3VLModel, cfg, tmp_path)
    with torch.no_grad():
        n = model(**batch["negatives"]).last_hidden_state[:, -1]
    assert scatter_negatives(n, batch["negatives_mask"]).shape == (2, 2, 32)


def test_fixed_negatives_pads_cuts_and_masks(data, caplog):
    from vembed_blocks.data.collate import FixedNegatives

    collate = TextCollator(_tokenizer(["[CLS]", "[SEP]"]))
    rows = [
        {"query": "a", "positive": "b", "negatives": ["c", "d", "e"]},
        {"query": "f", "positive": "g"},
        {"query": "h", "positive": "i", "negatives": ["j"]},
    ]
    batch = FixedNegatives(collate, 2)(_records(data, rows))
    assert batch["negatives_mask"].tolist() == [[True, True], [False, False], [True, False]]
    want = collate.encode([Item(text=t) for t in ["c", "d", "g", "g", "j", "i"]], False)  # padding: the positive
    assert torch.equal(batch["negatives"]["input_ids"], want["input_ids"])
    none = FixedNegatives(collate, 0)
    with caplog.at_level("WARNING"):
        assert "negatives" not in none(_records(data, rows)) and "negatives" not in none(_records(data, rows))
    assert caplog.text.count("--num-negatives is 0") == 1  # once per process
