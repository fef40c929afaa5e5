"""The checks of the paths a user names that need nothing but the file system.

The CLI runs them before it imports torch and the video stack (seconds), so that a typo in a
file name is answered at once; the libraries run the same functions for Python callers.
"""
from __future__ import annotations

from pathlib import Path

from vidpipe.core.errors import VidpipeError


def is_stream(path_or_url: str) -> bool:
    """A URL (rtsp://, http://...) or a capture device (/dev/...), not a local file."""
    return "://" in path_or_url or path_or_url.startswith("/dev/")


def require_input(path: str | Path) -> Path:
    """`path` as a Path when something is there (a file, folder, or even a FIFO: the caller
    says what it accepts); else '<path>: no such folder or file'."""
    if not str(path).strip():   # Path("") is the current folder: an unset shell variable?
        raise VidpipeError("an empty name is not a video file or folder")
    found = Path(path)
    if not (found.exists() or found.is_symlink()):
        raise VidpipeError(f"{path}: no such folder or file")
    return found


def require_sources(sources: list[str], cache_given: bool) -> None:
    """Every detection source that must be a local file exists. Without a cache, a name that
    is neither a URL/device nor a path on disk cannot be anything (with one, it may be the id
    of a cached video, which only the cache can tell)."""
    for text in sources:
        if not str(text).strip():
            raise VidpipeError("an empty name is not a video file or folder")
        if not cache_given and not is_stream(text) and not Path(text).exists():
            raise VidpipeError(f"{text}: file not found")


def require_checkpoint_file(path: str | Path) -> Path:
    """`path` as a Path when it is a file; a missing one, or a run folder given where its
    checkpoint file goes, is a one-line error that names the files to choose from."""
    found = Path(path)
    if found.is_dir():
        names = sorted((p.name for p in found.glob("*.pt")),
                       key=lambda name: (name != "last.pt", name != "best.pt", name))
        if not names:
            raise VidpipeError(f"{path}: a folder holding no checkpoint (.pt) file; give the "
                               "checkpoint file of a run, e.g. runs/NAME/last.pt")
        raise VidpipeError(f"{path}: a folder, not a checkpoint file; it holds {', '.join(names)}: "
                           f"give one of them, e.g. {found / names[0]}")
    if not found.is_file():
        raise VidpipeError(f"{path}: checkpoint not found")
    return found
