"""Bounding the C heap of long runs (glibc only; elsewhere both functions do nothing).

Decoding, DIS flow and torch allocate and free many large, differently sized buffers, from
several threads (decode workers, OpenMP, OpenCV). glibc keeps what is freed inside its
heaps, one arena per thread up to 8 per core, and hands little of it back, so the RSS of a
long extraction creeps upwards (measured on demo-sized settings: ~250 MB retained, rising
1-2 MB/s with --workers 2). `limit_malloc_arenas` caps the arenas as MALLOC_ARENA_MAX=2
would (the CLI calls it at start; an explicit MALLOC_ARENA_MAX wins), and
`release_free_memory` returns the freed pages of every arena (malloc_trim), once per video.
"""
from __future__ import annotations

import ctypes
import functools
import os

M_ARENA_MAX = -8   # mallopt parameter (glibc malloc.h)


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim   # both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def limit_malloc_arenas(arenas: int = 2) -> None:
    """At most `arenas` malloc arenas for threads started from now on."""
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Give the pages malloc holds free back to the system (a few ms)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
