"""New lesion shapes for mask-conditioned sampling: a statistical shape model per class.

Deformed training masks (:mod:`busynth.generators.diffusion.masks`) keep every training layout
recognisable. This model instead draws *new* outlines from the statistics of a class's training
masks, in the three properties lesions are described by (BI-RADS: size, shape and orientation,
margin):

* position and size: the lesion's centroid and mean log radius (shares of the image side), from a
  Gaussian fitted to the class (mean and covariance: large lesions sit where large ones sit);
* orientation: the angle of the lesion's long axis, drawn from the class's training lesions
  (ultrasound lesions are mostly wider than tall; "not parallel" is a sign of malignancy);
* outline (elongation and the irregularity of the margin): the log radius about the centroid in
  ``angles`` directions, measured from the long axis and less its mean, is a point distribution
  model (Cootes, Taylor, Cooper & Graham, "Active shape models", CVIU 61, 1995): principal component
  analysis of the class's outlines (scikit-learn's PCA, the components that explain
  ``variance`` of it), a new outline is the mean plus Gaussian weights on those components.

The outline of a mask's largest connected lesion is its radial profile: in each direction the
farthest lesion pixel from the centroid. Radii in the log domain stay positive and the shape is
independent of size; the profile assumes a star-shaped lesion, which holds for nearly all lesion
masks and is why a concave one comes out a little fuller. A new outline is rasterised as a
polygon (Pillow).

Written here because no maintained library fits shape models to binary masks (scikit-image has
contour tools but is no dependency; statistical shape model packages need landmarks in
correspondence, which the radial profile about the long axis provides here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from sklearn.decomposition import PCA

_POSITION_MARGIN = 0.05  # share of the side: a sampled centroid stays this far inside the image


def largest_lesion(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool (H, W) mask (all False for an empty mask)."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def _moments(lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Pixel rows, cols, and the centroid of a non-empty bool mask."""
    rows, cols = np.nonzero(lesion)
    if not len(rows):
        raise ValueError("the mask is empty")
    return rows, cols, float(rows.mean()), float(cols.mean())


def outline(mask: np.ndarray, angles: int = 64) -> tuple[float, float, float, np.ndarray]:
    """The largest lesion of a non-empty bool mask as (centroid row, centroid col, orientation, radii):
    the orientation is the angle of its long axis (radians in [0, pi), from the column axis towards
    increasing rows), and radius j is the distance from the centroid to the farthest lesion pixel
    centre in the direction ``orientation + 2 pi j / angles``. A direction
    no pixel falls in takes the radius interpolated between its neighbours."""
    rows, cols, cy, cx = _moments(largest_lesion(mask))
    dy, dx = rows - cy, cols - cx
    if len(rows) > 1:
        _, vectors = np.linalg.eigh(np.cov(np.stack([dx, dy])))
        orientation = float(np.arctan2(vectors[1, 1], vectors[0, 1]) % np.pi)
    else:
        orientation = 0.0
    step = 2 * np.pi / angles
    bins = np.round(((np.arctan2(dy, dx) - orientation) % (2 * np.pi)) / step).astype(int) % angles
    radius = np.full(angles, np.nan)
    np.fmax.at(radius, bins, np.hypot(dy, dx))
    known = np.flatnonzero(~np.isnan(radius))
    if len(known) < angles:
        radius = np.interp(np.arange(angles), known, radius[known], period=angles)
    return cy, cx, orientation, radius


def outline_mask(cy: float, cx: float, orientation: float, radius: np.ndarray, size: int) -> np.ndarray:
    """Rasterise an outline (see :func:`outline`; radii in px) about (``cy``, ``cx``) px as a bool
    (size, size) mask; never empty (the centroid's pixel at least)."""
    theta = orientation + 2 * np.pi * np.arange(len(radius)) / len(radius)
    xy = list(zip((cx + radius * np.cos(theta)).tolist(), (cy + radius * np.sin(theta)).tolist(), strict=True))
    canvas = Image.new("1", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(xy, fill=1)
    out = np.asarray(canvas, dtype=bool).copy()
    out[int(np.clip(round(cy), 0, size - 1)), int(np.clip(round(cx), 0, size - 1))] = True
    return out


@dataclass(frozen=True)
class ShapeModel:
    """Per-class statistics of lesion outlines (see the module docstring); ``fit`` then ``sample``."""

    position_mean: np.ndarray  # (3,): centroid row, centroid col, mean log radius; shares of the side
    position_cov: np.ndarray  # (3, 3)
    orientations: np.ndarray  # (M,) the long axis of every training lesion
    outline_mean: np.ndarray  # (angles,) mean log-radius profile (zero mean), from the long axis
    components: np.ndarray  # (C, angles) principal components of the profiles
    component_sd: np.ndarray  # (C,) their standard deviations

    @classmethod
    def fit(cls, masks: Sequence[np.ndarray], angles: int = 32, variance: float = 0.9) -> ShapeModel:
        """Fit to the non-empty bool masks of one class (each square; sides may differ). ValueError
        when none is non-empty."""
        position, orientations, profiles = [], [], []
        for mask in masks:
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():
                continue
            side = mask.shape[0]
            cy, cx, orientation, radius = outline(mask, angles)
            log_r = np.log(radius)
            position.append((cy / side, cx / side, log_r.mean() - np.log(side)))
            orientations.append(orientation)
            profiles.append(log_r - log_r.mean())
        if not profiles:
            raise ValueError("ShapeModel.fit: no non-empty mask to fit")
        position_arr, profile_arr = np.array(position), np.array(profiles)
        if len(profiles) > 2:
            pca = PCA(n_components=variance, svd_solver="full").fit(profile_arr)
            components, sd = pca.components_, np.sqrt(pca.explained_variance_)
        else:  # too few outlines for a covariance: the mean outline only
            components, sd = np.zeros((0, angles)), np.zeros(0)
        return cls(position_mean=position_arr.mean(axis=0),
                   position_cov=np.cov(position_arr, rowvar=False) if len(position) > 1 else np.zeros((3, 3)),
                   orientations=np.array(orientations), outline_mean=profile_arr.mean(axis=0),
                   components=components, component_sd=sd)

    def sample(self, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` new non-empty masks, bool (n, size, size), drawn with ``rng``."""
        out = np.zeros((n, size, size), dtype=bool)
        for i in range(n):
            cy, cx, log_size = rng.multivariate_normal(self.position_mean, self.position_cov, method="eigh")
            profile = (self.outline_mean
                       + rng.normal(0.0, 1.0, len(self.component_sd)) * self.component_sd @ self.components)
            cy, cx = (np.clip([cy, cx], _POSITION_MARGIN, 1 - _POSITION_MARGIN) * size).tolist()
            radius = np.exp(log_size + np.log(size) + profile)
            out[i] = outline_mask(cy, cx, float(rng.choice(self.orientations)), radius, size)
        return out


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Size, elongation and irregularity of a mask's largest lesion: ``area`` (share of the image),
    ``elongation`` (major over minor axis of the pixel coordinates' covariance, >= 1) and
    ``irregularity`` (1 - solidity: the share of the convex hull the lesion leaves empty)."""
    lesion = largest_lesion(mask)
    rows, cols, _, _ = _moments(lesion)
    area = len(rows)
    coords = np.stack([rows, cols], axis=1).astype(np.float64)
    eig = np.linalg.eigvalsh(np.cov(coords, rowvar=False) + np.eye(2) / 12) if area > 1 else np.ones(2)
    # Hull of the pixels' corners, so that a one-pixel-wide lesion has an area.
    corners = (coords[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])).reshape(-1, 2)
    try:
        hull_area = ConvexHull(corners).volume
    except QhullError:
        hull_area = float(area)
    return {"area": area / lesion.size, "elongation": float(np.sqrt(eig[1] / eig[0])),
            "irregularity": float(max(0.0, 1.0 - area / hull_area))}
