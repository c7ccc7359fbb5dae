"""Logging of the command line: rich on a terminal, one plain full-width line per message elsewhere,
library messages (transformers, diffusers, Python warnings) through the same handler, the known
harmless ones dropped."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

from busynth.accel import is_main_process

# Library messages that are harmless here but would open or clutter every run: (logger, text in it).
HARMLESS_MESSAGES: tuple[tuple[str, str], ...] = (
    # transformers >= 5 at import, without torchvision: image processors fall back to their PIL version.
    ("transformers", "requires torchvision"),
    # diffusers' load_lora_weights: busynth's LoRA adapts the UNet only, never the text encoder.
    ("diffusers", "No LoRA keys associated to CLIPTextModel"),
    # peft, when sd-lora's lora_mode=per_class loads one adapter per class into the UNet (intended).
    ("py.warnings", "Already found a `peft_config` attribute in the model"),
)
# Libraries that attach their own stderr handler on import and stop propagation to the root logger.
_OWN_HANDLER_LIBRARIES = ("transformers", "diffusers")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class HarmlessFilter(logging.Filter):
    """Drops the known harmless library messages of HARMLESS_MESSAGES (never errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a record to drop."""
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any((record.name == lib or record.name.startswith(f"{lib}.")) and text in message
                       for lib, text in HARMLESS_MESSAGES)


class StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever ``sys.stderr`` is at each record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _PropagatingLogger(logging.Logger):
    """The root logger of a library in _OWN_HANDLER_LIBRARIES, made before the library is imported: it
    never attaches the library's own stderr handler and always propagates, so the library's messages
    come out through busynth's handler, in its format and through its filter."""

    @property  # type: ignore[override]
    def propagate(self) -> bool:
        """Always True."""
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        pass

    def addHandler(self, hdlr: logging.Handler) -> None:
        """Attach ``hdlr`` unless it is a plain StreamHandler (the library's default one)."""
        if type(hdlr) is not logging.StreamHandler:
            super().addHandler(hdlr)


def _route_library_logging() -> None:
    """Send the log records of transformers and diffusers to the root logger instead of their own
    handlers: through their API when already imported, else by creating their root logger first."""
    for name in _OWN_HANDLER_LIBRARIES:
        module = sys.modules.get(f"{name}.utils.logging")
        if module is not None:
            module.disable_default_handler()
            module.enable_propagation()
        elif not isinstance(logging.Logger.manager.loggerDict.get(name), logging.Logger):
            previous = logging.getLoggerClass()
            logging.setLoggerClass(_PropagatingLogger)
            try:
                logging.getLogger(name)
            finally:
                logging.setLoggerClass(previous)


def setup_logging(verbose: bool, console: Console | None = None) -> None:
    """Rich output on a terminal; elsewhere (CI, nohup, a log file) one plain full-width line per
    message (``2026-12-03 08:01:12 INFO busynth.experiment: ...``) and no library progress bars.
    Python warnings and transformers/diffusers messages go through the same handler, minus the
    known harmless ones (HARMLESS_MESSAGES)."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=console or Console(stderr=True), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        # tqdm reads it on import: the bars libraries draw while loading or saving models stay off.
        os.environ.setdefault("TQDM_DISABLE", "1")
    handler.addFilter(HarmlessFilter())
    # Under `accelerate launch` the other processes do the same work: only the main one narrates.
    logging.basicConfig(level=level if is_main_process() else logging.WARNING, handlers=[handler], force=True)
    logging.captureWarnings(True)
    _route_library_logging()
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
