"""Benchmark: classifier training and inference speed (images/s) at the default config.

Training speed is measured end to end through ``fit_classifier`` (data loading,
flips, forward/backward, AdamW, per-epoch validation and checkpoint writes): the
time of the second epoch, so start-up costs are left out. Inference speed is
``predict_proba`` at batch 32. Prints a table and writes bench/results/classifier.json.

    python bench/bench_classifier.py [--n-train 256] [--image-size 128]
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from busynth.classify.models import build_classifier
from busynth.classify.train import fit_classifier, predict_proba
from busynth.config import ClassifierConfig
from busynth.io import write_json

RESULTS = Path(__file__).parent / "results" / "classifier.json"


def random_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 noise images (n, size, size) and labels cycling over 3 classes."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.arange(n, dtype=np.int64) % 3


def bench_training(cfg: ClassifierConfig, n_train: int) -> dict[str, float]:
    """Images/s of the second training epoch of fit_classifier (validation on 32 images included)."""
    train = random_images(n_train, cfg.image_size, 0)
    val = random_images(32, cfg.image_size, 1)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit_classifier(*train, *val, cfg.model_copy(update={"epochs": 2}), 3, Path(tmp), cpu=True)
    seconds = result.history[1]["seconds"]
    return {"train_images": n_train, "epoch_seconds": seconds, "train_img_per_s": n_train / seconds}


def bench_inference(cfg: ClassifierConfig, n: int, batch_size: int) -> dict[str, float]:
    """Images/s of predict_proba (eval mode, no grad) after one warm-up batch."""
    torch.manual_seed(0)
    model = build_classifier(cfg, 3)
    images, _ = random_images(n, cfg.image_size, 2)
    predict_proba(model, images[:batch_size], batch_size)
    started = time.perf_counter()
    predict_proba(model, images, batch_size)
    seconds = time.perf_counter() - started
    return {"infer_images": n, "infer_seconds": seconds, "infer_img_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-infer", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = ClassifierConfig(image_size=args.image_size)  # defaults: resnet, width 32, batch 32
    n_params = sum(p.numel() for p in build_classifier(cfg, 3).parameters())
    result = {
        "config": cfg.model_dump(mode="json"), "parameters": n_params,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(),
        **bench_training(cfg, args.n_train), **bench_inference(cfg, args.n_infer, cfg.batch_size),
    }
    print(f"classifier {cfg.arch} width {cfg.width} depth {cfg.depth}, {n_params / 1e6:.2f} M params, "
          f"{cfg.image_size} px, batch {cfg.batch_size}, {result['threads']} threads")
    print(f"{'phase':<10}{'images':>8}{'seconds':>10}{'img/s':>10}")
    print(f"{'train':<10}{args.n_train:>8}{result['epoch_seconds']:>10.2f}{result['train_img_per_s']:>10.1f}")
    print(f"{'inference':<10}{args.n_infer:>8}{result['infer_seconds']:>10.2f}{result['infer_img_per_s']:>10.1f}")
    write_json(RESULTS, result)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
