"""Fidelity and memorisation scores pinned against independent numpy/scipy computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from safetensors.torch import save_file

from busynth.classify.models import build_classifier
from busynth.config import PhantomConfig
from busynth.data.phantom import make_phantom
from busynth.data.records import Record
from busynth.evaluate.cell import evaluate_cell
from busynth.evaluate.fidelity import (
    FidelitySettings,
    compare_feature_sets,
    diversity,
    fid,
    kid,
    ms_ssim_pairs,
    ms_ssim_params,
    precision_recall,
)
from busynth.evaluate.memorization import closest_pairs, mirror_images, nearest_training, pixel_embedding
from busynth.evaluate.summary import aggregate_fidelity, summarize_fidelity
from busynth.presets import load_config


def _fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _kid_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Bińkowski et al. 2018, eq. 4)."""
    d = x.shape[1]
    kern = lambda a, b: (a @ b.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    kxx, kyy, kxy = kern(x, x), kern(y, y), kern(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def test_fid_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(80, 6))
    fake = rng.normal(loc=0.4, scale=1.3, size=(60, 6)) @ rng.normal(size=(6, 6)) * 0.5
    assert fid(real, fake) == pytest.approx(_fid_scipy(real, fake), rel=1e-6)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-7)


def test_kid_matches_unbiased_mmd_and_adapts_subset_size():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 5)), rng.normal(loc=0.5, size=(30, 5))
    # proper subsets (half the smaller set), so the std is the spread over subsets, never trivially 0
    mean, std, size = kid(real, fake, subsets=200, max_subset=1000)
    assert size == 15 and std > 0
    full = _kid_numpy(real, fake)  # the unbiased MMD^2 of the whole sets: the subsets average near it
    assert abs(mean - full) < 3 * std / np.sqrt(200) + 0.1 * abs(full)
    # max_subset caps the size; a small class: the size follows the smaller set instead of failing
    assert kid(real, fake, subsets=5, max_subset=10)[2] == 10
    mean, std, size = kid(rng.normal(size=(200, 5)), fake[:7], subsets=10, seed=3)
    assert size == 3 and np.isfinite(mean) and std > 0
    assert kid(real, fake, subsets=10, max_subset=20, seed=4) == kid(real, fake, subsets=10, max_subset=20, seed=4)


def test_precision_recall_on_hand_made_points():
    line = np.stack([np.arange(10.0), np.zeros(10)], axis=1)  # real: 0, 1, ..., 9 on the x axis
    # k=3 radii of the real points: 3 at both ends (0, 9), 2 inside
    fake = np.array([[4.5, 0], [100, 0], [-2.5, 0], [12.5, 0]])  # in, out, in (0 has radius 3), out
    assert precision_recall(line, fake, k=3)[0] == pytest.approx(0.5)
    collapsed = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [0.3, 0]])  # mode collapse near 0
    precision, recall = precision_recall(line, collapsed, k=3)
    assert precision == 1.0
    assert recall == pytest.approx(0.1)  # only real point 0 lies inside the fake balls (radii <= 0.3)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(line, collapsed[:3], k=3)


def test_ms_ssim_diversity_identical_is_one_and_different_is_lower():
    assert [len(ms_ssim_params(s)[2]) for s in (128, 64, 32)] == [4, 3, 2]
    assert sum(ms_ssim_params(64)[2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 18 px"):
        ms_ssim_params(16)
    phantom = np.stack([r.image for r in make_phantom(PhantomConfig(n_per_class={"benign": 6}, size=64),
                                                      ["benign"])])
    same = np.repeat(phantom[:1], 5, axis=0)
    assert diversity(same) == pytest.approx(1.0, abs=1e-6)
    assert diversity(phantom) < 0.9
    assert ms_ssim_pairs(phantom[:2], phantom[:2]) == pytest.approx([1.0, 1.0], abs=1e-6)
    assert diversity(phantom[:1]) is None
    # random pairs when there are more pairs than asked for: reproducible for a seed
    assert diversity(phantom, max_pairs=4, seed=1) == diversity(phantom, max_pairs=4, seed=1)


def _smooth_images(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    coarse = rng.uniform(0, 255, size=(n, size // 4, size // 4))
    return np.kron(coarse, np.ones((4, 4))).astype(np.uint8)


def test_memorization_flags_planted_copies():
    rng = np.random.default_rng(2)
    train = _smooth_images(rng, 40)
    synthetic = np.concatenate([_smooth_images(rng, 20), train[[3]], train[[5], :, ::-1]])
    embed = lambda x: pixel_embedding(x, size=16)
    mem = nearest_training(embed(synthetic), embed(train), embed(mirror_images(train)), percentile=5)
    assert mem.flagged[20] and mem.flagged[21]
    assert mem.index[20] == 3 and mem.index[21] == 5 and mem.mirrored[21] and not mem.mirrored[20]
    assert mem.distance[20] == pytest.approx(0, abs=1e-9) and mem.distance[21] == pytest.approx(0, abs=1e-9)
    assert mem.share(np.arange(22) < 20) < 0.2  # fresh images are rarely below the 5th percentile
    assert [p[:2] for p in closest_pairs(mem, 2)] == [(20, 3), (21, 5)]
    assert len(mem.train_nn) == 40 and np.all(mem.train_nn > 0)  # leave-one-out: never itself


def _fake_real_cell(run: Path, config, key: str) -> None:
    """A finished real-only cell: untrained classifier weights in best.safetensors."""
    model = build_classifier(config.classifier, len(config.data.classes))
    cell = run / "cells" / "real" / key
    (cell / "classifier").mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(cell / "classifier" / "best.safetensors"))
    (cell / "metrics.json").write_text("{}")


def test_evaluate_cell_writes_fidelity_json_closest_pngs_and_skips_without_real(tmp_path):
    config = load_config("smoke")
    records = make_phantom(PhantomConfig(n_per_class={"normal": 10, "benign": 12, "malignant": 10}, size=32))
    train, test = records[::2], records[1::2]
    synthetic = [Record(id=f"gen:{r.label}_{k}", label=r.label, image=np.flip(r.image, 0).copy(), mask=None,
                        path=f"synthetic/gen/fold0_seed0/{r.label}/{k}.png") for k, r in enumerate(test)]
    synthetic.append(Record(id="gen:benign_copy", label="benign", image=train[7].image.copy(), mask=None,
                            path="synthetic/gen/fold0_seed0/benign/copy.png"))
    skipped = evaluate_cell(tmp_path, "gen", 0, 0, config, train, test, synthetic)
    assert skipped["status"] == "skipped" and "real" in skipped["note"]

    _fake_real_cell(tmp_path, config, "fold0_seed0")
    result = evaluate_cell(tmp_path, "gen", 0, 0, config, train, test, synthetic)
    cell = tmp_path / "cells" / "gen" / "fold0_seed0"
    assert json.loads((cell / "fidelity.json").read_text()) == json.loads(json.dumps(result))
    for part in ("generator", "real_vs_real"):
        for scores in [result[part]["overall"], *result[part]["per_class"].values()]:
            assert {"fid", "kid_mean", "kid_std", "precision", "recall", "diversity",
                    "memorization_share", "memorization_share_feature"} <= set(scores)
    assert result["generator"]["overall"]["n_fake"] == len(synthetic)
    first = result["closest_pairs"][0]
    assert first["synthetic_id"] == "gen:benign_copy"
    assert (first["train_id"], first["train_path"]) == (train[7].id, train[7].path)
    assert first["flagged"] and first["pixel_distance"] == pytest.approx(0, abs=1e-9)
    assert (cell / first["synthetic_png"]).is_file() and (cell / first["train_png"]).is_file()
    assert len((cell / "memorization.csv").read_text().splitlines()) == len(synthetic) + 1

    # 17 synthetic images in a 64-d feature space: FID is not computed (singular covariance), KID is
    overall = result["generator"]["overall"]
    assert overall["fid"] is None and any("feature dimensions (64)" in n for n in overall["notes"])
    summary = summarize_fidelity(tmp_path, ["real", "gen"])
    assert summary["methods"]["gen"]["overall"]["kid_mean"]["mean"] == pytest.approx(overall["kid_mean"])
    assert summary["real_vs_real"]["cells"] == 1
    assert (tmp_path / "results" / "fidelity.json").is_file()
    partial = aggregate_fidelity({"gen": [result, skipped]})
    assert partial["methods"]["gen"]["cells"] == 1 and len(partial["skipped"]["gen"]) == 1


def test_fid_only_where_a_set_has_more_images_than_feature_dimensions():
    rng = np.random.default_rng(2)
    settings = FidelitySettings()
    enough = compare_feature_sets(rng.normal(size=(40, 8)), rng.normal(size=(30, 8)), settings)
    assert enough["fid"] is not None and "notes" not in enough
    few = compare_feature_sets(rng.normal(size=(40, 8)), rng.normal(size=(8, 8)), settings)
    assert few["fid"] is None and few["kid_mean"] is not None
