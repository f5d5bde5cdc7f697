"""Seed 004, step 2: vembed_blocks/edit/flow_matching.py and vembed_blocks/edit/rows.py against plain formulas,
then recipes/extract_embeds.py -> recipes/edit_sft.py chained on a tiny random Qwen-Image-Edit folder
(tests/_tiny_edit.py): training lowers the loss, freezes what it should, exports a folder the pipeline runs;
2 gloo ranks resumed equal the straight run and log the sampler's draws."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from _recipes import load_script, torchrun, train_log  # noqa: E402

from vembed_blocks.edit import flow_matching as fm  # noqa: E402

# ----------------------------------------------------------------------------- vembed_blocks/edit/flow_matching.py


def test_sigma_table_matches_the_schedulers_and_the_formula():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        table = fm.sigma_table(1000, shift)
        u = np.arange(1000, 0, -1, dtype=np.float64) / 1000
        ref = shift * u / (1 + (shift - 1) * u)
        np.testing.assert_allclose(table.double().numpy(), ref, rtol=0, atol=1e-6)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        torch.testing.assert_close(table, sched.sigmas[:1000], rtol=0, atol=1e-6)
        torch.testing.assert_close(table * 1000, sched.timesteps, rtol=0, atol=1e-3)  # timestep = sigma * 1000
    # Qwen-Image's scheduler shifts at inference only (use_dynamic_shifting): its training table is unshifted
    dyn = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    torch.testing.assert_close(fm.sigma_table(1000, 1.0), dyn.sigmas[:1000], rtol=0, atol=1e-6)
    # from a scheduler config: the table the scheduler itself builds (Qwen-Image's real config; a static shift)
    from _tiny_edit import SCHEDULER_CONFIG

    for config in (SCHEDULER_CONFIG, {"num_train_timesteps": 500, "shift": 3.0}):
        sched = FlowMatchEulerDiscreteScheduler(**config)
        table = fm.scheduler_sigma_table(dict(sched.config))
        torch.testing.assert_close(table, sched.sigmas[: len(table)], rtol=0, atol=1e-6)
        assert len(table) == config["num_train_timesteps"]


def test_noising_target_weighting_and_loss_against_plain_formulas():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 6, generator=g).double()
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for b in range(3):
        s = float(sigma[b])
        torch.testing.assert_close(fm.noisy_latents(x0, noise, sigma)[b], (1 - s) * x0[b] + s * noise[b])
    torch.testing.assert_close(fm.flow_target(x0, noise), noise - x0)
    cos = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.1, 0.5, 0.9)]
    torch.testing.assert_close(fm.loss_weighting("cosmap", sigma).double(), torch.tensor(cos, dtype=torch.float64))
    torch.testing.assert_close(
        fm.loss_weighting("sigma_sqrt", sigma).double(), torch.tensor([100.0, 4.0, 1 / 0.81], dtype=torch.float64)
    )
    assert fm.loss_weighting("logit_normal", sigma).tolist() == [1.0, 1.0, 1.0]
    pred, w = torch.randn(3, 4, 2, 6, generator=g).double(), torch.tensor([1.0, 2.0, 0.5])
    ref = sum(float(w[b]) * float(((pred[b] - (noise[b] - x0[b])) ** 2).sum()) for b in range(3)) / pred.numel()
    assert float(fm.flow_matching_loss(pred, noise - x0, w)) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        fm.flow_matching_loss(pred, pred[:2])
    with pytest.raises(ValueError, match="unknown"):
        fm.loss_weighting("bogus", sigma)


def test_timestep_sampling():
    draw = lambda density, seed: fm.sample_timestep_indices(6, 1000, density, 0.3, 0.7, 1.29, torch.manual_seed(seed))
    # logit-normal: floor(sigmoid(N(0.3, 0.7)) * 1000) of the same normal draws
    z = torch.randn(6, generator=torch.manual_seed(1)).double() * 0.7 + 0.3
    assert draw("logit_normal", 1).tolist() == [int(1000 / (1 + math.exp(-float(v)))) for v in z]
    r = torch.rand(6, generator=torch.manual_seed(2)).double()
    assert draw("none", 2).tolist() == [int(float(v) * 1000) for v in r]
    mode = [1 - v - 1.29 * (math.cos(math.pi * v / 2) ** 2 - 1 + v) for v in r.tolist()]
    assert draw("mode", 2).tolist() == [int(v * 1000) for v in mode]
    # --uniform-sampling: 4 ranks split [0, 1000) into 4 strata; 3 ranks (1000 % 3 != 0) all draw from [0, 1000)
    for rank in range(4):
        idx = fm.uniform_timestep_indices(500, 1000, rank, 4, torch.manual_seed(rank))
        assert idx.min() >= 250 * rank and idx.max() < 250 * (rank + 1) and len(set(idx.tolist())) > 100
    idx = fm.uniform_timestep_indices(2000, 1000, 2, 3, torch.manual_seed(0))
    assert idx.min() < 50 and idx.max() > 950
    idx = fm.uniform_timestep_indices(500, 1000, 5, 6, torch.manual_seed(0))  # 6 ranks: 2 groups of 3
    assert idx.min() >= 500 and idx.max() < 1000
    # the --uniform-sampling switch: the stratified draw, else the density's with its default parameters
    strat = fm.training_timestep_indices(8, 1000, True, "logit_normal", 1, 4, torch.manual_seed(5))
    assert strat.tolist() == fm.uniform_timestep_indices(8, 1000, 1, 4, torch.manual_seed(5)).tolist()
    dense = fm.training_timestep_indices(8, 1000, False, "logit_normal", 1, 4, torch.manual_seed(5))
    z = torch.randn(8, generator=torch.manual_seed(5)).double()
    assert dense.tolist() == [int(1000 / (1 + math.exp(-float(v)))) for v in z]


def test_pack_unpack_is_the_2x2_patchify():
    x = torch.randn(2, 3, 1, 4, 6)
    tokens = fm.pack_latents(x)
    assert tokens.shape == (2, 6, 12)
    for b, i, j, c, di, dj in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 2, 1, 0), (0, 1, 1, 1, 1, 1)]:
        assert tokens[b, i * 3 + j, c * 4 + di * 2 + dj] == x[b, c, 0, 2 * i + di, 2 * j + dj]
    torch.testing.assert_close(fm.unpack_latents(tokens, 4, 6), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even"):
        fm.pack_latents(torch.zeros(1, 3, 3, 4))


def test_edit_inputs_and_edit_flow_loss_lay_out_the_pipelines_sequence():
    g = torch.Generator().manual_seed(3)
    target, src = torch.randn(2, 4, 1, 4, 6, generator=g), torch.randn(2, 4, 1, 2, 4, generator=g)
    noise, sigma = torch.randn(2, 6, 16, generator=g), torch.tensor([0.25, 0.75])
    # token (i, j) of a latent is its 2x2 patch at (2i, 2j), channel-major: written out per element
    patch = lambda z, b, i, j: torch.stack(
        [z[b, c, 0, 2 * i + di, 2 * j + dj] for c in range(4) for di in (0, 1) for dj in (0, 1)]
    )
    x0 = torch.stack([torch.stack([patch(target, b, i, j) for i in range(2) for j in range(3)]) for b in range(2)])
    clean = torch.stack([torch.stack([patch(src, b, 0, j) for j in range(2)]) for b in range(2)])
    tokens, shapes = fm.edit_inputs(target, [src], noise, sigma)
    assert shapes == [[(1, 2, 3), (1, 1, 2)]] * 2 and tokens.shape == (2, 6 + 2, 16)
    for b in range(2):  # the noised target first, then the clean source
        s = float(sigma[b])
        torch.testing.assert_close(tokens[b, :6], (1 - s) * x0[b] + s * noise[b])
        torch.testing.assert_close(tokens[b, 6:], clean[b], rtol=0, atol=0)
    seen = {}

    def model(**kw):  # a stand-in transformer (edit_flow_loss is under test): its output is 3x its input tokens
        seen.update(kw)
        return (3 * kw["hidden_states"],)

    prompt, mask = torch.randn(2, 5, 8, generator=g), torch.ones(2, 5, dtype=torch.bool)
    loss = fm.edit_flow_loss(model, target, [src], prompt, mask, sigma, noise, "cosmap")
    assert seen["timestep"] is sigma and seen["encoder_hidden_states"] is prompt and seen["img_shapes"] == shapes
    assert seen["encoder_hidden_states_mask"] is mask and seen["return_dict"] is False
    ref = 0.0
    for b in range(2):
        s = float(sigma[b])
        w = 2 / (math.pi * (1 - 2 * s + 2 * s * s))
        pred = 3 * ((1 - s) * x0[b].double() + s * noise[b].double())
        ref += w * float(((pred - (noise[b].double() - x0[b].double())) ** 2).sum())
    assert float(loss) == pytest.approx(ref / (2 * 6 * 16), rel=1e-5)


def test_edit_row_loss_draws_the_noise_and_scores_one_row():
    g = torch.Generator().manual_seed(4)
    target, src0, src1 = (
        torch.randn(4, 1, 2, 4, generator=g),
        torch.randn(4, 1, 2, 2, generator=g),
        torch.randn(4, 1, 4, 2, generator=g),
    )
    prompt, sigma = torch.randn(3, 8, generator=g), torch.tensor([0.4])
    seen = {}

    def model(**kw):  # a stand-in transformer: its output is its input tokens minus 1
        seen.update(kw)
        return (kw["hidden_states"] - 1,)

    loss = fm.edit_row_loss(model, [target, src0, src1], prompt, sigma, "none", torch.Generator().manual_seed(9))
    # the noise: N(0, 1) of the target's 2 packed tokens x 16 channels, drawn from that generator
    noise = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(9)).double()
    x0 = torch.stack([torch.stack([target[c, 0, di, 2 * j + dj] for c in range(4) for di in (0, 1) for dj in (0, 1)])
                      for j in range(2)])[None].double()  # fmt: skip
    pred = 0.6 * x0 + 0.4 * noise - 1
    assert float(loss) == pytest.approx(float(((pred - (noise - x0)) ** 2).mean()), rel=1e-5)
    assert seen["hidden_states"].shape == (1, 2 + 1 + 2, 16) and seen["img_shapes"] == [
        [(1, 1, 2), (1, 1, 1), (1, 2, 1)]
    ]
    assert torch.equal(seen["encoder_hidden_states"], prompt[None]) and seen["encoder_hidden_states_mask"] is None
    with pytest.raises(ValueError, match=r"prompt must be \[L, D\]"):
        fm.edit_row_loss(model, [target], prompt[None], sigma)
    with pytest.raises(ValueError, match="at least the target"):
        fm.edit_row_loss(model, [], prompt, sigma)


# ----------------------------------------------------------------------------- vembed_blocks/edit/rows.py


def test_image_tensor_resizes_to_the_area_in_multiples_of_16(tmp_path):
    from PIL import Image

    from vembed_blocks.edit.rows import image_tensor

    pixels = np.random.default_rng(0).integers(0, 255, (48, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = image_tensor(str(tmp_path / "a.png"), 32)
    # area 32*32: scale sqrt(1024 / (96*48)) -> 45.3 x 22.6 px -> sides rounded to 48 x 16
    ref = np.asarray(Image.fromarray(pixels).resize((48, 16), Image.Resampling.LANCZOS), dtype=np.float64)
    assert out.shape == (3, 16, 48) and out.dtype == torch.float32
    np.testing.assert_allclose(out.permute(1, 2, 0).double().numpy(), ref / 127.5 - 1, atol=1e-6)
    with pytest.raises(Exception, match=r"rec:7: cannot load image .*missing.png"):
        image_tensor(str(tmp_path / "missing.png"), 32, "rec:7")


def test_vae_latents_are_the_pipelines_normalised_mode_in_mini_batches():
    from diffusers import AutoencoderKLQwenImage

    from vembed_blocks.edit.rows import vae_latents

    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=mean, latents_std=std,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, *hw, generator=g) * 2 - 1 for hw in [(16, 32), (16, 32), (32, 16)]]
    refs = []
    with torch.no_grad():
        for im in images:  # one image at a time, the mode, normalised per channel in float64
            z = vae.encode(im[None, :, None]).latent_dist.mode()[0].double()
            refs.append(
                (z - torch.tensor(mean).double().view(-1, 1, 1, 1)) / torch.tensor(std).double().view(-1, 1, 1, 1)
            )
    for mini_batch in (1, 2):  # 2: the first two share one encode call
        out = vae_latents(vae, images, mini_batch)
        assert [tuple(z.shape) for z in out] == [(4, 1, 2, 4), (4, 1, 2, 4), (4, 1, 4, 2)]
        for z, ref in zip(out, refs):
            torch.testing.assert_close(z.double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mini_batch"):
        vae_latents(vae, images, 0)


def test_row_latents_split_one_encode_pass_per_row_and_rank_share_covers_every_record_once():
    from diffusers import AutoencoderKLQwenImage

    from vembed_blocks.edit.rows import rank_share, row_latents, vae_latents

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    image = lambda h, w: torch.rand(3, h, w, generator=g) * 2 - 1
    rows = [
        {"target": image(16, 16), "sources": []},
        {"target": image(16, 32), "sources": [image(16, 32), image(32, 16)]},
        {"target": image(16, 16), "sources": [image(16, 16)]},
    ]
    out = row_latents(vae, rows, mini_batch=2)
    assert [len(z) for z in out] == [1, 3, 2]
    for row, latents in zip(rows, out):  # each image alone, in the row's order: target, then sources
        for im, z in zip([row["target"], *row["sources"]], latents):
            torch.testing.assert_close(z, vae_latents(vae, [im])[0], rtol=0, atol=1e-5)

    tasks = {"b": ["b0", "b1"], "a": ["a0", "a1", "a2"]}  # read in task-name order: a0 a1 a2 b0 b1
    for world in (1, 2, 3, 4):
        shares = [list(rank_share(tasks, r, world)) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # as many forwards on every rank
        counted = sorted((k, row) for s in shares for k, row, c in s if c)
        assert counted == list(enumerate(["a0", "a1", "a2", "b0", "b1"]))
        assert all(row == ["a0", "a1", "a2", "b0", "b1"][k % 5] for s in shares for k, row, _ in s)
    with pytest.raises(ValueError, match="rank < world"):
        next(rank_share(tasks, 2, 2))
    with pytest.raises(ValueError, match="no records"):
        next(rank_share({"a": []}, 0, 1))


# ----------------------------------------------------------------------------- seed 004 chained: extract -> train

WEIGHTS = "edits=2,t2i=1,unused=0"
SRC_WEIGHTS = "0=1,1=1,2=1,3=0"
TRAINABLE = [r"transformer_blocks\.1\.", "proj_out"]
SOURCES = [0, 1, 2, 1, 2, 0, 1, 2]  # source images per edit row
COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 210, 40)]
PROMPTS = ["turn the sky red", "make the dog blue", "merge two characters into one scene", "a cat", "the sky"]


def write_edit_rows(root: Path) -> Path:
    """8 seed-format edit rows with 0-2 source images of other aspect ratios than the target; 3 inverse ones."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, size in enumerate([(32, 32), (48, 32), (32, 48), (64, 32)]):
        noise = rng.integers(-30, 30, (size[1], size[0], 3))
        pixels = np.clip(np.array(COLOURS[k]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{k}.png")
    rows = []
    for i, n in enumerate(SOURCES):
        row = {"source_image": [f"img/{(i + j + 1) % 4}.png" for j in range(n)] or None}
        row.update(target_image=f"img/{i % 4}.png", instruction=PROMPTS[i % 5])
        if i in (1, 3, 6):  # (rows with one source image: an inverse record has one target)
            row["inverse_instruction"] = PROMPTS[(i + 2) % 5]
        rows.append(row)
    (root / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "edits.jsonl"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(model folder, task root): the tiny Qwen-Image-Edit folder; tasks "edits" and "unused" (extract_embeds.py
    on the edit rows) and "t2i" (the same rows with --t2i-mode)."""
    from _tiny_edit import tiny_qwen_image_edit

    root = tmp_path_factory.mktemp("edit_sft")
    model, data = tiny_qwen_image_edit(str(root / "model")), write_edit_rows(root / "data")
    extract = load_script("extract_embeds")
    for task, extra in (("edits", []), ("t2i", ["--t2i-mode"])):
        argv = ["--data", str(data), "--model", model, "--output", str(root / "meta" / task), "--batch-size", "4"]
        extract.main([*argv, *extra])
    shutil.copytree(root / "meta" / "edits", root / "meta" / "unused")
    shutil.copytree(root / "meta" / "t2i", root / "val" / "t2i")  # --val-data: the cheapest task (no sources)
    return model, str(root / "meta")


def test_edit_rows_read_the_extracted_stores(chain):
    from vembed_blocks.data.embed_store import EmbedStore, EmbedWriter
    from vembed_blocks.edit.rows import EditRows, image_tensor, load_edit_tasks

    model, meta = chain
    tasks = load_edit_tasks(meta, 32, prompt_width=32)
    assert sorted(tasks) == ["edits", "t2i", "unused"]
    store, rows = EmbedStore(os.path.join(meta, "edits")), tasks["edits"]
    assert len(rows) == 11 and [rows[i]["group"] for i in range(len(rows))] == store.groups.tolist()
    for i in range(len(rows)):
        row, info = rows[i], store.info(i)
        assert torch.equal(row["prompt"], store[i]["prompt_embeds"]) and row["task"] == "edits"
        torch.testing.assert_close(row["target"], image_tensor(info["target_images"][0], 32), rtol=0, atol=0)
        assert (
            len(row["sources"])
            == len(info["source_images"])
            == (info["num_source_images"] if not info["inverse"] else 1)
        )
    assert {len(tasks["t2i"][i]["sources"]) for i in range(8)} == {0}  # t2i: the same targets, no source images
    assert tasks["t2i"].groups.tolist() == SOURCES  # grouped by the row's source count all the same
    with pytest.raises(ValueError, match=r"edits: prompt embeddings of width 32, the model takes 64"):
        load_edit_tasks(meta, 32, prompt_width=64)
    bad = Path(meta).parent / "bad"
    targets = [{}, {"target_images": info["target_images"] * 2}]  # none; two (an inverse of 2 sources)
    lines = [{"id": f"{k}.0", "n": k, "source_images": info["source_images"], **t} for k, t in enumerate(targets)]
    EmbedWriter(bad).write(0, lines, {"prompt_embeds": [torch.zeros(3, 32)] * 2})
    with pytest.raises(
        ValueError,
        match=r"bad: 2 record\(s\) do not name exactly one target image \(index-[^:]+:1, "
        r"index-[^:]+:2\.\.\.\).*extract with --disable-inverse",
    ):
        EditRows(str(bad), 32)  # before step 1, not when the record is first drawn
    (bad / "meta.json").write_text(json.dumps({"kind": "vlm"}))
    with pytest.raises(ValueError, match=r"bad/meta.json: kind 'vlm'"):
        EditRows(str(bad), 32)
    with pytest.raises(ValueError, match=r"no side 'query'"):
        EditRows(os.path.join(meta, "edits"), 32, prompt_side="query")


def test_sampler_options_follow_the_seed_weights(chain):
    from vembed_blocks.data import WeightedTaskSampler
    from vembed_blocks.edit.rows import edit_sampler_options, load_edit_tasks

    tasks = load_edit_tasks(chain[1], 32)
    options = edit_sampler_options(tasks, WEIGHTS, "0=1,1=2,2=1")
    sampler = WeightedTaskSampler({t: len(r) for t, r in tasks.items()}, 1, seed=0, rank=0, world_size=1, **options)
    draws = [sampler.draw(t)[1] for t in range(6000)]
    # task: edits 2/3, t2i 1/3, unused never; then the group among those the task has, by 0=1,1=2,2=1
    # (edits' inverse records have 1 source image: every group is there, as in t2i)
    for key, p in {"edits/0": 1 / 6, "edits/1": 1 / 3, "edits/2": 1 / 6, "t2i/0": 1 / 12, "t2i/1": 1 / 6}.items():
        assert abs(draws.count(key) / len(draws) - p) < 0.025, (key, draws.count(key))
    assert not [d for d in draws if d.startswith("unused")]
    assert edit_sampler_options(tasks) == {"weights": None}
    with pytest.raises(ValueError, match="--train-data-weights"):
        edit_sampler_options(tasks, "edits")


def train_argv(model: str, meta: str, out: Path, *extra: str) -> list[str]:
    return [
        *("--model", model, "--data", meta, "--output", str(out), "--image-sample-size", "32", "--num-workers", "0"),
        *("--train-data-weights", WEIGHTS, "--train-src-img-num-weights", SRC_WEIGHTS, "--lr-schedule", "constant"),
        *("--warmup-steps", "2", "--trainable-modules", *TRAINABLE, *extra),
    ]


def test_extract_then_train_one_process_learns_freezes_and_exports(chain, tmp_path):
    from _tiny_edit import load_edit_processor
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    model, meta = chain
    out = tmp_path / "run"
    val = str(Path(meta).parent / "val")
    argv = train_argv(model, meta, out, "--max-steps", "16", "--lr", "3e-3", "--val-data", val)
    argv += ["--val-timesteps", "300,700", "--adam-weight-decay", "0.0", "--checkpointing-steps", "8"]
    recipe = load_script("edit_sft")
    result = recipe.main([*argv, "--weighting-scheme", "logit_normal", "--vae-mini-batch", "2"])
    assert len(result["losses"]) == 16 and all(math.isfinite(v) for v in result["losses"])
    before, after = result["before"]["flow_loss"], result["after"]["flow_loss"]
    assert after < 0.9 * before, (before, after)  # the same records, noise and timesteps before and after
    args = json.loads((out / "args.json").read_text())
    assert args["weight_decay"] == 0.0 and args["save_every"] == 8  # the seed's flag names set the shared flags
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000008", "step-000016"]

    base = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    final = QwenImageTransformer2DModel.from_pretrained(out / "final", subfolder="transformer")
    trained = {n for n, _ in base.named_parameters() if any(re.search(r, n) for r in TRAINABLE)}
    assert trained and len(trained) < len(list(base.parameters()))
    new = dict(final.named_parameters())
    for name, p in base.named_parameters():
        assert name in trained or torch.equal(p, new[name]), f"{name} is frozen but changed"
    assert not torch.equal(base.proj_out.weight, final.proj_out.weight)

    # final/ is a pipeline folder whose transformer is the trained one: one edit call, an image of the asked size
    pipe = QwenImageEditPlusPipeline.from_pretrained(out / "final", processor=load_edit_processor(str(out / "final")))
    assert torch.equal(pipe.transformer.proj_out.weight, final.proj_out.weight)
    src = Image.open(Path(meta).parent / "data" / "img" / "1.png")
    image = pipe(image=[src], prompt="make the sky red", height=32, width=48, num_inference_steps=2).images[0]
    assert image.size == (48, 32)
    # what the recipe cannot honour stops it before any step, saying why
    for extra, why in ((["--trainable-modules", "nomatch"], "match no parameter"), (["--lora", "4"], "without --lora")):
        with pytest.raises(SystemExit, match=why):
            recipe.main(train_argv(model, meta, tmp_path / "refused", "--max-steps", "1", *extra))


def test_two_ranks_resumed_run_equals_the_straight_one_and_logs_the_draws(chain, tmp_path):
    from vembed_blocks.data import WeightedTaskSampler
    from vembed_blocks.edit.rows import edit_sampler_options, load_edit_tasks

    model, meta = chain
    flags = ["--max-steps", "4", "--save-every", "2", "--uniform-sampling", "--grad-checkpointing", "--bf16"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun("edit_sft", *train_argv(model, meta, straight, *flags), timeout=180)
    # the split run: the straight run's folder as a run stopped after its step-2 checkpoint, then --resume
    shutil.copytree(straight, split, ignore=shutil.ignore_patterns("step-000004", "latest", "final"))
    lines = (split / "train_log.jsonl").read_text().splitlines()
    (split / "train_log.jsonl").write_text("".join(line + "\n" for line in lines[:2]))
    torchrun("edit_sft", *train_argv(model, meta, split, *flags, "--resume"), timeout=180)
    a, b = train_log(straight), train_log(split)
    assert sorted(a) == sorted(b) == list(range(1, 5))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), (step, a, b)
    assert (split / "final" / "transformer" / "config.json").exists()

    # each step's logged task is the sampler's draw for that step: weighted task, then number of source images
    tasks = load_edit_tasks(meta, 32)
    options = edit_sampler_options(tasks, WEIGHTS, SRC_WEIGHTS)
    sampler = WeightedTaskSampler({t: len(r) for t, r in tasks.items()}, 1, seed=0, rank=0, world_size=2, **options)
    logged = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [r["task"] for r in logged] == [sampler.draw(r["step"] - 1)[1] for r in logged]
    assert all(r["task"].split("/")[0] in ("edits", "t2i") for r in logged)
