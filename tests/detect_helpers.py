"""A tiny extracted cache of synthetic videos and a random tiny MALT checkpoint for it."""
from pathlib import Path

import torch

from vidpipe.extractors.features import FeatureSettings
from vidpipe.malt.checkpoint import Checkpoint, save_checkpoint
from vidpipe.malt.config import Config, ModelConfig
from vidpipe.malt.model import MALT
from vidpipe.core.config import to_dict
from vidpipe.pipeline.extract import extract_folder
from vidpipe.store.cache import FeatureStore
from vidpipe.pipeline.synthetic import CLASSES, SyntheticSpec, generate_dataset

# Small and fast on a CPU: 12 fps in chunks of 3 (0.25 s steps), 64 px crops, resnet18s.
TINY_FEATURES = FeatureSettings(fps=12.0, chunk=3, resize=64, crop=64, rgb_backbone="resnet18",
                                flow_backbone="resnet18", flow_method="dis",
                                dis_preset="ultrafast", flow_fields=2, random_init=True)


def tiny_cache(root: Path, num_videos: int = 2, duration_s: float = 6.0):
    """(dataset, store) of `num_videos` synthetic videos extracted into root/cache."""
    data = generate_dataset(root / "data", SyntheticSpec(num_videos=num_videos, duration_s=duration_s,
                                                         test_fraction=0.5, seed=1), progress=False)
    summary = extract_folder(data.videos_dir, root / "cache", TINY_FEATURES, device="cpu",
                             progress=False)
    assert summary.ok, summary.report()
    return data, FeatureStore.open(root / "cache")


def tiny_checkpoint(path: Path, store: FeatureStore, seed: int = 0) -> Path:
    """A random tiny MALT for the store's features, saved as a checkpoint."""
    first = store.read(store.video_ids()[0])
    cfg = Config(model=ModelConfig(
        rgb_dim=first.rgb.shape[1], flow_dim=first.flow.shape[1], num_classes=len(CLASSES) + 1,
        d_model=16, num_heads=2, ffn_dim=24, long_memory_steps=16, long_memory_stride=4,
        short_memory_steps=4, sparse_k=3, num_branches=2, branch_queries=[4, 3],
        branch_layers=[1, 2]))
    torch.manual_seed(seed)
    model = MALT(cfg.model).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)  # clearly different probabilities per class
    save_checkpoint(Checkpoint(model_state=model.state_dict(), config=to_dict(cfg),
                               feature_settings=store.settings,
                               class_names=["background", *CLASSES]), path)
    return path
