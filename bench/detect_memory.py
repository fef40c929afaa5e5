"""Peak memory of `vidpipe detect` against the length of the video: one table.

One demo-sized checkpoint (the demo's extractor: random-init resnet18s, DIS flow, 96-pixel
crops; configs/demo.yaml's model, random weights) and, for each length, a synthetic video
(a texture moving at 128x96, 24 fps, libx264; made once into --work and kept there, a
2-hour one takes about a minute) detected by a `vidpipe detect` process whose resident
memory (VmRSS) is read every 0.25 s. Columns: minutes of video, steps, the peak RSS, its
ratio to the first (shortest) video's, the median RSS over the run, wall seconds, x real time.
docs/reliability.md's bar: every peak within 10% of the 2-minute video's.

    .venv/bin/python bench/detect_memory.py [--minutes 2 20 120] [--work DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from vidpipe.extractors.features import TwoStreamExtractor
from vidpipe.pipeline.demo import demo_feature_settings

from conditions import measured   # bench/conditions.py: machine and load, before and after
from detect import random_demo_checkpoint   # bench/detect.py

SIZE, FPS = (128, 96), 24
SAMPLE_S = 0.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.0, 20.0, 120.0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vidpipe-bench-memory",
                        help="folder for the videos and the checkpoint (kept: reruns reuse them)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with measured("bench/detect_memory.py", args.threads):    # sets the threads, then names them
        run(args)


def run(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work / "run" / "last.pt"
    if not checkpoint.is_file():
        random_demo_checkpoint(TwoStreamExtractor(demo_feature_settings(), "cpu").settings_record(),
                               checkpoint)
    rows = []
    for minutes in args.minutes:
        video = moving_texture(args.work / f"texture_{minutes:g}min.mp4", minutes)
        peak, median, wall = detect_rss(video, checkpoint, args.work / "out", args.threads)
        rows.append((minutes, round(minutes * 60 * 4), peak, median, wall))
    print(f"{'minutes':>8} {'steps':>7} {'peak RSS MB':>12} {'vs first':>9} {'median MB':>10} "
          f"{'wall s':>8} {'x real time':>12}")
    for minutes, steps, peak, median, wall in rows:
        print(f"{minutes:8g} {steps:7d} {peak:12.0f} {peak / rows[0][2]:8.3f}x {median:10.0f} "
              f"{wall:8.1f} {minutes * 60 / wall:12.1f}")


def moving_texture(path: Path, minutes: float) -> Path:
    """A video of `minutes` whose frames all differ (a random texture sliding by), encoded once."""
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    width, height = SIZE
    texture = rng.integers(0, 255, (height * 2, width * 2, 3), dtype=np.uint8)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(minutes * 60 * FPS)):
            x, y = (3 * i) % width, (2 * i) % height
            frame = np.ascontiguousarray(texture[y:y + height, x:x + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    partial.rename(path)
    return path


def detect_rss(video: Path, checkpoint: Path, out: Path, threads: int) -> tuple[float, float, float]:
    """`vidpipe detect VIDEO` in its own process -> (peak RSS MB, median RSS MB, wall s)."""
    command = [sys.executable, "-c", "from vidpipe.pipeline.cli import run; run()", "detect",
               str(video), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
               "--threads", str(threads)]
    log = out / f"{video.stem}.log"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        samples = []
        while process.poll() is None:
            samples += [rss] if (rss := resident_mb(process.pid)) else []
            time.sleep(SAMPLE_S)
    wall = time.monotonic() - started
    if process.returncode != 0 or not samples:
        raise SystemExit(f"detect failed on {video} (exit {process.returncode}); see {log}")
    return max(samples), float(np.median(samples)), wall


def resident_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:      # the process has just ended
        return None
    return None


if __name__ == "__main__":
    main()
