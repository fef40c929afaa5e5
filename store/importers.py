"""Importers of public precomputed features into a vidpipe cache (features + labels.h5).

LSTR, TeSTra and MAT publish THUMOS'14 and TVSeries features in one layout:

    ROOT/rgb_kinetics_resnet50/VID.npy        (T, 2048)  one row per 0.25 s step (4 fps)
    ROOT/flow_kinetics_bninception/VID.npy    (T, 1024)
    ROOT/target_perframe/VID.npy              (T, 22) THUMOS: 0 background, 1..20 actions,
                                              21 ambiguous; (T, 31) TVSeries: 0 background

`import_lstr` converts such a folder into a FeatureStore (step i at i * 0.25 s) and a LabelSet
with the dataset's class names and train/test split, so that the paper's experiments run
with `vidpipe train` / `vidpipe eval` on the same inputs as the reference code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vidpipe.core.errors import VidpipeError
from vidpipe.store.labels import BACKGROUND, LABELS_FILE, LabelSet, VideoLabels
from vidpipe.store.cache import FeatureStore, video_id_from_path

TARGET_DIR = "target_perframe"
STEP_SECONDS = 0.25   # the public features are at 4 steps per second

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
# TVSeries episodes per split, as in LSTR's data/data_info.json.
TVSERIES_TEST = {
    "24_ep4", "Breaking_Bad_ep3", "Mad_Men_ep3", "How_I_Met_Your_Mother_ep7",
    "How_I_Met_Your_Mother_ep8", "Modern_Family_ep5", "Sons_of_Anarchy_ep3",
}
TVSERIES_TRAIN = {
    "24_ep1", "24_ep2", "24_ep3", "Breaking_Bad_ep1", "Breaking_Bad_ep2",
    *(f"How_I_Met_Your_Mother_ep{i}" for i in range(1, 7)), "Mad_Men_ep1", "Mad_Men_ep2",
    *(f"Modern_Family_ep{i}" for i in (1, 2, 3, 4, 6)), "Sons_of_Anarchy_ep1", "Sons_of_Anarchy_ep2",
}


@dataclass
class DatasetSpec:
    """What a dataset's target columns mean and how its videos split."""
    name: str
    actions: list[str]
    ambiguous_column: int | None   # a target column that marks ambiguous steps (THUMOS: 21)

    @property
    def num_columns(self) -> int:
        return 1 + len(self.actions) + (self.ambiguous_column is not None)

    def split_of(self, video_id: str) -> str | None:
        if self.name == "thumos":
            if video_id.startswith("video_validation_"):
                return "train"
            return "test" if video_id.startswith("video_test_") else None
        if video_id in TVSERIES_TRAIN:
            return "train"
        return "test" if video_id in TVSERIES_TEST else None


DATASETS = {
    "thumos": DatasetSpec("thumos", THUMOS_ACTIONS, ambiguous_column=21),
    "tvseries": DatasetSpec("tvseries", TVSERIES_ACTIONS, ambiguous_column=None),
}


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)     # already in the cache
    failed: dict[str, str] = field(default_factory=dict)  # video id -> one-line reason
    unsplit: list[str] = field(default_factory=list)     # in no split of the dataset


def import_lstr(root: str | Path, out: str | Path, dataset: str | None = None,
                rgb_dir: str | None = None, flow_dir: str | None = None,
                progress: bool = True) -> ImportReport:
    """Convert an LSTR-layout feature folder into the cache `out` plus `out/labels.h5`.

    `dataset` ('thumos' | 'tvseries') is recognised from the number of target columns when
    not given. A bad video (a modality missing, lengths that differ) is reported and skipped;
    the others are imported, and a rerun skips what is already in the cache. Raises
    VidpipeError at the end when some video failed, after everything else is saved.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise VidpipeError(f"{root}: feature folder not found")
    rgb_folder = _modality_folder(root, "rgb", rgb_dir)
    flow_folder = _modality_folder(root, "flow", flow_dir)
    target_folder = root / TARGET_DIR
    if not target_folder.is_dir():
        raise VidpipeError(f"{target_folder}: folder not found (per-step targets, one .npy per video)")
    target_stems = sorted(p.stem for p in target_folder.glob("*.npy"))
    if not target_stems:
        raise VidpipeError(f"{target_folder}: no .npy files")
    spec = _dataset_spec(dataset, target_folder / f"{target_stems[0]}.npy")
    # A video present in only some folders is reported, not silently left out.
    stems = sorted({p.stem for folder in (rgb_folder, flow_folder, target_folder)
                    for p in folder.glob("*.npy")})

    store = FeatureStore.open_or_create(out, {
        "source": "precomputed",
        "format": "lstr",
        "dataset": spec.name,
        "rgb_features": rgb_folder.name,
        "flow_features": flow_folder.name,
        "step_seconds": STEP_SECONDS,
    })
    report = ImportReport()
    labels: dict[str, VideoLabels] = {}
    for stem in tqdm(stems, desc="import", unit="video", disable=not progress):
        video_id = video_id_from_path(stem)
        paths = {name: folder / f"{stem}.npy" for name, folder in
                 (("rgb", rgb_folder), ("flow", flow_folder), ("target", target_folder))}
        try:
            target = _load(paths["target"], spec.num_columns)
            labels[video_id] = _labels_from_target(target, spec)
            if video_id in store and store.num_steps(video_id) == len(target):
                report.skipped.append(video_id)
                continue
            rgb, flow = _load(paths["rgb"]), _load(paths["flow"])
            for name, array in (("rgb", rgb), ("flow", flow)):
                if len(array) != len(target):
                    raise VidpipeError(f"{paths[name]}: {len(array)} steps, but "
                                       f"{paths['target']} has {len(target)}")
            store.write(video_id, rgb, flow, np.arange(len(target)) * STEP_SECONDS,
                        attrs={f"source_{name}": str(path) for name, path in paths.items()})
            report.imported.append(video_id)
        except VidpipeError as exc:
            labels.pop(video_id, None)
            report.failed[video_id] = str(exc)
            tqdm.write(f"error: {exc}")

    splits = {}
    for video_id in labels:
        split = spec.split_of(video_id)
        if split is None:
            report.unsplit.append(video_id)
        else:
            splits[video_id] = split
    class_names = [BACKGROUND, *spec.actions]
    LabelSet(class_names=class_names, videos=labels, splits=splits).save(out / LABELS_FILE)
    if report.failed:
        first = next(iter(report.failed.values()))
        raise VidpipeError(f"{root}: {len(report.failed)} of {len(stems)} videos not imported "
                           f"(first: {first}); the other {len(labels)} are in {out}")
    return report


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


def _dataset_spec(dataset: str | None, sample_target: Path) -> DatasetSpec:
    columns = _load(sample_target).shape[1]
    if dataset is None:
        matches = [spec for spec in DATASETS.values() if spec.num_columns == columns]
        if not matches:
            raise VidpipeError(f"{sample_target}: {columns} target columns match no known dataset "
                               f"(THUMOS has 22, TVSeries 31); pass --dataset")
        return matches[0]
    if dataset not in DATASETS:
        raise VidpipeError(f"unknown dataset '{dataset}' (known: {', '.join(DATASETS)})")
    return DATASETS[dataset]


def _load(path: Path, columns: int | None = None) -> np.ndarray:
    """A (T, D) array from a .npy file; errors name the file."""
    if not path.is_file():
        raise VidpipeError(f"{path}: file not found")
    try:
        array = np.load(path)
    except (ValueError, OSError) as exc:
        raise VidpipeError(f"{path}: not a readable .npy file ({exc})") from None
    if array.ndim != 2:
        raise VidpipeError(f"{path}: expected a (T, D) array, got shape {array.shape}")
    if columns is not None and array.shape[1] != columns:
        raise VidpipeError(f"{path}: {array.shape[1]} target columns, expected {columns}")
    return array


def _labels_from_target(target: np.ndarray, spec: DatasetSpec) -> VideoLabels:
    """LSTR's target columns -> our targets (T, C+1) and ambiguous mask (T,).

    The ambiguous column becomes the mask (LSTR drops those steps from loss and metrics).
    Steps with several actions get soft targets summing to 1, as the LabelSet stores them.
    """
    target = target.astype(np.float32)
    if spec.ambiguous_column is None:
        ambiguous = np.zeros(len(target), bool)
    else:
        ambiguous = target[:, spec.ambiguous_column] > 0
        target = np.delete(target, spec.ambiguous_column, axis=1)
    total = target.sum(axis=1, keepdims=True)
    target = np.divide(target, total, out=np.zeros_like(target), where=total > 0)
    return VideoLabels(targets=target, ambiguous=ambiguous)
