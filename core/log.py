"""The one output channel of library code: `logging`, plus progress bars only on a terminal.

Library modules never print. They log through `logging.getLogger(__name__)` (every logger
is under "vidpipe", so one setting reaches them all) and draw progress with `progress_bar`.
What reaches the screen is decided once, by the program using the library: the CLI calls
`configure_cli_logging` (`vidpipe --quiet` / `--verbose`); a Python user who configures
nothing sees warnings only, Python's default.

A progress bar is drawn only when stderr is a terminal and info messages are shown;
otherwise (logs redirected to a file, `--quiet`, CI) the bar is a silent stand-in and the
library's one info line per video / per epoch is the whole record, with no carriage-return
spam. A long loop asks for a `heartbeat_s`: off a terminal, its bar then logs one progress
line (done/total, the postfix, elapsed time and ETA) every that many seconds, so that a
redirected log of a long epoch is never silent for minutes.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

ROOT_LOGGER = "vidpipe"
HEARTBEAT_S = 30.0   # off a terminal, a long loop's progress line at least this often
log = logging.getLogger(__name__)


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True,
                 heartbeat_s: float | None = None, **tqdm_options: Any):
    """A tqdm bar over `iterable` (or a manual one: `total=`, `.update()`), drawn only when
    `enabled`, stderr is a terminal and vidpipe's info messages are on; otherwise tqdm's own
    disabled bar, which iterates and accepts every call without drawing, or, with
    `heartbeat_s` and info messages on, a `LogProgress` logging a line that often."""
    from tqdm import tqdm

    show = enabled and logging.getLogger(ROOT_LOGGER).isEnabledFor(logging.INFO)
    if show and not sys.stderr.isatty() and heartbeat_s is not None:
        return LogProgress(iterable, heartbeat_s, desc=tqdm_options.get("desc"),
                           total=tqdm_options.get("total"), unit=tqdm_options.get("unit", "it"))
    return tqdm(iterable, disable=not (show and sys.stderr.isatty()), **tqdm_options)


class LogProgress:
    """The part of tqdm's interface vidpipe uses (iterate, `update`, `set_postfix`, `close`),
    written as an info line every `every_s` seconds instead of a redrawn bar:
    `epoch 3/60: 40/100 batch, loss=0.4123, lr=1.20e-04, 30 s, ETA 45 s`."""

    def __init__(self, iterable: Iterable | None, every_s: float, desc: str | None = None,
                 total: int | None = None, unit: str = "it") -> None:
        self.iterable, self.every_s, self.desc, self.unit = iterable, every_s, desc, unit
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.n, self.postfix = 0, ""
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info(self.line(now - self.started))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        """Nothing to clear: the lines already written are the record."""

    def line(self, elapsed_s: float) -> str:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{done} {self.unit}", self.postfix, format_duration(elapsed_s)]
        if self.total and self.n:
            parts.append(f"ETA {format_duration(elapsed_s / self.n * (self.total - self.n))}")
        text = ", ".join(part for part in parts if part)
        return f"{self.desc}: {text}" if self.desc else text


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def format_duration(seconds: float) -> str:
    """'45 s', '12:05' (min:s), '1:02:03' (h:min:s): a duration as people read it."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _ConsoleHandler(logging.Handler):
    """Info lines to stdout (they are the command's report), warnings and errors to stderr;
    written through tqdm so that a bar being drawn is redrawn below the line, not broken.
    The streams are looked up at each record, so a replaced sys.stdout (tests) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(message, file=stream)
        except Exception:  # logging must never take the program down
            self.handleError(record)


def configure_cli_logging(verbosity: int = 0) -> None:
    """Show vidpipe's log lines on the console: -1 quiet (warnings and errors only), 0 info,
    1 debug. Idempotent: a second call replaces the first one's handler."""
    remove_cli_logging()
    logger = logging.getLogger(ROOT_LOGGER)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))


def remove_cli_logging() -> None:
    """Undo `configure_cli_logging` (the CLI does at exit, so that a program or test calling
    `vidpipe.pipeline.cli.main` is left with logging as it was)."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
