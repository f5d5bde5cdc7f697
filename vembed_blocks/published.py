"""The published set-up of a known embedder, as recipe flag defaults: what fine-tuning it "as released" means.

``published_defaults(model)`` returns ``{flag_dest: value}`` for a model folder or hub id it recognises, else
``{}``. A recipe passes it to ``parser.set_defaults`` before the final parse, so a flag given on the command
line still wins. Known today, Qwen3-VL-Embedding (the 2B and 8B releases and fine-tunes whose name or
``config.json`` says so):

- LoRA rank 32, alpha 32 on the language model's ``q/k/v/o`` attention and ``gate/up/down`` MLP projections
  (``--lora 32 --lora-alpha 32 --lora-targets ...``; the vision tower's ``qkv``/``proj`` are not among them);
- bf16 (``--bf16``; ``--no-bf16`` turns it off);
- Matryoshka widths of the releases (``--mrl-dims``): the full width, then each of 3072, 2048, 1536, 1024,
  512, 256, 128, 64 below it (2B: 2048 ... 64; 8B: 4096 ... 64);
- the default instruction ``"Represent the user's input."`` (the recipes' own default already).

Last-token pooling with left padding is how `data.collate.VLMCollator` and `vlm.vlm_embed` always embed.
The width is read from a local folder's ``config.json`` (``text_config.hidden_size``); for a hub id it comes
from the release's name (2B: 2048, 8B: 4096), so nothing is downloaded here.

Imports: the standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

__all__ = ["published_defaults", "QWEN3_VL_EMBEDDING_LORA_TARGETS", "MRL_WIDTHS"]

log = logging.getLogger(__name__)

QWEN3_VL_EMBEDDING_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MRL_WIDTHS = (3072, 2048, 1536, 1024, 512, 256, 128, 64)  # below the full width, as the releases list them
_NAME = re.compile(r"qwen3[-_]?vl[-_]?embedding", re.IGNORECASE)
_RELEASE_WIDTH = {"2b": 2048, "8b": 4096}


def _config(model: str) -> dict[str, Any]:
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # the loader reports a broken folder with its own message


def _width(model: str, config: dict[str, Any]) -> int | None:
    """The embedding width: the text model's hidden size, else the release's by name."""
    size = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    if size:
        return int(size)
    match = re.search(r"(\d+)b\b", os.path.basename(model.rstrip("/")).lower())
    return _RELEASE_WIDTH.get(match.group(0)) if match else None


def is_qwen3_vl_embedding(model: str) -> bool:
    """Whether ``model`` (folder or hub id) is a Qwen3-VL-Embedding: by its name, or its config's
    ``_name_or_path`` (a fine-tune saved from one)."""
    config = _config(model)
    names = (os.path.basename(os.path.normpath(model)), str(config.get("_name_or_path", "")))
    return any(_NAME.search(n) for n in names)


def published_defaults(model: str | None) -> dict[str, Any]:
    """Flag defaults (argparse ``dest`` -> value) of ``model``'s published set-up; ``{}`` when unknown."""
    if not model or not is_qwen3_vl_embedding(model):
        return {}
    defaults: dict[str, Any] = dict(lora=32, lora_alpha=32.0, bf16=True)
    defaults["lora_targets"] = ",".join(QWEN3_VL_EMBEDDING_LORA_TARGETS)
    width = _width(model, _config(model))
    if width:
        defaults["mrl_dims"] = ",".join(str(d) for d in (width, *(w for w in MRL_WIDTHS if w < width)))
    log.info("%s is a Qwen3-VL-Embedding: published defaults %s (flags you give win)", model, defaults)
    return defaults
