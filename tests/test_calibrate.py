"""Event metrics of what detect emits (`vidpipe eval --timelines / --checkpoint`) and the
calibrated event rules (`vidpipe calibrate`), on a small random cache and model."""
import json

import numpy as np
import pytest
import torch

from vidpipe.core.config import to_dict
from vidpipe.malt.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from vidpipe.malt.config import Config, DataConfig, ModelConfig
from vidpipe.malt.evaluate import write_json_report
from vidpipe.malt.model import MALT
from vidpipe.pipeline.calibrate import checkpoint_rules, rules_path, search_rules
from vidpipe.pipeline.cli import main
from vidpipe.pipeline.detect import detect
from vidpipe.pipeline.score import LabelledProbs, VideoProbs, score_probabilities
from vidpipe.pipeline.timeline import Timeline, TimelineSettings
from vidpipe.store.cache import FeatureStore
from vidpipe.store.labels import Segment
from train_helpers import cli_error, random_cache

NAMES = ["background", "action_1", "action_2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cache of 6 train + 2 test videos of 80 steps, and a random model whose run held out
    a third of the training videos for validation."""
    root = tmp_path_factory.mktemp("calibrate")
    cache = random_cache(root / "cache", num_train=6, num_test=2, steps=80)
    store = FeatureStore.open(cache)
    cfg = Config(model=ModelConfig(rgb_dim=6, flow_dim=4, num_classes=3, d_model=16, num_heads=2,
                                   ffn_dim=24, long_memory_steps=16, long_memory_stride=4,
                                   short_memory_steps=4, sparse_k=3, num_branches=2,
                                   branch_queries=[4, 3], branch_layers=[1, 2]),
                 data=DataConfig(val_fraction=0.34))
    torch.manual_seed(0)
    model = MALT(cfg.model).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)
    checkpoint = root / "run" / "last.pt"
    save_checkpoint(Checkpoint(model_state=model.state_dict(), config=to_dict(cfg),
                               feature_settings=store.settings, class_names=NAMES), checkpoint)
    return store, checkpoint


def test_eval_of_timelines_equals_eval_of_the_checkpoint(setup, tmp_path, capsys):
    """detect's timeline files and the checkpoint's streaming run on the same videos with the
    same rules give the same event report; the frame table comes first, the picture is made."""
    store, checkpoint = setup
    test_ids = ["video_6", "video_7"]
    detect(test_ids, checkpoint, out=tmp_path / "timelines", cache=store.root, picture=False)
    main(["eval", "--timelines", str(tmp_path / "timelines"), "--cache", str(store.root),
          "--out", str(tmp_path / "timelines.json")])
    main(["eval", "--checkpoint", str(checkpoint), "--cache", str(store.root),
          "--out", str(tmp_path / "checkpoint.json")])
    printed = capsys.readouterr().out
    assert "start p-AP" in printed and "segment F1@0.10" in printed and "frame mAP " in printed
    from_timelines = json.loads((tmp_path / "timelines.json").read_text())
    from_checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert sorted(from_timelines["videos"]) == test_ids and "mAP" in from_checkpoint
    events = from_checkpoint["events"]
    assert events["rules_source"] == "default rules" and events["num_videos"] == 2
    for key in ("start_ap", "f1", "segment_counts", "edit", "latency_s", "false_starts_per_hour",
                "num_starts", "num_true_starts"):
        assert from_timelines[key] == events[key], key
    assert from_timelines["num_true_starts"] > 0
    assert (tmp_path / "checkpoint.png").stat().st_size > 0


def test_calibrate_on_validation_videos_then_detect_and_eval_use_the_rules(setup, tmp_path, capsys):
    store, checkpoint = setup
    assert "test split 'test'" in cli_error(capsys, ["calibrate", "--checkpoint", str(checkpoint),
                                                     "--cache", str(store.root), "--split", "test"])
    main(["calibrate", "--checkpoint", str(checkpoint), "--cache", str(store.root),
          "--objective", "start-ap"])
    assert "videos of split 'val'" in capsys.readouterr().out
    rules = json.loads(rules_path(checkpoint).read_text())
    record = rules["calibration"]
    assert record["objective"] == "start-ap" and record["value"] >= record["default_value"]
    assert len(record["videos"]) == 2 and not set(record["videos"]) & {"video_6", "video_7"}
    settings, source = checkpoint_rules(checkpoint)
    assert settings == TimelineSettings(**rules["settings"]) and "calibrated rules" in source
    (detection,) = detect("video_6", checkpoint, out=tmp_path, cache=store.root, picture=False)
    assert detection.timeline.settings == settings
    assert detection.timeline.metadata["rules"] == source
    given = TimelineSettings(threshold=0.9)
    (detection,) = detect("video_6", checkpoint, out=tmp_path, cache=store.root, picture=False,
                          settings=given)
    assert detection.timeline.settings == given and detection.timeline.metadata["rules"] == "rules as given"


def test_validation_videos_held_out_of_the_test_split_are_refused(setup, tmp_path, capsys):
    """A run whose training split is its test split holds validation videos out of it: 'val'
    is then test videos, refused by name before the model runs."""
    store, checkpoint = setup
    saved = read_checkpoint(checkpoint)
    saved.config["data"]["train_split"] = "test"
    save_checkpoint(saved, tmp_path / "last.pt")
    error = cli_error(capsys, ["calibrate", "--checkpoint", str(tmp_path / "last.pt"),
                               "--cache", str(store.root)])
    assert error == ("error: --split val: the test split 'test' (or videos of it) never choose rules; "
                     "calibrate on validation videos (--split val)")
    assert not rules_path(tmp_path / "last.pt").exists()


def test_rules_of_another_checkpoint_are_not_used(setup, tmp_path, caplog):
    store, checkpoint = setup
    copy = tmp_path / "last.pt"
    copy.write_bytes(checkpoint.read_bytes() + b"\0")            # the run changed since
    rules_path(copy).write_text(json.dumps({
        "format": "vidpipe-event-rules", "version": 1, "checkpoint": {"sha256": "0" * 64},
        "settings": {"threshold": 0.2}, "calibration": {}}))
    assert checkpoint_rules(copy) == (TimelineSettings(), "default rules")
    assert "another version" in caplog.text


def test_calibration_beats_the_default_rules_where_they_miss():
    """Actions whose probability peaks at 0.4 (under the default 0.5), noisy background: the
    chosen rules start lower and find the segments the defaults cannot."""
    rng = np.random.default_rng(0)
    videos = []
    for index in range(4):
        timestamps = np.arange(120) * 0.25
        probs = np.zeros((120, 3))
        probs[:, 1:] = rng.uniform(0, 0.2, (120, 2))
        truth = []
        for start in (10, 50, 90):
            label = 1 + (start // 40 + index) % 2
            probs[start:start + 16, label] = 0.4 + rng.uniform(-0.03, 0.03, 16)
            truth.append(Segment(NAMES[label], start * 0.25, (start + 16) * 0.25))
        probs[:, 0] = 1 - probs[:, 1:].sum(1)
        videos.append(VideoProbs(f"v{index}", timestamps, probs, truth, 30.0))
    data = LabelledProbs(videos, NAMES, 0.25, "val")
    settings, record = search_rules(data, "f1")
    assert record["default_value"] == 0.0 and record["value"] > 0.9
    assert score_probabilities(data, settings)["f1"]["0.25"] == pytest.approx(record["value"])
    assert all(0.2 < settings.start_threshold_of(n) <= 0.4 for n in NAMES[1:])
    settings, record = search_rules(data, "latency")    # the defaults match no start at all
    assert record["default_value"] == -np.inf and -1.0 < record["value"] < 0
    assert score_probabilities(data, settings)["latency_s"]["matched"] >= 10


def test_a_version_1_timeline_without_events_cannot_be_scored(setup, tmp_path, capsys):
    store, checkpoint = setup
    (detection,) = detect("video_7", checkpoint, out=tmp_path, cache=store.root, picture=False,
                          settings=TimelineSettings(threshold=0.0, min_duration_s=0))
    data = json.loads(detection.files["json"].read_text())
    assert data["segments"]
    data.update(version=1, events=[])
    detection.files["json"].write_text(json.dumps(data))
    assert Timeline.load(detection.files["json"]).events == []
    assert "records no events" in cli_error(capsys, ["eval", "--timelines", str(tmp_path),
                                                     "--cache", str(store.root)])
    assert "--split chooses the videos of --checkpoint" in cli_error(
        capsys, ["eval", "--timelines", str(tmp_path), "--cache", str(store.root), "--split", "test"])


def test_reports_are_written_with_metrics_without_data_as_null(tmp_path):
    """eval's and calibrate's JSON: NaN (no data) and -inf (calibrate's objective without data)
    are not JSON numbers; nested in dicts and lists they read back as null."""
    path = write_json_report({"mAP": float("nan"), "value": -np.inf, "f1": {"0.25": 0.5},
                              "values": [1.0, float("inf")], "name": "x"}, tmp_path / "r.json")
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "mAP": None, "value": None, "f1": {"0.25": 0.5}, "values": [1.0, None], "name": "x"}
