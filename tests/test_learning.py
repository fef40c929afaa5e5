"""MALT learns what only long-term memory can tell; a per-step linear classifier cannot.

Two actions look identical while they happen; a cue 100+ steps earlier says which one it is
(tests/train_helpers.long_range_cache). The cue is far outside the short memory (8 steps)
and inside the long memory (128 steps).
"""
import numpy as np
import torch

from vidpipe.malt.metrics import per_frame_metrics
from vidpipe.malt.train import train
from vidpipe.store.labels import LabelSet
from vidpipe.store.cache import FeatureStore
from train_helpers import long_range_cache, write_config

CONFIG = {
    "model": {"d_model": 32, "num_heads": 4, "ffn_dim": 64, "dropout": 0.0,
              "long_memory_steps": 128, "long_memory_stride": 4, "short_memory_steps": 8,
              "sparse_k": 24, "num_branches": 2, "branch_queries": [8, 4], "branch_layers": [1, 1]},
    "train": {"epochs": 4, "batch_size": 16, "lr": 5e-3, "warmup_epochs": 1, "eval_every": 4},
}


def _split_arrays(cache, split):
    store, labels = FeatureStore.open(cache), LabelSet.load(cache / "labels.h5")
    videos = [store.read(v) for v in labels.split(split)]
    features = np.concatenate([np.concatenate([v.rgb, v.flow], axis=1) for v in videos])
    targets = np.concatenate([labels.videos[v].targets for v in labels.split(split)])
    return torch.from_numpy(features), targets, labels.class_names


def _linear_baseline_map(cache) -> float:
    """Softmax regression on each step's own features, trained to convergence."""
    features, targets, names = _split_arrays(cache, "train")
    torch.manual_seed(0)
    classifier = torch.nn.Linear(features.shape[1], targets.shape[1])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=0.05)
    soft_targets = torch.from_numpy(targets)
    for _ in range(300):
        optimizer.zero_grad()
        loss = -(soft_targets * classifier(features).log_softmax(-1)).sum(-1).mean()
        loss.backward()
        optimizer.step()
    test_features, test_targets, _ = _split_arrays(cache, "test")
    with torch.no_grad():
        scores = classifier(test_features).softmax(-1).numpy()
    return per_frame_metrics(scores, test_targets, names).mean


def test_malt_uses_long_memory_where_a_per_step_classifier_cannot(tmp_path):
    cache = long_range_cache(tmp_path / "cache", gap=100)
    history = train(write_config(tmp_path / "learn.yaml", CONFIG), cache, tmp_path / "run",
                    device="cpu", progress=False)
    malt_map = history[-1]["test_mAP"]
    baseline_map = _linear_baseline_map(cache)
    # The baseline finds the action steps but must guess which action: about 0.5 per class.
    assert baseline_map < 0.7, baseline_map
    assert malt_map > 0.9, (malt_map, baseline_map)
