"""report.html from a fake run folder: self-contained, numbers from the files, tolerant of gaps."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from busynth.errors import RunStateError
from busynth.report import build_report

CLASSES = ["normal", "benign", "malignant"]
METHODS = ["real", "cvae"]
METRICS = ["accuracy", "balanced_accuracy", "macro_f1", "macro_auc",
           "malignant_sensitivity", "malignant_specificity", "malignant_auc"]
FOLDS, SEEDS = 2, 1


def _write_required(run: Path) -> None:
    """config.yaml and results/summary.json with hand-picked numbers."""
    config = {"data": {"classes": CLASSES}, "split": {"mode": "kfold", "folds": FOLDS},
              "run": {"methods": METHODS, "seeds": SEEDS}}
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    stats = {m: {k: {"mean": 0.7 + 0.01 * i + 0.05 * j, "sd": 0.02 + 0.001 * i, "n": 2}
                 for i, k in enumerate(METRICS)} for j, m in enumerate(METHODS)}
    stats["real"]["balanced_accuracy"]["mean"] = 0.81234
    paired = {"cvae": {k: {"diff": 0.0, "ci_low": -0.02, "ci_high": 0.02, "p_boot": 0.9, "n": 40} for k in METRICS}}
    paired["cvae"]["balanced_accuracy"] = {"diff": 0.05, "ci_low": 0.01, "ci_high": 0.09, "p_boot": 0.01, "n": 40}
    paired["cvae"]["malignant_auc"] = {"diff": -0.04, "ci_low": -0.07, "ci_high": -0.01, "p_boot": 0.02, "n": 40}
    paired["cvae"].update(verdict="helps", p_holm=0.01)
    aa = {k: {"diff": 0.003, "ci_low": -0.031, "ci_high": 0.037, "p": 0.8, "n": 30} for k in METRICS}
    protocol = {"primary_metric": "balanced_accuracy", "interval": "bootstrap", "alpha": 0.05, "aa_seeds": [[0], [1]]}
    summary = {"classes": CLASSES, "metrics": METRICS, "reference": "real", "methods": stats, "paired": paired,
               "aa": aa, "protocol": protocol, "baseline": "classical", "vs_baseline": {}}
    (run / "results" / "summary.json").write_text(json.dumps(summary))


def _write_optional(run: Path, rng: np.random.Generator) -> None:
    """run.json, data/*, results/cells.csv, cells/*/predictions + history, synthetic/cvae."""
    (run / "run.json").write_text(json.dumps({"data": "phantom", "busynth_version": "0.1.0",
                                              "started": "2024-01-01T00:00:00", "fingerprint": "abc123"}))
    data = run / "data"
    data.mkdir()
    (data / "load_summary.json").write_text(json.dumps({
        "root": "/x/BUSI", "files_seen": 20, "images_read": 18, "masks_read": 12,
        "skipped": [{"path": "/x/<script>alert(1)</script>.png", "reason": "unreadable"}],
        "skipped_count": 1, "per_class": {"normal": 6, "benign": 6, "malignant": 6}}))
    (data / "audit.json").write_text(json.dumps({
        "n_images": 18, "n_exact_groups": 1, "n_near_groups": 2, "n_cross_class_groups": 1,
        "n_in_near_groups": 4, "n_overlays": 1, "cross_class_groups": [["benign (7)", "malignant (3)"]],
        "overlays": ["benign (12)"], "near_groups": [["benign (1)", "benign (2)"]]}))
    ids = [f"{c} ({k})" for c in CLASSES for k in range(1, 7)]
    split = [{"fold": f, "id": i, "path": f"{i}.png", "label": i.split()[0], "group": n,
              "part": ("test" if n % FOLDS == f else "val" if n % 5 == 0 else "train")}
             for f in range(FOLDS) for n, i in enumerate(ids)]
    pd.DataFrame(split).to_csv(data / "split.csv", index=False)

    cells = []
    for m_i, method in enumerate(METHODS):
        for fold in range(FOLDS):
            cell = run / "cells" / method / f"fold{fold}_seed0"
            (cell / "classifier").mkdir(parents=True)
            y = np.repeat(np.arange(3), 10)
            logits = rng.normal(size=(30, 3)) + 1.5 * np.eye(3)[y] * (1 + m_i)
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            pred = pd.DataFrame({"id": [f"x{k}" for k in range(30)], "label": [CLASSES[k] for k in y], "y_true": y})
            for k, c in enumerate(CLASSES):
                pred[f"p_{c}"] = p[:, k]
            pred.to_csv(cell / "predictions.csv", index=False)
            epochs = np.arange(1, 6)
            val = 0.5 + rng.uniform(0.02, 0.08) * epochs
            pd.DataFrame({"epoch": epochs, "train_loss": 1 / epochs, "val_balanced_accuracy": val,
                          "lr": 1e-3}).to_csv(cell / "classifier" / "history.csv", index=False)
            cells.append({"method": method, "fold": fold, "seed": 0, "n_train_real": 20, "n_synthetic": 20 * m_i,
                          "best_epoch": 5, "seconds": 1.0, **{k: rng.uniform(0.6, 0.9) for k in METRICS}})
    pd.DataFrame(cells).to_csv(run / "results" / "cells.csv", index=False)

    synth = run / "synthetic" / "cvae" / "fold0_seed0"
    for c in CLASSES:
        (synth / c).mkdir(parents=True)
        for k in range(1, 4):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(synth / c / f"{c} ({k}).png")
            if c != "normal":
                mask = np.zeros((16, 16), np.uint8)
                mask[4:12, 5:11] = 255
                Image.fromarray(mask).save(synth / c / f"{c} ({k})_mask.png")
    (synth / "manifest.jsonl").write_text('{"file": "benign/benign (1).png"}\n')


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _write_required(run)
    _write_optional(run, np.random.default_rng(0))
    return run


def _cells(page: str, cls: str) -> list[str]:
    return re.findall(rf'<td class="{cls}"[^>]*>(.*?)</td>', page, flags=re.DOTALL)


def test_report_is_self_contained_and_shows_the_numbers(full_run: Path) -> None:
    before = {p for p in full_run.rglob("*")}
    out = build_report(full_run)
    assert out == full_run / "report.html"
    samples = full_run / "results" / "samples"
    # report.html plus the sample grids as PNG files; no temporaries left
    assert {p for p in full_run.rglob("*")} - before == {out, samples, samples / "cvae.png"}
    page = out.read_text(encoding="ascii")

    assert "href=" not in page and "<script" not in page and "<link" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 5  # bars, ROC, confusion, training, samples
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()

    for method in METHODS:
        assert method in page
    assert "0.812 &#177; 0.021" in page  # mean ± sd of real's balanced accuracy, 3 decimals
    better, worse = _cells(page, "better"), _cells(page, "worse")
    # Only the primary metric is coloured, by its verdict: the verdict table (interval, verdict)
    # and the results table's balanced accuracy cell.
    assert len(better) == 3 and all("+0.050 [+0.010, +0.090]" in c or "helps" in c for c in better)
    assert "+0.050 [+0.010, +0.090]" in better[-1]
    assert worse == []
    assert "-0.040 [-0.070, -0.010]" in page  # a secondary metric's CI excluding 0: shown, uncoloured
    assert "+0.000 [-0.020, +0.020]" in page
    assert "A/A: real seeds [0] vs [1]" in page and "+0.003 [-0.031, +0.037]" in page  # the noise floor
    assert "Holm" in page and "balanced_accuracy (primary)" in page
    # Strings read from files are escaped, and the data section lists the audit findings.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "benign (7), malignant (3)" in page and "benign (12)" in page
    assert "fold0_seed0" in page
    grid = full_run / "results" / "samples" / "cvae.png"  # the sample grid, also as a file
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.width > 100


@pytest.mark.parametrize("missing", ["results/summary.json", "config.yaml"])
def test_missing_required_file_raises(full_run: Path, missing: str) -> None:
    (full_run / missing).unlink()
    with pytest.raises(RunStateError, match=Path(missing).name):
        build_report(full_run)
    assert not (full_run / "report.html").exists()


def test_report_without_optional_parts(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    _write_required(run)
    page = build_report(run).read_text()
    assert "0.812" in page and "cvae" in page
    for missing in ("no predictions.csv", "no synthetic/ folder", "data/audit.json missing", "data/split.csv missing"):
        assert missing in page


def test_broken_optional_file_becomes_a_note(full_run: Path) -> None:
    (full_run / "cells" / "cvae" / "fold1_seed0" / "predictions.csv").write_text("id,label\nx,benign\n")
    page = build_report(full_run).read_text()
    assert "could not be drawn" in page and "Results" in page and "Config" in page


def test_image_grid_outlines_the_mask_edge_in_its_colour() -> None:
    from busynth.report.grid import CAPTION, GAP, RED, Tile, image_grid, render_tile

    image = np.full((8, 8), 100, dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True  # becomes rows/cols 4..11 at 16 px
    tile = np.asarray(render_tile(Tile(image, [(mask, RED)]), size=16))
    red = np.all(tile == RED, axis=-1)
    ring = np.zeros((16, 16), dtype=bool)
    ring[4:12, 4:12] = True
    ring[5:11, 5:11] = False
    assert np.array_equal(red, ring)  # the edge only: inside and outside keep the image's grey
    assert np.all(tile[~ring] == 100)
    # An empty mask draws nothing; a wide image keeps its aspect ratio.
    assert not np.all(np.asarray(render_tile(Tile(image, [(np.zeros_like(mask), RED)]), 16)) == RED, axis=-1).any()
    assert render_tile(Tile(np.zeros((8, 16), dtype=np.uint8)), 32).size == (32, 16)
    # Rows of different lengths: the canvas is as wide as the longest row, a caption band above each tile.
    grid = image_grid([[Tile(image, caption="benign"), Tile(image)], [Tile(image)]], size=16)
    assert grid.size == (2 * (16 + GAP), 2 * (16 + CAPTION + GAP))
    caption = np.asarray(grid)[:CAPTION, :16 + GAP]
    assert (caption < 128).any()  # the caption's text is drawn
    assert np.all(np.asarray(grid)[CAPTION + 16 + GAP:, 16 + GAP:] == 255)  # the short row's missing tile: blank
