"""Rectified-flow (flow-matching) training objective, as the Qwen-Image / SD3 fine-tuning scripts use it.

One training step on clean latents ``x0``::

    table = sigma_table(1000, shift=1.0)                      # sigmas[T], descending, like the scheduler's
    idx = sample_timestep_indices(B, 1000, "logit_normal")    # or uniform_timestep_indices(...) (--uniform-sampling)
    sigma = table[idx]                                        # [B]
    x_t = noisy_latents(x0, noise, sigma)                     # (1 - sigma) * x0 + sigma * noise
    pred = model(x_t, timestep=sigma, ...)                    # the transformer takes timestep / 1000 = sigma
    loss = flow_matching_loss(pred, flow_target(x0, noise), loss_weighting("none", sigma))

The sigma table is the one ``diffusers.FlowMatchEulerDiscreteScheduler`` builds at construction
(``timesteps = linspace(1, T, T)`` reversed, ``sigma = t / T``, shifted by ``shift`` unless the
scheduler shifts dynamically at inference), so a training timestep is ``sigma * T`` exactly as in
the pipelines. Latent packing (`pack_latents` / `unpack_latents`) is the Qwen-Image 2x2 patchify, and `edit_inputs`
lays a noisy target and its clean source images out as the Qwen-Image-Edit pipelines feed the transformer.
Only torch: diffusers is not needed to compute the objective.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "DENSITIES",
    "WEIGHTINGS",
    "sigma_table",
    "scheduler_sigma_table",
    "sample_timestep_indices",
    "uniform_timestep_indices",
    "training_timestep_indices",
    "noisy_latents",
    "flow_target",
    "loss_weighting",
    "flow_matching_loss",
    "pack_latents",
    "unpack_latents",
    "normalize_latents",
    "edit_inputs",
    "edit_flow_loss",
    "edit_row_loss",
]

DENSITIES = ("none", "logit_normal", "mode")  # how timesteps are drawn (others draw uniformly)
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap", "logit_normal", "mode")  # diffusers' --weighting_scheme names


def sigma_table(num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """``sigmas[T]`` (float32, descending from 1 to ``1/T``): ``s*u / (1 + (s-1)*u)`` of ``u = t/T``, ``t = T..1``.

    ``shift=1`` leaves them unshifted (what the scheduler keeps when ``use_dynamic_shifting``).
    """
    if num_train_timesteps < 1 or not shift > 0:
        raise ValueError(f"need num_train_timesteps >= 1 and shift > 0, got {num_train_timesteps}, {shift}")
    t = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0)
    u = t / num_train_timesteps
    return shift * u / (1 + (shift - 1) * u)


def scheduler_sigma_table(config: Mapping[str, Any], shift: float | None = None) -> torch.Tensor:
    """`sigma_table` of a ``FlowMatchEulerDiscreteScheduler`` config (its ``scheduler_config.json`` as a dict):
    ``num_train_timesteps`` entries, shifted by ``shift`` (default: the config's ``shift``, or 1 when the config
    shifts dynamically at inference, as Qwen-Image's does: the table the scheduler builds at construction)."""
    if shift is None:
        shift = 1.0 if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))
    return sigma_table(int(config.get("num_train_timesteps", 1000)), shift)


def sample_timestep_indices(
    batch: int,
    num_train_timesteps: int,
    density: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``LongTensor[batch]`` of indices into the sigma table, ``floor(u * T)`` with ``u`` in ``[0, 1)`` drawn from
    ``density``: ``"logit_normal"`` (``sigmoid(N(logit_mean, logit_std))``), ``"mode"`` (SD3's mode-centred
    density with ``mode_scale``) or uniform (``"none"`` and any pure weighting name such as ``"sigma_sqrt"``)."""
    if density == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    elif density == "mode":
        r = torch.rand(batch, generator=generator)
        u = 1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    elif density in WEIGHTINGS:
        u = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"unknown timestep density {density!r}; choose from {WEIGHTINGS}")
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def uniform_timestep_indices(
    batch: int, num_train_timesteps: int, rank: int = 0, world_size: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``LongTensor[batch]``: uniform indices, stratified over ranks so one global batch spans all noise levels.

    The ranks form ``g`` equal groups, ``g`` the largest divisor of ``world_size`` that also divides ``T``;
    group ``k`` draws uniformly from ``[k*T/g, (k+1)*T/g)``. One process (or ``g = 1``) draws from ``[0, T)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
    groups = max(g for g in range(1, world_size + 1) if world_size % g == 0 and num_train_timesteps % g == 0)
    width = num_train_timesteps // groups
    k = rank // (world_size // groups)
    return torch.randint(k * width, (k + 1) * width, (batch,), generator=generator)


def training_timestep_indices(
    batch: int,
    num_train_timesteps: int,
    uniform: bool = False,
    density: str = "none",
    rank: int = 0,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``LongTensor[batch]``, the switch of the Qwen-Image training scripts: ``uniform`` (``--uniform-sampling``)
    draws `uniform_timestep_indices` stratified over the ranks, else `sample_timestep_indices` from ``density``
    with its default parameters (logit-normal N(0, 1), mode scale 1.29)."""
    if uniform:
        return uniform_timestep_indices(batch, num_train_timesteps, rank, world_size, generator)
    return sample_timestep_indices(batch, num_train_timesteps, density, generator=generator)


def _per_row(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sigma[B]`` viewed as ``[B, 1, ...]`` to broadcast over ``like[B, ...]``."""
    if sigma.dim() != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be [B] with B = {like.shape[0]}, got {tuple(sigma.shape)}")
    return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t[B, ...] = (1 - sigma) * x0 + sigma * noise`` (sigma ``[B]``, 1 = pure noise)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _per_row(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model predicts: ``d x_t / d sigma = noise - x0``."""
    return noise - x0


def loss_weighting(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-row loss weight ``[B]``: ``sigma**-2`` (``"sigma_sqrt"``), ``2 / (pi * (1 - 2s + 2s^2))``
    (``"cosmap"``), else ones (``"none"`` and the density-only schemes)."""
    if scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float() ** 2))
    if scheme in WEIGHTINGS:
        return torch.ones_like(sigma, dtype=torch.float32)
    raise ValueError(f"unknown loss weighting {scheme!r}; choose from {WEIGHTINGS}")


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar ``mean(weight[b] * (pred - target)**2)`` over every element, in float32 (``weight`` ``[B]``)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()) ** 2
    if weight is not None:
        err = err * _per_row(weight.float(), err)
    return err.mean()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` or ``[B, C, 1, H, W]`` -> tokens ``[B, (H/2)*(W/2), C*4]`` (2x2 patches, Qwen-Image order)."""
    if latents.dim() == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"expected one frame, got latents of shape {tuple(latents.shape)}")
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: ``[B, (H/2)*(W/2), C*4]`` -> ``[B, C, 1, H, W]`` (``height``/``width`` in latents)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"{tuple(tokens.shape)} tokens do not pack a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, 1, height, width)


def normalize_latents(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """``(latents - mean) / std`` per channel (dim 1), the VAE config's ``latents_mean`` / ``latents_std``."""
    shape = (1, -1) + (1,) * (latents.dim() - 2)
    m = torch.as_tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
    s = torch.as_tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
    return (latents - m) / s


def edit_inputs(
    target: torch.Tensor, sources: list[torch.Tensor], noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]]]:
    """The transformer's image input for an edit: ``(hidden_states, img_shapes)``.

    ``target`` ``[B, C, 1, H, W]`` clean latents, ``noise`` ``[B, N, 4C]`` (``N = H/2 * W/2`` packed tokens),
    ``sigma`` ``[B]``, ``sources`` latents ``[B, C, 1, h_k, w_k]`` (any number, any sizes). ``hidden_states`` is
    ``[B, N + sum_k M_k, 4C]``: the noisy target tokens, then each source's clean tokens; ``img_shapes`` gives
    each part's ``(1, H/2, W/2)`` per row, the layout ``QwenImageEditPlusPipeline`` passes (no sources: text to
    image). The prediction of the target is the model output's first ``N`` tokens.
    """
    x0 = pack_latents(target)
    parts = [noisy_latents(x0, noise, sigma), *[pack_latents(z) for z in sources]]
    if any(p.shape[0] != x0.shape[0] or p.shape[2] != x0.shape[2] for p in parts[1:]):
        raise ValueError(
            f"source latents {[tuple(z.shape) for z in sources]} do not match target {tuple(target.shape)}"
        )
    shapes = [(1, z.shape[-2] // 2, z.shape[-1] // 2) for z in [target, *sources]]
    return torch.cat(parts, dim=1), [list(shapes) for _ in range(x0.shape[0])]


def edit_flow_loss(
    model: Callable[..., Any],
    target: torch.Tensor,
    sources: list[torch.Tensor],
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    weighting: str = "none",
) -> torch.Tensor:
    """Scalar flow-matching loss of a Qwen-Image(-Edit) transformer on one batch of same-sized edits.

    ``target`` ``[B, C, 1, H, W]`` and ``sources`` as in `edit_inputs`; ``prompt`` ``[B, L, D]`` embeddings with
    ``prompt_mask`` ``bool[B, L]`` (``None``: every token real, what the pipeline passes for one prompt);
    ``sigma`` ``[B]``; ``noise`` ``[B, N, 4C]``. ``model`` is called as the pipelines call the transformer
    (``timestep = sigma``); the loss compares its first ``N`` output tokens with ``noise - x0``,
    weighted per row by ``weighting`` (`loss_weighting`).
    """
    tokens, img_shapes = edit_inputs(target, sources, noise, sigma)
    pred = model(
        hidden_states=tokens,
        timestep=sigma,
        encoder_hidden_states=prompt,
        encoder_hidden_states_mask=prompt_mask,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    x0 = pack_latents(target)
    return flow_matching_loss(pred[:, : x0.shape[1]], flow_target(x0, noise), loss_weighting(weighting, sigma))


def edit_row_loss(
    model: Callable[..., Any],
    latents: list[torch.Tensor],
    prompt: torch.Tensor,
    sigma: torch.Tensor,
    weighting: str = "none",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`edit_flow_loss` of one edit row: ``latents`` = ``[target, *sources]`` (each ``[C, 1, h, w]``, the target
    noised, the sources clean), ``prompt`` ``[L, D]`` (every token real), ``sigma`` ``[1]``; ``prompt`` and
    ``sigma`` are moved to the latents' device. The noise ``[1, N, 4C]`` is drawn on the CPU (from ``generator``,
    else the global RNG), then moved there too, so a seeded generator gives the same noise on any device."""
    if not latents:
        raise ValueError("edit_row_loss: latents must hold at least the target's")
    if prompt.dim() != 2 or sigma.shape != (1,):
        raise ValueError(
            f"edit_row_loss: prompt must be [L, D] and sigma [1], got {tuple(prompt.shape)}, {tuple(sigma.shape)}"
        )
    target, sources = latents[0][None], [z[None] for z in latents[1:]]
    device = target.device
    noise = torch.randn(pack_latents(target).shape, generator=generator).to(device)
    return edit_flow_loss(model, target, sources, prompt[None].to(device), None, sigma.to(device), noise, weighting)
