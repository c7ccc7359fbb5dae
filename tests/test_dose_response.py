"""Dose-response (synthesis.ratios): one arm per ratio, prefixes of one sampled set, one curve per method."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from busynth.cli import app
from busynth.errors import ConfigError
from busynth.presets import load_config
from busynth.registry import arm_parts, study_arms


def test_arms_are_named_per_method_and_ratio() -> None:
    assert study_arms(["real", "cvae", "controlnet"], [0.5, 2.0]) == \
        ["real", "cvae@0.5", "cvae@2", "controlnet@0.5", "controlnet@2"]
    assert study_arms(["real", "cvae"], None) == ["real", "cvae"]
    assert arm_parts("cvae@0.25") == ("cvae", 0.25) and arm_parts("sd-lora") == ("sd-lora", None)
    assert load_config("smoke", ["synthesis.ratios=[2, 0.5]"]).synthesis.ratios == [0.5, 2.0]
    for bad in (["synthesis.ratios=[0, 1]"], ["synthesis.ratios=[1, 1]"],
                ["synthesis.ratios=[1]", "synthesis.balance=true"]):
        with pytest.raises(ConfigError, match="synthesis"):
            load_config("smoke", bad)


def test_a_dose_response_study_runs_every_ratio_as_an_arm_of_one_sampled_set(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "-c", "smoke", "--set", "synthesis.ratios=[0.5,2]", "--set", "run.seeds=2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted({p.parent.name for p in out.glob("cells/*/fold*")}) == ["classical@0.5", "classical@2", "real"]
    assert [p.name for p in (out / "synthetic").iterdir()] == ["classical"]  # sampled once per fold, not per arm
    rows = [json.loads(p.read_text()) for p in out.glob("cells/*/fold*/metrics.json")]
    assert len({r["train_steps"] for r in rows}) == 1  # every arm trains the same budget
    for fold in (0, 1):
        small = json.loads((out / f"cells/classical@0.5/fold{fold}_seed0/ids.json").read_text())
        large = json.loads((out / f"cells/classical@2/fold{fold}_seed0/ids.json").read_text())
        syn_small = [i for i in small["classifier_train"] if i.startswith("classical:")]
        syn_large = [i for i in large["classifier_train"] if i.startswith("classical:")]
        real = Counter(i.rsplit("_", 1)[0] for i in small["classifier_train"] if ":" not in i)
        assert set(syn_small) < set(syn_large)  # the smaller dose is a prefix of the larger one
        per_class = Counter(i.split(":")[1].rsplit("_", 1)[0] for i in syn_small)
        assert all(per_class[c] == int(0.5 * n + 0.5) for c, n in real.items())
        assert len(syn_large) == sum(2 * n for n in real.values())
    summary = json.loads((out / "results/summary.json").read_text())
    curve = summary["dose_response"]["classical"]
    assert [r["ratio"] for r in curve] == [0.5, 2.0]
    assert curve[1]["diff"] == summary["paired"]["classical@2"]["balanced_accuracy"]["diff"]
    assert "dose-response of classical" in result.output
    assert "<h2>Dose-response</h2>" in (out / "report.html").read_text()


def test_a_filtered_arm_keeps_the_images_the_real_only_classifier_accepts(tmp_path: Path) -> None:
    import numpy as np

    from busynth.cells import read_synthetic
    from busynth.classify.checkpoints import load_classifier
    from busynth.classify.train import predict_proba
    from busynth.data.transforms import label_indices, stack_images

    assert study_arms(["cvae", "real"], filtered=True) == ["real", "cvae", "cvae+filter"]
    assert arm_parts("cvae+filter") == ("cvae", None)
    for bad in (["synthesis.filter=0.5", "run.methods=[classical]"], ["synthesis.filter=0.5", "synthesis.ratios=[1]"]):
        with pytest.raises(ConfigError, match="synthesis"):
            load_config("smoke", bad)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "-c", "smoke", "--set", "synthesis.filter=0.34", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = load_config("smoke", ["synthesis.filter=0.34"])
    classes = list(config.data.classes)
    for fold in (0, 1):
        folder = out / "synthetic" / "classical+filter" / f"fold{fold}_seed0"
        decision = json.loads((folder / "filter.json").read_text())
        ids = json.loads((out / f"cells/classical+filter/fold{fold}_seed0/ids.json").read_text())
        real = Counter(i.rsplit("_", 1)[0] for i in ids["classifier_train"] if ":" not in i)
        for c, v in decision["per_class"].items():
            assert v["kept"] <= min(v["requested"], v["passed"]) and v["passed"] <= v["sampled"]
            # ratio 0.5 requested, filter_pool 3: 1.5 x the real count sampled
            assert (v["requested"], v["sampled"]) == (int(0.5 * real[c] + 0.5), int(1.5 * real[c] + 0.5))
        pool = read_synthetic(folder, "classical")
        kept = [r for r in pool if r.id in set(decision["kept"])]
        model = load_classifier(out / "cells" / "real" / f"fold{fold}_seed0" / "classifier", config.classifier,
                                len(classes))
        proba = predict_proba(model, stack_images(kept, config.classifier.image_size), tta=config.classifier.tta)
        assert (proba[np.arange(len(kept)), label_indices(kept, classes)] >= 0.34).all()
        assert sorted(i for i in ids["classifier_train"] if ":" in i) == sorted(decision["kept"])
    rows = [json.loads(p.read_text()) for p in out.glob("cells/*/fold*/metrics.json")]
    assert {r["method"] for r in rows} == {"real", "classical", "classical+filter"}
    assert len({r["train_steps"] for r in rows}) == 1
    assert "classical+filter" in json.loads((out / "results/summary.json").read_text())["paired"]
    assert "filter classical+filter" in result.output
    assert "Filtered arms" in (out / "report.html").read_text()
