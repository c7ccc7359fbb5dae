"""Atomic file writes: write to a temporary name in the same folder, then rename.

A killed process leaves either the old file or the new one, never half of one. In a
multi-process run (``accelerate launch``) only the main process renames its file into
place; the others discard theirs (see ``busynth.accel.commit_on_main``).

A write that fails (disk full, read-only folder, quota, file size limit) raises
:class:`busynth.errors.OutputWriteError` naming the file meant to be written, never the
temporary one; the CLI prints it as one line.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from busynth.accel import commit_on_main
from busynth.errors import DataError, OutputWriteError

# errnos that mean "cannot write there": disk full, quota, read-only, file too large, permissions, I/O
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                          errno.EIO})
_NATIVE_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how a Rust writer (safetensors) reports one


def write_error(path: str | Path, exc: BaseException) -> OutputWriteError | None:
    """The OutputWriteError naming ``path`` for an exception raised while writing it: an OSError
    with one of WRITE_ERRNOS, or a native writer's error whose message carries ``(os error N)``
    (safetensors raises SafetensorError, not OSError). None for any other exception."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (found := _NATIVE_OS_ERROR.search(str(exc))):
        code = int(found.group(1))
    if code not in WRITE_ERRNOS:
        return None
    return OutputWriteError(path, code, os.strerror(code))


@contextmanager
def _naming_failed_writes(final: Path, tmp_dir: Path | None = None) -> Iterator[None]:
    """Re-raise a failed write inside the block as OutputWriteError naming ``final`` (or, for a
    failure that names a file inside the temporary folder ``tmp_dir``, that file under ``final``)."""
    try:
        yield
    except OutputWriteError as exc:  # a nested atomic write
        inner = _relative_to(exc.path, tmp_dir)
        if inner is None:
            raise
        raise OutputWriteError(final / inner, exc.errno, exc.strerror) from exc
    except Exception as exc:
        inner = _relative_to(getattr(exc, "filename", None), tmp_dir)
        error = write_error(final / inner if inner is not None else final, exc)
        if error is None:
            raise
        raise error from exc


def _relative_to(path: Any, folder: Path | None) -> Path | None:
    """``path`` relative to ``folder`` when it lies inside it, else None."""
    if folder is None or not isinstance(path, str | bytes | os.PathLike):
        return None
    try:
        return Path(os.fsdecode(path)).relative_to(folder)
    except ValueError:
        return None


def _new_temporary(parent: Path, name: str, make: Callable[[Path], Any]) -> Path:
    """``make(path)`` on an unused hidden path ``.<name>.<random>.tmp`` in ``parent``; returns the path.

    Unlike ``tempfile.mkstemp``/``mkdtemp`` (mode 0600/0700, which would hide results from the
    rest of a group sharing a run folder), ``make`` creates with the usual 0666/0777, so the kernel
    applies the process's umask itself: no umask is read or changed, which would race with threads."""
    for _ in range(100):
        candidate = parent / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no unused temporary name for {parent / name}")


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A failed write raises OutputWriteError naming ``path`` and leaves an older ``path`` as it was."""
    path = Path(path)
    with _naming_failed_writes(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_temporary(path.parent, path.name, _create_file)
    try:
        with _naming_failed_writes(path):
            yield tmp_path
            commit_on_main(lambda: os.replace(tmp_path, path))
    finally:
        if tmp_path.exists():
            _discard(tmp_path.unlink)


def write_atomic(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_dir_atomic(final: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_dir)`` on a temporary folder next to ``final``, then rename it onto
    ``final`` (replacing an older one); a killed process never leaves a half-written ``final``.

    An older ``final`` is first renamed away in one step and deleted afterwards, so a kill leaves
    the old folder, the new one or none, never a half-deleted one. A failed write raises
    OutputWriteError naming the file under ``final``."""
    final = Path(final)
    with _naming_failed_writes(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary(final.parent, final.name, lambda p: p.mkdir(0o777))

    def commit() -> None:
        old = Path(f"{tmp}.old") if final.exists() else None
        if old is not None:
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old)

    try:
        with _naming_failed_writes(final, tmp):
            writer(tmp)
            commit_on_main(commit)
    finally:
        if tmp.exists():
            _discard(lambda: shutil.rmtree(tmp))
    return final


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """``shutil.copytree``'s copy function that hard-links a file (no second copy of a generator's
    weights) and copies it where a link cannot be made (another filesystem). Safe because busynth
    never rewrites a file in place: every write is a new file renamed over the old name."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _discard(remove: Callable[[], Any]) -> None:
    """Remove a temporary file or folder, ignoring failures (a read-only or full disk must not
    hide the error that stopped the write)."""
    try:
        remove()
    except OSError:
        pass


def remove_tree(path: str | Path) -> None:
    """Delete a folder if it exists (the main process does it in a multi-process run; everyone
    waits). Call it unconditionally: whether a folder exists is no test of its completeness, and
    in a multi-process run another process may have created it a moment ago."""
    commit_on_main(lambda: shutil.rmtree(path, ignore_errors=not Path(path).exists()))


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write JSON (indented, keys in insertion order)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def write_rows_csv(path: str | Path, rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> Path:
    """Atomically write dict rows as CSV (columns: ``fieldnames`` or the first row's keys)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def read_history_csv(path: str | Path, before_step: int) -> list[dict[str, Any]]:
    """Rows of a per-step history CSV whose ``step`` is below ``before_step`` ([] when absent), with
    numbers read back as the int or float that was written (an empty cell as None), so a resumed
    run's history equals an uninterrupted one's."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = [{k: _csv_value(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    return [row for row in rows if row["step"] < before_step]


def _csv_value(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` alone -- e.g. (step or epoch, stream) in a
    training loop, (class stream, image index) when sampling -- independent of any running RNG, so
    the randomness of any step or image is reproducible and a resumed run continues exactly."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Atomically write a uint8 (H, W) grayscale or boolean mask array as PNG."""
    if array.dtype == bool:
        image = Image.fromarray(array.astype(np.uint8) * 255, mode="L")
    else:
        image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    return write_atomic(path, lambda p: image.save(p, format="PNG"))


def read_png(path: str | Path) -> np.ndarray:
    """An image this package wrote (``write_png``: a synthetic image or mask) as uint8 grey (H, W);
    DataError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc})") from None


def read_png_mask(path: str | Path) -> np.ndarray:
    """A mask written by ``write_png`` as bool (lesion where the grey value is above 127)."""
    return read_png(path) > 127


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fit_key(obj: Any) -> str:
    """The one key of a fit or artifact: a short hash (16 hex digits) of a JSON-serialisable object,
    keys sorted -- what it was made from (its config section, its training data as ids or a digest,
    its seed). The run folder's fingerprint, the checkpoints of every training stage and the latent
    caches are keyed by it; where two keys differ, ``changed_keys`` on the readable objects says why."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two config dicts; with ``defaults``
    a key missing from ``old`` whose new value is its default does not count."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        default = (defaults or {}).get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, default if isinstance(default, dict) else None, f"{prefix}{key}."))
        elif key not in old and defaults is not None and key in defaults and b == default:
            continue
        elif key not in new and defaults is not None and key not in defaults and not isinstance(a, dict):
            continue  # a setting busynth no longer has (e.g. classifier.num_workers)
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


# A hub id as huggingface_hub accepts one: 'name' or 'org/name'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_source(value: str, marker: str) -> str:
    """Validate a hub id or a local model folder: a path that exists must be a folder holding
    ``marker`` (``model_index.json`` for a pipeline, ``config.json`` for one model); a path that
    does not exist is refused unless it reads as a hub id (``org/name``). Returns ``value``."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{value!r} is a file, not a model folder")
        if not (path / marker).is_file():
            raise ValueError(f"{value!r} is not a model folder (no {marker})")
        return value
    if _HUB_ID.match(value) and ".." not in value:
        return value  # a hub id: resolved (or refused) when it is loaded
    raise ValueError(f"{value!r}: no such folder (a hub id looks like 'org/name')")


def resolve_model_source(value: str, marker: str = "config.json") -> str:
    """:func:`check_model_source`, a folder returned as an absolute path (the same for every process of
    a run, whatever its working directory), a hub id as it is."""
    path = Path(check_model_source(value, marker)).expanduser()
    return str(path.resolve()) if path.exists() else value
