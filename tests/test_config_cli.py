"""Config loading/validation and the command line (typer's CliRunner on busynth.cli.app)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TinyBusi
from typer.testing import CliRunner

from busynth.cli import app
from busynth.config import StudyConfig
from busynth.data.audit import audit_records
from busynth.data.busi import load_dataset
from busynth.data.phantom import make_phantom
from busynth.data.splits import leaking_groups, read_split
from busynth.errors import ConfigError
from busynth.presets import build_config, dump_config, load_config, parse_override, preset_names

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


# --- bad config and CLI input: refused before any work, naming the field or file ---------------


@pytest.fixture(scope="module")
def generators_imported() -> None:
    """Import every generator before CliRunner swaps the streams: transformers binds a log handler
    to the stderr of its first import, which CliRunner closes after that invocation."""
    from busynth.generators import available_methods, generator_class

    for method in available_methods()[1:]:
        generator_class(method)


def test_unknown_method_is_refused_by_the_config_itself() -> None:
    with pytest.raises(ConfigError, match="unknown method 'gan'") as info:
        load_config(None, ["run.methods=[real, gan]"])
    assert "run.methods" in str(info.value) and "cvae" in str(info.value)
    assert_user_error(invoke("config", "--set", "run.methods=[real, gan]"), "run.methods", "unknown method 'gan'")


def test_unknown_methods_on_the_run_command_are_all_named(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert_user_error(invoke("run", "-c", "smoke", "--methods", "real,gan,vae", "--out", out),
                      "run.methods", "'gan'", "'vae'")
    assert not out.exists()


@pytest.mark.parametrize(("override", "field"), [
    ("classifier.image_size=0", "classifier.image_size"),
    ("classifier.batch_size=0", "classifier.batch_size"),
    ("classifier.epochs=-1", "classifier.epochs"),
    ("classifier.width=0", "classifier.width"),
    ("classifier.depth=[1, 0, 1]", "classifier.depth"),
    ("classifier.depth=[]", "classifier.depth"),
    ("classifier.grad_accum=0", "classifier.grad_accum"),
    ("phantom.size=0", "phantom.size"),
    ("phantom.n_per_class={normal: -2}", "phantom.n_per_class"),
    ("split.folds=0", "split.folds"),
    ("split.val_fraction=0", "split.val_fraction"),
    ("run.seeds=0", "run.seeds"),
    ("run.bootstrap=-1", "run.bootstrap"),
    ("synthesis.ratio=0", "synthesis.ratio"),
    ("synthesis.ratio=-0.5", "synthesis.ratio"),
    ("data.max_pixels=0", "data.max_pixels"),
    ("data.classes=[normal, ../benign]", "data.classes"),
    ("data.classes=[normal, a/b]", "data.classes"),
])
def test_zero_negative_and_path_like_values_are_refused_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("smoke", [override])
    assert field in str(info.value)


@pytest.mark.parametrize(("args", "field"), [
    (["run", "--folds", "0"], "split.folds"),
    (["run", "--seeds", "0"], "run.seeds"),
    (["run", "--methods", ","], "run.methods"),
    (["data", "split", "phantom", "--folds", "-3"], "split.folds"),
    (["data", "split", "phantom", "--holdout", "0"], "split.test_fraction"),
])
def test_zero_or_negative_cli_options_exit_2_naming_the_field(tmp_path: Path, args: list[str], field: str) -> None:
    out = tmp_path / "out"
    assert_user_error(invoke(*args, "-c", "smoke", "--out", out), field)
    assert not out.exists()


def test_an_override_changes_only_its_section_not_a_yaml_alias_of_it() -> None:
    """smoke.yaml aliases generators.controlnet.sd_lora to generators.sd-lora (``*sd_lora_smoke``)."""
    config = load_config("smoke", ["generators.sd-lora.image_size=64"])
    assert config.generators["sd-lora"]["image_size"] == 64
    assert config.generators["controlnet"]["sd_lora"]["image_size"] == 32


@pytest.mark.parametrize(("overrides", "needles"), [
    (["generators.cvae.batch_size=0"], ["generators.cvae.batch_size"]),
    (["generators.cvae.steps=-5"], ["generators.cvae.steps"]),
    (["generators.cvae.image_size=20"], ["generators.cvae", "image_size 20", "divisible by 2**len(channels) = 8"]),
    (["generators.sd-lora.image_size=36"], ["generators.sd-lora", "image_size 36", "divisible by 8"]),
    (["generators.sd-lora.autoencoder_crop=18"], ["generators.sd-lora", "autoencoder_crop 18", "factor 4"]),
    (["generators.sd-lora.lora_training.batch_size=0"], ["generators.sd-lora.lora_training.batch_size"]),
    (["generators.sd-lora.lora_training.steps=0"], ["generators.sd-lora", "lora_training.steps must be at least 1"]),
    (["generators.sd-lora.tiny.vae_channels=[8, -8]"], ["generators.sd-lora.tiny", "must be positive"]),
    (["generators.sd-lora.sampling_steps=0"], ["generators.sd-lora.sampling_steps"]),
    (["generators.controlnet.sd_lora.image_size=20"], ["generators.controlnet.sd_lora", "image_size 20"]),
    (["generators.controlnet.training.steps=0"], ["generators.controlnet.training", "steps must be at least 1"]),
    (["generators.controlnet.masks.scale_range=[0, 1]"], ["generators.controlnet.masks.scale_range"]),
    (["generators.controlnet.conditioning_embedding_channels=[8, 0]"],
     ["generators.controlnet.conditioning_embedding_channels"]),
    (["generators.sd-lora.source=pretrained", "generators.sd-lora.pretrained_model=/no/such/dir"],
     ["generators.sd-lora.pretrained_model", "/no/such/dir", "no such folder"]),
    (["generators.sd-lora.source=pretrained", "generators.sd-lora.pretrained_model=../models/sd15"],
     ["generators.sd-lora.pretrained_model", "../models/sd15", "no such folder"]),
    (["generators.controlnet.pretrained_controlnet=/no/such/dir"],
     ["generators.controlnet.pretrained_controlnet", "/no/such/dir", "no such folder"]),
    (["generators.controlnet.base=/no/such/dir"], ["generators.controlnet.base", "/no/such/dir", "no such folder"]),
    (["generators.gan.steps=1"], ["unknown method 'gan'"]),
    (["generators.classical.image_size=-8"], ["generators.classical.image_size"]),
    (["generators.classical.scale_range=[0, 1.1]"], ["generators.classical.scale_range"]),
    (["generators.classical.gamma_range=[1.2, 0.8]"], ["generators.classical.gamma_range"]),
    (["generators.classical.contrast_range=[-1, 1]"], ["generators.classical.contrast_range"]),
])
@pytest.mark.usefixtures("generators_imported")
def test_bad_generator_settings_stop_the_run_before_any_work(tmp_path: Path, overrides: list[str],
                                                             needles: list[str]) -> None:
    out = tmp_path / "run"
    args = [a for o in overrides for a in ("--set", o)]
    assert_user_error(invoke("run", "-c", "smoke", "--methods", "real", "--out", out, *args), *needles)
    assert not out.exists()


def _fake_sd_folder(root: Path, vae_blocks: int) -> Path:
    """The two files config validation reads of a diffusers Stable Diffusion folder."""
    (root / "vae").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8] * vae_blocks}))
    return root


@pytest.mark.usefixtures("generators_imported")
def test_pretrained_resolution_must_fit_the_local_autoencoder_factor(tmp_path: Path) -> None:
    folder = _fake_sd_folder(tmp_path / "sd", vae_blocks=5)  # an f16 autoencoder
    base = ["generators.sd-lora.source=pretrained", f"generators.sd-lora.pretrained_model={folder}"]
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    cfg = load_config("smoke", [*base, "generators.sd-lora.image_size=48"]).generators["sd-lora"]
    assert SDLoraGenerator.parse_config(cfg).image_size == 48
    out = tmp_path / "run"
    result = invoke("run", "-c", "smoke", "--methods", "real", "--out", out, *(a for o in base for a in ("--set", o)),
                    "--set", "generators.sd-lora.image_size=40")
    assert_user_error(result, "generators.sd-lora", "image_size 40", "divisible by 16", str(folder))
    assert not out.exists()
    (folder / "model_index.json").unlink()
    with pytest.raises(ConfigError, match="no model_index.json") as info:
        SDLoraGenerator.parse_config({"source": "pretrained", "pretrained_model": str(folder)})
    assert "generators.sd-lora.pretrained_model" in str(info.value)


@pytest.mark.usefixtures("generators_imported")
def test_folders_only_a_fit_reads_are_not_needed_to_reload_a_controlnet_artifact(tmp_path: Path) -> None:
    """``base`` and ``pretrained_controlnet`` start a fit; the artifact holds copies of what it needs."""
    from busynth.generators.diffusion.controlnet import ControlNetGenerator

    gone = {"base": str(tmp_path / "gone-base"), "pretrained_controlnet": str(tmp_path / "gone-cn")}
    with pytest.raises(ConfigError) as info:
        ControlNetGenerator.parse_config(gone)
    assert "generators.controlnet.base" in str(info.value)
    assert "generators.controlnet.pretrained_controlnet" in str(info.value)
    assert ControlNetGenerator.parse_config(gone, fit_inputs=False).base == gone["base"]


def _classical_fit(folder: Path) -> Path:
    from busynth.generators.classical import ClassicalAugmenter

    records = make_phantom(load_config("smoke").phantom)[::6]
    return ClassicalAugmenter({"image_size": 16}, classes=["normal", "benign", "malignant"]).fit(records, folder)


def test_generate_refuses_missing_or_wrong_checkpoint_folders(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    assert_user_error(invoke("generate", "cvae", "--checkpoint", missing, "--out", tmp_path / "g"),
                      "--checkpoint", str(missing), "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(invoke("generate", "cvae", "--checkpoint", empty, "--out", tmp_path / "g"),
                      str(empty), "no generator.json")
    fit = _classical_fit(tmp_path / "classical")
    assert_user_error(invoke("generate", "cvae", "--checkpoint", fit, "--out", tmp_path / "g"),
                      str(fit), "'classical' generator, not 'cvae'")
    assert_user_error(invoke("generate", "gan", "--checkpoint", fit, "--out", tmp_path / "g"), "unknown method 'gan'")
    assert_user_error(invoke("generate", "classical", "--checkpoint", fit, "--n", "0", "--out", tmp_path / "g"),
                      "--n must be positive")
    assert_user_error(invoke("generate", "classical", "--checkpoint", fit, "--classes", "benign,cats",
                             "--out", tmp_path / "g"), "--classes", "cats")
    assert not (tmp_path / "g").exists()
    ok = invoke("generate", "classical", "--checkpoint", fit, "--classes", "benign", "--n", "2",
                "--out", tmp_path / "g")
    assert ok.exit_code == 0, ok.output
    assert len((tmp_path / "g" / "manifest.jsonl").read_text().splitlines()) == 2


def test_generate_refuses_a_generator_json_that_is_not_one(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "generator.json").write_text("[1, 2]")
    assert_user_error(invoke("generate", "classical", "--checkpoint", folder, "--out", tmp_path / "g"),
                      str(folder / "generator.json"), "not a generator description")
    (folder / "generator.json").write_text("{oops")
    assert_user_error(invoke("generate", "classical", "--checkpoint", folder, "--out", tmp_path / "g"),
                      str(folder / "generator.json"), "not valid JSON")


@pytest.mark.parametrize(("row", "needles"), [
    ("benign_999,test", ["not in the data set", "line 44: 'benign_999'"]),
    ("../../etc/passwd,test", ["'../../etc/passwd'", "'..' is not allowed"]),
    ("/etc/passwd,test", ["'/etc/passwd'", "absolute path"]),
])
@pytest.mark.usefixtures("generators_imported")
def test_run_with_a_split_file_naming_unknown_or_escaping_entries_exits_2(tmp_path: Path, row: str,
                                                                          needles: list[str]) -> None:
    records = make_phantom(load_config("smoke").phantom)
    key = "id" if row.startswith("benign") else "path"
    split = tmp_path / "split.csv"
    split.write_text(f"{key},split\n" + "".join(f"{getattr(r, key)},train\n" for r in records) + row + "\n")
    out = tmp_path / "run"
    result = invoke("run", "-c", "smoke", "--methods", "real", "--split-file", split, "--out", out)
    line = f"{split}:{len(records) + 2}" if key == "path" else str(split)
    assert_user_error(result, line, *needles)
    assert not list(out.glob("cells/*/fold*")) and not (out / "data" / "split.csv").exists()


@pytest.mark.parametrize("override", [
    "classifier.mixed_precision=no",
    "generators.cvae.mixed_precision=no",
    "generators.sd-lora.mixed_precision=no",
    "generators.sd-lora.sampling_precision=no",
    "generators.controlnet.mixed_precision=no",
])
def test_an_unquoted_no_precision_means_no_not_false(override: str) -> None:
    """YAML 1.1 reads ``no`` as False; a precision field takes it as the setting "no"."""
    from busynth.rundir import method_settings

    def resolved(text: str) -> str:
        config = load_config("cpu", [text])
        section, *rest = text.split("=")[0].split(".")
        if section == "classifier":
            return config.classifier.mixed_precision
        return method_settings(rest[0], config)[rest[1]]

    assert resolved(override) == "no"
    with pytest.raises(ConfigError, match="precision"):  # yes (True) is no precision at all
        resolved(override.replace("=no", "=yes"))


def test_an_old_top_level_classical_section_says_where_it_moved(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("classical:\n  image_size: 64\n")
    with pytest.raises(ConfigError, match="moved to 'generators.classical'"):
        load_config(str(old))
    assert_user_error(invoke("run", "-c", "smoke", "--set", "classical.image_size=64", "--out", tmp_path / "o"),
                      "generators.classical")
