"""Annotation files (CSV, THUMOS'14 txt, JSON) -> per-step targets on a cache's steps."""
import json

import numpy as np
import pytest

from vidpipe.pipeline.cli import main
from vidpipe.core.errors import VidpipeError
from vidpipe.store.labels import LabelSet, build_labels, segments_to_targets
from vidpipe.store.cache import FeatureStore
from train_helpers import cli_error

STEP = 0.25


def make_cache(root, videos):
    """videos: {video_id: (num_steps, attrs)}; timestamps i * STEP."""
    store = FeatureStore.open_or_create(root, {"step_seconds": STEP, "fps": 24, "chunk": 6})
    for video_id, (steps, attrs) in videos.items():
        store.write(video_id, np.zeros((steps, 4)), np.zeros((steps, 3)),
                    np.arange(steps) * STEP, attrs)
    return store


@pytest.fixture
def store(tmp_path):
    return make_cache(tmp_path / "cache", {
        "clip_a.mp4": (20, {"source_path": "clip_a.mp4"}),
        "sub__clip_b.mp4": (12, {"source_path": "sub/clip_b.mp4"}),
    })


def test_centre_rule_overlaps_and_short_segments():
    ts = np.arange(8) * STEP  # centres 0.125, 0.375, ...
    targets = segments_to_targets([(1, 0.25, 1.0), (2, 0.75, 1.25), (2, 1.6, 1.62)],
                                  ts, STEP, 3)
    assert targets.shape == (8, 3) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(1), 1)
    assert targets[0].tolist() == [1, 0, 0]            # centre 0.125 before the segment
    assert targets[1].tolist() == [0, 1, 0]
    assert targets[3].tolist() == [0, 0.5, 0.5]        # both classes: soft multi-label
    assert targets[4].tolist() == [0, 0, 1]            # centre 1.125 < 1.25
    assert targets[5].tolist() == [1, 0, 0]            # centre 1.375 >= 1.25: end is open
    assert targets[6].tolist() == [0, 0, 1]            # 20 ms segment keeps its step
    assert targets[7].tolist() == [1, 0, 0]


def test_csv_with_split_and_path_matching(store, tmp_path):
    csv = tmp_path / "ann.csv"
    csv.write_text("video,label,start_s,end_s,split\n"
                   "clip_a,Spin,1.0,2.0,train\n"
                   "clip_a,Bounce,3.0,3.5,train\n"
                   "sub/clip_b.mp4,Spin,0,1,test\n")
    labels = build_labels(store, csv)
    assert labels.class_names == ["background", "Bounce", "Spin"]
    assert labels.splits == {"clip_a.mp4": "train", "sub__clip_b.mp4": "test"}
    a = labels.videos["clip_a.mp4"].targets
    assert a.shape == (20, 3)
    assert np.flatnonzero(a[:, 2]).tolist() == [4, 5, 6, 7]
    assert np.flatnonzero(a[:, 1]).tolist() == [12, 13]
    assert labels.videos["sub__clip_b.mp4"].targets[:4, 2].tolist() == [1, 1, 1, 1]
    assert not labels.videos["clip_a.mp4"].ambiguous.any()


def test_given_class_order_and_unknown_class(store, tmp_path):
    csv = tmp_path / "ann.csv"
    csv.write_text("clip_a.mp4,Spin,1,2\n")  # no header: positional columns
    labels = build_labels(store, csv, ["background", "Bounce", "Spin", "Slide"])
    assert labels.class_names == ["background", "Bounce", "Spin", "Slide"]
    assert labels.videos["clip_a.mp4"].targets[4:8, 2].tolist() == [1, 1, 1, 1]
    with pytest.raises(VidpipeError, match=r"ann.csv:1: unknown class 'Spin'"):
        build_labels(store, csv, ["Bounce"])


def test_video_not_in_cache_is_an_error(store, tmp_path):
    csv = tmp_path / "ann.csv"
    csv.write_text("video,label,start_s,end_s\nclip_a,Spin,1,2\nnowhere,Spin,1,2\n")
    with pytest.raises(VidpipeError, match="'nowhere' is not in the cache"):
        build_labels(store, csv)
    assert list(build_labels(store, csv, skip_missing=True).videos) == ["clip_a.mp4"]


def test_labels_of_no_video_are_an_error_and_keep_the_labels_file(store, tmp_path, capsys):
    """Nothing to label (all videos skipped, or a header-only CSV) must not replace a good
    labels.h5 with an empty one and exit 0."""
    good, elsewhere, empty = tmp_path / "good.csv", tmp_path / "elsewhere.csv", tmp_path / "empty.csv"
    good.write_text("video,label,start_s,end_s\nclip_a,Spin,1,2\n")
    elsewhere.write_text("video,label,start_s,end_s\nnowhere,Spin,1,2\n")
    empty.write_text("video,label,start_s,end_s\n")
    main(["labels", str(good), "--cache", str(store.root)])
    for argv, message in [([str(elsewhere), "--skip-missing"], "elsewhere.csv: no annotated video is in the cache"),
                          ([str(empty)], "empty.csv: no annotated segment")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["labels", *argv, "--cache", str(store.root)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(LabelSet.load(store.root / "labels.h5").videos) == ["clip_a.mp4"]
    err = cli_error(capsys, ["labels", str(good), "--cache", str(store.root), "--classes", "clasess.txt"])
    assert err == ("error: --classes clasess.txt: file not found (a text file with one class per line, "
                   "or comma-separated names)")   # was: unknown class 'Spin' (known: clasess.txt)


@pytest.mark.parametrize("row, message", [
    ("clip_a,Spin,2,1", "need 0 <= start < end"),
    ("clip_a,Spin,one,2", "must be numbers"),
    ("clip_a,Spin,1", "expected 4 columns"),
])
def test_bad_csv_rows(store, tmp_path, row, message):
    csv = tmp_path / "ann.csv"
    csv.write_text(f"video,label,start_s,end_s\n{row}\n")
    with pytest.raises(VidpipeError, match=f"ann.csv:2: .*{message}"):
        build_labels(store, csv)


def test_thumos_folder_with_ambiguous(tmp_path):
    store = make_cache(tmp_path / "cache", {
        "video_validation_0000051.mp4": (40, {"source_path": "video_validation_0000051.mp4"}),
        "video_test_0000004.mp4": (40, {"source_path": "video_test_0000004.mp4"}),
    })
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "BaseballPitch_val.txt").write_text("video_validation_0000051  1.0  2.0\n")
    (ann / "CliffDiving_test.txt").write_text("video_test_0000004 5.0 6.0\n\n")
    (ann / "Ambiguous_test.txt").write_text("video_test_0000004 7.0 8.0\n")
    (ann / "README").write_text("not an annotation")
    labels = build_labels(store, ann)
    assert labels.class_names == ["background", "BaseballPitch", "CliffDiving"]
    assert labels.splits == {"video_validation_0000051.mp4": "train",
                             "video_test_0000004.mp4": "test"}
    test = labels.videos["video_test_0000004.mp4"]
    assert np.flatnonzero(test.ambiguous).tolist() == [28, 29, 30, 31]
    assert np.flatnonzero(test.targets[:, 2]).tolist() == [20, 21, 22, 23]
    assert labels.videos["video_validation_0000051.mp4"].targets[4:8, 1].tolist() == [1] * 4


def test_json_schema(store, tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({
        "classes": ["Slide", "Spin"],
        "videos": {
            "clip_a.mp4": {"split": "train", "segments": [
                {"label": "Spin", "start_s": 0.0, "end_s": 0.5},
                {"label": "ambiguous", "start_s": 1.0, "end_s": 1.5}]},
            "clip_b": {"split": "test", "segments": []},
        }}))
    labels = build_labels(store, path)
    assert labels.class_names == ["background", "Slide", "Spin"]
    assert labels.videos["clip_a.mp4"].targets[:2, 2].tolist() == [1, 1]
    assert labels.videos["clip_a.mp4"].ambiguous[4:6].all()
    assert labels.videos["sub__clip_b.mp4"].targets[:, 0].all()  # listed, no action
    bad = tmp_path / "bad.json"
    bad.write_text('{"videos": {"clip_a": {"segments": [{"label": "Spin"}]}}}')
    with pytest.raises(VidpipeError, match=r"videos.clip_a.segments\[0\]"):
        build_labels(store, bad)


def test_ambiguous_stem_match_is_an_error(tmp_path):
    store = make_cache(tmp_path / "cache", {
        "a__x.mp4": (4, {"source_path": "a/x.mp4"}), "b__x.mp4": (4, {"source_path": "b/x.mp4"})})
    csv = tmp_path / "ann.csv"
    csv.write_text("x,Spin,0,1\n")
    with pytest.raises(VidpipeError, match="matches several cache videos"):
        build_labels(store, csv)
    csv.write_text("b/x.mp4,Spin,0,1\n")
    assert list(build_labels(store, csv).videos) == ["b__x.mp4"]


def test_cli_writes_labels_file(store, tmp_path, capsys):
    csv = tmp_path / "ann.csv"
    csv.write_text("video,label,start_s,end_s\nclip_a,Spin,1,2\n")
    main(["labels", str(csv), "--cache", str(store.root), "--classes", "Spin,Bounce"])
    loaded = LabelSet.load(store.root / "labels.h5")
    assert loaded.class_names == ["background", "Spin", "Bounce"]
    assert "1 video, 2 classes (Spin, Bounce)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["labels", str(tmp_path / "missing.csv"), "--cache", str(store.root)])
    assert exit_info.value.code == 2
    assert "missing.csv: annotation file not found" in capsys.readouterr().err


def test_several_sources_are_read_as_one(tmp_path):
    """THUMOS'14 ships validation and test annotations in separate folders."""
    store = make_cache(tmp_path / "cache", {
        "video_validation_0000051.mp4": (40, {"source_path": "video_validation_0000051.mp4"}),
        "video_test_0000004.mp4": (40, {"source_path": "video_test_0000004.mp4"}),
    })
    val, test = tmp_path / "val", tmp_path / "test"
    val.mkdir()
    test.mkdir()
    (val / "BaseballPitch_val.txt").write_text("video_validation_0000051  1.0  2.0\n")
    (test / "BaseballPitch_test.txt").write_text("video_test_0000004 5.0 6.0\n")
    (test / "CliffDiving_test.txt").write_text("video_test_0000004 7.0 8.0\n")
    labels = build_labels(store, [val, test])
    assert labels.class_names == ["background", "BaseballPitch", "CliffDiving"]
    assert labels.splits == {"video_validation_0000051.mp4": "train",
                             "video_test_0000004.mp4": "test"}
    assert labels.videos["video_test_0000004.mp4"].targets[:, 2].sum() == 4   # 7..8 s: 4 steps
    clash = tmp_path / "clash.csv"
    clash.write_text("video,label,start_s,end_s,split\n"
                     "video_test_0000004,BaseballPitch,1,2,train\n")
    with pytest.raises(VidpipeError, match="video_test_0000004.*split 'test'.*'train'"):
        build_labels(store, [test, clash])


def fields_targets(segments, num_chunks, num_classes, fps=24, chunk=6):
    """The field's rule, from frames (as the LSTR/TeSTra/MAT/MiniROAD authors describe it):
    frame f (at f / fps s) has the classes of the segments covering it; chunk i takes the
    classes of its centre frame chunk * i + chunk // 2; 1 per class, background if none."""
    frame_times = np.arange(num_chunks * chunk) / fps
    frames = np.zeros((len(frame_times), num_classes))
    for column, start, end in segments:
        frames[(frame_times >= start) & (frame_times < end), column] = 1
    chunks = frames[chunk * np.arange(num_chunks) + chunk // 2]
    chunks[chunks[:, 1:].sum(1) == 0, 0] = 1
    return chunks


def test_targets_follow_the_fields_centre_frame_rule(tmp_path):
    """Steps of a 24 fps / 6-frame cache labelled from a hand-made annotation, then from
    random ones (one decimal, as THUMOS'14's; all longer than a step): the classes of each
    step are those of the chunk's centre frame."""
    steps = 120                                            # 30 s
    store = make_cache(tmp_path / "cache", {"clip.mp4": (steps, {"source_path": "clip.mp4"})})
    hand_made = [("Jump", 1.0, 2.3), ("Spin", 2.0, 4.1), ("Jump", 4.1, 4.4),
                 ("Spin", 10.0, 10.4), ("Jump", 10.1, 12.0)]
    rng = np.random.default_rng(0)
    random = [(("Jump", "Spin")[rng.integers(2)], round(s, 1), round(s + d, 1))
              for s, d in zip(rng.uniform(0, 28, 40), rng.uniform(0.3, 3, 40))]
    for segments in (hand_made, random):
        csv = tmp_path / "ann.csv"
        csv.write_text("".join(f"clip.mp4,{label},{start},{end}\n" for label, start, end in segments))
        ours = build_labels(store, csv, class_names=["Jump", "Spin"]).videos["clip.mp4"].targets
        column = {"Jump": 1, "Spin": 2}
        field = fields_targets([(column[label], start, end) for label, start, end in segments],
                               steps, 3)
        np.testing.assert_array_equal(ours > 0, field > 0)
        np.testing.assert_allclose(ours, field / field.sum(1, keepdims=True))   # 1/k rows
    # the one difference: a segment shorter than a step around no centre frame still counts
    csv.write_text("clip.mp4,Jump,5.15,5.22\n")
    ours = build_labels(store, csv, class_names=["Jump", "Spin"]).videos["clip.mp4"].targets
    assert np.flatnonzero(ours[:, 1]).tolist() == [20]
    assert not fields_targets([(1, 5.15, 5.22)], steps, 3)[:, 1].any()


def test_activitynet_json(store, tmp_path):
    path = tmp_path / "anet.json"
    path.write_text(json.dumps({"version": "1.3", "database": {
        "clip_a": {"subset": "training", "duration": 5.0, "annotations": [
            {"segment": [1.0, 2.0], "label": "Spin", "label_id": 3},
            {"segment": [2.5, 3.0], "label": "Ambiguous"}]},
        "sub/clip_b.mp4": {"subset": "validation", "annotations": [
            {"segment": [0.0, 0.5], "label": "Bounce"}]},
        "clip_c": {"subset": "testing", "annotations": []}}}))
    labels = build_labels(store, path)                   # clip_c (not in the cache) left out
    assert labels.class_names == ["background", "Bounce", "Spin"]
    assert labels.splits == {"clip_a.mp4": "train", "sub__clip_b.mp4": "test"}
    a = labels.videos["clip_a.mp4"]
    assert np.flatnonzero(a.targets[:, 2]).tolist() == [4, 5, 6, 7]
    assert np.flatnonzero(a.ambiguous).tolist() == [10, 11]
    assert labels.videos["sub__clip_b.mp4"].targets[:2, 1].tolist() == [1, 1]

    # THUMOS'14 in this form: its validation videos are the training set
    path.write_text(json.dumps({"database": {
        "clip_a": {"subset": "Validation", "annotations": [{"segment": [1, 2], "label": "Spin"}]},
        "sub/clip_b.mp4": {"subset": "Test", "annotations": []}}}))
    assert build_labels(store, path).splits == {"clip_a.mp4": "train", "sub__clip_b.mp4": "test"}

    path.write_text(json.dumps({"database": {"clip_a": {"annotations": [{"segment": [1]}]}}}))
    with pytest.raises(VidpipeError, match=r"anet.json: database.clip_a.annotations\[0\]: "
                                           r"expected \{\"segment\""):
        build_labels(store, path)
    path.write_text(json.dumps({"database": {"clip_a": {"subset": "dev", "annotations": []}}}))
    with pytest.raises(VidpipeError, match="unknown subset 'dev'"):
        build_labels(store, path)


def test_segments_are_kept_beside_the_targets(store, tmp_path):
    """labels.h5 keeps the annotated segments (ambiguous ones stay a mask); a labels file
    without them (imported targets, older vidpipe) gives the runs of the targets instead."""
    csv = tmp_path / "ann.csv"
    csv.write_text("video,label,start_s,end_s\nclip_a,Spin,1.0,2.1\nclip_a,Bounce,0.3,0.8\n"
                   "clip_a,Ambiguous,3,4\nsub/clip_b.mp4,Spin,0,1\n")
    build_labels(store, csv).save(tmp_path / "labels.h5")
    labels = LabelSet.load(tmp_path / "labels.h5")
    ts = store.timestamps("clip_a.mp4")
    assert [(s.label, s.start_s, s.end_s) for s in labels.segments("clip_a.mp4", ts, STEP)] == [
        ("Bounce", 0.3, 0.8), ("Spin", 1.0, 2.1)]          # as annotated, not step-rounded
    labels.videos["clip_a.mp4"].segments = None
    derived = labels.segments("clip_a.mp4", ts, STEP)
    assert [(s.label, s.start_s, s.end_s) for s in derived] == [
        ("Bounce", 0.25, 0.75), ("Spin", 1.0, 2.0)]        # runs of steps whose centre is inside
