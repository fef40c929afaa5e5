"""VideoSource: the sampling rule, decord == PyAV, fallback, bad files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extract_helpers import decode_all, make_audio_only, make_video, without_root_read_override
from vidpipe.extractors import decode
from vidpipe.extractors.decode import VideoSource
from vidpipe.core.errors import VidpipeError

VFR_PTS_MS = [0, 70, 110, 150, 190, 260, 300, 340, 410, 450, 490, 560, 600, 640, 710, 750,
              790, 860, 900, 940, 1010, 1050, 1090, 1160, 1200, 1240, 1310, 1350]

# name: (file, make_video arguments, declared end of the video in seconds)
VIDEOS = {
    "mp4-h264-30fps-odd-size": ("a.mp4", dict(frames=47, fps=30, size=(321, 199), pix_fmt="yuv444p"), 47 / 30),
    "webm-vp9-25fps": ("b.webm", dict(frames=40, fps=25, codec="libvpx-vp9"), 40 / 25),
    "avi-mpeg4-15fps": ("c.avi", dict(frames=30, fps=15, codec="mpeg4"), 30 / 15),
    "mkv-h264-vfr": ("d.mkv", dict(frames=len(VFR_PTS_MS), fps=30, pts_ms=VFR_PTS_MS), 1.35 + 0.033),
    "mp4-h264-vfr": ("e.mp4", dict(frames=len(VFR_PTS_MS), fps=30, pts_ms=VFR_PTS_MS), None),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {name: make_video(folder / file, **kwargs) for name, (file, kwargs, _) in VIDEOS.items()}


@pytest.mark.parametrize("name", [n for n, spec in VIDEOS.items() if spec[2] is not None])
def test_step_count_and_timestamps_follow_the_rule(videos, name):
    # 24 fps grid times k/24 before the declared end; floor(frames / 6) steps of 0.25 s.
    declared_end = VIDEOS[name][2]
    grid_frames = int(np.sum(np.arange(200) / 24 < declared_end - 1e-4))
    chunks = list(VideoSource(videos[name], fps=24, chunk=6))
    assert len(chunks) == grid_frames // 6
    np.testing.assert_array_equal([c.start for c in chunks], np.arange(len(chunks)) * 0.25)
    assert all(c.frames.shape == (6, *reversed(VIDEOS[name][1].get("size", (64, 48))), 3) for c in chunks)
    assert chunks[-1].end == pytest.approx((len(chunks) * 6 - 1) / 24)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("name", list(VIDEOS))
def test_each_output_frame_is_the_source_frame_on_screen(videos, name, backend):
    source_times, images = decode_all(videos[name])
    chunks = list(VideoSource(videos[name], fps=24, chunk=6, backend=backend))
    times = np.concatenate([c.times for c in chunks])
    np.testing.assert_array_equal(times, np.arange(len(times)) / 24)
    shown = np.searchsorted(source_times, times + 1e-4, side="right") - 1
    np.testing.assert_allclose(np.concatenate([c.source_times for c in chunks]), source_times[shown])
    frames = np.concatenate([c.frames for c in chunks])
    for frame, index in zip(frames, shown):
        np.testing.assert_array_equal(frame, images[index])


@pytest.mark.parametrize("name", list(VIDEOS))
def test_decord_and_pyav_give_the_same_frames(videos, name):
    by_decord = list(VideoSource(videos[name], backend="decord"))
    by_pyav = list(VideoSource(videos[name], backend="pyav"))
    assert len(by_decord) == len(by_pyav) > 0
    for a, b in zip(by_decord, by_pyav):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.times, b.times)


def test_vfr_frames_are_picked_by_presentation_time(videos):
    chunk = next(iter(VideoSource(videos["mkv-h264-vfr"], fps=24, chunk=6)))
    # grid 0, 41.7, 83.3, 125, 166.7, 208.3 ms; frames start at 0, 70, 110, 150, 190 ms
    np.testing.assert_allclose(chunk.source_times, [0, 0, 0.07, 0.11, 0.15, 0.19])


def test_other_rates_and_chunks(videos):
    chunks = list(VideoSource(videos["avi-mpeg4-15fps"], fps=10, chunk=4))
    assert len(chunks) == 5                                   # 2 s at 10 fps = 20 frames
    np.testing.assert_allclose([c.start for c in chunks], [0, 0.4, 0.8, 1.2, 1.6])


def test_auto_falls_back_to_pyav_when_decord_fails_midway(videos, monkeypatch):
    expected = list(VideoSource(videos["webm-vp9-25fps"], backend="pyav"))
    monkeypatch.setattr(decode, "BATCH_CHUNKS", 2)
    real_reader = decode.decord.VideoReader

    class FailingReader:  # decodes the first batch, then fails like a broken file would
        def __init__(self, *args, **kwargs):
            self.reader, self.calls = real_reader(*args, **kwargs), 0

        def __len__(self):
            return len(self.reader)

        def get_batch(self, indices):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("simulated decord failure")
            return self.reader.get_batch(indices)

    monkeypatch.setattr(decode.decord, "VideoReader", FailingReader)
    source = VideoSource(videos["webm-vp9-25fps"])
    chunks = list(source)
    assert source.backend_used == "pyav"
    assert [c.index for c in chunks] == list(range(len(expected)))
    for a, b in zip(chunks, expected):
        np.testing.assert_array_equal(a.frames, b.frames)
    with pytest.raises(VidpipeError, match="decord failed"):
        list(VideoSource(videos["webm-vp9-25fps"], backend="decord"))


# -- bad inputs ------------------------------------------------------------------------------
def bad_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Every bad-input kind: file -> the words its error must contain."""
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("not a video, just text\n" * 50)
    data = good.read_bytes()
    (folder / "truncated.mkv").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.mp4").write_bytes(os.urandom(4096) + data[4096:])
    make_audio_only(folder / "audio.mp4")
    return {
        "empty": (folder / "empty.mp4", "empty file"),
        "not a video": (folder / "notes.mp4", "not a video"),
        "truncated": (folder / "truncated.mkv", "truncated"),
        "corrupt": (folder / "corrupt.mp4", "corrupt"),
        "audio only": (folder / "audio.mp4", "audio only"),
        "missing": (folder / "missing.mp4", "file not found"),
        "folder": (folder, "not a regular file"),
    }


@pytest.fixture(scope="module")
def long_mkv(tmp_path_factory) -> Path:
    # 3 s of noisy frames: big enough that half the file is half the video
    return make_video(tmp_path_factory.mktemp("long") / "long.mkv", frames=72, size=(96, 64))


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, long_mkv, backend):
    for kind, (path, words) in bad_files(tmp_path, long_mkv).items():
        with pytest.raises(VidpipeError) as error:
            list(VideoSource(path, backend=backend))
        message = str(error.value)
        assert str(path) in message and words in message, (kind, message)
        assert "\n" not in message


def test_unreadable_file_raises_permission_error(tmp_path, long_mkv):
    locked = tmp_path / "locked.mkv"
    locked.write_bytes(long_mkv.read_bytes())
    locked.chmod(0)
    code = ("import sys\nfrom vidpipe.extractors.decode import VideoSource\nfrom vidpipe.core.errors import VidpipeError\n"
            f"try:\n    VideoSource({str(locked)!r})\nexcept VidpipeError as e:\n    print(e); sys.exit(3)\n")
    run = subprocess.run([*without_root_read_override(), sys.executable, "-c", code],
                         capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert f"{locked}: permission denied" in run.stdout


# -- live sources over a local socket --------------------------------------------------------
@pytest.fixture(scope="module")
def mpegts(tmp_path_factory) -> Path:
    from detect_helpers import to_mpegts

    folder = tmp_path_factory.mktemp("live")
    return to_mpegts(make_video(folder / "clip.mp4", frames=96, size=(64, 48)), folder / "clip.ts")


def test_a_stream_is_opened_once_and_decodes_like_the_file(mpegts):
    from detect_helpers import LiveServer

    expected = list(VideoSource(mpegts, backend="pyav"))
    # one scripted connection: a second open (a probe, then a decode) would be refused
    with LiveServer([(mpegts.read_bytes(), "close")]) as server:
        chunks = list(VideoSource(server.url))
    assert server.connections == 1
    assert len(chunks) == len(expected) == 16
    for a, b in zip(chunks, expected):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.times, b.times)


@pytest.mark.parametrize("ending, why", [("reset", "connection reset"), ("stall", "no data for 0.5 s")])
def test_a_stream_that_drops_raises_stream_lost_after_its_frames(mpegts, ending, why):
    from detect_helpers import LiveServer

    data = mpegts.read_bytes()
    chunks = []
    with LiveServer([(data[: len(data) // 2], ending)]) as server:
        with pytest.raises(decode.StreamLost) as error:
            for chunk in VideoSource(server.url, timeout_s=0.5):
                chunks.append(chunk)
    assert len(chunks) >= 4                            # what came before the drop was decoded
    assert str(error.value).startswith(f"{server.url}: stream failed at ")
    assert str(error.value).endswith(f"({why})")


@pytest.mark.parametrize("scheme", ["tcp", "rtsp"])
def test_a_refused_connection_is_named_as_such(scheme):
    from detect_helpers import free_port

    url = f"{scheme}://127.0.0.1:{free_port()}/cam"
    with pytest.raises(VidpipeError) as error:
        VideoSource(url)
    assert str(error.value) == f"{url}: cannot open the stream: connection refused"


# -- decompression bombs: the pixel budget ---------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_a_frame_size_over_the_pixel_budget_is_refused_from_the_header(videos, backend):
    path = videos["mp4-h264-30fps-odd-size"]                  # 321x199 = 63879 pixels
    with pytest.raises(VidpipeError) as error:
        VideoSource(path, backend=backend, max_pixels=321 * 199 - 1)
    message = str(error.value)
    assert message.startswith(f"{path}: declares 321x199 frames (0.1 MP), over the pixel budget")
    assert "\n" not in message and "max_pixels" in message
    assert len(list(VideoSource(path, backend=backend, max_pixels=321 * 199))) > 0   # at the budget: read


BOMB_SIDE = 4352   # 18.9 MP: over the default budget of 4096x4096 = 16.8 MP; 57 KB of H.264

OPEN_BOMB = """
import resource, sys
from vidpipe.extractors.decode import VideoSource
from vidpipe.core.errors import VidpipeError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    VideoSource(sys.argv[1], backend=sys.argv[2])
except VidpipeError as error:
    print(error)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A small file declaring frames over the default budget (black frames: tiny on disk)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.mp4"
    code = ("import av, sys\nwith av.open(sys.argv[1], 'w') as c:\n"
            "    s = c.add_stream('libx264', rate=1, options={'preset': 'ultrafast', 'crf': '51'})\n"
            f"    s.width = s.height = {BOMB_SIDE}\n    s.pix_fmt = 'yuv420p'\n"
            f"    f = av.VideoFrame({BOMB_SIDE}, {BOMB_SIDE}, 'yuv420p')\n"
            "    [p.update(bytes(p.buffer_size)) for p in f.planes]\n"
            "    c.mux(s.encode(f)); c.mux(s.encode())\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)   # the encoder's memory is its own
    assert path.stat().st_size < 200_000
    return path


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_a_decompression_bomb_is_refused_before_any_frame_is_decoded(bomb, backend):
    run = subprocess.run([sys.executable, "-c", OPEN_BOMB, str(bomb), backend],
                         capture_output=True, text=True, timeout=120)
    message, grown_mb = run.stdout.strip().splitlines()
    assert message == (f"{bomb}: declares {BOMB_SIDE}x{BOMB_SIDE} frames (18.9 MP), over the pixel "
                       "budget of 16.8 MP per frame: refused before decoding (a decompression bomb?); "
                       "for a genuine video this large raise max_pixels (extract: --set max_pixels=N, "
                       "detect: --max-pixels N)")
    # one declared frame is 28 MB as YUV 4:2:0 (57 MB as RGB): not even the probe decoded one
    assert int(grown_mb) < BOMB_SIDE * BOMB_SIDE * 1.5 / 2**20


def test_extract_reports_a_video_over_the_budget_with_the_bad_files(tmp_path):
    from extract_helpers import tiny_settings
    from vidpipe.pipeline.extract import extract_folder

    (tmp_path / "videos").mkdir()
    make_video(tmp_path / "videos" / "small.mp4", frames=24, size=(64, 48))
    big = make_video(tmp_path / "videos" / "big.mp4", frames=24, size=(96, 64))
    summary = extract_folder(tmp_path / "videos", tmp_path / "cache", tiny_settings(max_pixels=64 * 48),
                             device="cpu", progress=False)
    assert summary.extracted == ["small.mp4"]
    ((name, why),) = summary.failed
    assert name == "big.mp4" and why.startswith(f"{big}: declares 96x64 frames")


# -- timestamps that restart (an encoder or camera restarting, a looped stream) --------------
@pytest.fixture(scope="module")
def restarted_ts(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Two MPEG-TS segments (4 s and 3 s at 24 fps), each starting at pts 0, one after the
    other in one file -> (file, the frames of both in order)."""
    from detect_helpers import to_mpegts

    folder = tmp_path_factory.mktemp("restart")
    parts = [to_mpegts(make_video(folder / f"{n}.mp4", frames=frames, size=(64, 48), seed=n),
                       folder / f"{n}.ts") for n, frames in ((1, 96), (2, 72))]
    joined = folder / "restarted.ts"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    frames = [image for part in parts for image in decode_all(part)[1]]
    return joined, frames


def assert_continues_on_the_step_clock(chunks, frames) -> None:
    assert len(chunks) == 28                                   # 7 s of 0.25 s steps: none dropped
    np.testing.assert_array_equal([c.start for c in chunks], np.arange(28) * 0.25)
    decoded = np.concatenate([c.frames for c in chunks])      # 24 fps in, 24 fps out: frame by frame
    assert len(decoded) == len(frames)
    for got, expected in zip(decoded, frames):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_a_file_whose_timestamps_restart_continues_on_the_step_clock(restarted_ts, backend):
    path, frames = restarted_ts
    source = VideoSource(path, backend=backend)
    chunks = list(source)
    assert_continues_on_the_step_clock(chunks, frames)
    assert source.restarts == [{"at_s": 4.0, "source_time_s": 0.0}]


def test_a_live_stream_whose_timestamps_restart_continues_on_the_step_clock(restarted_ts):
    from detect_helpers import LiveServer

    path, frames = restarted_ts
    with LiveServer([(path.read_bytes(), "close")]) as server:
        source = VideoSource(server.url)
        chunks = list(source)
    assert_continues_on_the_step_clock(chunks, frames)
    assert source.restarts == [{"at_s": 4.0, "source_time_s": 0.0}]


def test_extract_keeps_every_step_of_a_file_whose_timestamps_restart_and_notes_it(restarted_ts, tmp_path):
    from extract_helpers import tiny_settings
    from vidpipe.pipeline.extract import extract_folder
    from vidpipe.store.cache import FeatureStore

    path, _ = restarted_ts
    summary = extract_folder(path, tmp_path / "cache", tiny_settings(), device="cpu", progress=False)
    assert summary.ok and summary.steps == 28
    store = FeatureStore.open(tmp_path / "cache")
    np.testing.assert_allclose(store.read("restarted.ts").timestamps, np.arange(28) * 0.25)
    assert store.attrs("restarted.ts")["timestamp_restarts"] == [{"at_s": 4.0, "source_time_s": 0.0}]
