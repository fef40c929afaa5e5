"""The one way vidpipe writes a file that someone may read while it is being written.

`with atomic_path(final) as tmp:` yields a temporary name in the same folder; the caller
writes `tmp`; on success it is flushed to disk, given the usual permissions and moved onto
`final` with `os.replace`, so readers see either the old file or the complete new one.
On any error (or a kill) `final` is untouched; a killed writer's temporary file is
recognisable by `is_stale_temporary` and removed by the next writer
(`remove_stale_temporaries`). With `exclusive=True` the file is created only if it does
not exist yet (a hard link, which fails when another writer got there first): two
processes creating the same file concurrently cannot both win. A write that fails for
lack of space or quota (however the library writing `tmp` words it) leaves nothing and
raises `DiskFull`: one line naming the file and the space left.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from vidpipe.core.errors import DiskFull

TEMP_PREFIX = ".tmp-"


def _temp_prefix() -> str:
    # Host and pid in the name: a writer can tell a dead writer's file from a running one's.
    return f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def is_stale_temporary(path: Path) -> bool:
    """A temporary file whose writer (on this host) is no longer running."""
    match = re.match(re.escape(TEMP_PREFIX) + r"(.+)-(\d+)-", path.name)
    if match is None:
        return True
    if match.group(1) != socket.gethostname():
        return False          # another machine's writer: cannot tell, leave it
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the temporary files killed writers left in `folder` (never visible to readers).

    Files of writers still running (other ranks, other workers) are left alone.
    """
    folder = Path(folder)
    if folder.is_dir():
        for temp in folder.glob(TEMP_PREFIX + "*"):
            if is_stale_temporary(temp):
                temp.unlink(missing_ok=True)


# How a full disk or quota reads once a library has wrapped the OSError: h5py ("errno = 28"),
# torch.save ("[enforce fail at inline_container.cc] ... file write failed"), PyAV, numpy.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "errno = 28", "errno = 122",
                   "file write failed")


def disk_full(exc: BaseException, path: str | Path | None) -> DiskFull | None:
    """`exc` as a one-line `DiskFull` naming `path` (None: unknown, the space left is the
    current folder's) and the space left, when it is a write that failed for lack of space
    or quota; None for any other error."""
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    if getattr(exc, "errno", None) not in DISK_FULL_ERRNOS and not any(
            text in str(exc) for text in DISK_FULL_TEXTS):
        return None
    folder = Path(path).absolute().parent if path is not None else Path.cwd()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    quota = getattr(exc, "errno", None) == errno.EDQUOT
    why = "disk quota exceeded" if quota else "no space left on the device"
    return DiskFull(f"{path or 'a file'}: not written, {why} ({free} in {folder}); free some "
                    "space or choose another folder, then rerun (what was finished is kept)")


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "", exclusive: bool = False) -> Iterator[Path]:
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(), suffix=suffix, dir=final.parent)
    except OSError as exc:
        full = disk_full(exc, final)
        if full is None:
            raise
        raise full from None
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)   # mkstemp makes files private
        if exclusive:
            os.link(temp, final)   # FileExistsError when another writer created it first
            temp.unlink()
        else:
            os.replace(temp, final)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        full = disk_full(exc, final)
        if full is not None:
            raise full from None
        raise


def write_text_atomically(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temp:
        temp.write_text(text)
    return Path(path)


def write_csv_atomically(path: str | Path, header: list[str], rows: Iterable[Iterable]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomically(path, buffer.getvalue())
