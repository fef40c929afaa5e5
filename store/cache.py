"""The feature store: one folder, a manifest and one HDF5 file per video.

Layout (see ../shared/design.md):
    cache/manifest.json         {"format_version", "settings"}: settings shared by every video
    cache/videos/<video_id>.h5  datasets rgb (T, Dr), flow (T, Df), timestamps (T,);
                                attributes describe the source (path, size, mtime, fingerprint...)

Step i of a video starts at `timestamps[i]` seconds of the source and lasts
`settings["step_seconds"]` (chunk / fps; 0.25 s by default).

Crash safety: HDF5 is not safe while open for writing, so each video is written to a
temporary file in the same folder and moved into place with `os.replace`. A reader never
sees a half-written file; a kill loses at most the video in progress. The manifest is
created exclusively (core.atomic): of two processes creating the same new cache with
different settings, exactly one wins.

Self-describing, verified files: each .h5 also carries the manifest settings it was made
with (attribute `cache_settings`) and a sha256 of its three datasets (`checksum`).
`read` verifies both by default (`verify=False` skips the hash), so damaged bytes, a
missing dataset or features made with other settings are a one-line error, never silently
wrong data; `check` names the problem without raising (extract re-extracts such files).
The manifest can be rebuilt from the files (`check_cache(root, repair=True)`, the CLI's
`vidpipe cache repair`).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from vidpipe.core.atomic import TEMP_PREFIX, atomic_path, remove_stale_temporaries
from vidpipe.core.errors import DiskFull, VidpipeError, first_line
from vidpipe.core.lock import Claim
from vidpipe.core.settings import differing_keys

FORMAT_VERSION = 2             # 2: every video file carries its settings and a checksum
MANIFEST = "manifest.json"
VIDEOS_DIR = "videos"
DAMAGED_DIR = "damaged"        # where `repair` moves files it cannot vouch for
CLAIMS_DIR = ".claims"         # per-video claims of running extractions (core.lock)
DATASETS = ("rgb", "flow", "timestamps")
SETTINGS_ATTR = "cache_settings"
CHECKSUM_ATTR = "checksum"
BLOCK_STEPS = 4096             # steps read at a time where a video is read in blocks


class DamagedFile(VidpipeError):
    """A cache file that cannot be trusted: `diagnosis` names it and what is wrong, the
    message adds how to fix it."""

    def __init__(self, diagnosis: str, fix: str):
        super().__init__(f"{diagnosis}; {fix}")
        self.diagnosis = diagnosis


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


def datasets_checksum(arrays: Mapping[str, np.ndarray | h5py.Dataset]) -> str:
    """sha256 over each dataset's name, dtype, shape and bytes, in DATASETS order (an HDF5
    dataset is read BLOCK_STEPS rows at a time: the same bytes, in the same order)."""
    digest = hashlib.sha256()
    for name in DATASETS:
        data = arrays[name]
        digest.update(f"{name}:{data.dtype.str}:{data.shape};".encode())
        for start in range(0, len(data), BLOCK_STEPS):
            digest.update(memoryview(np.ascontiguousarray(data[start:start + BLOCK_STEPS])).cast("B"))
    return f"sha256:{digest.hexdigest()}"


def _manifest_text(settings: dict[str, Any]) -> str:
    return json.dumps({"format_version": FORMAT_VERSION, "settings": settings},
                      indent=2, sort_keys=True)


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest's settings; any damage is a one-line error that names the repair."""
    manifest = root / MANIFEST
    repair = f"rebuild it from the video files with `vidpipe cache repair {root}`"
    try:
        data = json.loads(manifest.read_bytes())
    except (ValueError, RecursionError) as exc:   # JSON and UTF-8 errors are ValueErrors
        raise VidpipeError(f"{manifest}: corrupt manifest ({first_line(exc)}); {repair}") from None
    except OSError as exc:
        raise VidpipeError(f"{manifest}: unreadable manifest ({first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise VidpipeError(f"{manifest}: corrupt manifest (expected an object with a "
                           f"'settings' mapping); {repair}")
    if data.get("format_version") == 1:
        raise VidpipeError(f"{manifest}: cache of format 1 (an older vidpipe: files without "
                           f"settings or checksums); `vidpipe cache repair {root}` upgrades it")
    if data.get("format_version") != FORMAT_VERSION:
        raise VidpipeError(f"{manifest}: cache format {data.get('format_version')!r} is not "
                           f"supported (expected {FORMAT_VERSION}); extract into a new cache")
    return data["settings"]


class FeatureStore:
    """Read and write a feature cache folder. Open with `open` or `open_or_create`."""

    def __init__(self, root: str | Path, settings: dict[str, Any] | None):
        self.root = Path(root)
        self.settings = settings

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        """An existing cache; a missing, foreign or damaged folder is a user error."""
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise VidpipeError(f"{root}: not a vidpipe feature cache (no {MANIFEST}); "
                               "create one with `vidpipe extract` or `vidpipe import-features`")
        return cls(root, _read_manifest(root))

    @classmethod
    def open_or_create(cls, root: str | Path, settings: dict[str, Any]) -> "FeatureStore":
        """Open `root` for writing videos made with `settings`.

        A cache made with other settings is refused: one cache, one set of settings. That
        holds when the manifest was lost too (its video files say how they were made), and
        against a concurrent creator (the manifest is created exclusively).
        """
        root = Path(root)
        settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists, ...)
        if not (root / MANIFEST).exists():
            others = [s for s in files_settings(root / VIDEOS_DIR) if s != settings]
            if others:
                raise VidpipeError(
                    f"{root}: no {MANIFEST}, and its video files were made with other settings "
                    f"(differs in: {', '.join(differing_keys(others[0], settings))}); restore "
                    f"the manifest with `vidpipe cache repair {root}` or use another --out")
            created = [folder for folder in (root, root / VIDEOS_DIR) if not folder.exists()]
            try:
                (root / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
                with atomic_path(root / MANIFEST, exclusive=True) as temp:
                    temp.write_text(_manifest_text(settings))
            except FileExistsError:
                pass   # another process created it first: its settings are compared below
            except (DiskFull, OSError):   # a full disk: leave no empty cache behind
                for folder in reversed(created):
                    with contextlib.suppress(OSError):
                        folder.rmdir()    # only if still empty
                raise
        store = cls.open(root)
        if store.settings != settings:
            diff = differing_keys(store.settings, settings)
            raise VidpipeError(
                f"{root}: cache was made with other settings (differs in: "
                f"{', '.join(diff)}); use another --out folder")
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

    def read(self, video_id: str, verify: bool = True) -> VideoFeatures:
        """A video's features; with `verify` (the default) its checksum and settings are
        checked, and a damaged or foreign file is a one-line error."""
        with self._open_h5(video_id) as h5:
            arrays = self._datasets(h5, video_id, DATASETS)
            attrs = _attributes(h5)
        if verify:
            problem = self._problem(arrays, attrs)
            if problem is not None:
                raise self._damaged(video_id, problem)
        return VideoFeatures(
            video_id=video_id,
            rgb=arrays["rgb"].astype(np.float32, copy=False),
            flow=arrays["flow"].astype(np.float32, copy=False),
            timestamps=arrays["timestamps"].astype(np.float64, copy=False),
            attrs={k: v for k, v in attrs.items() if k not in (SETTINGS_ATTR, CHECKSUM_ATTR)},
        )

    def read_steps(self, video_id: str) -> Iterator[VideoFeatures]:
        """A video's features in blocks of BLOCK_STEPS steps, so that a long video is never
        in memory whole (`vidpipe detect` on a cache id). Verified as `read` verifies, before
        the first block: the checksum is computed over the file, block by block."""
        with self._open_h5(video_id) as h5:
            datasets = self._unread_datasets(h5, video_id, DATASETS)
            with self._reading(video_id):
                problem = self._problem(datasets, _attributes(h5))
            if problem is not None:
                raise self._damaged(video_id, problem)
            for start in range(0, len(datasets["timestamps"]), BLOCK_STEPS):
                with self._reading(video_id):
                    block = {name: data[start:start + BLOCK_STEPS] for name, data in datasets.items()}
                yield VideoFeatures(video_id, block["rgb"].astype(np.float32, copy=False),
                                    block["flow"].astype(np.float32, copy=False),
                                    block["timestamps"].astype(np.float64, copy=False))

    def timestamps(self, video_id: str) -> np.ndarray:
        """A video's step start times (T,) without loading its features (the checksum is
        verified when the features are read)."""
        with self._open_h5(video_id) as h5:
            return self._datasets(h5, video_id, ("timestamps",))["timestamps"].astype(
                np.float64, copy=False)

    def num_steps(self, video_id: str) -> int:
        return len(self.timestamps(video_id))

    def check(self, video_id: str) -> str | None:
        """Why this video's file cannot be trusted (missing or damaged datasets, checksum,
        other settings: "PATH: damaged cache file: PROBLEM", without the advice a read's
        error adds), or None when it is sound."""
        try:
            with self._open_h5(video_id) as h5:
                arrays = self._datasets(h5, video_id, DATASETS)
                attrs = _attributes(h5)
        except DamagedFile as exc:
            return exc.diagnosis
        except VidpipeError as exc:
            return str(exc)
        problem = self._problem(arrays, attrs)
        return None if problem is None else self._damaged(video_id, problem).diagnosis

    def _problem(self, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> str | None:
        lengths = {name: len(array) for name, array in arrays.items()}
        if len(set(lengths.values())) != 1:
            return f"datasets differ in length ({lengths})"
        if attrs.get(CHECKSUM_ATTR) != datasets_checksum(arrays):
            return "checksum mismatch (damaged bytes)" if CHECKSUM_ATTR in attrs else "no checksum"
        made_with = attrs.get(SETTINGS_ATTR)
        if self.settings is not None and made_with != self.settings:
            if not isinstance(made_with, dict):
                return "no settings record"
            return (f"made with other settings than the manifest's (differs in: "
                    f"{', '.join(differing_keys(made_with, self.settings))})")
        return None

    def _damaged(self, video_id: str, problem: str) -> DamagedFile:
        return DamagedFile(f"{self._path(video_id)}: damaged cache file: {problem}",
                           _fix_damaged(self.root))

    def _datasets(self, h5: h5py.File, video_id: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        datasets = self._unread_datasets(h5, video_id, names)
        with self._reading(video_id):
            return {name: data[()] for name, data in datasets.items()}

    def _unread_datasets(self, h5: h5py.File, video_id: str, names: tuple[str, ...]) -> dict[str, h5py.Dataset]:
        missing = [name for name in names if name not in h5]
        if missing:
            raise self._damaged(video_id, f"no {', '.join(missing)} dataset")
        with self._reading(video_id):
            return {name: h5[name] for name in names}

    @contextlib.contextmanager
    def _reading(self, video_id: str) -> Iterator[None]:
        try:
            yield
        except (OSError, KeyError, ValueError) as exc:   # HDF5's errors on damaged structure
            raise self._damaged(video_id, first_line(exc)) from None

    def _open_h5(self, video_id: str) -> h5py.File:
        path = self._path(video_id)
        if not path.is_file():
            raise VidpipeError(f"{self.root}: video '{video_id}' is not in this cache")
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            raise self._damaged(video_id, f"unreadable ({first_line(exc)})") from None

    # -- writing ------------------------------------------------------------------------
    def write(self, video_id: str, rgb: np.ndarray, flow: np.ndarray,
              timestamps: np.ndarray, attrs: dict[str, Any] | None = None) -> Path:
        """Write one video atomically (core.atomic), with its settings and checksum."""
        if not (len(rgb) == len(flow) == len(timestamps)):
            raise ValueError(f"{video_id}: rgb {rgb.shape}, flow {flow.shape} and "
                             f"timestamps {timestamps.shape} differ in length")
        arrays = {"rgb": np.asarray(rgb, np.float32), "flow": np.asarray(flow, np.float32),
                  "timestamps": np.asarray(timestamps, np.float64)}
        attrs = {"video_id": video_id, **(attrs or {}), SETTINGS_ATTR: self.settings,
                 CHECKSUM_ATTR: datasets_checksum(arrays)}
        # Built in memory, then written in one go: on a full disk the write fails cleanly in
        # Python (core.atomic: DiskFull), not inside HDF5, whose failed flushes crash the process.
        image = io.BytesIO()
        with h5py.File(image, "w") as h5:
            for name in DATASETS:
                h5.create_dataset(name, data=arrays[name])
            for key, value in attrs.items():
                h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        with atomic_path(self._path(video_id), suffix=".h5") as tmp, open(tmp, "wb") as file:
            file.write(image.getbuffer())
        return self._path(video_id)

    def claim(self, video_id: str) -> Claim:
        """A claim on one video (core.lock): two extractions into this cache share the work,
        each video extracted by whichever claims it first."""
        return Claim(self.root / CLAIMS_DIR / f"{video_id}.claim")

    def remove_stale_temporaries(self) -> None:
        """Delete what killed writers left behind (core.atomic.remove_stale_temporaries)."""
        for folder in (self.root, self.videos_dir):
            remove_stale_temporaries(folder)


def files_settings(videos_dir: Path) -> list[dict[str, Any]]:
    """The distinct settings records carried by the readable files in `videos_dir`."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(videos_dir.glob("*.h5")) if videos_dir.is_dir() else []:
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            with h5py.File(path, "r") as h5:
                record = _plain(h5.attrs.get(SETTINGS_ATTR))
        except OSError:
            continue
        if isinstance(record, dict):
            found.setdefault(json.dumps(record, sort_keys=True), record)
    return list(found.values())


@dataclass
class CacheCheck:
    """What `check_cache` found (and, with repair, did)."""
    root: str
    videos: int = 0
    manifest_problem: str | None = None         # the manifest's error, if it had one
    manifest_rebuilt: bool = False
    damaged: list[str] = field(default_factory=list)   # one line per untrustworthy file
    moved: list[str] = field(default_factory=list)     # files repair moved to DAMAGED_DIR
    upgraded: int = 0            # format-1 files repair gave their settings and checksum

    @property
    def ok(self) -> bool:
        return self.manifest_problem is None and not self.damaged

    def report(self) -> str:
        sound = self.videos - len(self.damaged)
        lines = [f"{self.root}: {self.videos} videos, {sound} sound, {len(self.damaged)} damaged"
                 + ("; manifest rebuilt from the files" if self.manifest_rebuilt else "")
                 + (f"; {len(self.moved)} moved to {DAMAGED_DIR}/ (extract redoes them)"
                    if self.moved else "")
                 + (f"; {self.upgraded} format-1 files given their settings and checksum "
                    "(from now on verified)" if self.upgraded else "")]
        if self.manifest_problem and not self.manifest_rebuilt:
            lines.append(f"  manifest: {self.manifest_problem}")
        lines += [f"  damaged: {line}" for line in self.damaged]
        if len(self.damaged) > len(self.moved):
            lines.append(f"  to fix: {_fix_damaged(Path(self.root))}")
        return "\n".join(lines)


def _fix_damaged(root: Path) -> str:
    return f"rerun `vidpipe extract` to extract it again, or `vidpipe cache repair {root}`"


def check_cache(root: str | Path, repair: bool = False) -> CacheCheck:
    """Verify every file of a cache (datasets, checksum, settings) and its manifest.

    With `repair`: a missing or damaged manifest is rebuilt from the settings most of the
    sound files carry, and files that cannot be trusted are moved to DAMAGED_DIR (kept for
    inspection, invisible to readers; `vidpipe extract` extracts those videos again). A
    format-1 cache (an older vidpipe) is upgraded: its files are given the manifest's
    settings and a checksum of the bytes they hold now.
    """
    root = Path(root)
    if not (root / MANIFEST).is_file() and not (root / VIDEOS_DIR).is_dir():
        raise VidpipeError(f"{root}: not a vidpipe feature cache (no {MANIFEST}, no {VIDEOS_DIR}/)")
    result = CacheCheck(str(root))
    format1 = None
    try:
        store = FeatureStore.open(root)
    except VidpipeError as exc:
        result.manifest_problem = str(exc)
        format1 = _format1_settings(root) if repair else None
        settings = format1 if format1 is not None else (
            _majority_settings(root / VIDEOS_DIR) if repair else None)
        store = FeatureStore(root, settings)
    for video_id in store.video_ids():
        result.videos += 1
        if format1 is not None and _upgrade_format1(store, video_id):
            result.upgraded += 1
        problem = store.check(video_id)
        if problem is None:
            continue
        result.damaged.append(problem)
        if repair:
            (root / DAMAGED_DIR).mkdir(exist_ok=True)
            store._path(video_id).replace(root / DAMAGED_DIR / f"{video_id}.h5")
            result.moved.append(video_id)
            result.damaged[-1] = f"{problem}; moved to {DAMAGED_DIR}/ (`vidpipe extract` extracts it again)"
    if repair and result.manifest_problem is not None:   # last: a killed repair can rerun
        with atomic_path(root / MANIFEST) as temp:
            temp.write_text(_manifest_text(store.settings))
        result.manifest_rebuilt = True
    return result


def _format1_settings(root: Path) -> dict[str, Any] | None:
    """The settings of a format-1 manifest, else None."""
    try:
        data = json.loads((root / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(data, dict) and data.get("format_version") == 1 \
            and isinstance(data.get("settings"), dict):
        return data["settings"]
    return None


def _upgrade_format1(store: FeatureStore, video_id: str) -> bool:
    """Rewrite a format-1 file (no settings, no checksum) with both, atomically; False when
    it is not one or its datasets are incomplete (then `check` says why)."""
    try:
        with store._open_h5(video_id) as h5:
            attrs = _attributes(h5)
            if SETTINGS_ATTR in attrs or CHECKSUM_ATTR in attrs:
                return False
            arrays = store._datasets(h5, video_id, DATASETS)
        store.write(video_id, arrays["rgb"], arrays["flow"], arrays["timestamps"], attrs)
    except (VidpipeError, ValueError):   # unreadable, a dataset missing, lengths differ
        return False
    return True


def _majority_settings(videos_dir: Path) -> dict[str, Any]:
    """The settings record most sound files carry (to rebuild a lost manifest)."""
    counts: collections.Counter[str] = collections.Counter()
    for settings in files_settings(videos_dir):
        sound = FeatureStore(videos_dir.parent, settings)
        key = json.dumps(settings, sort_keys=True)
        counts[key] = sum(sound.check(video_id) is None for video_id in sound.video_ids())
    if not counts or counts.most_common(1)[0][1] == 0:
        raise VidpipeError(f"{videos_dir}: no sound video file to rebuild the manifest from; "
                           "extract into a new cache")
    return json.loads(counts.most_common(1)[0][0])
