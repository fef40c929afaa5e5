"""`import vidpipe` (vidpipe/__init__.py): the public API, names re-exported from below."""
import pytest

import vidpipe
from vidpipe.malt import events


def test_the_event_metrics_are_part_of_the_api():
    for name in ("event_report", "VideoEvents", "DetectedStart", "Segment"):
        assert name in vidpipe.__all__ and name in dir(vidpipe)
    assert vidpipe.event_report is events.event_report and vidpipe.VideoEvents is events.VideoEvents
    # one video, detected exactly as annotated, its start decided 0.5 s after the true start
    video = vidpipe.VideoEvents(duration_s=10.0, truth=[vidpipe.Segment("Jump", 2.0, 4.0)],
                                segments=[vidpipe.Segment("Jump", 2.0, 4.0, 0.9)],
                                starts=[vidpipe.DetectedStart("Jump", 2.5, 0.9)])
    report = vidpipe.event_report([video], ["Jump"])
    assert report["f1"]["0.50"] == 1.0 and report["edit"] == 1.0
    assert report["start_mAP"] == pytest.approx(1.0) and report["false_starts_per_hour"] == 0.0
    assert report["latency_s"]["median"] == pytest.approx(0.5)


def test_a_name_the_api_does_not_offer_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'event_metrics'"):
        vidpipe.event_metrics
