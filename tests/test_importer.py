"""`vidpipe import-features --format lstr` on generated LSTR-layout folders."""
import json
import shutil

import numpy as np
import pytest

from vidpipe.pipeline.cli import main
from vidpipe.core.errors import VidpipeError
from vidpipe.store.importers import THUMOS_TEST, THUMOS_TRAIN, import_lstr
from vidpipe.store.labels import LabelSet
from vidpipe.store.cache import FeatureStore
from train_helpers import cli_error

RGB, FLOW = "rgb_kinetics_resnet50", "flow_kinetics_bninception"


def write_lstr_folder(root, videos, columns=22, rgb_dim=6, flow_dim=4, seed=0):
    """videos: {id: T}. Returns {id: (rgb, flow, target)} as written."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in (RGB, FLOW, "target_perframe"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for video, steps in videos.items():
        rgb = rng.standard_normal((steps, rgb_dim)).astype(np.float32)
        flow = rng.standard_normal((steps, flow_dim))            # float64 on disk, as some releases
        target = np.eye(columns)[rng.integers(0, columns, steps)]
        np.save(root / RGB / f"{video}.npy", rgb)
        np.save(root / FLOW / f"{video}.npy", flow)
        np.save(root / "target_perframe" / f"{video}.npy", target)
        written[video] = (rgb, flow, target)
    return written


def test_thumos_import(tmp_path):
    videos = {"video_validation_0000051": 9, "video_test_0000004": 7}
    written = write_lstr_folder(tmp_path / "src", videos)
    # an overlap of two actions on one step becomes a soft target
    target = written["video_validation_0000051"][2]
    target[3] = 0
    target[3, [2, 5]] = 1
    np.save(tmp_path / "src/target_perframe/video_validation_0000051.npy", target)

    report = import_lstr(tmp_path / "src", tmp_path / "cache", progress=False)
    assert sorted(report.imported) == sorted(videos)

    store = FeatureStore.open(tmp_path / "cache")
    assert store.settings["step_seconds"] == 0.25
    assert store.settings["dataset"] == "thumos"
    assert store.settings["rgb_features"] == RGB and store.settings["flow_features"] == FLOW
    for video, (rgb, flow, target) in written.items():
        features = store.read(video)
        np.testing.assert_array_equal(features.rgb, rgb)
        np.testing.assert_allclose(features.flow, flow.astype(np.float32))
        np.testing.assert_allclose(features.timestamps, np.arange(len(rgb)) * 0.25)

    labels = LabelSet.load(tmp_path / "cache/labels.h5")
    assert labels.num_classes == 21                       # ambiguous column -> mask
    assert labels.class_names[0] == "background" and labels.class_names[1] == "BaseballPitch"
    assert labels.class_names[-1] == "VolleyballSpiking"
    assert labels.splits == {"video_validation_0000051": "train", "video_test_0000004": "test"}
    for video, (_, _, target) in written.items():
        got = labels.videos[video]
        np.testing.assert_array_equal(got.ambiguous, target[:, 21] == 1)
        keep = target[:, 21] == 0
        np.testing.assert_allclose(got.targets[keep].sum(1), 1.0)
        expected = target[:, :21] / np.maximum(target[:, :21].sum(1, keepdims=True), 1)
        np.testing.assert_allclose(got.targets[keep], expected[keep])
    np.testing.assert_allclose(labels.videos["video_validation_0000051"].targets[3, [2, 5]], 0.5)

    # a rerun skips what is there
    again = import_lstr(tmp_path / "src", tmp_path / "cache", progress=False)
    assert sorted(again.skipped) == sorted(videos) and not again.imported


def test_tvseries_import_through_cli(tmp_path, capsys):
    videos = {"24_ep1": 5, "Mad_Men_ep3": 6, "Unknown_ep1": 4}
    write_lstr_folder(tmp_path / "src", videos, columns=31)
    main(["import-features", "--format", "lstr", str(tmp_path / "src"),
          "--out", str(tmp_path / "cache"), "--dataset", "tvseries"])
    assert "3 videos imported" in capsys.readouterr().out
    labels = LabelSet.load(tmp_path / "cache/labels.h5")
    assert labels.num_classes == 31 and labels.class_names[18] == "Get in/out of car"
    assert labels.splits == {"24_ep1": "train", "Mad_Men_ep3": "test"}
    assert not labels.videos["24_ep1"].ambiguous.any()


def test_bad_videos_are_reported_and_others_kept(tmp_path):
    src = tmp_path / "src"
    write_lstr_folder(src, {"video_test_0000001": 5, "video_test_0000002": 5,
                            "video_test_0000003": 5})
    (src / FLOW / "video_test_0000002.npy").unlink()              # a modality missing
    np.save(src / RGB / "video_test_0000003.npy", np.zeros((4, 6)))  # length mismatch
    with pytest.raises(VidpipeError, match="2 of 3 videos not imported") as info:
        import_lstr(src, tmp_path / "cache", progress=False)
    assert f"{FLOW}/video_test_0000002.npy: file not found" in str(info.value)
    store = FeatureStore.open(tmp_path / "cache")
    assert store.video_ids() == ["video_test_0000001"]
    assert list(LabelSet.load(tmp_path / "cache/labels.h5").videos) == ["video_test_0000001"]


def test_length_mismatch_names_the_file(tmp_path):
    src = tmp_path / "src"
    write_lstr_folder(src, {"video_test_0000003": 5})
    np.save(src / RGB / "video_test_0000003.npy", np.zeros((4, 6)))
    with pytest.raises(VidpipeError, match=f"{RGB}/video_test_0000003.npy: 4 steps, but .*has 5"):
        import_lstr(src, tmp_path / "cache", progress=False)


def test_missing_folders_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "src"
    write_lstr_folder(src, {"video_test_0000001": 5})
    (src / "rgb_other").mkdir()
    err = cli_error(capsys, ["import-features", str(src), "--out", str(tmp_path / "cache")])
    assert "several rgb feature folders" in err

    shutil.copytree(src, tmp_path / "no_targets")
    shutil.rmtree(tmp_path / "no_targets/target_perframe")
    with pytest.raises(VidpipeError, match="target_perframe: folder not found"):
        import_lstr(tmp_path / "no_targets", tmp_path / "c2", rgb_dir=RGB)
    with pytest.raises(VidpipeError, match="nope: flow feature folder not found"):
        import_lstr(src, tmp_path / "c3", rgb_dir=RGB, flow_dir="nope")
    with pytest.raises(VidpipeError, match="feature folder not found"):
        import_lstr(tmp_path / "absent", tmp_path / "c4")


def test_unknown_column_count_asks_for_dataset(tmp_path):
    write_lstr_folder(tmp_path / "src", {"x": 3}, columns=5)
    with pytest.raises(VidpipeError, match="5 target columns match no dataset"):
        import_lstr(tmp_path / "src", tmp_path / "cache", progress=False)


def test_thumos_splits_are_lstrs_video_lists(tmp_path):
    """Not a name prefix: LSTR's 200 validation / 213 test videos, others in no split."""
    assert len(THUMOS_TRAIN) == 200 and len(THUMOS_TEST) == 213
    assert {"video_validation_0000051", "video_validation_0000990"} <= THUMOS_TRAIN
    assert {"video_test_0000004", "video_test_0001558", "video_test_0000270"} <= THUMOS_TEST
    videos = {"video_validation_0000051": 4, "video_validation_0000001": 4,
              "video_test_0000007": 4, "video_test_0000005": 4}
    write_lstr_folder(tmp_path / "src", videos)
    report = import_lstr(tmp_path / "src", tmp_path / "cache", progress=False)
    assert sorted(report.unsplit) == ["video_test_0000005", "video_validation_0000001"]
    assert LabelSet.load(tmp_path / "cache/labels.h5").splits == {
        "video_validation_0000051": "train", "video_test_0000007": "test"}


def write_data_info(path, entries):
    path.write_text(json.dumps(entries))
    return path


def test_data_info_gives_columns_splits_and_rate(tmp_path, capsys):
    src = tmp_path / "src"
    written = write_lstr_folder(src, {"a": 6, "b": 5, "c": 3}, columns=4)
    target = written["a"][2]
    target[1] = [0, 0, 0, 1]          # ambiguous only: ambiguous, and background
    target[2] = [0, 1, 0, 1]          # ambiguous during an action
    np.save(src / "target_perframe/a.npy", target)
    info = write_data_info(tmp_path / "data_info.json", {
        "THUMOS": {"class_names": ["x"] * 22, "num_classes": 22, "ignore_index": 21,
                   "fps": 4, "train_session_set": [], "test_session_set": []},
        "Kitchen": {"data_root": "data/Kitchen", "class_names": ["Background", "Cut", "Stir",
                    "Ambiguous"], "num_classes": 4, "ignore_index": 3, "metrics": "AP",
                    "fps": 5, "train_session_set": ["a"], "test_session_set": ["b"]}})
    main(["import-features", str(src), "--out", str(tmp_path / "cache"),
          "--data-info", str(info)])           # the entry is recognised by its 4 columns
    assert "1 in no split" in capsys.readouterr().out
    labels = LabelSet.load(tmp_path / "cache/labels.h5")
    assert labels.class_names == ["background", "Cut", "Stir"]
    assert labels.splits == {"a": "train", "b": "test"}
    got = labels.videos["a"]
    assert got.ambiguous.tolist() == [t[3] == 1 for t in target]
    assert got.targets[1].tolist() == [1, 0, 0] and got.targets[2].tolist() == [0, 1, 0]
    store = FeatureStore.open(tmp_path / "cache")
    assert store.settings["step_seconds"] == 0.2 and store.settings["dataset"] == "kitchen"
    np.testing.assert_allclose(store.timestamps("a"), np.arange(6) * 0.2)

    # LSTR's own file sits in ROOT: used without --data-info; --dataset picks by any case
    write_data_info(src / "data_info.json", json.loads(info.read_text()))
    import_lstr(src, tmp_path / "c2", dataset="kitchen", progress=False)
    assert LabelSet.load(tmp_path / "c2/labels.h5").class_names[1:] == ["Cut", "Stir"]
    with pytest.raises(VidpipeError, match="no dataset 'EK100' .*known: THUMOS, Kitchen"):
        import_lstr(src, tmp_path / "c3", dataset="EK100", progress=False)
    write_data_info(src / "data_info.json", {"Kitchen": {"class_names": ["Background"]}})
    with pytest.raises(VidpipeError, match="data_info.json: Kitchen: not an LSTR data_info entry"):
        import_lstr(src, tmp_path / "c4", dataset="Kitchen", progress=False)
