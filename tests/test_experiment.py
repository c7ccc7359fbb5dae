"""The study runner on the smoke preset: leakage guard, determinism, resume, config changes."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from busynth import cells, experiment, rundir
from busynth.cli import app
from busynth.data.transforms import stack_images
from busynth.errors import ConfigError, LeakError, RunStateError
from busynth.evaluate.intervals import NO_VERDICT
from busynth.presets import load_config
from busynth.results import aa_seed_halves, format_summary

METRIC_COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "malignant_auc")


def smoke_config(*overrides: str):
    return load_config("smoke", list(overrides))


def _digest(row: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest()


def _cells(run_dir: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with (run_dir / "results" / "cells.csv").open() as fh:
        return {(r["method"], r["fold"], r["seed"]): r for r in csv.DictReader(fh)}


def test_no_test_image_or_its_duplicates_reach_training(tmp_path, monkeypatch):
    """Checked on the arrays handed to the classifier and the records handed to generators."""
    seen_fits: list[dict] = []
    seen_generator_fits: list[list[str]] = []
    real_fit = cells.fit_classifier

    def spy_fit(train_x, train_y, val_x, val_y, cfg, n_classes, out_dir, **kw):
        seen_fits.append({"train": train_x.copy(), "val": val_x.copy(), "cell": Path(out_dir).parent.name,
                          "method": Path(out_dir).parent.parent.name})
        return real_fit(train_x, train_y, val_x, val_y, cfg, n_classes, out_dir, **kw)

    real_gen = cells.fit_or_load_generator

    def spy_gen(method, config, train, gen_dir, seed):
        seen_generator_fits.append([r.id for r in train])
        return real_gen(method, config, train, gen_dir, seed)

    monkeypatch.setattr(cells, "fit_classifier", spy_fit)
    monkeypatch.setattr(cells, "fit_or_load_generator", spy_gen)
    config = smoke_config("phantom.near_duplicate_rate=0.25")
    experiment.run_study(config, tmp_path / "run", build_html=False)
    study = rundir.prepare_data(config, None, tmp_path / "run")
    size = config.classifier.image_size
    assert study.audit.near_groups, "the fixture must contain near-duplicate groups"
    assert len(seen_fits) == 6 and len(seen_generator_fits) == 2  # real x 2 seeds (the A/A row), classical
    records = {r.id: r for r in study.records}
    for fit in seen_fits:
        fold = int(fit["cell"].removeprefix("fold").split("_")[0])
        test_ids = set(study.split.ids(fold, "test"))
        test_groups = {study.audit.group_of[i] for i in test_ids}
        forbidden = [r for r in study.records if study.audit.group_of[r.id] in test_groups]
        assert len(forbidden) >= len(test_ids)
        forbidden_digests = {_digest(x) for x in stack_images(forbidden, size)}
        for part in ("train", "val"):
            used = {_digest(x) for x in fit[part]}
            assert not used & forbidden_digests, f"{fit['method']} {fit['cell']}: test image in {part}"
        ids = json.loads((tmp_path / "run" / "cells" / fit["method"] / fit["cell"] / "ids.json").read_text())
        for role in ("classifier_train", "val", "generator_train"):
            real_ids = [i for i in ids[role] if ":" not in i]
            assert all(records[i].label for i in real_ids)
            assert not {study.audit.group_of[i] for i in real_ids} & test_groups, role
    for train_ids in seen_generator_fits:
        assert all(":" not in i for i in train_ids)


def test_leak_guard_raises_on_a_planted_leak(tmp_path):
    config = smoke_config("phantom.near_duplicate_rate=0.25")
    study = rundir.prepare_data(config, None, tmp_path)
    group = next(g for g in study.audit.near_groups if len(g) > 1)
    test_id = group[0]
    fold = next(f for f in study.split.folds if test_id in study.split.ids(f, "test"))
    twin = group[1]
    with pytest.raises(LeakError, match="test images or their duplicates"):
        cells.check_no_leak(study.split, fold, {"classifier_train": [twin]}, study.audit.group_of)


def test_same_seed_gives_identical_metrics(tmp_path):
    config = smoke_config()
    a = experiment.run_study(config, tmp_path / "a", build_html=False)
    b = experiment.run_study(config, tmp_path / "b", build_html=False)
    assert a["methods"] == b["methods"]
    ca, cb = _cells(tmp_path / "a"), _cells(tmp_path / "b")
    assert ca.keys() == cb.keys()
    for key in ca:
        assert [ca[key][m] for m in METRIC_COLUMNS] == [cb[key][m] for m in METRIC_COLUMNS]
    pa = (tmp_path / "a/cells/classical/fold0_seed0/predictions.csv").read_text()
    assert pa == (tmp_path / "b/cells/classical/fold0_seed0/predictions.csv").read_text()


def test_rerun_skips_finished_cells_and_can_add_methods(tmp_path):
    config = smoke_config("run.methods=[real]")
    experiment.run_study(config, tmp_path, build_html=False)
    stamp = (tmp_path / "cells/real/fold0_seed0/metrics.json").stat().st_mtime_ns
    more = smoke_config("run.methods=[real,classical]")
    summary = experiment.run_study(more, tmp_path, build_html=False)
    assert (tmp_path / "cells/real/fold0_seed0/metrics.json").stat().st_mtime_ns == stamp
    assert set(summary["methods"]) == {"real", "classical"}
    assert set(summary["metrics"]) <= set(summary["paired"]["classical"])
    assert summary["paired"]["classical"]["verdict"] == NO_VERDICT  # smoke: one classifier seed per fold


def test_changed_config_refuses_to_mix_results(tmp_path):
    experiment.run_study(smoke_config("run.methods=[real]"), tmp_path, build_html=False)
    with pytest.raises(RunStateError, match="classifier.lr"):
        experiment.run_study(smoke_config("run.methods=[real]", "classifier.lr=0.01"), tmp_path, build_html=False)
    result = CliRunner().invoke(app, ["run", "-c", "smoke", "--methods", "real", "--out", str(tmp_path),
                                      "--set", "classifier.width=4"])
    assert result.exit_code == 2
    assert "classifier.width" in result.output


def test_unknown_method_is_refused_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["run", "-c", "smoke", "--methods", "real,gan", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "unknown method 'gan'" in result.output
    assert not (tmp_path / "r" / "cells").exists()


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_gives_the_same_results(tmp_path):
    args = ["-c", "smoke", "--set", "classifier.epochs=6", "--set", "classifier.patience=6"]
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "busynth.cli", "run", *args, "--out", str(reference)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "busynth.cli", "run", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the second cell (classical, fold 0) has finished an epoch but not the cell.
    target = killed / "cells" / "classical" / "fold0_seed0"
    deadline = time.time() + 300
    while time.time() < deadline and not list((target / "classifier").glob("checkpoint-*/state.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((target / "classifier").glob("checkpoint-*/state.json")), "the run ended before it could be killed"
    assert not (target / "metrics.json").exists(), "killed too late: the cell had finished"

    again = subprocess.run([sys.executable, "-m", "busynth.cli", "run", *args, "--out", str(killed)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    ref_cells, new_cells = _cells(reference), _cells(killed)
    assert ref_cells.keys() == new_cells.keys()
    for key in ref_cells:
        assert [ref_cells[key][m] for m in METRIC_COLUMNS] == [new_cells[key][m] for m in METRIC_COLUMNS], key
    assert json.loads((reference / "results/summary.json").read_text())["methods"] == \
        json.loads((killed / "results/summary.json").read_text())["methods"]


def test_tensorboard_tracker_gets_per_epoch_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extras")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = smoke_config("run.methods=[real]", "run.tracker=tensorboard", "split.folds=2")
    experiment.run_study(config, tmp_path, build_html=False)
    event_dirs = {p.parent for p in (tmp_path / "trackers").rglob("events.out.tfevents.*")}
    assert event_dirs, "no tensorboard event file written"
    tags: set[str] = set()
    for folder in event_dirs:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert any(t.startswith("real/fold0_seed0/") and "loss" in t for t in tags), sorted(tags)
    assert any(t.startswith("real/fold1_seed0/") for t in tags), sorted(tags)
    assert (tmp_path / "results" / "cells.csv").exists()  # local files are written as well


def test_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install wandb"):
        experiment.run_study(smoke_config("run.methods=[real]", "run.tracker=wandb"), tmp_path, build_html=False)


def test_every_registered_generator_plugs_into_the_study(tmp_path):
    from busynth.generators import available_methods

    methods = available_methods()
    assert {"real", "classical", "cvae", "sd-lora"} <= set(methods)
    config = smoke_config(f"run.methods=[{','.join(methods)}]", "split.folds=2")
    summary = experiment.run_study(config, tmp_path, build_html=False)
    assert set(summary["methods"]) == set(methods)
    for method in methods:
        if method == "real":
            continue
        folder = tmp_path / "synthetic" / method / "fold0_seed0"
        manifest = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
        done = json.loads((folder / "done.json").read_text())["counts"]
        assert len(manifest) == sum(done.values()) > 0
        assert all((folder / e["image"]).is_file() and e["generator"] == method for e in manifest)
        ids = json.loads((tmp_path / "cells" / method / "fold0_seed0" / "ids.json").read_text())
        train_ids = set(ids["classifier_train"]) - {i for i in ids["classifier_train"] if ":" in i}
        assert set(ids["generator_train"]) == train_ids
        assert sum(":" in i for i in ids["classifier_train"]) == len(manifest)
        fidelity = json.loads((tmp_path / "cells" / method / "fold0_seed0" / "fidelity.json").read_text())
        overall = fidelity["generator"]["overall"]
        assert overall["n_fake"] == len(manifest) and np.isfinite(overall["kid_mean"])
        # the smoke sets are smaller than the 64-d feature space: FID is left out, with a note
        assert overall["fid"] is None and any("feature dimensions" in n for n in overall["notes"])


def test_method_settings_are_checked_per_method(tmp_path):
    experiment.run_study(smoke_config("run.methods=[real,classical]"), tmp_path, build_html=False)
    # another method's section changing (or appearing) does not touch this run's cells
    experiment.run_study(smoke_config("run.methods=[real,classical]", "generators.cvae.steps=5"), tmp_path,
                         build_html=False)
    with pytest.raises(RunStateError, match="generators.classical.max_rotation"):
        experiment.run_study(smoke_config("run.methods=[real,classical]",
                                          "generators.classical.max_rotation=30"), tmp_path,
                             build_html=False)
    assert json.loads((tmp_path / "cells/classical/settings.json").read_text())["max_rotation"] == 10.0
    # a folder started before a setting existed resumes while the setting is at its default
    settings = tmp_path / "cells/classical/settings.json"
    saved = json.loads(settings.read_text())
    settings.write_text(json.dumps({k: v for k, v in saved.items() if k != "max_rotation"}))
    experiment.run_study(smoke_config("run.methods=[real,classical]"), tmp_path, build_html=False)
    with pytest.raises(RunStateError, match="generators.classical.max_rotation"):
        experiment.run_study(smoke_config("run.methods=[real,classical]", "generators.classical.max_rotation=30"),
                             tmp_path, build_html=False)


def test_a_study_reuses_another_runs_generator_fits_only_when_they_are_its_own(tmp_path):
    source = tmp_path / "source"
    experiment.run_study(smoke_config("run.methods=[real,classical]", "run.only_folds=[0]"), source, build_html=False)
    seg = tmp_path / "seg"  # the use: a segmentation study on a classification study's synthetic sets
    result = CliRunner().invoke(app, ["run", "-c", "smoke", "--set", "run.task=segmentation", "--methods",
                                      "real,classical", "--synthetic-from", str(source), "--out", str(seg)])
    assert result.exit_code == 0, result.output
    for part, done in (("generators", "generator.json"), ("synthetic", "done.json")):
        # the same files (hard links), not fitted or sampled again: rewriting would have made new ones
        assert (seg / part / "classical/fold0_seed0" / done).stat().st_ino == \
            (source / part / "classical/fold0_seed0" / done).stat().st_ino
        assert (seg / part / "classical/fold1_seed0" / done).is_file()  # the source lacks fold 1: made here
        assert not (source / part / "classical/fold1_seed0").exists()
    assert (json.loads((seg / "generators" / rundir.REUSED).read_text())
            == {"classical/fold0_seed0": str(source.resolve())})
    ids = json.loads((seg / "cells/classical/fold0_seed0/ids.json").read_text())["classifier_train"]
    assert any(i.startswith("classical:") for i in ids)
    refused = {"synthesis.ratio": ["synthesis.ratio=1.0"], "phantom.seed": ["phantom.seed=5"],
               "generators.classical.max_rotation": ["generators.classical.max_rotation=30"],
               "other images than this run's training part of fold 0": ["split.seed=3"]}
    for n, (message, overrides) in enumerate(refused.items()):
        with pytest.raises(RunStateError, match=message):
            experiment.run_study(smoke_config("run.methods=[real,classical]", *overrides), tmp_path / f"r{n}",
                                 build_html=False, synthetic_from=source)
        assert not (tmp_path / f"r{n}" / "generators/classical").exists()
    with pytest.raises(RunStateError, match="is not a run folder"):
        experiment.run_study(smoke_config(), tmp_path / "r", build_html=False, synthetic_from=tmp_path / "nothing")
    with pytest.raises(RunStateError, match="this run's own folder"):
        experiment.run_study(smoke_config(), source, build_html=False, synthetic_from=source)


def test_equal_budget_shared_generator_fits_and_the_aa_row(tmp_path):
    """Every method of a cell trains the same optimizer steps; a fold's generator is fitted once and
    its synthetic set reused by every classifier seed; the A/A row is in summary.json and the report."""
    config = smoke_config("run.methods=[real,classical,cvae]", "run.seeds=2", "classifier.epochs=3")
    summary = experiment.run_study(config, tmp_path)
    rows = [json.loads(p.read_text()) for p in tmp_path.glob("cells/*/*/metrics.json")]
    assert len(rows) == 3 * 2 * 2
    for fold in (0, 1):
        steps = {r["method"]: r["train_steps"] for r in rows if r["fold"] == fold and r["seed"] == 0}
        assert len(set(steps.values())) == 1 and steps["real"] > 0, steps
        assert all(r["n_synthetic"] > 0 for r in rows if r["fold"] == fold and r["method"] != "real")
    for method in ("classical", "cvae"):
        assert sorted(p.name for p in (tmp_path / "generators" / method).iterdir()) == ["fold0_seed0", "fold1_seed0"]
        assert sorted(p.name for p in (tmp_path / "synthetic" / method).iterdir()) == ["fold0_seed0", "fold1_seed0"]
        ids = [json.loads((tmp_path / "cells" / method / f"fold0_seed{s}" / "ids.json").read_text())["classifier_train"]
               for s in (0, 1)]
        assert ids[0] == ids[1]  # both classifier seeds saw the same synthetic set
    assert (tmp_path / "cells/cvae/fold0_seed0/fidelity.json").exists()
    assert not (tmp_path / "cells/cvae/fold0_seed1/fidelity.json").exists()  # the set is scored once
    saved = json.loads((tmp_path / "results/summary.json").read_text())
    assert saved["protocol"]["aa_seeds"] == [[0], [1]]
    assert set(saved["aa"]) == set(saved["metrics"]) and saved["aa"]["balanced_accuracy"]["cells"] == 2
    assert summary["paired"]["cvae"]["verdict"] in ("helps", "no evidence", "hurts")
    assert "cvae" in summary["vs_baseline"] and "classical" not in summary["vs_baseline"]
    assert summary["paired"]["cvae"]["balanced_accuracy"]["n"] == len(
        {i for p in tmp_path.glob("cells/real/*/ids.json") for i in json.loads(p.read_text())["test"]})
    page = (tmp_path / "report.html").read_text()
    assert "A/A: real seeds [0] vs [1]" in page


@pytest.mark.parametrize("seeds", [1, 3])
def test_an_odd_seed_count_trains_one_extra_reference_seed_for_the_aa_row(tmp_path, seeds):
    summary = experiment.run_study(smoke_config("run.methods=[real]", f"run.seeds={seeds}"), tmp_path,
                                   build_html=False)
    assert sorted(p.name for p in (tmp_path / "cells/real").glob("fold*")) == [
        f"fold{f}_seed{s}" for f in (0, 1) for s in range(seeds + 1)]
    assert summary["methods"]["real"]["balanced_accuracy"]["n"] == 2 * seeds  # the extra seed is only for A/A
    assert summary["aa"]["balanced_accuracy"]["cells"] == 2 * (seeds + 1) // 2


def test_aa_seed_halves_are_disjoint_and_equal_in_size():
    assert aa_seed_halves([0]) == ([0], [1])
    assert aa_seed_halves([0, 1]) == ([0], [1])
    assert aa_seed_halves([0, 1, 2]) == ([0, 1], [2, 3])
    assert aa_seed_halves([5, 6, 7, 8, 9]) == ([5, 6, 7], [8, 9, 10])


def test_generator_seeds_cannot_exceed_classifier_seeds():
    with pytest.raises(ConfigError, match="generator_seeds"):
        smoke_config("run.seeds=2", "run.generator_seeds=3")


def test_the_components_interval_runs_through_the_study_and_is_named_in_the_summary(tmp_path):
    config = smoke_config("run.methods=[real,classical]", "run.seeds=2", "run.interval=components")
    summary = experiment.run_study(config, tmp_path, build_html=False)
    paired = summary["paired"]["classical"]["balanced_accuracy"]
    assert paired["procedure"] == "components" and paired["ci_low"] <= paired["diff"] <= paired["ci_high"]
    # the A/A row has one seed per arm here (seeds [0] vs [1]): components needs two, the bootstrap is used
    assert summary["aa"]["balanced_accuracy"]["procedure"] == "bootstrap"
    text = format_summary(summary)
    assert "interval (variance components: test-image and classifier-seed parts" in text
    assert "comparisons with one seed per fold: two-level bootstrap" in text
    assert load_config("smoke").run.interval == "components"  # the default


def test_the_mask_loss_sees_the_masks_of_real_and_classical_images_and_none_of_the_cvae_ones(tmp_path, monkeypatch):
    seen: dict[str, tuple[int, np.ndarray]] = {}
    fit = cells.fit_classifier

    def spy(*args, **kwargs):
        seen[Path(args[6]).parent.parent.name] = (kwargs["n_real"], kwargs["has_mask"])
        return fit(*args, **kwargs)

    monkeypatch.setattr(cells, "fit_classifier", spy)
    config = smoke_config("run.methods=[real,classical,cvae]", "run.only_folds=[0]", "classifier.mask_weight=1.0")
    experiment.run_study(config, tmp_path, build_html=False)
    assert set(seen) == {"real", "classical", "cvae"}
    n_real, has = seen["real"]
    assert len(has) == n_real and has.all()  # the phantom's normal images have empty masks, not none
    assert seen["classical"][1].all() and len(seen["classical"][1]) > n_real
    n, cvae = seen["cvae"]
    assert n == n_real and cvae[:n].all() and not cvae[n:].any() and len(cvae) > n
    with (tmp_path / "cells/cvae/fold0_seed0/classifier/history.csv").open() as fh:
        assert all(np.isfinite(float(r["mask_loss"])) for r in csv.DictReader(fh))
