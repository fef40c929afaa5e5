"""Which steps form the window ending at step t: the ONE definition used by training data,
offline evaluation and the streaming detector.

Short memory: steps max(0, t-S+1) .. t, every step (S = short_memory_steps; fewer near the
start of a video). Long memory: L = long_memory_steps // long_memory_stride slots holding
grid steps, i.e. steps s with s % stride == stride - 1 (the last step of each block of
`stride` steps, counted from step 0), the most recent L of those before the short memory;
slots that would fall before step 0 hold -1 (padding, always the oldest slots).

Why a grid fixed to absolute step indices: the long memory then changes only once every
`stride` steps (when a grid step leaves the short memory), so the streaming detector
recomputes the encoder once per `stride` steps instead of every step. The information is
LSTR's (every stride-th step of the last long_memory_steps); the gap between the newest long
slot and the short memory varies from 0 to stride-1 steps, no wider than the stride-1
steps skipped between two long slots anyway. Any fixed phase would do; stride - 1 makes a
long slot the newest step of its block, and M_L gets its first step as soon as the
first whole block of `stride` steps has left the short memory.

Example (long_memory_steps=16, stride=4, S=4): t=20 -> short 17..20, long [3, 7, 11, 15];
t=23 -> short 20..23, long [7, 11, 15, 19]; t=9 -> short 6..9, long [-1, -1, -1, 3];
t=6 -> short 3..6, long all -1.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vidpipe.malt.config import ModelConfig

__all__ = ["Window", "gather_window", "is_grid_step", "long_grid_phase", "long_memory_newest",
           "long_memory_steps", "next_long_memory_change", "num_long_tokens", "window_at",
           "window_indices"]


def num_long_tokens(cfg: ModelConfig) -> int:
    return cfg.long_memory_steps // cfg.long_memory_stride


def long_grid_phase(cfg: ModelConfig) -> int:
    """Long-memory steps are the steps s with s % long_memory_stride == this phase."""
    return cfg.long_memory_stride - 1


def is_grid_step(steps: np.ndarray | int, cfg: ModelConfig) -> np.ndarray | bool:
    """Whether each step is a grid step: the only steps that ever enter a long memory."""
    return steps % cfg.long_memory_stride == long_grid_phase(cfg)


def long_memory_newest(t: int, cfg: ModelConfig) -> int:
    """The newest step of the long memory of the window ending at step t (the last grid step
    before its short memory), -1 when that long memory is empty. It names the long memory:
    two windows with the same newest long step have the same long memory."""
    stride, phase = cfg.long_memory_stride, long_grid_phase(cfg)
    short_start = max(0, t - cfg.short_memory_steps + 1)
    return max((short_start - 1 - phase) // stride * stride + phase, -1)


def long_memory_steps(newest: int, cfg: ModelConfig) -> np.ndarray:
    """(L,) int64 steps of the long memory whose newest step is `newest`, oldest slot first,
    -1 for padding (slots before step 0)."""
    offsets = cfg.long_memory_stride * np.arange(num_long_tokens(cfg) - 1, -1, -1, dtype=np.int64)
    return np.maximum(newest - offsets, -1)


def next_long_memory_change(t: int, cfg: ModelConfig) -> int:
    """The first step after t whose long memory differs from step t's: the step t' at which
    a grid step leaves the short memory (step t' - S is a grid step)."""
    stride, short = cfg.long_memory_stride, cfg.short_memory_steps
    first = max(t + 1, short)
    return first + (long_grid_phase(cfg) - (first - short)) % stride


def window_indices(t: int, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(long_idx (L,) int64 with -1 for padding, short_idx (S,) int64) of the window ending at t."""
    if t < 0:
        raise ValueError(f"step index must be >= 0, got {t}")
    short_start = max(0, t - cfg.short_memory_steps + 1)
    short_idx = np.arange(short_start, t + 1, dtype=np.int64)
    return long_memory_steps(long_memory_newest(t, cfg), cfg), short_idx


class Window(NamedTuple):
    rgb_long: np.ndarray      # (L, Dr), zeros at padding slots
    flow_long: np.ndarray     # (L, Df)
    long_valid: np.ndarray    # (L,) bool
    rgb_short: np.ndarray     # (S, Dr)
    flow_short: np.ndarray    # (S, Df)


def gather_window(rgb: np.ndarray, flow: np.ndarray, t: int, cfg: ModelConfig) -> Window:
    """The window ending at step t of one video's features rgb (T, Dr), flow (T, Df)."""
    if not 0 <= t < len(rgb):
        raise ValueError(f"step {t} outside a video of {len(rgb)} steps")
    long_idx, short_idx = window_indices(t, cfg)
    long_valid = long_idx >= 0
    return window_at(rgb, flow, np.where(long_valid, long_idx, 0), long_valid, short_idx)


def window_at(rgb: np.ndarray, flow: np.ndarray, long_idx: np.ndarray, long_valid: np.ndarray,
              short_idx: np.ndarray) -> Window:
    """The window of the given steps: long memory rows long_idx (L,), zeroed where not
    long_valid (L,), short memory rows short_idx (S,)."""
    mask = long_valid[:, None]
    return Window(np.where(mask, rgb[long_idx], 0).astype(rgb.dtype),
                  np.where(mask, flow[long_idx], 0).astype(flow.dtype),
                  long_valid, rgb[short_idx], flow[short_idx])
