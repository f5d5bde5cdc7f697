"""vembed_blocks/_torch_private.py: each private torch API the package relies on still works.

These fail by name when a torch release moves or changes one, instead of a block degrading
silently (GradCache replaying at the wrong time, FSDP gradient sync not restored, compile
errors no longer falling back). Also checks that no other module reaches into torch privates.
"""

from __future__ import annotations

import pathlib
import re

import torch
from _multiproc import run_ranks

from vembed_blocks._torch_private import (
    fsdp_gradient_sync,
    queue_backward_callback,
    set_compile_errors_fall_back_to_eager,
)


def test_queue_backward_callback_runs_after_the_whole_backward():
    order: list[str] = []

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            queue_backward_callback(lambda: order.append("callback"))
            order.append("backward")
            return grad

    x = torch.ones(3, requires_grad=True)
    x.register_hook(lambda g: order.append("leaf"))
    (Mark.apply(x) * 2).sum().backward()
    assert order == ["backward", "leaf", "callback"]
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def _fsdp_flag(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    seen = [fsdp_gradient_sync(model)]
    model.set_requires_gradient_sync(False)
    seen.append(fsdp_gradient_sync(model))
    model[0].set_requires_gradient_sync(True, recurse=False)  # one unit on, the root still off
    seen.append(fsdp_gradient_sync(model))
    model.set_requires_gradient_sync(True)
    seen.append(fsdp_gradient_sync(model))
    return seen


def test_fsdp_gradient_sync_reads_what_set_requires_gradient_sync_set():
    assert run_ranks(_fsdp_flag, 1, timeout=120) == [[True, False, False, True]]


def test_compile_fallback_switch_exists_and_is_set():
    import torch._dynamo

    assert hasattr(torch._dynamo.config, "suppress_errors")
    with torch._dynamo.config.patch(suppress_errors=False):  # restored on exit
        set_compile_errors_fall_back_to_eager()
        assert torch._dynamo.config.suppress_errors is True


def test_no_other_module_uses_private_torch_apis():
    package = pathlib.Path(__file__).resolve().parents[1] / "vembed_blocks"
    private = re.compile(r"\btorch(?:\.[A-Za-z]\w*)*\._\w+|_execution_engine|_get_fsdp_state|_fsdp_param_groups")
    found = [
        f"{path.relative_to(package)}:{n}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "_torch_private.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, "private torch APIs belong in vembed_blocks/_torch_private.py:\n" + "\n".join(found)
