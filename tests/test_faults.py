"""Fault injection: kill -9 at random moments, damaged bytes, hostile input.

Every test checks the promises of docs/reliability.md: no traceback (a one-line `error:`),
nothing already done is lost, no silently wrong data. The kill points are random but
seeded (reproducible); live-source failures are tested in test_detect.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract_helpers import TINY, make_video, tiny_settings
from test_store import damage_dataset
from train_helpers import cli_error, random_cache, write_config
from vidpipe.core.errors import VidpipeError
from vidpipe.malt.checkpoint import INTEGRITY_KEY, load_model, read_checkpoint, save_checkpoint, tensors_digest
from vidpipe.pipeline.cli import main
from vidpipe.pipeline.extract import extract_folder
from vidpipe.store.cache import MANIFEST, FeatureStore
from vidpipe.store.labels import LabelSet

REPO = Path(__file__).resolve().parents[1]
# Kill points differ from run to run; a failure names the seed (VIDPIPE_FAULT_SEED=N repeats it).
SEED = int(os.environ.get("VIDPIPE_FAULT_SEED", time.time_ns() % 1_000_000))
RNG = random.Random(SEED)
# The tiny extraction settings with the fastest DIS preset (resnet18s, 48-pixel crops).
FAST = dict(dis_preset="ultrafast")
EXTRACT_OPTIONS = ["--flow", "dis", "--random-init", "--no-progress",
                   *[arg for key, value in {**TINY, **FAST}.items()
                     if key not in ("flow_method", "random_init") for arg in ("--set", f"{key}={value}")]]


def fast_settings():
    return tiny_settings(**FAST)


def popen_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vidpipe.pipeline.cli", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, ready, jitter_s: float, limit_s: float = 120) -> None:
    """SIGKILL `process` `jitter_s` after `ready()` first holds (or once it has ended)."""
    deadline = time.monotonic() + limit_s
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(jitter_s)
    process.send_signal(signal.SIGKILL)
    process.communicate()


def cache_contents(root: Path) -> dict[str, str]:
    """{video id: checksum} of the sound files a reader sees (every visible one must be sound)."""
    if not (root / MANIFEST).exists():   # killed before the cache existed
        assert not list(root.glob("videos/[!.]*.h5"))
        return {}
    store = FeatureStore.open(root)
    for video_id in store.video_ids():
        assert store.check(video_id) is None, store.check(video_id)
    return {video_id: store.attrs(video_id)["checksum"] for video_id in store.video_ids()}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "videos"
    folder.mkdir()
    for index in range(3):
        make_video(folder / f"v{index}.mp4", frames=24, seed=index)   # 4 steps each
    return folder


@pytest.fixture(scope="module")
def reference(videos) -> dict[str, str]:
    """Checksums of an uninterrupted extraction (features are deterministic)."""
    summary = extract_folder(videos, videos.parent / "reference", fast_settings(), device="cpu",
                             progress=False)
    assert summary.ok
    return cache_contents(videos.parent / "reference")


def copy_reference(videos: Path, reference: dict[str, str], to: Path) -> Path:
    """A copy of the uninterrupted cache to damage."""
    assert reference
    return Path(shutil.copytree(videos.parent / "reference", to))


# --- kill -9 ---------------------------------------------------------------------------------

def test_extract_killed_at_random_moments_keeps_what_it_finished(videos, reference, tmp_path):
    cache = tmp_path / "cache"
    wanted, jitter = RNG.randrange(len(reference)), RNG.uniform(0, 0.5)
    where = f"killed after {wanted} videos + {jitter:.2f} s (VIDPIPE_FAULT_SEED={SEED})"
    process = popen_cli("extract", str(videos), "--out", str(cache), *EXTRACT_OPTIONS)
    kill_when(process, lambda: len(list(cache.glob("videos/v*.h5"))) >= wanted, jitter)
    done = cache_contents(cache)
    assert done.items() <= reference.items(), where      # what is there is right
    resumed = extract_folder(videos, cache, fast_settings(), device="cpu", progress=False)
    assert sorted(resumed.skipped) == sorted(done), where  # nothing finished is lost
    assert cache_contents(cache) == reference, where


def test_train_killed_after_a_random_save_resumes_to_the_uninterrupted_model(tmp_path):
    cache = random_cache(tmp_path / "cache", steps=24)
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 2})
    main(["train", "--config", str(config), "--cache", str(cache), "--out", str(tmp_path / "ref")])

    run = tmp_path / "run"
    process = popen_cli("train", "--config", str(config), "--cache", str(cache), "--out", str(run))
    # Killed a random moment after the first epoch's record: in the second epoch or a save.
    jitter = RNG.uniform(0, 0.5)
    kill_when(process, lambda: (run / "metrics.jsonl").exists(), jitter)
    where = f"killed {jitter:.2f} s after the first epoch (VIDPIPE_FAULT_SEED={SEED})"
    if (run / "last.pt").exists():
        read_checkpoint(run / "last.pt")   # a kill never leaves a damaged checkpoint
        main(["train", "--cache", str(cache), "--out", str(run), "--resume"])
    else:   # killed before its first save completed: start again
        main(["train", "--config", str(config), "--cache", str(cache), "--out", str(run)])
    resumed, uninterrupted = read_checkpoint(run / "last.pt"), read_checkpoint(tmp_path / "ref" / "last.pt")
    assert resumed.epoch == uninterrupted.epoch == 2, where
    for name, tensor in uninterrupted.model_state.items():
        assert torch.equal(resumed.model_state[name], tensor), (name, where)


# --- damaged caches --------------------------------------------------------------------------

def test_damaged_cache_files_are_refused_by_train(tmp_path, capsys):
    cache = random_cache(tmp_path / "cache")
    victim = sorted((cache / "videos").glob("*.h5"))[1]
    damage_dataset(victim, "rgb")
    err = cli_error(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml")),
                             "--cache", str(cache), "--out", str(tmp_path / "run")])
    assert f"{victim.name}: damaged cache file: checksum mismatch" in err


def test_damaged_or_incomplete_cache_files_are_extracted_again(videos, reference, tmp_path):
    cache = copy_reference(videos, reference, tmp_path / "cache")
    damage_dataset(cache / "videos" / "v0.mp4.h5", "rgb")
    with h5py.File(cache / "videos" / "v1.mp4.h5", "r+") as h5:
        del h5["timestamps"]
    again = extract_folder(videos, cache, fast_settings(), device="cpu", progress=False)
    assert sorted(again.extracted) == ["v0.mp4", "v1.mp4"] and again.skipped == ["v2.mp4"]
    assert cache_contents(cache) == reference


@pytest.mark.parametrize("content", [b"\x00\xff" * 40, b"[]", b"null", b"{}",
                                     b'{"format_version": 2, "settings": "x"}'])
def test_a_damaged_manifest_is_one_line_for_every_command(videos, reference, tmp_path, capsys,
                                                          content):
    cache = copy_reference(videos, reference, tmp_path / "cache")
    (cache / MANIFEST).write_bytes(content)
    for argv in (["train", "--config", str(write_config(tmp_path / "c.yaml")), "--cache", str(cache),
                  "--out", str(tmp_path / "run")],
                 ["labels", str(tmp_path / "a.csv"), "--cache", str(cache)],
                 ["extract", str(videos), "--out", str(cache), *EXTRACT_OPTIONS]):
        assert "corrupt manifest" in cli_error(capsys, argv)
    with pytest.raises(SystemExit) as info:   # verify: damaged, exit 1
        main(["cache", "verify", str(cache)])
    assert info.value.code == 1
    main(["cache", "repair", str(cache)])
    main(["cache", "verify", str(cache)])      # sound again: returns (exit 0)
    assert FeatureStore.open(cache).video_ids() == ["v0.mp4", "v1.mp4", "v2.mp4"]


def test_a_lost_manifest_does_not_let_other_settings_claim_the_files(videos, reference, tmp_path,
                                                                    capsys):
    cache = copy_reference(videos, reference, tmp_path / "cache")
    (cache / MANIFEST).unlink()
    err = cli_error(capsys, ["extract", str(videos), "--out", str(cache), *EXTRACT_OPTIONS,
                             "--set", "seed=5"])
    assert "made with other settings (differs in:" in err and "seed" in err
    assert not (cache / MANIFEST).exists()
    again = extract_folder(videos, cache, fast_settings(), device="cpu", progress=False)
    assert len(again.skipped) == 3 and cache_contents(cache) == reference


# --- hostile input ---------------------------------------------------------------------------

def test_a_fifo_named_mp4_is_skipped_with_a_reason(videos, tmp_path, caplog):
    folder = tmp_path / "videos"
    folder.mkdir()
    os.link(videos / "v0.mp4", folder / "v0.mp4")
    os.mkfifo(folder / "pipe.mp4")
    signal.alarm(120)   # a regression would block on the FIFO forever: fail instead
    try:
        summary = extract_folder(folder, tmp_path / "cache", fast_settings(), device="cpu",
                                 progress=False)
    finally:
        signal.alarm(0)
    assert summary.ok and summary.extracted == ["v0.mp4"]
    assert "pipe.mp4: not a regular file (a FIFO)" in caplog.text


def test_extract_on_an_empty_folder_fails_and_creates_no_cache(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, ["extract", str(tmp_path / "empty"), "--out", str(tmp_path / "cache"),
                             *EXTRACT_OPTIONS])
    assert "empty: no video files found" in err and not (tmp_path / "cache").exists()


# --- damaged checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A finished 1-epoch run's last.pt."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = random_cache(root / "cache", steps=24)
    config = write_config(root / "c.yaml", train={"epochs": 1},   # a 4-KB weight: 16 x 64 floats
                          model={"d_model": 16, "ffn_dim": 64})
    main(["train", "--config", str(config),
          "--cache", str(cache), "--out", str(root / "run")])
    return root / "run" / "last.pt"


def assert_refused(path: Path, why: str) -> str:
    with pytest.raises(VidpipeError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and why in message, message
    return message


def test_junk_text_and_truncated_checkpoints_are_one_line_errors(checkpoint, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("video,label,start_s,end_s\n")
    assert_refused(text, "not a vidpipe checkpoint")
    rng = np.random.default_rng(0)
    good = checkpoint.read_bytes()
    for trial in range(40):
        junk = tmp_path / f"junk{trial}.pt"
        junk.write_bytes(rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
        assert_refused(junk, "")
        truncated = tmp_path / f"truncated{trial}.pt"
        truncated.write_bytes(good[:int(rng.integers(1, len(good)))])
        assert_refused(truncated, "")


class _RunsCode:
    """Unpickling this would run code (here: create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_unrun(checkpoint, tmp_path):
    hostile = dict(torch.load(checkpoint, weights_only=True), history=[_RunsCode(tmp_path / "ran")])
    torch.save(hostile, tmp_path / "hostile.pt")
    assert_refused(tmp_path / "hostile.pt", "more than tensors and plain types")
    assert not (tmp_path / "ran").exists()


def test_zeroed_weights_are_detected_by_the_tensor_hash(checkpoint, tmp_path):
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:   # the largest tensor record
        record = max((info for info in archive.infolist() if "/data/" in info.filename),
                     key=lambda info: info.file_size)
        start = record.header_offset + 30 + len(record.filename) + len(record.extra)
    assert record.file_size >= 4096
    data[start:start + 4096] = bytes(4096)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    assert_refused(damaged, "damaged checkpoint: its tensors do not match the hash")


def test_foreign_and_misfit_checkpoints_say_what_the_file_is(checkpoint, tmp_path):
    saved = torch.load(checkpoint, weights_only=True)
    timm_style = tmp_path / "timm.pt"
    torch.save({"state_dict": saved["model_state"], "epoch": 3}, timm_style)
    assert_refused(timm_style, "{'state_dict': ...} (timm/Lightning style)")
    bare = tmp_path / "bare.pt"
    torch.save(saved["model_state"], bare)
    assert_refused(bare, "a bare state_dict")

    misfit = dict(saved)
    misfit["config"] = json.loads(json.dumps(saved["config"]))
    misfit["config"]["model"]["d_model"] *= 2
    misfit[INTEGRITY_KEY] = tensors_digest({k: v for k, v in misfit.items() if k != INTEGRITY_KEY})
    path = tmp_path / "misfit.pt"
    torch.save(misfit, path)
    assert_refused(path, "the weights do not fit the model its config describes (size mismatch")


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    script = ("import os, vidpipe.malt.checkpoint as c\n"   # killed with its temporary written
              "def die(*args, **kwargs): os.kill(os.getpid(), 9)\n"
              "os.fsync = die\n"
              f"c.save_checkpoint(c.read_checkpoint({str(checkpoint)!r}), {str(run / 'last.pt')!r})\n")
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == -9
    assert list(run.glob(".tmp-*.pt")) and not (run / "last.pt").exists()
    save_checkpoint(read_checkpoint(checkpoint), run / "last.pt")
    assert not list(run.glob(".tmp-*")) and read_checkpoint(run / "last.pt").epoch == 1


# --- hostile annotation and config files -----------------------------------------------------

@pytest.fixture(scope="module")
def labelled_cache(tmp_path_factory) -> Path:
    return random_cache(tmp_path_factory.mktemp("labels") / "cache", num_train=2, num_test=0)


@pytest.mark.parametrize("name, content, why", [
    ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 20, "not a CSV text file"),
    ("deep.json", b"[" * 100_000, "not valid JSON"),
    ("binary.json", b"\xff\xfe\x00\xd8" * 10, "not valid JSON"),
])
def test_binary_and_deep_annotation_files_are_one_line_errors(labelled_cache, tmp_path, capsys,
                                                              name, content, why):
    (tmp_path / name).write_bytes(content)
    err = cli_error(capsys, ["labels", str(tmp_path / name), "--cache", str(labelled_cache),
                             "--out", str(tmp_path / "labels.h5")])
    assert f"{name}: {why}" in err


def test_binary_and_deep_yaml_configs_are_one_line_errors(labelled_cache, tmp_path, capsys):
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe\x01" * 30)
    (tmp_path / "deep.yaml").write_text("model: " + "[" * 100_000)
    for name in ("binary.yaml", "deep.yaml"):
        err = cli_error(capsys, ["train", "--config", str(tmp_path / name), "--cache",
                                 str(labelled_cache), "--out", str(tmp_path / "run")])
        assert f"{name}: not valid YAML" in err


def test_a_csv_with_a_byte_order_mark_reads_its_header(labelled_cache, tmp_path):
    csv_file = tmp_path / "excel.csv"
    csv_file.write_bytes("video,label,start_s,end_s\nvideo_0,jump,1.0,3.0\n".encode("utf-8-sig"))
    main(["labels", str(csv_file), "--cache", str(labelled_cache), "--out", str(tmp_path / "l.h5")])
    labels = LabelSet.load(tmp_path / "l.h5")
    assert labels.class_names == ["background", "jump"]
    assert labels.videos["video_0"].targets[:, 1].sum() == 8   # 1 s to 3 s: 8 steps of 0.25 s


def test_segments_past_the_end_of_their_video_are_counted_and_reported(labelled_cache, tmp_path,
                                                                       caplog):
    csv_file = tmp_path / "late.csv"   # the cache's videos last 10 s
    csv_file.write_text("video,label,start_s,end_s\nvideo_0,jump,1,2\nvideo_0,jump,12,14\n"
                        "video_1,jump,1e300,1e301\n")
    main(["labels", str(csv_file), "--cache", str(labelled_cache), "--out", str(tmp_path / "l.h5")])
    assert "2 segment(s) cover no step of their video" in caplog.text
    assert "late.csv:3: [12, 14] s" in caplog.text


# --- stop signals: SIGTERM takes Ctrl-C's path; nothing alive at exit --------------------------

# A terminal's Ctrl-C reaches a process whose SIGINT is Python's; a shell's background job
# (as CI may start pytest) would hand its children SIGINT ignored: restore it first.
CLI_WITH_CTRL_C = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "from vidpipe.pipeline.cli import main; main()")


def start_cli(*args: str) -> subprocess.Popen:
    """The CLI in a fresh interpreter (the exit status includes the interpreter's own exit),
    stdout and stderr as one text stream."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CLI_WITH_CTRL_C, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_when(process: subprocess.Popen, text: str, signum: int, limit_s: float = 120) -> str:
    """Send `signum` once `text` appears in the output; wait for the end -> all output."""
    seen = []
    deadline = time.monotonic() + limit_s
    for line in process.stdout:
        seen.append(line)
        if text in line or time.monotonic() > deadline:
            break
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=limit_s)
    return "".join(seen) + rest


@pytest.fixture(scope="module")
def live_setup(tmp_path_factory):
    """(checkpoint, MPEG-TS bytes of a 6-second synthetic video) for detect on a live source."""
    from detect_helpers import tiny_cache, tiny_checkpoint, to_mpegts

    root = tmp_path_factory.mktemp("live")
    data, store = tiny_cache(root, num_videos=2, duration_s=6.0)
    checkpoint = tiny_checkpoint(root / "run" / "best.pt", store)
    return checkpoint, to_mpegts(data.videos_dir / "synth_001.mp4", root / "clip.ts").read_bytes()


# Many CLI runs without importing the heavy stack each time (3 s of a run's 6): a server that
# imported it once forks a child per run; the child runs the console script's `run` and ends as the CLI does
# (SystemExit, then the interpreter's finalisation, where a thread left running aborts).
FORK_SERVER = r"""
import json, os, signal, sys
import av, cv2, timm, torch
import vidpipe.extractors.features, vidpipe.malt.stream, vidpipe.pipeline.cli, vidpipe.pipeline.detect
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        print(os.waitstatus_to_exitcode(os.waitpid(request["wait"], 0)[1]), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        vidpipe.pipeline.cli.run(request["args"])
        sys.exit(0)                      # (run exits itself; never read the server's input)
    print(pid, flush=True)
"""


class ForkedCli:
    """CLI runs forked from one server process (see FORK_SERVER)."""

    def __init__(self):
        self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=REPO, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"},
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _ask(self, request: dict) -> int:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return int(self.server.stdout.readline())

    def start(self, log: Path, *args: str) -> int:
        """Start `vidpipe ARGS` with its output to `log` -> its pid."""
        return self._ask({"log": str(log), "args": list(args)})

    def wait(self, pid: int) -> int:
        """The exit status of run `pid` (-N: killed by signal N), once it has ended."""
        return self._ask({"wait": pid})

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


def wait_for_text(log: Path, text: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not (log.exists() and text in log.read_text()):
        time.sleep(0.02)


def test_sigint_and_sigterm_of_live_detect_write_everything_and_exit_cleanly(live_setup, tmp_path):
    """20 runs (SIGINT and SIGTERM, one and two live sources, 4 at a time): each is stopped
    after its first decided event, while its workers decode and featurise; each writes every
    source's timeline (ended_by interrupt) and its review video, leaves no temporary file,
    says what stopped it and exits 130 / 143: never killed by the signal, never SIGABRT
    (a thread still running at interpreter exit)."""
    from detect_helpers import LiveServer
    from vidpipe.pipeline.timeline import Timeline

    checkpoint, data = live_setup
    runs = [(signal.SIGINT if index % 2 else signal.SIGTERM, 1 + (index % 4 >= 2))
            for index in range(20)]

    def run(cli: ForkedCli, index: int) -> None:
        signum, sources = runs[index]
        out, log = tmp_path / f"run{index}", tmp_path / f"run{index}.log"
        # every byte sent, then connected and silent: the worker is busy when the signal comes
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(LiveServer([(data, "stall")])) for _ in range(sources)]
            pid = cli.start(log, "detect", *[s.url for s in servers], "--checkpoint", str(checkpoint),
                            "--out", str(out), "--live", "--no-picture", "--timeout", "60",
                            "--render", str(out / "review.mp4"))
            wait_for_text(log, "  start  ")
            os.kill(pid, signum)
            code = cli.wait(pid)
        output = log.read_text()
        where = f"run {index} ({signal.Signals(signum).name}, {sources} sources):\n{output}"
        assert code == 128 + signum, where
        last = output.strip().splitlines()[-1]
        said = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        assert last.startswith(f"error: {said}") and "timeline" in last, where
        timelines = sorted(out.glob("*.timeline.json"))
        assert len(timelines) == sources, where
        for saved in timelines:
            timeline = Timeline.load(saved)
            assert timeline.metadata["ended_by"] == "interrupt", where
            review = saved.with_name(saved.name.replace(".timeline.json", ".review.mp4"))
            if sources == 1:
                review = out / "review.mp4"
            assert review.is_file() == bool(len(timeline.timestamps)), where   # frames drawn: kept
        assert not list(out.glob(".tmp-*")), where

    def lane(first: int) -> None:
        cli = ForkedCli()
        try:
            for index in range(first, len(runs), 4):
                run(cli, index)
        finally:
            cli.close()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(lane, first) for first in range(4)]:
            future.result()


def signal_once(process: subprocess.Popen, ready, signum: int, limit_s: float = 120) -> str:
    """Send `signum` once `ready()` holds; wait for the end -> all output."""
    deadline = time.monotonic() + limit_s
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=limit_s)
    return output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_extract_says_how_many_are_done_and_resumes(videos, reference, tmp_path, signum):
    cache = tmp_path / "cache"
    process = start_cli("extract", str(videos), "--out", str(cache), *EXTRACT_OPTIONS)
    output = signal_once(process, lambda: list(cache.glob("videos/v*.h5")), signum)
    assert process.returncode == 128 + signum, output
    said = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    done = cache_contents(cache)
    assert output.strip().splitlines()[-1] == (
        f"error: {said}: {cache}: {len(done)} of 3 videos done ({len(done)} extracted now); "
        "rerun the same command to resume"), output
    assert not list(cache.glob("videos/.tmp-*"))
    resumed = extract_folder(videos, cache, fast_settings(), device="cpu", progress=False)
    assert sorted(resumed.skipped) == sorted(done)
    assert cache_contents(cache) == reference


def test_sigterm_during_train_keeps_last_pt_and_says_how_to_resume(tmp_path):
    cache = random_cache(tmp_path / "cache", steps=24)
    config = write_config(tmp_path / "c.yaml", train={"epochs": 200})
    run = tmp_path / "run"
    process = start_cli("train", "--config", str(config), "--cache", str(cache), "--out", str(run))
    output = signal_once(process, lambda: (run / "last.pt").exists(), signal.SIGTERM)
    assert process.returncode == 143, output
    assert output.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM: {run}/last.pt holds the last finished epoch; rerun the same "
        "command with --resume to continue"), output
    assert not list(run.glob(".tmp-*"))
    assert read_checkpoint(run / "last.pt").epoch >= 0   # whole: its tensor hash verifies


# --- checkpoint sizes checked against the tensors before anything is built ----------------------

def resaved(checkpoint: Path, to: Path, change) -> Path:
    """The checkpoint with `change(data)` applied and a matching tensor hash (consistent bytes,
    inconsistent sizes: only the size check can catch it)."""
    data = torch.load(checkpoint, weights_only=True)
    data["config"] = json.loads(json.dumps(data["config"]))
    change(data)
    data[INTEGRITY_KEY] = tensors_digest({k: v for k, v in data.items() if k != INTEGRITY_KEY})
    torch.save(data, to)
    return to


def test_a_class_count_that_differs_from_the_class_names_is_one_line(checkpoint, tmp_path, capsys):
    path = resaved(checkpoint, tmp_path / "names.pt", lambda data: data["class_names"].pop())
    names = len(torch.load(path, weights_only=True)["class_names"])
    message = assert_refused(path, f"damaged or inconsistent checkpoint: its config declares "
                                   f"{names + 1} classes (background included) but it names {names}")
    cache = checkpoint.parent.parent / "cache"
    error = cli_error(capsys, ["eval", "--checkpoint", str(path), "--cache", str(cache)])
    assert error == f"error: {message}"


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")   # deprecated, still read
def test_a_weight_of_the_right_shape_that_cannot_be_loaded_is_one_line(checkpoint, tmp_path):
    """The sizes fit (the size check passes) but a quantized tensor cannot become a float weight."""
    def quantize(data):
        name = next(iter(data["model_state"]))
        data["model_state"][name] = torch.quantize_per_tensor(data["model_state"][name], 0.1, 0, torch.qint8)
    path = resaved(checkpoint, tmp_path / "quantized.pt", quantize)
    assert_refused(path, "the weights do not fit the model its config describes (While copying the parameter")


def test_a_config_declaring_sizes_its_tensors_lack_is_refused_before_allocating(checkpoint, tmp_path):
    """d_model 2^20 over 16-wide tensors: refused in a process whose heap is capped at 3 GB
    (building that model would ask for terabytes; building the layers before the first
    huge one, gigabytes)."""
    path = resaved(checkpoint, tmp_path / "huge.pt",
                   lambda data: data["config"]["model"].update(d_model=2 ** 20))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30)); "
            "from vidpipe.pipeline.cli import main; main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code, "eval", "--checkpoint", str(path), "--cache",
                             str(checkpoint.parent.parent / "cache")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(
        re.escape(f"error: {path}: damaged or inconsistent checkpoint: the weights do not fit the "
                  "model its config describes (size mismatch for long_fusion.proj.weight: the file "
                  "holds [16, ") + r"(\d+)\], its config describes \[1048576, \1\]; \d+ more\)",
        result.stderr.strip()), result.stderr


# --- a full disk -------------------------------------------------------------------------------

# Run inside a mount namespace of its own (a user namespace too, so root is not needed): a
# fresh tmpfs at DISK, filled up to FREE bytes left; the CLI runs with its output there, then
# what it left is copied out (the tmpfs ends with the namespace).
ON_A_FULL_DISK = r"""
import json, os, shutil, subprocess, sys
disk, free, copy_to, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
with open(os.path.join(disk, ".filler"), "wb") as filler:
    left = shutil.disk_usage(disk).free - free
    while left > 0:
        left -= filler.write(b"\0" * min(left, 1 << 20))
result = subprocess.run([sys.executable, "-m", "vidpipe.pipeline.cli", *args], capture_output=True, text=True)
os.remove(os.path.join(disk, ".filler"))
shutil.copytree(disk, copy_to)
print(json.dumps({"rc": result.returncode, "err": result.stderr}))
"""


def on_a_full_disk(tmp_path: Path, free_bytes: int, *args: str) -> tuple[int, str, Path]:
    """Run the CLI with DISK (in `args`) on a 4 MiB tmpfs with `free_bytes` left ->
    (exit code, stderr, a copy of what DISK holds after)."""
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    args = [arg.replace("DISK", str(disk)) for arg in args]
    script = (f"mount -t tmpfs -o size=4m tmpfs {disk} && exec {sys.executable} -c "
              f"\"$0\" {disk} {free_bytes} {after} \"$@\"")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script,
                             ON_A_FULL_DISK, *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["rc"], report["err"], after


def assert_one_disk_full_line(err: str, path: Path) -> None:
    assert len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(re.escape(f"error: {path}: not written, no space left on the device (")
                        + r"\d+\.\d MiB free in .+\); free some space or choose another folder, "
                          r"then rerun \(what was finished is kept\)", err.strip()), err


def test_extract_into_a_new_cache_on_a_full_disk_leaves_no_cache(videos, tmp_path):
    code, err, after = on_a_full_disk(tmp_path, 0, "extract", str(videos), "--out", "DISK/cache",
                                      *EXTRACT_OPTIONS)
    assert code == 1
    assert_one_disk_full_line(err, tmp_path / "disk" / "cache" / MANIFEST)
    assert sorted(p.name for p in after.iterdir()) == []   # no cache, no empty cache/videos


def test_extract_that_fills_the_disk_keeps_the_videos_it_finished(videos, reference, tmp_path):
    one_video = max(p.stat().st_size for p in (videos.parent / "reference" / "videos").glob("*.h5"))
    code, err, after = on_a_full_disk(tmp_path, 2 * one_video, "extract", str(videos), "--out",
                                      "DISK/cache", *EXTRACT_OPTIONS)
    assert code == 1 and "v" in err
    failed = re.match(r"error: (\S+): not written", err).group(1)
    assert_one_disk_full_line(err, Path(failed))
    assert not list(after.rglob(".tmp-*"))
    done = cache_contents(after / "cache")
    assert 1 <= len(done) < 3 and done.items() <= reference.items()
    resumed = extract_folder(videos, after / "cache", fast_settings(), device="cpu", progress=False)
    assert len(resumed.skipped) == len(done) and cache_contents(after / "cache") == reference


def test_train_whose_checkpoint_does_not_fit_is_one_line(tmp_path):
    cache = random_cache(tmp_path / "cache", steps=24)
    config = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    code, err, after = on_a_full_disk(tmp_path, 16 << 10, "train", "--config", str(config),
                                      "--cache", str(cache), "--out", "DISK/run")
    assert code == 1
    assert_one_disk_full_line(err, tmp_path / "disk" / "run" / "last.pt")
    assert not list(after.rglob(".tmp-*")) and not (after / "run" / "last.pt").exists()


def test_detect_on_a_full_disk_is_one_line_and_leaves_no_temporary(checkpoint, tmp_path):
    cache = checkpoint.parent.parent / "cache"
    video_id = FeatureStore.open(cache).video_ids()[0]
    code, err, after = on_a_full_disk(tmp_path, 0, "detect", video_id, "--cache", str(cache),
                                      "--checkpoint", str(checkpoint), "--out", "DISK/detections")
    assert code == 1
    assert_one_disk_full_line(err, tmp_path / "disk" / "detections" / f"{video_id}.timeline.json")
    assert not list(after.rglob(".tmp-*"))


# --- two runs, one output folder ------------------------------------------------------------------

def test_two_trains_into_one_folder_started_together_one_is_refused_naming_the_other(tmp_path):
    cache = random_cache(tmp_path / "cache", steps=24)
    config = write_config(tmp_path / "c.yaml", train={"epochs": 500})
    run = tmp_path / "run"
    first, second = [start_cli("train", "--config", str(config), "--cache", str(cache), "--out", str(run))
                     for _ in range(2)]
    deadline = time.monotonic() + 120
    while first.poll() is None and second.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    refused, holder = (first, second) if first.poll() is not None else (second, first)
    output, _ = refused.communicate()
    assert holder.poll() is None, "the holder ran to its end: the two runs did not overlap"
    holder.send_signal(signal.SIGKILL)   # a killed holder's lock frees itself
    holder.communicate()
    assert refused.returncode == 2, output
    assert output.strip().splitlines()[-1] == (
        f"error: {run}: in use by another vidpipe train (pid {holder.pid}); wait for it to end "
        "or choose another output folder"), output
    from vidpipe.core.lock import folder_lock
    with folder_lock(run, "train"):
        pass


def test_a_second_detect_into_a_busy_folder_is_refused_naming_the_first(live_setup, tmp_path):
    from detect_helpers import LiveServer

    checkpoint, data = live_setup
    out = tmp_path / "out"
    with LiveServer([(data, "stall")]) as first_source, LiveServer([(data, "stall")]) as second_source:
        first, second = [start_cli("detect", server.url, "--checkpoint", str(checkpoint), "--out", str(out),
                                   "--live", "--no-picture", "--timeout", "60")
                         for server in (first_source, second_source)]
        deadline = time.monotonic() + 120
        while first.poll() is None and second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        refused, holder = (first, second) if first.poll() is not None else (second, first)
        output, _ = refused.communicate()
        held = signal_when(holder, "  start  ", signal.SIGTERM)
    assert refused.returncode == 2 and holder.returncode == 143, output + held
    assert output.strip().splitlines()[-1] == (
        f"error: {out}: in use by another vidpipe detect (pid {holder.pid}); wait for it to end "
        "or choose another output folder"), output
    assert len(list(out.glob("*.timeline.json"))) == 1 and not (out / ".vidpipe.lock").exists()


def test_two_extracts_into_one_cache_share_the_videos(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for index in range(4):
        make_video(videos / f"v{index}.mp4", frames=96, seed=index)   # 16 steps each
    one_run = extract_folder(videos, tmp_path / "one_run", fast_settings(), device="cpu", progress=False)
    assert one_run.ok
    cache = tmp_path / "cache"
    runs = [start_cli("extract", str(videos), "--out", str(cache), *EXTRACT_OPTIONS) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    extracted = [int(re.search(r": 4 videos: (\d+) extracted", out).group(1)) for out in outputs]
    assert sum(extracted) == 4, outputs   # each video extracted once, by one of them
    assert cache_contents(cache) == cache_contents(tmp_path / "one_run")


def test_detect_rendering_on_a_full_disk_leaves_no_half_written_video(live_setup, tmp_path):
    checkpoint, data = live_setup
    clip = tmp_path / "clip.ts"
    clip.write_bytes(data)
    code, err, after = on_a_full_disk(tmp_path, 0, "detect", str(clip), "--checkpoint", str(checkpoint),
                                      "--out", "DISK/detections", "--render", "DISK/review.mp4")
    assert code == 1
    failed = re.match(r"error: (\S+): not written", err)
    assert failed and failed.group(1).startswith(str(tmp_path / "disk")), err
    failed = failed.group(1)
    assert_one_disk_full_line(err, Path(failed))
    assert not list(after.rglob(".tmp-*"))


def test_detect_events_on_a_full_disk_name_the_events_file(live_setup, tmp_path):
    checkpoint, data = live_setup
    clip = tmp_path / "clip.ts"
    clip.write_bytes(data)
    code, err, _ = on_a_full_disk(tmp_path, 0, "detect", str(clip), "--checkpoint", str(checkpoint),
                                  "--out", str(tmp_path / "out"), "--events", "DISK/events.jsonl")
    assert code == 1
    assert_one_disk_full_line(err, tmp_path / "disk" / "events.jsonl")


def test_sigterm_during_the_demo_exits_143_saying_what_is_kept(tmp_path):
    out = tmp_path / "demo"
    process = start_cli("demo", "--videos", "4", "--duration", "3", "--out", str(out))
    output = signal_when(process, "model selection", signal.SIGTERM)   # as training starts
    assert process.returncode == 143, output
    assert output.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM: {out}: the videos and features made so far are kept; rerun "
        "the same command to go on (it reuses them)"), output
    assert not list(out.rglob(".tmp-*")) and not (out / ".vidpipe.lock").exists()
