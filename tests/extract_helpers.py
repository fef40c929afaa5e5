"""Tiny test videos made with PyAV, and the extraction settings the tests use."""
from __future__ import annotations

import fractions
import functools
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from vidpipe.extractors.features import FeatureSettings

# resnet18 with random weights on 48-pixel crops: real code paths, fast on CPU.
TINY = dict(rgb_backbone="resnet18", flow_backbone="resnet18", flow_method="dis",
            random_init=True, resize=56, crop=48, batch_size=4)


def tiny_settings(**changes) -> FeatureSettings:
    return FeatureSettings(**{**TINY, **changes})


@functools.lru_cache(maxsize=8)
def _texture(width: int, height: int, seed: int) -> np.ndarray:
    texture = np.random.default_rng(seed).integers(0, 256, size=(height // 4 + 1, (width + 512) // 4 + 1, 3))
    return np.kron(texture, np.ones((4, 4, 1)))[:height].astype(np.uint8)   # 4x4 blocks: trackable


def frame_image(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured frame that moves 2 px per frame (flow has something to find) and whose
    top band's brightness encodes the frame index (each frame differs)."""
    texture = _texture(width, height, seed)
    shift = (2 * index) % 512
    image = texture[:, shift:shift + width].copy()
    image[: max(2, height // 8)] = (index * 17) % 256
    return image


def make_video(path: str | Path, frames: int = 48, fps: int = 24, size: tuple[int, int] = (64, 48),
               codec: str = "libx264", pix_fmt: str = "yuv420p",
               pts_ms: list[int] | None = None, seed: int = 0) -> Path:
    """Write a video; `pts_ms` gives variable-frame-rate presentation times in milliseconds."""
    path = Path(path)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
            stream.time_base = fractions.Fraction(1, 1000)
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(index, width, height, seed), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[index], fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        tone = (0.2 * np.sin(np.arange(samples) / 10)).astype(np.float32)[None]
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def decode_all(path: str | Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every source frame with its time (seconds from the first), by plain PyAV."""
    times, images = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            times.append(float(frame.pts * frame.time_base))
            images.append(frame.to_ndarray(format="rgb24"))
    return np.array(times) - times[0], images


def without_root_read_override() -> list[str]:
    """Command prefix under which permissions apply: root reads anything unless its
    DAC capabilities are dropped (setpriv); other users need nothing."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
