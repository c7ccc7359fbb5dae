"""Benchmark: scaling out on this machine (issue #17): the study on 1 vs 2 Ray workers, and sampling
on 1 vs 2 accelerate processes, each pair measured side by side, one torch thread per worker.

1. The smoke study (every method by default) with ``busynth run --executor ray --workers 1`` and
   ``--workers 2``, each in a fresh run folder, alternating, ``--reps`` times each: the whole
   command's wall time (imports, Ray start, data, every cell, summary, report), and the part Ray
   parallelises, from the submission of the tasks to the last one done (the executor's log line).
   Then the same study run in this process on a Ray instance started (and its workers warmed up)
   before the timing, as on a running lab cluster: data, tasks, summary and report.
2. Sampling a fitted sd-lora generator (the cpu preset's 128 px, 20 DPM-Solver++ steps, guidance;
   its fit is a few steps per stage, which does not change the cost of sampling) through
   ``cells.sample_sharded``: in one process, and under ``accelerate launch --num_processes 2``
   where each process samples its share of the chunks and the shares are gathered. The time is
   from the barrier before sampling to the end of the gather (model loading and process start
   excluded; the total command time is recorded as well).

Prints a table and writes bench/results/scale.json. Targets (issue #17): ratio <= 0.65 for both.

    python bench/bench_scale.py [--reps 2] [--methods real,classical,cvae,sd-lora,controlnet] [--seeds 1]
                                [--images 256]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
       "RAY_COLOR_PREFIX": "0"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return seconds


def task_phase(log: Path) -> float:
    """Seconds from the submission of the Ray tasks to the last one done (the executor's own line)."""
    return float(re.search(r"ray: every task done in ([\d.]+) s", log.read_text()).group(1))


def study(tmp: Path, methods: str, reps: int, seeds: int, preset: str = "smoke") -> dict:
    times: dict[int, list[float]] = {1: [], 2: []}
    tasks: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(reps):
        for workers in (1, 2):
            out = tmp / f"study-w{workers}-r{rep}"
            cmd = [sys.executable, "-m", "busynth.cli", "run", "-c", preset, "--methods", methods, "--out", str(out),
                   "--seeds", str(seeds), "--executor", "ray", "--workers", str(workers)]
            times[workers].append(timed(cmd, tmp / f"{out.name}.log"))
            tasks[workers].append(task_phase(tmp / f"{out.name}.log"))
            print(f"  study, {workers} Ray worker(s), rep {rep}: {times[workers][-1]:.1f} s "
                  f"(Ray tasks {tasks[workers][-1]:.1f} s)", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    t1, t2 = statistics.median(tasks[1]), statistics.median(tasks[2])
    return {"preset": preset, "methods": methods, "seeds": seeds,
            "seconds": {"1": times[1], "2": times[2]}, "median_1": one,
            "median_2": two, "ratio": two / one, "task_seconds": {"1": tasks[1], "2": tasks[2]},
            "task_median_1": t1, "task_median_2": t2, "task_ratio": t2 / t1}


def study_warm(tmp: Path, methods: str, reps: int, preset: str = "smoke") -> dict:
    """The study run in this process on a Ray instance started beforehand, its workers warmed up
    (as on a running lab cluster): the timing covers data, tasks, summary and report, not Ray's
    start nor any import."""
    import ray
    import torch

    from busynth.cluster import warm_up, warm_up_modules
    from busynth.experiment import run_study
    from busynth.presets import load_config

    torch.set_num_threads(1)
    times: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(reps):
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            config = load_config(preset, [f"run.methods=[{methods}]", "run.executor=ray"])
            ray.get([ray.remote(num_cpus=1)(warm_up).remote(warm_up_modules(config.run.methods))
                     for _ in range(workers)])
            start = time.perf_counter()
            run_study(config, tmp / f"warm-w{workers}-r{rep}")
            times[workers].append(time.perf_counter() - start)
            ray.shutdown()
            print(f"  study on a running Ray instance, {workers} worker(s), rep {rep}: {times[workers][-1]:.1f} s",
                  flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"preset": preset, "methods": methods, "seconds": {"1": times[1], "2": times[2]}, "median_1": one,
            "median_2": two, "ratio": two / one}


def fit_sampler(folder: Path) -> None:
    """A cpu-preset-size sd-lora fit with two steps per stage: sampling costs what the preset's does."""
    from busynth.config import PhantomConfig
    from busynth.data.phantom import make_phantom
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    classes = ["normal", "benign", "malignant"]
    records = make_phantom(PhantomConfig(n_per_class={c: 8 for c in classes}, size=128), classes)
    short = {"steps": 2, "batch_size": 4, "checkpoint_every": 2}
    SDLoraGenerator({"image_size": 128, "autoencoder_training": short, "base_training": short,
                     "lora_training": short}, classes).fit(records, folder, seed=0)


def sample_child(folder: Path, images: int, out: Path) -> None:
    """In each process: load the fit, wait for all, sample ``images`` benign images sharded, report."""
    import torch

    from busynth.accel import barrier, rank_and_world
    from busynth.cells import sample_sharded
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator
    from busynth.io import write_json

    torch.set_num_threads(1)
    barrier()  # first: sets up the process group before the generator asks accelerate for its device
    generator = SDLoraGenerator.load(folder)
    barrier()
    start = time.perf_counter()
    samples = sample_sharded(generator, "benign", images, seed=0, masks=None)
    seconds = time.perf_counter() - start
    write_json(out, {"world": rank_and_world()[1], "seconds": seconds, "images": len(samples)})


def sampling(tmp: Path, images: int, reps: int) -> dict:
    folder = tmp / "sd-lora"
    fit_sampler(folder)
    times: dict[int, list[float]] = {1: [], 2: []}
    totals: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(reps):
        for procs in (1, 2):
            out = tmp / f"sample-p{procs}-r{rep}.json"
            args = [str(Path(__file__).resolve()), "--sample-child", str(folder), "--images", str(images),
                    "--out", str(out)]
            cmd = [sys.executable, *args] if procs == 1 else [*LAUNCH, *args]
            totals[procs].append(timed(cmd, tmp / f"{out.stem}.log"))
            result = json.loads(out.read_text())
            assert result["world"] == procs and result["images"] == images, result
            times[procs].append(result["seconds"])
            print(f"  sampling {images} images, {procs} process(es), rep {rep}: {result['seconds']:.1f} s "
                  f"(command {totals[procs][-1]:.1f} s)", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"images": images, "seconds": {"1": times[1], "2": times[2]},
            "command_seconds": {"1": totals[1], "2": totals[2]}, "median_1": one, "median_2": two, "ratio": two / one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--methods", default="real,classical,cvae,sd-lora,controlnet")
    parser.add_argument("--seeds", type=int, default=1, help="classifier seeds per fold in the study (smoke: 1)")
    parser.add_argument("--preset", default="smoke", help="the study's preset (smoke: the issue's target; demo: "
                                                          "about 40x its work, where Ray's start matters less)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--skip", choices=["study", "warm", "sampling"], action="append", default=[])
    parser.add_argument("--sample-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    if args.sample_child is not None:
        sample_child(args.sample_child, args.images, args.out)
        return
    results: dict = {"cores": os.cpu_count(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        if "study" not in args.skip:
            results["study"] = study(Path(tmp), args.methods, args.reps, args.seeds, args.preset)
        if "warm" not in args.skip:
            results["warm"] = study_warm(Path(tmp), args.methods, args.reps, args.preset)
        if "sampling" not in args.skip:
            results["sampling"] = sampling(Path(tmp), args.images, args.reps)
    print(f"\n{'what':<44} {'1 worker':>9} {'2 workers':>10} {'ratio':>6}  target")
    for key, label in (("study", f"{args.preset} study, {args.seeds} seed(s), Ray"),
                       ("warm", f"{args.preset} study, running Ray, warm workers"),
                       ("sampling", f"sampling {args.images} images, accelerate")):
        if key in results:
            r = results[key]
            print(f"{label:<44} {r['median_1']:>8.1f}s {r['median_2']:>9.1f}s {r['ratio']:>6.2f}  <= 0.65")
            if key == "study":
                print(f"{'  of which the Ray tasks (submit to last done)':<44} {r['task_median_1']:>8.1f}s "
                      f"{r['task_median_2']:>9.1f}s {r['task_ratio']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
