"""`vidpipe detect`: online action detection on a video, a stream or a folder -> timelines.

The chain runs the way the model is used live: frames are decoded as a stream, each chunk
becomes one RGB + flow feature step (the extractor is rebuilt from the checkpoint's feature
settings, so the features are made exactly like the training cache's), each step enters
`malt.stream.OnlineDetector` (causal: a step's output never depends on a later frame), and
the probabilities feed `pipeline.timeline.Segmenter`, which decides the action segments as
the steps arrive. With `live=True` every start/end decision is printed when it is made,
with the latency from the moment the chunk's last frame was decoded to the decision.

Outputs per video (default folder: `<run folder>/detections/`, the run folder being the
checkpoint's): `<name>.timeline.json` (segments, per-step probabilities, metadata),
`<name>.timeline.csv` (segments) and `<name>.timeline.png` (the picture).

Batch: a folder source runs every video in it. With `cache` (which must have the
checkpoint's feature settings), a video the cache already holds (the same content, by the
fingerprint `vidpipe extract` records, whatever the file is called now) is read from the
cache instead of being decoded again; the model still runs step by step. A bad video is
reported and skipped; the others go on.
Ctrl-C stops cleanly: the steps decided so far are written as the video's timeline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from vidpipe.core.errors import BatchIncomplete, VidpipeError
from vidpipe.core.settings import differing_keys
from vidpipe.store.cache import FeatureStore, video_id_from_path
from vidpipe.pipeline.timeline import Event, Segmenter, Timeline, TimelineSettings, format_time

DETECTIONS_DIR = "detections"


@dataclass
class Detection:
    """One video's result, as written to disk."""
    source: str
    timeline: Timeline
    files: dict[str, Path]                     # "json" / "csv" / "png" -> path
    interrupted: bool = False                  # stopped by Ctrl-C before the end


@dataclass
class _Timed:
    """One feature step and the wall-clock time its chunk was complete."""
    timestamp: float
    rgb: np.ndarray
    flow: np.ndarray
    ready: float                               # time.perf_counter() when its last frame was in


def detect(source: str | Path, checkpoint: str | Path, out: str | Path | None = None,
           cache: str | Path | None = None, settings: TimelineSettings | None = None,
           live: bool = False, device: str | None = None, picture: bool = True,
           weights: dict[str, str] | None = None,
           echo: Callable[[str], None] = print) -> list[Detection]:
    """Detect actions in `source` (a video file, URL, device, a folder of videos, or the id
    of a video in `cache`).

    `weights`: {"rgb"|"flow"|"raft": path} for features made with weights files (the
    checkpoint records their sha256). Returns one `Detection` per video done.
    """
    from vidpipe.core.device import resolve_device
    from vidpipe.malt.checkpoint import load_model

    device = resolve_device(device)
    model, ckpt = load_model(checkpoint, device)
    store = _open_cache(cache, ckpt.feature_settings, checkpoint) if cache else None
    out_dir = Path(out) if out else Path(checkpoint).resolve().parent / DETECTIONS_DIR
    runner = _Runner(model, ckpt, str(checkpoint), device, settings or TimelineSettings(),
                     weights or {}, store, live, echo)

    folder = Path(str(source))
    if not folder.is_dir():  # a file, URL or device
        detection = runner.run(str(source), _output_name(str(source)), out_dir, picture)
        return [detection]

    from vidpipe.pipeline.extract import find_videos

    videos = find_videos(folder)
    if not videos:
        raise VidpipeError(f"{folder}: no video files found")
    detections, failures = [], []
    for video in videos:
        path = video.path
        try:
            detection = runner.run(str(path), video.video_id, out_dir, picture)
        except Exception as exc:  # a bad video must not stop the batch: say why, go on
            why = str(exc) if isinstance(exc, VidpipeError) else \
                f"{path}: unexpected {type(exc).__name__}: {exc}"
            failures.append(why)
            echo(f"skipped: {why}")
            continue
        detections.append(detection)
        if detection.interrupted:
            break
    echo(f"{len(detections)} of {len(videos)} videos done, timelines in {out_dir}")
    if failures:
        echo(f"{len(failures)} failed:\n  " + "\n  ".join(failures))
        # After the batch, so that every good video has its timeline; non-zero exit for scripts.
        raise BatchIncomplete(f"{folder}: {len(failures)} of {len(videos)} videos failed "
                              f"(listed above)")
    return detections


class _Runner:
    """Everything shared by the videos of one `detect` call."""

    def __init__(self, model, ckpt, checkpoint_path: str, device, settings: TimelineSettings,
                 weights: dict[str, str], store: FeatureStore | None, live: bool,
                 echo: Callable[[str], None]):
        self.model, self.ckpt, self.checkpoint_path = model, ckpt, checkpoint_path
        self.device, self.settings, self.weights = device, settings, weights
        self.store, self.live, self.echo = store, live, echo
        self.step_seconds = float(ckpt.feature_settings["step_seconds"])
        self._extractor = None
        self._by_fingerprint: dict[str, str] | None = None

    @property
    def extractor(self):
        """Built on first use: a batch served from the cache never loads the CNNs."""
        if self._extractor is None:
            from vidpipe.extractors.features import TwoStreamExtractor
            try:
                self._extractor = TwoStreamExtractor.from_record(
                    self.ckpt.feature_settings, self.device,
                    rgb_weights=self.weights.get("rgb"), flow_weights=self.weights.get("flow"),
                    raft_weights=self.weights.get("raft"))
            except VidpipeError as exc:
                raise VidpipeError(f"{self.checkpoint_path}: {exc}") from None
            except KeyError as exc:  # e.g. imported precomputed features: no extractor record
                raise VidpipeError(
                    f"{self.checkpoint_path}: its features were not made by `vidpipe extract` "
                    f"(no '{exc.args[0]}' in their settings), so new video cannot be "
                    "featurised the same way; detect on videos of its --cache by id") from None
        return self._extractor

    def cached_id(self, source: str) -> str | None:
        """The cache id holding this very file, whatever its name now: the content
        fingerprint `vidpipe extract` records per video identifies it. A source that is no
        file but a video id of the cache (e.g. of imported features) names it directly."""
        from vidpipe.pipeline.extract import fingerprint

        path = Path(source)
        if self.store is None:
            return None
        if not path.exists() and source in self.store:
            return source
        if not path.is_file():
            return None
        if self._by_fingerprint is None:  # read once: a folder run looks up every video
            self._by_fingerprint = {self.store.attrs(v).get("fingerprint"): v
                                    for v in self.store.video_ids()}
        return self._by_fingerprint.get(fingerprint(path))

    def run(self, source: str, name: str, out_dir: Path, picture: bool) -> Detection:
        from vidpipe.extractors.decode import is_stream
        from vidpipe.malt.stream import OnlineDetector

        cached = self.cached_id(source)
        started = time.perf_counter()
        if cached is not None:
            steps = _cached_steps(self.store, cached)
            info = {"features": f"cache {self.store.root}"}
        elif self.store is not None and not Path(source).exists() and not is_stream(source):
            raise VidpipeError(f"{source}: no such file, and no video of that id in the cache "
                               f"{self.store.root}")
        else:
            steps, info = self._stream_steps(source)
        names = list(self.ckpt.class_names)
        detector = OnlineDetector(self.model, self.device)
        segmenter = Segmenter(names, self.step_seconds, self.settings)
        timestamps, probs, latencies = [], [], []
        model_seconds, interrupted = 0.0, False
        if self.live:
            self.echo(f"# {source}: live detection, {len(names) - 1} classes, "
                      f"step {self.step_seconds:g} s (Ctrl-C stops and writes what it has)")
        try:
            for step in steps:
                tick = time.perf_counter()
                row = detector.step(step.rgb, step.flow)                    # (C+1,)
                events = segmenter.step(step.timestamp, row)
                decided = time.perf_counter()
                model_seconds += decided - tick
                latencies.append(decided - step.ready)
                timestamps.append(step.timestamp)
                probs.append(row)
                self._print(events, latencies[-1])
        except KeyboardInterrupt:
            interrupted = True
            self.echo(f"# interrupted at {format_time(timestamps[-1] if timestamps else 0)}: "
                      "writing the timeline so far")
        self._print(segmenter.finish(), None)
        total = time.perf_counter() - started
        if not len(timestamps) and not interrupted:
            raise VidpipeError(f"{source}: too short for one feature step")

        probs_array = (np.stack(probs) if probs else np.zeros((0, len(names)), np.float32))
        timeline = Timeline(names, np.asarray(timestamps, np.float64), probs_array,
                            self.step_seconds, segmenter.segments, self.settings,
                            self._metadata(source, cached, info, total, model_seconds,
                                           latencies, interrupted))
        files = {"json": timeline.save_json(out_dir / f"{name}.timeline.json"),
                 "csv": timeline.save_csv(out_dir / f"{name}.timeline.csv")}
        if picture:
            files["png"] = timeline.save_png(out_dir / f"{name}.timeline.png")
        count = len(timeline.segments)
        self.echo(f"{source}: {count} segment{'' if count == 1 else 's'} in "
                  f"{timeline.duration_s:.1f} s of video ({total:.1f} s) -> {files['json']}")
        return Detection(source, timeline, files, interrupted)

    def _stream_steps(self, source: str) -> tuple[Iterator[_Timed], dict]:
        """Decode and featurise as a stream; one step at a time when live or from a URL or
        device (lowest latency), in batches from a file otherwise (fastest)."""
        extractor = self.extractor
        video = extractor.source(source)
        ready: dict[int, float] = {}

        def chunks():
            for chunk in video.chunks():
                ready[chunk.index] = time.perf_counter()
                yield chunk

        def steps() -> Iterator[_Timed]:
            # batching steps delays each decision until the batch is full: not for live use
            batch = 1 if self.live or not video.info.is_file else None
            for step in extractor.stream_chunks(chunks(), batch_size=batch):
                yield _Timed(step.timestamp, step.rgb, step.flow, ready.pop(step.index))

        info = {"features": "stream", "width": video.info.width, "height": video.info.height,
                "native_fps": video.info.native_fps, "declared_duration_s": video.info.duration}
        return steps(), info

    def _print(self, events: list[Event], latency: float | None) -> None:
        if not self.live:
            return
        for event in events:
            line = f"{format_time(event.time_s)}  {event.kind:<5}  {event.label}  {event.score:.2f}"
            if latency is not None:
                line += f"  (decided {latency * 1000:.0f} ms after the chunk's last frame)"
            self.echo(line)

    def _metadata(self, source: str, cached: str | None, info: dict, total: float,
                  model_seconds: float, latencies: list[float], interrupted: bool) -> dict:
        steps = len(latencies)
        latency = np.asarray(latencies) * 1000
        return {
            "video": {"source": source, "cache_id": cached, **info},
            "model": {"checkpoint": self.checkpoint_path, "epoch": self.ckpt.epoch,
                      "config": self.ckpt.config.get("model", {})},
            "feature_settings": self.ckpt.feature_settings,
            "device": str(self.device),
            "interrupted": interrupted,
            "timings": {
                "steps": steps, "total_s": round(total, 4), "model_s": round(model_seconds, 4),
                "features_s": round(total - model_seconds, 4),
                "realtime_factor": round(steps * self.step_seconds / total, 2) if total else None,
                "latency_ms": ({"mean": round(float(latency.mean()), 2),
                                "p50": round(float(np.percentile(latency, 50)), 2),
                                "p95": round(float(np.percentile(latency, 95)), 2),
                                "max": round(float(latency.max()), 2)} if steps else None),
            },
        }


def _open_cache(cache: str | Path, feature_settings: dict, checkpoint: str | Path) -> FeatureStore:
    store = FeatureStore.open(cache)
    if store.settings != feature_settings:
        keys = differing_keys(store.settings, feature_settings)
        raise VidpipeError(f"{cache}: features made with other settings than {checkpoint}'s "
                           f"training cache (differs in: {', '.join(keys)})")
    return store


def _cached_steps(store: FeatureStore, video_id: str) -> Iterator[_Timed]:
    features = store.read(video_id)
    for timestamp, rgb, flow in zip(features.timestamps, features.rgb, features.flow):
        yield _Timed(float(timestamp), rgb, flow, time.perf_counter())


def _output_name(source: str) -> str:
    """File-name stem for a source: the file's name, or the URL / device made safe."""
    from vidpipe.extractors.decode import is_stream

    if is_stream(source):
        return video_id_from_path(source.split("://", 1)[-1])
    return video_id_from_path(Path(source).name)


def timeline_settings(threshold: float, class_thresholds: tuple[str, ...] | list[str],
                      min_duration_s: float, merge_gap_s: float) -> TimelineSettings:
    """TimelineSettings from command-line values; `class_thresholds` as NAME=VALUE strings."""
    per_class = {}
    for item in class_thresholds:
        name, sep, value = item.partition("=")
        try:
            per_class[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise VidpipeError(f"--class-threshold '{item}': expected NAME=VALUE, e.g. Spin=0.4")
    for label, value in (("--threshold", threshold), *per_class.items()):
        if not 0.0 <= value <= 1.0:
            raise VidpipeError(f"threshold {label}={value}: must be in [0, 1]")
    if min_duration_s < 0 or merge_gap_s < 0:
        raise VidpipeError("--min-duration and --merge-gap must be >= 0 seconds")
    return TimelineSettings(threshold, per_class, min_duration_s, merge_gap_s)
