"""Checkpoints shared by every training loop: safetensors only, written atomically.

A step checkpoint is a folder ``checkpoint-<step>/`` holding ``weights.safetensors`` (the
tensors that train), ``optimizer.safetensors`` (optimizer state under flat keys
``<param index>.<name>``, its param groups in the metadata) and ``state.json``. It is
written into a temporary folder and renamed, so a folder with that name is complete; the
newest ``keep`` are kept. Nothing is ever pickled, so loading runs no code: every weight
file is read with :func:`read_safetensors`, which refuses anything that is not a safetensors
file (a pickle under a ``.safetensors`` name included) with a RunStateError naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from busynth.errors import BusynthError, RunStateError
from busynth.io import remove_tree, write_dir_atomic, write_json

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """An optimizer's state as flat tensors ``<prefix><param index>.<name>`` and its param groups as JSON."""
    state = optimizer.state_dict()
    tensors = {
        f"{prefix}{idx}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        for idx, per_param in state["state"].items() for name, v in per_param.items()
    }
    return tensors, json.dumps(state["param_groups"])


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           param_groups_json: str, prefix: str = "") -> None:
    """Restore an optimizer from ``optimizer_tensors`` output (keys without ``prefix`` are ignored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    groups = json.loads(param_groups_json)
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete ``checkpoint-N`` in ``out_dir``, oldest first."""
    found = []
    for p in Path(out_dir).glob("checkpoint-*"):
        suffix = p.name.removeprefix("checkpoint-")
        if p.is_dir() and suffix.isdigit() and (p / STATE).is_file():
            found.append((int(suffix), p))
    return sorted(found)


def save_checkpoint(out_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int, extra_files: Mapping[str, Mapping[str, torch.Tensor]] = {}
                    ) -> Path:
    """Write ``checkpoint-<step>/`` atomically (temporary folder, then rename), prune to the newest
    ``keep``; returns the folder. ``extra_files`` maps further safetensors file names to tensors."""
    def write(tmp: Path) -> None:
        for name, tensors in {WEIGHTS: weights, **extra_files}.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER), metadata={"param_groups": groups})
        write_json(tmp / STATE, {**state, "step": step})

    final = write_dir_atomic(Path(out_dir) / f"checkpoint-{step}", write)
    prune_checkpoints(out_dir, keep)
    return final


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete every ``checkpoint-*`` folder but the newest ``keep`` complete ones: older ones and
    any a killed process left half-deleted (also called on resume, so such leftovers never stay)."""
    kept = {p for _, p in list_checkpoints(out_dir)[-keep:]}
    for p in sorted(Path(out_dir).glob("checkpoint-*")):
        if p.is_dir() and p not in kept:
            remove_tree(p)


def read_safetensors(path: Path, load_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (none when ``load_tensors`` is False) and the metadata of a safetensors file.

    safetensors parses a JSON header and raw bytes and never runs code, so a pickle or any other
    file under this name is refused: a missing or unreadable file raises RunStateError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise RunStateError(f"{path}: weight file is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys() if load_tensors else []
            tensors = {k: f.get_tensor(k) for k in names}
            return tensors, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunStateError(
            f"{path}: not a readable safetensors file ({exc}); busynth loads weights only from safetensors "
            "and never unpickles a file. Delete the folder (or use a new one) to start over."
        ) from None


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """The weights of a step checkpoint; restores ``optimizer`` from it when one is given.

    Raises RunStateError naming the file when either file is missing or not safetensors."""
    folder = Path(folder)
    weights, _ = read_safetensors(folder / WEIGHTS)
    if optimizer is not None:
        tensors, metadata = read_safetensors(folder / OPTIMIZER)
        if "param_groups" not in metadata:
            raise RunStateError(f"{folder / OPTIMIZER}: no param_groups in its metadata (not a busynth checkpoint)")
        load_optimizer_tensors(optimizer, tensors, metadata["param_groups"])
    return weights


def from_pretrained(cls: Any, source: str | Path, *, what: str, error: type[BusynthError] = RunStateError,
                    weights: bool = True, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, **kwargs)``, with ``use_safetensors=True`` when ``cls`` has
    weights (a pickled ``*.bin`` is never read); a folder or hub id that cannot be loaded raises
    ``error`` naming ``what`` and ``source``. Returns the loaded object."""
    if weights:
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as exc:
        sub = f" ({kwargs['subfolder']}/)" if kwargs.get("subfolder") else ""
        detail = " ".join(str(exc).split())[:400].rstrip(".")
        raise error(f"{what} {source}{sub}: cannot load {getattr(cls, '__name__', cls)}: {detail}. busynth reads "
                    "model weights only from safetensors files.") from None
