"""The bare run of recipes/edit_sft.py (seed 004, step 2), in its --demo-quick form, in 1 process and on 2 ranks.

No arguments: a tiny random Qwen-Image-Edit folder under <output>/demo/model, rendered edit rows with 0-2
source images, extract_embeds.py in-process into the task stores <output>/demo/meta/edit (and val/edit), then
training. Checked: a loss logged for every step, the stores hold every rendered record (inverse ones included)
from every rank, the validation flow-matching loss falls, and both reported validation losses equal a plain
float64 recomputation from the saved folders (the base transformer before, final/transformer after), which
also shows that final/ holds the model that was evaluated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from _recipes import load_script, torchrun, train_log  # noqa: E402

from vembed_blocks.data.embed_store import EmbedStore  # noqa: E402

QUICK = ["--demo-quick"]
QUICK_STEPS = 12  # edit_sft.py's demo default for --max-steps with --demo-quick
LEVELS = (250, 500, 750)  # --val-timesteps default


def packed(z: torch.Tensor) -> torch.Tensor:
    """``[C, 1, h, w]`` latents -> ``[h/2 * w/2, 4C]`` tokens: each 2x2 patch, channel-major (Qwen-Image's order)."""
    c, _, h, w = z.shape
    return z[:, 0].reshape(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape(h // 2 * w // 2, 4 * c)


@torch.no_grad()
def reference_val_loss(model: Path, transformer_dir: Path, val_root: Path, side: int, seed: int = 0) -> float:
    """The validation loss, written out: for record k (tasks by name, then records) and level t, the target's
    latents x0 (VAE mode, normalised) noised with N(0, 1) seeded ``seed + 7919 k + t`` at sigma = (1000 - t) / 1000
    (Qwen-Image's unshifted training table), the source latents appended clean, and the mean squared error of the
    transformer's target tokens against ``noise - x0``, in float64, averaged over records and levels."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from vembed_blocks.edit.rows import load_edit_tasks

    vae = AutoencoderKLQwenImage.from_pretrained(model, subfolder="vae").eval()
    net = QwenImageTransformer2DModel.from_pretrained(transformer_dir, subfolder="transformer").eval()
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    tasks = load_edit_tasks(str(val_root), side)
    rows = [tasks[name][i] for name in sorted(tasks) for i in range(len(tasks[name]))]
    losses = []
    for k, row in enumerate(rows):
        latents = [
            (vae.encode(im[None, :, None]).latent_dist.mode()[0] - mean) / std
            for im in (row["target"], *row["sources"])
        ]
        x0 = packed(latents[0])[None]
        shapes = [[(1, z.shape[-2] // 2, z.shape[-1] // 2) for z in latents]]
        for t in LEVELS:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 7919 * k + t))
            sigma = (1000 - t) / 1000
            tokens = torch.cat([(1 - sigma) * x0 + sigma * noise, *[packed(z)[None] for z in latents[1:]]], dim=1)
            pred = net(
                hidden_states=tokens,
                timestep=torch.tensor([sigma]),
                encoder_hidden_states=row["prompt"][None],
                encoder_hidden_states_mask=None,
                img_shapes=shapes,
                return_dict=False,
            )[0]
            losses.append(((pred[:, : x0.shape[1]].double() - (noise - x0).double()) ** 2).mean().item())
    return sum(losses) / len(losses)


def rendered_records(rows_file: Path) -> list[int]:
    """The source-image count of every record the extraction makes of ``rows_file``: each row, plus its
    inverse record (target -> source, one source image) where it has an inverse instruction."""
    counts = []
    for line in rows_file.read_text().splitlines():
        row = json.loads(line)
        src = row["source_image"]
        counts.append(0 if src is None else 1 if isinstance(src, str) else len(src))
        if row.get("inverse_instruction"):
            counts.append(counts[-1])  # the record's group is its row's count
    return counts


def check_demo_run(out: Path, world: int) -> dict:
    """What every bare run must leave behind; returns metrics.json."""
    from diffusers import QwenImageTransformer2DModel

    demo = out / "demo"
    assert json.loads((demo / "model" / "model_index.json").read_text())["_class_name"] == "QwenImageEditPlusPipeline"
    args = json.loads((out / "args.json").read_text())
    assert args["model"] == str(demo / "model") and args["data"] == str(demo / "meta")
    for split, store_dir in (("train", demo / "meta" / "edit"), ("val", demo / "val" / "edit")):
        store, expected = EmbedStore(store_dir), rendered_records(demo / "rows" / split / "edits.jsonl")
        assert len(store) == len(expected) and sorted(store.groups.tolist()) == sorted(expected), split
        assert store.meta["kind"] == "qwen_image" and store.meta["world_size"] == world
        assert sorted(p.name for p in store_dir.glob("index-*.jsonl")) == [f"index-{r:05d}.jsonl" for r in range(world)]
        assert split == "val" or set(expected) == {0, 1, 2}  # training rows with 0, 1 and 2 source images

    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, QUICK_STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["task"] in ("edit/0", "edit/1", "edit/2") for r in logged), logged
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["flow_loss"], metrics["after"]["flow_loss"]
    assert after < 0.85 * before, (before, after)

    base = QwenImageTransformer2DModel.from_pretrained(demo / "model", subfolder="transformer")
    final = QwenImageTransformer2DModel.from_pretrained(out / "final", subfolder="transformer")
    assert not torch.equal(base.proj_out.weight, final.proj_out.weight)  # --trainable-modules "." trains it all
    side = args["image_sample_size"]
    assert reference_val_loss(demo / "model", demo / "model", demo / "val", side) == pytest.approx(before, rel=1e-4)
    assert reference_val_loss(demo / "model", out / "final", demo / "val", side) == pytest.approx(after, rel=1e-4)
    return metrics


def test_edit_demo_in_process_extracts_trains_and_exports(tmp_path, capsys):
    recipe, threads = load_script("edit_sft"), torch.get_num_threads()
    try:
        result = recipe.main(["--output", str(tmp_path), *QUICK])
    finally:  # the demo sets one intra-op thread (no OMP_NUM_THREADS here): the tests after keep theirs
        torch.set_num_threads(threads)
    assert len(result["losses"]) == QUICK_STEPS and all(math.isfinite(v) for v in result["losses"])
    metrics = check_demo_run(tmp_path, world=1)
    assert (result["before"], result["after"]) == (metrics["before"], metrics["after"])
    assert train_log(tmp_path) == {s + 1: pytest.approx(v, abs=1e-6) for s, v in enumerate(result["losses"])}
    printed = capsys.readouterr().out
    assert "rows by source images" in printed and "flow_loss" in printed  # the store summaries, the before/after table
    with pytest.raises(SystemExit):  # --data without --model: a parser error naming --model
        recipe.parse_args(["--data", str(tmp_path / "demo" / "meta")])
    assert "--model is required with --data" in capsys.readouterr().err


def test_edit_demo_on_two_ranks(tmp_path):
    out = torchrun("edit_sft", "--output", str(tmp_path), *QUICK, timeout=240)
    assert "rows by source images" in out and "flow_loss" in out, out
    check_demo_run(tmp_path, world=2)


def test_prepare_edit_demo_takes_plain_values_writes_on_rank_0_and_names_the_stores(tmp_path):
    """The demo's files from explicit values (no recipe arguments): rank 0 renders the rows and, when asked, the
    tiny folder; a fresh call drops earlier stores; the stores are only named (filling them is the caller's)."""
    from vembed_blocks.demo.edit import prepare_edit_demo

    quick = dict(quick=True, seed=0, world=1)
    other = prepare_edit_demo(str(tmp_path / "r1"), rank=1, build_model=True, fresh=True, **quick)
    assert not (tmp_path / "r1").exists()  # not rank 0: nothing written, the same paths named
    stale = tmp_path / "meta" / "edit"
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text("{}")
    made = prepare_edit_demo(str(tmp_path), rank=0, build_model=False, fresh=False, **quick)
    assert {k: v.replace(str(tmp_path), "") for k, v in made.items()} == {
        k: v.replace(str(tmp_path / "r1"), "") for k, v in other.items() if k != "model"
    }
    assert "model" not in made and not (tmp_path / "model").exists() and (stale / "meta.json").exists()
    assert made["train_store"] == str(stale) and made["val_store"] == str(tmp_path / "val" / "edit")
    rows = [Path(made[f"{split}_rows"]).read_text().splitlines() for split in ("train", "val")]
    assert [len(r) for r in rows] == [12, 4] and rows[0][:4] != rows[1]  # the validation rows: another seed
    made = prepare_edit_demo(str(tmp_path), rank=0, build_model=True, fresh=True, **quick)
    assert not stale.exists() and Path(made["train_rows"]).read_text().splitlines() == rows[0]  # seeded
    assert (
        json.loads((tmp_path / "model" / "model_index.json").read_text())["_class_name"] == "QwenImageEditPlusPipeline"
    )
    assert made["model"] == str(tmp_path / "model")
