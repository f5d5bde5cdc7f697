"""Wrapping blocks: FSDP2 sharding, DDP, activation checkpointing and LoRA.

Recommended order in a recipe (each step sees the module tree the previous one left):

    model = checkpoint_layers(model)             # recompute each transformer block in backward
    model = apply_lora(model, r=16, alpha=32)    # optional: peft adapters, base frozen
    model = shard_model(model, mixed_precision="bf16")   # or nothing: grad_sync averages plain gradients
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)

The optimizer must be built *after* `shard_model` (FSDP2 replaces parameters by DTensors).
`shard_model` and `wrap_ddp` are no-ops without an initialised process group, so a recipe
runs unchanged as plain ``python recipe.py``. The recipes do not use `wrap_ddp`: an embedding
step makes several forwards (and a varying number across ranks), which DDP's bookkeeping does
not allow; `grad_sync.defer_gradient_sync` + one `distributed.average_gradients` per step sync unsharded models instead.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "shard_model",
    "wrap_ddp",
    "checkpoint_layers",
    "compile_layers",
    "apply_lora",
    "unwrap_model",
    "reshaped_scalar_params",
]

# Root handed to `shard_model` -> names of its parameters reshaped from 0-D to [1], which
# `export_pretrained` turns back into 0-D. Kept here, weakly keyed (the entry goes with the model),
# rather than as an attribute written onto the user's model: nothing is added to their object,
# and callers need not carry the names from `shard_model` to the export themselves.
_RESHAPED_SCALARS: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()

# Methods that dual encoders / embedding models call instead of forward. FSDP2 only
# all-gathers around `forward`, so each of these that exists is registered.
_FORWARD_METHODS = (
    "get_text_features",
    "get_image_features",
    "get_video_features",
    "encode",
    "encode_text",
    "encode_image",
    "encode_query",
    "encode_document",
)

# Attention projections, per naming family: BERT, CLIP/Qwen/LLaMA, Qwen-VL vision, GPT-2.
_LORA_SUFFIXES = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "attn.qkv",
    "attn.proj",
    "c_attn",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip a DDP wrapper (FSDP2 and peft wrappers are kept: they own the state-dict names)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _pg_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _resolve_layer_classes(model: nn.Module, layer_classes: Iterable[type | str] | None) -> tuple[type, ...]:
    """Block classes to wrap: given classes, given class names, or the model's `_no_split_modules`."""
    if layer_classes is None:
        names: set[str] = set()
        for m in model.modules():
            names.update(getattr(m, "_no_split_modules", None) or ())
        if not names:
            raise ValueError(
                f"{type(model).__name__} declares no `_no_split_modules`; pass layer_classes= "
                "(the transformer block classes or their names)"
            )
        layer_classes = names
    wanted = set(layer_classes)
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    out = {c for c in wanted if isinstance(c, type)}
    out |= {by_name[c] for c in wanted if isinstance(c, str) and c in by_name}
    if not out:
        raise ValueError(f"none of the layer classes {sorted(map(str, wanted))} occur in {type(model).__name__}")
    return tuple(out)


def reshaped_scalar_params(model: nn.Module) -> tuple[str, ...]:
    """Names of the 0-D parameters of ``model`` that `shard_model` reshaped to [1] (empty if none / not sharded).

    `export_pretrained` uses it to write them back as 0-D (the shapes ``from_pretrained`` expects).
    """
    return _RESHAPED_SCALARS.get(unwrap_model(model), ())


def _reshape_scalar_params(model: nn.Module) -> list[str]:
    """Replace every 0-D parameter by a [1] one (FSDP2 cannot shard scalars).

    Broadcasting keeps the maths identical (``x * scale.exp()`` with scale [1]). Returns
    the fully qualified names changed, which `export_pretrained` turns back into 0-D.
    """
    changed = []
    for mod_name, mod in model.named_modules():
        for p_name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0:
                new = nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad)
                setattr(mod, p_name, new)
                changed.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return changed


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    # Explicit device type: a gloo group on a GPU box would otherwise try CUDA.
    on_cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    return init_device_mesh("cuda" if on_cuda else "cpu", (dist.get_world_size(),))


def _mp_policy(mixed_precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision is None or isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision or MixedPrecisionPolicy()
    dtypes = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": None,
        "float32": None,
    }
    if mixed_precision not in dtypes:
        raise ValueError(f"mixed_precision={mixed_precision!r}: use one of {sorted(dtypes)} or a MixedPrecisionPolicy")
    # Low-precision compute, but gradients reduced in fp32 (summing many bf16 grads loses bits).
    return MixedPrecisionPolicy(param_dtype=dtypes[mixed_precision], reduce_dtype=torch.float32)


def shard_model(
    model: nn.Module,
    layer_classes: Iterable[type | str] | None = None,
    mixed_precision: str | object | None = None,
    reshard_after_forward: bool = True,
    mesh=None,
    forward_methods: Iterable[str] | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2: one `fully_shard` unit per transformer block, then the root.

    Args:
        layer_classes: block classes or class names; default: the model's `_no_split_modules`
            (found on any submodule, so peft-wrapped models work).
        mixed_precision: None, "bf16"/"fp16" (low-precision params, fp32 gradient reduce),
            or a `MixedPrecisionPolicy`.
        reshard_after_forward: free gathered block weights after forward (ZeRO-3) or keep them.
        mesh: a 1-D DeviceMesh; default one over the whole world, cpu for gloo, cuda for nccl.
        forward_methods: methods to register as FSDP entry points (default: those of
            ``get_text_features``, ``get_image_features``, ... that exist). Leave out any the
            model's own ``forward`` calls (Qwen-VL's ``get_image_features``): an entry point
            runs the root's collectives, so ranks with and without images would disagree.

    0-D parameters (CLIP's ``logit_scale``, SigLIP's ``logit_bias``) become shape [1]; their
    names are remembered for `export_pretrained` (`reshaped_scalar_params`). Methods such as
    ``get_text_features`` are registered as forward methods so they gather weights too.
    Root parameters (e.g. ``logit_scale``) are readable as plain tensors only after a
    forward/encode call of the step (before it they are sharded DTensors).
    Returns the same object (now an FSDPModule). Without a process group: returned unchanged.
    """
    if not _pg_ready():
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    classes = _resolve_layer_classes(model, layer_classes)
    scalars = _reshape_scalar_params(model)
    mesh = mesh if mesh is not None else _default_mesh()
    kw = dict(mesh=mesh, mp_policy=_mp_policy(mixed_precision))
    blocks = [m for m in model.modules() if isinstance(m, classes) and m is not model]
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    # Root: FSDP's "auto" keeps it gathered from its first forward until after backward
    # (its backward runs last anyway). This is also what makes root parameters such as
    # ``model.logit_scale`` plain tensors when read between forward calls and the loss.
    fully_shard(model, reshard_after_forward=None, **kw)
    _RESHAPED_SCALARS[model] = tuple(scalars)
    for name in _FORWARD_METHODS if forward_methods is None else forward_methods:
        if hasattr(model, name) and callable(getattr(model, name)):
            register_fsdp_forward_method(model, name)
    return model


def _route_through_ddp(ddp: nn.Module, name: str):
    """Make ``ddp.<name>(...)`` run ``module.<name>`` inside DDP's forward.

    DDP prepares its gradient reducer in `forward`; calling ``ddp.module.get_text_features``
    directly skips that, so the method is temporarily installed as the module's forward.
    """
    inner = ddp.module
    method = getattr(inner, name)

    @functools.wraps(method)
    def call(*args, **kwargs):
        had_own = "forward" in inner.__dict__
        saved = inner.__dict__.get("forward")
        inner.forward = method
        try:
            return ddp(*args, **kwargs)
        finally:
            if had_own:
                inner.forward = saved
            else:
                del inner.forward

    return call


def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """Wrap in `DistributedDataParallel` (kwargs pass through), routing encode methods via forward.

    On CUDA ``device_ids`` defaults to the current device. Buffers are not synced at each
    forward (``forward_sync_buffers=False``, or ``broadcast_buffers=False`` before torch 2.13),
    so forwards are not collectives and ranks may run different numbers of them (pass True for
    BatchNorm statistics synced from rank 0, at the price of equal forward counts). After wrapping,
    ``wrapped.get_text_features(...)`` (and the other known encode methods that exist)
    synchronise gradients like ``wrapped(...)`` does. Without a process group: unchanged.
    """
    if not _pg_ready():
        return model
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        kwargs.setdefault("device_ids", [torch.cuda.current_device()])
    # DDP's default broadcasts every buffer from rank 0 at each forward: a collective per call, so
    # a rank that encodes its hard negatives while another has none (an extra forward) hangs.
    # Embedding backbones' buffers are constants (position ids); BatchNorm statistics then stay per rank.
    # torch >= 2.13 names the per-forward sync forward_sync_buffers (buffers still synced once at init).
    if "broadcast_buffers" not in kwargs and "forward_sync_buffers" not in kwargs:
        new_name = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        kwargs["forward_sync_buffers" if new_name else "broadcast_buffers"] = False
    ddp = nn.parallel.DistributedDataParallel(model, **kwargs)
    for name in _FORWARD_METHODS:
        if hasattr(model, name) and callable(getattr(model, name)):
            # Instance attribute: shadows DDP.__getattr__ fallback for this name.
            object.__setattr__(ddp, name, _route_through_ddp(ddp, name))
    return ddp


def _is_checkpointed(m: nn.Module) -> bool:
    """Whether `checkpoint_layers` already replaced ``m.forward`` (read from that forward: no marker needed)."""
    fwd = m.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _checkpointed_forward


def _checkpointed_forward(orig_forward, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    # Non-reentrant: supports kwargs, frozen inputs (LoRA) and FSDP2's hooks; RNG preserved
    # so dropout in the recomputation equals the first pass.
    return checkpoint(orig_forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(model: nn.Module, layer_classes: Iterable[type | str] | None = None) -> nn.Module:
    """Activation checkpointing for every block of the given classes (default `_no_split_modules`).

    Each block's ``forward`` is replaced on the instance by a checkpointed call, so module
    names, classes and state-dict keys stay unchanged (no wrapper modules): sharding,
    LoRA targeting and checkpoints see the same tree. Apply before `shard_model`.
    Returns the same model. Training only recomputes when grad is enabled.
    """
    classes = _resolve_layer_classes(model, layer_classes)
    for m in model.modules():
        if isinstance(m, classes) and m is not model and not _is_checkpointed(m):
            m.forward = functools.partial(_checkpointed_forward, m.forward)
    return model


def compile_layers(
    model: nn.Module,
    layer_classes: Iterable[type | str] | None = None,
    fallback_to_eager: bool = False,
    **compile_kwargs,
) -> nn.Module:
    """``torch.compile`` every block of the given classes (default `_no_split_modules`) in place.

    Uses ``nn.Module.compile`` so no ``_orig_mod`` wrapper appears: state-dict keys, LoRA
    targeting, sharding and checkpoints see the same tree, and encode methods such as
    ``get_text_features`` run the compiled blocks too (compiling the root would only cover
    ``forward``). Composes with `checkpoint_layers` (apply that first). ``compile_kwargs`` go to
    ``torch.compile`` (``backend=``, ``mode=``, ...). Returns the model.

    ``fallback_to_eager=True``: a block that fails to compile runs eagerly, with a logged warning,
    instead of raising. This sets dynamo's ``suppress_errors`` for the whole process (it is read at
    every lazy (re)compilation, so it cannot be scoped to these blocks), which is why it is opt-in.
    """
    classes = _resolve_layer_classes(model, layer_classes)
    if fallback_to_eager:
        from ._torch_private import set_compile_errors_fall_back_to_eager

        set_compile_errors_fall_back_to_eager()
    for m in model.modules():
        if isinstance(m, classes) and m is not model:
            m.compile(**compile_kwargs)
    return model


def _default_lora_targets(model: nn.Module) -> list[str]:
    """Attention projections present in ``model`` (suffixes peft matches on module names)."""
    found = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            found.update(s for s in _LORA_SUFFIXES if name == s or name.endswith("." + s))
    if not found:
        raise ValueError(f"no attention projection found in {type(model).__name__}; pass targets=[...]")
    return sorted(found)


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    targets: list[str] | str | None = None,
    dropout: float = 0.0,
    **lora_kwargs,
) -> nn.Module:
    """Add LoRA adapters with peft; only adapter weights stay trainable.

    targets: module-name suffixes (peft's ``target_modules``) or a regex; default: the
    attention projections the model has (q/k/v/o of BERT, CLIP, Qwen text, qkv/proj of
    Qwen-VL vision). Returns a `peft.PeftModel` (state-dict keys gain ``base_model.model.``;
    ``get_text_features`` etc. still resolve to the base model). Apply after
    `checkpoint_layers` and before `shard_model`.
    """
    from peft import LoraConfig, get_peft_model

    if targets is None:
        targets = _default_lora_targets(model)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    if not any(p.requires_grad for p in peft_model.parameters()):
        warnings.warn("apply_lora: no trainable parameter after wrapping", stacklevel=2)
    return peft_model
