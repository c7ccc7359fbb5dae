"""Many workers on one run folder: claims, two ``busynth run`` at once, a killed worker, and the Ray executor.

The workers are real child processes (the CLI), one torch thread each, on the smoke study; every
multi-worker run must write the same metrics as one process alone, compute each cell once, and
finish the cell of a worker that was killed holding it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from busynth.cells import Cell
from busynth.cluster import task_slots
from busynth.executors import Fit, Sample, Score, _submit_and_wait, plan
from busynth.locks import claim, each_claimed, lock_path

ARGS = ["-c", "smoke", "--methods", "real,classical,cvae", "--set", "classifier.epochs=6", "--set",
        "classifier.patience=6"]
CELL_LINE = re.compile(r"busynth\.executors: cell \d+/\d+: (\S+) (\S+)")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RAY_COLOR_PREFIX": "0"}


def _start(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "busynth.cli", "run", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=_env())


def _finish(proc: subprocess.Popen, log: Path, timeout: int = 600) -> str:
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def _metrics(run_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((run_dir / "cells").rglob("metrics.json")):
        row = json.loads(path.read_text())
        row.pop("seconds")
        out[str(path.relative_to(run_dir))] = row
    return out


def _computed(log_text: str) -> list[tuple[str, str]]:
    """The cells a worker trained itself: its cell lines followed by a metrics line."""
    cells, current = [], None
    for line in log_text.splitlines():
        if m := CELL_LINE.search(line):
            current = (m.group(1), m.group(2))
        elif "busynth.executors:   balanced accuracy" in line and current:
            cells.append(current)
            current = None
    return cells


def _wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _holder(lock: Path) -> int | None:
    """The pid holding a flock on ``lock`` (from /proc/locks), None when nobody does."""
    inode = lock.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
            return int(fields[4])
    return None


def _hold(run_dir: Path, unit: str) -> subprocess.Popen:
    """Another process holding the claim on ``unit`` of ``run_dir`` until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom busynth.locks import claim\n"
        f"with claim({str(run_dir)!r}, {unit!r}):\n    print('held', flush=True)\n    time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The smoke study in one process, one thread."""
    root = tmp_path_factory.mktemp("reference")
    _finish(_start(root / "run", root / "log"), root / "log")
    return _metrics(root / "run")


def test_plan_orders_fits_on_their_bases_and_filtered_arms_after_real() -> None:
    cells = [Cell("real", 0, 0), Cell("cvae", 0, 0), Cell("controlnet", 0, 0), Cell("sd-lora", 0, 0),
             Cell("cvae+filter", 0, 1), Cell("cvae", 1, 0), Cell("controlnet", 1, 0)]
    fits, fit_needs, cell_needs = plan(cells, ["real", "sd-lora", "controlnet", "cvae"])
    assert fits.index(Fit("sd-lora", 0, 0)) < fits.index(Fit("controlnet", 0, 0))
    # the bases of the longest chains first, in both folds, then the others in study order
    assert fits[:2] == [Fit("sd-lora", 0, 0), Fit("sd-lora", 1, 0)]
    assert fits.index(Fit("cvae", 0, 0)) < fits.index(Fit("controlnet", 0, 0)) < fits.index(Fit("cvae", 1, 0))
    assert fit_needs[Fit("controlnet", 0, 0)] == [Fit("sd-lora", 0, 0)]
    assert cell_needs[Cell("real", 0, 0)] == []
    assert cell_needs[Cell("cvae+filter", 0, 1)] == [Fit("cvae", 0, 0), Cell("real", 0, 0, 0)]
    # sd-lora's set is sampled in a task of its own, so the ControlNet needs only its fit
    assert cell_needs[Cell("sd-lora", 0, 0)] == [Sample(Fit("sd-lora", 0, 0))]
    assert [f.samples for f in fits[:2]] == [False, False] and all(f.samples for f in fits[2:])
    # without sd-lora in the run, controlnet fits its own base: no edge
    _, alone, _ = plan([Cell("controlnet", 1, 0)], ["controlnet"])
    assert alone[Fit("controlnet", 1, 0)] == []


class _FakeRay:
    """Ray's task API as ``_submit_and_wait`` uses it, on a recorded timeline: ``wait`` finishes the
    earliest-submitted task whose argument tasks are done."""

    def __init__(self, cpus: int) -> None:
        self.cpus, self.deps, self.done, self.events, self.functions = cpus, {}, set(), [], set()

    def put(self, value):
        return value

    def cluster_resources(self) -> dict:
        return {"CPU": float(self.cpus)}

    def remote(self, **resources):
        def wrap(function):
            fake = self
            fake.functions.add(function.__name__)

            class Remote:
                def remote(self, task, *args):
                    ref = ("ref", len(fake.deps), task)
                    fake.deps[ref] = [a for a in args if isinstance(a, tuple) and a[:1] == ("ref",)]
                    fake.events.append(("submit", task))
                    return ref
            return Remote()
        return wrap

    def wait(self, pending, num_returns=1):
        ref = next(r for r in pending if all(d in self.done for d in self.deps[r]))
        self.done.add(ref)
        self.events.append(("done", ref[2]))
        return [ref], [r for r in pending if r != ref]

    def get(self, ref):
        if isinstance(ref[2], Fit | Sample):
            return 60.0, True
        if isinstance(ref[2], Cell):
            return {"balanced_accuracy": 0.5, "macro_auc": 0.5}, True, 10.0
        return None


def test_ray_submits_every_fit_first_and_cells_a_slot_at_a_time(tmp_path) -> None:
    methods = ["real", "sd-lora", "controlnet", "cvae"]
    cells = [Cell(m, f, s, 0) for f in (0, 1) for s in (0, 1) for m in methods]
    config = SimpleNamespace(run=SimpleNamespace(cell_cpus=1, cell_gpus=0, methods=methods))
    fake = _FakeRay(cpus=2)
    _submit_and_wait(fake, cells, config, None, tmp_path)
    assert len(fake.functions) == 1, "one remote function: Ray keeps submission order only within one"
    events = fake.events
    submitted = [task for what, task in events if what == "submit"]
    fits = [Fit(g, f, 0) for g in ("sd-lora", "controlnet", "cvae") for f in (0, 1)]
    # 3 generators x 2 folds, and the sampling of the two the ControlNets build on, before any cell
    assert set(submitted[:8]) == {*fits, Sample(Fit("sd-lora", 0, 0)), Sample(Fit("sd-lora", 1, 0))}
    assert [f.samples for f in submitted[:6]] == [False, False, True, True, True, True]
    assert {task for what, task in events if what == "done" and isinstance(task, Cell)} == set(cells)
    in_flight = 0
    for i, (what, task) in enumerate(events):
        if isinstance(task, Cell):
            in_flight += 1 if what == "submit" else -1
            assert in_flight <= 2, "more cells submitted than the cluster runs at once"
        if what == "submit" and isinstance(task, Cell) and task.method != "real":
            fit = Fit(task.method, task.fold, 0)
            assert ("done", Sample(fit) if task.method == "sd-lora" else fit) in events[:i], f"{task} before its set"
        if what == "submit" and isinstance(task, Sample):
            assert ("done", task.fit) not in events[:i]  # submitted at once, waiting on its fit
        if what == "submit" and isinstance(task, Score):
            assert {("done", task.cell), ("done", task.cell.reference_cell)} <= set(events[:i])
    assert sum(what == "submit" and isinstance(task, Score) for what, task in events) == 6  # one per generator fit
    # the ControlNet fits (after sd-lora's fits, not their sampling) come before the cells that were ready
    # from the start
    first_controlnet = events.index(("done", Fit("controlnet", 1, 0)))
    assert sum(what == "done" and isinstance(task, Cell) for what, task in events[:first_controlnet]) <= 2
    assert deps_of(fake, Fit("controlnet", 0, 0)) == [Fit("sd-lora", 0, 0)]


def deps_of(fake: _FakeRay, task) -> list:
    ref = next(r for r in fake.deps if r[2] == task)
    return [d[2] for d in fake.deps[ref]]


def test_task_slots_count_what_the_cluster_runs_at_once() -> None:
    assert task_slots({"CPU": 16.0}, 1, 0) == 16
    assert task_slots({"CPU": 16.0, "GPU": 4.0}, 4, 1) == 4
    assert task_slots({"CPU": 64.0, "GPU": 2.0}, 4, 1) == 2  # the GPUs bound it
    assert task_slots({"CPU": 2.0}, 4, 0) == 1  # a task larger than the cluster still runs, one at a time


def test_an_unreachable_ray_cluster_is_one_clear_line_before_any_work(tmp_path) -> None:
    pytest.importorskip("ray", reason="ray is in the test extras")
    for address, message in (("127.0.0.1:1", "cannot reach a Ray cluster there"),
                             ("no-port-here", "expected auto, host:port or ray://host:port")):
        done = subprocess.run([sys.executable, "-m", "busynth.cli", "run", "-c", "smoke", "--out", str(tmp_path / "r"),
                               "--executor", "ray", "--address", address], capture_output=True, text=True,
                              env=_env(), timeout=120, check=False)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"run.ray_address={address!r}: {message}" in done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "r" / "cells").exists()


def test_a_claim_is_exclusive_and_released_when_its_holder_dies(tmp_path) -> None:
    holder = _hold(tmp_path, "cells/real/fold0_seed0")
    try:
        with claim(tmp_path, "cells/real/fold0_seed0", wait=False) as held:
            assert held is False
        with claim(tmp_path, "cells/real/fold1_seed0", wait=False) as held:  # another unit is free
            assert held is True
        assert _holder(lock_path(tmp_path, "cells/real/fold0_seed0")) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    with claim(tmp_path, "cells/real/fold0_seed0", wait=False) as held:  # the kernel released it
        assert held is True


def test_each_claimed_passes_over_what_is_held_elsewhere_then_waits_for_it(tmp_path) -> None:
    holder = _hold(tmp_path, "scores/b")
    order, told, waited = [], [], []
    # a needs a unit another worker holds until c is done
    busy = lambda item: "fits/a" if item == "a" and "c" not in order else None
    try:
        for item in each_claimed(tmp_path, ["a", "b", "c", "d"], lambda item: f"scores/{item}", busy,
                                 lambda item, what: told.append((item, what)), waited.append):
            order.append(item)
            with claim(tmp_path, f"scores/{item}", wait=False) as held:  # the item's claim is held meanwhile
                assert held is False
            if item == "a":  # second sweep: a's input is ready now, b is still held elsewhere
                assert order == ["c", "d", "a"] and told == [("a", "fits/a"), ("b", "it")] and waited == []
                threading.Timer(0.5, holder.kill).start()  # the other worker ends while this one waits
    finally:
        holder.kill()
        holder.wait()
    assert order == ["c", "d", "a", "b"] and waited == ["b"]  # nothing else left: it waited for b
    assert len(told) == 2  # each passed over item is reported once


@pytest.mark.slow
def test_two_workers_on_one_run_folder_share_the_cells_and_match_one_process(tmp_path, reference) -> None:
    out = tmp_path / "run"
    workers = [_start(out, tmp_path / f"log{i}") for i in range(2)]
    logs = [_finish(w, tmp_path / f"log{i}") for i, w in enumerate(workers)]
    assert _metrics(out) == reference
    computed = [_computed(text) for text in logs]
    assert all(computed), f"a worker computed nothing: {computed}"
    assert not set(computed[0]) & set(computed[1]), "a cell was computed by both workers"
    assert len(computed[0]) + len(computed[1]) == len(reference)
    assert json.loads((out / "results" / "summary.json").read_text())["methods"]


@pytest.mark.slow
def test_a_killed_workers_cell_is_taken_over_by_the_other(tmp_path, reference) -> None:
    out = tmp_path / "run"
    cell = out / "cells" / "classical" / "fold0_seed0"
    first = _start(out, tmp_path / "log0")
    _wait_for(lambda: list((cell / "classifier").glob("checkpoint-*/state.json")), "a checkpoint of the cell")
    os.kill(first.pid, signal.SIGSTOP)  # holding the claim, mid-cell
    assert not (cell / "metrics.json").exists(), "stopped too late: the cell had finished"
    second = _start(out, tmp_path / "log1")
    _wait_for(lambda: "another worker has it" in (tmp_path / "log1").read_text(), "the second worker to skip it")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    text = _finish(second, tmp_path / "log1")
    assert "taken over from a worker that stopped" in text
    assert _metrics(out) == reference


@pytest.mark.slow
def test_a_worker_passes_over_a_cell_whose_generator_another_worker_is_fitting(tmp_path, reference) -> None:
    out, log, unit = tmp_path / "run", tmp_path / "log", "generators/cvae/fold0_seed0"
    holder = _hold(out, unit)
    try:
        worker = _start(out, log)
        _wait_for(lambda: "waiting for the worker that has it" in log.read_text(), "the worker to come back to it")
        assert f"another worker has {unit}, which it needs: back to it later" in log.read_text()
        # every other cell was computed meanwhile; this one waits, not having started
        assert all((out / cell).exists() for cell in reference if "cvae/fold0" not in cell)
        assert not (out / "cells" / "cvae" / "fold0_seed0").exists()
    finally:
        holder.kill()
        holder.wait()
    _finish(worker, log)  # the fit's claim is free again: this worker fits the generator itself
    assert _metrics(out) == reference


@pytest.mark.slow
def test_ray_runs_the_study_with_two_workers_and_retries_a_killed_one(tmp_path, reference) -> None:
    pytest.importorskip("ray", reason="ray is in the test extras")
    out = tmp_path / "run"
    proc = _start(out, tmp_path / "log", "--executor", "ray", "--workers", "2")
    cell = out / "cells" / "classical" / "fold1_seed0"
    _wait_for(lambda: list((cell / "classifier").glob("checkpoint-*/state.json")), "a checkpoint of the cell")
    pid = _holder(lock_path(out, "cells/classical/fold1_seed0"))
    killed = pid is not None and not (cell / "metrics.json").exists()
    if killed:
        os.kill(pid, signal.SIGKILL)  # a Ray worker, mid-cell: Ray runs the task again
    text = _finish(proc, tmp_path / "log")
    assert killed, "the cell finished before its worker could be killed"
    assert pid != proc.pid, "the cell ran in the driver, not in a Ray worker"
    assert "ray: 8 cells" in text and "2 at once" in text
    assert re.search(r"fit done: cvae fold[01]_seed0 in ", text)  # the fits' times feed the ETA
    assert re.search(r"cell 7/8 done: .*, ETA \d", text)
    assert _metrics(out) == reference


@pytest.mark.slow
def test_ray_samples_a_base_apart_from_its_fit_and_matches_one_process(tmp_path) -> None:
    pytest.importorskip("ray", reason="ray is in the test extras")
    args = ["--methods", "real,sd-lora,controlnet", "--seeds", "1"]
    ray_log, local_log = tmp_path / "ray.log", tmp_path / "local.log"
    text = _finish(_start(tmp_path / "ray", ray_log, *args, "--executor", "ray", "--workers", "2"), ray_log)
    _finish(_start(tmp_path / "local", local_log, *args), local_log)
    # sd-lora's fit is a task, its sampling another (the ControlNet needs only the fit); the others sample in theirs
    for fold in (0, 1):
        assert (f"fit done: sd-lora fold{fold}_seed0 in " in text
                and f"sampling done: sd-lora fold{fold}_seed0 in " in text)
        assert f"fit done: controlnet fold{fold}_seed0 in " in text
    assert "sampling done: controlnet" not in text
    assert _metrics(tmp_path / "ray") == _metrics(tmp_path / "local")
    for run in ("ray", "local"):  # the synthetic sets themselves are the same images
        assert (tmp_path / run / "synthetic" / "sd-lora" / "fold0_seed0" / "done.json").is_file()
    ray_set = sorted((tmp_path / "ray" / "synthetic" / "controlnet" / "fold1_seed0").rglob("*.png"))
    local_set = sorted((tmp_path / "local" / "synthetic" / "controlnet" / "fold1_seed0").rglob("*.png"))
    assert ray_set and [p.read_bytes() for p in ray_set] == [p.read_bytes() for p in local_set]


def test_ray_starts_before_the_study_code_is_imported_and_stops_in_the_background(tmp_path) -> None:
    pytest.importorskip("ray", reason="ray is in the test extras")
    script = (
        "import sys\n"
        "import ray\n"
        "from busynth import cluster\n"
        "from busynth.presets import load_config\n"
        "inits, real_init = [], ray.init\n"
        "ray.init = lambda *a, **k: inits.append(k) or real_init(*a, **k)\n"
        "config = load_config('smoke', ['run.executor=ray', 'run.workers=1', 'run.methods=[real,cvae]'])\n"
        "cluster.start_ray(config)\n"
        "cluster.start_ray(config)  # the study's own session inside the CLI's: the same instance\n"
        "print('driver', 'torch' in sys.modules, len(inits), inits[0]['num_cpus'])\n"
        "probe = ray.remote(num_cpus=1)(lambda: [m in sys.modules for m in ('busynth.executors', "
        "'busynth.generators.cvae', 'diffusers')])\n"
        "print('worker', ray.get(probe.remote()))  # queued behind the warm-up on the one slot\n"
        "cluster.stop_ray()\n"
        "stopping = cluster._state['stopping']\n"
        "cluster.start_ray(config)  # waits for the shutdown, then a fresh instance\n"
        "print('restart', stopping.is_alive(), ray.is_initialized(), len(inits))\n"
        "cluster.stop_ray()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "driver False 1 1" in lines  # Ray is up and warming its worker while the driver has no torch yet
    assert "worker [True, True, False]" in lines  # the executors and the run's generators, nothing else
    assert "restart False True 2" in lines
