"""One cell of the study: a method on one fold with one classifier seed.

``run_cell`` fits (or loads) the method's generator on the fold's training part, writes its
synthetic set once, trains the classifier on real + synthetic images and scores it on the
fold's test part, checking before each step that no test image or duplicate of one is used.
A cell whose ``metrics.json`` exists is finished; an interrupted one resumes from its
generator's and classifier's checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from busynth.accel import process_state, shard_map
from busynth.classify.checkpoints import save_safetensors
from busynth.classify.metrics import classification_metrics
from busynth.classify.predictions import predictions_csv, scores_csv
from busynth.classify.train import fit_classifier, predict_proba
from busynth.config import StudyConfig, SynthesisConfig
from busynth.data.leaks import accepted_groups
from busynth.data.records import Record, lesion_pairs
from busynth.data.splits import Split
from busynth.data.transforms import label_indices, masks_and_flags, stack_images, stack_masks
from busynth.errors import LeakError
from busynth.evaluate.adherence import evaluate_adherence
from busynth.evaluate.cas import evaluate_cas
from busynth.evaluate.cell import evaluate_cell
from busynth.evaluate.filtering import filter_synthetic
from busynth.evaluate.labels import evaluate_label_fidelity
from busynth.generators.base import (
    Generator,
    Synthetic,
    build_generator,
    generator_class,
    read_manifest,
    synthetic_counts,
    write_samples,
)
from busynth.io import derived_seed, read_json, read_png, read_png_mask, remove_tree, write_json, write_text
from busynth.locks import claim
from busynth.registry import FILTERED, REFERENCE, arm_parts, bases, cell_folder, cell_key, fit_outputs
from busynth.rundir import StudyData
from busynth.segment.metrics import SCORES, segmentation_scores
from busynth.segment.train import fit_segmenter, predict_masks

log = logging.getLogger(__name__)
EXAMPLES = 8  # test images per segmentation cell kept with their masks for the report
SAMPLE_CHUNK = 32  # images per sampling call: the unit of seeding and of sharing between processes


@dataclass(frozen=True)
class Cell:
    """One unit of the study: a method on one fold with one classifier seed, using the
    synthetic set of generator seed ``generator_seed`` (shared by several classifier seeds)."""

    method: str
    fold: int
    seed: int
    generator_seed: int = 0

    @property
    def generator(self) -> str:
        """The generator method of this cell's arm (``cvae`` for the dose-response arm ``cvae@0.5``)."""
        return arm_parts(self.method)[0]

    @property
    def ratio(self) -> float | None:
        """The ``synthesis.ratios`` entry of a dose-response arm, else None (``synthesis.ratio`` applies)."""
        return arm_parts(self.method)[1]

    @property
    def filtered(self) -> bool:
        """True for the filtered arm of a generator (``cvae+filter``, ``synthesis.filter``)."""
        return self.method.endswith(FILTERED)

    def folder(self, run_dir: Path) -> Path:
        """This cell's folder: ``cells/<method>/fold<f>_seed<s>/`` (``metrics.json`` there = finished)."""
        return cell_folder(run_dir, self.method, self.key)

    @property
    def reference_cell(self) -> Cell:
        """The ``real`` cell of this cell's fold and generator seed: its classifier filters a filtered
        arm and scores the label fidelity of this cell's synthetic set."""
        return Cell(REFERENCE, self.fold, self.generator_seed, self.generator_seed)

    def synthetic_folder(self, run_dir: Path) -> Path:
        """Where this cell's synthetic images are sampled: the generator's set of the fold and generator
        seed (shared by its dose-response arms), or the filtered arm's own pool."""
        return Path(run_dir) / "synthetic" / (self.method if self.filtered else self.generator) / self.generator_key

    @property
    def key(self) -> str:
        """Folder name of this cell under its method."""
        return cell_key(self.fold, self.seed)

    @property
    def generator_key(self) -> str:
        """Folder name of this cell's generator fit and synthetic set under their method."""
        return cell_key(self.fold, self.generator_seed)

    @property
    def scores_synthetic_set(self) -> bool:
        """True for the cells that score their synthetic set (fidelity, adherence): one per generator
        fit and arm, the cell whose classifier seed equals the generator seed (never a ``real`` cell)."""
        return self.method != REFERENCE and self.seed == self.generator_seed


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
        generator = cls.load(gen_dir)  # with the config saved at fit time; sampling follows the study's
        generator.use_sampling_settings(config.generators.get(method, {}))
        return generator
    generator = build_generator(method, config)
    generator.fit(train, gen_dir, seed=seed)
    return generator


def synthesize(generator: Generator, method: str, train: list[Record], config: StudyConfig,
               out_dir: Path, gen_dir: Path, seed: int, synthesis: SynthesisConfig | None = None) -> None:
    """Generate the method's images for one cell into ``out_dir`` (once, at the largest of
    ``synthesis.ratios`` when given, or with the ``synthesis`` settings passed); ``arm_synthetic``
    reads them."""
    done = out_dir / "done.json"
    if not done.exists():
        remove_tree(out_dir)  # whatever an interrupted sampling run left: start the folder again
        counts = synthetic_counts(train, config.data.classes, synthesis or largest_dose(config.synthesis))
        rng = np.random.default_rng([seed, 7])
        for k, label in enumerate(config.data.classes):
            if counts[label] == 0:
                continue
            masks = None
            if generator.needs_masks:
                pool = [r.mask for r in train if r.label == label and r.mask is not None]
                masks = [pool[i] for i in rng.integers(len(pool), size=counts[label])] if pool else None
            write_samples(sample_sharded(generator, label, counts[label], seed * 1000 + k, masks),
                          out_dir, method, gen_dir)
        write_json(done, {"counts": counts})


def sample_sharded(generator: Generator, label: str, n: int, seed: int,
                   masks: Sequence[np.ndarray] | None) -> list[Synthetic]:
    """``n`` images of ``label`` sampled in chunks of SAMPLE_CHUNK, chunk ``j`` with seed ``seed`` (the
    first) or ``derived_seed(seed, j)`` cut to 32 bits (generators combine their seed with small
    numbers): the same images however many processes share the chunks (``accel.shard_map``: N
    processes of ``accelerate launch`` sample N times faster)."""
    starts = range(0, n, SAMPLE_CHUNK)

    def chunk(j: int) -> list[Synthetic]:
        lo, hi = starts[j], min(starts[j] + SAMPLE_CHUNK, n)
        return generator.sample(label, hi - lo, seed=seed if j == 0 else derived_seed(seed, j) % 2**32,
                                masks=None if masks is None else masks[lo:hi])

    return [s for part in shard_map(chunk, len(starts)) for s in part]


def largest_dose(synthesis: SynthesisConfig) -> SynthesisConfig:
    """The synthesis settings a fold's set is sampled with: at the largest of ``ratios`` when given."""
    return synthesis if not synthesis.ratios else synthesis.model_copy(update={"ratio": max(synthesis.ratios)})


def dose(synthetic: Sequence[Record], train: Sequence[Record], config: StudyConfig,
         ratio: float | None) -> list[Record]:
    """The synthetic images of one arm: all of them (``ratio`` None), else per class the first
    ``round(ratio x real count)`` of the set sampled at the largest ratio (the images of an arm at a
    smaller ratio are a prefix of those of a larger one)."""
    if ratio is None:
        return list(synthetic)
    counts = synthetic_counts(train, config.data.classes, config.synthesis.model_copy(update={"ratio": ratio}))
    taken = dict.fromkeys(counts, 0)
    out = []
    for r in synthetic:  # in manifest order: per class, by index
        if taken.get(r.label, 0) < counts.get(r.label, 0):
            taken[r.label] += 1
            out.append(r)
    return out


def arm_synthetic(cell: Cell, config: StudyConfig, train: Sequence[Record], run_dir: Path) -> list[Record]:
    """The synthetic images a cell's arm trains on, read from its (finished) synthetic folder: the
    whole set, its dose (``synthesis.ratios``) or what passed the filter (``synthesis.filter``)."""
    folder = cell.synthetic_folder(run_dir)
    synthetic = read_synthetic(folder, cell.generator)
    if cell.filtered:
        requested = synthetic_counts(train, config.data.classes, config.synthesis)
        real = cell.reference_cell.folder(run_dir) / "classifier"
        return filter_synthetic(synthetic, requested, real, config, folder, f"{cell.method} {cell.generator_key}")
    return dose(synthetic, train, config, cell.ratio)


def read_synthetic(folder: Path, method: str) -> list[Record]:
    """Records for the images listed in a synthetic folder's manifest (see ``read_manifest``)."""
    records = []
    for entry in read_manifest(folder):
        image = read_png(folder / entry["image"])
        mask = read_png_mask(folder / entry["mask"]) if "mask" in entry else None
        records.append(Record(
            id=f"{method}:{entry['label']}_{entry['index']}", label=entry["label"], image=image,
            mask=mask, path=str(Path("synthetic") / method / folder.name / entry["image"]),
            meta={"synthetic": True, "seed": entry["seed"]},
        ))
    return records


def _unit(run_dir: Path, folder: Path) -> str:
    """The claim name (``busynth.locks``) of a folder of the run: its path in the run folder."""
    return Path(folder).relative_to(run_dir).as_posix()


def fit_generator(method: str, fold: int, generator_seed: int, config: StudyConfig, study: StudyData,
                  run_dir: Path) -> Generator:
    """Fit (or load) a fold's generator under its claim, after the fits it builds on (``Method.after``,
    when in the run: a fold's ``controlnet`` on its ``sd-lora`` fit, whichever worker gets there
    first). A base needs only its fit, not its synthetic set: the base's sampling and the fit on top
    of it may run at once. Returns the generator."""
    key = cell_key(fold, generator_seed)
    for base in bases(method, config.run.methods):
        (base_dir, fitted), _ = fit_outputs(base, key, run_dir)
        if not (base_dir / fitted).exists():
            fit_generator(base, fold, generator_seed, config, study, run_dir)
    train = study.split.select(study.records, fold, "train")
    check_no_leak(study.split, fold, {"generator": [r.id for r in train]}, study.audit.group_of)
    (gen_dir, _), _ = fit_outputs(method, key, run_dir)
    with claim(run_dir, _unit(run_dir, gen_dir)):
        return fit_or_load_generator(method, config, train, gen_dir, generator_seed)


def prepare_generator(method: str, fold: int, generator_seed: int, config: StudyConfig, study: StudyData,
                      run_dir: Path) -> Generator:
    """``fit_generator``, then the fold's synthetic set sampled under its claim (once). Returns the
    generator."""
    generator = fit_generator(method, fold, generator_seed, config, study, run_dir)
    (gen_dir, _), (out_dir, _) = fit_outputs(method, cell_key(fold, generator_seed), run_dir)
    with claim(run_dir, _unit(run_dir, out_dir)):
        train = study.split.select(study.records, fold, "train")
        synthesize(generator, method, train, config, out_dir, gen_dir, generator_seed)
    return generator


def needs_held(cell: Cell, config: StudyConfig, run_dir: Path) -> str | None:
    """What an unfinished cell waits on that another worker holds now -- its generator fit or synthetic
    set, the fits they build on, a filtered arm's real cell -- as the unit's name; None
    when nothing it needs is held. A local worker passes such a cell over instead of blocking on it.
    Under ``accelerate launch`` (one worker of several processes, whose claims always wait) None."""
    if cell.method == REFERENCE or process_state() is not None:
        return None
    key = cell_key(cell.fold, cell.generator_seed)
    needs = [fit_outputs(m, key, run_dir)[0] for m in bases(cell.generator, config.run.methods)]
    needs += fit_outputs(cell.generator, key, run_dir)
    if cell.filtered:
        needs.append((cell.reference_cell.folder(run_dir), "metrics.json"))
    for folder, done in needs:
        if not (folder / done).exists():
            with claim(run_dir, _unit(run_dir, folder), wait=False) as held:
                if not held:
                    return _unit(run_dir, folder)
    return None


def cell_unit(cell: Cell, run_dir: Path) -> str:
    """The claim name of a cell: its folder in the run folder."""
    return _unit(run_dir, cell.folder(run_dir))


def run_claimed(cell: Cell, config: StudyConfig, study: StudyData, run_dir: Path,
                tracker_log: Callable[[dict, int], None] | None = None) -> tuple[dict, bool]:
    """``run_cell`` under the cell's claim, waiting for it: (metrics row, whether it was computed now)."""
    cell_dir = cell.folder(run_dir)
    with claim(run_dir, cell_unit(cell, run_dir)):
        computed = not (cell_dir / "metrics.json").exists()
        return run_cell(cell, config, study, run_dir, tracker_log), computed


def run_cell(cell: Cell, config: StudyConfig, study: StudyData, run_dir: Path,
             tracker_log: Callable[[dict, int], None] | None = None) -> dict:
    """Train and score one cell (resuming if interrupted); returns its metrics row. The caller holds
    the cell's claim (``run_claimed``)."""
    cell_dir = cell.folder(run_dir)
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
        generator = prepare_generator(cell.generator, cell.fold, cell.generator_seed, config, study, run_dir)
        generator_ids = list(generator.train_ids)
        if cell.filtered:
            # The filter is the classifier of the fold's real cell: that cell first (done, or done now).
            run_claimed(cell.reference_cell, config, study, run_dir)
            pool = config.synthesis.model_copy(update={"ratio": config.synthesis.ratio * config.synthesis.filter_pool})
            gen_dir = run_dir / "generators" / cell.generator / cell.generator_key
            with claim(run_dir, _unit(run_dir, cell.synthetic_folder(run_dir))):
                synthesize(generator, cell.generator, train, config, cell.synthetic_folder(run_dir), gen_dir,
                           cell.generator_seed, synthesis=pool)
        synthetic = arm_synthetic(cell, config, train, run_dir)
    if config.run.task == "segmentation":
        train, val, test, synthetic = (lesion_pairs(part) for part in (train, val, test, synthetic))
        if config.segmenter.validation == "train":
            train, val = train + val, []
    fit_set = train + synthetic
    used = {"classifier_train": [r.id for r in fit_set], "val": [r.id for r in val],
            "generator_train": generator_ids, "test": [r.id for r in test]}
    check_no_leak(split, cell.fold, {k: v for k, v in used.items() if k != "test"}, study.audit.group_of)
    write_json(cell_dir / "ids.json", used)
    row = {"method": cell.method, "fold": cell.fold, "seed": cell.seed, "generator_seed": cell.generator_seed,
           "n_train_real": len(train), "n_synthetic": len(synthetic), "n_val": len(val), "n_test": len(test)}
    if config.run.task == "segmentation":
        row.update(_segment(fit_set, val, test, len(train), config, cell_dir, cell.seed))
        row["seconds"] = round(time.perf_counter() - start, 2)
        write_json(cell_dir / "metrics.json", row)
        return row
    size = config.classifier.image_size
    masks, has_mask = masks_and_flags(fit_set, size) if config.classifier.mask_weight > 0 else (None, None)
    result = fit_classifier(
        stack_images(fit_set, size), label_indices(fit_set, classes),
        stack_images(val, size), label_indices(val, classes),
        config.classifier, len(classes), cell_dir / "classifier", seed=cell.seed,
        tracker_log=_prefixed(tracker_log, f"{cell.method}/{cell.key}"), n_real=len(train),
        train_masks=masks, has_mask=has_mask,
    )
    proba = predict_proba(result.model, stack_images(test, size), tta=config.classifier.tta)
    y_true = label_indices(test, classes)
    write_text(cell_dir / "predictions.csv", predictions_csv(test, y_true, proba, classes))
    row.update(train_steps=result.steps, best_epoch=result.best_epoch, seconds=round(time.perf_counter() - start, 2),
               **classification_metrics(y_true, proba, classes))
    write_json(cell_dir / "metrics.json", row)
    return row


def _segment(fit_set: Sequence[Record], val: Sequence[Record], test: Sequence[Record], n_real: int,
             config: StudyConfig, cell_dir: Path, seed: int) -> dict:
    """Train the segmenter on the cell's pairs, score it on the test pairs: ``scores.csv`` (Dice, IoU,
    HD95 per image), ``examples.safetensors`` (the first test images with true and predicted masks,
    for the report); returns the metric part of the cell's row (means over the test pairs)."""
    cfg = config.segmenter
    size = cfg.image_size
    result = fit_segmenter(stack_images(fit_set, size), stack_masks(fit_set, size), stack_images(val, size),
                           stack_masks(val, size), cfg, cell_dir / "segmenter", seed=seed, n_real=n_real)
    images, true = stack_images(test, size), stack_masks(test, size)
    pred = predict_masks(result.model, images, cfg.threshold, tta=cfg.tta)
    scores = segmentation_scores(pred, true)
    write_text(cell_dir / "scores.csv", scores_csv(test, label_indices(test, config.data.classes), scores))
    k = min(len(test), EXAMPLES)
    save_safetensors(cell_dir / "examples.safetensors",
                     {"images": torch.from_numpy(images[:k]), "true": torch.from_numpy(true[:k].astype(np.uint8)),
                      "pred": torch.from_numpy(pred[:k].astype(np.uint8))}, {"ids": [r.id for r in test[:k]]})
    return {"train_steps": result.steps, "best_epoch": result.history[-1]["epoch"] if result.history else -1,
            **{name: float(scores[:, i].mean()) for i, name in enumerate(SCORES)}}


def scores_unit(cell: Cell) -> str:
    """The claim name of the scoring of a generator cell's synthetic set."""
    return f"scores/{cell.method}/{cell.key}"


def score_synthetic_set(cell: Cell, config: StudyConfig, study: StudyData, run_dir: Path) -> None:
    """The scores of a generator cell's synthetic set, read from disk once: fidelity.json (FID/KID,
    precision/recall, diversity, memorisation against the fold's real training images; test images
    enter only the real-vs-real reference), label_fidelity.json (the fold's real-only classifier on
    the synthetic images and on the real test images) and, for images with masks, adherence.json
    (only this under run.task=segmentation). Each is computed once; a note until the real cell exists.
    The caller holds the claim ``scores_unit(cell)``."""
    train = study.split.select(study.records, cell.fold, "train")
    test = study.split.select(study.records, cell.fold, "test")
    synthetic = arm_synthetic(cell, config, train, run_dir)
    if config.run.task == "segmentation":  # no classifier to take features or labels from: masks only
        evaluate_adherence(run_dir, cell.method, cell.fold, cell.seed, config.data.classes, train, synthetic)
        return
    evaluate_cell(run_dir, cell.method, cell.fold, cell.seed, config, train, test, synthetic)
    if config.run.cas:
        val = study.split.select(study.records, cell.fold, "val")
        evaluate_cas(run_dir, cell.method, cell.fold, cell.seed, config, train, val, test, synthetic)
    evaluate_label_fidelity(run_dir, cell.method, cell.fold, cell.seed, config, test, synthetic)
    evaluate_adherence(run_dir, cell.method, cell.fold, cell.seed, config.data.classes, train, synthetic)


def _prefixed(log_fn: Callable[[dict, int], None] | None, prefix: str) -> Callable[[dict, int], None] | None:
    if log_fn is None:
        return None
    return lambda values, step: log_fn({f"{prefix}/{k}": v for k, v in values.items()}, step)
