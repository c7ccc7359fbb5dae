"""Presets and overrides: a preset or user YAML file merged over the defaults, dotted ``--set``
overrides applied, validated into a :class:`busynth.config.StudyConfig`; and the resolved YAML out.

A preset (``smoke``, ``demo``, ``cpu``, ``sd15``) is a YAML file in ``busynth/configs``. Errors
name the file and field in one message (ConfigError).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from busynth.config import StudyConfig
from busynth.errors import ConfigError


def preset_names() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    folder = resources.files("busynth") / "configs"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix and str(source) in preset_names():
        text = (resources.files("busynth") / "configs" / f"{source}.yaml").read_text()
        where = f"preset '{source}'"
    elif path.is_file():
        text = path.read_text()
        where = str(path)
    else:
        raise ConfigError(
            f"config '{source}' is neither a file nor a preset (presets: {', '.join(preset_names())})"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping, got {type(data).__name__}")
    return _unshared(data)


def _unshared(node: Any) -> Any:
    """A copy in which no mapping or list is shared: a YAML alias (``*name``) becomes its own copy,
    so an override of one section never changes the section it was aliased from."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value`` and parse value as YAML (so numbers and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {exc}") from exc


def _format_validation_error(exc: ValidationError, where: str) -> str:
    lines = [f"invalid config ({where}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], where: str = "config") -> StudyConfig:
    """Validate a plain dict into a StudyConfig, raising ConfigError naming each bad field."""
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where)) from None


def load_config(
    source: str | Path | None = "cpu", overrides: list[str] | tuple[str, ...] = ()
) -> StudyConfig:
    """Read a preset name or YAML file (None = built-in defaults), apply overrides, validate."""
    data: dict[str, Any] = _read_yaml(source) if source is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return build_config(data, where=str(source) if source is not None else "defaults")


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML text (every field, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
