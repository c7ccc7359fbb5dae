"""Progress of training loops: a tqdm bar on a terminal, a log line every ~30 s elsewhere.

Usage (one reporter per loop; only the local main process of an ``accelerate`` run reports)::

    from busynth.progress import log_fit, progress

    with progress(cfg.steps, "cvae fit", initial=start) as bar:
        for step in range(start, cfg.steps):
            loss = ...
            bar.update(1, loss=loss)            # advance; keyword values become the postfix
        # bar.set_postfix(kl=0.1) sets the postfix without advancing
    log_fit("cvae", bar.count, bar.elapsed, unit="step", loss=loss)

On a terminal (``sys.stderr.isatty()``) the reporter is a tqdm bar. Elsewhere (CI, ``nohup``,
a log file) it writes an INFO line through ``logging`` at most every ``interval`` seconds
(default :data:`LOG_INTERVAL_S`; 0 logs every update)::

    cvae fit: step 120/400 (30%), loss 1.234, 0.51 s/step, ETA 2m23s

``log_fit`` writes the one line per finished fit (count, time, time per unit, any details).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

# Seconds between two progress lines off a terminal (tests set 0, or pass ``interval``).
LOG_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """A short duration: ``850ms``, ``0s``, ``42s``, ``4m10s``, ``1h02m``."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = round(float(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def is_local_main_process() -> bool:
    """True unless a launcher (accelerate / torchrun) marks this process as a non-zero local rank."""
    return int(os.environ.get("LOCAL_RANK") or 0) == 0


class Progress:
    """Progress of one loop of ``total`` units; see the module docstring. Use :func:`progress`."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, unit: str = "step",
                 interval: float | None = None, enabled: bool | None = None, terminal: bool | None = None,
                 log: logging.Logger | None = None) -> None:
        self.total, self.desc, self.unit, self.initial = int(total), desc, unit, int(initial)
        self.n = self.initial
        self.postfix: dict[str, Any] = {}
        self.interval = LOG_INTERVAL_S if interval is None else float(interval)
        self.enabled = is_local_main_process() if enabled is None else enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.log = log or logger
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        if self.enabled and self.terminal:
            from tqdm.auto import tqdm

            # disable=False explicitly: the CLI sets TQDM_DISABLE off a terminal for libraries' bars.
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, dynamic_ncols=True,
                             disable=False)

    @property
    def count(self) -> int:
        """Units done since this reporter started (excluding ``initial``: a resumed loop's earlier steps)."""
        return self.n - self.initial

    @property
    def elapsed(self) -> float:
        """Seconds since this reporter started."""
        return time.monotonic() - self._start

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far, or None before the first unit."""
        if self.count <= 0:
            return None
        return self.elapsed / self.count * max(0, self.total - self.n)

    def set_postfix(self, **values: Any) -> None:
        """Set (update) the values shown after the count, e.g. ``loss=0.12``."""
        self.postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix({k: _format_value(v) for k, v in self.postfix.items()}, refresh=False)

    def update(self, n: int = 1, **values: Any) -> None:
        """Advance by ``n`` units; keyword values update the postfix (see :meth:`set_postfix`)."""
        self.n += n
        if values:
            self.set_postfix(**values)
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and not self.terminal:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self.log.info("%s", self.line())

    def line(self) -> str:
        """The progress line written off a terminal."""
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts += [f"{k} {_format_value(v)}" for k, v in self.postfix.items()]
        if self.count > 0:
            parts.append(f"{self.elapsed / self.count:.3g} s/{self.unit}")
        if (eta := self.eta()) is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return ", ".join(parts)

    def close(self) -> None:
        """Close the bar (nothing to do off a terminal)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def progress(total: int, desc: str, *, initial: int = 0, unit: str = "step", interval: float | None = None,
             enabled: bool | None = None, terminal: bool | None = None,
             log: logging.Logger | None = None) -> Progress:
    """A progress reporter for a loop of ``total`` units (use it as a context manager).

    ``initial``: units already done (a resumed loop). ``interval``: seconds between log lines off a
    terminal (default :data:`LOG_INTERVAL_S`). ``enabled``: report at all (default: in the local
    main process only; pass ``accelerator.is_local_main_process``). ``terminal``: draw a tqdm bar
    (default: when stderr is a terminal). ``log``: the logger for the lines (default this module's).
    """
    return Progress(total, desc, initial=initial, unit=unit, interval=interval, enabled=enabled,
                    terminal=terminal, log=log)


def log_fit(desc: str, count: int, seconds: float, *, unit: str = "step", log: logging.Logger | None = None,
            level: int = logging.INFO, **details: Any) -> str:
    """Log (and return) the one line of a finished fit, e.g.
    ``cvae: fit done, 400 steps in 3m25s (0.512 s/step), loss 101.2``; ``details`` follow in order
    (underscores read as spaces)."""
    per = f" ({seconds / count:.3g} s/{unit})" if count > 0 else ""
    text = f"{desc}: fit done, {count} {unit}{'s' if count != 1 else ''} in {format_duration(seconds)}{per}"
    if details:
        text += ", " + ", ".join(f"{k.replace('_', ' ')} {_format_value(v)}" for k, v in details.items())
    (log or logger).log(level, "%s", text)
    return text
