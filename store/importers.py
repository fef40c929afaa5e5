"""The LSTR/TeSTra/MAT feature layout, and its importer into a vidpipe cache (features +
labels.h5). The exporter (store/exporters.py) writes the same layout from these names.

LSTR, TeSTra and MAT read THUMOS'14 and TVSeries features in one layout:

    ROOT/rgb_kinetics_resnet50/VID.npy        (T, 2048)  one row per 0.25 s step (4 fps)
    ROOT/flow_kinetics_bninception/VID.npy    (T, 1024)
    ROOT/target_perframe/VID.npy              (T, 22) THUMOS: 0 background, 1..20 actions,
                                              21 ambiguous; (T, 31) TVSeries: 0 background

plus a data_info.json (their repository's data/data_info.json) holding, per dataset name,
the target columns (`class_names`, `num_classes`), the ambiguous column (`ignore_index`,
-100 when there is none), the step rate (`fps`) and each split's videos
(`train_session_set`, `test_session_set`). A target row is 1 in every class column whose
action covers the step, background 1 when none does, and the ambiguous column 1 where the
step is ambiguous (such a step is not background).

`import_lstr` converts such a folder into a FeatureStore (step i at i / fps seconds) and a
LabelSet with the dataset's class names and splits, so that the paper's experiments run with
`vidpipe train` / `vidpipe eval` on the same inputs as the reference code. A vidpipe export
also holds ROOT/vidpipe/ (cache.json: the cache's settings and each video's attributes;
timestamps/VID.npy), which those codebases never read and from which the import gives back
the cache the export came from.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vidpipe.core.errors import BatchIncomplete, VidpipeError, first_line
from vidpipe.core.log import progress_bar
from vidpipe.store.labels import BACKGROUND, LABELS_FILE, LabelSet, VideoLabels
from vidpipe.store.cache import FeatureStore, video_id_from_path

log = logging.getLogger(__name__)

TARGET_DIR = "target_perframe"
DATA_INFO_FILE = "data_info.json"
EXTRAS_DIR = "vidpipe"           # an export's extras: EXTRAS_FILE and TIMESTAMPS_DIR/VID.npy
EXTRAS_FILE = "cache.json"
TIMESTAMPS_DIR = "timestamps"
STEP_SECONDS = 0.25              # the public features are at 4 steps per second
NO_AMBIGUOUS = -100              # data_info's ignore_index of a dataset without that column
LSTR_BACKGROUND, LSTR_AMBIGUOUS = "Background", "Ambiguous"   # data_info's spelling

THUMOS_ACTIONS = [
    "BaseballPitch", "BasketballDunk", "Billiards", "CleanAndJerk", "CliffDiving",
    "CricketBowling", "CricketShot", "Diving", "FrisbeeCatch", "GolfSwing", "HammerThrow",
    "HighJump", "JavelinThrow", "LongJump", "PoleVault", "Shotput", "SoccerPenalty",
    "TennisSwing", "ThrowDiscus", "VolleyballSpiking",
]
TVSERIES_ACTIONS = [
    "Pick something up", "Point", "Drink", "Stand up", "Run", "Sit down", "Read", "Smoke",
    "Drive car", "Open door", "Give something", "Use computer", "Write", "Go down stairway",
    "Close door", "Throw something", "Go up stairway", "Get in/out of car", "Hang up phone",
    "Eat", "Answer phone", "Dress up", "Clap", "Undress", "Kiss", "Fall/trip", "Wave", "Pour",
    "Punch", "Fire weapon",
]


def _numbered(prefix: str, ranges: str) -> frozenset[str]:
    """Video names from number ranges: ('video_test_', '4 6-7') -> video_test_0000004, 6, 7."""
    names = set()
    for item in ranges.split():
        first, _, last = item.partition("-")
        names |= {f"{prefix}{n:07d}" for n in range(int(first), int(last or first) + 1)}
    return frozenset(names)


# The splits of LSTR's data/data_info.json: THUMOS'14 trains on the 200 validation videos
# with temporal annotations and tests on the 213 such test videos; TVSeries by episode.
THUMOS_TRAIN = _numbered("video_validation_", (
    "51-60 151-190 201-210 261-270 281-290 311-320 361-370 411-420 481-490 661-670 681-690 "
    "781-790 851-860 901-910 931-950 981-990"))
THUMOS_TEST = _numbered("video_test_", (
    "4 6-7 11 26 28 39 45-46 51 58 62 73 85 113 129 131 173 179 188 211 220 238 242 250 254 "
    "270 273 278 285 292-293 308 319 324 353 355 357 367 372 374 379 392 405 412-413 423 426 "
    "429 437 442-444 448 450 461 464 504-505 538 541 549 556 558 560 569 577 591 593 601-602 "
    "611 615 617 622 624 626 635 664-665 671-673 689 691 698 701 714 716 718 723-724 730 737 "
    "740 756 762 765 767 771 785-786 793 796 798 807 814 839 844 846-847 854 864 873 882 887 "
    "896-897 903 940 946 950 964 981 987 989 991 1008 1038-1040 1058 1064 1066 1072 1075-1076 "
    "1078-1081 1098 1114 1118 1123 1127 1129 1134-1135 1146 1153 1159 1162-1164 1168 1174 1182 "
    "1194-1195 1201-1202 1207 1209 1219 1223 1229 1235 1247 1255 1257 1267-1268 1270 1276 1281 "
    "1292 1307 1309 1313-1314 1319 1324-1325 1339 1343 1358 1369 1389 1391 1409 1431 1433 "
    "1446-1447 1452 1459-1460 1463 1468 1483-1484 1495-1496 1508 1512 1522 1527 1531-1532 1549 "
    "1556 1558"))
TVSERIES_TEST = frozenset({
    "24_ep4", "Breaking_Bad_ep3", "Mad_Men_ep3", "How_I_Met_Your_Mother_ep7",
    "How_I_Met_Your_Mother_ep8", "Modern_Family_ep5", "Sons_of_Anarchy_ep3",
})
TVSERIES_TRAIN = frozenset({
    "24_ep1", "24_ep2", "24_ep3", "Breaking_Bad_ep1", "Breaking_Bad_ep2",
    *(f"How_I_Met_Your_Mother_ep{i}" for i in range(1, 7)), "Mad_Men_ep1", "Mad_Men_ep2",
    *(f"Modern_Family_ep{i}" for i in (1, 2, 3, 4, 6)), "Sons_of_Anarchy_ep1", "Sons_of_Anarchy_ep2",
})


@dataclass(frozen=True)
class DatasetSpec:
    """One data_info.json entry: what the target columns mean and which videos each split has."""
    name: str                      # the data_info key (LSTR's DATA.DATA_NAME)
    actions: list[str]
    ambiguous_column: int | None   # the column marking ambiguous steps (THUMOS: 21)
    train: frozenset[str] = frozenset()
    test: frozenset[str] = frozenset()
    metric: str = "AP"             # LSTR's `metrics`: AP, or cAP (TVSeries)
    step_seconds: float = STEP_SECONDS

    @property
    def num_columns(self) -> int:
        return 1 + len(self.actions) + (self.ambiguous_column is not None)

    def split_of(self, video_id: str) -> str | None:
        if video_id in self.train:
            return "train"
        return "test" if video_id in self.test else None

    def lstr_class_names(self) -> list[str]:
        names = [LSTR_BACKGROUND, *self.actions]
        if self.ambiguous_column is not None:
            names.insert(self.ambiguous_column, LSTR_AMBIGUOUS)
        return names

    def data_info_entry(self, data_root: str) -> dict[str, Any]:
        fps = 1 / self.step_seconds
        return {"data_root": data_root, "class_names": self.lstr_class_names(),
                "num_classes": self.num_columns,
                "ignore_index": NO_AMBIGUOUS if self.ambiguous_column is None else self.ambiguous_column,
                "metrics": self.metric, "fps": round(fps) if abs(fps - round(fps)) < 1e-9 else fps,
                "train_session_set": sorted(self.train), "test_session_set": sorted(self.test)}

    @classmethod
    def from_data_info(cls, name: str, entry: Any, where: str) -> "DatasetSpec":
        try:
            class_names = [str(c) for c in entry["class_names"]]
            ignore = int(entry["ignore_index"])
            train, test = frozenset(entry["train_session_set"]), frozenset(entry["test_session_set"])
            step_seconds = 1 / float(entry.get("fps", 1 / STEP_SECONDS))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise VidpipeError(f"{where}: not an LSTR data_info entry (needs class_names, "
                               f"ignore_index, fps, train_session_set, test_session_set; "
                               f"{first_line(exc)})") from None
        if entry.get("num_classes", len(class_names)) != len(class_names):
            raise VidpipeError(f"{where}: num_classes {entry['num_classes']} but "
                               f"{len(class_names)} class_names")
        ambiguous = ignore if 0 < ignore < len(class_names) else None
        actions = [c for i, c in enumerate(class_names) if i not in (0, ambiguous)]
        return cls(name, actions, ambiguous, train, test, str(entry.get("metrics", "AP")),
                   step_seconds)


DATASETS = {
    "thumos": DatasetSpec("THUMOS", THUMOS_ACTIONS, 21, THUMOS_TRAIN, THUMOS_TEST),
    "tvseries": DatasetSpec("TVSeries", TVSERIES_ACTIONS, None, TVSERIES_TRAIN, TVSERIES_TEST,
                            metric="cAP"),
}


def labels_from_target(target: np.ndarray, spec: DatasetSpec) -> VideoLabels:
    """A target_perframe array (T, columns) -> our soft targets (T, C+1) and ambiguous mask.

    A step is ambiguous where its ambiguous column is 1, the rows LSTR's loss and THUMOS
    metric skip. Steps with several actions get soft targets summing to 1, as the LabelSet
    stores them; an ambiguous step with no class is background, as the centre rule of
    store/labels.py makes it. A step that is neither ambiguous nor of any class keeps its
    all-zero row: training makes it background or gives it LSTR's zero loss
    (`data.empty_target_rows`, malt.data.load_videos).
    """
    target = np.array(target, np.float32)          # a copy: the caller's array is left alone
    if spec.ambiguous_column is None:
        ambiguous = np.zeros(len(target), bool)
    else:
        ambiguous = target[:, spec.ambiguous_column] == 1
        target = np.delete(target, spec.ambiguous_column, axis=1)
    target[ambiguous & (target.sum(axis=1) == 0), 0] = 1
    totals = target.sum(axis=1, keepdims=True)
    return VideoLabels(targets=target / np.where(totals > 0, totals, 1), ambiguous=ambiguous)


def target_from_labels(labels: VideoLabels, spec: DatasetSpec) -> np.ndarray:
    """The inverse of `labels_from_target`: the field's target rows (T, columns) float32.

    Each class with a share of the step gets 1 (so vidpipe's 1/k rows give back the same
    labels; a soft row of another shape comes back as 1/k over its classes).
    """
    target = (labels.targets > 0).astype(np.float32)            # (T, C+1)
    if spec.ambiguous_column is None:
        return target
    ambiguous = labels.ambiguous.astype(bool)
    target[ambiguous & (target[:, 1:].sum(axis=1) == 0), 0] = 0   # ambiguous, not background
    return np.insert(target, spec.ambiguous_column, ambiguous.astype(np.float32), axis=1)


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)     # already in the cache
    failed: dict[str, str] = field(default_factory=dict)  # video id -> one-line reason
    unsplit: list[str] = field(default_factory=list)     # in no split of the dataset


@dataclass
class LstrSource:
    """An LSTR-layout folder, checked: its three folders, its dataset, its videos, and the
    extras of a vidpipe export (None for the public features)."""
    root: Path
    folders: dict[str, Path]       # "rgb", "flow", "target"
    spec: DatasetSpec
    stems: list[str]
    extras: dict[str, Any] | None

    @classmethod
    def open(cls, root: str | Path, dataset: str | None = None, data_info: str | Path | None = None,
             rgb_dir: str | None = None, flow_dir: str | None = None) -> "LstrSource":
        root = Path(root)
        if not root.is_dir():
            raise VidpipeError(f"{root}: feature folder not found")
        folders = {"rgb": _modality_folder(root, "rgb", rgb_dir),
                   "flow": _modality_folder(root, "flow", flow_dir), "target": root / TARGET_DIR}
        if not folders["target"].is_dir():
            raise VidpipeError(f"{folders['target']}: folder not found "
                               "(per-step targets, one .npy per video)")
        target_stems = sorted(p.stem for p in folders["target"].glob("*.npy"))
        if not target_stems:
            raise VidpipeError(f"{folders['target']}: no .npy files")
        if data_info is None and (root / DATA_INFO_FILE).is_file():
            data_info = root / DATA_INFO_FILE
        spec = _dataset_spec(dataset, data_info, folders["target"] / f"{target_stems[0]}.npy")
        # A video present in only some folders is reported, not silently left out.
        stems = sorted({p.stem for folder in folders.values() for p in folder.glob("*.npy")})
        extras_file = root / EXTRAS_DIR / EXTRAS_FILE
        extras = _read_json(extras_file) if extras_file.is_file() else None
        if extras is not None and not (isinstance(extras.get("settings"), dict)
                                       and isinstance(extras.get("videos"), dict)):
            raise VidpipeError(f"{extras_file}: not a vidpipe export record (expected "
                               "'settings' and 'videos' mappings)")
        return cls(root, folders, spec, stems, extras)

    def settings(self) -> dict[str, Any]:
        """The cache's settings: an export's own, else a record of where the features came from."""
        if self.extras is not None:
            return self.extras["settings"]
        return {"source": "precomputed", "format": "lstr", "dataset": self.spec.name.lower(),
                "rgb_features": self.folders["rgb"].name,
                "flow_features": self.folders["flow"].name,
                "step_seconds": self.spec.step_seconds}

    def paths(self, stem: str) -> dict[str, Path]:
        return {name: folder / f"{stem}.npy" for name, folder in self.folders.items()}

    def timestamps(self, stem: str, steps: int) -> np.ndarray:
        if self.extras is not None:
            return _load(self.root / EXTRAS_DIR / TIMESTAMPS_DIR / f"{stem}.npy", ndim=1)
        return np.arange(steps) * self.spec.step_seconds

    def attrs(self, stem: str) -> dict[str, Any]:
        if self.extras is not None:
            return self.extras["videos"].get(stem, {})
        return {f"source_{name}": str(path) for name, path in self.paths(stem).items()}


def import_lstr(root: str | Path, out: str | Path, dataset: str | None = None,
                data_info: str | Path | None = None, rgb_dir: str | None = None,
                flow_dir: str | None = None, progress: bool = True) -> ImportReport:
    """Convert an LSTR-layout feature folder into the cache `out` plus `out/labels.h5`.

    The columns and splits come from `data_info` (LSTR's data_info.json; ROOT/data_info.json
    when there is one), else from the built-in THUMOS'14 / TVSeries entries; `dataset`
    picks the entry, recognised from the number of target columns when not given. A bad
    video (a modality missing, lengths that differ) is reported and skipped; the others are
    imported, and a rerun skips what is already in the cache. Raises BatchIncomplete at the
    end when some video failed, after everything else is saved.
    """
    source = LstrSource.open(root, dataset, data_info, rgb_dir, flow_dir)
    store = FeatureStore.open_or_create(out, source.settings())
    report = ImportReport()
    labels: dict[str, VideoLabels] = {}
    for stem in progress_bar(source.stems, enabled=progress, desc="import", unit="video"):
        video_id = video_id_from_path(stem)
        try:
            labels[video_id], written = _import_video(store, source, stem, video_id)
        except VidpipeError as exc:
            report.failed[video_id] = str(exc)
            log.error("%s", exc)
            continue
        (report.imported if written else report.skipped).append(video_id)
    _save_labels(Path(out), source.spec, labels, report)
    if report.failed:
        raise batch_incomplete(source.root, report.failed, len(source.stems), "imported", out)
    return report


def batch_incomplete(source: str | Path, failed: dict[str, str], total: int, verb: str,
                     out: str | Path) -> BatchIncomplete:
    """The one line ending a conversion that went past bad videos (each already logged)."""
    return BatchIncomplete(f"{source}: {len(failed)} of {total} videos not {verb} (first: "
                           f"{next(iter(failed.values()))}); the other {total - len(failed)} "
                           f"are in {out}")


def _import_video(store: FeatureStore, source: LstrSource, stem: str,
                  video_id: str) -> tuple[VideoLabels, bool]:
    """One video's labels, and whether its features were written (False: already cached)."""
    paths = source.paths(stem)
    target = _load(paths["target"], columns=source.spec.num_columns)
    labels = labels_from_target(target, source.spec)
    if video_id in store and store.num_steps(video_id) == len(target):
        return labels, False
    arrays = {"rgb": _load(paths["rgb"]), "flow": _load(paths["flow"]),
              "timestamps": source.timestamps(stem, len(target))}
    for name, array in arrays.items():
        if len(array) != len(target):
            where = paths.get(name, source.root / EXTRAS_DIR / TIMESTAMPS_DIR / f"{stem}.npy")
            raise VidpipeError(f"{where}: {len(array)} steps, but {paths['target']} "
                               f"has {len(target)}")
    store.write(video_id, arrays["rgb"], arrays["flow"], arrays["timestamps"],
                attrs=source.attrs(stem))
    return labels, True


def _save_labels(out: Path, spec: DatasetSpec, labels: dict[str, VideoLabels],
                 report: ImportReport) -> None:
    """labels.h5 beside the features: the dataset's class names, each video's split."""
    splits = {}
    for video_id in labels:
        split = spec.split_of(video_id)
        if split is None:
            report.unsplit.append(video_id)
        else:
            splits[video_id] = split
    LabelSet(class_names=[BACKGROUND, *spec.actions], videos=labels,
             splits=splits).save(out / LABELS_FILE)


def _modality_folder(root: Path, prefix: str, name: str | None) -> Path:
    """The folder of one modality: the one given, else the only `prefix_*` folder."""
    if name is not None:
        folder = root / name
        if not folder.is_dir():
            raise VidpipeError(f"{folder}: {prefix} feature folder not found")
        return folder
    candidates = sorted(p for p in root.glob(f"{prefix}_*") if p.is_dir())
    if not candidates:
        raise VidpipeError(f"{root}: no {prefix}_* feature folder (expected e.g. "
                           f"{'rgb_kinetics_resnet50' if prefix == 'rgb' else 'flow_kinetics_bninception'})")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise VidpipeError(f"{root}: several {prefix} feature folders ({names}); "
                           f"choose one with --{prefix}-dir")
    return candidates[0]


def _dataset_spec(dataset: str | None, data_info: str | Path | None,
                  sample_target: Path) -> DatasetSpec:
    """The entry of `data_info` (else of the built-in datasets) named `dataset` (any case),
    else the one whose column count matches the targets."""
    columns = _load(sample_target).shape[1]
    if data_info is None:
        where = "built-in datasets"
        entries = {spec.name: spec.data_info_entry("") for spec in DATASETS.values()}
    else:
        where, entries = str(data_info), _read_json(Path(data_info))
    known = f"known: {', '.join(entries)}"
    if dataset is not None:
        names = [name for name in entries if name.lower() == dataset.lower()]
        if not names:
            raise VidpipeError(f"{where}: no dataset '{dataset}' ({known})")
    else:
        names = [name for name, entry in entries.items()
                 if isinstance(entry, dict) and entry.get("num_classes") == columns]
        if len(names) != 1:
            raise VidpipeError(f"{sample_target}: {columns} target columns match "
                               f"{len(names) or 'no'} dataset(s) of {where} ({known}); "
                               "pass --dataset")
    return DatasetSpec.from_data_info(names[0], entries[names[0]], f"{where}: {names[0]}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VidpipeError(f"{path}: not a readable JSON file ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise VidpipeError(f"{path}: expected a JSON object")
    return data


def _load(path: Path, columns: int | None = None, ndim: int = 2) -> np.ndarray:
    """A (T, D) array (or (T,) with ndim=1) from a .npy file; errors name the file."""
    if not path.is_file():
        raise VidpipeError(f"{path}: file not found")
    try:
        array = np.load(path)
    except (ValueError, OSError) as exc:
        raise VidpipeError(f"{path}: not a readable .npy file ({first_line(exc)})") from None
    if array.ndim != ndim:
        raise VidpipeError(f"{path}: expected a {'(T, D)' if ndim == 2 else '(T,)'} array, "
                           f"got shape {array.shape}")
    if columns is not None and array.shape[1] != columns:
        raise VidpipeError(f"{path}: {array.shape[1]} target columns, expected {columns}")
    return array
