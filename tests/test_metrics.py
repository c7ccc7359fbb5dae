"""Metrics and the paired bootstrap of two methods: values pinned by hand, plus scikit-learn
as the reference for the vectorised bootstrap form. Runs in about a second."""

from __future__ import annotations

import math

import numpy as np
import pytest

from busynth.classify import metrics as m
from busynth.classify.metrics import (
    METRIC_NAMES,
    classification_metrics,
    format_mean_sd,
    macro_auc,
    paired_difference,
    restrict_proba,
    summarize,
)

CLASSES = ["normal", "benign", "malignant"]

# Six cases, three classes (0 normal, 1 benign, 2 malignant); predictions = row argmax.
Y6 = np.array([0, 1, 1, 1, 2, 2])
P6 = np.array(
    [
        [0.60, 0.30, 0.10],  # true 0, pred 0
        [0.30, 0.60, 0.10],  # true 1, pred 1
        [0.20, 0.50, 0.30],  # true 1, pred 1
        [0.10, 0.30, 0.60],  # true 1, pred 2
        [0.10, 0.20, 0.70],  # true 2, pred 2
        [0.45, 0.20, 0.35],  # true 2, pred 0
    ]
)


def _synthetic(n: int, signal: float, rng: np.random.Generator, n_classes: int = 3):
    """n cases with labels and softmax probabilities that favour the true class by signal."""
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[y]
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ point metrics


def test_six_case_example_by_hand():
    got = classification_metrics(Y6, P6, CLASSES)
    assert set(got) == set(METRIC_NAMES)
    # Confusion (rows true): [[1,0,0],[0,2,1],[1,0,1]] -> 4 of 6 correct.
    assert got["accuracy"] == pytest.approx(4 / 6)
    # Recall per class: 1/1, 2/3, 1/2 -> mean 13/18.
    assert got["balanced_accuracy"] == pytest.approx(13 / 18)
    # F1 = 2tp / (2tp + fp + fn): c0 2/(2+1+0)=2/3, c1 4/(4+0+1)=4/5, c2 2/(2+1+1)=1/2.
    assert got["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    # One-vs-rest AUC = share of (pos, neg) pairs ranked right, ties 1/2:
    # c0: 0.6 beats all 5 negatives -> 1.
    # c1: pos 0.6, 0.5, 0.3 vs neg 0.3, 0.2, 0.2 -> 3 + 3 + (0.5 + 2) = 8.5 of 9.
    # c2: pos 0.7, 0.35 vs neg 0.1, 0.1, 0.3, 0.6 -> 4 + 3 = 7 of 8.
    assert got["macro_auc"] == pytest.approx((1 + 8.5 / 9 + 7 / 8) / 3)
    assert got["malignant_auc"] == pytest.approx(7 / 8)
    # Malignant: 2 true, 1 predicted malignant -> sens 1/2; 4 others, 1 of them (row 3)
    # predicted malignant -> spec 3/4.
    assert got["malignant_sensitivity"] == pytest.approx(1 / 2)
    assert got["malignant_specificity"] == pytest.approx(3 / 4)


def test_binary_example_by_hand():
    classes = ["benign", "malignant"]
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.4, 0.8])  # preds 0, 1, 0, 0, 1
    got = classification_metrics(y, np.c_[1 - p1, p1], classes)
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # AUC: pos 0.4 beats 0.1, 0.3 (2); pos 0.8 beats all 3 -> 5 of 6.
    assert got["macro_auc"] == pytest.approx(5 / 6)
    assert got["malignant_auc"] == pytest.approx(5 / 6)
    assert got["malignant_sensitivity"] == pytest.approx(1 / 2)
    assert got["malignant_specificity"] == pytest.approx(2 / 3)


def test_positive_class_may_be_first_column():
    y = np.array([0, 0, 0, 1, 1])  # class 0 is malignant here
    p0 = np.array([0.9, 0.4, 0.7, 0.8, 0.2])
    got = classification_metrics(y, np.c_[p0, 1 - p0], ["malignant", "benign"])
    # pos 0.9, 0.4, 0.7 vs neg 0.8, 0.2: 2 + 1 + 1 = 4 of 6.
    assert got["malignant_auc"] == pytest.approx(4 / 6)
    assert got["malignant_sensitivity"] == pytest.approx(2 / 3)  # 0.4 predicted benign
    assert got["malignant_specificity"] == pytest.approx(1 / 2)  # 0.8 predicted malignant


def test_perfect_predictions_score_one():
    y = np.array([0, 1, 2, 2, 1, 0])
    got = classification_metrics(y, np.eye(3)[y] * 0.9 + 0.1 / 3, CLASSES)
    assert got == pytest.approx({k: 1.0 for k in METRIC_NAMES})


def test_positive_absent_from_classes_omits_positive_keys():
    got = classification_metrics(Y6, P6, ["a", "b", "c"])
    assert set(got) == {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc"}


def test_undefined_auc_is_nan_not_error():
    y = np.array([1, 1, 1])
    p = np.array([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    got = classification_metrics(y, p, CLASSES)
    assert math.isnan(got["macro_auc"])
    assert math.isnan(got["malignant_auc"])
    assert math.isnan(got["malignant_sensitivity"])  # no malignant case
    assert got["malignant_specificity"] == pytest.approx(2 / 3)
    # A missing normal class makes the macro AUC undefined but not the malignant one.
    got = classification_metrics(Y6[1:], P6[1:], CLASSES)
    assert math.isnan(got["macro_auc"])
    # Malignant 0.7, 0.35 vs others 0.1, 0.3, 0.6: 3 + 2 = 5 of 6 pairs.
    assert got["malignant_auc"] == pytest.approx(5 / 6)


def test_macro_auc_skipping_absent_classes_averages_the_present_ones():
    # Without the normal case, by hand: benign scores 0.6, 0.5, 0.3 vs 0.2, 0.2 -> 6 of 6 pairs;
    # malignant 0.7, 0.35 vs 0.1, 0.3, 0.6 -> 5 of 6.
    y, p = Y6[1:], P6[1:]
    assert math.isnan(macro_auc(y, p))
    assert macro_auc(y, p, skip_absent=True) == pytest.approx((1 + 5 / 6) / 2)
    assert macro_auc(Y6, P6, skip_absent=True) == macro_auc(Y6, P6)  # every class present: the same
    assert math.isnan(macro_auc(np.ones(3, int), np.full((3, 3), 1 / 3), skip_absent=True))


@pytest.mark.parametrize("n_classes", [3, 4])
def test_macro_auc_equals_sklearn_one_vs_rest(n_classes):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    for _ in range(20):
        y, p = _synthetic(40, 1.0, rng, n_classes)
        p = np.round(p, 2)  # ties
        p /= p.sum(axis=1, keepdims=True)
        if len(np.unique(y)) < n_classes:
            continue
        ref = roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(n_classes)))
        assert macro_auc(y, p) == ref


@pytest.mark.parametrize(
    "y, p, classes",
    [
        (np.array([0, 1]), np.full((2, 3), 1 / 3), CLASSES[:2]),  # 3 columns, 2 classes
        (np.array([0, 3]), np.full((2, 3), 1 / 3), CLASSES),  # label out of range
        (np.array([0, 1]), np.full((2, 3), 0.5), CLASSES),  # rows not summing to 1
        (np.array([0.0, 1.0]), np.full((2, 3), 1 / 3), CLASSES),  # float labels
        (np.array([], dtype=int), np.zeros((0, 3)), CLASSES),  # no cases
    ],
)
def test_bad_inputs_raise(y, p, classes):
    with pytest.raises(ValueError):
        classification_metrics(y, p, classes)


# --------------------------------------------------- vectorised form vs scikit-learn


@pytest.mark.parametrize("n_classes", [2, 3])
def test_weighted_form_equals_sklearn_on_repeated_cases(n_classes):
    """Integer weights must score like the data set with each case repeated that often."""
    rng = np.random.default_rng(7)
    classes = CLASSES[-n_classes:]
    for _ in range(20):
        y, p = _synthetic(int(rng.integers(4, 30)), 1.0, rng, n_classes)
        p = np.round(p, 1)  # create ties in scores and in argmax
        p[:, 0] = 1 - p[:, 1:].sum(axis=1)
        assert np.all(p >= -1e-9)
        w = rng.integers(0, 4, size=y.size)
        w[0] = 1  # never an empty resample
        ref = classification_metrics(np.repeat(y, w), np.repeat(p, w, axis=0), classes)
        for name in METRIC_NAMES:
            got = m.weighted_metric(name, y, p, w[None, :].astype(float), n_classes - 1)[0]
            if math.isnan(ref[name]):
                assert math.isnan(got), name
            else:
                assert got == pytest.approx(ref[name], abs=1e-12), name


def test_resample_counts_keep_stratum_sizes():
    strata = np.array([0, 0, 0, 1, 1, 2])
    w = m.resample_counts(strata, 50, np.random.default_rng(0))
    assert w.shape == (50, 6)
    np.testing.assert_array_equal(w[:, :3].sum(axis=1), 3)
    np.testing.assert_array_equal(w[:, 3:5].sum(axis=1), 2)
    np.testing.assert_array_equal(w[:, 5], 1)
    assert w[:, :3].std() > 0  # actually resampled, not the identity


# ----------------------------------------------------------------- paired difference


def test_unknown_or_unavailable_metric_raises():
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference(Y6, P6, P6, "auroc", CLASSES)
    with pytest.raises(ValueError, match="malignant"):
        paired_difference(Y6, P6, P6, "malignant_auc", ["a", "b", "c"])


def test_paired_difference_with_itself_is_exactly_zero():
    y, p = _synthetic(100, 1.0, np.random.default_rng(5))
    for name in METRIC_NAMES:
        got = paired_difference(y, p, p.copy(), name, CLASSES, n_boot=200)
        assert (got["diff"], got["ci_low"], got["ci_high"]) == (0.0, 0.0, 0.0), name
        assert got["p_boot"] == 1.0 and got["n"] == 100


def test_clearly_better_method_has_positive_difference():
    rng = np.random.default_rng(6)
    y, good = _synthetic(200, 2.5, rng)
    _, noise = _synthetic(200, 0.0, rng)
    ref_a = classification_metrics(y, good, CLASSES)
    ref_b = classification_metrics(y, noise, CLASSES)
    for name in ("accuracy", "macro_auc", "malignant_auc"):
        got = paired_difference(y, good, noise, name, CLASSES, n_boot=500)
        assert got["diff"] == pytest.approx(ref_a[name] - ref_b[name])
        assert 0 < got["ci_low"] < got["diff"] < got["ci_high"]
        assert got["p_boot"] < 0.01
        # Antisymmetric: swapping the methods mirrors the result.
        swapped = paired_difference(y, noise, good, name, CLASSES, n_boot=500)
        assert swapped["ci_high"] == pytest.approx(-got["ci_low"])
        assert swapped["p_boot"] == got["p_boot"]


def test_p_boot_matches_closed_form():
    # a and b agree on 10 cases except case 0, which only a gets right. On a resample
    # the accuracy difference is (times case 0 drawn) / 10 >= 0, so P(d >= 0) = 1 and
    # P(d <= 0) = P(case 0 never drawn) = 0.9^10; p_boot = 2 * 0.9^10 = 0.697.
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    a = np.eye(3)[y] * 0.7 + 0.1
    b = a.copy()
    b[0] = [0.1, 0.8, 0.1]
    got = paired_difference(y, a, b, "accuracy", CLASSES, n_boot=4000)
    assert got["diff"] == pytest.approx(0.1)
    assert got["ci_low"] == 0.0
    assert got["p_boot"] == pytest.approx(2 * 0.9**10, abs=0.05)


def test_paired_is_narrower_than_unpaired_for_correlated_methods():
    # b is a slightly perturbed a: the per-case noise is shared, so the paired interval of
    # the difference is much narrower than the two separate intervals combined.
    rng = np.random.default_rng(8)
    y, a = _synthetic(200, 1.5, rng)
    b = a * np.exp(0.1 * rng.normal(size=a.shape))
    b /= b.sum(axis=1, keepdims=True)
    got = paired_difference(y, a, b, "macro_auc", CLASSES, n_boot=400)
    # Against constant scores (macro AUC 0.5 on every resample) the interval is a's own.
    alone = paired_difference(y, a, np.full_like(a, 1 / 3), "macro_auc", CLASSES, n_boot=400)
    assert got["ci_high"] - got["ci_low"] < (alone["ci_high"] - alone["ci_low"]) / 3


def test_grouped_point_estimate_is_mean_over_cells():
    rng = np.random.default_rng(9)
    cells = [(_synthetic(n, 1.5, rng), _synthetic(n, 0.5, rng)[1]) for n in (40, 60, 50)]
    y = np.concatenate([c[0][0] for c in cells])
    pa = np.concatenate([c[0][1] for c in cells])
    pb = np.concatenate([c[1] for c in cells])
    groups = np.repeat([0, 1, 2], [40, 60, 50])
    for name in ("balanced_accuracy", "macro_auc"):
        per_cell = [
            classification_metrics(yc, a, CLASSES)[name]
            - classification_metrics(yc, b, CLASSES)[name]
            for (yc, a), b in cells
        ]
        got = paired_difference(y, pa, pb, name, CLASSES, groups=groups, n_boot=300)
        assert got["diff"] == pytest.approx(np.mean(per_cell), abs=1e-12)
        pooled = paired_difference(y, pa, pb, name, CLASSES, n_boot=10)["diff"]
        assert got["diff"] != pytest.approx(pooled, abs=1e-6)  # not the pooled metric
        assert got["ci_low"] < got["diff"] < got["ci_high"]
        assert got["n"] == 150


# ------------------------------------------------------------------------ summaries


def test_summarize_and_format():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    # Sample variance: ((1.5^2 + 0.5^2) * 2) / 3 = 5/3.
    assert s == {"mean": 2.5, "sd": pytest.approx(math.sqrt(5 / 3)), "n": 4}
    assert summarize([0.7]) == {"mean": 0.7, "sd": 0.0, "n": 1}
    assert format_mean_sd(0.8123, 0.0341) == "0.812 ± 0.034"
    assert format_mean_sd(0.8123, 0.0341, digits=1) == "0.8 ± 0.0"


def test_probabilities_restricted_to_some_classes_are_renormalised_over_them() -> None:
    proba = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    out = restrict_proba(proba, [1, 2])
    np.testing.assert_allclose(out, [[0.0, 0.75, 0.25], [0.0, 0.25, 0.75], [0.0, 0.5, 0.5]])
    assert list(out.argmax(axis=1)) == [1, 2, 1]  # the first image, called class 0, is now class 1
