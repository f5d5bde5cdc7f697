"""vembed_blocks.vlm on a tiny random Qwen3-VL: processor loading without torchvision, pooling."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from _tiny_models import tiny_qwen3vl
from PIL import Image

from vembed_blocks.colbert import maxsim
from vembed_blocks.data import VLMCollator, read_records
from vembed_blocks.vlm import load_vlm_processor, vlm_embed, vlm_hidden_states, vlm_token_embeddings


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
    return collator.encode([getattr(record, side)], [record.source], side == "query")


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
