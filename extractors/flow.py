"""Flow stream: one motion vector per chunk (TSN convention).

Optical flow between consecutive frames of the chunk (chunk 6 -> 5 fields), x and y stacked
as 2 * fields channels, each clipped to [-20, 20] pixels and scaled like TSN's flow images
([0, 255], mean 128, std 128), centre-cropped, through a timm backbone with `in_chans` =
2 * fields whose first conv timm adapts from RGB weights (TSN cross-modality init).

Flow methods (registered in `extractors.flow_methods`): OpenCV TV-L1 (the field's standard)
and DIS (fast) run on the CPU; RAFT (torchvision) runs on the model's device, the GPU when
there is one. `flow_estimator` builds the estimator of a method.
"""
from __future__ import annotations

import functools
import threading
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidpipe.extractors.backbone import create_timm_backbone, load_weights_file, seeded, torch_hub_access, weights_identity
from vidpipe.extractors.flow_methods import flow_method
from vidpipe.extractors.rgb import center_crop
from vidpipe.core.errors import VidpipeError

FLOW_CLIP = 20.0          # pixels; TSN's bound before quantising flow to 8-bit images
DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
               "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
RAFT_MIN_SIZE = 128      # RAFT's correlation pyramid needs feature maps of 16 (input / 8)


def to_gray_uint8(frames: torch.Tensor) -> np.ndarray:
    """(N, 3, h, w) float RGB in [0, 255] -> (N, h, w) uint8 luma (ITU-R BT.601, as cv2)."""
    weights = frames.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    gray = (frames * weights).sum(dim=1).round().clamp(0, 255)
    return gray.to(torch.uint8).cpu().numpy()


class OpenCVFlow(nn.Module):
    """TV-L1 or DIS from OpenCV, one frame pair at a time on the CPU. One OpenCV estimator
    per calling thread: `vidpipe detect`'s source workers compute flow at once, and one
    estimator called from two threads crashes the process (a segfault, measured with DIS)."""

    def __init__(self, method: str, dis_preset: str = "medium"):
        super().__init__()
        flow_method(method, "opencv")   # an unknown name is refused, never silently DIS
        if dis_preset not in DIS_PRESETS:
            raise VidpipeError(f"dis_preset '{dis_preset}': choose one of {', '.join(DIS_PRESETS)}")
        self.method, self.dis_preset = method, dis_preset
        self._estimators: dict[int, cv2.DenseOpticalFlow] = {}      # by thread id
        self.identity = "opencv " + (method if method == "tvl1" else f"dis preset {dis_preset}")

    @property
    def estimator(self) -> cv2.DenseOpticalFlow:
        """The calling thread's OpenCV estimator (made on its first call)."""
        thread = threading.get_ident()
        if thread not in self._estimators:
            if self.method == "tvl1":  # OpenCV's defaults, as the denseflow tool used for TSN features
                self._estimators[thread] = cv2.optflow.DualTVL1OpticalFlow_create()
            else:
                self._estimators[thread] = cv2.DISOpticalFlow_create(DIS_PRESETS[self.dis_preset])
        return self._estimators[thread]

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """(P, 3, h, w) float [0, 255] pairs -> (P, 2, h, w) float32 flow in pixels."""
        gray_first, gray_second = to_gray_uint8(first), to_gray_uint8(second)
        fields = [self.estimator.calc(a, b, None) for a, b in zip(gray_first, gray_second)]  # (h, w, 2)
        flow = torch.from_numpy(np.stack(fields)).permute(0, 3, 1, 2)
        return flow.to(first.device)


@functools.lru_cache(maxsize=1)
def _tvl1_seconds_per_pixel() -> float:
    """Time one TV-L1 pair on this machine (a moving smooth texture, 96x128), per pixel."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (96, 160), dtype=np.uint8), (5, 5), 2)
    first, second = texture[:, :128].copy(), texture[:, 2:130].copy()
    estimator = cv2.optflow.DualTVL1OpticalFlow_create()
    start = time.perf_counter()
    estimator.calc(first, second, None)
    return (time.perf_counter() - start) / first.size


def tvl1_expected_time(short: int, fps: float, chunk: int, fields: int) -> str:
    """One line: what TV-L1 will cost per minute of 4:3 video at this short side, measured here."""
    width = round(short * 4 / 3)
    per_pair = _tvl1_seconds_per_pixel() * short * width
    per_video_second = per_pair * fps / chunk * fields        # pairs per second of video
    return (f"flow: TV-L1 on the CPU takes about {per_pair:.2f} s per frame pair at {width}x{short} here: "
            f"~{per_video_second:.1f} s per second of video, {per_video_second:.0f}x slower than real time "
            f"(DIS, --flow dis, is ~20x faster)")


class RAFTFlow(nn.Module):
    """torchvision RAFT; frames padded to a multiple of 8, at least 128 pixels, as it requires."""

    def __init__(self, model: str, iterations: int, *, weights_file: str | None,
                 random_init: bool, seed: int):
        super().__init__()
        from torchvision.models import optical_flow

        build = getattr(optical_flow, model)
        self.iterations = iterations
        if random_init:
            self.raft = seeded(seed, lambda: build(weights=None))
            weights = weights_identity(True, seed, None, model)
        elif weights_file:
            self.raft = build(weights=None)
            weights = load_weights_file(self.raft, weights_file, model)
        else:
            default = {"raft_small": optical_flow.Raft_Small_Weights,
                       "raft_large": optical_flow.Raft_Large_Weights}[model].DEFAULT
            with torch_hub_access(model, "--set raft_weights=PATH"):
                self.raft = build(weights=default)
            weights = weights_identity(False, seed, None, f"torchvision {model} {default.name}")
        self.raft.eval()
        self.identity = f"torchvision {model} iterations {iterations}, weights {weights}"

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """(P, 3, h, w) float [0, 255] pairs -> (P, 2, h, w) float32 flow in pixels."""
        height, width = first.shape[-2:]
        pad = (0, max(RAFT_MIN_SIZE, width + -width % 8) - width,
               0, max(RAFT_MIN_SIZE, height + -height % 8) - height)
        images = [F.pad(x / 127.5 - 1.0, pad, mode="replicate") for x in (first, second)]
        with torch.autocast(first.device.type, enabled=False):  # flow needs full precision
            flow = self.raft(images[0].float(), images[1].float(), num_flow_updates=self.iterations)[-1]
        return flow[..., :height, :width]


def flow_estimator(method: str, *, dis_preset: str = "medium", raft_model: str = "raft_large",
                   raft_iterations: int = 12, raft_weights: str | None = None,
                   random_init: bool = False, seed: int = 0) -> nn.Module:
    """The estimator of a registered flow method ('auto' must be resolved to one first)."""
    kind = flow_method(method).estimator
    if kind == "opencv":
        return OpenCVFlow(method, dis_preset)
    if kind == "raft":
        return RAFTFlow(raft_model, raft_iterations, weights_file=raft_weights,
                        random_init=random_init, seed=seed)
    raise ValueError(f"flow method '{method}' picks an estimator by device; resolve it first")


def frame_pairs(chunk: int, fields: int) -> tuple[list[int], list[int]]:
    """Frame indices of the `fields` consecutive pairs, centred in the chunk."""
    start = (chunk - 1 - fields) // 2
    first = list(range(start, start + fields))
    return first, [i + 1 for i in first]


def flow_to_input(flow: torch.Tensor) -> torch.Tensor:
    """Flow in pixels -> network input: clipped, scaled to [0, 255] like TSN's flow images,
    normalised with mean 128 and std 128. (No 8-bit rounding: the images are never stored.)"""
    scaled = (flow.clamp(-FLOW_CLIP, FLOW_CLIP) + FLOW_CLIP) * (255.0 / (2 * FLOW_CLIP))
    return (scaled - 128.0) / 128.0


class FlowStream(nn.Module):
    """Resized chunk frames -> flow fields -> stacked flow input -> pooled backbone features."""

    def __init__(self, estimator: nn.Module, backbone: str, fields: int, crop: int, *,
                 weights_file: str | None = None, random_init: bool = False, seed: int = 0):
        super().__init__()
        self.estimator = estimator
        self.fields = fields
        self.crop = crop
        self.backbone, self.weights_identity = create_timm_backbone(
            backbone, in_chans=2 * fields, weights_file=weights_file, random_init=random_init,
            seed=seed, option="--flow-weights PATH")

    @property
    def dim(self) -> int:
        return self.backbone.num_features

    def compute_flow(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, K, 3, h, w) -> flow (B, fields, 2, h, w) in pixels."""
        batch, chunk = frames.shape[:2]
        first, second = frame_pairs(chunk, self.fields)
        flow = self.estimator(frames[:, first].flatten(0, 1), frames[:, second].flatten(0, 1))
        return flow.view(batch, self.fields, *flow.shape[1:])

    def embed(self, flow: torch.Tensor) -> torch.Tensor:
        """flow (B, fields, 2, h, w) in pixels -> (B, D)."""
        flow = center_crop(flow, self.crop)                       # (B, fields, 2, crop, crop)
        x = flow_to_input(flow).flatten(1, 2)                     # (B, 2*fields, crop, crop): x1, y1, x2, ...
        return self.backbone(x)                                   # (B, D)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, K, 3, h, w) float [0, 255], short side resized -> (B, D)."""
        return self.embed(self.compute_flow(frames))
