"""The engine of `detect` (pipeline/live.py): one worker per source, one batched detector;
every source decided in order and equal to the offline model, a failing source ends alone,
the detector's streams freed, decisions logged at the level `live` asks for."""
import logging

import numpy as np
import pytest

from vidpipe.core.errors import VidpipeError
from vidpipe.malt.stream import MultiStreamDetector
from vidpipe.pipeline.live import DetectOptions, Engine, Plan, Signals, SourceRun, SourceWorker
from vidpipe.pipeline.timeline import TimelineSettings
from model_helpers import offline_probs, random_video, tiny_model

STEP_S = 0.25
NAMES = ["Background", "Bounce", "Spin", "Jump"]          # tiny_model has 4 outputs


def cached_plan(name, rgb, flow, damaged=False):
    """A source read from features (no decoding); a damaged one fails as it is read."""
    def cached():
        if damaged:
            raise VidpipeError(f"{name}: damaged")
        return np.arange(len(rgb)) * STEP_S, rgb, flow
    return Plan(name, name, open_video=None, cached=cached)


def run_engine(model, plans, options=None):
    """Every plan through one Engine -> ({key: SourceRun} as written, the detector)."""
    options = options or DetectOptions()
    multistream, signals, written = MultiStreamDetector(model), Signals(), {}
    workers = {key: SourceWorker(plan, None, STEP_S, options, signals) for key, plan in plans.items()}
    runs = {key: SourceRun(plan, NAMES, STEP_S, TimelineSettings(), None) for key, plan in plans.items()}
    Engine(multistream, workers, runs, lambda key, run: written.setdefault(key, run), options,
           signals).run()
    return written, multistream


def test_every_source_is_decided_in_order_and_equals_the_offline_model():
    model = tiny_model()
    videos = {key: random_video(length, model.cfg, seed=key) for key, length in enumerate([30, 18, 25])}
    written, multistream = run_engine(model, {key: cached_plan(f"v{key}", *video)
                                              for key, video in videos.items()})
    assert sorted(written) == [0, 1, 2]                      # each source written once, at its end
    for key, (rgb, flow) in videos.items():
        run = written[key]
        assert run.ended_by == "eof" and run.error is None
        np.testing.assert_array_equal(run.timestamps, np.arange(len(rgb)) * STEP_S)
        np.testing.assert_allclose(np.stack(run.probs), offline_probs(model, rgb, flow, range(len(rgb))),
                                   atol=1e-5, rtol=0)
    assert multistream.streams == []                         # every stream freed


def test_a_failing_source_ends_alone_with_its_error():
    model = tiny_model()
    rgb, flow = random_video(20, model.cfg)
    written, multistream = run_engine(model, {0: cached_plan("good", rgb, flow),
                                              1: cached_plan("bad", rgb, flow, damaged=True)})
    assert (written[0].ended_by, len(written[0].probs)) == ("eof", 20)
    assert (written[1].ended_by, written[1].error, written[1].probs) == ("error", "bad: damaged", [])
    assert multistream.streams == []


@pytest.mark.parametrize("live, level", [(True, logging.INFO), (False, logging.DEBUG)])
def test_live_logs_each_decision_as_it_is_made(caplog, live, level):
    model = tiny_model()
    rgb, flow = random_video(40, model.cfg, seed=3)
    caplog.set_level(logging.DEBUG, logger="vidpipe.pipeline.live")
    written, _ = run_engine(model, {0: cached_plan("cam", rgb, flow)}, DetectOptions(live=live))
    decisions = [r for r in caplog.records if r.name == "vidpipe.pipeline.live"
                 and (" start " in r.getMessage() or " end " in r.getMessage())]
    assert written[0].segmenter.events and len(decisions) == len(written[0].segmenter.events)
    assert {r.levelno for r in decisions} == {level}
