"""Test-set metrics, their vectorised bootstrap form and the paired bootstrap of two methods.

Point estimates come from scikit-learn (:func:`classification_metrics`). The bootstrap
uses an equivalent vectorised form: a resample of the test cases is a vector of
multiplicities (how often each case was drawn), so every metric becomes a weighted count
and all resamples are scored at once with matrix products (confusion matrices) and one
sort per class (AUC as the Mann-Whitney statistic, ties counted one half, which equals the
trapezoidal ROC area scikit-learn computes). ``tests/test_metrics.py`` checks that both
forms agree.

Bootstrap: percentile intervals over cases resampled with replacement, Efron & Tibshirani,
*An Introduction to the Bootstrap* (1993), ch. 6 and 13; paired comparison by resampling
the same cases for both methods (ibid., ch. 16).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

logger = logging.getLogger(__name__)

#: Metric names, in report order. The ``malignant_*`` names always mean "the class named
#: by ``positive``" (default ``"malignant"``), so results tables keep fixed columns.
METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "macro_auc",
    "malignant_sensitivity",
    "malignant_specificity",
    "malignant_auc",
)
POSITIVE_METRICS: frozenset[str] = frozenset(METRIC_NAMES[4:])
#: Per-image scores of a segmenter (``busynth.segment.metrics``), in their column order; a cell's
#: value is their mean, so a resample's is the weighted mean.
SCORE_NAMES: tuple[str, ...] = ("dice", "iou", "hd95")

_CHUNK = 256  # resamples scored at once; bounds memory at O(_CHUNK x rows)


# --------------------------------------------------------------------------- checks


def check_inputs(
    y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Return (y_true as int64 1-d, proba as float64 2-d) after validating shapes/values."""
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {list(classes)}")
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-d array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if p.shape != (y.size, n_classes):
        raise ValueError(f"proba must have shape ({y.size}, {n_classes}), got {p.shape}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true values must lie in [0, {n_classes - 1}]")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or infinite values")
    if not np.allclose(p.sum(axis=1), 1.0, rtol=1e-5, atol=1e-6):
        raise ValueError("proba rows must be probabilities that sum to 1")
    return y.astype(np.int64), p


def positive_index(classes: Sequence[str], positive: str) -> int | None:
    """Return the index of ``positive`` in ``classes``, or None if it is absent."""
    return list(classes).index(positive) if positive in classes else None


def check_metric(metric: str, classes: Sequence[str], positive: str) -> None:
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")
    if metric in POSITIVE_METRICS and positive not in classes:
        raise ValueError(f"metric {metric!r} needs class {positive!r} in {list(classes)}")


# --------------------------------------------------------------------- point metrics


def _safe_auc(y_true: np.ndarray, score: np.ndarray, **kwargs: object) -> float:
    """roc_auc_score, but NaN (not an error or warning) when it is undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            return float(roc_auc_score(y_true, score, **kwargs))
        except ValueError:  # older scikit-learn raises when only one class is present
            return float("nan")


def macro_auc(y_true: np.ndarray, proba: np.ndarray, skip_absent: bool = False) -> float:
    """Macro one-vs-rest ROC AUC of probabilities (N, C) for integer labels (N,): the mean over
    classes of the AUC of ``proba[:, k]`` for class k against the rest; for two classes the usual
    binary AUC of class 1. A class absent from ``y_true`` (or the only one present) has no AUC: the
    result is then NaN, or, with ``skip_absent``, the mean over the classes that have one (NaN if
    none) -- what model selection on a small validation part uses, so that one missing class does
    not blank the score of every epoch."""
    y, p = np.asarray(y_true), np.asarray(proba)
    if p.shape[1] == 2:
        return _safe_auc(y == 1, p[:, 1])
    aucs = [_safe_auc(y == k, p[:, k]) for k in range(p.shape[1])]
    if skip_absent:
        aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def restrict_proba(proba: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Probabilities (N, C) renormalised over the classes ``keep`` (the others set to 0): the
    classifier's answer when it must choose among those classes. A row with no mass on them is
    spread evenly over them."""
    proba, idx = np.asarray(proba, dtype=np.float64), list(keep)
    p = np.zeros_like(proba)
    p[:, idx] = proba[:, idx]
    total = p.sum(axis=1, keepdims=True)
    even = np.zeros_like(p)
    even[:, idx] = 1.0 / len(idx)
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), even)


def classification_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    positive: str = "malignant",
) -> dict[str, float]:
    """Score class probabilities against true labels.

    ``y_true`` holds integer indices into ``classes``; ``proba`` is (N, C), rows summing to
    1; the predicted class is the argmax (first class on ties).

    Returns a dict with ``accuracy``, ``balanced_accuracy`` (mean recall over classes
    present in ``y_true``), ``macro_f1`` (over classes present in ``y_true`` or the
    predictions, 0 for a class never predicted correctly), ``macro_auc`` (one-vs-rest,
    macro, :func:`macro_auc`), and, when ``positive`` is in
    ``classes``, ``malignant_sensitivity`` / ``malignant_specificity`` (predicted
    ``positive`` vs anything else) and ``malignant_auc`` (``positive`` vs rest, scored by
    ``proba[:, positive]``). An AUC that is undefined (one class absent from ``y_true``)
    and a sensitivity/specificity with an empty denominator are NaN.
    """
    y, p = check_inputs(y_true, proba, classes)
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        balanced = float(balanced_accuracy_score(y, pred))
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "macro_auc": macro_auc(y, p),
    }
    k = positive_index(classes, positive)
    if k is not None:
        is_pos, pred_pos = y == k, pred == k
        tp, fn = np.sum(is_pos & pred_pos), np.sum(is_pos & ~pred_pos)
        tn, fp = np.sum(~is_pos & ~pred_pos), np.sum(~is_pos & pred_pos)
        out["malignant_sensitivity"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        out["malignant_specificity"] = float(tn / (tn + fp)) if tn + fp else float("nan")
        out["malignant_auc"] = _safe_auc(is_pos, p[:, k])
    return out


# ------------------------------------------------------- weighted (bootstrap) metrics


def _weighted_auc(is_pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of ``score`` for ``is_pos`` under case weights ``w`` (B, n); returns (B,).

    Mann-Whitney form: P(score_pos > score_neg) + 0.5 P(tie), each case counted with its
    weight. NaN where the positive or negative weight is zero.
    """
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # one group per distinct score
    w_sorted = w[:, order]
    pos_sorted = is_pos[order]
    g_pos = np.add.reduceat(w_sorted * pos_sorted, starts, axis=1)
    g_neg = np.add.reduceat(w_sorted * ~pos_sorted, starts, axis=1)
    neg_below = np.cumsum(g_neg, axis=1) - g_neg
    num = np.sum(g_pos * (neg_below + 0.5 * g_neg), axis=1)
    return _ratio(num, g_pos.sum(axis=1) * g_neg.sum(axis=1))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_metric(
    metric: str, y: np.ndarray, p: np.ndarray, w: np.ndarray, pos: int | None
) -> np.ndarray:
    """Metric ``metric`` for each row of case weights ``w`` (B, n); returns (B,).

    With ``w`` all ones this equals :func:`classification_metrics` (tested).
    """
    if metric in SCORE_NAMES:  # p holds per-image scores (N, len(SCORE_NAMES)), not probabilities
        return (w @ p[:, SCORE_NAMES.index(metric)]) / w.sum(axis=1)
    n_classes = p.shape[1]
    if metric == "macro_auc":
        if n_classes == 2:
            return _weighted_auc(y == 1, p[:, 1], w)
        aucs = np.stack([_weighted_auc(y == k, p[:, k], w) for k in range(n_classes)])
        return aucs.mean(axis=0)  # NaN if any class is absent, as scikit-learn
    if metric == "malignant_auc":
        return _weighted_auc(y == pos, p[:, pos], w)
    pred = p.argmax(axis=1)
    cell = np.zeros((y.size, n_classes * n_classes))
    cell[np.arange(y.size), y * n_classes + pred] = 1.0
    cm = (w @ cell).reshape(-1, n_classes, n_classes)  # (B, true, pred)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    total = support.sum(axis=1)
    if metric == "accuracy":
        return tp.sum(axis=1) / total
    if metric == "balanced_accuracy":
        present = support > 0
        recall = np.where(present, tp / np.where(present, support, 1.0), 0.0)
        return recall.sum(axis=1) / present.sum(axis=1)
    if metric == "macro_f1":
        seen = (support + predicted) > 0
        f1 = np.where(seen, 2 * tp / np.where(seen, support + predicted, 1.0), 0.0)
        return f1.sum(axis=1) / seen.sum(axis=1)
    tp_pos = tp[:, pos]
    fn_pos = support[:, pos] - tp_pos
    fp_pos = predicted[:, pos] - tp_pos
    tn_pos = total - tp_pos - fn_pos - fp_pos
    if metric == "malignant_sensitivity":
        return _ratio(tp_pos, tp_pos + fn_pos)
    if metric == "malignant_specificity":
        return _ratio(tn_pos, tn_pos + fp_pos)
    raise ValueError(f"unknown metric {metric!r}")


# ------------------------------------------------------------------------ resampling


def resample_counts(
    strata: np.ndarray, n_boot: int, rng: np.random.Generator, clusters: np.ndarray | None = None
) -> np.ndarray:
    """Return (n_boot, n) multiplicities: each stratum's rows drawn with replacement,
    as many draws as the stratum has rows.

    With ``clusters`` (n,) the unit drawn is the cluster (rows sharing a label, e.g. a duplicate
    group): each stratum's clusters are drawn with replacement, as many draws as it has clusters,
    and every row of a drawn cluster counts once per draw (the cluster bootstrap, Davison &
    Hinkley 1997, sec. 3.8). A cluster belongs to the stratum of its first row."""
    if clusters is not None:
        _, first, inverse = np.unique(np.asarray(clusters), return_index=True, return_inverse=True)
        per_cluster = resample_counts(np.asarray(strata)[first], n_boot, rng)  # (n_boot, clusters)
        return per_cluster[:, inverse.ravel()]
    n = strata.size
    counts = np.zeros((n_boot, n), dtype=np.float64)
    offsets = (np.arange(n_boot) * n)[:, None]
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        draws = rows[rng.integers(0, rows.size, size=(n_boot, rows.size))]
        counts += np.bincount((draws + offsets).ravel(), minlength=n_boot * n).reshape(
            n_boot, n
        )
    return counts


def _metric_over_cells(
    metric: str,
    y: np.ndarray,
    probas: Sequence[np.ndarray],
    groups: np.ndarray,
    w: np.ndarray,
    pos: int | None,
) -> list[np.ndarray]:
    """For each proba array: mean over cells (``groups``) of the per-cell metric under
    weights ``w`` (B, n); returns one (B,) array per proba array."""
    cells = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    return [
        np.mean(
            [weighted_metric(metric, y[c], p[c], w[:, c], pos) for c in cells], axis=0
        )
        for p in probas
    ]


def _bootstrap(
    metric: str,
    y: np.ndarray,
    probas: Sequence[np.ndarray],
    groups: np.ndarray | None,
    n_boot: int,
    seed: int,
    pos: int | None,
) -> tuple[list[float], list[np.ndarray]]:
    """Return (point estimates, per-resample values) of ``metric`` for each proba array.

    All proba arrays are scored on the same resamples (paired). Rows are resampled within
    their cell (``groups``); the metric is the mean of the per-cell metrics."""
    g = np.zeros(y.size, dtype=np.int64) if groups is None else np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape}, got {g.shape}")
    ones = np.ones((1, y.size))
    points = [float(v[0]) for v in _metric_over_cells(metric, y, probas, g, ones, pos)]
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in probas]
    for start in range(0, n_boot, _CHUNK):
        w = resample_counts(g, min(_CHUNK, n_boot - start), rng)
        for out, vals in zip(chunks, _metric_over_cells(metric, y, probas, g, w, pos)):
            out.append(vals)
    return points, [np.concatenate(c) for c in chunks]


def percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Return the (alpha/2, 1 - alpha/2) percentiles of ``values`` (NaN if empty)."""
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _log_skipped(metric: str, kept: int, n_boot: int) -> None:
    if kept < n_boot:
        level = logging.WARNING if kept < 0.9 * n_boot else logging.DEBUG
        logger.log(level, "%s undefined on %d of %d resamples; skipped", metric,
                   n_boot - kept, n_boot)


def paired_difference(
    y_true: np.ndarray,
    proba_a: np.ndarray,
    proba_b: np.ndarray,
    metric: str,
    classes: Sequence[str],
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    positive: str = "malignant",
) -> dict[str, float]:
    """Paired bootstrap comparison of two methods scored on the same test cases.

    Both methods' probabilities are scored on the *same* resampled indices, so the
    variation shared by the test cases cancels (Efron & Tibshirani 1993, ch. 16).

    ``groups`` (optional int array, one value per row) is the pooled case: ``y_true`` and
    the probas are concatenations of several cells (fold x seed), ``groups`` gives each
    row's cell. The metric is then the mean over cells of the per-cell metric, and the
    bootstrap is stratified: each resample draws rows within each cell, as many as the
    cell has. Rows of different cells are resampled independently, even when two cells
    (same fold, different seeds) score the same test images; with several seeds per fold
    the interval is then somewhat narrower than one that kept those cells paired.

    Resamples where either method's metric is undefined (NaN) are skipped.

    Returns a dict: ``diff`` (metric(a) - metric(b) on all cases), ``ci_low``, ``ci_high``
    (percentile interval of the resampled differences), ``p_boot`` (two-sided:
    2 min(P(d <= 0), P(d >= 0)) over kept resamples, at most 1; NaN if none kept), ``n``
    (number of rows).
    """
    check_metric(metric, classes, positive)
    y, pa = check_inputs(y_true, proba_a, classes)
    _, pb = check_inputs(y_true, proba_b, classes)
    pos = positive_index(classes, positive)
    (point_a, point_b), (va, vb) = _bootstrap(metric, y, [pa, pb], groups, n_boot, seed, pos)
    d = va - vb
    d = d[np.isfinite(d)]
    _log_skipped(metric, d.size, n_boot)
    low, high = percentile_ci(d, alpha)
    if d.size:
        p_boot = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
    else:
        p_boot = float("nan")
    return {
        "diff": point_a - point_b,
        "ci_low": low,
        "ci_high": high,
        "p_boot": p_boot,
        "n": int(y.size),
    }


# --------------------------------------------------------------------- summaries


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return ``{"mean", "sd", "n"}`` of ``values``: sample sd (ddof=1), 0.0 for one value;
    mean and sd are NaN for no values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    sd = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(np.mean(v)), "sd": sd, "n": int(v.size)}


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    """Return ``"mean ± sd"`` with ``digits`` decimals, e.g. ``"0.812 ± 0.034"``."""
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
