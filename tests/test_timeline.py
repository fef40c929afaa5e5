"""Per-step probabilities -> segments, and the timeline's JSON / CSV / PNG files."""
import json

import numpy as np
import pytest

from vidpipe.core.errors import VidpipeError
from vidpipe.pipeline.timeline import (Segmenter, Timeline, TimelineSettings, downsample_max,
                               find_segments, format_time)

NAMES = ["background", "Bounce", "Spin"]
STEP = 0.25


def probs_from(labels, high=0.9):
    """Per-step class index -> probability rows (the class gets `high`, rest to background)."""
    probs = np.zeros((len(labels), 3), np.float32)
    for t, c in enumerate(labels):
        probs[t, c] = high if c else 1.0
        probs[t, 0] += 1.0 - high if c else 0.0
    return probs


def segments(labels, **settings):
    ts = np.arange(len(labels)) * STEP
    found = find_segments(probs_from(labels), ts, NAMES, STEP, TimelineSettings(**settings))
    return [(s.label, s.start_s, s.end_s) for s in found]


def test_actions_touching_both_edges():
    assert segments([1, 1, 0, 0, 2, 2], min_duration_s=0, merge_gap_s=0) == [
        ("Bounce", 0.0, 0.5), ("Spin", 1.0, 1.5)]


def test_one_step_action_kept_or_dropped_by_min_duration():
    assert segments([0, 0, 1, 0, 0], min_duration_s=0.25, merge_gap_s=0) == [
        ("Bounce", 0.5, 0.75)]
    assert segments([0, 0, 1, 0, 0], min_duration_s=0.5, merge_gap_s=0) == []


def test_gap_merging():
    labels = [1, 1, 0, 1, 1, 0, 0, 0, 1, 1]
    assert segments(labels, min_duration_s=0, merge_gap_s=0.25) == [
        ("Bounce", 0.0, 1.25), ("Bounce", 2.0, 2.5)]
    assert segments(labels, min_duration_s=0, merge_gap_s=0.75) == [("Bounce", 0.0, 2.5)]


def test_all_background_gives_no_segment():
    assert segments([0] * 50, min_duration_s=0, merge_gap_s=0) == []
    empty = find_segments(np.zeros((0, 3)), np.zeros(0), NAMES, STEP)
    assert empty == []


def test_ties_at_threshold_are_active_for_each_class():
    probs = np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    found = find_segments(probs, np.arange(2) * STEP, NAMES, STEP,
                          TimelineSettings(threshold=0.5, min_duration_s=0, merge_gap_s=0))
    assert [(s.label, s.start_s, s.end_s, s.score) for s in found] == [
        ("Bounce", 0.0, 0.25, 0.5), ("Spin", 0.0, 0.25, 0.5)]


def test_per_class_threshold_and_score_is_mean_over_segment():
    probs = np.array([[0.6, 0.4, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0], [1.0, 0.0, 0.0]])
    ts = np.arange(4) * STEP
    settings = TimelineSettings(class_thresholds={"Bounce": 0.3}, min_duration_s=0,
                                merge_gap_s=0)
    (segment,) = find_segments(probs, ts, NAMES, STEP, settings)
    assert (segment.start_s, segment.end_s) == (0.0, 0.75)
    assert segment.score == pytest.approx((0.4 + 0.3 + 0.6) / 3)
    with pytest.raises(VidpipeError, match="unknown class 'Jump'"):
        find_segments(probs, ts, NAMES, STEP, TimelineSettings(class_thresholds={"Jump": 0.1}))


def test_live_events_agree_with_final_segments():
    labels = [0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 2, 2, 2, 0, 1, 0, 0]
    probs = probs_from(labels)
    segmenter = Segmenter(NAMES, STEP, TimelineSettings(min_duration_s=0.5, merge_gap_s=0.25))
    events = []
    for t, row in enumerate(probs):
        events += [(t, e.kind, e.label, e.time_s) for e in segmenter.step(t * STEP, row)]
    events += [("eof", e.kind, e.label, e.time_s) for e in segmenter.finish()]
    # start decided once 0.5 s long (step 2); end once the gap exceeds 0.25 s (step 8)
    assert events == [(2, "start", "Bounce", 0.25), (8, "end", "Bounce", 1.75),
                      (11, "start", "Spin", 2.5), (14, "end", "Spin", 3.25)]
    assert [(s.label, s.start_s, s.end_s) for s in segmenter.segments] == [
        ("Bounce", 0.25, 1.75), ("Spin", 2.5, 3.25)]


def test_active_segments_are_those_announced_and_not_ended():
    labels = [0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 2, 2, 2, 0, 1, 0, 0]
    segmenter = Segmenter(NAMES, STEP, TimelineSettings(min_duration_s=0.5, merge_gap_s=0.25))
    active = []
    for t, row in enumerate(probs_from(labels)):
        segmenter.step(t * STEP, row)
        active.append([(s.label, s.start_s) for s in segmenter.active()])
    # Bounce from its start event (step 2) until its end event (step 8); the one-step
    # Bounce at step 14 is never announced
    assert active == [[], [], *[[("Bounce", 0.25)]] * 6, [], [], [], *[[("Spin", 2.5)]] * 3, [], [], []]
    assert segmenter.active() == [] and segmenter.finish() == []


def test_format_time():
    assert format_time(72.5) == "00:01:12.50"
    assert format_time(3723.25) == "01:02:03.25"


def make_timeline(steps=40):
    """Bounce then Spin in every 40 steps (10 s)."""
    labels = (([0] * 5 + [1] * 10 + [0] * 5 + [2] * 8 + [0] * 12) * -(-steps // 40))[:steps]
    return Timeline.from_probs(
        probs_from(labels), np.arange(steps) * STEP, NAMES, STEP,
        TimelineSettings(min_duration_s=0.5),
        {"video": {"source": "clips/demo.mp4"}, "model": {"checkpoint": "runs/x/best.pt"},
         "timings": {"total_s": 1.5}})


def test_json_round_trip(tmp_path):
    timeline = make_timeline()
    path = timeline.save_json(tmp_path / "out" / "demo.timeline.json")
    loaded = Timeline.load(path)
    assert loaded.class_names == NAMES
    assert loaded.segments == timeline.segments
    assert loaded.settings == timeline.settings
    assert loaded.metadata == timeline.metadata
    np.testing.assert_allclose(loaded.probs, timeline.probs, atol=1e-6)
    np.testing.assert_array_equal(loaded.timestamps, timeline.timestamps)
    assert [s.label for s in loaded.segments] == ["Bounce", "Spin"]
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(VidpipeError, match="bad.json: not a vidpipe timeline"):
        Timeline.load(tmp_path / "bad.json")


def test_the_json_written_in_blocks_is_the_schema_of_to_dict(tmp_path):
    timeline = make_timeline(steps=9000)           # the arrays span three write blocks
    text = timeline.save_json(tmp_path / "long.timeline.json").read_text()
    assert text == json.dumps(timeline.to_dict())
    assert list(json.loads(text)) == list(timeline.to_dict())    # arrays last, as documented
    empty = Timeline.from_probs(np.zeros((0, len(NAMES))), np.zeros(0), NAMES, STEP)
    assert json.loads(empty.save_json(tmp_path / "empty.json").read_text()) == empty.to_dict()


def test_csv_export(tmp_path):
    text = make_timeline().save_csv(tmp_path / "t.csv").read_text().splitlines()
    assert text[0] == "label,start_s,end_s,score"
    assert text[1].startswith("Bounce,1.250,3.750,0.9")
    assert len(text) == 3


@pytest.mark.parametrize("steps", [40, 28_800])  # a 10 s clip and a 2 h film
def test_png_written_with_requested_size(tmp_path, steps):
    import matplotlib
    import matplotlib.image

    timeline = make_timeline(steps)
    timeline.metadata["ground_truth"] = [{"label": "Spin", "start_s": 1.0, "end_s": 2.0}]
    path = timeline.save_png(tmp_path / "t.png", width_px=1200, height_px=500)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (500, 1200)
    # something was drawn: each detected class's bands and curve, in its colour (tab10, the
    # background class takes none), cover a visible area; axes and text alone have none
    for name in ("Bounce", "Spin"):
        rgb = matplotlib.colormaps["tab10"](NAMES.index(name) - 1)[:3]
        assert (np.abs(image[..., :3] - rgb).max(-1) < 0.05).mean() > 0.005, name


def test_downsample_keeps_peaks():
    values = np.zeros(100_000)
    values[12_345] = 0.9
    t, v = downsample_max(np.arange(100_000) * STEP, values, 1000)
    assert len(t) == len(v) == 1000 and v.max() == 0.9


def start_events(probs, settings):
    segmenter = Segmenter(NAMES, STEP, settings)
    events = [e for t, row in enumerate(probs) for e in segmenter.step(t * STEP, row)]
    return [e for e in events + segmenter.finish() if e.kind == "start"]


def test_no_start_event_reports_a_score_below_its_threshold():
    # a merged gap pulled the segment's mean under the threshold: 'start Bounce 0.33' at 0.5
    probs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    (start,) = start_events(probs, TimelineSettings(min_duration_s=0.75, merge_gap_s=0.5))
    assert start.threshold == 0.5 and start.score >= start.threshold
    rng = np.random.default_rng(0)
    for _ in range(50):
        probs = rng.dirichlet([0.5, 0.5, 0.5], size=60)
        settings = TimelineSettings(
            threshold=float(rng.uniform(0.2, 0.8)), end_threshold=float(rng.uniform(0.1, 0.2)),
            class_thresholds={"Spin": float(rng.uniform(0.2, 0.8))},
            smoothing_s=float(rng.choice([0, 0.5, 1.0])),
            min_duration_s=float(rng.choice([0, 0.25, 1.0])),
            merge_gap_s=float(rng.choice([0, 0.5, 1.0])))
        for event in start_events(probs, settings):
            expected = settings.class_thresholds.get(event.label, settings.threshold)
            assert event.threshold == expected and event.score >= event.threshold


def test_hysteresis_keeps_a_class_on_down_to_its_end_threshold():
    probs = np.array([[0.4, 0.6, 0.0], [0.55, 0.45, 0.0], [0.55, 0.45, 0.0], [0.7, 0.3, 0.0]])
    ts = np.arange(4) * STEP
    spans = lambda **rules: [(s.start_s, s.end_s) for s in find_segments(
        probs, ts, NAMES, STEP, TimelineSettings(min_duration_s=0, merge_gap_s=0, **rules))]
    assert spans(threshold=0.5) == [(0.0, 0.25)]                        # no hysteresis
    assert spans(threshold=0.5, end_threshold=0.4) == [(0.0, 0.75)]     # on while >= 0.4
    assert spans(threshold=0.5, class_end_thresholds={"Bounce": 0.3}) == [(0.0, 1.0)]
    assert spans(threshold=0.5, end_threshold=0.6) == spans(threshold=0.5)   # capped at the start
    with pytest.raises(VidpipeError, match="need 0 <= end"):
        spans(threshold=0.5, class_end_thresholds={"Bounce": 0.6})


def test_smoothing_averages_the_last_steps_causally():
    probs = probs_from([0, 0, 1, 0, 0, 1, 1, 0, 0], high=0.9)   # a one-step blip, then two steps
    ts = np.arange(9) * STEP
    smoothed = find_segments(probs, ts, NAMES, STEP,
                             TimelineSettings(smoothing_s=0.5, min_duration_s=0, merge_gap_s=0))
    # scores over the last 2 steps: the blip's step reaches 0.45 (< 0.5); the pair reaches
    # 0.45 then 0.9 then 0.45: on at step 6 only (the average lags, it never looks ahead)
    assert [(s.label, s.start_s, s.end_s) for s in smoothed] == [("Bounce", 1.5, 1.75)]
