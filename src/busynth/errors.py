"""Exceptions whose messages are meant for the user: the CLI prints them without a traceback."""

from os import PathLike
from pathlib import Path


class BusynthError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing file)."""


class DataError(BusynthError):
    """A data set file or folder cannot be used; the message names the file."""


class ConfigError(BusynthError):
    """A config value or CLI option is invalid; the message names the field."""


class LeakError(BusynthError):
    """A split would let test images, or their duplicates, into training, validation or a generator
    fit; the message names the groups and files (``split.on_leak`` says what to do instead)."""


class RunStateError(BusynthError):
    """A run folder is inconsistent with the command (e.g. config changed since it started)."""


class OutputWriteError(BusynthError):
    """A file or folder could not be written (disk full, read-only, quota, file size limit).

    ``path`` is the file the command meant to write (never a temporary name); writes are
    atomic, so what was written before is unchanged.
    """

    def __init__(self, path: str | PathLike[str], errno: int, strerror: str) -> None:
        self.path, self.errno, self.strerror = Path(path), errno, strerror
        super().__init__(f"cannot write {path}: {strerror} (errno {errno}); files already written are unchanged")
