"""Benchmark the training engine and offline evaluation against the bare model.

    .venv/bin/python bench/train.py [--threads 1] [--paper-windows 32] [--device cpu]

For the demo configuration and the paper's (d_model 1024, 512 + 32 tokens, rgb 2048 + flow
1024), on random features in a temporary cache:
  model only  forward + backward + Adam on one batch already in memory (the baseline);
  engine      `malt.train.train`, one epoch end to end: window gathering, DataLoader, loss,
              learning-rate schedule (checkpoint writing and evaluation not included);
  eval        `malt.evaluate.predict_offline`: sliding windows, stride 1, batches of 64.
The engine/model ratio is the cost of the data path; near 1 means the model dominates.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vidpipe.malt.config import Config
from vidpipe.malt.evaluate import predict_offline
from vidpipe.malt.losses import malt_loss
from vidpipe.malt.model import MALT
from vidpipe.malt.train import train
from vidpipe.malt.window import gather_window
from vidpipe.core.config import load_config
from vidpipe.store.labels import LABELS_FILE, LabelSet, VideoLabels
from vidpipe.store.cache import FeatureStore

from conditions import measured   # bench/conditions.py: machine and load, before and after



def make_cache(root: Path, cfg, windows: int, rng) -> Path:
    """Two videos giving `windows` full training windows in total, whatever the offset."""
    steps = cfg.short_memory_steps * (windows // 2) + cfg.short_memory_steps - 1
    names = ["background"] + [f"class_{c}" for c in range(1, cfg.num_classes)]
    store = FeatureStore.open_or_create(root, {"source": "bench/train.py", "step_seconds": 0.25})
    labels = {}
    for video_id in ("v0", "v1"):
        store.write(video_id, rng.standard_normal((steps, cfg.rgb_dim), dtype=np.float32),
                    rng.standard_normal((steps, cfg.flow_dim), dtype=np.float32), np.arange(steps) * 0.25)
        targets = np.eye(cfg.num_classes, dtype=np.float32)[rng.integers(0, cfg.num_classes, steps)]
        labels[video_id] = VideoLabels(targets, np.zeros(steps, bool))
    LabelSet(names, labels, {"v0": "train", "v1": "train"}).save(root / LABELS_FILE)
    return root


def model_only_rate(cfg: Config, videos_rgb, videos_flow, device, repeats: int = 2) -> float:
    """Windows/s of forward + backward + Adam on a prepared batch."""
    model = MALT(cfg.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    ends = range(cfg.model.short_memory_steps - 1, len(videos_rgb), cfg.model.short_memory_steps)
    ends = list(ends)[:cfg.train.batch_size]
    batch = [torch.from_numpy(np.stack(arrays)).to(device) for arrays in
             zip(*(gather_window(videos_rgb, videos_flow, t, cfg.model) for t in ends))]
    targets = torch.zeros(len(ends), cfg.model.short_memory_steps, cfg.model.num_classes, device=device)
    targets[..., 0] = 1
    valid = torch.ones(targets.shape[:2], dtype=torch.bool, device=device)

    def step():
        output = model(*batch)
        loss = malt_loss(output.logits, output.aux_logits, targets, valid,
                         cfg.model.aux_weight, cfg.model.aux_loss).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()   # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * len(ends) / (time.perf_counter() - started)


def measure(name: str, config: Path, windows: int, eval_steps: int, device, rng) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = load_config(Config, config)
        base.model.rgb_dim, base.model.flow_dim = (512, 512) if name == "demo" else (2048, 1024)
        base.model.num_classes = 5 if name == "demo" else 21
        cache = make_cache(tmp / "cache", base.model, windows, rng)
        history = train(config, cache, tmp / "run", overrides=[
            "train.epochs=1", "train.warmup_epochs=0", "train.keep_checkpoints=0",
            f"train.batch_size={min(base.train.batch_size, windows)}", "data.num_workers=0"],
            device=str(device), progress=False)
        video = FeatureStore.open(cache).read("v0")
        cfg = load_config(Config, tmp / "run" / "config.yaml")
        cfg.train.batch_size = min(cfg.train.batch_size, windows)
        model_rate = model_only_rate(cfg, video.rgb, video.flow, device)
        model = MALT(cfg.model).to(device)
        rgb, flow = video.rgb[:eval_steps], video.flow[:eval_steps]
        predict_offline(model, rgb[:cfg.model.short_memory_steps + 1], flow[:cfg.model.short_memory_steps + 1])
        started = time.perf_counter()
        predict_offline(model, rgb, flow)
        eval_rate = len(rgb) / (time.perf_counter() - started)
    return {"config": name, "batch": cfg.train.batch_size, "model": model_rate,
            "engine": history[-1]["windows_per_s"], "eval": eval_rate}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paper-windows", type=int, default=32, help="training windows at paper size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with measured("bench/train.py", args.threads):    # sets the threads, then names them
        run(args)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    rows = [measure("demo", "demo", 160, 400, device, rng),
            measure("paper", "malt_thumos", args.paper_windows, 96, device, rng)]
    print(f"device {device}, {args.threads} thread(s); windows/s (eval: steps/s)")
    print(f"{'config':<8}{'batch':>6}{'model only':>12}{'engine':>10}{'engine/model':>14}{'eval':>10}")
    for row in rows:
        print(f"{row['config']:<8}{row['batch']:>6}{row['model']:>12.1f}{row['engine']:>10.1f}"
              f"{row['engine'] / row['model']:>14.2f}{row['eval']:>10.1f}")


if __name__ == "__main__":
    main()
