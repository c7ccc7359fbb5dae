"""Sampling: a StableDiffusionPipeline with DPM-Solver++, classifier-free guidance, grayscale output.

DPM-Solver++ (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", 2022) in its second-order multistep form reaches good samples in
20-30 steps and is stable at guidance scales > 1 (classifier-free guidance, Ho & Salimans
2022). Each image gets its own generator seeded by (seed, image index), so the first k
images of a call with n >= k are the k images of a call with n = k, whatever the batch size.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from tqdm.auto import tqdm

from busynth.io import derived_seed

logger = logging.getLogger(__name__)


def with_dpm_solver(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """Swap the pipeline's scheduler for multistep DPM-Solver++ (order 2) on the same noise
    schedule; returns the pipeline, progress bars off."""
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rgb_to_gray_uint8(images: np.ndarray) -> np.ndarray:
    """Float images (N, H, W, C) in [0, 1] -> uint8 (N, H, W), the channel mean rounded and clipped."""
    gray = images.mean(axis=-1) if images.ndim == 4 else images
    return np.clip(np.round(gray * 255.0), 0, 255).astype(np.uint8)


@torch.no_grad()
def sample_gray(pipe: StableDiffusionPipeline, prompt: str, n: int, seed: int, stream: int, *, size: int,
                steps: int = 25, guidance_scale: float = 3.0, batch_size: int = 16,
                negative_prompt: str | None = None, progress: bool = False,
                autocast: torch.dtype | None = None) -> np.ndarray:
    """``n`` images for ``prompt`` from ``pipe`` at ``size`` px: uint8 grayscale (n, size, size).

    Deterministic for (seed, stream): image i starts from noise drawn by a generator seeded
    with ``derived_seed(seed, stream, i)``. ``autocast`` (e.g. ``torch.bfloat16``) runs the networks
    under ``torch.autocast`` in that dtype; the solver's state stays in the weights' dtype.
    """
    device = pipe.unet.device
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    out: list[np.ndarray] = []
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="sampling", leave=False, disable=None if progress else True):
        k = min(batch_size, n - start)
        generators = [torch.Generator(device="cpu").manual_seed(derived_seed(seed, stream, start + i))
                      for i in range(k)]
        # Draw the initial latents on the CPU so results do not depend on the device's RNG.
        shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, pipe.unet.dtype)
        with precision:
            result = pipe(
                [prompt] * k, negative_prompt=None if negative_prompt is None else [negative_prompt] * k,
                height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                latents=latents, output_type="np", return_dict=True,
            )
        out.append(rgb_to_gray_uint8(np.asarray(result.images, dtype=np.float32)))
    return np.concatenate(out) if out else np.zeros((0, size, size), np.uint8)


@torch.no_grad()
def sample_gray_with_masks(pipe: StableDiffusionControlNetPipeline, prompt: str, masks: np.ndarray, seed: int,
                           stream: int, *, steps: int = 20, guidance_scale: float = 3.0, batch_size: int = 16,
                           conditioning_scale: float = 1.0, progress: bool = False) -> np.ndarray:
    """One image per mask (bool (n, S, S)) for ``prompt``: uint8 grayscale (n, S, S). Image i starts from
    the noise of ``derived_seed(seed, stream, i)`` (as ``sample.sample_gray``), so only the mask differs
    between two calls with the same seed and different masks."""
    n, size = len(masks), masks.shape[-1] if len(masks) else 0
    device, dtype = pipe.unet.device, pipe.unet.dtype
    channels = pipe.controlnet.config.conditioning_channels
    out: list[np.ndarray] = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", leave=False, disable=not progress):
        k = min(batch_size, n - start)
        generators = [torch.Generator().manual_seed(derived_seed(seed, stream, start + i)) for i in range(k)]
        shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)
        cond = torch.from_numpy(masks[start:start + k].astype(np.float32))[:, None].expand(-1, channels, -1, -1)
        result = pipe([prompt] * k, image=cond.contiguous(), height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance_scale, controlnet_conditioning_scale=conditioning_scale,
                      latents=latents, output_type="np", return_dict=True)
        out.append(rgb_to_gray_uint8(np.asarray(result.images, dtype=np.float32)))
    return np.concatenate(out) if out else np.zeros((0, size, size), np.uint8)
