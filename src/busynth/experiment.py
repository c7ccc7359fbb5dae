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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from busynth import __version__
from busynth.accel import is_main_process
from busynth.classify.metrics import classification_metrics
from busynth.classify.predictions import predictions_csv
from busynth.classify.train import fit_classifier, predict_proba
from busynth.config import StudyConfig, dump_config
from busynth.data.audit import AuditReport, audit_records
from busynth.data.busi import load_dataset
from busynth.data.leaks import accepted_groups, leak_report
from busynth.data.phantom import make_phantom
from busynth.data.records import Record
from busynth.data.splits import Split, make_split, read_split
from busynth.data.transforms import label_indices, stack_images
from busynth.errors import ConfigError, DataError, LeakError, RunStateError
from busynth.evaluate.adherence import evaluate_adherence
from busynth.evaluate.cell import evaluate_cell
from busynth.evaluate.summary import summarize_fidelity
from busynth.generators.base import (
    Generator,
    build_generator,
    generator_class,
    read_manifest,
    synthetic_counts,
    write_samples,
)
from busynth.io import read_json, remove_tree, write_json, write_text
from busynth.progress import format_duration
from busynth.registry import REFERENCE
from busynth.results import Protocol, aa_seed_halves, summarize_run

log = logging.getLogger(__name__)

# Config sections every cell depends on; a run folder refuses a rerun that changes them.
SHARED_SECTIONS = ("data", "phantom", "audit", "split", "classifier", "synthesis")


@dataclass
class StudyData:
    """The records of a run and what the data stages found."""

    records: list[Record]
    audit: AuditReport
    split: Split
    source: str


@dataclass(frozen=True)
class Cell:
    """One unit of the study: a method on one fold with one classifier seed, using the
    synthetic set of generator seed ``generator_seed`` (shared by several classifier seeds)."""

    method: str
    fold: int
    seed: int
    generator_seed: int = 0

    @property
    def key(self) -> str:
        """Folder name of this cell under its method."""
        return f"fold{self.fold}_seed{self.seed}"

    @property
    def generator_key(self) -> str:
        """Folder name of this cell's generator fit and synthetic set under their method."""
        return f"fold{self.fold}_seed{self.generator_seed}"

    @property
    def scores_synthetic_set(self) -> bool:
        """True for the one cell per generator fit that scores its synthetic set (fidelity,
        adherence): the cell whose classifier seed equals the generator seed."""
        return self.seed == self.generator_seed


# --- data stages ------------------------------------------------------------------------------


def load_records(config: StudyConfig, data: Path | None) -> tuple[list[Record], dict | None, str]:
    """Records from a data set folder, or the built-in phantom when ``data`` is None."""
    if data is None:
        return make_phantom(config.phantom, config.data.classes), None, "phantom"
    result = load_dataset(data, config.data)
    log.info("%s", result.summary.format())
    return result.records, result.summary.to_dict(), str(Path(data).resolve())


def prepare_data(config: StudyConfig, data: Path | None, run_dir: Path, split_file: Path | None = None) -> StudyData:
    """Load, audit and split (writing data/*.json and split.csv once); reuse the stored split."""
    records, load_summary, source = load_records(config, data)
    audit = audit_records(records, config.audit, load=load_summary)
    data_dir = run_dir / "data"
    if load_summary is not None and not (data_dir / "load_summary.json").exists():
        write_json(data_dir / "load_summary.json", load_summary)
    if not (data_dir / "audit.json").exists():
        write_json(data_dir / "audit.json", audit.to_dict())
    stored = data_dir / "split.csv"
    if stored.exists():
        split = read_split(stored, records, audit, config.split)
    else:
        if split_file is not None:
            split = read_split(split_file, records, audit, config.split)  # refuses a leaky file by default
        else:
            split = make_split(records, audit, config.split)
        source = Path(split_file).name if split_file is not None else "generated"
        write_json(data_dir / "split_leaks.json", leak_report(split, config.split.on_leak, source))
        split.write(stored)
    for note in split.notes:
        log.warning("split: %s", note)
    return StudyData(records=records, audit=audit, split=split, source=source)


# --- run folder bookkeeping -------------------------------------------------------------------


def open_run_dir(run_dir: Path, config: StudyConfig, source: str) -> None:
    """Create the run folder, or check that an existing one was made with the same settings.

    The fingerprint covers the sections every cell shares (data, split, classifier, ...);
    ``run`` (methods, seeds, tracker) may change between invocations, adding cells, and each
    method's own settings are checked per method by ``check_method_settings``.
    """
    fingerprint = config.fingerprint(*SHARED_SECTIONS)
    info_path = run_dir / "run.json"
    if info_path.exists():
        info = read_json(info_path)
        if info.get("fingerprint") != fingerprint or info.get("data") != source:
            old = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
            changed = _changed_keys(old, config.model_dump(mode="json"))
            if info.get("data") != source:
                changed.insert(0, f"data source ({info.get('data')} -> {source})")
            raise RunStateError(
                f"run folder {run_dir} was started with different settings; changed: "
                f"{', '.join(changed[:8]) or 'unknown'}. Use a new --out folder (results are never mixed)."
            )
    else:
        write_json(info_path, {
            "data": source, "fingerprint": fingerprint, "busynth_version": __version__,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        })
    write_text(run_dir / "config.yaml", dump_config(config))


def method_settings(method: str, config: StudyConfig) -> dict:
    """The resolved settings of one method (its generator config with defaults filled in)."""
    if method == REFERENCE:
        return {}
    return generator_class(method).parse_config(config.generators.get(method, {})).model_dump(mode="json")


def check_method_settings(run_dir: Path, methods: Sequence[str], config: StudyConfig) -> None:
    """Record each method's settings in ``cells/<method>/settings.json`` on first use; refuse a
    rerun whose settings for a method differ, naming the changed fields."""
    for method in methods:
        path = run_dir / "cells" / method / "settings.json"
        mine = method_settings(method, config)
        if path.exists():
            changed = _changed_keys(read_json(path), mine)
            if changed:
                raise RunStateError(
                    f"run folder {run_dir}: method {method!r} was run with other settings; changed: "
                    f"{', '.join(f'generators.{method}.{c}' for c in changed[:8])}. Use a new --out folder."
                )
        else:
            write_json(path, mine)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if prefix == "" and key not in SHARED_SECTIONS and key in StudyConfig.model_fields:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_changed_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


# --- one cell ---------------------------------------------------------------------------------


def check_no_leak(split: Split, fold: int, used: dict[str, Sequence[str]], group_of: dict[str, int]) -> None:
    """Raise LeakError if any test image, or any member of its duplicate group, is among the ids
    used for training, validation or generator fitting (synthetic ids are ``method:...``); groups a
    split file leaks and the user accepted with ``split.on_leak=keep`` pass."""
    test_ids = set(split.ids(fold, "test"))
    test_groups = {group_of[i] for i in test_ids if i in group_of} - accepted_groups(split, fold)
    for role, ids in used.items():
        real = [i for i in ids if ":" not in i]
        bad = [i for i in real if i in test_ids or group_of.get(i) in test_groups]
        if bad:
            raise LeakError(f"fold {fold}: {role} would use {len(bad)} test images or their duplicates "
                            f"(e.g. {', '.join(bad[:5])}); see data/split.csv")


def fit_or_load_generator(method: str, config: StudyConfig, train: list[Record], gen_dir: Path, seed: int) -> Generator:
    """Fit the method's generator on the training part (resuming inside fit), or load it if done."""
    cls = generator_class(method)
    if (gen_dir / "generator.json").exists():
        return cls.load(gen_dir)
    generator = build_generator(method, config)
    generator.fit(train, gen_dir, seed=seed)
    return generator


def synthesize(generator: Generator, method: str, train: list[Record], config: StudyConfig,
               out_dir: Path, gen_dir: Path, seed: int) -> list[Record]:
    """Generate the method's images for one cell into ``out_dir`` (once), then read them back."""
    done = out_dir / "done.json"
    if not done.exists():
        remove_tree(out_dir)  # whatever an interrupted sampling run left: start the folder again
        counts = synthetic_counts(train, config.data.classes, config.synthesis)
        rng = np.random.default_rng([seed, 7])
        for k, label in enumerate(config.data.classes):
            if counts[label] == 0:
                continue
            masks = None
            if generator.needs_masks:
                pool = [r.mask for r in train if r.label == label and r.mask is not None]
                masks = [pool[i] for i in rng.integers(len(pool), size=counts[label])] if pool else None
            samples = generator.sample(label, counts[label], seed=seed * 1000 + k, masks=masks)
            write_samples(samples, out_dir, method, gen_dir)
        write_json(done, {"counts": counts})
    return read_synthetic(out_dir, method)


def read_synthetic(folder: Path, method: str) -> list[Record]:
    """Records for the images listed in a synthetic folder's manifest (see ``read_manifest``)."""
    records = []
    for entry in read_manifest(folder):
        image = _read_gray(folder / entry["image"])
        mask = _read_gray(folder / entry["mask"]) > 127 if "mask" in entry else None
        records.append(Record(
            id=f"{method}:{entry['label']}_{entry['index']}", label=entry["label"], image=image,
            mask=mask, path=str(Path("synthetic") / method / folder.name / entry["image"]),
            meta={"synthetic": True, "seed": entry["seed"]},
        ))
    return records


def _read_gray(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the synthetic image ({exc})") from None


def run_cell(cell: Cell, config: StudyConfig, study: StudyData, run_dir: Path,
             tracker_log: Callable[[dict, int], None] | None = None) -> dict:
    """Train and score one cell (resuming if interrupted); returns its metrics row."""
    cell_dir = run_dir / "cells" / cell.method / cell.key
    if (cell_dir / "metrics.json").exists():
        return read_json(cell_dir / "metrics.json")
    start = time.perf_counter()
    classes = config.data.classes
    split = study.split
    train = split.select(study.records, cell.fold, "train")
    val = split.select(study.records, cell.fold, "val")
    test = split.select(study.records, cell.fold, "test")
    synthetic: list[Record] = []
    generator_ids: list[str] = []
    if cell.method != REFERENCE:
        gen_dir = run_dir / "generators" / cell.method / cell.generator_key
        check_no_leak(split, cell.fold, {"generator": [r.id for r in train]}, study.audit.group_of)
        generator = fit_or_load_generator(cell.method, config, train, gen_dir, cell.generator_seed)
        generator_ids = list(generator.train_ids)
        synthetic = synthesize(generator, cell.method, train, config,
                               run_dir / "synthetic" / cell.method / cell.generator_key, gen_dir, cell.generator_seed)
    fit_set = train + synthetic
    used = {"classifier_train": [r.id for r in fit_set], "val": [r.id for r in val],
            "generator_train": generator_ids, "test": [r.id for r in test]}
    check_no_leak(split, cell.fold, {k: v for k, v in used.items() if k != "test"}, study.audit.group_of)
    write_json(cell_dir / "ids.json", used)
    size = config.classifier.image_size
    result = fit_classifier(
        stack_images(fit_set, size), label_indices(fit_set, classes),
        stack_images(val, size), label_indices(val, classes),
        config.classifier, len(classes), cell_dir / "classifier", seed=cell.seed,
        tracker_log=_prefixed(tracker_log, f"{cell.method}/{cell.key}"), n_real=len(train),
    )
    proba = predict_proba(result.model, stack_images(test, size), tta=config.classifier.tta)
    y_true = label_indices(test, classes)
    write_text(cell_dir / "predictions.csv", predictions_csv(test, y_true, proba, classes))
    row = {
        "method": cell.method, "fold": cell.fold, "seed": cell.seed, "generator_seed": cell.generator_seed,
        "n_train_real": len(train), "n_synthetic": len(synthetic), "n_val": len(val), "n_test": len(test),
        "train_steps": result.steps, "best_epoch": result.best_epoch,
        "seconds": round(time.perf_counter() - start, 2),
        **classification_metrics(y_true, proba, classes),
    }
    write_json(cell_dir / "metrics.json", row)
    return row


def score_fidelity(cell: Cell, config: StudyConfig, study: StudyData, run_dir: Path) -> dict:
    """fidelity.json of a generator cell: FID/KID, precision/recall, diversity, memorisation
    against the fold's real training images (computed once; a note until the real cell exists).
    Test images enter only the real-vs-real reference, never a fit."""
    split = study.split
    return evaluate_cell(run_dir, cell.method, cell.fold, cell.seed, config,
                         split.select(study.records, cell.fold, "train"), split.select(study.records, cell.fold, "test"),
                         read_synthetic(run_dir / "synthetic" / cell.method / cell.generator_key, cell.method))


def score_adherence(cell: Cell, study: StudyData, run_dir: Path, config: StudyConfig) -> dict | None:
    """adherence.json of a generator cell whose images carry masks (controlnet, classical): how
    much darker the lesion is than a ring around it, next to the real training pairs."""
    return evaluate_adherence(run_dir, cell.method, cell.fold, cell.seed, config.data.classes,
                              study.split.select(study.records, cell.fold, "train"),
                              read_synthetic(run_dir / "synthetic" / cell.method / cell.generator_key, cell.method))


def _prefixed(log_fn: Callable[[dict, int], None] | None, prefix: str) -> Callable[[dict, int], None] | None:
    if log_fn is None:
        return None
    return lambda values, step: log_fn({f"{prefix}/{k}": v for k, v in values.items()}, step)


# --- the whole study ------------------------------------------------------------------------


def study_cells(config: StudyConfig, folds: Sequence[int]) -> list[Cell]:
    """Cells in run order: fold, then seed, then method (so a fold's methods finish together).

    Classifier seed number ``i`` uses generator seed ``i mod run.generator_seeds``: a fold's
    generator is fitted ``generator_seeds`` times and each synthetic set is shared by the
    classifier seeds that map to it."""
    base, n_gen = config.run.base_seed, config.run.generator_seeds
    cells = []
    for f in folds:
        seeds = [base + i for i in range(config.run.seeds)]
        cells += [Cell(m, f, s, base + (s - base) % n_gen) for s in seeds for m in config.run.methods]
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
        fit = (cell.method, cell.generator_key)
        fits = (needed and cell.method != REFERENCE and fit not in pending
                and not (run_dir / "generators" / cell.method / cell.generator_key / "generator.json").exists())
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
              build_html: bool = True) -> dict:
    """Run (or resume) the whole study in ``run_dir``; returns the results summary."""
    validate_methods(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = "phantom" if data is None else str(Path(data).resolve())
    open_run_dir(run_dir, config, source)
    check_method_settings(run_dir, config.run.methods, config)
    study = prepare_data(config, data, run_dir, split_file)
    log.info("split:\n%s", study.split.format(config.data.classes))
    cells = study_cells(config, study.split.folds)
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
            log.info("  balanced accuracy %.3f, macro AUC %.3f, malignant AUC %.3f",
                     row["balanced_accuracy"], row["macro_auc"], row.get("malignant_auc", float("nan")))
    finally:
        if tracker:
            tracker.finish()
    for cell in cells:
        if cell.method != REFERENCE and cell.scores_synthetic_set:
            score_fidelity(cell, config, study, run_dir)
            score_adherence(cell, study, run_dir, config)
    summarize_fidelity(run_dir, config.run.methods)
    summary = summarize_run(run_dir, config.run.methods, config.data.classes, Protocol.from_config(config.run))
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
