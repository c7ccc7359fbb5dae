"""Training under ``accelerate launch`` with two CPU processes (gloo) gives the single-process result.

Each process computes its share of every global batch and DDP averages the gradients, so the
optimisation follows the single-process one: exactly up to float summation order where the
randomness is drawn per global batch (cVAE), and closely where batch-norm statistics are per
process (classifier) or each process draws its own noise (diffusion stages).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HELPER = Path(__file__).parent / "helpers" / "distributed_fits.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", "0"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _run(cmd: list[str], timeout: int = 300) -> None:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _leftovers(root: Path) -> list[Path]:
    """Temporary files or folders of the atomic writes still lying around."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name or p.is_dir()]


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> tuple[dict, dict, Path]:
    root = tmp_path_factory.mktemp("dist")
    _run([sys.executable, str(HELPER), str(root / "one")])
    _run([*LAUNCH, str(HELPER), str(root / "two")])
    read = lambda name: json.loads((root / name / "summary.json").read_text())
    return read("one"), read("two"), root


def test_two_processes_really_ran(fits) -> None:
    one, two, _ = fits
    assert one["world"] == 1 and two["world"] == 2


def test_cvae_matches_the_single_process_fit_step_by_step(fits) -> None:
    one, two, _ = fits
    assert len(one["cvae_loss"]) == len(two["cvae_loss"]) == 12
    np.testing.assert_allclose(two["cvae_loss"], one["cvae_loss"], rtol=1e-4)


def test_classifier_matches_the_single_process_fit_within_tolerance(fits) -> None:
    one, two, _ = fits
    assert len(two["classifier_loss"]) == len(one["classifier_loss"]) == 3
    np.testing.assert_allclose(two["classifier_loss"], one["classifier_loss"], rtol=0.05)
    assert two["classifier_weights_norm"] == pytest.approx(one["classifier_weights_norm"], rel=0.01)


def test_diffusion_stage_matches_the_single_process_fit_within_tolerance(fits) -> None:
    one, two, _ = fits
    a, b = np.array(one["autoencoder_loss"]), np.array(two["autoencoder_loss"])
    assert len(a) == len(b) == 12
    assert b.mean() == pytest.approx(a.mean(), rel=0.1)
    assert b[-4:].mean() < b[:4].mean()  # it still learns


def test_sampling_and_scoring_are_shared_between_the_processes_and_give_the_same_numbers(fits) -> None:
    one, two, _ = fits
    assert one["sample_calls"] == [32, 32, 6]  # 70 images: three chunks, all here
    assert two["sample_calls"] == [32, 6]  # the main process sampled chunks 0 and 2, the other chunk 1
    assert len(two["sampled_images"]) == 70
    assert two["sampled_images"] == one["sampled_images"]
    assert np.array(two["proba"]).shape == (288, 3)  # 5 batches of 64 rows, shared round-robin
    np.testing.assert_allclose(two["proba"], one["proba"], rtol=1e-6, atol=1e-7)


def test_only_the_main_process_wrote_and_nothing_half_written_is_left(fits) -> None:
    _, _, root = fits
    one = sorted(p.relative_to(root / "one") for p in (root / "one").rglob("*"))
    two = sorted(p.relative_to(root / "two") for p in (root / "two").rglob("*"))
    assert one == two
    assert _leftovers(root / "two") == []


@pytest.mark.slow
def test_the_study_runs_under_two_processes_like_under_one(tmp_path: Path) -> None:
    """``accelerate launch -m busynth run``: same files as a single-process run, results written once."""
    args = ["run", "--config", "smoke", "--methods", "real,cvae", "--set", "split.folds=2"]
    _run([sys.executable, "-m", "busynth", *args, "--out", str(tmp_path / "one")])
    _run([*LAUNCH, "-m", "busynth", *args, "--out", str(tmp_path / "two")])
    files = {name: sorted(str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*")
                          if "trackers" not in p.parts) for name in ("one", "two")}
    assert files["one"] == files["two"]
    assert _leftovers(tmp_path / "two") == []
    for cell in ("real/fold0_seed0", "cvae/fold1_seed0"):
        a = json.loads((tmp_path / "one" / "cells" / cell / "metrics.json").read_text())
        b = json.loads((tmp_path / "two" / "cells" / cell / "metrics.json").read_text())
        assert a["n_test"] == b["n_test"] and a["n_synthetic"] == b["n_synthetic"]
        assert 0.0 <= b["macro_auc"] <= 1.0
    generated = sorted((tmp_path / "two" / "synthetic" / "cvae" / "fold0_seed0").rglob("*.png"))
    reference = sorted((tmp_path / "one" / "synthetic" / "cvae" / "fold0_seed0").rglob("*.png"))
    assert [p.name for p in generated] == [p.name for p in reference]
    # The cVAE fit matches up to float summation order, which 30 steps amplify a little.
    diff = [np.abs(_gray(a) - _gray(b)).mean() for a, b in zip(generated, reference, strict=True)]
    assert max(diff) < 4.0, diff


def _gray(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float64)
