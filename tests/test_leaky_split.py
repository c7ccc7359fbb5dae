"""Split files that leak (split.on_leak: refuse | purge | keep), on the smoke phantom with a hand-made
split file whose test part holds near-duplicate twins of train and val images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from busynth import cells, experiment, rundir
from busynth.cli import app
from busynth.config import SplitConfig
from busynth.data.audit import AuditReport, audit_records
from busynth.data.phantom import make_phantom
from busynth.data.records import Record
from busynth.data.splits import Split, leaking_groups, make_split, read_split
from busynth.errors import DataError, LeakError
from busynth.presets import load_config

PARTS_BY_GROUP = ("test", "val", "train", "train", "train")


@pytest.fixture(scope="module")
def smoke() -> tuple[list[Record], AuditReport]:
    config = load_config("smoke")
    records = make_phantom(config.phantom, config.data.classes)
    return records, audit_records(records)


def twin_pairs(records: list[Record]) -> list[tuple[str, str]]:
    return [(r.id, r.meta["near_duplicate_of"]) for r in records if "near_duplicate_of" in r.meta]


def write_leaky(path: Path, records: list[Record], audit: AuditReport) -> dict[str, str]:
    """A path,split file: whole groups by group number, except two twin pairs cut apart (twin in test,
    its source in train resp. val). Returns id -> part as written."""
    part_of = {r.id: PARTS_BY_GROUP[audit.group_of[r.id] % 5] for r in records}
    (twin_a, source_a), (twin_b, source_b) = twin_pairs(records)[:2]
    part_of[twin_a], part_of[source_a] = "test", "train"
    part_of[twin_b], part_of[source_b] = "test", "val"
    by_id = {r.id: r for r in records}
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "split"])
        writer.writerows([by_id[i].path, part] for i, part in part_of.items())
    return part_of


def straddling(part_of: dict[str, str], audit: AuditReport) -> set[str]:
    """Oracle: every train/val id whose duplicate group has a member in test (as the file gives it)."""
    test_groups = {audit.group_of[i] for i, p in part_of.items() if p == "test"}
    return {i for i, p in part_of.items() if p in ("train", "val") and audit.group_of[i] in test_groups}


def parts(split: Split, fold: int = 0) -> dict[str, str]:
    return {r["id"]: r["part"] for r in split.rows if int(r["fold"]) == fold}


def test_refuse_names_every_straddling_group_and_its_files(smoke, tmp_path: Path) -> None:
    records, audit = smoke
    path = tmp_path / "leaky.csv"
    part_of = write_leaky(path, records, audit)
    with pytest.raises(LeakError) as info:
        read_split(path, records, audit)  # refuse is the default
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: 2 duplicate groups")
    by_id = {r.id: r for r in records}
    for twin, source in twin_pairs(records)[:2]:
        assert f"group {audit.group_of[twin]}:" in message
        assert repr(by_id[twin].path) in message and repr(by_id[source].path) in message
    assert straddling(part_of, audit) == {s for _, s in twin_pairs(records)[:2]}
    assert "split.on_leak=purge" in message and "split.on_leak=keep" in message


def test_refuse_caps_the_list_of_groups(smoke, tmp_path: Path) -> None:
    from busynth.data.leaks import SHOW_GROUPS, refusal_message

    leaks = [{"fold": 0, "group": g, "paths": {"test": [f"t{g}.png"], "train": [f"s{g}.png"]}} for g in range(9)]
    message = refusal_message("x.csv", leaks)
    assert f"group {SHOW_GROUPS - 1}:" in message and f"group {SHOW_GROUPS}:" not in message
    assert f"and {9 - SHOW_GROUPS} more groups" in message and "fold 0: 9" in message


def test_refuse_in_a_run_stops_before_any_training(smoke, tmp_path: Path) -> None:
    records, audit = smoke
    path = tmp_path / "leaky.csv"
    write_leaky(path, records, audit)
    out = tmp_path / "run"
    config = load_config("smoke", ["run.methods=[real,cvae]"])
    with pytest.raises(LeakError, match="leaky.csv: 2 duplicate groups"):
        experiment.run_study(config, out, None, path, build_html=False)
    assert not (out / "data" / "split.csv").exists() and not (out / "generators").exists()
    assert not list(out.glob("cells/*/fold*"))


def test_purge_keeps_the_test_part_and_drops_exactly_the_straddling_members(smoke, tmp_path: Path) -> None:
    records, audit = smoke
    path = tmp_path / "leaky.csv"
    part_of = write_leaky(path, records, audit)
    split = read_split(path, records, audit, SplitConfig(on_leak="purge"))
    doomed = straddling(part_of, audit)
    got = parts(split)
    assert {i for i, p in got.items() if p == "test"} == {i for i, p in part_of.items() if p == "test"}
    assert {i for i, p in got.items() if p == "purged"} == doomed and set(split.purged[0]) == doomed
    assert all(got[i] == p for i, p in part_of.items() if i not in doomed)
    assert leaking_groups(split) == [] and not split.leaky
    assert f"fold 0: purged {len(doomed)} train/val images" in " ".join(split.notes)
    # split.csv keeps them as part "purged", and reading it back gives the same split
    stored = split.write(tmp_path / "split.csv")
    back = read_split(stored, records, audit, SplitConfig(on_leak="purge"))
    assert parts(back) == got and back.purged == split.purged


def test_purge_that_leaves_a_fold_without_training_images_is_refused_naming_the_file(smoke, tmp_path) -> None:
    records, audit = smoke
    twin, source = twin_pairs(records)[0]
    by_id = {r.id: r for r in records}
    rows = [[by_id[twin].path, "test"], [by_id[source].path, "train"]]
    rows += [[r.path, "val"] for r in records if r.id not in (twin, source)][:5]
    path = tmp_path / "tiny.csv"
    path.write_text("path,split\n" + "".join(f"{a},{b}\n" for a, b in rows))
    with pytest.raises(DataError, match=f"{path}: fold 0 has no train images left after purging"):
        read_split(path, records, audit, SplitConfig(on_leak="purge"))


def test_keep_runs_the_split_as_given_and_marks_it_leaky(smoke, tmp_path: Path) -> None:
    records, audit = smoke
    path = tmp_path / "leaky.csv"
    part_of = write_leaky(path, records, audit)
    split = read_split(path, records, audit, SplitConfig(on_leak="keep"))
    assert split.leaky and parts(split) == part_of and split.purged == {}
    assert {g["group"] for g in split.leaks} == {audit.group_of[t] for t, _ in twin_pairs(records)[:2]}
    assert any("results are marked 'leaky split'" in n for n in split.notes)
    train_val = [i for i, p in part_of.items() if p in ("train", "val")]
    cells.check_no_leak(split, 0, {"classifier_train": train_val}, audit.group_of)  # accepted: passes


def test_the_leak_guard_raises_a_leak_error_for_groups_nobody_accepted(smoke, tmp_path: Path) -> None:
    records, audit = smoke
    path = tmp_path / "leaky.csv"
    part_of = write_leaky(path, records, audit)
    split = read_split(path, records, audit, SplitConfig(on_leak="purge"))
    source = twin_pairs(records)[0][1]
    with pytest.raises(LeakError, match=f"fold 0: classifier_train would use 1 test images.*{source}"):
        cells.check_no_leak(split, 0, {"classifier_train": [source]}, audit.group_of)
    kept = read_split(path, records, audit, SplitConfig(on_leak="keep"))
    test_id = next(i for i, p in part_of.items() if p == "test")
    with pytest.raises(LeakError, match="val would use"):  # a test image itself is never accepted
        cells.check_no_leak(kept, 0, {"val": [test_id]}, audit.group_of)


def test_make_split_guard_raises_a_leak_error(smoke, monkeypatch) -> None:
    from busynth.data import splits

    records, audit = smoke
    monkeypatch.setattr(splits, "leaking_groups", lambda split: [(0, 3, ["test", "train"])])
    with pytest.raises(LeakError, match="internal error"):
        make_split(records, audit, load_config("smoke").split)


@pytest.mark.parametrize("policy", ["purge", "keep"])
def test_prepare_data_records_the_outcome_in_split_leaks_json(smoke, tmp_path: Path, policy: str) -> None:
    records, audit = smoke
    path = tmp_path / "leaky.csv"
    part_of = write_leaky(path, records, audit)
    config = load_config("smoke", [f"split.on_leak={policy}"])
    study = rundir.prepare_data(config, None, tmp_path / "run", path)
    report = json.loads((tmp_path / "run" / "data" / "split_leaks.json").read_text())
    doomed = straddling(part_of, audit)
    assert report["policy"] == policy and report["source"] == "leaky.csv"
    assert report["leaky"] is (policy == "keep")
    assert len(report["groups"]) == 2 and {g["fold"] for g in report["groups"]} == {0}
    assert {i for g in report["groups"] for p in ("train", "val") for i in g["ids"].get(p, [])} == doomed
    if policy == "purge":
        assert set(report["purged"]["0"]) == doomed and report["n_purged"] == {"0": len(doomed)}
    else:
        assert report["purged"] == {} and study.split.leaky
    # resuming reads the stored split.csv back with the same outcome
    again = rundir.prepare_data(config, None, tmp_path / "run", None)
    assert parts(again.split) == parts(study.split) and again.split.leaky == study.split.leaky


def test_a_generated_split_writes_a_clean_split_leaks_json(tmp_path: Path) -> None:
    rundir.prepare_data(load_config("smoke"), None, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data" / "split_leaks.json").read_text())
    assert report == {"policy": "refuse", "source": "generated", "leaky": False, "groups": [], "purged": {},
                      "n_purged": {}}


def test_run_with_a_leaky_split_file_exits_2_with_one_line_and_no_traceback(smoke, tmp_path: Path) -> None:
    records, audit = smoke
    path = tmp_path / "leaky.csv"
    write_leaky(path, records, audit)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--split-file", str(path), "--config", "smoke", "--methods", "real",
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "leaky.csv: 2 duplicate groups" in errors[0] and "split.on_leak" in errors[0]
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not list(out.glob("cells/*/fold*"))
