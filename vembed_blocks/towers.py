"""Embedding from a Hugging Face dual encoder (CLIP, SigLIP, ...) given collated inputs."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

__all__ = ["dual_encoder_features"]

_TEXT_KEYS = ("input_ids", "attention_mask", "position_ids")


def _tensor(out: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return out if torch.is_tensor(out) else out.pooler_output


def dual_encoder_features(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Projected embedding ``[B, D]`` of one side of a `DualEncoderCollator` batch.

    ``pixel_values`` -> ``model.get_image_features``; ``input_ids`` -> ``model.get_text_features``;
    both (an M2I query: image plus text) -> the sum of the two L2-normalised embeddings. The
    model may be a plain HF model, a peft model, or a `wrap_ddp` / `shard_model` wrapper
    (whose encode methods keep gradient synchronisation).
    """
    has_image, has_text = "pixel_values" in inputs, "input_ids" in inputs
    if not (has_image or has_text):
        raise ValueError(f"dual_encoder_features: need pixel_values or input_ids, got keys {sorted(inputs)}")
    if has_image and not has_text:
        return _tensor(model.get_image_features(pixel_values=inputs["pixel_values"]))
    text = _tensor(model.get_text_features(**{k: v for k, v in inputs.items() if k in _TEXT_KEYS}))
    if not has_image:
        return text
    image = _tensor(model.get_image_features(pixel_values=inputs["pixel_values"]))
    return F.normalize(text, dim=-1) + F.normalize(image, dim=-1)
