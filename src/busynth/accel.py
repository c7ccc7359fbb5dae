"""One way to make an accelerate ``Accelerator`` for every training loop of the package."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from busynth.errors import ConfigError


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, cpu: bool = False,
                     field: str = "mixed_precision") -> Accelerator:
    """An Accelerator for one fit.

    In a single process accelerate's shared state is reset first, so that fits with
    different precision settings (a bf16 generator, then an fp32 classifier) can follow
    each other. fp16 on a CPU is refused naming ``field``; on CUDA cuDNN is switched to
    deterministic kernels (a process-wide setting; CPU kernels are deterministic already).
    """
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)
    if accelerator.device.type == "cpu" and mixed_precision == "fp16":
        raise ConfigError(f"{field}=fp16 needs a GPU; use 'bf16' or 'no' on a CPU")
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return accelerator
