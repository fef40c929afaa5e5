"""`vidpipe detect --render`: the source re-encoded with what the detector thinks, per frame.

For review (is the model right, where does it hesitate?) and for pictures: every frame of a
step shows that step's decision, as it was known live (never a later one):
  - top left, the three most probable classes (background excluded) with bars;
  - top right, the video time;
  - bottom, the segments announced and not yet ended (class, since when, mean score), or
    "no action".
Frames are the detector's own (resampled to the extraction fps), enlarged to at least
`MIN_HEIGHT` pixels so that small sources stay readable; H.264 in mp4 through PyAV, written
to a temporary file and moved into place when the source ends (however it ends).
"""
from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from vidpipe.core.atomic import atomic_path
from vidpipe.pipeline.timeline import Segment, format_time

MIN_HEIGHT = 360              # pixels: smaller sources are enlarged by a whole factor
TOP_CLASSES = 3
FONT = cv2.FONT_HERSHEY_SIMPLEX
# matplotlib's tab10, the timeline picture's colours: class c is TAB10[(c - 1) % 10]
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def class_colour(class_names: list[str], label: str) -> tuple[int, int, int]:
    return TAB10[(class_names.index(label) - 1) % len(TAB10)]


def draw_overlay(frame: np.ndarray, time_s: float, probs: np.ndarray, class_names: list[str],
                 active: list[Segment]) -> np.ndarray:
    """frame (H, W, 3) uint8 RGB -> a new frame, enlarged, with the decision drawn on it."""
    scale = max(1, math.ceil(MIN_HEIGHT / frame.shape[0]))
    image = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR) \
        if scale > 1 else frame.copy()
    height, width = image.shape[:2]
    unit = height / MIN_HEIGHT                        # text and bars grow with the frame
    line = int(22 * unit)
    _panel(image, 0, 0, int(width * 0.45), line * TOP_CLASSES + line // 2)
    for row, c in enumerate(np.argsort(-probs[1:], kind="stable")[:TOP_CLASSES] + 1):
        y = line * (row + 1)
        colour = class_colour(class_names, class_names[c])
        bar = int((width * 0.45 - 8 * unit) * float(probs[c]))
        cv2.rectangle(image, (int(4 * unit), y - line + int(6 * unit)), (int(4 * unit) + bar, y),
                      colour, -1)
        _text(image, f"{class_names[c]} {probs[c]:.2f}", (int(8 * unit), y - int(4 * unit)), unit)
    clock = format_time(time_s)
    (clock_width, _), _ = cv2.getTextSize(clock, FONT, 0.55 * unit, max(1, round(unit)))
    _panel(image, width - clock_width - int(12 * unit), 0, width, line + int(6 * unit))
    _text(image, clock, (width - clock_width - int(6 * unit), line - int(2 * unit)), unit)
    _banner(image, active, class_names, line, unit)
    return image


def _banner(image: np.ndarray, active: list[Segment], class_names: list[str], line: int,
            unit: float) -> None:
    height, width = image.shape[:2]
    top = height - line - int(8 * unit)
    if not active:
        _panel(image, 0, top, width, height)
        _text(image, "no action", (int(8 * unit), height - int(10 * unit)), unit)
        return
    slot = width // len(active)
    for i, segment in enumerate(active):
        cv2.rectangle(image, (i * slot, top), ((i + 1) * slot, height),
                      class_colour(class_names, segment.label), -1)
        _text(image, f"{segment.label} since {format_time(segment.start_s)} ({segment.score:.2f})",
              (i * slot + int(8 * unit), height - int(10 * unit)), unit)


def _panel(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    """Darken a rectangle so that white text on it reads on any video."""
    image[y0:y1, x0:x1] = (image[y0:y1, x0:x1] * 0.35).astype(np.uint8)


def _text(image: np.ndarray, text: str, origin: tuple[int, int], unit: float) -> None:
    cv2.putText(image, text, origin, FONT, 0.55 * unit, (255, 255, 255), max(1, round(unit)),
                cv2.LINE_AA)


class Renderer:
    """Draws and encodes one source's frames; `close()` moves the finished mp4 into place."""

    def __init__(self, path: str | Path, fps: float, class_names: list[str]):
        self.path, self.fps, self.class_names = Path(path), fps, class_names
        self._files = contextlib.ExitStack()
        self._container: av.container.OutputContainer | None = None
        self._stream = None
        self.frames = 0

    def write(self, frames: np.ndarray, times: np.ndarray, probs: np.ndarray,
              active: list[Segment]) -> None:
        """frames (K, H, W, 3) uint8 of one step, times (K,) seconds, that step's probs."""
        for frame, time_s in zip(frames, times):
            image = draw_overlay(frame, float(time_s), probs, self.class_names, active)
            image = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]   # H.264: even sizes
            if self._container is None:
                self._open(image.shape[1], image.shape[0])
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            self._container.mux(self._stream.encode(video_frame))
            self.frames += 1

    def _open(self, width: int, height: int) -> None:
        temp = self._files.enter_context(atomic_path(self.path, suffix=".mp4"))
        self._container = av.open(str(temp), "w", format="mp4")
        self._stream = self._container.add_stream(
            "libx264", rate=Fraction(self.fps).limit_denominator(1001),
            options={"crf": "23", "preset": "veryfast"})
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"

    def close(self) -> Path | None:
        """Finish the file (None when no frame came: nothing is written). Idempotent."""
        if self._container is not None:
            container, self._container = self._container, None
            with self._files:   # renamed into place, or removed on an error (core.atomic)
                container.mux(self._stream.encode())
                container.close()
        return self.path if self.frames else None

    def discard(self) -> None:
        """Drop an unfinished file (its run failed): the temporary is removed."""
        if self._container is not None:
            container, self._container = self._container, None
            with contextlib.suppress(Exception):
                container.close()
            self._files.__exit__(RuntimeError, RuntimeError("discarded"), None)
