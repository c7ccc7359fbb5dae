"""Label fidelity: the fold's real-only classifier on a generator's images, against a hand count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from busynth.cli import app
from busynth.evaluate.labels import label_fidelity


def test_label_fidelity_equals_a_hand_computed_confusion() -> None:
    classes = ["normal", "benign", "malignant"]
    intended = np.array([0, 0, 1, 1, 1, 2])
    proba = np.array([[0.7, 0.2, 0.1],   # normal -> normal
                      [0.3, 0.6, 0.1],   # normal -> benign
                      [0.1, 0.8, 0.1],   # benign -> benign
                      [0.2, 0.3, 0.5],   # benign -> malignant
                      [0.1, 0.5, 0.4],   # benign -> benign
                      [0.6, 0.1, 0.3]])  # malignant -> normal
    out = label_fidelity(intended, proba, classes)
    assert out["confusion"] == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]
    assert out["per_class"]["normal"] == {"n": 2, "accuracy": 0.5, "mean_probability": pytest.approx(0.5)}
    assert out["per_class"]["benign"]["accuracy"] == pytest.approx(2 / 3)
    assert out["per_class"]["benign"]["mean_probability"] == pytest.approx((0.8 + 0.3 + 0.5) / 3)
    assert out["per_class"]["malignant"] == {"n": 1, "accuracy": 0.0, "mean_probability": pytest.approx(0.3)}
    assert out["overall"]["accuracy"] == pytest.approx(3 / 6)
    # a class with no intended images has no entry, but keeps its row of zeros in the confusion
    assert set(label_fidelity(np.array([1, 2]), proba[:2], classes)["per_class"]) == {"benign", "malignant"}


def test_a_study_scores_the_label_fidelity_of_every_generator_cell(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "-c", "smoke", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "label fidelity" in result.output and "classical" in result.output.split("label fidelity")[1]
    cells = sorted((tmp_path / "cells" / "classical").glob("fold*_seed*"))
    assert cells
    for cell in cells:
        entry = json.loads((cell / "label_fidelity.json").read_text())
        assert entry["status"] == "ok" and entry["classifier"] == f"cells/real/{cell.name}/classifier"
        n_synthetic = sum(1 for _ in (tmp_path / "synthetic" / "classical" / cell.name).rglob("*).png"))
        assert sum(map(sum, entry["synthetic"]["confusion"])) == n_synthetic
        assert entry["real_test"]["overall"]["n"] == json.loads((cell / "metrics.json").read_text())["n_test"]
    summary = json.loads((tmp_path / "results" / "fidelity.json").read_text())
    assert summary["label_fidelity"]["classical"]["cells"] == len(cells)
    assert "Label fidelity" in (tmp_path / "report.html").read_text()


def test_train_on_synthetic_test_on_real_uses_the_real_budget_and_the_real_test_part(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "-c", "smoke", "--set", "run.cas=true", "--methods", "real,classical",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for fold in (0, 1):
        cell = out / "cells" / "classical" / f"fold{fold}_seed0"
        cas = json.loads((cell / "cas.json").read_text())
        real = json.loads((out / "cells" / "real" / f"fold{fold}_seed0" / "metrics.json").read_text())
        ids = json.loads((cell / "ids.json").read_text())
        assert cas["status"] == "ok" and cas["train_steps"] == real["train_steps"]  # the same budget
        assert cas["n_synthetic"] == sum(i.startswith("classical:") for i in ids["classifier_train"])
        assert cas["real_only"]["balanced_accuracy"] == real["balanced_accuracy"]
        assert 0.0 <= cas["synthetic_only"]["balanced_accuracy"] <= 1.0
        assert (cell / "cas" / "best.safetensors").is_file()
    summary = json.loads((out / "results" / "fidelity.json").read_text())["cas"]["classical"]
    assert summary["cells"] == 2 and summary["synthetic_only"]["balanced_accuracy"]["n"] == 2
    assert "train on synthetic, test on real" in result.output
    assert "Train on synthetic, test on real (CAS)" in (out / "report.html").read_text()
