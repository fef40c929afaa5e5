"""The streaming detector's precision: each value runs; fp32 is exact; bf16 and int8 stay
within 0.05 of fp32 per step; int8 quantises every Linear; `auto` follows the capabilities."""
import numpy as np
import pytest
import torch

from model_helpers import offline_probs, random_video, tiny_model
from vidpipe.core import precision as precision_module
from vidpipe.core.errors import VidpipeError
from vidpipe.core.precision import Capabilities
from vidpipe.malt.stream import MultiStreamDetector, OnlineDetector

BOUND = 0.05         # per-step probability, |precision - fp32| (docs/malt.md)
STEPS = 60


def decisive_model():
    """The tiny model with logits 5x (not the helpers' 30x): outputs far from uniform (mean
    top-bottom spread 0.75) without amplifying every rounding 30-fold."""
    model = tiny_model(d_model=64, ffn_dim=64)
    with torch.no_grad():
        model.classifier.weight.div_(6.0)
    return model


@pytest.fixture(scope="module")
def video_and_reference():
    model = decisive_model()
    rgb, flow = random_video(STEPS, model.cfg, seed=9)
    return model, rgb, flow, offline_probs(model, rgb, flow, range(STEPS))


def streamed(detector: MultiStreamDetector, rgb, flow, streams: int = 2) -> list[np.ndarray]:
    """The video through `streams` streams at once (stream b starts b steps late, so the
    batches mix positions); each stream's outputs (T, C+1). (int8 quantises activations per
    call, over the batch: a stream's rounding depends on its batch mates.)"""
    for b in range(streams):
        detector.add_stream(b)
    outputs = {b: [] for b in range(streams)}
    for t in range(len(rgb) + streams - 1):
        out = detector.step({b: (rgb[t - b], flow[t - b]) for b in range(streams) if 0 <= t - b < len(rgb)})
        for b, probs in out.items():
            outputs[b].append(probs)
    return [np.stack(outputs[b]) for b in range(streams)]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "auto"])
def test_each_precision_runs_within_its_bound_of_fp32(video_and_reference, precision):
    model, rgb, flow, reference = video_and_reference
    detector = MultiStreamDetector(model, "cpu", max_streams=2, precision=precision)
    for probs in streamed(detector, rgb, flow):
        error = np.abs(probs - reference).max()
        if detector.precision == "fp32":
            assert error < 1e-5                                   # exact: the offline model
        else:
            assert 0 < error <= BOUND
            assert (probs.argmax(1) == reference.argmax(1)).mean() >= 0.9
        assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)


def input_heads(model) -> list[torch.nn.Module]:
    return [model.long_fusion, model.short_fusion]


def test_bf16_runs_every_product_but_the_input_heads_in_bf16_and_leaves_the_model_alone():
    model = decisive_model()
    detector = OnlineDetector(model, precision="bf16").multistream
    assert detector.dtype == torch.bfloat16 and detector.describe_precision() == "bfloat16"
    heads = {id(p) for head in input_heads(detector.model) for p in head.parameters()}
    assert {p.dtype for p in detector.model.parameters() if id(p) not in heads} == {torch.bfloat16}
    assert {p.dtype for head in input_heads(detector.model) for p in head.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}     # served: a copy
    # The decoder's first q/k/v (its top-k's scores) stay fp32: rounded, they flip near-ties.
    assert detector.state.short_qkv.dtype == detector.constants.short_proj.weight.dtype == torch.float32
    assert detector.state.short_ring.dtype == torch.bfloat16


def test_a_model_given_in_bf16_is_served():
    """timm-style modules take a dtype: a bf16 model builds a detector (it failed before)."""
    model = decisive_model().to(torch.bfloat16)
    rgb, flow = random_video(6, model.cfg)
    detector = OnlineDetector(model, precision="bf16")
    assert all(np.isfinite(detector.step(r, f)).all() for r, f in zip(rgb, flow))


def decoder_projections(model, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules()
            if name.startswith("decoder.") and name.rsplit(".", 2)[-2:][0] in ("self_attn", "cross_attn")
            and name.rsplit(".", 1)[-1] in names}


def test_int8_quantises_every_linear_but_the_measured_exceptions_and_int8_true_is_its_alias():
    """Not int8: the input heads (fp32), the decoder's first q/k/v (fp32, the stacked
    short_proj), the decoder's attention outputs and, where top-k selects among the keys (the
    test model: k=3 of 4), its q/k (in the state's dtype)."""
    model = decisive_model()
    for detector in (OnlineDetector(model, int8=True).multistream, MultiStreamDetector(model, precision="int8")):
        assert detector.precision == "int8" and detector.int8
        heads = {id(m) for head in input_heads(detector.model) for m in head.modules()}
        kept = decoder_projections(detector.model, ("q_proj", "k_proj", "out_proj"))
        assert len(kept) == 3 * 2 * sum(len(stack.layers) for stack in detector.model.decoder.stacks)
        assert {(type(m), m.weight.dtype) for m in kept.values()} == {(torch.nn.Linear, detector.dtype)}
        linears = [m for m in detector.model.modules() if type(m).__name__ == "Linear"
                   and id(m) not in heads and m not in kept.values()]
        assert linears and all(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in linears)
        assert isinstance(getattr(detector.constants.long_proj, "module", detector.constants.long_proj),
                          torch.ao.nn.quantized.dynamic.Linear)                  # (bf16 rest: wrapped)
        assert detector.constants.short_proj.weight.dtype == torch.float32
        assert [type(m) for head in input_heads(detector.model) for m in head.modules()
                if "Linear" in type(m).__name__] == [torch.nn.Linear, torch.nn.Linear]    # fp32 input heads
    assert isinstance(model.classifier, torch.nn.Linear)           # the model given is untouched
    # Where top-k keeps every key (k >= S and >= the encoder's tokens, as at paper size), the
    # decoder's q/k are int8 again; its attention outputs stay out.
    unselective = MultiStreamDetector(tiny_model(sparse_k=8), precision="int8").model
    quantized = decoder_projections(unselective, ("q_proj", "k_proj"))
    assert quantized and all(isinstance(getattr(m, "module", m), torch.ao.nn.quantized.dynamic.Linear)
                             for m in quantized.values())
    assert all(type(m) is torch.nn.Linear for m in decoder_projections(unselective, ("out_proj",)).values())
    with pytest.raises(VidpipeError, match="contradicts"):
        MultiStreamDetector(model, int8=True, precision="bf16")


@pytest.mark.parametrize("bf16, vnni, precision, dtype", [
    (True, True, "int8", torch.bfloat16),        # Zen 4, Sapphire Rapids: int8 Linear, bf16 rest
    (False, True, "int8", torch.float32),        # Cascade Lake, Alder Lake: int8 Linear, fp32 rest
    (True, False, "bf16", torch.bfloat16),
    (False, False, "fp32", torch.float32),       # AVX2 only: fp32, exact
])
def test_auto_follows_the_cpu_capabilities(monkeypatch, bf16, vnni, precision, dtype):
    fake = Capabilities("cpu", bf16=bf16, fp16=False, int8=vnni, source="fake")
    monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: fake)
    detector = MultiStreamDetector(decisive_model(), "cpu", precision="auto")
    assert (detector.precision, detector.dtype) == (precision, dtype)
    rgb, flow = random_video(5, detector.cfg)
    detector.add_stream("a")
    assert np.isfinite(detector.step({"a": (rgb[0], flow[0])})["a"]).all()


def test_a_precision_the_cpu_cannot_run_is_a_one_line_error():
    with pytest.raises(VidpipeError, match="fp16"):
        MultiStreamDetector(decisive_model(), "cpu", precision="fp16")


# -- vidpipe detect --precision ------------------------------------------------------------------
def test_detect_records_the_precision_that_ran_in_the_timeline(tmp_path, capsys):
    import json

    from detect_helpers import tiny_cache, tiny_checkpoint
    from vidpipe.pipeline.cli import main

    data, store = tiny_cache(tmp_path, num_videos=1, duration_s=3.0)
    checkpoint = tiny_checkpoint(tmp_path / "run" / "last.pt", store)
    video = store.video_ids()[0]
    for precision in ("fp32", "bf16", "int8"):
        main(["detect", video, "--cache", str(store.root), "--checkpoint", str(checkpoint), "--device", "cpu",
              "--precision", precision, "--no-picture", "--out", str(tmp_path / precision)])
        [timeline] = (tmp_path / precision).glob("*.json")
        record = json.loads(timeline.read_text())["metadata"]["precision"]
        assert record["model"] == precision and record["features"] == "fp32"
        assert record["runs"] == {"fp32": "float32", "bf16": "bfloat16"}.get(precision, record["runs"])
        assert precision != "int8" or record["runs"].startswith("int8 Linear layers, the rest ")
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", video, "--cache", str(store.root), "--checkpoint", str(checkpoint),
              "--int8", "--precision", "bf16", "--out", str(tmp_path / "both")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith("error: ") and "contradicts" in error
    assert len(error.splitlines()) == 1
