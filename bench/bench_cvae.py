"""Benchmark the cvae generator: fit on one fold's training part of BUSI (phantom otherwise).

Prints a table (fit seconds, train img/s, sampling img/s), writes ``bench/results/cvae.json``
and a per-class grid ``bench/results/cvae_grid.png`` (rows: real training images, then samples).

    python bench/bench_cvae.py [--steps N] [--out-dir DIR] [--seed S] [--set beta=0.5]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from busynth.config import DEFAULT_CLASSES, DataConfig, PhantomConfig
from busynth.data.records import Record, class_counts
from busynth.data.transforms import resize_image
from busynth.generators.cvae import CVAEConfig, CVAEGenerator
from busynth.io import write_json, write_png
from busynth.presets import parse_override

logger = logging.getLogger("bench_cvae")
REPO = Path(__file__).resolve().parents[1]
BUSI = REPO.parent / "shared" / "data" / "Dataset_BUSI_with_GT"
RESULTS = REPO / "bench" / "results"
GRID_COLUMNS = 10


def _load_busi_with_pil(root: Path) -> list[Record]:
    """Fallback loader (images only, no masks) for when busynth.data.busi is unavailable."""
    records = []
    for label in DEFAULT_CLASSES:
        paths = [p for p in (root / label).glob("*.png") if "_mask" not in p.name]
        for p in sorted(paths, key=lambda p: int(re.findall(r"\d+", p.name)[0])):
            image = np.asarray(Image.open(p).convert("L"))
            records.append(Record(id=f"{label}_{p.stem}", label=label, image=image, mask=None, path=str(p)))
    return records


def training_part() -> tuple[str, list[Record]]:
    """The first 2/3 of each class of BUSI (or of the phantom): a stand-in for one fold's train part."""
    if BUSI.is_dir():
        try:
            from busynth.data.busi import load_dataset

            records = load_dataset(BUSI, DataConfig(), workers=2).records
        except ImportError:
            records = _load_busi_with_pil(BUSI)
        source = "busi"
    else:
        from busynth.data.phantom import make_phantom

        records = make_phantom(PhantomConfig(size=128), list(DEFAULT_CLASSES))
        source = "phantom"
    train = []
    for label in DEFAULT_CLASSES:
        of_class = [r for r in records if r.label == label]
        train += of_class[: (2 * len(of_class)) // 3]
    return source, train


def sample_grid(real: dict[str, list[np.ndarray]], fake: dict[str, list[np.ndarray]], size: int) -> np.ndarray:
    """uint8 grid: per class one row of real images and one row of samples, labelled on the left."""
    pad, label_w = 2, 110
    rows = [row for c in real for row in ((f"{c} real", real[c]), (f"{c} cvae", fake[c]))]
    height = len(rows) * (size + pad) + pad
    width = label_w + GRID_COLUMNS * (size + pad) + pad
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        y = pad + r * (size + pad)
        draw.text((4, y + size // 2 - 6), name, fill=0)
        for c, img in enumerate(images[:GRID_COLUMNS]):
            canvas.paste(Image.fromarray(img), (label_w + pad + c * (size + pad), y))
    return np.asarray(canvas)


def main() -> None:
    """Fit, time, sample, and write the JSON result and the grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config default)")
    parser.add_argument("--out-dir", type=Path, default=None, help="artifact folder (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a CVAEConfig field, e.g. --set beta=0.5 (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    source, train = training_part()
    overrides = dict(parse_override(text) for text in args.set)
    config = CVAEConfig(**overrides, **({"steps": args.steps} if args.steps else {}))
    logger.info("training part (%s): %s", source, class_counts(train, list(DEFAULT_CLASSES)))
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench_cvae_"))

    gen = CVAEGenerator(config, classes=list(DEFAULT_CLASSES))
    start = time.perf_counter()
    gen.fit(train, out_dir, seed=args.seed)
    fit_s = time.perf_counter() - start

    n_per_class = 128
    start = time.perf_counter()
    fake = {c: [s.image for s in gen.sample(c, n_per_class, seed=args.seed)] for c in DEFAULT_CLASSES}
    sample_s = time.perf_counter() - start
    real = {c: [resize_image(r.image, config.image_size) for r in train if r.label == c][:GRID_COLUMNS]
            for c in DEFAULT_CLASSES}

    history = (out_dir / "history.csv").read_text().splitlines()[1:]
    last = [float(x) for x in history[-1].split(",")[1:4]]
    result = {
        "method": "cvae",
        "source": source,
        "n_train": len(train),
        "device": f"{platform.processor() or platform.machine()}, torch threads={torch.get_num_threads()}",
        "config": config.model_dump(mode="json"),
        "fit_seconds": round(fit_s, 1),
        "train_images_per_second": round(config.steps * config.batch_size / fit_s, 1),
        "sampling_images_per_second": round(n_per_class * len(DEFAULT_CLASSES) / sample_s, 1),
        "final_loss": last[0], "final_recon": last[1], "final_kl": last[2],
        "pixel_std_real": float(np.std(np.stack([i for c in real.values() for i in c]))),
        "pixel_std_samples": float(np.std(np.stack([i for c in fake.values() for i in c]))),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "cvae.json", result)
    write_png(RESULTS / "cvae_grid.png", sample_grid(real, fake, config.image_size))

    print(f"\ncvae on {source} ({len(train)} training images, {config.image_size}px, {config.steps} steps)")
    print(f"{'fit s':>8} {'train img/s':>12} {'sample img/s':>13} {'recon':>8} {'kl':>6}")
    print(f"{result['fit_seconds']:>8} {result['train_images_per_second']:>12} "
          f"{result['sampling_images_per_second']:>13} {last[1]:>8.1f} {last[2]:>6.1f}")
    print(json.dumps({k: result[k] for k in ("pixel_std_real", "pixel_std_samples")}))


if __name__ == "__main__":
    main()
