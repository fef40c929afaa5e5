"""The one `precision` setting of extract, train, eval and detect: fp32 | bf16 | fp16 | int8 | auto.

`auto` is decided from what the hardware does natively, read from the machine (torch's CPU
kernel level and /proc/cpuinfo's flags, CUDA's compute capability), never assumed:
- CPU: bf16 where the cores multiply bf16 natively (`avx512_bf16` or `amx_bf16`, with
  torch's AVX512 kernels); the streaming detector takes int8 where the cores have int8 dot
  products (`avx512_vnni`, `avx_vnni` or `amx_int8`); else fp32.
- CUDA: bf16 where supported (Ampere and later), else fp16.
`int8` is the detector's (dynamic int8 Linear layers, CPU); the CNNs and training have no
int8 path. `fp16` is CUDA's (CPU fp16 kernels are slower than fp32).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vidpipe.core.errors import VidpipeError

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Capabilities:
    """What a device computes natively, and where that was read."""
    device: str            # cpu | cuda
    bf16: bool             # native bf16 products
    fp16: bool             # fp16 autocast is worth it (CUDA)
    int8: bool             # int8 dot products (VNNI / AMX; CPU)
    source: str            # e.g. "torch AVX512, /proc/cpuinfo avx512_bf16 avx512_vnni"


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags; empty where the file is absent (macOS, Windows)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_capabilities(flags: set[str] | None = None, torch_level: str | None = None) -> Capabilities:
    """From /proc/cpuinfo's `flags` and torch's kernel level (`get_cpu_capability()`: DEFAULT,
    AVX2, AVX512, ...): bf16 needs both the flag and torch's AVX512 kernels to use it."""
    flags = cpu_flags() if flags is None else flags
    level = torch.backends.cpu.get_cpu_capability() if torch_level is None else torch_level
    bf16_flags = sorted(f for f in BF16_FLAGS if f in flags)
    int8_flags = sorted(f for f in INT8_FLAGS if f in flags)
    found = " ".join(bf16_flags + int8_flags) or "no bf16/vnni flags"
    return Capabilities("cpu", bf16=bool(bf16_flags) and level.startswith("AVX512"), fp16=False,
                        int8=bool(int8_flags), source=f"torch {level}, cpu flags: {found}")


def device_capabilities(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return Capabilities("cuda", bf16=bf16, fp16=True, int8=False, source=f"{name}, bf16 {bf16}")
    return cpu_capabilities()


def resolve_precision(requested: str, device: torch.device, *, int8_ok: bool = False,
                      capabilities: Capabilities | None = None) -> str:
    """`requested` -> what runs: fp32, bf16, fp16 or int8 (int8 only where `int8_ok`: the
    detector). A precision the device cannot run is a one-line error; `auto` never fails."""
    if requested not in PRECISIONS:
        raise VidpipeError(f"precision '{requested}': choose one of {', '.join(PRECISIONS)}")
    caps = capabilities or device_capabilities(device)
    if requested == "auto":
        if caps.device == "cuda":
            return "bf16" if caps.bf16 else "fp16"
        if int8_ok and caps.int8:
            return "int8"
        return "bf16" if caps.bf16 else "fp32"
    if requested == "int8" and not int8_ok:
        raise VidpipeError("precision 'int8' is the streaming detector's (vidpipe detect); "
                           "here choose fp32, bf16 or auto")
    if requested == "int8" and caps.device != "cpu":
        raise VidpipeError(f"precision 'int8' runs on the CPU only, not on {device}: choose bf16 or fp16")
    if requested == "fp16" and caps.device != "cuda":
        raise VidpipeError("precision 'fp16' is for CUDA (slower than fp32 on a CPU): choose bf16 or fp32")
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for a resolved precision: bf16/fp16 products, fp32 where torch keeps it
    (softmax, norms, reductions). fp32 and int8 (the detector's own) run without it."""
    dtype = DTYPES.get(precision)
    if dtype is None or dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
