"""Audit (exact / near / cross-class duplicates, overlays) and leak-free splits, on phantom data and BUSI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_PHANTOM, TinyBusi
from PIL import Image

from busynth.config import AuditConfig, SplitConfig
from busynth.data.audit import AuditReport, audit_records, overlay_fraction
from busynth.data.busi import load_dataset
from busynth.data.phantom import make_phantom
from busynth.data.records import Record
from busynth.data.splits import Split, leaking_groups, make_split, read_split
from busynth.errors import DataError

CLASSES = ("normal", "benign", "malignant")


def twins(records: list[Record]) -> list[tuple[str, str]]:
    return [(r.id, r.meta["near_duplicate_of"]) for r in records if "near_duplicate_of" in r.meta]


def in_twin_pair(records: list[Record]) -> set[str]:
    return {i for pair in twins(records) for i in pair}


def copy_of(source: Record, new_id: str, label: str | None = None) -> Record:
    label = label or source.label
    return Record(id=new_id, label=label, image=source.image.copy(), mask=source.mask,
                  path=f"phantom:{label}/{new_id}.png", meta={})


@pytest.fixture(scope="module")
def planted(phantom_records: list[Record]) -> dict:
    """Phantom records plus an exact same-class copy and a cross-class copy of two single images."""
    loners = [r for r in phantom_records if r.label == "benign" and r.id not in in_twin_pair(phantom_records)]
    exact_src, cross_src = loners[0], loners[1]
    records = [*phantom_records, copy_of(exact_src, "benign_90"), copy_of(cross_src, "malignant_90", "malignant")]
    return {"records": records, "audit": audit_records(records), "exact": (exact_src.id, "benign_90"),
            "cross": (cross_src.id, "malignant_90")}


@pytest.fixture(scope="module")
def phantom_audit(phantom_records: list[Record]) -> AuditReport:
    return audit_records(phantom_records)


# --- audit -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_twins_share_an_audit_group_with_their_source(seed: int) -> None:
    records = make_phantom(SMALL_PHANTOM.model_copy(update={"seed": seed}))
    pairs = twins(records)
    assert len(pairs) == 7  # round(0.1 * n) per class: 2 + 3 (2.5 rounds up) + 2
    audit = audit_records(records)
    for twin, source in pairs:
        assert audit.group_of[twin] == audit.group_of[source], (twin, source)
        assert any({twin, source} <= set(g) for g in audit.near_groups)
    # twins are near, not exact, duplicates; and the phantom has no other duplicates
    assert audit.exact_groups == []
    assert sorted(tuple(sorted(p)) for p in pairs) == sorted(tuple(g) for g in audit.near_groups)
    assert audit.cross_class_groups == []


def test_near_duplicate_pairs_report_distances_within_the_threshold(phantom_records, phantom_audit) -> None:
    threshold = AuditConfig().near_duplicate_distance
    listed = {frozenset((p["a"], p["b"])): p for p in phantom_audit.pairs}
    for twin, source in twins(phantom_records):
        pair = listed[frozenset((twin, source))]
        assert pair["phash_distance"] <= threshold and pair["dhash_distance"] <= threshold
        assert pair["exact"] is False


def test_a_tighter_threshold_finds_fewer_near_duplicates(phantom_records, phantom_audit) -> None:
    strict = audit_records(phantom_records, AuditConfig(near_duplicate_distance=0))
    assert len(strict.near_groups) < len(phantom_audit.near_groups)


def test_group_numbers_cover_every_record_in_first_appearance_order(phantom_records, phantom_audit) -> None:
    group_of = phantom_audit.group_of
    assert list(group_of) == [r.id for r in phantom_records]
    numbers = list(group_of.values())
    first_seen = list(dict.fromkeys(numbers))
    assert first_seen == list(range(len(first_seen)))
    n_groups = len(phantom_records) - sum(len(g) - 1 for g in phantom_audit.near_groups)
    assert len(set(numbers)) == n_groups


def test_exact_duplicate_with_another_id_is_found(planted) -> None:
    audit, (src, copy) = planted["audit"], planted["exact"]
    assert sorted([src, copy]) in audit.exact_groups
    assert len(audit.exact_groups) == 2  # the planted same-class and cross-class copies
    assert audit.group_of[src] == audit.group_of[copy]
    pair = next(p for p in audit.pairs if {p["a"], p["b"]} == {src, copy})
    assert pair["exact"] is True and pair["phash_distance"] == 0 and pair["dhash_distance"] == 0
    assert not any(set(g) >= {src, copy} for g in audit.cross_class_groups)


def test_cross_class_copy_is_listed_in_cross_class_groups(planted) -> None:
    audit, (src, copy) = planted["audit"], planted["cross"]
    assert audit.cross_class_groups == [sorted([src, copy])]
    assert audit.cross_class_ids == {src, copy}
    text = audit.format()
    assert "groups spanning two classes: 1" in text and f"cross-class: {', '.join(sorted([src, copy]))}" in text


def test_audit_report_is_json_ready(planted) -> None:
    as_dict = json.loads(json.dumps(planted["audit"].to_dict()))
    assert as_dict["n_images"] == len(planted["records"])
    assert as_dict["n_exact_groups"] == 2 and as_dict["n_cross_class_groups"] == 1
    assert as_dict["n_in_near_groups"] == sum(len(g) for g in as_dict["near_groups"])
    assert set(as_dict["group_of"]) == {r.id for r in planted["records"]}


def _with_hist(rid: str, hist: list[int] | None) -> Record:
    meta = {} if hist is None else {"channel_spread_hist": hist}
    return Record(id=rid, label="benign", image=np.full((4, 4), 9, np.uint8), mask=None, path=rid, meta=meta)


def test_overlay_flags_coloured_pixels_and_not_gray_ones(phantom_records) -> None:
    coloured = [990] + [0] * 255
    coloured[200] = 10  # 1 % of the pixels differ by 200 between channels
    gray_rgb = [1000] + [0] * 255  # an RGB file whose channels are equal
    faint = [0] * 256
    faint[20] = 1000  # spread exactly the threshold (20): not coloured
    rare = [999_999] + [0] * 255
    rare[100] = 1  # one coloured pixel in a million: below overlay_min_fraction
    extra = [_with_hist("benign_91", coloured), _with_hist("benign_92", gray_rgb), _with_hist("benign_93", faint),
             _with_hist("benign_94", rare), _with_hist("benign_95", None)]
    audit = audit_records([*phantom_records[:10], *extra])
    assert audit.overlays == ["benign_91"]
    assert overlay_fraction(extra[0].meta, 20) == pytest.approx(0.01)
    assert overlay_fraction(extra[2].meta, 19) == 1.0 and overlay_fraction(extra[2].meta, 20) == 0.0
    assert audit.without_mask == [r.id for r in extra]


def test_overlay_found_in_a_loaded_rgb_file(tiny_busi: TinyBusi) -> None:
    path = tiny_busi.path("benign", "benign (3).png")
    gray = tiny_busi.images["benign_3"]
    rgb = np.dstack([gray] * 3)
    rgb[2, :] = (255, 255, 0)  # a yellow caliper line
    Image.fromarray(rgb).save(path)
    plain = tiny_busi.path("benign", "benign (1).png")
    Image.fromarray(np.dstack([tiny_busi.images["benign_1"]] * 3)).save(plain)  # RGB but gray
    records = load_dataset(tiny_busi.root).records
    assert audit_records(records).overlays == ["benign_3"]


# --- splits ------------------------------------------------------------------------------------


def parts_per_group(split: Split, group_of: dict[str, int]) -> dict[tuple[int, int], set[str]]:
    """(fold, group) -> parts its members are in, recomputed from the audit (not the CSV's column)."""
    out: dict[tuple[int, int], set[str]] = {}
    for row in split.rows:
        if row["part"] != "excluded":
            out.setdefault((int(row["fold"]), group_of[row["id"]]), set()).add(row["part"])
    return out


def check_split(split: Split, records: list[Record], audit: AuditReport, n_folds: int, excluded: set[str],
                holdout: float | None = None) -> None:
    """Every invariant a split must keep, checked independently of make_split's own guard.

    k-fold (holdout None): the k test parts partition the kept records; holdout: one fold
    whose test part holds about ``holdout`` of each class.
    """
    test_share = 1 / n_folds if holdout is None else holdout
    ids = [r.id for r in records]
    label_of = {r.id: r.label for r in records}
    assert split.folds == list(range(n_folds))
    assert leaking_groups(split) == []
    straddling = {k: v for k, v in parts_per_group(split, audit.group_of).items() if len(v) > 1}
    assert straddling == {}
    kept = [i for i in ids if i not in excluded]
    tests: list[str] = []
    for fold in split.folds:
        rows = [r for r in split.rows if int(r["fold"]) == fold]
        assert Counter(r["id"] for r in rows) == Counter(ids)  # every record exactly once
        assert {r["id"] for r in rows if r["part"] == "excluded"} == excluded
        assert all(r["group"] == audit.group_of[r["id"]] and r["label"] == label_of[r["id"]] for r in rows)
        for part in ("train", "val", "test"):
            assert split.ids(fold, part), f"fold {fold}: empty {part}"
            assert set(Counter(label_of[i] for i in split.ids(fold, part))) == set(CLASSES), (fold, part)
        tests += split.ids(fold, "test")
        # stratified: each class's test count is near its share of the kept records
        n_test = len(split.ids(fold, "test"))
        for cls in CLASSES:
            n_cls = sum(label_of[i] == cls for i in kept)
            got = sum(label_of[i] == cls for i in split.ids(fold, "test"))
            want = n_cls * test_share
            assert abs(got - want) <= max(2.5, 0.25 * want), (fold, cls, got, want, n_test)
    if holdout is None:
        assert sorted(tests) == sorted(kept)  # the test parts partition the kept records


@pytest.mark.parametrize(("seed", "folds"), [(0, 2), (1, 3), (2, 5), (7, 3), (3, 4)])
def test_kfold_split_keeps_groups_together_and_partitions_test_parts(planted, seed: int, folds: int) -> None:
    records, audit = planted["records"], planted["audit"]
    split = make_split(records, audit, SplitConfig(folds=folds, seed=seed))
    check_split(split, records, audit, folds, excluded=set(planted["cross"]))
    assert len(split.notes) == 1 and "excluded 2 images" in split.notes[0]
    for cid in planted["cross"]:  # a count in the note; the ids stay in split.csv (part excluded)
        assert cid not in split.notes[0] and all(cid in split.ids(f, "excluded") for f in split.folds)


def test_different_seeds_give_different_splits(planted) -> None:
    a = make_split(planted["records"], planted["audit"], SplitConfig(seed=0))
    b = make_split(planted["records"], planted["audit"], SplitConfig(seed=1))
    again = make_split(planted["records"], planted["audit"], SplitConfig(seed=0))
    assert a.rows == again.rows
    assert a.ids(0, "test") != b.ids(0, "test")


def test_cross_class_groups_are_kept_when_asked(planted) -> None:
    records, audit = planted["records"], planted["audit"]
    split = make_split(records, audit, SplitConfig(exclude_cross_class=False))
    check_split(split, records, audit, 3, excluded=set())
    assert split.notes == []
    src, copy = planted["cross"]
    for fold in split.folds:
        part_of = {r["id"]: r["part"] for r in split.rows if int(r["fold"]) == fold}
        assert part_of[src] == part_of[copy] != "excluded"


def test_holdout_mode_gives_one_fold_with_about_the_test_fraction(planted) -> None:
    records, audit = planted["records"], planted["audit"]
    split = make_split(records, audit, SplitConfig(mode="holdout", test_fraction=0.25, seed=3))
    assert split.folds == [0]
    check_split(split, records, audit, 1, excluded=set(planted["cross"]), holdout=0.25)
    n_kept = len(records) - 2
    assert abs(len(split.ids(0, "test")) / n_kept - 0.25) < 0.08


def test_too_many_folds_for_a_class_is_a_data_error(planted) -> None:
    tiny = [r for r in planted["records"] if r.label != "normal"] + [planted["records"][0]]
    with pytest.raises(DataError, match="fewer than the 3 folds"):
        make_split(tiny, audit_records(tiny), SplitConfig(folds=3))


def test_split_counts_and_format(planted) -> None:
    split = make_split(planted["records"], planted["audit"], SplitConfig(folds=2))
    counts = split.counts()
    assert sorted(counts) == [0, 1]
    for fold in (0, 1):
        assert sum(sum(c.values()) for c in counts[fold].values()) == len(planted["records"])
        assert counts[fold]["excluded"] == {"benign": 1, "malignant": 1}
    text = split.format(CLASSES)
    assert "excluded" in text and "note: excluded 2 images" in text


def triples(split: Split) -> list[tuple[int, str, str]]:
    return sorted((int(r["fold"]), r["id"], r["part"]) for r in split.rows)


def test_write_read_round_trip_keeps_every_assignment(planted, tmp_path: Path) -> None:
    records, audit = planted["records"], planted["audit"]
    split = make_split(records, audit, SplitConfig(folds=3, seed=5))
    path = split.write(tmp_path / "sub" / "split.csv")
    with path.open() as fh:
        assert next(csv.reader(fh)) == ["fold", "id", "path", "label", "group", "part"]
    back = read_split(path, records, audit)
    assert triples(back) == triples(split)
    assert back.notes == [] and leaking_groups(back) == []
    without_audit = read_split(path, records)
    assert triples(without_audit) == triples(split)
    assert [int(r["group"]) for r in without_audit.rows] == [r["group"] for r in split.rows]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_user_split_with_path_and_split_columns(phantom_records, phantom_audit, tmp_path: Path) -> None:
    group_of = phantom_audit.group_of
    part_of = {r.id: ("test", "val", "train", "train", "train")[group_of[r.id] % 5] for r in phantom_records}
    left_out = [r.id for r in phantom_records if r.id not in in_twin_pair(phantom_records)][:3]
    rows = [[r.path, part_of[r.id].upper() if k % 7 == 0 else part_of[r.id]]
            for k, r in enumerate(phantom_records) if r.id not in left_out]
    path = write_csv(tmp_path / "mine.csv", ["path", "split"], rows)
    split = read_split(path, phantom_records, phantom_audit)
    assert split.folds == [0]
    got = {r["id"]: r["part"] for r in split.rows}
    assert len(split.rows) == len(phantom_records)
    assert got == {i: ("excluded" if i in left_out else part_of[i]) for i in part_of}
    assert split.notes == ["fold 0: 3 images not named in mine.csv are excluded"]


def test_user_split_with_id_and_fold_columns(phantom_records, phantom_audit, tmp_path: Path) -> None:
    group_of = phantom_audit.group_of
    fold_of = {r.id: group_of[r.id] % 3 for r in phantom_records}
    path = write_csv(tmp_path / "folds.csv", ["id", "fold"], [[i, f] for i, f in fold_of.items()])
    split = read_split(path, phantom_records, phantom_audit)
    assert split.folds == [0, 1, 2]
    for fold in split.folds:
        assert sorted(split.ids(fold, "test")) == sorted(i for i, f in fold_of.items() if f == fold)
        assert split.ids(fold, "val") and split.ids(fold, "train")
        assert not set(split.ids(fold, "val")) & {i for i, f in fold_of.items() if f == fold}
        assert Counter(r["id"] for r in split.rows if int(r["fold"]) == fold) == Counter(list(fold_of))
    assert leaking_groups(split) == [] and split.notes == []
    assert {k: v for k, v in parts_per_group(split, group_of).items() if len(v) > 1} == {}


def test_user_split_naming_unknown_ids_is_refused(phantom_records, tmp_path: Path) -> None:
    rows = [[r.id, "train"] for r in phantom_records] + [["benign_999", "test"], ["nobody", "test"]]
    path = write_csv(tmp_path / "bad.csv", ["id", "split"], rows)
    with pytest.raises(DataError) as info:
        read_split(path, phantom_records)
    message = str(info.value)
    assert "benign_999" in message and "nobody" in message and str(path) in message


def test_user_split_with_a_bad_part_name_is_refused_with_the_line(phantom_records, tmp_path: Path) -> None:
    rows = [[r.id, "train"] for r in phantom_records[:5]]
    rows[1][1] = "holdout"
    path = write_csv(tmp_path / "bad.csv", ["id", "part"], rows)
    with pytest.raises(DataError, match=r"bad\.csv:3: part 'holdout' is not one of"):
        read_split(path, phantom_records)


def test_user_split_naming_a_record_twice_is_refused(phantom_records, tmp_path: Path) -> None:
    rid = phantom_records[4].id
    rows = [[r.id, "train"] for r in phantom_records] + [[rid, "test"]]
    path = write_csv(tmp_path / "twice.csv", ["id", "split"], rows)
    with pytest.raises(DataError, match="more than once") as info:
        read_split(path, phantom_records)
    assert rid in str(info.value)
    folds = write_csv(tmp_path / "twice_folds.csv", ["id", "fold"],
                      [[r.id, k % 2] for k, r in enumerate(phantom_records)] + [[rid, 1]])
    with pytest.raises(DataError, match="more than once"):
        read_split(folds, phantom_records)


@pytest.mark.parametrize(("header", "problem"), [(["id", "label"], "needs an 'id' or 'path' column"),
                                                 (["name", "split"], "needs an 'id' or 'path' column")])
def test_user_split_without_the_needed_columns_is_refused(phantom_records, tmp_path: Path, header, problem) -> None:
    path = write_csv(tmp_path / "cols.csv", header, [[phantom_records[0].id, "train"]])
    with pytest.raises(DataError, match=problem):
        read_split(path, phantom_records)


def test_user_split_with_a_non_integer_fold_is_refused(phantom_records, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "f.csv", ["id", "fold"], [[r.id, "one" if k == 3 else k % 2]
                                                         for k, r in enumerate(phantom_records)])
    with pytest.raises(DataError, match="'fold' must be an integer"):
        read_split(path, phantom_records)


def test_missing_split_file_is_refused(phantom_records, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "none.csv", phantom_records)


def test_user_split_that_separates_a_twin_from_its_source_is_kept_with_a_leak_note_under_keep(
    phantom_records, phantom_audit, tmp_path: Path
) -> None:
    twin, source = twins(phantom_records)[0]
    part_of = {r.id: "train" for r in phantom_records}
    part_of[twin], part_of[source] = "test", "train"
    part_of[phantom_records[-1].id] = "val"
    path = write_csv(tmp_path / "leaky.csv", ["id", "split"], list(part_of.items()))
    split = read_split(path, phantom_records, phantom_audit, SplitConfig(on_leak="keep"))
    group = phantom_audit.group_of[twin]
    assert leaking_groups(split) == [(0, group, ["test", "train"])]
    assert split.notes == [("fold 0: 1 duplicate groups straddle test and train/val, kept as given "
                            "(split.on_leak=keep): results are marked 'leaky split'")]
    assert {r["id"]: r["part"] for r in split.rows}[twin] == "test"  # kept as given
    assert split.leaky


# --- the real data set -------------------------------------------------------------------------


@pytest.mark.busi
def test_busi_audit_finds_the_known_duplicates(busi_audit, busi_loaded) -> None:
    audit = busi_audit
    assert ["benign_433", "malignant_145"] in audit.exact_groups
    cross = [g for g in audit.cross_class_groups if "benign_433" in g]
    assert len(cross) == 1 and "malignant_145" in cross[0]
    near = [g for g in audit.near_groups if "benign_3" in g]
    assert len(near) == 1 and "benign_320" in near[0]
    assert audit.group_of["benign_3"] == audit.group_of["benign_320"]
    assert audit.group_of["benign_3"] != audit.group_of["benign_433"]
    rgb = {r.id for r in busi_loaded.records if r.meta["mode"] == "RGB"}
    assert len(audit.overlays) >= 10 and set(audit.overlays) <= rgb


@pytest.mark.busi
def test_busi_default_split_keeps_every_group_in_one_part(busi_audit, busi_loaded) -> None:
    records = busi_loaded.records
    split = make_split(records, busi_audit, SplitConfig())
    excluded = busi_audit.cross_class_ids
    assert {"benign_433", "malignant_145"} <= excluded
    check_split(split, records, busi_audit, 3, excluded=excluded)
