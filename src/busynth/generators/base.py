"""The generator interface every method of the study implements, and writing its samples out.

A generator is built from its own config, ``fit`` on a fold's training records only,
and ``sample``s images (and masks) per class. ``load(dir)`` rebuilds it from the artifact
folder ``fit`` wrote, so sampling never needs the training command again.
"""

from __future__ import annotations

import abc
import importlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ValidationError

from busynth.config import StudyConfig, SynthesisConfig, is_plain_name
from busynth.data.records import Record, check_inside, class_counts
from busynth.errors import ConfigError, DataError, RunStateError
from busynth.io import changed_keys, fit_key, read_json, write_json, write_png, write_text
from busynth.registry import generator_method

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Synthetic:
    """One generated image: uint8 (H, W), an optional bool mask, its class and provenance."""

    image: np.ndarray
    label: str
    mask: np.ndarray | None = None
    seed: int = 0


class Generator(abc.ABC):
    """Base class of all generators. Subclasses set ``name`` and ``config_model``."""

    name: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    # True when the generator needs masks to sample (ControlNet); the study passes training masks.
    needs_masks: ClassVar[bool] = False
    # Config fields that only affect sampling or bookkeeping: a fit may be reused when they change.
    sampling_fields: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: BaseModel | dict[str, Any] | None = None, classes: Sequence[str] = ()):
        self.config = self.parse_config(config)
        self.classes = list(classes)
        self.train_ids: list[str] = []

    @classmethod
    def parse_config(cls, config: BaseModel | dict[str, Any] | None, fit_inputs: bool = True) -> BaseModel:
        """Validate a dict (or None for defaults) into this generator's config model. With
        ``fit_inputs`` False (reloading a fitted artifact) inputs only a fit reads, such as a folder
        to start from, are not checked (validation context ``{"fit_inputs": False}``)."""
        return validate_settings(cls.config_model, cls.name, config, fit_inputs)

    @abc.abstractmethod
    def fit(self, train_records: Sequence[Record], out_dir: Path, seed: int = 0) -> Path:
        """Train on ``train_records`` (a fold's training part only); return the artifact folder."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Path) -> Generator:
        """Rebuild a fitted generator from the folder ``fit`` returned."""

    @abc.abstractmethod
    def sample(
        self, label: str, n: int, seed: int = 0, masks: Sequence[np.ndarray] | None = None
    ) -> list[Synthetic]:
        """Generate ``n`` images of class ``label``; deterministic for a seed."""

    def fit_identity(self, seed: int) -> dict[str, Any]:
        """What makes two fits the same: classes, training ids and seed (the config is compared too)."""
        return {"classes": self.classes, "train_ids": self.train_ids, "seed": seed}

    def use_sampling_settings(self, section: BaseModel | dict[str, Any] | None) -> None:
        """Take the ``sampling_fields`` of ``section`` (this method's section of the study's config): a
        finished fit that was loaded samples as the study asks, not as the config saved with the fit."""
        wanted = self.parse_config(section, fit_inputs=False)
        self.config = self.config.model_copy(update={k: getattr(wanted, k) for k in self.sampling_fields})

    def check_same_fit(self, where: Path, found: dict[str, Any], seed: int) -> None:
        """Refuse to reuse or resume ``where`` when ``found`` (its saved identity and config) comes
        from a fit with other data, seed or training settings (their fit keys differ: the message names
        the fields); sampling fields may differ, and a setting added since counts at its default."""
        trained = lambda config: {k: v for k, v in config.items() if k not in self.sampling_fields}
        mine = {**self.fit_identity(seed), "config": trained(self.config.model_dump(mode="json"))}
        theirs = {**{k: found.get(k) for k in mine}, "config": trained(found.get("config", {}))}
        defaults = {"config": trained(self.parse_config(None, fit_inputs=False).model_dump(mode="json"))}
        differ = [] if fit_key(theirs) == fit_key(mine) else changed_keys(theirs, mine, defaults)
        if differ:
            raise RunStateError(f"{where} was written by a different {self.name} fit ({', '.join(differ)} "
                                "differ); use a new output folder or delete it")

    def reuse_finished_fit(self, out_dir: Path, seed: int) -> bool:
        """Load the finished fit in ``out_dir`` (its ``generator.json`` is written last) and return
        True when it was made from the same data, seed and settings; refuse a different one; return
        False when there is none. Subclasses using it implement ``_load_artifact``."""
        if not (Path(out_dir) / "generator.json").is_file():
            return False
        info = read_generator_info(out_dir)
        self.check_same_fit(out_dir, info, seed)
        log.info("%s: %s already holds a finished fit; not training again", self.name, out_dir)
        self._load_artifact(Path(out_dir), info)
        return True

    def _load_artifact(self, directory: Path, info: dict[str, Any]) -> None:
        raise NotImplementedError(f"{self.name} does not reload its artifacts through _load_artifact")

    def _remember_training_ids(self, train_records: Sequence[Record]) -> None:
        if not train_records:
            raise ValueError(f"{self.name}: fit needs at least one training record")
        self.train_ids = [r.id for r in train_records]
        self.classes = self.classes or sorted({r.label for r in train_records})


# --- the method registry (busynth.registry) -------------------------------------------------


def generator_class(name: str) -> type[Generator]:
    """The generator class of method ``name`` (imported now), with a clear error for unknown names."""
    module, _, attribute = generator_method(name).generator.partition(":")
    return getattr(importlib.import_module(module), attribute)


def settings_model(name: str) -> type[BaseModel]:
    """The settings model of method ``name``: ``Method.settings``, imported without the generator's
    module (a diffusion generator's imports diffusers, seconds), else the class's ``config_model``."""
    path = generator_method(name).settings
    if not path:
        return generator_class(name).config_model
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def parse_settings(name: str, config: BaseModel | dict[str, Any] | None, fit_inputs: bool = True) -> BaseModel:
    """``Generator.parse_config`` of method ``name``, through :func:`settings_model`."""
    return validate_settings(settings_model(name), name, config, fit_inputs)


def validate_settings(model: type[BaseModel], name: str, config: BaseModel | dict[str, Any] | None,
                      fit_inputs: bool) -> BaseModel:
    """``config`` (a dict, None for the defaults, or already a ``model``) validated into ``model``,
    errors as one ConfigError naming each field under ``generators.<name>``."""
    if isinstance(config, model):
        return config
    try:
        return model.model_validate(dict(config or {}), context={"fit_inputs": fit_inputs})
    except ValidationError as exc:
        section = f"generators.{name}"
        msgs = "; ".join(f"{'.'.join([section, *map(str, e['loc'])])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid {name} settings: {msgs}") from None


def build_generator(name: str, study: StudyConfig) -> Generator:
    """Instantiate the generator of a method with its section of ``study.generators``."""
    cls = generator_class(name)
    return cls(study.generators.get(name, {}), classes=study.data.classes)


# --- how many to generate, and writing samples out ------------------------------------------


def synthetic_counts(
    train_records: Sequence[Record], classes: Sequence[str], cfg: SynthesisConfig
) -> dict[str, int]:
    """Images to generate per class: ratio x real count, or top-up to the majority when balancing."""
    counts = class_counts(train_records, classes)
    if cfg.balance:
        top = max(counts.values())
        return {c: top - n for c, n in counts.items()}
    return {c: math.floor(cfg.ratio * n + 0.5) for c, n in counts.items()}


def write_samples(
    samples: Sequence[Synthetic], out_dir: Path, generator: str, checkpoint: str | Path
) -> Path:
    """Write samples in the data set's own layout (``<class>/<class> (k).png`` and
    ``_mask.png``) plus ``manifest.jsonl`` (generator, checkpoint, seed, label, files).

    Numbering continues after images already in ``out_dir``; returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    entries = read_manifest(out_dir)  # refuses a manifest whose paths leave out_dir
    lines = [json.dumps(entry) for entry in entries]
    next_index: dict[str, int] = {}
    for entry in entries:
        next_index[entry["label"]] = max(next_index.get(entry["label"], 0), entry["index"])
    new_lines = []
    for s in samples:
        if not is_plain_name(s.label):
            raise ConfigError(f"{generator}: class name {s.label!r} is not a plain folder name")
        k = next_index.get(s.label, 0) + 1
        next_index[s.label] = k
        image_rel = f"{s.label}/{s.label} ({k}).png"
        write_png(out_dir / image_rel, s.image)
        entry: dict[str, Any] = {
            "generator": generator,
            "checkpoint": str(checkpoint),
            "label": s.label,
            "index": k,
            "seed": s.seed,
            "image": image_rel,
        }
        if s.mask is not None:
            mask_rel = f"{s.label}/{s.label} ({k})_mask.png"
            write_png(out_dir / mask_rel, s.mask)
            entry["mask"] = mask_rel
        new_lines.append(json.dumps(entry))
    write_text(manifest, "\n".join([*lines, *new_lines]) + "\n")
    return out_dir


def read_manifest(folder: Path) -> list[dict]:
    """The entries of ``folder/manifest.jsonl`` ([] when there is none). Each line must be a JSON
    object with ``label``, ``index``, ``seed`` and ``image`` (and optionally ``mask``) whose file
    paths are relative and stay inside ``folder``; anything else raises DataError naming the line."""
    manifest = Path(folder) / MANIFEST
    if not manifest.exists():
        return []
    entries = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not a JSON object ({exc})") from None
        if not isinstance(entry, dict) or not {"label", "index", "seed", "image"} <= set(entry):
            raise DataError(f"{where}: needs the keys label, index, seed and image")
        if not isinstance(entry["label"], str) or not isinstance(entry["index"], int):
            raise DataError(f"{where}: label must be a string and index an integer")
        for key in ("image", "mask"):
            if key in entry:
                check_inside(folder, entry[key], f"{where}: {key}")
        entries.append(entry)
    return entries


def save_generator_info(directory: Path, name: str, config: BaseModel, extra: dict | None = None) -> None:
    """Write ``generator.json`` (method name, config, training ids) into an artifact folder."""
    write_json(Path(directory) / "generator.json",
               {"name": name, "config": config.model_dump(mode="json"), **(extra or {})})


def read_generator_info(directory: Path, expected: str | None = None) -> dict[str, Any]:
    """Read ``generator.json`` from an artifact folder, with a clear error when the folder or the
    file is missing, the file is not a JSON object, or (given ``expected``) it holds another method."""
    directory = Path(directory)
    path = directory / "generator.json"
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such generator folder")
    if not path.is_file():
        raise ConfigError(f"{directory}: not a generator folder (no generator.json)")
    try:
        info = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunStateError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or "config" not in info:
        raise RunStateError(f"{path}: not a generator description (no 'config')")
    if expected is not None and info.get("name") != expected:
        raise ConfigError(f"{directory} holds a {info.get('name')!r} generator, not {expected!r}")
    return info
