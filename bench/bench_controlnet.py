"""Benchmark the ControlNet training step: our loop vs a minimal hand-written diffusers step.

Ours is ``train_stage`` with :class:`ControlNetStage` (accelerate, per-step seeded randomness,
LR schedule, clipping, history); the reference is the plain step of diffusers' ControlNet
example: sample latents, noise and timesteps, ControlNet forward on the mask, frozen UNet
forward with the residuals, MSE, backward, clip, AdamW step. Both run the same tiny base
(the ``cpu`` preset's sizes by default: 128 px, UNet (32, 64, 64), 16x16 latents), batch and
data; repetitions are interleaved and medians compared (target ratio <= 1.05). The first
step of every repetition is dropped (warm-up).

Writes ``bench/results/controlnet.json``. Timings on a shared CPU vary; the load average is recorded.

    python bench/bench_controlnet.py [--threads N] [--reps R] [--steps S] [--batch B]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from bench_diffusion import (  # bench/ is on sys.path when run as a script
    device_info,
    interleaved_comparison,
    load_avg,
)
from diffusers import ControlNetModel

from busynth.engine import StageConfig, train_stage
from busynth.generators.diffusion.components import build_tiny_components, freeze
from busynth.generators.diffusion.controlnet import conditioning_channels_for
from busynth.generators.diffusion.settings import SDLoraConfig
from busynth.generators.diffusion.train import ControlNetStage
from busynth.io import write_json

logger = logging.getLogger("bench_controlnet")
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def setup(cfg: SDLoraConfig, n: int, seed: int = 0):
    """Frozen tiny parts, a fresh ControlNet from the UNet, random moments, masks and prompt embeddings."""
    parts = build_tiny_components(cfg.tiny, cfg.image_size, [cfg.generic_prompt], seed)
    freeze(parts.unet, parts.vae, parts.text_encoder)
    controlnet = ControlNetModel.from_unet(parts.unet, conditioning_channels=3,
                                           conditioning_embedding_out_channels=conditioning_channels_for(
                                               cfg.tiny.vae_factor, pretrained=False))
    side, size = cfg.image_size // cfg.tiny.vae_factor, cfg.image_size
    g = torch.Generator().manual_seed(seed)
    moments = torch.cat([torch.randn(n, 4, side, side, generator=g), torch.full((n, 4, side, side), -8.0)], 1)
    masks = torch.rand(n, 1, size, size, generator=g) > 0.7
    emb = torch.randn(2, cfg.tiny.max_prompt_tokens, cfg.tiny.text_hidden_size, generator=g)
    data = {"moments": moments, "prompt": torch.zeros(n, dtype=torch.long), "mask": masks}
    return parts, controlnet, data, emb


def ours_step_seconds(cfg: SDLoraConfig, steps: int, batch: int) -> list[float]:
    """Per-step seconds of train_stage with ControlNetStage (history 'seconds', first step dropped)."""
    parts, controlnet, data, emb = setup(cfg, 4 * batch)
    stage = ControlNetStage(controlnet, parts.unet, parts.noise_scheduler, emb, 1, 1.0, 0.0, None)
    stage_cfg = StageConfig(steps=steps, batch_size=batch, lr=1e-4, prompt_dropout=0.0, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        history = train_stage(stage, data, stage_cfg, Path(tmp), seed=0)
    return [float(r["seconds"]) for r in history[1:]]


def reference_step_seconds(cfg: SDLoraConfig, steps: int, batch: int) -> list[float]:
    """Per-step seconds of a plain hand-written diffusers ControlNet step on the same model and data."""
    parts, controlnet, data, emb = setup(cfg, 4 * batch)
    unet, sched = parts.unet, parts.noise_scheduler
    controlnet.train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-4, weight_decay=1e-2)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        idx = torch.randperm(len(data["moments"]))[:batch]
        mean, logvar = data["moments"][idx].chunk(2, dim=1)
        latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        text = emb[data["prompt"][idx]]
        cond = data["mask"][idx].float().expand(-1, 3, -1, -1)
        down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.perf_counter() - start)
    return times[1:]


def loop_overhead(cfg: SDLoraConfig, reps: int, steps: int, batch: int) -> dict:
    """Our ControlNet step vs the hand-written one, interleaved; returns medians, the ratio and raw timings."""
    return {"batch_size": batch, "steps_per_rep": steps, "reps": reps, "image_size": cfg.image_size,
            "unet_channels": cfg.tiny.unet_channels,
            **interleaved_comparison(lambda: ours_step_seconds(cfg, steps, batch),
                                     lambda: reference_step_seconds(cfg, steps, batch), reps)}


def main() -> None:
    """Run the benchmark, print a line, write bench/results/controlnet.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="training steps per repetition")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SDLoraConfig()  # the cpu preset's tiny sizes
    result = {"device": device_info(), "load_before": load_avg()}
    result["training_step"] = loop_overhead(cfg, args.reps, args.steps, args.batch)
    result["load_after"] = load_avg()
    step = result["training_step"]
    print(f"controlnet training step (batch {step['batch_size']}, {cfg.image_size} px): ours "
          f"{step['ours_median_s'] * 1e3:.1f} ms, hand-written {step['reference_median_s'] * 1e3:.1f} ms, "
          f"ratio {step['ratio']:.3f} (target <= 1.05)")
    print(f"load average before/after: {result['load_before']} / {result['load_after']}")
    write_json(RESULTS / "controlnet.json", result)


if __name__ == "__main__":
    main()
