"""Benchmark: fraction of peak of the three training steps that cost the most (issue #17, part 3).

For the classifier step (cpu preset: 96 px, width 32, batch 32), the tiny UNet step of sd-lora
(cpu preset: UNet (32, 64, 64) on 16x16 latents, batch 8) and the ControlNet step (same base,
ControlNet trained, UNet frozen), it counts the floating-point operations of one forward and
backward pass with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and
convolutions, 2 FLOPs per multiply-add; elementwise work is not counted, so this is the useful
work), times the whole step as the package runs it (``engine.train_stage``: augmentation, loss,
backward, clipping, optimizer, moving average, history; median of the steps after the first two),
and divides.

Peak is given two ways: *nominal*, from this CPU's vector units (AVX-512: 2 x 16 fp32 FMA per cycle
per core, AVX2 + FMA: 2 x 8; x 2 FLOPs x clock x threads), and *attainable*, the GFLOP/s of a
large fp32 matrix product (torch.mm, 2048 x 2048) on the same threads, the best any step could do.

``--batch-scan`` also times the UNet step at larger batches: how much of the loss is per-step
overhead (a fixed cost that a larger batch amortises) rather than slow kernels. ``--ab`` times the
UNet and ControlNet steps with candidate fixes against the step as it is, interleaved
(``bench_diffusion.interleaved_comparison``): attention on torch's math SDPA kernel instead of the
CPU flash kernel, and the networks in channels-last memory layout.

Writes bench/results/flops.json.

    python bench/bench_flops.py [--threads 2] [--steps 12] [--batch-scan 8,16,32]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_controlnet import setup as controlnet_setup  # sets HF_HUB_OFFLINE
from bench_diffusion import device_info, interleaved_comparison, load_avg, tiny_setup

from busynth.classify.train import fit_classifier
from busynth.config import ClassifierConfig
from busynth.engine import StageConfig, train_stage
from busynth.generators.diffusion.settings import SDLoraConfig
from busynth.generators.diffusion.train import ControlNetStage, NoisePredictionStage
from busynth.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


# FlopCounterMode (torch 2.13) counts the CUDA attention kernels but not the CPU ones, so the tiny
# UNet's attention would count as free; these give the CPU kernels torch's own SDPA formulas.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def nominal_peak_gflops(threads: int) -> dict:
    """fp32 GFLOP/s of ``threads`` cores from /proc/cpuinfo: vector width, 2 FMA units, clock."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.MULTILINE).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE).group(1))
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    per_cycle = 2 * lanes * 2  # 2 FMA units x lanes x (multiply + add)
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE).group(1)
    return {"cpu": model, "isa": "avx512" if lanes == 16 else "avx2+fma" if lanes == 8 else "sse",
            "ghz": mhz / 1000, "flops_per_cycle_per_core": per_cycle, "threads": threads,
            "gflops": per_cycle * mhz / 1000 * threads}


def attainable_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def counted_flops(step) -> dict:
    """Total FLOPs of ``step`` and the part of each operator."""
    with FlopCounterMode(display=False) as counter:
        step()
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return {"flops": int(counter.get_total_flops()), "flops_by_op": by_op}


def engine_step_seconds(stage, data: dict, batch: int, steps: int) -> float:
    cfg = StageConfig(steps=steps, batch_size=batch, lr=1e-4, prompt_dropout=0.0, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        history = train_stage(stage, data, cfg, Path(tmp), seed=0)
    return statistics.median(float(r["seconds"]) for r in history[2:])


def stage_step(stage, trained: torch.nn.Module, data: dict, batch: int, steps: int) -> dict:
    """FLOPs of one forward + backward of a diffusion stage's loss on ``batch`` rows, and the engine's
    median step time on ``data``."""
    rows = {k: v[:batch] for k, v in data.items()}

    def one() -> None:
        loss, _ = stage.loss(rows, torch.Generator().manual_seed(0))
        loss.backward()

    flops = counted_flops(one)
    trained.zero_grad(set_to_none=True)
    return {"batch": batch, **flops, "seconds": engine_step_seconds(stage, data, batch, steps)}


def tiny_config(heads: int | None = None) -> SDLoraConfig:
    """The cpu preset's sd-lora settings (128 px), optionally with ``heads`` attention heads per block
    (diffusers' ``attention_head_dim`` of SD 1.x is the number of heads; the default is 2 of dimension 32)."""
    return SDLoraConfig(image_size=128, tiny={} if heads is None else {"attention_head_dim": heads})


def unet_step(batch: int, steps: int, channels_last: bool = False, heads: int | None = None) -> dict:
    cfg = tiny_config(heads)
    parts, data, emb = tiny_setup(cfg, 4 * batch)
    if channels_last:
        parts.unet.to(memory_format=torch.channels_last)
    stage = NoisePredictionStage("base", parts.unet, parts.unet, parts.noise_scheduler, emb, 1, 1.0, 0.0, None)
    return stage_step(stage, parts.unet, data, batch, steps)


def controlnet_step(batch: int, steps: int, channels_last: bool = False, heads: int | None = None) -> dict:
    cfg = tiny_config(heads)
    parts, controlnet, data, emb = controlnet_setup(cfg, 4 * batch)
    if channels_last:
        parts.unet.to(memory_format=torch.channels_last)
        controlnet.to(memory_format=torch.channels_last)
    stage = ControlNetStage(controlnet, parts.unet, parts.noise_scheduler, emb, 1, 1.0, 0.0, None)
    return stage_step(stage, controlnet, data, batch, steps)


def classifier_step(steps: int) -> dict:
    """The cpu preset's classifier (fp32: this CPU has no native bf16) on random 96-px images."""
    cfg = ClassifierConfig(image_size=96, width=32, batch_size=32, epochs=1, select="last", ema_epochs=0.5,
                           eval_every=1, checkpoint_every=1, channels_last=True, mixed_precision="no")
    rng = np.random.default_rng(0)
    n = cfg.batch_size * steps
    images = rng.integers(0, 256, (n, 96, 96), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    with tempfile.TemporaryDirectory() as tmp:
        fit = fit_classifier(images, labels, images[:32], labels[:32], cfg, 3, Path(tmp) / "c", seed=0)
        with (Path(tmp) / "c" / "history.csv").open() as fh:
            rows = list(csv.DictReader(fh))
    seconds = statistics.median(float(r["seconds"]) for r in rows[2:])
    model = fit.model.train()
    x = torch.rand(cfg.batch_size, 1, 96, 96).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels[:cfg.batch_size])

    def one() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()

    return {"batch": cfg.batch_size, **counted_flops(one), "seconds": seconds}


def ab(steps: int, reps: int, only: str = "") -> dict:
    """Each candidate fix against the step as it is, interleaved; ratio < 1 = faster."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timing(fn, batch, math=False, channels_last=False, heads=None):
        def run() -> list[float]:
            with sdpa_kernel(SDPBackend.MATH) if math else nullcontext():
                return [fn(batch, steps, channels_last, heads)["seconds"]]
        return run

    out = {}
    for name, fn, batch in (("tiny UNet", unet_step, 16), ("ControlNet", controlnet_step, 8)):
        for label, kw in (("math SDPA", {"math": True}), ("channels_last", {"channels_last": True}),
                          ("both", {"math": True, "channels_last": True}),
                          ("8 heads of dimension 8 (the default before)", {"heads": 8})):
            if only not in label:
                continue
            r = interleaved_comparison(timing(fn, batch, **kw), timing(fn, batch), reps)
            out[f"{name} (batch {batch}): {label}"] = r
            print(f"  {name} (batch {batch}), {label}: {r['ours_median_s'] * 1e3:.1f} ms vs "
                  f"{r['reference_median_s'] * 1e3:.1f} ms, ratio {r['ratio']:.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-scan", default="", help="UNet batch sizes to also time, e.g. 8,16,32")
    parser.add_argument("--ab", type=int, default=0, help="repetitions of the interleaved candidate fixes (0: none)")
    parser.add_argument("--ab-only", default="", help="only the candidates whose name contains this, e.g. heads")
    parser.add_argument("--skip-table", action="store_true", help="only the --ab comparisons")
    parser.add_argument("--out", type=Path, default=RESULTS / "flops.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ab:
        write_json(args.out.with_name("flops_ab.json"), {"device": device_info(), "load_avg": load_avg(),
                                                         "comparisons": ab(args.steps, args.ab, args.ab_only)})
    if args.skip_table:
        return
    nominal = nominal_peak_gflops(args.threads)
    attainable = attainable_gflops()
    steps = {"classifier (96 px, batch 32)": classifier_step(args.steps),
             "tiny UNet (16x16 latents, batch 8)": unet_step(8, args.steps),
             "ControlNet (16x16 latents, batch 8)": controlnet_step(8, args.steps)}
    for b in [int(b) for b in args.batch_scan.split(",") if b]:
        steps[f"tiny UNet, batch {b}"] = unet_step(b, args.steps)
    print(f"{device_info()}; load {load_avg()}")
    print(f"peak fp32: nominal {nominal['gflops']:.0f} GFLOP/s ({nominal['isa']}, {nominal['ghz']:.2f} GHz, "
          f"{args.threads} threads); attainable (2048^2 sgemm) {attainable:.0f} GFLOP/s\n")
    print(f"{'step':<38} {'GFLOP':>8} {'ms/step':>9} {'GFLOP/s':>8} {'% nominal':>10} {'% sgemm':>8}")
    for name, row in steps.items():
        row["gflops_per_s"] = row["flops"] / row["seconds"] / 1e9
        row["fraction_of_nominal"] = row["gflops_per_s"] / nominal["gflops"]
        row["fraction_of_attainable"] = row["gflops_per_s"] / attainable
        print(f"{name:<38} {row['flops'] / 1e9:>8.2f} {row['seconds'] * 1e3:>9.1f} {row['gflops_per_s']:>8.1f} "
              f"{100 * row['fraction_of_nominal']:>9.1f}% {100 * row['fraction_of_attainable']:>7.1f}%")
    write_json(args.out, {"device": device_info(), "load_avg": load_avg(), "nominal_peak": nominal,
                          "attainable_gflops": attainable, "steps": steps})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
