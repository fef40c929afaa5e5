"""The extractor's CNNs in bf16: every recipe's networks and the timm streams stay within the
stated bound of fp32, run channels_last, and a bf16 cache records itself as one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from extract_helpers import make_video, tiny_settings
from vidpipe.core.errors import VidpipeError
from vidpipe.core.precision import autocast
from vidpipe.core.settings import differing_keys
from vidpipe.extractors.features import TwoStreamExtractor
from vidpipe.extractors.rgb import RGBStream
from vidpipe.extractors.tsn import RECIPES, TSNFlowStream, TSNRGBStream

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per product, fp32 accumulation in
# oneDNN): features move by ~0.3% of their norm (measured: 0.24-0.36% on these networks).
# The stated bound, per feature vector: |bf16 - fp32| / |fp32| <= 2%.
BF16_BOUND = 0.02
CPU = torch.device("cpu")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference).norm(dim=1) / reference.norm(dim=1)).max().item()


def networks():
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (2, 120, 160, 3), dtype=np.uint8))
    images = torch.from_numpy(rng.integers(0, 256, (2, 5, 2, 256, 256), dtype=np.uint8))
    rgb = TSNRGBStream(RECIPES["tsn-kinetics"], weights_file=None, random_init=True, seed=0)
    yield "tsn resnet50 rgb", rgb, lambda: rgb(frames)
    for recipe in RECIPES.values():
        flow = TSNFlowStream(recipe, 5, jpeg=False, weights_file=None, random_init=True, seed=1)
        yield f"{recipe.name} flow {recipe.flow.network}", flow, lambda flow=flow: flow.embed(images)
    timm_rgb = RGBStream("resnet18", 48, random_init=True)    # the demo's networks
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0)) * 255
    yield "resnet18 rgb", timm_rgb, lambda: timm_rgb(pixels)


@pytest.mark.parametrize("name, stream, run", list(networks()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_cnn_is_channels_last_and_bf16_within_the_bound(name, stream, run):
    convs = [m.weight for m in stream.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with torch.inference_mode():
        reference = run()
        with autocast(CPU, "bf16"):
            ours = run()
    assert ours.dtype == torch.bfloat16     # it did run in bf16
    assert relative_error(ours, reference) <= BF16_BOUND


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=24, fps=24, size=(80, 60))


def test_a_bf16_extractor_is_another_cache_and_is_rebuilt_as_bf16(clip):
    fp32 = TwoStreamExtractor(tiny_settings(), device="cpu")
    bf16 = TwoStreamExtractor(tiny_settings(precision="bf16"), device="cpu")
    assert differing_keys(fp32.settings_record(), bf16.settings_record()) == ["precision"]
    assert TwoStreamExtractor.from_record(bf16.settings_record(), "cpu").precision == "bf16"
    rgb32, flow32, _ = fp32.extract(clip)
    rgb16, flow16, _ = bf16.extract(clip)
    assert rgb16.dtype == np.float32 and not np.array_equal(rgb16, rgb32)
    for ours, reference in ((rgb16, rgb32), (flow16, flow32)):
        assert relative_error(torch.from_numpy(ours), torch.from_numpy(reference)) <= BF16_BOUND


def test_a_record_from_before_precision_was_recorded_is_fp32():
    record = TwoStreamExtractor(tiny_settings(), device="cpu").settings_record()
    del record["precision"]
    assert TwoStreamExtractor.from_record(record, "cpu").precision == "fp32"


@pytest.mark.parametrize("precision, message", [("int8", "precision must be"), ("fp16", "CUDA")])
def test_precisions_the_cnns_cannot_run_are_one_line_errors(precision, message):
    with pytest.raises(VidpipeError, match=message):
        TwoStreamExtractor(tiny_settings(precision=precision), device="cpu")


def test_extract_precision_on_the_command_line_is_recorded_in_the_cache(clip, tmp_path):
    from vidpipe.pipeline.cli import main
    from vidpipe.store.cache import FeatureStore

    main(["extract", str(clip), "--out", str(tmp_path / "cache"), "--random-init", "--precision", "bf16",
          "--rgb-backbone", "resnet18", "--flow-backbone", "resnet18", "--flow", "dis",
          "--set", "resize=56", "--set", "crop=48", "--no-progress"])
    assert FeatureStore.open(tmp_path / "cache").settings["precision"] == "bf16"
