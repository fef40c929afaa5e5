"""Two-stream features: a `VideoSource`'s chunks -> one RGB and one flow vector per step.

`FeatureSettings` (configs/extract.yaml + CLI options) says what to compute;
`TwoStreamExtractor` computes it on the CPU or a GPU and describes it with
`settings_record()`, the dict a feature cache's manifest and a checkpoint keep.
`TwoStreamExtractor.from_record(record)` rebuilds the same extractor from that dict (the
live detector uses it to featurise new video exactly like the training cache).
"""
from __future__ import annotations

import importlib.metadata
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import torch

from vidpipe.extractors.backbone import file_sha256
from vidpipe.extractors.decode import MAX_PIXELS, Chunk, VideoSource
from vidpipe.extractors.flow import FLOW_CLIP, FlowStream, flow_estimator, tvl1_expected_time
from vidpipe.extractors.flow_methods import FLOW_METHODS, FlowMethodName, flow_method
from vidpipe.extractors.rgb import RGBStream, resize_short_side
from vidpipe.extractors.tsn import RECIPES, TSNFlowStream, TSNRGBStream
from vidpipe.core.device import resolve_device
from vidpipe.core.errors import VidpipeError
from vidpipe.core.memory import release_free_memory
from vidpipe.core.precision import autocast, resolve_precision
from vidpipe.core.settings import differing_keys

RESIZE_BYTES = 128 << 20   # float frames resized at once: bounds memory for 4K sources
TRIM_STEPS = 64            # steps between returns of the heap's freed pages (core.memory)
log = logging.getLogger(__name__)


@dataclass
class FeatureSettings:
    """What `vidpipe extract` computes. Defaults follow TSN features at 24 fps, chunks of 6."""
    fps: float = 24.0                    # frames per second after resampling
    chunk: int = 6                       # frames per feature step (step = chunk / fps seconds)
    resize: int | None = None            # short side before cropping (flow runs at this size);
    crop: int | None = None              # centre crop fed to both CNNs; None: both from the RGB
                                         # model's pretrained config (timm data config)
    rgb_backbone: str = "resnet50"       # timm model name (2048-d)
    flow_backbone: str = "resnet50"      # timm model name, built with in_chans = 2 * flow_fields
    flow_method: FlowMethodName = "auto"  # extractors.flow_methods; auto: raft on CUDA, dis on CPU
    flow_fields: int = 5                 # consecutive frame pairs per chunk (at most chunk - 1)
    dis_preset: Literal["ultrafast", "fast", "medium"] = "medium"
    raft_model: Literal["raft_small", "raft_large"] = "raft_large"
    raft_iterations: int = 12
    rgb_weights: str | None = None       # local weights file instead of the hub's
    flow_weights: str | None = None
    raft_weights: str | None = None
    random_init: bool = False            # seeded random weights (tests, demo, offline)
    seed: int = 0
    batch_size: int = 16                 # steps per CNN batch
    decoder: Literal["auto", "decord", "pyav"] = "auto"   # same frames either way
    max_pixels: int = MAX_PIXELS         # a video declaring larger frames is refused unread (a bomb)
    precision: str = "fp32"              # the CNNs' products: fp32 | bf16 | fp16 (CUDA) | auto
                                         # (core.precision); recorded: a bf16 cache is another cache
    recipe: str | None = None            # a named recipe reproducing public features (extractors.tsn)
    flow_jpeg: bool = False              # recipe: JPEG round trip of the 8-bit flow images (DenseFlow's files)

    def validate(self) -> "FeatureSettings":
        problems = []
        if self.fps <= 0:
            problems.append(f"fps must be > 0 (got {self.fps})")
        if self.chunk < 2:
            problems.append(f"chunk must be >= 2 frames for flow (got {self.chunk})")
        if not 1 <= self.flow_fields <= self.chunk - 1:
            problems.append(f"flow_fields must be 1..chunk-1 = {self.chunk - 1} (got {self.flow_fields})")
        if self.crop is not None and not 0 < self.crop <= (self.resize or self.crop):
            problems.append(f"crop must be 1..resize = {self.resize} (got {self.crop})")
        try:
            flow_method(self.flow_method)
        except VidpipeError as exc:
            problems.append(str(exc))
        problems += self._recipe_problems()
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            problems.append(f"precision must be fp32, bf16, fp16 (CUDA) or auto (got {self.precision})")
        if self.max_pixels < 1:
            problems.append(f"max_pixels must be >= 1 (got {self.max_pixels})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        files = [key for key in ("rgb_weights", "flow_weights", "raft_weights") if getattr(self, key)]
        if self.random_init and files:  # else the files would be silently ignored
            problems.append(f"random_init excludes weights files (got {', '.join(files)}): drop one")
        if problems:
            raise VidpipeError("extraction settings: " + "; ".join(problems))
        return self

    def _recipe_problems(self) -> list[str]:
        """A recipe fixes networks, sizes and flow method: refuse settings it would ignore."""
        if self.recipe is None:
            return ["flow_jpeg applies to a --recipe only"] if self.flow_jpeg else []
        if self.recipe not in RECIPES:
            return [f"recipe '{self.recipe}': choose one of {', '.join(RECIPES)}"]
        fixed = {"rgb_backbone": "resnet50", "flow_backbone": "resnet50", "resize": None, "crop": None,
                 "raft_weights": None}
        clashing = [key for key, default in fixed.items() if getattr(self, key) != default]
        if self.flow_method not in ("auto", "tvl1"):
            clashing.append("flow_method (the recipe's flow is TV-L1)")
        return [f"recipe {self.recipe} sets its own {key}" for key in clashing]


@dataclass
class Step:
    """Features of one step, as `TwoStreamExtractor.stream` yields them."""
    index: int
    timestamp: float         # step start, seconds in the source (its first frame)
    end_time: float          # time of the chunk's last frame: when the step is complete
    rgb: np.ndarray          # (Dr,) float32
    flow: np.ndarray         # (Df,) float32


@dataclass
class Prepared:
    """A chunk after its per-source CPU work (`TwoStreamExtractor.prepare`: resize, flow),
    ready for the networks (`TwoStreamExtractor.embed`, batched over many sources)."""
    chunk: Chunk
    centre: torch.Tensor     # the RGB network's input: (3, h, w) float, resized (recipe: (H, W, 3) uint8)
    fields: torch.Tensor     # the flow network's input: (fields, 2, h, w) (recipe: uint8 flow images)


def package_versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers (kept per video, not compared)."""
    versions = {}
    for package in ("vidpipe", "torch", "torchvision", "timm", "numpy", "av", "decord",
                    "opencv-contrib-python-headless"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


class TwoStreamExtractor:
    """RGB + flow features per chunk, batched, on `device` (auto: CUDA when present)."""

    def __init__(self, settings: FeatureSettings, device: str | torch.device | None = None):
        self.settings = settings = replace(settings).validate()
        self.device = resolve_device(device)
        self.recipe = RECIPES[settings.recipe] if settings.recipe else None
        self.flow_method = self._pick_flow_method()
        if self.recipe:
            self._build_recipe_streams()
        else:
            self._build_timm_streams()
        if self.flow_method == "tvl1":   # never a silent 20x slowdown: say what it will cost
            short = self.recipe.flow.short if self.recipe else self.resize
            log.warning(tvl1_expected_time(short, settings.fps, settings.chunk, settings.flow_fields))
        self.rgb.to(self.device)
        self.flow.to(self.device)
        # OpenCV flow runs on the CPU outside the GIL: overlap it with the RGB network
        on_cpu = FLOW_METHODS[self.flow_method].estimator == "opencv"
        self.flow_thread = ThreadPoolExecutor(1, "opencv-flow") if on_cpu else None
        self._untrimmed_steps = 0
        self.precision = resolve_precision(settings.precision, self.device)   # what runs

    def _pick_flow_method(self) -> str:
        """A recipe's flow is TV-L1; auto is RAFT on CUDA and DIS on a CPU (saying so)."""
        method = self.settings.flow_method
        if self.recipe:
            return "tvl1"
        if method == "auto" and self.device.type != "cuda":
            log.info("flow: --flow auto uses DIS on the CPU (TV-L1, the field's standard, is about "
                        "20x slower: --flow tvl1)")
            return "dis"
        return "raft" if method == "auto" else method

    def _build_timm_streams(self) -> None:
        s = self.settings
        estimator = flow_estimator(self.flow_method, dis_preset=s.dis_preset, raft_model=s.raft_model,
                                   raft_iterations=s.raft_iterations, raft_weights=s.raft_weights,
                                   random_init=s.random_init, seed=s.seed + 2)
        self.rgb = RGBStream(s.rgb_backbone, s.crop, weights_file=s.rgb_weights,
                             random_init=s.random_init, seed=s.seed)
        config = self.rgb.input_config   # sizes not given follow the RGB model's pretrained config
        self.resize, self.crop = s.resize or max(config.resize, self.rgb.crop), self.rgb.crop
        self.interpolation = config.interpolation
        if self.crop > self.resize:
            raise VidpipeError(f"extraction settings: crop must be 1..resize = {self.resize} (got {self.crop})")
        self.flow = FlowStream(estimator, s.flow_backbone, s.flow_fields, self.crop,
                               weights_file=s.flow_weights, random_init=s.random_init, seed=s.seed + 1)

    def _build_recipe_streams(self) -> None:
        s = self.settings
        self.rgb = TSNRGBStream(self.recipe, weights_file=s.rgb_weights, random_init=s.random_init, seed=s.seed)
        self.flow = TSNFlowStream(self.recipe, s.flow_fields, jpeg=s.flow_jpeg, weights_file=s.flow_weights,
                                  random_init=s.random_init, seed=s.seed + 1)

    # -- description ---------------------------------------------------------------------
    def settings_record(self) -> dict:
        """The settings that define the features: equal records mean comparable features.

        Batch size, decoder backend and device are left out (same features up to float
        rounding; precision is in: bf16 moves features by ~1e-2); the cache records decoder,
        device and package versions per video instead (`run_record`), so an upgrade does not
        lock a cache.
        """
        s = self.settings
        record = {
            "extractor": "vidpipe two-stream (TSN convention)",
            "recipe": s.recipe,
            "fps": s.fps,
            "chunk": s.chunk,
            "step_seconds": s.chunk / s.fps,
            "timestamps": "step start, seconds from the first video frame",
            "rgb_weights": self.rgb.weights_identity,
            "rgb_dim": self.rgb.dim,
            "flow_weights": self.flow.weights_identity,
            "flow_dim": self.flow.dim,
            "flow_method": self.flow_method,
            "flow_estimator": self.flow.estimator.identity,
            "flow_fields": s.flow_fields,
            "random_init": s.random_init,
            "seed": s.seed,
            "precision": self.precision,
        }
        if self.recipe:
            return {**record, **self.recipe.describe(), "rgb_backbone": "resnet50 (mmaction2 TSN)",
                    "flow_backbone": f"{self.recipe.flow.network} (TSN)",
                    "flow_images": "8-bit, jpeg round trip" if s.flow_jpeg else "8-bit"}
        config = self.rgb.input_config
        record.update({
            "resize": self.resize,
            "crop": self.crop,
            "rgb_backbone": s.rgb_backbone,
            "rgb_input": (f"centre frame (index {s.chunk // 2} of {s.chunk}), {self.interpolation} resize, "
                          f"mean {[round(v, 4) for v in config.mean]} std {[round(v, 4) for v in config.std]}"),
            "flow_backbone": s.flow_backbone,
            "flow_input": f"x/y clipped to +-{FLOW_CLIP:g} px, scaled to [0, 255], mean 128 std 128",
        })
        record.update({key: getattr(s, key) for key in FLOW_METHODS[self.flow_method].settings})
        return record

    def run_record(self) -> dict:
        """How this run computed (per video): device, package versions."""
        return {"device": str(self.device), "versions": package_versions()}

    @classmethod
    def from_record(cls, record: dict, device: str | torch.device | None = None, *,
                    rgb_weights: str | None = None, flow_weights: str | None = None,
                    raft_weights: str | None = None, batch_size: int = 16) -> "TwoStreamExtractor":
        """Rebuild the extractor a cache or checkpoint was made with (its `settings_record()`).

        Hub weights are fetched by name; weights that came from files need those files again
        (checked by sha256). The rebuilt extractor's record must equal `record`.
        """
        record = {"precision": "fp32", **record}   # records before the key: fp32 (CPU)
        common = dict(
            fps=record["fps"], chunk=record["chunk"], flow_fields=record["flow_fields"],
            rgb_weights=_weights_file(record["rgb_weights"], rgb_weights, "rgb"),
            flow_weights=_weights_file(record["flow_weights"], flow_weights, "flow"),
            random_init=record["random_init"], seed=record["seed"], batch_size=batch_size,
            precision=record["precision"])
        if record.get("recipe"):
            rebuilt = FeatureSettings(recipe=record["recipe"], flow_jpeg="jpeg" in record.get("flow_images", ""),
                                      **common)
        else:
            rebuilt = FeatureSettings(
                resize=record["resize"], crop=record["crop"],
                rgb_backbone=_backbone_name(record["rgb_backbone"], record["rgb_weights"]),
                flow_backbone=_backbone_name(record["flow_backbone"], record["flow_weights"]),
                flow_method=record["flow_method"],
                **{key: record[key] for key in flow_method(record["flow_method"]).settings},
                raft_weights=_weights_file(record.get("flow_estimator", ""), raft_weights, "raft"), **common)
        extractor = cls(rebuilt, device)
        mine = extractor.settings_record()
        if not record.get("recipe"):   # hub tags stand for the name given
            mine["rgb_backbone"], mine["flow_backbone"] = record["rgb_backbone"], record["flow_backbone"]
        differing = differing_keys(mine, record)
        if differing:
            raise VidpipeError(f"cannot rebuild the feature extractor of this record: it differs in "
                               f"{', '.join(differing)} (e.g. {differing[0]}: {record.get(differing[0])!r} "
                               f"vs {mine.get(differing[0])!r})")
        return extractor

    # -- computing -----------------------------------------------------------------------
    def source(self, path_or_url: str | Path) -> VideoSource:
        """A `VideoSource` with this extractor's sampling (fps, chunk, decoder)."""
        return VideoSource(path_or_url, fps=self.settings.fps, chunk=self.settings.chunk,
                           backend=self.settings.decoder, max_pixels=self.settings.max_pixels)

    def stream(self, source: VideoSource | str | Path, batch_size: int | None = None) -> Iterator[Step]:
        """Steps as they are computed, `batch_size` steps at a time (1 for the lowest latency)."""
        if not isinstance(source, VideoSource):
            source = self.source(source)
        if (source.fps, source.chunk) != (self.settings.fps, self.settings.chunk):
            raise VidpipeError(f"{source.path}: source samples {source.fps} fps in chunks of {source.chunk}, "
                               f"the extractor expects {self.settings.fps} and {self.settings.chunk}")
        return self.stream_chunks(source.chunks(), batch_size)

    def stream_chunks(self, chunks: Iterable[Chunk], batch_size: int | None = None) -> Iterator[Step]:
        """`stream` on chunks decoded elsewhere (the batch job's decoding workers).

        When decoding fails (a truncated file, a dropped stream), the steps of the chunks
        decoded before the failure are yielded first, then the error is raised: a batch
        size never decides how much of a damaged video is kept.
        """
        size = batch_size or self.settings.batch_size
        batch: list[tuple[Chunk, torch.Tensor]] = []
        try:
            for chunk in chunks:
                batch.append((chunk, self._resized(chunk.frames)))
                if len(batch) == size:
                    yield from self._steps(batch)
                    batch = []
        except VidpipeError:
            if batch:
                yield from self._steps(batch)
            raise
        if batch:
            yield from self._steps(batch)

    def extract(self, source: VideoSource | str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All steps of a video: rgb (T, Dr), flow (T, Df), timestamps (T,) float64."""
        return stack_steps(self.stream(source), source.path if isinstance(source, VideoSource) else source)

    @torch.inference_mode()
    def features(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, K, 3, h, w) float [0, 255], resized, on the device -> rgb (B, Dr), flow (B, Df).
        A recipe's streams take the decoded frames instead: (B, K, H, W, 3) uint8 on the CPU."""
        centre = frames[:, self.settings.chunk // 2]            # (B, 3, h, w)
        pending_flow = self.flow_thread.submit(self.flow.compute_flow, frames) if self.flow_thread else None
        with autocast(self.device, self.precision):
            rgb = self.rgb(centre)
            fields = pending_flow.result() if pending_flow else self.flow.compute_flow(frames)
            flow = self.flow.embed(fields)                      # (B, fields, 2, h, w) -> (B, Df)
        return rgb.float(), flow.float()

    @torch.inference_mode()
    def prepare(self, chunk: Chunk) -> Prepared:
        """The per-source CPU work of one chunk: resize and flow (a live source's worker
        thread); the networks run later on many sources at once (`embed`)."""
        frames = self._resized(chunk.frames)[None]                   # (1, K, 3, h, w)
        return Prepared(chunk, frames[0, self.settings.chunk // 2], self.flow.compute_flow(frames)[0])

    @torch.inference_mode()
    def embed(self, prepared: list[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """The RGB and flow networks over prepared chunks of any sources, one batch per input
        size (sources of one size: one batch) -> rgb (B, Dr), flow (B, Df) float32, in order.
        The same features as `stream` gives each chunk, up to the float rounding of a batch."""
        rgb = np.zeros((len(prepared), self.rgb.dim), np.float32)
        flow = np.zeros((len(prepared), self.flow.dim), np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(prepared):
            groups.setdefault((item.centre.shape, item.fields.shape), []).append(i)
        for rows in groups.values():
            centres = torch.stack([prepared[i].centre for i in rows])
            fields = torch.stack([prepared[i].fields for i in rows])
            with autocast(self.device, self.precision):
                rgb[rows] = self.rgb(centres).float().cpu().numpy()
                flow[rows] = self.flow.embed(fields).float().cpu().numpy()
        self._trim(len(prepared))
        return rgb, flow

    @torch.inference_mode()
    def _resized(self, frames: np.ndarray) -> torch.Tensor:
        """(K, H, W, 3) uint8 -> (K, 3, h, w) float on the device, short side = resize.

        Resized chunk by chunk, in slices, so a 4K source never sits in memory as floats.
        A recipe resizes 8-bit images itself, as its references do: frames stay as decoded.
        """
        if self.recipe:
            return torch.from_numpy(frames)
        pixels = torch.from_numpy(frames).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        per_slice = max(1, RESIZE_BYTES // (pixels[0].numel() * 4))
        return torch.cat([resize_short_side(part.float(), self.resize, self.interpolation)
                          for part in pixels.split(per_slice)])

    def _steps(self, batch: list[tuple[Chunk, torch.Tensor]]) -> Iterator[Step]:
        rgb, flow = self.features(torch.stack([frames for _, frames in batch]))
        rgb, flow = rgb.cpu().numpy(), flow.cpu().numpy()
        self._trim(len(batch))
        for (chunk, _), rgb_vec, flow_vec in zip(batch, rgb, flow):
            yield Step(index=chunk.index, timestamp=chunk.start, end_time=chunk.end, rgb=rgb_vec, flow=flow_vec)

    def _trim(self, steps: int) -> None:
        # Decode, flow and the CNNs free buffers of many sizes from several threads; glibc
        # holds the freed pages, and what it holds grows with the video (+250 MB over 20
        # minutes): hand them back every TRIM_STEPS steps, so memory is flat however long.
        self._untrimmed_steps += steps
        if self._untrimmed_steps >= TRIM_STEPS:
            release_free_memory()
            self._untrimmed_steps = 0


def stack_steps(steps: Iterable[Step], name: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps -> rgb (T, Dr), flow (T, Df), timestamps (T,); a video without one step is an error."""
    steps = list(steps)
    if not steps:
        raise VidpipeError(f"{name}: too short for one feature step")
    return (np.stack([s.rgb for s in steps]), np.stack([s.flow for s in steps]),
            np.array([s.timestamp for s in steps], dtype=np.float64))


def _backbone_name(name: str, identity: str) -> str:
    """Hub weights are recorded with their tag ('pretrained timm/resnet50.a1_in1k'): use it."""
    prefix = "pretrained timm/"
    return identity[len(prefix):] if identity.startswith(prefix) else name


def _weights_file(identity: str, given: str | None, stream: str) -> str | None:
    """The weights file a record needs (by sha256), or None when it needs none."""
    marker = identity.find("sha256:")
    if marker < 0:
        if given is not None:   # ignoring it would hide a mix-up of checkpoints or files
            raise VidpipeError(f"{given}: the {stream} features of this model were made without a "
                               f"weights file ({identity}); leave out --{stream}-weights")
        return None
    wanted = identity[marker + len("sha256:"):].split()[0].rstrip(",")
    if given is None:
        raise VidpipeError(f"the {stream} weights of these features came from a file "
                           f"({identity}); pass that file")
    if not Path(given).is_file():
        raise VidpipeError(f"{given}: weights file not found")
    if file_sha256(given) != wanted:
        raise VidpipeError(f"{given}: not the {stream} weights these features were made with "
                           f"(sha256 differs from {wanted[:12]}...)")
    return given
