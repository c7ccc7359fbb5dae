"""The BUSI-layout loader: every bad input is refused naming the file (or skipped and listed)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SIZE, TinyBusi, save_png, tiny_image, tiny_mask
from PIL import Image

from busynth.config import DataConfig
from busynth.data.busi import LoadSummary, load_dataset, read_grayscale, read_mask
from busynth.errors import DataError

SKIP = DataConfig(on_bad_file="skip")


def assert_accounted(summary: LoadSummary) -> None:
    """Every file seen was read as an image or mask, or is listed as skipped."""
    assert summary.files_seen == summary.images_read + summary.masks_read + len(summary.skipped)


def refused(root: Path, offending: Path, config: DataConfig | None = None, **kwargs) -> str:
    """Load expecting a DataError whose message names ``offending``; returns the message."""
    with pytest.raises(DataError) as info:
        load_dataset(root, config, **kwargs)
    message = str(info.value)
    assert str(offending) in message, message
    return message


def skipped_reasons(summary: LoadSummary) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in summary.skipped}


def full_range_image(size: int = TINY_SIZE) -> np.ndarray:
    """Shuffled gray levels that include 0 and 255 (so 16-bit scaling is exact)."""
    values = np.linspace(0, 255, size * size).round().astype(np.uint8)
    return np.random.default_rng(7).permutation(values).reshape(size, size)


# --- good input --------------------------------------------------------------------------------


def test_tiny_tree_loads_every_image_with_its_mask_and_exact_counts(tiny_busi: TinyBusi) -> None:
    result = load_dataset(tiny_busi.root)
    records, summary = result.records, result.summary
    assert [r.id for r in records] == ["normal_1", "normal_2", "benign_1", "benign_2", "benign_3",
                                       "malignant_1", "malignant_2"]
    for r in records:
        assert r.image.dtype == np.uint8 and r.image.shape == (TINY_SIZE, TINY_SIZE)
        np.testing.assert_array_equal(r.image, tiny_busi.images[r.id])
        assert r.mask is not None and r.mask.dtype == bool
        np.testing.assert_array_equal(r.mask, tiny_busi.masks[r.id])
        assert r.label == r.id.split("_")[0]
        assert r.path == f"{r.label}/{r.label} ({r.id.split('_')[1]}).png"
    assert summary.files_seen == 7 + 6
    assert summary.images_read == 7
    assert summary.masks_read == 6
    assert summary.skipped == [] and summary.warnings == [] and summary.without_mask == []
    assert summary.multi_mask == 1
    assert summary.per_class == {"normal": 2, "benign": 3, "malignant": 2}
    assert summary.modes == {"L": 7}
    assert_accounted(summary)


def test_several_mask_files_are_unioned_and_listed_in_order(tiny_busi: TinyBusi) -> None:
    rec = {r.id: r for r in load_dataset(tiny_busi.root).records}["benign_2"]
    first, second = tiny_mask(2, 0), tiny_mask(2, 1)
    assert not np.array_equal(first, second) and (first & ~second).any() and (second & ~first).any()
    np.testing.assert_array_equal(rec.mask, first | second)
    assert rec.meta["mask_files"] == ["benign/benign (2)_mask.png", "benign/benign (2)_mask_1.png"]


def test_mask_files_beyond_nine_are_all_unioned(tmp_path: Path) -> None:
    root = tmp_path / "busi"
    for cls in ("normal", "benign"):
        save_png(root / cls / f"{cls} (1).png", tiny_image(cls, 1))
    union = np.zeros((TINY_SIZE, TINY_SIZE), dtype=bool)
    for k in range(11):
        mask = np.zeros((TINY_SIZE, TINY_SIZE), dtype=bool)
        mask.flat[k] = True
        union |= mask
        save_png(root / "benign" / f"benign (1)_mask{'' if k == 0 else f'_{k}'}.png", mask.astype(np.uint8) * 255)
    result = load_dataset(root, DataConfig(classes=["normal", "benign"]))
    rec = result.records[1]
    np.testing.assert_array_equal(rec.mask, union)
    assert rec.meta["mask_files"][:3] == ["benign/benign (1)_mask.png", "benign/benign (1)_mask_1.png",
                                          "benign/benign (1)_mask_2.png"]
    assert rec.meta["mask_files"][-1] == "benign/benign (1)_mask_10.png"
    assert result.summary.masks_read == 11


def _colour_mask(lesion: np.ndarray, colour: tuple[int, ...]) -> np.ndarray:
    """``lesion`` drawn in ``colour`` (RGB or RGBA) on black."""
    out = np.zeros((*lesion.shape, len(colour)), dtype=np.uint8)
    out[lesion] = colour
    if len(colour) == 4:
        out[~lesion, 3] = 255  # opaque black background
    return out


@pytest.mark.parametrize("colour", [(255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 0, 0),
                                    (255, 0, 0, 255), (1,)],
                         ids=["white", "red", "green", "blue", "dark-red", "red-rgba", "zero-one-gray"])
def test_a_mask_in_any_colour_gives_the_same_lesion(tiny_busi: TinyBusi, colour: tuple[int, ...]) -> None:
    lesion = tiny_busi.masks["malignant_1"]
    drawn = _colour_mask(lesion, colour)
    save_png(tiny_busi.path("malignant", "malignant (1)_mask.png"), drawn[..., 0] if len(colour) == 1 else drawn)
    result = load_dataset(tiny_busi.root)
    rec = next(r for r in result.records if r.id == "malignant_1")
    np.testing.assert_array_equal(rec.mask, lesion)
    assert result.summary.empty_mask == []


def test_an_antialiased_mask_edge_counts_from_half_the_brightest_value(tmp_path: Path) -> None:
    values = np.array([[0, 60, 100, 127, 128, 255]], dtype=np.uint8)
    path = save_png(tmp_path / "m.png", np.repeat(values, 2, axis=0))
    np.testing.assert_array_equal(read_mask(path, 10**6)[0], [False, False, False, False, True, True])


def test_a_lesion_image_with_an_empty_mask_is_kept_and_reported(tiny_busi: TinyBusi) -> None:
    mask_path = save_png(tiny_busi.path("malignant", "malignant (1)_mask.png"),
                         np.zeros((TINY_SIZE, TINY_SIZE), dtype=np.uint8))
    result = load_dataset(tiny_busi.root)
    rec = next(r for r in result.records if r.id == "malignant_1")
    assert rec.mask is not None and not rec.mask.any()
    assert result.summary.empty_mask == ["malignant_1"]
    assert any(str(tiny_busi.path("malignant", "malignant (1).png")) in w and mask_path.name in w
               for w in result.summary.warnings)
    assert "lesion images whose mask is empty (kept): 1" in result.summary.format()


def test_normal_images_without_mask_files_get_empty_masks(tiny_busi: TinyBusi) -> None:
    assert not any(p.name.endswith("_mask.png") for p in (tiny_busi.root / "normal").iterdir())
    normals = [r for r in load_dataset(tiny_busi.root).records if r.label == "normal"]
    assert len(normals) == 2
    for r in normals:
        assert r.has_mask and r.mask.shape == r.image.shape and not r.mask.any()
        assert r.meta["mask_files"] == []


def test_class_order_comes_from_config_and_numbers_sort_numerically(tiny_busi: TinyBusi) -> None:
    save_png(tiny_busi.path("benign", "benign (10).png"), tiny_image("benign", 10))
    save_png(tiny_busi.path("benign", "benign (10)_mask.png"), tiny_mask(10, 0).astype(np.uint8) * 255)
    config = DataConfig(classes=["malignant", "benign", "normal"])
    result = load_dataset(tiny_busi.root, config)
    assert [r.id for r in result.records] == ["malignant_1", "malignant_2", "benign_1", "benign_2", "benign_3",
                                              "benign_10", "normal_1", "normal_2"]
    assert list(result.summary.per_class) == ["malignant", "benign", "normal"]
    assert result.records[5].meta["number"] == 10


def test_system_files_are_skipped_and_counted_even_when_refusing(tiny_busi: TinyBusi) -> None:
    (tiny_busi.root / "benign" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tiny_busi.root / "malignant" / "._malignant (1).png").write_bytes(b"\x00\x05\x16\x07")
    (tiny_busi.root / "normal" / "Thumbs.db").write_bytes(b"junk")
    result = load_dataset(tiny_busi.root)  # on_bad_file=refuse by default
    assert len(result.records) == 7
    reasons = skipped_reasons(result.summary)
    assert reasons == {str(tiny_busi.root / "benign" / ".DS_Store"): "system file",
                       str(tiny_busi.root / "malignant" / "._malignant (1).png"): "system file",
                       str(tiny_busi.root / "normal" / "Thumbs.db"): "system file"}
    assert result.summary.files_seen == 13 + 3
    assert_accounted(result.summary)


def test_files_at_the_root_are_listed_not_loaded(tiny_busi: TinyBusi) -> None:
    (tiny_busi.root / "README.txt").write_text("BUSI")
    result = load_dataset(tiny_busi.root)
    assert len(result.records) == 7
    expected = {str(tiny_busi.root / "README.txt"): "file at the root, not in a class folder"}
    assert skipped_reasons(result.summary) == expected
    assert result.summary.files_seen == 14
    assert_accounted(result.summary)


FORMATS = ["L", "RGB", "RGBA", "LA", "P", "I;16 (v*257)", "I;16 (v)", "1"]


def write_format(path: Path, gray: np.ndarray, fmt: str) -> None:
    """Write the gray content ``gray`` as a PNG of the given kind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opaque = np.full_like(gray, 255)
    if fmt == "L":
        image = Image.fromarray(gray)
    elif fmt == "RGB":
        image = Image.fromarray(np.dstack([gray] * 3))
    elif fmt == "RGBA":
        image = Image.fromarray(np.dstack([gray] * 3 + [opaque]))
    elif fmt == "LA":
        image = Image.fromarray(gray).convert("LA")
    elif fmt == "P":
        # Palette reversed, so a loader that used the indices as gray levels would fail.
        image = Image.frombytes("P", gray.shape[::-1], (255 - gray).tobytes())
        image.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    elif fmt == "I;16 (v*257)":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    elif fmt == "I;16 (v)":
        image = Image.fromarray(gray.astype(np.uint16))
    elif fmt == "1":
        image = Image.fromarray(gray).convert("1", dither=Image.Dither.NONE)
    else:  # pragma: no cover
        raise ValueError(fmt)
    image.save(path, format="PNG")
    expected_mode = {"I;16 (v*257)": "I;16", "I;16 (v)": "I;16"}.get(fmt, fmt)
    with Image.open(path) as check:
        assert check.mode == expected_mode, f"fixture wrote {check.mode}, wanted {expected_mode}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_png_kind_reads_as_the_same_uint8_gray(tmp_path: Path, fmt: str) -> None:
    gray = full_range_image()
    if fmt == "1":
        gray = np.where(gray > 127, 255, 0).astype(np.uint8)
    path = tmp_path / "x.png"
    write_format(path, gray, fmt)
    image, info = read_grayscale(path, max_pixels=10_000)
    assert image.dtype == np.uint8 and image.shape == gray.shape
    np.testing.assert_array_equal(image, gray)
    assert (info["width"], info["height"]) == (TINY_SIZE, TINY_SIZE)


def test_loader_mixes_png_kinds_in_one_folder(tiny_busi: TinyBusi) -> None:
    kinds = {"benign_1": "RGB", "benign_2": "RGBA", "benign_3": "P", "malignant_1": "I;16 (v*257)", "normal_2": "LA"}
    expected = dict(tiny_busi.images)
    for rid, fmt in kinds.items():
        cls, num = rid.split("_")
        gray = tiny_busi.images[rid].copy()
        gray.flat[:2] = (0, 255)  # full range, so 16-bit scaling is exact
        expected[rid] = gray
        write_format(tiny_busi.path(cls, f"{cls} ({num}).png"), gray, fmt)
    result = load_dataset(tiny_busi.root)
    for r in result.records:
        np.testing.assert_array_equal(r.image, expected[r.id], err_msg=r.id)
    assert result.summary.modes == {"L": 2, "RGB": 1, "RGBA": 1, "P": 1, "I;16": 1, "LA": 1}


def test_transparent_pixels_become_black(tmp_path: Path) -> None:
    gray = np.full((4, 4), 200, dtype=np.uint8)
    alpha = np.full((4, 4), 255, dtype=np.uint8)
    alpha[0, 0] = 0
    path = tmp_path / "a.png"
    Image.fromarray(np.dstack([gray] * 3 + [alpha])).save(path)
    image, _ = read_grayscale(path, 10_000)
    assert image[0, 0] == 0 and (image.ravel()[1:] == 200).all()


def test_colour_files_record_channel_spread_and_gray_files_do_not(tmp_path: Path) -> None:
    gray = np.full((4, 4), 100, dtype=np.uint8)
    rgb = np.dstack([gray] * 3)
    rgb[0, 0] = (250, 10, 10)  # red: spread 240
    rgb[0, 1] = (100, 130, 100)  # greenish: spread 30
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "g.png")
    Image.fromarray(gray).save(tmp_path / "l.png")
    image, info = read_grayscale(tmp_path / "c.png", 10_000)
    hist = info["channel_spread_hist"]
    assert len(hist) == 256 and sum(hist) == 16
    assert hist[0] == 14 and hist[240] == 1 and hist[30] == 1
    # ITU-R 601 luma, as PIL computes it: (299 R + 587 G + 114 B) / 1000, rounded
    assert image[0, 0] == round((299 * 250 + 587 * 10 + 114 * 10) / 1000)
    _, gray_info = read_grayscale(tmp_path / "g.png", 10_000)
    assert gray_info["channel_spread_hist"][0] == 16 and sum(gray_info["channel_spread_hist"]) == 16
    _, l_info = read_grayscale(tmp_path / "l.png", 10_000)
    assert "channel_spread_hist" not in l_info


# --- bad input: one test per case --------------------------------------------------------------


def test_missing_root_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert "does not exist" in refused(missing, missing)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    assert "not a folder" in refused(a_file, a_file)


def test_truncated_png_is_refused_naming_it(tiny_busi: TinyBusi) -> None:
    bad = tiny_busi.path("benign", "benign (2).png")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    message = refused(tiny_busi.root, bad)
    assert "truncated" in message and "data.on_bad_file=skip" in message


def test_truncated_png_is_skipped_with_its_masks_listed(tiny_busi: TinyBusi) -> None:
    bad = tiny_busi.path("benign", "benign (2).png")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result = load_dataset(tiny_busi.root, SKIP)
    assert [r.id for r in result.records] == ["normal_1", "normal_2", "benign_1", "benign_3", "malignant_1",
                                              "malignant_2"]
    reasons = skipped_reasons(result.summary)
    assert set(reasons) == {str(bad), str(tiny_busi.path("benign", "benign (2)_mask.png")),
                            str(tiny_busi.path("benign", "benign (2)_mask_1.png"))}
    assert "truncated" in reasons[str(bad)]
    assert result.summary.to_dict()["skipped_by_reason"]["mask of skipped image"] == 2
    s = result.summary
    assert (s.files_seen, s.images_read, s.masks_read, s.multi_mask) == (13, 6, 4, 0)
    assert s.per_class == {"normal": 2, "benign": 2, "malignant": 2}
    assert_accounted(s)


def test_file_with_image_suffix_that_is_not_an_image_is_refused(tiny_busi: TinyBusi) -> None:
    bad = tiny_busi.path("normal", "normal (1).png")
    bad.write_text("this is not a PNG")
    assert "not an image file PIL can identify" in refused(tiny_busi.root, bad)
    result = load_dataset(tiny_busi.root, SKIP)
    assert [r.id for r in result.records if r.label == "normal"] == ["normal_2"]
    assert str(bad) in skipped_reasons(result.summary)


def test_every_truncation_point_of_a_png_gives_a_data_error_or_the_full_image(tmp_path: Path) -> None:
    gray = full_range_image()
    path = tmp_path / "t.png"
    Image.fromarray(gray).save(path)
    data = path.read_bytes()
    for n in range(len(data)):
        path.write_bytes(data[:n])
        try:
            image, _ = read_grayscale(path, 10_000)
        except DataError as exc:
            assert str(path) in str(exc)
        else:  # only the trailing checksum/IEND bytes may be missing
            assert n > len(data) - 24, n
            np.testing.assert_array_equal(image, gray)


def test_non_image_file_in_a_class_folder_is_refused(tiny_busi: TinyBusi) -> None:
    notes = tiny_busi.path("benign", "notes.txt")
    notes.write_text("patient notes")
    assert "not an image file" in refused(tiny_busi.root, notes)


def test_non_image_file_in_a_class_folder_is_skipped(tiny_busi: TinyBusi) -> None:
    notes = tiny_busi.path("benign", "notes.txt")
    notes.write_text("patient notes")
    result = load_dataset(tiny_busi.root, SKIP)
    assert len(result.records) == 7
    assert skipped_reasons(result.summary) == {str(notes): "not an image file (unexpected suffix)"}
    assert (result.summary.files_seen, result.summary.images_read, result.summary.masks_read) == (14, 7, 6)
    assert_accounted(result.summary)


def test_sub_folder_in_a_class_folder_is_refused(tiny_busi: TinyBusi) -> None:
    sub = tiny_busi.root / "malignant" / "extra"
    sub.mkdir()
    assert "sub-folder" in refused(tiny_busi.root, sub)


def test_mask_without_its_image_is_refused(tiny_busi: TinyBusi) -> None:
    orphan = tiny_busi.path("malignant", "malignant (9)_mask.png")
    save_png(orphan, tiny_mask(9, 0).astype(np.uint8) * 255)
    message = refused(tiny_busi.root, orphan)
    assert "mask without its image 'malignant (9).png'" in message


def test_mask_without_its_image_is_skipped(tiny_busi: TinyBusi) -> None:
    orphan = tiny_busi.path("malignant", "malignant (9)_mask.png")
    save_png(orphan, tiny_mask(9, 0).astype(np.uint8) * 255)
    result = load_dataset(tiny_busi.root, SKIP)
    assert len(result.records) == 7
    assert list(skipped_reasons(result.summary)) == [str(orphan)]
    assert "mask without its image" in result.summary.skipped[0]["reason"]
    assert (result.summary.files_seen, result.summary.masks_read) == (14, 6)
    assert_accounted(result.summary)


def test_lesion_image_without_mask_is_kept_with_a_warning_by_default(tiny_busi: TinyBusi) -> None:
    tiny_busi.path("malignant", "malignant (1)_mask.png").unlink()
    result = load_dataset(tiny_busi.root)
    by_id = {r.id: r for r in result.records}
    assert len(by_id) == 7
    assert by_id["malignant_1"].mask is None and not by_id["malignant_1"].has_mask
    assert by_id["malignant_2"].mask is not None
    assert result.summary.without_mask == ["malignant_1"]
    assert len(result.summary.warnings) == 1
    assert str(tiny_busi.path("malignant", "malignant (1).png")) in result.summary.warnings[0]
    assert result.summary.masks_read == 5 and result.summary.files_seen == 12
    assert_accounted(result.summary)
    assert "lesion images without a mask (kept, mask unknown): 1" in result.summary.format()


def test_lesion_image_without_mask_is_refused_when_asked(tiny_busi: TinyBusi) -> None:
    tiny_busi.path("malignant", "malignant (1)_mask.png").unlink()
    image = tiny_busi.path("malignant", "malignant (1).png")
    assert "no mask file" in refused(tiny_busi.root, image, DataConfig(missing_mask="refuse"))
    # skipping bad files does not turn a refused missing mask into a silently smaller data set
    refused(tiny_busi.root, image, DataConfig(missing_mask="refuse", on_bad_file="skip"))


def test_normal_class_images_need_no_mask_even_with_missing_mask_refuse(tiny_busi: TinyBusi) -> None:
    result = load_dataset(tiny_busi.root, DataConfig(missing_mask="refuse"))
    assert len(result.records) == 7


def test_mask_of_a_different_size_is_refused(tiny_busi: TinyBusi) -> None:
    bad = tiny_busi.path("benign", "benign (1)_mask.png")
    save_png(bad, np.zeros((TINY_SIZE, TINY_SIZE + 2), dtype=np.uint8))
    message = refused(tiny_busi.root, bad)
    assert f"{TINY_SIZE + 2}x{TINY_SIZE}" in message and "benign (1).png" in message


def test_mask_of_a_different_size_is_skipped_with_its_image(tiny_busi: TinyBusi) -> None:
    bad = tiny_busi.path("benign", "benign (1)_mask.png")
    save_png(bad, np.zeros((TINY_SIZE, TINY_SIZE + 2), dtype=np.uint8))
    result = load_dataset(tiny_busi.root, SKIP)
    assert "benign_1" not in {r.id for r in result.records} and len(result.records) == 6
    reasons = skipped_reasons(result.summary)
    assert str(bad) in reasons[str(tiny_busi.path("benign", "benign (1).png"))]
    assert str(bad) in reasons
    assert (result.summary.images_read, result.summary.masks_read) == (6, 5)
    assert_accounted(result.summary)


def test_unknown_class_folder_is_refused_naming_it(tiny_busi: TinyBusi) -> None:
    save_png(tiny_busi.root / "other" / "other (1).png", tiny_image("other", 1))
    for config in (None, SKIP):
        message = refused(tiny_busi.root, tiny_busi.root, config)
        assert "'other'" in message and "not configured classes" in message


def test_empty_class_folder_is_refused(tiny_busi: TinyBusi) -> None:
    folder = tiny_busi.root / "malignant"
    for p in folder.iterdir():
        p.unlink()
    assert "has no images" in refused(tiny_busi.root, folder)


def test_class_folder_with_only_system_files_is_refused(tiny_busi: TinyBusi) -> None:
    folder = tiny_busi.root / "normal"
    for p in folder.iterdir():
        p.unlink()
    (folder / ".DS_Store").write_bytes(b"x")
    assert "has no images" in refused(tiny_busi.root, folder, SKIP)


def test_missing_class_folder_is_refused(tiny_busi: TinyBusi) -> None:
    shutil.rmtree(tiny_busi.root / "normal")
    message = refused(tiny_busi.root, tiny_busi.root / "normal")
    assert "class 'normal' has no folder" in message


def test_class_left_empty_after_skipping_is_refused(tiny_busi: TinyBusi) -> None:
    for num in (1, 2):
        tiny_busi.path("malignant", f"malignant ({num}).png").write_bytes(b"broken")
    message = refused(tiny_busi.root, tiny_busi.root, SKIP)
    assert "['malignant']" in message and "no readable images" in message


@pytest.mark.parametrize("name", ["benign (abc).png", "foo.png", "benign(4).png", "benign (4)_mask_x.png"])
def test_file_name_that_does_not_parse_is_refused(tiny_busi: TinyBusi, name: str) -> None:
    bad = tiny_busi.path("benign", name)
    save_png(bad, tiny_image("benign", 4))
    assert "does not parse" in refused(tiny_busi.root, bad)


@pytest.mark.parametrize("name", ["benign (abc).png", "foo.png"])
def test_file_name_that_does_not_parse_is_skipped(tiny_busi: TinyBusi, name: str) -> None:
    bad = tiny_busi.path("benign", name)
    save_png(bad, tiny_image("benign", 4))
    result = load_dataset(tiny_busi.root, SKIP)
    assert len(result.records) == 7
    assert list(skipped_reasons(result.summary)) == [str(bad)]
    assert result.summary.files_seen == 14
    assert_accounted(result.summary)


def test_file_named_for_another_class_is_refused(tiny_busi: TinyBusi) -> None:
    bad = tiny_busi.path("benign", "malignant (5).png")
    save_png(bad, tiny_image("malignant", 5))
    assert "says class 'malignant' but it is in folder 'benign'" in refused(tiny_busi.root, bad)


def test_two_images_with_one_number_are_refused(tiny_busi: TinyBusi) -> None:
    second = tiny_busi.path("benign", "benign (1).bmp")
    Image.fromarray(tiny_image("benign", 1)).save(second)
    message = refused(tiny_busi.root, tiny_busi.root / "benign")
    assert "second image numbered 1" in message and "benign (1).bmp" in message and "benign (1).png" in message


def test_image_above_max_pixels_is_refused(tiny_busi: TinyBusi) -> None:
    big = save_png(tiny_busi.path("benign", "benign (4).png"), np.zeros((20, 20), dtype=np.uint8))
    message = refused(tiny_busi.root, big, DataConfig(max_pixels=100))
    assert "400 pixels exceeds the limit of 100 (data.max_pixels" in message


def test_image_above_max_pixels_is_skipped(tiny_busi: TinyBusi) -> None:
    big = save_png(tiny_busi.path("benign", "benign (4).png"), np.zeros((20, 20), dtype=np.uint8))
    result = load_dataset(tiny_busi.root, DataConfig(max_pixels=100, on_bad_file="skip"))
    assert len(result.records) == 7
    assert "max_pixels" in skipped_reasons(result.summary)[str(big)]
    assert_accounted(result.summary)


@pytest.mark.parametrize("pil_limit", [150, 300])  # 400 px: above 2x the limit (error), or between (warning)
def test_pils_own_decompression_bomb_check_becomes_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pil_limit: int
) -> None:
    path = save_png(tmp_path / "bomb.png", np.zeros((20, 20), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(DataError, match="decompression bomb") as info:
        read_grayscale(path, max_pixels=10**9)
    assert str(path) in str(info.value)


def test_pils_bomb_check_in_a_whole_load_names_the_file(tiny_busi: TinyBusi, monkeypatch: pytest.MonkeyPatch) -> None:
    big = save_png(tiny_busi.path("benign", "benign (4).png"), np.zeros((20, 20), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    message = refused(tiny_busi.root, big, DataConfig(max_pixels=10**9), workers=1)
    assert "decompression bomb" in message


def test_summary_format_and_dict_list_skipped_files(tiny_busi: TinyBusi) -> None:
    notes = tiny_busi.path("normal", "notes.txt")
    notes.write_text("x")
    summary = load_dataset(tiny_busi.root, SKIP).summary
    text = summary.format()
    assert re.search(r"files seen: 14; images read: 7; mask files read: 6; skipped: 1", text)
    assert f"skipped {notes}: not an image file" in text
    as_dict = summary.to_dict()
    assert as_dict["skipped_count"] == 1
    assert as_dict["skipped_by_reason"] == {"not an image file (unexpected suffix)": 1}


# --- the real data set -------------------------------------------------------------------------


@pytest.mark.busi
def test_busi_loads_780_records_with_exact_counts(busi_loaded) -> None:
    records, summary = busi_loaded.records, busi_loaded.summary
    assert len(records) == 780
    assert summary.per_class == {"normal": 133, "benign": 437, "malignant": 210}
    assert [r.label for r in records[:1]] == ["normal"] and records[-1].label == "malignant"
    assert len({r.id for r in records}) == 780
    assert summary.multi_mask == 17
    assert sum(len(r.meta["mask_files"]) > 1 for r in records) == 17
    assert summary.images_read == 780 and summary.skipped == [] and summary.without_mask == []
    assert summary.masks_read == sum(len(r.meta["mask_files"]) for r in records)
    assert_accounted(summary)


@pytest.mark.busi
def test_busi_masks_are_bool_with_the_image_shape(busi_loaded) -> None:
    widths = set()
    for r in busi_loaded.records:
        assert r.image.dtype == np.uint8 and r.image.ndim == 2
        assert r.mask is not None and r.mask.dtype == bool and r.mask.shape == r.image.shape, r.id
        widths.add(r.image.shape[1])
    assert min(widths) < 300 and max(widths) > 1000  # BUSI's sizes vary a lot
    normal_nonempty = [r.id for r in busi_loaded.records if r.label == "normal" and r.mask.any()]
    assert normal_nonempty == []
    lesion_empty = [r.id for r in busi_loaded.records if r.label != "normal" and not r.mask.any()]
    assert lesion_empty == []


@pytest.mark.busi
def test_busi_ids_follow_file_names(busi_loaded, busi_root: Path) -> None:
    by_id = {r.id: r for r in busi_loaded.records}
    rec = by_id["benign_3"]
    assert rec.path == "benign/benign (3).png"
    with Image.open(busi_root / rec.path) as im:
        assert im.size == rec.image.shape[::-1]
    assert busi_loaded.summary.modes.get("RGB") == 16
