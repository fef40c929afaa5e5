"""Video decoding: one `VideoSource` for files, URLs and capture devices.

A source yields `Chunk`s: `chunk` frames resampled to `fps`, the unit of one feature step.

Sampling rule (the same for every backend, so that a step maps back to the source exactly,
also for variable-frame-rate files):
  - times are seconds from the first video frame (how a player shows them);
  - source frame j is on screen from its presentation time t_j until t_{j+1}; the last
    frame until the end of the video stream as the container declares it (or one nominal
    frame duration when the container does not say);
  - output frame k shows the source frame on screen at time k / fps, for every k with
    k / fps before the end;
  - timestamps that jump back by more than RESTART_SECONDS (an encoder or camera restarting,
    a looped stream: MPEG-TS starts again at 0) continue the clock one frame after the last
    one, so no frame is dropped; each restart is kept in `VideoSource.restarts`;
  - frames are grouped in chunks of `chunk`; a trailing partial chunk is dropped, so a video
    of N output frames gives floor(N / chunk) steps, step i starting at i * chunk / fps.

Backends: decord (random access, batched `get_batch`) for local files, PyAV (streaming
decode) for URLs, devices and files decord rejects or fails on. Both give the same frames.
Memory stays flat: frames are decoded in bounded batches whatever the video length.

A source is opened once: the container the probe opened is the one the first decode reads
(a live source would lose what it sent between two opens, and a single-client server
refuses the second connection). A URL or device that fails after it opened raises
`StreamLost`, which a caller may answer by opening the source again.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import av
import numpy as np

from vidpipe.core.errors import VidpipeError, first_line
from vidpipe.core.paths import is_stream

log = logging.getLogger(__name__)

try:  # decord has no wheels for every platform; PyAV covers the rest
    import decord
    # Its bundled libav prints its own errors on the console ('partial file'); they reach us
    # as exceptions, which become one-line messages naming the file.
    decord.logging.set_level(decord.logging.QUIET)
except ImportError:  # pragma: no cover - depends on the platform
    decord = None

BACKENDS = ("auto", "decord", "pyav")
TIME_EPS = 1e-4            # seconds: timestamps closer than this are the same instant
BATCH_BYTES = 32 << 20     # decoded frames held at once by the decord backend...
BATCH_CHUNKS = 32          # ...and at most this many chunks per get_batch
THREADED_DECODE_PIXELS = 640 * 360   # smaller frames decode faster on one thread
TRUNCATED_SECONDS = 0.5    # missing video beyond this (and 3 frames) means a truncated file
STREAM_TIMEOUT_S = 10.0   # a URL silent this long (opening or reading) has failed
RESTART_SECONDS = 1.0     # a timestamp this far back is a restart (encoder, camera, looped stream)
MAX_PIXELS = 4096 * 4096  # pixel budget per frame (16.8 MP): a larger declared size is refused
NETWORK_ERRORS = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset",
                  errno.ETIMEDOUT: "connection timed out", errno.EHOSTUNREACH: "host unreachable",
                  errno.ENETUNREACH: "network unreachable", errno.EPIPE: "connection closed"}
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg",
                    ".wmv", ".flv", ".ts", ".mts", ".m2ts", ".3gp", ".ogv")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream (before decoding)."""
    path: str
    width: int
    height: int
    codec: str
    native_fps: float | None     # average frame rate declared by the container
    duration: float | None       # seconds of video declared by the container
    is_file: bool                # a local file (else a URL or a device)


@dataclass
class Chunk:
    """`chunk` consecutive output frames: the input of one feature step."""
    index: int                   # step number, from 0
    frames: np.ndarray           # (chunk, H, W, 3) uint8 RGB
    times: np.ndarray            # (chunk,) float64 grid times k / fps, seconds from the first frame
    source_times: np.ndarray     # (chunk,) float64 presentation time of the source frame shown

    @property
    def start(self) -> float:
        """When the step starts (its first frame), seconds in the source."""
        return float(self.times[0])

    @property
    def end(self) -> float:
        """Time of the chunk's last frame: the step's features exist once it is decoded."""
        return float(self.times[-1])


def resample(frames: Iterable[tuple[float, Any]], fps: float,
             end_of: Callable[[float], float]) -> Iterator[tuple[float, float, Any]]:
    """The sampling rule on a stream of (time, payload) in presentation order.

    Yields (grid_time, source_time, payload) for grid_time = k / fps, k = 0, 1, ... while
    grid_time is before `end_of(last_source_time)`. Frames whose time goes backwards are
    never on screen and are dropped; of two frames at the same instant the later one wins.
    """
    k = 0
    shown: tuple[float, Any] | None = None
    for time, payload in frames:
        if shown is not None:
            if time < shown[0] - TIME_EPS:
                continue
            while k / fps < time - TIME_EPS:
                yield k / fps, shown[0], shown[1]
                k += 1
        shown = (time, payload)
    if shown is not None:
        end = end_of(shown[0])
        while k / fps < end - TIME_EPS:
            yield k / fps, shown[0], shown[1]
            k += 1


class StreamLost(VidpipeError):
    """A URL or device failed after it was opened (reset, I/O error, silent too long)."""


class VideoSource:
    """Frames of one video, resampled to `fps`, in chunks of `chunk` frames.

    `path_or_url`: a local file, a URL (rtsp://, http://...) or a capture device
    (/dev/video0). Opening probes the video at once: a missing, empty, unreadable, corrupt
    or audio-only file raises `VidpipeError` naming the file and the problem; a URL that
    cannot be reached says why (connection refused, timed out, ...).
    Iterate (or call `chunks()`) to decode; each iteration decodes from the start (the first
    one reads the container the probe opened; a later one opens the source again).
    `timeout_s`: how long a URL may stay silent, opening or reading, before it has failed.
    `max_pixels`: the pixel budget of one frame. A video whose header declares larger frames
    is refused before any of it is decoded (a few hundred KB of H.264 can declare 16000x16000
    frames, 384 MB each: a decompression bomb); FFmpeg's decoders get the same budget, so not
    even the probe decodes a larger frame.
    """

    def __init__(self, path_or_url: str | os.PathLike, fps: float = 24.0, chunk: int = 6,
                 backend: str = "auto", options: dict[str, str] | None = None,
                 timeout_s: float = STREAM_TIMEOUT_S, max_pixels: int = MAX_PIXELS):
        if backend not in BACKENDS:
            raise VidpipeError(f"decoder backend '{backend}': choose one of {', '.join(BACKENDS)}")
        if fps <= 0 or chunk < 1:
            raise VidpipeError(f"{path_or_url}: fps must be > 0 and chunk >= 1 (got {fps}, {chunk})")
        self.path = str(path_or_url)
        self.fps = float(fps)
        self.chunk = int(chunk)
        self.options = dict(options or {})
        self.timeout_s = float(timeout_s)
        self.max_pixels = int(max_pixels)
        self._opened: av.container.InputContainer | None = None   # the probe's, until decoded
        self.info = self._probe()
        if backend == "decord" and (decord is None or not self.info.is_file):
            why = "not installed" if decord is None else "reads local files only"
            raise VidpipeError(f"{self.path}: decord backend unavailable ({why}); use backend 'pyav'")
        self.fallback = backend == "auto"   # may decord hand over to PyAV?
        self.backend = "pyav" if backend == "auto" and (decord is None or not self.info.is_file) \
            else ("decord" if backend == "auto" else backend)
        self.backend_used: str | None = None   # what decoded the last iteration (after fallback)
        self.decoded_end: float | None = None  # end of the last source frame, after iteration
        self.restarts: list[dict] = []         # timestamp restarts of the last iteration

    def __repr__(self) -> str:
        return f"VideoSource({self.path!r}, fps={self.fps}, chunk={self.chunk}, backend={self.backend!r})"

    # -- probing ---------------------------------------------------------------------------
    def _probe(self) -> VideoInfo:
        is_file = not is_stream(self.path)
        if is_file:
            _check_readable_file(Path(self.path))
        container = self._open_container()
        try:
            stream = _video_stream(container, self.path)
            ctx = stream.codec_context
            if not ctx.width or not ctx.height:
                raise VidpipeError(f"{self.path}: video stream has no frame size (corrupt file?)")
            self._check_pixel_budget(ctx.width, ctx.height)
            rate = stream.average_rate or stream.guessed_rate
            info = VideoInfo(path=self.path, width=ctx.width, height=ctx.height,
                             codec=ctx.name, native_fps=float(rate) if rate else None,
                             duration=_declared_duration(container, stream), is_file=is_file)
        except BaseException:
            container.close()
            raise
        self._opened = container
        return info

    def _check_pixel_budget(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise VidpipeError(
                f"{self.path}: declares {width}x{height} frames ({width * height / 1e6:.1f} MP), over "
                f"the pixel budget of {self.max_pixels / 1e6:.1f} MP per frame: refused before "
                "decoding (a decompression bomb?); for a genuine video this large raise max_pixels "
                "(extract: --set max_pixels=N, detect: --max-pixels N)")

    def _take_container(self) -> av.container.InputContainer:
        """The probe's container the first time (one open per source), a new one after."""
        container, self._opened = self._opened, None
        return container if container is not None else self._open_container()

    def _open_container(self) -> av.container.InputContainer:
        # the decoders' own budget: the probe's trial decode never allocates a larger frame
        kwargs: dict[str, Any] = {"options": {**self.options, "max_pixels": str(self.max_pixels)}}
        if self.path.startswith("/dev/video"):
            kwargs["format"] = "v4l2"
        if "://" in self.path:
            kwargs["timeout"] = self.timeout_s
        try:
            return av.open(self.path, **kwargs)
        except av.error.FFmpegError as exc:
            if not is_stream(self.path):
                raise VidpipeError(f"{self.path}: not a video or corrupt file ({_describe(exc)})") from None
            raise VidpipeError(f"{self.path}: cannot open the stream: {self._stream_failure(exc)}") from None

    def _stream_failure(self, exc: av.error.FFmpegError) -> str:
        """Why a URL or device failed, in the words a user checks first."""
        if exc.errno in NETWORK_ERRORS:
            return NETWORK_ERRORS[exc.errno]
        if isinstance(exc, av.error.ExitError):  # the timeout's interrupt
            return f"no data for {self.timeout_s:g} s"
        return _describe(exc)

    @property
    def _frame_seconds(self) -> float:
        """One nominal source frame (the output frame when the container gives no rate)."""
        return 1.0 / (self.info.native_fps or self.fps)

    def _end_of(self, last_start: float) -> float:
        """End of the last source frame: the declared end when plausible, else one frame."""
        declared = self.info.duration
        if declared is not None and last_start < declared <= last_start + self._truncation_gap():
            return declared
        return last_start + self._frame_seconds

    def _truncation_gap(self) -> float:
        return max(TRUNCATED_SECONDS, 3 * self._frame_seconds)

    def _check_complete(self, last_start: float | None) -> None:
        """A file whose frames stop well before its declared duration is truncated."""
        if last_start is None:
            raise VidpipeError(f"{self.path}: no decodable video frames (corrupt or truncated file)")
        declared = self.info.duration   # (of the last timestamp segment only, after a restart)
        if self.info.is_file and declared is not None and not self.restarts \
                and declared - last_start > self._truncation_gap():
            raise VidpipeError(f"{self.path}: truncated or corrupt: frames stop at {last_start:.2f} s "
                               f"of the {declared:.2f} s the container declares")

    # -- decoding --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        return self.chunks()

    def chunks(self) -> Iterator[Chunk]:
        """Decode from the start; decord falls back to PyAV (same frames) if it fails."""
        self.decoded_end = None
        self.restarts = []
        if self.backend == "pyav":
            yield from self._pyav_chunks(first_step=0)
            return
        done = 0
        try:
            for chunk in self._decord_chunks():
                yield chunk
                done += 1
        except _DecordFailed as failure:
            if not self.fallback:   # asked for decord explicitly: no silent fallback
                raise VidpipeError(f"{self.path}: decord failed ({failure})") from None
            yield from self._pyav_chunks(first_step=done)

    def _group(self, frames: Iterator[tuple[float, float, np.ndarray]], first_step: int,
               backend: str) -> Iterator[Chunk]:
        self.backend_used = backend
        buffer: list[tuple[float, float, np.ndarray]] = []
        index = 0
        for item in frames:
            buffer.append(item)
            if len(buffer) == self.chunk:
                if index >= first_step:
                    yield Chunk(index=index, frames=np.stack([f for _, _, f in buffer]),
                                times=np.array([t for t, _, _ in buffer]),
                                source_times=np.array([s for _, s, _ in buffer]))
                index += 1
                buffer = []

    def _pyav_chunks(self, first_step: int) -> Iterator[Chunk]:
        """Streaming decode; frames are converted to RGB only when shown."""
        state = {"last": None}

        def timed_frames(container: av.container.InputContainer) -> Iterator[tuple[float, Any]]:
            stream = container.streams.video[0]
            if self.info.width * self.info.height >= THREADED_DECODE_PIXELS:
                stream.thread_type = "AUTO"
            first = None
            previous = None
            shift = 0.0       # added to the timestamps after a restart
            try:
                for frame in container.decode(stream):
                    if frame.pts is not None and frame.time_base is not None:
                        raw = float(frame.pts * frame.time_base)
                        time = raw + shift
                        if previous is not None and time < previous - RESTART_SECONDS:
                            shift = previous + self._frame_seconds - raw
                            time = self._restarted(raw + shift, raw, first)
                    else:  # raw streams without timestamps: one nominal frame after the last
                        time = (previous if previous is not None else 0.0) + self._frame_seconds
                    first = time if first is None else first
                    previous = time
                    state["last"] = time - first
                    yield time - first, frame
            except av.error.FFmpegError as exc:
                at = f" at {state['last']:.2f} s" if state["last"] is not None else ""
                if not self.info.is_file:
                    raise StreamLost(f"{self.path}: stream failed{at} ({self._stream_failure(exc)})") from None
                raise VidpipeError(f"{self.path}: decoding failed{at} ({_describe(exc)})") from None

        with self._take_container() as container:
            converted: list[Any] = [None, None]   # (frame, its RGB array): shown twice, converted once

            def rgb(frame: av.VideoFrame) -> np.ndarray:
                if converted[0] is not frame:
                    converted[:] = [frame, frame.to_ndarray(format="rgb24")]
                return converted[1]

            shown = ((t, s, rgb(f)) for t, s, f in resample(timed_frames(container), self.fps, self._end_of))
            yield from self._group(shown, first_step, "pyav")
        self._check_complete(state["last"])
        self.decoded_end = self._end_of(state["last"])

    def _restarted(self, time: float, source_time: float, first: float) -> float:
        """Note a timestamp restart: the frame at `source_time` (seconds, as the container
        says) is shown at `time`, one frame after the last. Returns `time`."""
        self.restarts.append({"at_s": round(time - first, 6), "source_time_s": round(source_time - first, 6)})
        log.warning("%s: timestamps restart at %.2f s (back to %.2f s: an encoder or camera "
                    "restart?); continuing the clock", self.path, time - first, source_time - first)
        return time

    def _decord_chunks(self) -> Iterator[Chunk]:
        """Random access: indices of the shown frames from the demuxed timestamps, then
        `get_batch` over bounded batches of chunks."""
        times = self._presentation_times()
        try:
            reader = decord.VideoReader(self.path, ctx=decord.cpu(0))
        except Exception as exc:  # decord raises its own DECORDError, RuntimeError, ...
            raise _DecordFailed(_describe(exc)) from None
        if len(reader) != len(times):
            raise _DecordFailed(f"decord counts {len(reader)} frames, the container {len(times)}")
        if len(times) == 0:
            self._check_complete(None)
        frame_bytes = self.info.width * self.info.height * 3
        per_batch = self.chunk * min(BATCH_CHUNKS, max(1, BATCH_BYTES // (frame_bytes * self.chunk)))

        def shown_frames() -> Iterator[tuple[float, float, np.ndarray]]:
            picks = resample(((t, j) for j, t in enumerate(times)), self.fps, self._end_of)
            while batch := [pick for _, pick in zip(range(per_batch), picks)]:
                wanted = sorted({j for _, _, j in batch})
                try:
                    decoded = reader.get_batch(wanted).asnumpy()  # (n, H, W, 3) uint8
                except Exception as exc:
                    raise _DecordFailed(f"at {batch[0][1]:.2f} s: {_describe(exc)}") from None
                position = {j: i for i, j in enumerate(wanted)}
                for grid_time, source_time, j in batch:
                    yield grid_time, source_time, decoded[position[j]]

        yield from self._group(shown_frames(), 0, "decord")
        self._check_complete(times[-1])
        self.decoded_end = self._end_of(times[-1])

    def _presentation_times(self) -> np.ndarray:
        """Times of every frame (sorted packet pts, seconds from the first), by demuxing only.

        decord's own timestamps are float32, too coarse to pick frames in long videos. An
        array, not a list: it lives as long as the video is read (172,800 floats in 2 hours).
        """
        pts: list[int] = []
        with self._take_container() as container:
            stream = container.streams.video[0]
            restart = RESTART_SECONDS / stream.time_base   # in the stream's ticks
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:   # flush packet
                        continue
                    if packet.pts is None:
                        raise _DecordFailed("packets without timestamps")
                    if pts and packet.dts is not None and packet.dts < pts[-1] - restart:
                        raise _DecordFailed("timestamps restart: PyAV continues the clock")
                    pts.append(packet.pts)
            except av.error.FFmpegError as exc:
                raise _DecordFailed(f"demuxing: {_describe(exc)}") from None
            time_base: Fraction = stream.time_base
        pts.sort()
        if not pts:
            return np.empty(0)
        first = float(pts[0] * time_base)
        return np.fromiter((float(p * time_base) - first for p in pts), np.float64, len(pts))


class _DecordFailed(Exception):
    """decord could not decode this file: the auto backend continues with PyAV."""


# -- helpers --------------------------------------------------------------------------------
def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise VidpipeError(f"{path}: file not found")
    if not path.is_file():
        raise VidpipeError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as handle:
            empty = not handle.read(1)
    except PermissionError:
        raise VidpipeError(f"{path}: permission denied (cannot read the file)") from None
    except OSError as exc:
        raise VidpipeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if empty:
        raise VidpipeError(f"{path}: empty file (0 bytes)")


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        if "audio" in kinds:
            raise VidpipeError(f"{path}: audio only, no video stream")
        raise VidpipeError(f"{path}: no video stream (streams: {', '.join(kinds) or 'none'})")
    return container.streams.video[0]


def _declared_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Seconds of video from the first frame, as declared; None when unknown.

    The container's own duration is used only when the video is its single stream (with an
    audio track it may measure the audio).
    """
    start = stream.start_time if stream.start_time is not None else 0
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        container_start = (container.start_time or 0) / av.time_base
        return container.duration / av.time_base - (float(start * stream.time_base) - container_start)
    return None


def _describe(exc: BaseException) -> str:
    """First line of an FFmpeg/decord error, without their multi-line stack dumps."""
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return exc.strerror   # str(exc) repeats errno and file name
    return first_line(exc)[:200]
