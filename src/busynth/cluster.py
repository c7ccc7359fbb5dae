"""Starting (or joining) the Ray cluster of a ``run.executor: ray`` study.

Kept apart from :mod:`busynth.executors`, which imports torch and the cells, so that ``busynth run``
can start Ray first: Ray's processes boot and its workers import the study code while the driver
imports it too and prepares the data (on two cores, 1-2 s of a smoke study's 20-28 s; issue #17).
The Ray instance this process started is shut down in a background thread once the tasks are done,
while the driver writes the summary and the report.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from busynth.accel import process_state
from busynth.errors import ConfigError
from busynth.registry import REFERENCE, generator_method

if TYPE_CHECKING:
    from busynth.config import StudyConfig

# This process's hold on Ray: whether it started the instance (and so shuts it down), whether the
# workers were sent their warm-up, and a shutdown still under way (a new start waits for it).
_state: dict = {"owned": False, "warmed": False, "stopping": None}


def start_ray(config: StudyConfig) -> None:
    """Connect to ``run.ray_address`` (or start a local Ray instance with ``run.workers`` x
    ``run.cell_cpus`` CPUs) and send one warm-up task per task slot, which imports what the study's
    tasks need. A Ray already initialised in this process is used as it is and left running; a
    second call before :func:`stop_ray` does nothing."""
    # Ray collapses worker log lines that differ only in their numbers into "[repeated Nx across
    # cluster]", which would keep one worker's progress lines (step, loss, ETA) and hide the others'.
    # Read when Ray is imported, so set before (a Ray imported earlier keeps its setting).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # plain worker-log prefixes in log files
    try:
        import ray
    except ImportError:
        raise ConfigError("run.executor=ray needs Ray: pip install 'busynth[ray]'") from None
    if process_state() is not None:
        raise ConfigError("run.executor=ray runs every cell in a Ray worker of its own: start it with "
                          "`busynth run`, not under accelerate launch")
    _wait_for_shutdown()
    run = config.run
    if not ray.is_initialized():
        if run.ray_address is None:
            cpus = (run.workers or max(1, (os.cpu_count() or 1) // run.cell_cpus)) * run.cell_cpus
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
        else:
            check_reachable(run.ray_address)
            try:
                ray.init(address=run.ray_address, log_to_driver=True)
            except (ConnectionError, RuntimeError) as exc:
                raise ConfigError(f"run.ray_address={run.ray_address!r}: no Ray cluster there "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        _state["owned"] = True
    if not _state["warmed"]:
        warm = ray.remote(num_cpus=run.cell_cpus)(warm_up)
        modules = warm_up_modules(run.methods)
        for _ in range(task_slots(ray.cluster_resources(), run.cell_cpus, 0.0)):
            warm.remote(modules)  # one per task slot: each lands on its own worker while all slots are free
        _state["warmed"] = True


def stop_ray() -> None:
    """Shut down the Ray instance :func:`start_ray` started (in a background thread, about a second
    of Ray's; the interpreter waits for it at exit, and so does the next :func:`start_ray`)."""
    _state["warmed"] = False
    if _state["owned"]:
        import ray

        _state["owned"] = False
        _state["stopping"] = threading.Thread(target=ray.shutdown, name="ray-shutdown")
        _state["stopping"].start()


def _wait_for_shutdown() -> None:
    if _state["stopping"] is not None:
        _state["stopping"].join()
        _state["stopping"] = None


@contextmanager
def ray_session(config: StudyConfig) -> Iterator[None]:
    """:func:`start_ray` (a no-op when the CLI has started Ray already) for the ``with`` block, then
    :func:`stop_ray`."""
    start_ray(config)
    try:
        yield
    finally:
        stop_ray()


def warm_up_modules(methods: Sequence[str]) -> list[str]:
    """The modules a study of ``methods`` runs its tasks with: the executors (and with them the
    cells) and each generator's module (diffusers and peft take seconds, on the path of every fit)."""
    generators = [generator_method(m).generator.partition(":")[0] for m in methods if m != REFERENCE]
    return list(dict.fromkeys(["busynth.executors", *generators]))


def warm_up(modules: Sequence[str]) -> None:
    """A task that sets up its worker as a task would and imports ``modules`` (by name: this module
    must not import the executors, which import torch and the cells)."""
    worker_setup(1)
    for module in modules:
        importlib.import_module(module)


def worker_setup(cpus: float) -> None:
    """In a Ray worker process: torch threads for the task's CPUs, and the CLI's plain log lines."""
    import torch

    from busynth.logs import setup_logging

    torch.set_num_threads(max(1, int(cpus)))
    if not logging.getLogger().handlers:
        setup_logging(False)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """For ``host:port`` and ``ray://host:port``: a TCP connection within ``timeout`` seconds, else a
    ConfigError naming the address (Ray itself keeps retrying an unreachable cluster for minutes).
    ``auto`` and other forms are left to Ray."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"run.ray_address={address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"run.ray_address={address!r}: cannot reach a Ray cluster there "
                          f"({exc.strerror or exc})") from None


def task_slots(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """How many tasks asking for ``cpus`` CPUs and ``gpus`` GPUs a cluster with ``resources`` runs at once."""
    slots = resources.get("CPU", 1.0) // cpus if cpus > 0 else float("inf")
    if gpus > 0:
        slots = min(slots, resources.get("GPU", 0.0) // gpus)
    return max(1, int(slots)) if slots != float("inf") else 1
