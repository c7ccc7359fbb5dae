"""Exceptions whose messages are meant for the user: the CLI prints them without a traceback."""


class BusynthError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing file)."""


class DataError(BusynthError):
    """A data set file or folder cannot be used; the message names the file."""


class ConfigError(BusynthError):
    """A config value or CLI option is invalid; the message names the field."""


class RunStateError(BusynthError):
    """A run folder is inconsistent with the command (e.g. config changed since it started)."""
