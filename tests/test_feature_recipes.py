"""Feature recipes (issue 8) against the reference implementations, not against ourselves.

Random-weight checkpoints are written in each reference's own format and vidpipe's features
are compared with the reference's on the same frames: mmaction2's TSN recognizer (ResNet-50,
RGB and 10-channel flow), Cadene's `pretrainedmodels` BN-Inception (TSN's flow network) and
DenseFlow's flow image encoding. The reference packages are test-only: `make test` installs
them into .refimpl/ (see the Makefile); the `refimpl` fixture puts that folder on sys.path.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from extract_helpers import frame_image, make_video
from vidpipe.core.errors import VidpipeError
from vidpipe.extractors.bninception import load_bninception
from vidpipe.extractors.features import FeatureSettings, TwoStreamExtractor
from vidpipe.extractors.tsn import (RECIPES, TSNFlowStream, TSNRGBStream, flow_to_images, jpeg_round_trip,
                                    load_mmaction_resnet50, mmaction_resize)
from vidpipe.store.cache import FeatureStore

REFIMPL = Path(__file__).resolve().parents[1] / ".refimpl"
TOLERANCE = 1e-4          # relative L2 error per feature vector (issue 8)


def relative_errors(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (ours - reference).norm(dim=1) / reference.norm(dim=1)


@pytest.fixture(scope="module")
def refimpl():
    """mmaction2 1.1.0 (+ mmengine, mmcv-lite) and pretrainedmodels, from .refimpl/ only."""
    if not (REFIMPL / "mmaction").is_dir() or not (REFIMPL / "pretrainedmodels").is_dir():
        pytest.fail(f"reference packages missing in {REFIMPL}: `make test` installs them (target .refimpl)")
    sys.path.append(str(REFIMPL))     # appended: never shadows the packages vidpipe runs with
    warnings.filterwarnings("ignore", module="mmcv|mmengine|mmaction")
    from mmaction.utils import register_all_modules
    register_all_modules()
    yield
    sys.path.remove(str(REFIMPL))


def randomise_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics and affine terms, so that the BN convention is checked."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def mmaction_tsn(in_channels: int, mean: list[float], std: list[float]) -> torch.nn.Module:
    """mmaction2's Recognizer2D as its TSN Kinetics configs build it (random weights)."""
    from mmaction.registry import MODELS

    torch.manual_seed(in_channels)
    model = MODELS.build(dict(
        type="Recognizer2D",
        backbone=dict(type="ResNet", pretrained=None, depth=50, norm_eval=False, in_channels=in_channels),
        cls_head=dict(type="TSNHead", num_classes=400, in_channels=2048, spatial_type="avg",
                      consensus=dict(type="AvgConsensus", dim=1), dropout_ratio=0.4, init_std=0.01),
        data_preprocessor=dict(type="ActionDataPreprocessor", mean=mean, std=std, format_shape="NCHW")))
    return randomise_batch_norm(model)


def save_mmaction_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """The layout of mmaction2's model zoo files: meta + state_dict (backbone. / cls_head.)."""
    torch.save({"meta": {"mmcv_version": "1.3.1", "epoch": 100, "config": "tsn_r50",
                         "hook_msgs": {"best_score": np.float64(0.72)}},   # numpy in meta, as mmcv's eval hook
                "state_dict": model.state_dict()}, path)
    return path


def mmaction_features(model: torch.nn.Module, images: list[np.ndarray], crop: int, flow: bool) -> torch.Tensor:
    """One sample through mmaction2's own test transforms, data preprocessor, backbone and the
    TSN head's average pool: (1, 2048)."""
    from mmaction.datasets.transforms import CenterCrop, FormatShape, Resize

    results = dict(imgs=images, img_shape=images[0].shape[:2], modality="Flow" if flow else "RGB",
                   num_clips=1, clip_len=len(images) // 2 if flow else 1)
    for transform in (Resize(scale=(-1, 256)), CenterCrop(crop_size=crop),
                      FormatShape("NCHW_Flow" if flow else "NCHW")):
        results = transform(results)
    with torch.no_grad():
        data = model.data_preprocessor({"inputs": [torch.from_numpy(np.ascontiguousarray(results["imgs"]))],
                                        "data_samples": None})
        maps, _ = model.extract_feat(data["inputs"], test_mode=True)
        return model.cls_head.avg_pool(maps).flatten(1)


@pytest.fixture(scope="module")
def rgb_checkpoint(refimpl, tmp_path_factory):
    model = mmaction_tsn(3, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    return model, save_mmaction_checkpoint(model, tmp_path_factory.mktemp("mm") / "tsn_r50_rgb.pth")


@pytest.fixture(scope="module")
def flow_checkpoint(refimpl, tmp_path_factory):
    model = mmaction_tsn(10, [128.0] * 10, [128.0] * 10)
    return model, save_mmaction_checkpoint(model, tmp_path_factory.mktemp("mm") / "tsn_r50_flow.pth")


# -- mmaction2 TSN ResNet-50 ------------------------------------------------------------------
def test_rgb_matches_mmaction2_tsn_recognizer(rgb_checkpoint):
    model, path = rgb_checkpoint
    stream = TSNRGBStream(RECIPES["tsn-kinetics"], weights_file=str(path), random_init=False, seed=0)
    rng = np.random.default_rng(0)
    for height, width in ((90, 120), (300, 400)):      # enlarged and shrunk to short side 256
        frames = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
        with torch.no_grad():
            ours = stream(torch.from_numpy(frames))
        reference = torch.cat([mmaction_features(model, [frame], crop=256, flow=False) for frame in frames])
        assert ours.shape == (1, 2048)
        assert relative_errors(ours, reference).max() <= TOLERANCE


def test_flow_r50_matches_mmaction2_tsn_recognizer(flow_checkpoint):
    """10-channel flow ResNet-50 (tsn_r50_..._kinetics400_flow): DenseFlow's 8-bit x/y images of
    5 fields through mmaction2's Resize(-1, 256), CenterCrop(224), mean/std 128, NCHW_Flow."""
    model, path = flow_checkpoint
    stream = TSNFlowStream(RECIPES["tsn-kinetics-r50"], 5, jpeg=False, weights_file=str(path),
                           random_init=False, seed=0)
    images = np.random.default_rng(1).integers(0, 256, (5, 2, 60, 80), dtype=np.uint8)   # x1 y1 ... x5 y5
    resized = np.stack([[mmaction_resize(image, 256) for image in field] for field in images])
    with torch.no_grad():
        ours = stream.embed(torch.from_numpy(resized)[None])
    reference = mmaction_features(model, list(images.reshape(10, 60, 80)), crop=224, flow=True)
    assert ours.shape == (1, 2048)
    assert relative_errors(ours, reference).max() <= TOLERANCE


def test_mmaction_loader_refuses_other_layouts(tmp_path):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "tv.pth")
    with pytest.raises(VidpipeError, match=r"tv.pth: not an mmaction2 TSN ResNet-50 checkpoint: expected .*"
                                           r"backbone.conv1.conv.weight.*found 1 keys like conv1.weight"):
        load_mmaction_resnet50(tmp_path / "tv.pth", 3)


# -- TSN BN-Inception ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bninception_reference(refimpl):
    """pretrainedmodels' BNInception turned into TSN's flow network (conv1 with 10 channels)."""
    from pretrainedmodels.models.bninception import BNInception

    torch.manual_seed(0)
    model = BNInception(num_classes=400)
    model.conv1_7x7_s2 = torch.nn.Conv2d(10, 64, kernel_size=7, stride=2, padding=3)
    return randomise_batch_norm(model)


def test_bninception_matches_pretrainedmodels(bninception_reference, tmp_path):
    """A tsn-pytorch checkpoint ('module.base_model.' keys, TSN's new_fc) loads into vidpipe's
    BN-Inception and gives the reference's pooled features with TSN's flow convention
    (8-bit images minus 128, std 1, channels x1 y1 x2 y2 ...)."""
    reference = bninception_reference
    state = {f"module.base_model.{key}": value for key, value in reference.state_dict().items()}
    state["module.new_fc.weight"] = torch.zeros(400, 1024)
    torch.save({"epoch": 80, "arch": "BNInception", "state_dict": state}, tmp_path / "tsn_flow.pth")
    stream = TSNFlowStream(RECIPES["tsn-kinetics"], 5, jpeg=False, weights_file=str(tmp_path / "tsn_flow.pth"),
                           random_init=False, seed=0)
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 5, 2, 256, 256), dtype=np.uint8))
    with torch.no_grad():
        ours = stream.embed(images)
        x = images[:, :, :, 16:240, 16:240].flatten(1, 2).float() - 128.0      # GroupCenterCrop(224)
        expected = reference.global_pool(reference.features(x)).flatten(1)
    assert ours.shape == (1, 1024)
    assert relative_errors(ours, expected).max() <= TOLERANCE


def test_bninception_loads_plain_pretrainedmodels_names_and_refuses_others(bninception_reference, tmp_path):
    torch.save(bninception_reference.state_dict(), tmp_path / "plain.pth")
    model = load_bninception(tmp_path / "plain.pth", in_chans=10)
    assert torch.equal(model.blocks["inception_5b"].units["pool_proj"].bn.running_var,
                       bninception_reference.inception_5b_pool_proj_bn.running_var)
    torch.save({"conv1.weight": torch.zeros(64, 10, 7, 7), "bn1.weight": torch.ones(64)}, tmp_path / "r50.pth")
    with pytest.raises(VidpipeError) as error:
        load_bninception(tmp_path / "r50.pth", in_chans=10)
    message = str(error.value)
    assert "\n" not in message and "r50.pth" in message
    assert "expected 414 keys like conv1_7x7_s2.weight" in message and "found 2 keys like conv1.weight" in message
    with pytest.raises(VidpipeError, match="first conv takes 10 channels, this stream feeds 3"):
        load_bninception(tmp_path / "plain.pth", in_chans=3)


# -- DenseFlow's TV-L1 convention ----------------------------------------------------------------
def denseflow_cast(value: float, bound: float = 20.0) -> int:
    """DenseFlow src/common.cpp convertFlowToImage: CAST(v, L, H) = v > H ? 255 : v < L ? 0 :
    cvRound(255 * (v - L) / (H - L)); cvRound rounds half to even."""
    if value > bound:
        return 255
    if value < -bound:
        return 0
    return int(np.rint(255 * (value + bound) / (2 * bound)))


def test_flow_image_encoding_is_denseflows():
    values = np.array([-33.0, -20.0, -10.0, -0.0784, 0.0, 0.0784, 1.0, 10.0, 19.99, 20.0, 25.0], dtype=np.float32)
    field = np.stack([values, -values], axis=-1)[None]                 # (1, 11, 2): x, y
    images = flow_to_images(field)                                     # (2, 1, 11) uint8
    assert images.dtype == np.uint8
    assert images[0, 0].tolist() == [denseflow_cast(v) for v in values]
    assert images[1, 0].tolist() == [denseflow_cast(-v) for v in values]
    assert images[0, 0].tolist() == [0, 0, 64, 127, 128, 128, 134, 191, 255, 255, 255]


def test_tvl1_images_of_a_known_motion_and_the_jpeg_round_trip():
    """Content moving 2 px left per frame (frame_image): x flow -2 -> 255 * 18 / 40 = 114.75 -> 115,
    y flow 0 -> 127.5 (127 or 128): the sign and scale of DenseFlow's images.
    DenseFlow's JPEG files change the 8-bit images by a few levels at most."""
    stream = TSNFlowStream(RECIPES["tsn-kinetics"], 1, jpeg=False, weights_file=None, random_init=True, seed=0)
    first, second = frame_image(0, 64, 48), frame_image(1, 64, 48)
    images = stream.flow_images(first, second)
    inner = images[:, 60:200, 60:280]                                  # resized to 256 x 341
    assert images.shape == (2, 256, 341)
    assert np.median(inner[0]) == 115 and abs(np.median(inner[1]) - 127.5) <= 1
    stream.jpeg = True
    assert np.abs(stream.flow_images(first, second).astype(int) - images).max() <= 8
    texture = cv2.resize(np.random.default_rng(3).integers(0, 256, (8, 8), dtype=np.uint8), (64, 64))
    decoded = jpeg_round_trip(texture)
    assert decoded.dtype == np.uint8 and decoded.shape == texture.shape
    assert 0 < np.abs(decoded.astype(int) - texture).mean() < 2      # lossy, quality 95


# -- the recipe as a whole ------------------------------------------------------------------------
def test_recipe_is_recorded_and_a_different_recipe_is_refused(tmp_path):
    records = {name: TwoStreamExtractor(FeatureSettings(recipe=name, random_init=True), device="cpu").settings_record()
               for name in RECIPES}
    assert records["tsn-kinetics"]["recipe"] == "tsn-kinetics" and records["tsn-kinetics"]["flow_dim"] == 1024
    assert records["tsn-kinetics-r50"]["flow_dim"] == 2048
    FeatureStore.open_or_create(tmp_path / "cache", records["tsn-kinetics"])
    with pytest.raises(VidpipeError, match="recipe"):
        FeatureStore.open_or_create(tmp_path / "cache", records["tsn-kinetics-r50"])
    plain = {**records["tsn-kinetics"], "recipe": None}     # same numbers otherwise: still refused
    with pytest.raises(VidpipeError, match="recipe"):
        FeatureStore.open_or_create(tmp_path / "cache", plain)


def test_recipe_settings_and_missing_weights_are_one_line_errors():
    with pytest.raises(VidpipeError, match="recipe tsn-kinetics sets its own flow_method"):
        FeatureSettings(recipe="tsn-kinetics", flow_method="dis").validate()
    with pytest.raises(VidpipeError, match="recipe 'tsn': choose one of tsn-kinetics, tsn-kinetics-r50"):
        FeatureSettings(recipe="tsn").validate()
    with pytest.raises(VidpipeError, match="flow_jpeg applies to a --recipe only"):
        FeatureSettings(flow_jpeg=True).validate()
    with pytest.raises(VidpipeError) as error:
        TwoStreamExtractor(FeatureSettings(recipe="tsn-kinetics"), device="cpu")
    assert "\n" not in str(error.value)
    assert "pretrained weights unavailable" in str(error.value) and "--rgb-weights PATH" in str(error.value)


def test_extract_cli_with_recipe_matches_mmaction2_on_the_decoded_frames(rgb_checkpoint, flow_checkpoint, tmp_path,
                                                                        capsys):
    """`vidpipe extract --recipe tsn-kinetics-r50` with mmaction2 checkpoints: the cached RGB
    vector is mmaction2's feature of the decoded centre frame."""
    from vidpipe.extractors.decode import VideoSource
    from vidpipe.pipeline.cli import main

    (tmp_path / "videos").mkdir()
    video = make_video(tmp_path / "videos" / "clip.mp4", frames=6, size=(64, 48))
    main(["extract", str(tmp_path / "videos"), "--out", str(tmp_path / "cache"), "--recipe", "tsn-kinetics-r50",
          "--rgb-weights", str(rgb_checkpoint[1]), "--flow-weights", str(flow_checkpoint[1]), "--no-progress"])
    assert "TV-L1 on the CPU takes about" in capsys.readouterr().err      # its expected time, before starting
    store = FeatureStore.open(tmp_path / "cache")
    assert store.settings["recipe"] == "tsn-kinetics-r50" and "sha256:" in store.settings["rgb_weights"]
    features = store.read("clip.mp4")
    centre = next(iter(VideoSource(video))).frames[3]
    expected = mmaction_features(rgb_checkpoint[0], [centre], crop=256, flow=False)
    assert relative_errors(torch.from_numpy(features.rgb[:1]), expected).max() <= TOLERANCE
    assert features.flow.shape == (1, 2048)


def test_a_recipe_extractor_is_rebuilt_from_its_record(rgb_checkpoint, flow_checkpoint):
    """What `vidpipe detect` does with a checkpoint trained on recipe features: the same
    extractor again, given the same weights files (checked by sha256)."""
    files = dict(rgb_weights=str(rgb_checkpoint[1]), flow_weights=str(flow_checkpoint[1]))
    record = TwoStreamExtractor(FeatureSettings(recipe="tsn-kinetics-r50", **files), device="cpu").settings_record()
    rebuilt = TwoStreamExtractor.from_record(record, device="cpu", **files)
    assert rebuilt.recipe is RECIPES["tsn-kinetics-r50"] and rebuilt.settings_record() == record
    with pytest.raises(VidpipeError, match="came from a file .*tsn_r50_rgb.pth.*pass that file"):
        TwoStreamExtractor.from_record(record, device="cpu")
