"""The feature store: one folder, a manifest and one HDF5 file per video.

Layout (see ../shared/design.md):
    cache/manifest.json         {"format_version", "settings"}: settings shared by every video
    cache/videos/<video_id>.h5  datasets rgb (T, Dr), flow (T, Df), timestamps (T,);
                                attributes describe the source (path, size, mtime, fingerprint...)

Step i of a video starts at `timestamps[i]` seconds of the source and lasts
`settings["step_seconds"]` (chunk / fps; 0.25 s by default).

Crash safety: HDF5 is not safe while open for writing, so each video is written to a
temporary file in the same folder and moved into place with `os.replace`. A reader never
sees a half-written file; a kill loses at most the video in progress.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vidpipe.core.atomic import TEMP_PREFIX, atomic_path, is_stale_temporary, write_text_atomically
from vidpipe.core.errors import VidpipeError
from vidpipe.core.settings import differing_keys

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VIDEOS_DIR = "videos"


@dataclass
class VideoFeatures:
    video_id: str
    rgb: np.ndarray         # (T, Dr) float32
    flow: np.ndarray        # (T, Df) float32
    timestamps: np.ndarray  # (T,) float64, seconds in the source video
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.timestamps)


def video_id_from_path(relative_path: str | Path) -> str:
    """Filesystem-safe id for a video's path relative to the input folder.

    'a/b c.mp4' -> 'a__b_c.mp4'. The original path is kept in the file's attributes.
    """
    text = Path(relative_path).as_posix()
    return re.sub(r"[^A-Za-z0-9._-]", "_", text.replace("/", "__")).lstrip(".") or "video"


def _attributes(h5: h5py.File) -> dict[str, Any]:
    return {key: _plain(value) for key, value in h5.attrs.items()}


def _plain(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (JSON-encoded dicts are decoded)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


class FeatureStore:
    """Read and write a feature cache folder. Open with `open` or `open_or_create`."""

    def __init__(self, root: str | Path, settings: dict[str, Any]):
        self.root = Path(root)
        self.settings = settings

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        """An existing cache; a missing or foreign folder is a user error."""
        root = Path(root)
        manifest = root / MANIFEST
        if not manifest.is_file():
            raise VidpipeError(f"{root}: not a vidpipe feature cache (no {MANIFEST}); "
                               "create one with `vidpipe extract` or `vidpipe import-features`")
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise VidpipeError(f"{manifest}: corrupt manifest ({exc})") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise VidpipeError(f"{manifest}: cache format {data.get('format_version')} "
                               f"is not supported (expected {FORMAT_VERSION})")
        return cls(root, data["settings"])

    @classmethod
    def open_or_create(cls, root: str | Path, settings: dict[str, Any]) -> "FeatureStore":
        """Open `root` for writing videos made with `settings`.

        A cache made with other settings is refused: one cache, one set of settings.
        """
        root = Path(root)
        settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists, ...)
        if (root / MANIFEST).exists():
            store = cls.open(root)
            if store.settings != settings:
                diff = differing_keys(store.settings, settings)
                raise VidpipeError(
                    f"{root}: cache was made with other settings (differs in: "
                    f"{', '.join(diff)}); use another --out folder")
        else:
            (root / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
            write_text_atomically(root / MANIFEST, json.dumps(
                {"format_version": FORMAT_VERSION, "settings": settings}, indent=2, sort_keys=True))
            store = cls(root, settings)
        store.remove_stale_temporaries()
        return store

    # -- reading ------------------------------------------------------------------------
    @property
    def videos_dir(self) -> Path:
        return self.root / VIDEOS_DIR

    def _path(self, video_id: str) -> Path:
        return self.videos_dir / f"{video_id}.h5"

    def video_ids(self) -> list[str]:
        if not self.videos_dir.is_dir():
            return []
        return sorted(p.stem for p in self.videos_dir.glob("*.h5")
                      if not p.name.startswith(TEMP_PREFIX))

    def __contains__(self, video_id: str) -> bool:
        return self._path(video_id).is_file()

    def __len__(self) -> int:
        return len(self.video_ids())

    def attrs(self, video_id: str) -> dict[str, Any]:
        """A video's attributes without loading its arrays."""
        with self._open_h5(video_id) as h5:
            return _attributes(h5)

    def read(self, video_id: str) -> VideoFeatures:
        with self._open_h5(video_id) as h5:
            return VideoFeatures(
                video_id=video_id,
                rgb=h5["rgb"][()].astype(np.float32, copy=False),
                flow=h5["flow"][()].astype(np.float32, copy=False),
                timestamps=h5["timestamps"][()].astype(np.float64, copy=False),
                attrs=_attributes(h5),
            )

    def timestamps(self, video_id: str) -> np.ndarray:
        """A video's step start times (T,) without loading its features."""
        with self._open_h5(video_id) as h5:
            return h5["timestamps"][()].astype(np.float64, copy=False)

    def num_steps(self, video_id: str) -> int:
        with self._open_h5(video_id) as h5:
            return int(h5["timestamps"].shape[0])

    def _open_h5(self, video_id: str) -> h5py.File:
        path = self._path(video_id)
        if not path.is_file():
            raise VidpipeError(f"{self.root}: video '{video_id}' is not in this cache")
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            raise VidpipeError(f"{path}: unreadable cache file ({exc})") from None

    # -- writing ------------------------------------------------------------------------
    def write(self, video_id: str, rgb: np.ndarray, flow: np.ndarray,
              timestamps: np.ndarray, attrs: dict[str, Any] | None = None) -> Path:
        """Write one video atomically (core.atomic)."""
        if not (len(rgb) == len(flow) == len(timestamps)):
            raise ValueError(f"{video_id}: rgb {rgb.shape}, flow {flow.shape} and "
                             f"timestamps {timestamps.shape} differ in length")
        with atomic_path(self._path(video_id), suffix=".h5") as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("rgb", data=np.asarray(rgb, np.float32))
                h5.create_dataset("flow", data=np.asarray(flow, np.float32))
                h5.create_dataset("timestamps", data=np.asarray(timestamps, np.float64))
                for key, value in {"video_id": video_id, **(attrs or {})}.items():
                    h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        return self._path(video_id)

    def remove_stale_temporaries(self) -> None:
        """Delete what killed writers left behind (never visible to readers).

        Files of writers still running (other ranks, other workers) are left alone.
        """
        for folder in (self.root, self.videos_dir):
            if folder.is_dir():
                for tmp in folder.glob(TEMP_PREFIX + "*"):
                    if is_stale_temporary(tmp):
                        tmp.unlink(missing_ok=True)
