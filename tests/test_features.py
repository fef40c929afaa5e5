"""TwoStreamExtractor: determinism, records, weights, flow conventions, streaming."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from extract_helpers import frame_image, make_video, tiny_settings
from vidpipe.extractors import backbone
from vidpipe.extractors.decode import VideoSource
from vidpipe.extractors.features import FeatureSettings, TwoStreamExtractor
from vidpipe.extractors.flow import FlowStream, OpenCVFlow, RAFTFlow, flow_to_input
from vidpipe.core.config import load_config
from vidpipe.core.errors import VidpipeError


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=36, fps=24, size=(80, 60))


@pytest.fixture(scope="module")
def extractor():
    return TwoStreamExtractor(tiny_settings(), device="cpu")


def test_extract_shapes_and_timestamps(extractor, clip):
    rgb, flow, timestamps = extractor.extract(clip)
    assert rgb.shape == (6, 512) and flow.shape == (6, 512)
    assert rgb.dtype == flow.dtype == np.float32 and np.isfinite(rgb).all() and np.isfinite(flow).all()
    np.testing.assert_array_equal(timestamps, np.arange(6) * 0.25)
    assert not np.allclose(rgb[0], rgb[1]) and not np.allclose(flow[0], flow[1])


def test_random_init_features_are_deterministic_and_seeded(extractor, clip):
    again = TwoStreamExtractor(tiny_settings(), device="cpu").extract(clip)
    for first, second in zip(extractor.extract(clip), again):
        np.testing.assert_array_equal(first, second)
    other_seed = TwoStreamExtractor(tiny_settings(seed=7), device="cpu").extract(clip)
    assert not np.allclose(other_seed[0], again[0])


def test_stream_yields_steps_with_times_equal_to_extract(extractor, clip):
    rgb, flow, timestamps = extractor.extract(clip)
    steps = list(extractor.stream(VideoSource(clip), batch_size=1))
    assert [s.index for s in steps] == list(range(6))
    np.testing.assert_array_equal([s.timestamp for s in steps], timestamps)
    np.testing.assert_allclose([s.end_time for s in steps], timestamps + 5 / 24)
    # batch size changes only float rounding
    np.testing.assert_allclose(np.stack([s.rgb for s in steps]), rgb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.stack([s.flow for s in steps]), flow, rtol=1e-4, atol=1e-5)


def test_prepared_chunks_of_several_sources_embed_as_each_source_streamed_alone(extractor, clip, tmp_path):
    """Live sources: per-source work (`prepare`) in each source's thread, the networks once
    per round over all of them (`embed`), sources of another size in their own batch."""
    videos = [clip, make_video(tmp_path / "b.mp4", frames=36, size=(80, 60), seed=3),
              make_video(tmp_path / "c.mp4", frames=36, size=(96, 60), seed=5)]
    alone = [list(extractor.stream(VideoSource(v), batch_size=1)) for v in videos]
    rounds = zip(*(extractor.source(v).chunks() for v in videos))      # one chunk per source
    batched = [extractor.embed([extractor.prepare(chunk) for chunk in chunks]) for chunks in rounds]
    assert len(batched) == 6
    for source, steps in enumerate(alone):
        for name in ("rgb", "flow"):
            together = np.stack([features[name == "flow"][source] for features in batched])
            np.testing.assert_allclose(together, np.stack([getattr(s, name) for s in steps]), atol=1e-5, rtol=0)
    assert not np.allclose(batched[0][0][0], batched[0][0][1])         # the sources differ


def test_settings_record_describes_the_features(extractor):
    record = extractor.settings_record()
    assert record["step_seconds"] == 0.25 and record["fps"] == 24.0 and record["chunk"] == 6
    assert record["rgb_dim"] == record["flow_dim"] == 512
    assert record["rgb_weights"] == "random-init seed 0" and record["flow_weights"] == "random-init seed 1"
    assert record["flow_method"] == "dis" and record["dis_preset"] == "medium"
    assert "batch_size" not in record and "decoder" not in record   # speed knobs, not features


def test_from_record_rebuilds_the_same_extractor(extractor, clip):
    rebuilt = TwoStreamExtractor.from_record(extractor.settings_record(), device="cpu")
    assert rebuilt.settings_record() == extractor.settings_record()
    np.testing.assert_array_equal(rebuilt.extract(clip)[1], extractor.extract(clip)[1])
    record = {**extractor.settings_record(), "rgb_dim": 2048}
    with pytest.raises(VidpipeError, match="rgb_dim"):
        TwoStreamExtractor.from_record(record, device="cpu")
    # a weights file for features made without one (detect --rgb-weights) was silently ignored
    with pytest.raises(VidpipeError, match=r"^x.pth: the rgb features of this model were made without "
                                           r"a weights file \(random-init seed 0\); leave out --rgb-weights"):
        TwoStreamExtractor.from_record(extractor.settings_record(), device="cpu", rgb_weights="x.pth")
    with pytest.raises(VidpipeError, match=r"^missing.pth: weights file not found"):
        TwoStreamExtractor.from_record({**extractor.settings_record(), "rgb_weights": "file r.pth sha256:ab"},
                                       device="cpu", rgb_weights="missing.pth")


def test_default_config_file_equals_the_defaults():
    assert load_config(FeatureSettings, "configs/extract.yaml") == FeatureSettings()


def test_auto_flow_is_dis_on_cpu_and_says_so(caplog):
    with caplog.at_level("INFO", logger="vidpipe"):
        assert TwoStreamExtractor(tiny_settings(flow_method="auto"), device="cpu").flow_method == "dis"
    assert "--flow auto uses DIS on the CPU" in caplog.text


def test_tvl1_on_cpu_announces_its_expected_time(caplog):
    with caplog.at_level("WARNING", logger="vidpipe"):
        TwoStreamExtractor(tiny_settings(flow_method="tvl1"), device="cpu")
    line = [r.getMessage() for r in caplog.records if "TV-L1" in r.getMessage()]
    assert len(line) == 1 and "s per frame pair at 75x56" in line[0] and "slower than real time" in line[0]


def test_rgb_preprocessing_follows_the_timm_pretrained_config():
    """A 0.5-mean model (test_resnet.r160_in1k: mean/std 0.5, 160 px, crop_pct 0.95, bilinear)
    is normalised with its own constants and sized from its config; no weights are downloaded."""
    extractor = TwoStreamExtractor(tiny_settings(rgb_backbone="test_resnet.r160_in1k", resize=None, crop=None),
                                   device="cpu")
    assert torch.allclose(extractor.rgb.mean.flatten(), torch.full((3,), 127.5))
    assert torch.allclose(extractor.rgb.std.flatten(), torch.full((3,), 127.5))
    assert (extractor.resize, extractor.crop, extractor.interpolation) == (168, 160, "bilinear")
    record = extractor.settings_record()
    assert "mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5]" in record["rgb_input"] and record["crop"] == 160
    imagenet = TwoStreamExtractor(tiny_settings(), device="cpu").settings_record()["rgb_input"]
    assert "mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225]" in imagenet


def test_bad_settings_are_user_errors():
    with pytest.raises(VidpipeError, match="flow_fields"):
        tiny_settings(flow_fields=6).validate()
    with pytest.raises(VidpipeError, match="crop"):
        tiny_settings(crop=300).validate()
    with pytest.raises(VidpipeError, match="not a timm model"):
        TwoStreamExtractor(tiny_settings(rgb_backbone="resnet_does_not_exist"), device="cpu")


# -- weights ---------------------------------------------------------------------------------
def test_weights_file_loads_and_is_recorded_by_sha256(tmp_path, clip):
    source = timm.create_model("resnet18", num_classes=10)    # a classifier checkpoint
    torch.save(source.state_dict(), tmp_path / "rgb.pth")
    extractor = TwoStreamExtractor(tiny_settings(random_init=False, rgb_weights=str(tmp_path / "rgb.pth"),
                                                 flow_weights=str(tmp_path / "rgb.pth")), device="cpu")
    loaded = extractor.rgb.backbone.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, source.state_dict()[key])
    record = extractor.settings_record()
    assert record["rgb_weights"] == f"file rgb.pth sha256:{backbone.file_sha256(tmp_path / 'rgb.pth')}"
    # cross-modality init, done by timm: RGB filters tiled over the 10 flow channels, scaled 3/10
    conv = source.conv1.weight                                 # (64, 3, 7, 7)
    flow_conv = extractor.flow.backbone.conv1.weight           # (64, 10, 7, 7)
    torch.testing.assert_close(flow_conv[:, :3], conv * 3 / 10)
    torch.testing.assert_close(flow_conv[:, 3:6], flow_conv[:, :3])
    # a record made with a file needs that file back
    with pytest.raises(VidpipeError, match="came from a file"):
        TwoStreamExtractor.from_record(record, device="cpu")
    rebuilt = TwoStreamExtractor.from_record(record, device="cpu", rgb_weights=str(tmp_path / "rgb.pth"),
                                             flow_weights=str(tmp_path / "rgb.pth"))
    np.testing.assert_array_equal(rebuilt.extract(clip)[0], extractor.extract(clip)[0])


def test_flow_network_weights_with_flow_channels_load_unchanged(tmp_path):
    flow_net = timm.create_model("resnet18", num_classes=0, in_chans=10)
    torch.save(flow_net.state_dict(), tmp_path / "flow.pth")
    stream = FlowStream(OpenCVFlow("dis"), "resnet18", fields=5, crop=48, weights_file=str(tmp_path / "flow.pth"))
    torch.testing.assert_close(stream.backbone.conv1.weight, flow_net.conv1.weight)


def test_wrong_weights_file_is_a_user_error(tmp_path):
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(VidpipeError, match="r34.pth: weights do not fit"):
        TwoStreamExtractor(tiny_settings(random_init=False, rgb_weights=str(tmp_path / "r34.pth")), device="cpu")
    with pytest.raises(VidpipeError, match="weights file not found"):
        TwoStreamExtractor(tiny_settings(random_init=False, rgb_weights=str(tmp_path / "nope.pth")), device="cpu")


def test_pretrained_request_offline_fails_with_a_one_line_hint(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(backbone, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(VidpipeError) as error:
        TwoStreamExtractor(tiny_settings(random_init=False), device="cpu")
    message = str(error.value)
    assert "resnet18" in message and "--rgb-weights PATH" in message and "--random-init" in message
    assert "\n" not in message


# -- flow ------------------------------------------------------------------------------------
def shifted_pair(shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured (1, 3, 64, 80) frame and the same content moved `shift` px to the right."""
    first = torch.from_numpy(frame_image(0, 80, 64).astype(np.float32)).permute(2, 0, 1)[None]
    return first, torch.roll(first, shifts=shift, dims=3)


@pytest.mark.parametrize("method", ["tvl1", "dis"])
def test_opencv_flow_measures_a_known_shift(method):
    first, second = shifted_pair(3)                       # content moves 3 px right
    flow = OpenCVFlow(method)(first, second)              # (1, 2, h, w)
    assert flow.shape == (1, 2, 64, 80)
    centre = flow[0, :, 16:48, 16:64]
    assert centre[0].median().item() == pytest.approx(3.0, abs=0.3)
    assert centre[1].median().item() == pytest.approx(0.0, abs=0.3)


def test_one_opencv_flow_serves_threads_at_once_as_one_thread():
    """detect's source workers share the extractor: each thread gets its own OpenCV estimator
    (one DIS object called from two threads at once crashed the process)."""
    from concurrent.futures import ThreadPoolExecutor

    flow = OpenCVFlow("dis")
    pairs = [shifted_pair(shift) for shift in (1, 2, 3, 4)] * 8
    alone = [flow(first, second) for first, second in pairs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda pair: flow(*pair), pairs))
    for expected, got in zip(alone, together):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_raft_runs_on_cpu_on_tiny_frames(clip):
    raft = RAFTFlow("raft_small", iterations=2, weights_file=None, random_init=True, seed=2)
    first, second = shifted_pair(2)
    flow = raft(first[..., :60, :70], second[..., :60, :70])
    assert flow.shape == (1, 2, 60, 70) and torch.isfinite(flow).all()
    extractor = TwoStreamExtractor(tiny_settings(flow_method="raft", raft_model="raft_small",
                                                 raft_iterations=2), device="cpu")
    assert extractor.settings_record()["flow_estimator"].startswith("torchvision raft_small iterations 2")
    first_run = extractor.extract(clip)[1]
    np.testing.assert_array_equal(first_run, extractor.extract(clip)[1])


def test_flow_input_is_clipped_and_scaled_like_tsn():
    flow = torch.tensor([-50.0, -20.0, 0.0, 20.0, 50.0])
    expected = (np.array([0, 0, 127.5, 255, 255]) - 128) / 128
    np.testing.assert_allclose(flow_to_input(flow).numpy(), expected, atol=1e-6)


def test_too_short_video_is_a_user_error(tmp_path, extractor):
    short = make_video(tmp_path / "short.mp4", frames=4, fps=24)
    with pytest.raises(VidpipeError, match="short.mp4: too short"):
        extractor.extract(short)
