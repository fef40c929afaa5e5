"""The feature store contract: atomic per-video files, settings guard, stale temporaries."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vidpipe.core.errors import VidpipeError
from vidpipe.store.labels import LabelSet, VideoLabels
from vidpipe.store.cache import FeatureStore, video_id_from_path

SETTINGS = {"fps": 24, "chunk": 6, "step_seconds": 0.25, "rgb_backbone": "resnet18"}


def _arrays(steps, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(steps, 8)).astype(np.float32),
            rng.normal(size=(steps, 4)).astype(np.float32),
            np.arange(steps) * 0.25)


def test_write_read_roundtrip_keeps_arrays_and_attributes(tmp_path):
    store = FeatureStore.open_or_create(tmp_path / "cache", SETTINGS)
    rgb, flow, ts = _arrays(10)
    store.write("clip_a.mp4", rgb, flow, ts, {"source_path": "a/clip.mp4", "settings": {"x": 1}})

    reopened = FeatureStore.open(tmp_path / "cache")
    video = reopened.read("clip_a.mp4")
    assert reopened.video_ids() == ["clip_a.mp4"]
    np.testing.assert_array_equal(video.rgb, rgb)
    np.testing.assert_array_equal(video.flow, flow)
    np.testing.assert_array_equal(video.timestamps, ts)
    assert video.attrs["source_path"] == "a/clip.mp4"
    assert video.attrs["settings"] == {"x": 1}
    assert reopened.num_steps("clip_a.mp4") == 10
    assert reopened.settings == SETTINGS


def test_other_settings_are_refused_with_the_differing_keys(tmp_path):
    FeatureStore.open_or_create(tmp_path, SETTINGS)
    with pytest.raises(VidpipeError, match="chunk"):
        FeatureStore.open_or_create(tmp_path, {**SETTINGS, "chunk": 8})


def test_missing_cache_is_a_user_error(tmp_path):
    with pytest.raises(VidpipeError, match="not a vidpipe feature cache"):
        FeatureStore.open(tmp_path / "nowhere")


def test_length_mismatch_is_refused(tmp_path):
    store = FeatureStore.open_or_create(tmp_path, SETTINGS)
    rgb, flow, ts = _arrays(5)
    with pytest.raises(ValueError, match="differ in length"):
        store.write("v", rgb, flow[:4], ts)


def test_killed_writer_leaves_no_visible_file_and_its_temp_is_removed(tmp_path):
    store = FeatureStore.open_or_create(tmp_path, SETTINGS)
    store.write("done", *_arrays(3))
    # A child process starts a write and is killed before it can finish.
    script = (
        "import os, numpy as np, h5py\n"
        "from vidpipe.store import cache as s\n"
        "st = s.FeatureStore.open(r'%s')\n"
        "orig = h5py.File.__exit__\n"
        "def die(*a):\n"
        "    orig(*a); os.kill(os.getpid(), 9)\n"
        "h5py.File.__exit__ = die\n"
        "st.write('half', np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(4))\n" % tmp_path)
    result = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert result.returncode == -9
    leftovers = list((tmp_path / "videos").glob(".tmp-*"))
    assert leftovers, "the killed writer should have left its temporary file"
    reopened = FeatureStore.open(tmp_path)
    assert reopened.video_ids() == ["done"]
    FeatureStore.open_or_create(tmp_path, SETTINGS)  # a new writer cleans up dead writers' files
    assert not list((tmp_path / "videos").glob(".tmp-*"))


def test_temporaries_of_running_writers_are_kept(tmp_path):
    store = FeatureStore.open_or_create(tmp_path, SETTINGS)
    import socket
    live = tmp_path / "videos" / f".tmp-{socket.gethostname()}-{os.getpid()}-abc.h5"
    live.write_bytes(b"in progress")
    store.remove_stale_temporaries()
    assert live.exists()


def test_video_ids_are_filesystem_safe_and_distinct():
    ids = {video_id_from_path(p) for p in ["a/b c.mp4", "a b/c.mp4", "../x.mp4", "ab/c.mp4"]}
    assert len(ids) == 4
    assert all("/" not in i and not i.startswith(".") for i in ids)


def test_labelset_roundtrip(tmp_path):
    labels = LabelSet(
        class_names=["background", "jump"],
        videos={"v": VideoLabels(np.eye(2, dtype=np.float32)[[0, 1, 1]], np.array([0, 0, 1], bool))},
        splits={"v": "test"})
    labels.save(tmp_path / "labels.h5")
    loaded = LabelSet.load(tmp_path / "labels.h5")
    assert loaded.class_names == ["background", "jump"]
    assert loaded.split("test") == ["v"] and loaded.split("train") == []
    np.testing.assert_array_equal(loaded.videos["v"].targets, labels.videos["v"].targets)
    np.testing.assert_array_equal(loaded.videos["v"].ambiguous, [False, False, True])
    assert json.loads(json.dumps(loaded.splits)) == {"v": "test"}
