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
