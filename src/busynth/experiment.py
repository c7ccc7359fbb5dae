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
    locks/                                 claims of the units being computed (busynth.locks)

A cell whose ``metrics.json`` exists is finished and skipped on a rerun; an interrupted cell
resumes from its generator's and classifier's checkpoints. Who computes the cells, and how several
workers share one folder: ``busynth.executors``. A rerun whose config differs in
anything but the ``run`` section (methods, seeds, tracker) refuses to mix results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from busynth.accel import is_main_process
from busynth.cells import Cell
from busynth.cluster import ray_session
from busynth.config import StudyConfig
from busynth.errors import ConfigError
from busynth.evaluate.summary import summarize_fidelity
from busynth.executors import run_local, run_ray, score_local
from busynth.external import check_study_overlap, load_external, score_and_summarize
from busynth.generators.base import parse_settings
from busynth.locks import claim
from busynth.registry import REFERENCE, study_arms
from busynth.results import Protocol, aa_seed_halves, summarize_run
from busynth.rundir import StudyData, check_method_settings, open_run_dir, prepare_data, reuse_fits

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
        parse_settings(method, section)


def run_study(config: StudyConfig, run_dir: Path, data: Path | None = None, split_file: Path | None = None,
              build_html: bool = True, external: dict[str, Path] | None = None,
              synthetic_from: Path | None = None) -> dict:
    """Run (or resume) the whole study in ``run_dir``; returns the results summary. ``external``
    ({name: folder}) are test sets from elsewhere that every cell's classifier scores at the end
    (``busynth.external``; loaded first, so a bad folder stops the run before any training).
    ``synthetic_from`` is another run folder whose finished generator fits and synthetic sets this
    run reuses (``rundir.reuse_fits``)."""
    validate_methods(config)
    external_sets = [load_external(name, path, config) for name, path in (external or {}).items()]
    run_dir = Path(run_dir)
    if config.run.executor == "ray":
        if config.run.tracker != "none":
            log.warning("run.tracker=%s: with run.executor=ray the tracker gets no per-epoch metrics (the "
                        "cells run in Ray workers); the run folder has them all", config.run.tracker)
        with ray_session(config):  # Ray starts while the data are prepared here
            study, cells = prepare_study(config, run_dir, data, split_file, external_sets, synthetic_from)
            run_ray(cells, config, study, run_dir)
    else:
        study, cells = prepare_study(config, run_dir, data, split_file, external_sets, synthetic_from)
        tracker = open_tracker(config, run_dir) if is_main_process() else None
        try:
            run_local(cells, config, study, run_dir, tracker.log if tracker else None)
            score_local(cells, config, study, run_dir)
        finally:
            if tracker:
                tracker.finish()
    arms = study_arms(config.run.methods, config.synthesis.ratios, config.synthesis.filter is not None)
    summarize_fidelity(run_dir, arms)
    protocol = Protocol.from_config(config.run)
    summary = summarize_run(run_dir, arms, config.data.classes, protocol)
    score_and_summarize(run_dir, config, external_sets, arms, protocol)
    if build_html:
        from busynth.report import build_report

        build_report(run_dir)
    return summary


def prepare_study(config: StudyConfig, run_dir: Path, data: Path | None, split_file: Path | None,
                  external_sets: Sequence, synthetic_from: Path | None = None) -> tuple[StudyData, list[Cell]]:
    """The run folder's settings and data stages (under the folder's ``run`` claim), the generator
    fits reused from ``synthetic_from`` (under it too), and the cells."""
    run_dir.mkdir(parents=True, exist_ok=True)
    source = "phantom" if data is None else str(Path(data).resolve())
    with claim(run_dir, "run"):  # other workers on this folder wait until its settings and split are written
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
    if config.run.seeds < 3:
        log.warning("run.seeds=%d: with fewer than 3 classifier seeds per fold the intervals barely see training "
                    "randomness (the A/A row shows how much); use run.seeds=5 for a verdict", config.run.seeds)
    cells = study_cells(config, folds)
    if synthetic_from is not None:
        fits = dict.fromkeys((c.generator, c.fold, c.generator_key) for c in cells if c.method != REFERENCE)
        with claim(run_dir, "run"):
            reuse_fits(synthetic_from, run_dir, config, study.split, source, list(fits))
    return study, cells


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
