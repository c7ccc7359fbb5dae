"""Benchmark sd-lora (tiny preset): loop overhead, sampling speed, and a whole fit on one BUSI fold.

1. Our training step (``train_stage`` + ``NoisePredictionStage``) against a minimal hand-written
   diffusers step (sample latents, noise, add_noise, UNet, MSE, backward, AdamW step) on the same
   tiny UNet, batch and data; repetitions interleaved, medians compared (target ratio <= 1.05).
2. Sampling img/s (DPM-Solver++, the config's steps and guidance) on the tiny pipeline.
3. ``--fit``: the whole sd-lora fit on 2/3 of BUSI (a stand-in for a fold's training part; the
   phantom when BUSI is absent), seconds per stage, sampling of as many images per class as
   the training part has, and a grid ``bench/results/sd_lora_grid.png`` (real rows, then samples).

Writes ``bench/results/diffusion.json``. Note the machine's load: timings on a shared CPU vary.

    python bench/bench_diffusion.py [--fit] [--threads N] [--reps R] [--set base_training.steps=800]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw

from busynth.config import DEFAULT_CLASSES, PhantomConfig
from busynth.data.records import Record, class_counts
from busynth.data.transforms import resize_image
from busynth.engine import StageConfig, train_stage
from busynth.generators.diffusion.components import build_tiny_components
from busynth.generators.diffusion.sample import sample_gray, with_dpm_solver
from busynth.generators.diffusion.sd_lora import SDLoraGenerator
from busynth.generators.diffusion.settings import SDLoraConfig
from busynth.generators.diffusion.train import NoisePredictionStage
from busynth.io import write_json, write_png
from busynth.presets import parse_override

logger = logging.getLogger("bench_diffusion")
REPO = Path(__file__).resolve().parents[1]
BUSI = REPO.parent / "shared" / "data" / "Dataset_BUSI_with_GT"
RESULTS = REPO / "bench" / "results"


def load_avg() -> list[float]:
    """The 1/5/15-minute load averages, rounded: every benchmark records them before and after."""
    return [round(x, 2) for x in os.getloadavg()]


def device_info() -> str:
    """Machine, torch threads and cores, as every benchmark's JSON records them."""
    return f"{platform.machine()}, torch threads={torch.get_num_threads()}, cores={os.cpu_count()}"


def tiny_setup(cfg: SDLoraConfig, n: int, seed: int = 0):
    """Fresh tiny components plus random cached moments and prompt embeddings for ``n`` images."""
    parts = build_tiny_components(cfg.tiny, cfg.image_size, [cfg.generic_prompt], seed)
    side = cfg.image_size // cfg.tiny.vae_factor
    g = torch.Generator().manual_seed(seed)
    moments = torch.cat([torch.randn(n, 4, side, side, generator=g), torch.full((n, 4, side, side), -8.0)], 1)
    emb = torch.randn(2, cfg.tiny.max_prompt_tokens, cfg.tiny.text_hidden_size, generator=g)
    return parts, {"moments": moments, "prompt": torch.zeros(n, dtype=torch.long)}, emb


def ours_step_seconds(cfg: SDLoraConfig, steps: int, batch: int) -> list[float]:
    """Per-step seconds of train_stage on the base stage (history 'seconds', first step dropped)."""
    parts, data, emb = tiny_setup(cfg, 4 * batch)
    stage = NoisePredictionStage("base", parts.unet, parts.unet, parts.noise_scheduler, emb, 1, 1.0, 0.0, None)
    stage_cfg = StageConfig(steps=steps, batch_size=batch, lr=1e-4, prompt_dropout=0.0, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        history = train_stage(stage, data, stage_cfg, Path(tmp), seed=0)
    return [float(r["seconds"]) for r in history[1:]]


def reference_step_seconds(cfg: SDLoraConfig, steps: int, batch: int) -> list[float]:
    """Per-step seconds of a plain hand-written diffusers training step on the same model and data."""
    parts, data, emb = tiny_setup(cfg, 4 * batch)
    unet, sched = parts.unet.train(), parts.noise_scheduler
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        idx = torch.randperm(len(data["moments"]))[:batch]
        mean, logvar = data["moments"][idx].chunk(2, dim=1)
        latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb[data["prompt"][idx]]).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - start)
    return times[1:]


def interleaved_comparison(ours: Callable[[], list[float]], reference: Callable[[], list[float]],
                           reps: int) -> dict:
    """Alternate ``reps`` repetitions of two step-timing functions (so machine load hits both alike);
    returns both medians, their ratio (ours / reference) and the raw step times."""
    ours_s: list[float] = []
    ref_s: list[float] = []
    for rep in range(reps):
        ours_s += ours()
        ref_s += reference()
        logger.info("rep %d: ours %.4f s, reference %.4f s (medians so far)", rep, statistics.median(ours_s),
                    statistics.median(ref_s))
    return {"ours_median_s": statistics.median(ours_s), "reference_median_s": statistics.median(ref_s),
            "ratio": statistics.median(ours_s) / statistics.median(ref_s),
            "ours_s": [round(x, 4) for x in ours_s], "reference_s": [round(x, 4) for x in ref_s]}


def loop_overhead(cfg: SDLoraConfig, reps: int, steps: int, batch: int) -> dict:
    """Our training step vs the hand-written one, interleaved; returns medians, the ratio and raw timings."""
    return {"batch_size": batch, "steps_per_rep": steps, "reps": reps,
            **interleaved_comparison(lambda: ours_step_seconds(cfg, steps, batch),
                                     lambda: reference_step_seconds(cfg, steps, batch), reps)}


def sampling_speed(cfg: SDLoraConfig, n: int) -> float:
    """Images per second of sample_gray on a tiny pipeline with the config's steps and guidance."""
    pipe = with_dpm_solver(build_tiny_components(cfg.tiny, cfg.image_size, [cfg.generic_prompt]).pipeline())
    sample_gray(pipe, cfg.generic_prompt, 2, 0, 0, size=cfg.image_size, steps=2)  # warm-up
    start = time.perf_counter()
    sample_gray(pipe, cfg.generic_prompt, n, 0, 0, size=cfg.image_size, steps=cfg.sampling_steps,
                guidance_scale=cfg.guidance_scale, batch_size=cfg.sample_batch_size)
    return n / (time.perf_counter() - start)


def training_part() -> tuple[str, list[Record]]:
    """Two of every three images of each class of BUSI (or the phantom): one fold's training part."""
    if BUSI.is_dir():
        from busynth.data.busi import load_dataset

        records, source = load_dataset(BUSI).records, "busi"
    else:
        from busynth.data.phantom import make_phantom

        records, source = make_phantom(PhantomConfig(size=128)), "phantom"
    keep = []
    for label in DEFAULT_CLASSES:
        keep += [r for k, r in enumerate(x for x in records if x.label == label) if k % 3 != 2]
    return source, keep


def sample_grid(real: dict[str, list[np.ndarray]], fake: dict[str, list[np.ndarray]], size: int,
                cols: int = 8) -> np.ndarray:
    """uint8 grid: per class one row of real training images, then two rows of samples, labelled."""
    rows = []
    for label in real:
        for kind, images in (("real", real[label][:cols]), ("sample", fake[label][:cols]),
                             ("sample", fake[label][cols:2 * cols])):
            tiles = ([resize_image(im, size) for im in images]
                     + [np.zeros((size, size), np.uint8)] * (cols - len(images)))
            row = Image.fromarray(np.concatenate(tiles, axis=1))
            ImageDraw.Draw(row).text((2, 2), f"{label} {kind}", fill=255)
            rows.append(np.asarray(row))
    return np.concatenate(rows, axis=0)


def _stage_seconds(out: Path) -> dict[str, float]:
    totals = {}
    for history in sorted(out.glob("stages/*/history.csv")):
        with history.open() as fh:
            totals[history.parent.name] = round(sum(float(r["seconds"]) for r in csv.DictReader(fh)), 1)
    return totals


def fit_on_busi(cfg: SDLoraConfig, out_dir: Path | None, seed: int) -> dict:
    """Fit sd-lora on one fold's training part, sample per-class training counts, write the grid."""
    source, records = training_part()
    counts = class_counts(records, DEFAULT_CLASSES)
    out = out_dir or Path(tempfile.mkdtemp(prefix="bench-sdlora-"))
    gen = SDLoraGenerator(cfg, classes=list(DEFAULT_CLASSES))
    start = time.perf_counter()
    gen.fit(records, out, seed=seed)
    fit_s = time.perf_counter() - start
    stages = _stage_seconds(out)
    start = time.perf_counter()
    samples = {c: [s.image for s in gen.sample(c, n, seed=seed)] for c, n in counts.items()}
    sample_s = time.perf_counter() - start
    real = {c: [r.image for r in records if r.label == c][:8] for c in DEFAULT_CLASSES}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_png(RESULTS / "sd_lora_grid.png", sample_grid(real, samples, 128))
    pix = lambda ims: float(np.std(np.stack([resize_image(i, cfg.image_size) for i in ims])))
    return {"source": source, "n_train": len(records), "counts": counts, "out_dir": str(out),
            "fit_seconds": round(fit_s, 1), "stage_seconds": stages,
            "other_fit_seconds": round(fit_s - sum(stages.values()), 1),
            "sampling_seconds": round(sample_s, 1), "n_sampled": sum(counts.values()),
            "total_seconds": round(fit_s + sample_s, 1),
            "pixel_std_real": pix([r.image for r in records]),
            "pixel_std_samples": pix([s for group in samples.values() for s in group])}


def main() -> None:
    """Run the benchmarks, print a table, write bench/results/diffusion.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="also fit on one BUSI fold (minutes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="training steps per repetition")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="sd-lora config override")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    raw: dict = {}
    for text in args.set:
        key, value = parse_override(text)
        node = raw
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = value
    cfg = SDLoraConfig.model_validate(raw)
    result = {"device": device_info(), "load_before": load_avg(),
              "config": yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))}
    result["training_step"] = loop_overhead(cfg, args.reps, args.steps, args.batch)
    result["sampling_images_per_second"] = round(sampling_speed(cfg, 64), 2)
    if args.fit:
        result["fit"] = fit_on_busi(cfg, args.out_dir, args.seed)
    result["load_after"] = load_avg()
    step = result["training_step"]
    print(f"training step (batch {step['batch_size']}): ours {step['ours_median_s'] * 1e3:.1f} ms, "
          f"hand-written {step['reference_median_s'] * 1e3:.1f} ms, ratio {step['ratio']:.3f} (target <= 1.05)")
    print(f"sampling: {result['sampling_images_per_second']:.1f} img/s ({cfg.sampling_steps} DPM-Solver++ steps, "
          f"guidance {cfg.guidance_scale})")
    if "fit" in result:
        fit = result["fit"]
        print(f"fit on {fit['source']} ({fit['n_train']} images): {fit['fit_seconds']} s; "
              f"stages {fit['stage_seconds']}, "
              f"other {fit['other_fit_seconds']} s; sampling {fit['n_sampled']} images {fit['sampling_seconds']} s; "
              f"total {fit['total_seconds']} s (target <= 600)")
    print(f"load average before/after: {result['load_before']} / {result['load_after']}")
    write_json(RESULTS / "diffusion.json", result)


if __name__ == "__main__":
    main()
