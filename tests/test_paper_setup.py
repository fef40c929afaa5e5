"""The paper setup (the MALT authors' code, after LSTR) by default, every deviation a named
switch; honest model selection; --init-from; numeric config values range-checked; a
non-finite loss stops training."""
import json
import math

import numpy as np
import pytest
import torch
import yaml

import vidpipe.malt.train as train_module
from vidpipe.core.config import load_config
from vidpipe.core.errors import VidpipeError
from vidpipe.malt.checkpoint import load_model
from vidpipe.malt.config import Config
from vidpipe.malt.data import TrainWindows, held_out_videos, load_videos
from vidpipe.malt.losses import loss_targets
from vidpipe.malt.model import MALT
from vidpipe.malt.train import learning_rate, load_initial_weights, train
from vidpipe.pipeline.cli import main
from vidpipe.store.cache import FeatureStore
from vidpipe.store.importers import import_lstr
from vidpipe.store.labels import LabelSet
from test_importer import write_lstr_folder
from train_helpers import TINY_CONFIG, cli_error, random_cache, write_cache, write_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return random_cache(tmp_path_factory.mktemp("cache") / "cache")


def lstr_warmup_cosine(base_lr, it, max_iters, warmup_iters, factor):
    """The lr LSTR's trainer uses at iteration `it` (0-based): WarmupCosineLR.get_lr evaluated
    one step ahead (see `LstrWarmupCosineLR`), written out independently."""
    n = it + 1
    if n >= warmup_iters:
        w = 1.0
    else:
        alpha = n / warmup_iters
        w = factor * (1 - alpha) + alpha
    return base_lr * w * 0.5 * (1.0 + math.cos(math.pi * n / max_iters))


class LstrWarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """LSTR's WarmupCosineLR, restated from amazon-science/long-short-term-transformer
    src/rekognition_online_action_detection/optimizers/lr_scheduler.py: get_lr (lines 133-146)
    with _get_warmup_factor_at_iter's 'linear' rule (lines 12-25); a PyTorch scheduler, so
    the constructor and step() behave as in LSTR's run."""

    def __init__(self, optimizer, max_iters, warmup_factor, warmup_iters, last_epoch):
        self.max_iters, self.warmup_factor, self.warmup_iters = max_iters, warmup_factor, warmup_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        it = self.last_epoch
        if it >= self.warmup_iters:
            factor = 1.0
        else:
            alpha = it / self.warmup_iters
            factor = self.warmup_factor * (1 - alpha) + alpha
        return [base * factor * 0.5 * (1.0 + math.cos(math.pi * it / self.max_iters))
                for base in self.base_lrs]


def lstr_trainer_lrs(cfg, iters_per_epoch):
    """The lr of every optimizer.step() of a whole LSTR run: the optimizer as LSTR's
    build_optimizer makes it ('initial_lr' in the group, optimizers.py:16-19), the scheduler
    as build_scheduler makes it (last_epoch = (START_EPOCH - 1) * iters with START_EPOCH 1,
    lr_scheduler.py:158 and 192-206), stepped as do_perframe_det_train steps it
    (optimizer.step(); scheduler.step(), engines/base_trainers/perframe_det_trainer.py:59-60)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [weight], "initial_lr": cfg.lr}], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    scheduler = LstrWarmupCosineLR(optimizer, cfg.epochs * iters_per_epoch, cfg.warmup_factor,
                                   int(cfg.warmup_epochs * iters_per_epoch), last_epoch=0)
    applied = []
    for _ in range(cfg.epochs * iters_per_epoch):
        applied.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(applied)


def lstr_positional_encoding(max_len, d_model):
    """LSTR's PositionalEncoding.pe (models/transformer/position_encoding.py), as (max_len, D)."""
    pe = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


# -- the schedule ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["malt_thumos", "malt_tvseries"])
@pytest.mark.parametrize("iters_per_epoch", [1, 7, 333])
def test_paper_schedule_is_lstrs_scheduler_as_its_trainer_steps_it(name, iters_per_epoch):
    """Every iteration of a whole run trains at the lr LSTR's scheduler gives it: one step
    ahead of the formula (iteration i at g(i + 1)), so the last iteration trains at 0."""
    cfg = load_config(Config, name).train
    assert cfg.schedule == "lstr_warmup_cosine"
    max_iters = cfg.epochs * iters_per_epoch
    ours = np.array([learning_rate(cfg, it, iters_per_epoch) for it in range(max_iters)])
    lstr = lstr_trainer_lrs(cfg, iters_per_epoch)
    assert np.abs(ours - lstr).max() <= 1e-15 * cfg.lr
    assert ours[-1] == lstr[-1] == 0.0
    formula = np.array([lstr_warmup_cosine(cfg.lr, it, max_iters,
                                           int(cfg.warmup_epochs * iters_per_epoch),
                                           cfg.warmup_factor) for it in range(max_iters)])
    assert np.abs(ours - formula).max() <= 1e-15 * cfg.lr
    # the cosine runs from iteration 0: already below the base lr when the warmup ends
    if iters_per_epoch > 1:
        assert ours[int(cfg.warmup_epochs * iters_per_epoch)] < cfg.lr * 0.75


def test_the_two_schedules_differ_as_the_review_said():
    """warmup_then_cosine gives ~1.5x the learning rate over the paper's run."""
    cfg = load_config(Config, "malt_thumos").train
    ours = load_config(Config, "malt_thumos", ["train.schedule=warmup_then_cosine"]).train
    total = sum(learning_rate(cfg, it, 100) for it in range(2500))
    total_ours = sum(learning_rate(ours, it, 100) for it in range(2500))
    assert 1.4 < total_ours / total < 1.7


def test_training_sets_the_lr_of_the_formula_at_every_iteration(cache, tmp_path, monkeypatch):
    applied = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        applied.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    config = write_config(tmp_path / "c.yaml", train={"epochs": 3, "warmup_epochs": 1.5})
    history = train(config, cache, tmp_path / "run", progress=False)
    cfg = load_config(Config, config).train
    labels = LabelSet.load(cache / "labels.h5")
    windows = TrainWindows(load_videos(FeatureStore.open(cache), labels, labels.split("train")),
                           load_config(Config, config).model, seed=0)
    per_epoch = math.ceil(len(windows) / cfg.batch_size)       # LSTR: the first epoch's batches
    expected = [lstr_warmup_cosine(cfg.lr, it, 3 * per_epoch, int(1.5 * per_epoch), 0.3)
                for it in range(len(applied))]
    np.testing.assert_allclose(applied, expected, rtol=0, atol=1e-15)
    # metrics.jsonl: the lr at full precision with the iteration it belongs to
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [applied[r["lr_iteration"]] for r in records]
    assert records[-1]["lr_iteration"] == len(applied) - 1 == history[-1]["step"] - 1


# -- the paper recipe, end to end ----------------------------------------------------------

@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A THUMOS'14 cache imported from the LSTR layout (2048 + 1024 features as the public
    ones), one step with two actions."""
    root = tmp_path_factory.mktemp("lstr")
    written = write_lstr_folder(root / "src", {"video_validation_0000051": 48,
                                               "video_validation_0000052": 40,
                                               "video_test_0000004": 40}, rgb_dim=2048, flow_dim=1024)
    target = written["video_validation_0000051"][2]
    target[5] = 0
    target[5, [2, 5]] = 1
    np.save(root / "src/target_perframe/video_validation_0000051.npy", target)
    import_lstr(root / "src", root / "cache", progress=False)
    return root / "cache"


def test_paper_config_trains_with_the_authors_recipe(imported, tmp_path, monkeypatch, capsys):
    """`vidpipe train --config malt_thumos` on imported LSTR-format data: the model and
    optimiser built are the authors' (checked before the first step)."""
    built = {}

    def capture(run, cfg, state, videos):
        built.update(cfg=cfg, state=state, videos=videos)
        return []

    monkeypatch.setattr(train_module, "_train_epochs", capture)
    main(["train", "--config", "malt_thumos", "--cache", str(imported), "--out", str(tmp_path / "run")])
    cfg, state = built["cfg"], built["state"]
    model, optimizer = state.model, state.optimizer
    assert (cfg.model.rgb_dim, cfg.model.flow_dim, cfg.model.num_classes) == (2048, 1024, 21)
    # sinusoidal positions as LSTR's PositionalEncoding, the short memory's after the long's
    pe = lstr_positional_encoding(512 + 32, 1024)
    torch.testing.assert_close(model.long_pos, pe[:512], rtol=0, atol=0)
    torch.testing.assert_close(model.short_pos, pe[512:], rtol=0, atol=0)
    assert not any("_pos" in name for name, _ in model.named_parameters())
    # latent queries N(0, 1) as nn.Embedding, sparse top-k 370, N = 2, one decoder stack
    for branch in model.encoder.branches:
        assert 0.9 < branch.queries.std().item() < 1.1
    assert model.encoder.branches[0].compress.layers[0].cross_attn.top_k == 370
    assert len(model.encoder.branches) == 2 and len(model.decoder.stacks) == 1
    # Adam over every parameter, lr 5e-5 / wd 5e-5, LSTR's schedule, fp32
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.parameters())
    assert (group["weight_decay"], group["betas"], cfg.train.lr) == (5e-5, (0.9, 0.999), 5e-5)
    assert cfg.train.schedule == "lstr_warmup_cosine" and not state.scaler.is_enabled()
    assert cfg.model.multi_label_targets == "lstr" and not cfg.train.normalize_features
    # two actions on one step: each weighs as much as a single action (LSTR's multi-hot row)
    two = built["videos"].train["video_validation_0000051"].targets[5]
    assert loss_targets(torch.from_numpy(two), "lstr").tolist().count(1.0) == 2
    # honest selection: the paper config has no validation split, so no best.pt, said so
    assert "model selection (best.pt): none" in capsys.readouterr().out


def test_our_choices_are_switches(cache, tmp_path):
    cfg = load_config(Config, None, ["model.pos_encoding=learned", "model.query_init=trunc_normal",
                                     "model.rgb_dim=6", "model.flow_dim=4"]).model
    torch.manual_seed(0)
    model = MALT(cfg)
    assert {"long_pos", "short_pos"} <= {name for name, _ in model.named_parameters()}
    assert model.encoder.branches[0].queries.std().item() < 0.05
    with pytest.raises(VidpipeError, match="'model.d_model' must be even with sinusoidal"):
        MALT(load_config(Config, None, ["model.d_model=33", "model.num_heads=3"]).model)


# -- model selection -----------------------------------------------------------------------

def test_held_out_videos_are_seeded_and_leave_training(cache, tmp_path):
    ids = [f"v{i}" for i in range(10)]
    assert held_out_videos(ids, 0.2, seed=0) == held_out_videos(list(reversed(ids)), 0.2, seed=0)
    assert len(held_out_videos(ids, 0.2, seed=0)) == 2 and len(held_out_videos(ids, 0.01, 0)) == 1
    assert held_out_videos(ids, 0.5, seed=0) != held_out_videos(ids, 0.5, seed=1)
    config = write_config(tmp_path / "c.yaml", data={"val_fraction": 0.34}, train={"epochs": 1})
    history = train(config, cache, tmp_path / "run", progress=False)
    labels = LabelSet.load(cache / "labels.h5")
    kept = [v for v in labels.split("train") if v not in held_out_videos(labels.split("train"), 0.34, 0)]
    windows = TrainWindows(load_videos(FeatureStore.open(cache), labels, kept),
                           load_config(Config, config).model, seed=0)
    assert history[0]["train_windows"] == len(windows) and "val_mAP" in history[0]
    assert (tmp_path / "run/best.pt").exists()


def test_without_validation_only_last_pt_is_kept(cache, tmp_path):
    config = write_config(tmp_path / "c.yaml", train={"epochs": 2})
    history = train(config, cache, tmp_path / "run", progress=False)
    assert not (tmp_path / "run/best.pt").exists() and (tmp_path / "run/last.pt").exists()
    assert all(h["selection"].startswith("none") for h in history)
    assert "test_mAP" in history[-1] and "val_mAP" not in history[-1]    # test is reported only


def test_selecting_on_test_is_explicit_and_said_in_eval(cache, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", train={"epochs": 2, "select_on_test": True})
    history = train(config, cache, tmp_path / "run", progress=False)
    best = torch.load(tmp_path / "run/best.pt", weights_only=True)
    assert best["best"] == max(h["test_mAP"] for h in history)
    assert "TEST split" in history[0]["selection"]
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all("train.select_on_test" in r["selection"] for r in records)
    capsys.readouterr()
    main(["eval", "--checkpoint", str(tmp_path / "run/best.pt"), "--cache", str(cache)])
    header = capsys.readouterr().out.splitlines()[0]
    assert "model selection of its run: TEST split 'test' (train.select_on_test" in header


def test_validation_split_of_the_labels(tmp_path):
    rng = np.random.default_rng(0)
    videos, splits = {}, {}
    for i, split in enumerate(["train", "train", "val", "test"]):
        targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 40)]
        videos[f"v{i}"] = (rng.standard_normal((40, 6)).astype(np.float32),
                           rng.standard_normal((40, 4)).astype(np.float32), targets, np.zeros(40, bool))
        splits[f"v{i}"] = split
    cache = write_cache(tmp_path / "cache", videos, ["background", "a", "b"], splits)
    config = write_config(tmp_path / "c.yaml", data={"val_split": "val"}, train={"epochs": 1})
    history = train(config, cache, tmp_path / "run", progress=False)
    assert "validation split 'val'" in history[0]["selection"] and "val_mAP" in history[0]
    with pytest.raises(VidpipeError, match=r"no videos in split 'valid' \(data.val_split\) "
                                           r"\(splits there: test, train, val\)"):
        train(config, cache, tmp_path / "run2", overrides=["data.val_split=valid"], progress=False)


def test_two_selection_rules_are_refused(cache, tmp_path, capsys):
    err = cli_error(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml")),
                             "--cache", str(cache), "--out", str(tmp_path / "r"),
                             "--set", "data.val_fraction=0.3", "--set", "train.select_on_test=true"])
    assert "data.val_fraction and train.select_on_test both choose best.pt" in err


# -- --init-from ---------------------------------------------------------------------------

def test_init_from_loads_weights_and_reinitialises_another_head(cache, tmp_path):
    train(write_config(tmp_path / "c.yaml", train={"epochs": 1}), cache, tmp_path / "source",
          progress=False)
    source, _ = load_model(tmp_path / "source/last.pt")
    four = load_config(Config, write_config(tmp_path / "c4.yaml"),
                       ["model.rgb_dim=6", "model.flow_dim=4", "model.num_classes=4"]).model
    torch.manual_seed(1)
    model = MALT(four)
    fresh_head = model.classifier.weight.clone()
    note = load_initial_weights(model, tmp_path / "source/last.pt")
    assert "classifier re-initialised for 4 classes (it had 3)" in note
    for name, tensor in source.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.classifier.weight, fresh_head)


def test_init_from_through_the_cli(cache, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    train(config, cache, tmp_path / "source", progress=False)
    main(["train", "--config", str(config), "--cache", str(cache), "--out", str(tmp_path / "tuned"),
          "--init-from", str(tmp_path / "source/last.pt")])
    assert "source/last.pt: weights loaded (epoch 1)" in capsys.readouterr().out
    tuned = torch.load(tmp_path / "tuned/last.pt", weights_only=True)
    assert tuned["step"] == torch.load(tmp_path / "source/last.pt", weights_only=True)["step"]  # new optimiser
    bigger = write_config(tmp_path / "big.yaml", model={**TINY_CONFIG["model"], "d_model": 32})
    err = cli_error(capsys, ["train", "--config", str(bigger), "--cache", str(cache),
                             "--out", str(tmp_path / "t2"), "--init-from", str(tmp_path / "source/last.pt")])
    assert "--init-from needs the same architecture" in err
    err = cli_error(capsys, ["train", "--cache", str(cache), "--out", str(tmp_path / "tuned"),
                             "--resume", "--init-from", str(tmp_path / "source/last.pt")])
    assert "--resume continues a run" in err


# -- numbers that cannot train -------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "--set train.lr=.inf: 'train.lr' must be a finite number > 0, got inf"),
    ("train.lr=0", "'train.lr' must be a finite number > 0, got 0.0"),
    ("train.seed=-1", "--set train.seed=-1: 'train.seed' must be >= 0, got -1"),
    ("data.num_workers=-1", "--set data.num_workers=-1: 'data.num_workers' must be >= 0, got -1"),
    ("train.epochs=0", "--set train.epochs=0: 'train.epochs' must be >= 1, got 0"),
    ("data.val_fraction=1.5", "'data.val_fraction' must be in (0, 1) or null, got 1.5"),
])
def test_numbers_out_of_range_name_the_set(cache, tmp_path, capsys, override, message):
    config = write_config(tmp_path / "c.yaml")
    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(cache),
                             "--out", str(tmp_path / "r"), "--set", override])
    assert message in err and (override.startswith("train.lr=0") or "c.yaml" not in err)
    assert not (tmp_path / "r").exists()


def test_a_bad_value_in_the_file_names_the_file(cache, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", train={"seed": -3})
    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(cache),
                             "--out", str(tmp_path / "r")])
    assert "c.yaml: 'train.seed' must be >= 0, got -3" in err


def test_timm_style_shortcuts(cache, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    main(["train", "--config", str(config), "--cache", str(cache), "--out", str(tmp_path / "r"),
          "--epochs", "1", "--lr", "2e-3", "--batch-size", "2", "--seed", "3"])
    recorded = yaml.safe_load((tmp_path / "r/config.yaml").read_text())["train"]
    assert (recorded["epochs"], recorded["lr"], recorded["batch_size"], recorded["seed"]) == (1, 2e-3, 2, 3)
    err = cli_error(capsys, ["train", "--config", str(config), "--cache", str(cache),
                             "--out", str(tmp_path / "r2"), "--lr", "inf"])
    assert "'train.lr' must be a finite number > 0, got inf" in err


def test_a_non_finite_loss_stops_training_naming_the_videos(tmp_path, capsys):
    cache = random_cache(tmp_path / "cache")
    store = FeatureStore.open(cache)
    video = store.read("video_1")
    rgb = video.rgb.copy()
    rgb[20, 0] = np.inf                        # e.g. damaged bytes in a cache without checksums
    store.write("video_1", rgb, video.flow, video.timestamps)
    err = cli_error(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml")),
                             "--cache", str(cache), "--out", str(tmp_path / "r")])
    assert "epoch 1: the training loss is nan (not finite)" in err and "video_1" in err
    assert not (tmp_path / "r/last.pt").exists()


# -- eval ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("evalrun")
    train(write_config(root / "c.yaml", train={"epochs": 1}), cache, root / "run", progress=False)
    return root / "run/last.pt"


@pytest.mark.parametrize("batch_size", ["-3", "0"])
def test_eval_batch_size_below_one_is_an_error(cache, run, capsys, batch_size):
    err = cli_error(capsys, ["eval", "--checkpoint", str(run), "--cache", str(cache),
                             "--batch-size", batch_size])
    assert f"--batch-size must be >= 1 (windows per forward pass), got {batch_size}" in err


def test_eval_is_the_same_at_every_batch_size(cache, run):
    from vidpipe.malt.evaluate import evaluate

    reference = evaluate(run, cache, batch_size=64)["mAP"]
    for batch_size in (1, 3, 1000):
        assert evaluate(run, cache, batch_size=batch_size)["mAP"] == pytest.approx(reference, abs=1e-6)


def test_eval_unknown_split_lists_the_splits(cache, run, capsys):
    err = cli_error(capsys, ["eval", "--checkpoint", str(run), "--cache", str(cache), "--split", "val"])
    assert "no videos in split 'val' (splits there: test, train)" in err


def test_checkpoints_from_before_the_switches_load_as_they_were_trained(cache, tmp_path):
    """A checkpoint whose config predates the switches was trained with learned positions,
    small queries, normalised targets and warmup_then_cosine: it loads as that model."""
    from vidpipe.malt.checkpoint import Checkpoint, save_checkpoint
    from vidpipe.core.config import to_dict

    cfg = load_config(Config, write_config(tmp_path / "c.yaml"),
                      ["model.rgb_dim=6", "model.flow_dim=4", "model.num_classes=3",
                       "model.pos_encoding=learned", "model.query_init=trunc_normal"])
    torch.manual_seed(0)
    model = MALT(cfg.model)
    old = to_dict(cfg)
    for section, keys in (("model", ["pos_encoding", "query_init", "multi_label_targets"]),
                          ("train", ["schedule", "select_on_test"]), ("data", ["val_split", "val_fraction"])):
        for key in keys:
            del old[section][key]
    save_checkpoint(Checkpoint(model.state_dict(), old, FeatureStore.open(cache).settings,
                               ["background", "action_1", "action_2"]), tmp_path / "old.pt")
    loaded, checkpoint = load_model(tmp_path / "old.pt")
    restored = checkpoint.model_config()
    assert (restored.model.pos_encoding, restored.model.query_init, restored.model.multi_label_targets,
            restored.train.schedule) == ("learned", "trunc_normal", "normalised", "warmup_then_cosine")
    assert torch.equal(loaded.long_pos, model.long_pos)


def test_feature_sizes_come_from_the_manifest_when_it_records_them(cache):
    """Extracted caches record rgb_dim / flow_dim: no video is read for them; imported caches
    (no sizes recorded) take them from the training videos already loaded."""
    from vidpipe.malt.data import feature_dims

    assert feature_dims(FeatureStore(cache, {"rgb_dim": 2048, "flow_dim": 1024}), {}) == (2048, 1024)
    labels = LabelSet.load(cache / "labels.h5")
    store = FeatureStore.open(cache)
    assert feature_dims(store, load_videos(store, labels, labels.split("train"))) == (6, 4)
