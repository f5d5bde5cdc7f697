"""Hugging Face dual encoders (CLIP, SigLIP, composed towers): loading, embedding, and their loss's temperature."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .model_folders import COMPOSED_FILE, check_model_arg, hub_errors
from .pooling import POOL_METHODS, pool

__all__ = [
    "dual_encoder_features",
    "ComposedDualEncoder",
    "ComposedProcessor",
    "MissingTokenizer",
    "compose_dual_encoder",
    "load_dual_encoder",
    "text_padding",
    "contrastive_loss_for",
    "write_temperature_back",
]

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- composed towers


def _pooled_image(out: Any) -> torch.Tensor:
    """A vision backbone's image vector: its pooler output (DINOv2, ViT, CLIPVision) or else the CLS token."""
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


class ComposedDualEncoder(torch.nn.Module):
    """Any HF vision backbone + any HF text backbone (or none), each followed by a linear map to ``dim``.

    ``get_image_features(pixel_values[B,3,H,W]) -> [B, dim]`` (pooler output or CLS) and
    ``get_text_features(input_ids[B,L], attention_mask[B,L]) -> [B, dim]`` (``text_pooling``
    over real tokens), so it trains and evaluates exactly like a CLIP model.
    ``text=None`` makes an image-only encoder (DINOv2-style product / instance search, trained on
    image-to-image pairs): it has no ``text_proj`` and ``get_text_features`` raises ``ValueError``.
    ``save_pretrained(dir)`` writes ``vision/`` and ``text/`` (plain HF folders; no ``text/`` when
    image-only), the projections and ``composed_dual_encoder.json``; ``from_pretrained(dir)`` reads them back.
    """

    def __init__(
        self, vision: torch.nn.Module, text: torch.nn.Module | None, dim: int, text_pooling: str = "mean"
    ) -> None:
        super().__init__()
        if text_pooling not in POOL_METHODS:
            raise ValueError(f"ComposedDualEncoder: text_pooling must be one of {POOL_METHODS}, got {text_pooling!r}")
        self.vision, self.text, self.dim, self.text_pooling = vision, text, dim, text_pooling
        self.vision_proj = torch.nn.Linear(_hidden_size(vision.config), dim, bias=False)
        self.text_proj = None if text is None else torch.nn.Linear(_hidden_size(text.config), dim, bias=False)
        # Blocks of both backbones, for activation checkpointing and FSDP wrapping by class.
        self._no_split_modules = sorted(
            set(getattr(vision, "_no_split_modules", None) or []) | set(getattr(text, "_no_split_modules", None) or [])
        )

    @property
    def has_text(self) -> bool:
        """False for an image-only encoder (built or saved without a text backbone)."""
        return self.text is not None

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(_pooled_image(self.vision(pixel_values=pixel_values)))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.text is None:
            raise ValueError(
                "ComposedDualEncoder: this is an image-only encoder (no text backbone); it embeds images only"
            )
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.text_proj(pool(hidden, attention_mask, self.text_pooling))

    def save_pretrained(self, out: str, **kwargs: Any) -> None:
        os.makedirs(out, exist_ok=True)
        self.vision.save_pretrained(os.path.join(out, "vision"), **kwargs)
        names = ["vision_proj"]
        if self.text is not None:
            self.text.save_pretrained(os.path.join(out, "text"), **kwargs)
            names.append("text_proj")
        projections = {f"{k}.weight": getattr(self, k).weight.detach().contiguous().cpu() for k in names}
        save_file(projections, os.path.join(out, "projections.safetensors"))
        with open(os.path.join(out, COMPOSED_FILE), "w") as f:
            json.dump({"dim": self.dim, "text_pooling": self.text_pooling, "has_text": self.has_text}, f)

    @classmethod
    def from_pretrained(cls, path: str) -> "ComposedDualEncoder":
        from transformers import AutoModel

        meta = _composed_meta(path)
        text = AutoModel.from_pretrained(os.path.join(path, "text")) if meta["has_text"] else None
        model = cls(AutoModel.from_pretrained(os.path.join(path, "vision")), text, meta["dim"], meta["text_pooling"])
        missing, unexpected = model.load_state_dict(
            load_file(os.path.join(path, "projections.safetensors")), strict=False
        )
        if unexpected or any(k.startswith(("vision_proj", "text_proj")) for k in missing):
            raise ValueError(
                f"{path}: projections.safetensors does not match (missing {missing}, unexpected {unexpected})"
            )
        return model


def _composed_meta(path: str) -> dict[str, Any]:
    """``composed_dual_encoder.json`` with ``has_text`` filled in (folders written before image-only towers lack it)."""
    file = os.path.join(path, COMPOSED_FILE)
    with open(file) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
    missing = [k for k in ("dim", "text_pooling") if k not in meta]
    if missing:
        raise ValueError(f"{file}: missing {missing}")
    meta.setdefault("has_text", True)
    if meta["has_text"] != os.path.isdir(os.path.join(path, "text")):
        where = "missing" if meta["has_text"] else "present"
        raise ValueError(f"{file} says has_text={meta['has_text']} but the text/ folder is {where} in {path}")
    return meta


def _hidden_size(config: Any) -> int:
    for name in ("hidden_size", "projection_dim", "embed_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot find the output width of {type(config).__name__}")


class MissingTokenizer:
    """The tokenizer slot of an image-only `ComposedProcessor`: calling it raises a clear ``ValueError``.

    Why not ``None``: collators call ``processor.tokenizer(texts, ...)``; this names the cause
    (a text item reached an image-only encoder) instead of "'NoneType' object is not callable".
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            "image-only composed encoder: it has no text backbone or tokenizer, so it embeds images only "
            "(train it on image-to-image records, e.g. --format i2i)"
        )

    def __bool__(self) -> bool:
        return False


class ComposedProcessor:
    """The vision backbone's image processor and the text backbone's tokenizer (image-only: a `MissingTokenizer`)."""

    def __init__(self, image_processor: Any, tokenizer: Any = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = MissingTokenizer() if tokenizer is None else tokenizer

    @property
    def has_text(self) -> bool:
        return not isinstance(self.tokenizer, MissingTokenizer)

    @classmethod
    def from_pretrained(cls, path: str) -> "ComposedProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        text = os.path.join(path, "text")
        return cls(
            AutoImageProcessor.from_pretrained(os.path.join(path, "vision")),
            AutoTokenizer.from_pretrained(text) if os.path.isdir(text) else None,
        )

    def save_pretrained(self, out: str) -> None:
        self.image_processor.save_pretrained(os.path.join(out, "vision"))
        if self.has_text:
            self.tokenizer.save_pretrained(os.path.join(out, "text"))


def text_padding(model: Any) -> dict[str, Any]:
    """The text padding a dual encoder was trained with, as `DualEncoderCollator` keyword arguments.

    SigLIP (``config.model_type`` ``siglip`` / ``siglip2``) was trained on text padded to
    ``max_length=64``, and pools assuming it; CLIP and composed towers pad to the longest
    text of the batch (at most 77 tokens). The one place this decision is made.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if model_type.startswith("siglip"):
        return {"max_length": 64, "padding": "max_length"}
    return {"max_length": 77, "padding": True}


def load_dual_encoder(path: str | os.PathLike, *, flag: str = "--model") -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` from a HF dual-encoder folder/id (CLIP, SigLIP) or a `ComposedDualEncoder` folder.

    ``flag``: the command-line flag ``path`` came from, named in the one-line `UserError` raised, before
    anything loads, for a folder of another kind (a vision backbone, a text model, a run folder, ...), a path
    that does not exist, or a hub id that cannot be fetched (`model_folders.check_model_arg`).
    """
    path = os.fspath(path)
    if check_model_arg(flag, path, {"clip", "towers"}, hub=True) == "towers":
        return ComposedDualEncoder.from_pretrained(path), ComposedProcessor.from_pretrained(path)
    from transformers import AutoModel, AutoProcessor

    with hub_errors(flag, path):
        return AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(path)


def compose_dual_encoder(
    vision_model: str | os.PathLike,
    text_model: str | os.PathLike | None,
    dim: int,
    text_pooling: str = "mean",
    *,
    vision_flag: str = "--vision-model",
    text_flag: str = "--text-model",
) -> tuple[ComposedDualEncoder, ComposedProcessor]:
    """A new `ComposedDualEncoder` from pretrained backbones (ids or folders), projections random.

    ``vision_model``: a vision backbone (DINOv2, ViT, ...), or a CLIP/SigLIP folder, whose vision tower is
    used. ``text_model``: a text backbone (BERT, a sentence-transformers folder, ...); None makes an
    image-only encoder (no text backbone, a processor without a tokenizer). Each is checked before it loads
    (`model_folders.check_model_arg`; ``vision_flag`` / ``text_flag`` name the flags in the one-line errors).
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    vision_model = os.fspath(vision_model)
    vision_kind = check_model_arg(vision_flag, vision_model, {"vision", "clip"}, hub=True)
    text, tokenizer = None, None
    if text_model:
        text_model = os.fspath(text_model)
        check_model_arg(text_flag, text_model, {"text"}, hub=True)
        with hub_errors(text_flag, text_model):
            text, tokenizer = AutoModel.from_pretrained(text_model), AutoTokenizer.from_pretrained(text_model)
    with hub_errors(vision_flag, vision_model):
        if vision_kind == "clip":
            vision = _vision_tower(vision_model, vision_flag)
        else:
            vision = AutoModel.from_pretrained(vision_model)
        image_processor = AutoImageProcessor.from_pretrained(vision_model)
    return ComposedDualEncoder(vision, text, dim, text_pooling), ComposedProcessor(image_processor, tokenizer)


def _vision_tower(path: str, flag: str) -> torch.nn.Module:
    """The vision tower of the CLIP/SigLIP folder or id ``path`` (``CLIPVisionModel``, ``SiglipVisionModel``, ...)
    with its trained weights; the text tower's weights are left unread."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path).vision_config
    with _without_load_report():
        model, info = AutoModel.from_pretrained(path, config=config, output_loading_info=True)
    if info["missing_keys"]:
        from .user_errors import UserError

        missing = sorted(info["missing_keys"])[:5]
        raise UserError(f"{flag} {path}: its vision tower is incomplete (weights missing: {missing})")
    log.info("%s %s: using its vision tower (%s)", flag, path, type(model).__name__)
    return model


class _without_load_report:
    """Drops transformers' "LOAD REPORT" while loading one tower of a two-tower checkpoint.

    Why: it lists every weight of the other tower as UNEXPECTED (tens of lines that read like an error, for
    what is intended); missing weights, the report's other half, are checked by the caller instead. Only that
    record of that logger is dropped, only inside the ``with``.
    """

    _LOGGER = "transformers.modeling_utils"

    @staticmethod
    def filter(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    def __enter__(self) -> None:
        logging.getLogger(self._LOGGER).addFilter(self.filter)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger(self._LOGGER).removeFilter(self.filter)


def contrastive_loss_for(
    model: torch.nn.Module,
    kind: str = "infonce",
    temperature: float | None = None,
    symmetric: bool = False,
    false_negatives=None,
) -> torch.nn.Module:
    """InfoNCE (``kind="infonce"``) or SigLIP whose learnable temperature (and bias) start from ``model``'s own.

    CLIP keeps ``logit_scale = log(1 / temperature)``, SigLIP ``logit_scale = log(scale)`` and
    ``logit_bias``; a model without them starts at InfoNCE 0.05 / SigLIP scale 10, bias -10.
    ``temperature`` (``> 0``) overrides the start with the same meaning for both kinds: logits are
    similarities divided by it (SigLIP's scale ``t`` is ``1 / temperature``). The loss owns the temperature
    from here on: the model's own parameters are frozen (`write_temperature_back` copies the learned values into them).
    ``false_negatives``: the loss's `FalseNegatives` rules (`vembed_blocks.false_negatives`), or None.
    """
    from .losses import InfoNCE, SigLIP

    logit_scale, bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
    if temperature is not None and not temperature > 0:  # 0 once meant "the model's own", silently
        raise ValueError(f"temperature must be > 0 (logits = similarity / temperature), got {temperature}")
    if kind == "siglip":
        scale = None if temperature is None else 1.0 / temperature
        t = scale or (math.exp(logit_scale.item()) if logit_scale is not None else 10.0)
        b = bias.item() if bias is not None else -10.0
        loss: torch.nn.Module = SigLIP(temperature=t, bias=b, learn=True, false_negatives=false_negatives)
    elif kind == "infonce":
        t = temperature or (math.exp(-logit_scale.item()) if logit_scale is not None else 0.05)  # None: the model's
        loss = InfoNCE(temperature=t, learn_temperature=True, symmetric=symmetric, false_negatives=false_negatives)
    else:
        raise ValueError(f"contrastive_loss_for: kind must be 'infonce' or 'siglip', got {kind!r}")
    for name in ("logit_scale", "logit_bias"):
        if isinstance(getattr(model, name, None), torch.nn.Parameter):
            getattr(model, name).requires_grad_(False)
    return loss


@torch.no_grad()
def write_temperature_back(model: torch.nn.Module, loss: torch.nn.Module) -> None:
    """Copy the loss's learned ``log_scale`` (and SigLIP ``bias``) into ``model.logit_scale`` (``logit_bias``), so
    the exported model scores as trained. ``loss`` may be wrapped (e.g. `Matryoshka`, whose ``.loss`` is the inner)."""
    loss = getattr(loss, "loss", loss)
    if isinstance(getattr(model, "logit_scale", None), torch.Tensor) and hasattr(loss, "log_scale"):
        model.logit_scale.copy_(loss.log_scale.reshape(model.logit_scale.shape))
    if isinstance(getattr(model, "logit_bias", None), torch.Tensor) and hasattr(loss, "bias"):
        model.logit_bias.copy_(loss.bias.reshape(model.logit_bias.shape))
