"""The study's methods: their names, where each generator class lives, and which run first.

A leaf module (it imports nothing of busynth but :mod:`busynth.errors`), so the config, which
checks ``run.methods``, and :mod:`busynth.generators`, which imports the classes, both use it
without importing each other. A generator class is named by its import path and imported only
when a method is used (:func:`busynth.generators.generator_class`), so naming a method in a
config never imports model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from busynth.errors import ConfigError

REFERENCE = "real"  # the method without synthetic data, every other method's reference
CELLS = "cells"  # the run folder's cells/<method>/<fold>_<seed>/ tree


def cell_key(fold: int, seed: int) -> str:
    """The name of a cell's (or generator fit's) folder: ``fold<f>_seed<s>``."""
    return f"fold{fold}_seed{seed}"


def cell_folder(run_dir: str | Path, method: str, key: str = "") -> Path:
    """``cells/<method>/<key>/`` of a run folder (``cells/<method>/`` without ``key``)."""
    return Path(run_dir) / CELLS / method / key  # joining "" adds nothing


def fit_outputs(method: str, key: str, run_dir: str | Path) -> list[tuple[Path, str]]:
    """A generator fit's folders -- the fit, its synthetic set -- each with the file written last."""
    run_dir = Path(run_dir)
    return [(run_dir / "generators" / method / key, "generator.json"),
            (run_dir / "synthetic" / method / key, "done.json")]


@dataclass(frozen=True)
class Method:
    """A generator method: its name, its generator class as ``"module:Class"``, and the methods
    whose fit of the same fold it builds on when they are in the same run (they run before it)."""

    name: str
    generator: str
    after: tuple[str, ...] = ()
    masks: bool = False  # its images come with lesion masks (usable for segmentation)
    # Its settings model as "module:Class" when that module is lighter than the generator's (checking
    # a config then imports no model code); empty: the generator class's config_model.
    settings: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("classical", "busynth.generators.classical:ClassicalAugmenter", masks=True),
    Method("cvae", "busynth.generators.cvae:CVAEGenerator"),
    Method("sd-lora", "busynth.generators.diffusion.sd_lora:SDLoraGenerator",
           settings="busynth.generators.diffusion.settings:SDLoraConfig"),
    # controlnet builds on the same fold's sd-lora fit when sd-lora is in the run: sd-lora runs first.
    Method("controlnet", "busynth.generators.diffusion.controlnet:ControlNetGenerator", after=("sd-lora",),
           masks=True, settings="busynth.generators.diffusion.settings:ControlNetConfig"),
)}


def makes_masks(name: str) -> bool:
    """True for ``real`` and for generator methods whose images come with lesion masks."""
    return name == REFERENCE or (name in METHODS and METHODS[name].masks)


def arm_name(method: str, ratio: float) -> str:
    """The name of a dose-response arm: generator method ``method`` at ``synthesis.ratios`` entry ``ratio``."""
    return f"{method}@{ratio:g}"


FILTERED = "+filter"  # suffix of the arm of a generator whose images pass the real-only classifier (synthesis.filter)


def arm_parts(name: str) -> tuple[str, float | None]:
    """(generator method, ratio) of an arm name: ``cvae@0.5`` -> ``("cvae", 0.5)``, ``cvae+filter`` ->
    ``("cvae", None)``; a plain method has ratio None."""
    method, sep, ratio = name.partition("@")
    return method.removesuffix(FILTERED), (float(ratio) if sep else None)


def study_arms(methods: Sequence[str], ratios: Sequence[float] | None = None, filtered: bool = False) -> list[str]:
    """What the study compares: ``methods``, each generator method replaced by one arm per ratio when
    ``ratios`` are given, or followed by its filtered arm (``cvae+filter``) when ``filtered`` (then
    ``real``, whose classifier does the filtering, comes first); ``real`` stays one arm."""
    if filtered:
        ordered = [m for m in methods if m == REFERENCE] + [m for m in methods if m != REFERENCE]
        return [a for m in ordered for a in ([m] if m == REFERENCE else [m, m + FILTERED])]
    if not ratios:
        return list(methods)
    return [m if m == REFERENCE else arm_name(m, r) for m in methods for r in ([None] if m == REFERENCE else ratios)]


def bases(method: str, methods: Sequence[str]) -> list[str]:
    """The methods among ``methods`` whose fit of the same fold ``method`` builds on (``Method.after``)."""
    entry = METHODS.get(method)
    return [m for m in (entry.after if entry is not None else ()) if m in methods]


def available_methods() -> list[str]:
    """Method names the study accepts: ``real`` plus every generator method, sorted."""
    return [REFERENCE, *sorted(METHODS)]


def generator_method(name: str) -> Method:
    """The generator method called ``name``; ConfigError naming the available ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return METHODS[name]


def unknown_methods(names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are no method of the study (``real`` included), in order."""
    known = set(available_methods())
    return [n for n in names if n not in known]


def order_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` with every method's ``after`` dependencies (those present) moved before it;
    otherwise in the given order. E.g. ``[controlnet, real, sd-lora]`` -> ``[sd-lora, controlnet, real]``.
    A cycle of dependencies raises ConfigError naming it."""
    ordered: list[str] = []

    def visit(method: str, path: tuple[str, ...]) -> None:
        if method in ordered:
            return
        if method in path:
            raise ConfigError(f"methods depend on each other in a cycle: {' -> '.join([*path, method])}")
        for dependency in bases(method, methods):
            visit(dependency, (*path, method))
        ordered.append(method)

    for method in methods:
        visit(method, ())
    return ordered
