"""Methods run in dependency order whatever order the user lists them (controlnet after sd-lora)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from busynth import registry
from busynth.cli import app
from busynth.errors import ConfigError
from busynth.experiment import study_cells, validate_methods
from busynth.generators import order_methods
from busynth.generators.base import generator_class, settings_model
from busynth.presets import load_config


@pytest.mark.parametrize(("given", "ordered"), [
    (["controlnet", "sd-lora"], ["sd-lora", "controlnet"]),
    (["controlnet", "real", "sd-lora"], ["sd-lora", "controlnet", "real"]),
    (["cvae", "controlnet", "classical", "sd-lora"], ["cvae", "sd-lora", "controlnet", "classical"]),
    (["real", "sd-lora", "controlnet", "cvae"], ["real", "sd-lora", "controlnet", "cvae"]),  # already fine
    (["classical", "controlnet", "real"], ["classical", "controlnet", "real"]),  # no sd-lora: nothing to move
])
def test_order_methods_moves_dependencies_first_and_keeps_the_rest(given: list[str], ordered: list[str]) -> None:
    assert order_methods(given) == ordered


def test_the_config_orders_run_methods_and_every_fold_runs_sd_lora_before_controlnet() -> None:
    config = load_config("smoke", ["run.methods=[controlnet,real,sd-lora]"])
    assert config.run.methods == ["sd-lora", "controlnet", "real"]
    cells = study_cells(config, [0, 1])
    for fold in (0, 1):
        methods = [c.method for c in cells if c.fold == fold]
        assert methods.index("sd-lora") < methods.index("controlnet")


def test_the_cli_shows_the_order_it_will_run() -> None:
    result = CliRunner().invoke(app, ["config", "-c", "smoke", "--set", "run.methods=[controlnet,sd-lora]"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["run"]["methods"] == ["sd-lora", "controlnet"]


def test_a_dependency_cycle_is_refused_naming_it(monkeypatch) -> None:
    monkeypatch.setitem(registry.METHODS, "a", registry.Method("a", "nowhere:A", after=("b",)))
    monkeypatch.setitem(registry.METHODS, "b", registry.Method("b", "nowhere:B", after=("a",)))
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        order_methods(["a", "b"])


def test_checking_every_methods_settings_imports_no_model_library(tmp_path) -> None:
    for name in registry.METHODS:  # the light settings model is the generator's own
        assert settings_model(name) is generator_class(name).config_model, name
    script = (
        "import sys\n"
        "from busynth.experiment import validate_methods\n"
        "from busynth.presets import load_config\n"
        "from busynth.rundir import check_method_settings\n"
        "config = load_config('smoke', ['run.methods=[real,classical,cvae,sd-lora,controlnet]'])\n"
        "validate_methods(config)\n"
        f"check_method_settings({str(tmp_path)!r}, config.run.methods, config)\n"
        "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"  # the run's process checks its config without them (seconds each)
    assert (tmp_path / "cells" / "controlnet" / "settings.json").is_file()
    with pytest.raises(ConfigError, match=r"invalid sd-lora settings: .*image_size 100 must be divisible by 32"):
        validate_methods(load_config("smoke", ['generators={"sd-lora": {"image_size": 100}}']))
