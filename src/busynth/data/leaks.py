"""Split files that leak: duplicate groups with members in the test part and in train or val.

A split made by busynth never leaks (``make_split`` keeps groups together). A split *file*
(``--split-file``, e.g. an official benchmark split) may: its train part can hold near
duplicates of its test images. ``split.on_leak`` decides, in :func:`apply_leak_policy`:

- ``refuse`` (default): raise :class:`~busynth.errors.LeakError` naming the groups and files;
- ``purge``: move every train/val member of such a group to part ``purged`` (the test part
  stays as given), recorded in ``Split.purged`` and in ``split.csv`` (part ``purged``);
- ``keep``: run the split as given; ``Split.leaky`` is True and the runner's leak guard
  accepts exactly these groups.

``data/split_leaks.json`` in a run folder (written with ``split.csv`` by
``rundir.prepare_data``; see :func:`leak_report`) records the outcome for the results.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from busynth.errors import DataError, LeakError

if TYPE_CHECKING:
    from busynth.data.splits import Split

log = logging.getLogger(__name__)

POLICIES = ("refuse", "purge", "keep")
TRAINING_PARTS = ("train", "val")
# How many groups a refusal names (then "and N more"), and files per part of one group.
SHOW_GROUPS, SHOW_FILES = 5, 3


def straddling_groups(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every (fold, group) with a member in ``test`` and one in ``train`` or ``val``, as
    ``{"fold", "group", "ids": {part: [ids]}, "paths": {part: [paths]}}`` in fold, group order."""
    members: dict[tuple[int, int], dict[str, list[Mapping[str, Any]]]] = {}
    for r in rows:
        if r["part"] in ("test", *TRAINING_PARTS) and r["group"] != "":
            members.setdefault((int(r["fold"]), int(r["group"])), {}).setdefault(r["part"], []).append(r)
    out = []
    for (fold, group), parts in sorted(members.items()):
        if "test" in parts and any(p in parts for p in TRAINING_PARTS):
            out.append({"fold": fold, "group": group,
                        "ids": {p: [r["id"] for r in parts[p]] for p in sorted(parts)},
                        "paths": {p: [r["path"] for r in parts[p]] for p in sorted(parts)}})
    return out


def _describe(leak: dict) -> str:
    files = []
    for part, paths in leak["paths"].items():
        shown = ", ".join(repr(p) for p in paths[:SHOW_FILES])
        files.append(f"{part} {shown}" + (f" (+{len(paths) - SHOW_FILES})" if len(paths) > SHOW_FILES else ""))
    return f"fold {leak['fold']} group {leak['group']}: " + "; ".join(files)


def refusal_message(source: str, leaks: Sequence[dict]) -> str:
    """One line naming how many groups leak per fold, the first few with their files, and the choices."""
    per_fold: dict[int, int] = {}
    for leak in leaks:
        per_fold[leak["fold"]] = per_fold.get(leak["fold"], 0) + 1
    folds = ", ".join(f"fold {f}: {n}" for f, n in sorted(per_fold.items()))
    shown = " | ".join(_describe(leak) for leak in leaks[:SHOW_GROUPS])
    more = f" | and {len(leaks) - SHOW_GROUPS} more groups" if len(leaks) > SHOW_GROUPS else ""
    return (f"{source}: {len(leaks)} duplicate groups have images both in the test part and in train/val "
            f"({folds}): {shown}{more}. Set split.on_leak=purge to drop their train/val images (the test part "
            f"stays as given) or split.on_leak=keep to run the split as given (results marked 'leaky split')")


def apply_leak_policy(split: Split, policy: str, source: str) -> Split:
    """Refuse, purge or keep the test-straddling groups of ``split`` (read from ``source``); see the
    module docstring. Fills ``split.leaks``, ``split.purged``, ``split.leaky`` and notes (counts
    only; the ids stay in split.csv). Returns ``split``, changed in place."""
    if policy not in POLICIES:
        raise DataError(f"split.on_leak={policy!r} is not one of {POLICIES}")
    leaks = straddling_groups(split.rows)
    split.leaks = leaks
    if leaks and policy == "refuse":
        raise LeakError(refusal_message(source, leaks))
    if leaks and policy == "purge":
        doomed = {(leak["fold"], i) for leak in leaks for p in TRAINING_PARTS for i in leak["ids"].get(p, [])}
        for r in split.rows:
            if (int(r["fold"]), r["id"]) in doomed:
                r["part"] = "purged"
    elif leaks:  # keep
        split.leaky = True
        per_fold: dict[int, int] = {}
        for leak in leaks:
            per_fold[leak["fold"]] = per_fold.get(leak["fold"], 0) + 1
        split.notes.extend(f"fold {f}: {n} duplicate groups straddle test and train/val, kept as given "
                           "(split.on_leak=keep): results are marked 'leaky split'"
                           for f, n in sorted(per_fold.items()))
    split.purged = {}
    for r in split.rows:  # also a stored split read back: its purged rows are already marked
        if r["part"] == "purged":
            split.purged.setdefault(int(r["fold"]), []).append(r["id"])
    for fold, ids in sorted(split.purged.items()):
        split.notes.append(f"fold {fold}: purged {len(ids)} train/val images whose duplicate group has a "
                           "test image (split.csv part=purged); the test part is as given")
    for fold in split.folds:
        for part in ("train", "test"):
            if not split.ids(fold, part):
                raise DataError(f"{source}: fold {fold} has no {part} images"
                                + (" left after purging" if split.purged.get(fold) else ""))
    return split


def accepted_groups(split: Split, fold: int) -> set[int]:
    """Groups of ``fold`` that straddle test and train/val and were accepted with ``on_leak=keep``."""
    return {leak["group"] for leak in split.leaks if leak["fold"] == fold} if split.leaky else set()


def leak_report(split: Split, policy: str, source: str) -> dict:
    """The content of ``data/split_leaks.json``::

        {"policy": "refuse" | "purge" | "keep",   # split.on_leak of the run
         "source": "<split file name>" | "generated",
         "leaky": bool,                           # true only under keep with straddling groups
         "groups": [{"fold": int, "group": int,   # groups straddling test and train/val as given
                     "ids": {"test": [...], "train": [...], "val": [...]}}],  # parts present only
         "purged": {"<fold>": [ids]},             # moved to part "purged" (purge only)
         "n_purged": {"<fold>": int}}
    """
    return {
        "policy": policy, "source": source, "leaky": bool(split.leaky),
        "groups": [{"fold": g["fold"], "group": g["group"], "ids": g["ids"]} for g in split.leaks],
        "purged": {str(f): ids for f, ids in sorted(split.purged.items())},
        "n_purged": {str(f): len(ids) for f, ids in sorted(split.purged.items())},
    }
