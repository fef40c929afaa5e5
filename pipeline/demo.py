"""`vidpipe demo`: the whole chain on generated data, no downloads, a few minutes on a CPU.

  1. generate labelled synthetic action videos (pipeline.synthetic: real mp4 files);
  2. extract two-stream features with seeded random-init backbones (small and fast:
     resnet18s on 96 px crops, DIS flow, 12 fps in chunks of 3 = the usual 0.25 s steps);
  3. build per-step labels from the annotation CSV (`vidpipe labels`);
  4. train the small MALT of configs/demo.yaml on the training videos;
  5. evaluate per-frame mAP on the held-out videos, with the model of the last epoch (the
     test videos choose nothing, so the figure is honest);
  6. run `detect` on a held-out video as a live stream (decoded and featurised anew, step
     by step), printing events as they are decided and writing its timeline JSON/CSV/PNG.

Everything lands in one folder: data/, cache/, run/, detections/, demo_summary.json.
A rerun reuses the videos and features already there (same seed, same files).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vidpipe.core.errors import VidpipeError

DEMO_CONFIG = "demo"  # the shipped configs/demo.yaml, by name
SUMMARY_FILE = "demo_summary.json"


@dataclass
class DemoSettings:
    num_videos: int = 48            # a quarter of them held out
    duration_s: float = 20.0
    epochs: int | None = None       # None: configs/demo.yaml's
    crop: int = 96
    seed: int = 0
    device: str = "cpu"
    threads: int = 1                # torch CPU threads: with models this small, extra
                                    # threads cost more in synchronisation than they give
    overrides: list[str] = field(default_factory=list)   # extra `--set` for training


@dataclass
class DemoResult:
    mAP: float
    chance_mAP: float               # mean positive rate of the classes: a random scorer's AP
    per_class_AP: dict[str, float]
    timeline_json: str
    timeline_png: str
    seconds: dict[str, float]       # wall time per stage, and total


def demo_feature_settings(crop: int = 96, seed: int = 0):
    from vidpipe.extractors.features import FeatureSettings

    return FeatureSettings(fps=12.0, chunk=3, resize=crop, crop=crop, rgb_backbone="resnet18",
                           flow_backbone="resnet18", flow_method="dis", dis_preset="ultrafast",
                           flow_fields=2, random_init=True, seed=seed)


def run_demo(out: str | Path, settings: DemoSettings | None = None, progress: bool = True,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Run the six stages of the module notes into `out`; returns the figures it prints."""
    import torch

    settings = settings or DemoSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _run_demo(Path(out), settings, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, settings: DemoSettings, progress: bool,
              echo: Callable[[str], None]) -> DemoResult:
    from vidpipe.malt.evaluate import evaluate
    from vidpipe.malt.train import train
    from vidpipe.pipeline.detect import detect
    from vidpipe.pipeline.extract import extract_folder
    from vidpipe.store.labels import LABELS_FILE, build_labels, describe
    from vidpipe.store.cache import FeatureStore
    from vidpipe.pipeline.synthetic import SyntheticSpec, generate_dataset

    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, text: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 2)
        echo(f"[{time.perf_counter() - started:6.1f} s] {text}")

    echo(f"vidpipe demo -> {out}/")
    data = generate_dataset(out / "data", SyntheticSpec(
        num_videos=settings.num_videos, duration_s=settings.duration_s, seed=settings.seed),
        progress=progress)
    stage("generate", f"{settings.num_videos} synthetic videos ({len(data.train)} train, "
                      f"{len(data.test)} held out): {data.videos_dir}")

    summary = extract_folder(data.videos_dir, out / "cache",
                             demo_feature_settings(settings.crop, settings.seed),
                             device=settings.device, progress=progress)
    if not summary.ok:
        raise VidpipeError(summary.report())
    stage("extract", summary.report())

    store = FeatureStore.open(out / "cache")
    labels = build_labels(store, data.annotations, data.class_names)
    labels.save(store.root / LABELS_FILE)
    stage("labels", describe(labels).replace("\n", "; "))

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun trains afresh (data and cache stay)
    overrides = [*([f"train.epochs={settings.epochs}"] if settings.epochs else []),
                 *settings.overrides]
    train(DEMO_CONFIG, store.root, run_dir, overrides=overrides, device=settings.device,
          progress=progress)
    stage("train", f"trained MALT (configs/{DEMO_CONFIG}.yaml) -> {run_dir}")

    checkpoint = run_dir / "last.pt"
    report = evaluate(checkpoint, store.root, split="test", device=settings.device,
                      out=run_dir / "eval_test.json")
    chance = _chance_map(labels, labels.split("test"))
    stage("eval", f"per-frame mAP on {report['num_videos']} held-out videos: "
                  f"{report['mAP']:.3f} (chance {chance:.3f})")

    held_out = data.videos_dir / data.test[0]
    (detection,) = detect(held_out, checkpoint, out=out / "detections", live=True,
                          device=settings.device, picture=False, echo=echo)
    # the demo knows the truth: add it to the timeline, so the picture (drawn once, here)
    # compares the two
    detection.timeline.metadata["ground_truth"] = _ground_truth(data.annotations, held_out.name)
    detection.timeline.save_json(detection.files["json"])
    detection.files["png"] = detection.timeline.save_png(detection.files["json"].with_suffix(".png"))
    stage("detect", f"timeline of {held_out.name}: {detection.files['png']}")
    seconds["total"] = round(time.perf_counter() - started, 2)

    result = DemoResult(mAP=float(report["mAP"]), chance_mAP=chance,
                        per_class_AP={k: float(v["AP"]) for k, v in report["per_class"].items()},
                        timeline_json=str(detection.files["json"]),
                        timeline_png=str(detection.files["png"]), seconds=seconds)
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2))
    echo("")
    echo(f"per-frame mAP on held-out videos: {result.mAP:.3f}  (chance level {chance:.3f})")
    echo(f"timeline picture: {result.timeline_png}")
    echo(f"timeline JSON:    {result.timeline_json}")
    echo(f"model:            {checkpoint}")
    echo(f"done in {seconds['total']:.0f} s; summary in {out / SUMMARY_FILE}")
    return result


def _chance_map(labels, video_ids: list[str]) -> float:
    """mAP of a scorer that knows nothing: each class's AP is its share of (unambiguous) steps."""
    targets = np.concatenate([labels.videos[v].targets[~labels.videos[v].ambiguous]
                              for v in video_ids])
    positive = (targets[:, 1:] > 0).mean(axis=0)
    return float(positive[positive > 0].mean())


def _ground_truth(annotations: Path, video: str) -> list[dict]:
    from vidpipe.store.labels import read_annotations

    return [{"label": s.label, "start_s": s.start_s, "end_s": s.end_s}
            for s in read_annotations(annotations).segments if s.video == video]
