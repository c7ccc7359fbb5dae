"""accelerate for every training loop of the package, and the rules of a multi-process run.

Under ``accelerate launch --num_processes N`` every process runs the same deterministic
program. Training loops split each global batch between the processes (DDP averages the
gradients), so N processes take the same optimisation steps as one. Everything else is
computed by every process alike, and only the main process *commits* files: ``busynth.io``
routes every atomic write through :func:`commit_on_main`, which lets the main process
rename its file into place while the others discard theirs, between two barriers. So a
file check made between two writes gives the same answer in every process, and a file
written by the main process is there for all of them after the write returns. Sampling and
scoring are the exception: :func:`shard_map` gives each process its share of the images and
gathers the results into every process.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from busynth.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from accelerate.state import PartialState

# torch and accelerate are imported inside the functions that use them: busynth.io (and so every
# command, `--help` included) imports this module, and a single-process run never needs them here.

log = logging.getLogger(__name__)

T = TypeVar("T")

# World-size variables a multi-process launcher sets (accelerate launch / torchrun, mpirun).
_WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def launched_distributed() -> bool:
    """Whether this process was started by a multi-process launcher (checked without starting anything)."""
    return any(int(os.environ.get(k) or 1) > 1 for k in _WORLD_SIZE_ENV)


def process_state() -> PartialState | None:
    """accelerate's process state in a multi-process run, else None (nothing initialised)."""
    if not launched_distributed():
        return None
    # `accelerate launch --multi_gpu` (torchrun) on a machine without GPUs: CPU processes over gloo.
    import torch
    from accelerate.state import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def rank_and_world() -> tuple[int, int]:
    """(process index, number of processes); (0, 1) outside a multi-process run."""
    state = process_state()
    return (0, 1) if state is None else (state.process_index, state.num_processes)


def is_main_process() -> bool:
    """True in a single-process run and in the main process of a multi-process one."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every process (nothing to do in a single process)."""
    state = process_state()
    if state is not None:
        state.wait_for_everyone()


_file_group: list = []


def _own_group():
    """A process group of busynth's own (gloo), created on first use (by every process alike), so that
    the file protocol and the gathering of shares never share a sequence of collectives with training
    (DDP's gradient reductions run on the default group)."""
    import torch

    if not _file_group:
        _file_group.append(torch.distributed.new_group(backend="gloo"))
    return _file_group[0]


def _file_barrier() -> None:
    """A barrier on :func:`_own_group`."""
    import torch

    torch.distributed.barrier(group=_own_group())


def shard_map(fn: Callable[[int], T], n: int) -> list[T]:
    """``[fn(0), ..., fn(n - 1)]`` in every process, each process computing its share (round-robin:
    ``i`` where ``i mod world == rank``) and the shares gathered in order. Outside a multi-process
    run, simply all of them here. So N processes sample or score N times faster, and every process
    still ends up with the same result (the rule of this module)."""
    state = process_state()
    if state is None:
        return [fn(i) for i in range(n)]
    import torch

    mine = {i: fn(i) for i in range(state.process_index, n, state.num_processes)}
    shares: list[dict[int, T] | None] = [None] * state.num_processes
    torch.distributed.all_gather_object(shares, mine, group=_own_group())
    merged = {i: value for share in shares for i, value in (share or {}).items()}
    return [merged[i] for i in range(n)]


def commit_on_main(commit: Callable[[], T], discard: Callable[[], None] | None = None) -> T | None:
    """Run ``commit`` in the main process only (``discard`` in the others), between two barriers.

    The first barrier keeps every process from seeing the result before all of them reached
    this write; the second makes it visible to all of them when this returns.
    """
    state = process_state()
    if state is None:
        return commit()
    _file_barrier()
    try:
        if state.is_main_process:
            return commit()
        if discard is not None:
            discard()
        return None
    finally:
        _file_barrier()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every process the main process's buffers (batch-norm running statistics).

    DDP averages gradients, so parameters agree across processes, but each process updates
    its running statistics on its own rows; evaluation (and every decision taken from it,
    such as model selection) must see the same numbers everywhere.
    """
    if process_state() is None:
        return
    import torch

    with torch.no_grad():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def local_rows(n: int) -> slice:
    """The rows of a global batch of ``n`` that this process computes (contiguous, near-equal shares)."""
    rank, world = rank_and_world()
    if world > n:
        raise ConfigError(f"a batch of {n} cannot be shared by {world} processes: use a batch size of at least {world}")
    bounds = [round(i * n / world) for i in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


# CPU features (torch.cpu.get_capabilities() keys, /proc/cpuinfo flags) of native bf16 arithmetic:
# x86 AVX512-BF16 or AMX-BF16, Arm BF16 / SVE-BF16. Without one, bf16 is emulated (slower than fp32).
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
CPUINFO = Path("/proc/cpuinfo")
_bf16_fallback_said: set[str] = set()


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (NATIVE_BF16_FEATURES): from
    ``torch.cpu.get_capabilities()`` where torch has it, else the flags in CPUINFO (Linux);
    False when neither tells. Cached: call ``cpu_supports_bf16.cache_clear()`` to look again."""
    import torch

    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return any(bool(capabilities.get(name)) for name in NATIVE_BF16_FEATURES)
    try:
        words = set(CPUINFO.read_text().split())
    except OSError:
        return False
    return any(name in words for name in NATIVE_BF16_FEATURES)


def reset_accelerate_state(keep_process_group: bool) -> None:
    """Forget accelerate's process-wide state, so the next ``Accelerator(...)`` may take other settings
    (``keep_process_group``: keep the process group of a multi-process run).

    accelerate keeps one shared state per process and refuses a second Accelerator with another
    ``mixed_precision``; it has no public way to reset it (accelerate 1.16). ``_reset_state`` is what its
    own test utilities and transformers' TrainingArguments call for this, so it is called here and only
    here; ``is_initialized`` is public."""
    from accelerate.state import AcceleratorState, is_initialized

    if is_initialized():
        AcceleratorState._reset_state(reset_partial_state=not keep_process_group)


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, cpu: bool = False,
                     field: str = "mixed_precision") -> Accelerator:
    """An Accelerator for one fit.

    accelerate's shared state is reset first (keeping the process group of a multi-process
    run), so that fits with different precision settings (a bf16 generator, then an fp32
    classifier) can follow each other. fp16 on a CPU is refused naming ``field``; bf16 on a CPU
    without native bf16 (:func:`cpu_supports_bf16`) trains in fp32 instead, said once per ``field``;
    on CUDA cuDNN is switched to deterministic kernels (a process-wide setting; CPU kernels are
    deterministic already).
    """
    import torch
    from accelerate import Accelerator

    distributed = process_state() is not None  # first, so a CPU-only multi-process launch gets gloo
    reset_accelerate_state(keep_process_group=distributed)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)
    if accelerator.device.type == "cpu" and mixed_precision == "fp16":
        raise ConfigError(f"{field}=fp16 needs a GPU; use 'bf16' or 'no' on a CPU")
    if accelerator.device.type == "cpu" and mixed_precision == "bf16" and not cpu_supports_bf16():
        if field not in _bf16_fallback_said:
            _bf16_fallback_said.add(field)
            log.warning("%s=bf16: this CPU has no native bf16 (AVX512-BF16, AMX-BF16 or Arm BF16), where "
                        "bf16 is slower than fp32 and changes the numbers; training in fp32", field)
        reset_accelerate_state(keep_process_group=distributed)
        accelerator = Accelerator(mixed_precision="no", gradient_accumulation_steps=grad_accum, cpu=cpu)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return accelerator
