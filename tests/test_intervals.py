"""Seed-aware paired intervals, Holm's adjustment, verdicts, and the equal training budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from busynth.classify.metrics import paired_difference
from busynth.classify.train import cyclic_indices, mixed_batch, steps_per_epoch, synthetic_per_batch
from busynth.evaluate.intervals import (
    HELPS,
    HURTS,
    NO_EVIDENCE,
    NO_VERDICT,
    FoldScores,
    corrected_t,
    holm,
    two_level_bootstrap,
    variance_components,
    verdict,
)

CLASSES = ["normal", "benign", "malignant"]


def noisy_probas(y: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities that put extra mass on the true class (more with higher ``skill``)."""
    logits = rng.normal(0, 1, (y.size, 3))
    logits[np.arange(y.size), y] += skill
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def make_folds(n_seeds: int, skill_a: float, skill_b: float, seed: int = 0, n: int = 90, k: int = 3):
    rng = np.random.default_rng(seed)
    folds = []
    for f in range(k):
        y = rng.integers(0, 3, n)
        a = np.stack([noisy_probas(y, skill_a, rng) for _ in range(n_seeds)])
        b = np.stack([noisy_probas(y, skill_b, rng) for _ in range(n_seeds)])
        folds.append(FoldScores([f"f{f}_{i}" for i in range(n)], y, a, b, n_train=2 * n))
    return folds


def test_duplicating_one_seed_does_not_narrow_the_interval():
    one = make_folds(1, 1.0, 1.0, seed=3)
    copies = [FoldScores(f.ids, f.y, np.repeat(f.a, 5, 0), np.repeat(f.b, 5, 0), f.n_train) for f in one]
    single = two_level_bootstrap("balanced_accuracy", one, n_boot=1000, seed=1)
    repeated = two_level_bootstrap("balanced_accuracy", copies, n_boot=1000, seed=1)
    assert repeated["diff"] == pytest.approx(single["diff"])
    width = lambda r: r["ci_high"] - r["ci_low"]
    assert width(repeated) == pytest.approx(width(single), rel=0.15)
    assert repeated["n"] == single["n"] == 270  # distinct test images, not cells
    # The earlier procedure treats each copy as new data and narrows by about sqrt(5).
    def old(folds):
        y = np.concatenate([np.tile(f.y, len(f.a)) for f in folds])
        pa = np.concatenate([f.a.reshape(-1, 3) for f in folds])
        pb = np.concatenate([f.b.reshape(-1, 3) for f in folds])
        g = np.concatenate([np.repeat(np.arange(len(f.a)) + 10 * k, f.y.size) for k, f in enumerate(folds)])
        return paired_difference(y, pa, pb, "balanced_accuracy", CLASSES, groups=g, n_boot=1000, seed=1)
    narrowing = (old(copies)["ci_high"] - old(copies)["ci_low"]) / (old(one)["ci_high"] - old(one)["ci_low"])
    assert narrowing < 0.6


def test_seed_variance_widens_the_interval():
    """Methods whose per-seed results scatter get a wider interval than the test images alone give."""
    rng = np.random.default_rng(0)
    folds = []
    for f in range(3):
        y = rng.integers(0, 3, 80)
        # each seed of a is either good or poor: large seed-to-seed variance
        a = np.stack([noisy_probas(y, 2.5 if s % 2 else 0.3, rng) for s in range(4)])
        b = np.stack([noisy_probas(y, 1.4, rng) for _ in range(4)])
        folds.append(FoldScores([f"{f}_{i}" for i in range(80)], y, a, b, 160))
    with_seeds = two_level_bootstrap("accuracy", folds, n_boot=800, seed=0)
    fixed = [FoldScores(f.ids, f.y, f.a[:1].repeat(4, 0) * 0 + f.a.mean(0, keepdims=True), f.b, f.n_train)
             for f in folds]
    without = two_level_bootstrap("accuracy", fixed, n_boot=800, seed=0)
    assert with_seeds["ci_high"] - with_seeds["ci_low"] > 1.3 * (without["ci_high"] - without["ci_low"])


def test_clear_effect_is_found_and_identical_methods_give_zero():
    better = two_level_bootstrap("accuracy", make_folds(3, 3.0, 0.5), n_boot=500)
    assert better["ci_low"] > 0 and better["p"] < 0.01
    folds = make_folds(3, 1.0, 1.0)
    same = [FoldScores(f.ids, f.y, f.a, f.a.copy(), f.n_train) for f in folds]
    zero = two_level_bootstrap("macro_auc", same, n_boot=300)
    assert zero["diff"] == zero["ci_low"] == zero["ci_high"] == 0.0
    assert corrected_t("macro_auc", same)["p"] == 1.0


def test_corrected_t_matches_the_formula_by_hand():
    folds = make_folds(2, 1.5, 1.0, seed=7, n=60)
    got = corrected_t("accuracy", folds)
    d = np.array([(f.a[s].argmax(1) == f.y).mean() - (f.b[s].argmax(1) == f.y).mean()
                  for f in folds for s in range(2)])
    se = math.sqrt((1 / 6 + 60 / 120) * d.var(ddof=1))  # n_test / n_train = 60 / 120
    assert got["diff"] == pytest.approx(d.mean())
    assert got["p"] == pytest.approx(2 * stats.t.sf(abs(d.mean()) / se, 5))
    assert got["ci_high"] - got["diff"] == pytest.approx(stats.t.ppf(0.975, 5) * se)
    assert got["cells"] == 6 and got["n"] == 180


def test_repeated_folds_share_their_test_images():
    """With repeated cross-validation an image is tested once per repeat; it is one image."""
    base = make_folds(2, 1.0, 1.0, n=40, k=2)
    repeat = [FoldScores(list(f.ids), f.y, f.a[::-1].copy(), f.b[::-1].copy(), f.n_train) for f in base]
    assert two_level_bootstrap("accuracy", base + repeat, n_boot=200)["n"] == 80


def test_components_copies_of_one_seed_give_the_test_image_interval_of_that_seed():
    """No seed-to-seed variation at all: only the test images vary, and more copies never narrow it."""
    one = make_folds(1, 1.5, 1.0, seed=4)
    copies = lambda n: [FoldScores(f.ids, f.y, np.repeat(f.a, n, 0), np.repeat(f.b, n, 0), f.n_train)
                        for f in one]
    two, six = (variance_components("balanced_accuracy", copies(n), n_boot=2000, seed=2) for n in (2, 6))
    assert two["ci_low"] == pytest.approx(six["ci_low"]) and two["ci_high"] == pytest.approx(six["ci_high"])
    # the bootstrap of the test images alone, one weight per image, folds averaged
    boot = two_level_bootstrap("balanced_accuracy", one, n_boot=2000, seed=2)
    half = (two["ci_high"] - two["ci_low"]) / 2
    assert half == pytest.approx((boot["ci_high"] - boot["ci_low"]) / 2, rel=0.1)
    assert half == pytest.approx(stats.norm.ppf(0.975) * np.std(_single_seed_draws(one), ddof=1), rel=0.1)


def _single_seed_draws(folds, n_boot=2000, seed=5):
    """Bootstrap draws (stratified by fold and class) of the fold-averaged balanced-accuracy
    difference of seed 0, written out here as a reference."""
    def balanced_accuracy(p, y):
        return np.mean([(p[y == c].argmax(1) == c).mean() for c in range(3)])

    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    for f in folds:
        for b in range(n_boot):
            rows = np.concatenate([rng.choice(np.flatnonzero(f.y == c), (f.y == c).sum()) for c in range(3)])
            y = f.y[rows]
            draws[b] += (balanced_accuracy(f.a[0][rows], y) - balanced_accuracy(f.b[0][rows], y)) / len(folds)
    return draws


def test_components_do_not_count_the_seed_by_image_interaction_twice():
    """A/A with independent seeds and no image or seed effect: every per-seed difference is
    seed x image interaction. The pigeonhole (two-level) bootstrap counts it in both levels
    (Owen 2007) and overstates the standard error by about sqrt(2); the components interval
    implies about the spread the differences really have over repetitions."""
    comp, boot, diffs = [], [], []
    for rep in range(40):
        folds = make_folds(3, 1.0, 1.0, seed=rep, n=90)
        c = variance_components("balanced_accuracy", folds, n_boot=300, seed=rep)
        b = two_level_bootstrap("balanced_accuracy", folds, n_boot=300, seed=rep)
        comp.append((c["ci_high"] - c["ci_low"]) / (2 * stats.norm.ppf(0.975)))
        boot.append((b["ci_high"] - b["ci_low"]) / (2 * stats.norm.ppf(0.975)))
        diffs.append(c["diff"])
        assert c["diff"] == pytest.approx(b["diff"]) and c["n"] == b["n"] == 270
    spread = np.std(diffs)  # the real standard deviation: 0.022 over these 40 repetitions (0.025 over 200)
    assert np.mean(boot) > 1.4 * spread  # 0.036
    assert 0.9 * spread < np.mean(comp) < 0.85 * np.mean(boot)  # 0.029: narrower, still not below the truth


def test_components_widen_with_a_seed_effect_and_need_two_seeds():
    rng = np.random.default_rng(0)
    folds = []
    for f in range(3):
        y = rng.integers(0, 3, 80)
        a = np.stack([noisy_probas(y, 2.5 if s % 2 else 0.3, rng) for s in range(4)])  # good and poor seeds
        b = np.stack([noisy_probas(y, 1.4, rng) for _ in range(4)])
        folds.append(FoldScores([f"{f}_{i}" for i in range(80)], y, a, b, 160))
    steady = [FoldScores(f.ids, f.y, np.stack([noisy_probas(f.y, 1.4, rng) for _ in range(4)]), f.b, f.n_train)
              for f in folds]
    width = lambda r: r["ci_high"] - r["ci_low"]
    assert width(variance_components("accuracy", folds, n_boot=800)) > 1.5 * width(
        variance_components("accuracy", steady, n_boot=800))
    one = make_folds(1, 1.0, 1.0)
    assert math.isnan(variance_components("accuracy", one, n_boot=100)["ci_low"])


def test_holm_pinned_on_hand_made_numbers():
    # sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04 -> max(0.04, 0.04))
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # monotone: 0.03*2 = 0.06 then 0.04 would drop below it, so it becomes 0.06
    assert holm([0.03, 0.04]) == pytest.approx([0.06, 0.06])
    assert holm([0.5, 0.9, 0.001, 0.2]) == pytest.approx([1.0, 1.0, 0.004, 0.6])
    got = holm([0.01, float("nan"), 0.02])
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)
    assert holm([]) == []


def test_verdict_logic():
    assert verdict(0.04, 0.01) == HELPS
    assert verdict(-0.04, 0.049) == HURTS
    assert verdict(0.04, 0.05) == NO_EVIDENCE  # not below alpha
    assert verdict(0.0, 0.0) == NO_EVIDENCE
    assert verdict(float("nan"), 0.01) == NO_EVIDENCE and verdict(0.1, float("nan")) == NO_EVIDENCE
    assert verdict(0.04, 0.02, alpha=0.01) == NO_EVIDENCE
    # One classifier seed in some fold: the interval cannot see training randomness, so no verdict at all.
    assert (verdict(0.04, 0.001, seeds_per_fold=1) == NO_VERDICT
            and verdict(-0.04, 0.001, seeds_per_fold=0) == NO_VERDICT)
    assert verdict(0.04, 0.001, seeds_per_fold=2) == HELPS


def test_fold_scores_refuse_unpaired_shapes():
    y = np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="seeds"):
        FoldScores(list("abcd"), y, np.full((2, 4, 3), 1 / 3), np.full((3, 4, 3), 1 / 3))


# --- the training budget ------------------------------------------------------------------


def test_cyclic_indices_are_a_stream_of_permutations():
    stream = cyclic_indices(7, seed=3, stream=0, start=0, count=21)
    for k in range(3):
        assert sorted(stream[7 * k : 7 * k + 7].tolist()) == list(range(7))
    np.testing.assert_array_equal(cyclic_indices(7, 3, 0, start=5, count=9), stream[5:14])


def test_budget_is_counted_on_real_images_whatever_is_added():
    assert steps_per_epoch(50, 16) == 4  # the same whether 0 or 50 synthetic images are added
    k = synthetic_per_batch(16, 50, None)
    assert k is None and synthetic_per_batch(16, 0, 0.5) is None
    doubled = [mixed_batch(i, 50, 50, 16, seed=0, k_synthetic=k) for i in range(4)]
    assert all(len(b) == 16 for b in doubled) and any(i >= 50 for b in doubled for i in b)
    real_only = [i for step in range(12) for i in mixed_batch(step, 50, 0, 16, seed=0, k_synthetic=None)]
    assert len(real_only) == 192 and set(real_only) == set(range(50))


def test_synthetic_share_sets_each_batch():
    k = synthetic_per_batch(10, 100, 0.3)
    assert k == 3 and synthetic_per_batch(10, 100, 0.01) == 1 and synthetic_per_batch(10, 100, 0.99) == 9
    batches = [mixed_batch(i, 40, 100, 10, seed=1, k_synthetic=k) for i in range(8, 12)]
    assert all(sum(i >= 40 for i in b) == 3 for b in batches)
    again = [mixed_batch(i, 40, 100, 10, seed=1, k_synthetic=k) for i in range(8, 12)]
    assert all(np.array_equal(a, b) for a, b in zip(again, batches))  # a resumed run draws the same batches


def test_repeated_cross_validation_makes_r_times_k_grouped_folds():
    from busynth.config import AuditConfig, PhantomConfig, SplitConfig
    from busynth.data.audit import audit_records
    from busynth.data.phantom import make_phantom
    from busynth.data.splits import leaking_groups, make_split

    records = make_phantom(PhantomConfig(n_per_class={"normal": 24, "benign": 30, "malignant": 24}, size=32,
                                         near_duplicate_rate=0.2))
    audit = audit_records(records, AuditConfig())
    split = make_split(records, audit, SplitConfig(folds=3, repeats=2))
    assert split.folds == list(range(6))
    kept = {r.id for r in records} - audit.cross_class_ids
    for repeat in (0, 1):
        tested = [i for f in range(3 * repeat, 3 * repeat + 3) for i in split.ids(f, "test")]
        assert sorted(tested) == sorted(kept)  # every image tested exactly once per repeat
    assert [split.ids(f, "test") for f in range(3)] != [split.ids(f, "test") for f in range(3, 6)]
    assert not leaking_groups(split)


def test_run_eta_counts_generator_fits_apart_from_classifier_cells(tmp_path):
    from busynth.cells import Cell
    from busynth.executors import cell_kinds, remaining_seconds

    cells = [Cell(m, f, s, 0) for f in (0, 1) for s in (0, 1) for m in ("real", "cvae")]
    kinds = cell_kinds(cells, [True] * len(cells), tmp_path)
    assert [k[1] for k in kinds] == [False, True, False, False] * 2  # one cvae fit per fold
    done = {("real", False): [10.0], ("cvae", True): [100.0]}
    assert remaining_seconds(kinds[4:], done) == 10 + 100 + 10 + 10  # a cvae cell without a fit ~ a real cell
    assert remaining_seconds(kinds, {}) == 0.0
