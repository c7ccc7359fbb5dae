"""Benchmark: CPU speed options, each measured side by side against its baseline (issue #8, part 5).

1. classifier training step (cpu preset model, 96 px, batch 32): fp32 vs channels_last, bf16
   autocast, and both;
2. tiny sd-lora UNet training step (cpu preset, batch 16, cached latents): fp32 vs channels_last,
   bf16 autocast;
3. sampling (DPM-Solver++, the preset's steps and guidance, tiny pipeline with random weights):
   fp32 vs bf16 autocast, channels_last;
4. UNet step on cached latents (what sd-lora does) vs encoding the images with the autoencoder
   in every step (what a naive loop does);
5. classifier batch preparation (uint8 -> float, ``augment_batch`` LIGHT) against the model step,
   and an epoch with the preparation in a DataLoader worker (num_workers=1) vs in the main process;
6. the options as wired in: the second epoch of ``fit_classifier`` with classifier.mixed_precision=bf16
   and/or classifier.channels_last=true vs fp32 in NCHW.

Every comparison alternates repetitions of the variant and of its baseline
(``bench_diffusion.interleaved_comparison``), so the load of a shared machine hits both alike;
the ratio is variant median / baseline median (below 1 = faster). Each variant also gets a
sanity check against fp32 from the same weights and inputs. Prints a table and writes
bench/results/speed.json.

    python bench/bench_speed.py [--threads 1] [--reps 10] [--artifact runs/.../generators/sd-lora/fold0_seed0]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import (  # sets HF_HUB_OFFLINE
    device_info,
    interleaved_comparison,
    load_avg,
    tiny_setup,
)

from busynth.classify.models import build_classifier
from busynth.classify.train import class_weight_vector, fit_classifier, param_groups
from busynth.config import ClassifierConfig
from busynth.data.augment import LIGHT, augment_batch
from busynth.engine import batch_indices
from busynth.generators.diffusion.components import build_tiny_components
from busynth.generators.diffusion.sample import sample_gray, with_dpm_solver
from busynth.generators.diffusion.settings import SDLoraConfig
from busynth.generators.diffusion.train import NoisePredictionStage
from busynth.io import write_json
from busynth.presets import load_config

RESULTS = Path(__file__).resolve().parent / "results" / "speed.json"
CL = torch.channels_last


def _precision(bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU (what accelerate's mixed_precision='bf16' does there), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _timed(step: Callable[[], float], k: int) -> list[float]:
    """Seconds of each of ``k`` calls of ``step`` (which returns a float, so work is finished)."""
    times = []
    for _ in range(k):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


# --- 1 and 5: classifier ----------------------------------------------------------------------------


class ClassifierStepper:
    """The classifier's training step as fit_classifier runs it: forward (under autocast when bf16),
    fp32 weighted cross-entropy, backward, AdamW; on fixed float batches, cycled."""

    def __init__(self, cfg: ClassifierConfig, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 channels_last: bool = False, bf16: bool = False) -> None:
        torch.manual_seed(0)
        self.model = build_classifier(cfg, 3).train()
        self.channels_last, self.bf16 = channels_last, bf16
        if channels_last:
            self.model.to(memory_format=CL)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        labels = torch.cat([y for _, y in batches]).numpy()
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weight_vector(labels, 3, cfg.class_weights))
        self.batches, self.i, self.losses = batches, 0, []

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of float images (N, 1, S, S), in this variant's layout and precision."""
        with _precision(self.bf16):
            return self.model(x.contiguous(memory_format=CL) if self.channels_last else x).float()

    def step(self) -> float:
        """One optimizer step on the next batch; returns the loss."""
        x, y = self.batches[self.i % len(self.batches)]
        torch.manual_seed(self.i)  # dropout: the same masks in every variant
        self.i += 1
        loss = self.loss_fn(self.logits(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))
        return self.losses[-1]


def classifier_sanity(cfg: ClassifierConfig, batches, variant: ClassifierStepper, steps: int = 4) -> dict:
    """Same initial weights and batches: features in eval mode, then ``steps`` training losses, variant vs fp32."""
    ref, var = ClassifierStepper(cfg, batches), ClassifierStepper(cfg, batches, variant.channels_last, variant.bf16)
    x = batches[0][0]
    with torch.no_grad():
        fa = ref.model.eval().features(x)
        with _precision(var.bf16):
            fb = var.model.eval().features(x.contiguous(memory_format=CL) if var.channels_last else x).float()
    ref.model.train(), var.model.train()
    la, lb = [ref.step() for _ in range(steps)], [var.step() for _ in range(steps)]
    return {"feature_rel_diff": round(float((fa - fb).norm() / fa.norm()), 5),
            "losses_fp32": [round(v, 4) for v in la], "losses_variant": [round(v, 4) for v in lb],
            "finite": all(map(math.isfinite, lb))}


def prepare_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Our loop's batch preparation: uint8 (N, 1, S, S) -> float in [0, 1] -> augment_batch LIGHT."""
    return augment_batch(images.float().div_(255.0), LIGHT, generator)[0]


class _AugmentCollate:
    """collate_fn doing the preparation in the DataLoader worker (picklable, seeded per batch)."""

    def __init__(self) -> None:
        self.k = 0

    def __call__(self, rows):
        images, labels = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        self.k += 1
        return prepare_batch(images, torch.Generator().manual_seed(self.k)), labels


def epoch_main_process(loader: DataLoader, stepper: ClassifierStepper) -> float:
    """Seconds of one epoch with the preparation in the main process (our loop, num_workers=0)."""
    start, gen = time.perf_counter(), torch.Generator().manual_seed(0)
    for images, labels in loader:
        stepper.batches = [(prepare_batch(images, gen), labels)]
        stepper.step()
    return time.perf_counter() - start


def epoch_worker(loader: DataLoader, stepper: ClassifierStepper) -> float:
    """Seconds of one epoch whose batches arrive prepared from the DataLoader worker."""
    start = time.perf_counter()
    for x, labels in loader:
        stepper.batches = [(x, labels)]
        stepper.step()
    return time.perf_counter() - start


# --- 2 and 4: tiny UNet training step -----------------------------------------------------------------


class UNetStepper:
    """One base-stage step of train_stage: NoisePredictionStage.loss (min-SNR, prompt dropout) under
    autocast when bf16, backward, grad clipping, AdamW. With ``vae`` and ``pixels`` the batch's
    moments are encoded from pixels in every step instead of read from the cache."""

    def __init__(self, sd: SDLoraConfig, parts, data: dict, emb: torch.Tensor, channels_last: bool = False,
                 bf16: bool = False, vae: nn.Module | None = None, pixels: torch.Tensor | None = None) -> None:
        self.unet = copy.deepcopy(parts.unet).train()
        if channels_last:
            self.unet.to(memory_format=CL)
        tr = sd.base_training
        self.stage = NoisePredictionStage("base", self.unet, self.unet, parts.noise_scheduler, emb, 1, 1.0,
                                          tr.prompt_dropout, tr.snr_gamma)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tr.lr, weight_decay=tr.weight_decay)
        self.data, self.batch_size, self.vae, self.pixels = data, tr.batch_size, vae, pixels
        self.channels_last, self.bf16 = channels_last, bf16
        self.i, self.losses = 0, []

    def step(self) -> float:
        """One optimizer step; returns the loss."""
        idx = batch_indices(len(self.data["prompt"]), self.batch_size, self.i, 0)
        generator = torch.Generator().manual_seed(self.i)
        torch.manual_seed(self.i)
        self.i += 1
        batch = {k: v[idx] for k, v in self.data.items()}
        if self.vae is not None:
            with torch.no_grad():
                dist = self.vae.encode(self.pixels[idx]).latent_dist
                batch["moments"] = torch.cat([dist.mean, dist.logvar], dim=1)
        with _precision(self.bf16):
            loss, _ = self.stage.loss(batch, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))
        return self.losses[-1]


def unet_sanity(ref: UNetStepper, var: UNetStepper) -> dict:
    """Same weights (copies of the fp32 UNet), same batch, noise and timesteps: the variant's noise
    prediction and loss vs fp32's."""
    out = []
    for cl, bf16 in ((False, False), (var.channels_last, var.bf16)):
        unet = copy.deepcopy(ref.unet).eval()
        if cl:
            unet.to(memory_format=CL)
        g = torch.Generator().manual_seed(123)
        latents = torch.randn(16, 4, 16, 16, generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        text = ref.stage.prompt_embeddings[torch.zeros(16, dtype=torch.long)]
        stage = NoisePredictionStage("base", unet, unet, ref.stage.noise_scheduler, ref.stage.prompt_embeddings,
                                     1, 1.0, 0.0, ref.stage.snr_gamma)
        batch = {k: v[:16] for k, v in ref.data.items()}
        with torch.no_grad(), _precision(bf16):
            out.append((unet(latents, t, encoder_hidden_states=text).sample.float(),
                        float(stage.loss(batch, torch.Generator().manual_seed(7))[0])))
    (pa, la), (pb, lb) = out
    return {"prediction_rel_diff": round(float((pa - pb).norm() / pa.norm()), 5), "loss_fp32": round(la, 5),
            "loss_variant": round(lb, 5)}


# --- 3: sampling ------------------------------------------------------------------------------------


class Sampler:
    """The tiny sd-lora pipeline (random weights, DPM-Solver++) in one layout and precision."""

    def __init__(self, sd: SDLoraConfig, n: int, channels_last: bool = False, bf16: bool = False) -> None:
        self.pipe = with_dpm_solver(build_tiny_components(sd.tiny, sd.image_size, [sd.generic_prompt], 0).pipeline())
        if channels_last:
            self.pipe.unet.to(memory_format=CL)
            self.pipe.vae.to(memory_format=CL)
        self.sd, self.n, self.bf16 = sd, n, bf16

    def images(self, n: int | None = None) -> np.ndarray:
        """uint8 images (n, S, S) from seed 0, as SDLoraGenerator.sample draws them (sampling_precision)."""
        return sample_gray(self.pipe, self.sd.generic_prompt, n or self.n, 0, 0, size=self.sd.image_size,
                           steps=self.sd.sampling_steps, guidance_scale=self.sd.guidance_scale,
                           batch_size=self.sd.sample_batch_size, autocast=torch.bfloat16 if self.bf16 else None)

    def seconds_per_image(self) -> list[float]:
        """One call of ``n`` images: [seconds / image]."""
        start = time.perf_counter()
        self.images()
        return [(time.perf_counter() - start) / self.n]


# --- the run ----------------------------------------------------------------------------------------


def compare(name: str, variant: str, baseline: str, ours: Callable[[], list[float]],
            reference: Callable[[], list[float]], reps: int, unit: str = "step", **extra) -> dict:
    """interleaved_comparison of a variant against its baseline, labelled; prints one line."""
    res = interleaved_comparison(ours, reference, reps)
    row = {"comparison": name, "variant": variant, "baseline": baseline, "unit": unit,
           "variant_median_s": res["ours_median_s"], "baseline_median_s": res["reference_median_s"],
           "ratio": res["ratio"], "variant_s": res["ours_s"], "baseline_s": res["reference_s"], **extra}
    print(f"  {name}: {variant} / {baseline} = {row['ratio']:.3f}", flush=True)
    return row


def classifier_rows(cfg: ClassifierConfig, reps: int, steps: int, warmup: int) -> list[dict]:
    """Comparison 1: the classifier training step in four layouts / precisions."""
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    batches = [(prepare_batch(torch.from_numpy(rng.integers(0, 256, (cfg.batch_size, 1, cfg.image_size,
                                                                      cfg.image_size), dtype=np.uint8)), gen),
                torch.arange(cfg.batch_size) % 3) for _ in range(4)]
    base = ClassifierStepper(cfg, batches)
    variants = {"channels_last": (True, False), "bf16": (False, True), "channels_last+bf16": (True, True)}
    steppers = {k: ClassifierStepper(cfg, batches, *v) for k, v in variants.items()}
    for s in [base, *steppers.values()]:
        _timed(s.step, warmup)
    rows = []
    for name, s in steppers.items():
        rows.append(compare("classifier step", name, "fp32", lambda s=s: _timed(s.step, steps),
                            lambda: _timed(base.step, steps), reps, sanity=classifier_sanity(cfg, batches, s)))
    return rows


def unet_rows(sd: SDLoraConfig, reps: int, steps: int, warmup: int) -> list[dict]:
    """Comparisons 2 and 4: the tiny UNet step in three layouts / precisions; cached vs encoded latents."""
    n = 4 * sd.base_training.batch_size
    parts, data, emb = tiny_setup(sd, n)
    base = UNetStepper(sd, parts, data, emb)
    variants = {"channels_last": UNetStepper(sd, parts, data, emb, channels_last=True),
                "bf16": UNetStepper(sd, parts, data, emb, bf16=True)}
    pixels = torch.rand(n, 3, sd.image_size, sd.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    vae = parts.vae.eval().requires_grad_(False)
    encoding = UNetStepper(sd, parts, data, emb, vae=vae, pixels=pixels)
    for s in [base, *variants.values(), encoding]:
        _timed(s.step, warmup)
    rows = []
    for name, s in variants.items():
        rows.append(compare("UNet step", name, "fp32", lambda s=s: _timed(s.step, steps),
                            lambda: _timed(base.step, steps), reps, sanity=unet_sanity(base, s)))
        rows[-1]["sanity"].update(finite=all(map(math.isfinite, s.losses)))
    rows.append(compare("UNet step", "encode images every step", "cached latents",
                        lambda: _timed(encoding.step, steps), lambda: _timed(base.step, steps), reps))
    return rows


def trained_sampling_sanity(artifact: Path, n: int = 8) -> dict:
    """A fitted sd-lora artifact: per class, ``n`` images with sampling_precision bf16 vs fp32 (grey levels)."""
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    gen = SDLoraGenerator.load(artifact)
    out = {}
    for k, label in enumerate(gen.classes):
        images = [sample_gray(gen.pipe, gen.prompt(label), n, 1, k, size=gen.cfg.image_size,
                              steps=gen.cfg.sampling_steps, guidance_scale=gen.cfg.guidance_scale,
                              autocast=dtype).astype(np.float64) for dtype in (None, torch.bfloat16)]
        diff = np.abs(images[1] - images[0])
        out[label] = {"mean_abs_diff_grey": round(float(diff.mean()), 3),
                      "p99_abs_diff_grey": float(np.percentile(diff, 99)), "max_abs_diff_grey": int(diff.max()),
                      "std_grey_fp32": round(float(images[0].std()), 1)}
    return {"artifact": str(artifact), **out}


def sampling_rows(sd: SDLoraConfig, reps: int, n: int) -> list[dict]:
    """Comparison 3: sampling seconds per image in fp32, bf16 autocast and channels_last."""
    base = Sampler(sd, n)
    variants = {"bf16": Sampler(sd, n, bf16=True), "channels_last": Sampler(sd, n, channels_last=True)}
    for s in [base, *variants.values()]:
        s.images(2)
    reference = base.images(4).astype(np.float64)
    rows = []
    for name, s in variants.items():
        diff = np.abs(s.images(4).astype(np.float64) - reference)
        rows.append(compare("sampling", name, "fp32", s.seconds_per_image, base.seconds_per_image, reps,
                            unit="image", sanity={"mean_abs_diff_grey": round(float(diff.mean()), 3),
                                                  "max_abs_diff_grey": int(diff.max())}))
    return rows


def data_rows(cfg: ClassifierConfig, reps: int, steps: int, epoch_images: int, epoch_reps: int) -> list[dict]:
    """Comparison 5: batch preparation vs model step, and preparation in a worker vs in the main process."""
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (epoch_images, 1, cfg.image_size, cfg.image_size), dtype=np.uint8))
    labels = torch.arange(epoch_images) % 3
    gen = torch.Generator().manual_seed(0)
    batch = images[:cfg.batch_size]
    stepper = ClassifierStepper(cfg, [(prepare_batch(batch, gen), labels[:cfg.batch_size])])
    _timed(stepper.step, 2)
    rows = [compare("classifier batch", "prepare (uint8->float, augment LIGHT)", "model step (fp32)",
                    lambda: _timed(lambda: float(prepare_batch(batch, gen).sum()), steps),
                    lambda: _timed(stepper.step, steps), reps)]
    batches_per_epoch = math.ceil(epoch_images / cfg.batch_size)
    rows[-1]["per_epoch_s"] = {"images": epoch_images,
                               "prepare": round(rows[-1]["variant_median_s"] * batches_per_epoch, 3),
                               "model_step": round(rows[-1]["baseline_median_s"] * batches_per_epoch, 3)}
    dataset = TensorDataset(images, labels)
    main_loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)
    worker_loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=1,
                               collate_fn=_AugmentCollate(), persistent_workers=True, prefetch_factor=2)
    epoch_main_process(main_loader, stepper)
    epoch_worker(worker_loader, stepper)
    rows.append(compare("classifier epoch", "prepare in DataLoader worker (num_workers=1)",
                        "prepare in main process (num_workers=0)", lambda: [epoch_worker(worker_loader, stepper)],
                        lambda: [epoch_main_process(main_loader, stepper)], epoch_reps,
                        unit=f"epoch of {epoch_images}"))
    return rows


def fit_epoch_seconds(cfg: ClassifierConfig, train, val) -> list[float]:
    """[seconds of the second epoch] of fit_classifier (augmentation, steps, validation, checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = fit_classifier(*train, *val, cfg.model_copy(update={"epochs": 2}), 3, Path(tmp), cpu=True)
    return [float(result.history[1]["seconds"])]


def config_rows(cfg: ClassifierConfig, reps: int, n_train: int) -> list[dict]:
    """Comparison 6: the options as wired into fit_classifier (classifier.mixed_precision, channels_last)."""
    cfg = cfg.model_copy(update={"mixed_precision": "no", "channels_last": False})
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (n_train + 32, cfg.image_size, cfg.image_size), dtype=np.uint8)
    labels = np.arange(n_train + 32, dtype=np.int64) % 3
    train, val = (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])
    variants = {"mixed_precision=bf16": {"mixed_precision": "bf16"}, "channels_last=true": {"channels_last": True},
                "both": {"mixed_precision": "bf16", "channels_last": True}}
    rows = []
    for name, update in variants.items():
        rows.append(compare("fit_classifier", name, "fp32, NCHW",
                            lambda u=update: fit_epoch_seconds(cfg.model_copy(update=u), train, val),
                            lambda: fit_epoch_seconds(cfg, train, val), reps, unit=f"epoch of {n_train}"))
    return rows


def main() -> None:
    """Run the five comparisons, print the table, write bench/results/speed.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 only on an idle machine)")
    parser.add_argument("--reps", type=int, default=10, help="interleaved repetitions per comparison")
    parser.add_argument("--steps", type=int, default=2, help="training steps per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per model")
    parser.add_argument("--sample-reps", type=int, default=6)
    parser.add_argument("--sample-n", type=int, default=16, help="images per sampling repetition")
    parser.add_argument("--epoch-images", type=int, default=256)
    parser.add_argument("--epoch-reps", type=int, default=4)
    parser.add_argument("--artifact", type=Path, default=None,
                        help="a fitted sd-lora folder: also compare bf16 and fp32 samples of its trained model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    preset = load_config("cpu")
    cfg = preset.classifier
    sd = SDLoraConfig.model_validate(preset.generators["sd-lora"])
    started, load_before = time.perf_counter(), load_avg()
    print(f"threads {torch.get_num_threads()}, load {load_before}", flush=True)
    rows = classifier_rows(cfg, args.reps, args.steps, args.warmup)
    rows += unet_rows(sd, args.reps, args.steps, args.warmup)
    rows += sampling_rows(sd, args.sample_reps, args.sample_n)
    rows += data_rows(cfg, args.reps, args.steps, args.epoch_images, args.epoch_reps)
    rows += config_rows(cfg, args.epoch_reps, args.epoch_images)
    trained = trained_sampling_sanity(args.artifact) if args.artifact else None
    seconds = time.perf_counter() - started
    result = {"device": device_info(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "args": vars(args), "load_before": load_before,
              "load_after": load_avg(), "seconds": round(seconds, 1),
              "classifier": {"image_size": cfg.image_size, "batch_size": cfg.batch_size, "width": cfg.width},
              "unet": {"image_size": sd.image_size, "batch_size": sd.base_training.batch_size,
                       "sampling_steps": sd.sampling_steps, "guidance_scale": sd.guidance_scale},
              "rows": rows, "trained_sampling_sanity": trained}
    print(f"\n{'comparison':<17}{'variant':<40}{'baseline':<40}{'unit':<14}{'variant ms':>11}{'base ms':>10}"
          f"{'ratio':>7}  sanity")
    for r in rows:
        sanity = ", ".join(f"{k}={v}" for k, v in r.get("sanity", {}).items())
        print(f"{r['comparison']:<17}{r['variant']:<40}{r['baseline']:<40}{r['unit']:<14}"
              f"{r['variant_median_s'] * 1e3:>11.1f}{r['baseline_median_s'] * 1e3:>10.1f}{r['ratio']:>7.3f}  {sanity}")
    if trained:
        print(f"bf16 vs fp32 samples of {trained.pop('artifact')}: {trained}")
    print(f"threads {result['threads']}, load before/after {load_before} / {result['load_after']}, "
          f"{seconds:.0f} s")
    write_json(RESULTS, result)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
