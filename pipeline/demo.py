"""`vidpipe demo`: the whole chain on generated data, no downloads, a few minutes on a CPU.

  1. generate labelled synthetic action videos (pipeline.synthetic: real mp4 files);
  2. extract two-stream features with seeded random-init backbones (small and fast:
     resnet18s on 96 px crops, DIS flow, 12 fps in chunks of 3 = the usual 0.25 s steps);
  3. build per-step labels from the annotation CSV (`vidpipe labels`);
  4. train the small MALT of configs/demo.yaml on the training videos;
  5. evaluate per-frame mAP on the held-out videos, with the model of the last epoch (the
     test videos choose nothing, so the figure is honest);
  6. `vidpipe calibrate` the event rules on the run's validation videos (a fifth of the
     training videos, held out of training) and score the held-out videos' events with the
     default rules and the calibrated ones (`pipeline.score`);
  7. run `detect` on a held-out video as a live stream (decoded and featurised anew, step
     by step), printing events as they are decided and writing its timeline JSON/CSV/PNG.

Everything lands in one folder: data/, cache/, run/, detections/, demo_summary.json.
A rerun reuses the videos and features already there (same seed, same files) and replaces
the demo's own products only: what later commands wrote into the folder (the README's
`vidpipe detect ... --checkpoint demo_out/run/last.pt` writes run/detections/) stays.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vidpipe.core.atomic import write_text_atomically
from vidpipe.core.lock import folder_lock
from vidpipe.core.stop import Interrupted
from vidpipe.core.errors import VidpipeError

log = logging.getLogger(__name__)

DEMO_CONFIG = "demo"  # the shipped configs/demo.yaml, by name
SUMMARY_FILE = "demo_summary.json"
VALIDATION = "data.val_fraction=0.2"   # training videos held out to calibrate the event rules on
MIN_TRAIN_FOR_VALIDATION = 5            # fewer training videos: none held out, no calibration


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
    checkpoint: str                 # the model evaluated and run
    selection: str                  # which videos chose that model (none: the last epoch's)
    summary_file: str               # this result as JSON
    seconds: dict[str, float]       # wall time per stage, and total
    events: dict[str, dict] = field(default_factory=dict)  # held-out event metrics: "default"
                                    # rules and those "calibrated" on the validation videos

    def summary(self) -> str:
        """The lines `vidpipe demo` ends with."""
        return "\n".join([
            f"per-frame mAP on held-out videos: {self.mAP:.3f}  (chance level {self.chance_mAP:.3f})",
            f"timeline picture: {self.timeline_png}",
            f"timeline JSON:    {self.timeline_json}",
            f"model:            {self.checkpoint}",
            f"model selection:  {self.selection}",
            *_event_lines(self.events),
            f"done in {self.seconds['total']:.0f} s; summary in {self.summary_file}"])


def demo_feature_settings(crop: int = 96, seed: int = 0):
    from vidpipe.extractors.features import FeatureSettings

    return FeatureSettings(fps=12.0, chunk=3, resize=crop, crop=crop, rgb_backbone="resnet18",
                           flow_backbone="resnet18", flow_method="dis", dis_preset="ultrafast",
                           flow_fields=2, random_init=True, seed=seed)


def run_demo(out: str | Path, settings: DemoSettings | None = None,
             progress: bool = True) -> DemoResult:
    """Run the six stages of the module notes into `out`, logging each as it ends; returns
    the figures (`DemoResult.summary()` says them in words)."""
    import torch

    settings = settings or DemoSettings()
    _check(settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with folder_lock(out, "demo"):   # one demo per folder (core.lock)
            return _run_demo(Path(out), settings, progress)
    except Interrupted:
        raise
    except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM (core.stop), in a stage that says nothing
        raise Interrupted(f"{out}: the videos and features made so far are kept; rerun the same "
                          "command to go on (it reuses them)") from exc
    finally:
        torch.set_num_threads(threads)


def _check(settings: DemoSettings) -> None:
    if settings.num_videos < 2:
        raise VidpipeError(f"the demo needs at least 2 videos (one to hold out), "
                           f"not {settings.num_videos}")
    for name, value in (("duration_s", settings.duration_s), ("epochs", settings.epochs),
                        ("crop", settings.crop), ("threads", settings.threads)):
        if value is not None and not value > 0:
            raise VidpipeError(f"demo {name} must be positive, not {value}")
    if settings.seed < 0:
        raise VidpipeError(f"demo seed must be 0 or more, not {settings.seed}")
    from vidpipe.core.device import resolve_device
    resolve_device(settings.device)   # a bad --device fails now, not after generating the videos


def _run_demo(out: Path, settings: DemoSettings, progress: bool) -> DemoResult:
    clock = _StageClock()
    log.info("vidpipe demo -> %s/", out)
    data = _generate(out, settings, progress, clock)
    store, labels = _features_and_labels(out, data, settings, progress, clock)
    validate = len(data.train) >= MIN_TRAIN_FOR_VALIDATION
    checkpoint = _train(out / "run", store, settings, progress, clock, validate)
    report = _evaluate(checkpoint, store, settings.device)
    chance = _chance_map(labels, labels.split("test"))
    clock.stage("eval", f"per-frame mAP on {report['num_videos']} held-out videos: "
                        f"{report['mAP']:.3f} (chance {chance:.3f})")
    events = _calibrate(checkpoint, store, settings.device, clock) if validate else {}
    detection = _detect_held_out(out, data, checkpoint, settings.device, store, labels)
    clock.stage("detect", f"timeline of {data.test[0]}: {detection.files['png']}")
    result = DemoResult(mAP=float(report["mAP"]), chance_mAP=chance,
                        per_class_AP={k: float(v["AP"]) for k, v in report["per_class"].items()},
                        timeline_json=str(detection.files["json"]),
                        timeline_png=str(detection.files["png"]), checkpoint=str(checkpoint),
                        selection=report["selection"],
                        summary_file=str(out / SUMMARY_FILE), seconds=clock.total(),
                        events=events)
    write_text_atomically(out / SUMMARY_FILE, json.dumps(asdict(result), indent=2))
    return result


class _StageClock:
    """Wall time per stage; each finished stage is logged with the time since the start."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def stage(self, name: str, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.seconds[name] = round(elapsed - sum(self.seconds.values()), 2)
        log.info("[%6.1f s] %s", elapsed, text)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.started, 2)}


def _generate(out: Path, settings: DemoSettings, progress: bool, clock: _StageClock):
    from vidpipe.pipeline.synthetic import SyntheticSpec, generate_dataset

    data = generate_dataset(out / "data", SyntheticSpec(
        num_videos=settings.num_videos, duration_s=settings.duration_s, seed=settings.seed),
        progress=progress)
    clock.stage("generate", f"{settings.num_videos} synthetic videos ({len(data.train)} train, "
                            f"{len(data.test)} held out): {data.videos_dir}")
    return data


def _features_and_labels(out: Path, data, settings: DemoSettings, progress: bool,
                         clock: _StageClock):
    """Extract the videos into out/cache and build its labels.h5: (store, labels)."""
    from vidpipe.pipeline.extract import extract_folder
    from vidpipe.store.cache import FeatureStore
    from vidpipe.store.labels import LABELS_FILE, build_labels, describe

    summary = extract_folder(data.videos_dir, out / "cache",
                             demo_feature_settings(settings.crop, settings.seed),
                             device=settings.device, progress=progress)
    if not summary.ok:
        raise VidpipeError(summary.report())
    clock.stage("extract", summary.report())
    store = FeatureStore.open(out / "cache")
    labels = build_labels(store, data.annotations, data.class_names)
    labels.save(store.root / LABELS_FILE)
    clock.stage("labels", describe(labels).replace("\n", "; "))
    return store, labels


def _train(run_dir: Path, store, settings: DemoSettings, progress: bool,
           clock: _StageClock, validate: bool) -> Path:
    """Train configs/demo.yaml afresh (data and cache are reused); the last epoch's model."""
    from vidpipe.malt.train import remove_run, train

    remove_run(run_dir)   # the previous demo's run, not what other commands wrote beside it
    overrides = [*([VALIDATION] if validate else []),
                 *([f"train.epochs={settings.epochs}"] if settings.epochs else []), *settings.overrides]
    train(DEMO_CONFIG, store.root, run_dir, overrides=overrides, device=settings.device,
          progress=progress)
    clock.stage("train", f"trained MALT (configs/{DEMO_CONFIG}.yaml) -> {run_dir}")
    return run_dir / "last.pt"


def _evaluate(checkpoint: Path, store, device: str) -> dict:
    from vidpipe.malt.evaluate import evaluate

    return evaluate(checkpoint, store.root, split="test", device=device,
                    out=checkpoint.parent / "eval_test.json")


def _detect_held_out(out: Path, data, checkpoint: Path, device: str, store, labels):
    """Live detection on the first held-out video; the picture compares it with the truth."""
    from vidpipe.pipeline.detect import detect

    held_out = data.videos_dir / data.test[0]
    (detection,) = detect(held_out, checkpoint, out=out / "detections", live=True,
                          device=device, picture=False)
    if detection.interrupted:   # Ctrl-C or SIGTERM: the demo stops here too
        raise Interrupted(f"the timeline decided so far is written: {detection.files['json']}")
    # the demo knows the truth: add it to the timeline, so the picture (drawn once, here)
    # compares the two
    video_id = data.test[0]
    truth = labels.segments(video_id, store.timestamps(video_id), float(store.settings["step_seconds"]))
    detection.timeline.metadata["ground_truth"] = [
        {"label": s.label, "start_s": s.start_s, "end_s": s.end_s} for s in truth]
    detection.timeline.save_json(detection.files["json"])
    detection.files["png"] = detection.timeline.save_png(detection.files["json"].with_suffix(".png"))
    return detection


def _chance_map(labels, video_ids: list[str]) -> float:
    """mAP of a scorer that knows nothing: each class's AP is its share of (unambiguous) steps."""
    targets = np.concatenate([labels.videos[v].targets[~labels.videos[v].ambiguous]
                              for v in video_ids])
    positive = (targets[:, 1:] > 0).mean(axis=0)
    return float(positive[positive > 0].mean())


def _calibrate(checkpoint: Path, store, device: str, clock: _StageClock) -> dict[str, dict]:
    """`vidpipe calibrate` on the run's validation videos (never the held-out ones), then the
    event metrics of the held-out videos with the default rules and with the chosen ones."""
    from vidpipe.pipeline.calibrate import calibrate
    from vidpipe.pipeline.score import checkpoint_probabilities, score_probabilities
    from vidpipe.pipeline.timeline import TimelineSettings

    rules = calibrate(checkpoint, store.root, split="val", device=device)
    held_out = checkpoint_probabilities(checkpoint, store.root, None, "test", device)
    events = {name: _event_figures(score_probabilities(held_out, rule_set)) for name, rule_set in
              (("default", TimelineSettings()), ("calibrated", TimelineSettings(**rules["settings"])))}
    clock.stage("calibrate", f"event rules chosen on {len(rules['calibration']['videos'])} validation "
                             f"videos; " + _event_lines(events)[-1].strip())
    return events


def _event_figures(report: dict) -> dict:
    return {"segment_F1@0.25": report["f1"]["0.25"], "segment_F1@0.50": report["f1"]["0.50"],
            "edit": report["edit"], "start_mAP_1_10s": report["start_mAP"],
            "start_latency_median_s": report["latency_s"]["median"],
            "false_starts_per_hour": report["false_starts_per_hour"]}


def _event_lines(events: dict[str, dict]) -> list[str]:
    if not events:
        return []
    before, after = events["default"], events["calibrated"]
    pairs = ", ".join(f"{key} {before[key]:.3f} -> {after[key]:.3f}" for key in before)
    return ["event metrics on held-out videos (default rules -> rules calibrated on validation videos):",
            f"  {pairs}"]
