"""Config loading/validation and the command line (typer's CliRunner on busynth.cli.app)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from busynth.cli import app
from busynth.config import (
    StudyConfig,
    build_config,
    dump_config,
    load_config,
    parse_override,
    preset_names,
)
from busynth.data.audit import audit_records
from busynth.data.busi import load_dataset
from busynth.data.phantom import make_phantom
from busynth.data.splits import leaking_groups, read_split
from busynth.errors import ConfigError

from conftest import TinyBusi

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> None:
    """Exit code 2, a one-line 'error:' message naming every needle, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


# --- config ------------------------------------------------------------------------------------


def test_load_config_none_gives_the_defaults() -> None:
    config = load_config(None)
    assert config == StudyConfig()
    assert config.model_dump() == StudyConfig().model_dump()
    assert config.split.folds == 3 and config.data.classes == ["normal", "benign", "malignant"]


def test_shipped_presets_load_with_their_values() -> None:
    assert {"cpu", "smoke"} <= set(preset_names())
    smoke = load_config("smoke")
    assert smoke.phantom.size == 48 and smoke.split.folds == 2 and smoke.classifier.epochs == 2
    assert smoke.phantom.n_per_class == {"normal": 12, "benign": 16, "malignant": 14}
    cpu = load_config("cpu")
    assert cpu.split.folds == 3 and cpu.classifier.image_size == 96
    assert smoke != cpu


def test_overrides_are_parsed_as_yaml() -> None:
    config = load_config("smoke", ["split.folds=4", "run.methods=[real, cvae]", "classifier.lr=0.01",
                                   "split.exclude_cross_class=false", "phantom.n_per_class={normal: 3, benign: 4}",
                                   "generators.toy.latent=16"])
    assert config.split.folds == 4 and isinstance(config.split.folds, int)
    assert config.run.methods == ["real", "cvae"]
    assert config.classifier.lr == 0.01
    assert config.split.exclude_cross_class is False
    assert config.phantom.n_per_class == {"normal": 3, "benign": 4}
    assert config.generators["toy"] == {"latent": 16}
    assert config.generators["cvae"]["steps"] == 30  # the preset's section is kept beside it
    assert parse_override("a.b= x=y ") == ("a.b", "x=y")


def test_override_without_equals_sign_is_refused() -> None:
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(None, ["split.folds"])


def test_override_into_a_non_section_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("split: 3\n")
    with pytest.raises(ConfigError, match="'split' is not a section"):
        load_config(path, ["split.folds=2"])


@pytest.mark.parametrize(("override", "field"), [
    ("split.folds=1", "split.folds"),
    ("classifier.lr=-1", "classifier.lr"),
    ("classifier.nope=3", "classifier.nope"),
    ("data.classes=[a]", "data.classes"),
    ("data.classes=[a, a]", "data.classes"),
    ("run.methods=[]", "run.methods"),
    ("split.mode=random", "split.mode"),
    ("phantom.n_per_class={normal: 0}", "phantom.n_per_class"),
    ("phantom.n_per_class={cats: 3}", "cats"),
])
def test_bad_values_raise_config_error_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert field in str(info.value)


def test_fingerprint_changes_with_a_field_and_only_in_its_section() -> None:
    base = load_config("smoke")
    assert base.fingerprint() == load_config("smoke").fingerprint()
    changed = load_config("smoke", ["classifier.lr=0.5"])
    assert changed.fingerprint() != base.fingerprint()
    assert changed.fingerprint("classifier") != base.fingerprint("classifier")
    assert changed.fingerprint("split", "data") == base.fingerprint("split", "data")
    assert len(base.fingerprint()) == 16


def test_dumped_config_loads_back_equal(tmp_path: Path) -> None:
    config = load_config("smoke", ["run.methods=[real]", "generators.cvae.beta=0.5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert build_config(config.model_dump(mode="json")) == config


# --- CLI: help ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "says"), [
    ([], "Does synthetic training data help"),
    (["run"], "Run the study"),
    (["report"], "build report.html from the files of a run folder"),
    (["generate"], "Sample images per class"),
    (["config"], "Print the resolved config"),
    (["data"], "Data steps"),
    (["data", "audit"], "Find unreadable files"),
    (["data", "split"], "stratified group k-fold"),
    (["data", "phantom"], "Write the built-in simulated data set"),
])
def test_help_works_for_every_command(command: list[str], says: str) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output
    assert says in " ".join(result.output.replace("│", " ").split()), result.output


def test_help_lists_the_sub_commands() -> None:
    top = invoke("--help").output
    for name in ("run", "report", "generate", "config", "data"):
        assert name in top
    data = invoke("data", "--help").output
    for name in ("audit", "split", "phantom"):
        assert name in data


# --- CLI: config errors ------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "field"), [("split.folds=1", "split.folds"),
                                                 ("classifier.lr=-1", "classifier.lr"),
                                                 ("classifier.nope=3", "classifier.nope")])
def test_bad_set_values_exit_2_naming_the_field(override: str, field: str) -> None:
    assert_user_error(invoke("config", "--set", override), field)


def test_bad_set_value_on_a_data_command_exits_2(tmp_path: Path) -> None:
    assert_user_error(invoke("data", "split", "phantom", "--out", tmp_path / "s.csv", "-c", "smoke",
                             "--set", "split.val_fraction=0.9"), "split.val_fraction")
    assert not (tmp_path / "s.csv").exists()


def test_config_file_with_a_typo_key_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("classifier:\n  epocs: 3\n")
    assert_user_error(invoke("config", "-c", path), "classifier.epocs", str(path))
    path.write_text("clasifier:\n  epochs: 3\n")
    assert_user_error(invoke("config", "-c", path), "clasifier")


def test_non_mapping_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert_user_error(invoke("config", "-c", path), str(path), "top level must be a mapping")


def test_invalid_yaml_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("split: [1, 2\n")
    assert_user_error(invoke("config", "-c", path), str(path), "not valid YAML")


def test_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_user_error(invoke("config", "-c", missing), str(missing), "neither a file nor a preset")
    assert_user_error(invoke("config", "-c", "smokey"), "'smokey'", "smoke")


def test_config_command_prints_resolved_yaml() -> None:
    result = invoke("config", "-c", "smoke", "--set", "split.folds=4")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["split"]["folds"] == 4 and printed["phantom"]["size"] == 48
    assert build_config(printed) == load_config("smoke", ["split.folds=4"])


# --- CLI: data commands ------------------------------------------------------------------------


def test_data_audit_on_phantom_writes_audit_json_and_prints_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = invoke("data", "audit", "phantom", "--out", out, "-c", "smoke")
    assert result.exit_code == 0, result.output
    assert "audit of 42 images:" in result.stdout
    assert "near-duplicate groups" in result.stdout and f"written: {out / 'audit.json'}" in result.stdout
    report = json.loads((out / "audit.json").read_text())
    assert report["n_images"] == 42 and len(report["group_of"]) == 42
    assert report["load"] is None
    assert not (out / "load_summary.json").exists()
    expected = audit_records(make_phantom(load_config("smoke").phantom)).to_dict()
    assert report["near_groups"] == expected["near_groups"]


def test_data_audit_on_a_folder_writes_the_load_summary(tiny_busi: TinyBusi, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = invoke("data", "audit", tiny_busi.root, "--out", out, "-c", "smoke")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "load_summary.json").read_text())
    assert summary["images_read"] == 7 and summary["masks_read"] == 6 and summary["files_seen"] == 13
    assert json.loads((out / "audit.json").read_text())["load"]["images_read"] == 7


def test_data_audit_on_a_missing_folder_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data-set-folder-with-a-rather-long-name-to-exercise-wrapping"
    result = invoke("data", "audit", missing, "--out", tmp_path / "a")
    assert_user_error(result, str(missing))
    assert not (tmp_path / "a").exists()


def test_data_audit_on_a_folder_with_a_bad_file_exits_2_naming_it(tiny_busi: TinyBusi, tmp_path: Path) -> None:
    bad = tiny_busi.path("benign", "benign (1)_mask.png")
    bad.write_bytes(b"not a png")
    assert_user_error(invoke("data", "audit", tiny_busi.root, "--out", tmp_path / "a"), str(bad))
    ok = invoke("data", "audit", tiny_busi.root, "--out", tmp_path / "b", "--set", "data.on_bad_file=skip")
    assert ok.exit_code == 0, ok.output
    summary = json.loads((tmp_path / "b" / "load_summary.json").read_text())
    assert summary["images_read"] == 6 and summary["skipped_count"] == 2


def test_data_split_on_phantom_writes_a_csv_read_split_accepts(tmp_path: Path) -> None:
    out = tmp_path / "split.csv"
    result = invoke("data", "split", "phantom", "--out", out, "-c", "smoke", "--folds", "3", "--seed", "4")
    assert result.exit_code == 0, result.output
    assert f"written: {out}" in result.stdout
    config = load_config("smoke")
    records = make_phantom(config.phantom)
    audit = audit_records(records)
    split = read_split(out, records, audit)
    assert split.folds == [0, 1, 2]
    assert len(split.rows) == 3 * len(records)
    assert leaking_groups(split) == [] and split.notes == []
    for fold in split.folds:
        assert sorted(r["id"] for r in split.rows if r["fold"] == fold) == sorted(r.id for r in records)
        assert split.ids(fold, "val") and split.ids(fold, "test")


def test_data_split_holdout_gives_one_fold(tmp_path: Path) -> None:
    out = tmp_path / "holdout.csv"
    result = invoke("data", "split", "phantom", "--out", out, "-c", "smoke", "--holdout", "0.25")
    assert result.exit_code == 0, result.output
    records = make_phantom(load_config("smoke").phantom)
    split = read_split(out, records)
    assert split.folds == [0]
    assert 0.15 < len(split.ids(0, "test")) / len(records) < 0.35


def test_data_phantom_writes_a_busi_layout_the_loader_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "x"
    result = invoke("data", "phantom", out, "-c", "smoke")
    assert result.exit_code == 0, result.output
    assert "wrote 42 images" in result.stdout
    made = make_phantom(load_config("smoke").phantom)
    loaded = load_dataset(out, load_config("smoke").data)
    assert loaded.summary.skipped == [] and loaded.summary.images_read == 42
    assert [r.id for r in loaded.records] == [r.id for r in made]
    for a, b in zip(made, loaded.records, strict=True):
        assert a.label == b.label
        np.testing.assert_array_equal(a.image, b.image, err_msg=a.id)
        np.testing.assert_array_equal(a.mask, b.mask, err_msg=a.id)


def test_data_phantom_with_a_bad_override_exits_2(tmp_path: Path) -> None:
    assert_user_error(invoke("data", "phantom", tmp_path / "y", "--set", "phantom.size=4"), "phantom.size")
    assert not (tmp_path / "y").exists()
