"""Online detection speed: the whole live chain against its parts, on one synthetic video.

Prints one table: feature extraction alone (the baseline), `detect` from a cache (model +
timeline only), `detect` from the file in batches, `detect --live` (one step at a time) and
`detect --live` on 4 copies of the video at once (steps/s of all sources together; real time
per source), each as steps/s, a multiple of real time and a ratio to the baseline, plus the
live decision latency (chunk's last frame decoded -> decision). Demo-size settings: the
demo's extractor (random-init resnet18s, DIS flow) and the model of configs/demo.yaml with
random weights.

    .venv/bin/python bench/detect.py [--seconds 60] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vidpipe.extractors.features import TwoStreamExtractor
from vidpipe.malt.checkpoint import Checkpoint, save_checkpoint
from vidpipe.malt.config import Config
from vidpipe.malt.model import MALT
from vidpipe.core.config import load_config, to_dict
from vidpipe.pipeline.demo import DEMO_CONFIG, demo_feature_settings
from vidpipe.pipeline.detect import detect
from vidpipe.pipeline.extract import fingerprint
from vidpipe.store.cache import FeatureStore
from vidpipe.pipeline.synthetic import CLASSES, SyntheticSpec, generate_dataset

from conditions import measured   # bench/conditions.py: machine and load, before and after


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with measured("bench/detect.py", args.threads):    # sets the threads, then names them
        run(args)


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_dataset(root / "data", SyntheticSpec(num_videos=1, duration_s=args.seconds),
                                progress=False)
        video = data.videos_dir / data.test[0]
        extractor = TwoStreamExtractor(demo_feature_settings(), args.device)

        started = time.perf_counter()
        rgb, flow, timestamps = extractor.extract(video)
        extract_s = time.perf_counter() - started
        store = FeatureStore.open_or_create(root / "cache", extractor.settings_record())
        store.write(video.name, rgb, flow, timestamps, {"fingerprint": fingerprint(video)})

        checkpoint = random_demo_checkpoint(store.settings, root / "run" / "last.pt")

        rows = [("features only (baseline)", 1, extract_s, None)]
        for name, copies, kwargs in [("detect from cache", 1, {"cache": store.root}),
                                     ("detect from file, batched", 1, {}),
                                     ("detect --live (1 step at a time)", 1, {"live": True}),
                                     ("detect --live, 4 sources at once", 4, {"live": True})]:
            detections = detect([video] * copies, checkpoint, out=root / "out", device=args.device,
                                picture=False, **kwargs)
            timings = [d.timeline.metadata["timings"] for d in detections]
            # sources run together: the slowest one's time is the batch's
            slowest = max(timings, key=lambda t: t["total_s"])
            rows.append((name, copies, slowest["total_s"],
                         slowest["latency_ms"] if kwargs.get("live") else None))

    steps, video_s = len(timestamps), len(timestamps) * float(store.settings["step_seconds"])
    print(f"{steps} steps ({video_s:.0f} s of {SyntheticSpec().width}x{SyntheticSpec().height} "
          f"video) per source, device {args.device}, {args.threads} thread(s)")
    print(f"{'what':<34} {'seconds':>8} {'steps/s':>8} {'x real time':>12} {'vs baseline':>12}  "
          "latency ms (p50 / p95)")
    for name, copies, seconds, latency in rows:
        lat = f"{latency['p50']:.0f} / {latency['p95']:.0f}" if latency else ""
        print(f"{name:<34} {seconds:8.2f} {copies * steps / seconds:8.1f} "
              f"{video_s / seconds:12.1f} {seconds / extract_s:11.2f}x  {lat}")


def random_demo_checkpoint(feature_settings: dict, path: Path) -> Path:
    """configs/demo.yaml's model with random weights (seed 0) for features of these settings."""
    cfg = load_config(Config, DEMO_CONFIG)
    cfg.model.rgb_dim, cfg.model.flow_dim = feature_settings["rgb_dim"], feature_settings["flow_dim"]
    cfg.model.num_classes = len(CLASSES) + 1
    torch.manual_seed(0)
    save_checkpoint(Checkpoint(model_state=MALT(cfg.model).state_dict(), config=to_dict(cfg),
                               feature_settings=feature_settings,
                               class_names=["background", *CLASSES]), path)
    return path


if __name__ == "__main__":
    main()
