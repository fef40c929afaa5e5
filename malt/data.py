"""Training windows: long memory + short memory + per-step targets, from a cache and labels.

A window is named by the step t it ends at; `malt.window.window_indices(t, cfg)` says which
steps form its long and short memory (the same function the evaluation and the streaming
detector use, so training sees exactly the windows inference sees).

Training windows follow the authors' code (after LSTR): each epoch, every video is cut into
non-overlapping short-memory windows starting at a random offset in [0, S), so that over the
epochs every step is seen at every short-memory position. Only full windows are used.
Their long memory is the inference rule's (`data.long_memory_sampler: grid`) or LSTR's
training sampler (`segment`, `segment_long_memory`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vidpipe.malt.config import ModelConfig
from vidpipe.malt.window import gather_window, num_long_tokens, window_at, window_indices
from vidpipe.core.errors import VidpipeError
from vidpipe.store.labels import LABELS_FILE, LabelSet, build_labels
from vidpipe.store.cache import FeatureStore

__all__ = ["TrainWindows", "VideoData", "feature_dims", "feature_statistics", "held_out_videos",
           "load_videos", "resolve_labels", "segment_long_memory"]


@dataclass
class VideoData:
    """One video's features and labels, aligned step by step."""
    rgb: np.ndarray        # (T, Dr) float32
    flow: np.ndarray       # (T, Df) float32
    targets: np.ndarray    # (T, C+1) float32
    ambiguous: np.ndarray  # (T,) bool

    def __len__(self) -> int:
        return len(self.rgb)


def resolve_labels(store: FeatureStore, labels: str | Path | None) -> tuple[LabelSet, str]:
    """The LabelSet of a cache and where it came from (for messages).

    `labels`: None -> `<cache>/labels.h5`; a `.h5` file -> a saved LabelSet; anything else is
    an annotation file (CSV / THUMOS txt folder / JSON) read onto the cache's steps.
    """
    path = Path(labels) if labels is not None else store.root / LABELS_FILE
    if labels is None and not path.is_file():
        raise VidpipeError(f"{path}: labels file not found; make it with `vidpipe labels` or "
                           f"`vidpipe import-features`, or pass --labels")
    if path.suffix == ".h5":
        return LabelSet.load(path), str(path)
    return build_labels(store, path), str(path)


def load_videos(store: FeatureStore, labels: LabelSet, video_ids: list[str],
                labels_source: str = "labels",
                empty_target_rows: str = "background") -> dict[str, VideoData]:
    """Features and labels of `video_ids`, in memory (the whole split is read once).

    `empty_target_rows` (`data.empty_target_rows`): a step that is neither ambiguous nor of
    any class (an all-zero row, as LSTR target files can have) becomes background, or stays
    all-zero (`zero_loss`: the loss gives it 0 and still counts it in the mean, as LSTR's MCE,
    criterions.py:63-67 at f910dd9). Per-frame AP is the same either way (background is out
    of the mean).
    """
    if empty_target_rows not in ("background", "zero_loss"):
        raise ValueError(f"empty_target_rows must be 'background' or 'zero_loss', got {empty_target_rows!r}")
    videos = {}
    for video_id in video_ids:
        if video_id not in store:
            raise VidpipeError(f"{labels_source}: video '{video_id}' is not in the cache {store.root}")
        features = store.read(video_id)
        video_labels = labels.videos[video_id]
        if len(video_labels.targets) != len(features):
            raise VidpipeError(f"{labels_source}: video '{video_id}' has {len(video_labels.targets)} "
                               f"labelled steps but {len(features)} feature steps in {store.root}")
        targets = video_labels.targets.astype(np.float32)         # a copy
        if empty_target_rows == "background":
            targets[targets.sum(axis=1) == 0, 0] = 1
        videos[video_id] = VideoData(features.rgb, features.flow, targets,
                                     video_labels.ambiguous.astype(bool))
    return videos


def feature_statistics(videos: dict[str, VideoData]) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) (Dr+Df,) that standardise concat(rgb, flow) over all steps of `videos`.

    shift: each dimension's mean; scale: one value per modality (the standard deviation of all
    its centred values), so RGB and flow get the same weight while dimensions that never vary
    in training cannot blow up at test time.
    """
    parts = []
    for modality in ("rgb", "flow"):
        values = np.concatenate([getattr(v, modality) for v in videos.values()]).astype(np.float64)
        mean = values.mean(axis=0)
        std = max(float((values - mean).std()), 1e-6)
        parts.append((mean, np.full_like(mean, std)))
    return (np.concatenate([p[0] for p in parts]).astype(np.float32),
            np.concatenate([p[1] for p in parts]).astype(np.float32))


class TrainWindows(Dataset):
    """Non-overlapping full windows with a random offset per video and epoch (`set_epoch`).

    The offsets depend only on (seed, epoch), so every DDP process builds the same list and a
    resumed run sees the windows an uninterrupted run would. `long_memory_sampler`: `grid`
    (the inference rule, malt.window) or `segment` (`segment_long_memory`).
    """

    def __init__(self, videos: dict[str, VideoData], cfg: ModelConfig, seed: int = 0,
                 long_memory_sampler: str = "grid"):
        if long_memory_sampler not in ("grid", "segment"):
            raise ValueError(f"long_memory_sampler must be 'grid' or 'segment', got {long_memory_sampler!r}")
        self.videos = videos
        self.cfg = cfg
        self.seed = seed
        self.long_memory_sampler = long_memory_sampler
        self.windows: list[tuple[str, int]] = []   # (video id, last step t)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        length = self.cfg.short_memory_steps
        self.windows = []
        for video_id in sorted(self.videos):
            offset = int(rng.integers(length))
            ends = range(offset + length - 1, len(self.videos[video_id]), length)
            self.windows.extend((video_id, t) for t in ends)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        video_id, t = self.windows[index]
        video = self.videos[video_id]
        _, short_idx = window_indices(t, self.cfg)
        if self.long_memory_sampler == "segment":
            long_idx, long_valid = segment_long_memory(int(short_idx[0]), self.cfg)
            window = window_at(video.rgb, video.flow, long_idx, long_valid, short_idx)
        else:
            window = gather_window(video.rgb, video.flow, t, self.cfg)
        sample = {name: torch.from_numpy(np.ascontiguousarray(array))
                  for name, array in window._asdict().items()}   # rgb_long (L, Dr) ... flow_short (S, Df)
        sample["targets"] = torch.from_numpy(video.targets[short_idx])     # (S, C+1)
        sample["valid"] = torch.from_numpy(~video.ambiguous[short_idx])    # (S,)
        sample["window"] = torch.tensor(index)     # names the video in error messages
        return sample

    def video_of(self, index: int) -> str:
        return self.windows[index][0]


def segment_long_memory(short_start: int, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """LSTR's training long memory for a short memory starting at step `short_start`:
    (long_idx (L,), long_valid (L,) bool).

    L = long_memory_steps / stride slots spread evenly (linspace, truncated to integers) over
    the span max(0, s - long_memory_steps) .. s - 1, so a short history is repeated rather
    than padded; slots holding step 0 are masked except the last of them (with no history at
    all, s = 0, every slot holds step 0 and only the newest is seen). Source:
    LSTRDataLayer.segment_sampler and __getitem__, datasets/perframe_data_layers.py:49-51,
    79-84 and 94-98 (LSTR; the same lines at the authors' f910dd9).
    """
    start, end = max(0, short_start - cfg.long_memory_steps), short_start - 1
    long_idx = np.sort(np.linspace(start, end, num_long_tokens(cfg))).astype(np.int64).clip(0)
    long_valid = np.ones(len(long_idx), bool)
    last_zero = int(np.searchsorted(long_idx, 0, side="right")) - 1
    long_valid[:max(last_zero, 0)] = False
    return long_idx, long_valid


def held_out_videos(video_ids: list[str], fraction: float, seed: int) -> list[str]:
    """The validation videos of `data.val_fraction`: round(fraction * n) of `video_ids` (at
    least 1), drawn by a generator seeded with `seed` from the sorted ids, so that the same
    labels and seed always hold out the same videos, in any process."""
    ids = sorted(video_ids)
    count = max(1, round(fraction * len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:count])


def feature_dims(store: FeatureStore, videos: dict[str, VideoData]) -> tuple[int, int]:
    """(rgb_dim, flow_dim): from the cache's manifest settings (extracted caches record them),
    else from the videos already loaded (imported caches record no sizes)."""
    settings = store.settings or {}
    if "rgb_dim" in settings and "flow_dim" in settings:
        return int(settings["rgb_dim"]), int(settings["flow_dim"])
    first = next(iter(videos.values()))
    return first.rgb.shape[1], first.flow.shape[1]
