"""The study: for every fold x seed x method, train a classifier on the fold's real training
part plus that method's synthetic images, and score it on the fold's real test part.

Run folder layout (every number in the report is recomputable from these files)::

    config.yaml, run.json                  resolved config; data source and config fingerprint
    data/load_summary.json, audit.json, split.csv
    generators/<method>/fold<f>_seed<s>/   fitted generator (its own format)
    synthetic/<method>/fold<f>_seed<s>/    generated images in the data set layout + manifest
    cells/<method>/fold<f>_seed<s>/        ids.json, classifier/ (checkpoints, history.csv),
                                           predictions.csv, metrics.json (written last)
    results/cells.csv, summary.json, report.html

A cell whose ``metrics.json`` exists is finished and skipped on a rerun; an interrupted cell
resumes from its generator's and classifier's checkpoints. A rerun whose config differs in
anything but the ``run`` section (methods, seeds, tracker) refuses to mix results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from busynth.accel import is_main_process
from busynth.cells import Cell, run_cell, score_synthetic_set
from busynth.config import StudyConfig
from busynth.errors import ConfigError
from busynth.evaluate.summary import summarize_fidelity
from busynth.external import check_study_overlap, load_external, score_and_summarize
from busynth.generators.base import generator_class
from busynth.progress import format_duration
from busynth.registry import REFERENCE, study_arms
from busynth.results import Protocol, aa_seed_halves, summarize_run
from busynth.rundir import check_method_settings, open_run_dir, prepare_data

log = logging.getLogger(__name__)


def study_cells(config: StudyConfig, folds: Sequence[int]) -> list[Cell]:
    """Cells in run order: fold, then seed, then method (so a fold's methods finish together).

    Classifier seed number ``i`` uses generator seed ``i mod run.generator_seeds``: a fold's
    generator is fitted ``generator_seeds`` times and each synthetic set is shared by the
    classifier seeds that map to it."""
    base, n_gen = config.run.base_seed, config.run.generator_seeds
    arms = study_arms(config.run.methods, config.synthesis.ratios, config.synthesis.filter is not None)
    cells = []
    for f in folds:
        seeds = [base + i for i in range(config.run.seeds)]
        cells += [Cell(m, f, s, base + (s - base) % n_gen) for s in seeds for m in arms]
        if REFERENCE in config.run.methods:  # with an odd seed count, the A/A row's last reference seed
            cells += [Cell(REFERENCE, f, s, base + (s - base) % n_gen) for s in aa_seed_halves(seeds)[1]
                      if s not in seeds]
    return cells


def validate_methods(config: StudyConfig) -> None:
    """Refuse invalid generator settings (and sections of unknown methods) before any work starts;
    ``run.methods`` itself is checked by the config."""
    for method, section in config.generators.items():
        generator_class(method).parse_config(section)


def cell_kinds(cells: Sequence[Cell], todo: Sequence[bool], run_dir: Path) -> list[tuple[str, bool]]:
    """(method, fits a generator) per cell: the first cell to be run of each unfitted generator fit
    also pays for the fit, the other cells of that fit only for a classifier."""
    pending: set[tuple[str, str]] = set()
    kinds = []
    for cell, needed in zip(cells, todo, strict=True):
        fit = (cell.generator, cell.generator_key)
        fits = (needed and cell.method != REFERENCE and fit not in pending
                and not (run_dir / "generators" / cell.generator / cell.generator_key / "generator.json").exists())
        if fits:
            pending.add(fit)
        kinds.append((cell.method, fits))
    return kinds


def remaining_seconds(kinds: Sequence[tuple[str, bool]], seconds: dict[tuple[str, bool], list[float]]) -> float:
    """Estimated seconds for cells of ``kinds``: the mean time of finished cells of the same kind, else
    of cells that also fit (or do not fit) a generator, else of all finished cells."""
    every = [t for ts in seconds.values() for t in ts]
    by_fit = {f: [t for (m, g), ts in seconds.items() if g == f for t in ts] for f in (True, False)}

    def estimate(kind: tuple[str, bool]) -> float:
        pool = seconds.get(kind) or by_fit[kind[1]] or every
        return float(np.mean(pool))

    return sum(estimate(k) for k in kinds) if every else 0.0


def run_study(config: StudyConfig, run_dir: Path, data: Path | None = None, split_file: Path | None = None,
              build_html: bool = True, external: dict[str, Path] | None = None) -> dict:
    """Run (or resume) the whole study in ``run_dir``; returns the results summary. ``external``
    ({name: folder}) are test sets from elsewhere that every cell's classifier scores at the end
    (``busynth.external``; loaded first, so a bad folder stops the run before any training)."""
    validate_methods(config)
    external_sets = [load_external(name, path, config) for name, path in (external or {}).items()]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = "phantom" if data is None else str(Path(data).resolve())
    open_run_dir(run_dir, config, source)
    check_method_settings(run_dir, config.run.methods, config)
    study = prepare_data(config, data, run_dir, split_file)
    for ext in external_sets:
        check_study_overlap(ext, study.records, config)
    log.info("split:\n%s", study.split.format(config.data.classes))
    folds = study.split.folds
    if config.run.only_folds is not None:
        unknown = sorted(set(config.run.only_folds) - set(folds))
        if unknown:
            raise ConfigError(f"run.only_folds: fold(s) {unknown} are not in the split (folds {list(folds)})")
        folds = [f for f in folds if f in config.run.only_folds]
    cells = study_cells(config, folds)
    if config.run.seeds < 3:
        log.warning("run.seeds=%d: with fewer than 3 classifier seeds per fold the intervals barely see training "
                    "randomness (the A/A row shows how much); use run.seeds=5 for a verdict", config.run.seeds)
    tracker = open_tracker(config, run_dir) if is_main_process() else None
    todo = [not (run_dir / "cells" / c.method / c.key / "metrics.json").exists() for c in cells]
    kinds = cell_kinds(cells, todo, run_dir)
    seconds: dict[tuple[str, bool], list[float]] = {}  # cells computed in this invocation, by kind: the ETA
    try:
        for i, cell in enumerate(cells, start=1):
            left = [kinds[j] for j in range(i - 1, len(cells)) if todo[j]]
            eta = f", ETA {format_duration(remaining_seconds(left, seconds))}" if seconds and todo[i - 1] else ""
            log.info("cell %d/%d: %s %s%s%s", i, len(cells), cell.method, cell.key,
                     "" if todo[i - 1] else " (done)", eta)
            started = time.perf_counter()
            row = run_cell(cell, config, study, run_dir, tracker.log if tracker else None)
            if todo[i - 1]:
                seconds.setdefault(kinds[i - 1], []).append(time.perf_counter() - started)
            if "dice" in row:
                log.info("  Dice %.3f, IoU %.3f, HD95 %.1f px", row["dice"], row["iou"], row["hd95"])
            else:
                log.info("  balanced accuracy %.3f, macro AUC %.3f, malignant AUC %.3f",
                         row["balanced_accuracy"], row["macro_auc"], row.get("malignant_auc", float("nan")))
    finally:
        if tracker:
            tracker.finish()
    for cell in cells:
        if cell.method != REFERENCE and cell.scores_synthetic_set:
            score_synthetic_set(cell, config, study, run_dir)
    arms = study_arms(config.run.methods, config.synthesis.ratios, config.synthesis.filter is not None)
    summarize_fidelity(run_dir, arms)
    protocol = Protocol.from_config(config.run)
    summary = summarize_run(run_dir, arms, config.data.classes, protocol)
    score_and_summarize(run_dir, config, external_sets, arms, protocol)
    if build_html:
        from busynth.report import build_report

        build_report(run_dir)
    return summary


def open_tracker(config: StudyConfig, run_dir: Path):
    """An accelerate tracker (wandb or tensorboard) when ``run.tracker`` asks for one, else None.

    Local CSV/JSON files are written either way; the tracker is an extra view.
    """
    name = config.run.tracker
    if name == "none":
        return None
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]():
        raise ConfigError(f"run.tracker={name} is not installed: pip install {name}")
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        tracker = cls(run_dir.name, logging_dir=str(run_dir / "trackers"))
    else:
        tracker = cls(run_dir.name, dir=str(run_dir / "trackers"))
    tracker.start()
    tracker.store_init_configuration(_flatten(config.model_dump(mode="json")))
    return tracker


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out
