"""External test sets: images from another hospital or scanner, scored by every classifier of a run.

``busynth run ... --external NAME=PATH`` (after the cells) and ``busynth evaluate RUN_DIR --external
NAME=PATH`` (on a finished run, training nothing) load a folder in the BUSI layout -- it may lack
classes, e.g. benign and malignant only, but may not hold a class the study does not know --
audit it for duplicates of its own, and let the classifier of every finished cell score every
image: ``cells/<method>/<cell>/external/<NAME>.csv``, in the format of ``predictions.csv``.
An external set never enters training, validation or model selection.

Per set, ``results/external/<NAME>.json`` holds the same summary as the study's own test folds
(:func:`busynth.results.build_summary`): mean ± sd per method, paired intervals against ``real``
and ``classical`` with verdicts on the primary metric, and the A/A row. Every fold's classifiers
score the same external images, so a resample draws the images once for all folds, seeds and
both methods; the unit drawn is the image's duplicate group (the set's own audit), so near-
duplicates do not count as independent evidence. Metrics a set cannot define (the AUC of a class
it lacks) are left out of its summary. A set lacking some classes is scored among those it has
(``run.external_classes``), with the share of its images called an absent class beside.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from busynth.classify.checkpoints import load_classifier
from busynth.classify.metrics import SCORE_NAMES, classification_metrics, restrict_proba
from busynth.classify.predictions import predictions_csv, read_predictions, scores_csv
from busynth.classify.train import predict_proba
from busynth.config import StudyConfig
from busynth.data.audit import audit_records
from busynth.data.busi import load_dataset
from busynth.data.records import Record, lesion_pairs
from busynth.data.transforms import label_indices, stack_images, stack_masks
from busynth.errors import DataError, RunStateError
from busynth.io import read_json, write_json, write_text
from busynth.locks import each_claimed
from busynth.progress import progress
from busynth.registry import cell_folder, cell_key
from busynth.results import PredictionStore, Protocol, build_summary, read_cells
from busynth.segment.metrics import segmentation_scores
from busynth.segment.train import load_segmenter, predict_masks

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
# A cell folder and the sets it has not scored -> each set's scores file (text) by set name.
CellScorer = Callable[[Path, Sequence["ExternalSet"]], dict[str, str]]


@dataclass
class ExternalSet:
    """An external test set: its records (labels among the study's classes) and duplicate groups."""

    name: str
    path: Path
    records: list[Record]
    groups: dict[str, int]
    # Groups of near-duplicates between this set and the study's own images (ids prefixed
    # "external:" and "study:"), found by check_study_overlap.
    study_near_duplicates: list[list[str]] = field(default_factory=list)

    @property
    def classes_present(self) -> list[str]:
        """The classes the set holds, in the order of its records."""
        return list(dict.fromkeys(r.label for r in self.records))

    def fingerprint(self) -> dict:
        """What identifies the set's content: its path, image ids and labels."""
        return {"path": str(self.path.resolve()), "ids": [r.id for r in self.records],
                "labels": [r.label for r in self.records]}


def load_external(name: str, path: Path, config: StudyConfig) -> ExternalSet:
    """Load and audit one external set: the study's classes that have a folder there (at least
    one), refusing folders of classes the study does not know and bad files as the loader does."""
    path = Path(path)
    folders = {p.name for p in path.iterdir() if p.is_dir()}
    unknown = sorted(folders - set(config.data.classes))
    if unknown:
        raise DataError(f"external set {name} ({path}): folder(s) {', '.join(map(repr, unknown))} are not classes "
                        f"of this study {config.data.classes}")
    present = [c for c in config.data.classes if c in folders]
    if not present:
        raise DataError(f"external set {name} ({path}): no folder of a study class {config.data.classes}")
    result = load_dataset(path, config.data.model_copy(update={"classes": present}))
    missing = [c for c in config.data.classes if c not in present]
    log.info("external set %s: %d images (%s)%s", name, len(result.records),
             ", ".join(f"{c} {n}" for c, n in result.summary.per_class.items()),
             f"; no {', '.join(missing)} images" if missing else "")
    for line in result.summary.format().splitlines():
        if "warning" in line or "skipped " in line:
            log.warning("external set %s: %s", name, line.strip())
    audit = audit_records(result.records, config.audit, load=result.summary.to_dict())
    n_groups = len({audit.group_of[r.id] for r in result.records})
    if n_groups < len(result.records):
        log.info("external set %s: %d duplicate groups among %d images; a group is resampled as one unit",
                 name, n_groups, len(result.records))
    return ExternalSet(name=name, path=path, records=result.records, groups=dict(audit.group_of))


def check_study_overlap(ext: ExternalSet, study_records: Sequence[Record], config: StudyConfig) -> None:
    """An external set must hold other images than the study: refuse one with exact copies of the
    study's images (naming them); record (and warn about) near-duplicates, which the audit's
    perceptual hashes can also find between merely similar scans of two sites."""
    tagged = [dataclasses.replace(r, id=f"study:{r.id}") for r in study_records]
    tagged += [dataclasses.replace(r, id=f"external:{r.id}") for r in ext.records]
    audit = audit_records(tagged, config.audit)

    def mixed(group: list[str]) -> bool:
        return any(i.startswith("study:") for i in group) and any(i.startswith("external:") for i in group)

    exact = [g for g in audit.exact_groups if mixed(g)]
    if exact:
        example = ", ".join(exact[0])
        raise DataError(f"external set {ext.name} ({ext.path}): {sum(map(len, exact))} images in {len(exact)} groups "
                        f"are exact copies of the study's own images (e.g. {example}); an external test set "
                        "must hold other images")
    ext.study_near_duplicates = [g for g in audit.near_groups if mixed(g)]
    if ext.study_near_duplicates:
        log.warning("external set %s: %d groups of near-duplicates with the study's images (e.g. %s); listed in "
                    "results/external/%s.json", ext.name, len(ext.study_near_duplicates),
                    ", ".join(ext.study_near_duplicates[0]), ext.name)


def finished_cells(run_dir: Path, methods: Sequence[str]) -> list[Path]:
    """Folders of the finished cells (metrics.json written) of ``methods``, in order."""
    return [p.parent for m in methods for p in sorted(cell_folder(run_dir, m).glob("*/metrics.json"))]


def _check_source(run_dir: Path, ext: ExternalSet) -> None:
    """Record the set's content once; refuse scores of another set under the same name."""
    path = Path(run_dir) / "results" / "external" / ext.name / SOURCE_FILE
    mine = ext.fingerprint()
    if path.is_file():
        theirs = read_json(path)
        if theirs.get("ids") != mine["ids"] or theirs.get("labels") != mine["labels"]:
            raise RunStateError(f"{run_dir}: external set {ext.name!r} was scored from other images "
                                f"({theirs.get('path')}); use another name")
    else:
        write_json(path, mine)


def score_cells(run_dir: Path, config: StudyConfig, sets: Sequence[ExternalSet], methods: Sequence[str]) -> int:
    """Let every finished cell's classifier (or segmenter) score every external set it has not scored
    yet; returns the number of (cell, set) predictions written. A cell is scored under its claim
    (``external/<cell folder>``), so workers that finish one run folder together share the work: a
    cell another worker is scoring is passed over, then waited for and found scored."""
    for ext in sets:
        _check_source(run_dir, ext)

    def unscored(cell: Path) -> list[ExternalSet]:
        return [ext for ext in sets if not (cell / "external" / f"{ext.name}.csv").is_file()]

    todo = [cell for cell in finished_cells(run_dir, methods) if unscored(cell)]
    if not todo:
        return 0
    score = _segmenter_scores(sets, config) if config.run.task == "segmentation" else _classifier_scores(sets, config)
    bar = progress(len(todo), "external scoring", log=log)
    written = 0
    for cell in each_claimed(run_dir, todo, lambda cell: f"external/{cell.relative_to(run_dir)}"):
        for name, text in score(cell, unscored(cell)).items():
            write_text(cell / "external" / f"{name}.csv", text)
            written += 1
        bar.update(1)
    bar.close()
    return written


def _classifier_scores(sets: Sequence[ExternalSet], config: StudyConfig) -> CellScorer:
    """A cell's predictions on the sets, as ``predictions.csv`` texts by set name."""
    classes, cfg = config.data.classes, config.classifier
    images = {ext.name: stack_images(ext.records, cfg.image_size) for ext in sets}
    labels = {ext.name: label_indices(ext.records, classes) for ext in sets}

    def score(cell: Path, todo: Sequence[ExternalSet]) -> dict[str, str]:
        model = load_classifier(cell / "classifier", cfg, len(classes))
        return {ext.name: predictions_csv(ext.records, labels[ext.name],
                                          predict_proba(model, images[ext.name], tta=cfg.tta),
                                          classes) for ext in todo}

    return score


def _segmenter_scores(sets: Sequence[ExternalSet], config: StudyConfig) -> CellScorer:
    """The segmentation variant: Dice, IoU and HD95 of a cell's segmenter per lesion pair of each set."""
    cfg, size = config.segmenter, config.segmenter.image_size
    pairs = {ext.name: lesion_pairs(ext.records) for ext in sets}
    truth = {name: (stack_images(p, size), stack_masks(p, size)) for name, p in pairs.items()}
    labels = {name: label_indices(p, config.data.classes) for name, p in pairs.items()}

    def score(cell: Path, todo: Sequence[ExternalSet]) -> dict[str, str]:
        model = load_segmenter(cell / "segmenter", cfg)
        out = {}
        for ext in todo:
            images, masks = truth[ext.name]
            scores = segmentation_scores(predict_masks(model, images, cfg.threshold, tta=cfg.tta), masks)
            out[ext.name] = scores_csv(pairs[ext.name], labels[ext.name], scores)
        return out

    return score


def scored_among(ext: ExternalSet, classes: Sequence[str], protocol: Protocol) -> list[int] | None:
    """The class indices a classification set is scored among (``run.external_classes``): those it
    holds when it lacks some and the protocol says ``present``; None for all classes."""
    present = [classes.index(c) for c in classes if c in ext.classes_present]
    if protocol.task != "classification" or protocol.external_classes == "all" or len(present) == len(classes):
        return None
    return present


def external_rows(run_dir: Path, name: str, methods: Sequence[str], classes: Sequence[str],
                  among: Sequence[int] | None = None) -> list[dict]:
    """Per finished cell with predictions of set ``name``: its metrics on that set (plus the
    cell's method, fold, seed and training size from metrics.json); with ``among``, scored with the
    probabilities renormalised over those classes, and ``called_absent`` the share of images whose
    most probable class (of all) is another."""
    rows = []
    for row in read_cells(run_dir, methods):
        path = cell_folder(run_dir, row["method"], cell_key(row["fold"], row["seed"])) / "external" / f"{name}.csv"
        if not path.is_file():
            continue
        keep = {k: row[k] for k in ("method", "fold", "seed", "generator_seed", "n_train_real", "n_synthetic",
                                    "train_steps") if k in row}
        if "dice" in row:  # a segmentation cell: per-pair scores, the set's metric is their mean
            _, y, scores = read_predictions(path, SCORE_NAMES)
            rows.append({**keep, "n_test": len(y), **dict(zip(SCORE_NAMES, scores.mean(axis=0).tolist()))})
            continue
        _, y, proba = read_predictions(path, classes)
        if among is None:
            rows.append({**keep, "n_test": len(y), **classification_metrics(y, proba, classes)})
            continue
        absent = float(np.mean(~np.isin(proba.argmax(axis=1), among)))
        rows.append({**keep, "n_test": len(y), "called_absent": absent,
                     **classification_metrics(y, restrict_proba(proba, among), classes)})
    return rows


def summarize_external(run_dir: Path, ext: ExternalSet, methods: Sequence[str], classes: Sequence[str],
                       protocol: Protocol) -> dict:
    """Write and return ``results/external/<name>.json``: the study's summary on this set."""
    among = scored_among(ext, classes, protocol)
    rows = external_rows(run_dir, ext.name, methods, classes, among)
    if not rows:
        raise RunStateError(f"{run_dir}: no cell has scored external set {ext.name!r}")
    columns = SCORE_NAMES if protocol.task == "segmentation" else None
    store = PredictionStore(run_dir, classes, rows, filename=f"external/{ext.name}.csv", groups=ext.groups,
                            columns=columns, among=among)
    summary = build_summary(store, rows, methods, protocol)
    called_absent = {m: float(np.mean([r["called_absent"] for r in rows if r["method"] == m]))
                     for m in summary["methods"]} if among is not None else {}
    summary["external"] = {"name": ext.name, "path": str(ext.path), "n_images": len(ext.records),
                           "classes_present": ext.classes_present,
                           "scored_among": [classes[k] for k in among] if among is not None else list(classes),
                           "called_absent_class": called_absent,
                           "duplicate_groups": len({ext.groups[r.id] for r in ext.records}),
                           "near_duplicates_of_study": ext.study_near_duplicates}
    write_json(Path(run_dir) / "results" / "external" / f"{ext.name}.json", summary)
    return summary


def evaluate_external(run_dir: Path, config: StudyConfig, specs: dict[str, Path], methods: Sequence[str],
                      protocol: Protocol, study_records: Sequence[Record]) -> dict[str, dict]:
    """Load, check against the study's images, score (what is not scored yet) and summarise
    every external set of ``specs``."""
    sets = [load_external(name, path, config) for name, path in specs.items()]
    for ext in sets:
        check_study_overlap(ext, study_records, config)
    return score_and_summarize(run_dir, config, sets, methods, protocol)


def score_and_summarize(run_dir: Path, config: StudyConfig, sets: Sequence[ExternalSet], methods: Sequence[str],
                        protocol: Protocol) -> dict[str, dict]:
    """Score what is not scored yet of the (loaded, checked) sets and summarise each: {name: summary}."""
    if not sets:
        return {}
    written = score_cells(run_dir, config, sets, methods)
    log.info("external sets: %d new cell predictions", written)
    return {ext.name: summarize_external(run_dir, ext, methods, config.data.classes, protocol) for ext in sets}
