"""`StepGuard`: skip a step that went non-finite on any rank, on every rank alike; count bad rows; stop a run that
keeps failing.

A NaN on one rank does not stay there: the gradient all-reduce spreads it to every rank, and one
optimizer step with it turns every weight (and Adam's moments) into NaN for good. Checking only this
rank's loss is not enough either: the ranks would then disagree on whether to step, and a rank that
skips a collective the others run hangs the job. So the decision is taken once per step from every
rank's view, with one small all-gather, and all ranks act on the same answer::

    grad_norm = clip_gradients(params, max_norm)               # NaN/inf norm: nothing is clipped
    if guard.check(step, loss, grad_norm, rows=rows_this_step, bad_rows=loader.bad_rows):
        optimizer.step()                                       # else: skipped on every rank
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

A skipped step leaves the weights and the optimizer state as they were (the data of that step is
consumed and the schedule moves on, as with a GradScaler's skipped step). ``max_bad_steps`` skipped
steps in a row raise `NonFiniteTrainingError` naming the steps and the ranks, on every rank; the
checkpoints saved before it hold finite weights (`checkpoint.save_checkpoint` refuses others).

Bad rows (undecodable images, malformed samples dropped by a loader) are counted too: ``bad_rows`` is
this rank's running total, summed over ranks in the same all-gather; more than ``max_bad_fraction`` of
the rows seen raises `BadDataError` (counted as if at least 1000 rows were seen, so the first bad row of
a run does not stop it, while data that is bad throughout stops it early).

Imports: torch, `distributed`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from .distributed import all_gather_ints, any_rank, get_rank, get_world_size

__all__ = ["StepGuard", "NonFiniteTrainingError", "BadDataError", "refuse_non_finite"]

# Below this many rows seen, a few bad rows are not yet a fraction worth stopping for.
_MIN_ROWS_FOR_FRACTION = 1000


class NonFiniteTrainingError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm on some rank."""


class BadDataError(RuntimeError):
    """More than the allowed fraction of the rows seen could not be used."""


def _finite(value: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(value).all()) if torch.is_tensor(value) else math.isfinite(float(value))


class StepGuard:
    """Per-step agreement on whether to apply the optimizer step, with running counts.

    Args:
        max_bad_steps: skipped steps in a row that stop the run (``>= 1``).
        max_bad_fraction: the largest share of bad rows tolerated, in ``[0, 1]``.
        group: the process group the ranks agree over (default: the world).

    ``check`` is a collective (every rank calls it at every step). Its state (``state_dict``)
    holds the counts, so a resumed run goes on counting where the checkpoint left off.
    """

    def __init__(self, max_bad_steps: int = 25, max_bad_fraction: float = 0.01, group=None) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_steps, self.max_bad_fraction, self.group = max_bad_steps, max_bad_fraction, group
        self.skipped_steps = 0  # all skipped steps of the run
        self.in_a_row = 0  # skipped steps since the last applied one
        self.bad_rows = 0  # every rank's loader total, summed
        self.rows = 0  # rows of the steps checked, all ranks

    def check(
        self,
        step: int,
        loss: torch.Tensor | float,
        grad_norm: torch.Tensor | float,
        *,
        rows: int = 0,
        bad_rows: int = 0,
    ) -> bool:
        """Whether to apply step ``step``: True when ``loss`` and ``grad_norm`` are finite on every rank.

        ``loss``: this rank's loss of the step (a tensor of any shape, or a float); ``grad_norm``: the
        gradient norm (`grad_sync.clip_gradients`' return); ``rows``: rows the step trained on, all ranks
        together; ``bad_rows``: this rank's running total of dropped rows (e.g. ``loader.bad_rows``).
        One all-gather of three ints per rank and one host read. Raises `NonFiniteTrainingError` after
        ``max_bad_steps`` skipped steps in a row and `BadDataError` when bad rows exceed
        ``max_bad_fraction``, on every rank alike.
        """
        device = _device()
        loss = loss.detach() if torch.is_tensor(loss) else torch.tensor(float(loss))
        flags = [(~torch.isfinite(loss)).any().long().to(device), torch.tensor(int(not _finite(grad_norm)))]
        mine = torch.stack([*flags, torch.tensor(int(bad_rows))]).to(device)  # the loss's flag stays on its device
        table = all_gather_ints(mine, device, self.group)  # no sync of its own before this one
        self.rows += int(rows)
        self.bad_rows = sum(row[2] for row in table)
        self._check_bad_rows(step)
        bad_loss = [r for r, row in enumerate(table) if row[0]]
        bad_grad = [r for r, row in enumerate(table) if row[1]]
        if not bad_loss and not bad_grad:
            self.in_a_row = 0
            return True
        self.skipped_steps += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            where = f"loss on ranks {bad_loss}" if bad_loss else f"gradient norm on ranks {bad_grad}"
            raise NonFiniteTrainingError(
                f"steps {step - self.in_a_row + 1}..{step}: {self.in_a_row} steps in a row had a non-finite "
                f"loss or gradient norm (step {step}: {where}); stopped (max_bad_steps={self.max_bad_steps}). "
                "No weight was updated by them, and checkpoints never hold non-finite weights: resume from the "
                "last one after fixing the data or lowering the learning rate"
            )
        return False

    def _check_bad_rows(self, step: int) -> None:
        seen = self.rows + self.bad_rows
        if self.bad_rows > self.max_bad_fraction * max(seen, _MIN_ROWS_FOR_FRACTION):
            raise BadDataError(
                f"step {step}: {self.bad_rows} of {seen} rows seen were bad ({self.bad_rows / seen:.2%} > "
                f"max_bad_fraction {self.max_bad_fraction:.2%}); the loaders' warnings name them"
            )

    def counts(self) -> dict[str, int]:
        """``{"skipped_steps", "bad_rows"}`` so far: what a run logs and reports."""
        return {"skipped_steps": self.skipped_steps, "bad_rows": self.bad_rows}

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "in_a_row": self.in_a_row, "rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped_steps, self.in_a_row, self.rows = (int(state[k]) for k in ("skipped_steps", "in_a_row", "rows"))


def _device() -> torch.device:
    """Where the collective runs: the GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def refuse_non_finite(named: Iterable[tuple[str, Any]], action: str) -> None:
    """Raise ValueError on every rank (one all-reduce) if a floating tensor in ``named`` holds NaN/inf on any.

    ``named``: ``(name, tensor)`` pairs (other values are skipped); ``action`` ends the message (e.g. "not
    saving step 12"). The rank that found it names the first such tensor, the others that rank. What
    `checkpoint.save_checkpoint` and `export.export_pretrained` run before they write anything. DTensors: the local
    shard is checked (reducing the DTensor itself would be a collective)."""
    problem = None
    for name, t in named:
        t = t.to_local() if hasattr(t, "to_local") else t
        if not (torch.is_tensor(t) and t.is_floating_point() and t.numel()):
            continue
        # min/max: one pass and no N-sized temporary, ~20x isfinite(t).all() on CPU; NaN propagates to both.
        if not torch.isfinite(torch.stack(torch.aminmax(t))).all():
            problem = f"{name} has {t.numel() - int(torch.isfinite(t).sum())} non-finite values (NaN/inf)"
            break
    bad = any_rank([r == get_rank() and problem is not None for r in range(get_world_size())], _device())
    if any(bad):  # this rank's own flag is among them
        found = problem or f"non-finite values (NaN/inf) found on rank {[r for r, b in enumerate(bad) if b]}"
        raise ValueError(f"{found}; {action}")
