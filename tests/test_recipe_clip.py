"""recipes/clip_t2i.py and recipes/evaluate.py end to end on tiny random CLIP / SigLIP models.

- the embedded demo (reduced size) trains in-process and retrieval clearly improves;
- torchrun with 2 gloo ranks: a run split by --stop-at/--resume reproduces the losses of an
  uninterrupted run, the exported folder loads with from_pretrained, and evaluate.py
  reproduces the recipe's final metrics; the same save/resume/export for SigLIP.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clip_t2i.py"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


clip_t2i = load_script("clip_t2i")
evaluate = load_script("evaluate")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("demo")
    train, val = clip_t2i.render_demo(str(root), per_combo=1, seed=0)
    return {"train": train, "val": val, "clip": clip_t2i.build_tiny_clip(str(root / "clip"), quick=True), "root": str(root)}


def torchrun(*args: str, timeout: float = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RECIPE), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def train_log(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}


def test_demo_quick_run_improves_retrieval(tmp_path):
    result = clip_t2i.main(["--demo-quick", "--output", str(tmp_path), "--batch-size", "32", "--num-workers", "0",
                            "--log-every", "20"])  # fmt: skip
    before, after = result["before"], result["after"]
    assert after["recall@10"] >= before["recall@10"] + 0.1, (before, after)
    assert after["mrr@10"] >= 2 * before["mrr@10"], (before, after)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == {"before": before, "after": after}
    assert (tmp_path / "final" / "model.safetensors").exists()


def common(demo: dict[str, str], out: Path, model: str, *extra: str) -> list[str]:
    return ["--data", demo["train"], "--val-data", demo["val"], "--model", model, "--output", str(out),
            "--batch-size", "8", "--chunk-size", "3", "--num-workers", "0", "--log-every", "1", *extra]  # fmt: skip


def test_torchrun_clip_resume_matches_straight_run_and_evaluate_reproduces(demo, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(*common(demo, straight, demo["clip"], "--max-steps", "4", "--save-every", "2"))
    torchrun(*common(demo, split, demo["clip"], "--max-steps", "4", "--stop-at", "2"))
    assert not (split / "final").exists()
    torchrun(*common(demo, split, demo["clip"], "--max-steps", "4", "--resume"))

    a, b = train_log(straight), train_log(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)

    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(split / "final")
    assert isinstance(model, CLIPModel) and model.logit_scale.dim() == 0
    recipe_after = json.loads((split / "metrics.json").read_text())["after"]
    assert recipe_after == pytest.approx(json.loads((straight / "metrics.json").read_text())["after"], abs=1e-6)
    got = evaluate.main(["--model", str(split / "final"), "--data", demo["val"], "--output", str(tmp_path / "eval")])
    for name, value in recipe_after.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    emb = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "eval" / "queries.safetensors"))
    assert torch.allclose(emb["embeddings"].norm(dim=-1), torch.ones(len(emb["embeddings"])), atol=1e-5)


def build_tiny_siglip(out: str, vocab_words: list[str]) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(vocab_words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=64)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=64, pad_token_id=0, eos_token_id=2),
        vision_config=dict(tower, image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(out)
    SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out


def test_torchrun_siglip_saves_resumes_and_exports(demo, tmp_path):
    words = sorted({w for t in clip_t2i.TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
                   | set(clip_t2i.SHAPES) | set(clip_t2i.COLOURS) | set(clip_t2i.POSITIONS))  # fmt: skip
    siglip = build_tiny_siglip(str(tmp_path / "siglip"), words)
    out = tmp_path / "run"
    torchrun(*common(demo, out, siglip, "--loss", "siglip", "--max-steps", "3", "--stop-at", "2"))
    torchrun(*common(demo, out, siglip, "--loss", "siglip", "--max-steps", "3", "--resume"))
    assert sorted(train_log(out)) == [1, 2, 3]

    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(out / "final")
    assert model.logit_bias.abs().item() > 0  # the learned bias was folded back into the export
    recipe_after = json.loads((out / "metrics.json").read_text())["after"]
    got = evaluate.main(["--model", str(out / "final"), "--data", demo["val"], "--output", str(tmp_path / "eval")])
    for name, value in recipe_after.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
