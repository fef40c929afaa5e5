"""extract_folder / `vidpipe extract`: cache contents, skip and update, bad files, kill and
resume, workers, sharding, flat memory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from extract_helpers import TINY, make_audio_only, make_video, tiny_settings, without_root_read_override
from vidpipe.extractors.features import TwoStreamExtractor
from vidpipe.core.errors import VidpipeError
from vidpipe.pipeline.extract import extract_folder, find_videos, load_settings
from vidpipe.store.cache import FeatureStore

REPO = Path(__file__).resolve().parents[1]
TINY_OPTIONS = ["--flow", "dis", "--rgb-backbone", "resnet18", "--flow-backbone", "resnet18",
                "--random-init", "--set", f"resize={TINY['resize']}", "--set", f"crop={TINY['crop']}",
                "--no-progress"]


def cli(*args: str, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", "vidpipe.pipeline.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=env)


def cli_popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vidpipe.pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture()
def videos(tmp_path) -> Path:
    folder = tmp_path / "videos"
    (folder / "sub dir").mkdir(parents=True)
    make_video(folder / "one.mp4", frames=36, fps=24)                           # 6 steps
    make_video(folder / "sub dir" / "two.webm", frames=50, fps=25, codec="libvpx-vp9")  # 8 steps
    make_video(folder / "three.avi", frames=30, fps=30, codec="mpeg4", seed=3)  # 4 steps
    (folder / "notes.txt").write_text("not a video extension: ignored")
    return folder


def cache_arrays(root: Path) -> dict[str, tuple[np.ndarray, ...]]:
    store = FeatureStore.open(root)
    return {vid: (f.rgb, f.flow, f.timestamps) for vid in store.video_ids() for f in [store.read(vid)]}


def assert_same_caches(a: Path, b: Path) -> None:
    first, second = cache_arrays(a), cache_arrays(b)
    assert sorted(first) == sorted(second)
    for vid in first:
        for x, y in zip(first[vid], second[vid]):
            np.testing.assert_array_equal(x, y)


def test_extract_folder_writes_every_video_with_its_attributes(videos, tmp_path):
    summary = extract_folder(videos, tmp_path / "cache", tiny_settings(), device="cpu", progress=False)
    assert summary.ok and sorted(summary.extracted) == ["one.mp4", "sub dir/two.webm", "three.avi"]
    assert summary.steps == 6 + 8 + 4
    store = FeatureStore.open(tmp_path / "cache")
    assert store.video_ids() == ["one.mp4", "sub_dir__two.webm", "three.avi"]
    extractor = TwoStreamExtractor(tiny_settings(), device="cpu")
    assert store.settings == json.loads(json.dumps(extractor.settings_record()))
    features = store.read("sub_dir__two.webm")
    rgb, flow, timestamps = extractor.extract(videos / "sub dir" / "two.webm")
    np.testing.assert_array_equal(features.rgb, rgb)
    np.testing.assert_array_equal(features.flow, flow)
    np.testing.assert_array_equal(features.timestamps, np.arange(8) * 0.25)
    attrs = features.attrs
    assert attrs["source_path"] == "sub dir/two.webm"
    assert attrs["source_size"] == (videos / "sub dir" / "two.webm").stat().st_size
    assert attrs["fingerprint"].startswith("size-head-tail-sha256:")
    assert attrs["duration"] == pytest.approx(2.0) and attrs["native_fps"] == pytest.approx(25.0)
    assert attrs["versions"]["torch"] and attrs["decoder"] in ("decord", "pyav")


def test_rerun_skips_cached_videos_and_updates_changed_files(videos, tmp_path):
    extract_folder(videos, tmp_path / "cache", tiny_settings(), device="cpu", progress=False)
    before = cache_arrays(tmp_path / "cache")
    again = extract_folder(videos, tmp_path / "cache", tiny_settings(), device="cpu", progress=False)
    assert again.extracted == [] and len(again.skipped) == 3
    make_video(videos / "one.mp4", frames=36, fps=24, seed=9)                  # the file changes
    update = extract_folder(videos, tmp_path / "cache", tiny_settings(), device="cpu", progress=False)
    assert update.extracted == ["one.mp4"] and len(update.skipped) == 2
    after = cache_arrays(tmp_path / "cache")
    assert not np.array_equal(after["one.mp4"][0], before["one.mp4"][0])
    np.testing.assert_array_equal(after["three.avi"][0], before["three.avi"][0])


def test_cache_with_other_settings_is_refused(videos, tmp_path):
    extract_folder(videos, tmp_path / "cache", tiny_settings(), device="cpu", progress=False)
    with pytest.raises(VidpipeError, match="other settings.*flow_method"):
        extract_folder(videos, tmp_path / "cache", tiny_settings(flow_method="tvl1"), device="cpu", progress=False)
    run = cli("extract", str(videos), "--out", str(tmp_path / "cache"), *TINY_OPTIONS, "--set", "seed=5")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "seed" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_decoding_workers_give_the_same_cache(videos, tmp_path):
    extract_folder(videos, tmp_path / "inline", tiny_settings(), device="cpu", progress=False)
    summary = extract_folder(videos, tmp_path / "workers", tiny_settings(), device="cpu", workers=2,
                             progress=False)
    assert summary.ok and len(summary.extracted) == 3
    assert_same_caches(tmp_path / "inline", tmp_path / "workers")


def test_ranks_share_the_videos(videos, tmp_path, monkeypatch):
    extract_folder(videos, tmp_path / "single", tiny_settings(), device="cpu", progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        summary = extract_folder(videos, tmp_path / "sharded", tiny_settings(), device="cpu", progress=False)
        assert summary.world_size == 2 and summary.rank == int(rank)
        done.append(set(summary.extracted))
    assert not done[0] & done[1] and len(done[0] | done[1]) == 3
    assert_same_caches(tmp_path / "single", tmp_path / "sharded")


def test_torchrun_ranks_extract_their_shares_and_report_the_whole_job(videos, tmp_path):
    (videos / "empty.mp4").write_bytes(b"")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    run = subprocess.run([*torchrun, "--nproc-per-node", "2", "--no-python", sys.executable, "-m",
                          "vidpipe.pipeline.cli", "extract", str(videos), "--out", str(tmp_path / "cache"), *TINY_OPTIONS],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0                            # one bad file: the job reports failure
    reports = [line for line in run.stdout.splitlines() if "(all 2 ranks)" in line]
    assert len(reports) == 1 and "3 extracted" in reports[0] and "1 failed" in reports[0], run.stdout
    assert len(FeatureStore.open(tmp_path / "cache")) == 3


def test_bad_files_are_reported_and_the_batch_completes(videos, tmp_path):
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.mkv").write_text("hello\n" * 100)
    make_audio_only(videos / "audio.mp4")
    long = make_video(tmp_path / "long.mkv", frames=72, size=(96, 64)).read_bytes()
    (videos / "truncated.mkv").write_bytes(long[: len(long) // 2])
    (videos / "corrupt.mov").write_bytes(os.urandom(8192) + long[8192:])
    locked = videos / "locked.mp4"
    locked.write_bytes((videos / "one.mp4").read_bytes())
    locked.chmod(0)
    try:
        run = cli("extract", str(videos), "--out", str(tmp_path / "cache"), *TINY_OPTIONS,
                  prefix=without_root_read_override())
    finally:
        locked.chmod(0o644)
    assert run.returncode == 1, run.stderr
    expected = {"empty.mp4": "empty file", "text.mkv": "not a video", "audio.mp4": "audio only",
                "truncated.mkv": "truncated", "corrupt.mov": "corrupt", "locked.mp4": "permission denied"}
    failures = [line for line in run.stdout.splitlines() if line.startswith("  failed: ")]
    assert len(failures) == len(expected), run.stdout
    for name, words in expected.items():
        assert any(f"{videos / name}: " in line and words in line for line in failures), (name, run.stdout)
    assert "3 extracted" in run.stdout and "6 failed" in run.stdout
    assert FeatureStore.open(tmp_path / "cache").video_ids() == ["one.mp4", "sub_dir__two.webm", "three.avi"]


def test_killed_run_leaves_a_readable_cache_and_resumes_to_the_same_result(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for index in range(6):
        make_video(folder / f"v{index}.mp4", frames=48, seed=index)
    cache = tmp_path / "cache"
    process = cli_popen("extract", str(folder), "--out", str(cache), *TINY_OPTIONS)
    try:
        while not list((cache / "videos").glob("v*.h5")) and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    store = FeatureStore.open(cache)                   # readable right after the kill
    finished = store.video_ids()
    assert 1 <= len(finished) < 6
    for vid in finished:
        assert store.num_steps(vid) == 8
    resumed = extract_folder(folder, cache, load_settings(None, [], **TINY), device="cpu", progress=False)
    assert set(resumed.skipped) == {f"{vid}" for vid in finished} and len(resumed.extracted) == 6 - len(finished)
    assert not [p for p in (cache / "videos").iterdir() if not p.name.endswith(".h5") or p.name.startswith(".")]
    extract_folder(folder, tmp_path / "uninterrupted", tiny_settings(), device="cpu", progress=False)
    assert_same_caches(cache, tmp_path / "uninterrupted")


def test_memory_stays_flat_on_a_long_video(tmp_path):
    """Peak RSS after decoding a 10-minute video (both backends) and extracting its features
    hardly exceeds the peak after a 2-minute one, while its frames alone would take 133 MB.
    (Tiny frames, a tiny timm test backbone and one flow field per step keep it fast.)"""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from extract_helpers import make_video, tiny_settings
        from vidpipe.extractors.decode import VideoSource
        from vidpipe.extractors.features import TwoStreamExtractor
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        short = make_video({str(tmp_path / "short.mp4")!r}, frames=24 * 120, size=(64, 48), codec="mpeg4")
        long = make_video({str(tmp_path / "long.mp4")!r}, frames=24 * 600, size=(64, 48), codec="mpeg4")
        extractor = TwoStreamExtractor(tiny_settings(rgb_backbone="test_resnet", flow_backbone="test_resnet",
                                                     resize=32, crop=32, dis_preset="ultrafast",
                                                     flow_fields=1, batch_size=32), device="cpu")
        peaks = []
        for video in (short, long):
            counts = [sum(1 for _ in VideoSource(video, backend=b)) for b in ("decord", "pyav")]
            counts.append(sum(1 for _ in extractor.stream(video)))
            peaks.append(peak())
            print(counts, peaks[-1])
        print("GROWTH", peaks[1] - peaks[0])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("[480, 480, 480]") and lines[1].startswith("[2400, 2400, 2400]")
    growth = float(lines[-1].split()[1])
    assert growth < 40, run.stdout          # MB


def test_find_videos_gives_unique_ids(tmp_path):
    for name in ("a b.mp4", "a_b.mp4", "c.MKV", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    jobs = find_videos(tmp_path)
    assert [job.relative for job in jobs] == ["a b.mp4", "a_b.mp4", "c.MKV"]
    assert len({job.video_id for job in jobs}) == 3
    with pytest.raises(VidpipeError, match="no such folder"):
        find_videos(tmp_path / "missing")


def test_cli_help_and_settings_precedence(tmp_path):
    run = cli("extract", "--help")
    for option in ("--out", "--config", "--device", "--flow", "--rgb-backbone", "--flow-backbone",
                   "--rgb-weights", "--flow-weights", "--random-init", "--workers", "--set"):
        assert option in run.stdout
    config = tmp_path / "extract.yaml"
    config.write_text("flow_method: tvl1\nchunk: 8\nseed: 1\n")
    settings = load_settings(config, ["seed=2"], flow_method="dis", rgb_backbone=None)
    assert (settings.flow_method, settings.chunk, settings.seed, settings.rgb_backbone) == ("dis", 8, 2, "resnet50")
    with pytest.raises(VidpipeError, match="unknown config key 'flow'"):
        load_settings(None, ["flow=dis"])


def test_find_videos_skips_hidden_metadata_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.mp4", "._b.mp4", "sub/a.MKV", "sub/.c.mp4", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [job.relative for job in find_videos(tmp_path)] == ["b.mp4", "sub/a.MKV"]


def test_the_api_call_of_the_module_doc_takes_default_settings(tmp_path, monkeypatch):
    """`vidpipe.extract("videos/", "cache/")` (vidpipe/__init__.py) failed: settings was required."""
    import vidpipe
    import vidpipe.pipeline.extract as extract_module

    monkeypatch.setattr(extract_module, "load_settings", lambda: tiny_settings())  # no hub weights here
    (tmp_path / "videos").mkdir()
    make_video(tmp_path / "videos" / "one.mp4", frames=36, fps=24)
    summary = vidpipe.extract(tmp_path / "videos", tmp_path / "cache", device="cpu", progress=False)
    assert summary.extracted == ["one.mp4"] and FeatureStore.open(tmp_path / "cache").settings["rgb_dim"] == 512
