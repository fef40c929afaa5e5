"""OnlineDetector and MultiStreamDetector: equal the offline forward step by step, for every
stream of a batch; causal, constant and evenly spread cost, resettable."""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vidpipe.malt.stream import MultiStreamDetector, OnlineDetector
from vidpipe.malt.window import gather_window, next_long_memory_change
from vidpipe.core.errors import VidpipeError
from model_helpers import offline_probs, random_video, tiny_model

# Tiny config: long memory 16 steps / stride 4 (4 slots), short memory 4 steps, so a stream of
# 45 steps covers the empty start, the filling long memory and many full windows.
NUM_STEPS = 45


def stream_probs(detector, rgb, flow):
    return np.stack([detector.step(r, f) for r, f in zip(rgb, flow)])


@pytest.mark.parametrize("changes", [
    {},                                                     # N=2, sparse k=3, recurrent
    {"num_branches": 1, "sparse_k": None},                  # LSTR-like
    {"num_branches": 3, "decoder": "cascaded", "decoder_layers": 2},
    {"num_branches": 4, "sparse_k": 2, "branch_layers": [3, 1, 2, 1]},
])
def test_streaming_equals_offline_at_every_step(changes):
    model = tiny_model(**changes)
    rgb, flow = random_video(NUM_STEPS, model.cfg)
    streamed = stream_probs(OnlineDetector(model), rgb, flow)
    offline = offline_probs(model, rgb, flow, range(NUM_STEPS))
    assert streamed.shape == (NUM_STEPS, model.cfg.num_classes)
    np.testing.assert_allclose(streamed, offline, atol=1e-5, rtol=0)
    assert np.abs(np.diff(streamed, axis=0)).max() > 1e-2   # outputs really vary over the stream


def test_streaming_outputs_up_to_t_ignore_features_after_t():
    model = tiny_model()
    rgb, flow = random_video(NUM_STEPS, model.cfg)
    rgb2, flow2 = rgb.copy(), flow.copy()
    t0 = 30
    rgb2[t0 + 1:] *= -3.0
    a = stream_probs(OnlineDetector(model), rgb, flow)
    b = stream_probs(OnlineDetector(model), rgb2, flow2)
    np.testing.assert_array_equal(a[: t0 + 1], b[: t0 + 1])
    assert not np.allclose(a[t0 + 1:], b[t0 + 1:])


def test_restart_starts_a_new_stream():
    model = tiny_model()
    rgb, flow = random_video(30, model.cfg, seed=1)
    detector = OnlineDetector(model)
    first = stream_probs(detector, rgb, flow)
    detector.restart()
    np.testing.assert_array_equal(stream_probs(detector, rgb, flow), first)


def test_refresh_weights_serves_the_changed_model():
    model = tiny_model()
    rgb, flow = random_video(30, model.cfg, seed=1)
    detector = OnlineDetector(model)
    stream_probs(detector, rgb, flow)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    detector.refresh_weights()
    assert detector.steps_seen == 0
    np.testing.assert_allclose(stream_probs(detector, rgb, flow), offline_probs(model, rgb, flow, range(30)),
                               atol=1e-5, rtol=0)


def test_feed_history_leaves_the_state_that_stepping_leaves():
    model = tiny_model()
    rgb, flow = random_video(60, model.cfg, seed=2)
    stepped = OnlineDetector(model)
    stream_probs(stepped, rgb[:50], flow[:50])
    fed = OnlineDetector(model)
    fed.feed_history(rgb[:50], flow[:50])
    np.testing.assert_allclose(stream_probs(fed, rgb[50:], flow[50:]),
                               stream_probs(stepped, rgb[50:], flow[50:]), atol=1e-5, rtol=0)


def test_cost_per_step_does_not_grow_with_stream_length():
    model = tiny_model()
    rgb, flow = random_video(401, model.cfg, seed=3)
    detector = OnlineDetector(model)

    def step_flops(t):
        with FlopCounterMode(display=False) as counter:
            detector.step(rgb[t], flow[t])
        return counter.get_total_flops()

    def buffers():
        return detector.multistream.state.nbytes()

    # The encoder's work repeats every `stride` (4) steps: compare whole cycles at equal phase.
    detector.feed_history(rgb[:41], flow[:41])
    [step_flops(t) for t in range(41, 45)]            # (the encoding after feed_history)
    early, shapes = [step_flops(t) for t in range(45, 49)], buffers()
    detector.feed_history(rgb[49:393], flow[49:393])
    [step_flops(t) for t in range(393, 397)]
    assert [step_flops(t) for t in range(397, 401)] == early and min(early) > 0
    assert buffers() == shapes


def test_encoder_work_is_spread_over_the_steps_of_a_cycle():
    """No step pays the whole encoder: the next long memory's encoding is shared among the
    steps of a refresh cycle. (The shares follow each op's time, measured when the detector
    is built, so how even they are is bench/lstr_stream.py's to show, not a unit test's.)"""
    model = tiny_model()
    rgb, flow = random_video(60, model.cfg, seed=6)
    detector = OnlineDetector(model)
    calls = []
    for module in model.encoder.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda *args: calls.append(detector.steps_seen))
    for t in range(44):
        detector.step(rgb[t], flow[t])
    cycle = [calls.count(t + 1) for t in range(40, 44)]        # encoder modules run at each step
    assert 0 < max(cycle) < sum(cycle)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_outputs_do_not_depend_on_how_busy_the_machine_was_when_the_detector_was_built(
        monkeypatch, precision):
    """The parts are cut by each op's time, measured at build: two different measurements
    (another process on the cores) cut them differently, and change no output, not even by
    rounding (an op split into shares of its rows would round differently; int8: each share
    would get its own activation scale)."""
    from vidpipe.malt import stream

    model = tiny_model()
    rgb, flow = random_video(NUM_STEPS, model.cfg, seed=7)
    outputs, parts = [], []
    for ratio in (1.0, 0.1):        # every op alike; each op 10x the next (the first dominates)
        monkeypatch.setattr(stream, "_shortest_seconds",
                            lambda calls, device: [ratio ** i for i in range(len(calls))])
        detector = OnlineDetector(model, precision=precision)
        parts.append([len(ops) for ops in detector.multistream.schedule.parts])
        outputs.append(stream_probs(detector, rgb, flow))
    assert parts[0] != parts[1]                                   # cut differently ...
    np.testing.assert_array_equal(outputs[0], outputs[1])         # ... the same numbers


def test_detector_needs_fewer_multiply_adds_than_recomputing_the_window():
    model = tiny_model()
    rgb, flow = random_video(40, model.cfg)
    detector = OnlineDetector(model)
    detector.feed_history(rgb[:39], flow[:39])
    with FlopCounterMode(display=False) as streaming:
        detector.step(rgb[39], flow[39])
    window = [torch.as_tensor(a)[None] for a in gather_window(rgb, flow, 39, model.cfg)]
    with FlopCounterMode(display=False) as offline:
        model(*window)
    assert streaming.get_total_flops() < offline.get_total_flops()


def test_detector_accepts_lists_and_torch_vectors():
    model = tiny_model()
    rgb, flow = random_video(3, model.cfg)
    detector = OnlineDetector(model)
    probs = [detector.step(rgb[0].tolist(), flow[0].tolist()),
             detector.step(torch.from_numpy(rgb[1]), torch.from_numpy(flow[1]))]
    np.testing.assert_allclose(np.stack(probs), offline_probs(model, rgb, flow, [0, 1]), atol=1e-5)
    assert all(p.dtype == np.float32 and abs(p.sum() - 1) < 1e-5 for p in probs)


def test_feature_dims_that_do_not_match_the_model_are_a_clear_error():
    model = tiny_model()
    detector = OnlineDetector(model)
    with pytest.raises(VidpipeError, match="7 rgb \\+ 5 flow dims, the model expects 6 \\+ 5"):
        detector.step(np.zeros(7, np.float32), np.zeros(5, np.float32))


def test_feed_history_longer_than_the_buffers():
    model = tiny_model()
    rgb, flow = random_video(90, model.cfg, seed=4)
    fed = OnlineDetector(model)
    fed.feed_history(rgb[:85], flow[:85])            # more than long + short memory steps
    np.testing.assert_allclose(stream_probs(fed, rgb[85:], flow[85:]),
                               offline_probs(model, rgb, flow, range(85, 90)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes, first_change", [
    ({}, 7),                                                # stride 4, S 4: M_L gains step 3 at t=7
    ({"long_memory_steps": 12, "long_memory_stride": 3, "short_memory_steps": 5,
      "branch_queries": [5, 3, 2, 5]}, 7),                  # stride 3, S 5: M_L gains step 2 at t=7
])
def test_each_long_memory_is_encoded_once_ahead_and_only_grid_steps_are_projected(changes, first_change):
    model = tiny_model(**changes)
    cfg = model.cfg
    num_steps = 3 * (cfg.long_memory_steps + cfg.short_memory_steps)   # long past full memories
    rgb, flow = random_video(num_steps, cfg, seed=5)
    detector = OnlineDetector(model)
    encoder_runs, fused_rows = [], []
    # Every encoder run (offline or streaming) ends branch 1 with this LayerNorm, once.
    model.encoder.branches[0].compress.norm.register_forward_hook(
        lambda module, args, out: encoder_runs.append(detector.steps_seen - 1))
    model.long_fusion.register_forward_hook(lambda module, args, out: fused_rows.append(len(args[0])))
    streamed = stream_probs(detector, rgb, flow)
    stride = cfg.long_memory_stride
    # Once for every long memory the stream reaches (a grid step leaves the short memory),
    # on a step before the one that needs it; the empty memory of the start is a constant.
    # The one after the last step may be finished ahead or not, as the parts fall.
    switches = [next_long_memory_change(t, cfg) for t in encoder_runs]
    reached = list(range(first_change, num_steps, stride))
    assert switches in (reached, reached + [reached[-1] + stride])
    assert all(run < switch for run, switch in zip(encoder_runs, switches))
    # One fused row per grid step (s % stride == stride - 1), nothing else.
    assert fused_rows == [1] * len(range(stride - 1, num_steps, stride))
    np.testing.assert_allclose(streamed, offline_probs(model, rgb, flow, range(num_steps)), atol=1e-5, rtol=0)


def test_streams_joining_leaving_and_skipping_steps_each_equal_the_offline_model():
    """Streams join late (other refresh phases, young short memories beside full ones), skip
    steps, leave, and a newcomer takes a freed slot: every output equals the offline model
    on that stream's own video."""
    model = tiny_model()
    videos = {name: random_video(60, model.cfg, seed=seed) for seed, name in enumerate("abcde")}
    joins, leaves = {"a": 0, "b": 3, "c": 6, "d": 13, "e": 40}, {"d": 38}
    skips = {("b", 20), ("b", 21), ("c", 33)}           # no new step for that stream that tick
    detector = MultiStreamDetector(model)
    outputs = {name: [] for name in videos}
    batches = []
    model.classifier.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    for tick in range(60):
        for name in [n for n, at in joins.items() if at == tick]:
            detector.add_stream(name)
        for name in [n for n, at in leaves.items() if at == tick]:
            detector.remove_stream(name)
        inputs = {}
        for name in detector.streams:
            t = detector.position(name)
            if (name, tick) not in skips and t < 60:
                inputs[name] = (videos[name][0][t], videos[name][1][t])
        for name, probs in detector.step(inputs).items():
            outputs[name].append(probs)
        assert batches[-1] == len(inputs)                # one batch for all streams that stepped
    assert detector.streams == ["a", "b", "c", "e"]
    for name, probs in outputs.items():
        rgb, flow = videos[name]
        expected = offline_probs(model, rgb, flow, range(len(probs)))
        np.testing.assert_allclose(np.stack(probs), expected, atol=1e-5, rtol=0, err_msg=name)
    assert [len(outputs[n]) for n in "de"] == [25, 20]


def test_multi_stream_feed_history_and_one_stream_detector_agree():
    model = tiny_model(num_branches=3, decoder="cascaded", decoder_layers=2)
    rgb, flow = random_video(70, model.cfg, seed=7)
    multi = MultiStreamDetector(model, max_streams=2)
    multi.add_stream("fed")
    multi.add_stream("stepped")
    multi.feed_history("fed", rgb[:50], flow[:50])
    for t in range(50):
        multi.step({"stepped": (rgb[t], flow[t])})
    single = OnlineDetector(model)
    single.feed_history(rgb[:50], flow[:50])
    for t in range(50, 70):
        out = multi.step({"fed": (rgb[t], flow[t]), "stepped": (rgb[t], flow[t])})
        np.testing.assert_allclose(out["fed"], out["stepped"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(single.step(rgb[t], flow[t]), out["fed"], atol=1e-5, rtol=0)


def test_stream_mistakes_are_clear_errors():
    model = tiny_model()
    detector = MultiStreamDetector(model, max_streams=1)
    detector.add_stream("cam1")
    with pytest.raises(VidpipeError, match="stream 'cam1' is already served"):
        detector.add_stream("cam1")
    with pytest.raises(VidpipeError, match="stream 'cam2': this detector serves at most 1 streams"):
        detector.add_stream("cam2")
    with pytest.raises(VidpipeError, match="unknown stream 'cam3': add_stream it first"):
        detector.step({"cam3": (np.zeros(6), np.zeros(5))})
    with pytest.raises(VidpipeError, match="unknown stream 'cam3'"):
        detector.remove_stream("cam3")
    assert detector.step({}) == {}


def test_from_checkpoint_serves_the_trained_model(tmp_path):
    from vidpipe.core.config import to_dict
    from vidpipe.malt.checkpoint import Checkpoint, save_checkpoint
    from vidpipe.malt.config import Config

    model = tiny_model()
    save_checkpoint(Checkpoint(model.state_dict(), to_dict(Config(model=model.cfg)), {}, ["bg", "a", "b", "c"]),
                    tmp_path / "m.pt")
    rgb, flow = random_video(12, model.cfg, seed=8)
    detector = OnlineDetector.from_checkpoint(tmp_path / "m.pt", device="cpu")
    multi = MultiStreamDetector.from_checkpoint(tmp_path / "m.pt", device="cpu")
    multi.add_stream(0)
    streamed = stream_probs(detector, rgb, flow)
    np.testing.assert_allclose(streamed, offline_probs(model, rgb, flow, range(12)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack([multi.step({0: (r, f)})[0] for r, f in zip(rgb, flow)]),
                               streamed, atol=1e-5, rtol=0)
