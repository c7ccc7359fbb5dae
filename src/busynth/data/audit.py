"""Data set audit: exact and near duplicates, cross-class duplicates, coloured overlays.

Near duplicates are found with two perceptual hashes from ``imagehash``: the DCT hash
(pHash, Zauner 2010) and the difference hash (dHash). Two images are near duplicates when
*both* Hamming distances are at most ``audit.near_duplicate_distance``; requiring both keeps
false matches between merely similar-looking scans rare. Duplicate pairs are joined into
groups (connected components), and the groups are what the splitter keeps together, so a
near duplicate of a test image can never sit in the training part.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from busynth.config import AuditConfig
from busynth.data.records import Record

log = logging.getLogger(__name__)


@dataclass
class AuditReport:
    """Findings of an audit. ``group_of`` maps every record id to its duplicate-group number."""

    n_images: int
    exact_groups: list[list[str]]
    near_groups: list[list[str]]
    cross_class_groups: list[list[str]]
    overlays: list[str]
    without_mask: list[str]
    group_of: dict[str, int]
    pairs: list[dict] = field(default_factory=list)
    load: dict | None = None

    @property
    def cross_class_ids(self) -> set[str]:
        """Ids of every member of a group whose members carry different labels."""
        return {i for g in self.cross_class_groups for i in g}

    def to_dict(self) -> dict:
        """Plain-dict form written to audit.json."""
        return {
            "n_images": self.n_images,
            "n_exact_groups": len(self.exact_groups),
            "n_near_groups": len(self.near_groups),
            "n_cross_class_groups": len(self.cross_class_groups),
            "n_in_near_groups": sum(len(g) for g in self.near_groups),
            "n_overlays": len(self.overlays),
            "exact_groups": self.exact_groups,
            "near_groups": self.near_groups,
            "cross_class_groups": self.cross_class_groups,
            "overlays": self.overlays,
            "without_mask": self.without_mask,
            "pairs": self.pairs,
            "group_of": self.group_of,
            "load": self.load,
        }

    def format(self) -> str:
        """A readable summary of the findings."""
        lines = [
            f"audit of {self.n_images} images:",
            (f"  exact duplicate groups: {len(self.exact_groups)} "
             f"({sum(len(g) for g in self.exact_groups)} images)"),
            (f"  near-duplicate groups (exact included): {len(self.near_groups)} "
             f"({sum(len(g) for g in self.near_groups)} images, largest {max(map(len, self.near_groups), default=0)})"),
            f"  groups spanning two classes: {len(self.cross_class_groups)}",
            f"  images with coloured overlays: {len(self.overlays)}",
        ]
        if self.without_mask:
            lines.append(f"  lesion images without a mask: {len(self.without_mask)}")
        for g in self.cross_class_groups:
            lines.append("    cross-class: " + ", ".join(g))
        if self.overlays:
            lines.append("    overlays: " + ", ".join(self.overlays))
        return "\n".join(lines)


def pixel_digest(image: np.ndarray) -> str:
    """SHA-1 of the decoded pixels and shape: equal digests mean identical images."""
    h = hashlib.sha1(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def perceptual_hashes(images: Sequence[np.ndarray], hash_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N, hash_size**2) pHash and dHash bit arrays of uint8 grayscale images."""
    ph, dh = [], []
    for image in images:
        pil = Image.fromarray(image)
        ph.append(imagehash.phash(pil, hash_size=hash_size).hash.ravel())
        dh.append(imagehash.dhash(pil, hash_size=hash_size).hash.ravel())
    return np.array(ph, dtype=bool), np.array(dh, dtype=bool)


def hamming_matrix(bits: np.ndarray) -> np.ndarray:
    """(N, N) Hamming distances between rows of a boolean bit array."""
    packed = np.packbits(bits, axis=1)
    x = packed[:, None, :] ^ packed[None, :, :]
    return np.unpackbits(x, axis=2).sum(axis=2, dtype=np.int32)


def overlay_fraction(meta: dict, channel_delta: int) -> float:
    """Share of pixels whose colour channels differ by more than ``channel_delta`` (0 for gray files)."""
    hist = meta.get("channel_spread_hist")
    if not hist:
        return 0.0
    hist = np.asarray(hist)
    return float(hist[channel_delta + 1 :].sum() / max(1, hist.sum()))


def _components(n: int, pairs_i: np.ndarray, pairs_j: np.ndarray) -> np.ndarray:
    graph = csr_matrix((np.ones(len(pairs_i)), (pairs_i, pairs_j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def _groups_from_labels(labels: np.ndarray, ids: list[str]) -> list[list[str]]:
    members: dict[int, list[str]] = {}
    for lab, rid in zip(labels, ids, strict=True):
        members.setdefault(int(lab), []).append(rid)
    return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda g: g[0])


def audit_records(records: Sequence[Record], config: AuditConfig | None = None,
                  load: dict | None = None) -> AuditReport:
    """Audit records for duplicates and overlays; returns an AuditReport with duplicate groups.

    Every record gets a group number in ``group_of`` (singletons get their own), numbered
    in record order so the numbering is stable for a given data set.
    """
    config = config or AuditConfig()
    ids = [r.id for r in records]
    n = len(records)
    digests = [pixel_digest(r.image) for r in records]
    exact_i, exact_j = [], []
    first: dict[str, int] = {}
    for k, d in enumerate(digests):
        if d in first:
            exact_i.append(first[d])
            exact_j.append(k)
        else:
            first[d] = k
    exact_labels = _components(n, np.array(exact_i, int), np.array(exact_j, int))

    ph, dh = perceptual_hashes([r.image for r in records], config.hash_size)
    dp, dd = hamming_matrix(ph), hamming_matrix(dh)
    close = (dp <= config.near_duplicate_distance) & (dd <= config.near_duplicate_distance)
    iu, ju = np.nonzero(np.triu(close, k=1))
    all_i = np.concatenate([iu, np.array(exact_i, int)])
    all_j = np.concatenate([ju, np.array(exact_j, int)])
    labels = _components(n, all_i, all_j)

    exact_set = {(a, b) for a, b in zip(exact_i, exact_j, strict=True)}
    pairs = [
        {
            "a": ids[a],
            "b": ids[b],
            "phash_distance": int(dp[a, b]),
            "dhash_distance": int(dd[a, b]),
            "exact": (a, b) in exact_set or (b, a) in exact_set,
        }
        for a, b in zip(iu.tolist(), ju.tolist(), strict=True)
    ]
    near_groups = _groups_from_labels(labels, ids)
    label_of = {r.id: r.label for r in records}
    cross = [g for g in near_groups if len({label_of[i] for i in g}) > 1]
    order: dict[int, int] = {}
    group_of = {rid: order.setdefault(int(lab), len(order)) for rid, lab in zip(ids, labels, strict=True)}
    overlays = [
        r.id for r in records
        if overlay_fraction(r.meta, config.overlay_channel_delta) >= config.overlay_min_fraction
    ]
    report = AuditReport(
        n_images=n,
        exact_groups=_groups_from_labels(exact_labels, ids),
        near_groups=near_groups,
        cross_class_groups=cross,
        overlays=overlays,
        without_mask=[r.id for r in records if r.mask is None],
        group_of=group_of,
        pairs=pairs,
        load=load,
    )
    log.info("audit: %d near-duplicate groups, %d cross-class", len(near_groups), len(cross))
    return report
