"""Qwen-VL style vision-language models as embedding encoders: processor loading, pooling, sharding
and GradCache chunking.

    processor = load_vlm_processor(path)               # works without torchvision
    collator = VLMCollator(processor, query_instruction="Represent the user's input.")
    emb = vlm_embed(model, batch["query"])              # [B, D], last real token (Qwen3-VL-Embedding)
    tok, mask = vlm_token_embeddings(model, batch["positive"])   # [B, L, D], [B, L] (ColPali / ColQwen)
    gc = GradCache(chunk_size=8, splitter=VLMSplit)    # chunks of rows with their own images

``model`` is the backbone (``AutoModel.from_pretrained`` gives ``Qwen3VLModel``, whose output
has ``last_hidden_state``), plain or wrapped by `shard_model` / `wrap_ddp` / peft.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import warnings
import weakref
from typing import Any, Mapping

import torch
from torch import nn

from .gradcache_split import RowSplit
from .pooling import pool

__all__ = [
    "load_vlm_processor",
    "qwen_vl_processor",
    "vlm_hidden_states",
    "vlm_embed",
    "vlm_token_embeddings",
    "shard_vlm",
    "vlm_text_blocks",
    "ignore_fsdp_view_warning",
    "VLMSplit",
]

log = logging.getLogger(__name__)

_VIDEO_CONFIG = "video_preprocessor_config.json"

# Processor built by `qwen_vl_processor` -> the folder it was loaded from, whose video-processor
# config its `save_pretrained` copies. Weakly keyed here rather than an attribute set on the
# processor: the processor's own attributes are what transformers serialises and compares, and
# nothing is added to it. (A pickled copy, e.g. in a DataLoader worker, does not carry it; save from
# the processor `load_vlm_processor` returned.)
_SOURCES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

# Flat per-patch vision inputs (Qwen-VL) and the grid that says how many patches each image / video
# has; mm_token_type_ids marks image (1) / video (2) tokens per row.
_PIXEL_TO_GRID = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}
_GRID_TOKEN_TYPE = {"image_grid_thw": 1, "video_grid_thw": 2}


def _processor_base(name: str) -> type:
    import transformers

    base = getattr(transformers, name, None)
    if base is None or not name.startswith("Qwen"):
        base = transformers.Qwen3VLProcessor
    return base


def _image_only_class(base: type) -> type:
    """``base`` minus its video processor, named like ``base`` (saved ``processor_class``) and
    registered here under ``_ImageOnly<base>`` so pickling (DataLoader spawn workers) finds it."""
    qualname = f"_ImageOnly{base.__name__}"
    if qualname in globals():
        return globals()[qualname]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = base.save_pretrained(self, save_directory, *args, **kwargs)
        src = _SOURCES.get(self)
        video = os.path.join(src, _VIDEO_CONFIG) if src else None
        if video and os.path.isfile(video) and not os.path.exists(os.path.join(save_directory, _VIDEO_CONFIG)):
            shutil.copy(video, save_directory)
        return out

    cls = type(
        base.__name__,
        (base,),
        {
            "__init__": __init__,
            "save_pretrained": save_pretrained,
            "__module__": __name__,
            "__qualname__": qualname,
            "__doc__": f"{base.__name__} without a video processor.",
        },
    )
    globals()[qualname] = cls
    return cls


def __getattr__(name: str) -> type:
    """Module attribute hook: a fresh process unpickling a processor (spawned DataLoader worker)
    looks up ``_ImageOnly<Base>`` here before any `qwen_vl_processor` call created it."""
    if name.startswith("_ImageOnly"):
        import transformers

        base = getattr(transformers, name[len("_ImageOnly") :], None)
        if isinstance(base, type):
            return _image_only_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def qwen_vl_processor(
    tokenizer: Any,
    image_processor: Any,
    chat_template: str | None = None,
    processor_class: str = "Qwen3VLProcessor",
    source: str | None = None,
) -> Any:
    """A Qwen-VL processor (``Qwen3VLProcessor`` by default) without a video processor.

    Why: the processor classes require a video processor, and every Qwen-VL video processor
    needs torchvision (which this project never installs). Images, chat template, placeholder
    expansion and ``mm_token_type_ids`` do not touch the video processor, so a subclass whose
    ``__init__`` omits it behaves identically on image/text inputs (transformers derives the
    sub-processors to type-check and save from the ``__init__`` signature). The subclass
    carries the real class name, so a saved folder names ``processor_class`` as the original
    does and loads with ``AutoProcessor`` wherever torchvision exists; ``source`` (the folder
    it was loaded from) lets ``save_pretrained`` copy that folder's video-processor config too.
    """
    cls = _image_only_class(_processor_base(processor_class))
    proc = cls(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template or tokenizer.chat_template
    )
    proc.video_processor = None
    if source:
        _SOURCES[proc] = source
    return proc


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _chat_template(path: str, tokenizer: Any) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    legacy = _read_json(os.path.join(path, "chat_template.json"))
    return legacy["chat_template"] if legacy else tokenizer.chat_template


def load_vlm_processor(path: str | os.PathLike, *, flag: str = "--model") -> Any:
    """The processor of a Qwen-VL model folder (or cached hub id), with or without torchvision.

    First ``AutoProcessor.from_pretrained``. On a machine without torchvision that raises
    (the Qwen-VL video processor imports it) or, for a folder that names no loadable
    processor class, silently returns the bare tokenizer ("TokenizersBackend has no
    attribute image_processor" later). Then the processor is rebuilt from its parts:
    ``AutoTokenizer``, ``Qwen2VLImageProcessorPil`` (the PIL/numpy implementation, no
    torchvision) configured from ``processor_config.json`` or ``preprocessor_config.json``,
    and the saved chat template (see `qwen_vl_processor`): the normal path here, said once per process.
    ``flag``: the flag ``path`` came from, named in the `UserError` raised before anything loads for a
    folder that is not a Qwen-VL model, ColQwen export or saved processor (`model_folders.check_model_arg`).
    """
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .model_folders import check_model_arg, hub_errors

    path = os.fspath(path)
    check_model_arg(flag, path, {"vlm", "colbert", "processor"}, hub=True)
    try:
        proc = AutoProcessor.from_pretrained(path)
        if hasattr(proc, "image_processor") and hasattr(proc, "apply_chat_template"):
            return proc
        reason = f"AutoProcessor gave a {type(proc).__name__} without an image processor"
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        reason = f"AutoProcessor failed ({type(e).__name__}: {first})"
    with hub_errors(flag, path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    config = _read_json(os.path.join(path, "processor_config.json")) or {}
    image_cfg = config.get("image_processor") or _read_json(os.path.join(path, "preprocessor_config.json"))
    if image_cfg is None:
        raise OSError(
            f"{path}: no image processor settings (processor_config.json or preprocessor_config.json); {reason}"
        )
    image_cfg = {k: v for k, v in image_cfg.items() if k not in ("image_processor_type", "processor_class")}
    log.debug("load_vlm_processor: %s: %s; built from its tokenizer, Qwen2VLImageProcessorPil, template", path, reason)
    _say_image_only()
    return qwen_vl_processor(
        tokenizer,
        Qwen2VLImageProcessorPil(**image_cfg),
        _chat_template(path, tokenizer),
        config.get("processor_class", "Qwen3VLProcessor"),
        source=path,
    )


@functools.cache
def _say_image_only() -> None:
    """Once per process, worded as the normal event it is: a run loads the processor several times (demo
    builder, recipe, evaluation), and the reason, once logged at each, read like an error."""
    log.info("loading the Qwen-VL processor without its video processor (it needs torchvision; images work)")


def vlm_hidden_states(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``last_hidden_state[B, L, D]`` of the backbone for one side of a `VLMCollator` batch.

    ``inputs``: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and, with images,
    flat ``pixel_values`` + ``image_grid_thw``, passed through unchanged.
    """
    # An encoder never needs the KV cache, and with activation checkpointing a cache passed to the
    # layers would be appended to again when backward recomputes them (keys twice as long).
    out = model(**{"use_cache": False, **inputs})
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(
            f"{type(model).__name__} returned no last_hidden_state: load the backbone with AutoModel "
            "(e.g. Qwen3VLModel), not a *ForConditionalGeneration head"
        )
    return hidden


def vlm_embed(model: nn.Module, inputs: Mapping[str, torch.Tensor], pooling: str = "last") -> torch.Tensor:
    """One embedding ``[B, D]`` per row: `pool` of the hidden states over ``attention_mask``.

    ``"last"`` (Qwen3-VL-Embedding, GME): the last real token, i.e. the final token of the chat
    (the assistant prefix when the collator adds a generation prompt). Correct for left and
    right padding. Not normalised: normalise (or let the loss do it) as the use requires.
    """
    return pool(vlm_hidden_states(model, inputs), inputs["attention_mask"], pooling)


def vlm_token_embeddings(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], projection: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level outputs for late interaction (ColPali / ColQwen): ``(tokens[B, L, D'], mask[B, L])``.

    ``tokens`` are the hidden states, through ``projection`` (e.g. ``nn.Linear(D, 128)``) when
    given; ``mask`` is ``attention_mask.bool()``: padding (left or right) is False and never
    scores in `maxsim` / `ColBERT`. Vectors are not normalised (`ColBERT` normalises).
    """
    hidden = vlm_hidden_states(model, inputs)
    if projection is not None:
        hidden = projection(hidden)
    return hidden, inputs["attention_mask"].bool()


def vlm_text_blocks(model: nn.Module) -> list[str]:
    """The class names of the text decoder blocks (the model's ``_no_split_modules`` without "Vision")."""
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return sorted(b for b in blocks if "Vision" not in b)


def ignore_fsdp_view_warning() -> None:
    """Silence FSDP2's "returned a view tensor" warning, that message only.

    FSDP2's post-forward hook warns at every forward of the root that it "returned a view tensor"
    (last_hidden_state is one under activation checkpointing, LoRA or bf16), since an in-place op on
    that view would skip the pre-backward all-gather. The functions here only read it (`pool` indexes,
    a projection makes a new tensor), so for this model the message is noise, printed by every rank.
    It is raised inside each forward; a warnings.catch_warnings() around every forward would reset
    Python's "shown once" registry for all other warnings at every step (and is not thread-safe), so
    one filter is installed instead, matching only this message from torch's FSDP code (installing
    it again replaces it: filters do not pile up).
    """
    warnings.filterwarnings(
        "ignore",
        message=r"FSDP2-wrapped module .* returned a view tensor",
        category=UserWarning,
        module=r"torch\.distributed\.fsdp\.",
    )


def shard_vlm(model: nn.Module, mixed_precision: str | object | None = None) -> nn.Module:
    """FSDP2 for a Qwen-VL style model: one unit per text block, the vision tower in the root unit.

    A chunk without images never runs the vision tower. Were its blocks separate units, ranks
    with and without images would issue different collectives and hang; inside the root unit
    (with unused parameters reduce-scattering zeros) every rank stays in step. Nothing is
    registered as an extra entry point: the model's own ``forward`` calls ``get_image_features``.
    Call the model's ``forward`` (e.g. through `vlm_embed`). Without a process group: unchanged.
    """
    from .parallel import shard_model

    layers = vlm_text_blocks(model)
    model = shard_model(model, layer_classes=layers, mixed_precision=mixed_precision, forward_methods=())
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)
    ignore_fsdp_view_warning()
    return model


def _runs(types: torch.Tensor, value: int) -> torch.Tensor:
    """Per row of ``types[B, L]``: how many contiguous runs equal ``value`` (one run = one image/frame)."""
    hit = types == value
    start = hit.clone()
    start[:, 1:] &= ~hit[:, :-1]
    return start.sum(1)


class VLMSplit(RowSplit):
    """`GradCache` splitter for Qwen-VL inputs: ``GradCache(chunk_size=8, splitter=VLMSplit)``.

    Like `RowSplit` (every tensor on dim 0, nested dicts/lists too), plus the Qwen-VL layouts whose
    rows are not on dim 0, in any dict holding both keys of a pair:

    - flat ``pixel_values[patches, C]`` / ``pixel_values_videos`` are sliced to the patches of the
      chunk's rows, and ``image_grid_thw[images, 3]`` / ``video_grid_thw`` to their images; a chunk
      without any image gets neither key (the models reject empty grids);
    - ``position_ids[3, B, L]`` (M-RoPE) is sliced on dim 1.

    Which images belong to which row is read from ``mm_token_type_ids[B, L]`` (1 = image token,
    2 = video token, one contiguous run per image / video frame; `VLMCollator` returns it), or,
    without it, one image per row. Counts that do not add up raise ``ValueError``.
    ``max_tokens`` chunking counts image tokens like any other (they are in ``attention_mask``).
    """

    def __init__(self, inputs: Any) -> None:
        self._grids: list[Mapping] = []  # dicts holding a pixel/grid pair
        self._offsets: dict[tuple[int, str], list[int]] = {}  # (id(dict), key) -> per-row start, length B+1
        super().__init__(inputs)
        for mapping in self._grids:
            self._grid_offsets(mapping)

    def _scan_mapping(self, m: Mapping, path: str) -> None:
        special = {g for p, g in _PIXEL_TO_GRID.items() if p in m and g in m}
        special |= {p for p, g in _PIXEL_TO_GRID.items() if g in special}
        if special:
            self._grids.append(m)
        for key, value in m.items():
            if key in special:
                continue
            if key == "position_ids" and isinstance(value, torch.Tensor) and value.ndim == 3:
                self.sizes.append((f"{path}.{key}[dim 1]", value.shape[1]))
            else:
                self._scan(value, f"{path}.{key}")

    def _grid_offsets(self, m: Mapping) -> None:
        """Row -> first grid row / first patch offsets (length B+1) for each pixel/grid pair in ``m``."""
        for pix_key, grid_key in _PIXEL_TO_GRID.items():
            if grid_key not in m or pix_key not in m:
                continue
            grid = m[grid_key].long().cpu()
            units = grid[:, 0] if grid_key == "video_grid_thw" else torch.ones(len(grid), dtype=torch.long)
            types = m.get("mm_token_type_ids")
            if isinstance(types, torch.Tensor):
                per_row = _runs(types.cpu(), _GRID_TOKEN_TYPE[grid_key])
            elif len(grid) == self.rows and bool((units == 1).all()):
                per_row = torch.ones(self.rows, dtype=torch.long)  # one image per row
            else:
                raise ValueError(
                    f"cannot tell which of the {len(grid)} {grid_key} rows belong to which of the {self.rows} samples: "
                    "pass mm_token_type_ids (the processor returns it) alongside the pixels."
                )
            unit_cum = [0] + per_row.cumsum(0).tolist()
            grid_cum = [0] + units.cumsum(0).tolist()
            patch_cum = [0] + grid.prod(1).cumsum(0).tolist()
            at = {u: j for j, u in enumerate(grid_cum)}
            if unit_cum[-1] != grid_cum[-1] or any(u not in at for u in unit_cum):
                raise ValueError(
                    f"mm_token_type_ids count {unit_cum[-1]} vision runs but {grid_key} describes {grid_cum[-1]}."
                )
            if patch_cum[-1] != m[pix_key].shape[0]:
                raise ValueError(
                    f"{pix_key} has {m[pix_key].shape[0]} patches but {grid_key} describes {patch_cum[-1]}."
                )
            self._offsets[(id(m), grid_key)] = [at[u] for u in unit_cum]
            self._offsets[(id(m), pix_key)] = [patch_cum[at[u]] for u in unit_cum]

    def _slice_mapping(self, m: Mapping, s: int, e: int) -> dict:
        out = {}
        for key, value in m.items():
            off = self._offsets.get((id(m), key))
            if off is not None:
                if off[s] == off[e]:
                    continue  # no image in these rows: drop the vision keys (models reject empty grids)
                out[key] = value[off[s] : off[e]]
            elif key == "position_ids" and isinstance(value, torch.Tensor) and value.ndim == 3:
                out[key] = value[:, s:e]
            else:
                out[key] = self._slice(value, s, e)
        return out
