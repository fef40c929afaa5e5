"""The authors' run (issue 16): each remaining difference from the MALT authors' code
(yzp11/MALT-for-Online-Action-Detection at f910dd9, an LSTR fork) is a switch, checked here
against a restatement of their code (the file and lines are named at each restatement)."""
import bisect
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from vidpipe.malt.attention import SparseCrossAttention
from vidpipe.malt.data import TrainWindows, VideoData, load_videos
from vidpipe.malt.evaluate import predict_chunks, predict_offline
from vidpipe.malt.losses import malt_loss
from vidpipe.malt.metrics import detection_report
from vidpipe.malt.model import MALT, lstr_attention_init
from vidpipe.malt.stream import OnlineDetector
from vidpipe.malt.window import gather_window, window_indices
from vidpipe.pipeline.cli import main
from vidpipe.store.cache import FeatureStore
from vidpipe.store.exporters import export_lstr
from vidpipe.store.importers import import_lstr
from vidpipe.store.labels import LabelSet
from vidpipe.core.config import load_config, to_dict
from vidpipe.core.errors import VidpipeError
from vidpipe.malt.checkpoint import load_model
from vidpipe.malt.config import Config
from vidpipe.malt.train import train
from model_helpers import random_video, tiny_config
from test_importer import write_lstr_folder
from train_helpers import TINY_CONFIG, random_cache, write_cache, write_config


# -- model.init: torch | lstr ----------------------------------------------------------------

def authors_in_proj(dim):
    """MultiheadSparseAttention.__init__ (models/transformer/multihead_sparse_attention.py:90,
    95, 102, 105-106): in_proj_weight (3D, D) xavier_uniform_, in_proj_bias and out_proj.bias 0."""
    in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
    nn.init.xavier_uniform_(in_proj_weight)
    return in_proj_weight.detach()


def test_lstr_init_draws_the_authors_stacked_projection():
    attention = SparseCrossAttention(32, 4)
    torch.manual_seed(5)
    lstr_attention_init(attention)
    torch.manual_seed(5)
    stacked = authors_in_proj(32)
    ours = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(ours, stacked)
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        assert torch.count_nonzero(proj.bias) == 0


@pytest.mark.parametrize("init", ["torch", "lstr"])
def test_model_init_switch_changes_every_attention(init):
    dim = 64
    torch.manual_seed(0)
    model = MALT(tiny_config(d_model=dim, num_heads=4, init=init))
    attentions = [m for m in model.modules() if isinstance(m, SparseCrossAttention)]
    assert len(attentions) == 10    # 2 per layer: branch 1 (1 layer), branch 2 (1 + 2), decoder (1)
    xavier, default = math.sqrt(6 / (4 * dim)), 1 / math.sqrt(dim)
    for attention in attentions:
        weights = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        biases = torch.cat([p.bias for p in (attention.q_proj, attention.k_proj, attention.v_proj,
                                             attention.out_proj)])
        if init == "lstr":   # the authors' bound sqrt(6/4D), reached; zero biases
            assert default < weights.abs().max() <= xavier
            assert torch.count_nonzero(biases) == 0
        else:                # nn.Linear's default: bound 1/sqrt(D), non-zero biases
            assert weights.abs().max() <= default
            assert torch.count_nonzero(biases) == len(biases)
        assert attention.out_proj.weight.abs().max() <= default   # nn.Linear's default either way


# -- model.classifier_includes_ambiguous -----------------------------------------------------

def lstr_mce(logits, target, ignore_index):
    """LSTR's MultipCrossEntropyLoss with ignore_index >= 0, reduction 'mean'
    (criterions/criterions.py:49-57 at f910dd9), on (N, columns) rows."""
    notice = [i for i in range(target.shape[-1]) if i != ignore_index]
    output = torch.sum(-target[:, notice] * torch.log_softmax(logits[:, notice], dim=1), dim=1)
    return torch.mean(output[target[:, ignore_index] != 1])


def test_ambiguous_output_enters_the_test_softmax_and_gets_no_loss():
    cfg = tiny_config(num_classes=4, classifier_includes_ambiguous=True, aux_loss=False)
    torch.manual_seed(0)
    model = MALT(cfg)
    assert model.classifier.out_features == 5               # background + 3 actions + ambiguous
    logits = 3 * torch.randn(2, 4, 5)                        # (B, S, C+2)
    # test phase: det_score.softmax(dim=1) over all 22 THUMOS columns
    # (perframe_det_trainer.py:63), then column 21 dropped (evaluation/postprocessing.py:31-34)
    authors = torch.softmax(logits, dim=-1)[..., :4]
    assert torch.allclose(model.probabilities(logits), authors, atol=1e-7)
    assert not torch.allclose(torch.softmax(logits[..., :4], dim=-1), authors, atol=1e-3)
    # training: LSTR's MCE with ignore_index 4 (the ambiguous column) on 5-column targets
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, size=(2, 4))
    targets = torch.nn.functional.one_hot(torch.as_tensor(classes), 4).float()   # (B, S, C+1)
    ambiguous = torch.tensor([[False, True, False, False], [False, False, False, True]])
    lstr_targets = torch.cat([targets * ~ambiguous[..., None], ambiguous[..., None].float()], -1)
    expected = lstr_mce(logits.reshape(-1, 5), lstr_targets.reshape(-1, 5), ignore_index=4)
    ours = malt_loss(logits, [], targets, ~ambiguous, aux_weight=0.4, use_aux=False)
    assert ours.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_default_classifier_has_no_ambiguous_output():
    torch.manual_seed(0)
    model = MALT(tiny_config(num_classes=4))
    assert model.classifier.out_features == 4
    logits = torch.randn(3, 4)
    assert torch.allclose(model.probabilities(logits), torch.softmax(logits, -1))
    with pytest.raises(ValueError, match="6 columns for 4 target columns"):
        malt_loss(torch.randn(1, 2, 6), [], torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=bool), 0.4, False)


# -- data.long_memory_sampler: grid | segment ------------------------------------------------

def lstr_segment_long_memory(work_start, long_memory_length, num_samples):
    """LSTRDataLayer in training (datasets/perframe_data_layers.py:49-51, 79-84, 94-98):
    segment_sampler over [max(0, start - length), start - 1], then the padding mask that
    hides every slot holding frame 0 but the last. Returns (indices, visible)."""
    long_start, long_end = max(0, work_start - long_memory_length), work_start - 1
    indices = np.sort(np.linspace(long_start, long_end, num_samples)).astype(np.int32).clip(0)
    mask = np.zeros(indices.shape[0])
    last_zero = bisect.bisect_right(indices, 0) - 1
    if last_zero > 0:
        mask[:last_zero] = float("-inf")
    return indices, mask == 0


def windows_of(sampler, steps=70):
    cfg = tiny_config(long_memory_steps=32, long_memory_stride=4, short_memory_steps=4,
                      branch_queries=[4, 3])
    rgb = np.arange(steps, dtype=np.float32)[:, None] + 1 + np.zeros((1, cfg.rgb_dim), np.float32)
    flow = -rgb[:, :cfg.flow_dim]
    video = VideoData(rgb, flow, np.eye(cfg.num_classes, dtype=np.float32)[np.zeros(steps, int)],
                      np.zeros(steps, bool))
    return cfg, TrainWindows({"v": video}, cfg, seed=0, long_memory_sampler=sampler)


def test_segment_sampler_gives_lstrs_training_long_memory():
    cfg, windows = windows_of("segment")
    starts = set()
    for epoch in range(20):   # random offsets: one of them starts at step 0
        windows.set_epoch(epoch)
        for index in range(len(windows)):
            sample = windows[index]
            work_start = windows.windows[index][1] - cfg.short_memory_steps + 1
            starts.add(work_start)
            indices, visible = lstr_segment_long_memory(work_start, 32, 8)
            assert np.array_equal(sample["long_valid"].numpy(), visible)
            expected = np.where(visible, indices + 1, 0).astype(np.float32)   # rgb[i] = i + 1
            assert np.array_equal(sample["rgb_long"][:, 0].numpy(), expected)
            assert np.array_equal(sample["flow_long"][:, 0].numpy(), -expected)
    assert 0 in starts and any(0 < s < 32 for s in starts) and any(s > 32 for s in starts)


def test_grid_sampler_is_the_inference_window():
    cfg, windows = windows_of("grid")
    sample = windows[len(windows) - 1]
    t = windows.windows[-1][1]
    long_idx, _ = window_indices(t, cfg)
    assert np.array_equal(sample["rgb_long"][:, 0].numpy(), np.where(long_idx >= 0, long_idx + 1, 0))
    indices, _ = lstr_segment_long_memory(t - cfg.short_memory_steps + 1, 32, 8)
    assert not np.array_equal(long_idx, indices)


# -- data.empty_target_rows: background | zero_loss ------------------------------------------

def test_empty_target_rows_zero_loss_is_lstrs_mce(tmp_path):
    written = write_lstr_folder(tmp_path / "src", {"video_validation_0000051": 6})
    target = written["video_validation_0000051"][2]
    target[1] = 0                           # no class, not ambiguous
    target[2] = 0
    target[2, 21] = 1                       # ambiguous
    np.save(tmp_path / "src/target_perframe/video_validation_0000051.npy", target)
    import_lstr(tmp_path / "src", tmp_path / "cache", progress=False)
    store, labels = FeatureStore.open(tmp_path / "cache"), LabelSet.load(tmp_path / "cache/labels.h5")
    logits = torch.randn(1, 6, 21)
    # LSTR's MCE on the 22-column target file (column 21 ambiguous; its logit never counts)
    expected = lstr_mce(torch.cat([logits[0], torch.zeros(6, 1)], 1),
                        torch.as_tensor(target, dtype=torch.float32), ignore_index=21)
    losses = {}
    for rows in ("background", "zero_loss"):
        video = load_videos(store, labels, ["video_validation_0000051"], empty_target_rows=rows)[
            "video_validation_0000051"]
        assert video.targets[1].sum() == (1 if rows == "background" else 0)
        losses[rows] = malt_loss(logits, [], torch.as_tensor(video.targets)[None],
                                 torch.as_tensor(~video.ambiguous)[None], 0.4, False).total.item()
    assert losses["zero_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert losses["background"] != pytest.approx(expected.item(), rel=1e-3)


def test_training_with_every_authors_switch(tmp_path, monkeypatch):
    """The trainer hands the data switches on (windows and targets) and trains with the model
    switches: a 22-way-style classifier, the authors' init."""
    seen = {}
    original = TrainWindows.__init__

    def recording_init(self, videos, cfg, seed=0, long_memory_sampler="grid"):
        seen["sampler"] = long_memory_sampler
        seen["empty_rows"] = {v: int((d.targets.sum(1) == 0).sum()) for v, d in videos.items()}
        original(self, videos, cfg, seed, long_memory_sampler)

    monkeypatch.setattr(TrainWindows, "__init__", recording_init)
    cache = random_cache(tmp_path / "cache")
    labels = LabelSet.load(cache / "labels.h5")
    first = labels.split("train")[0]
    labels.videos[first].targets[5] = 0          # a step with no class, not ambiguous
    labels.videos[first].ambiguous[5] = False
    labels.save(cache / "labels.h5")
    config = write_config(tmp_path / "c.yaml", train={"epochs": 1, "batch_size": 4},
                          model={**TINY_CONFIG["model"], "classifier_includes_ambiguous": True,
                                 "init": "lstr"},
                          data={"long_memory_sampler": "segment", "empty_target_rows": "zero_loss"})
    train(config, cache, tmp_path / "run", progress=False)
    assert seen["sampler"] == "segment" and seen["empty_rows"][first] == 1
    model, _ = load_model(tmp_path / "run/last.pt")
    assert model.classifier.out_features == labels.num_classes + 1


# -- the authors' configs -------------------------------------------------------------------

AUTHORS_SWITCHES = {"model.init": "lstr", "data.long_memory_sampler": "segment",
                    "data.empty_target_rows": "zero_loss", "train.lr": 7e-5}


@pytest.mark.parametrize("name, ambiguous", [("malt_thumos", True), ("malt_tvseries", False)])
def test_authors_configs_are_the_paper_configs_plus_the_switches(name, ambiguous):
    paper = to_dict(load_config(Config, name))
    authors = to_dict(load_config(Config, f"{name}_authors"))
    differing = {f"{section}.{key}": authors[section][key] for section in paper
                 for key in paper[section] if paper[section][key] != authors[section][key]}
    # TVSeries has no ambiguous column: the authors' classifier has C+1 outputs there too
    extra = {"model.classifier_includes_ambiguous": True} if ambiguous else {}
    assert differing == {**AUTHORS_SWITCHES, **extra}
    assert authors["model"]["classifier_includes_ambiguous"] is ambiguous


def test_model_info_of_the_authors_thumos_config(capsys):
    """The authors' 58,916,886 parameters less the 32,768 of their enc2_queries[1] (models/lstr.py:63,
    an nn.Embedding(32, 1024) created and never read in forward)."""
    main(["model-info", "--config", "malt_thumos_authors", "--params-only"])
    out = capsys.readouterr().out
    assert re.search(r"^classifier\s+22,550$", out, re.M)    # 22 outputs x (1024 + 1)
    assert re.search(r"^total\s+58,884,118$", out, re.M)
    assert 58_916_886 - 32 * 1024 == 58_884_118
    assert "multiply-adds" not in out


# -- vidpipe eval --protocol sliding | chunks -----------------------------------------------

@pytest.fixture(scope="module")
def chunk_run(tmp_path_factory):
    """A tiny trained model and a cache whose test videos end mid-window (S = 8)."""
    root = tmp_path_factory.mktemp("chunks")
    rng = np.random.default_rng(3)
    videos, splits = {}, {}
    for name, steps, split in (("a", 60, "train"), ("b", 48, "train"), ("c", 16, "test"),
                               ("d", 41, "test"), ("e", 8, "test"), ("f", 5, "test"), ("g", 29, "test")):
        classes = rng.integers(0, 3, steps)
        rgb = (rng.standard_normal((steps, 6)) + classes[:, None]).astype(np.float32)
        flow = rng.standard_normal((steps, 4)).astype(np.float32)
        videos[name] = (rgb, flow, np.eye(3)[classes], rng.random(steps) < 0.1)
        splits[name] = split
    cache = write_cache(root / "cache", videos, ["background", "x", "y"], splits)
    train(write_config(root / "c.yaml", train={"epochs": 1}), cache, root / "run", progress=False)
    return cache, root / "run/last.pt", videos


def lstr_test_phase(model, videos, length):
    """LSTRDataLayer with phase 'test' (datasets/perframe_data_layers.py:37-47, seed 0) and the
    trainer's test loop (perframe_det_trainer.py:44-66): windows [work_start, work_end) for
    work_start, work_end in zip(range(0, T, S), range(S, T, S)), every output softmaxed and
    kept with its target rows; our window rule gives each window's memories."""
    scores, targets, ambiguous = [], [], []
    for rgb, flow, target, amb in videos:
        for work_start, work_end in zip(range(0, len(rgb), length), range(length, len(rgb), length)):
            window = [torch.as_tensor(a)[None] for a in gather_window(rgb, flow, work_end - 1, model.cfg)]
            with torch.no_grad():
                scores.append(torch.softmax(model(*window).logits[0], dim=-1).numpy())
            targets.append(target[work_start:work_end])
            ambiguous.append(amb[work_start:work_end])
    return np.concatenate(scores), np.concatenate(targets), np.concatenate(ambiguous)


def test_chunks_protocol_is_lstrs_test_phase(chunk_run, tmp_path, capsys):
    cache, checkpoint, videos = chunk_run
    main(["eval", "--checkpoint", str(checkpoint), "--cache", str(cache), "--protocol", "chunks",
          "--out", str(tmp_path / "chunks.json"), "--batch-size", "2"])
    assert "protocol chunks" in capsys.readouterr().out
    report = json.loads((tmp_path / "chunks.json").read_text())
    model, _ = load_model(checkpoint, "cpu")
    test = [videos[v] for v in sorted(videos) if v in "cdefg"]
    scores, targets, ambiguous = lstr_test_phase(model, test, 8)
    # c: 1 window (8 of 16 steps), d: 5 (40 of 41), e and f: none, g: 3 (24 of 29)
    assert len(scores) == 8 + 40 + 24
    expected = detection_report(scores, targets, ["background", "x", "y"], ambiguous)
    assert report["protocol"] == "chunks"
    assert report["num_frames"] == expected["num_frames"] == int((~ambiguous).sum())
    assert report["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    assert report["mcAP"] == pytest.approx(expected["mcAP"], abs=1e-12)
    main(["eval", "--checkpoint", str(checkpoint), "--cache", str(cache),
          "--out", str(tmp_path / "sliding.json")])
    sliding = json.loads((tmp_path / "sliding.json").read_text())
    assert sliding["protocol"] == "sliding"
    assert sliding["num_frames"] == sum(int((~v[3]).sum()) for v in test)


def test_chunks_scores_every_output_of_each_window(chunk_run):
    cache, checkpoint, videos = chunk_run
    model, _ = load_model(checkpoint, "cpu")
    rgb, flow, _, _ = videos["d"]
    probs = predict_chunks(model, rgb, flow, batch_size=3)
    assert probs.shape == (40, 3)
    # step 17 is output 1 of the window ending at 23 (it sees short steps 16..17 only), not
    # the last output of the window ending at 17 (short steps 10..17) as `sliding` scores it
    window = [torch.as_tensor(a)[None] for a in gather_window(rgb, flow, 23, model.cfg)]
    with torch.no_grad():
        expected = torch.softmax(model(*window).logits[0, 1], -1).numpy()
    np.testing.assert_allclose(probs[17], expected, atol=1e-6)
    assert not np.allclose(probs[17], predict_offline(model, rgb, flow)[17], atol=1e-4)


# -- export: what LSTR's evaluation of an export does ----------------------------------------

def lstr_perframe_average_precision(ground_truth, prediction, class_names, ignore_index, data_name):
    """LSTR's per-frame evaluation (evaluation/metrics.py:26-61 with postprocessing.py:7-36):
    THUMOS drops the rows whose column 21 is 1; every other dataset keeps all rows."""
    from sklearn.metrics import average_precision_score
    if data_name == "THUMOS":
        valid = np.where(ground_truth[:, 21] != 1)[0]
        ground_truth, prediction = ground_truth[valid], prediction[valid]
    per_class = [average_precision_score(ground_truth[:, i], prediction[:, i])
                 for i, _ in enumerate(class_names)
                 if i not in {0, ignore_index} and np.any(ground_truth[:, i])]
    return float(np.mean(per_class))


def test_export_says_what_lstrs_evaluation_does_differently(tmp_path, caplog):
    rng = np.random.default_rng(1)
    videos, splits = {}, {}
    for name, steps, split in (("b_clip", 30, "test"), ("a_clip", 25, "test"), ("c_clip", 20, "test"),
                               ("t_clip", 30, "train")):
        classes = rng.integers(0, 3, steps)
        videos[name] = (rng.standard_normal((steps, 6)).astype(np.float32),
                        rng.standard_normal((steps, 4)).astype(np.float32),
                        np.eye(3)[classes], rng.random(steps) < 0.2)
        splits[name] = split
    cache = write_cache(tmp_path / "cache", videos, ["background", "Jump", "Spin"], splits)
    report = export_lstr(cache, tmp_path / "out", progress=False)
    info = json.loads((tmp_path / "out/data_info.json").read_text())["TVSeries"]
    # the order in which LSTR pools the test videos is the order vidpipe eval pools them
    labels = LabelSet.load(cache / "labels.h5")
    assert info["test_session_set"] == labels.split("test") == ["a_clip", "b_clip", "c_clip"]
    notes = (tmp_path / "out/vidpipe/NOTES.txt").read_text()
    ambiguous = sum(int(videos[v][3].sum()) for v in labels.split("test"))
    assert f"{ambiguous} ambiguous steps in the test videos" in notes
    assert "`vidpipe eval` leaves them out" in notes and "--protocol chunks" in notes
    assert any("ambiguous steps" in r.message for r in caplog.records if r.levelname == "WARNING")
    assert set(report.notes) <= set(line[2:] for line in notes.splitlines())

    # the note is exact: on the same scores LSTR's evaluation of the export is vidpipe's
    # metric with the ambiguous steps kept, and vidpipe eval's (ambiguous out) differs
    ground_truth = np.concatenate([np.load(tmp_path / f"out/target_perframe/{v}.npy")
                                   for v in info["test_session_set"]])
    scores = rng.random((len(ground_truth), 4))
    lstr = lstr_perframe_average_precision(ground_truth, scores, info["class_names"],
                                           info["ignore_index"], "TVSeries")
    targets = np.concatenate([labels.videos[v].targets for v in labels.split("test")])
    amb = np.concatenate([labels.videos[v].ambiguous for v in labels.split("test")])
    names = labels.class_names
    assert detection_report(scores[:, :3], targets, names)["mAP"] == pytest.approx(lstr, abs=1e-12)
    assert detection_report(scores[:, :3], targets, names, amb)["mAP"] != pytest.approx(lstr, abs=1e-4)


def test_export_under_the_thumos_name_needs_its_ambiguous_column(tmp_path):
    videos = {"v": (np.zeros((8, 6), np.float32), np.zeros((8, 4), np.float32),
                    np.eye(3)[np.zeros(8, int)], np.arange(8) == 3)}
    cache = write_cache(tmp_path / "cache", videos, ["background", "Jump", "Spin"], {"v": "test"})
    with pytest.raises(VidpipeError, match="LSTR's THUMOS evaluation drops column 21 as ambiguous, "
                                           "but these labels' ambiguous column is 3"):
        export_lstr(cache, tmp_path / "out", data_name="THUMOS", progress=False)


def test_streaming_gives_the_offline_probabilities_with_the_ambiguous_output():
    torch.manual_seed(0)
    model = MALT(tiny_config(classifier_includes_ambiguous=True, init="lstr")).eval()
    rgb, flow = random_video(30, model.cfg, seed=2)
    detector = OnlineDetector(model)
    streamed = np.stack([detector.step(rgb[t], flow[t]) for t in range(30)])
    assert streamed.shape == (30, model.cfg.num_classes)
    np.testing.assert_allclose(streamed, predict_offline(model, rgb, flow), atol=1e-5)
    assert (streamed.sum(1) < 1 - 1e-4).all()       # the ambiguous output took its share
