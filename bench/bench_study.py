"""Benchmark: wall time and results of the whole study (``busynth run``) on a data set.

Runs the study into a fresh folder (or resumes it with --out), times it, prints the
summary table and writes bench/results/study-<methods>.json with the wall time, the
per-method mean ± sd and the paired differences to ``real``.

    python bench/bench_study.py --data ../shared/data/Dataset_BUSI_with_GT --methods real,classical
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from busynth.experiment import run_study
from busynth.io import write_json
from busynth.presets import load_config
from busynth.results import format_summary

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="BUSI-layout folder (default: phantom)")
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--methods", default="real,classical")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, [f"run.methods=[{args.methods}]", *args.overrides])
    out = args.out or Path(tempfile.mkdtemp(prefix="busynth-bench-"))
    started = time.perf_counter()
    summary = run_study(config, out, args.data)
    minutes = (time.perf_counter() - started) / 60
    print(format_summary(summary))
    print(f"\nwall time: {minutes:.1f} min   run folder: {out}")
    name = args.methods.replace(",", "-")
    write_json(RESULTS / f"study-{name}.json", {
        "data": str(args.data or "phantom"), "config": args.config, "overrides": args.overrides,
        "wall_minutes": round(minutes, 2), "run_dir": str(out), "summary": summary,
    })


if __name__ == "__main__":
    main()
