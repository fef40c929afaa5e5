"""`vidpipe detect`: streamed detection equals the offline model; files, folders, several
sources at once, events, rendering, the Python API, errors."""
import json
import logging
import os
import re
import shutil
import signal
import threading
import time

import av
import cv2
import numpy as np
import pytest
from detect_helpers import LiveServer, free_port, tiny_cache, tiny_checkpoint, to_mpegts

import vidpipe
from vidpipe.core.errors import BatchIncomplete, VidpipeError
from vidpipe.malt.checkpoint import load_model
from vidpipe.malt.evaluate import predict_offline
from vidpipe.pipeline.cli import main
from vidpipe.pipeline.detect import Detection, detect
from vidpipe.pipeline.render import MIN_HEIGHT, draw_overlay
from vidpipe.pipeline.timeline import Timeline, TimelineSettings
from vidpipe.store.cache import FeatureStore

EVENT_LINE = r"(\S+  )?\d\d:\d\d:\d\d\.\d\d  (start|end  )  \w+  \d\.\d\d"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    data, store = tiny_cache(root)
    checkpoint = tiny_checkpoint(root / "run" / "best.pt", store)
    return data, store, checkpoint


@pytest.fixture
def lines(caplog):
    """The log lines detect writes (what the CLI prints)."""
    caplog.set_level(logging.DEBUG, logger="vidpipe")
    return lambda: [r.getMessage() for r in caplog.records]


def offline(checkpoint, store, video_id):
    model, _ = load_model(checkpoint)
    features = store.read(video_id)
    return predict_offline(model, features.rgb, features.flow)


def test_detect_equals_offline_forward_on_cached_features(setup, tmp_path):
    data, store, checkpoint = setup
    video = data.videos_dir / "synth_000.mp4"
    (detection,) = detect(video, checkpoint, out=tmp_path, cache=store.root)
    assert detection.timeline.metadata["video"]["cache_id"] == "synth_000.mp4"  # not re-decoded
    assert detection.ended_by == "eof" and detection.timeline.metadata["ended_by"] == "eof"
    np.testing.assert_allclose(detection.timeline.probs, offline(checkpoint, store, "synth_000.mp4"),
                               atol=1e-5)
    np.testing.assert_array_equal(detection.timeline.timestamps, store.read("synth_000.mp4").timestamps)


def test_live_stream_matches_cache_prints_events_and_writes_files(setup, lines):
    data, store, checkpoint = setup
    settings = TimelineSettings(threshold=0.3, min_duration_s=0.25, merge_gap_s=0.25)
    (detection,) = detect(str(data.videos_dir / "synth_001.mp4"), checkpoint, live=True,
                          settings=settings)
    assert detection.timeline.metadata["video"]["features"] == "stream"
    np.testing.assert_allclose(detection.timeline.probs, offline(checkpoint, store, "synth_001.mp4"),
                               atol=1e-4)
    # outputs default next to the run folder
    out = checkpoint.parent / "detections"
    assert detection.files == {"json": out / "synth_001.mp4.timeline.json",
                               "csv": out / "synth_001.mp4.timeline.csv",
                               "png": out / "synth_001.mp4.timeline.png"}
    loaded = Timeline.load(detection.files["json"])
    assert loaded.segments == detection.timeline.segments
    assert loaded.metadata["timings"]["steps"] == len(store.read("synth_001.mp4"))
    events = [line for line in lines() if re.match(EVENT_LINE, line)]
    assert len(events) == 2 * len(detection.timeline.segments) > 0
    assert all("ms after the chunk's last frame" in line for line in events if " start " in line)


def test_several_sources_at_once_one_failing(setup, tmp_path, lines):
    """Two videos decoded together through one batched detector (each equal to the offline
    model), one from the cache, a broken one and a missing one: both reported, exit 1."""
    data, store, checkpoint = setup
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    videos = [str(data.videos_dir / "synth_000.mp4"), str(data.videos_dir / "synth_001.mp4")]
    events = tmp_path / "events.jsonl"
    with pytest.raises(BatchIncomplete, match="2 of 4 sources failed"):
        detect([*videos, str(broken), str(tmp_path / "missing.mp4")], checkpoint,
               out=tmp_path / "out", live=True, picture=False, events=events)
    for name in ("synth_000.mp4", "synth_001.mp4"):
        timeline = Timeline.load(tmp_path / "out" / f"{name}.timeline.json")
        assert timeline.metadata["ended_by"] == "eof"
        np.testing.assert_allclose(timeline.probs, offline(checkpoint, store, name), atol=1e-4)
    assert not (tmp_path / "out" / "broken.mp4.timeline.json").exists()
    log = "\n".join(lines())
    assert "2 failed:\n  " in log and "broken.mp4: not a video" in log and "missing.mp4: file not found" in log
    printed = [line for line in lines() if re.match(EVENT_LINE, line)]
    assert printed and all(line.split()[0] in ("synth_000.mp4", "synth_001.mp4") for line in printed)
    written = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(written) == len(printed)
    with pytest.raises(SystemExit) as info:   # the CLI: several sources, exit 1
        main(["detect", *videos, str(broken), "--checkpoint", str(checkpoint),
              "--cache", str(store.root), "--out", str(tmp_path / "cli"), "--no-picture"])
    assert info.value.code == 1
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.json")) == [
        "synth_000.mp4.timeline.json", "synth_001.mp4.timeline.json"]


def test_events_file_schema_one_object_per_decision(setup, tmp_path):
    data, store, checkpoint = setup
    events = tmp_path / "events.jsonl"
    settings = TimelineSettings(threshold=0.3, min_duration_s=0.25, merge_gap_s=0.25)
    (detection,) = detect(data.videos_dir / "synth_000.mp4", checkpoint, out=tmp_path,
                          cache=store.root, settings=settings, events=events)
    written = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(written) == 2 * len(detection.timeline.segments) > 0
    assert set(written[0]) == {"source", "event", "class", "video_time_s", "wall_time", "score",
                               "threshold", "latency_ms", "step"}
    assert all(e["score"] >= e["threshold"] for e in written if e["event"] == "start")
    assert [(e.kind, e.label, round(e.time_s, 4)) for e in detection.timeline.events] == [
        (e["event"], e["class"], e["video_time_s"]) for e in written]   # the timeline keeps them
    starts = sorted((e["class"], e["video_time_s"]) for e in written if e["event"] == "start")
    ends = sorted((e["class"], e["video_time_s"]) for e in written if e["event"] == "end")
    segments = detection.timeline.segments
    assert starts == sorted((s.label, round(s.start_s, 4)) for s in segments)
    assert ends == sorted((s.label, round(s.end_s, 4)) for s in segments)
    assert all(e["source"] == str(data.videos_dir / "synth_000.mp4") for e in written)
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", e["wall_time"]) for e in written)
    assert all(e["latency_ms"] is None or e["latency_ms"] >= 0 for e in written)


def test_render_draws_every_frame_of_every_step(setup, tmp_path):
    data, store, checkpoint = setup
    out = tmp_path / "review.mp4"
    (detection,) = detect(data.videos_dir / "synth_000.mp4", checkpoint, out=tmp_path,
                          cache=store.root, render=out, picture=False)
    assert detection.files["render"] == out
    assert detection.timeline.metadata["video"]["features"] == "stream"   # render decodes
    chunk = store.settings["chunk"]
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == chunk * len(detection.timeline.timestamps)
    assert frames[0].shape[0] >= MIN_HEIGHT
    # the first frame is the source's first frame with step 0's decision drawn (no segment
    # announced yet), up to H.264's loss; the plain enlarged frame is much further off
    with av.open(str(data.videos_dir / "synth_000.mp4")) as container:
        source = next(container.decode(video=0)).to_ndarray(format="rgb24")
    names = detection.timeline.class_names
    drawn = draw_overlay(source, 0.0, detection.timeline.probs[0], names, [])
    plain = cv2.resize(source, drawn.shape[1::-1])
    error = np.abs(frames[0].astype(float) - drawn).mean()
    assert error < 4 and np.abs(frames[0].astype(float) - plain).mean() > 3 * error
    several = detect([data.videos_dir / "synth_000.mp4", data.videos_dir / "synth_001.mp4"],
                     checkpoint, out=tmp_path, render=out, picture=False)
    assert [d.files["render"].name for d in several] == ["synth_000.mp4.review.mp4",
                                                          "synth_001.mp4.review.mp4"]


def test_python_api_detector(setup, tmp_path):
    data, store, checkpoint = setup
    detector = vidpipe.Detector.from_checkpoint(checkpoint, device="cpu")
    features = store.read("synth_000.mp4")
    rows = np.stack([detector.step(r, f) for r, f in zip(features.rgb, features.flow)])
    np.testing.assert_allclose(rows, offline(checkpoint, store, "synth_000.mp4"), atol=1e-5)
    detection = detector.run(data.videos_dir / "synth_001.mp4", out=tmp_path, cache=store.root,
                             picture=False)
    assert isinstance(detection, Detection) and detection.ended_by == "eof"
    np.testing.assert_allclose(detection.timeline.probs, offline(checkpoint, store, "synth_001.mp4"),
                               atol=1e-5)
    detector.restart()   # its own stream starts again; the run's stream did not disturb it
    np.testing.assert_allclose(detector.step(features.rgb[0], features.flow[0]), rows[0], atol=1e-5)
    # --int8: the same detector with dynamic int8 linear layers, close to fp32, not equal
    int8 = vidpipe.Detector.from_checkpoint(checkpoint, device="cpu", int8=True)
    quantised = np.stack([int8.step(r, f) for r, f in zip(features.rgb, features.flow)])
    assert 0 < np.abs(quantised - rows).max() < 0.1


def test_cache_with_other_settings_is_refused(setup, tmp_path):
    data, store, checkpoint = setup
    other = FeatureStore.open_or_create(tmp_path / "other", {**store.settings, "crop": 32})
    with pytest.raises(VidpipeError, match=r"other settings .* \(differs in: crop\)"):
        detect(data.videos_dir / "synth_000.mp4", checkpoint, cache=other.root)


def test_folder_and_a_bad_single_file(setup, tmp_path, lines):
    data, store, checkpoint = setup
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(data.videos_dir / "synth_000.mp4", folder / "good.mp4")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with pytest.raises(BatchIncomplete, match="1 of 2 sources failed"):
        detect(folder, checkpoint, out=tmp_path / "out", cache=store.root)
    assert "1 of 2 sources done" in "\n".join(lines())
    good = Timeline.load(tmp_path / "out" / "good.mp4.timeline.json")
    assert good.metadata["video"]["cache_id"] == "synth_000.mp4"
    assert (tmp_path / "out" / "good.mp4.timeline.png").stat().st_size > 0
    with pytest.raises(VidpipeError, match="broken.mp4: not a video"):
        detect(folder / "broken.mp4", checkpoint, out=tmp_path / "out")


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
                          cache=imported.root, out=tmp_path)
    assert detection.files["json"] == tmp_path / "video_test_0000004.timeline.json"
    assert len(detection.timeline.probs) == len(features)
    with pytest.raises(VidpipeError, match="not made by `vidpipe extract`"):
        detect(data.videos_dir / "synth_001.mp4", tmp_path / "run" / "best.pt", out=tmp_path)


def test_unknown_cache_id_is_named(setup, tmp_path):
    _, store, checkpoint = setup
    with pytest.raises(VidpipeError, match="nocacheid: no such file, and no video of that id"):
        detect("nocacheid", checkpoint, out=tmp_path, cache=store.root)


# --- live sources that end badly (a local TCP server sending MPEG-TS) ----------------------

@pytest.fixture(scope="module")
def live(setup, tmp_path_factory):
    """(MPEG-TS bytes of a synthetic video, its features, the offline model's probabilities)."""
    data, store, checkpoint = setup
    ts = to_mpegts(data.videos_dir / "synth_001.mp4", tmp_path_factory.mktemp("live") / "clip.ts")
    detector = vidpipe.Detector.from_checkpoint(checkpoint, device="cpu")
    rgb, flow, _ = detector.extractor({}).extract(ts)
    return ts.read_bytes(), rgb, flow


def test_a_stream_reset_keeps_every_decided_step(setup, live, tmp_path):
    _, _, checkpoint = setup
    data, rgb, flow = live
    events = tmp_path / "events.jsonl"
    with LiveServer([(data[: len(data) // 2], "reset")]) as server:
        with pytest.raises(VidpipeError, match=r"stream failed at .* \(connection reset\) \(the \d+ "
                                               r"steps decided before are in .*timeline.json\)"):
            detect(server.url, checkpoint, out=tmp_path, events=events, picture=False)
    (saved,) = tmp_path.glob("*.timeline.json")
    timeline = Timeline.load(saved)
    assert timeline.metadata["ended_by"] == "error"
    assert "connection reset" in timeline.metadata["error"]
    steps = len(timeline.timestamps)
    assert 4 <= steps < len(rgb)
    model, _ = load_model(checkpoint)
    np.testing.assert_allclose(timeline.probs, predict_offline(model, rgb[:steps], flow[:steps]),
                               atol=1e-4)
    starts = {(e["class"], e["video_time_s"]) for e in map(json.loads, events.read_text().splitlines())
              if e["event"] == "start"}
    assert starts == {(s.label, round(s.start_s, 4)) for s in timeline.segments}


def test_a_stream_that_drops_does_not_stop_the_other_sources(setup, live, tmp_path):
    data_set, store, checkpoint = setup
    data, rgb, flow = live
    video = str(data_set.videos_dir / "synth_000.mp4")
    with LiveServer([(data[: len(data) // 2], "reset")]) as server:
        with pytest.raises(BatchIncomplete, match="1 of 2 sources failed"):
            detect([server.url, video], checkpoint, out=tmp_path, picture=False)
    stream = Timeline.load(next(tmp_path.glob("127.0.0.1*.timeline.json")))
    assert stream.metadata["ended_by"] == "error" and 4 <= len(stream.timestamps) < len(rgb)
    model, _ = load_model(checkpoint)
    steps = len(stream.timestamps)
    np.testing.assert_allclose(stream.probs, predict_offline(model, rgb[:steps], flow[:steps]),
                               atol=1e-4)
    file = Timeline.load(tmp_path / "synth_000.mp4.timeline.json")
    assert file.metadata["ended_by"] == "eof"
    # decoded by PyAV as the steps are taken (flat memory), the cache by `extract`'s decord:
    # the same frames, so the same features
    assert file.metadata["video"]["decoder"] == "pyav"
    np.testing.assert_allclose(file.probs, offline(checkpoint, store, "synth_000.mp4"), atol=1e-4)


def test_reconnect_continues_the_stream_with_the_detector_state(setup, live, tmp_path):
    _, _, checkpoint = setup
    data, rgb, flow = live
    with LiveServer([(data[: len(data) // 2], "reset"), (data, "close")]) as server:
        (detection,) = detect(server.url, checkpoint, out=tmp_path, picture=False, reconnect=2)
    assert server.connections == 2
    timeline = detection.timeline
    assert detection.ended_by == "eof" and timeline.metadata["error"] is None
    (reconnect,) = timeline.metadata["reconnects"]
    before = round(reconnect["at_s"] / 0.25)
    assert 4 <= before < len(rgb) and "connection reset" in reconnect["error"]
    # one stream: the step grid continues, and the model saw the steps before the drop
    np.testing.assert_allclose(timeline.timestamps, np.arange(before + len(rgb)) * 0.25)
    model, _ = load_model(checkpoint)
    expected = predict_offline(model, np.concatenate([rgb[:before], rgb]),
                               np.concatenate([flow[:before], flow]))
    np.testing.assert_allclose(timeline.probs, expected, atol=1e-4)


def test_ctrl_c_on_a_stalled_stream_writes_the_timeline_and_exits_130(setup, live, tmp_path,
                                                                       lines):
    _, _, checkpoint = setup
    data, rgb, _ = live

    def interrupt_after_the_first_event():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(" start " in line for line in lines()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    with LiveServer([(data[: len(data) // 2], "stall")]) as server:
        threading.Thread(target=interrupt_after_the_first_event, daemon=True).start()
        with pytest.raises(SystemExit) as info:
            main(["detect", server.url, "--checkpoint", str(checkpoint), "--out", str(tmp_path),
                  "--live", "--no-picture", "--timeout", "60"])
    assert info.value.code == 130
    (saved,) = tmp_path.glob("*.timeline.json")
    timeline = Timeline.load(saved)
    assert timeline.metadata["ended_by"] == "interrupt"
    assert 1 <= len(timeline.timestamps) < len(rgb) and timeline.segments


def test_a_refused_rtsp_source_says_so(setup, tmp_path, capsys):
    _, _, checkpoint = setup
    url = f"rtsp://127.0.0.1:{free_port()}/cam"
    with pytest.raises(SystemExit) as info:
        main(["detect", url, "--checkpoint", str(checkpoint), "--out", str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {url}: cannot open the stream: connection refused\n"
    assert not list(tmp_path.iterdir())
