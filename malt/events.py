"""Event metrics of online action detection, as pure functions on arrays and segment lists.

What `vidpipe detect` hands a user is events (a start, a segment, an end), not per-frame
scores; these metrics score them against the annotated segments (docs/evaluation.md):

- point-level AP of action starts (p-AP) at a time offset, the ODAS protocol (Shou et al.,
  ECCV 2018; StartNet; WOAD), computed as WOAD's `point_average_precision`
  (salesforce/woad-pytorch `utils.py`): detected starts of a class ranked by score; each is
  compared with the *nearest* ground-truth start of its class in its video: within the
  offset and not yet taken -> true positive (it takes it), else false positive; ground-truth
  starts after the video's length are not counted; AP is VOC 2007's 11-point interpolated AP.
  Per class, and the mean over classes that have a ground-truth start (WOAD counts a class
  without one as 0);
- segment F1@IoU and the edit score, as MS-TCN's `eval.py` (yabufarha/ms-tcn `f_score`,
  `edit_score`): per video, detected segments in time order each take the unmatched
  same-class ground-truth segment of highest IoU when that IoU >= the overlap; F1 from the
  true/false positives and misses summed over videos; edit = 1 - Levenshtein distance between
  the videos' segment label sequences / the longer length, averaged over videos;
- start latency: for the starts matched at `latency_offset_s` (the p-AP matching), the time
  from the ground-truth start to the moment the start was decided (median, p90);
- false starts per hour: the starts that match no ground-truth start at `latency_offset_s`
  (a second start for a taken ground truth included: an alert raised twice), per hour of video.

Fractions in [0, 1] throughout (MS-TCN prints percentages). tests/fixtures/events/ holds the
reference implementations' outputs on generated cases; tests/test_events.py compares.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vidpipe.store.labels import Segment

__all__ = ["DetectedStart", "F1_OVERLAPS", "START_OFFSETS_S", "StartMatch", "VideoEvents",
           "edit_score", "eleven_point_ap", "event_report", "f1_from_counts", "label_sequence",
           "match_starts", "point_average_precision", "segment_f1_counts"]

START_OFFSETS_S = tuple(float(s) for s in range(1, 11))   # ODAS / WOAD: 1..10 s
F1_OVERLAPS = (0.10, 0.25, 0.50)                          # MS-TCN


# --- action starts ---------------------------------------------------------------------------

@dataclass
class StartMatch:
    """How the detected starts of one class matched its ground-truth starts."""
    order: np.ndarray        # (N,) detection indices, highest score first
    true_positive: np.ndarray  # (N,) bool, in `order`
    truth_time: np.ndarray   # (N,) the taken ground-truth start (nan: none), in `order`
    num_truth: int           # ground-truth starts that count (within their video's length)


def match_starts(video: np.ndarray, time_s: np.ndarray, score: np.ndarray,
                 truth: list[np.ndarray], video_length_s: np.ndarray,
                 offset_s: float) -> StartMatch:
    """Match detections (video index (N,), time (N,), score (N,)) of one class with its
    ground-truth start times `truth[v]` per video, as WOAD does (module notes)."""
    video = np.asarray(video, int)
    time_s = np.asarray(time_s, np.float64)
    order = np.argsort(-np.asarray(score, np.float64))    # numpy's default sort, as WOAD's
    taken = [np.zeros(len(t), bool) for t in truth]
    true_positive = np.zeros(len(order), bool)
    truth_time = np.full(len(order), np.nan)
    for rank, d in enumerate(order):
        starts = np.asarray(truth[video[d]], np.float64)
        if not len(starts):
            continue
        distance = np.abs(time_s[d] - starts)
        nearest = int(np.argmin(distance))
        if distance[nearest] <= offset_s and not taken[video[d]][nearest]:
            taken[video[d]][nearest] = True
            true_positive[rank], truth_time[rank] = True, starts[nearest]
    num_truth = sum(int((np.asarray(t) <= length).sum()) for t, length in zip(truth, video_length_s))
    return StartMatch(order, true_positive, truth_time, num_truth)


def eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2007 AP: the mean over recall levels 0, 0.1, ..., 1 of the best precision at
    recall >= that level (0 where none reaches it)."""
    ap = 0.0
    for level in np.arange(0.0, 1.1, 0.1):
        reached = recall >= level
        ap += (np.max(precision[reached]) if reached.any() else 0.0) / 11.0
    return float(ap)


def point_average_precision(match: StartMatch) -> float:
    """p-AP of one class from its matching; NaN without a ground-truth start."""
    if match.num_truth == 0:
        return float("nan")
    true_positives = np.cumsum(match.true_positive)
    false_positives = np.cumsum(~match.true_positive)
    recall = true_positives / float(match.num_truth)
    precision = true_positives / np.maximum(true_positives + false_positives, np.finfo(np.float64).eps)
    return eleven_point_ap(recall, precision)


# --- segments --------------------------------------------------------------------------------

def segment_f1_counts(detected: list[Segment], truth: list[Segment],
                      overlap: float) -> tuple[int, int, int]:
    """(true positives, false positives, misses) of one video at an IoU `overlap`, as
    MS-TCN's `f_score`; detected segments are taken in order of start."""
    detected = sorted(detected, key=lambda s: (s.start_s, s.label))
    true_start = np.array([s.start_s for s in truth], np.float64)
    true_end = np.array([s.end_s for s in truth], np.float64)
    true_label = np.array([s.label for s in truth], object)
    hits = np.zeros(len(truth), bool)
    tp = fp = 0
    for segment in detected:
        intersection = np.minimum(segment.end_s, true_end) - np.maximum(segment.start_s, true_start)
        union = np.maximum(segment.end_s, true_end) - np.minimum(segment.start_s, true_start)
        iou = intersection / union * (true_label == segment.label)
        best = int(np.argmax(iou)) if len(iou) else -1
        if best >= 0 and iou[best] >= overlap and not hits[best]:
            tp, hits[best] = tp + 1, True
        else:
            fp += 1
    return tp, fp, int(len(truth) - hits.sum())


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """2PR / (P + R); 0 where undefined (MS-TCN's nan_to_num)."""
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2.0 * precision * recall / (precision + recall)


def edit_score(detected: list[str], truth: list[str]) -> float:
    """1 - Levenshtein(detected, truth) / max(len): label sequences of segments in time
    order (MS-TCN's `edit_score` / 100); 1 when both are empty."""
    rows, cols = len(detected), len(truth)
    if max(rows, cols) == 0:
        return 1.0
    distance = np.zeros((rows + 1, cols + 1))
    distance[:, 0], distance[0, :] = np.arange(rows + 1), np.arange(cols + 1)
    for j in range(1, cols + 1):
        for i in range(1, rows + 1):
            if truth[j - 1] == detected[i - 1]:
                distance[i, j] = distance[i - 1, j - 1]
            else:
                distance[i, j] = 1 + min(distance[i - 1, j], distance[i, j - 1], distance[i - 1, j - 1])
    return float(1.0 - distance[rows, cols] / max(rows, cols))


def label_sequence(segments: list[Segment]) -> list[str]:
    """Labels of segments in order of start (ties: by label), the edit score's input."""
    return [s.label for s in sorted(segments, key=lambda s: (s.start_s, s.label))]


# --- a whole report --------------------------------------------------------------------------

@dataclass
class DetectedStart:
    label: str
    time_s: float            # when it was decided (video time): the point ODAS scores
    score: float


@dataclass
class VideoEvents:
    """One video's detections and ground truth, in seconds of the video."""
    duration_s: float
    truth: list[Segment]                    # annotated action segments
    segments: list[Segment]                 # detected segments
    starts: list[DetectedStart] = field(default_factory=list)


def event_report(videos: list[VideoEvents], class_names: list[str],
                 offsets_s: tuple[float, ...] = START_OFFSETS_S,
                 overlaps: tuple[float, ...] = F1_OVERLAPS,
                 latency_offset_s: float = 10.0) -> dict:
    """Every event metric over `videos` (class_names: the action classes, no background):
    {"start_ap": {offset: {"mean", "per_class"}}, "start_mAP" (mean over offsets),
     "f1": {overlap: F1}, "segment_counts": {overlap: [tp, fp, fn]}, "edit",
     "latency_s": {"median", "p90", "matched", "offset_s", "values"}, "false_starts_per_hour",
     "num_videos", "hours", "num_true_starts", "num_starts"}."""
    if not videos:
        raise ValueError("no videos to score")
    # Each class matched once per offset: the latency offset is one of the p-AP offsets too.
    matches = {offset: {name: _class_matches(videos, name, offset) for name in class_names}
               for offset in dict.fromkeys((*offsets_s, latency_offset_s))}
    start_ap = {f"{offset:g}": _start_ap(matches[offset]) for offset in offsets_s}
    counts = {f"{overlap:.2f}": np.sum([segment_f1_counts(v.segments, v.truth, overlap)
                                        for v in videos], axis=0).tolist() for overlap in overlaps}
    latencies, false_starts = _latencies(videos, matches[latency_offset_s])
    hours = sum(v.duration_s for v in videos) / 3600.0
    means = [r["mean"] for r in start_ap.values()]
    return {
        "start_ap": start_ap,
        "start_mAP": float(np.mean(means)) if means else float("nan"),
        "f1": {k: f1_from_counts(*c) for k, c in counts.items()},
        "segment_counts": counts,
        "edit": float(np.mean([edit_score(label_sequence(v.segments), label_sequence(v.truth))
                               for v in videos])),
        "latency_s": {"median": _percentile(latencies, 50), "p90": _percentile(latencies, 90),
                      "matched": len(latencies), "offset_s": latency_offset_s,
                      "values": np.round(latencies, 4).tolist()},
        "false_starts_per_hour": false_starts / hours if hours > 0 else float("nan"),
        "num_videos": len(videos), "hours": hours,
        "num_true_starts": sum(len(v.truth) for v in videos),
        "num_starts": sum(len(v.starts) for v in videos),
    }


def _class_matches(videos: list[VideoEvents], label: str, offset_s: float) -> StartMatch:
    rows = [(i, s.time_s, s.score) for i, v in enumerate(videos) for s in v.starts if s.label == label]
    video, time_s, score = (np.array(column) for column in zip(*rows)) if rows else ([], [], [])
    truth = [np.array([s.start_s for s in v.truth if s.label == label]) for v in videos]
    return match_starts(video, time_s, score, truth, np.array([v.duration_s for v in videos]), offset_s)


def _start_ap(matches: dict[str, StartMatch]) -> dict:
    per_class = {name: point_average_precision(match) for name, match in matches.items()}
    per_class = {k: v for k, v in per_class.items() if not np.isnan(v)}
    return {"mean": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
            "per_class": per_class}


def _latencies(videos: list[VideoEvents], matches: dict[str, StartMatch]) -> tuple[np.ndarray, int]:
    """Decision time - true start of every matched start (`matches`: each class's, at the
    latency offset); the count of unmatched starts."""
    matched, unmatched = [], 0
    for name, match in matches.items():
        time_s = np.array([s.time_s for v in videos for s in v.starts if s.label == name])
        matched += list(time_s[match.order][match.true_positive] - match.truth_time[match.true_positive])
        unmatched += int((~match.true_positive).sum())
    return np.array(matched), unmatched


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")
