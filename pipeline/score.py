"""Event metrics of what `detect` emits (`malt.events`), scored against the ground-truth
segments of a labelled cache: from timeline files, or from a checkpoint run on the cache.

- `score_timelines(folder, cache)`: the `*.timeline.json` files `vidpipe detect` wrote; each
  is matched to its cache video (the cache id it records, else its source's name) and
  scored with the events it recorded (timeline version 2).
- `checkpoint_probabilities(...)` runs the streaming detector (`malt.stream`) over cached
  features, many videos as one batch, no video decoded; `score_probabilities` puts them
  through the event rules (`pipeline.timeline`) and scores the result. `calibrate` searches
  rules on the same probabilities.

A start is scored at the moment it was decided (`Event.decided_s`: the end of the step at
which it was announced), which is when a user learns of it; docs/evaluation.md says why.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vidpipe.core.atomic import atomic_path
from vidpipe.core.errors import VidpipeError
from vidpipe.core.log import progress_bar
from vidpipe.malt.events import DetectedStart, VideoEvents, event_report
from vidpipe.pipeline.timeline import Event, Timeline, TimelineSettings, run_segmenter
from vidpipe.store.labels import LabelSet, Segment

log = logging.getLogger(__name__)

STREAMS_PER_BATCH = 32   # videos stepped together through the streaming detector


@dataclass
class VideoProbs:
    """One labelled video's per-step probabilities and ground truth."""
    video_id: str
    timestamps: np.ndarray      # (T,) step starts, seconds
    probs: np.ndarray           # (T, C+1)
    truth: list[Segment]
    duration_s: float


@dataclass
class LabelledProbs:
    """What the event rules run on: every video of a split, with its context."""
    videos: list[VideoProbs]
    class_names: list[str]      # C+1, background first
    step_seconds: float
    split: str


def video_events(segments: list[Segment], events: list[Event], duration_s: float,
                 truth: list[Segment]) -> VideoEvents:
    """A video's detections as the metrics read them: its segments and its start events."""
    starts = [DetectedStart(e.label, e.decided_s, e.score) for e in events if e.kind == "start"]
    return VideoEvents(duration_s=duration_s, truth=truth, segments=segments, starts=starts)


def apply_rules(data: LabelledProbs, settings: TimelineSettings) -> list[VideoEvents]:
    """Every video of `data` through the event rules `settings` (as `detect` applies them)."""
    scored = []
    for video in data.videos:
        segmenter = run_segmenter(video.probs, video.timestamps, data.class_names,
                                  data.step_seconds, settings)
        scored.append(video_events(segmenter.segments, segmenter.events, video.duration_s,
                                   video.truth))
    return scored


def score_probabilities(data: LabelledProbs, settings: TimelineSettings) -> dict:
    """The event report of `data` under the rules `settings`."""
    return event_report(apply_rules(data, settings), data.class_names[1:])


# --- timelines ---------------------------------------------------------------------------------

def score_timelines(folder: str | Path, cache: str | Path, labels: str | Path | None = None) -> dict:
    """The event report of every `*.timeline.json` in `folder` whose video is labelled in
    `cache` (others are skipped, with a warning)."""
    from vidpipe.malt.data import resolve_labels
    from vidpipe.store.cache import FeatureStore

    folder = Path(folder)
    files = sorted(folder.glob("*.timeline.json"))
    if not files:
        raise VidpipeError(f"{folder}: no *.timeline.json files (written by `vidpipe detect`)")
    store = FeatureStore.open(cache)
    label_set, source = resolve_labels(store, labels)
    scored, names, settings = [], [], set()
    for path in files:
        timeline = Timeline.load(path)
        video_id = _labelled_video(timeline, path, store, label_set)
        if video_id is None:
            continue
        _check_timeline(timeline, path, label_set, source)
        truth = label_set.segments(video_id, store.timestamps(video_id), float(store.settings["step_seconds"]))
        scored.append(video_events(timeline.segments, timeline.events, timeline.duration_s, truth))
        names.append(video_id)
        settings.add(json.dumps(asdict(timeline.settings), sort_keys=True))
    if not scored:
        raise VidpipeError(f"{folder}: none of its {len(files)} timelines is of a video labelled in {source}")
    report = event_report(scored, label_set.class_names[1:])
    report.update(timelines=str(folder), videos=names, labels=source,
                  rules=[json.loads(s) for s in sorted(settings)])
    return report


def _labelled_video(timeline: Timeline, path: Path, store, label_set: LabelSet) -> str | None:
    from vidpipe.store.labels import match_videos

    video = timeline.metadata.get("video") or {}
    video_id = video.get("cache_id")
    if video_id is None:
        name = str(video.get("source", path.name.removesuffix(".timeline.json")))
        video_id = match_videos(store, [name], path, skip_missing=True).get(name)
    if video_id not in label_set.videos:
        log.warning("%s: its video is not labelled in the cache; skipped", path)
        return None
    return video_id


def _check_timeline(timeline: Timeline, path: Path, label_set: LabelSet, source: str) -> None:
    if timeline.class_names != label_set.class_names:
        raise VidpipeError(f"{path}: classes differ from those of {source}")
    if timeline.segments and not timeline.events:
        raise VidpipeError(f"{path}: records no events (a version 1 timeline); run "
                           "`vidpipe detect` again to score its starts")


# --- a checkpoint on cached features -----------------------------------------------------------

def checkpoint_probabilities(checkpoint: str | Path, cache: str | Path,
                             labels: str | Path | None, split: str | None,
                             device: str | None = None, precision: str = "fp32",
                             choosing_rules: bool = False) -> LabelledProbs:
    """Streaming-detector probabilities of every video of `split` (default: the checkpoint's
    test split; 'val': its validation videos) with their ground truth; the detector in
    `precision` (malt.stream). `choosing_rules` (`calibrate`): the test split, or a split
    holding any of its videos, is refused before the model runs."""
    from vidpipe.malt.checkpoint import load_model
    from vidpipe.malt.data import resolve_labels
    from vidpipe.malt.evaluate import check_compatible
    from vidpipe.store.cache import FeatureStore

    model, ckpt = load_model(checkpoint, device)
    store = FeatureStore.open(cache)
    label_set, source = resolve_labels(store, labels)
    check_compatible(ckpt, store, label_set.class_names, checkpoint, source)
    config = ckpt.model_config(str(checkpoint))
    asked = split
    split, video_ids = split_videos(label_set, config, split, source)
    if choosing_rules:
        _refuse_test_videos(asked, split, video_ids, label_set, config.data.test_split)
    step_seconds = float(store.settings["step_seconds"])
    log.info("streaming detector on %d videos of split '%s'", len(video_ids), split)
    videos = []
    for group in range(0, len(video_ids), STREAMS_PER_BATCH):
        ids = video_ids[group:group + STREAMS_PER_BATCH]
        features = {v: store.read(v) for v in ids}
        probs = stream_probabilities(model, {v: (f.rgb, f.flow) for v, f in features.items()}, precision)
        for v in ids:
            timestamps = np.asarray(features[v].timestamps, np.float64)
            duration = float(timestamps[-1] + step_seconds) if len(timestamps) else 0.0
            videos.append(VideoProbs(v, timestamps, probs[v],
                                     label_set.segments(v, timestamps, step_seconds), duration))
    return LabelledProbs(videos, label_set.class_names, step_seconds, split)


def _refuse_test_videos(asked: str | None, split: str, video_ids: list[str], label_set: LabelSet,
                        test_split: str) -> None:
    test_videos = set(label_set.split(test_split)) if label_set.splits else set()
    if split == test_split or test_videos & set(video_ids):
        raise VidpipeError(f"--split {asked}: the test split '{test_split}' (or videos of it) never "
                           "choose rules; calibrate on validation videos (--split val)")


def split_videos(label_set: LabelSet, config, split: str | None, source: str) -> tuple[str, list[str]]:
    """(split name, video ids): a split of the labels; 'val' without one is the run's
    validation videos (`data.val_split`, or the `data.val_fraction` it held out)."""
    from vidpipe.malt.data import held_out_videos

    split = split or config.data.test_split
    if split == "val" and "val" not in set(label_set.splits.values()):
        if config.data.val_split is not None:
            split = config.data.val_split
        elif config.data.val_fraction is not None:
            ids = held_out_videos(label_set.split(config.data.train_split),
                                  config.data.val_fraction, config.train.seed)
            return "val", ids
        else:
            raise VidpipeError(f"{source}: no split 'val', and the checkpoint's run held out no "
                               "validation videos (train with --set data.val_fraction=0.2, or "
                               "name a split of the labels)")
    video_ids = label_set.split(split)
    if not video_ids:
        known = sorted(set(label_set.splits.values()))
        raise VidpipeError(f"{source}: no videos in split '{split}'"
                           + (f" (splits there: {', '.join(known)})" if known else ""))
    return split, video_ids


def stream_probabilities(model, videos: dict[str, tuple[np.ndarray, np.ndarray]],
                         precision: str = "fp32") -> dict[str, np.ndarray]:
    """{video: (rgb (T, Dr), flow (T, Df))} -> {video: probabilities (T, C+1)}, each video one
    stream of `malt.stream.MultiStreamDetector`, stepped together (causal, as `detect`)."""
    from vidpipe.malt.stream import MultiStreamDetector

    detector = MultiStreamDetector(model, precision=precision)
    for key in videos:
        detector.add_stream(key)
    rows: dict[str, list[np.ndarray]] = {key: [] for key in videos}
    steps = max((len(rgb) for rgb, _ in videos.values()), default=0)
    for t in progress_bar(range(steps), desc=f"{len(videos)} streams", unit="step", heartbeat_s=30):
        inputs = {key: (rgb[t], flow[t]) for key, (rgb, flow) in videos.items() if t < len(rgb)}
        for key, row in detector.step(inputs).items():
            rows[key].append(row)
    classes = model.cfg.num_classes
    return {key: np.stack(r) if r else np.zeros((0, classes), np.float32) for key, r in rows.items()}


# --- the report: table, JSON, picture ----------------------------------------------------------

def format_event_table(report: dict) -> str:
    """Start p-AP per class and offset, then segment F1 / edit / latency / false starts."""
    offsets = list(report["start_ap"])
    classes = sorted({c for r in report["start_ap"].values() for c in r["per_class"]})
    width = max([len(c) for c in classes] + [len("start p-AP")])
    lines = [f"{'start p-AP':<{width}}" + "".join(f"{o + ' s':>7}" for o in offsets) + "   mean"]
    for name in classes + ["mean"]:
        values = [r["mean"] if name == "mean" else r["per_class"].get(name, math.nan)
                  for r in report["start_ap"].values()]
        lines.append(f"{name:<{width}}" + "".join(f"{100 * v:7.1f}" for v in values)
                     + f"{100 * np.nanmean(values):7.1f}")
    latency = report["latency_s"]
    lines += [
        "segment " + ", ".join(f"F1@{k} {100 * v:.1f}" for k, v in report["f1"].items())
        + f", edit {100 * report['edit']:.1f}",
        f"start latency median {latency['median']:.2f} s, p90 {latency['p90']:.2f} s "
        f"({latency['matched']} of {report['num_true_starts']} true starts matched within "
        f"{latency['offset_s']:g} s); false starts {report['false_starts_per_hour']:.1f} per hour "
        f"({report['num_starts']} starts in {report['hours'] * 60:.1f} min, {report['num_videos']} videos)"]
    return "\n".join(lines)


def plot_event_report(report: dict, path: str | Path) -> Path:
    """Start p-mAP (and each class) against the offset, and the histogram of start latency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, histogram) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    offsets = [float(o) for o in report["start_ap"]]
    for name in sorted({c for r in report["start_ap"].values() for c in r["per_class"]}):
        curve.plot(offsets, [r["per_class"].get(name, math.nan) for r in report["start_ap"].values()],
                   lw=0.8, alpha=0.5, label=name)
    curve.plot(offsets, [r["mean"] for r in report["start_ap"].values()], "k-o", lw=2, label="mean")
    curve.set(xlabel="offset (s)", ylabel="point-level AP of starts", ylim=(0, 1.02),
              title="start p-AP vs offset")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=7, ncol=2)
    latency = report["latency_s"]
    histogram.hist(latency["values"], bins=20, color="tab:blue")
    histogram.set(xlabel="decided - true start (s)", ylabel="matched starts",
                  title=f"start latency (median {latency['median']:.2f} s, p90 {latency['p90']:.2f} s)")
    histogram.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as temp:
        fig.savefig(temp, format="png")
    plt.close(fig)
    return Path(path)


def event_evaluation(cache: str | Path, labels: str | Path | None = None, split: str | None = None,
                     checkpoint: str | Path | None = None, timelines: str | Path | None = None,
                     device: str | None = None, out: str | Path | None = None,
                     picture: str | Path | None = None, frame_report: dict | None = None,
                     precision: str = "fp32") -> tuple[dict, str]:
    """`vidpipe eval`'s event part: the report of `timelines` (a folder of detect's files) or
    of `checkpoint` on `split` of the cache (with its rules: calibrated, else the defaults);
    writes `out` (JSON: `frame_report` with the event report under "events", or the event
    report alone) and `picture` (default with `out`: the same name, .png). Returns the report
    and the text to show."""
    from vidpipe.malt.evaluate import write_json_report
    from vidpipe.pipeline.calibrate import checkpoint_rules

    if timelines is not None:
        if split is not None:
            raise VidpipeError("--split chooses the videos of --checkpoint; --timelines scores "
                               "every labelled video it has a timeline of")
        report = score_timelines(timelines, cache, labels)
        heading = f"event metrics of the timelines in {timelines} ({len(report['videos'])} labelled videos)"
    else:
        settings, rules = checkpoint_rules(checkpoint)
        data = checkpoint_probabilities(checkpoint, cache, labels, split, device, precision)
        report = score_probabilities(data, settings)
        report.update(split=data.split, rules=asdict(settings), rules_source=rules)
        heading = f"event metrics of the streaming detector on split '{data.split}', {rules}"
    text = heading + "\n" + format_event_table(report)
    if frame_report is not None:   # the two families side by side, one line
        text += (f"\nframe mAP {100 * frame_report['mAP']:.2f} | start p-mAP {100 * report['start_mAP']:.1f} | "
                 f"segment F1@0.25 {100 * report['f1']['0.25']:.1f} | edit {100 * report['edit']:.1f} | "
                 f"start latency {report['latency_s']['median']:.2f} s | "
                 f"{report['false_starts_per_hour']:.0f} false starts/h")
    if out is not None:
        write_json_report({**frame_report, "events": report} if frame_report else report, out)
        picture = picture or Path(out).with_suffix(".png")
    if picture is not None:
        text += f"\nevent metrics picture: {plot_event_report(report, picture)}"
    return report, text
