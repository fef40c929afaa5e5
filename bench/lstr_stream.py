"""One stream, one process: LSTR's own stream code beside vidpipe's OnlineDetector.

    .venv/bin/python bench/lstr_stream.py --lstr PATH [--steps 400] [--threads 1]
                                          [--config configs/malt_thumos.yaml]

PATH is a checkout of amazon-science/long-short-term-transformer (LSTR; not part of vidpipe:
`git clone https://github.com/amazon-science/long-short-term-transformer`). Its model is built
from its own code (`LSTRStream`, `build_model` with LSTR's weights_init), configured as its
THUMOS config lstr_long_512_work_8_kinetics_1x.yaml after its parser's inference (4 fps: long
memory 512 s = 2048 frames sampled every 4 = 512 tokens, work memory 8 s = 32 frames;
d_model 1024, 16 heads, FFN 1024, encoder [[16,1],[32,2]], decoder 2 layers; rgb 2048 +
flow 1024, 22 classes); the config object is built directly (a namespace with the same keys),
so yacs is not needed. It is driven as `do_lstr_stream_inference` drives it
(engines/lstr/lstr_inference.py): each step gathers the 32-frame work window, passes the new
long-memory frame every 4th step (else None), builds the padding mask, calls
`model.stream_inference` under no_grad and takes softmax(...).cpu().numpy(). vidpipe:
`OnlineDetector` with the paper-size model of configs/malt_thumos.yaml (rgb 2048, flow 1024,
20 actions + background) in fp32, bf16 and int8, its history loaded with `feed_history`.
Both at full memory (stream position ~2,100), random weights and features (the cost does not
depend on their values), whole 4-step refresh cycles after warm-up cycles; the four are timed
one after another in the same process. Columns: mean / median / p99 ms per step, p99/mean,
vidpipe / LSTR of the means, the mean of each of the 4 steps of a refresh cycle (sorted: a
spread there is the code's, not the machine's) and the slowest of them over the mean of the
other three (how evenly the long memory's encoding is spread; ~1.3 at most is the aim).
Target (issue 19): <= 0.35x LSTR's mean with p99 <= 1.5x mean.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from bisect import bisect_right
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from vidpipe.malt.config import load_run_config
from vidpipe.malt.model import MALT
from vidpipe.malt.stream import OnlineDetector

from conditions import measured   # bench/conditions.py: machine and load, before and after

LSTR_MODEL = Path("src/rekognition_online_action_detection/models/lstr.py")
FPS = 4                       # LSTR's data_info.json, THUMOS
LONG_SAMPLES, LONG_RATE, WORK = 512, 4, 32
POSITION = 2048 + 32 + 20     # stream position of the first timed step: both memories full
TARGET_RATIO, TARGET_P99 = 0.35, 1.5


def refuse(problem: str) -> None:
    """A one-line error (no usage block) and exit status 2, as argparse's errors."""
    print(f"error: bench/lstr_stream.py: {problem}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/lstr_stream.py", description=__doc__.splitlines()[0])
    parser.add_argument("--lstr", type=Path, help="a checkout of amazon-science/long-short-term-transformer")
    parser.add_argument("--steps", type=int, default=400,
                        help="timed steps per detector (rounded up to whole 4-step cycles)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--config", default="configs/malt_thumos.yaml", help="vidpipe's paper-size config")
    args = parser.parse_args(argv)
    fix = "clone https://github.com/amazon-science/long-short-term-transformer and pass its folder"
    if args.lstr is None:
        refuse(f"--lstr PATH is required (LSTR's code is not part of vidpipe): {fix}")
    if not (args.lstr / LSTR_MODEL).is_file():
        refuse(f"--lstr {args.lstr}: not an LSTR checkout (no {LSTR_MODEL}): {fix}")
    if args.steps < 1 or args.threads < 1:
        refuse(f"--steps and --threads must be >= 1 (got {args.steps}, {args.threads})")
    args.steps = -(-args.steps // LONG_RATE) * LONG_RATE
    return args


def lstr_config() -> SimpleNamespace:
    """LSTR's THUMOS config (configs/THUMOS/LSTR/lstr_long_512_work_8_kinetics_1x.yaml over
    config/defaults.py) with the values its utils/parser.py infers, as attributes."""
    ns = SimpleNamespace
    lstr = ns(NUM_HEADS=16, DIM_FEEDFORWARD=1024, DROPOUT=0.2, ACTIVATION="relu",
              LONG_MEMORY_NUM_SAMPLES=LONG_SAMPLES, WORK_MEMORY_NUM_SAMPLES=WORK,
              ENC_MODULE=[[16, 1, True], [32, 2, True]], DEC_MODULE=[-1, 2, True])
    return ns(MODEL=ns(MODEL_NAME="LSTR", LSTR=lstr,
                       FEATURE_HEAD=ns(LINEAR_ENABLED=True, LINEAR_OUT_FEATURES=1024)),
              INPUT=ns(MODALITY="twostream", VISUAL_FEATURE="rgb_kinetics_resnet50",
                       MOTION_FEATURE="flow_kinetics_bninception"),
              DATA=ns(DATA_NAME="THUMOS", NUM_CLASSES=22))


def lstr_seconds(checkout: Path, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Seconds per step of LSTR's stream inference, its test script's loop body, at full memory."""
    sys.path.insert(0, str((checkout / "src").resolve()))
    from rekognition_online_action_detection.models import build_model
    torch.manual_seed(0)
    model = build_model(lstr_config(), "cpu").eval()
    frames = POSITION + 2 * LONG_RATE + steps
    visual = rng.standard_normal((frames, 2048), dtype=np.float32)
    motion = rng.standard_normal((frames, 1024), dtype=np.float32)

    def to_device(x):
        return torch.as_tensor(x.astype(np.float32)).unsqueeze(0)

    long_indices: list[int] = []
    times = []
    for work_start in range(POSITION - WORK, frames - WORK + 1):   # first call: the whole long memory
        start = time.perf_counter()
        work = np.arange(work_start, work_start + WORK)
        long_end = work_start - 1
        if not long_indices:
            long_indices = list(range(long_end - (LONG_SAMPLES - 1) * LONG_RATE, long_end + 1, LONG_RATE))
            long_visual, long_motion = to_device(visual[long_indices]), to_device(motion[long_indices])
        elif long_end % LONG_RATE == 0:
            long_indices = long_indices[1:] + [long_end]
            long_visual, long_motion = to_device(visual[[long_end]]), to_device(motion[[long_end]])
        else:
            long_visual = long_motion = None
        mask = np.zeros(len(long_indices))
        last_zero = bisect_right(long_indices, 0) - 1
        if last_zero > 0:
            mask[:last_zero] = float("-inf")
        mask = torch.as_tensor(mask.astype(np.float32)).unsqueeze(0)
        with torch.no_grad():
            score = model.stream_inference(long_visual, long_motion, to_device(visual[work]),
                                           to_device(motion[work]), mask)[0]
            score.softmax(dim=-1).cpu().numpy()
        times.append(time.perf_counter() - start)
    return np.array(times[-steps:])          # the first 2 cycles warm up (the first encodes all)


def vidpipe_seconds(model: MALT, precision: str, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Seconds per `OnlineDetector.step` at full memory, after 2 warm-up cycles."""
    cfg = model.cfg
    detector = OnlineDetector(model, "cpu", precision=precision)
    detector.feed_history(rng.standard_normal((POSITION - 1, cfg.rgb_dim), dtype=np.float32),
                          rng.standard_normal((POSITION - 1, cfg.flow_dim), dtype=np.float32))
    warmup = 2 * cfg.long_memory_stride
    rgb = rng.standard_normal((warmup + steps, cfg.rgb_dim), dtype=np.float32)
    flow = rng.standard_normal((warmup + steps, cfg.flow_dim), dtype=np.float32)
    times = []
    for r, f in zip(rgb, flow):
        start = time.perf_counter()
        detector.step(r, f)
        times.append(time.perf_counter() - start)
    return np.array(times[warmup:])


def row(label: str, seconds: np.ndarray, reference: float) -> str:
    mean, median, p99 = (x * 1e3 for x in (seconds.mean(), np.median(seconds), np.percentile(seconds, 99)))
    phases = np.sort(seconds.reshape(-1, LONG_RATE).mean(0))
    slowest = phases[-1] / phases[:-1].mean()
    return (f"{label:<22}{mean:>9.1f}{median:>9.1f}{p99:>9.1f}{p99 / mean:>10.2f}"
            f"{seconds.mean() / reference:>12.2f}x{'/'.join(f'{x * 1e3:.0f}' for x in phases):>18}{slowest:>14.2f}")


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    lstr = lstr_seconds(args.lstr, args.steps, rng)
    cfg = dataclasses.replace(load_run_config(args.config).config.model,
                              rgb_dim=2048, flow_dim=1024, num_classes=21)
    torch.manual_seed(0)
    model = MALT(cfg).eval()
    print(f"{'per step, ms':<22}{'mean':>9}{'median':>9}{'p99':>9}{'p99/mean':>10}{'vs LSTR':>13}{'4 phases, sorted':>18}"
          f"{'slowest/rest':>14}")
    print(row("LSTR stream_inference", lstr, lstr.mean()), flush=True)
    verdicts = []
    for precision in ("fp32", "bf16", "int8"):
        ours = vidpipe_seconds(model, precision, args.steps, rng)
        print(row(f"vidpipe {precision}", ours, lstr.mean()), flush=True)
        ratio, spread = ours.mean() / lstr.mean(), np.percentile(ours, 99) / ours.mean()
        met = ratio <= TARGET_RATIO and spread <= TARGET_P99
        verdicts.append(f"{precision} {'met' if met else 'not met'} ({ratio:.2f}x, p99 {spread:.2f}x mean)")
    print(f"{args.steps} timed steps each at stream position ~{POSITION}, {args.threads} thread(s); "
          f"target <= {TARGET_RATIO}x LSTR's mean with p99 <= {TARGET_P99}x mean: " + "; ".join(verdicts))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)          # a wrong --lstr refuses in one line, before any table
    torch.set_num_threads(args.threads)
    with measured("bench/lstr_stream.py"):
        run(args)


if __name__ == "__main__":
    main()
