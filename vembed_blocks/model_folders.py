"""What a model folder holds, from its files alone, and a model flag checked before anything loads.

    folder_kind("runs/clip/final")                       # "clip"
    check_model_arg("--vision-model", path, {"vision", "clip"})   # UserError naming the kind found and the fix
    with hub_errors("--model", "org/name"):              # a failed hub download -> one-line UserError
        model = AutoModel.from_pretrained("org/name")

The kinds (`KINDS`), each decided by files only (no weights are read):

    towers     composed_dual_encoder.json (`towers.ComposedDualEncoder.save_pretrained`: vision/, text/)
    colbert    colbert.json (a ColBERT / ColQwen export: a text or VLM backbone + token projection)
    diffusers  model_index.json (a diffusers pipeline, e.g. Qwen-Image-Edit)
    text       modules.json (sentence-transformers), or a config.json of a text model (bert, roberta, ...)
    vlm        a config.json whose model_type ends in "_vl" or that has an image_token_id (Qwen2/3-VL)
    clip       a config.json with text_config and vision_config (CLIP, SigLIP: a dual encoder)
    vision     a config.json of a vision backbone (dinov2, vit, clip_vision_model, ...: num_channels, no vocab)
    adapter    adapter_config.json without config.json (a LoRA adapter alone, without its base model)
    processor  no config.json, but a processor's or tokenizer's files (saved without the model)
    run        no config.json, but final/ holds a model (a training run's folder; its export is final/)
    unknown    anything else (no config.json, or one without a model_type)

Imports: `vembed_blocks.user_errors`; transformers only inside `check_model_arg(..., hub=True)` for an id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .user_errors import UserError

__all__ = [
    "KINDS",
    "FolderInfo",
    "check_model_arg",
    "config_kind",
    "folder_kind",
    "hub_errors",
    "inspect_folder",
    "looks_like_hf_id",
    "read_json",
]

KINDS = ("clip", "vision", "text", "vlm", "towers", "colbert", "diffusers", "adapter", "processor", "run", "unknown")
# The kinds that hold a model or an adapter: what a run folder's final/ holds.
_MODEL_KINDS = frozenset({"clip", "vision", "text", "vlm", "towers", "colbert", "diffusers", "adapter"})
# A processor or tokenizer saved on its own (no config.json): what `load_vlm_processor` also reads.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
COMPOSED_FILE = "composed_dual_encoder.json"  # what `towers.ComposedDualEncoder.save_pretrained` writes
# Vision backbones whose config.json has no tell-tale field of its own (most have num_channels and no vocab).
VISION_TYPES = frozenset(
    "dinov2 dinov2_with_registers dinov3_vit dinov3_convnext vit vit_mae vit_msn deit beit data2vec-vision "
    "clip_vision_model siglip_vision_model siglip2_vision_model convnext convnextv2 swin swinv2 resnet "
    "efficientnet regnet mobilevit mobilevitv2 levit pvt pvt_v2 hiera ijepa".split()
)
_DUAL_LABELS = {"clip": "CLIP", "siglip": "SigLIP", "siglip2": "SigLIP 2", "chinese_clip": "Chinese-CLIP"}
# What each wanted kind is called in "X is ..., not <want>".
_WANT = {  # in the order a "not A or B" lists them
    "vision": "a vision backbone",
    "text": "a text encoder (HF or sentence-transformers)",
    "vlm": "a Qwen-VL model (qwen3_vl / qwen2_vl)",
    "clip": "a CLIP/SigLIP folder",
    "towers": "composed towers",
    "colbert": "a ColBERT export",
    "diffusers": "a diffusers pipeline folder (model_index.json)",
}
# The dual-encoder flags and the kinds each takes: where a wrong kind belongs instead, and how it is used there.
_DUAL_FLAGS = {
    "--model": ({"clip", "towers"}, ""),
    "--vision-model": ({"vision"}, " (with --format i2i, or --text-model for towers)"),
    "--text-model": ({"text"}, " (with --vision-model: towers)"),
}
# The files `inspect_folder` decides by, as a "looked for" list in messages.
_MARKERS = ("config.json", COMPOSED_FILE, "colbert.json", "modules.json", "model_index.json", "adapter_config.json")
# A Hugging Face id: "name" or "org/name" (letters, digits, - _ .), as huggingface_hub validates it.
_HF_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class FolderInfo:
    """A folder's kind (one of `KINDS`), its ``model_type`` when config.json names one, and ``what``: the
    kind in words for messages (``"a vision backbone (dinov2)"``)."""

    kind: str
    model_type: str | None
    what: str


def read_json(path: str) -> Any | None:
    """The parsed file, or None when it does not exist; a file that is not JSON is the user's to fix."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None


def config_kind(config: Mapping[str, Any]) -> str:
    """The kind of a model from its config.json contents: "vlm", "clip", "vision", "text" or "unknown"."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return "unknown"
    if model_type.endswith("_vl") or "image_token_id" in config or "image_token_index" in config:
        return "vlm"  # reads images through placeholder tokens in its text (Qwen2/3-VL, LLaVA-style)
    if "vision_config" in config and "text_config" in config:
        return "clip"
    if model_type in VISION_TYPES or ("num_channels" in config and "vocab_size" not in config):
        return "vision"
    if "vision_config" in config or "text_config" in config:
        return "unknown"  # one half of a composite: not something the loaders take
    return "text"


def _describe(kind: str, model_type: str | None, path: str) -> str:
    """``kind`` in words for messages."""
    mt = f" ({model_type})" if model_type else ""
    if kind == "clip":
        label = _DUAL_LABELS.get(model_type or "", model_type or "dual-encoder")
        return f"a {label} folder (vision and text)"
    if kind == "towers":
        text = os.path.isdir(os.path.join(path, "text"))
        return "composed towers (vision/ + text/)" if text else "image-only composed towers (vision/)"
    if kind == "adapter":
        return "a LoRA adapter (adapter_config.json) without its base model's weights"
    words = {
        "vision": "a vision backbone",
        "text": "a text encoder",
        "vlm": "a vision-language model",
        "colbert": "a ColBERT export",
        "diffusers": "a diffusers pipeline",
        "run": "a training run's folder",
        "processor": "a processor / tokenizer without a model (no config.json)",
        "unknown": "an unrecognised model" if model_type else "not a model folder",
    }
    return words[kind] + mt


def _classify(path: str) -> tuple[str, str | None]:
    """(kind, model_type) of the folder ``path`` (see the module docstring for the order of the checks)."""
    config = read_json(os.path.join(path, "config.json"))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    model_type = model_type if isinstance(model_type, str) else None
    for marker, kind in ((COMPOSED_FILE, "towers"), ("colbert.json", "colbert"), ("model_index.json", "diffusers")):
        if os.path.isfile(os.path.join(path, marker)):
            return kind, model_type
    modules = read_json(os.path.join(path, "modules.json"))  # sentence-transformers
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    if any(t.endswith(".Transformer") for t in types):  # a text model (not e.g. sentence-transformers' CLIPModel)
        return "text", model_type
    if isinstance(config, dict):
        return config_kind(config), model_type
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "adapter", None
    if any(os.path.isfile(os.path.join(path, name)) for name in _PROCESSOR_FILES):
        return "processor", None
    final = os.path.join(path, "final")
    if os.path.isdir(final) and _classify(final)[0] in _MODEL_KINDS:
        return "run", None
    return "unknown", None


def inspect_folder(path: str | os.PathLike) -> FolderInfo:
    """The `FolderInfo` of an existing local folder; ``FileNotFoundError`` / ``NotADirectoryError`` otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        error = NotADirectoryError if os.path.exists(path) else FileNotFoundError
        raise error(f"{path}: not a folder")
    kind, model_type = _classify(path)
    return FolderInfo(kind, model_type, _describe(kind, model_type, path))


def folder_kind(path: str | os.PathLike) -> str:
    """The kind (one of `KINDS`) of the local folder ``path``, from its files only."""
    return inspect_folder(path).kind


def looks_like_hf_id(value: str) -> bool:
    """Whether ``value`` has the form of a Hugging Face id: ``name`` or ``org/name``; no leading ``./``, ``/`` or
    ``~``, at most one ``/``, no backslash, no ``..``."""
    return bool(_HF_ID.match(value)) and ".." not in value


def _want(expect: set[str]) -> str:
    names = [w for k, w in _WANT.items() if k in expect and not (k == "towers" and "clip" in expect)]
    return " or ".join(names) or "a model folder"


def _dual_fix(flag: str, value: str, info: FolderInfo, expect: set[str]) -> str:
    """Where a dual-encoder flag's folder of the wrong kind belongs instead ("" when not a dual-encoder flag)."""
    if flag not in _DUAL_FLAGS or not expect <= _DUAL_FLAGS[flag][0] | {"clip"}:
        return ""
    if info.kind == "towers":
        half = {"--vision-model": "vision", "--text-model": "text"}.get(flag)
        if half and os.path.isdir(os.path.join(value, half)):
            return f"; pass its {half} backbone, {flag} {os.path.join(value, half)}"
    for other, (kinds, how) in _DUAL_FLAGS.items():
        if other != flag and info.kind in kinds:
            return f"; pass it as {other}{how}"
    return ""


def _not_a_model_message(flag: str, value: str, info: FolderInfo) -> str:
    """A folder without the files of a model: a run folder (its export is final/), an adapter, or anything else."""
    final = os.path.join(value, "final")
    if info.kind == "run":
        return f"{flag} {value} is a run folder (no config.json); its export is {final}: pass {flag} {final}"
    if info.kind == "adapter":
        base = (read_json(os.path.join(value, "adapter_config.json")) or {}).get("base_model_name_or_path")
        return f"{flag} {value} is {info.what}; pass the merged export (export_pretrained merges LoRA)" + (
            f" or its base model, {base}" if base else ""
        )
    if os.path.isfile(os.path.join(value, "config.json")):
        return f"{flag} {value}: its config.json names no model_type: not a Hugging Face model folder"
    found = sorted(os.listdir(value))
    listing = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "nothing"
    return (
        f"{flag} {value} has no config.json: not a model folder (a run folder? its export would be {final})\n"
        f"cannot tell what {value} holds: looked for {', '.join(_MARKERS)}; found {listing}"
    )


def _missing_message(flag: str, value: str) -> str:
    """A value that is neither a folder nor a Hugging Face id."""
    if os.path.isfile(value):
        parent = os.path.dirname(value) or "."
        return f"{flag} {value} is a file; pass the model folder that holds it, {flag} {parent}"
    expanded = os.path.expanduser(value)
    if expanded != value and os.path.isdir(expanded):
        return f"{flag} {value}: no such folder (a quoted ~ is not expanded); pass {flag} {expanded}"
    return (
        f"{flag} {value}: no such folder (and not a Hugging Face id). Check the path; a recipe's export is "
        "<output>/final."
    )


def _hub_info(flag: str, value: str) -> FolderInfo | None:
    """A Hugging Face id's `FolderInfo` from its config.json (downloaded, or from the cache), None without one."""
    from transformers.utils import cached_file

    with hub_errors(flag, value):
        file = cached_file(value, "config.json", _raise_exceptions_for_missing_entries=False)
    config = read_json(file) if file is not None else None
    if not isinstance(config, dict):
        return None
    kind, model_type = config_kind(config), config.get("model_type")
    return FolderInfo(kind, model_type, _describe(kind, model_type, value))


def check_model_arg(
    flag: str, value: str | os.PathLike, expect: set[str] | str, *, hub: bool = False, want: str | None = None
) -> str | None:
    """Check the model flag ``flag`` (e.g. ``"--vision-model"``) before anything loads; returns the kind found.

    ``expect``: the kinds (`KINDS`) this flag takes. A local folder of another kind, a folder that is not a
    model (a run folder: its export is final/), and a path that is neither a folder nor a Hugging Face id raise
    `UserError`, one or two lines naming the flag, the kind found and the fix. A Hugging Face id that is not a
    local folder is left to ``from_pretrained`` (it may be in the cache) and returns None, unless ``hub``:
    then its config.json is fetched (cache first; a failure is a `UserError`, see `hub_errors`) and its kind
    checked the same way (None when it has no config.json). ``want``: the words for what the flag takes
    (default: from ``expect``).
    """
    value, expect = os.fspath(value), {expect} if isinstance(expect, str) else set(expect)
    unknown = expect - set(KINDS)
    if unknown:
        raise ValueError(f"check_model_arg: unknown kinds {sorted(unknown)}; kinds are {KINDS}")
    if os.path.isdir(value):
        info = inspect_folder(value)
    elif looks_like_hf_id(value):
        info = _hub_info(flag, value) if hub else None
        if info is None:
            return None
    else:
        raise UserError(_missing_message(flag, value))
    if info.kind in expect:
        return info.kind
    if info.kind in ("run", "adapter") or (info.kind == "unknown" and not info.model_type):
        raise UserError(_not_a_model_message(flag, value, info))
    fix = _dual_fix(flag, value, info, expect)
    raise UserError(f"{flag} {value} is {info.what}, not {want or _want(expect)}{fix}")


class hub_errors:
    """``with hub_errors(flag, value): ...from_pretrained(value)``: an ``OSError`` raised inside (what transformers
    raises when a download fails or a repo does not exist) becomes a one-line `UserError` when ``value`` is not a
    local folder; inside a local folder it propagates unchanged (a broken folder is not a hub problem)."""

    def __init__(self, flag: str, value: str | os.PathLike) -> None:
        self.flag, self.value = flag, os.fspath(value)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if not isinstance(exc, OSError) or os.path.isdir(self.value):
            return False
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"{self.flag} {self.value}: not a local folder and loading it from the Hugging Face hub failed: {first}"
        ) from exc
