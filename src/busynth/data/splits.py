"""Leak-free splits: stratified *group* k-fold or holdout, a grouped validation part, split files.

Groups are the audit's near-duplicate groups, so no member of a group ever sits in two
parts of one fold. scikit-learn's ``StratifiedGroupKFold`` does the assignment. A split is
stored as a long CSV (``fold,id,path,label,group,part``; part is train, val, test, excluded or
purged) that can be read back, and users may bring their own split file instead; what happens
when such a file lets a duplicate group straddle test and train/val is ``split.on_leak``
(``busynth.data.leaks``).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from busynth.config import SplitConfig
from busynth.data.audit import AuditReport
from busynth.data.leaks import apply_leak_policy
from busynth.data.records import Record, check_relative
from busynth.errors import DataError, LeakError
from busynth.io import write_text

log = logging.getLogger(__name__)

# "purged": train/val images dropped because their duplicate group has a test image (split.on_leak=purge).
PARTS = ("train", "val", "test", "excluded", "purged")
COLUMNS = ("fold", "id", "path", "label", "group", "part")


@dataclass
class Split:
    """Per fold, which part every record belongs to. ``rows`` are dicts with COLUMNS.

    For a split file (``busynth.data.leaks``): ``leaks`` are the duplicate groups it lets straddle
    test and train/val, ``purged`` the ids per fold moved to part ``purged`` (on_leak=purge), and
    ``leaky`` is True when such groups were kept as given (on_leak=keep).
    """

    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    leaks: list[dict] = field(default_factory=list)
    purged: dict[int, list[str]] = field(default_factory=dict)
    leaky: bool = False

    @property
    def folds(self) -> list[int]:
        """Fold numbers in ascending order."""
        return sorted({int(r["fold"]) for r in self.rows})

    def ids(self, fold: int, part: str) -> list[str]:
        """Ids of the records in ``part`` of ``fold``, in file order."""
        return [r["id"] for r in self.rows if int(r["fold"]) == fold and r["part"] == part]

    def select(self, records: Sequence[Record], fold: int, part: str) -> list[Record]:
        """The records of ``part`` of ``fold``, in the order of ``records``."""
        wanted = set(self.ids(fold, part))
        return [r for r in records if r.id in wanted]

    def counts(self) -> dict[int, dict[str, dict[str, int]]]:
        """fold -> part -> label -> count."""
        out: dict[int, dict[str, dict[str, int]]] = {}
        for r in self.rows:
            part = out.setdefault(int(r["fold"]), {}).setdefault(r["part"], {})
            part[r["label"]] = part.get(r["label"], 0) + 1
        return out

    def to_csv(self) -> str:
        """The split as CSV text."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: r[k] for k in COLUMNS})
        return buf.getvalue()

    def write(self, path: str | Path) -> Path:
        """Atomically write the split CSV."""
        return write_text(path, self.to_csv())

    def format(self, classes: Sequence[str]) -> str:
        """A readable table of counts per fold and part."""
        lines = ["fold  part      " + "  ".join(f"{c:>9}" for c in classes) + "      all"]
        for fold, parts in self.counts().items():
            for part in PARTS:
                if part in parts:
                    counts = [parts[part].get(c, 0) for c in classes]
                    lines.append(f"{fold:>4}  {part:<8}  " + "  ".join(f"{n:>9}" for n in counts)
                                 + f"  {sum(counts):>7}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def leaking_groups(split: Split) -> list[tuple[int, int, list[str]]]:
    """(fold, group, parts) for every duplicate group found in more than one of train, val, test."""
    seen: dict[tuple[int, int], set[str]] = {}
    for r in split.rows:
        if r["part"] not in ("excluded", "purged") and r["group"] != "":
            seen.setdefault((int(r["fold"]), int(r["group"])), set()).add(r["part"])
    return [(f, g, sorted(p)) for (f, g), p in sorted(seen.items()) if len(p) > 1]


def _grouped_kfold(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Test-index arrays of a stratified group k-fold (shuffled with ``seed``)."""
    min_class = min(Counter(labels.tolist()).values())
    if min_class < n_splits:
        raise DataError(f"a class has only {min_class} images, fewer than the {n_splits} folds asked for")
    if len(set(groups.tolist())) < n_splits:
        raise DataError(f"only {len(set(groups.tolist()))} duplicate groups, fewer than the {n_splits} folds asked for")
    skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [test for _, test in skf.split(np.zeros(len(labels)), labels, groups)]


def make_split(records: Sequence[Record], audit: AuditReport, config: SplitConfig | None = None) -> Split:
    """Assign every record to train/val/test/excluded per fold, keeping duplicate groups together.

    Cross-class duplicate groups are excluded when ``exclude_cross_class`` (listed in notes).
    Returns a Split whose rows cover every record in every fold.
    """
    config = config or SplitConfig()
    excluded = audit.cross_class_ids if config.exclude_cross_class else set()
    kept = [r for r in records if r.id not in excluded]
    if not kept:
        raise DataError("no records left to split")
    labels = np.array([r.label for r in kept])
    groups = np.array([audit.group_of[r.id] for r in kept])
    # Repeated cross-validation: repeat r is a fresh fold assignment with seed `seed + r`; its
    # folds are numbered r * folds, ..., r * folds + folds - 1.
    test_parts: list[np.ndarray] = []
    for repeat in range(config.repeats):
        if config.mode == "kfold":
            test_parts += _grouped_kfold(labels, groups, config.folds, config.seed + repeat)
        else:
            n_splits = max(2, round(1 / config.test_fraction))
            test_parts += _grouped_kfold(labels, groups, n_splits, config.seed + repeat)[:1]
    val_splits = max(2, round(1 / config.val_fraction))
    rows: list[dict] = []
    for fold, test_idx in enumerate(test_parts):
        part = np.array(["train"] * len(kept), dtype=object)
        part[test_idx] = "test"
        rest = np.nonzero(part == "train")[0]
        val_local = _grouped_kfold(labels[rest], groups[rest], val_splits, config.seed + 1000 + fold)[0]
        part[rest[val_local]] = "val"
        for r, p in zip(kept, part, strict=True):
            rows.append(_row(fold, r, audit.group_of[r.id], str(p)))
        rows.extend(_row(fold, r, audit.group_of[r.id], "excluded") for r in records if r.id in excluded)
    notes = [(f"excluded {len(excluded)} images in cross-class duplicate groups "
              "(split.csv part=excluded; audit.json lists the groups)")] if excluded else []
    split = Split(rows=rows, notes=notes)
    leaks = leaking_groups(split)
    if leaks:  # cannot happen with StratifiedGroupKFold; kept as a hard guard
        raise LeakError(f"internal error: the split made for these data lets {len(leaks)} duplicate groups "
                        f"straddle parts (fold, group, parts: {leaks[:5]}); please report it")
    return split


def _row(fold: int, r: Record, group: int | str, part: str) -> dict:
    return {"fold": fold, "id": r.id, "path": r.path, "label": r.label, "group": group, "part": part}


def read_split(path: str | Path, records: Sequence[Record], audit: AuditReport | None = None,
               config: SplitConfig | None = None) -> Split:
    """Read a split file and match it to ``records``.

    Accepted forms (CSV with a header): ours (``fold,id,...,part``); ``id`` or ``path`` with
    ``split``/``part`` (train/val/test: one fold, numbered 0); ``id`` or ``path`` with
    ``fold`` only (the test fold; train/val are the other folds, val carved as in make_split
    is not applied: the file's other folds become train, and a grouped val part is carved
    from them). Unknown ids/paths raise DataError naming them; records the file does not
    name are marked excluded and counted in the notes. Duplicate groups that straddle test and
    train/val are refused, purged or kept as ``config.on_leak`` says (``busynth.data.leaks``:
    LeakError, part ``purged``, or ``Split.leaky``); groups that straddle only train and val are
    counted in the notes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        table = list(reader)
    key = "id" if "id" in header else "path" if "path" in header else None
    part_col = "part" if "part" in header else "split" if "split" in header else None
    if key is None or (part_col is None and "fold" not in header):
        raise DataError(f"{path}: needs an 'id' or 'path' column and a 'part'/'split' or 'fold' column; got {header}")
    if "path" in header:
        for line, row in enumerate(table, start=2):
            check_relative(row["path"], f"{path}:{line}: path")
    lookup = {(r.id if key == "id" else r.path): r for r in records}
    unknown = {}
    for line, row in enumerate(table, start=2):
        if row[key] not in lookup:
            unknown.setdefault(row[key], line)
    if unknown:
        examples = ", ".join(f"line {line}: {name!r}" for name, line in list(unknown.items())[:5])
        raise DataError(f"{path}: {len(unknown)} {key}(s) not in the data set, e.g. {examples}")
    named_twice = Counter(((row.get("fold") or "0") if part_col is not None else "", row[key]) for row in table)
    repeated = sorted({k for (_, k), n in named_twice.items() if n > 1})
    if repeated:
        raise DataError(f"{path}: {len(repeated)} {key}(s) named more than once in one fold, e.g. {repeated[:5]}")
    group_of = audit.group_of if audit else {}
    rows: list[dict] = []
    if part_col is not None:
        for line, row in enumerate(table, start=2):
            part = row[part_col].strip().lower()
            if part not in PARTS:
                raise DataError(f"{path}:{line}: part '{row[part_col]}' is not one of {PARTS}")
            r = lookup[row[key]]
            rows.append(_row(int(row.get("fold") or 0), r, group_of.get(r.id, row.get("group", "")), part))
    else:
        rows = _rows_from_fold_column(path, table, key, lookup, group_of, config or SplitConfig())
    named = {(int(r["fold"]), r["id"]) for r in rows}
    notes = []
    for fold in sorted({int(r["fold"]) for r in rows}):
        missing = [r for r in records if (fold, r.id) not in named]
        rows.extend(_row(fold, r, group_of.get(r.id, ""), "excluded") for r in missing)
        if missing:
            notes.append(f"fold {fold}: {len(missing)} images not named in {path.name} are excluded")
    split = Split(rows=rows, notes=notes)
    config = config or SplitConfig()
    apply_leak_policy(split, config.on_leak, str(path))
    train_val: dict[int, int] = {}
    for fold, _, parts in leaking_groups(split):
        if "test" not in parts:
            train_val[fold] = train_val.get(fold, 0) + 1
    split.notes.extend(f"fold {fold}: {n} duplicate groups straddle train and val (validation scores may be "
                       "optimistic)" for fold, n in sorted(train_val.items()))
    return split


def _rows_from_fold_column(path: Path, table: list[dict], key: str, lookup: dict[str, Record],
                           group_of: dict[str, int], config: SplitConfig) -> list[dict]:
    try:
        fold_of = {row[key]: int(row["fold"]) for row in table}
    except ValueError as exc:
        raise DataError(f"{path}: 'fold' must be an integer ({exc})") from None
    named = [lookup[k] for k in fold_of]
    labels = np.array([r.label for r in named])
    groups = np.array([group_of.get(r.id, i) for i, r in enumerate(named)])
    rows = []
    for fold in sorted(set(fold_of.values())):
        test = np.array([fold_of[k] == fold for k in fold_of])
        rest = np.nonzero(~test)[0]
        val_splits = max(2, round(1 / config.val_fraction))
        val = set(rest[_grouped_kfold(labels[rest], groups[rest], val_splits, config.seed + 1000 + fold)[0]].tolist())
        for i, r in enumerate(named):
            part = "test" if test[i] else "val" if i in val else "train"
            rows.append(_row(fold, r, group_of.get(r.id, ""), part))
    return rows
