"""Per-frame detection metrics of online action detection, as pure functions on arrays.

Two protocols, both as LSTR's evaluation code computes them (the numbers MALT reports):
- THUMOS'14, per-frame mAP: average precision per class over all test frames (scikit-learn's
  `average_precision_score`, re-implemented here in numpy), frames whose ground truth is
  ambiguous removed first, background excluded from the mean, classes without a positive
  frame skipped.
- TVSeries, mcAP: calibrated average precision, where precision is calibrated by the ratio of
  negative to positive frames so that classes of different frequency compare fairly:
  cprec = TP / (TP + FP / ratio), averaged over the positive frames.

Inputs are `scores (N, C+1)` (softmax probabilities) and `targets (N, C+1)` (one-hot or soft;
a frame is a positive of class c when its target for c is > 0, as LSTR's `np.any` test).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FrameMetrics", "average_precision", "calibrated_average_precision",
           "detection_report", "format_table", "per_frame_metrics"]

# Matches LSTR's calibrated AP, which guards both divisions with float64 epsilon.
_EPS = np.finfo(float).eps


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Non-interpolated AP = sum_k (R_k - R_{k-1}) * P_k over distinct score thresholds.

    Same value as `sklearn.metrics.average_precision_score`: frames with equal scores form one
    threshold (ties are neither optimistic nor pessimistic). NaN when there is no positive.
    """
    y_true = np.asarray(y_true).ravel() > 0
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    num_positive = int(y_true.sum())
    if num_positive == 0:
        return float("nan")
    order = np.argsort(-y_score, kind="mergesort")
    y_true, y_score = y_true[order], y_score[order]
    # The last index of every run of equal scores is a threshold.
    thresholds = np.r_[np.flatnonzero(np.diff(y_score)), y_true.size - 1]
    true_positives = np.cumsum(y_true)[thresholds]              # (K,)
    predicted_positives = thresholds + 1                          # (K,)
    precision = true_positives / predicted_positives
    recall = true_positives / num_positive
    recall_gain = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_gain * precision))


def calibrated_average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Calibrated AP (De Geest et al., TVSeries), computed as LSTR computes it.

    Frames are ranked by score with numpy's default `argsort` of the negated scores, exactly as
    the reference, so that ties fall in the same order and the value is identical.
    NaN when there is no positive.
    """
    y_true = np.asarray(y_true).ravel() > 0
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    num_positive = int(y_true.sum())
    if num_positive == 0:
        return float("nan")
    tp = y_true[np.argsort(-y_score)].astype(float)
    true_positives = np.cumsum(tp)
    false_positives = np.cumsum(1.0 - tp)
    ratio = (tp.size - num_positive) / num_positive              # negatives per positive
    cprec = true_positives / (true_positives + false_positives / (ratio + _EPS) + _EPS)
    return float(np.sum(cprec[tp == 1]) / num_positive)


@dataclass
class FrameMetrics:
    """Result of `per_frame_metrics`: the mean and the per-class table (class name -> value)."""
    mean: float
    per_class: dict[str, float] = field(default_factory=dict)
    num_frames: int = 0


def per_frame_metrics(scores: np.ndarray, targets: np.ndarray, class_names: list[str],
                      ambiguous: np.ndarray | None = None, metric: str = "AP",
                      ignore_index: int | None = None) -> FrameMetrics:
    """Per-class AP (`metric="AP"`) or calibrated AP (`metric="cAP"`) and their mean.

    scores (N, C+1), targets (N, C+1); class 0 (background) and `ignore_index` (an ambiguous
    column kept in the arrays, as in LSTR's 22-column THUMOS targets) are excluded from the mean.
    Frames flagged in `ambiguous (N,)` are removed before anything is computed. Classes with no
    positive frame are skipped (they are absent from the table).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, C+1)")
    if len(class_names) != scores.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {scores.shape[1]} columns")
    if ambiguous is not None:
        keep = ~np.asarray(ambiguous, dtype=bool)
        scores, targets = scores[keep], targets[keep]
    score_fn = {"AP": average_precision, "cAP": calibrated_average_precision}.get(metric)
    if score_fn is None:
        raise ValueError(f"unknown metric {metric!r} (expected 'AP' or 'cAP')")
    excluded = {0, ignore_index}
    per_class = {}
    for index, name in enumerate(class_names):
        positives = targets[:, index] > 0
        if index not in excluded and positives.any():
            per_class[name] = score_fn(positives, scores[:, index])
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return FrameMetrics(mean=mean, per_class=per_class, num_frames=len(scores))


def detection_report(scores: np.ndarray, targets: np.ndarray, class_names: list[str],
                     ambiguous: np.ndarray | None = None) -> dict:
    """Both protocols at once: {"mAP", "mcAP", "num_frames", "per_class": {name: {"AP", "cAP"}}}.

    Ambiguous frames are dropped for both (TVSeries has none, so this is its protocol too).
    """
    ap = per_frame_metrics(scores, targets, class_names, ambiguous, metric="AP")
    cap = per_frame_metrics(scores, targets, class_names, ambiguous, metric="cAP")
    return {
        "mAP": ap.mean,
        "mcAP": cap.mean,
        "num_frames": ap.num_frames,
        "per_class": {name: {"AP": ap.per_class[name], "cAP": cap.per_class[name]}
                      for name in ap.per_class},
    }


def format_table(report: dict) -> str:
    """The per-class table of `detection_report` as aligned text, means last."""
    width = max([len(n) for n in report["per_class"]] + [len("mean")])
    lines = [f"{'class':<{width}}  {'AP':>7}  {'cAP':>7}"]
    for name, values in report["per_class"].items():
        lines.append(f"{name:<{width}}  {100 * values['AP']:7.2f}  {100 * values['cAP']:7.2f}")
    lines.append(f"{'mean':<{width}}  {100 * report['mAP']:7.2f}  {100 * report['mcAP']:7.2f}")
    return "\n".join(lines)
