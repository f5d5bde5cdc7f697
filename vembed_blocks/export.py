"""`export_pretrained`: a trained model as a plain Hugging Face folder (config + safetensors), from any wrapping.

Plain, DDP, FSDP2-sharded and peft models export the same way: rank 0 gathers the full state dict and
writes it through the model class's own ``save_pretrained``; LoRA is merged into the base weights (or
written as an adapter folder). Non-finite weights are refused on every rank before anything is written,
so an export is never NaN. The folder holds safetensors and JSON only: safe to share and to load.

Imports: torch, `distributed`, `parallel`, `step_guard`; peft and safetensors inside the functions that use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import get_rank, is_dist
from .parallel import reshaped_scalar_params, unwrap_model
from .step_guard import refuse_non_finite

__all__ = ["export_pretrained"]


def _barrier() -> None:
    if is_dist():
        dist.barrier()


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU state dict on rank 0 (empty elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def _merge_lora(peft_model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold every LoRA pair into its base weight: ``W + scaling * B @ A``; drop adapter keys.

    Done on the gathered tensors (the live layers may be sharded). Linear layers only.
    """
    from peft.tuners.lora import LoraLayer

    sd = dict(sd)
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if not isinstance(mod.get_base_layer(), nn.Linear):
            raise NotImplementedError(f"merging LoRA into {type(mod.get_base_layer()).__name__} ({name})")
        if any(mod.use_dora.get(a, False) for a in mod.active_adapters):
            raise NotImplementedError(f"merging DoRA adapters ({name}); export with merge_lora=False")
        w = sd.pop(f"{name}.base_layer.weight")
        for adapter in mod.active_adapters:
            a = sd[f"{name}.lora_A.{adapter}.weight"].float()  # [r, in]
            b = sd[f"{name}.lora_B.{adapter}.weight"].float()  # [out, r]
            w = (w.float() + mod.scaling[adapter] * (b @ a)).to(w.dtype)
        sd[f"{name}.weight"] = w
        if f"{name}.base_layer.bias" in sd:
            sd[f"{name}.bias"] = sd.pop(f"{name}.base_layer.bias")
    return {k: v for k, v in sd.items() if ".lora_" not in k}


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _write_hf(base: nn.Module, sd: dict[str, torch.Tensor], out: Path) -> None:
    """Save ``sd`` through the model class's own `save_pretrained` (its key/format rules).

    The skeleton is built on the meta device and takes the gathered tensors by reference
    (``assign=True``), so no second copy of the weights is allocated.
    """
    with torch.device("meta"):
        fresh = type(base)(base.config)
    missing, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
    # Non-persistent buffers are rebuilt at load time; anything else missing is a bug.
    persistent = set(fresh.state_dict())
    bad = [k for k in missing if k in persistent]
    if bad or unexpected:
        raise RuntimeError(
            f"export: state dict does not fit {type(base).__name__}: missing {bad}, unexpected {unexpected}"
        )
    fresh.save_pretrained(out, safe_serialization=True)


def export_pretrained(
    model: nn.Module,
    dir: str | os.PathLike,
    *,
    merge_lora: bool = True,
    processor: Any = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a plain Hugging Face folder (config + safetensors) loadable by ``from_pretrained``.

    Works on plain, DDP, FSDP2-sharded and peft models; a collective (every rank calls it,
    rank 0 gathers and writes). LoRA: merged into the base weights by default, or with
    ``merge_lora=False`` an adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) for ``PeftModel.from_pretrained``. Parameters that
    `shard_model` reshaped from 0-D go back to 0-D. ``dtype`` casts floating tensors. Raises
    ValueError on every rank, writing nothing, if a weight to be written (after the cast) is non-finite.
    """
    model = unwrap_model(model)
    sd = _full_state_dict(model)
    out = Path(dir)
    if get_rank() == 0:
        for name in reshaped_scalar_params(model):
            sd[name] = sd[name].reshape(())
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    # The gathered tensors as written (a cast to fp16 can overflow), on rank 0 (the others hold none).
    refuse_non_finite(sd.items(), f"not exporting to {out}")
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_export(model, sd, out, merge_lora)
        for extra in (processor, tokenizer):
            if extra is not None:
                extra.save_pretrained(out)
    _barrier()


def _write_export(model: nn.Module, sd: dict[str, torch.Tensor], out: Path, merge_lora: bool) -> None:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a runtime dependency, but a plain model needs none of it
        PeftModel = ()
    if not isinstance(model, PeftModel):
        _write_hf(model, sd, out)
        return
    if merge_lora:
        merged = _strip_prefix(_merge_lora(model, sd), "base_model.model.")
        _write_hf(model.get_base_model(), merged, out)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(model, state_dict=sd)
    save_file(
        {k: v.contiguous() for k, v in adapter.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    model.peft_config[model.active_adapter].save_pretrained(str(out))
