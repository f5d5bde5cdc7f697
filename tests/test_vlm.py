"""vembed_blocks.vlm on a tiny random Qwen3-VL: processor loading without torchvision, pooling, and
VLMSplit (GradCache chunks of Qwen-VL inputs) against full-batch gradients in float64."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil

import _gradcache_refs as ref
import numpy as np
import pytest
import torch
from _multiproc import run_ranks
from _tiny_models import tiny_qwen3vl
from PIL import Image
from torch import nn

from vembed_blocks.colbert import maxsim
from vembed_blocks.data import VLMCollator, read_records
from vembed_blocks.gradcache import GradCache
from vembed_blocks.vlm import VLMSplit, load_vlm_processor, vlm_embed, vlm_hidden_states, vlm_token_embeddings


@pytest.fixture
def float64():
    """Exact gradient comparisons in float64, for the tests that ask for it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    path = tiny_qwen3vl(str(root / "model"))
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (64, 64), (30, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    t2i = [
        {"query": "a red cat", "positive": "im0.png"},
        {"query": "the blue bird on the left of a green dog", "positive": "im1.png"},
    ]
    m2i = [{"query_image": "im2.png", "query": "sky", "positive": "im0.png"}]
    records = []
    for name, rows in (("t2i.jsonl", t2i), ("m2i.jsonl", m2i)):  # one format per file
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        records += list(read_records(str(root / name)))
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(path).eval()
    processor = load_vlm_processor(path)
    return {"path": path, "model": model, "processor": processor, "records": records}


def test_processor_loads_without_torchvision_and_round_trips(qwen, tmp_path):
    proc = qwen["processor"]
    assert type(proc).__name__ == "Qwen3VLProcessor" and proc.video_processor is None
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert "<|im_start|>" in proc.chat_template
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    again = load_vlm_processor(str(tmp_path))
    copy = pickle.loads(pickle.dumps(again))  # DataLoader workers get a pickled collator
    batch = [VLMCollator(p)(qwen["records"])["query"] for p in (proc, again, copy)]
    for other in batch[1:]:
        assert other.keys() == batch[0].keys()
        assert all(torch.equal(other[k], batch[0][k]) for k in batch[0])
    assert batch[0]["image_grid_thw"].shape == (1, 3)  # only the M2I query has an image


def _single(collator, record, side):
    """The same item collated alone (no padding at all)."""
    return collator.encode([getattr(record, side)], side == "query", [record.source])


def test_vlm_embed_is_the_last_real_token_and_ignores_left_padding(qwen):
    model, collator = qwen["model"], VLMCollator(qwen["processor"])
    q = collator(qwen["records"])["query"]
    mask = q["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # left padded, lengths differ
    with torch.no_grad():
        hidden = model(**q).last_hidden_state
        emb = vlm_embed(model, q)
    for i in range(len(mask)):
        last = max(j for j in range(mask.shape[1]) if mask[i, j])  # by hand
        assert torch.equal(emb[i], hidden[i, last])
    # Each row alone (no padding) gives the same embedding: padding is invisible.
    for i, rec in enumerate(qwen["records"]):
        alone = _single(collator, rec, "query")
        with torch.no_grad():
            ref = model(**alone).last_hidden_state[0, -1]
        torch.testing.assert_close(emb[i], ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        mean = vlm_embed(model, q, pooling="mean")
    torch.testing.assert_close(mean[0], hidden[0][mask[0].bool()].mean(0))


def test_vlm_token_embeddings_mask_padding_and_project(qwen):
    model, collator = qwen["model"], VLMCollator(qwen["processor"])
    batch = collator(qwen["records"])
    proj = torch.nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        q, qm = vlm_token_embeddings(model, batch["query"], proj)
        d, dm = vlm_token_embeddings(model, batch["positive"], proj)
        hidden = vlm_hidden_states(model, batch["query"])
    assert q.shape == (*batch["query"]["input_ids"].shape, 8) and qm.dtype == torch.bool
    assert torch.equal(qm, batch["query"]["attention_mask"].bool())
    torch.testing.assert_close(q, proj(hidden))
    # MaxSim over the padded batch equals MaxSim of each pair computed alone.
    scores = maxsim(q, qm, d, dm)
    for i, rec in enumerate(qwen["records"]):
        with torch.no_grad():
            qi, qim = vlm_token_embeddings(model, _single(collator, rec, "query"), proj)
            di, dim = vlm_token_embeddings(model, _single(collator, rec, "positive"), proj)
        torch.testing.assert_close(scores[i, i], maxsim(qi, qim, di, dim)[0, 0], atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_recompute_matches_after_another_forward(qwen, tmp_path):
    """Regression: the model's default KV cache was appended to again when checkpointed layers were
    recomputed in backward, after a second forward (keys 2x long: a shape error); vlm_* pass use_cache=False."""
    from transformers import AutoModel

    from vembed_blocks.parallel import checkpoint_layers

    batch = VLMCollator(qwen["processor"])(qwen["records"])
    grads = []
    for ckpt in (False, True):
        model = AutoModel.from_pretrained(qwen["path"]).train()
        if ckpt:
            checkpoint_layers(model)
        q, p = vlm_embed(model, batch["query"]), vlm_embed(model, batch["positive"])
        (q @ p.T).logsumexp(-1).sum().backward()
        grads.append(model.language_model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_vlm_hidden_states_rejects_a_generation_head():
    class Head(torch.nn.Module):
        def forward(self, **kw):
            return {"logits": torch.zeros(1)}

    with pytest.raises(ValueError, match="AutoModel"):
        vlm_hidden_states(Head(), {"input_ids": torch.zeros(1, 2, dtype=torch.long)})


# ---------------------------------------------------------------------------- VLMSplit under GradCache


class FlatVisionModel(nn.Module):
    """Qwen-VL-shaped inputs: flat pixel_values[patches, C], image_grid_thw[images, 3] and
    mm_token_type_ids[B, L] (1 = image token; one contiguous run per image). The image
    feature (mean over its patches) is added to the row the image belongs to."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.text, self.vis = nn.Embedding(40, 8), nn.Linear(6, 8)

    def forward(self, input_ids, attention_mask, mm_token_type_ids, pixel_values=None, image_grid_thw=None):
        m = attention_mask.unsqueeze(-1).to(torch.float64)
        out = (self.text(input_ids) * m).sum(1) / m.sum(1)
        runs = [[j for j in range(t.shape[0]) if t[j] == 1 and (j == 0 or t[j - 1] != 1)] for t in mm_token_type_ids]
        n_images = sum(len(r) for r in runs)
        if n_images == 0:
            assert pixel_values is None and image_grid_thw is None
            return out
        sizes = image_grid_thw.prod(1).tolist()
        assert len(sizes) == n_images and sum(sizes) == pixel_values.shape[0]
        feats = [f.mean(0) for f in torch.split(self.vis(pixel_values), sizes)]
        owner = [row for row, r in enumerate(runs) for _ in r]
        extra = torch.zeros_like(out).index_add(0, torch.tensor(owner), torch.stack(feats))
        return out + torch.tanh(extra)


def vlm_batch() -> dict[str, torch.Tensor]:
    """5 rows with 1, 0, 2, 1, 0 images of different patch counts."""
    images_per_row, grids = [1, 0, 2, 1, 0], [[1, 2, 2], [1, 2, 4], [1, 4, 2], [1, 2, 2]]
    types = torch.zeros(5, 10, dtype=torch.long)
    for row, n in enumerate(images_per_row):
        for j in range(n):  # image tokens at 1-2 and 4-5, a text token between
            types[row, 1 + 3 * j : 3 + 3 * j] = 1
    g = torch.Generator().manual_seed(9)
    grid = torch.tensor(grids)
    return {
        "input_ids": torch.randint(0, 40, (5, 10), generator=g),
        "attention_mask": torch.ones(5, 10, dtype=torch.long),
        "mm_token_type_ids": types,
        "pixel_values": torch.randn(int(grid.prod(1).sum()), 6, generator=g),
        "image_grid_thw": grid,
    }


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_vlm_flat_pixel_values(chunk_size: int) -> None:
    model, text = FlatVisionModel(), ref.Tower(vocab=40, dim=8)
    inputs, d_in = vlm_batch(), ref.batch(5, 7)
    rm, rt = copy.deepcopy(model), copy.deepcopy(text)
    ref.info_nce(rm(**inputs), rt(**d_in)).backward()

    gc = GradCache(chunk_size=chunk_size, splitter=VLMSplit)
    ref.info_nce(gc.encode(model, **inputs), gc.encode(text, **d_in)).backward()
    ref.assert_close(ref.grads(model, text), ref.grads(rm, rt))


def qwen3_vl_with_batch():
    """A ~80k-parameter Qwen3-VL (random weights) and a processor-shaped batch: 4 rows with
    1, 0, 2, 1 images of different grids, right padding."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    text = dict(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=32,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=150,
        video_token_id=151,
        vision_start_token_id=152,
        vision_end_token_id=153,
    )
    torch.manual_seed(11)
    model = Qwen3VLModel(cfg)
    grids = [[[1, 4, 4]], [], [[1, 4, 8], [1, 8, 4]], [[1, 4, 4]]]
    rows = []
    for k, row_grids in enumerate(grids):
        ids = [1, 10 + k]
        for t, h, w in row_grids:  # <vision_start> image tokens (t*h*w / merge^2) <vision_end>
            ids += [152] + [150] * (t * h * w // 4) + [153]
        rows.append(ids + [20 + k] * (k + 1))
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    grid = torch.tensor([g for row in grids for g in row])
    g = torch.Generator().manual_seed(12)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == 150).long(),
        "pixel_values": torch.randn(int(grid.prod(1).sum()), 3 * 2 * 4 * 4, generator=g),
        "image_grid_thw": grid,
    }
    return model, inputs


@pytest.mark.usefixtures("float64")
def test_real_qwen3_vl_chunks() -> None:
    """The real Qwen3-VL model accepts every chunk (pixels, grids and mm_token_type_ids agree)."""
    model, inputs = qwen3_vl_with_batch()
    text = ref.Tower(vocab=200, dim=32)
    d_in = ref.batch(4, 13, vocab=200)

    def embed(model=model, **kw):
        h = model(**kw).last_hidden_state
        m = kw["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    rm, rt = copy.deepcopy(model), copy.deepcopy(text)
    ref.info_nce(embed(model=rm, **inputs), rt(**d_in)).backward()
    want = ref.grads(rm, rt)
    for chunk in (1, 3):
        model.zero_grad(), text.zero_grad()
        gc = GradCache(chunk_size=chunk, splitter=VLMSplit)
        ref.info_nce(gc.encode(embed, **inputs), gc.encode(text, **d_in)).backward()
        ref.assert_close(ref.grads(model, text), want)


@pytest.mark.usefixtures("float64")
def test_vlm_split_with_a_token_budget() -> None:
    """max_tokens with VLMSplit: chunks hold at most the budget of real tokens (image tokens count), same gradients."""
    model, text = FlatVisionModel(), ref.Tower(vocab=40, dim=8)
    inputs, d_in = vlm_batch(), ref.batch(5, 7)
    inputs["attention_mask"] = (torch.arange(10)[None] < torch.tensor([7, 4, 10, 6, 3])[:, None]).long()
    rm, rt = copy.deepcopy(model), copy.deepcopy(text)
    ref.info_nce(rm(**inputs), rt(**d_in)).backward()

    seen: list[tuple[int, int]] = []

    def fn(**chunk: torch.Tensor) -> torch.Tensor:
        seen.append((len(chunk["input_ids"]), int(chunk["attention_mask"].sum())))
        return model(**chunk)

    gc = GradCache(max_tokens=12, splitter=VLMSplit)
    ref.info_nce(gc.encode(fn, **inputs), gc.encode(text, **d_in)).backward()
    ref.assert_close(ref.grads(model, text), ref.grads(rm, rt))
    # Rows of 7, 4, 10, 6, 3 real tokens under a budget of 12: chunks [0, 1], [2], [3, 4] (first pass + 2 replays).
    assert sorted(set(seen)) == [(1, 10), (2, 9), (2, 11)] and len(seen) == 5


def test_vlm_split_slices_pixels_grids_and_mrope_positions() -> None:
    inputs = vlm_batch()  # rows with 1, 0, 2, 1, 0 images of 4, 8, 8, 4 patches
    inputs["position_ids"] = torch.arange(3 * 5 * 10).view(3, 5, 10)
    split = VLMSplit(((), inputs))
    assert len(split) == 5
    _, rows = split[1:3]  # row 1 (no image) and row 2 (images 1 and 2: patches 4..20)
    assert torch.equal(rows["image_grid_thw"], inputs["image_grid_thw"][1:3])
    assert torch.equal(rows["pixel_values"], inputs["pixel_values"][4:20])
    assert torch.equal(rows["position_ids"], inputs["position_ids"][:, 1:3])
    assert torch.equal(rows["input_ids"], inputs["input_ids"][1:3])
    _, empty = split[4:5]  # no image in the chunk: no vision keys at all
    assert "pixel_values" not in empty and "image_grid_thw" not in empty
    assert torch.equal(empty["mm_token_type_ids"], inputs["mm_token_type_ids"][4:5])

    with pytest.raises(ValueError, match="splitter=VLMSplit"):  # the default splitter: rows on dim 0 only
        GradCache(chunk_size=2).encode(FlatVisionModel(), **vlm_batch())
    bad = vlm_batch()
    bad["image_grid_thw"] = bad["image_grid_thw"][:3]
    with pytest.raises(ValueError, match="vision runs"):
        VLMSplit(((), bad))
    del bad["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        VLMSplit(((), bad))


def test_processor_save_copies_the_video_config_without_marking_the_processor(qwen, tmp_path):
    """load_vlm_processor remembers the source folder (not as an attribute of the processor) so that
    save_pretrained copies its video_preprocessor_config.json (the video processor itself needs torchvision)."""
    src = tmp_path / "src"
    shutil.copytree(qwen["path"], src)
    video = {"processor_class": "Qwen3VLProcessor", "fps": 2.0}
    (src / "video_preprocessor_config.json").write_text(json.dumps(video))
    proc = load_vlm_processor(str(src))
    assert proc.video_processor is None  # rebuilt without torchvision
    assert not [k for k in vars(proc) if "vembed" in k]
    proc.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "video_preprocessor_config.json").read_text()) == video


def _view_warnings(rank, world, path):
    import warnings

    from transformers import AutoModel

    from vembed_blocks.parallel import checkpoint_layers
    from vembed_blocks.vlm import shard_vlm

    records = list(read_records(os.path.join(os.path.dirname(path), "t2i.jsonl")))
    batch = VLMCollator(load_vlm_processor(path))(records)["positive"]  # with images
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = shard_vlm(checkpoint_layers(AutoModel.from_pretrained(path)))
        vlm_embed(model, batch).sum().backward()
        # The filter is narrow: the same words from anywhere but torch's FSDP code still show.
        warnings.warn_explicit("FSDP2-wrapped module (X) returned a view tensor.", UserWarning, "user.py", 1, "user")
    return [(str(w.message)[:30], w.filename.endswith("user.py")) for w in seen if "view tensor" in str(w.message)]


def test_shard_vlm_silences_only_fsdp_view_warning(qwen):
    """Under checkpointing FSDP2 warns at every forward that the root returned a view; vlm_* only read it."""
    assert run_ranks(_view_warnings, 1, qwen["path"], timeout=180) == [[("FSDP2-wrapped module (X) retur", True)]]


def test_the_processor_built_without_torchvision_is_said_once_as_normal(qwen, caplog):
    """Building the processor without its video part is the normal path here: one info line per process, worded
    as such; the reason AutoProcessor gave is kept at debug level, once per load."""
    import logging

    from vembed_blocks import vlm

    vlm._say_image_only.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="vembed_blocks.vlm"):
        load_vlm_processor(qwen["path"])
        load_vlm_processor(qwen["path"])
    said = [r for r in caplog.records if r.name == "vembed_blocks.vlm" and r.levelno >= logging.INFO]
    assert [r.getMessage() for r in said] == [
        "loading the Qwen-VL processor without its video processor (it needs torchvision; images work)"
    ]
    reasons = [r for r in caplog.records if r.levelno == logging.DEBUG and "AutoProcessor" in r.getMessage()]
    assert len(reasons) == 2 and all(qwen["path"] in r.getMessage() for r in reasons)
