"""Exporter of a vidpipe cache into the LSTR/TeSTra/MAT layout (store/importers.py describes
the layout and owns its names; this module only writes it).

`export_lstr(cache, out)` writes, for every labelled video of the cache,

    OUT/rgb_<name>/VID.npy, OUT/flow_<name>/VID.npy   (T, D) float32, the cache's features
    OUT/target_perframe/VID.npy                       (T, columns) float32, the labels
    OUT/data_info.json                                the entry those codebases read
    OUT/vidpipe/cache.json, OUT/vidpipe/timestamps/   what they never read: the cache's
                                                      settings, attributes and timestamps
    OUT/vidpipe/NOTES.txt                             what a user of OUT must know (also
                                                      printed): e.g. where LSTR's evaluation
                                                      of OUT differs from `vidpipe eval`

so that LSTR, TeSTra and MAT train on it with their own configs (README: "use vidpipe
features in TeSTra/MAT"), and `import_lstr(OUT)` gives back the cache it came from.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vidpipe.core.atomic import atomic_path, write_text_atomically
from vidpipe.core.errors import VidpipeError
from vidpipe.core.log import progress_bar
from vidpipe.store.cache import FeatureStore
from vidpipe.store.importers import (DATA_INFO_FILE, DATASETS, EXTRAS_DIR, EXTRAS_FILE,
                                     TARGET_DIR, TIMESTAMPS_DIR, DatasetSpec, batch_incomplete,
                                     target_from_labels)
from vidpipe.store.labels import LABELS_FILE, LabelSet

log = logging.getLogger(__name__)

# The feature folder names LSTR, TeSTra and MAT know the width of (FEATURE_SIZES in their
# models/feature_head.py): a folder must have one of these names to be read unchanged.
LSTR_FEATURE_SIZES = {
    "rgb_kinetics_resnet50": 2048, "flow_kinetics_resnet50": 2048,
    "rgb_kinetics_bninception": 1024, "flow_kinetics_bninception": 1024,
    "rgb_anet_resnet50": 2048, "flow_anet_resnet50": 2048,
}
# The feature recipes that reproduce the public features, and the public folder names.
RECIPE_FOLDERS = {
    "tsn-kinetics": {"rgb": "rgb_kinetics_resnet50", "flow": "flow_kinetics_bninception"},
    "tsn-kinetics-r50": {"rgb": "rgb_kinetics_resnet50", "flow": "flow_kinetics_resnet50"},
}
# LSTR picks its data loader (and THUMOS's post-processing, which drops column 21) by the
# data_info name: a dataset that is not THUMOS'14 goes under TVSeries's generic loader.
OTHER_DATA_NAME = "TVSeries"
THUMOS_DATA_NAME, THUMOS_AMBIGUOUS_COLUMN = "THUMOS", 21   # LSTR evaluation/postprocessing.py:31-36
NOTES_FILE = "NOTES.txt"


@dataclass
class ExportReport:
    out: str
    data_name: str
    folders: dict[str, str] = field(default_factory=dict)    # "rgb"/"flow" -> folder name
    exported: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)      # no labels: not exported
    failed: dict[str, str] = field(default_factory=dict)     # video id -> one-line reason
    notes: list[str] = field(default_factory=list)           # what a user of OUT must know

    def summary(self) -> str:
        lines = [f"{self.out}: {len(self.exported)} videos exported to {self.folders['rgb']}/, "
                 f"{self.folders['flow']}/, {TARGET_DIR}/ and {DATA_INFO_FILE} "
                 f"(DATA.DATA_NAME {self.data_name})"]
        if self.unlabelled:
            lines.append(f"{len(self.unlabelled)} videos without labels left out "
                         f"(e.g. {self.unlabelled[0]}); label them with `vidpipe labels`")
        return "\n".join(lines + self.notes)


def export_lstr(cache: str | Path, out: str | Path, labels: str | Path | None = None,
                rgb_dir: str | None = None, flow_dir: str | None = None,
                data_name: str | None = None, progress: bool = True) -> ExportReport:
    """Write the labelled videos of `cache` (labels: CACHE/labels.h5 unless given) to `out`
    in the LSTR layout; see the module notes. Folder names: `rgb_dir`/`flow_dir`, else
    those of the recipe or import the cache came from, else LSTR's name for the feature
    width. A bad video is reported and skipped; BatchIncomplete at the end if any was.
    """
    store, out = FeatureStore.open(cache), Path(out)
    label_set = LabelSet.load(labels if labels is not None else Path(cache) / LABELS_FILE)
    spec = _export_spec(label_set, data_name, float(store.settings["step_seconds"]))
    video_ids = [v for v in store.video_ids() if v in label_set.videos]
    if not video_ids:
        raise VidpipeError(f"{cache}: no video of the cache has labels; "
                           "make them with `vidpipe labels` first")
    report = ExportReport(str(out), spec.name, unlabelled=[v for v in store.video_ids()
                                                           if v not in label_set.videos])
    report.folders = _feature_folders(store, video_ids[0], rgb_dir, flow_dir, report.notes)
    attrs: dict[str, dict[str, Any]] = {}
    for video_id in progress_bar(video_ids, enabled=progress, desc="export", unit="video"):
        try:
            attrs[video_id] = _export_video(store, video_id, label_set, spec, out, report.folders)
        except VidpipeError as exc:
            report.failed[video_id] = str(exc)
            log.error("%s", exc)
            continue
        report.exported.append(video_id)
    _write_data_info(out, spec, label_set, report)
    _note_evaluation(spec, label_set, report)
    write_text_atomically(out / EXTRAS_DIR / NOTES_FILE, "".join(f"- {n}\n" for n in report.notes))
    write_text_atomically(out / EXTRAS_DIR / EXTRAS_FILE, json.dumps(
        {"format": "vidpipe cache export", "cache": str(cache), "settings": store.settings,
         "videos": attrs}, indent=2))
    if report.failed:
        raise batch_incomplete(cache, report.failed, len(video_ids), "exported", out)
    return report


def _export_spec(label_set: LabelSet, data_name: str | None,
                 step_seconds: float) -> DatasetSpec:
    """The target columns: THUMOS'14's or TVSeries's when the classes are theirs, else the
    labels' classes, with an ambiguous column last when some step is ambiguous."""
    actions = label_set.class_names[1:]
    ambiguous = any(v.ambiguous.any() for v in label_set.videos.values())
    known = next((spec for spec in DATASETS.values() if spec.actions == actions
                  and (spec.ambiguous_column is not None or not ambiguous)), None)
    if known is None:
        known = DatasetSpec(OTHER_DATA_NAME, actions, len(actions) + 1 if ambiguous else None)
    spec = replace(known, name=data_name or known.name, step_seconds=step_seconds)
    if spec.name == THUMOS_DATA_NAME and spec.ambiguous_column not in (None, THUMOS_AMBIGUOUS_COLUMN):
        raise VidpipeError(f"--data-name {THUMOS_DATA_NAME}: LSTR's THUMOS evaluation drops column "
                           f"{THUMOS_AMBIGUOUS_COLUMN} as ambiguous, but these labels' ambiguous "
                           f"column is {spec.ambiguous_column}; use another --data-name")
    return spec


def _note_evaluation(spec: DatasetSpec, label_set: LabelSet, report: ExportReport) -> None:
    """Say where LSTR's per-frame evaluation of the export differs from `vidpipe eval` on
    the cache (a note and a warning). The test videos' order agrees: data_info lists them
    sorted, the order in which both pool them."""
    report.notes.append("evaluation: LSTR's trainer reports each epoch on non-overlapping "
                        "work-memory windows (`vidpipe eval --protocol chunks`), its batch "
                        "inference on stride-1 windows (`--protocol sliding`, the default)")
    if spec.name == THUMOS_DATA_NAME or spec.ambiguous_column is None:
        return      # LSTR drops the ambiguous steps as vidpipe does (or there are none)
    tested = [v for v in report.exported
              if label_set.splits.get(v) == "test" or not label_set.splits]
    steps = sum(int(label_set.videos[v].ambiguous.sum()) for v in tested)
    if not steps:
        return
    note = (f"evaluation: {steps} ambiguous steps in the test videos. LSTR/TeSTra/MAT drop "
            f"ambiguous steps from the per-frame metric only under DATA_NAME "
            f"{THUMOS_DATA_NAME} (evaluation/postprocessing.py); under {spec.name} their "
            f"evaluation scores them (a positive of each action they carry, a negative of every "
            f"other class), while `vidpipe eval` leaves them out: mAP / mcAP differ. Training "
            f"is the same (their loss skips rows whose column {spec.ambiguous_column}, "
            f"ignore_index, is 1)")
    report.notes.append(note)
    log.warning("%s", note)


def _feature_folders(store: FeatureStore, sample_video: str, rgb_dir: str | None,
                     flow_dir: str | None, notes: list[str]) -> dict[str, str]:
    """Each stream's folder name (see `export_lstr`); notes say what LSTR needs to read it."""
    features = store.read(sample_video)
    widths = {"rgb": features.rgb.shape[1], "flow": features.flow.shape[1]}
    given = {"rgb": rgb_dir, "flow": flow_dir}
    settings = store.settings
    folders = {}
    for stream, width in widths.items():
        name = (given[stream] or settings.get(f"{stream}_features")
                or RECIPE_FOLDERS.get(settings.get("recipe"), {}).get(stream))
        if name is None:
            name = next((n for n, size in LSTR_FEATURE_SIZES.items()
                         if n.startswith(f"{stream}_") and size == width), None)
            backbone = settings.get(f"{stream}_backbone", "unknown")
            if name is not None:
                notes.append(f"{stream}: folder {name} is LSTR's name for {width}-d features; "
                             f"they are vidpipe's {backbone} features ({EXTRAS_DIR}/{EXTRAS_FILE} "
                             "has their settings)")
            else:
                name = f"{stream}_vidpipe_" + re.sub(r"[^A-Za-z0-9]+", "_", str(backbone))
        if not name.startswith(f"{stream}_"):
            raise VidpipeError(f"--{stream}-dir {name}: the folder name must start with '{stream}_'")
        if LSTR_FEATURE_SIZES.get(name) != width:
            notes.append(f"{stream}: add '{name}': {width} to FEATURE_SIZES in "
                         "models/feature_head.py (LSTR/TeSTra/MAT) to read these features")
        folders[stream] = name
    return folders


def _export_video(store: FeatureStore, video_id: str, label_set: LabelSet, spec: DatasetSpec,
                  out: Path, folders: dict[str, str]) -> dict[str, Any]:
    """Write one video's four arrays; returns its attributes (for the extras file)."""
    features, labels = store.read(video_id), label_set.videos[video_id]
    if len(labels.targets) != len(features):
        raise VidpipeError(f"{video_id}: {len(labels.targets)} labelled steps but "
                           f"{len(features)} cached steps; rerun `vidpipe labels` on this cache")
    arrays = {folders["rgb"]: features.rgb, folders["flow"]: features.flow,
              TARGET_DIR: target_from_labels(labels, spec),
              f"{EXTRAS_DIR}/{TIMESTAMPS_DIR}": features.timestamps}
    for folder, array in arrays.items():
        with atomic_path(out / folder / f"{video_id}.npy", suffix=".npy") as temp:
            np.save(temp, array)
    return features.attrs


def _write_data_info(out: Path, spec: DatasetSpec, label_set: LabelSet,
                     report: ExportReport) -> None:
    """OUT/data_info.json: one entry, named as LSTR's DATA.DATA_NAME, whose session sets are
    the exported videos of each split (all in neither when the labels have no split)."""
    split = {v: label_set.splits.get(v) for v in report.exported}
    spec = replace(spec, train=frozenset(v for v, s in split.items() if s == "train"),
                   test=frozenset(v for v, s in split.items() if s == "test"))
    if not label_set.splits:
        report.notes.append("the labels have no train/test split: set DATA.TRAIN_SESSION_SET "
                            "and DATA.TEST_SESSION_SET in the config")
    entry = spec.data_info_entry(str(out.resolve()))
    write_text_atomically(out / DATA_INFO_FILE, json.dumps({spec.name: entry}, indent=2))
