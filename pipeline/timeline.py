"""Per-step class probabilities -> action timeline: segments, events, JSON, CSV and a PNG.

The event rules (all in `TimelineSettings`, every value in seconds of the source video;
docs/detect.md defines each):
  1. smoothing: each class's probability is averaged over the last `smoothing_s` seconds of
     steps (causal; 0: the step's own value), the *score* the thresholds are compared with;
  2. hysteresis: class c (never background, column 0) turns *on* at a step whose score is
     >= its start threshold (`threshold`, or `class_thresholds[name]`) and stays on while its
     score is >= its end threshold (`end_threshold` / `class_end_thresholds`; default: the
     start threshold); a value equal to a threshold counts as reaching it; classes are
     independent tracks, so two classes may overlap (as THUMOS'14 annotations do);
  3. runs of on steps of one class become segments [start of first step, end of last step);
     two segments of a class separated by at most `merge_gap_s` are merged;
  4. merged segments shorter than `min_duration_s` are dropped;
  5. a segment's score is the mean (unsmoothed) probability of its class over its steps.

The rule is applied causally by `Segmenter`, one step at a time, so the live events of
`vidpipe detect` and the final timeline always agree: a segment's `start` event is emitted
once it has lasted `min_duration_s`, its `end` event once `merge_gap_s` has passed without
the class (the decision delay the rule needs, and no more). An event's `score` is the
highest smoothed score of its class in the segment so far, so a start's score is at or
above the `threshold` it carries (the start threshold it crossed).
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from vidpipe.core.atomic import atomic_path, write_csv_atomically
from vidpipe.core.errors import VidpipeError
from vidpipe.store.labels import Segment

TIMELINE_FORMAT = "vidpipe-timeline"
TIMELINE_VERSION = 2        # 2: events and the hysteresis/smoothing rules; 1 is still read
_EPS = 1e-9  # float slack when comparing durations built from timestamps


@dataclass
class TimelineSettings:
    """The event rules (module notes)."""
    threshold: float = 0.5                  # start threshold of every class ...
    class_thresholds: dict[str, float] = field(default_factory=dict)  # ... or of this one
    min_duration_s: float = 0.5             # shorter segments are dropped
    merge_gap_s: float = 0.5                # same-class segments this close are merged
    end_threshold: float | None = None      # stay on while >= this (None: the start threshold)
    class_end_thresholds: dict[str, float] = field(default_factory=dict)
    smoothing_s: float = 0.0                # causal moving average of the scores (0: none)

    def start_threshold_of(self, name: str) -> float:
        return self.class_thresholds.get(name, self.threshold)

    def end_threshold_of(self, name: str) -> float:
        default = self.end_threshold if self.end_threshold is not None else self.start_threshold_of(name)
        return self.class_end_thresholds.get(name, min(default, self.start_threshold_of(name)))


@dataclass
class Event:
    kind: str                               # "start" | "end"
    label: str
    time_s: float                           # segment start (start event) or end (end event)
    score: float                            # highest smoothed score of the class in the segment so far
    threshold: float                        # start: the start threshold crossed; end: the end threshold
    step: int                               # index of the step at which it was decided
    decided_s: float                        # video time it was decided at: the end of that step


def format_time(seconds: float, decimals: int = 2) -> str:
    """73.5 -> '00:01:13.50' (hours always shown, as in the live event lines)."""
    seconds = max(0.0, float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    width = 3 + decimals if decimals else 2
    return f"{int(hours):02d}:{int(minutes):02d}:{secs:0{width}.{decimals}f}"


@dataclass
class _Track:
    """One class's segment being built."""
    start_s: float
    end_s: float                            # end of the last active step
    total: float                            # sum of probabilities over the steps so far
    count: int
    peak: float = 0.0                       # highest smoothed score over the on steps
    pending_total: float = 0.0              # off steps since end_s (kept if merged)
    pending_count: int = 0
    confirmed: bool = False                 # start event emitted


class Segmenter:
    """The event rules of the module notes, applied one step at a time."""

    def __init__(self, class_names: list[str], step_seconds: float,
                 settings: TimelineSettings | None = None):
        self.class_names = list(class_names)
        self.step_seconds = float(step_seconds)
        self.settings = settings or TimelineSettings()
        check_settings(self.settings, self.class_names)
        names = self.class_names[1:]
        self.start_thresholds = np.array([math.inf] + [self.settings.start_threshold_of(n) for n in names])
        self.end_thresholds = np.array([math.inf] + [self.settings.end_threshold_of(n) for n in names])
        window = max(1, round(self.settings.smoothing_s / self.step_seconds))
        self._recent: deque[np.ndarray] = deque(maxlen=window)   # last rows, for smoothing
        self._on = np.zeros(len(self.class_names), bool)
        self.segments: list[Segment] = []
        self.events: list[Event] = []           # every event so far, in order
        self._tracks: dict[int, _Track] = {}
        self._step = -1
        self._step_end = 0.0

    def step(self, timestamp: float, probs: np.ndarray) -> list[Event]:
        """Feed one step's probabilities (C+1,); return the events decided at this step."""
        self._step += 1
        probs = np.asarray(probs, np.float64)
        self._recent.append(probs)
        score = np.mean(self._recent, axis=0)                                   # (C+1,)
        self._on = score >= np.where(self._on, self.end_thresholds, self.start_thresholds)
        self._step_end = step_end = float(timestamp) + self.step_seconds
        events: list[Event] = []
        for c in range(1, len(self.class_names)):
            track = self._tracks.get(c)
            if self._on[c]:
                if track is None:
                    track = self._tracks[c] = _Track(float(timestamp), step_end, 0.0, 0)
                track.total += track.pending_total + float(probs[c])
                track.count += track.pending_count + 1
                track.pending_total, track.pending_count = 0.0, 0
                track.end_s, track.peak = step_end, max(track.peak, float(score[c]))
                if (not track.confirmed
                        and track.end_s - track.start_s >= self.settings.min_duration_s - _EPS):
                    track.confirmed = True
                    events.append(self._event("start", c, track.start_s, track))
            elif track is not None:
                track.pending_total += float(probs[c])
                track.pending_count += 1
                if step_end - track.end_s > self.settings.merge_gap_s + _EPS:
                    events += self._close(c)
        self.events += events
        return events

    def active(self) -> list[Segment]:
        """The segments announced (start event) and not ended yet, as they stand now."""
        return [Segment(self.class_names[c], track.start_s, track.end_s, track.total / track.count)
                for c, track in sorted(self._tracks.items()) if track.confirmed]

    def finish(self) -> list[Event]:
        """End of the video: close every open segment."""
        events: list[Event] = []
        for c in sorted(self._tracks):
            events += self._close(c)
        self.segments.sort(key=lambda s: (s.start_s, self.class_names.index(s.label)))
        self.events += events
        return events

    def _event(self, kind: str, c: int, time_s: float, track: _Track) -> Event:
        threshold = self.start_thresholds[c] if kind == "start" else self.end_thresholds[c]
        return Event(kind, self.class_names[c], time_s, track.peak, float(threshold),
                     self._step, self._step_end)

    def _close(self, c: int) -> list[Event]:
        track = self._tracks.pop(c)
        if not track.confirmed:
            return []
        segment = Segment(self.class_names[c], track.start_s, track.end_s,
                          track.total / track.count)
        self.segments.append(segment)
        return [self._event("end", c, segment.end_s, track)]


def check_settings(settings: TimelineSettings, class_names: list[str]) -> None:
    """Rules naming unknown classes, thresholds outside [0, 1], an end threshold above its
    start threshold or negative durations are one-line errors."""
    known = class_names[1:]
    for option, values in (("class threshold", settings.class_thresholds),
                           ("class end threshold", settings.class_end_thresholds)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise VidpipeError(f"{option} for unknown class '{unknown[0]}' "
                               f"(classes: {', '.join(known)})")
    for name in known:
        start, end = settings.start_threshold_of(name), settings.end_threshold_of(name)
        if not (0.0 <= end <= start <= 1.0):
            raise VidpipeError(f"thresholds of '{name}': need 0 <= end ({end:g}) <= start "
                               f"({start:g}) <= 1")
    if min(settings.min_duration_s, settings.merge_gap_s, settings.smoothing_s) < 0:
        raise VidpipeError("min_duration_s, merge_gap_s and smoothing_s must be >= 0 seconds")


def run_segmenter(probs: np.ndarray, timestamps: np.ndarray, class_names: list[str],
                  step_seconds: float, settings: TimelineSettings | None = None) -> Segmenter:
    """A whole video through the rules: probs (T, C+1), timestamps (T,) step starts; the
    finished `Segmenter` holds its `segments` and `events`."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape != (len(timestamps), len(class_names)):
        raise ValueError(f"probs {probs.shape} does not match {len(timestamps)} timestamps "
                         f"x {len(class_names)} classes")
    segmenter = Segmenter(class_names, step_seconds, settings)
    for t, row in zip(timestamps, probs):
        segmenter.step(float(t), row)
    segmenter.finish()
    return segmenter


def find_segments(probs: np.ndarray, timestamps: np.ndarray, class_names: list[str],
                  step_seconds: float, settings: TimelineSettings | None = None) -> list[Segment]:
    """Segments of a whole video: probs (T, C+1), timestamps (T,) step starts."""
    return run_segmenter(probs, timestamps, class_names, step_seconds, settings).segments


# --- the timeline file -------------------------------------------------------------------------

@dataclass
class Timeline:
    """Everything `detect` found in one video; saved as JSON (schema in `to_dict`)."""
    class_names: list[str]                  # C+1, [0] == "background"
    timestamps: np.ndarray                  # (T,) step starts, seconds
    probs: np.ndarray                       # (T, C+1) per-step probabilities
    step_seconds: float
    segments: list[Segment]
    settings: TimelineSettings = field(default_factory=TimelineSettings)
    metadata: dict[str, Any] = field(default_factory=dict)  # video, model, features, timings
    events: list[Event] = field(default_factory=list)       # start/end decisions, in order

    @classmethod
    def from_probs(cls, probs: np.ndarray, timestamps: np.ndarray, class_names: list[str],
                   step_seconds: float, settings: TimelineSettings | None = None,
                   metadata: dict[str, Any] | None = None) -> "Timeline":
        segmenter = run_segmenter(probs, timestamps, class_names, step_seconds, settings)
        return cls(list(class_names), np.asarray(timestamps, np.float64),
                   np.asarray(probs, np.float32), float(step_seconds), segmenter.segments,
                   segmenter.settings, dict(metadata or {}), segmenter.events)

    @property
    def duration_s(self) -> float:
        return float(self.timestamps[-1] + self.step_seconds) if len(self.timestamps) else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON schema (version 2; docs/detect.md defines every field):
        {"format": "vidpipe-timeline", "version": 2, "metadata": {video, model, features,
         timings, rules (where the rules came from), ...}, "settings": {the event rules:
         threshold, class_thresholds, end_threshold, class_end_thresholds, smoothing_s,
         min_duration_s, merge_gap_s}, "class_names": [...], "step_seconds": s,
         "duration_s": s, "segments": [{"label", "start_s", "end_s", "score"}, ...],
         "events": [{"kind", "label", "time_s", "score", "threshold", "step", "decided_s"}],
         "timestamps": [T], "probabilities": [T x (C+1)]}
        """
        return {**self._header(), "timestamps": np.round(self.timestamps, 6).tolist(),
                "probabilities": np.round(self.probs.astype(np.float64), 6).tolist()}

    def _header(self) -> dict[str, Any]:
        """`to_dict` without its per-step arrays."""
        return {
            "format": TIMELINE_FORMAT, "version": TIMELINE_VERSION,
            "metadata": self.metadata, "settings": asdict(self.settings),
            "class_names": self.class_names, "step_seconds": self.step_seconds,
            "duration_s": self.duration_s,
            "segments": [{"label": s.label, "start_s": s.start_s, "end_s": s.end_s,
                          "score": s.score} for s in self.segments],
            "events": [asdict(e) for e in self.events],
        }

    def save_json(self, path: str | Path) -> Path:
        """`to_dict()` as JSON text, the per-step arrays written a block of steps at a time:
        a 2-hour timeline never exists whole as Python floats (millions of small objects,
        a peak of memory at the end of a long `detect`)."""
        with atomic_path(path, suffix=".json") as temp, open(temp, "w", encoding="utf-8") as out:
            out.write(json.dumps(self._header())[:-1] + ', "timestamps": ')
            _write_json_list(out, np.round(self.timestamps, 6))
            out.write(', "probabilities": ')
            _write_json_list(out, np.round(self.probs.astype(np.float64), 6))
            out.write("}")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Timeline":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise VidpipeError(f"{path}: timeline file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VidpipeError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != TIMELINE_FORMAT:
            raise VidpipeError(f"{path}: not a vidpipe timeline file")
        if data.get("version") not in (1, TIMELINE_VERSION):
            raise VidpipeError(f"{path}: timeline version {data.get('version')} is not "
                               f"supported (expected {TIMELINE_VERSION})")
        class_names = data["class_names"]
        probs = np.asarray(data["probabilities"], np.float32).reshape(-1, len(class_names))
        return cls(class_names, np.asarray(data["timestamps"], np.float64), probs,
                   float(data["step_seconds"]), [Segment(**s) for s in data["segments"]],
                   TimelineSettings(**data["settings"]), data["metadata"],
                   [Event(**e) for e in data.get("events", [])])   # version 1: none recorded

    def save_csv(self, path: str | Path) -> Path:
        """Segments: label,start_s,end_s,score (one row each, sorted by start); a source that
        did not end at its end (metadata `ended_by` error or interrupt) ends with a row
        `(ended by interrupt)`, start_s = end_s = where it stopped, no score."""
        rows = [[s.label, f"{s.start_s:.3f}", f"{s.end_s:.3f}", f"{s.score:.4f}"]
                for s in self.segments]
        if (ended_by := self.ended_early()) is not None:
            end = f"{self.duration_s:.3f}"
            rows.append([f"(ended by {ended_by})", end, end, ""])
        return write_csv_atomically(path, ["label", "start_s", "end_s", "score"], rows)

    def ended_early(self) -> str | None:
        """'error' or 'interrupt' when the source stopped before its end (live detection's
        `ended_by`), else None."""
        ended_by = self.metadata.get("ended_by", "eof")
        return None if ended_by in ("eof", None) else str(ended_by)

    def save_png(self, path: str | Path, width_px: int = 1600, height_px: int = 700,
                 top_classes: int = 5) -> Path:
        return plot_timeline(self, path, width_px, height_px, top_classes)


def _write_json_list(out: IO[str], values: np.ndarray, block_steps: int = 4096) -> None:
    """The JSON text of `values.tolist()`, converted and written `block_steps` rows at a time."""
    out.write("[")
    for start in range(0, len(values), block_steps):
        out.write((", " if start else "") + json.dumps(values[start:start + block_steps].tolist())[1:-1])
    out.write("]")


# --- the picture -------------------------------------------------------------------------------

MAX_CURVE_POINTS = 2000  # a curve never needs more points than the figure has pixels


def downsample_max(timestamps: np.ndarray, values: np.ndarray,
                   max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Bin (T,) or (T, K) values into at most `max_points` bins, keeping each bin's maximum
    (peaks, the thing a reader looks for, survive; averaging would flatten short actions)."""
    if len(timestamps) <= max_points:
        return timestamps, values
    bins = np.linspace(0, len(timestamps), max_points + 1).astype(int)
    return timestamps[bins[:-1]], np.maximum.reduceat(values, bins[:-1], axis=0)


def _tick_step(duration_s: float, max_ticks: int = 12) -> float:
    """A round tick spacing in seconds (1 s, 5 s, 1 min, 10 min, 1 h ...) for the duration."""
    for step in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200):
        if duration_s / step <= max_ticks:
            return step
    return 3600 * math.ceil(duration_s / 3600 / max_ticks)


def _tick_formatter(duration_s: float):
    from matplotlib.ticker import FuncFormatter

    def label(seconds: float, _pos: int) -> str:
        seconds = max(0.0, seconds)
        hours, rest = divmod(int(round(seconds)), 3600)
        minutes, secs = divmod(rest, 60)
        if duration_s >= 3600:
            return f"{hours}:{minutes:02d}:{secs:02d}"
        if duration_s >= 60:
            return f"{minutes + 60 * hours}:{secs:02d}"
        return f"{seconds:g}s"
    return FuncFormatter(label)


def plot_timeline(timeline: Timeline, path: str | Path, width_px: int = 1600,
                  height_px: int = 700, top_classes: int = 5) -> Path:
    """Bands of detected actions (one row per class) over the probability curves of the
    `top_classes` classes with the highest peak; the time axis adapts to the duration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    names = timeline.class_names
    colours = plt.get_cmap("tab10" if len(names) <= 11 else "tab20")
    colour = {name: colours((i - 1) % colours.N) for i, name in enumerate(names)}
    duration = max(timeline.duration_s, timeline.step_seconds)
    # Optional ground truth ({"label", "start_s", "end_s"} dicts in the metadata, as the
    # demo records it): drawn as a pale band under each row's detections.
    truth = [t for t in timeline.metadata.get("ground_truth") or [] if t["label"] in names]
    labels = {s.label for s in timeline.segments} | {t["label"] for t in truth}
    rows = sorted(labels, key=names.index) or ["(no action)"]

    fig, (bands, curves) = plt.subplots(
        2, 1, figsize=(width_px / dpi, height_px / dpi), dpi=dpi, sharex=True,
        gridspec_kw={"height_ratios": [max(1.0, 0.35 * len(rows)), 2.0]})
    video = timeline.metadata.get("video", {})
    title = Path(str(video.get("source", video.get("video_id", "")))).name or "timeline"
    ended_by = timeline.ended_early()
    fig.suptitle(f"{title}  ·  {len(timeline.segments)} action segment"
                 f"{'' if len(timeline.segments) == 1 else 's'}  ·  "
                 f"{format_time(duration, 1)}"
                 + (f"  ·  ENDED BY {ended_by.upper()} (not the source's end)" if ended_by else ""),
                 fontsize=12, color="firebrick" if ended_by else "black")
    _draw_bands(bands, timeline, rows, truth, colour)
    _draw_curves(curves, timeline, top_classes, duration, colour)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as temp:
        fig.savefig(temp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def _draw_bands(bands, timeline: Timeline, rows: list[str], truth: list[dict],
                colour: dict) -> None:
    """One row per class: detected segments, the ground truth (if any) pale beneath."""
    detected_height = 0.5 if truth else 0.8
    for row, label in enumerate(rows):
        spans = [(s.start_s, s.end_s - s.start_s) for s in timeline.segments if s.label == label]
        if spans:
            bands.broken_barh(spans, (row - 0.4, detected_height), facecolors=colour[label],
                              edgecolors="none")
        true_spans = [(t["start_s"], t["end_s"] - t["start_s"]) for t in truth
                      if t["label"] == label]
        if true_spans:
            bands.broken_barh(true_spans, (row + 0.12, 0.28), facecolors=colour[label],
                              alpha=0.35, edgecolors="none")
    bands.set_yticks(range(len(rows)), rows)
    bands.set_ylim(len(rows) - 0.5, -0.5)
    bands.set_title("detected actions" + (" (pale: ground truth)" if truth else ""),
                    fontsize=10, loc="left")
    bands.grid(axis="x", alpha=0.3)


def _draw_curves(curves, timeline: Timeline, top_classes: int, duration: float,
                 colour: dict) -> None:
    """Probability curves of the classes with the highest peaks, on the adaptive time axis."""
    from matplotlib.ticker import MultipleLocator

    names = timeline.class_names
    peaks = timeline.probs[:, 1:].max(axis=0) if len(timeline.probs) else np.zeros(len(names) - 1)
    top = [int(i) + 1 for i in np.argsort(-peaks, kind="stable")[:top_classes]]
    for c in top:
        t, p = downsample_max(timeline.timestamps, timeline.probs[:, c])
        curves.plot(t + timeline.step_seconds / 2, p, color=colour[names[c]], lw=1.2,
                    label=names[c])
    curves.axhline(timeline.settings.threshold, color="grey", ls="--", lw=0.8,
                   label=f"threshold {timeline.settings.threshold:g}")
    curves.set_ylim(0, 1.02)
    curves.set_ylabel("probability")
    curves.set_title(f"top {len(top)} classes", fontsize=10, loc="left")
    curves.legend(loc="upper right", fontsize=8, ncol=min(len(top) + 1, 6), framealpha=0.8)
    curves.grid(alpha=0.3)
    curves.set_xlim(0, duration)
    curves.xaxis.set_major_locator(MultipleLocator(_tick_step(duration)))
    curves.xaxis.set_major_formatter(_tick_formatter(duration))
    curves.set_xlabel("time (s)" if duration < 60 else
                      "time (m:ss)" if duration < 3600 else "time (h:mm:ss)")

