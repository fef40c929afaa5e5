"""Stop signals: SIGTERM (docker stop, systemd, Kubernetes) takes Ctrl-C's path.

Python turns SIGINT into `KeyboardInterrupt` in the main thread, and every command's
interrupt path keeps what it has (detect writes each source's timeline, extract keeps the
videos it finished, train its last checkpoint). SIGTERM's default ends the process on the
spot, losing all that. `handle_stop_signals` (the CLI's `main` calls it, once) makes SIGTERM
raise `KeyboardInterrupt` too and remembers which signal came, so that `main` can say so
and exit 128 + its number: 130 for SIGINT, 143 for SIGTERM, as shells and supervisors
expect. A command raises `Interrupted` after its interrupt path, saying what it kept.

A worker thread still running native code (a decoder, torch) when the interpreter
finalises is stopped under it: glibc unwinds it, and C++ aborts ("terminate called without
an active exception", exit 134). So stopped runs join their threads within a bound
(`join_threads`) and, should one still be blocked in a read (`blocked_threads`), the
console script (`pipeline.cli.run`, not `main` called in-process) ends without finalising.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time

THREADS_JOIN_S = 5.0    # how long a stopped run waits for its threads to end


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal (or Ctrl-C) after keeping what it had; `kept` says what
    is on disk and how to go on."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept


_received: list[int] = []
_deferring = 0          # depth of `uninterrupted` blocks running now (main thread only)
_pending = False        # a stop signal came inside one: raised when the outermost ends


def _interrupt(signum: int, frame) -> None:
    global _pending
    _received.append(signum)
    if _deferring:
        _pending = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def uninterrupted():
    """A piece of work recorded whole or not at all: a stop signal (through the handler of
    `handle_stop_signals`) that arrives inside is raised when the block ends. detect records
    a step's decision, events and rendered frames together, so that a stop between them
    cannot leave a timeline step without its frames."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            _pending = False
            raise KeyboardInterrupt


def handle_stop_signals() -> dict[int, object]:
    """SIGTERM (and SIGINT, unless the process was started with it ignored, as a shell's
    background job is) raise `KeyboardInterrupt` in the main thread from now on ->
    the previous handlers, for `restore_signals`."""
    _received.clear()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    return previous


def restore_signals(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def stop_signal() -> int:
    """The signal that stopped this run (SIGINT for a KeyboardInterrupt raised otherwise)."""
    return _received[0] if _received else signal.SIGINT


def stopped_by() -> str:
    """'interrupted' (Ctrl-C) or 'stopped by SIGTERM': how the one-line message begins."""
    signum = stop_signal()
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def what_was_kept(exc: BaseException) -> str | None:
    """The `Interrupted.kept` of `exc` or of what it was raised from (click wraps it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):
            return exc.kept
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def join_threads(threads: list[threading.Thread],
                 timeout_s: float = THREADS_JOIN_S) -> list[threading.Thread]:
    """Join `threads` (those started) within `timeout_s` in all -> those still running
    (remembered for `blocked_threads`)."""
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        if thread.ident is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
    running = [thread for thread in threads if thread.is_alive()]
    _unjoined.extend(running)
    return running


_unjoined: list[threading.Thread] = []


def blocked_threads() -> list[threading.Thread]:
    """The threads that outlived `join_threads` and still run (blocked in a read that no
    flag reaches): a stopped run then ends without finalising the interpreter under them."""
    running = [thread for thread in _unjoined if thread.is_alive()]
    _unjoined.clear()
    return running
