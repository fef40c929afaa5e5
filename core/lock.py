"""One writer at a time: an output folder per run (`folder_lock`), a cache video per
extraction (`claim`).

Two `vidpipe train` (or `detect`) runs into one `--out` would each write their files over
the other's and both exit 0; two extractions into one cache would each extract every video.
Both locks are `flock`s on a small file: the kernel frees them when their holder ends,
however it ends (kill -9 included), so a dead holder never blocks anyone and no stale lock
needs clearing. A folder's lock file (`.vidpipe.lock`, holding its holder's pid, which the
refused run names) is removed by its holder at the end; claim files stay in the cache's
`.claims/` (removing one while another process waits on it would let two hold it).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from vidpipe.core.errors import VidpipeError

LOCK_FILE = ".vidpipe.lock"
PID_WAIT_S = 1.0    # how long a refused run waits for the holder to have written its pid


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[None]:
    """Hold `folder` (created) for this run of `command`; a second run gets a one-line
    error naming the holder's pid. The lock file goes when the run ends (and the folder,
    when the run left it empty)."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _lock_file(path)
    if fd is None:
        raise VidpipeError(f"{folder}: in use by another vidpipe {command} (pid {_holder(path)}); "
                           "wait for it to end or choose another output folder")
    try:
        with contextlib.suppress(OSError):   # a full disk: the lock holds all the same
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)   # while held: whoever opens it next gets a new file
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()         # only if empty


def _lock_file(path: Path, wait: bool = False) -> int | None:
    """An open, flocked `path` -> its descriptor; without `wait`, None at once when another
    process holds it. A file its holder removed while this one waited is not the lock any
    more: take the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    deadline = time.monotonic() + PID_WAIT_S
    while True:
        text = path.read_text().strip()
        if text or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.02)


class Claim:
    """An exclusive claim on one item (`path`: its claim file), taken with `take`; release
    it with `release` (or `with`)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def take(self, wait: bool) -> bool:
        """Claim it -> True; without `wait`, False at once when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = _lock_file(self.path, wait)
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
