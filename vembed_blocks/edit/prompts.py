"""Qwen-Image(-Edit) prompt embeddings, exactly as the diffusers pipelines compute them (seed 004, step 1).

    pipe = load_prompt_pipeline("Qwen-Image-Edit-2509")          # text encoder + processor + tokenizer only
    embeds = prompt_embeds(pipe, ["turn the sky red"], [[source_image]])   # list of [L_i, D]

The pipeline object is diffusers' own class (``QwenImageEditPlusPipeline``, ``QwenImageEditPipeline``
or, for ``t2i=True``, ``QwenImagePipeline``) built from the folder's ``text_encoder/``,
``tokenizer/`` and ``processor/`` with the transformer, VAE and scheduler left out, and
`prompt_embeds` calls its ``encode_prompt``: its chat template, its ``"Picture N: "`` image
placeholders, its dropped template prefix (``prompt_template_encode_start_idx``) and its hidden
layer are the pipeline's, not a copy of them. Source images go through the same resize the
pipeline's ``__call__`` applies before ``encode_prompt`` (`condition_images`).

A record's embedding is ``[L_i, D]`` with no padding: a batch of them right-padded with zeros plus
the mask of real tokens (``vembed_blocks.data.embed_store.collate_embeddings``) is what
``encode_prompt`` returns for the same prompts batched (the pipeline's mask, as bool).
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Sequence

import torch

__all__ = [
    "SOURCE_IMAGES",
    "is_diffusers_folder",
    "pipeline_class_name",
    "load_prompt_pipeline",
    "check_source_count",
    "condition_images",
    "prompt_embeds",
]

MODEL_INDEX = "model_index.json"
T2I_PIPELINE = "QwenImagePipeline"
# How many source images each pipeline's encode_prompt takes per prompt: (fewest, most or None).
SOURCE_IMAGES = {"QwenImageEditPlusPipeline": (0, None), "QwenImageEditPipeline": (1, 1), T2I_PIPELINE: (0, 0)}
# The pixel area __call__ resizes a source image to before encode_prompt (Edit-Plus: its
# module's CONDITION_IMAGE_SIZE, 384 x 384; Edit: the output area, 1024 x 1024).
_CONDITION_AREA = {"QwenImageEditPlusPipeline": "CONDITION_IMAGE_SIZE", "QwenImageEditPipeline": 1024 * 1024}


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            'a Qwen-Image(-Edit) diffusers folder needs diffusers: pip install "vembed-blocks[edit]"'
        ) from e
    return diffusers


def is_diffusers_folder(path: str) -> bool:
    """True when ``path`` is a local diffusers pipeline folder (it has ``model_index.json``)."""
    return os.path.isfile(os.path.join(path, MODEL_INDEX))


def _model_index(folder: str) -> dict[str, Any]:
    """``<folder>/model_index.json``, checked: a Qwen-Image pipeline with a text encoder and a tokenizer."""
    path = os.path.join(folder, MODEL_INDEX)
    with open(path) as f:
        index = json.load(f)
    name = index.get("_class_name")
    if name not in SOURCE_IMAGES:
        known = ", ".join(SOURCE_IMAGES)
        raise ValueError(f"{path}: _class_name {name!r} is not a Qwen-Image pipeline (expected one of {known})")
    missing = [k for k in ("text_encoder", "tokenizer") if not isinstance(index.get(k), list) or None in index[k]]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} component (a [library, class] entry each)")
    return index


def pipeline_class_name(folder: str) -> str:
    """The pipeline class ``<folder>/model_index.json`` names; ValueError unless it is a Qwen-Image one."""
    return _model_index(folder)["_class_name"]


def _load_processor(folder: str) -> Any:
    """``processor/`` through transformers, or rebuilt without torchvision (see `vembed_blocks.vlm`)."""
    from ..vlm import load_vlm_processor

    return load_vlm_processor(os.path.join(folder, "processor"))


def load_prompt_pipeline(
    folder: str, t2i: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Any:
    """The folder's prompt-encoding pipeline with only its text side loaded.

    ``t2i=False``: the class ``model_index.json`` names (an edit pipeline). ``t2i=True``:
    ``QwenImagePipeline`` over the same text encoder and tokenizer (what text-to-image
    generation conditions on). The text encoder is loaded in ``dtype`` (what
    ``from_pretrained(..., torch_dtype=dtype)`` gives) on ``device``, in eval mode.
    """
    diffusers = _diffusers()
    import transformers

    index = _model_index(folder)
    name = index["_class_name"]
    if name == T2I_PIPELINE and not t2i:
        raise ValueError(f"{folder} is a text-to-image folder ({name}): it encodes no source images; use t2i mode")
    cls = getattr(diffusers, T2I_PIPELINE if t2i else name)
    encoder_cls = getattr(transformers, index["text_encoder"][1])
    tokenizer_cls = getattr(transformers, index["tokenizer"][1])
    parts: dict[str, Any] = {
        "text_encoder": encoder_cls.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype)
        .to(device)
        .eval(),
        "tokenizer": tokenizer_cls.from_pretrained(os.path.join(folder, "tokenizer")),
    }
    wanted = list(inspect.signature(cls.__init__).parameters)[1:]
    if "processor" in wanted:
        parts["processor"] = _load_processor(folder)
    # The denoiser, VAE and scheduler play no part in encode_prompt: the constructors accept None.
    return cls(**{k: parts.get(k) for k in wanted})


def check_source_count(pipe: Any, n: int) -> None:
    """ValueError unless ``pipe.encode_prompt`` takes ``n`` source images for one prompt."""
    name = type(pipe).__name__
    fewest, most = SOURCE_IMAGES[name]
    if n < fewest or (most is not None and n > most):
        takes = f"{fewest}" if fewest == most else f"{fewest} or more" if most is None else f"{fewest} to {most}"
        hint = " (text-to-image: use t2i mode)" if name == T2I_PIPELINE else ""
        raise ValueError(f"{name} takes {takes} source image(s) per prompt, got {n}{hint}")


def condition_images(pipe: Any, images: Sequence[Any]) -> list[Any]:
    """PIL images resized as the pipeline's ``__call__`` resizes them before ``encode_prompt``
    (Edit-Plus: each to ~384x384 pixels, aspect kept, sides multiples of 32; Edit: to ~1024x1024)."""
    check_source_count(pipe, len(images))
    name = type(pipe).__name__
    module = inspect.getmodule(type(pipe))
    area = _CONDITION_AREA.get(name)
    area = getattr(module, area) if isinstance(area, str) else area
    out = []
    for img in images:
        width, height = module.calculate_dimensions(area, img.width / img.height)[:2]
        out.append(pipe.image_processor.resize(img, height, width))
    return out


def _unpad(embeds: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """encode_prompt's ``[B, L, D]`` (+ ``[B, L]`` mask, None when all real) -> B tensors ``[L_b, D]``."""
    if mask is None:
        return list(embeds)
    return [e[m.bool()] for e, m in zip(embeds, mask)]


@torch.no_grad()
def prompt_embeds(
    pipe: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    device: torch.device | str | None = None,
    max_sequence_length: int = 512,
) -> list[torch.Tensor]:
    """One ``[L_i, D]`` tensor per prompt: ``pipe.encode_prompt`` of ``prompts[i]`` with source
    images ``images[i]`` (PIL, possibly none), after `condition_images`. ``max_sequence_length``
    is the pipelines' ``__call__`` default (only the text-to-image pipeline truncates to it).

    Prompts without images go through ``encode_prompt`` together (it pads them and returns
    the mask); a prompt with images goes alone, because the pipeline numbers the images of a
    call ("Picture 1", "Picture 2", ...) across the whole call, not per prompt.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    for imgs in images:
        check_source_count(pipe, len(imgs))
    device = device or pipe.text_encoder.device
    out: list[torch.Tensor | None] = [None] * len(prompts)
    text_only = [i for i, imgs in enumerate(images) if not imgs]
    if text_only:
        embeds, mask = pipe.encode_prompt(
            [prompts[i] for i in text_only], device=device, max_sequence_length=max_sequence_length
        )
        for i, e in zip(text_only, _unpad(embeds, mask)):
            out[i] = e
    for i, imgs in enumerate(images):
        if imgs:
            resized = condition_images(pipe, imgs)
            # Edit (single-image) pipelines take the image itself; Edit-Plus takes a list.
            image = resized if SOURCE_IMAGES[type(pipe).__name__][1] is None else resized[0]
            embeds, mask = pipe.encode_prompt(
                prompts[i], image=image, device=device, max_sequence_length=max_sequence_length
            )
            out[i] = _unpad(embeds, mask)[0]
    return out  # type: ignore[return-value]
