"""Per-step labels, kept beside the features (never inside them).

A `LabelSet` holds, for each video of a cache, soft targets `(T, C+1)` on the cache's own
steps (column 0 is background), a mask of ambiguous steps that metrics and losses
ignore, and the annotated action segments the targets were built from (what event metrics,
calibration and the timeline's ground-truth band read), plus the class names and each
video's split. It is saved as `labels.h5` in the cache folder by default.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vidpipe.core.atomic import atomic_path
from vidpipe.core.errors import VidpipeError, first_line

log = logging.getLogger(__name__)

LABELS_FILE = "labels.h5"
BACKGROUND = "background"


@dataclass
class Segment:
    """An action segment [start_s, end_s) of one class in seconds of its video: annotated
    (score None) or detected (`pipeline.timeline`: score = mean probability over it)."""
    label: str
    start_s: float
    end_s: float
    score: float | None = None
    video: str = ""        # annotations: the video as the file names it
    where: str = ""        # annotations: "file:line", for error messages


@dataclass
class VideoLabels:
    targets: np.ndarray    # (T, C+1) float32, rows sum to 1 where not ambiguous
    ambiguous: np.ndarray  # (T,) bool, steps to ignore
    segments: list[Segment] | None = None   # annotated action segments, sorted by start (and
                                            # label) by build_labels; None: not recorded
                                            # (imported targets, labels.h5 of vidpipe < 0.2)


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
        """Atomic write (core.atomic): a reader never sees a half-written file."""
        with atomic_path(path, suffix=".h5") as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.attrs["class_names"] = json.dumps(self.class_names)
                h5.attrs["splits"] = json.dumps(self.splits)
                for video_id, labels in self.videos.items():
                    group = h5.create_group(video_id)
                    group.create_dataset("targets", data=labels.targets.astype(np.float32))
                    group.create_dataset("ambiguous", data=labels.ambiguous.astype(bool))
                    if labels.segments is not None:
                        group.attrs["segments"] = json.dumps(
                            [[seg.label, seg.start_s, seg.end_s] for seg in labels.segments])

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
                    videos={vid: VideoLabels(g["targets"][()], g["ambiguous"][()],
                                             _load_segments(g.attrs.get("segments")))
                            for vid, g in h5.items()},
                )
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise VidpipeError(f"{path}: not a vidpipe labels file ({exc})") from None

    def segments(self, video_id: str, timestamps: np.ndarray,
                 step_seconds: float) -> list[Segment]:
        """The ground-truth action segments of a video, sorted by start: the annotated ones,
        or, where none were recorded (imported targets, an older labels.h5), the runs of
        steps of each class in the targets (step i covering [t_i, t_i + step_seconds))."""
        labels = self.videos[video_id]
        if labels.segments is not None:
            return list(labels.segments)
        return segments_from_targets(labels.targets, timestamps, step_seconds, self.class_names)


def _load_segments(text) -> list[Segment] | None:
    if text is None:
        return None
    return [Segment(str(label), float(start), float(end)) for label, start, end in json.loads(text)]


def segments_from_targets(targets: np.ndarray, timestamps: np.ndarray, step_seconds: float,
                          class_names: list[str]) -> list[Segment]:
    """Runs of steps where a class's target is > 0 -> segments, sorted by start (background,
    column 0, makes none)."""
    starts = np.asarray(timestamps, np.float64)
    segments = []
    for column in range(1, len(class_names)):
        active = np.r_[False, np.asarray(targets)[:, column] > 0, False].astype(np.int8)
        edges = np.flatnonzero(np.diff(active))            # run starts, run ends (exclusive)
        for first, end in zip(edges[::2], edges[1::2]):
            segments.append(Segment(class_names[column], float(starts[first]),
                                    float(starts[end - 1] + step_seconds)))
    return sorted(segments, key=lambda s: (s.start_s, s.label))


# --- annotations -> LabelSet ------------------------------------------------------------------
#
# Four annotation formats, one meaning: a list of (video, label, start_s, end_s) segments in
# seconds of the source video, plus optionally each video's split.
#
#   CSV   header `video,label,start_s,end_s[,split]` (the header line is optional when the
#         columns come in this order). `split` is `train` or `test`.
#   THUMOS'14  a folder (or one file) of per-class `<Class>_val.txt` / `<Class>_test.txt`
#         files, one `video_name start end` per line; `_val` videos are the training split,
#         `_test` videos the test split (the standard protocol).
#   JSON  {"classes": ["Bounce", "Spin", ...],              (optional: column order)
#          "videos": {"clip01": {"split": "train",         (optional)
#                                "segments": [{"label": "Bounce", "start_s": 1.0, "end_s": 3.5},
#                                             ...]}}}
#   ActivityNet-style JSON  {"database": {"clip01": {"subset": "training",
#                                "annotations": [{"segment": [1.0, 3.5], "label": "Bounce"}]}}}
#         (other keys ignored). Subsets: training -> train, testing/test -> test, and
#         validation -> test when the file has a training subset (ActivityNet's protocol),
#         else train (THUMOS'14 in this form: its validation videos are the training set).
#         In a file with a training subset, testing videos (annotations withheld) are left out.
#
# In every format the label `Ambiguous` (any case) marks steps that metrics and losses
# ignore, and the label `background` only lists a video (so a video without any action can
# be labelled); its times are ignored.
#
# Rule from segments to per-step targets, the field's rule: step i covers
# [t_i, t_i + step_seconds) and takes the labels of the segments that contain its centre
# t_i + step_seconds / 2 (half-open [start, end)). At 24 fps and 6 frames a chunk that centre
# is the time of the chunk's centre frame (frame 6i + 3, the one its RGB feature sees): the
# public THUMOS'14/TVSeries targets give each chunk the classes of its centre frame, several
# when actions overlap, background when none (as their authors describe them in MAT issue 8
# and MiniROAD issue 3); tests/test_labels.py checks the two rules agree. Differences of
# form only: a row is soft (1/k on each of its k classes, where the field's files hold 1 in
# each; `vidpipe export-features` writes them that way) and ambiguous steps are a mask beside
# the targets (the field's extra column). One of content: a segment shorter than a step that
# contains no centre labels the step it overlaps most, so no annotation is lost (the field's
# rule drops it). A step inside none is background (column 0).

AMBIGUOUS = "ambiguous"
SPLITS = ("train", "test")
CSV_COLUMNS = ("video", "label", "start_s", "end_s", "split")


@dataclass
class Annotations:
    """What an annotation file says, before it meets a cache."""
    segments: list[Segment]
    videos: list[str]                          # every video named, in file order
    splits: dict[str, str] = field(default_factory=dict)
    classes: list[str] | None = None           # the file's own class order, if it has one


def read_annotations(path: str | Path) -> Annotations:
    """Parse a CSV / JSON file or a THUMOS'14 folder or file, by its name."""
    path = Path(path)
    if not path.exists():
        raise VidpipeError(f"{path}: annotation file not found")
    if path.is_dir() or path.suffix.lower() == ".txt":
        return _read_thumos(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() == ".json":
        return _read_json(path)
    raise VidpipeError(f"{path}: unknown annotation format (expected .csv, .json, "
                       "or a THUMOS'14 folder of <Class>_val.txt / <Class>_test.txt files)")


def _segment(video: str, label: str, start: str | float, end: str | float,
             where: str) -> Segment:
    # JSON gives any type: true is not 1 s, {"name": ...} is not a class name
    if not isinstance(label, str):
        raise VidpipeError(f"{where}: label must be a class name (a string), got {label!r}")
    for value in (start, end):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise VidpipeError(f"{where}: start/end must be numbers of seconds, "
                               f"got {start!r}, {end!r}")
    label = label.strip()
    if not video.strip() or not label:
        raise VidpipeError(f"{where}: empty video name or label")
    if label.lower() == BACKGROUND:
        return Segment(BACKGROUND, 0.0, 0.0, video=video.strip(), where=where)
    try:
        start_s, end_s = float(start), float(end)
    except (TypeError, ValueError):
        raise VidpipeError(f"{where}: start/end must be numbers of seconds, "
                           f"got {start!r}, {end!r}") from None
    if not (np.isfinite(start_s) and np.isfinite(end_s)) or start_s < 0 or end_s <= start_s:
        raise VidpipeError(f"{where}: bad segment [{start_s}, {end_s}] "
                           "(need 0 <= start < end)")
    if label.lower() == AMBIGUOUS:
        label = AMBIGUOUS
    return Segment(label, start_s, end_s, video=video.strip(), where=where)


def _add_split(splits: dict[str, str], video: str, split: str, where: str) -> None:
    split = split.strip()
    if split not in SPLITS:
        raise VidpipeError(f"{where}: split must be 'train' or 'test', got {split!r}")
    if splits.setdefault(video, split) != split:
        raise VidpipeError(f"{where}: video '{video}' is in split '{splits[video]}' "
                           f"on an earlier line and '{split}' here")


def _read_csv(path: Path) -> Annotations:
    try:   # utf-8-sig: spreadsheet programs start their CSV files with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [(i, row) for i, row in enumerate(csv.reader(handle), 1)
                    if row and any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise VidpipeError(f"{path}: not a CSV text file ({first_line(exc)})") from None
    columns = list(CSV_COLUMNS[:4])
    if rows and rows[0][1][0].strip().lower() == "video":
        columns = [c.strip().lower() for c in rows.pop(0)[1]]
        missing = [c for c in CSV_COLUMNS[:4] if c not in columns]
        if missing:
            raise VidpipeError(f"{path}: header lacks column(s) {', '.join(missing)} "
                               f"(expected {','.join(CSV_COLUMNS)})")
    elif rows and len(rows[0][1]) == 5:
        columns = list(CSV_COLUMNS)
    annotations = Annotations(segments=[], videos=[])
    for line, row in rows:
        where = f"{path}:{line}"
        if len(row) != len(columns):
            raise VidpipeError(f"{where}: expected {len(columns)} columns "
                               f"({','.join(columns)}), got {len(row)}")
        record = dict(zip(columns, row))
        _collect(annotations, _segment(record["video"], record["label"],
                                       record["start_s"], record["end_s"], where))
        if record.get("split", "").strip():
            _add_split(annotations.splits, record["video"].strip(), record["split"], where)
    return annotations


def _read_thumos(path: Path) -> Annotations:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    pattern = re.compile(r"(.+)_(val|test)\.txt$")
    annotations = Annotations(segments=[], videos=[], classes=[])
    for file in files:
        match = pattern.match(file.name)
        if not match:
            if path.is_dir():
                continue  # README or other notes beside the class files
            raise VidpipeError(f"{file}: expected a THUMOS'14 file named <Class>_val.txt "
                               "or <Class>_test.txt")
        label, split = match.group(1), "train" if match.group(2) == "val" else "test"
        if label.lower() != AMBIGUOUS and label not in annotations.classes:
            annotations.classes.append(label)
        for line, text in enumerate(file.read_text().splitlines(), 1):
            fields = text.split()
            if not fields:
                continue
            where = f"{file}:{line}"
            if len(fields) != 3:
                raise VidpipeError(f"{where}: expected 'video_name start end', got {text!r}")
            _collect(annotations, _segment(fields[0], label, fields[1], fields[2], where))
            _add_split(annotations.splits, fields[0], split, where)
    if not annotations.segments:
        raise VidpipeError(f"{path}: no THUMOS'14 annotations found "
                           "(expected <Class>_val.txt / <Class>_test.txt files)")
    annotations.classes.sort()
    return annotations


def _read_json(path: Path) -> Annotations:
    try:
        data = json.loads(path.read_bytes())   # bytes: any UTF encoding, with or without BOM
    except (ValueError, RecursionError) as exc:   # JSON and UTF errors; nesting too deep
        raise VidpipeError(f"{path}: not valid JSON ({first_line(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("database"), dict):
        return _read_activitynet(path, data["database"])
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        raise VidpipeError(f"{path}: expected an object with a 'videos' mapping "
                           '({"videos": {"clip": {"segments": [...]}}}) or an ActivityNet-style '
                           '"database"')
    classes = data.get("classes")
    if classes is not None and not (isinstance(classes, list)
                                    and all(isinstance(c, str) for c in classes)):
        raise VidpipeError(f"{path}: 'classes' must be a list of names")
    annotations = Annotations(segments=[], videos=[], classes=classes)
    for video, entry in data["videos"].items():
        where = f"{path}: videos.{video}"
        if not isinstance(entry, dict) or not isinstance(entry.get("segments", []), list):
            raise VidpipeError(f"{where}: expected {{'split': ..., 'segments': [...]}}")
        if video not in annotations.videos:
            annotations.videos.append(video)
        for i, seg in enumerate(entry.get("segments", [])):
            seg_where = f"{where}.segments[{i}]"
            if not isinstance(seg, dict) or not {"label", "start_s", "end_s"} <= set(seg):
                raise VidpipeError(f"{seg_where}: expected "
                                   '{"label": ..., "start_s": ..., "end_s": ...}')
            _collect(annotations, _segment(video, seg["label"], seg["start_s"],
                                           seg["end_s"], seg_where))
        if "split" in entry:
            _add_split(annotations.splits, video, str(entry["split"]), where)
    return annotations


def _read_activitynet(path: Path, database: dict) -> Annotations:
    """ActivityNet-style `database` (see the module notes for its subsets)."""
    subsets = {str(e.get("subset", "")).lower() for e in database.values() if isinstance(e, dict)}
    split_of = {"training": "train", "train": "train", "testing": "test", "test": "test",
                "validation": "test" if "training" in subsets else "train"}
    split_of["val"] = split_of["validation"]
    annotations = Annotations(segments=[], videos=[])
    for video, entry in database.items():
        where = f"{path}: database.{video}"
        if not isinstance(entry, dict) or not isinstance(entry.get("annotations", []), list):
            raise VidpipeError(f"{where}: expected {{'subset': ..., 'annotations': [...]}}")
        subset = str(entry.get("subset", "")).lower()
        if subset == "testing" and "training" in subsets:
            continue   # ActivityNet's test videos: annotations withheld
        if video not in annotations.videos:
            annotations.videos.append(video)
        for i, item in enumerate(entry.get("annotations", [])):
            item_where = f"{where}.annotations[{i}]"
            segment = item.get("segment") if isinstance(item, dict) else None
            if not (isinstance(segment, list) and len(segment) == 2 and "label" in item):
                raise VidpipeError(f'{item_where}: expected {{"segment": [start, end], "label": ...}}')
            _collect(annotations, _segment(video, item["label"], segment[0], segment[1],
                                           item_where))
        if subset:
            if subset not in split_of:
                raise VidpipeError(f"{where}: unknown subset {entry['subset']!r} (expected "
                                   "training, validation or testing)")
            _add_split(annotations.splits, video, split_of[subset], where)
    return annotations


def _collect(annotations: Annotations, segment: Segment) -> None:
    if segment.video not in annotations.videos:
        annotations.videos.append(segment.video)
    if segment.label != BACKGROUND:
        annotations.segments.append(segment)


def _class_list(annotations: Annotations, class_names: list[str] | None,
                source: Path) -> list[str]:
    """C+1 names, background first: the given list, else the file's, else sorted labels."""
    if class_names is None:
        class_names = annotations.classes or sorted(
            {s.label for s in annotations.segments if s.label != AMBIGUOUS})
    names = [c for c in class_names if c != BACKGROUND]
    if len(set(names)) != len(names):
        raise VidpipeError(f"{source}: class list names a class twice")
    known = set(names)
    for segment in annotations.segments:
        if segment.label != AMBIGUOUS and segment.label not in known:
            raise VidpipeError(f"{segment.where}: unknown class '{segment.label}' "
                               f"(known: {', '.join(names)})")
    return [BACKGROUND, *names]


def match_videos(store, names: list[str], source: Path,
                 skip_missing: bool = False) -> dict[str, str]:
    """Annotation video name -> cache video id.

    A name matches a cache video by its id, its source path (relative or absolute, as
    kept in the file's attributes), or the stem of either ('video_test_0000004' matches
    'video_test_0000004.mp4'). A name matching no video (unless `skip_missing`) or several
    videos is an error.
    """
    index: dict[str, set[str]] = {}
    for video_id in store.video_ids():
        attrs = store.attrs(video_id)
        keys = {video_id, Path(video_id).stem}
        for attr in ("source_path", "relative_path", "path", "source", "video_id"):
            value = attrs.get(attr)
            if isinstance(value, str) and value:
                posix = Path(value).as_posix()
                keys |= {posix, Path(posix).name, Path(posix).stem,
                         str(Path(posix).with_suffix(""))}
        for key in keys:
            index.setdefault(key, set()).add(video_id)
    matches = {}
    for name in names:
        found = index.get(name) or index.get(Path(name).stem) or set()
        if len(found) > 1:
            raise VidpipeError(f"{source}: video '{name}' matches several cache videos "
                               f"({', '.join(sorted(found))}); name it by its cache id")
        if not found:
            if skip_missing:
                continue
            raise VidpipeError(f"{source}: video '{name}' is not in the cache {store.root} "
                               "(extract it first, or leave it out with `vidpipe labels --skip-missing`)")
        matches[name] = found.pop()
    return matches


def segments_to_targets(segments: list[tuple[int, float, float]], timestamps: np.ndarray,
                        step_seconds: float, num_classes: int) -> np.ndarray:
    """(class index >= 1, start_s, end_s) segments -> soft targets (T, num_classes).

    The centre rule of the module comment; rows sum to 1, column 0 is background.
    """
    active = _active_steps(segments, timestamps, step_seconds, num_classes)
    active[:, 0] = ~active[:, 1:].any(axis=1)
    targets = active.astype(np.float32)
    return targets / targets.sum(axis=1, keepdims=True)


def _active_steps(segments: list[tuple[int, float, float]], timestamps: np.ndarray,
                  step_seconds: float, num_columns: int) -> np.ndarray:
    """(T, num_columns) bool: step i is inside a segment of column c (the centre rule)."""
    starts = np.asarray(timestamps, np.float64)
    centres = starts + step_seconds / 2
    active = np.zeros((len(starts), num_columns), bool)
    for column, start_s, end_s in segments:
        inside = (centres >= start_s) & (centres < end_s)
        if not inside.any() and len(starts):
            overlap = np.minimum(end_s, starts + step_seconds) - np.maximum(start_s, starts)
            if overlap.max() > 0:
                inside[int(np.argmax(overlap))] = True
        active[inside, column] = True
    return active


def build_labels(store, annotation_path: str | Path | list[str | Path],
                 class_names: list[str] | None = None, skip_missing: bool = False) -> LabelSet:
    """Annotations -> per-step targets on the cache's own timestamps (see the module notes).

    `annotation_path` may list several sources (e.g. THUMOS'14's validation and test
    annotation folders, which the release keeps apart); they are read as one.

    `class_names` fixes the class columns (background first or left out); without it the
    file's own class list is used, else its labels sorted. Every annotated video must be in
    the cache (unless `skip_missing`); cache videos without annotations are left unlabelled.
    """
    paths = [Path(p) for p in ([annotation_path] if isinstance(annotation_path, (str, Path))
                               else annotation_path)]
    source = paths[0] if len(paths) == 1 else Path(" + ".join(map(str, paths)))
    annotations = _merge([read_annotations(path) for path in paths], source)
    names = _class_list(annotations, class_names, source)
    column = {name: i for i, name in enumerate(names)}
    matches = match_videos(store, annotations.videos, source, skip_missing)
    step_seconds = float(store.settings["step_seconds"])

    videos, splits, uncovered = {}, {}, []
    for name, video_id in matches.items():
        if video_id in videos:
            raise VidpipeError(f"{source}: videos '{name}' and another name both match "
                               f"cache video '{video_id}'")
        own = [s for s in annotations.segments if s.video == name]
        actions = [(column[s.label], s.start_s, s.end_s) for s in own if s.label != AMBIGUOUS]
        ambiguous = [(0, s.start_s, s.end_s) for s in own if s.label == AMBIGUOUS]
        timestamps = store.timestamps(video_id)
        uncovered += [s for s in own if s.end_s > s.start_s and not _active_steps(
            [(0, s.start_s, s.end_s)], timestamps, step_seconds, 1).any()]
        videos[video_id] = VideoLabels(
            targets=segments_to_targets(actions, timestamps, step_seconds, len(names)),
            ambiguous=_active_steps(ambiguous, timestamps, step_seconds, 1)[:, 0],
            segments=sorted((Segment(s.label, s.start_s, s.end_s) for s in own
                             if s.label != AMBIGUOUS), key=lambda s: (s.start_s, s.label)))
        if name in annotations.splits:
            splits[video_id] = annotations.splits[name]
    if not videos:   # saving it would replace a good labels file with an empty one
        raise VidpipeError(f"{source}: no annotated video is in the cache {store.root}"
                           if annotations.videos else f"{source}: no annotated segment")
    if splits and len(splits) != len(videos):
        unsplit = sorted(set(videos) - set(splits))
        raise VidpipeError(f"{source}: some videos have a split and others not "
                           f"(e.g. '{unsplit[0]}')")
    if uncovered:   # past the video's end (wrong video? minutes for seconds?): say so
        first = uncovered[0]
        log.warning("%d segment(s) cover no step of their video and label nothing, e.g. %s: "
                    "[%g, %g] s", len(uncovered), first.where, first.start_s, first.end_s)
    return LabelSet(class_names=names, videos=videos, splits=splits)


def _merge(parts: list[Annotations], source: Path) -> Annotations:
    """Several annotation sources read as one; a video's split must agree between them."""
    if len(parts) == 1:
        return parts[0]
    merged = Annotations(segments=[], videos=[], splits={})
    for part in parts:
        merged.segments += part.segments
        merged.videos += [v for v in part.videos if v not in merged.videos]
        for video, split in part.splits.items():
            _add_split(merged.splits, video, split, str(source))
        if part.classes is not None:
            merged.classes = (merged.classes or []) + [c for c in part.classes
                                                       if c not in (merged.classes or [])]
    return merged


def describe(labels: LabelSet) -> str:
    """A few lines a person reads after `vidpipe labels`."""
    steps = sum(len(v.targets) for v in labels.videos.values())
    action = sum(float((v.targets[:, 0] < 1).sum()) for v in labels.videos.values())
    lines = [f"{len(labels.videos)} video{'' if len(labels.videos) == 1 else 's'}, "
             f"{labels.num_classes - 1} classes "
             f"({', '.join(labels.class_names[1:])}), {steps} steps, "
             f"{action / max(steps, 1):.1%} of them in an action"]
    if labels.splits:
        lines.append(", ".join(f"{name}: {len(labels.split(name))} videos" for name in SPLITS))
    return "\n".join(lines)


def parse_class_list(classes: str) -> list[str]:
    """`--classes` value: a text file with one name per line, or comma-separated names."""
    path = Path(classes)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if "," not in classes and (path.suffix == ".txt" or "/" in classes):   # meant as a file
        raise VidpipeError(f"--classes {classes}: file not found (a text file with one class "
                           "per line, or comma-separated names)")
    return [name.strip() for name in classes.split(",") if name.strip()]


def write_labels(cache: str | Path, annotation_path: str | Path | list[str | Path],
                 classes: str | None = None,
                 out: str | Path | None = None, skip_missing: bool = False) -> LabelSet:
    """`vidpipe labels`: build the LabelSet of a cache and save it (default CACHE/labels.h5)."""
    from vidpipe.store.cache import FeatureStore

    store = FeatureStore.open(cache)
    labels = build_labels(store, annotation_path,
                          parse_class_list(classes) if classes else None, skip_missing)
    out = Path(out) if out else Path(cache) / LABELS_FILE
    labels.save(out)
    log.info("%s", describe(labels))
    log.info("labels written to %s", out)
    return labels
