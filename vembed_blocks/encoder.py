"""Use a trained model: load an exported model folder and embed texts, images or mixed items.

    enc = load_encoder("runs/clip/final")                     # family detected from the folder's files
    q = enc.encode_text(["a red circle on the left"])         # [1, D], L2-normalised, CPU float32
    d = enc.encode_image(["img/0.png", pil_image], is_query=False)
    scores = enc.similarity(q, d)                             # [1, 2] cosine

The embeddings are the ones the training loop's evaluation computes for the same items (same
collator, same forward, same normalisation), read from the folder alone (its sidecar files); the
per-family half lives in `encoder_families`.
Multi-vector folders (ColBERT / ColQwen) return ``(tokens[B, L, D], mask[B, L])``: token vectors
padded with zeros to the longest item of the call, ``mask`` True on real tokens, and
`Encoder.similarity` scores them by MaxSim.

Imports: torch, numpy, `vembed_blocks.encoder_families` and `vembed_blocks.data.records`; Pillow,
transformers and the family's blocks only when a folder is loaded or images are encoded.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.records import Item
from .encoder_families import Backend, detect_family, load_backend

__all__ = ["Encoder", "load_encoder", "detect_family"]

log = logging.getLogger(__name__)

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_OUTPUTS = ("torch", "numpy")
# MaxSim scoring holds [n_a, block, La, Lb] similarities at once; this bounds them (elements).
_MAXSIM_ELEMENTS = 2**24


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"load_encoder: dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_encoder(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
    normalize: bool = True,
    output: str = "torch",
    family: str | None = None,
    flag: str = "--model",
    **overrides: Any,
) -> "Encoder":
    """An `Encoder` for the exported folder ``path``.

    ``device``: default CUDA if available, else CPU. ``dtype``: the weights' dtype (``"bf16"``,
    ``"fp16"``, ``"fp32"`` or a ``torch.dtype``; default as saved in float32); half precision is for
    GPUs. ``normalize``: L2-normalise every vector (what retrieval evaluation does; ColBERT:
    every token vector). ``output``: ``"torch"`` (CPU float32 tensors) or ``"numpy"``. ``family``:
    skip detection (``"dual"``, ``"text"``, ``"vlm"``, ``"colbert"``). ``overrides``: collation
    settings the folder's sidecar files would otherwise give: ``query_instruction``,
    ``doc_instruction`` (text: prefixes), ``max_length``, ``max_image_side``. ``flag``: the command-line
    flag ``path`` came from: a folder that is not an export (a vision backbone alone, a run folder, whose
    export is final/, ...) is a one-line `UserError` naming it, raised before anything loads.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = load_backend(path, torch.device(device), _resolve_dtype(dtype), family, flag, **overrides)
    log.info("load_encoder: %s is a %s folder (%s)", os.fspath(path), backend.family, backend.settings)
    return Encoder(backend, batch_size, normalize, output)


class Encoder:
    """Embeds items the way the exported model was evaluated in training. Build it with `load_encoder`.

    Every ``encode*`` method takes ``is_query`` (default True): queries get the folder's query
    instruction / prefix, documents (``is_query=False``) the document one; families without
    instructions (CLIP, SigLIP, composed towers) ignore it. Outputs are on the CPU in float32,
    row ``i`` for input ``i``: ``[N, D]``, or ``(tokens[N, L, D], mask[N, L])`` when
    ``multi_vector``; numpy arrays with ``output="numpy"``. Progress is logged (logger
    ``vembed_blocks.embed``) every ``log_every_s`` seconds of a long call.
    """

    def __init__(self, backend: Backend, batch_size: int = 32, normalize: bool = True, output: str = "torch") -> None:
        if batch_size <= 0:
            raise ValueError(f"Encoder: batch_size must be positive, got {batch_size}")
        _check_output(output)
        self.backend, self.batch_size, self.normalize, self.output = backend, batch_size, normalize, output
        self.log_every_s = 10.0

    @property
    def family(self) -> str:
        return self.backend.family

    @property
    def multi_vector(self) -> bool:
        return self.backend.multi_vector

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    def encode_text(self, texts: str | Sequence[str], is_query: bool = True, output: str | None = None):
        """Embeddings of ``texts`` (a list; one string is a batch of one)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_text: texts[{i}] is a {type(t).__name__}, not a str")
        return self.encode([Item(text=t) for t in texts], is_query, output)

    def encode_image(self, images: Any, is_query: bool = True, output: str | None = None):
        """Embeddings of ``images``: a list of paths and/or ``PIL.Image``s (one of either is a batch of one)."""
        single = isinstance(images, (str, os.PathLike)) or _is_pil(images)
        return self.encode([{"images": [im]} for im in ([images] if single else images)], is_query, output)

    def encode(self, items: Sequence[Any], is_query: bool = True, output: str | None = None):
        """Embeddings of mixed ``items``, each an `Item`, a str (text), a ``PIL.Image``, or a dict with
        ``"text"`` and/or ``"image"`` / ``"images"`` (paths or ``PIL.Image``s).

        Items are embedded in groups of the same shape (text only, one image, text + image, ...),
        as the collators take them, and returned in input order.
        """
        output = output or self.output
        _check_output(output)
        with tempfile.TemporaryDirectory(prefix="vembed_encode_") as tmp:
            items = [_to_item(x, i, tmp) for i, x in enumerate(items)]
            if not items:
                raise ValueError("encode: no items")
            self._check_abilities(items)
            out = self._encode_groups(items, is_query)
        return _convert(out, output)

    def similarity(self, a: Any, b: Any):
        """Scores ``[Na, Nb]`` of every ``a`` against every ``b`` (torch or numpy, as ``a``).

        Single vectors: cosine. Multi-vector ``(tokens, mask)`` pairs: MaxSim over unit token
        vectors (each real token of ``a`` takes its best cosine among ``b``'s real tokens; averaged
        over ``a``'s real tokens), as ColBERT ranks a corpus.
        """
        from .colbert import maxsim

        as_numpy = isinstance(a[0] if isinstance(a, tuple) else a, np.ndarray)
        if self.multi_vector:
            (qa, ma), (qb, mb) = (_pair(x, name) for x, name in ((a, "a"), (b, "b")))
            qa, qb = F.normalize(qa, dim=-1), F.normalize(qb, dim=-1)
            block = max(1, _MAXSIM_ELEMENTS // max(1, len(qa) * qa.shape[1] * qb.shape[1]))
            scores = torch.cat(
                [maxsim(qa, ma, qb[i : i + block], mb[i : i + block]) for i in range(0, len(qb), block)], 1
            )
        else:
            va, vb = _vectors(a, "a"), _vectors(b, "b")
            scores = F.normalize(va, dim=-1) @ F.normalize(vb, dim=-1).T
        return scores.numpy() if as_numpy else scores

    def _check_abilities(self, items: list[Item]) -> None:
        b = self.backend
        if not b.has_image and any(it.images for it in items):
            raise ValueError(f"encode: this {b.family} encoder has no image tower; it embeds text only")
        if not b.has_text and any(it.text is not None for it in items):
            raise ValueError(f"encode: this {b.family} encoder has no text tower; it embeds images only")

    @torch.no_grad()
    def _encode_groups(self, items: list[Item], is_query: bool):
        """Embed each group of same-shaped items; scatter the rows back into input order."""
        from .embed import embed_items

        groups: dict[tuple[bool, int], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it.text is not None, len(it.images)), []).append(i)
        results = []
        for (has_text, n_images), rows in groups.items():
            desc = "encode " + " + ".join(["text"] * has_text + [f"{n_images} image(s)"] * bool(n_images))
            out = embed_items(
                [items[i] for i in rows], self._embed_batch(is_query), self.batch_size, desc, self.log_every_s
            )
            results.append((rows, out if isinstance(out, tuple) else (out,)))
        return _scatter(results, len(items))

    def _embed_batch(self, is_query: bool) -> Callable[[list[Item]], Any]:
        """One batch -> ``[b, D]`` or ``(tokens[b, L, D], mask[b, L])``, float32, normalised if asked."""

        def run(batch: list[Item]) -> Any:
            out = self.backend.embed(batch, is_query)
            if self.multi_vector:
                tokens, mask = out
                tokens = tokens.float()
                return (F.normalize(tokens, dim=-1) if self.normalize else tokens), mask
            out = out.float()
            return F.normalize(out, dim=-1) if self.normalize else out

        return run


def _check_output(output: str) -> None:
    if output not in _OUTPUTS:
        raise ValueError(f"Encoder: output must be one of {_OUTPUTS}, got {output!r}")


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pillow is a runtime dependency; without it nothing is a PIL image
        return False
    return isinstance(x, Image.Image)


def _image_path(image: Any, where: str, tmp: str) -> str:
    """A path the collators can load: paths as given; a ``PIL.Image`` written losslessly (PNG) to ``tmp``.

    Why a file: the collators read images from paths (`data.images.load_image`: EXIF, RGB conversion,
    size cap); a lossless copy goes through exactly that code.
    """
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if _is_pil(image):
        path = os.path.join(tmp, f"{where}.png".replace("[", "_").replace("]", "_").replace(" ", "_"))
        image.save(path, format="PNG")
        return path
    raise TypeError(f"encode: {where} is a {type(image).__name__}; images are paths or PIL.Image objects")


def _to_item(x: Any, i: int, tmp: str) -> Item:
    """``items[i]`` as an `Item` (see `Encoder.encode` for what is accepted)."""
    if isinstance(x, Item):
        return Item(x.text, tuple(_image_path(im, f"items[{i}].images[{j}]", tmp) for j, im in enumerate(x.images)))
    if isinstance(x, str):
        return Item(text=x)
    if _is_pil(x):
        return Item(images=(_image_path(x, f"items[{i}]", tmp),))
    if isinstance(x, dict):
        unknown = set(x) - {"text", "image", "images"}
        if unknown or ("image" in x and "images" in x):
            raise ValueError(f"encode: items[{i}] has keys {sorted(x)}; use 'text' and 'image' or 'images'")
        images = x.get("images", [x["image"]] if "image" in x else [])
        images = [images] if isinstance(images, (str, os.PathLike)) or _is_pil(images) else list(images)
        text = x.get("text")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"encode: items[{i}]['text'] is a {type(text).__name__}, not a str")
        if text is None and not images:
            raise ValueError(f"encode: items[{i}] has neither text nor images")
        return Item(text, tuple(_image_path(im, f"items[{i}] image {j}", tmp) for j, im in enumerate(images)))
    raise TypeError(f"encode: items[{i}] is a {type(x).__name__}; pass an Item, a str, a PIL.Image or a dict")


def _scatter(results: list[tuple[list[int], tuple[torch.Tensor, ...]]], n: int) -> Any:
    """Per-group outputs -> one output in input order; token axes (dim 1) padded to the longest group."""
    parts = []
    for k in range(len(results[0][1])):
        first = results[0][1][k]
        shape = list(first.shape[1:])
        if first.dim() >= 2:
            shape[0] = max(out[k].shape[1] for _, out in results)
        full = first.new_zeros(n, *shape)
        for rows, out in results:
            index = torch.tensor(rows)
            if first.dim() >= 2:  # tokens / mask: this group's length, padded (zeros, False) beyond it
                full[index, : out[k].shape[1]] = out[k]
            else:
                full[index] = out[k]
        parts.append(full)
    return tuple(parts) if len(parts) > 1 else parts[0]


def _convert(out: Any, output: str) -> Any:
    if output == "torch":
        return out
    return tuple(t.numpy() for t in out) if isinstance(out, tuple) else out.numpy()


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    raise TypeError(f"similarity: {name} is a {type(x).__name__}; pass what encode returned")


def _vectors(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"similarity: {name} must be [N, D] vectors, got shape {tuple(t.shape)}")
    return t.float()


def _pair(x: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(x, tuple) and len(x) == 2):
        raise TypeError(f"similarity: {name} must be the (tokens, mask) pair a multi-vector encode returns")
    tokens, mask = _as_tensor(x[0], f"{name} tokens").float(), _as_tensor(x[1], f"{name} mask").bool()
    if tokens.dim() != 3 or mask.shape != tokens.shape[:2]:
        raise ValueError(f"similarity: {name} must be tokens[N, L, D] + mask[N, L], got {tuple(tokens.shape)}")
    return tokens, mask
