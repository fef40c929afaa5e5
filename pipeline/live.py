"""The engine of `vidpipe detect`: sources -> one feature worker each -> one batched detector.

Each source gets a thread (`SourceWorker`) that decodes and featurises it (or reads its
steps from the feature cache) and hands the steps over through its own bounded queue, so a
fast file never crowds out a live camera and memory stays flat. A live source's worker
(`live`, or a URL/device) does only the per-source CPU work of each chunk (decode, resize,
flow: `TwoStreamExtractor.prepare`, OpenCV single-threaded); the networks run in the main
thread, once per round over every live source that has a step (`embed`), on the cores
(`DetectOptions.threads`). The main thread (`Engine.run`) takes the newest step of every
source that has one, runs them through the detector as one batch, and feeds each source's probabilities to its own `Segmenter`: events
are logged (and appended to `--events`), frames drawn (`--render`), and when the source
ends, however it ends, its timeline is written with `ended_by`:
  - "eof": the source ended;
  - "error": it failed after it opened (the error text is kept; a URL or device that drops
    is first opened again `reconnect` times in a row, with back-off, the detector's state
    kept: the stream continues where it was, in the same step grid);
  - "interrupt": Ctrl-C; every source is written with what was decided so far.
A source that fails does not stop the others.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator

import numpy as np

from vidpipe.core.atomic import disk_full
from vidpipe.core.errors import VidpipeError
from vidpipe.core.stop import join_threads, stopped_by, uninterrupted
from vidpipe.extractors.decode import MAX_PIXELS, STREAM_TIMEOUT_S
from vidpipe.pipeline.render import Renderer
from vidpipe.pipeline.timeline import Event, Segmenter, Timeline, TimelineSettings, format_time

if TYPE_CHECKING:   # (the extractor's import pulls in torch and timm: only when one runs)
    from vidpipe.extractors.features import Prepared

log = logging.getLogger(__name__)

QUEUE_STEPS = 32            # steps a worker may run ahead of the detector
BACKOFF_S = (0.5, 30.0)     # first reconnect delay, doubled per failed attempt up to the cap


# --- what the engine and its workers share -------------------------------------------------

@dataclass
class DetectOptions:
    """How `Detector.run` / `detect` treat their sources (the CLI's options)."""
    settings: TimelineSettings | None = None   # event rules; None: the checkpoint's calibrated
                                               # rules (`vidpipe calibrate`), else the defaults
    rules: str = "rules as given"              # where the rules came from (timeline metadata)
    live: bool = False                         # someone watches: each decision is logged as it
                                               # is made and no step waits for later ones
    picture: bool = True                       # write the PNG timeline
    events: str | Path | None = None           # JSONL file the start/end events are appended to
    render: str | Path | None = None           # mp4 of the video with the decisions drawn
    reconnect: int = 0                         # reopen a dropped URL/device up to N times in a row
    timeout_s: float = STREAM_TIMEOUT_S        # a URL silent this long has failed
    max_pixels: int = MAX_PIXELS               # a video declaring larger frames is refused unread
    weights: dict[str, str] = field(default_factory=dict)   # {"rgb"|"flow"|"raft": file}
    threads: int | None = None                 # torch threads for the networks and the model
                                               # (None: torch's default, one per core)


@dataclass
class Signals:
    """What the engine and its workers tell each other across threads."""
    stop: threading.Event = field(default_factory=threading.Event)      # set once: every worker ends
    arrived: threading.Event = field(default_factory=threading.Event)   # a worker queued something


# --- what workers send ---------------------------------------------------------------------

@dataclass
class SourceStep:
    """One feature step of a source, and when its chunk was complete."""
    index: int                              # step number in the source (continues on reconnect)
    timestamp: float                        # step start, seconds of video
    rgb: np.ndarray | None                  # (Dr,); None until the engine embeds `prepared`
    flow: np.ndarray | None                 # (Df,)
    ready: float                            # time.perf_counter() when its last frame was in
    frames: np.ndarray | None = None        # (chunk, H, W, 3) uint8, when rendering
    times: np.ndarray | None = None         # (chunk,) seconds of video of those frames
    prepared: Prepared | None = None        # a live source's chunk after its worker's CPU work


@dataclass
class Opened:
    info: dict                              # what the timeline's metadata says of the video


@dataclass
class Reconnected:
    at_s: float                             # video time where the stream continues
    error: str                              # why it dropped


@dataclass
class Restarted:
    restart: dict                           # a timestamp restart (VideoSource.restarts), on the step clock


@dataclass
class Ended:
    how: str                                # "eof" | "error"
    error: str | None = None


@dataclass
class Plan:
    """How one source is read (made by `pipeline.detect` once per source)."""
    source: str                             # as given
    name: str                               # output file stem
    open_video: Callable | None             # () -> VideoSource (decoded sources)
    cached: Callable | None = None          # () -> blocks of steps with .timestamps, .rgb, .flow
                                            # (cached sources: FeatureStore.read_steps)
    info: dict = field(default_factory=dict)
    stream: bool = False                    # a URL or device: may be reconnected


# --- one worker per source -----------------------------------------------------------------

class SourceWorker(threading.Thread):
    """Decodes and featurises one source into `self.queue` (steps, then one `Ended`)."""

    def __init__(self, plan: Plan, extractor, step_seconds: float, options: DetectOptions,
                 signals: Signals):
        super().__init__(name=f"detect-{plan.name}", daemon=True)
        self.plan, self.extractor, self.step_seconds = plan, extractor, step_seconds
        self.options, self.signals = options, signals
        self.queue: queue.Queue = queue.Queue(QUEUE_STEPS)

    @property
    def prepares(self) -> bool:
        """A decoded live source (`live`, or a URL/device): this worker decodes and prepares
        each chunk (`TwoStreamExtractor.prepare`), the engine runs the networks (no step waits
        for later ones of its source); other files featurise whole batches of their steps."""
        return self.plan.cached is None and (self.options.live or self.plan.stream)

    def run(self) -> None:
        try:
            # closed here, in this thread, as soon as the run stops: its decoder with it
            with contextlib.closing(self._cached_steps() if self.plan.cached
                                    else self._decoded_steps()) as steps:
                for step in steps:
                    if self.signals.stop.is_set():
                        return
                    self._send(step)
            self._send(Ended("eof"))
        except VidpipeError as exc:
            self._send(Ended("error", str(exc)))
        except Exception as exc:  # a bug or an odd source must not take the others down
            self._send(Ended("error", f"{self.plan.source}: unexpected {type(exc).__name__}: {exc}"))

    def _send(self, message) -> None:
        while not self.signals.stop.is_set():
            try:
                self.queue.put(message, timeout=0.1)
                self.signals.arrived.set()
                return
            except queue.Full:
                continue

    def _cached_steps(self) -> Iterator[SourceStep]:
        blocks = self.plan.cached()
        self._send(Opened(self.plan.info))
        index = 0
        for block in blocks:
            for timestamp, rgb_vec, flow_vec in zip(block.timestamps, block.rgb, block.flow):
                yield SourceStep(index, float(timestamp), rgb_vec, flow_vec, time.perf_counter())
                index += 1

    def _decoded_steps(self) -> Iterator[SourceStep]:
        """Steps of the source; a stream that drops is opened again (`reconnect` tries in a
        row) and continues the step grid where it stopped."""
        from vidpipe.extractors.decode import StreamLost

        video = self.plan.open_video()        # a first open that fails is final
        self._send(Opened({**self.plan.info, "decoder": video.backend,
                           "width": video.info.width, "height": video.info.height,
                           "native_fps": video.info.native_fps,
                           "declared_duration_s": video.info.duration}))
        done, failures = 0, 0
        while True:
            try:
                for step in self._featurise(video, done):
                    done, failures = step.index + 1, 0
                    yield step
                return
            except StreamLost as lost:
                video, failures = self._reopen(lost, failures)
                self._send(Reconnected(done * self.step_seconds, str(lost)))

    def _reopen(self, lost: VidpipeError, failures: int):
        """Open the source again after `lost`, with back-off -> (video, tries so far in a
        row); raise when out of tries."""
        error = lost
        reconnect = self.options.reconnect
        while failures < reconnect and not self.signals.stop.is_set():
            failures += 1
            delay = min(BACKOFF_S[0] * 2 ** (failures - 1), BACKOFF_S[1])
            log.warning("%s; reconnecting in %g s (try %d of %d)", error, delay, failures, reconnect)
            if self.signals.stop.wait(delay):
                break
            try:
                return self.plan.open_video(), failures
            except VidpipeError as exc:
                error = exc
        tries = f" (gave up after {reconnect} reconnect tries)" if reconnect else ""
        raise VidpipeError(f"{error}{tries}")

    def _featurise(self, video, offset: int) -> Iterator[SourceStep]:
        ready: dict[int, float] = {}
        shown: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        noted: list[dict] = []

        def chunks():
            for chunk in video.chunks():
                for restart in video.restarts[len(noted):]:   # continued on the step clock
                    noted.append(restart)
                    self._send(Restarted({**restart, "at_s": restart["at_s"] + shift}))
                ready[chunk.index] = time.perf_counter()
                if self.options.render is not None:
                    shown[chunk.index] = (chunk.frames, chunk.times)
                yield chunk
                if self.signals.stop.is_set():
                    return

        shift = offset * self.step_seconds            # continues the grid after a reconnect

        def source_step(index: int, start: float, rgb=None, flow=None, prepared=None) -> SourceStep:
            frames, times = shown.pop(index, (None, None))
            return SourceStep(offset + index, start + shift, rgb, flow, ready.pop(index), frames,
                              None if times is None else times + shift, prepared)

        if self.prepares:     # the networks run in the engine, over every live source (Engine._embed)
            for chunk in chunks():
                yield source_step(chunk.index, chunk.start, prepared=self.extractor.prepare(chunk))
        else:
            for step in self.extractor.stream_chunks(chunks()):
                yield source_step(step.index, step.timestamp, step.rgb, step.flow)


# --- the decisions of one source -----------------------------------------------------------

class StepRecord:
    """Every decided step of one source: its start, its decision latency and its C+1
    probabilities, copied into fixed numpy blocks.

    Not Python lists: a float object per number (or a kept view of the detector's output
    tensor) is a small long-lived allocation made every step among the transient ones of
    decode, flow and the networks; each pinned the allocator's pages around it, and the
    RSS of `detect` grew with the video's length. Blocks are few and never move."""

    def __init__(self, columns: int, block_steps: int = 4096):   # 4096 steps: 17 min at 4/s
        self.columns, self.block_steps = columns, block_steps        # columns: C+1
        self._blocks: list[np.ndarray] = []  # (block_steps, 2 + C+1) float64: start, latency, probs
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, timestamp: float, latency: float, probs: np.ndarray) -> None:
        row = self._count % self.block_steps
        if row == 0:
            self._blocks.append(np.empty((self.block_steps, 2 + self.columns)))
        block = self._blocks[-1]
        block[row, 0], block[row, 1] = timestamp, latency
        block[row, 2:] = probs
        self._count += 1

    def timestamps(self) -> np.ndarray:
        return self._rows()[:, 0]                                   # (T,) seconds

    def latencies(self) -> np.ndarray:
        return self._rows()[:, 1]                                   # (T,) seconds

    def probs(self) -> np.ndarray:
        return self._rows()[:, 2:].astype(np.float32)               # (T, C+1)

    def _rows(self) -> np.ndarray:
        return np.concatenate(self._blocks or [np.empty((0, 2 + self.columns))])[:self._count]


class SourceRun:
    """What has been decided for one source: segments, per-step rows, timings."""

    def __init__(self, plan: Plan, class_names: list[str], step_seconds: float,
                 settings: TimelineSettings, renderer: Renderer | None):
        self.plan, self.renderer = plan, renderer
        self.segmenter = Segmenter(class_names, step_seconds, settings)
        self.steps = StepRecord(len(class_names))
        self.model_seconds = 0.0
        self.started = time.perf_counter()
        self.info: dict = dict(plan.info)
        self.reconnects: list[dict] = []
        self.ended_by: str | None = None
        self.error: str | None = None

    def decide(self, step: SourceStep, row: np.ndarray, decided: float, model_seconds: float) -> list[Event]:
        events = self.segmenter.step(step.timestamp, row)
        self.model_seconds += model_seconds
        self.steps.append(step.timestamp, decided - step.ready, row)
        if self.renderer is not None and step.frames is not None:
            self.renderer.write(step.frames, step.times, row, self.segmenter.active())
        return events

    def finish(self, how: str, error: str | None = None) -> list[Event]:
        self.ended_by, self.error = how, error
        return self.segmenter.finish()

    def timeline(self, metadata: dict) -> Timeline:
        return Timeline(self.segmenter.class_names, self.steps.timestamps(), self.steps.probs(),
                        self.segmenter.step_seconds, self.segmenter.segments,
                        self.segmenter.settings, metadata, self.segmenter.events)

    def timings(self) -> dict:
        total, steps = time.perf_counter() - self.started, len(self.steps)
        latency = self.steps.latencies() * 1000
        return {
            "steps": steps, "total_s": round(total, 4), "model_s": round(self.model_seconds, 4),
            "features_s": round(total - self.model_seconds, 4),
            "realtime_factor": (round(steps * self.segmenter.step_seconds / total, 2)
                                if total else None),
            "latency_ms": ({"mean": round(float(latency.mean()), 2),
                            "p50": round(float(np.percentile(latency, 50)), 2),
                            "p95": round(float(np.percentile(latency, 95)), 2),
                            "max": round(float(latency.max()), 2)} if steps else None),
        }


# --- events for a deployment ---------------------------------------------------------------

class EventLog:
    """`--events FILE.jsonl`: one JSON object per start/end event, appended and flushed as it
    is decided (schema in docs/detect.md)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")

    def write(self, source: str, event: Event, latency: float | None) -> None:
        record = {
            "source": source, "event": event.kind, "class": event.label,
            "video_time_s": round(event.time_s, 4),
            "wall_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "score": round(event.score, 4), "threshold": round(event.threshold, 4),
            "latency_ms": None if latency is None else round(latency * 1000, 2),
            "step": event.step,
        }
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:   # appended, not atomic: a full disk is named here
            raise disk_full(exc, self.path) or exc

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:   # what a full disk refused, flushed again
            raise disk_full(exc, self.path) or exc


# --- the main loop -------------------------------------------------------------------------

class Engine:
    """Runs sources (`workers` and their `runs`, by key) through one batched detector
    (`malt.stream.MultiStreamDetector`) until each has ended; calls `write(key, run)` as each
    one ends."""

    def __init__(self, multistream, workers: dict[int, SourceWorker], runs: dict[int, SourceRun],
                 write: Callable[[int, SourceRun], None], options: DetectOptions, signals: Signals,
                 events: EventLog | None = None):
        self.multistream, self.workers, self.runs, self.write = multistream, workers, runs, write
        self.options, self.signals, self.events = options, signals, events
        self.active = set(workers)
        self.several = len(workers) > 1       # say which source a line is about, as it happens

    def run(self) -> None:
        import cv2
        import torch

        for key in self.workers:
            self.multistream.add_stream(key)
        # live workers' OpenCV flow single-threaded: the cores go to the batched networks
        opencv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
        cv2.setNumThreads(1 if any(w.prepares for w in self.workers.values()) else opencv_threads)
        torch.set_num_threads(self.options.threads or torch_threads)
        for worker in self.workers.values():
            worker.start()
        try:
            while self.active:
                self.signals.arrived.clear()
                batch = self._collect()
                if batch:
                    self._step(batch)
                else:
                    self.signals.arrived.wait(0.1)
        except KeyboardInterrupt:   # Ctrl-C, or SIGTERM (core.stop)
            self.signals.stop.set()
            log.warning("# %s: writing what was decided so far", stopped_by())
            for key in sorted(self.active):
                self._end(key, Ended("interrupt"))
        finally:
            self.signals.stop.set()
            for key in self.active:   # only after an unexpected error: free the detector
                self.multistream.remove_stream(key)
            # no worker may outlive the run: one still in native code at exit aborts
            join_threads(list(self.workers.values()))
            cv2.setNumThreads(opencv_threads)
            torch.set_num_threads(torch_threads)

    def _collect(self) -> dict[int, SourceStep]:
        """The next step of every source that has one; other messages handled on the way."""
        batch: dict[int, SourceStep] = {}
        for key in sorted(self.active):
            while key in self.active and key not in batch:
                try:
                    message = self.workers[key].queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(message, SourceStep):
                    batch[key] = message
                elif isinstance(message, Opened):
                    self.runs[key].info.update(message.info)
                    self._announce(key)
                elif isinstance(message, Restarted):
                    self.runs[key].info.setdefault("timestamp_restarts", []).append(message.restart)
                elif isinstance(message, Reconnected):
                    self.runs[key].reconnects.append({"at_s": message.at_s, "error": message.error})
                    log.warning("%s: reconnected, continuing at %s", self.runs[key].plan.source,
                                format_time(message.at_s))
                else:
                    self._end(key, message)
        return batch

    def _step(self, batch: dict[int, SourceStep]) -> None:
        self._embed(batch)
        tick = time.perf_counter()
        rows = self.multistream.step({key: (step.rgb, step.flow) for key, step in batch.items()})
        decided = time.perf_counter()
        for key, step in batch.items():
            run = self.runs[key]
            with uninterrupted():     # a stop lands between steps: timeline, events, frames agree
                events = run.decide(step, rows[key], decided, (decided - tick) / len(batch))
                self._report(run, events, decided - step.ready)

    def _embed(self, batch: dict[int, SourceStep]) -> None:
        """The RGB and flow networks of every live source's step, once for all of them."""
        keys = [key for key, step in batch.items() if step.prepared is not None]
        if keys:
            extractor = self.workers[keys[0]].extractor       # one serves every source (pipeline.detect)
            rgb, flow = extractor.embed([batch[key].prepared for key in keys])
            for key, rgb_vec, flow_vec in zip(keys, rgb, flow):
                batch[key].rgb, batch[key].flow, batch[key].prepared = rgb_vec, flow_vec, None

    def _end(self, key: int, ended: Ended) -> None:
        run = self.runs[key]
        self._report(run, run.finish(ended.how, ended.error), None)
        if ended.how == "error" and self.several:   # (one source: its error ends the call)
            log.warning("%s", ended.error)
        self.write(key, run)    # before it leaves `active`: Ctrl-C while writing writes again
        self.active.discard(key)
        self.multistream.remove_stream(key)

    def _announce(self, key: int) -> None:
        if self.options.live:
            run = self.runs[key]
            log.info("# %s: live detection, %d classes, step %g s (Ctrl-C stops and writes "
                     "what it has)", run.plan.source, len(run.segmenter.class_names) - 1,
                     run.segmenter.step_seconds)

    def _report(self, run: SourceRun, events: list[Event], latency: float | None) -> None:
        for event in events:
            if self.events is not None:
                self.events.write(run.plan.source, event, latency)
            line = f"{format_time(event.time_s)}  {event.kind:<5}  {event.label}  {event.score:.2f}"
            if latency is not None:
                line += f"  (decided {latency * 1000:.0f} ms after the chunk's last frame)"
            if self.several:
                line = f"{run.plan.name}  {line}"
            log.log(logging.INFO if self.options.live else logging.DEBUG, "%s", line)
