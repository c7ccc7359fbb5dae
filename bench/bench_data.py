"""Benchmark: loading, auditing and splitting a data set (BUSI when present, else phantom).

Targets (issue "Foundation"): loading all 780 BUSI images and masks well under 30 s;
audit and split under a minute each. Prints a table and writes bench/results/data.json.

    python bench/bench_data.py [--data ../shared/data/Dataset_BUSI_with_GT]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from busynth.config import StudyConfig
from busynth.data.audit import audit_records
from busynth.data.busi import load_dataset
from busynth.data.phantom import make_phantom
from busynth.data.splits import leaking_groups, make_split
from busynth.io import write_json

RESULTS = Path(__file__).parent / "results" / "data.json"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset_BUSI_with_GT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    config = StudyConfig()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if args.data.exists():
        records = load_dataset(args.data, config.data).records
        source = str(args.data)
    else:
        records = make_phantom(config.phantom, config.data.classes)
        source = "phantom"
    timings["load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    audit = audit_records(records, config.audit)
    timings["audit_s"] = time.perf_counter() - started
    started = time.perf_counter()
    split = make_split(records, audit, config.split)
    timings["split_s"] = time.perf_counter() - started
    result = {
        "data": source, "images": len(records), **{k: round(v, 3) for k, v in timings.items()},
        "near_groups": len(audit.near_groups), "cross_class_groups": len(audit.cross_class_groups),
        "leaking_groups": len(leaking_groups(split)),
    }
    print(f"{'stage':<10}{'seconds':>10}")
    for key, value in timings.items():
        print(f"{key.removesuffix('_s'):<10}{value:>10.2f}")
    print(f"{len(records)} images from {source}; {result['near_groups']} near-duplicate groups, "
          f"{result['cross_class_groups']} cross-class; leaking groups in the split: {result['leaking_groups']}")
    write_json(RESULTS, result)


if __name__ == "__main__":
    main()
