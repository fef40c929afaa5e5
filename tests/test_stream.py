"""OnlineDetector: equals the offline forward step by step, causal, constant cost, resettable."""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vidpipe.malt.stream import OnlineDetector
from vidpipe.malt.window import gather_window
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


def test_reset_starts_a_new_stream():
    model = tiny_model()
    rgb, flow = random_video(30, model.cfg, seed=1)
    detector = OnlineDetector(model)
    first = stream_probs(detector, rgb, flow)
    detector.reset()
    np.testing.assert_array_equal(stream_probs(detector, rgb, flow), first)


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
    rgb, flow = random_video(400, model.cfg, seed=3)
    detector = OnlineDetector(model)

    def step_flops(t):
        with FlopCounterMode(display=False) as counter:
            detector.step(rgb[t], flow[t])
        return counter.get_total_flops()

    # The encoder runs on one step of every `stride` (4): compare whole cycles at equal phase.
    detector.feed_history(rgb[:41], flow[:41])
    early = [step_flops(t) for t in range(41, 45)]
    buffers = [detector._long_ring.shape, detector._short_ring.shape]
    detector.feed_history(rgb[45:393], flow[45:393])
    assert [step_flops(t) for t in range(393, 397)] == early and min(early) > 0
    assert [detector._long_ring.shape, detector._short_ring.shape] == buffers


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
def test_encoder_runs_once_per_stride_steps_and_only_grid_steps_are_projected(changes, first_change):
    model = tiny_model(**changes)
    cfg = model.cfg
    num_steps = 3 * (cfg.long_memory_steps + cfg.short_memory_steps)   # long past full memories
    rgb, flow = random_video(num_steps, cfg, seed=5)
    encoder_runs, fused_rows = [], []
    # Every encoder run (offline or streaming) ends branch 1 with this LayerNorm, once.
    model.encoder.branches[0].compress.norm.register_forward_hook(
        lambda module, args, out: encoder_runs.append(detector.steps_seen - 1))
    model.long_fusion.register_forward_hook(lambda module, args, out: fused_rows.append(args[0].shape[1]))
    detector = OnlineDetector(model)
    streamed = stream_probs(detector, rgb, flow)
    stride = cfg.long_memory_stride
    # Once at the start (empty long memory), then whenever a grid step leaves the short memory.
    assert encoder_runs == [0] + list(range(first_change, num_steps, stride))
    # One fused row per grid step (s % stride == stride - 1), nothing else.
    assert fused_rows == [1] * len(range(stride - 1, num_steps, stride))
    np.testing.assert_allclose(streamed, offline_probs(model, rgb, flow, range(num_steps)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("query_init", ["embedding", "trunc_normal"])
def test_streaming_is_exact_under_every_paper_switch(pos_encoding, query_init):
    """The authors' choices (sinusoidal positions, the short memory's after the long memory's;
    N(0, 1) queries) and ours stream exactly alike."""
    model = tiny_model(pos_encoding=pos_encoding, query_init=query_init)
    rgb, flow = random_video(NUM_STEPS, model.cfg)
    streamed = stream_probs(OnlineDetector(model), rgb, flow)
    np.testing.assert_allclose(streamed, offline_probs(model, rgb, flow, range(NUM_STEPS)),
                               atol=1e-5, rtol=0)
    assert np.abs(np.diff(streamed, axis=0)).max() > 1e-2
    if pos_encoding == "sinusoidal":
        assert not any(name.endswith("_pos") for name in model.state_dict())   # fixed, not weights
        L = model.num_long_tokens
        torch.testing.assert_close(model.short_pos[0, :2], torch.tensor([np.sin(L), np.cos(L)]).float())
