"""Fault injection: kill -9 at random moments, damaged bytes, hostile input.

Every test checks the promises of docs/reliability.md: no traceback (a one-line `error:`),
nothing already done is lost, no silently wrong data. The kill points are random but
seeded (reproducible); live-source failures are tested in test_detect.py.
"""
from __future__ import annotations

import json
import os
import random
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
    script = ("import os, torch, vidpipe.malt.checkpoint as c\n"
              "def die(*args, **kwargs): os.kill(os.getpid(), 9)\n"
              "torch.save = die\n"
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
