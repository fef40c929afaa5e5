"""Synthetic action videos for the demo and the tests: real mp4 files with known labels.

Each video is a small scene (128x96 by default) with a textured background and one object
(circle, square, bar or triangle, random colour and size). Stretches of *background*,
where the object rests or is absent, alternate with *actions*, where the object moves in
one of four ways:

    Bounce  hops up and down (|sin| trajectory, random height and rate)
    Slide   glides sideways and back (random speed)
    Spin    turns about its centre (random angular speed and direction)
    Pulse   grows and shrinks in place (random rate and depth)

Appearance is drawn from the same distributions for every class and for the background,
so the classes differ in motion, not in looks. A hand-held camera jitter (a random walk
of the whole frame) moves every frame a little, background included.

`generate_dataset` writes the videos, `annotations.csv` (`video,label,start_s,end_s,split`,
the format `vidpipe labels` reads) and `classes.txt`. Everything is seeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from vidpipe.core.atomic import atomic_path, write_csv_atomically, write_text_atomically
from vidpipe.core.log import progress_bar

CLASSES = ["Bounce", "Slide", "Spin", "Pulse"]
SHAPES = ["circle", "square", "bar", "triangle"]
ANNOTATIONS_FILE = "annotations.csv"
CLASSES_FILE = "classes.txt"
JITTER_MAX = 3                # camera jitter reach, pixels either way
JITTER_PAD = JITTER_MAX + 1   # background margin beyond the frame: jitter never shows an edge


@dataclass
class SyntheticSpec:
    num_videos: int = 32
    test_fraction: float = 0.25
    duration_s: float = 20.0
    width: int = 128
    height: int = 96
    fps: int = 24
    action_s: tuple[float, float] = (2.0, 4.5)       # action length range
    background_s: tuple[float, float] = (1.0, 3.0)   # background stretch length range
    seed: int = 0


@dataclass
class SyntheticDataset:
    videos_dir: Path
    annotations: Path                                 # CSV, with the split column
    class_names: list[str]                            # without background
    train: list[str]                                  # file names
    test: list[str]


@dataclass
class _Object:
    shape: str
    colour: tuple[int, int, int]
    size: float                                       # radius-like, pixels
    x: float
    y: float
    angle: float


def generate_dataset(out_dir: str | Path, spec: SyntheticSpec | None = None,
                     progress: bool = True) -> SyntheticDataset:
    """Write `spec.num_videos` labelled videos into `out_dir/videos/` plus the annotations."""
    spec = spec or SyntheticSpec()
    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    num_test = max(1, round(spec.num_videos * spec.test_fraction))
    rows, train, test = [], [], []
    for index in progress_bar(range(spec.num_videos), enabled=progress,
                              desc="synthetic videos", unit="video"):
        name = f"synth_{index:03d}.mp4"
        split = "test" if index >= spec.num_videos - num_test else "train"
        rng = np.random.default_rng([spec.seed, index])
        segments = write_video(videos_dir / name, spec, rng)
        rows += [(name, label, f"{start:.4f}", f"{end:.4f}", split)
                 for label, start, end in segments]
        (test if split == "test" else train).append(name)
    for stale in set(videos_dir.glob("synth_*.mp4")) - {videos_dir / n for n in train + test}:
        stale.unlink()   # a previous run's extra videos: the folder is extracted as a whole
    annotations = write_csv_atomically(out_dir / ANNOTATIONS_FILE,
                                       ["video", "label", "start_s", "end_s", "split"], rows)
    write_text_atomically(out_dir / CLASSES_FILE, "\n".join(CLASSES) + "\n")
    return SyntheticDataset(videos_dir, annotations, list(CLASSES), train, test)


def plan_segments(spec: SyntheticSpec, rng: np.random.Generator
                  ) -> list[tuple[str | None, int, int]]:
    """(label, first frame, end frame) for the whole video; label None = background.

    Actions cycle through a shuffled class order so every class appears in every video
    long enough to hold them all.
    """
    total = int(round(spec.duration_s * spec.fps))
    plan, frame, order = [], 0, []
    while frame < total:
        length = int(rng.uniform(*spec.background_s) * spec.fps)
        plan.append((None, frame, min(frame + length, total)))
        frame += length
        if frame >= total:
            break
        if not order:
            order = [str(c) for c in rng.permutation(CLASSES)]
        length = int(rng.uniform(*spec.action_s) * spec.fps)
        plan.append((order.pop(), frame, min(frame + length, total)))
        frame += length
    return plan


def write_video(path: Path, spec: SyntheticSpec, rng: np.random.Generator
                ) -> list[tuple[str, float, float]]:
    """Render and encode one video; returns its action segments in seconds."""
    background = _background(spec, rng)
    plan = plan_segments(spec, rng)
    frames, segments = [], []
    jitter = np.zeros(2)
    for label, first, end in plan:
        obj = _random_object(spec, rng)
        show = label is not None or rng.random() < 0.7  # background: object at rest or absent
        motion = _random_motion(label, spec, rng)
        for frame in range(first, end):
            t = (frame - first) / spec.fps
            jitter = np.clip(jitter + rng.normal(0, 0.4, 2), -JITTER_MAX, JITTER_MAX)  # hand-held camera
            image = _shift(background, jitter)
            if show:
                _draw(image, motion(obj, t))
            frames.append(image)
        if label is not None:
            segments.append((label, first / spec.fps, end / spec.fps))
    _encode(path, frames, spec.fps)
    return segments


def _background(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture (low-frequency noise, upscaled), a little larger than the
    frame so that camera jitter never shows an edge."""
    small = rng.uniform(30, 140, (6, 8, 3)).astype(np.float32)
    texture = cv2.resize(small, (spec.width + 2 * JITTER_PAD, spec.height + 2 * JITTER_PAD),
                         interpolation=cv2.INTER_CUBIC)
    return np.clip(texture, 0, 255).astype(np.uint8)


def _shift(background: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    height, width = background.shape[0] - 2 * JITTER_PAD, background.shape[1] - 2 * JITTER_PAD
    matrix = np.float32([[1, 0, -JITTER_PAD + jitter[0]], [0, 1, -JITTER_PAD + jitter[1]]])
    return cv2.warpAffine(background, matrix, (width, height), flags=cv2.INTER_LINEAR)


def _random_object(spec: SyntheticSpec, rng: np.random.Generator) -> _Object:
    size = rng.uniform(0.12, 0.2) * spec.height
    return _Object(shape=str(rng.choice(SHAPES)),
                   colour=tuple(int(c) for c in rng.integers(120, 256, 3)),
                   size=size,
                   x=rng.uniform(0.35, 0.65) * spec.width,
                   y=rng.uniform(0.35, 0.65) * spec.height,
                   angle=rng.uniform(0, 180))


def _random_motion(label: str | None, spec: SyntheticSpec, rng: np.random.Generator):
    """A function (object, t seconds) -> the object as drawn at time t."""
    def moved(obj: _Object, **changes) -> _Object:
        return _Object(**{**obj.__dict__, **changes})

    if label is None:
        return lambda obj, t: obj
    if label == "Bounce":
        height, rate = rng.uniform(0.2, 0.35) * spec.height, rng.uniform(0.8, 1.6)
        return lambda obj, t: moved(obj, y=obj.y + height / 2
                                    - height * abs(math.sin(math.pi * rate * t)))
    if label == "Slide":
        speed = rng.uniform(0.25, 0.5) * spec.width * rng.choice([-1, 1])
        span = 0.2 * spec.width  # glide this far either side, then turn back

        def slide(obj: _Object, t: float) -> _Object:
            phase = (speed * t / span + 1) % 4  # triangle wave in [-1, 1]
            return moved(obj, x=obj.x + span * (phase - 1 if phase < 2 else 3 - phase))
        return slide
    if label == "Spin":
        degrees_per_s = rng.uniform(180, 360) * rng.choice([-1, 1])
        # a spinning circle would not show its motion: it spins as a bar
        return lambda obj, t: moved(obj, angle=obj.angle + degrees_per_s * t,
                                    shape="bar" if obj.shape == "circle" else obj.shape)
    if label == "Pulse":
        rate, depth = rng.uniform(1.0, 2.0), rng.uniform(0.4, 0.6)
        return lambda obj, t: moved(obj, size=obj.size
                                    * (1 + depth * math.sin(2 * math.pi * rate * t)))
    raise ValueError(f"unknown synthetic class {label!r}")


def _draw(image: np.ndarray, obj: _Object) -> None:
    """Draw the object, anti-aliased with sub-pixel precision so slow motion stays smooth."""
    shift = 4  # cv2 fixed-point bits
    scale = 1 << shift
    centre = (int(obj.x * scale), int(obj.y * scale))
    if obj.shape == "circle":
        cv2.circle(image, centre, int(obj.size * scale), obj.colour, -1, cv2.LINE_AA, shift)
        return
    half = {"square": (obj.size, obj.size), "bar": (obj.size * 1.6, obj.size * 0.45),
            "triangle": (obj.size, obj.size)}[obj.shape]
    if obj.shape == "triangle":
        corners = [(obj.size * math.cos(math.radians(a)), obj.size * math.sin(math.radians(a)))
                   for a in (90, 210, 330)]
    else:
        corners = [(-half[0], -half[1]), (half[0], -half[1]), (half[0], half[1]),
                   (-half[0], half[1])]
    a = math.radians(obj.angle)
    points = np.array([[(obj.x + cx * math.cos(a) - cy * math.sin(a)) * scale,
                        (obj.y + cx * math.sin(a) + cy * math.cos(a)) * scale]
                       for cx, cy in corners], np.int32)
    cv2.fillPoly(image, [points], obj.colour, cv2.LINE_AA, shift)


def _encode(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """H.264 mp4 through PyAV, written atomically (core.atomic)."""
    with atomic_path(path, suffix=".mp4") as temp, av.open(str(temp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
