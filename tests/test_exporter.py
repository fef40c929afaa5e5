"""`vidpipe export-features --format lstr`: the LSTR/TeSTra/MAT layout, read as LSTR's data
loader reads it, and `import-features` of an export giving back the same cache.

"Bit for bit" here means: the same manifest settings; the same video ids; for each video
the same rgb / flow (float32) and timestamps (float64) arrays, byte for byte, and the same
attributes (so the HDF5 files carry the same checksum and settings record); and labels with
the same class names, splits, ambiguous masks and float32 targets byte for byte. It holds
for labels vidpipe makes (centre rule, imports), whose rows are 1/k over their classes.
"""
import json

import h5py
import numpy as np
import pytest

from vidpipe.core.errors import BatchIncomplete, VidpipeError
from vidpipe.pipeline.cli import main
from vidpipe.store.cache import FeatureStore
from vidpipe.store.exporters import LSTR_FEATURE_SIZES, export_lstr
from vidpipe.store.importers import import_lstr
from vidpipe.store.labels import LABELS_FILE, LabelSet, VideoLabels, build_labels
from test_importer import FLOW, RGB, write_lstr_folder
from train_helpers import cli_error

SETTINGS = {"extractor": "vidpipe two-stream (TSN convention)", "fps": 24.0, "chunk": 6,
            "step_seconds": 0.25, "rgb_backbone": "resnet50", "flow_backbone": "resnet50",
            "rgb_dim": 2048, "flow_dim": 2048, "flow_method": "dis", "seed": 0}


def make_extracted_cache(root, videos, rgb_dim=2048, flow_dim=2048, seed=0):
    """A cache as `vidpipe extract` leaves it: videos {id: T}, timestamps from a non-zero
    stream start (not i * 0.25 exactly), attributes of every kind."""
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(root, SETTINGS)
    for i, (video_id, steps) in enumerate(videos.items()):
        store.write(video_id, rng.standard_normal((steps, rgb_dim)).astype(np.float32),
                    rng.standard_normal((steps, flow_dim)).astype(np.float32),
                    0.1 * (i + 1) / 3 + np.arange(steps) * 0.25,
                    attrs={"source_path": f"videos/{video_id}", "size": 1234 + i,
                           "duration_s": steps / 4 + 0.1 / 3, "decoder": "pyav",
                           "versions": {"torch": "2.5.0", "numpy": "2.1"}, "rotated": False})
    return store


def label_cache(tmp_path, cache, rows):
    csv = tmp_path / "ann.csv"
    csv.write_text("video,label,start_s,end_s,split\n" + "\n".join(rows) + "\n")
    labels = build_labels(FeatureStore.open(cache), csv)
    labels.save(cache / LABELS_FILE)
    return labels


def assert_same_cache(a, b):
    store_a, store_b = FeatureStore.open(a), FeatureStore.open(b)
    assert store_b.settings == store_a.settings
    assert store_b.video_ids() == store_a.video_ids()
    for video_id in store_a.video_ids():
        fa, fb = store_a.read(video_id), store_b.read(video_id)
        for name in ("rgb", "flow", "timestamps"):
            x, y = getattr(fa, name), getattr(fb, name)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), (video_id, name)
        assert fb.attrs == fa.attrs
        with h5py.File(store_a.videos_dir / f"{video_id}.h5") as ha, \
                h5py.File(store_b.videos_dir / f"{video_id}.h5") as hb:
            assert dict(hb.attrs) == dict(ha.attrs)       # same checksum and settings record
    labels_a, labels_b = LabelSet.load(a / LABELS_FILE), LabelSet.load(b / LABELS_FILE)
    assert labels_b.class_names == labels_a.class_names
    assert labels_b.splits == labels_a.splits
    assert sorted(labels_b.videos) == sorted(labels_a.videos)
    for video_id, la in labels_a.videos.items():
        lb = labels_b.videos[video_id]
        assert lb.targets.dtype == la.targets.dtype == np.float32
        assert lb.targets.tobytes() == la.targets.tobytes(), video_id
        np.testing.assert_array_equal(lb.ambiguous, la.ambiguous)


def test_extracted_cache_round_trip(tmp_path):
    cache = tmp_path / "cache"
    make_extracted_cache(cache, {"clip_a.mp4": 40, "sub__clip_b.mp4": 24, "clip_c.mp4": 16})
    label_cache(tmp_path, cache, [
        "clip_a.mp4,Jump,1.0,3.0,train", "clip_a.mp4,Spin,2.5,4.0,train",   # overlap: 1/2 each
        "clip_a.mp4,Ambiguous,6.0,7.0,train", "clip_a.mp4,Spin,6.5,8.0,train",
        "sub__clip_b.mp4,Spin,0.2,2.0,test", "clip_c.mp4,background,0,0,test"])

    report = export_lstr(cache, tmp_path / "out", progress=False)
    assert sorted(report.exported) == ["clip_a.mp4", "clip_c.mp4", "sub__clip_b.mp4"]
    # 2048-d features go in folders LSTR knows as 2048-d, and the report says what they are
    assert report.folders == {"rgb": "rgb_kinetics_resnet50", "flow": "flow_kinetics_resnet50"}
    assert any("vidpipe's resnet50 features" in note for note in report.notes)

    import_lstr(tmp_path / "out", tmp_path / "back", progress=False)
    assert_same_cache(cache, tmp_path / "back")


def test_layout_as_lstr_reads_it(tmp_path):
    cache = tmp_path / "cache"
    make_extracted_cache(cache, {"clip_a.mp4": 40, "clip_b.mp4": 24})
    labels = label_cache(tmp_path, cache, [
        "clip_a.mp4,Jump,1.0,3.0,train", "clip_a.mp4,Spin,2.5,4.0,train",
        "clip_a.mp4,Ambiguous,6.0,7.0,train", "clip_b.mp4,Spin,0.2,2.0,test"])
    out = tmp_path / "out"
    main(["export-features", "--format", "lstr", str(cache), str(out)])

    # What LSTR's parser and data layer do: data_info[DATA_NAME], then
    # np.load(DATA_ROOT/<feature folder>/<session>.npy) for each session of the split.
    info = json.loads((out / "data_info.json").read_text())["TVSeries"]
    assert info["class_names"] == ["Background", "Jump", "Spin", "Ambiguous"]
    assert info["num_classes"] == 4 and info["ignore_index"] == 3
    assert info["fps"] == 4 and info["metrics"] == "AP"
    assert info["train_session_set"] == ["clip_a.mp4"]
    assert info["test_session_set"] == ["clip_b.mp4"]
    store = FeatureStore.open(cache)
    for session in info["train_session_set"] + info["test_session_set"]:
        visual = np.load(f"{info['data_root']}/rgb_kinetics_resnet50/{session}.npy", mmap_mode="r")
        motion = np.load(f"{info['data_root']}/flow_kinetics_resnet50/{session}.npy", mmap_mode="r")
        target = np.load(f"{info['data_root']}/target_perframe/{session}.npy")
        assert visual.dtype == motion.dtype == target.dtype == np.float32
        assert visual.shape[1] == LSTR_FEATURE_SIZES["rgb_kinetics_resnet50"]
        np.testing.assert_array_equal(visual, store.read(session).rgb)
        assert len(visual) == len(motion) == len(target) == store.num_steps(session)

    target = np.load(out / "target_perframe/clip_a.mp4.npy")
    # the field's rows: 1 per class covering the step's centre; ambiguous column 1 and not
    # background where only an Ambiguous segment covers it
    assert target[5].tolist() == [0, 1, 0, 0]        # centre 1.375 s: Jump
    assert target[10].tolist() == [0, 1, 1, 0]       # centre 2.625 s: Jump and Spin
    assert target[25].tolist() == [0, 0, 0, 1]       # centre 6.375 s: Ambiguous only
    assert target[35].tolist() == [1, 0, 0, 0]
    np.testing.assert_array_equal(target[:, 3] == 1, labels.videos["clip_a.mp4"].ambiguous)
    # LSTR's loss skips rows whose ignore column is 1; every other row has a class
    kept = target[target[:, info["ignore_index"]] != 1]
    assert (kept[:, :3].sum(1) >= 1).all()


def test_public_thumos_features_export_as_they_came(tmp_path):
    videos = {"video_validation_0000051": 9, "video_test_0000004": 7}
    written = write_lstr_folder(tmp_path / "src", videos)
    for video, (_, _, target) in written.items():   # the field's ambiguous rows: not background
        target[2] = 0
        target[2, 21] = 1
        np.save(tmp_path / f"src/target_perframe/{video}.npy", target)
    import_lstr(tmp_path / "src", tmp_path / "cache", progress=False)

    report = export_lstr(tmp_path / "cache", tmp_path / "out", progress=False)
    assert report.folders == {"rgb": RGB, "flow": FLOW} and report.data_name == "THUMOS"
    for video, (rgb, flow, target) in written.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"out/{RGB}/{video}.npy"), rgb)
        np.testing.assert_array_equal(np.load(tmp_path / f"out/{FLOW}/{video}.npy"),
                                      flow.astype(np.float32))
        np.testing.assert_array_equal(np.load(tmp_path / f"out/target_perframe/{video}.npy"),
                                      target)
    info = json.loads((tmp_path / "out/data_info.json").read_text())["THUMOS"]
    assert info["class_names"][0] == "Background" and info["class_names"][21] == "Ambiguous"
    assert info["ignore_index"] == 21 and info["metrics"] == "AP"
    assert info["train_session_set"] == ["video_validation_0000051"]
    assert info["test_session_set"] == ["video_test_0000004"]

    import_lstr(tmp_path / "out", tmp_path / "back", progress=False)
    assert_same_cache(tmp_path / "cache", tmp_path / "back")


def test_soft_rows_of_another_shape_come_back_uniform(tmp_path):
    """The field's targets are 0/1: a 0.7/0.3 row is exported as two 1s, read back as 1/2."""
    cache = tmp_path / "cache"
    make_extracted_cache(cache, {"clip_a.mp4": 4}, rgb_dim=8, flow_dim=8)
    targets = np.array([[1, 0, 0], [0, 0.7, 0.3], [0, 1, 0], [1, 0, 0]], np.float32)
    LabelSet(["background", "Jump", "Spin"], {"clip_a.mp4": VideoLabels(
        targets, np.zeros(4, bool))}).save(cache / LABELS_FILE)
    report = export_lstr(cache, tmp_path / "out", progress=False)
    assert report.folders == {"rgb": "rgb_vidpipe_resnet50", "flow": "flow_vidpipe_resnet50"}
    assert any("'rgb_vidpipe_resnet50': 8 to FEATURE_SIZES" in note for note in report.notes)
    assert any("no train/test split" in note for note in report.notes)
    import_lstr(tmp_path / "out", tmp_path / "back", progress=False)
    back = LabelSet.load(tmp_path / f"back/{LABELS_FILE}").videos["clip_a.mp4"].targets
    np.testing.assert_array_equal(back[1], [0, 0.5, 0.5])
    np.testing.assert_array_equal(back[[0, 2, 3]], targets[[0, 2, 3]])


def test_unlabelled_and_bad_videos(tmp_path, capsys):
    cache = tmp_path / "cache"
    make_extracted_cache(cache, {"clip_a.mp4": 8, "clip_b.mp4": 8, "clip_c.mp4": 8},
                         rgb_dim=4, flow_dim=4)
    short = VideoLabels(np.eye(2, dtype=np.float32)[[0] * 5], np.zeros(5, bool))
    full = VideoLabels(np.eye(2, dtype=np.float32)[[0, 1] * 4], np.zeros(8, bool))
    LabelSet(["background", "Jump"], {"clip_a.mp4": full, "clip_b.mp4": short},
             {"clip_a.mp4": "train", "clip_b.mp4": "test"}).save(cache / LABELS_FILE)
    with pytest.raises(BatchIncomplete, match="1 of 2 videos not exported .*clip_b.mp4: 5 "
                                              "labelled steps but 8 cached steps"):
        export_lstr(cache, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out/target_perframe").iterdir()) == ["clip_a.mp4.npy"]
    info = json.loads((tmp_path / "out/data_info.json").read_text())["TVSeries"]
    assert info["train_session_set"] == ["clip_a.mp4"] and info["test_session_set"] == []

    (cache / LABELS_FILE).unlink()
    err = cli_error(capsys, ["export-features", str(cache), str(tmp_path / "o2")])
    assert "labels.h5: labels file not found" in err
    with pytest.raises(VidpipeError, match="must start with 'rgb_'"):
        LabelSet(["background", "Jump"], {"clip_a.mp4": full}).save(cache / LABELS_FILE)
        export_lstr(cache, tmp_path / "o3", rgb_dir="kinetics", progress=False)


def test_recipe_features_get_the_public_folder_names(tmp_path):
    cache = tmp_path / "cache"
    store = FeatureStore.open_or_create(cache, {**SETTINGS, "recipe": "tsn-kinetics"})
    store.write("clip.mp4", np.ones((3, 2048)), np.ones((3, 1024)), np.arange(3) * 0.25)
    LabelSet(["background", "Jump"], {"clip.mp4": VideoLabels(
        np.eye(2, dtype=np.float32)[[0, 1, 0]], np.zeros(3, bool))}).save(cache / LABELS_FILE)
    report = export_lstr(cache, tmp_path / "out", data_name="MyData", progress=False)
    assert report.folders == {"rgb": "rgb_kinetics_resnet50", "flow": "flow_kinetics_bninception"}
    assert not [note for note in report.notes if "FEATURE_SIZES" in note or "LSTR's name" in note]
    assert list(json.loads((tmp_path / "out/data_info.json").read_text())) == ["MyData"]


def test_damaged_export_record_is_one_line(tmp_path, capsys):
    cache = tmp_path / "cache"
    make_extracted_cache(cache, {"clip.mp4": 3}, rgb_dim=4, flow_dim=4)
    LabelSet(["background", "Jump"], {"clip.mp4": VideoLabels(
        np.eye(2, dtype=np.float32)[[0, 1, 0]], np.zeros(3, bool))}).save(cache / LABELS_FILE)
    export_lstr(cache, tmp_path / "out", progress=False)
    (tmp_path / "out/vidpipe/cache.json").write_text('{"settings": []}')
    err = cli_error(capsys, ["import-features", str(tmp_path / "out"), "--out", str(tmp_path / "b")])
    assert "vidpipe/cache.json: not a vidpipe export record" in err
