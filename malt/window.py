"""Which steps form the window ending at step t: the ONE definition used by training data,
offline evaluation and the streaming detector.

Short memory: steps max(0, t-S+1) .. t, every step (S = short_memory_steps; fewer near the
start of a video). Long memory: L = long_memory_steps // long_memory_stride slots, one step
every `long_memory_stride` steps, the newest slot being the step right before the short
memory; slots that would fall before step 0 hold -1 (padding, always the oldest slots).

Example (long_memory_steps=16, stride=4, S=4): t=20 -> short 17..20, long [4, 8, 12, 16];
t=9 -> short 6..9, long [-1, -1, 1, 5]; t=2 -> short 0..2, long all -1.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from malt.config import ModelConfig


def num_long_tokens(cfg: ModelConfig) -> int:
    return cfg.long_memory_steps // cfg.long_memory_stride


def window_indices(t: int, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(long_idx (L,) int64 with -1 for padding, short_idx (S,) int64) of the window ending at t."""
    if t < 0:
        raise ValueError(f"step index must be >= 0, got {t}")
    short_start = max(0, t - cfg.short_memory_steps + 1)
    short_idx = np.arange(short_start, t + 1, dtype=np.int64)
    offsets = cfg.long_memory_stride * np.arange(num_long_tokens(cfg) - 1, -1, -1, dtype=np.int64)
    long_idx = short_start - 1 - offsets                    # oldest slot first
    long_idx[long_idx < 0] = -1
    return long_idx, short_idx


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
    safe_idx = np.where(long_valid, long_idx, 0)
    mask = long_valid[:, None]
    return Window(np.where(mask, rgb[safe_idx], 0).astype(rgb.dtype),
                  np.where(mask, flow[safe_idx], 0).astype(flow.dtype),
                  long_valid, rgb[short_idx], flow[short_idx])
