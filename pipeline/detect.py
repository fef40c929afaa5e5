"""`vidpipe detect`: online action detection on videos, streams, folders -> timelines.

The chain runs the way the model is used live: frames are decoded as a stream, each chunk
becomes one RGB + flow feature step (the extractor is rebuilt from the checkpoint's feature
settings, so the features are made exactly like the training cache's), each step enters
`malt.stream.MultiStreamDetector` (causal: a step's output never depends on a later frame;
every source is one stream of the same batched detector), and the probabilities feed
`pipeline.timeline.Segmenter`, which decides the action segments as the steps arrive.
`pipeline.live` runs the sources (one worker thread each); this module decides what each
source is, once (`classify`), and writes the results.

Outputs per source (default folder: `<run folder>/detections/`, the run folder being the
checkpoint's): `<name>.timeline.json` (segments, per-step probabilities, metadata with
`ended_by`: eof | error | interrupt), `<name>.timeline.csv` (segments) and
`<name>.timeline.png` (the picture); with `events`, every start/end decision appended to a
JSONL file as it is made; with `render`, the video with the decisions drawn on it.

Several sources (files, URLs, devices, folders, cache ids) run at once; a source that fails
is reported and the others go on (`BatchIncomplete` at the end). With `cache` (which must
have the checkpoint's feature settings), a file the cache already holds (the same content,
by the fingerprint `vidpipe extract` records, whatever the file is called now) is read from
the cache instead of being decoded again; the model still runs step by step.
Python API: `Detector.from_checkpoint(path).step(rgb, flow)` / `.run(source)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from vidpipe.core.errors import BatchIncomplete, VidpipeError
from vidpipe.core.lock import folder_lock
from vidpipe.core.settings import differing_keys
from vidpipe.extractors.decode import VideoSource, is_stream
from vidpipe.malt.stream import FromCheckpoint
from vidpipe.pipeline.live import DetectOptions, Engine, EventLog, Plan, Signals, SourceRun, SourceWorker
from vidpipe.pipeline.render import Renderer
from vidpipe.pipeline.timeline import Timeline, TimelineSettings
from vidpipe.store.cache import FeatureStore, video_id_from_path

log = logging.getLogger(__name__)

DETECTIONS_DIR = "detections"


@dataclass
class Detection:
    """One source's result, as written to disk."""
    source: str
    timeline: Timeline
    files: dict[str, Path]                     # "json" / "csv" / "png" / "render" -> path
    ended_by: str = "eof"                      # "eof" | "error" | "interrupt"
    error: str | None = None                   # why, when it ended by an error

    @property
    def interrupted(self) -> bool:
        return self.ended_by == "interrupt"


@dataclass(frozen=True)
class Source:
    """What one source is, decided once: a video file, a stream (URL or device) or the id
    of a video in the feature cache."""
    text: str                                  # as given (for a folder's video: its path)
    kind: str                                  # "file" | "stream" | "cache"
    name: str                                  # output file stem
    cache_id: str | None = None                # the cache's video with these very features


def detect(sources: str | Path | Iterable[str | Path], checkpoint: str | Path,
           out: str | Path | None = None, cache: str | Path | None = None,
           device: str | None = None, int8: bool = False, precision: str = "fp32",
           **options) -> list[Detection]:
    """Detect actions in every source (video files, URLs, devices, folders of videos, ids of
    videos in `cache`) at once; `options` are `DetectOptions` fields; `precision` the
    model's (malt.stream: fp32 | bf16 | fp16 | int8 | auto; `int8=True` = "int8"). Returns one
    `Detection` per source done; raises after writing them when a source failed."""
    detector = Detector.from_checkpoint(checkpoint, device=device, int8=int8, precision=precision)
    return detector.run_many(sources, out=out, cache=cache, **options)


class Detector(FromCheckpoint):
    """A trained MALT as an online detector: `step` one source by hand, or `run` sources.

    `Detector.from_checkpoint(path, device=None, int8=False, precision="fp32")`: device None:
    CUDA when present; `precision`: fp32 (exact) | bf16 | fp16 (CUDA) | int8 (CPU) | auto
    (malt.stream); `int8=True` = "int8". `step(rgb, flow)` feeds this detector's own stream
    (its state kept between calls, `restart()` forgets it); `run`/`run_many` serve their
    sources as further streams of the same `multistream` detector.
    """

    def __init__(self, model, checkpoint, checkpoint_path: str | Path, int8: bool = False,
                 precision: str = "fp32"):
        from vidpipe.malt.stream import MultiStreamDetector

        self.checkpoint, self.checkpoint_path = checkpoint, str(checkpoint_path)
        self.multistream = MultiStreamDetector(model, int8=int8, precision=precision)
        self.device = self.multistream.device
        self.class_names: list[str] = list(checkpoint.class_names)
        self.feature_settings: dict = checkpoint.feature_settings
        self.step_seconds = float(self.feature_settings["step_seconds"])
        self._own_stream: object | None = None
        self._extractor = None

    @classmethod
    def from_loaded(cls, model, checkpoint, path: str | Path, **kwargs) -> "Detector":
        return cls(model, checkpoint, path, **kwargs)

    def step(self, rgb: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """The next step's rgb (Dr,) and flow (Df,) vectors -> its probabilities (C+1,)."""
        if self._own_stream is None:
            self._own_stream = object()
            self.multistream.add_stream(self._own_stream)
        return self.multistream.step({self._own_stream: (rgb, flow)})[self._own_stream]

    def restart(self) -> None:
        """Forget what `step` has seen: the next step is step 0 of a new stream."""
        if self._own_stream is not None:
            self.multistream.remove_stream(self._own_stream)
            self._own_stream = None

    def run(self, source: str | Path, out: str | Path | None = None,
            cache: str | Path | None = None, **options) -> Detection:
        """Detect actions in one video file, URL, device or cache id -> its `Detection`."""
        if Path(str(source)).is_dir():
            raise VidpipeError(f"{source}: a folder; use run_many (or `detect`) for several videos")
        return self.run_many([source], out=out, cache=cache, **options)[0]

    def run_many(self, sources: str | Path | Iterable[str | Path], out: str | Path | None = None,
                 cache: str | Path | None = None, **options) -> list[Detection]:
        """Every source at once (one worker each, one batched detector); see `detect`."""
        options = DetectOptions(**options)
        if options.settings is None:
            from vidpipe.pipeline.calibrate import checkpoint_rules
            options.settings, options.rules = checkpoint_rules(self.checkpoint_path)
        log.info("event rules: %s", options.rules)
        texts = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
        store = _open_cache(cache, self.feature_settings, self.checkpoint_path) if cache else None
        out_dir = Path(out) if out else Path(self.checkpoint_path).resolve().parent / DETECTIONS_DIR
        index = CacheIndex(store) if store else None
        sources, skipped = [], []
        for text in texts:
            try:
                sources += classify(text, index, render=options.render is not None)
            except VidpipeError as exc:
                if len(texts) == 1:
                    raise
                skipped.append(str(exc))
                log.warning("skipped: %s", exc)
        with folder_lock(out_dir, "detect"):   # one writer per output folder (core.lock)
            detections, failed = _Batch(self, _unique_names(sources), store, out_dir, options).run()
        _report(detections, len(sources) + len(skipped), skipped + failed, out_dir,
                single=len(texts) == 1 and len(sources) == 1)
        return detections

    def extractor(self, weights: dict[str, str]):
        """The checkpoint's feature extractor, built on first use (a batch served from the
        cache never loads the CNNs)."""
        if self._extractor is None:
            from vidpipe.extractors.features import TwoStreamExtractor
            try:
                self._extractor = TwoStreamExtractor.from_record(
                    self.feature_settings, self.device, rgb_weights=weights.get("rgb"),
                    flow_weights=weights.get("flow"), raft_weights=weights.get("raft"))
            except VidpipeError as exc:
                raise VidpipeError(f"{self.checkpoint_path}: {exc}") from None
            except KeyError as exc:  # e.g. imported precomputed features: no extractor record
                raise VidpipeError(
                    f"{self.checkpoint_path}: its features were not made by `vidpipe extract` "
                    f"(no '{exc.args[0]}' in their settings), so new video cannot be "
                    "featurised the same way; detect on videos of its --cache by id") from None
        return self._extractor


# --- what a source is ----------------------------------------------------------------------

class CacheIndex:
    """Which videos a feature cache holds: by id, and by content fingerprint (read once, on
    first use: a folder run looks up every video)."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self._by_fingerprint: dict[str, str] | None = None

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.store

    def id_of_file(self, path: Path) -> str | None:
        from vidpipe.pipeline.extract import fingerprint

        if self._by_fingerprint is None:
            self._by_fingerprint = {self.store.attrs(v).get("fingerprint"): v
                                    for v in self.store.video_ids()}
        return self._by_fingerprint.get(fingerprint(path))


def classify(text: str, cache: CacheIndex | None, render: bool = False) -> list[Source]:
    """The source(s) `text` names: a URL/device, a folder (its videos), a file, or a cache id.

    Files the cache holds (by content fingerprint) become cache sources, unless `render`
    (which needs the frames)."""
    if is_stream(text):
        return [Source(text, "stream", video_id_from_path(text.split("://", 1)[-1]))]
    path = Path(text)
    if path.is_dir():
        from vidpipe.pipeline.extract import find_videos

        videos = []
        for job in find_videos(text):
            if job.unlisted:
                log.warning("%s: %s", job.path, job.unlisted)
            else:
                videos.append(job)
        if not videos:
            raise VidpipeError(f"{path}: no video files found")
        return [_file_source(v.path, v.video_id, cache, render) for v in videos]
    if path.exists():
        return [_file_source(path, video_id_from_path(path.name), cache, render)]
    if cache is not None and text in cache:
        if render:
            raise VidpipeError(f"{text}: a cache id has features but no video to render")
        return [Source(text, "cache", text, cache_id=text)]
    if cache is not None:
        raise VidpipeError(f"{text}: no such file, and no video of that id in the cache "
                           f"{cache.store.root}")
    raise VidpipeError(f"{text}: file not found")


def _file_source(path: Path, name: str, cache: CacheIndex | None, render: bool) -> Source:
    cache_id = cache.id_of_file(path) if cache and not render and path.is_file() else None
    return Source(str(path), "cache" if cache_id else "file", name, cache_id)


def _unique_names(sources: list[Source]) -> list[Source]:
    """Two sources with the same name (a/clip.mp4, b/clip.mp4) write different files."""
    seen: dict[str, int] = {}
    unique = []
    for source in sources:
        seen[source.name] = seen.get(source.name, 0) + 1
        name = source.name if seen[source.name] == 1 else f"{source.name}-{seen[source.name]}"
        unique.append(Source(source.text, source.kind, name, source.cache_id))
    return unique


# --- one run over several sources ----------------------------------------------------------

class _Batch:
    """Workers, per-source state and outputs of one `run_many` call."""

    def __init__(self, detector: Detector, sources: list[Source], store: FeatureStore | None,
                 out_dir: Path, options: DetectOptions):
        self.detector, self.sources, self.store = detector, sources, store
        self.out_dir, self.options = out_dir, options
        self.detections: dict[int, Detection] = {}
        self.failures: dict[int, str] = {}

    def run(self) -> tuple[list[Detection], list[str]]:
        """Every source to its end -> (detections, failures), in the order given."""
        signals = Signals()
        plans = {key: self._plan(source) for key, source in enumerate(self.sources)}
        extractor = (self.detector.extractor(self.options.weights)
                     if any(p.open_video for p in plans.values()) else None)
        workers = {key: SourceWorker(plan, extractor, self.detector.step_seconds, self.options, signals)
                   for key, plan in plans.items()}
        runs = {key: SourceRun(plan, self.detector.class_names, self.detector.step_seconds,
                               self.options.settings, self._renderer(plan))
                for key, plan in plans.items()}
        events = EventLog(self.options.events) if self.options.events else None
        try:
            Engine(self.detector.multistream, workers, runs, self._write, self.options, signals,
                   events).run()
        except BaseException:   # e.g. a full disk: no half-written review video is left
            for run in runs.values():
                if run.renderer is not None:
                    run.renderer.discard()
            raise
        finally:
            if events is not None:
                events.close()
        return ([self.detections[key] for key in sorted(self.detections)],
                [self.failures[key] for key in sorted(self.failures)])

    def _plan(self, source: Source) -> Plan:
        if source.kind == "cache":
            store = self.store
            return Plan(source.text, source.name, None,
                        cached=lambda: store.read_steps(source.cache_id),
                        info={"features": f"cache {store.root}", "cache_id": source.cache_id})
        settings = self.detector.feature_settings
        timeout, max_pixels = self.options.timeout_s, self.options.max_pixels

        def open_video() -> VideoSource:
            # PyAV, which decodes as the steps are taken: decord's threaded decoder runs ahead
            # of a slower consumer and holds frames and packets in proportion to the file
            # (in use: 145 MB for a 20-minute, 198 MB for a 2-hour 128x96 file), so that
            # memory grew with the video. Both give the same frames (tests/test_decode.py).
            return VideoSource(source.text, fps=settings["fps"], chunk=settings["chunk"],
                               timeout_s=timeout, max_pixels=max_pixels, backend="pyav")
        return Plan(source.text, source.name, open_video, info={"features": "stream"},
                    stream=source.kind == "stream")

    def _renderer(self, plan: Plan) -> Renderer | None:
        if self.options.render is None:
            return None
        path = Path(self.options.render)
        if len(self.sources) > 1:   # one file per source, named like its timeline files
            path = path.with_name(f"{plan.name}.{path.name}")
        return Renderer(path, self.detector.feature_settings["fps"], self.detector.class_names)

    def _write(self, key: int, run: SourceRun) -> None:
        """Called as each source ends: its timeline files, or why there are none."""
        if run.ended_by == "error" and len(run.steps) == 0:   # nothing decided: no file
            self.failures[key] = run.error
            return
        if run.ended_by == "eof" and len(run.steps) == 0:
            self.failures[key] = f"{run.plan.source}: too short for one feature step"
            return
        timeline = run.timeline(self._metadata(run))
        name = self.out_dir / f"{run.plan.name}.timeline"
        files = {"json": timeline.save_json(f"{name}.json"), "csv": timeline.save_csv(f"{name}.csv")}
        if self.options.picture:
            files["png"] = timeline.save_png(f"{name}.png")
        if run.renderer is not None and (rendered := run.renderer.close()) is not None:
            files["render"] = rendered
        self.detections[key] = Detection(run.plan.source, timeline, files, run.ended_by, run.error)
        if run.ended_by == "error":
            self.failures[key] = (f"{run.error} (the {len(run.steps)} steps decided before "
                                  f"are in {files['json']})")
        count = len(timeline.segments)
        log.info("%s: %d segment%s in %.1f s of video (%.1f s) -> %s%s", run.plan.source, count,
                 "" if count == 1 else "s", timeline.duration_s, run.timings()["total_s"],
                 files["json"], "" if run.ended_by == "eof" else f" (ended by {run.ended_by})")

    def _metadata(self, run: SourceRun) -> dict:
        info = dict(run.info)
        return {
            "video": {"source": run.plan.source, "cache_id": info.pop("cache_id", None), **info},
            "model": {"checkpoint": self.detector.checkpoint_path,
                      "epoch": self.detector.checkpoint.epoch,
                      "config": self.detector.checkpoint.config.get("model", {})},
            "feature_settings": self.detector.feature_settings,
            "device": str(self.detector.device),
            "precision": {"model": self.detector.multistream.precision,
                          "runs": self.detector.multistream.describe_precision(),
                          "features": self.detector.feature_settings.get("precision", "fp32")},
            "rules": self.options.rules,
            "ended_by": run.ended_by, "error": run.error, "reconnects": run.reconnects,
            "timings": run.timings(),
        }


def _report(detections: list[Detection], total: int, failures: list[str], out_dir: Path,
            single: bool) -> None:
    """After every source has its files: the summary, and the exception for the exit code."""
    if any(d.interrupted for d in detections):
        return                                 # the caller stops on Ctrl-C (CLI: exit 130)
    if single:
        if failures:
            raise VidpipeError(failures[0])
        return
    log.info("%d of %d sources done, timelines in %s", len(detections) - sum(
        d.ended_by == "error" for d in detections), total, out_dir)
    if failures:
        log.warning("%d failed:\n  %s", len(failures), "\n  ".join(failures))
        # After the batch, so that every good source has its timeline; non-zero exit for scripts.
        raise BatchIncomplete(f"{len(failures)} of {total} sources failed (listed above)")


def _open_cache(cache: str | Path, feature_settings: dict, checkpoint: str | Path) -> FeatureStore:
    store = FeatureStore.open(cache)
    if store.settings != feature_settings:
        keys = differing_keys(store.settings, feature_settings)
        raise VidpipeError(f"{cache}: features made with other settings than {checkpoint}'s "
                           f"training cache (differs in: {', '.join(keys)})")
    return store
