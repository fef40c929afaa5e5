"""Extraction speed on a generated clip (default 60 s, 320x240, 30 fps, H.264).

Prints one table: decode speed per backend, flow speed per method, CNN steps/s per backbone,
and whole extraction as a multiple of real time (DIS + resnet18 on the CPU; RAFT + resnet50
on CUDA when present); then each recipe (--recipe) per stage: decode, DenseFlow TV-L1 at the
recipe's size, each CNN, and the stages in sequence as a multiple of real time. Backbones use
random weights (same speed as pretrained, no download).

    .venv/bin/python bench/extract.py [--seconds 30] [--threads N] [--device cuda] [--recipes-only]

CNN rows run in each precision (`core.precision`): fp32 and bf16 autocast (+ fp16 on CUDA).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vidpipe.core.precision import autocast
from vidpipe.extractors.decode import VideoSource
from vidpipe.extractors.features import FeatureSettings, TwoStreamExtractor
from vidpipe.extractors.flow import OpenCVFlow, RAFTFlow
from vidpipe.extractors.backbone import create_timm_backbone
from vidpipe.extractors.rgb import resize_short_side
from vidpipe.extractors.tsn import RECIPES, TSNFlowStream, TSNRGBStream

from conditions import measured   # bench/conditions.py: machine and load, before and after

PAIRS_PER_SECOND = 4 * 5   # flow fields per second of video: 4 steps of 5 fields


def make_clip(path: Path, seconds: float, fps: int = 30, size: tuple[int, int] = (320, 240)) -> Path:
    """Moving textured content so that flow and codecs do real work."""
    import av

    width, height = size
    rng = np.random.default_rng(0)
    texture = np.kron(rng.integers(0, 256, (height // 8 + 1, (width + 2000) // 8 + 1, 3)),
                      np.ones((8, 8, 1)))[:height].astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(int(seconds * fps)):
            shift = (3 * index) % 2000
            frame = av.VideoFrame.from_ndarray(texture[:, shift:shift + width].copy(), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precisions(device: torch.device) -> tuple[str, ...]:
    """The CNN precisions timed: fp32 and bf16 (native where the flags say so), + fp16 on CUDA."""
    return ("fp32", "bf16") if device.type == "cpu" else ("fp32", "fp16", "bf16")


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def frame_pairs(clip: Path, resize: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = next(iter(VideoSource(clip, chunk=count + 1)))
    frames = torch.from_numpy(chunk.frames).permute(0, 3, 1, 2).float().to(device)
    frames = resize_short_side(frames, resize)
    return frames[:-1], frames[1:]


def recipe_rows(folder: Path, device: torch.device, row) -> None:
    """Each recipe's stages on a 2 s 480x360 clip (large enough for DenseFlow's 256 and 320
    short sides), one after another as `vidpipe extract --recipe` runs them on this device."""
    clip = make_clip(folder / "recipe.mp4", 2.0, size=(480, 360))
    seconds = timed(lambda: sum(1 for _ in VideoSource(clip)))
    decode_rate = 2.0 / seconds                                  # video seconds per second
    row("recipe decode 480x360 (24 fps RGB out)", f"{48 / seconds:,.0f} frames/s", f"{decode_rate:.1f}x real time")
    chunk = torch.from_numpy(next(iter(VideoSource(clip))).frames)[None]     # (1, 6, H, W, 3) uint8
    batch = 4
    for name, recipe in RECIPES.items():
        flow = TSNFlowStream(recipe, 5, jpeg=False, weights_file=None, random_init=True, seed=1).to(device)
        rgb = TSNRGBStream(recipe, weights_file=None, random_init=True, seed=0).to(device)
        images = flow.compute_flow(chunk)                        # warm-up; (1, 5, 2, h, w) uint8
        pairs_per_second = 5 / timed(lambda: flow.compute_flow(chunk))
        height, width = images.shape[-2:]
        row(f"{name}: TV-L1 {flow.recipe.short}p (DenseFlow) cpu", f"{pairs_per_second:,.2f} pairs/s",
            f"{pairs_per_second / PAIRS_PER_SECOND:.3f}x real time (images {width}x{height})")
        frames, stacks = chunk[:, 3].expand(batch, -1, -1, -1), images.expand(batch, -1, -1, -1, -1)
        for precision in precisions(device):
            with torch.inference_mode(), autocast(device, precision):
                rgb(frames), flow.embed(stacks)                  # warm-up
                synchronize(device)
                rgb_steps = batch / timed(lambda: (rgb(frames), synchronize(device)))
                flow_steps = batch / timed(lambda: (flow.embed(stacks), synchronize(device)))
            row(f"{name}: RGB TSN resnet50 {recipe.rgb_crop} {device.type} {precision}",
                f"{rgb_steps:,.1f} steps/s", f"{rgb_steps / 4:.2f}x real time")
            row(f"{name}: flow {recipe.flow.network} {recipe.flow.crop} {device.type} {precision}",
                f"{flow_steps:,.1f} steps/s", f"{flow_steps / 4:.2f}x real time")
            rates = [decode_rate, pairs_per_second / PAIRS_PER_SECOND, rgb_steps / 4, flow_steps / 4]
            whole = 1 / sum(1 / rate for rate in rates)
            row(f"{name}: whole, stages in sequence, {precision}", f"{whole:.4f}x real time",
                f"{1 / whole:,.0f} s per video second; an hour of video: {1 / whole:,.0f} h")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--recipes-only", action="store_true", help="only the recipes' rows (short)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with measured("bench/extract.py", args.threads):    # sets the threads, then names them
        run(args)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[tuple[str, str, str]] = []

    def row(what: str, speed: str, note: str = "") -> None:
        rows.append((what, speed, note))
        print(f"  {what:<44} {speed:>16}  {note}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as folder:
        if args.recipes_only:
            recipe_rows(Path(folder), device, row)
            print_table(rows, "recipes", device)
            return
        clip = make_clip(Path(folder) / "clip.mp4", args.seconds)
        frames_out = int(args.seconds * 24)

        for backend in ("decord", "pyav"):
            seconds = timed(lambda: sum(1 for _ in VideoSource(clip, backend=backend)))
            row(f"decode {backend} (24 fps RGB out)", f"{frames_out / seconds:,.0f} frames/s",
                f"{args.seconds / seconds:.1f}x real time")

        settings = FeatureSettings(resize=256)   # flow rows at TSN's short side 256 (README's table)
        for method, count in (("tvl1", 3), ("dis", 20)):
            first, second = frame_pairs(clip, settings.resize, count, torch.device("cpu"))
            estimator = OpenCVFlow(method, settings.dis_preset)
            seconds = timed(lambda: estimator(first, second))
            row(f"flow {method} {tuple(first.shape[-2:])} cpu", f"{count / seconds:,.1f} pairs/s",
                f"{count / seconds / PAIRS_PER_SECOND:.2f}x real time")
        raft_devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
        for raft_device in raft_devices:
            count = 2 if raft_device.type == "cpu" else 40
            first, second = frame_pairs(clip, settings.resize, count, raft_device)
            raft = RAFTFlow("raft_large", 12, weights_file=None, random_init=True, seed=0).to(raft_device)
            with torch.inference_mode():
                raft(first[:1], second[:1])                         # warm-up
                synchronize(raft_device)
                seconds = timed(lambda: (raft(first, second), synchronize(raft_device)))
            row(f"flow raft_large {tuple(first.shape[-2:])} {raft_device.type}", f"{count / seconds:,.1f} pairs/s",
                f"{count / seconds / PAIRS_PER_SECOND:.2f}x real time")

        for name in ("resnet18", "resnet50"):
            rgb, _ = create_timm_backbone(name, 3, weights_file=None, random_init=True, seed=0, option="")
            flow, _ = create_timm_backbone(name, 10, weights_file=None, random_init=True, seed=1, option="")
            rgb.to(device), flow.to(device)
            batch, repeats = 16, (1 if device.type == "cpu" else 20)
            images = torch.rand(batch, 3, 224, 224, device=device)
            stacks = torch.rand(batch, 10, 224, 224, device=device)
            for precision in precisions(device):
                with torch.inference_mode(), autocast(device, precision):
                    rgb(images), flow(stacks)                           # warm-up
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(repeats):
                        rgb(images), flow(stacks)
                    synchronize(device)
                    seconds = time.perf_counter() - start
                steps = batch * repeats / seconds
                row(f"CNN {name} rgb+flow 224 {device.type} {precision}", f"{steps:,.1f} steps/s",
                    f"{steps / 4:.2f}x real time")

        runs = [("dis", "resnet18", torch.device("cpu"))]
        if device.type == "cuda":
            runs.append(("raft", "resnet50", device))
        for method, name, run_device in runs:
            extractor = TwoStreamExtractor(FeatureSettings(rgb_backbone=name, flow_backbone=name, flow_method=method,
                                                           random_init=True), device=run_device)
            cpu_before = time.process_time()
            seconds = timed(lambda: extractor.extract(clip))
            cpu_seconds = time.process_time() - cpu_before   # robust to other jobs on the machine
            row(f"whole extract --flow {method} {name} {run_device.type}", f"{args.seconds / seconds:.2f}x real time",
                f"{args.seconds * 4 / seconds:.1f} steps/s; {cpu_seconds / args.seconds:.2f} CPU s per video s")
        recipe_rows(Path(folder), device, row)

    print_table(rows, f"{args.seconds:g} s clip, 320x240 @ 30 fps -> 24 fps, chunks of 6", device)


def print_table(rows: list[tuple[str, str, str]], what_ran: str, device: torch.device) -> None:
    print(f"\nvidpipe extraction benchmark: {what_ran}; torch threads {torch.get_num_threads()}, device {device}")
    print(f"| {'what':<44} | {'speed':>18} | note")
    print(f"|{'-' * 46}|{'-' * 20}|------")
    for what, speed, note in rows:
        print(f"| {what:<44} | {speed:>18} | {note}")


if __name__ == "__main__":
    main()
