"""Per-step labels, kept beside the features (never inside them).

A `LabelSet` holds, for each video of a cache, soft targets `(T, C+1)` on the cache's own
steps (column 0 is background) and a mask of ambiguous steps that metrics and losses
ignore, plus the class names and each video's split. It is saved as `labels.h5` in the
cache folder by default.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import VidpipeError

LABELS_FILE = "labels.h5"
BACKGROUND = "background"


@dataclass
class VideoLabels:
    targets: np.ndarray    # (T, C+1) float32, rows sum to 1 where not ambiguous
    ambiguous: np.ndarray  # (T,) bool, steps to ignore


@dataclass
class LabelSet:
    class_names: list[str]                  # C+1 names, [0] == "background"
    videos: dict[str, VideoLabels]
    splits: dict[str, str] = field(default_factory=dict)  # video_id -> "train" | "test"

    @property
    def num_classes(self) -> int:
        """C+1, background included."""
        return len(self.class_names)

    def split(self, name: str) -> list[str]:
        """Video ids of one split, sorted; all videos when no split was recorded."""
        if not self.splits:
            return sorted(self.videos)
        return sorted(v for v, s in self.splits.items() if s == name and v in self.videos)

    def save(self, path: str | Path) -> None:
        """Atomic write: temporary file in the same folder, then os.replace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-labels-", suffix=".h5", dir=path.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as h5:
                h5.attrs["class_names"] = json.dumps(self.class_names)
                h5.attrs["splits"] = json.dumps(self.splits)
                for video_id, labels in self.videos.items():
                    group = h5.create_group(video_id)
                    group.create_dataset("targets", data=labels.targets.astype(np.float32))
                    group.create_dataset("ambiguous", data=labels.ambiguous.astype(bool))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "LabelSet":
        path = Path(path)
        if not path.is_file():
            raise VidpipeError(f"{path}: labels file not found")
        try:
            with h5py.File(path, "r") as h5:
                return cls(
                    class_names=json.loads(h5.attrs["class_names"]),
                    splits=json.loads(h5.attrs["splits"]),
                    videos={vid: VideoLabels(g["targets"][()], g["ambiguous"][()])
                            for vid, g in h5.items()},
                )
        except (OSError, KeyError) as exc:
            raise VidpipeError(f"{path}: not a vidpipe labels file ({exc})") from None
