"""How each exported folder kind is detected, loaded and run: the per-family half of `encoder`.

A family is loaded into a `Backend`: the model, the text / image abilities and one function
``embed(items, is_query)`` that collates a batch of `Item`s with the collator the model was trained
with and runs the same forward its evaluation ran (before any normalisation, which `Encoder` adds).

    family   detected by (`model_folders.folder_kind`)       settings read from          embed returns
    dual     composed_dual_encoder.json, or a config.json    the model folder            [B, D]
             with text_config + vision_config (CLIP, SigLIP);
             composed towers may be image-only (no text/)
    colbert  colbert.json (+ colbert_projection.safetensors)  colbert.json                ([B, L, D], mask[B, L])
    text     modules.json, or a config.json of a text model  sentence-transformers files [B, D]
             (no vision_config, no image channels)
    vlm      config.json whose model_type ends in "_vl" (or  vlm_embedding.json          [B, D] (last token)
             that has an image_token_id)

Any other folder (a vision backbone alone, a diffusers pipeline, a LoRA adapter, a run folder, a folder of
none of these files) is a one-line `UserError` naming what it holds and the fix.
An export describes itself: only files inside the folder are read (never a training run's
arguments), so a folder copied anywhere loads with the same settings.

Imports: torch and `vembed_blocks.data.records`; transformers, safetensors, the collators, `model_folders`
and the model-specific blocks only inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .data.records import Item

__all__ = ["Backend", "FAMILIES", "VLM_EMBEDDING_FILE", "detect_family", "load_backend"]

log = logging.getLogger(__name__)

FAMILIES = ("dual", "colbert", "text", "vlm")
COLBERT_FILE = "colbert.json"
COLBERT_PROJECTION = "colbert_projection.safetensors"
# What a Qwen3-VL embedding export carries next to its weights (pooling, instructions, image cap).
VLM_EMBEDDING_FILE = "vlm_embedding.json"
# Used for what a folder's sidecar does not say (a folder exported without one, or an older one).
VLM_DEFAULTS = {"query_instruction": "Represent the user's input.", "doc_instruction": None, "max_image_side": 1024}
COLBERT_DEFAULTS = {"max_length": 256, "max_image_side": 1024}

Embed = Callable[[Sequence[Item], bool], Any]


@dataclass
class Backend:
    """One loaded family. ``embed(items, is_query)`` -> ``[b, D]`` or ``(tokens[b, L, D], mask[b, L])``,
    unnormalised, on the model's device; ``settings`` records what was read from the folder (for logs/docs)."""

    family: str
    model: torch.nn.Module
    embed: Embed
    has_text: bool
    has_image: bool
    multi_vector: bool
    settings: dict[str, Any]


# Folder kind (`model_folders.KINDS`) -> the family that loads it.
_KIND_FAMILY = {"towers": "dual", "clip": "dual", "colbert": "colbert", "text": "text", "vlm": "vlm"}
_ENCODER_WORDS = "an exported encoder (CLIP/SigLIP, composed towers, a text encoder, Qwen-VL or ColBERT)"


def detect_family(path: str | os.PathLike, flag: str = "--model") -> str:
    """The family (one of `FAMILIES`) of an exported folder, from its files (`model_folders.folder_kind`).

    Raises ``FileNotFoundError`` for a missing folder and `UserError` (a ``ValueError``) naming ``flag``, the
    folder, what it holds instead and the fix: a vision backbone alone, a diffusers pipeline, a LoRA adapter,
    a run folder (its export is final/), or a folder of none of the files looked for.
    """
    from .model_folders import check_model_arg

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{flag} {path}: no such folder (an exported model folder; a recipe's export is <output>/final)"
        )
    return _KIND_FAMILY[check_model_arg(flag, path, set(_KIND_FAMILY), want=_ENCODER_WORDS)]


def _export_settings(path: str, names: dict[str, Any], sidecar: str) -> dict[str, Any]:
    """``names`` (defaults) overridden by the export's own ``sidecar`` file in ``path``.

    Only the folder itself is read: whatever trained the model wrote its collation settings
    (instructions, length caps, pooling) there at export, so the folder loads the same anywhere.
    """
    from .model_folders import read_json

    out, file = dict(names), os.path.join(path, sidecar)
    saved = read_json(file)
    if isinstance(saved, dict):
        out.update({k: saved[k] for k in names if k in saved})
    out["read_from"] = [file] if isinstance(saved, dict) else ["the defaults"]
    return out


def _dual(path: str, device: torch.device, dtype: torch.dtype | None, flag: str) -> Backend:
    from .data.collate import DualEncoderCollator
    from .towers import dual_encoder_features, load_dual_encoder, text_padding

    model, processor = load_dual_encoder(path, flag=flag)
    model = model.to(device=device, dtype=dtype).eval()
    collator = DualEncoderCollator(processor, **text_padding(model))  # SigLIP: max_length=64 padding, as trained

    def embed(items: Sequence[Item], is_query: bool) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in collator.encode(items, is_query).items()}
        return dual_encoder_features(model, inputs)

    has_text = getattr(model, "has_text", True)  # False: image-only composed towers (no text/ folder)
    settings = {"padding": text_padding(model), "image_only": not has_text}
    return Backend("dual", model, embed, has_text, True, False, settings)


def _text(path: str, device: torch.device, dtype: torch.dtype | None, overrides: dict[str, Any], flag: str) -> Backend:
    from .text_encoder import encode_text_items, load_text_encoder

    model, collator, cfg = load_text_encoder(
        path,
        flag=flag,
        max_length=overrides.get("max_length"),
        query_prefix=overrides.get("query_instruction"),
        doc_prefix=overrides.get("doc_instruction"),
    )
    model = model.to(device=device, dtype=dtype).eval()
    embed = lambda items, is_query: encode_text_items(model, collator, cfg, items, is_query)
    settings = {"pooling": cfg.pooling, "max_length": cfg.max_length, "prompts": cfg.prompts}
    return Backend("text", model, embed, True, False, False, settings)


def _vlm(path: str, device: torch.device, dtype: torch.dtype | None, overrides: dict[str, Any], flag: str) -> Backend:
    from transformers import AutoModel

    from .data.collate import VLMCollator
    from .vlm import load_vlm_processor, vlm_embed

    settings = _export_settings(path, {**VLM_DEFAULTS, "pooling": "last"}, VLM_EMBEDDING_FILE)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    processor = load_vlm_processor(path, flag=flag)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device=device, dtype=dtype).eval()
    collator = VLMCollator(
        processor, settings["query_instruction"], settings["doc_instruction"], settings["max_image_side"]
    )

    def embed(items: Sequence[Item], is_query: bool) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in collator.encode(items, is_query).items()}
        return vlm_embed(model, inputs, settings["pooling"])

    return Backend("vlm", model, embed, True, True, False, settings)


def _colbert(
    path: str, device: torch.device, dtype: torch.dtype | None, overrides: dict[str, Any], flag: str
) -> Backend:
    from safetensors.torch import load_file
    from transformers import AutoModel

    from .distributed import pad_dim
    from .model_folders import read_json
    from .vlm import vlm_token_embeddings

    spec = read_json(os.path.join(path, COLBERT_FILE))
    if not isinstance(spec, dict) or spec.get("encoder") not in ("text", "vlm"):
        raise ValueError(f"{path}/{COLBERT_FILE}: needs 'encoder': 'text' or 'vlm', got {spec!r}")
    settings = _export_settings(path, COLBERT_DEFAULTS, COLBERT_FILE)
    settings.update({k: spec.get(k) for k in ("encoder", "dim", "query_instruction", "doc_instruction")})
    settings.update({k: v for k, v in overrides.items() if v is not None})
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device=device, dtype=dtype).eval()
    proj = None
    if spec.get("dim"):
        file = os.path.join(path, COLBERT_PROJECTION)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}/{COLBERT_FILE} says dim={spec['dim']} but {COLBERT_PROJECTION} is missing")
        weight = load_file(file)["weight"]
        proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        proj.weight.data.copy_(weight)
        proj = proj.to(device=device, dtype=dtype)
    collator = _colbert_collator(path, settings, flag)
    is_vlm = settings["encoder"] == "vlm"

    def embed(items: Sequence[Item], is_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v.to(device) for k, v in collator.encode(items, is_query).items()}
        if is_vlm:
            tokens, _ = vlm_token_embeddings(model, inputs, proj)
        else:
            tokens = model(**inputs).last_hidden_state
            tokens = proj(tokens) if proj is not None else tokens
        mask = inputs["attention_mask"].bool()
        return pad_dim(tokens, 1, mask.shape[1]), mask

    return Backend("colbert", model, embed, True, is_vlm, True, settings)


def _colbert_collator(path: str, settings: dict[str, Any], flag: str) -> Any:
    """The collator a ColBERT / ColQwen model trains with, with the export's instructions / prefixes."""
    from .data.collate import TextCollator, VLMCollator

    if settings["encoder"] == "vlm":
        from .vlm import load_vlm_processor

        # As in training: the query instruction as is (None: no system turn), documents default to it.
        processor = load_vlm_processor(path, flag=flag)
        return VLMCollator(
            processor, settings["query_instruction"], settings["doc_instruction"], settings["max_image_side"]
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return TextCollator(tokenizer, settings["max_length"], settings["query_instruction"], settings["doc_instruction"])


def load_backend(
    path: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype | None = None,
    family: str | None = None,
    flag: str = "--model",
    **overrides: Any,
) -> Backend:
    """Load ``path`` as ``family`` (default: `detect_family`; ``flag`` names the path in its errors).
    ``overrides`` (None = the folder's):
    ``query_instruction`` / ``doc_instruction`` (text: prefixes; vlm, colbert: instructions or prefixes),
    ``max_length`` (text, colbert text), ``max_image_side`` (vlm, colbert vlm); dual folders take none."""
    path = os.fspath(path)
    family = family or detect_family(path, flag)
    if family not in FAMILIES:
        raise ValueError(f"load_encoder: family must be one of {FAMILIES}, got {family!r}")
    allowed = {"dual": (), "text": ("query_instruction", "doc_instruction", "max_length")}.get(family, tuple(overrides))
    unused = sorted(k for k, v in overrides.items() if v is not None and k not in allowed)
    if unused:
        raise ValueError(f"load_encoder: {unused} do not apply to {path} (a {family} folder)")
    if family == "dual":
        return _dual(path, device, dtype, flag)
    return {"text": _text, "vlm": _vlm, "colbert": _colbert}[family](path, device, dtype, overrides, flag)
