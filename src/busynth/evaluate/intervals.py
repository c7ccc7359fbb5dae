"""Paired comparisons of two methods that include training randomness, and their verdicts.

A study scores every method on the same test images of each fold, with the same classifier
seeds. For a metric ``M`` the effect of method A over method B is the mean over folds and
seeds of ``M(A, fold, seed) - M(B, fold, seed)``. Two intervals for it:

* :func:`two_level_bootstrap` -- a hierarchical (two-stage) bootstrap: each resample draws
  the test images once (stratified by fold and class, one weight per image shared by every
  seed, fold repeat and both methods), and, within each fold, the classifier seeds with
  replacement (the same seed index for both methods). Resampling both levels is the usual
  treatment of nested sources of variation (Davison & Hinkley, *Bootstrap Methods and their
  Application*, 1997, sec. 3.8; Field & Welsh 2007, JRSS-B 69:369). Its test is the
  null-centred bootstrap test (Hall & Wilson 1991, Biometrics 47:757).
* :func:`corrected_t` -- the corrected resampled t-test of Nadeau & Bengio (2003, Machine
  Learning 52:239) over the fold x seed differences: the variance of the mean difference
  is inflated by ``n_test / n_train`` for the overlap of training sets between folds
  (Bouckaert & Frank 2004 for repeated cross-validation), t with ``n - 1`` degrees of freedom.

Resampling only the test images of each cell (the earlier procedure, kept as
``busynth.classify.metrics.paired_difference``) treats each trained model as fixed and, with
several seeds, each seed's copy of the test set as new data; ``bench/bench_calibration.py``
measures how often each procedure rejects in A/A comparisons.

Verdicts: Holm's step-down adjustment (Holm 1979, Scand. J. Statist. 6:65) over the
methods compared with one reference, then "helps" / "hurts" where the adjusted p-value is
below alpha, by the sign of the difference, else "no evidence".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from busynth.classify.metrics import percentile_ci, resample_counts, weighted_metric

HELPS, NO_EVIDENCE, HURTS = "helps", "no evidence", "hurts"
# With one classifier seed per fold no interval can see training randomness (the A/A benchmark's
# test-image-only procedure excluded 0 in up to 15 % of A/A comparisons): no verdict is given.
NO_VERDICT = "no verdict (1 seed per fold)"
# How each procedure (run.interval) is described in the summary and the report.
PROCEDURE_TEXT = {
    "bootstrap": "two-level bootstrap: classifier seeds within folds and test images resampled",
    "components": "variance components: test-image and classifier-seed parts, their interaction counted once",
    "corrected_t": "corrected resampled t-test, Nadeau & Bengio 2003",
}
_CHUNK = 250  # resamples scored at once (memory ~ chunk x test images x classes^2)


@dataclass
class FoldScores:
    """One fold's test predictions of two methods under the same classifier seeds.

    ``ids`` (n,) name the test images (shared across folds when folds are repeated), ``y``
    (n,) their class indices, ``a`` and ``b`` (seeds, n, classes) the probabilities of the
    two methods, seed ``s`` of ``a`` paired with seed ``s`` of ``b``. ``n_train`` is the size
    of the fold's training part (for :func:`corrected_t`). ``groups`` (n,), when given, are the
    resampling units of the test images (e.g. duplicate groups of an external set): images with
    one label are drawn together.
    """

    ids: Sequence[str]
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    n_train: int = 0
    groups: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y, dtype=np.int64)
        self.a, self.b = np.asarray(self.a, dtype=np.float64), np.asarray(self.b, dtype=np.float64)
        if self.a.ndim != 3 or self.a.shape != self.b.shape or self.a.shape[1] != self.y.size:
            raise ValueError(f"a and b must both be (seeds, {self.y.size}, classes), "
                             f"got {self.a.shape}, {self.b.shape}")
        if self.a.shape[0] == 0:
            raise ValueError("need at least one seed per fold")
        if len(self.ids) != self.y.size:
            raise ValueError(f"{len(self.ids)} ids for {self.y.size} test images")
        if self.groups is not None and len(self.groups) != self.y.size:
            raise ValueError(f"{len(self.groups)} groups for {self.y.size} test images")


def cell_differences(metric: str, folds: Sequence[FoldScores], pos: int | None) -> list[np.ndarray]:
    """Per fold, the (seeds,) differences ``M(a) - M(b)`` on the fold's whole test part."""
    out = []
    for f in folds:
        ones = np.ones((1, f.y.size))
        out.append(np.array([weighted_metric(metric, f.y, f.a[s], ones, pos)[0]
                             - weighted_metric(metric, f.y, f.b[s], ones, pos)[0] for s in range(len(f.a))]))
    return out


def point_difference(metric: str, folds: Sequence[FoldScores], pos: int | None) -> float:
    """Mean over folds of the mean over seeds of the per-cell difference (NaN cells skipped)."""
    per_fold = [np.nanmean(d) if np.isfinite(d).any() else np.nan for d in cell_differences(metric, folds, pos)]
    return float(np.nanmean(per_fold)) if np.isfinite(per_fold).any() else float("nan")


def _image_strata(folds: Sequence[FoldScores]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Distinct test images, their strata (first fold they are tested in, class) and each
    fold's positions in the distinct list."""
    index: dict[str, int] = {}
    strata: list[int] = []
    positions = []
    for k, f in enumerate(folds):
        pos = []
        for i, label in zip(f.ids, f.y, strict=True):
            if i not in index:
                index[i] = len(index)
                strata.append(k * 1000 + int(label))
            pos.append(index[i])
        positions.append(np.array(pos, dtype=np.int64))
    return list(index), np.array(strata), positions


def _image_clusters(folds: Sequence[FoldScores], n_distinct: int, positions: Sequence[np.ndarray]) -> np.ndarray | None:
    """The resampling unit of each distinct test image (its group label; None when no fold has groups)."""
    if all(f.groups is None for f in folds):
        return None
    clusters = np.full(n_distinct, -1, dtype=np.int64)
    own = iter(range(-2, -2 - n_distinct, -1))  # images without a group are units of their own
    for f, where in zip(folds, positions, strict=True):
        labels = f.groups if f.groups is not None else [next(own) for _ in where]
        for k, label in zip(where, labels, strict=True):
            if clusters[k] == -1:
                clusters[k] = int(label)
    return clusters


def _weighted_differences(metric: str, f: FoldScores, w: np.ndarray, pos: int | None) -> np.ndarray:
    """(seeds, b): per seed, ``M(a) - M(b)`` on the fold's test images under each row of weights ``w``."""
    return np.stack([weighted_metric(metric, f.y, f.a[s], w, pos) - weighted_metric(metric, f.y, f.b[s], w, pos)
                     for s in range(len(f.a))])


def two_level_bootstrap(metric: str, folds: Sequence[FoldScores], pos: int | None = None, n_boot: int = 2000,
                        seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Paired two-level bootstrap of the mean difference ``M(a) - M(b)`` (see the module doc).

    Returns ``diff`` (point estimate), ``ci_low``/``ci_high`` (percentile interval at level
    1 - alpha), ``p`` (two-sided, null-centred: the share of resampled differences at least
    as far from the estimate as the estimate is from 0, with the +1 correction of Davison &
    Hinkley eq. 4.11), ``n`` (distinct test images), ``cells`` (fold x seed pairs), ``kept``
    (resamples where the metric was defined).
    """
    if not folds:
        raise ValueError("no folds to compare")
    distinct, strata, positions = _image_strata(folds)
    clusters = _image_clusters(folds, len(distinct), positions)
    diff = point_difference(metric, folds, pos)
    rng = np.random.default_rng(seed)
    draws: list[np.ndarray] = []
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        w_all = resample_counts(strata, b, rng, clusters)  # (b, distinct images): one draw of the test images
        total = np.zeros(b)
        for f, where in zip(folds, positions, strict=True):
            d = _weighted_differences(metric, f, w_all[:, where], pos)  # (seeds, b)
            n_seeds = len(f.a)
            picks = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=b)  # (b, seeds)
            total += (picks * d.T).sum(axis=1) / n_seeds
        draws.append(total / len(folds))
    d = np.concatenate(draws)
    d = d[np.isfinite(d)]
    low, high = percentile_ci(d, alpha)
    if d.size and math.isfinite(diff):
        p = float((1 + np.sum(np.abs(d - diff) >= abs(diff))) / (d.size + 1))
    else:
        p = float("nan")
    return {"diff": diff, "ci_low": low, "ci_high": high, "p": p, "n": len(distinct),
            "cells": int(sum(len(f.a) for f in folds)), "kept": int(d.size)}


def corrected_t(metric: str, folds: Sequence[FoldScores], pos: int | None = None,
                alpha: float = 0.05) -> dict[str, float]:
    """Corrected resampled t-test (Nadeau & Bengio 2003) over the fold x seed differences.

    With ``n`` differences of mean ``m`` and sample variance ``v``, the standard error is
    ``sqrt((1/n + n_test/n_train) v)`` (``n_test/n_train`` averaged over folds), the
    statistic is t with ``n - 1`` degrees of freedom (scipy.stats.t). Returns the same keys
    as :func:`two_level_bootstrap` (``kept`` = differences used); with fewer than two
    defined differences, or zero variance, the interval is the point and p is 1 (or NaN).
    """
    if not folds:
        raise ValueError("no folds to compare")
    d = np.concatenate(cell_differences(metric, folds, pos))
    d = d[np.isfinite(d)]
    distinct = _image_strata(folds)[0]
    base = {"n": len(distinct), "cells": int(sum(len(f.a) for f in folds)), "kept": int(d.size)}
    if d.size < 2:
        m = float(d.mean()) if d.size else float("nan")
        return {"diff": m, "ci_low": m, "ci_high": m, "p": float("nan"), **base}
    ratio = float(np.mean([f.y.size / f.n_train for f in folds if f.n_train > 0] or [0.0]))
    m, v = float(d.mean()), float(d.var(ddof=1))
    se = math.sqrt((1.0 / d.size + ratio) * v)
    if se == 0.0:
        return {"diff": m, "ci_low": m, "ci_high": m, "p": 1.0 if m == 0 else 0.0, **base}
    df = d.size - 1
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    p = float(2 * stats.t.sf(abs(m) / se, df))
    return {"diff": m, "ci_low": m - half, "ci_high": m + half, "p": p, **base}


def variance_components(metric: str, folds: Sequence[FoldScores], pos: int | None = None, n_boot: int = 2000,
                        seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Paired interval from the variance of the mean difference split into its two sources.

    Test images and classifier seeds are crossed (every seed scores every image). Under the
    additive crossed model ``d = image effect + seed effect + seed x image interaction`` the
    variance of the mean over ``S`` seeds is ``V_img + (V_int + V_seed) / S``, while resampling
    images and seeds at once (the two-level, or pigeonhole, bootstrap) counts the interaction
    twice: it is conservative by that term (Owen 2007, Ann. Appl. Statist. 1:386). Here:

    * the bootstrap variance of the seed-averaged difference with only the test images
      resampled (drawn once, shared by all seeds, folds and both methods) is
      ``V_img + V_int / S``: the image part and the interaction, each once;
    * a seed effect on the whole model (one seed's classifier better everywhere) is what the
      spread of the ``S`` per-seed differences of a fold, ``s2_f``, shows beyond the interaction,
      which the bootstrap of a single seed's difference measures precisely from all the images
      (``V_img + V_int`` there, against ``V_img + V_int / S`` for the average): its moment
      estimate, pooled over folds (weights ``S_f - 1``) and truncated at 0, is ``V_seed``.

    ``Var(mean) = V_boot + V_seed * sum_f(1 / S_f) / F**2``; the interval is ``diff +- t * se``
    with Satterthwaite's degrees of freedom (1946) for the seed-effect part (``sum_f (S_f - 1)``;
    the bootstrap part counted as known), scipy.stats.t. Needs at least two seeds in every fold
    (else the interval is NaN). Same keys as :func:`two_level_bootstrap`.
    """
    if not folds:
        raise ValueError("no folds to compare")
    distinct, strata, positions = _image_strata(folds)
    diff = point_difference(metric, folds, pos)
    base = {"n": len(distinct), "cells": int(sum(len(f.a) for f in folds)), "kept": n_boot}
    nan = {"diff": diff, "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), **base}
    if min(len(f.a) for f in folds) < 2 or not math.isfinite(diff):
        return nan
    w_all = resample_counts(strata, n_boot, np.random.default_rng(seed),
                            _image_clusters(folds, len(distinct), positions))
    total = np.zeros(n_boot)
    excess = []
    for f, where, d_obs in zip(folds, positions, cell_differences(metric, folds, pos), strict=True):
        draws = _weighted_differences(metric, f, w_all[:, where], pos)  # (seeds, b)
        total += draws.mean(axis=0) / len(folds)
        kept = draws[:, np.isfinite(draws).all(axis=0)]
        if kept.shape[1] < 2 or not np.isfinite(d_obs).all():
            return nan
        n_seeds = len(f.a)
        v_mean, v_single = float(kept.mean(axis=0).var(ddof=1)), float(kept.var(axis=1, ddof=1).mean())
        interaction = max(0.0, (v_single - v_mean) * n_seeds / (n_seeds - 1))
        excess.append(float(d_obs.var(ddof=1)) - interaction)
    total = total[np.isfinite(total)]
    if total.size < 2:
        return nan
    seeds = np.array([len(f.a) for f in folds], dtype=np.float64)
    k = len(folds)
    boot_var = float(total.var(ddof=1))
    seed_var = max(0.0, float(np.average(excess, weights=seeds - 1))) * float(np.sum(1.0 / seeds)) / k**2
    var = boot_var + seed_var
    if var <= 0.0:
        return {**nan, "ci_low": diff, "ci_high": diff, "p": 1.0 if diff == 0 else 0.0, "kept": int(total.size)}
    df = var**2 / (seed_var**2 / float(np.sum(seeds - 1))) if seed_var > 0 else math.inf
    se = math.sqrt(var)
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return {"diff": diff, "ci_low": diff - half, "ci_high": diff + half,
            "p": float(2 * stats.t.sf(abs(diff) / se, df)), **base, "kept": int(total.size)}


def interval_text(interval: str, used: Iterable[str]) -> str:
    """How the intervals were made: ``interval`` (run.interval), and the fallback if some comparison
    (``used``: the procedures the results carry) had one seed per fold."""
    text = PROCEDURE_TEXT.get(interval, interval)
    others = sorted(set(used) - {interval})
    if others:
        text += "; comparisons with one seed per fold: " + ", ".join(PROCEDURE_TEXT.get(p, p) for p in others)
    return text


def compare(metric: str, folds: Sequence[FoldScores], procedure: str, pos: int | None = None,
            n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """The paired interval of ``procedure`` ("bootstrap", "components" or "corrected_t"), tagged with
    the name of the procedure used: "components" needs two seeds in every fold, and falls back to
    the two-level bootstrap where a fold has one."""
    if procedure == "components" and min((len(f.a) for f in folds), default=0) < 2:
        procedure = "bootstrap"
    if procedure == "bootstrap":
        out = two_level_bootstrap(metric, folds, pos, n_boot=n_boot, seed=seed, alpha=alpha)
    elif procedure == "corrected_t":
        out = corrected_t(metric, folds, pos, alpha=alpha)
    elif procedure == "components":
        out = variance_components(metric, folds, pos, n_boot=n_boot, seed=seed, alpha=alpha)
    else:
        raise ValueError(f"unknown interval procedure {procedure!r}")
    return {**out, "procedure": procedure, "seeds_per_fold": min((min(len(f.a), len(f.b)) for f in folds), default=0)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order; NaN stays NaN and
    does not count as a hypothesis.

    Sorted ascending, the k-th smallest of m p-values becomes ``max_{j<=k} min(1, (m-j+1) p_j)``.
    (Written here because scipy.stats offers only false-discovery-rate adjustments.)
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out.tolist()


def verdict(diff: float, p_adjusted: float, alpha: float = 0.05, seeds_per_fold: int | None = None) -> str:
    """"helps" / "hurts" when the adjusted p-value is below ``alpha`` (by the sign of ``diff``),
    else "no evidence" (also when either is undefined); NO_VERDICT when the comparison had fewer than
    two classifier seeds in some fold (``seeds_per_fold``; None: not known, taken as enough)."""
    if seeds_per_fold is not None and seeds_per_fold < 2:
        return NO_VERDICT
    if not (math.isfinite(diff) and math.isfinite(p_adjusted)) or p_adjusted >= alpha or diff == 0:
        return NO_EVIDENCE
    return HELPS if diff > 0 else HURTS
