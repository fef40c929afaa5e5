"""Training engine, checkpoints, evaluation and their CLI commands, on tiny synthetic caches."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from vidpipe.malt.checkpoint import load_model
from vidpipe.malt.config import ModelConfig, TrainConfig
from vidpipe.malt.data import TrainWindows, load_videos
from vidpipe.malt.evaluate import predict_offline
from vidpipe.malt.train import lr_factor, train
from vidpipe.malt.window import gather_window
from vidpipe.pipeline.cli import main
from vidpipe.core.errors import VidpipeError
from vidpipe.store.labels import LabelSet
from vidpipe.store.cache import FeatureStore
from train_helpers import cli_error, random_cache, write_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return random_cache(tmp_path_factory.mktemp("cache") / "cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """One 3-epoch run through the CLI, shared by the tests that only read it; one of the
    three training videos held out for model selection."""
    root = tmp_path_factory.mktemp("run")
    config = write_config(root / "tiny.yaml", data={"val_fraction": 0.34})
    main(["train", "--config", str(config), "--cache", str(cache), "--out", str(root / "run")])
    return root / "run"


def test_run_folder(trained, cache):
    assert {p.name for p in trained.iterdir()} >= {"config.yaml", "metrics.jsonl", "last.pt",
                                                   "best.pt", "checkpoints"}
    history = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["test_mAP"] <= 1 and 0 <= h["val_mAP"] <= 1
               for h in history)
    assert all("held out of split 'train'" in h["selection"] for h in history)
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["epoch_002.pt", "epoch_003.pt"]
    # the recorded config holds the dimensions taken from the data
    recorded = yaml.safe_load((trained / "config.yaml").read_text())
    assert (recorded["model"]["rgb_dim"], recorded["model"]["flow_dim"],
            recorded["model"]["num_classes"]) == (6, 4, 3)
    # plain types only: loadable with weights_only=True; the contract's keys are there
    raw = torch.load(trained / "last.pt", weights_only=True)
    assert {"model_state", "config", "feature_settings", "class_names", "epoch", "step",
            "optimizer", "history"} <= set(raw)
    assert raw["feature_settings"] == FeatureStore.open(cache).settings
    assert raw["class_names"] == ["background", "action_1", "action_2"] and raw["epoch"] == 3
    best = torch.load(trained / "best.pt", weights_only=True)
    assert best["best"] == max(h["val_mAP"] for h in history)      # chosen on validation videos
    assert best["epoch"] == max(history, key=lambda h: h["val_mAP"])["epoch"]


def test_eval_cli_matches_training_record(trained, cache, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    main(["eval", "--checkpoint", str(trained / "last.pt"), "--cache", str(cache), "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert report["mAP"] == pytest.approx(last["test_mAP"], abs=1e-9)
    assert report["mcAP"] == pytest.approx(last["test_mcAP"], abs=1e-9)
    assert set(report["per_class"]) <= {"action_1", "action_2"} and report["num_videos"] == 2
    assert "mean" in printed and f"{100 * report['mAP']:.2f}" in printed


def test_predict_offline_equals_window_by_window(trained, cache):
    model, _ = load_model(trained / "last.pt", "cpu")
    video = FeatureStore.open(cache).read("video_3")
    probs = predict_offline(model, video.rgb, video.flow, batch_size=5)
    assert probs.shape == (len(video), 3)
    with torch.no_grad():
        for t in range(len(video)):
            window = [torch.from_numpy(np.asarray(a))[None] for a in
                      gather_window(video.rgb, video.flow, t, model.cfg)]
            expected = model(*window).logits[0, -1].softmax(-1).numpy()
            np.testing.assert_allclose(probs[t], expected, atol=1e-5)


def test_resume_equals_uninterrupted(trained, cache, tmp_path):
    """A run stopped after epoch 2 (its last.pt is then epoch 2's checkpoint) and resumed
    ends with exactly the weights of the uninterrupted 3-epoch run."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(trained / "checkpoints/epoch_002.pt", resumed / "last.pt")
    history = train(None, cache, resumed, resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    final = torch.load(resumed / "last.pt", weights_only=True)
    reference = torch.load(trained / "last.pt", weights_only=True)
    assert final["step"] == reference["step"]
    for name, tensor in reference["model_state"].items():
        assert torch.equal(final["model_state"][name], tensor), name
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_another_config(trained, cache, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(trained / "checkpoints/epoch_002.pt", resumed / "last.pt")
    other = write_config(tmp_path / "other.yaml", train={"lr": 0.5})
    with pytest.raises(VidpipeError, match=r"differs from the config of the run .*train\.lr"):
        train(other, cache, resumed, resume=True, progress=False)


def test_existing_run_needs_resume(trained, cache, tmp_path):
    with pytest.raises(VidpipeError, match="already holds a run"):
        train(write_config(tmp_path / "c.yaml"), cache, trained, progress=False)


def test_cli_errors(tmp_path, cache, trained, capsys):
    config = write_config(tmp_path / "bad.yaml", model={"sparse_kk": 3})
    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(cache),
                             "--out", str(tmp_path / "r")])
    assert "unknown config key 'model.sparse_kk'" in err and "bad.yaml" in err

    config = write_config(tmp_path / "ok.yaml")
    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "r")])
    assert "nope: not a vidpipe feature cache" in err

    config = write_config(tmp_path / "dims.yaml", model={"rgb_dim": 2048})
    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(cache),
                             "--out", str(tmp_path / "r")])
    assert "model.rgb_dim=2048 but the data has 6" in err and "dims.yaml" in err

    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(cache),
                             "--out", str(tmp_path / "r"), "--set", "model.rgb_dim=6",
                             "--set", "model.num_classes=5"])
    assert "model.num_classes=5 but the data has 3" in err

    err = cli_error(capsys, ["train", "--config", str(write_config(tmp_path / "ok.yaml")),
                             "--cache", str(cache), "--out", str(tmp_path / "r"),
                             "--set", "train.eval_every=0"])
    assert "'train.eval_every' must be >= 1, got 0" in err

    other = random_cache(tmp_path / "other_cache", rgb_dim=7)
    err = cli_error(capsys, ["eval", "--checkpoint", str(trained / "best.pt"), "--cache", str(other)])
    assert "features are 7+4-dim" in err and "best.pt" in err

    err = cli_error(capsys, ["eval", "--checkpoint", str(tmp_path / "none.pt"), "--cache", str(cache)])
    assert "none.pt: checkpoint not found" in err


def test_videos_shorter_than_the_short_memory(tmp_path):
    cache = random_cache(tmp_path / "cache", steps=5)
    with pytest.raises(VidpipeError, match="no training window.*short_memory_steps=8"):
        train(write_config(tmp_path / "c.yaml"), cache, tmp_path / "run", progress=False)


def test_resume_checks_the_cache(trained, tmp_path):
    other = random_cache(tmp_path / "other_cache", flow_dim=5)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(trained / "last.pt", resumed / "last.pt")
    with pytest.raises(VidpipeError, match="model.flow_dim=4 but the data has 5"):
        train(None, other, resumed, resume=True, progress=False)


def test_lr_schedule():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, warmup_factor=0.3)
    assert lr_factor(0, cfg) == pytest.approx(0.3)
    assert lr_factor(1, cfg) == pytest.approx(0.65)
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(6, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(0.0, abs=1e-12)


def test_training_windows(cache):
    cfg = ModelConfig(rgb_dim=6, flow_dim=4, num_classes=3, long_memory_steps=32,
                      long_memory_stride=4, short_memory_steps=8)
    store = FeatureStore.open(cache)
    labels = LabelSet.load(cache / "labels.h5")
    videos = load_videos(store, labels, labels.split("train"))
    windows = TrainWindows(videos, cfg, seed=3)
    starts = {}
    for epoch in range(4):
        windows.set_epoch(epoch)
        for video_id, t in windows.windows:
            starts.setdefault(epoch, {}).setdefault(video_id, []).append(t)
        for ends in starts[epoch].values():      # non-overlapping, full, inside the video
            assert np.all(np.diff(ends) == 8) and ends[0] < 15 and ends[0] >= 7 and ends[-1] < 40
    assert len({tuple(starts[e]["video_0"]) for e in range(4)}) > 1     # offsets change per epoch
    windows.set_epoch(2)
    again = TrainWindows(videos, cfg, seed=3)
    again.set_epoch(2)
    assert again.windows == windows.windows                            # (seed, epoch) decide
    sample = windows[1]
    video_id, t = windows.windows[1]
    assert sample["rgb_long"].shape == (8, 6) and sample["rgb_short"].shape == (8, 6)
    np.testing.assert_array_equal(sample["targets"].numpy(), videos[video_id].targets[t - 7:t + 1])
    np.testing.assert_array_equal(sample["valid"].numpy(), ~videos[video_id].ambiguous[t - 7:t + 1])


def test_labels_must_match_the_cache(cache, tmp_path):
    labels = LabelSet.load(cache / "labels.h5")
    labels.videos["video_0"].targets = labels.videos["video_0"].targets[:-1]
    labels.save(tmp_path / "short.h5")
    with pytest.raises(VidpipeError, match="'video_0' has 39 labelled steps but 40 feature steps"):
        load_videos(FeatureStore.open(cache), labels, ["video_0"], "short.h5")


def test_train_from_an_annotation_csv(cache, tmp_path):
    """--labels may name an annotation file: it is read onto the cache's steps."""
    csv = tmp_path / "annotations.csv"
    csv.write_text("video,label,start_s,end_s,split\n"
                   "video_0,jump,1.0,3.0,train\nvideo_1,jump,2.0,4.0,train\n"
                   "video_2,run,0.5,2.5,train\nvideo_3,jump,1.0,2.0,test\nvideo_4,run,3.0,5.0,test\n")
    config = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    main(["train", "--config", str(config), "--cache", str(cache), "--labels", str(csv),
          "--out", str(tmp_path / "run")])
    checkpoint = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert checkpoint["class_names"] == ["background", "jump", "run"]
    assert checkpoint["config"]["model"]["num_classes"] == 3


def test_normalize_features_is_stored_in_the_model(cache, tmp_path):
    """Statistics of the training split go into the model: eval and streaming use them too."""
    from vidpipe.malt.data import feature_statistics
    from vidpipe.malt.stream import OnlineDetector

    config = write_config(tmp_path / "c.yaml", train={"epochs": 1, "normalize_features": True})
    train(config, cache, tmp_path / "run", progress=False)
    model, checkpoint = load_model(tmp_path / "run/last.pt", "cpu")
    labels = LabelSet.load(cache / "labels.h5")
    videos = load_videos(FeatureStore.open(cache), labels, labels.split("train"))
    shift, scale = feature_statistics(videos)
    for fusion in (model.long_fusion, model.short_fusion):
        np.testing.assert_allclose(fusion.shift.numpy(), shift, rtol=1e-6)
        np.testing.assert_allclose(fusion.scale.numpy(), scale, rtol=1e-6)
    assert scale[0] != scale[-1]                    # one scale per modality, RGB vs flow
    video = FeatureStore.open(cache).read("video_4")
    offline = predict_offline(model, video.rgb, video.flow)
    detector = OnlineDetector(model)
    streamed = np.stack([detector.step(r, f) for r, f in zip(video.rgb, video.flow)])
    np.testing.assert_allclose(streamed, offline, atol=1e-5)


def test_float_values_written_without_a_dot(cache, tmp_path):
    """YAML reads `3e-3` as a string; the config still takes it as a number."""
    config = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    history = train(config, cache, tmp_path / "run", overrides=["train.lr=3e-3"], progress=False)
    assert history[0]["lr"] <= 3e-3
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["train"]["lr"] == 0.003


def test_a_test_split_with_no_videos_is_said(cache, tmp_path, caplog):
    """A misspelt data.test_split used to train to the end without test figures, unsaid."""
    config = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    main(["train", "--config", str(config), "--cache", str(cache), "--out", str(tmp_path / "run"),
          "--set", "data.test_split=tset"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no videos in split 'tset' (data.test_split) (splits there: test, train): no test figures" in w
               for w in warnings), warnings
