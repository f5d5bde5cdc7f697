"""Resumable sharded checkpoints (DCP); the Hugging Face export is `export.export_pretrained`.

Layout of a run's checkpoint root (``save_checkpoint(root, ...)``)::

    root/
      latest                  text file: name of the newest complete checkpoint
      step-000300/            one checkpoint, visible only once complete
        .metadata             DCP index        \\  model + optimizer, sharded: each rank
        __0_0.distcp ...      DCP shard files  /   writes its own piece
        rank-00000.pt         per-rank extras: RNG states, sampler, scheduler (loaded weights_only)
        meta.json             step, world size, format version; written last
      step-000200/ ...        older ones, pruned to ``keep_last`` (by integer step)
      .tmp-step-000300/       only while writing (or after a crash): never loaded
      .old-step-000300/       only while re-saving step 300: the previous one (see `_commit`)

Atomicity: everything is written into ``.tmp-step-N`` and renamed to ``step-N`` only after
every rank finished; ``latest`` is then replaced with ``os.replace``. A crash mid-save leaves
the previous checkpoint and pointer untouched; the stale temp folder is removed by the next
save. All ranks must see the same file system (shared storage on multi-node runs).

Model/optimizer state goes through ``torch.distributed.checkpoint.state_dict`` so a plain
module, DDP and FSDP2 save the same keys and a sharded checkpoint reloads on another world size.
Saves and exports refuse non-finite weights (every rank raises alike, before anything is written).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .distributed import get_rank, get_world_size, is_dist
from .parallel import unwrap_model
from .step_guard import refuse_non_finite

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]

_LATEST = "latest"
_META = "meta.json"
_FORMAT = 1  # meta.json "format"; checkpoints without the key (format 0) have the same layout
_OLD = ".old-"  # prefix of the step folder that a re-save of its step is replacing (`_commit`)
_rename = os.replace  # every rename of a commit goes through this name (tests interrupt it)


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def _by_step(names: Iterable[str]) -> list[str]:
    """``step-N`` names by the integer N (``step-1000000`` after ``step-999999``); others dropped."""
    return sorted((n for n in names if re.fullmatch(r"step-\d+", n)), key=lambda n: (int(n[5:]), n))


def _complete(root: Path, name: str) -> Path | None:
    """``root/name`` if complete, else a complete ``.old-`` copy left by a re-save killed mid-swap."""
    return next((p for p in (root / name, root / f"{_OLD}{name}") if (p / _META).is_file()), None)


def _remove(path: Path) -> None:
    (path / _META).unlink(missing_ok=True)  # first: a kill mid-way must not leave a "complete" half
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if is_dist():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # Plain Python types so the file needs no numpy unpickling.
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _reshape_scalars(model_sd: dict, optim_sd: dict, names: list[str], shape: tuple[int, ...]) -> None:
    """Reshape 0-D entries (and their optimizer moments) in place of the dicts.

    Checkpoints store every 0-D tensor as shape [1], the shape `shard_model` gives such
    parameters, so a CLIP ``logit_scale`` saved sharded loads plain and vice versa. The
    optimizer's own 0-D ``step`` counter is left alone.
    """
    states = optim_sd.get("state", {})
    for name in names:
        model_sd[name] = model_sd[name].reshape(shape)
        if name in states:
            # A new dict: the one get_state_dict returns is the optimizer's live per-parameter
            # state, and reshaping its moments there breaks the next optimizer.step().
            states[name] = {
                key: val.reshape(shape) if torch.is_tensor(val) and val.numel() == 1 and key != "step" else val
                for key, val in states[name].items()
            }


def _drop_unsaved_optim_state(optim_sd: dict, path: Path) -> bool:
    """Forget optimizer state the checkpoint does not hold (parameters that never got a gradient).

    ``get_state_dict`` creates state for every parameter, but one that had no gradient before
    the save (BERT's unused pooler, a frozen-then-thawed layer) has none on disk; loading would
    fail on it. Without an entry the optimizer keeps no state for it, as in the uninterrupted run.
    Returns whether anything was dropped.
    """
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k.split(".", 2)[2] for k in stored if k.startswith("optim.state.")}
    states = optim_sd.get("state", {})
    unsaved = [f for f in states if not any(k.startswith(f + ".") for k in saved)]
    for fqn in unsaved:
        del states[fqn]
    return bool(unsaved)


def _zero_dim(model_sd: dict) -> list[str]:
    return [k for k, v in model_sd.items() if torch.is_tensor(v) and v.dim() == 0]


def _check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state is stored under parameter names in ``model``; torch's error is a bare KeyError."""
    held = {id(p) for p in model.parameters()}
    params = [(g, p) for g, group in enumerate(optimizer.param_groups) for p in group["params"]]
    for index, (g, p) in enumerate(params):  # numbered as in torch's optimizer state_dict
        if id(p) not in held:
            raise ValueError(
                f"optimizer parameter #{index} (param_groups[{g}], shape {tuple(p.shape)}) is not a parameter"
                " of model=; pass one module holding every optimized parameter, to both save_checkpoint"
                " and load_checkpoint, e.g. model=torch.nn.ModuleDict({'encoder': encoder, 'loss': loss})"
            )


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterable[tuple[str, Any]]:
    """``(name, value)`` of every parameter, buffer and optimizer state entry, named as DCP keys."""
    model = unwrap_model(model)
    names = {id(p): n for n, p in model.named_parameters()}
    yield from ((f"model.{n}", t) for n, t in [*model.named_parameters(), *model.named_buffers()])
    for p, state in optimizer.state.items():
        yield from ((f"optim.state.{names[id(p)]}.{k}", v) for k, v in state.items())


def _plain(obj: Any) -> Any:
    """``obj`` with numpy values as Python numbers/lists, which ``torch.load(weights_only=True)`` accepts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(_plain(v) for v in obj)
    return obj.tolist() if isinstance(obj, (np.ndarray, np.generic)) else obj


def _load_extras(file: Path) -> dict[str, Any]:
    """A rank file, unpickled with ``weights_only=True``: tensors and plain Python values, no code runs."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as err:
        msg = "it holds objects other than tensors and plain Python values (save_checkpoint writes none)"
        raise pickle.UnpicklingError(f"refusing to load {file}: {msg}") from err


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (or ``root`` itself if it is one).

    Follows the ``latest`` pointer; without it, the complete ``step-*`` with the highest integer
    step. Temp folders of interrupted saves are never returned; ``.old-step-N`` is, while a
    killed re-save of step N left no complete ``step-N`` (`_commit`). None if there is none.
    """
    root = Path(root)
    if (root / _META).is_file():
        return root
    pointer = root / _LATEST
    if pointer.is_file() and (found := _complete(root, pointer.read_text().strip())):
        return found
    names = {p.name.removeprefix(_OLD) for p in [*root.glob("step-*"), *root.glob(f"{_OLD}step-*")]}
    return next(filter(None, (_complete(root, n) for n in reversed(_by_step(names)))), None)


def _prepare_tmp(root: Path, step: int) -> Path:
    tmp = root / f".tmp-{_step_name(step)}"
    if get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of interrupted saves (any step): one save runs at a time per root.
        for old in root.glob(f"{_OLD}step-*"):
            name = old.name.removeprefix(_OLD)
            if _complete(root, name) == old:  # the only complete copy of its step: put it back
                _remove(root / name)
                _rename(old, root / name)
            else:
                _remove(old)
        for stale in root.glob(".tmp-step-*"):
            _remove(stale)
        tmp.mkdir()
    _barrier()
    return tmp


def _commit(root: Path, tmp: Path, step: int, keep_last: int | None) -> Path:
    """Rank 0: rename the finished temp folder into place, move ``latest``, prune old ones.

    Re-saving step N: a rename cannot replace a non-empty folder, so the swap takes two,
    ``step-N -> .old-step-N`` then ``.tmp-step-N -> step-N``; ``.old-step-N`` is deleted only
    after the second. The one window without ``step-N`` is between the two renames; the previous
    checkpoint is complete under ``.old-step-N`` then, `latest_checkpoint` returns it and the
    next save renames it back. A kill anywhere leaves step N complete (the previous one up to the
    second rename, the new one after). Pruning keeps the one just written and ``keep_last - 1``
    others, the highest.
    """
    final = root / _step_name(step)
    if final.exists():  # re-saving a step; _prepare_tmp left no .old- folder behind
        _rename(final, root / f"{_OLD}{final.name}")
    _rename(tmp, final)
    _remove(root / f"{_OLD}{final.name}")
    pointer_tmp = root / f".{_LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    _rename(pointer_tmp, root / _LATEST)
    if keep_last:
        done = _by_step(p.name for p in root.glob("step-*") if (p / _META).is_file())
        others = [n for n in done if n != final.name]
        for name in others[: max(len(others) - (keep_last - 1), 0)]:
            _remove(root / name)
    return final


def save_checkpoint(
    dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    sampler: Any = None,
    scheduler: Any = None,
    keep_last: int | None = 3,
    scaler: Any = None,
    extra_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a resumable checkpoint of everything a training step depends on; returns its folder.

    ``dir`` is the run's checkpoint root (layout in the module docstring). Saved: model and
    optimizer (sharded, DCP), ``scheduler.state_dict()``, ``sampler.state_dict()`` (any object
    with it), a loss scaler's state (``scaler``, e.g. ``torch.amp.GradScaler``), every RNG (torch
    CPU/CUDA, python, numpy) per rank, and ``step``; ``extra_state``: name -> any other object with
    ``state_dict()`` (plain values and tensors), e.g. ``{"guard": step_guard}``. A collective: every rank
    calls it. ``keep_last``: complete checkpoints kept (None keeps all). Refuses (ValueError on every
    rank, nothing written) a model or optimizer state holding NaN/inf on any rank.
    """
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _check_optimizer_params(model, optimizer)  # before any file or collective: every rank raises alike
    # Before the temp folder and DCP's collectives; agreed, so no rank enters the save alone.
    refuse_non_finite(_state_tensors(model, optimizer), f"not saving step {step}")
    root = Path(dir)
    tmp = _prepare_tmp(root, step)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _reshape_scalars(model_sd, optim_sd, _zero_dim(model_sd), (1,))
    with _quiet_single_process():
        dcp_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    extras = {  # plain types only: load_checkpoint reads them with weights_only=True
        "rng": _rng_state(),
        "sampler": sampler.state_dict() if sampler is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "extra": {name: obj.state_dict() for name, obj in (extra_state or {}).items()},
    }
    torch.save(_plain(extras), tmp / f"rank-{get_rank():05d}.pt")
    _barrier()  # every rank's files are on disk before the folder becomes visible
    final = root / _step_name(step)
    if get_rank() == 0:
        (tmp / _META).write_text(json.dumps({"step": step, "world_size": get_world_size(), "format": _FORMAT}))
        _commit(root, tmp, step, keep_last)
    _barrier()  # nobody reads or prunes before the commit
    return final


def load_checkpoint(
    dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    extra_state: Mapping[str, Any] | None = None,
) -> int:
    """Restore what `save_checkpoint` wrote into live objects; returns the saved step.

    ``dir``: a checkpoint root (its latest complete checkpoint is used) or one ``step-N``
    folder. Build and wrap the model (LoRA, shard_model/wrap_ddp) and create the optimizer
    and scheduler exactly as for the original run before calling. Another world size works
    for model/optimizer; RNG and sampler state then come from rank 0's file (with a
    different world size, sampler resume is as exact as the sampler supports). ``extra_state``: as saved
    (a name the checkpoint lacks is left as it is). The sampler state is loaded first, so a sampler that
    refuses it (other data, other steps) raises before the model changes. A collective.
    Raises FileNotFoundError when there is no complete checkpoint; pickle.UnpicklingError, before
    changing anything, when a rank file holds more than tensors and plain values (see `_load_extras`).
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    _check_optimizer_params(model, optimizer)
    path = latest_checkpoint(dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {dir}")
    meta = json.loads((path / _META).read_text())
    if meta.get("format", 0) > _FORMAT:
        raise ValueError(f"{path} has checkpoint format {meta['format']}; this version reads up to {_FORMAT}")
    own = path / f"rank-{get_rank():05d}.pt"
    extras = _load_extras(own if own.is_file() else path / "rank-00000.pt")
    if sampler is not None and extras["sampler"] is not None:  # first: it may refuse the resume
        sampler.load_state_dict(extras["sampler"])
    model_sd, optim_sd = get_state_dict(model, optimizer)  # also initialises optimizer state
    scalars = _zero_dim(model_sd)
    _reshape_scalars(model_sd, optim_sd, scalars, (1,))
    dropped = _drop_unsaved_optim_state(optim_sd, path)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp_load(state, checkpoint_id=str(path))
    _reshape_scalars(state["model"], state["optim"], scalars, ())
    # dcp_load already required every model key; strict=False only admits the dropped optimizer entries.
    options = StateDictOptions(strict=False) if dropped else None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    same_world = meta["world_size"] == get_world_size()
    if scheduler is not None and extras["scheduler"] is not None:
        scheduler.load_state_dict(extras["scheduler"])
    if scaler is not None and extras.get("scaler") is not None:  # the loss scale goes on where it was
        scaler.load_state_dict(extras["scaler"])
    for name, obj in (extra_state or {}).items():
        if name in extras.get("extra", {}):
            obj.load_state_dict(extras["extra"][name])
    if same_world:  # another rank's streams would correlate ranks; keep fresh ones instead
        _set_rng_state(extras["rng"])
    _barrier()
    return int(meta["step"])
