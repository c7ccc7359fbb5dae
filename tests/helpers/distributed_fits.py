"""Fits run by tests/test_distributed.py, once in one process and once under
``accelerate launch --multi_gpu --num_processes 2`` (CPU processes over gloo).

Writes ``<out>/summary.json`` (main process only, through busynth.io): the classifier's
per-epoch training loss and final weights' norm, the cVAE's and a diffusion stage's
per-step losses, how many processes took part, and what sharded sampling and scoring gave
(``accel.shard_map``): the classical augmenter's images for a fixed seed, the sampling calls this
process made, and an untrained classifier's probabilities (the same weights in every run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from busynth.accel import rank_and_world
from busynth.cells import sample_sharded
from busynth.classify.models import build_classifier
from busynth.classify.train import fit_classifier, predict_proba
from busynth.config import ClassifierConfig, PhantomConfig
from busynth.data.phantom import make_phantom
from busynth.data.transforms import label_indices, stack_images
from busynth.engine import StageConfig, train_stage
from busynth.generators.classical import ClassicalAugmenter
from busynth.generators.cvae import CVAEGenerator
from busynth.generators.diffusion.train import AutoencoderStage
from busynth.io import read_history_csv, write_json

CLASSES = ["normal", "benign", "malignant"]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    records = make_phantom(PhantomConfig(n_per_class={"normal": 12, "benign": 12, "malignant": 12}, size=32), CLASSES)
    images, labels = stack_images(records, 32), label_indices(records, CLASSES)

    cfg = ClassifierConfig(image_size=32, width=8, depth=[1, 1], epochs=3, patience=10, batch_size=12,
                           augment="light", tta=False, lr=3e-3)
    fit = fit_classifier(images, labels, images[:12], labels[:12], cfg, 3, out / "classifier", seed=0)
    weights_norm = float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in fit.model.parameters())))

    cvae = CVAEGenerator({"image_size": 32, "steps": 12, "batch_size": 12, "checkpoint_every": 6}, classes=CLASSES)
    cvae.fit(records, out / "cvae", seed=0)

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4)
    pixels = torch.from_numpy(images[:24]).float().div(127.5).sub(1.0)[:, None].repeat(1, 3, 1, 1)
    stage = AutoencoderStage(vae, crop=16)
    stage_cfg = StageConfig(steps=12, batch_size=8, lr=1e-3, checkpoint_every=6)
    train_stage(stage, {"pixels": pixels}, stage_cfg, out / "autoencoder", seed=0)

    classical = ClassicalAugmenter({"image_size": 32}, classes=CLASSES)
    classical.fit(records, out / "classical", seed=0)
    calls = []
    sample = classical.sample
    classical.sample = lambda *a, **k: calls.append(a[1]) or sample(*a, **k)  # type: ignore[method-assign]
    samples = sample_sharded(classical, "benign", 70, seed=5, masks=None)
    torch.manual_seed(0)
    untrained = build_classifier(cfg, 3)
    proba = predict_proba(untrained, stack_images(records * 8, 32), batch_size=64)

    write_json(out / "summary.json", {
        "world": rank_and_world()[1],
        "classifier_loss": [row["train_loss"] for row in fit.history],
        "classifier_weights_norm": weights_norm,
        "cvae_loss": [float(r["loss"]) for r in read_history_csv(out / "cvae" / "history.csv", 10**9)],
        "autoencoder_loss": [float(r["loss"]) for r in read_history_csv(out / "autoencoder" / "history.csv", 10**9)],
        "sampled_images": [s.image.tolist() for s in samples],
        "sample_calls": calls,  # images per sample() call made by this (the main) process
        "proba": proba.tolist(),
    })


if __name__ == "__main__":
    main(Path(sys.argv[1]))
