"""Built-in simulated breast ultrasound: B-mode-like images with lesion masks.

The phantom is the default data of the study on a fresh machine and the fixture of the
fast tests. Each image is a linear-probe B-mode view of breast tissue: skin line,
subcutaneous fat crossed by Cooper's ligaments, a heterogeneous fibroglandular layer,
retromammary fat and a striated pectoral muscle, with depth-dependent attenuation and
Rayleigh speckle shown after log compression. Lesions follow the BI-RADS descriptors that
separate the classes on average (overlapping on purpose, so the task is not trivial):

* benign: oval, circumscribed, wider than tall (parallel), hypoechoic (some anechoic,
  cyst-like), often with posterior acoustic enhancement;
* malignant: irregular or spiculated, indistinct margin, taller than wide, hypoechoic and
  heterogeneous, usually with posterior acoustic shadowing;
* normal: no lesion (but hypoechoic fat lobules as distractors); the mask is all False.

Speckle follows the fully developed model: the envelope of a band-limited complex Gaussian
field is Rayleigh distributed (Goodman, *Speckle Phenomena in Optics*, 2007; Wagner et al.,
"Statistics of speckle in ultrasound B-scans", IEEE Trans. Sonics Ultrason. 1983).

Every image has its own generator seeded by ``(seed, label, n)``, so an image never depends
on how many others were made.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from scipy import ndimage

from busynth.config import PhantomConfig
from busynth.data.records import Record

logger = logging.getLogger(__name__)

PHANTOM_CLASSES = ("normal", "benign", "malignant")


def image_rng(seed: int, label: str, n: int, stream: int = 0) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, label, n, stream)."""
    return np.random.default_rng([seed % 2**64, zlib.crc32(label.encode()), n, stream])


def speckle(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float],
            looks: int = 1) -> np.ndarray:
    """Rayleigh speckle amplitude (mean power 1): |complex Gaussian field smoothed by a PSF|.

    ``sigma`` is the (axial, lateral) standard deviation of the Gaussian point spread
    function in pixels; lateral > axial gives the horizontally elongated grain of B-mode.
    ``looks`` > 1 averages the power of independent fields (spatial compounding), which
    lowers the speckle contrast by 1/sqrt(looks) as modern scanners do.
    """
    noise = rng.standard_normal((2 * looks, *shape), dtype=np.float32)
    field = ndimage.gaussian_filter(noise, (0, *sigma), mode="wrap", truncate=3.0)
    power = np.mean(field[0::2] ** 2 + field[1::2] ** 2, axis=0)
    return np.sqrt(power / power.mean()).astype(np.float64)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Low-frequency Gaussian noise with zero mean and unit standard deviation.

    Drawn on a grid coarser by up to 4x per axis (never coarser than half that axis' sigma)
    and interpolated back, which is much faster for wide kernels and looks the same.
    """
    steps = [int(np.clip(sg // 2, 1, 4)) for sg in sigma]
    coarse = tuple(-(-n // st) for n, st in zip(shape, steps))
    field = ndimage.gaussian_filter(rng.standard_normal(coarse), [sg / st for sg, st in zip(sigma, steps)],
                                    mode="reflect")
    if max(steps) > 1:
        size_wh = (coarse[1] * steps[1], coarse[0] * steps[0])
        field = np.asarray(Image.fromarray(field.astype(np.float32), mode="F").resize(size_wh, Image.BILINEAR))
        field = field[: shape[0], : shape[1]].astype(np.float64)
    return (field - field.mean()) / (field.std() + 1e-8)


def lesion_radius(theta: np.ndarray, harmonics: np.ndarray, phases: np.ndarray,
                  spikes: np.ndarray) -> np.ndarray:
    """Boundary radius r(theta) of a star-shaped lesion (1 = the base ellipse).

    harmonics[k] is the amplitude of the cos((k+2) theta) term (lobulation, irregularity);
    spikes rows are (angle, half-width in rad, length) of spicules added on top.
    """
    r = np.ones_like(theta)
    for k, (amp, phase) in enumerate(zip(harmonics, phases)):
        r = r + amp * np.cos((k + 2) * theta + phase)
    for angle, width, length in spikes:
        delta = np.angle(np.exp(1j * (theta - angle)))
        r = r + length * np.clip(1.0 - np.abs(delta) / width, 0.0, None) ** 2
    return r


def lesion_mask(shape: tuple[int, int], center: tuple[float, float], half_axes: tuple[float, float],
                angle: float, harmonics: np.ndarray, phases: np.ndarray,
                spikes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lesion as (bool mask, signed normalised distance inside the border).

    center and half_axes (vertical, horizontal) are in pixels; angle rotates the ellipse.
    The distance is > 0 inside, 0 on the border, and is used for soft margins.
    """
    reach = max(half_axes) * (1.0 + np.abs(harmonics).sum() + (spikes[:, 2].max() if len(spikes) else 0.0)) + 2
    y0, x0 = (max(int(c - reach), 0) for c in center)
    y1, x1 = (min(int(c + reach) + 2, n) for c, n in zip(center, shape))
    mask = np.zeros(shape, dtype=bool)
    depth_in = np.full(shape, -1.0)
    if y1 <= y0 or x1 <= x0:
        return mask, depth_in
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / half_axes[1]
    v = (-s * dx + c * dy) / half_axes[0]
    inner = lesion_radius(np.arctan2(v, u), harmonics, phases, spikes) - np.hypot(u, v)
    depth_in[y0:y1, x0:x1] = np.maximum(inner, -1.0)
    mask[y0:y1, x0:x1] = inner > 0
    return mask, depth_in


def _layer_boundaries(rng: np.random.Generator, x: np.ndarray) -> dict[str, np.ndarray]:
    """Depth (0..1) of each tissue interface as a function of lateral position x (0..1)."""
    tilt = rng.uniform(-0.12, 0.12)

    def wavy(base: float, amp: float) -> np.ndarray:
        freq, phase = rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        return base + tilt * (x - 0.5) + amp * np.sin(2 * np.pi * freq * x + phase)

    skin = wavy(rng.uniform(0.02, 0.05), 0.005)
    fat = skin + 0.03 + wavy(rng.uniform(0.08, 0.22), 0.03) - tilt * (x - 0.5)
    gland = fat + wavy(rng.uniform(0.3, 0.5), 0.05) - tilt * (x - 0.5)
    retro = gland + rng.uniform(0.02, 0.06)
    muscle = np.minimum(retro + rng.uniform(0.08, 0.16), 1.2)
    return {"skin": skin, "fat": fat, "gland": gland, "retro": retro, "muscle": muscle}


def tissue_echogenicity(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Mean backscatter of the breast layers (before speckle) and the layer boundaries."""
    y = (np.arange(size) + 0.5)[:, None] / size
    x = (np.arange(size) + 0.5)[None, :] / size
    b = _layer_boundaries(rng, x[0])
    edge = 1.5 / size  # soft interfaces, about a pixel and a half wide

    def below(depth: np.ndarray) -> np.ndarray:
        return np.clip(0.5 + (y - depth[None, :]) / (4 * edge), 0.0, 1.0)

    sk, ft, gl, rt, mu = (below(b[k]) for k in ("skin", "fat", "gland", "retro", "muscle"))
    fat_level, gland_level = rng.uniform(0.25, 0.4), rng.uniform(0.7, 1.0)
    echo = 0.15 * (1 - sk)  # gel / near field
    echo += (sk - ft) * fat_level
    echo += (ft - gl) * gland_level
    echo += (gl - rt) * fat_level * 0.9
    echo += (rt - mu) * rng.uniform(0.3, 0.45)
    echo += mu * rng.uniform(0.15, 0.3)  # behind the muscle: chest wall, mostly dark
    # Skin line: a thin bright band; the muscle fascia: a bright interface.
    px = 1.0 / size
    echo += rng.uniform(0.8, 1.3) * np.exp(-((y - b["skin"][None, :] - 2 * px) / (1.5 * px)) ** 2)
    echo += 0.5 * np.exp(-((y - b["retro"][None, :]) / (1.2 * px)) ** 2)
    # Fibroglandular heterogeneity: horizontally elongated blobs (lobules, ducts, stroma).
    s = size / 128.0
    hetero = smooth_field(rng, (size, size), (1.2 * s, 6.0 * s))
    echo *= np.exp((ft - gl) * rng.uniform(0.35, 0.6) * hetero + (sk - ft) * 0.2 * hetero)
    lobules = ndimage.gaussian_filter(
        (smooth_field(rng, (size, size), (2.0 * s, 7.0 * s)) > rng.uniform(1.0, 1.5)).astype(float), 0.8 * s)
    echo *= 1.0 - lobules * (ft - gl) * rng.uniform(0.3, 0.55)
    # Cooper's ligaments: thin bright oblique curves crossing the subcutaneous fat.
    for _ in range(rng.integers(1, 5)):
        x0, slope, bend = rng.uniform(0, 1), rng.uniform(-1.5, 1.5), rng.uniform(-2, 2)
        curve = b["fat"][None, :] - 0.6 * np.sqrt((slope * (x - x0) + bend * (x - x0) ** 2) ** 2 + 0.002)
        echo += rng.uniform(0.2, 0.45) * np.exp(-((y - curve) / (1.2 * px)) ** 2) * (sk - ft)
    # Pectoral muscle: hypoechoic with bright, nearly horizontal fibrous striations.
    freq = rng.uniform(12, 20)
    stria = np.sin(2 * np.pi * freq * (y + rng.uniform(-0.1, 0.1) * x)
                   + 2.0 * smooth_field(rng, (size, size), (4 * s, 12 * s)))
    echo += (rt - mu) * 0.6 * np.clip(stria, 0, None) ** 3
    # Refraction (edge) shadows: narrow vertical dark streaks below ligaments, in any class.
    for _ in range(rng.integers(0, 3)):
        centre, width = rng.uniform(0.05, 0.95), rng.uniform(0.01, 0.04)
        start = rng.uniform(0.1, 0.5)
        streak = np.exp(-(((x - centre) / width) ** 2)) * np.clip((y - start) / 0.05, 0.0, 1.0)
        echo *= 1.0 - rng.uniform(0.2, 0.5) * streak
    return np.clip(echo, 0.02, None), b


def _lesion_params(rng: np.random.Generator, label: str, size: int,
                   boundaries: dict[str, np.ndarray]) -> dict:
    """Random lesion shape and appearance; class-typical but overlapping between classes."""
    malignant = label == "malignant"
    atypical = rng.random() < 0.2  # looks like the other class in shape
    look_malignant = malignant != atypical
    width = rng.uniform(0.06, 0.17) * size  # horizontal half axis
    if look_malignant:
        aspect = rng.uniform(0.95, 1.6)
        harmonics = rng.uniform(0.03, 0.14, 8) / np.sqrt(np.arange(1, 9))
        n_spikes = rng.integers(3, 11) if rng.random() < 0.7 else 0
        spikes = np.column_stack([rng.uniform(-np.pi, np.pi, n_spikes), rng.uniform(0.08, 0.2, n_spikes),
                                  rng.uniform(0.15, 0.6, n_spikes)])
    else:
        aspect = rng.uniform(0.45, 0.9)
        harmonics = rng.uniform(0.0, 0.07, 3)
        spikes = np.zeros((0, 3))
    if atypical:  # borderline shape: halfway to oval / to irregular
        aspect = 0.5 * (aspect + 1.0)
        harmonics = harmonics * 0.5
        spikes[:, 2] *= 0.4
    cx = rng.uniform(0.28, 0.72) * size
    col = int(np.clip(cx, 0, size - 1))
    top, bottom = boundaries["fat"][col] * size, boundaries["gland"][col] * size
    cy = np.clip(rng.uniform(top + 0.4 * (bottom - top), bottom), 0.2 * size, 0.7 * size)
    # Posterior features: enhancement (> 0) for most benign, shadowing (< 0) for most malignant.
    if malignant:
        posterior = -rng.uniform(0.35, 0.8) if rng.random() < 0.8 else rng.uniform(-0.1, 0.2)
    else:
        posterior = rng.uniform(0.2, 0.8) if rng.random() < 0.7 else rng.uniform(-0.25, 0.1)
    anechoic = not malignant and rng.random() < 0.3
    return {
        "center": (cy, cx), "half_axes": (width * aspect, width),
        "angle": rng.uniform(-0.35, 0.35) if not malignant else rng.uniform(-0.6, 0.6),
        "harmonics": harmonics, "phases": rng.uniform(0, 2 * np.pi, len(harmonics)), "spikes": spikes,
        "level": rng.uniform(0.01, 0.05) if anechoic else rng.uniform(0.06, 0.35),
        "heterogeneous": malignant or rng.random() < 0.2, "posterior": posterior,
        "soft_margin": rng.uniform(0.1, 0.3) if malignant else rng.uniform(0.02, 0.08),
        "halo": rng.uniform(0.0, 0.5) if malignant and rng.random() < 0.4 else 0.0,
        "calcifications": int(rng.integers(2, 7)) if malignant and rng.random() < 0.3 else 0,
    }


def _apply_lesion(rng: np.random.Generator, echo: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Insert the lesion into the echogenicity map; returns (new map, bool mask)."""
    size = echo.shape[0]
    mask, depth_in = lesion_mask(echo.shape, p["center"], p["half_axes"], p["angle"],
                                 p["harmonics"], p["phases"], p["spikes"])
    if not mask.any():  # a lesion is never empty: fall back to its centre pixel
        cy, cx = (int(np.clip(round(c), 0, size - 1)) for c in p["center"])
        mask[cy, cx] = True
        depth_in[cy, cx] = 1.0
    inside = np.clip(depth_in / p["soft_margin"], 0.0, 1.0)
    interior = np.full(echo.shape, p["level"] * np.median(echo[mask]))
    if p["heterogeneous"]:
        interior *= np.exp(0.35 * smooth_field(rng, echo.shape, (size / 64, size / 64)))
    out = echo * (1 - inside) + interior * inside
    out *= 1.0 + p["halo"] * np.exp(-((depth_in + 0.05) / 0.12) ** 2)  # echogenic rim
    for _ in range(p["calcifications"]):
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(ys))
        out[ys[k], xs[k]] += rng.uniform(1.0, 2.5)
    # Posterior enhancement or shadowing: every column the lesion covers, below its bottom.
    shadow_zone = (np.cumsum(mask, axis=0) > 0) & ~mask
    lateral = ndimage.gaussian_filter1d(shadow_zone.astype(float), size / 80 + 0.5, axis=1)
    rows = np.arange(size)[:, None]
    bottom = np.max(np.where(mask, rows, -1), axis=0).max()
    fade = np.exp(-np.clip(rows - bottom, 0, None) / (0.6 * size))
    out *= np.clip(1.0 + p["posterior"] * lateral * fade, 0.05, None)
    return out, mask


@dataclass(frozen=True)
class Scanner:
    """How a simulated scanner renders echoes: ranges of attenuation and time-gain compensation
    (per unit depth), a speckle-size factor, a gain offset (dB) and the display's dynamic range."""

    attenuation: tuple[float, float] = (1.0, 2.2)
    tgc: tuple[float, float] = (0.3, 0.9)
    speckle_scale: float = 1.0
    gain_db: float = 0.0
    dynamic_range: tuple[float, float] = (45.0, 60.0)


# "default" renders the built-in data set; "second" is another scanner for external-set tests:
# coarser speckle, more attenuation with weaker TGC (darker depths), brighter gain, less dynamic range.
SCANNERS = {"default": Scanner(), "second": Scanner(attenuation=(1.8, 2.8), tgc=(0.1, 0.4), speckle_scale=1.6,
                                                    gain_db=5.0, dynamic_range=(36.0, 46.0))}


def render_bmode(rng: np.random.Generator, echo: np.ndarray, scanner: Scanner = SCANNERS["default"]) -> np.ndarray:
    """B-mode display of an echogenicity map: speckle, attenuation, TGC, log compression."""
    size = echo.shape[0]
    s = size / 128.0
    y = (np.arange(size) + 0.5)[:, None] / size
    attenuation = np.exp(-rng.uniform(*scanner.attenuation) * y) * np.exp(rng.uniform(*scanner.tgc) * y)
    focus = 1.0 + 0.25 * np.exp(-((y - rng.uniform(0.3, 0.6)) / 0.15) ** 2)
    x = (np.arange(size) + 0.5)[None, :] / size
    contact = 1.0 - rng.uniform(0.0, 0.4) * np.exp(-np.minimum(x, 1 - x) / 0.06)  # dim edges
    grain_sigma = (scanner.speckle_scale * (0.9 * s + 0.3), scanner.speckle_scale * (2.2 * s + 0.3))
    grain = speckle(rng, echo.shape, grain_sigma, looks=int(rng.integers(2, 4)))
    envelope = echo * attenuation * focus * contact * grain
    db = 20 * np.log10(envelope + 1e-6)
    dynamic_range = rng.uniform(*scanner.dynamic_range)
    gain = rng.uniform(-4.0, 4.0) + scanner.gain_db
    gray = (db + gain) / dynamic_range + 0.62
    return np.clip(np.round(gray * 255), 0, 255).astype(np.uint8)


def phantom_image(seed: int, label: str, n: int, size: int,
                  scanner: str = "default") -> tuple[np.ndarray, np.ndarray, dict]:
    """One simulated image: (uint8 image, bool mask, meta facts about the lesion)."""
    if label not in PHANTOM_CLASSES:
        raise ValueError(f"phantom knows classes {PHANTOM_CLASSES}, not {label!r}")
    rng = image_rng(seed, label, n)
    echo, boundaries = tissue_echogenicity(rng, size)
    meta: dict = {"source": "phantom", "seed": seed}
    if label == "normal":
        mask = np.zeros((size, size), dtype=bool)
    else:
        params = _lesion_params(rng, label, size, boundaries)
        echo, mask = _apply_lesion(rng, echo, params)
        meta["posterior"] = ("shadowing" if params["posterior"] < -0.15
                             else "enhancement" if params["posterior"] > 0.15 else "none")
    return render_bmode(rng, echo, SCANNERS[scanner]), mask, meta


def _perturb(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
             reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Shift by up to ``reach`` px (edges replicated), change gain and offset, add noise."""
    dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, 2)) if reach else (0, 0)
    pad = max(reach, 1)
    window = (slice(pad - dy, pad - dy + image.shape[0]), slice(pad - dx, pad - dx + image.shape[1]))
    shifted = np.pad(image, pad, mode="edge")[window].astype(np.float64)
    new_mask = np.pad(mask, pad, mode="edge")[window]
    noisy = shifted * rng.uniform(0.93, 1.07) + rng.uniform(-6, 6) + rng.normal(0.0, 3.0, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8), new_mask


def near_duplicate(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                   max_hash_distance: int = 4, tries: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A slightly shifted, re-noised, gain-changed copy of (image, mask).

    Both 64-bit perceptual hashes the audit uses (imagehash.phash and dhash) of the copy
    are within ``max_hash_distance`` bits of the source's: perturbations are redrawn up to
    ``tries`` times, and the last resort keeps the image in place (gain and noise only).
    """
    hashes = (imagehash.phash, imagehash.dhash)
    source = [h(Image.fromarray(image)) for h in hashes]
    reach = max(1, round(image.shape[0] / 128))
    for _ in range(tries):
        copy, new_mask = _perturb(rng, image, mask, reach)
        pil = Image.fromarray(copy)
        close = all(h(pil) - s <= max_hash_distance for h, s in zip(hashes, source, strict=True))
        if close and not np.array_equal(copy, image):
            return copy, new_mask
    return _perturb(rng, image, mask, 0)


def twin_plan(seed: int, label: str, count: int, rate: float) -> dict[int, int]:
    """Which numbers n of a class are near-duplicate twins, mapped to their source number."""
    k = min(int(np.floor(rate * count + 0.5)), count // 2)
    order = image_rng(seed, label, 0, stream=1).permutation(np.arange(1, count + 1))
    return {int(t): int(s) for t, s in zip(order[:k], order[k:2 * k])}


def make_phantom(config: PhantomConfig | None = None,
                 classes: Sequence[str] = PHANTOM_CLASSES) -> list[Record]:
    """Simulated records, class by class in ``classes`` order, ids ``<label>_<n>`` (n from 1).

    Counts come from ``config.n_per_class``; a class without a count gets no images, a
    count for a class not in ``classes`` is an error. Same config, byte-identical images.
    """
    config = config or PhantomConfig()
    unknown = sorted(set(config.n_per_class) - set(classes))
    if unknown:
        raise ValueError(f"phantom n_per_class names classes not in {list(classes)}: {unknown}")
    records: list[Record] = []
    for label in classes:
        count = config.n_per_class.get(label, 0)
        twins = twin_plan(config.seed, label, count, config.near_duplicate_rate)
        made: dict[int, tuple[np.ndarray, np.ndarray, dict]] = {}
        for n in range(1, count + 1):
            if n in twins:
                continue
            made[n] = phantom_image(config.seed, label, n, config.size, config.scanner)
        for n, source in twins.items():
            image, mask = near_duplicate(image_rng(config.seed, label, n, stream=2), *made[source][:2])
            meta = dict(made[source][2], near_duplicate_of=f"{label}_{source}")
            made[n] = (image, mask, meta)
        for n in range(1, count + 1):
            image, mask, meta = made[n]
            records.append(Record(id=f"{label}_{n}", label=label, image=image, mask=mask,
                                  path=f"phantom:{label}/{label} ({n}).png", meta=meta))
    logger.info("phantom: %d images of %d px (seed %d, %s)", len(records), config.size, config.seed,
                ", ".join(f"{c}={config.n_per_class.get(c, 0)}" for c in classes))
    return records

