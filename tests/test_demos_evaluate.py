"""recipes/evaluate.py run bare: clip_t2i's quick demo trained in-process, then its export evaluated.

- one process: the metrics equal the clip run's own final metrics (same export, same validation set), which
  improve on its untrained ones, and a float64 ranking of the saved unit embeddings written here; topk.jsonl
  lists that ranking; items.json, report.md; the console shows the table, the first queries' best matches and
  where the files are. Run again with --relevance labels it reuses the export (no second training) and its
  metrics equal a float64 reference where relevant = the images of the colour and shape the caption names.
- torchrun, 2 ranks, --relevance labels: the same files and the label reference; args.json says 2 ranks.
- --data without --model (and the reverse) stops naming the missing flag; --demo-quick needs the demo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _recipes import load_script, torchrun
from safetensors.torch import load_file

evaluate = load_script("evaluate")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")


def metrics64(scores: torch.Tensor, relevant: list[set[int]]) -> dict[str, float]:
    """recall@1/5/10 and mrr@10 of a float64 score matrix, ties to the lower index, written out plainly."""
    out = {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "mrr@10": 0.0}
    for i, rel in enumerate(relevant):
        order = sorted(range(scores.shape[1]), key=lambda j: (-scores[i, j].item(), j))
        hits = [j in rel for j in order]
        for k in (1, 5, 10):
            out[f"recall@{k}"] += sum(hits[:k]) / len(rel) / len(relevant)
        first = next((r for r, h in enumerate(hits[:10]) if h), None)
        out["mrr@10"] += (0.0 if first is None else 1 / (first + 1)) / len(relevant)
    return out


def object_of_caption(text: str) -> str:
    words = text.replace(",", " ").split()
    return next(c for c in COLOURS if c in words) + " " + next(s for s in SHAPES if s in words)


def object_of_image(path: str) -> str:
    _, shape, colour, *_ = os.path.basename(path).split("_")  # val_<shape>_<colour>_<position>_0.png
    return f"{colour} {shape}"


def check_outputs(out: Path, labels: bool) -> dict[str, float]:
    """Files of one evaluation of the demo: embeddings, items, top-k and metrics against float64 references.
    Returns the reference metrics."""
    run = out / "demo" / "run"
    q, d = (load_file(str(out / f"{n}.safetensors"))["embeddings"].double() for n in ("queries", "corpus"))
    assert q.shape == d.shape == (120, q.shape[1])  # one validation render per shape x colour x position
    torch.testing.assert_close(q.norm(dim=1), torch.ones(120, dtype=torch.float64), atol=1e-5, rtol=0)
    items = json.loads((out / "items.json").read_text())
    captions, images = [i["text"] for i in items["queries"]], [i["images"][0] for i in items["corpus"]]
    if labels:
        relevant = [{j for j, im in enumerate(images) if object_of_image(im) == object_of_caption(c)} for c in captions]
        assert all(len(r) == 5 for r in relevant)  # the object at each of the 5 positions
    else:
        rows = [json.loads(line) for line in (run / "demo" / "val.jsonl").read_text().splitlines()]
        positive = {r["query"]: str(run / "demo" / r["positive"]) for r in rows}
        relevant = [{images.index(positive[c])} for c in captions]
    scores = q @ d.T
    want = metrics64(scores, relevant)
    got = json.loads((out / "metrics.json").read_text())["after"]
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-6)

    topk = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert [row["query"]["text"] for row in topk] == captions
    for i, row in enumerate(topk):
        best = sorted(range(120), key=lambda j: (-scores[i, j].item(), j))[:10]
        assert [h["corpus_index"] for h in row["results"]] == best
        assert [h["score"] for h in row["results"]] == pytest.approx(scores[i, best].tolist(), abs=1e-5)
        assert [h["relevant"] for h in row["results"]] == [j in relevant[i] for j in best]
        assert row.get("label") == (object_of_caption(captions[i]) if labels else None)
    assert "| recall@1 |" in (out / "report.md").read_text()
    return want


def test_bare_run_evaluates_the_clip_demo_export_then_reuses_it_for_labels(tmp_path, capsys):
    out = tmp_path / "eval"
    got = evaluate.main(["--demo-quick", "--output", str(out)])
    clip = json.loads((out / "demo" / "run" / "metrics.json").read_text())
    assert got == pytest.approx(clip["after"], abs=1e-6)  # the recipe's own final evaluation, reproduced
    assert clip["after"]["recall@10"] >= clip["before"]["recall@10"] + 0.1, clip
    assert clip["after"]["mrr@10"] >= 2 * clip["before"]["mrr@10"], clip
    check_outputs(out, labels=False)
    printed = capsys.readouterr().out
    assert "metric         dual" in printed and "query 2: '" in printed and "query 3:" not in printed
    assert f"wrote to {out}: args.json, corpus.safetensors, items.json, metrics.json" in printed
    assert f"model: {out / 'demo' / 'run' / 'final'}" in printed

    weights = out / "demo" / "run" / "final" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    labels = evaluate.main(["--demo-quick", "--output", str(out), "--relevance", "labels", "--show", "1"])
    assert weights.stat().st_mtime_ns == trained  # reused, not trained again
    assert labels == pytest.approx(json.loads((out / "metrics.json").read_text())["after"], abs=0)
    want = check_outputs(out, labels=True)
    assert labels["recall@5"] == pytest.approx(want["recall@5"], abs=1e-6)
    printed = capsys.readouterr().out
    assert "(5 relevant, label '" in printed and "query 1:" not in printed


def test_torchrun_bare_run_with_labels(tmp_path):
    out = tmp_path / "eval"
    printed = torchrun("evaluate", "--demo-quick", "--relevance", "labels", "--output", str(out), timeout=240)
    check_outputs(out, labels=True)
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
    clip = json.loads((out / "demo" / "run" / "metrics.json").read_text())  # that 2-rank training run
    assert clip["after"]["recall@10"] >= clip["before"]["recall@10"] + 0.1, clip
    assert printed.count("query 0:") == 1 and "label '" in printed and f"wrote to {out}" in printed


def test_model_and_data_go_together(capsys):
    cases = [
        (["--data", "val.jsonl"], "--model is required with --data"),
        (["--model", "final"], "--data is required with --model"),
        (["--model", "final", "--data", "val.jsonl", "--demo-quick"], "--demo-quick is for the demo"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
