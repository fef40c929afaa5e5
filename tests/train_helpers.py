"""Small synthetic caches and configs for the training / evaluation tests, and the CLI
error check they share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from vidpipe.pipeline.cli import main
from vidpipe.store.labels import LABELS_FILE, LabelSet, VideoLabels
from vidpipe.store.cache import FeatureStore

TINY_CONFIG = {
    "model": {"d_model": 16, "num_heads": 2, "ffn_dim": 32, "dropout": 0.1,
              "long_memory_steps": 32, "long_memory_stride": 4, "short_memory_steps": 8,
              "sparse_k": 4, "num_branches": 2, "branch_queries": [8, 4], "branch_layers": [1, 1]},
    "train": {"epochs": 3, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 1, "seed": 0},
}
SETTINGS = {"source": "synthetic test", "step_seconds": 0.25}


def cli_error(capsys, argv) -> str:
    """Run the CLI on `argv`; assert it exits 2 with one line `error: ...` and return that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def write_config(path: Path, config: dict = TINY_CONFIG, **sections) -> Path:
    """YAML config from `config`, with sections updated: write_config(p, train={"epochs": 2})."""
    data = {key: dict(value) for key, value in config.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def write_cache(root: Path, videos: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                class_names: list[str], splits: dict[str, str]) -> Path:
    """videos: {id: (rgb, flow, targets, ambiguous)} -> cache folder with labels.h5."""
    store = FeatureStore.open_or_create(root, SETTINGS)
    labels = {}
    for video_id, (rgb, flow, targets, ambiguous) in videos.items():
        store.write(video_id, rgb, flow, np.arange(len(rgb)) * SETTINGS["step_seconds"])
        labels[video_id] = VideoLabels(targets.astype(np.float32), ambiguous.astype(bool))
    LabelSet(class_names, labels, splits).save(root / LABELS_FILE)
    return root


def random_cache(root: Path, num_train: int = 3, num_test: int = 2, steps: int = 40,
                 rgb_dim: int = 6, flow_dim: int = 4, num_classes: int = 3, seed: int = 0) -> Path:
    """Noise features whose first dimensions hint at the label; a few ambiguous steps."""
    rng = np.random.default_rng(seed)
    videos, splits = {}, {}
    for index in range(num_train + num_test):
        video_id = f"video_{index}"
        label = np.repeat(rng.integers(0, num_classes, steps // 8 + 1), 8)[:steps]
        targets = np.eye(num_classes, dtype=np.float32)[label]
        rgb = rng.standard_normal((steps, rgb_dim)).astype(np.float32)
        rgb[:, :num_classes] += 2 * targets
        flow = rng.standard_normal((steps, flow_dim)).astype(np.float32)
        ambiguous = rng.random(steps) < 0.1
        videos[video_id] = (rgb, flow, targets, ambiguous)
        splits[video_id] = "train" if index < num_train else "test"
    names = ["background"] + [f"action_{c}" for c in range(1, num_classes)]
    return write_cache(root, videos, names, splits)


def long_range_cache(root: Path, num_train: int = 8, num_test: int = 4, episodes: int = 3,
                     gap: int = 100, seed: int = 0) -> Path:
    """Two actions that look the same; only a cue more than `gap` steps before tells them apart.

    Each episode: a cue of 16 steps (one of two feature groups raised: which action will come), `gap`
    steps of background, then 16 steps of the action (a third group raised, the same for
    both actions), then background. A per-step classifier sees that an action happens but not
    which one; a model must carry the cue across more than `gap` steps.
    """
    rng = np.random.default_rng(seed)
    cue, action_steps, dim, width = 16, 16, 32, 8   # each signal spans `width` feature dims
    episode = cue + gap + action_steps + 24
    videos, splits = {}, {}
    for index in range(num_train + num_test):
        steps = episodes * episode + 16
        rgb = rng.standard_normal((steps, dim)).astype(np.float32) * 0.2
        flow = rng.standard_normal((steps, dim)).astype(np.float32) * 0.2
        targets = np.zeros((steps, 3), np.float32)
        targets[:, 0] = 1
        for e in range(episodes):
            start = 16 + e * episode
            action = int(rng.integers(1, 3))
            cue_dims = slice((action - 1) * width, action * width)
            rgb[start:start + cue, cue_dims] += 2.0                      # the cue
            begin = start + cue + gap
            rgb[begin:begin + action_steps, 2 * width:3 * width] += 2.0  # the action, class-blind
            targets[begin:begin + action_steps] = np.eye(3)[action]
        video_id = f"episode_video_{index}"
        videos[video_id] = (rgb, flow, targets, np.zeros(steps, bool))
        splits[video_id] = "train" if index < num_train else "test"
    return write_cache(root, videos, ["background", "left", "right"], splits)
