"""What each streaming precision costs in accuracy: test-split mAP of a trained checkpoint,
streamed in fp32, bf16 and int8 (malt.stream `precision=`), beside the offline forward's.

    .venv/bin/python bench/precision_accuracy.py RUN/last.pt CACHE [--split test] [--precisions fp32,bf16,int8]

e.g. on the demo's outputs (`vidpipe demo --out demo`): `demo/run/last.pt demo/cache`.
Every test video is one stream of a single MultiStreamDetector; the videos step together.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vidpipe.malt.checkpoint import load_model
from vidpipe.malt.data import load_videos, resolve_labels
from vidpipe.malt.evaluate import predict_offline
from vidpipe.malt.metrics import detection_report
from vidpipe.pipeline.score import stream_probabilities
from vidpipe.store.cache import FeatureStore

from conditions import measured   # bench/conditions.py: machine and load, before and after


def stream_videos(model, videos: dict, precision: str) -> tuple[dict[str, np.ndarray], float]:
    """Probabilities (T, C+1) of every video, all streamed at once as `vidpipe eval` streams
    them (the detector's set-up, int8's quantisation included, counted); and the seconds it took."""
    started = time.perf_counter()
    probs = stream_probabilities(model, {name: (v.rgb, v.flow) for name, v in videos.items()}, precision)
    return probs, time.perf_counter() - started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("cache")
    parser.add_argument("--split", default=None, help="default: the checkpoint's test split")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with measured("bench/precision_accuracy.py", args.threads):   # sets the threads, then names them
        run(args)


def run(args: argparse.Namespace) -> None:
    model, checkpoint = load_model(args.checkpoint, "cpu")
    store = FeatureStore.open(args.cache)
    labels, source = resolve_labels(store, None)
    split = args.split or checkpoint.model_config(args.checkpoint).data.test_split
    videos = load_videos(store, labels, labels.split(split), source)

    def report(probs: dict[str, np.ndarray]) -> dict:
        return detection_report(np.concatenate([probs[name] for name in videos]),
                                np.concatenate([v.targets for v in videos.values()]), labels.class_names,
                                ambiguous=np.concatenate([v.ambiguous for v in videos.values()]))

    offline = {name: predict_offline(model, v.rgb, v.flow) for name, v in videos.items()}
    streamed = {precision: stream_videos(model, videos, precision) for precision in args.precisions.split(",")}
    steps = sum(len(v.rgb) for v in videos.values())
    print(f"{args.checkpoint} on {len(videos)} '{split}' videos ({steps} steps) of {args.cache}, "
          f"streamed together, {torch.get_num_threads()} threads")
    print(f"{'':<16}{'mAP':>8}{'mcAP':>8}{'max |p - offline|':>19}{'stream-steps/s':>16}")
    print(f"{'offline':<16}{report(offline)['mAP']:>8.4f}{report(offline)['mcAP']:>8.4f}")
    for precision, (probs, seconds) in streamed.items():
        result = report(probs)
        error = max(np.abs(probs[v] - offline[v]).max() for v in videos)
        print(f"{'streaming ' + precision:<16}{result['mAP']:>8.4f}{result['mcAP']:>8.4f}{error:>19.2e}"
              f"{steps / seconds:>16.1f}")
    print("targets: mAP within 0.5 points of offline fp32 for each precision, max |p - offline| <= 0.05")


if __name__ == "__main__":
    main()
