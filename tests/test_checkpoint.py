"""save_checkpoint / load_checkpoint / export_pretrained, single process and 2 gloo ranks.

Resume exactness: 6 steps straight vs 3 steps, save, fresh objects (and, for 2 ranks, a
fresh process group), load, 3 steps: the losses of steps 4-6 must be bit-identical. The
model has dropout and the loss draws from python's and numpy's RNG too, so every restored
stream matters; data comes from `WeightedTaskSampler`, whose position must be restored.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _multiproc import run_ranks

from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data.sampler import WeightedTaskSampler
from vembed_blocks.distributed import gather_with_offset
from vembed_blocks.export import export_pretrained
from vembed_blocks.parallel import apply_lora, shard_model
from vembed_blocks.schedule import make_scheduler

TASKS = {"a": 12, "b": 8}
SEQ = 6


# ---------------------------------------------------------------- a tiny training run
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)  # same initial weights in every process
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=60,
        max_position_embeddings=16,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.1,
    )
    return BertModel(cfg, add_pooling_layer=False)


def task_data() -> dict[str, torch.Tensor]:
    """task -> token ids [n, 2, SEQ] (query, positive)."""
    g = torch.Generator().manual_seed(3)
    return {t: torch.randint(1, 60, (n, 2, SEQ), generator=g) for t, n in TASKS.items()}


def make_run(wrap=None):
    """Model (optionally wrapped), AdamW, a warm-up LR schedule and the sampler."""
    model = tiny_bert().train()
    if wrap is not None:
        model = wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=4)
    return model, opt, sched, WeightedTaskSampler(TASKS, batch_size=2, weights={"a": 2, "b": 1}, seed=7)


def train(model, opt, sched, sampler, steps: int, data) -> list[float]:
    """InfoNCE over the global batch; the loss also consumes python and numpy randomness."""
    losses = []
    for _ in range(steps):
        task, idx = next(sampler)
        ids = data[task][idx]
        q = model(input_ids=ids[:, 0]).last_hidden_state.mean(1)
        p = model(input_ids=ids[:, 1]).last_hidden_state.mean(1)
        p_all, off = gather_with_offset(F.normalize(p, dim=-1))
        loss = F.cross_entropy(F.normalize(q, dim=-1) @ p_all.T / 0.05, torch.arange(len(idx)) + off)
        loss = loss * (1 + 0.01 * random.random()) * (1 + 0.01 * float(np.random.rand()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _pooled(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


class RaisingSampler:
    """A sampler whose state cannot be saved: simulates a crash in the middle of a save."""

    def state_dict(self):
        raise RuntimeError("disk full")


# ---------------------------------------------------------------- single process
def test_resume_single_process_exact_and_atomic(tmp_path):
    data = task_data()
    seed_all(1)
    straight = train(*make_run(), 6, data)

    seed_all(1)
    run = make_run()
    first = train(*run, 3, data)
    save_checkpoint(tmp_path, model=run[0], optimizer=run[1], step=3, sampler=run[3], scheduler=run[2])
    seed_all(99)  # anything: the checkpoint must restore every stream
    model, opt, sched, sampler = make_run()
    assert load_checkpoint(tmp_path, model=model, optimizer=opt, sampler=sampler, scheduler=sched) == 3
    rest = train(model, opt, sched, sampler, 3, data)
    print("straight", straight, "\nresumed ", first + rest)
    assert first + rest == straight  # bit-identical

    # Interrupted save: shard files get written, then the sampler raises.
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, model=model, optimizer=opt, step=6, sampler=RaisingSampler())
    assert any((tmp_path / ".tmp-step-000006").iterdir())  # half-written data is on disk ...
    assert latest_checkpoint(tmp_path).name == "step-000003"  # ... and never picked up
    (tmp_path / "latest").unlink()  # even without the pointer, only complete ones count
    assert latest_checkpoint(tmp_path).name == "step-000003"
    model, opt, sched, sampler = make_run()
    assert load_checkpoint(tmp_path, model=model, optimizer=opt, sampler=sampler, scheduler=sched) == 3
    assert train(model, opt, sched, sampler, 3, data) == straight[3:]

    # keep-last-N and the pointer; the next save clears the stale temp folder.
    for step in (7, 8, 9):
        save_checkpoint(tmp_path, model=model, optimizer=opt, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000008", "step-000009"]
    assert (tmp_path / "latest").read_text().strip() == "step-000009"
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", model=model, optimizer=opt)


# ---------------------------------------------------------------- two ranks
def _train_and_save(rank, world, root, export_dir, base_dir):
    from transformers.utils import logging

    logging.disable_progress_bar()
    data = task_data()
    seed_all(1 + rank)  # ranks draw different dropout masks, as in real runs
    straight = train(*make_run(shard_model), 6, data)
    seed_all(1 + rank)
    run = make_run(shard_model)
    first = train(*run, 3, data)
    save_checkpoint(root, model=run[0], optimizer=run[1], step=3, sampler=run[3], scheduler=run[2])
    full = {n: p.full_tensor() for n, p in run[0].named_parameters()}
    return straight, first, full, _export_lora_clip(rank, export_dir, base_dir)


def _resume(rank, world, root, refusal_root, refusal_out):
    data = task_data()
    seed_all(123)
    model, opt, sched, sampler = make_run(shard_model)
    step = load_checkpoint(root, model=model, optimizer=opt, sampler=sampler, scheduler=sched)
    rest = train(model, opt, sched, sampler, 3, data)
    # A save that dies after its shard files were written leaves step 3 as the latest.
    try:
        save_checkpoint(root, model=model, optimizer=opt, step=6, sampler=RaisingSampler())
    except RuntimeError:
        pass
    torch.distributed.barrier()
    # Grouped into this launch (each costs seconds): saves/exports refused for non-finite weights.
    return step, rest, latest_checkpoint(root).name, _refusals(rank, world, refusal_root, refusal_out)


def lora_clip(base_dir, wrap=None):
    from transformers import CLIPModel

    model = apply_lora(CLIPModel.from_pretrained(base_dir), r=4, alpha=8)
    model.get_base_model().logit_scale.requires_grad_(True)  # learnable temperature, 0-D
    model = wrap(model) if wrap else model
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)


def _export_lora_clip(rank, export_dir, base_dir):
    """LoRA + a trainable 0-D logit_scale on a tiny CLIP, sharded, one AdamW step (adapters
    become non-zero); export merged and adapter-only, and save a training checkpoint."""
    from test_parallel import clip_batch, clip_loss

    torch.manual_seed(0)
    model, opt = lora_clip(base_dir, wrap=shard_model)
    clip_loss(model, clip_batch(), gather=True).backward()
    opt.step()
    save_checkpoint(f"{export_dir}/ckpt", model=model, optimizer=opt, step=1)
    model.eval()
    with torch.no_grad():
        b = clip_batch()
        emb = (
            model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
            model.get_image_features(pixel_values=b["pixel_values"]),
        )
        emb = tuple(_pooled(e) for e in emb)
    export_pretrained(model, f"{export_dir}/merged")
    export_pretrained(model, f"{export_dir}/adapter", merge_lora=False)
    return emb


def test_two_rank_resume_export_reshard_and_non_finite_refusals(tmp_path):
    from peft import PeftModel
    from test_parallel import clip_batch, tiny_clip_config
    from transformers import CLIPModel

    torch.manual_seed(0)
    base_dir = tmp_path / "clip"
    CLIPModel(tiny_clip_config()).save_pretrained(base_dir)
    root, export_dir = tmp_path / "ckpt", tmp_path / "export"
    saved = run_ranks(_train_and_save, 2, str(root), str(export_dir), str(base_dir), timeout=300)
    refusal_out = tmp_path / "refused-export"
    resumed = run_ranks(_resume, 2, str(root), str(tmp_path / "refused"), str(refusal_out), timeout=300)
    _check_refusals([r[3] for r in resumed], refusal_out)
    for rank in range(2):
        straight, first, _, _ = saved[rank]
        step, rest, latest, _ = resumed[rank]
        print(f"rank {rank}: straight {straight}\n        resumed  {first + rest}")
        assert step == 3 and latest == "step-000003"
        assert first + rest == straight  # bit-identical across a new process group

    # The 2-rank sharded checkpoint loads into one plain process (resharding). The sampler
    # is left out: its state is for a global batch of 4 and it rightly refuses another.
    model, opt, sched, _ = make_run()
    assert load_checkpoint(root, model=model, optimizer=opt, scheduler=sched) == 3
    full = saved[0][2]
    assert max((p - full[n]).abs().max().item() for n, p in model.named_parameters()) == 0

    # Export: merged LoRA loads as a plain CLIPModel with the sharded model's embeddings.
    text, image = saved[0][3]
    b = clip_batch()
    for loaded in (
        CLIPModel.from_pretrained(export_dir / "merged"),
        PeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir), export_dir / "adapter"),
    ):
        with torch.no_grad():
            t = loaded.eval().get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            i = loaded.get_image_features(pixel_values=b["pixel_values"])
        t, i = _pooled(t), _pooled(i)
        dev = max((t - text).abs().max().item(), (i - image).abs().max().item())
        print(f"{type(loaded).__name__}: max |embedding diff| {dev:.2e}")
        assert dev < 1e-5
    merged = CLIPModel.from_pretrained(export_dir / "merged")
    assert merged.logit_scale.dim() == 0
    base = CLIPModel.from_pretrained(base_dir)
    assert (merged.logit_scale - base.logit_scale).abs() > 1e-3  # the step trained it
    with torch.no_grad():  # and the adapters change the embeddings (the check has teeth)
        assert (_pooled(base.get_text_features(input_ids=b["input_ids"])) - text).abs().max() > 1e-3

    # The sharded checkpoint (logit_scale [1] there) resumes into a plain LoRA model (0-D).
    plain, opt = lora_clip(base_dir)
    assert load_checkpoint(export_dir / "ckpt", model=plain, optimizer=opt) == 1
    assert plain.get_base_model().logit_scale.dim() == 0
    assert torch.equal(plain.get_base_model().logit_scale, merged.logit_scale)
    assert opt.state[plain.get_base_model().logit_scale]["exp_avg"].dim() == 0
    with torch.no_grad():
        t = plain.eval().get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert (_pooled(t) - text).abs().max() < 1e-5
    assert not (export_dir / "merged" / "adapter_config.json").exists()


def test_saving_mid_run_leaves_the_live_optimizer_state_of_0d_parameters_intact(tmp_path):
    """A learnable 0-D temperature keeps training after a save exactly as without one."""

    def run(save_at: int | None):
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.lin, model.t = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.tensor(1.0))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        for step in range(1, 5):
            (model.lin(torch.ones(1, 2)).sum() * model.t).backward()
            opt.step()
            opt.zero_grad()
            if step == save_at:
                save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, step=step)
        assert model.t.shape == () and opt.state[model.t]["exp_avg"].shape == ()
        return model.t.item()

    assert run(save_at=2) == run(save_at=None)


def test_resume_with_a_parameter_that_never_had_a_gradient(tmp_path):
    """BERT's unused pooler: no optimizer state on disk; resume loads and continues exactly."""

    def make():
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.used, model.later = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    def step(model, opt, k):  # `later` gets no gradient at all (None, not zeros) before the save
        loss = model.used(torch.ones(1, 2)).sum()
        if k:
            loss = loss + k * model.later(torch.ones(1, 2)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    straight, opt = make()
    step(straight, opt, 0)
    save_checkpoint(tmp_path / "ck", model=straight, optimizer=opt, step=1)
    resumed, opt2 = make()
    assert load_checkpoint(tmp_path / "ck", model=resumed, optimizer=opt2) == 1
    assert len(opt2.state) == len(opt.state) == 2  # only `used` has state, as before the save
    for k in (1, 2, 3):
        step(straight, opt, k)
        step(resumed, opt2, k)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- folder ordering, re-save, model= checks
def _scalar_run(value: float):
    """One weight, set to ``value``; SGD keeps no optimizer state, so only the weight matters."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _save(root, value: float, step: int, **kw) -> None:
    model, opt = _scalar_run(value)
    save_checkpoint(root, model=model, optimizer=opt, step=step, **kw)


def _loaded(root) -> tuple[int, float]:
    model, opt = _scalar_run(0.0)
    return load_checkpoint(root, model=model, optimizer=opt), model.weight.item()


def test_retention_and_latest_order_steps_as_integers(tmp_path):
    """step-1000000 is newer than step-999999 (string order says otherwise), step-10 than step-9."""
    for step in (999999, 1000000, 1000001):
        _save(tmp_path, step, step=step, keep_last=1)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", f"step-{step:06d}"]
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-1000001"
    assert _loaded(tmp_path) == (1000001, 1000001.0)

    # keep_last=2 keeps the two highest steps; the one just written is never pruned.
    for step in (999999, 1000000, 1000002):
        _save(tmp_path, step, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1000001", "step-1000002"]
    _save(tmp_path, 5, step=5, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000005", "step-1000002"]
    assert latest_checkpoint(tmp_path).name == "step-000005"  # the pointer: the last save

    # Folders named without zero padding: only the integer decides.
    hand = tmp_path / "hand"
    for name in ("step-9", "step-10", "step-abc"):
        (hand / name).mkdir(parents=True)
        (hand / name / "meta.json").write_text("{}")
    assert latest_checkpoint(hand).name == "step-10"


class _Killed(Exception):
    pass


def test_resaving_a_step_keeps_a_complete_checkpoint_at_every_kill_point(tmp_path, monkeypatch):
    """Re-save step 5 (weight 1.0 -> 2.0), killed before each rename/removal of the commit in turn:
    step 5 stays loadable (old weights until the new folder took the name, new ones after), and
    the next save (weight 3.0) recovers and leaves a clean root."""
    import vembed_blocks.checkpoint as ckpt

    real = {"_rename": ckpt._rename, "_remove": ckpt._remove}
    # Killed before op k of: rename step-5 -> .old, rename .tmp -> step-5, remove .old, replace
    # `latest`. Per k: what is on disk, the folder latest_checkpoint gives, the weight it loads.
    expected = [
        ([".tmp-step-000005", "latest", "step-000004", "step-000005"], "step-000005", 1.0),
        ([".old-step-000005", ".tmp-step-000005", "latest", "step-000004"], ".old-step-000005", 1.0),  # the window
        ([".old-step-000005", "latest", "step-000004", "step-000005"], "step-000005", 2.0),
        ([".latest.tmp", "latest", "step-000004", "step-000005"], "step-000005", 2.0),
    ]
    for kill_at, (listing, folder, weight) in enumerate(expected):
        root = tmp_path / f"kill{kill_at}"
        _save(root, 0.5, step=4)
        _save(root, 1.0, step=5)
        calls = []

        def op(name):
            def run(*args):
                calls.append(name)
                if len(calls) > kill_at:
                    raise _Killed(name)
                real[name](*args)

            return run

        with monkeypatch.context() as m:
            for name in real:
                m.setattr(ckpt, name, op(name))
            with pytest.raises(_Killed):
                _save(root, 2.0, step=5)
        assert sorted(p.name for p in root.iterdir()) == listing
        assert latest_checkpoint(root).name == folder
        assert _loaded(root) == (5, weight)
        (root / "latest").unlink()  # without the pointer: step 5 still beats step 4
        assert latest_checkpoint(root).name == folder
        assert _loaded(root) == (5, weight)

        _save(root, 3.0, step=5)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000005"]
        assert _loaded(root) == (5, 3.0)

    # Uninterrupted, the re-save makes exactly those four operations: every kill point was tried.
    calls = []
    _save(tmp_path / "whole", 0.5, step=4)
    _save(tmp_path / "whole", 1.0, step=5)
    with monkeypatch.context() as m:
        for name in real:
            m.setattr(ckpt, name, lambda *a, name=name: (calls.append(name), real[name](*a)))
        _save(tmp_path / "whole", 2.0, step=5)
    assert calls == ["_rename", "_rename", "_remove", "_rename"]
    assert _loaded(tmp_path / "whole") == (5, 2.0)


def test_optimizer_parameter_outside_model_is_a_clear_error(tmp_path):
    """A loss's learnable temperature in the optimizer but not in model=: ValueError naming the
    fix on save and on load, not torch's `KeyError: 4`; the ModuleDict it suggests works."""
    from vembed_blocks.losses import InfoNCE

    torch.manual_seed(0)
    encoder, loss = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)), InfoNCE(learn_temperature=True)
    opt = torch.optim.AdamW([*encoder.parameters(), *loss.parameters()], lr=0.1)
    message = (
        "optimizer parameter #4 (param_groups[0], shape ()) is not a parameter of model=; pass one "
        "module holding every optimized parameter, to both save_checkpoint and load_checkpoint, e.g. "
        "model=torch.nn.ModuleDict({'encoder': encoder, 'loss': loss})"
    )
    with pytest.raises(ValueError) as err:
        save_checkpoint(tmp_path, model=encoder, optimizer=opt, step=1)
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []  # raised before writing anything

    both = torch.nn.ModuleDict({"encoder": encoder, "loss": loss})
    with torch.no_grad():
        loss.log_scale.fill_(2.5)
    save_checkpoint(tmp_path, model=both, optimizer=opt, step=1)
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path, model=encoder, optimizer=opt)
    assert str(err.value) == message
    with torch.no_grad():
        loss.log_scale.fill_(0.0)
    assert load_checkpoint(tmp_path, model=both, optimizer=opt) == 1
    assert loss.log_scale.item() == 2.5


# ---------------------------------------------------------------- trusted loading, non-finite weights
def _leave_marker(path: str) -> str:
    """What a crafted rank file runs when unpickled without weights_only (harmless stand-in for os.system)."""
    Path(path).write_text("code ran")
    return path


class _Crafted:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_leave_marker, (self.path,))


class _State:
    """A sampler stand-in holding any state (a streaming loader's: nested, with None and numpy values)."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _small_run():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, make_scheduler(opt, "cosine", 2, 10), torch.amp.GradScaler("cpu")


def test_rank_files_load_weights_only_and_a_crafted_one_is_refused(tmp_path):
    model, opt, sched, scaler = _small_run()
    sampler = WeightedTaskSampler(TASKS, batch_size=2, seed=7)
    for _ in range(3):
        next(sampler)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
    scaler.load_state_dict(
        {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7, "_growth_tracker": 3}
    )
    guard = _State({"skipped_steps": 2, "in_a_row": 1, "rows": 40})  # e.g. a StepGuard's counts
    kw = dict(sampler=sampler, scheduler=sched, scaler=scaler, extra_state={"guard": guard})
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=3, **kw)
    rank_file = tmp_path / "step-000003" / "rank-00000.pt"
    assert set(torch.load(rank_file, weights_only=True)) == {"rng", "sampler", "scheduler", "scaler", "extra"}
    assert json.loads((tmp_path / "step-000003" / "meta.json").read_text())["format"] == 1

    fresh, opt2, sched2, scaler2 = _small_run()
    sampler2 = WeightedTaskSampler(TASKS, batch_size=2, seed=7)
    guard2, absent = _State(), _State({"kept": True})
    kw = dict(model=fresh, optimizer=opt2, sampler=sampler2, scheduler=sched2, scaler=scaler2)
    assert load_checkpoint(tmp_path, **kw, extra_state={"guard": guard2, "absent": absent}) == 3
    assert guard2.state == {"skipped_steps": 2, "in_a_row": 1, "rows": 40} and absent.state == {"kept": True}
    assert sched2.state_dict() == sched.state_dict() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert scaler2.state_dict() == scaler.state_dict() and scaler2.get_scale() == 512.0
    assert [next(sampler2) for _ in range(3)] == [next(sampler) for _ in range(3)]
    assert torch.equal(fresh.weight, model.weight)

    # A streaming loader's nested state; numpy values are stored as Python ones (weights_only admits no numpy).
    stream = {"kind": "stream", "step": np.int64(4), "readers": [{"train": {"token": None, "pos": np.int32(2)}}, {}]}
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=4, sampler=_State({**stream, "w": np.arange(2)}))
    holder = _State()
    assert load_checkpoint(tmp_path, model=fresh, optimizer=opt2, sampler=holder) == 4
    assert holder.state == {
        "kind": "stream",
        "step": 4,
        "readers": [{"train": {"token": None, "pos": 2}}, {}],
        "w": [0, 1],
    }
    assert type(holder.state["step"]) is int

    # A checkpoint written before format versions and the scaler entry still loads; a newer format is refused.
    folder = tmp_path / "step-000003"
    (folder / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    old = torch.load(rank_file, weights_only=True)
    torch.save({k: old[k] for k in ("rng", "sampler", "scheduler")}, rank_file)
    fresh, opt2, sched2, scaler2 = _small_run()
    assert load_checkpoint(folder, model=fresh, optimizer=opt2, scheduler=sched2, scaler=scaler2) == 3
    assert sched2.state_dict() == sched.state_dict() and scaler2.get_scale() == 65536.0  # untouched
    (folder / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1, "format": 99}))
    with pytest.raises(ValueError, match="has checkpoint format 99; this version reads up to 1"):
        load_checkpoint(folder, model=fresh, optimizer=opt2)
    (folder / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1, "format": 1}))

    # A crafted rank file whose unpickling would run code: refused, nothing runs, the model is untouched.
    marker = tmp_path / "marker"
    torch.save({**old, "sampler": _Crafted(str(marker))}, rank_file)
    fresh, opt2, _, _ = _small_run()
    before = fresh.weight.clone()
    with pytest.raises(
        pickle.UnpicklingError, match="refusing to load .*rank-00000.pt: it holds objects other than tensors"
    ):
        load_checkpoint(folder, model=fresh, optimizer=opt2, sampler=_State())
    assert not marker.exists() and torch.equal(fresh.weight, before)
    torch.load(rank_file, weights_only=False)  # the file is harmful indeed: full unpickling runs its code
    assert marker.read_text() == "code ran"


def test_export_refuses_non_finite_weights(tmp_path):
    from test_parallel import tiny_clip_config
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config())
    weight = model.text_model.encoder.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        export_pretrained(model, out)
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert str(err.value) == f"{name} has 3 non-finite values (NaN/inf); not exporting to {out}"
    assert not out.exists()
    with torch.no_grad():  # finite in float32, inf once cast to float16 (max 65504)
        weight[0, :3] = 1e6
    with pytest.raises(ValueError, match="q_proj.weight has 3 non-finite values"):
        export_pretrained(model, out, dtype=torch.float16)
    assert not out.exists()
    export_pretrained(model, out)  # the same weights in float32 are finite: written
    assert CLIPModel.from_pretrained(out).text_model.encoder.layers[0].self_attn.q_proj.weight[0, 0] == 1e6


def _refusals(rank, world, root, out):
    """A finite save, then saves with a NaN in rank 1's weight, an inf in rank 0's optimizer state, a NaN
    in rank 1's FSDP2 shard, and an export of that model; returns (messages, ``root`` listing, latest)."""

    def attempt(fn, **kw):
        try:
            fn(**kw)
        except ValueError as err:
            return str(err)
        return "saved"

    torch.manual_seed(0)  # a plain module: every rank has its own full copy
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    messages = [attempt(save_checkpoint, dir=root, model=model, optimizer=opt, step=1)]
    with torch.no_grad():
        if rank == 1:
            model.weight[0, 0] = float("nan")
    messages.append(attempt(save_checkpoint, dir=root, model=model, optimizer=opt, step=2))
    with torch.no_grad():
        model.weight[0, 0] = 0.5
        if rank == 0:
            opt.state[model.weight]["exp_avg"][1, :2] = float("inf")
    messages.append(attempt(save_checkpoint, dir=root, model=model, optimizer=opt, step=3))

    torch.manual_seed(0)  # FSDP2, each Linear sharded by rows: the NaN is in rank 1's local shard only
    sharded = shard_model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), [torch.nn.Linear])
    with torch.no_grad():
        if rank == 1:
            sharded[0].weight.to_local()[0, 0] = float("nan")  # row 2 of 4
    sharded_opt = torch.optim.AdamW(sharded.parameters(), lr=0.1)
    messages.append(attempt(save_checkpoint, dir=root, model=sharded, optimizer=sharded_opt, step=4))
    messages.append(attempt(export_pretrained, model=sharded, dir=out))
    torch.distributed.barrier()
    return messages, sorted(p.name for p in Path(root).iterdir()), latest_checkpoint(root).name


def _check_refusals(results, out) -> None:
    """`_refusals` on 2 ranks: each refusal raised on both, naming the tensor where it was found; nothing written."""
    steps = ["not saving step 2", "not saving step 3", "not saving step 4", f"not exporting to {out}"]
    own = [
        "model.weight has 1 non-finite values (NaN/inf)",
        "optim.state.weight.exp_avg has 2 non-finite values (NaN/inf)",
        "model.0.weight has 1 non-finite values (NaN/inf)",
        "0.weight has 1 non-finite values (NaN/inf)",  # rank 0 checks the gathered weights
    ]
    finder = [1, 0, 1, 0]
    for rank, (messages, listing, latest) in enumerate(results):
        expected = [
            f"{own[i]}; {step}"
            if finder[i] == rank
            else f"non-finite values (NaN/inf) found on rank [{finder[i]}]; {step}"
            for i, step in enumerate(steps)
        ]
        assert messages == ["saved", *expected]
        assert listing == ["latest", "step-000001"] and latest == "step-000001"  # no step-*/temp folder, no export
    assert not out.exists()
