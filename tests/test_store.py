"""The feature store contract: atomic per-video files, settings guard, stale temporaries,
self-describing verified files, damaged manifests, concurrent creators, verify/repair."""
import json
import os
import subprocess
import sys
import time

import h5py

import numpy as np
import pytest

from vidpipe.core.errors import VidpipeError
from vidpipe.store.labels import LabelSet, VideoLabels
from vidpipe.store.cache import BLOCK_STEPS, MANIFEST, FeatureStore, check_cache, video_id_from_path

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
        "def die(fd):\n"   # the temporary is written, not yet flushed nor renamed
        "    os.kill(os.getpid(), 9)\n"
        "os.fsync = die\n"
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


def damage_dataset(path, name, offset=16, data=b"\xff" * 8):
    """Overwrite bytes inside one dataset's stored data, as a bad disk sector would."""
    with h5py.File(path, "r") as h5:
        where = h5[name].id.get_offset()
    with open(path, "r+b") as handle:
        handle.seek(where + offset)
        handle.write(data)


def _cache_with(tmp_path, *video_ids, settings=SETTINGS):
    store = FeatureStore.open_or_create(tmp_path / "cache", settings)
    for seed, video_id in enumerate(video_ids):
        store.write(video_id, *_arrays(6, seed))
    return store


def test_damaged_bytes_inside_rgb_are_refused_on_read_and_named_by_check(tmp_path):
    store = _cache_with(tmp_path, "a", "b")
    damage_dataset(store.videos_dir / "a.h5", "rgb")
    with pytest.raises(VidpipeError, match=r"a\.h5: damaged cache file: checksum mismatch") as info:
        store.read("a")
    assert "\n" not in str(info.value)
    assert "checksum mismatch" in store.check("a")
    assert store.check("b") is None and store.read("b").rgb.shape == (6, 8)
    assert store.read("a", verify=False).rgb.shape == (6, 8)   # cheap to skip, on request


def test_a_long_video_is_read_in_verified_blocks_equal_to_the_whole(tmp_path):
    store = FeatureStore.open_or_create(tmp_path / "cache", SETTINGS)
    rgb, flow, ts = _arrays(BLOCK_STEPS * 2 + 5)
    store.write("long", rgb, flow, ts)
    blocks = list(store.read_steps("long"))
    assert [len(b) for b in blocks] == [BLOCK_STEPS, BLOCK_STEPS, 5]
    whole = store.read("long")
    for name in ("rgb", "flow", "timestamps"):
        np.testing.assert_array_equal(np.concatenate([getattr(b, name) for b in blocks]),
                                      getattr(whole, name))
    damage_dataset(store.videos_dir / "long.h5", "flow", offset=4 * 4 * BLOCK_STEPS * 2)  # in its last block
    steps = store.read_steps("long")
    with pytest.raises(VidpipeError, match=r"long\.h5: damaged cache file: checksum mismatch"):
        next(steps)                                 # refused before the first block


def test_a_file_missing_timestamps_is_damaged_not_cached(tmp_path):
    store = _cache_with(tmp_path, "a")
    with h5py.File(store.videos_dir / "a.h5", "r+") as h5:
        del h5["timestamps"]
    assert "no timestamps dataset" in store.check("a")
    for read in (store.read, store.timestamps, store.num_steps, lambda v: next(store.read_steps(v))):
        with pytest.raises(VidpipeError, match="no timestamps dataset"):
            read("a")


def test_a_file_made_with_other_settings_is_refused(tmp_path):
    _cache_with(tmp_path, "a", settings={**SETTINGS, "seed": 0})
    (tmp_path / "cache" / MANIFEST).unlink()
    with h5py.File(tmp_path / "cache" / "videos" / "a.h5", "r") as h5:
        assert json.loads(h5.attrs["cache_settings"]) == {**SETTINGS, "seed": 0}
    # A lost manifest cannot be recreated with other settings over the files...
    with pytest.raises(VidpipeError, match=r"other settings \(differs in: seed\).*cache repair"):
        FeatureStore.open_or_create(tmp_path / "cache", {**SETTINGS, "seed": 5})
    assert not (tmp_path / "cache" / MANIFEST).exists()
    # ...and a file swapped in from another cache is named by the settings it differs in.
    FeatureStore.open_or_create(tmp_path / "cache", {**SETTINGS, "seed": 0})
    other = _cache_with(tmp_path / "other", "a", settings={**SETTINGS, "seed": 5})
    os.replace(other.videos_dir / "a.h5", tmp_path / "cache" / "videos" / "a.h5")
    with pytest.raises(VidpipeError, match=r"other settings than the manifest's \(differs in: seed\)"):
        FeatureStore.open(tmp_path / "cache").read("a")


@pytest.mark.parametrize("content", [b"\x8f\xff\x00garbage", b"[]", b"null", b'{"format_version": 2}',
                                     b'{"format_version": 2, "settings": "x"}', b"{" * 100_000, b""])
def test_a_damaged_manifest_is_a_one_line_error(tmp_path, content):
    _cache_with(tmp_path, "a")
    (tmp_path / "cache" / MANIFEST).write_bytes(content)
    for open_cache in (lambda: FeatureStore.open(tmp_path / "cache"),
                       lambda: FeatureStore.open_or_create(tmp_path / "cache", SETTINGS)):
        with pytest.raises(VidpipeError, match="corrupt manifest.*cache repair") as info:
            open_cache()
        assert "\n" not in str(info.value)


def test_verify_names_damage_and_repair_rebuilds_the_manifest_and_sets_bad_files_aside(tmp_path):
    store = _cache_with(tmp_path, "a", "b", "c")
    damage_dataset(store.videos_dir / "b.h5", "flow")
    (store.root / MANIFEST).write_bytes(b"null")

    found = check_cache(store.root)
    assert not found.ok and found.videos == 3 and len(found.damaged) == 1
    assert "b.h5" in found.damaged[0] and "corrupt manifest" in found.report()
    assert found.damaged[0].endswith("checksum mismatch (damaged bytes)")   # the fix said once:
    assert found.report().endswith(f"to fix: rerun `vidpipe extract` to extract it again, or "
                                   f"`vidpipe cache repair {store.root}`")

    repaired = check_cache(store.root, repair=True)
    assert repaired.manifest_rebuilt and repaired.moved == ["b"]
    assert repaired.damaged[0].endswith("checksum mismatch (damaged bytes); moved to damaged/ "
                                        "(`vidpipe extract` extracts it again)")
    assert "to fix" not in repaired.report()
    reopened = FeatureStore.open(store.root)
    assert reopened.settings == SETTINGS and reopened.video_ids() == ["a", "c"]
    assert (store.root / "damaged" / "b.h5").is_file()
    assert check_cache(store.root).ok


def test_two_processes_creating_one_cache_with_different_settings_exactly_one_wins(tmp_path):
    """Real processes released together: create-exclusive, not check-then-write."""
    script = (
        "import sys, time\n"
        "from vidpipe.core.errors import VidpipeError\n"
        "from vidpipe.store.cache import FeatureStore\n"
        "root, chunk, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "try:\n"
        "    FeatureStore.open_or_create(root, {'chunk': chunk})\n"
        "except VidpipeError as exc:\n"
        "    print(exc); sys.exit(2)\n")
    for trial in range(3):
        root = tmp_path / f"cache{trial}"
        start = time.time() + 1.5   # both interpreters have imported by then
        procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(chunk), str(start)],
                                  stdout=subprocess.PIPE, text=True) for chunk in (6, 8)]
        codes = [p.wait(timeout=60) for p in procs]
        outputs = [p.stdout.read() for p in procs]
        assert sorted(codes) == [0, 2], outputs
        loser = outputs[codes.index(2)]
        assert "other settings (differs in: chunk)" in loser and loser.count("\n") == 1
        winner = (6, 8)[codes.index(0)]
        assert FeatureStore.open(root).settings == {"chunk": winner}


def test_repair_upgrades_a_format_1_cache(tmp_path):
    """Caches of an older vidpipe (files without settings or checksums) are refused with the
    way out, and `repair` gives their files both."""
    store = _cache_with(tmp_path, "a", "b")
    for video_id in ("a", "b"):
        with h5py.File(store.videos_dir / f"{video_id}.h5", "r+") as h5:
            del h5.attrs["cache_settings"], h5.attrs["checksum"]
    (store.root / MANIFEST).write_text(json.dumps({"format_version": 1, "settings": SETTINGS}))
    with pytest.raises(VidpipeError, match="format 1.*cache repair"):
        FeatureStore.open(store.root)

    repaired = check_cache(store.root, repair=True)
    assert repaired.upgraded == 2 and not repaired.moved and check_cache(store.root).ok
    upgraded = FeatureStore.open(store.root)
    np.testing.assert_array_equal(upgraded.read("b").rgb, _arrays(6, 1)[0])
    assert upgraded.read("a").attrs["video_id"] == "a"
