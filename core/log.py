"""The one output channel of library code: `logging`, plus progress bars only on a terminal.

Library modules never print. They log through `logging.getLogger(__name__)` (every logger
is under "vidpipe", so one setting reaches them all) and draw progress with `progress_bar`.
What reaches the screen is decided once, by the program using the library: the CLI calls
`configure_cli_logging` (`vidpipe --quiet` / `--verbose`); a Python user who configures
nothing sees warnings only, Python's default.

A progress bar is drawn only when stderr is a terminal and info messages are shown;
otherwise (logs redirected to a file, `--quiet`, CI) the bar is a silent stand-in and the
library's one info line per video / per epoch is the whole record, with no carriage-return
spam.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterable

ROOT_LOGGER = "vidpipe"


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **tqdm_options: Any):
    """A tqdm bar over `iterable` (or a manual one: `total=`, `.update()`), drawn only when
    `enabled`, stderr is a terminal and vidpipe's info messages are on; otherwise tqdm's own
    disabled bar, which iterates and accepts every call without drawing."""
    from tqdm import tqdm

    show = (enabled and sys.stderr.isatty()
            and logging.getLogger(ROOT_LOGGER).isEnabledFor(logging.INFO))
    return tqdm(iterable, disable=not show, **tqdm_options)


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
