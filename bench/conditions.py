"""What every bench prints around its table: the machine (CPU model, lscpu-style flags, torch,
threads), the 1-minute load average before, and how many cores other processes kept busy
while it ran.

The load average after a bench counts the bench itself (two busy threads make it ~2), so it
cannot tell whether other work shared the cores; the CPU time of the whole machine
(/proc/stat) less this process's own (os.times, children included) over the wall time can.
A table measured while other work loaded the machine (load average > 0.5 before, or other
processes busy > 0.5 cores on average during the run) is marked UNDER LOAD: its figures are
not for the README or the docs, which carry at-rest figures only (or say "under load").
Use, once the arguments are parsed: `with measured("bench/streams.py", args.threads): ...print
the table...` (it sets torch's threads before its header names them).
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Iterator

import torch

from vidpipe.core.precision import cpu_capabilities

AT_REST = 0.5      # 1-minute load average: above it, other work shares the cores


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_line() -> str:
    caps = cpu_capabilities()
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {os.cpu_count()} CPUs ({caps.source}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")


def load_average() -> float:
    return os.getloadavg()[0]


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds the machine has been busy, CPU seconds of this process and its children),
    or None where /proc/stat is missing."""
    try:
        ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]                     # idle + iowait
    own = os.times()
    return ((sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system + own.children_user + own.children_system)


def verdict(before: float, others: float) -> str:
    """The line under a table: at rest (README-grade) or under load (not). `before`: the load
    average before; `others`: the cores other processes kept busy, on average, during the run."""
    said = f"load average {before:.2f} before, other processes {others:.2f} cores during"
    if max(before, others) > AT_REST:
        return (f"UNDER LOAD: {said} (> {AT_REST}): not README-grade, other work shared the "
                f"cores; rerun at rest")
    return f"at rest: {said} (<= {AT_REST}): README-grade"


@contextlib.contextmanager
def measured(bench: str, threads: int | None = None) -> Iterator[None]:
    """Set torch's CPU threads (None: leave torch's default), print the machine (with the
    threads the bench runs with) and the load before, the verdict after (also when the bench
    fails)."""
    if threads:
        torch.set_num_threads(threads)
    before, busy, start = load_average(), busy_seconds(), time.monotonic()
    print(f"{bench}: {machine_line()}; load average before {before:.2f}", flush=True)
    try:
        yield
    finally:
        after, wall = busy_seconds(), time.monotonic() - start
        if busy is None or after is None or wall <= 0:      # no /proc/stat: the load after, as is
            others = load_average()
        else:
            others = max(0.0, (after[0] - busy[0]) - (after[1] - busy[1])) / wall
        print(verdict(before, others), flush=True)
