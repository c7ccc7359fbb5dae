"""Claims on the units of work of a run folder, so that several workers on one folder (two
``busynth run`` on one machine, the tasks of ``--executor ray`` on a cluster sharing the folder)
never compute the same cell, generator fit or synthetic set twice, and never read one half made.

A claim is an operating-system file lock (``filelock``: ``fcntl.flock`` on POSIX) on
``locks/<unit>.lock`` in the run folder. The kernel releases it when its process ends, however it
ends, so the unit of a killed worker can be claimed again at once and resumes from its
checkpoints. The run folder must therefore be on a filesystem whose ``flock`` works between the
machines that share it: a local disk, NFSv4, Lustre mounted with ``-o flock``, GPFS, CephFS.
Where it does not, the claim fails with a clear error instead of falling back to lock files that
a dead worker would leave behind.

Under ``accelerate launch`` the processes of the run are one worker: the main process takes the
claim, the others wait for it at a barrier.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from busynth.accel import barrier, process_state
from busynth.errors import RunStateError

LOCKS = "locks"  # folder of the run folder holding the lock files
T = TypeVar("T")


def lock_path(run_dir: Path, unit: str) -> Path:
    """The lock file of ``unit`` (a relative path such as ``cells/real/fold0_seed0``)."""
    return Path(run_dir) / LOCKS / f"{unit}.lock"


@contextmanager
def claim(run_dir: Path, unit: str, wait: bool = True) -> Iterator[bool]:
    """Hold the claim on ``unit`` for the ``with`` block; yields True when held. With ``wait=False``
    it yields False at once when another worker holds it (the block must then leave the unit alone)."""
    from filelock import FileLock, Timeout

    state = process_state()
    if state is not None and not state.is_main_process:
        barrier()  # the main process claims for the whole group
        yield True
        return
    path = lock_path(run_dir, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    # preserve_lock_file: deleting a flock-ed file on release lets two workers hold "the same" lock
    # (one on the deleted inode, one on a new file). fallback_to_soft: see the module docstring.
    lock = FileLock(path, fallback_to_soft=False, preserve_lock_file=True, thread_local=False)
    waits = wait or state is not None  # a process group never skips: its processes must agree
    try:
        lock.acquire(timeout=-1 if waits else 0)
    except Timeout:
        yield False
        return
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise RunStateError(f"{path}: this filesystem has no working file locks (flock: {exc.strerror}); "
                                "put the run folder on one that has them (local disk, NFSv4, Lustre with "
                                "-o flock)") from None
        raise
    try:
        if state is not None:
            barrier()
        yield True
    finally:
        lock.release()


def each_claimed(run_dir: Path, items: Sequence[T], unit: Callable[[T], str],
                 busy: Callable[[T], str | None] | None = None,
                 passed_over: Callable[[T, str], None] | None = None,
                 waiting: Callable[[T], None] | None = None) -> Iterator[T]:
    """Yield each item once, while its claim (``unit(item)``) is held, so that workers sharing a run
    folder share the items. Sweeps the items left, in order: an item whose claim another worker
    holds -- or for which ``busy(item)`` names a unit it needs that another worker holds -- is passed
    over (``passed_over(item, what)``, the first time) and tried again in the next sweep; a sweep
    that yields nothing waits for the first item left (``waiting(item)``), so a worker never spins,
    and takes over the item of a worker that died. The caller checks whether an item still needs
    its work: another worker may have done it."""
    pending, told = list(range(len(items))), set()
    while pending:
        left = []
        for k in pending:
            what = busy(items[k]) if busy else None
            if what is None:
                with claim(run_dir, unit(items[k]), wait=False) as held:
                    if held:
                        yield items[k]
                        continue
                what = "it"
            if passed_over and k not in told:
                passed_over(items[k], what)
            told.add(k)
            left.append(k)
        if len(left) == len(pending):  # nothing was free: wait for the first
            k = left.pop(0)
            if waiting:
                waiting(items[k])
            with claim(run_dir, unit(items[k])):
                yield items[k]
        pending = left
