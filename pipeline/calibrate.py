"""`vidpipe calibrate`: event rules chosen on validation videos, stored beside the checkpoint.

The search (small on purpose: it runs on a CPU in seconds for the demo), on the streaming
detector's probabilities of the validation videos (`pipeline.score`), computed once:
  - for every smoothing in `SMOOTHING_S` and minimum duration in `MIN_DURATION_S` (the merge
    gap stays `TimelineSettings`'s), every (start, end) threshold pair of `threshold_pairs()`
    is applied to all classes at once, and each class is scored on its own (classes are
    independent tracks, and every metric is per class before it is pooled);
  - each class then takes its pair: `start-ap`, the pair of its highest p-AP averaged over
    the offsets; `latency`, of the pairs whose F1@0.25 is within 90% of its best, the one of
    its lowest median start latency; `f1` (the default), the pooled F1@0.25 is raised one
    class at a time (coordinate ascent from each class's own best, two rounds);
  - the (smoothing, minimum duration) whose per-class choice scores best is kept; when it
    does not beat the default rules on the validation videos, the default rules are kept.
Validation only: the checkpoint's test split is refused. The result, with how it was chosen,
is written atomically to `<checkpoint stem>.rules.json` beside the checkpoint, with the
checkpoint's sha256: `vidpipe detect` and `vidpipe eval` use it (and say so) until the
checkpoint changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vidpipe.core.errors import VidpipeError
from vidpipe.malt.events import VideoEvents, event_report, f1_from_counts
from vidpipe.pipeline.score import (LabelledProbs, apply_rules, checkpoint_probabilities,
                                    score_probabilities)
from vidpipe.pipeline.timeline import TimelineSettings

log = logging.getLogger(__name__)

RULES_FORMAT = "vidpipe-event-rules"
OBJECTIVES = ("f1", "start-ap", "latency")
SMOOTHING_S = (0.0, 0.5, 1.0)
MIN_DURATION_S = (0.25, 0.5, 1.0)
START_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
HYSTERESIS = (0.0, 0.1, 0.2)          # end threshold = start - this
LATENCY_F1_SHARE = 0.9                # `latency`: pairs within this share of the best F1


def threshold_pairs() -> list[tuple[float, float]]:
    return [(start, round(start - gap, 2)) for start in START_THRESHOLDS for gap in HYSTERESIS]


def rules_path(checkpoint: str | Path) -> Path:
    """runs/x/last.pt -> runs/x/last.rules.json"""
    return Path(checkpoint).with_suffix(".rules.json")


def objective_value(report: dict, objective: str) -> float:
    """Higher is better: F1@0.25, start p-mAP over the offsets, or minus the median latency;
    -inf where the metric has no data (no start matched, no true start)."""
    value = {"f1": report["f1"]["0.25"], "start-ap": report["start_mAP"],
             "latency": -report["latency_s"]["median"]}[objective]
    return -math.inf if math.isnan(value) else float(value)


# --- the search -------------------------------------------------------------------------------

@dataclass
class _ClassScores:
    """One class under one threshold pair: what the objectives need."""
    counts: np.ndarray        # (3,) tp, fp, fn at IoU 0.25
    start_ap: float           # p-AP averaged over the offsets (nan: no true start)
    latency: float            # median start latency (nan: none matched)

    @property
    def f1(self) -> float:
        return f1_from_counts(*self.counts)


def search_rules(data: LabelledProbs, objective: str = "f1") -> tuple[TimelineSettings, dict]:
    """The best rules for `objective` on `data` (module notes) and the record of the search."""
    if objective not in OBJECTIVES:
        raise VidpipeError(f"unknown objective '{objective}' (expected {', '.join(OBJECTIVES)})")
    names = data.class_names[1:]
    default = objective_value(score_probabilities(data, TimelineSettings()), objective)
    best_settings, best = TimelineSettings(), default
    for smoothing in SMOOTHING_S:
        for min_duration in MIN_DURATION_S:
            table = {pair: _per_class(data, _uniform(pair, smoothing, min_duration), names)
                     for pair in threshold_pairs()}
            chosen = _choose(table, names, objective)
            settings = _uniform((0.5, 0.5), smoothing, min_duration)
            settings.class_thresholds = {n: chosen[n][0] for n in names}
            settings.class_end_thresholds = {n: chosen[n][1] for n in names}
            value = objective_value(score_probabilities(data, settings), objective)
            log.debug("smoothing %g s, min duration %g s: %s %.4f", smoothing, min_duration,
                      objective, value)
            if value > best + 1e-12:
                best_settings, best = settings, value
    record = {"objective": objective, "value": best, "default_value": default,
              "kept_defaults": best_settings == TimelineSettings(),
              "search": {"smoothing_s": list(SMOOTHING_S), "min_duration_s": list(MIN_DURATION_S),
                         "threshold_pairs": [list(p) for p in threshold_pairs()],
                         "merge_gap_s": TimelineSettings().merge_gap_s}}
    return best_settings, record


def _uniform(pair: tuple[float, float], smoothing: float, min_duration: float) -> TimelineSettings:
    return TimelineSettings(threshold=pair[0], end_threshold=pair[1], smoothing_s=smoothing,
                            min_duration_s=min_duration)


def _per_class(data: LabelledProbs, settings: TimelineSettings, names: list[str]) -> dict[str, _ClassScores]:
    events = apply_rules(data, settings)
    scores = {}
    for name in names:
        own = [VideoEvents(v.duration_s, [s for s in v.truth if s.label == name],
                           [s for s in v.segments if s.label == name],
                           [s for s in v.starts if s.label == name]) for v in events]
        report = event_report(own, [name])
        scores[name] = _ClassScores(np.array(report["segment_counts"]["0.25"]),
                                    report["start_mAP"], report["latency_s"]["median"])
    return scores


def _choose(table: dict, names: list[str], objective: str) -> dict[str, tuple[float, float]]:
    """Each class's threshold pair for `objective`, from its scores under every pair."""
    pairs = list(table)
    if objective == "start-ap":
        return {n: max(pairs, key=lambda p: np.nan_to_num(table[p][n].start_ap, nan=-1)) for n in names}
    if objective == "latency":
        chosen = {}
        for n in names:
            best_f1 = max(table[p][n].f1 for p in pairs)
            good = [p for p in pairs if table[p][n].f1 >= LATENCY_F1_SHARE * best_f1]
            chosen[n] = min(good, key=lambda p: np.nan_to_num(table[p][n].latency, nan=np.inf))
        return chosen
    chosen = {n: max(pairs, key=lambda p: table[p][n].f1) for n in names}
    for _ in range(2):   # coordinate ascent on the pooled F1
        for n in names:
            rest = sum(table[chosen[m]][m].counts for m in names if m != n)
            chosen[n] = max(pairs, key=lambda p: f1_from_counts(*(rest + table[p][n].counts)))
    return chosen


# --- the command and the rules file -----------------------------------------------------------

def calibrate(checkpoint: str | Path, cache: str | Path, labels: str | Path | None = None,
              split: str = "val", objective: str = "f1", device: str | None = None) -> dict:
    """`vidpipe calibrate`: search the rules on a validation split, write them beside the
    checkpoint; returns the rules file's content."""
    from vidpipe.malt.evaluate import write_json_report

    if objective not in OBJECTIVES:
        raise VidpipeError(f"--objective {objective}: expected one of {', '.join(OBJECTIVES)}")
    started = time.perf_counter()
    data = checkpoint_probabilities(checkpoint, cache, labels, split, device, choosing_rules=True)
    settings, record = search_rules(data, objective)
    record.update(split=data.split, videos=[v.video_id for v in data.videos], cache=str(cache),
                  seconds=round(time.perf_counter() - started, 2))
    rules = {"format": RULES_FORMAT, "version": 1,
             "checkpoint": {"file": Path(checkpoint).name, "sha256": _sha256(checkpoint)},
             "settings": asdict(settings), "calibration": record}
    write_json_report(rules, rules_path(checkpoint))   # a metric without data (-inf) as null
    log.info("event rules (%s on %d videos of split '%s': %s) -> %s", objective, len(data.videos),
             data.split, _versus_defaults(record), rules_path(checkpoint))
    return rules


def _shown(value: float | None, objective: str) -> str:
    if value is None or not math.isfinite(value):
        return "no data"
    return f"median start latency {-value:.2f} s" if objective == "latency" else f"{value:.3f}"


def _versus_defaults(record: dict) -> str:
    objective = record["objective"]
    return (f"{_shown(record['value'], objective)}, default rules "
            f"{_shown(record['default_value'], objective)}")


def checkpoint_rules(checkpoint: str | Path) -> tuple[TimelineSettings, str]:
    """The rules `detect` and `eval` use for a checkpoint: its calibrated rules file, when
    there is one made for this very checkpoint, else the defaults; and where they came from."""
    path = rules_path(checkpoint)
    if not path.is_file():
        return TimelineSettings(), "default rules"
    try:
        rules = json.loads(path.read_text())
        settings = TimelineSettings(**rules["settings"])
        record = rules["calibration"]
    except (ValueError, KeyError, TypeError) as exc:
        raise VidpipeError(f"{path}: not a vidpipe rules file ({exc}); delete it or run "
                           "`vidpipe calibrate` again") from None
    if rules.get("checkpoint", {}).get("sha256") != _sha256(checkpoint):
        log.warning("%s: made for another version of %s; default rules used (run `vidpipe "
                    "calibrate` again)", path, checkpoint)
        return TimelineSettings(), "default rules"
    return settings, (f"calibrated rules {path} ({record['objective']} on split "
                      f"'{record['split']}': {_versus_defaults(record)})")


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_rules(rules: dict, path: str | Path) -> str:
    """What `vidpipe calibrate` prints: the choice, its objective against the default rules,
    then one line per class (start / end threshold) and the rules shared by all classes."""
    record, settings = rules["calibration"], TimelineSettings(**rules["settings"])
    lines = [f"{path}: event rules chosen on {len(record['videos'])} videos of split "
             f"'{record['split']}' in {record['seconds']:g} s",
             f"{record['objective']}: {_versus_defaults(record)}"
             + ("; the default rules are kept" if record["kept_defaults"] else "")]
    names = sorted(settings.class_thresholds) or ["every class"]
    lines += [f"  {name}: start {settings.start_threshold_of(name):g}, end {settings.end_threshold_of(name):g}"
              for name in names]
    lines.append(f"  smoothing {settings.smoothing_s:g} s, min duration {settings.min_duration_s:g} s, "
                 f"merge gap {settings.merge_gap_s:g} s")
    return "\n".join(lines)


def command_line_rules(threshold: float | None, class_thresholds: tuple[str, ...] | list[str],
                       min_duration_s: float | None, merge_gap_s: float | None) -> TimelineSettings | None:
    """`detect`'s rule options (`class_thresholds` as NAME=VALUE strings): None when none is
    given (the checkpoint's calibrated rules then apply), else these and the defaults."""
    if threshold is None and not class_thresholds and min_duration_s is None and merge_gap_s is None:
        return None
    default = TimelineSettings()
    per_class = {}
    for item in class_thresholds:
        name, sep, value = item.partition("=")
        try:
            per_class[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise VidpipeError(f"--class-threshold '{item}': expected NAME=VALUE, e.g. Spin=0.4")
    threshold = default.threshold if threshold is None else threshold
    for label, value in (("--threshold", threshold), *per_class.items()):
        if not 0.0 <= value <= 1.0:
            raise VidpipeError(f"threshold {label}={value}: must be in [0, 1]")
    settings = TimelineSettings(
        threshold, per_class,
        default.min_duration_s if min_duration_s is None else min_duration_s,
        default.merge_gap_s if merge_gap_s is None else merge_gap_s)
    if settings.min_duration_s < 0 or settings.merge_gap_s < 0:
        raise VidpipeError("--min-duration and --merge-gap must be >= 0 seconds")
    return settings
