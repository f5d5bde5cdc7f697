"""The bare-run demos of the VLM family: qwen3_fsdp, extract_embeds and multitask (their --demo-quick form).

- qwen3_fsdp: the rendered caption set and a tiny random Qwen3-VL (a folder under <output>/demo,
  loaded with from_pretrained); retrieval on the held-out renders improves, in 1 process and on 2
  gloo ranks (FSDP2);
- multitask chains extract_embeds' demo (edit rows with 0-2 source images) and image pairs into
  <output>/demo/meta/<task>; the stores hold every record once with the rendered source-image counts,
  a stored vector equals the tiny model's last-token embedding of that record computed here, and
  per-task retrieval improves, in 1 process and on 2 ranks;
- extract_embeds alone on 2 ranks prints the store's summary (rows, sides, groups, inverse rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _recipes import load_script, torchrun

from vembed_blocks.data.embed_store import EmbedStore

qwen3 = load_script("qwen3_fsdp")
multitask = load_script("multitask")
QUICK = ["--demo-quick", "--num-workers", "0", "--log-every", "10"]


def assert_retrieval_improves(before: dict, after: dict, prefix: str = "", k: int = 10) -> None:
    assert after[f"{prefix}recall@{k}"] >= before[f"{prefix}recall@{k}"] + 0.05, (prefix, before, after)
    assert after[f"{prefix}mrr@{k}"] >= 1.5 * before[f"{prefix}mrr@{k}"] + 0.01, (prefix, before, after)


def test_qwen3_demo_in_process_trains_the_saved_tiny_model(tmp_path):
    result = qwen3.main(["--output", str(tmp_path), *QUICK])
    assert_retrieval_improves(result["before"], result["after"])
    assert len(result["losses"]) == 30  # the quick demo's default steps
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (saved["before"], saved["after"]) == (result["before"], result["after"])
    config = json.loads((tmp_path / "demo" / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["text_config"]["hidden_size"] == 32
    assert json.loads((tmp_path / "args.json").read_text())["model"] == str(tmp_path / "demo" / "model")
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_qwen3_demo_on_two_ranks(tmp_path):
    torchrun("qwen3_fsdp", "--output", str(tmp_path), *QUICK, timeout=300)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert_retrieval_improves(metrics["before"], metrics["after"])


def stored_vs_recomputed(store: EmbedStore, data: Path, model_dir: Path, record: int) -> float:
    """Max |stored - recomputed| of one record's query vector: the model's last real token, computed here
    with the processor's chat (system instruction, user: images + text, assistant prefix)."""
    from transformers import AutoModel

    from vembed_blocks.data import VLMCollator, read_records
    from vembed_blocks.vlm import load_vlm_processor

    info = store.info(record)
    line, sub = info["id"].split(".")  # "<line>.<k>": the k-th record of that line (1: the inverse record)
    rec = [r for r in read_records(str(data)) if r.source.rsplit(":", 1)[1] == line][int(sub)]
    model = AutoModel.from_pretrained(model_dir).eval()
    inputs = VLMCollator(load_vlm_processor(str(model_dir)), "Represent the user's input.", None, 512).encode(
        [rec.query], True
    )
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state[0]
    last = int(inputs["attention_mask"][0].nonzero().max())  # right padding: the last real token
    return (store[record]["query"] - hidden[last]).abs().max().item()


def check_demo_stores(meta: Path) -> None:
    edit, pairs = EmbedStore(meta / "edit"), EmbedStore(meta / "pairs")
    # quick: 120 targets, one edit row each, 0/1/2 sources in turn (40 each); 1-source rows add an inverse
    assert len(edit) == 160 and len(set(edit.ids)) == 160
    assert sorted(torch.tensor(edit.groups).tolist()) == [0] * 40 + [1] * 80 + [2] * 40
    assert len(pairs) == 120 and set(pairs.groups.tolist()) == {-1}
    assert edit.sides == pairs.sides == ("positive", "query") and edit[0]["query"].shape == (64,)
    demo = meta / "edit" / "demo"
    two_sources = int(next(i for i in range(len(edit)) if edit.groups[i] == 2))
    assert stored_vs_recomputed(edit, demo / "edits.jsonl", demo / "model", two_sources) < 1e-4


def test_multitask_demo_chains_the_extraction_in_process(tmp_path):
    result = multitask.main(["--output", str(tmp_path), *QUICK])
    for task in ("edit", "pairs"):
        assert_retrieval_improves(result["before"], result["after"], f"{task}/", k=5)
    check_demo_stores(tmp_path / "demo" / "meta")
    steps = [json.loads(line)["task"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {s for s in steps if s.startswith("edit/")} <= {"edit/0", "edit/1", "edit/2"} and "pairs" in steps


def test_extract_and_multitask_demos_on_two_ranks(tmp_path):
    out = torchrun("extract_embeds", "--output", str(tmp_path / "store"), "--demo-quick", timeout=300)
    assert "160 rows in 2 shard(s)" in out and "rows by source images: 0: 40, 1: 80, 2: 40" in out, out
    assert "inverse rows (target -> source): 40" in out and "side query: [64] float32" in out, out
    torchrun("multitask", "--output", str(tmp_path / "head"), *QUICK, timeout=300)
    check_demo_stores(tmp_path / "head" / "demo" / "meta")
    metrics = json.loads((tmp_path / "head" / "metrics.json").read_text())
    for task in ("edit", "pairs"):
        assert_retrieval_improves(metrics["before"], metrics["after"], f"{task}/", k=5)


def test_qwen3_two_task_demo_quick_evaluates_each_task_during_and_after(tmp_path):
    """--demo-tasks --demo-quick: the table holds the quick model's widths (32, 16); --eval-every gives per-task
    (and per-width) metrics in eval_log.jsonl, with no validation loss (undefined across tasks)."""
    result = qwen3.main(["--output", str(tmp_path), "--demo-tasks", "--eval-every", "10", *QUICK])
    rows = [json.loads(line) for line in (tmp_path / "demo" / "tasks.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["retrieval", "colour"] and rows[1]["mrl_dims"] == [32, 16]
    assert not rows[1]["in_batch_negatives"] and rows[1]["num_negatives"] == 5
    evals = [json.loads(line) for line in (tmp_path / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20] and all("loss" not in e for e in evals)
    for metrics in (*evals, result["before"], result["after"]):
        assert {"retrieval/recall@5", "colour/recall@1", "colour/dim16/recall@1"} <= set(metrics), metrics
    logged = {json.loads(line)["task"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()}
    assert logged == {"retrieval", "colour"}
