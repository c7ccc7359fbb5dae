"""External test sets: loading, scoring by every cell, the grouped resampling, `busynth evaluate`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from busynth.classify.metrics import resample_counts, restrict_proba
from busynth.classify.predictions import read_predictions
from busynth.cli import app, parse_external
from busynth.config import PhantomConfig
from busynth.data.busi import write_busi_layout
from busynth.data.phantom import make_phantom
from busynth.errors import ConfigError, DataError, RunStateError
from busynth.evaluate.intervals import FoldScores, two_level_bootstrap, variance_components
from busynth.external import load_external, score_cells
from busynth.io import changed_keys
from busynth.locks import claim
from busynth.presets import load_config
from busynth.rundir import open_run_dir, run_config

runner = CliRunner()
LESIONS = ["benign", "malignant"]
CLASSES = ["normal", *LESIONS]


def second_scanner(root: Path, n: int = 10) -> Path:
    """A phantom 'second scanner' set in the BUSI layout with lesion classes only (no normal
    folder), about a fifth of its images near-duplicates of another."""
    cfg = PhantomConfig(n_per_class={c: n for c in LESIONS}, size=48, seed=11, near_duplicate_rate=0.2,
                        scanner="second")
    return write_busi_layout(make_phantom(cfg, LESIONS), root)


def test_external_options_are_parsed_and_bad_ones_named(tmp_path: Path) -> None:
    assert parse_external([f"a={tmp_path}", f"b={tmp_path}"]) == {"a": tmp_path, "b": tmp_path}
    for spec, needle in [("nopath", "NAME=PATH"), (f"a/b={tmp_path}", "plain file name"),
                         (f"x={tmp_path / 'missing'}", "is not a folder")]:
        with pytest.raises(ConfigError, match=needle):
            parse_external([spec])
    with pytest.raises(ConfigError, match="given twice"):
        parse_external([f"a={tmp_path}", f"a={tmp_path}"])


def test_an_external_set_may_lack_classes_but_not_add_one(tmp_path: Path) -> None:
    config = load_config("smoke")
    ext = load_external("second", second_scanner(tmp_path / "ext"), config)
    assert ext.classes_present == LESIONS and len(ext.records) == 20
    twins = [r for r in ext.records if "near_duplicate_of" in r.meta] or None
    groups = {ext.groups[r.id] for r in ext.records}
    assert len(groups) < len(ext.records)  # near-duplicates share a resampling unit
    assert twins is None or all(ext.groups[r.id] == ext.groups[r.meta["near_duplicate_of"]] for r in twins)
    (tmp_path / "ext" / "cyst").mkdir()
    with pytest.raises(DataError, match="'cyst'"):
        load_external("second", tmp_path / "ext", config)


def test_the_second_scanner_renders_the_same_anatomy_otherwise() -> None:
    base = PhantomConfig(n_per_class={"malignant": 4}, size=48, near_duplicate_rate=0.0)
    a = make_phantom(base, ["malignant"])
    b = make_phantom(base.model_copy(update={"scanner": "second"}), ["malignant"])
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))


def test_cluster_resampling_draws_a_group_as_one_unit() -> None:
    strata = np.array([0, 0, 0, 0, 1, 1])
    clusters = np.array([7, 7, 8, 9, 3, 3])
    w = resample_counts(strata, 400, np.random.default_rng(0), clusters)
    assert np.array_equal(w[:, 0], w[:, 1]) and np.array_equal(w[:, 4], w[:, 5])
    # stratum 0 has three clusters (sizes 2, 1, 1): three draws; stratum 1 one cluster, drawn once
    assert np.array_equal(w[:, 4], np.ones(400))
    draws = w[:, 0] + w[:, 2] + w[:, 3]  # clusters drawn in stratum 0 (cluster 7 counted once)
    assert np.array_equal(draws, np.full(400, 3.0))


def test_duplicated_images_grouped_do_not_narrow_the_interval() -> None:
    rng = np.random.default_rng(4)
    n, seeds = 60, 4
    y = np.tile([0, 1, 2], n // 3)
    folds = []
    for _ in range(2):  # two folds scoring the same external images, as in an external set
        logits = rng.normal(size=(2, seeds, n, 3)) + 1.5 * np.eye(3)[y]
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        folds.append((p[0], p[1]))
    ids = [f"x{i}" for i in range(n)]

    def width(double: bool, grouped: bool, procedure) -> float:
        k = 2 if double else 1
        fs = [FoldScores([f"{i}_{j}" for i in ids for j in range(k)], np.repeat(y, k),
                         np.repeat(a, k, axis=1), np.repeat(b, k, axis=1),
                         groups=list(np.repeat(np.arange(n), k)) if grouped else None) for a, b in folds]
        r = procedure("balanced_accuracy", fs, n_boot=600, seed=1)
        return r["ci_high"] - r["ci_low"]

    for procedure in (two_level_bootstrap, variance_components):
        once = width(False, False, procedure)
        assert width(True, True, procedure) == pytest.approx(once, rel=0.12)
    # counted as new images, the copies would narrow the bootstrap's interval
    assert width(True, False, two_level_bootstrap) < 0.85 * width(False, False, two_level_bootstrap)


def _run(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_a_run_scores_every_cell_on_the_external_set_and_evaluate_reproduces_it(tmp_path: Path) -> None:
    ext = second_scanner(tmp_path / "second")
    out = _run("run", "-c", "smoke", "--seeds", "2", "--out", tmp_path / "a", "--external", f"second={ext}")
    assert "external set second (20 images: benign, malignant" in out
    cells = sorted((tmp_path / "a" / "cells").glob("*/*/metrics.json"))
    assert cells and all((c.parent / "external" / "second.csv").is_file() for c in cells)
    summary = json.loads((tmp_path / "a" / "results" / "external" / "second.json").read_text())
    assert summary["external"]["classes_present"] == LESIONS
    assert "macro_auc" not in summary["metrics"]  # undefined without normal images
    assert {"balanced_accuracy", "malignant_auc"} <= set(summary["metrics"])
    assert set(summary["methods"]) == {"real", "classical"} and "classical" in summary["paired"]
    assert summary["aa"]["balanced_accuracy"]["n"] == 20  # distinct external images, not folds x images
    assert summary["paired"]["classical"]["verdict"] in {"helps", "no evidence", "hurts"}
    assert "External test sets" in (tmp_path / "a" / "report.html").read_text()

    # the same study without --external, then scored afterwards: the same files and numbers
    _run("run", "-c", "smoke", "--seeds", "2", "--out", tmp_path / "b")
    assert not (tmp_path / "b" / "results" / "external").exists()

    # a second worker scoring the same folder (it holds one cell's claim) is left that cell, and the
    # first waits for it instead of scoring it again
    b, held = tmp_path / "b", cells[0].parent.relative_to(tmp_path / "a")
    config, mine = run_config(b), b / held / "external" / "second.csv"
    done: list[int] = []
    with claim(b, f"external/{held}"):
        worker = threading.Thread(target=lambda: done.append(
            score_cells(b, config, [load_external("second", ext, config)], ["real", "classical"])))
        worker.start()
        others = [b / c.parent.relative_to(tmp_path / "a") / "external" / "second.csv" for c in cells[1:]]
        deadline = time.monotonic() + 120
        while not all(o.is_file() for o in others) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        assert all(o.is_file() for o in others) and worker.is_alive() and not mine.exists()
        mine.parent.mkdir(exist_ok=True)
        mine.write_text((cells[0].parent / "external" / "second.csv").read_text())  # the other worker's scores
        stamp = mine.stat().st_mtime_ns
    worker.join(60)
    assert done == [len(cells) - 1] and mine.stat().st_mtime_ns == stamp
    out = _run("evaluate", tmp_path / "b", "--external", f"second={ext}")
    assert "external set second" in out
    again = json.loads((tmp_path / "b" / "results" / "external" / "second.json").read_text())
    assert again["methods"] == summary["methods"] and again["paired"] == summary["paired"]
    assert again["aa"] == summary["aa"]
    for cell in cells:
        twin = tmp_path / "b" / cell.parent.relative_to(tmp_path / "a") / "external" / "second.csv"
        assert twin.read_text() == (cell.parent / "external" / "second.csv").read_text()
    assert "External test sets" in (tmp_path / "b" / "report.html").read_text()

    # a set without normal images is scored between benign and malignant: each image's probabilities
    # renormalised over them; the share called normal is reported beside; --external-classes all scores all
    raw = [read_predictions(c.parent / "external" / "second.csv", CLASSES)[1:] for c in cells if "/real/" in str(c)]
    assert summary["external"]["scored_among"] == LESIONS
    assert summary["external"]["called_absent_class"]["real"] == pytest.approx(
        np.mean([np.mean(p.argmax(axis=1) == 0) for _, p in raw]))
    assert summary["methods"]["real"]["balanced_accuracy"]["mean"] == pytest.approx(
        np.mean([balanced_accuracy_score(y, restrict_proba(p, [1, 2]).argmax(axis=1)) for y, p in raw]))
    _run("evaluate", tmp_path / "b", "--external", f"second={ext}", "--external-classes", "all")
    every = json.loads((tmp_path / "b" / "results" / "external" / "second.json").read_text())
    assert every["external"]["scored_among"] == CLASSES and every["external"]["called_absent_class"] == {}
    assert (every["methods"]["real"]["balanced_accuracy"]["mean"]
            != summary["methods"]["real"]["balanced_accuracy"]["mean"])
    assert every["methods"]["real"]["balanced_accuracy"]["mean"] == pytest.approx(
        np.mean([balanced_accuracy_score(y, p.argmax(axis=1)) for y, p in raw]))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "b"), "--external", f"second={ext}",
                                 "--external-classes", "some"])
    assert result.exit_code == 2 and "run.external_classes" in result.output

    # another folder under a name already scored is refused
    other = second_scanner(tmp_path / "other", n=6)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "b"), "--external", f"second={other}"])
    assert result.exit_code == 2 and "scored from other images" in result.output


def test_evaluate_refuses_what_is_not_a_finished_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--external", f"x={tmp_path}"])
    assert result.exit_code == 2 and "not a finished run folder" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2 and "--external" in result.output


def test_a_run_folder_from_before_a_new_setting_a_retired_one_or_the_classical_move_is_still_read(
    tmp_path: Path
) -> None:
    config = load_config("smoke")
    open_run_dir(tmp_path, config, "phantom")
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del old["phantom"]["scanner"]  # a folder written before phantom.scanner existed
    old["classical"] = old["generators"].pop("classical")  # ... and before classical moved
    old["classifier"]["num_workers"] = 0  # ... and with a setting busynth no longer has
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    info = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**info, "fingerprint": "from-an-older-busynth"}))
    assert run_config(tmp_path).generators["classical"] == config.generators["classical"]
    open_run_dir(tmp_path, config, "phantom")  # accepted: the new setting is at its default
    assert json.loads((tmp_path / "run.json").read_text())["fingerprint"] == info["fingerprint"]
    assert changed_keys(old["phantom"], load_config("smoke", ["phantom.size=40"]).phantom.model_dump(mode="json"),
                        config.phantom.model_dump(mode="json")) == ["size"]
    (tmp_path / "run.json").write_text(json.dumps({**info, "fingerprint": "from-an-older-busynth"}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(RunStateError, match="phantom.scanner"):  # a new setting away from its default
        open_run_dir(tmp_path, load_config("smoke", ["phantom.scanner=second"]), "phantom")


def test_a_segmenter_setting_binds_segmentation_run_folders_only(tmp_path: Path) -> None:
    classification, segmentation = tmp_path / "classification", tmp_path / "segmentation"
    open_run_dir(classification, load_config("smoke"), "phantom")
    open_run_dir(classification, load_config("smoke", ["segmenter.epochs=7"]), "phantom")  # trains no segmenter
    with pytest.raises(RunStateError, match="classifier.epochs"):
        open_run_dir(classification, load_config("smoke", ["classifier.epochs=7"]), "phantom")
    open_run_dir(segmentation, load_config("smoke", ["run.task=segmentation"]), "phantom")
    with pytest.raises(RunStateError, match="segmenter.epochs"):
        open_run_dir(segmentation, load_config("smoke", ["run.task=segmentation", "segmenter.epochs=7"]), "phantom")


def test_an_external_set_holding_the_study_s_own_images_is_refused(tmp_path: Path) -> None:
    smoke = load_config("smoke").phantom
    copies = write_busi_layout(make_phantom(smoke.model_copy(update={"n_per_class": {"malignant": 3}}), ["malignant"]),
                               tmp_path / "copies")
    result = runner.invoke(app, ["run", "-c", "smoke", "--out", str(tmp_path / "run"), "--external", f"own={copies}"])
    assert result.exit_code == 2, result.output
    assert "exact copies of the study's own images" in result.output and "external:malignant_1" in result.output
    assert not list((tmp_path / "run").glob("cells/*/*/metrics.json"))  # refused before any training
