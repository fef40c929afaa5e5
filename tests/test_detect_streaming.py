"""`detect` on files as it runs on live sources: every decodable step kept, timestamps that
restart continued on the step clock, memory independent of the video's length."""
from __future__ import annotations

import numpy as np
import pytest
from detect_helpers import LiveServer, tiny_cache, tiny_checkpoint, to_mpegts
from extract_helpers import make_video

from vidpipe.core.errors import VidpipeError
from vidpipe.extractors.decode import VideoSource
from vidpipe.pipeline.cli import main
from vidpipe.pipeline.detect import detect
from vidpipe.pipeline.timeline import Timeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    _, store = tiny_cache(root, num_videos=2, duration_s=3.0)
    return tiny_checkpoint(root / "run" / "best.pt", store)


def decodable_steps(path, fps: float, chunk: int) -> int:
    """Steps a VideoSource yields before the file's damage stops it."""
    count = 0
    try:
        for _ in VideoSource(path, fps=fps, chunk=chunk):
            count += 1
    except VidpipeError:
        pass
    return count


def test_a_truncated_file_keeps_every_decodable_step_offline_as_live(checkpoint, tmp_path):
    # 10 s at 24 fps -> 40 steps of 0.25 s; cut at 60%: about 24 decodable steps, which is
    # not a multiple of the offline batch of 16 steps.
    whole = make_video(tmp_path / "whole.mkv", frames=240, fps=24, size=(96, 64))
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    expected = decodable_steps(cut, fps=12.0, chunk=3)
    assert 16 < expected < 40
    results = {}
    for live in (False, True):
        with pytest.raises(VidpipeError, match="truncated"):
            detect(cut, checkpoint, out=tmp_path / f"live{live}", live=live, picture=False)
        results[live] = Timeline.load(tmp_path / f"live{live}" / "cut.mkv.timeline.json")
    offline, live = results[False], results[True]
    assert len(offline.timestamps) == len(live.timestamps) == expected
    assert offline.metadata["ended_by"] == "error"
    np.testing.assert_allclose(offline.probs, live.probs, atol=1e-5)


def test_detect_refuses_a_video_over_the_pixel_budget_in_one_line(checkpoint, tmp_path, capsys):
    video = make_video(tmp_path / "big.mp4", frames=24, size=(96, 64))
    with pytest.raises(VidpipeError, match=r"big.mp4: declares 96x64 frames .* over the pixel budget"):
        detect(video, checkpoint, out=tmp_path / "api", max_pixels=96 * 64 - 1, picture=False)
    with pytest.raises(SystemExit) as exit_code:
        main(["detect", str(video), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "cli"),
              "--max-pixels", str(96 * 64 - 1), "--no-picture"])
    error = capsys.readouterr().err
    assert exit_code.value.code == 2 and error.startswith(f"error: {video}: declares 96x64 frames")
    assert error.count("\n") == 1
    (detection,) = detect(video, checkpoint, out=tmp_path / "ok", max_pixels=96 * 64, picture=False)
    assert len(detection.timeline.timestamps) == 4                  # 1 s: 4 steps of 0.25 s


@pytest.fixture(scope="module")
def restarted_ts(tmp_path_factory):
    """Two MPEG-TS segments (4 s and 3 s), each starting at pts 0, joined in one file."""
    folder = tmp_path_factory.mktemp("restart")
    parts = [to_mpegts(make_video(folder / f"{n}.mp4", frames=frames, size=(64, 48), seed=n),
                       folder / f"{n}.ts") for n, frames in ((1, 96), (2, 72))]
    joined = folder / "restarted.ts"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    return joined


def test_timestamps_that_restart_continue_on_the_step_clock_in_files_and_streams(
        checkpoint, restarted_ts, tmp_path):
    (from_file,) = detect(restarted_ts, checkpoint, out=tmp_path / "file", picture=False)
    with LiveServer([(restarted_ts.read_bytes(), "close")]) as server:
        (from_stream,) = detect(server.url, checkpoint, out=tmp_path / "stream", picture=False)
    for detection in (from_file, from_stream):
        timeline = detection.timeline
        assert detection.ended_by == "eof"
        np.testing.assert_allclose(timeline.timestamps, np.arange(28) * 0.25)   # 7 s: none dropped
        assert timeline.metadata["video"]["timestamp_restarts"] == [{"at_s": 4.0, "source_time_s": 0.0}]
    np.testing.assert_allclose(from_file.timeline.probs, from_stream.timeline.probs, atol=1e-5)
