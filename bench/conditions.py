"""What every bench prints around its table: the machine (CPU model, lscpu-style flags, torch,
threads) and the 1-minute load average before and after.

A table measured while other work loads the machine (load average > 0.5 before or after) is
marked UNDER LOAD: its figures are not for the README or the docs, which carry at-rest figures
only (or say "under load"). Use: `with measured("bench/streams.py"): ...print the table...`.
"""
from __future__ import annotations

import contextlib
import os
import platform
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


def verdict(before: float, after: float) -> str:
    """The line under a table: at rest (README-grade) or under load (not)."""
    if max(before, after) > AT_REST:
        return (f"UNDER LOAD: load average {before:.2f} before, {after:.2f} after (> {AT_REST}): "
                f"not README-grade, other work shared the cores; rerun at rest")
    return f"at rest: load average {before:.2f} before, {after:.2f} after (<= {AT_REST}): README-grade"


@contextlib.contextmanager
def measured(bench: str) -> Iterator[None]:
    """Print the machine and the load before, the verdict after (also when the bench fails)."""
    before = load_average()
    print(f"{bench}: {machine_line()}; load average before {before:.2f}", flush=True)
    try:
        yield
    finally:
        print(verdict(before, load_average()), flush=True)
