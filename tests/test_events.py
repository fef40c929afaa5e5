"""Event metrics (malt/events.py) against the reference implementations' outputs on the
generated cases of tests/fixtures/events/ (WOAD's point-level AP, MS-TCN's F1 and edit),
and the report on a case small enough to work out by hand."""
import json
from pathlib import Path

import numpy as np
import pytest

from vidpipe.malt.events import (DetectedStart, VideoEvents, edit_score, event_report,
                                 f1_from_counts, label_sequence, match_starts,
                                 point_average_precision, segment_f1_counts)
from vidpipe.store.labels import Segment, segments_from_targets

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "events" / "reference.json").read_text())
LABELS = ["background", "Bounce", "Slide", "Spin"]


@pytest.mark.parametrize("entry", FIXTURE["start_cases"], ids=lambda e: str(e["case"]["video_ids"]))
def test_point_ap_equals_woad(entry):
    case = entry["case"]
    ids = case["video_ids"]
    frames = [case["frames"][str(v)] for v in ids]
    scores = np.array(case["scores"])
    video = np.repeat(np.arange(len(ids)), frames)
    times = np.concatenate([np.arange(n) / case["fps"] for n in frames])
    lengths = np.array([(n - 1) / case["fps"] for n in frames])
    for offset, expected in entry["reference"].items():
        per_class = {}
        for c in range(1, scores.shape[1]):
            truth = [np.array(case["truth"][str(v)][c]) for v in ids]
            match = match_starts(video, times, scores[:, c], truth, lengths, float(offset))
            per_class[str(c)] = point_average_precision(match)
        assert per_class == pytest.approx(expected["per_class"], abs=1e-9, rel=0)
        assert np.mean(list(per_class.values())) == pytest.approx(expected["mean"], abs=1e-9, rel=0)


def frame_segments(frame_labels):
    """Frame-wise labels -> segments [first frame, last + 1), as MS-TCN reads them."""
    targets = np.eye(len(LABELS))[[LABELS.index(x) for x in frame_labels]]
    return segments_from_targets(targets, np.arange(len(frame_labels)), 1.0, LABELS)


@pytest.mark.parametrize("entry", FIXTURE["segment_cases"], ids=lambda e: f"{len(e['case']['videos'])} videos")
def test_segment_f1_and_edit_equal_mstcn(entry):
    videos = [(frame_segments(v["detected"]), frame_segments(v["truth"]))
              for v in entry["case"]["videos"]]
    reference = entry["reference"]
    for overlap, counts in reference["counts"].items():
        ours = np.sum([segment_f1_counts(d, t, float(overlap)) for d, t in videos], axis=0)
        assert ours.tolist() == counts
        assert 100 * f1_from_counts(*ours) == pytest.approx(reference["f1"][overlap], abs=1e-9, rel=0)
    edits = [100 * edit_score(label_sequence(d), label_sequence(t)) for d, t in videos]
    assert edits == pytest.approx(reference["edit_per_video"], abs=1e-9, rel=0)
    assert np.mean(edits) == pytest.approx(reference["edit"], abs=1e-9, rel=0)


def test_report_on_a_case_worked_by_hand():
    truth = [Segment("Spin", 10.0, 20.0), Segment("Bounce", 40.0, 50.0)]
    video = VideoEvents(
        duration_s=3600.0, truth=truth,
        segments=[Segment("Spin", 11.0, 19.0, 0.8), Segment("Bounce", 60.0, 62.0, 0.6)],
        starts=[DetectedStart("Spin", 11.5, 0.9),      # 1.5 s after the true start
                DetectedStart("Spin", 12.0, 0.7),      # the same start again: false
                DetectedStart("Bounce", 60.5, 0.6)])   # 20.5 s late: false at every offset
    report = event_report([video], ["Bounce", "Spin"])
    assert report["start_ap"]["1"]["per_class"] == {"Bounce": 0.0, "Spin": 0.0}
    # at 2 s Spin's first start matches: precision 1 up to recall 1 -> AP 1
    assert report["start_ap"]["2"]["per_class"] == {"Bounce": 0.0, "Spin": pytest.approx(1.0)}
    assert report["f1"]["0.25"] == pytest.approx(0.5)            # 1 of 2 found, 1 of 2 right
    assert report["segment_counts"]["0.50"] == [1, 1, 1]
    assert report["edit"] == pytest.approx(1.0)                  # [Spin, Bounce] both
    assert report["latency_s"]["matched"] == 1 and report["latency_s"]["median"] == pytest.approx(1.5)
    assert report["false_starts_per_hour"] == pytest.approx(2.0)  # the repeat and the late one
    assert report["num_true_starts"] == 2 and report["num_starts"] == 3
    # a latency offset that is none of the p-AP offsets: at 1 s, Spin's start is 1.5 s late
    narrow = event_report([video], ["Bounce", "Spin"], offsets_s=(2.0,), latency_offset_s=1.0)
    assert narrow["latency_s"]["matched"] == 0 and narrow["false_starts_per_hour"] == pytest.approx(3.0)
    assert narrow["start_ap"]["2"] == report["start_ap"]["2"]


def test_edit_score_is_one_for_equal_sequences_and_counts_edits():
    assert edit_score([], []) == 1.0
    assert edit_score(["A", "B"], ["A", "B"]) == 1.0
    assert edit_score(["A"], ["A", "B", "C"]) == pytest.approx(1 - 2 / 3)
