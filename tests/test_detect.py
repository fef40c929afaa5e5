"""`vidpipe detect`: streamed detection equals the offline model; files, folders, errors."""
import json
import re
import shutil

import numpy as np
import pytest
from detect_helpers import tiny_cache, tiny_checkpoint

from vidpipe.malt.checkpoint import load_model
from vidpipe.malt.evaluate import predict_offline
from vidpipe.pipeline.cli import main
from vidpipe.pipeline.detect import detect
from vidpipe.core.errors import BatchIncomplete, VidpipeError
from vidpipe.store.cache import FeatureStore
from vidpipe.pipeline.timeline import Timeline, TimelineSettings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    data, store = tiny_cache(root)
    checkpoint = tiny_checkpoint(root / "run" / "best.pt", store)
    return data, store, checkpoint


def test_detect_equals_offline_forward_on_cached_features(setup, tmp_path):
    data, store, checkpoint = setup
    video = data.videos_dir / "synth_000.mp4"
    (detection,) = detect(video, checkpoint, out=tmp_path, cache=store.root, echo=lambda _: None)
    assert detection.timeline.metadata["video"]["cache_id"] == "synth_000.mp4"  # not re-decoded
    model, _ = load_model(checkpoint)
    features = store.read("synth_000.mp4")
    expected = predict_offline(model, features.rgb, features.flow)
    np.testing.assert_allclose(detection.timeline.probs, expected, atol=1e-5)
    np.testing.assert_array_equal(detection.timeline.timestamps, features.timestamps)


def test_live_stream_matches_cache_prints_events_and_writes_files(setup):
    data, store, checkpoint = setup
    lines = []
    settings = TimelineSettings(threshold=0.3, min_duration_s=0.25, merge_gap_s=0.25)
    (detection,) = detect(str(data.videos_dir / "synth_001.mp4"), checkpoint, live=True,
                          settings=settings, echo=lines.append)
    assert detection.timeline.metadata["video"]["features"] == "stream"
    cached = store.read("synth_001.mp4")
    model, _ = load_model(checkpoint)
    np.testing.assert_allclose(detection.timeline.probs,
                               predict_offline(model, cached.rgb, cached.flow), atol=1e-4)
    # outputs default next to the run folder
    out = checkpoint.parent / "detections"
    assert detection.files == {"json": out / "synth_001.mp4.timeline.json",
                               "csv": out / "synth_001.mp4.timeline.csv",
                               "png": out / "synth_001.mp4.timeline.png"}
    loaded = Timeline.load(detection.files["json"])
    assert loaded.segments == detection.timeline.segments
    assert loaded.metadata["timings"]["steps"] == len(cached)
    events = [l for l in lines if re.match(r"\d\d:\d\d:\d\d\.\d\d  (start|end  )  \w+  \d\.\d\d", l)]
    assert len(events) == 2 * len(detection.timeline.segments) > 0
    assert all("ms after the chunk's last frame" in l for l in events
               if " start " in l)


def test_folder_batch_skips_a_corrupt_file(setup, tmp_path):
    data, store, checkpoint = setup
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(data.videos_dir / "synth_000.mp4", folder / "good.mp4")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    lines = []
    with pytest.raises(BatchIncomplete, match="1 of 2 videos failed"):
        detect(folder, checkpoint, out=tmp_path / "out", cache=store.root, echo=lines.append)
    assert any("broken.mp4" in l and l.startswith("skipped") for l in lines)
    assert "1 failed:\n  " in "\n".join(lines) and "broken.mp4" in lines[-1]
    with pytest.raises(SystemExit) as info:   # the CLI: exit 1, as `extract` on a partial batch
        main(["detect", str(folder), "--checkpoint", str(checkpoint), "--cache", str(store.root),
              "--out", str(tmp_path / "cli"), "--no-picture"])
    assert info.value.code == 1
    assert "1 of 2 videos done" in "\n".join(lines)
    good = Timeline.load(tmp_path / "out" / "good.mp4.timeline.json")
    assert good.metadata["video"]["cache_id"] == "synth_000.mp4"
    assert (tmp_path / "out" / "good.mp4.timeline.png").stat().st_size > 0
    with pytest.raises(VidpipeError, match="broken.mp4"):
        detect(folder / "broken.mp4", checkpoint, out=tmp_path / "out", echo=lambda _: None)


def test_cache_with_other_settings_is_refused(setup, tmp_path):
    data, store, checkpoint = setup
    other = FeatureStore.open_or_create(tmp_path / "other", {**store.settings, "crop": 32})
    with pytest.raises(VidpipeError, match=r"other settings .* \(differs in: crop\)"):
        detect(data.videos_dir / "synth_000.mp4", checkpoint, cache=other.root)


def test_ctrl_c_writes_what_it_has(setup, tmp_path, monkeypatch):
    data, store, checkpoint = setup
    from vidpipe.malt.stream import OnlineDetector
    real_step, calls = OnlineDetector.step, []

    def step_then_interrupt(self, rgb, flow):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real_step(self, rgb, flow)

    monkeypatch.setattr(OnlineDetector, "step", step_then_interrupt)
    (detection,) = detect(data.videos_dir / "synth_000.mp4", checkpoint, out=tmp_path,
                          cache=store.root, echo=lambda _: None)
    assert detection.interrupted and len(detection.timeline.probs) == 10
    saved = json.loads(detection.files["json"].read_text())
    assert saved["metadata"]["interrupted"] and len(saved["probabilities"]) == 10


def test_cli(setup, tmp_path, capsys):
    data, store, checkpoint = setup
    main(["detect", str(data.videos_dir / "synth_000.mp4"), "--checkpoint", str(checkpoint),
          "--cache", str(store.root), "--out", str(tmp_path), "--no-picture",
          "--class-threshold", "Spin=0.4", "--min-duration", "0"])
    saved = json.loads((tmp_path / "synth_000.mp4.timeline.json").read_text())
    assert saved["settings"]["class_thresholds"] == {"Spin": 0.4}
    assert not (tmp_path / "synth_000.mp4.timeline.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", str(data.videos_dir / "synth_000.mp4"), "--checkpoint",
              str(checkpoint), "--class-threshold", "Jump=0.4"])
    assert exit_info.value.code == 2
    assert "unknown class 'Jump'" in capsys.readouterr().err


def test_imported_features_detect_by_cache_id_only(setup, tmp_path):
    data, store, checkpoint = setup
    features = store.read("synth_000.mp4")
    imported = FeatureStore.open_or_create(tmp_path / "imported",
                                           {"source": "precomputed", "step_seconds": 0.25})
    imported.write("video_test_0000004", features.rgb, features.flow, features.timestamps)
    from vidpipe.malt.checkpoint import read_checkpoint, save_checkpoint
    ckpt = read_checkpoint(checkpoint)
    ckpt.feature_settings = imported.settings
    save_checkpoint(ckpt, tmp_path / "run" / "best.pt")
    (detection,) = detect("video_test_0000004", tmp_path / "run" / "best.pt",
                          cache=imported.root, out=tmp_path, echo=lambda _: None)
    assert detection.files["json"] == tmp_path / "video_test_0000004.timeline.json"
    assert len(detection.timeline.probs) == len(features)
    with pytest.raises(VidpipeError, match="not made by `vidpipe extract`"):
        detect(data.videos_dir / "synth_001.mp4", tmp_path / "run" / "best.pt",
               out=tmp_path, echo=lambda _: None)


def test_unknown_cache_id_is_named(setup, tmp_path):
    _, store, checkpoint = setup
    with pytest.raises(VidpipeError, match="nocacheid: no such file, and no video of that id"):
        detect("nocacheid", checkpoint, out=tmp_path, cache=store.root, echo=lambda _: None)
