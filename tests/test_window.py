"""Which steps form a window (malt/window.py): examples, properties, the long memory's name
and when it changes, as the training data, the offline model and the streaming detector use them."""
import numpy as np
import pytest

from vidpipe.malt.window import (gather_window, long_memory_newest, long_memory_steps,
                                 next_long_memory_change, window_indices)
from model_helpers import random_video, tiny_config


def test_window_indices_examples():
    cfg = tiny_config()                                 # long 16 steps / stride 4, short 4
    # Long memory: grid steps s % 4 == 3 before the short memory, fixed as the window slides.
    assert [a.tolist() for a in window_indices(20, cfg)] == [[3, 7, 11, 15], [17, 18, 19, 20]]
    assert [a.tolist() for a in window_indices(22, cfg)] == [[3, 7, 11, 15], [19, 20, 21, 22]]
    assert [a.tolist() for a in window_indices(23, cfg)] == [[7, 11, 15, 19], [20, 21, 22, 23]]
    assert [a.tolist() for a in window_indices(13, cfg)] == [[-1, -1, 3, 7], [10, 11, 12, 13]]
    assert [a.tolist() for a in window_indices(9, cfg)] == [[-1, -1, -1, 3], [6, 7, 8, 9]]
    assert [a.tolist() for a in window_indices(6, cfg)] == [[-1, -1, -1, -1], [3, 4, 5, 6]]
    assert [a.tolist() for a in window_indices(2, cfg)] == [[-1, -1, -1, -1], [0, 1, 2]]
    assert [a.tolist() for a in window_indices(0, cfg)] == [[-1, -1, -1, -1], [0]]


@pytest.mark.parametrize("t", range(0, 60))
def test_window_indices_properties(t):
    cfg = tiny_config(long_memory_steps=24, long_memory_stride=3, short_memory_steps=5)
    long_idx, short_idx = window_indices(t, cfg)
    assert len(long_idx) == 8 and short_idx[-1] == t and len(short_idx) == min(5, t + 1)
    assert np.all(np.diff(short_idx) == 1)
    valid = long_idx[long_idx >= 0]
    assert np.all(long_idx[: len(long_idx) - len(valid)] == -1)     # padding only at the oldest slots
    assert np.all(np.diff(valid) == 3) and np.all(valid % 3 == 2)   # the fixed grid s % 3 == 2
    if len(valid):
        assert short_idx[0] - 3 <= valid[-1] < short_idx[0] and valid[0] >= 0
    assert len(valid) == min(8, short_idx[0] // 3)                 # every grid step before M_S that fits


def test_gather_window_zero_fills_padding():
    cfg = tiny_config()
    rgb, flow = random_video(16, cfg)
    window = gather_window(rgb, flow, 13, cfg)
    assert window.long_valid.tolist() == [False, False, True, True]
    assert not window.rgb_long[:2].any()
    np.testing.assert_array_equal(window.flow_long[2:], flow[[3, 7]])
    np.testing.assert_array_equal(window.rgb_short, rgb[10:14])


@pytest.mark.parametrize("changes", [{}, {"long_memory_steps": 24, "long_memory_stride": 3,
                                          "short_memory_steps": 5}])
def test_long_memory_named_by_its_newest_step_and_its_next_change(changes):
    """The streaming detector's view of the window: a long memory is known by its newest
    step, and it changes first at `next_long_memory_change(t)`, found here by brute force."""
    cfg = tiny_config(**changes)
    windows = [window_indices(t, cfg)[0] for t in range(80)]
    for t in range(70):
        newest = long_memory_newest(t, cfg)
        assert newest == windows[t].max()                 # -1: the empty long memory
        np.testing.assert_array_equal(long_memory_steps(newest, cfg), windows[t])
        first_change = next(u for u in range(t + 1, 80) if not np.array_equal(windows[u], windows[t]))
        assert next_long_memory_change(t, cfg) == first_change
