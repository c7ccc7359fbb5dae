"""The run folder's bookkeeping: the data stages that fill ``data/``, and the fingerprints that keep
one folder to one set of settings.

``data/load_summary.json``, ``audit.json``, ``split.csv`` and ``split_leaks.json`` are written once;
a rerun reads the stored split back. ``run.json`` holds the fingerprint of the sections every cell
shares (``shared_sections`` of its task) and ``cells/<method>/settings.json`` each method's own settings: a
rerun that changes either is refused, naming the fields, so results are never mixed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from busynth import __version__
from busynth.config import StudyConfig
from busynth.data.audit import AuditReport, audit_records
from busynth.data.busi import load_dataset
from busynth.data.leaks import leak_report
from busynth.data.phantom import make_phantom
from busynth.data.records import Record
from busynth.data.splits import Split, make_split, read_split
from busynth.errors import RunStateError
from busynth.generators.base import parse_settings
from busynth.io import changed_keys, link_or_copy, read_json, write_dir_atomic, write_json, write_text
from busynth.presets import build_config, dump_config
from busynth.registry import REFERENCE, cell_folder, fit_outputs

log = logging.getLogger(__name__)


# Config sections every cell depends on; a run folder refuses a rerun that changes them.
SHARED_SECTIONS = ("data", "phantom", "audit", "split", "classifier", "segmenter", "synthesis")


def shared_sections(task: str) -> tuple[str, ...]:
    """The sections the cells of ``run.task`` depend on: a classification cell trains no segmenter, so
    a changed ``segmenter`` (e.g. a preset's new segmentation default) leaves its run folder usable."""
    return tuple(s for s in SHARED_SECTIONS if not (task == "classification" and s == "segmenter"))


@dataclass
class StudyData:
    """The records of a run and what the data stages found."""

    records: list[Record]
    audit: AuditReport
    split: Split
    source: str


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


def changed_sections(old: dict, config: StudyConfig, sections: Sequence[str]) -> list[str]:
    """Dotted names of the settings in ``sections`` that differ between ``old`` (a config dict, e.g. a
    run folder's config.yaml) and ``config``; a setting added to busynth since ``old`` was written
    counts as unchanged at its default."""
    new, defaults = config.model_dump(mode="json"), StudyConfig().model_dump(mode="json")
    return changed_keys({k: old.get(k) or {} for k in sections}, {k: new[k] for k in sections},
                        {k: defaults[k] for k in sections})


def open_run_dir(run_dir: Path, config: StudyConfig, source: str) -> None:
    """Create the run folder, or check that an existing one was made with the same settings.

    The fingerprint covers the sections every cell shares (data, split, classifier, ...);
    ``run`` (methods, seeds, tracker) may change between invocations, adding cells, and each
    method's own settings are checked per method by ``check_method_settings``.
    """
    # run.task decides what every cell is, so a folder holds one task (classification keeps old fingerprints)
    task = config.run.task
    sections = shared_sections(task)
    fingerprint = config.fingerprint(*sections) + ("" if task == "classification" else f"-{task}")
    info_path = run_dir / "run.json"
    if info_path.exists():
        info = read_json(info_path)
        if info.get("fingerprint") != fingerprint or info.get("data") != source:
            old = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
            changed = changed_sections(old, config, sections)
            if info.get("data") != source:
                changed.insert(0, f"data source ({info.get('data')} -> {source})")
            old_task = (old.get("run") or {}).get("task", "classification")
            if old_task != task:
                changed.insert(0, f"run.task ({old_task} -> {task})")
            if changed or not old:
                raise RunStateError(
                    f"run folder {run_dir} was started with different settings; changed: "
                    f"{', '.join(changed[:8]) or 'unknown'}. Use a new --out folder (results are never mixed)."
                )
            write_json(info_path, {**info, "fingerprint": fingerprint})
    else:
        write_json(info_path, {
            "data": source, "fingerprint": fingerprint, "busynth_version": __version__,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        })
    write_text(run_dir / "config.yaml", dump_config(config))


def run_config(run_dir: Path) -> StudyConfig:
    """The resolved config a run folder was made with (its config.yaml), for commands that train
    nothing; a folder written before ``classical`` moved under ``generators`` (or with the retired
    ``classifier.num_workers``) is read as well."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunStateError(f"{run_dir} is not a run folder: {path.name} is missing")
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and "classical" in data:
        data.setdefault("generators", {})["classical"] = data.pop("classical")
    if isinstance(data, dict) and isinstance(data.get("classifier"), dict):
        data["classifier"].pop("num_workers", None)  # gone since the classifier trains on the engine
    return build_config(data, where=str(path))


def run_records(run_dir: Path, config: StudyConfig) -> list[Record]:
    """The images a run folder's study was made from (its data source in run.json, or the phantom)."""
    info = read_json(Path(run_dir) / "run.json") if (Path(run_dir) / "run.json").is_file() else {}
    source = info.get("data", "phantom")
    if source != "phantom" and not Path(source).is_dir():
        raise RunStateError(f"{run_dir}: its data set {source} (run.json) is not there any more")
    return load_records(config, None if source == "phantom" else Path(source))[0]


def method_settings(method: str, config: StudyConfig) -> dict:
    """The resolved settings of one method (its generator config with defaults filled in)."""
    if method == REFERENCE:
        return {}
    return parse_settings(method, config.generators.get(method, {})).model_dump(mode="json")


def changed_method_settings(method: str, saved: dict, config: StudyConfig) -> list[str]:
    """``generators.<method>.<field>`` for each setting of ``method`` in ``config`` that differs from
    ``saved`` (a ``settings.json``); a setting added to busynth since counts as unchanged at its default."""
    defaults = {} if method == REFERENCE else parse_settings(method, {}, fit_inputs=False).model_dump(mode="json")
    return [f"generators.{method}.{c}" for c in changed_keys(saved, method_settings(method, config), defaults)]


def check_method_settings(run_dir: Path, methods: Sequence[str], config: StudyConfig) -> None:
    """Record each method's settings in ``cells/<method>/settings.json`` on first use; refuse a
    rerun whose settings for a method differ, naming the changed fields."""
    for method in methods:
        path = cell_folder(run_dir, method) / "settings.json"
        if path.exists():
            changed = changed_method_settings(method, read_json(path), config)
            if changed:
                raise RunStateError(
                    f"run folder {run_dir}: method {method!r} was run with other settings; changed: "
                    f"{', '.join(changed[:8])}. Use a new --out folder."
                )
        else:
            write_json(path, method_settings(method, config))


# generators/reused.json: which fits (``<method>/<fold>_<seed>``) came from which run folder.
REUSED = "reused.json"


def reuse_fits(source: Path, run_dir: Path, config: StudyConfig, split: Split, data_source: str,
               fits: Sequence[tuple[str, int, str]]) -> list[str]:
    """``--synthetic-from``: link another run folder's finished generator fits and synthetic sets
    (``generators/<method>/<key>/``, ``synthetic/<method>/<key>/``) into this one for each
    ``(method, fold, key)`` in ``fits`` this run has not started itself, so a study of another
    task or classifier reuses hours of generator training. Refused, naming what differs, unless the
    other run drew on the same images (data source and ``data``/``phantom`` settings), sampled with the
    same ``synthesis`` settings, ran the method with the same settings and fitted the generator on
    exactly this run's training images of the fold. Fits the other run lacks are made here as usual.
    Returns the fits linked now (also listed in ``generators/reused.json``)."""
    source = Path(source)
    where = f"--synthetic-from {source}"
    if source.resolve() == Path(run_dir).resolve():
        raise RunStateError(f"{where}: that is this run's own folder")
    other = run_config(source)
    info = read_json(source / "run.json") if (source / "run.json").is_file() else {}
    if info.get("data") != data_source:
        raise RunStateError(f"{where}: its images are {info.get('data')}, this run's are {data_source}")
    sections = ("data", "phantom", "synthesis") if data_source == "phantom" else ("data", "synthesis")
    changed = changed_sections(other.model_dump(mode="json"), config, sections)
    if changed:
        raise RunStateError(f"{where}: made with other settings; changed: {', '.join(changed[:8])}")
    reused_path = Path(run_dir) / "generators" / REUSED
    reused = read_json(reused_path) if reused_path.is_file() else {}
    linked = []
    for method, fold, key in fits:
        (their_fit, fitted), (their_set, sampled) = fit_outputs(method, key, source)
        mine = [folder for folder, _ in fit_outputs(method, key, run_dir)]
        if not ((their_fit / fitted).is_file() and (their_set / sampled).is_file()) or any(m.exists() for m in mine):
            continue  # not finished there, or this run's own (finished or under way): made or kept here
        saved = cell_folder(source, method) / "settings.json"
        changed = changed_method_settings(method,
                                          read_json(saved) if saved.is_file() else method_settings(method, other),
                                          config)
        if changed:
            raise RunStateError(f"{where}: method {method!r} was run there with other settings; changed: "
                                f"{', '.join(changed[:8])}")
        if sorted(read_json(their_fit / fitted).get("train_ids", [])) != sorted(split.ids(fold, "train")):
            raise RunStateError(f"{where}: generators/{method}/{key} was fitted on other images than this run's "
                                f"training part of fold {fold} (the two data/split.csv differ)")
        # the fit first: one killed before its set is linked samples the set here
        for src, dst in zip((their_fit, their_set), mine):
            write_dir_atomic(dst, lambda tmp, src=src: shutil.copytree(src, tmp, dirs_exist_ok=True,
                                                                        copy_function=link_or_copy))
        reused[f"{method}/{key}"] = str(source.resolve())
        linked.append(f"{method}/{key}")
    if linked:
        write_json(reused_path, reused)
        log.info("%s: reused %d generator fit(s) and synthetic set(s): %s", where, len(linked), ", ".join(linked))
    return linked
