"""Who computes the cells of a study: this process, one after another (``run.executor: local``), or
the tasks of a Ray cluster (``run.executor: ray``; Moritz et al., OSDI 2018).

Either way the run folder is the only state. Every cell, generator fit, synthetic set and scoring
of a synthetic set is computed under its claim (:mod:`busynth.locks`) and committed by atomic
writes, so any number of workers may share one folder: several ``busynth run`` on one machine, or
Ray tasks on the nodes of a cluster that mounts it. A unit another worker holds is passed over,
tried again after the others and waited for only when nothing else is free; the unit of a worker
that died is taken over and resumes from its checkpoints.

The Ray executor submits the study as a graph of tasks (:func:`plan`): a fold's generator fit
after the fits it builds on (``controlnet`` after ``sd-lora``, ``registry.Method.after``; such a
base's synthetic set is sampled in a task of its own, while the fit on top of it trains), each cell
after its synthetic set (and a filtered arm after the fold's ``real`` cell, whose classifier
filters), each synthetic set's scoring after its cells; the summary waits for all of them. Each
task asks for ``run.cell_cpus`` CPUs and ``run.cell_gpus`` GPUs; Ray places the tasks and retries a
task whose worker died (``max_retries``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from busynth.cells import (
    Cell,
    cell_unit,
    fit_generator,
    needs_held,
    prepare_generator,
    run_cell,
    run_claimed,
    score_synthetic_set,
    scores_unit,
)
from busynth.cluster import task_slots, worker_setup
from busynth.config import StudyConfig
from busynth.errors import BusynthError
from busynth.locks import claim, each_claimed
from busynth.progress import format_duration
from busynth.registry import REFERENCE, bases, cell_key, fit_outputs
from busynth.rundir import StudyData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fit:
    """A generator fit of one fold and generator seed. Its task samples the fit's synthetic set too,
    unless ``samples`` is False: a fit others build on, whose set is a ``Sample`` task of its own, so
    that the fits on top of it (a fold's ControlNet on its sd-lora) need not wait for the sampling."""

    generator: str
    fold: int
    generator_seed: int
    samples: bool = field(default=True, compare=False)


@dataclass(frozen=True)
class Sample:
    """The synthetic set of a fit others build on, sampled in a task of its own after the fit."""

    fit: Fit


@dataclass(frozen=True)
class Score:
    """The scoring of a generator cell's synthetic set (fidelity, label fidelity, adherence)."""

    cell: Cell


def fit_of(job: Fit | Sample) -> Fit:
    """The generator fit a fit or sampling task is about."""
    return job.fit if isinstance(job, Sample) else job


def cell_fit(cell: Cell) -> Fit | None:
    """The generator fit a cell trains on (None for ``real``)."""
    return None if cell.method == REFERENCE else Fit(cell.generator, cell.fold, cell.generator_seed)


def plan(cells: Sequence[Cell], methods: Sequence[str]) -> tuple[list[Fit], dict[Fit, list[Fit]], dict[Cell, list]]:
    """The study as a graph: the generator fits (those others build on first, so a fit always comes
    after its bases; such a base's ``samples`` False), what each fit waits for (the fits of
    ``Method.after`` methods in ``methods``, not their synthetic sets), and what each cell waits for
    (the task that samples its fit's synthetic set: the fit, or the base's ``Sample``; a filtered arm
    also the ``real`` cell of its fold and generator seed)."""
    fits: list[Fit] = []
    fit_needs: dict[Fit, list[Fit]] = {}

    def add(fit: Fit) -> None:
        if fit in fit_needs:
            return
        needs = [Fit(b, fit.fold, fit.generator_seed) for b in bases(fit.generator, methods)]
        for base in needs:
            add(base)
        fit_needs[fit] = needs
        fits.append(fit)

    for fit in filter(None, map(cell_fit, cells)):
        add(fit)
    # Longest chains first (list scheduling): a fit others build on (sd-lora under controlnet) is
    # submitted before the rest, so that Ray, which starts ready tasks in submission order, begins
    # the study's critical path at once. Bases still come before what builds on them.
    dependents = {f: sum(f in needs for needs in fit_needs.values()) for f in fits}
    fits = [replace(f, samples=not dependents[f]) for f in sorted(fits, key=lambda f: -dependents[f])]
    cell_needs: dict[Cell, list] = {}
    for cell in cells:
        fit = cell_fit(cell)
        needs: list = [] if fit is None else [Sample(fit) if dependents[fit] else fit]
        if cell.filtered:
            needs.append(cell.reference_cell)
        cell_needs[cell] = needs
    return fits, fit_needs, cell_needs


def cell_kinds(cells: Sequence[Cell], todo: Sequence[bool], run_dir: Path) -> list[tuple[str, bool]]:
    """(method, fits a generator) per cell: the first cell to be run of each unfitted generator fit
    also pays for the fit, the other cells of that fit only for a classifier."""
    pending: set[tuple[str, str]] = set()
    kinds = []
    for cell, needed in zip(cells, todo, strict=True):
        fit = (cell.generator, cell.generator_key)
        (gen_dir, fitted), _ = fit_outputs(*fit, run_dir)
        fits = needed and cell.method != REFERENCE and fit not in pending and not (gen_dir / fitted).exists()
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


def log_row(row: dict) -> None:
    if "dice" in row:
        log.info("  Dice %.3f, IoU %.3f, HD95 %.1f px", row["dice"], row["iou"], row["hd95"])
    else:
        log.info("  balanced accuracy %.3f, macro AUC %.3f, malignant AUC %.3f",
                 row["balanced_accuracy"], row["macro_auc"], row.get("malignant_auc", float("nan")))


def run_local(cells: Sequence[Cell], config: StudyConfig, study: StudyData, run_dir: Path,
              tracker_log: Callable[[dict, int], None] | None = None) -> None:
    """Compute the cells here, in order, each under its claim (``locks.each_claimed``): a cell another
    worker holds, or whose generator fit (or synthetic set) another worker is computing, is passed
    over and tried again after the others; when nothing else is left, waited for (and taken over if
    that worker died)."""
    todo = [not (c.folder(run_dir) / "metrics.json").exists() for c in cells]
    kinds = cell_kinds(cells, todo, run_dir)
    seconds: dict[tuple[str, bool], list[float]] = {}  # cells computed in this invocation, by kind: the ETA
    handled: set[int] = set()
    held_before: set[int] = set()  # cells passed over because another worker held them
    waited: set[int] = set()  # the cells this worker waited for

    def name(i: int) -> str:
        return f"cell {i + 1}/{len(cells)}: {cells[i].method} {cells[i].key}"

    def busy(i: int) -> str | None:
        return needs_held(cells[i], config, run_dir) if todo[i] else None

    def passed_over(i: int, what: str) -> None:
        needed = "" if what == "it" else ", which it needs"
        if what == "it":
            held_before.add(i)
        log.info("%s: another worker has %s%s: back to it later", name(i), what, needed)

    def waiting(i: int) -> None:
        waited.add(i)
        log.info("%s: waiting for the worker that has it", name(i))

    for i in each_claimed(run_dir, range(len(cells)), lambda i: cell_unit(cells[i], run_dir), busy, passed_over,
                          waiting):
        after_wait = i in waited
        computed = not (cells[i].folder(run_dir) / "metrics.json").exists()
        if not after_wait:
            left = [kinds[j] for j in range(len(cells)) if todo[j] and j not in handled]
            eta = f", ETA {format_duration(remaining_seconds(left, seconds))}" if seconds and computed else ""
            log.info("%s%s%s", name(i), "" if todo[i] else " (done)", eta)
        handled.add(i)
        started = time.perf_counter()
        row = run_cell(cells[i], config, study, run_dir, tracker_log)
        if computed:
            seconds.setdefault(kinds[i], []).append(time.perf_counter() - started)
            if i in held_before:
                log.info("  taken over from a worker that stopped")
            log_row(row)
        elif todo[i]:
            log.info("  done by %s", "the other worker" if i in held_before else "another worker meanwhile")


def score_local(cells: Sequence[Cell], config: StudyConfig, study: StudyData, run_dir: Path) -> None:
    """Score the synthetic sets of the generator cells, each under its claim (``locks.each_claimed``): a
    set another worker is scoring is passed over, tried again after the others and waited for only
    when nothing else is free (and then found scored)."""
    scored = [cell for cell in cells if cell.scores_synthetic_set]
    for cell in each_claimed(run_dir, scored, scores_unit):
        score_synthetic_set(cell, config, study, run_dir)


# --- Ray ------------------------------------------------------------------------------------------


def _task(job: Fit | Sample | Cell | Score, config: StudyConfig, study: StudyData, run_dir: str, *after):
    """One task of the study's graph, in a Ray worker: a generator fit or its sampling (returns
    (seconds, whether anything was computed)), a cell ((metrics row, computed, seconds)) or the scoring
    of a synthetic set (None). Every kind is this one remote function because Ray starts the ready
    tasks of one function in the order they became ready but takes turns between functions, which
    let cheap cells overtake the fits of the study's longest chain."""
    worker_setup(config.run.cell_cpus)
    folder, started = Path(run_dir), time.perf_counter()
    if isinstance(job, Cell):
        row, computed = run_claimed(job, config, study, folder)
        return row, computed, time.perf_counter() - started
    if isinstance(job, Score):
        with claim(folder, scores_unit(job.cell)):
            score_synthetic_set(job.cell, config, study, folder)
        return None
    fit = fit_of(job)
    samples = isinstance(job, Sample) or fit.samples
    (gen_dir, fitted), (out_dir, sampled) = fit_outputs(fit.generator, cell_key(fit.fold, fit.generator_seed), folder)
    computed = not (out_dir / sampled if samples else gen_dir / fitted).exists()
    prepare = prepare_generator if samples else fit_generator
    prepare(fit.generator, fit.fold, fit.generator_seed, config, study, folder)
    return time.perf_counter() - started, computed


def run_ray(cells: Sequence[Cell], config: StudyConfig, study: StudyData, run_dir: Path) -> None:
    """Compute every cell, generator fit and synthetic-set score as Ray tasks (see the module
    docstring), inside :func:`busynth.cluster.ray_session`. Returns when all are done; a task's error
    is raised here as busynth's own error."""
    import ray

    _submit_and_wait(ray, cells, config, study, Path(run_dir).resolve())


def _submit_and_wait(ray, cells: Sequence[Cell], config: StudyConfig, study: StudyData, run_dir: Path) -> None:
    """Submit every generator fit at once (each after its bases; a base's sampling after it) and the
    cells a few at a time: at most one per task slot waits or runs, each once its synthetic set (and,
    for a filtered arm, its ``real`` cell) is done. Ray has no task priorities and starts the ready
    tasks of one function in about the order they became ready, so cells submitted all at once
    would keep a fit that became ready later (a fold's ControlNet after its sd-lora) waiting behind
    every ``real`` cell; the fits, the study's long chains, start first this way. A synthetic set is
    scored once its cells are done."""
    resources = {"num_cpus": config.run.cell_cpus, "num_gpus": config.run.cell_gpus}
    task = ray.remote(**resources)(_task)
    args = (ray.put(config), ray.put(study), str(run_dir))
    fits, fit_needs, cell_needs = plan(cells, config.run.methods)
    refs: dict = {}
    for fit in fits:  # bases first
        refs[fit] = task.remote(fit, *args, *(refs[b] for b in fit_needs[fit]))
    for fit in fits:
        if not fit.samples:
            refs[Sample(fit)] = task.remote(Sample(fit), *args, refs[fit])
    in_study = set(cells)
    task_of: dict = {ref: job for job, ref in refs.items()}
    # What each task is, as (method, fits a generator): the kinds whose measured times give the ETA.
    kinds = {ref: (fit_of(job).generator, True) for ref, job in task_of.items()}
    waiting, to_score = list(cells), [c for c in cells if c.scores_synthetic_set]
    done: set = set()
    pending, score_refs, in_flight = list(refs.values()), [], 0
    slots = task_slots(ray.cluster_resources(), config.run.cell_cpus, config.run.cell_gpus)
    log.info("ray: %d cells, %d generator fits, %d synthetic-set scores (%s CPU, %s GPU per task; %d at once)",
             len(cells), len(fits), len(to_score), config.run.cell_cpus, config.run.cell_gpus, slots)

    def submit_ready() -> None:
        nonlocal in_flight
        for cell in [c for c in waiting if all(n in done or isinstance(n, Cell) and n not in in_study
                                                for n in cell_needs[c])]:
            if in_flight >= slots:
                break
            ref = task.remote(cell, *args)
            waiting.remove(cell)
            pending.append(ref)
            kinds[ref], task_of[ref] = (cell.method, False), cell
            in_flight += 1
        for cell in [c for c in to_score
                     if c in done and (c.reference_cell in done or c.reference_cell not in in_study)]:
            to_score.remove(cell)
            score_refs.append(task.remote(Score(cell), *args))

    start, finished = time.perf_counter(), 0
    seconds: dict[tuple[str, bool], list[float]] = {}
    submit_ready()
    while pending:
        [ready], pending = ray.wait(pending, num_returns=1)
        job = task_of[ready]
        done.add(job)
        if isinstance(job, Fit | Sample):
            took, computed = _get(ray, ready)
            if computed:
                seconds.setdefault(kinds[ready], []).append(took)
                fit = fit_of(job)
                log.info("%s done: %s %s in %s", "sampling" if isinstance(job, Sample) else "fit", fit.generator,
                         cell_key(fit.fold, fit.generator_seed), format_duration(took))
        else:
            row, computed, took = _get(ray, ready)
            finished, in_flight = finished + 1, in_flight - 1
            if computed:
                seconds.setdefault(kinds[ready], []).append(took)
            left = remaining_seconds([kinds[r] for r in pending] + [(c.method, False) for c in waiting], seconds)
            eta = f", ETA {format_duration(left / slots)}" if (pending or waiting) and seconds else ""
            log.info("cell %d/%d done: %s %s%s%s", finished, len(cells), job.method, job.key,
                     "" if computed else " (done before)", eta)
            if computed:
                log_row(row)
        submit_ready()
    if waiting:  # cannot happen: every cell's fits were submitted
        raise RuntimeError(f"ray: {len(waiting)} cell(s) never became ready: {waiting[:3]}")
    for ref in score_refs:
        _get(ray, ref)
    log.info("ray: every task done in %.1f s", time.perf_counter() - start)


def _get(ray, ref):
    """``ray.get`` that raises a task's busynth error as itself (one line for the user), not wrapped."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, BusynthError):
            raise exc.cause from None
        raise
