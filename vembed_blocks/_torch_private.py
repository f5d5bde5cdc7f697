"""Every private torch API vembed_blocks uses, in one place.

Each is here because torch has no public equivalent (the docstrings say why). They can change
in any torch release, so `tests/test_torch_private.py` exercises each one directly: an upgrade
that moves or changes one fails that test by name, instead of degrading a block silently.
Nothing else in the package may reach into ``torch._*`` or underscore attributes of torch objects.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["queue_backward_callback", "fsdp_gradient_sync", "set_compile_errors_fall_back_to_eager"]


def queue_backward_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the backward pass now running has finished (call it from inside a backward).

    Why private: autograd has no public "after the whole backward" hook. `GradCache` must replay its
    chunks only after every ``encode`` output of the loss got its gradient; FSDP2 itself schedules its
    final reduce-scatter wait with this same call (``Variable._execution_engine.queue_callback``).
    """
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def fsdp_gradient_sync(module: nn.Module) -> bool:
    """Whether FSDP2 reduces gradients for every FSDP unit in ``module`` (``set_requires_gradient_sync``'s flag).

    Why private: FSDP2 has the setter but no getter. `GradCache` turns sync off for all but the last
    replayed chunk and must then put back what the caller had set (e.g. off during accumulation).
    Raises ``AttributeError`` if FSDP2's internal layout changed.
    """
    from torch.distributed.fsdp import FSDPModule

    groups = [
        group
        for sub in module.modules()
        if isinstance(sub, FSDPModule)
        for group in sub._get_fsdp_state()._fsdp_param_groups
    ]
    return all(group.reduce_grads for group in groups)


def set_compile_errors_fall_back_to_eager() -> None:
    """Make a ``torch.compile``'d function whose compilation fails run eagerly (with a logged warning).

    Why private and process-wide: ``torch._dynamo.config.suppress_errors`` is the only switch, and
    dynamo reads it whenever it compiles, which happens lazily at the first call and again on every
    recompilation (new shapes), so it cannot be scoped to one ``compile`` call. Only
    ``compile_layers(..., fallback_to_eager=True)`` calls this, i.e. only when the user asks.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
