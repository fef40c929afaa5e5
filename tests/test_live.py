"""The engine of `detect` (pipeline/live.py): one worker per source, one batched detector;
every source decided in order and equal to the offline model, a failing source ends alone,
the detector's streams freed, decisions logged at the level `live` asks for."""
import logging
import sys

import numpy as np
import pytest

from vidpipe.core.errors import VidpipeError
from vidpipe.malt.stream import MultiStreamDetector
from vidpipe.pipeline.live import (DetectOptions, Engine, Plan, Signals, SourceRun, SourceStep,
                                   SourceWorker, StepRecord)
from vidpipe.pipeline.timeline import TimelineSettings
from vidpipe.store.cache import VideoFeatures
from model_helpers import offline_probs, random_video, tiny_model

STEP_S = 0.25
NAMES = ["Background", "Bounce", "Spin", "Jump"]          # tiny_model has 4 outputs


def cached_plan(name, rgb, flow, damaged=False):
    """A source read from features (no decoding); a damaged one fails as it is read."""
    def cached():
        if damaged:
            raise VidpipeError(f"{name}: damaged")
        return [VideoFeatures(name, rgb, flow, np.arange(len(rgb)) * STEP_S)]
    return Plan(name, name, open_video=None, cached=cached)


def run_engine(model, plans, options=None, extractor=None, multistream=None):
    """Every plan through one Engine -> ({key: SourceRun} as written, the detector)."""
    options = options or DetectOptions()
    multistream, signals, written = multistream or MultiStreamDetector(model), Signals(), {}
    workers = {key: SourceWorker(plan, extractor, STEP_S, options, signals) for key, plan in plans.items()}
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
        np.testing.assert_array_equal(run.steps.timestamps(), np.arange(len(rgb)) * STEP_S)
        np.testing.assert_allclose(run.steps.probs(), offline_probs(model, rgb, flow, range(len(rgb))),
                                   atol=1e-5, rtol=0)
    assert multistream.streams == []                         # every stream freed


def test_the_step_record_keeps_copies_of_every_step_across_its_blocks():
    rng = np.random.default_rng(0)
    rows = rng.random((11, 4)).astype(np.float32)     # 11 steps over blocks of 3 steps
    record = StepRecord(columns=4, block_steps=3)
    for index, row in enumerate(rows):
        record.append(index * STEP_S, 0.01 * index, row)
        row[:] = -1                                   # the detector reuses its output buffer
    assert len(record) == 11
    np.testing.assert_array_equal(record.timestamps(), np.arange(11) * STEP_S)
    np.testing.assert_allclose(record.latencies(), 0.01 * np.arange(11))
    np.testing.assert_array_equal(record.probs(), np.random.default_rng(0).random((11, 4)).astype(np.float32))
    assert record.probs().dtype == np.float32
    assert StepRecord(columns=4).probs().shape == (0, 4)


def test_a_source_keeps_no_python_objects_per_step():
    """A 2-hour video is 28,800 steps: what a source keeps per step must not be Python objects
    (a float per number pinned the allocator's pages among decode's churn: RSS grew with the
    video). Its steps go into numpy blocks: the count of live Python objects stays flat."""
    names = ["background"] + [f"class{c}" for c in range(20)]
    run = SourceRun(cached_plan("v", np.zeros((1, 4)), np.zeros((1, 4))), names, STEP_S,
                    TimelineSettings(), None)
    row = np.full(len(names), 1 / len(names))                # below every threshold: no events
    decide = lambda index: run.decide(SourceStep(index, index * STEP_S, None, None, 0.0), row, 0.01, 0.0)
    for index in range(100):                                  # warm: the first block, the deque
        decide(index)
    before = sys.getallocatedblocks()
    for index in range(100, 5100):
        decide(index)
    assert sys.getallocatedblocks() - before < 500            # Python lists of floats: 115,000
    assert len(run.steps) == 5100 and run.timeline({}).probs.shape == (5100, len(names))


class RecordingDetector(MultiStreamDetector):
    """A detector that keeps the features each stream was given, and the threads it ran with
    (torch's for the networks and the model, OpenCV's for the workers' flow)."""

    def __init__(self, model):
        super().__init__(model)
        self.inputs: dict = {}
        self.threads: set = set()

    def step(self, inputs):
        import cv2
        import torch

        self.threads.add((torch.get_num_threads(), cv2.getNumThreads()))
        for key, (rgb, flow) in inputs.items():
            self.inputs.setdefault(key, []).append((rgb, flow))
        return super().step(inputs)


def test_live_sources_run_their_networks_together_and_equal_each_source_alone(tmp_path):
    """Live sources: each worker decodes and prepares its chunks (resize, flow), the engine
    runs the networks once per round over every source that has a step; the features are
    each source's own unbatched extraction (batch 1) to 1e-5, the decisions the offline
    model's on them."""
    from extract_helpers import make_video, tiny_settings
    from vidpipe.extractors.features import TwoStreamExtractor

    extractor = TwoStreamExtractor(tiny_settings(), device="cpu")
    videos = [make_video(tmp_path / f"v{i}.mp4", frames=36 + 6 * i, size=(80, 60), seed=i) for i in range(3)]
    embedded = []
    embed = extractor.embed
    extractor.embed = lambda prepared: embedded.append(len(prepared)) or embed(prepared)
    model = tiny_model(rgb_dim=512, flow_dim=512)
    multistream = RecordingDetector(model)
    plans = {i: Plan(str(v), v.stem, open_video=lambda v=v: extractor.source(v)) for i, v in enumerate(videos)}
    import torch
    threads = torch.get_num_threads()
    written, _ = run_engine(model, plans, DetectOptions(live=True, threads=1), extractor, multistream)
    assert multistream.threads == {(1, 1)} and torch.get_num_threads() == threads    # restored after
    for key, video in enumerate(videos):
        alone = list(extractor.stream(extractor.source(video), batch_size=1))
        rgb, flow = (np.stack([s.rgb for s in alone]), np.stack([s.flow for s in alone]))
        assert written[key].ended_by == "eof" and len(written[key].steps) == len(alone) == 6 + key
        np.testing.assert_allclose(np.stack([r for r, _ in multistream.inputs[key]]), rgb, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.stack([f for _, f in multistream.inputs[key]]), flow, atol=1e-5, rtol=0)
        np.testing.assert_allclose(written[key].steps.probs(), offline_probs(model, rgb, flow, range(len(rgb))),
                                   atol=1e-4, rtol=0)
    assert sum(embedded) == 6 + 7 + 8           # every step's networks ran in the engine's rounds


def test_a_failing_source_ends_alone_with_its_error():
    model = tiny_model()
    rgb, flow = random_video(20, model.cfg)
    written, multistream = run_engine(model, {0: cached_plan("good", rgb, flow),
                                              1: cached_plan("bad", rgb, flow, damaged=True)})
    assert (written[0].ended_by, len(written[0].steps)) == ("eof", 20)
    assert (written[1].ended_by, written[1].error, len(written[1].steps)) == ("error", "bad: damaged", 0)
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
