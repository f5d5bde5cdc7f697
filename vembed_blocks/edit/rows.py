"""Qwen-Image(-Edit) training rows: stored prompt embeddings plus the images they describe (seed 004, step 2).

Extracting prompt embeddings from a Qwen-Image-Edit folder writes one embedding store per task: per record
the pipeline's prompt embeddings (side ``prompt_embeds``, ``[L_i, D]``, no padding) and an index line naming
``source_images`` (absolute paths in "Picture N" order; ``[]`` in t2i mode) and ``target_images``
(``[target]``). This module turns such stores into what a diffusion fine-tune needs::

    tasks = load_edit_tasks("meta/", side=512, prompt_width=3584)     # {task name: EditRows}
    options = edit_sampler_options(tasks, "dataset_a=0.5,dataset_b=1", "0=1,1=1,2=1,3=0")
    row = tasks["dataset_a"][0]       # {"prompt": [L, D], "target": [3, H, W], "sources": [[3, h, w], ...], ...}
    latents = vae_latents(vae, [row["target"], *row["sources"]], mini_batch=1)   # [C, 1, H/8, W/8] each
    per_row = row_latents(vae, batch_of_rows, mini_batch=1)   # [[target, *sources] latents] per row

Imports: torch and numpy; Pillow only inside `image_tensor` (through `vembed_blocks.data.images`), the
sampler's flag parsers only inside `edit_sampler_options`. The VAE is whatever module is passed in.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import nullcontext
from typing import Any, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..data.embed_store import EmbedStore
from ..data.images import load_image
from .flow_matching import normalize_latents

__all__ = [
    "PROMPT_SIDE",
    "image_tensor",
    "EditRows",
    "load_edit_tasks",
    "edit_sampler_options",
    "vae_latents",
    "row_latents",
    "rank_share",
]

PROMPT_SIDE = "prompt_embeds"  # the side an extraction from a Qwen-Image(-Edit) folder writes
SIDE_MULTIPLE = 16  # 8x VAE downsampling, then 2x2 latent patches
_INDEX = re.compile(r"index-\d{5}\.jsonl")


def image_tensor(path: str, side: int, source: str | None = None) -> torch.Tensor:
    """``[3, H, W]`` float32 in [-1, 1]: the image resized (Lanczos, aspect kept) to about ``side**2`` pixels,
    each side rounded to a multiple of 16 (at least 16). ``source`` names the record in errors."""
    from PIL import Image

    img = load_image(path, source=source)
    scale = math.sqrt(side * side / (img.width * img.height))
    w, h = (max(SIDE_MULTIPLE, round(n * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE) for n in img.size)
    pixels = np.asarray(img.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


class EditRows(Sequence[dict]):
    """One task: the records of an embedding store written from a Qwen-Image(-Edit) folder.

    ``rows[i]`` = ``{"id", "task", "group", "prompt": [L, D], "target": [3, H, W], "sources": [[3, h, w], ...]}``:
    ``prompt`` is side ``prompt_side`` of record ``i``; the images are its index line's ``target_images`` (exactly
    one: the inverse record of a row with several source images has several, and raises) and ``source_images``,
    loaded by `image_tensor` at ``side`` (paths relative to the store are allowed).
    ``group`` and ``groups`` (``int16[N]``) are the records' ``num_source_images`` (``-1``: not recorded).
    """

    def __init__(self, root: str, side: int, prompt_side: str = PROMPT_SIDE) -> None:
        self.store, self.root, self.side, self.prompt_side = EmbedStore(root), root, side, prompt_side
        self.name, self.groups = os.path.basename(os.path.normpath(root)), self.store.groups
        kind = self.store.meta.get("kind")
        if kind not in (None, "qwen_image"):
            raise ValueError(f"{root}/meta.json: kind {kind!r}; extract the store from a Qwen-Image(-Edit) folder")
        if prompt_side not in self.store.sides:
            raise ValueError(f"{root}: no side {prompt_side!r} (the store has {list(self.store.sides)})")
        self._check_one_target_each()

    def _check_one_target_each(self) -> None:
        """Fail before step 1, not mid-run: every index line must name exactly one target image (the inverse record
        of a row with several source images names them all). One pass over the index files, no image read."""
        bad = []
        for name in sorted(f for f in os.listdir(self.root) if f.startswith("index-") and f.endswith(".jsonl")):
            with open(os.path.join(self.root, name)) as f:
                for line_no, line in enumerate(f, 1):
                    targets = json.loads(line).get("target_images") if line.strip() else [None]
                    if not isinstance(targets, list) or len(targets) != 1:
                        bad.append(f"{name}:{line_no}")
        if bad:
            raise ValueError(
                f"{self.root}: {len(bad)} record(s) do not name exactly one target image ({', '.join(bad[:3])}...): "
                "an inverse record of a row with several source images has no one image to generate; "
                "extract with --disable-inverse"
            )

    def __len__(self) -> int:
        return len(self.store)

    def _path(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        info = self.store.info(i)
        where = f"{self.root}: record {info.get('id', i)}"
        targets, sources = info.get("target_images"), info.get("source_images")
        if not isinstance(targets, list) or not isinstance(sources, list):
            raise ValueError(f"{where}: the index line needs target_images and source_images (lists of paths)")
        if len(targets) != 1:  # the inverse record of a row with several source images: no one image to generate
            raise ValueError(f"{where}: {len(targets)} target images, expected 1 (extract with --disable-inverse)")
        prompt = self.store[i][self.prompt_side]
        if prompt.dim() != 2:
            raise ValueError(f"{where}: side {self.prompt_side!r} is {tuple(prompt.shape)}, expected [L, D]")
        return {
            "id": info.get("id", str(i)),
            "task": self.name,
            "group": int(self.groups[i]),
            "prompt": prompt,
            "target": image_tensor(self._path(targets[0]), self.side, where),
            "sources": [image_tensor(self._path(p), self.side, where) for p in sources],
        }


def load_edit_tasks(
    root: str, side: int, prompt_side: str = PROMPT_SIDE, prompt_width: int | None = None
) -> dict[str, EditRows]:
    """``{name: EditRows}``: every subdirectory of ``root`` holding an embedding store is one task (the seed's
    ``--train_data_meta_dir``). ``prompt_width``: the embedding width the model takes (checked on each task's
    first record, so a store from another text encoder fails here, not in the middle of a forward)."""
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: expected a directory of task subdirectories (embedding stores)")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    stores = [d for d in names if any(_INDEX.fullmatch(f) for f in os.listdir(os.path.join(root, d)))]
    if not stores:
        raise ValueError(f"{root}: no task subdirectory holds an embedding store (index-*.jsonl)")
    tasks = {d: EditRows(os.path.join(root, d), side, prompt_side) for d in stores}
    for name, rows in tasks.items():
        width = rows.store[0][prompt_side].shape[-1] if len(rows) else None
        if prompt_width is not None and width not in (None, prompt_width):
            raise ValueError(f"{rows.root}: prompt embeddings of width {width}, the model takes {prompt_width}")
    return tasks


def edit_sampler_options(
    tasks: Mapping[str, EditRows], data_weights: str | None = None, src_img_num_weights: str | None = None
) -> dict[str, Any]:
    """`WeightedTaskSampler` keyword options from the seed's two flag strings: ``weights`` per task
    (``"dataset_a=0.5,dataset_b=1.2"``; ``None``: by size) and, with ``src_img_num_weights``
    (``"0=1,1=1,2=1,3=0"``), the number of source images as a weighted group of every task that records it."""
    from ..data.sampler import parse_group_weights, parse_weights

    options: dict[str, Any] = {"weights": parse_weights(data_weights, "--train-data-weights") if data_weights else None}
    if src_img_num_weights:
        options["group_weights"] = parse_group_weights(src_img_num_weights)
        options["group_of"] = {n: t.groups.tolist() for n, t in tasks.items() if len(t) and t.groups.min() >= 0}
        if not options["group_of"]:
            raise ValueError("--train-src-img-num-weights: no task records its number of source images")
    return options


@torch.no_grad()
def vae_latents(
    vae: torch.nn.Module,
    images: Sequence[torch.Tensor],
    mini_batch: int = 1,
    autocast: ContextManager | None = None,
) -> list[torch.Tensor]:
    """Normalised latents ``[C, 1, H/8, W/8]`` (float32) of ``images`` (each ``[3, H, W]`` in [-1, 1]), as the
    Qwen-Image-Edit pipelines encode a source image: the mode of ``vae.encode``, then ``(z - latents_mean) /
    latents_std`` from the VAE config. Runs of consecutive equal-sized images go through one encode call, at most
    ``mini_batch`` at a time (the seed's ``--vae_mini_batch``); ``autocast`` wraps each call."""
    if mini_batch < 1:
        raise ValueError(f"mini_batch must be >= 1, got {mini_batch}")
    device = next(vae.parameters()).device
    runs: list[list[int]] = []
    for i, im in enumerate(images):
        if runs and len(runs[-1]) < mini_batch and images[runs[-1][0]].shape == im.shape:
            runs[-1].append(i)
        else:
            runs.append([i])
    out: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for run in runs:
        x = torch.stack([images[i] for i in run]).unsqueeze(2).to(device)  # [b, 3, 1, H, W]
        with autocast or nullcontext():
            z = vae.encode(x).latent_dist.mode().float()
        for i, zi in zip(run, normalize_latents(z, vae.config.latents_mean, vae.config.latents_std)):
            out[i] = zi
    return out


def row_latents(
    vae: torch.nn.Module, rows: Sequence[Mapping[str, Any]], mini_batch: int = 1, autocast: ContextManager | None = None
) -> list[list[torch.Tensor]]:
    """Per row ``[target, *sources]`` latents (each ``[C, 1, H/8, W/8]``): `vae_latents` of every row's images in
    one pass (target first, then its sources, row after row), split back per row."""
    images = [im for row in rows for im in [row["target"], *row["sources"]]]
    latents, out = vae_latents(vae, images, mini_batch, autocast), []
    for row in rows:
        m = 1 + len(row["sources"])
        out.append(latents[:m])
        latents = latents[m:]
    return out


def rank_share(tasks: Mapping[str, EditRows], rank: int, world: int) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """This rank's share of every record of ``tasks`` (sorted by task name, then record), as ``(position, row,
    counted)``: positions ``rank, rank + world, ...`` up to the record count rounded up to a multiple of ``world``,
    so every rank yields as many rows (FSDP2 forwards are collectives); positions past the end wrap around and
    are not ``counted``."""
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got {rank}, {world}")
    items = [(name, i) for name in sorted(tasks) for i in range(len(tasks[name]))]
    if not items:
        raise ValueError("rank_share: the tasks hold no records")
    for k in range(rank, -(-len(items) // world) * world, world):
        name, i = items[k % len(items)]
        yield k, tasks[name][i], k < len(items)
