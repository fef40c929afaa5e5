"""Many live streams on one machine: how many stay real time (malt.stream.MultiStreamDetector).

    .venv/bin/python bench/streams.py [--streams 1,8,32,64] [--precisions fp32,bf16,int8]
                                      [--threads 2] [--cycles 2] [--e2e-sources 1,2,4]
                                      [--e2e-seconds 5] [--no-e2e | --no-model]

Model only, at paper size (M_L 512 tokens, M_S 32, d_model 1024, N=2, k=370; rgb 2048 +
flow 1024; random weights and features: the cost does not depend on their values): B
streams step together through one batched detector in each precision (malt.stream: fp32;
bf16; int8 = dynamic int8 Linear layers, the rest bf16 where the CPU has it). Each stream
has a full history (`feed_history`) and its own refresh phase (positions 2080 + b), the
encoder's work is spread over every cycle of 4 steps, and the timed steps are whole cycles
after one warm-up cycle. Columns: per-step median / mean / p99 for the B streams together;
stream-steps/s; achieved GFLOP/s in fp32-equivalent multiply-adds (2 x the multiply-adds
counted per stream-step x B / mean step: for bf16 and int8 an effective rate) and that rate
over a large fp32 matmul's, measured in the same run (about the most these cores give in
fp32); the largest |p - p_fp32| over the timed steps' probabilities (same inputs). Real
time is 4 steps/s per stream (a step is 0.25 s of video): B streams are real time when the
mean step of all B takes <= 250 ms. The largest such B is estimated from the timed rows
(time per step grows linearly with B), then measured.

End to end: S live sources (320x240 synthetic videos from pipeline/synthetic.py at 30 fps),
each round one step of each: decode (24 fps, chunks of 6), DIS flow per source, the
random-init resnet18 RGB and flow CNNs batched over the S sources (extractor defaults
otherwise: `vidpipe extract`'s), then one batched step of a paper-size detector on those
512 + 512-d features; fp32 throughout, then precision auto (CNNs bf16 and the detector int8
where the CPU has them). Real time: a round takes <= 250 ms on average. CPU ms: the
process's CPU time per round (all threads; under load a steadier figure than wall time). Two layouts, each
row of one in the same run as the other's: `one thread` decodes and runs DIS source after
source in the round's thread (the layout before issue 19); `workers` is `vidpipe detect`'s
engine (pipeline/live.py): one worker thread per source decodes and prepares its chunks
(resize + DIS, OpenCV single-threaded: `TwoStreamExtractor.prepare`), the round's thread
runs the networks over all sources at once (`embed`) and the model step.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

# As `vidpipe detect` (pipeline/cli.py): the workers layout starts torch's OpenMP regions from
# several threads, whose spinning between regions takes the cores from each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402  (after the OpenMP setting, read when torch loads)
import torch  # noqa: E402

from vidpipe.malt.config import ModelConfig
from vidpipe.malt.info import count_macs
from vidpipe.malt.model import MALT
from vidpipe.malt.stream import MultiStreamDetector

from conditions import measured   # bench/conditions.py: machine and load, before and after

PAPER = ModelConfig()      # the defaults are the paper's THUMOS'14 model
STEP_SECONDS = 0.25        # 4 steps/s: LSTR's and the paper's feature rate


def matmul_gflops(size: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """The best of `repeats` (size x size) @ (size x size) products in `dtype`, GFLOP/s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _random_inputs(cfg: ModelConfig, streams: int, rng: np.random.Generator) -> dict:
    """One step of every stream (the values do not change the cost)."""
    return {b: (rng.standard_normal(cfg.rgb_dim, dtype=np.float32),
                rng.standard_normal(cfg.flow_dim, dtype=np.float32)) for b in range(streams)}


def serve(model: MALT, streams: int, cycles: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per batched step of `streams` streams with full histories at all refresh
    phases, and the timed steps' probabilities (steps, B, C+1); the same inputs whatever
    the precision (seeded by B)."""
    cfg, stride, rng = model.cfg, model.cfg.long_memory_stride, np.random.default_rng(streams)
    detector = MultiStreamDetector(model, "cpu", max_streams=streams, precision=precision)
    history = cfg.long_memory_steps + cfg.short_memory_steps
    for b in range(streams):
        detector.add_stream(b)
        detector.feed_history(b, rng.standard_normal((history + b % stride, cfg.rgb_dim), dtype=np.float32),
                              rng.standard_normal((history + b % stride, cfg.flow_dim), dtype=np.float32))
    inputs = _random_inputs(cfg, streams, rng)
    for _ in range(stride):                           # warm-up: the encodings after feed_history
        detector.step(inputs)
    seconds, probs = [], []
    for _ in range(cycles * stride):
        start = time.perf_counter()
        out = detector.step(inputs)
        seconds.append(time.perf_counter() - start)
        probs.append(np.stack([out[b] for b in range(streams)]))
    return np.array(seconds), np.stack(probs)


def macs_per_stream_step(model: MALT, rng: np.random.Generator) -> float:
    """Multiply-adds of one stream's step, mean over a cycle (the same for every stream)."""
    cfg, stride = model.cfg, model.cfg.long_memory_stride
    detector = MultiStreamDetector(model, "cpu", max_streams=1)
    detector.add_stream(0)
    history = cfg.long_memory_steps + cfg.short_memory_steps
    detector.feed_history(0, rng.standard_normal((history, cfg.rgb_dim), dtype=np.float32),
                          rng.standard_normal((history, cfg.flow_dim), dtype=np.float32))
    inputs = _random_inputs(cfg, 1, rng)
    for _ in range(stride):
        detector.step(inputs)
    return sum(count_macs(lambda: detector.step(inputs)) for _ in range(stride)) / stride


def real_time_streams(rows: dict[int, float]) -> int:
    """The largest B whose mean step stays within STEP_SECONDS, from a line fitted to the
    measured (B, mean seconds) points (one point: proportional); 0 when not even one."""
    sizes = np.array(sorted(rows), dtype=float)
    means = np.array([rows[b] for b in sorted(rows)])
    if len(sizes) == 1:
        return int(STEP_SECONDS / means[0] * sizes[0])
    slope, intercept = np.polyfit(sizes, means, 1)
    return max(0, int((STEP_SECONDS - intercept) / slope)) if slope > 0 else int(sizes[-1])


def model_rows(args, rng) -> None:
    torch.manual_seed(0)
    model = MALT(PAPER).eval()
    peak, peak_bf16 = matmul_gflops(), matmul_gflops(dtype=torch.bfloat16)
    macs = macs_per_stream_step(model, rng)
    print(f"matmul 2048^3: fp32 {peak:.1f} GFLOP/s, bf16 {peak_bf16:.1f} GFLOP/s; {macs / 1e9:.3f} GMAC "
          f"per stream-step (paper size, mean over a refresh cycle)")
    print(f"{'precision':<10}{'streams':>8}{'step ms median / mean / p99':>30}{'stream-steps/s':>16}"
          f"{'GFLOP/s':>9}{'x fp32 mm':>10}{'real time':>10}{'max |dp|':>10}")
    reference: dict[int, np.ndarray] = {}

    def row(precision: str, streams: int, note: str = "") -> float:
        seconds, probs = serve(model, streams, args.cycles, precision)
        reference.setdefault(streams, probs) if precision == "fp32" else None
        deviation = (f"{np.abs(probs - reference[streams]).max():.4f}" if precision != "fp32" and streams in reference
                     else "ref" if precision == "fp32" else "-")
        mean = seconds.mean()
        gflops = 2 * macs * streams / mean / 1e9
        times = " / ".join(f"{v * 1e3:.1f}" for v in (np.median(seconds), mean, np.percentile(seconds, 99)))
        print(f"{precision:<10}{streams:>8}{times:>30}{streams / mean:>16.1f}{gflops:>9.1f}"
              f"{gflops / peak:>9.2f}x{'yes' if mean <= STEP_SECONDS else 'no':>10}{deviation:>10}{note}",
              flush=True)
        return mean

    for precision in args.precisions:
        means = {streams: row(precision, streams) for streams in args.streams}
        best = real_time_streams(means)
        if best and best not in means:
            row(precision, best, "  <- estimated largest real-time B")
    print(f"real time = mean step of all B streams <= {STEP_SECONDS * 1e3:.0f} ms (4 steps/s each); "
          f"max |dp| = largest difference from fp32's probabilities, same inputs (bound 0.05); "
          f"targets: >= 64 real-time streams, >= 1.4x the fp32 matmul rate")


def end_to_end_rows(args) -> None:
    from vidpipe.extractors.features import FeatureSettings, TwoStreamExtractor
    from vidpipe.pipeline.synthetic import SyntheticSpec, generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSpec(num_videos=max(max(args.e2e_sources), 4), duration_s=args.e2e_seconds + 2,
                             width=320, height=240, fps=30)
        data = generate_dataset(Path(tmp) / "videos", spec, progress=False)
        videos = sorted(data.videos_dir.glob("*.mp4"))
        model = None
        for precision in ("fp32", "auto"):
            settings = FeatureSettings(rgb_backbone="resnet18", flow_backbone="resnet18", flow_method="dis",
                                       random_init=True, precision=precision)
            extractor = TwoStreamExtractor(settings, "cpu")
            if model is None:
                probe = next(extractor.stream(videos[0], batch_size=1))
                cfg = ModelConfig(rgb_dim=len(probe.rgb), flow_dim=len(probe.flow))
                torch.manual_seed(0)
                model = MALT(cfg).eval()
                print(f"\nend to end, 320x240 @ 30 fps -> {settings.fps:g} fps, chunks of {settings.chunk}: "
                      f"decode + DIS ({settings.dis_preset}) per source + random-init resnet18 RGB + flow batched "
                      f"over the sources + the paper-size model on {cfg.rgb_dim} + {cfg.flow_dim}-d features")
                print(f"{'layout: precision':<40}{'sources':>8}{'round ms median / mean / p99':>30}{'model ms':>10}"
                      f"{'CPU ms':>10}"
                      f"{'x real time':>13}{'real time':>10}")
            for count in args.e2e_sources:
                for layout, rounds_of in (("one thread", live_rounds), ("workers", worker_rounds)):
                    detector = MultiStreamDetector(model, "cpu", max_streams=count, precision=precision)
                    label = f"{layout}: CNN {extractor.precision}, model {detector.precision}"
                    cpu = time.process_time()
                    rounds, model_seconds = rounds_of(extractor, detector, videos, count, args.e2e_seconds)
                    cpu = (time.process_time() - cpu) / int(args.e2e_seconds / STEP_SECONDS)
                    times = " / ".join(f"{v * 1e3:.0f}" for v in (np.median(rounds), rounds.mean(),
                                                                   np.percentile(rounds, 99)))
                    print(f"{label:<40}{count:>8}{times:>30}{model_seconds.mean() * 1e3:>10.0f}{cpu * 1e3:>10.0f}"
                          f"{STEP_SECONDS / rounds.mean():>13.2f}"
                          f"{'yes' if rounds.mean() <= STEP_SECONDS else 'no':>10}", flush=True)


def live_rounds(extractor, detector: MultiStreamDetector, videos: list[Path], count: int,
                seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per round and per model step of `count` live sources: each round one chunk
    decoded per source, DIS per source, the CNNs batched over the sources, then one batched
    model step."""
    decoders = [extractor.source(videos[i % len(videos)]).chunks() for i in range(count)]
    rounds_of_chunks = (chunk for chunks in zip(*decoders) for chunk in chunks)
    steps = extractor.stream_chunks(rounds_of_chunks, batch_size=count)
    for i in range(count):
        detector.add_stream(i)
    rounds, model_seconds = [], []
    for tick in range(int(seconds / STEP_SECONDS)):
        start = time.perf_counter()
        inputs = {i: (step.rgb, step.flow) for i, step in zip(range(count), steps)}
        features_done = time.perf_counter()
        detector.step(inputs)
        if tick >= 2:                     # the first rounds open the files
            rounds.append(time.perf_counter() - start)
            model_seconds.append(time.perf_counter() - features_done)
    return np.array(rounds), np.array(model_seconds)


def worker_rounds(extractor, detector: MultiStreamDetector, videos: list[Path], count: int,
                  seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """`live_rounds` in `vidpipe detect`'s layout: a worker thread per source decodes and
    prepares (resize + DIS, OpenCV single-threaded), each round runs the networks once over
    every source (`embed`) and one batched model step."""
    import queue
    import threading

    import cv2

    cv2.setNumThreads(1)
    queues = [queue.Queue(2) for _ in range(count)]
    stop = threading.Event()

    def work(video: Path, out: queue.Queue) -> None:
        for chunk in extractor.source(video).chunks():
            prepared = extractor.prepare(chunk)
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    out.put(prepared, timeout=0.1)
                    break
            if stop.is_set():
                return

    workers = [threading.Thread(target=work, args=(videos[i % len(videos)], queues[i]), daemon=True)
               for i in range(count)]
    for worker in workers:
        worker.start()
    for i in range(count):
        detector.add_stream(i)
    rounds, model_seconds = [], []
    try:
        for tick in range(int(seconds / STEP_SECONDS)):
            start = time.perf_counter()
            rgb, flow = extractor.embed([q.get() for q in queues])
            features_done = time.perf_counter()
            detector.step({i: (rgb[i], flow[i]) for i in range(count)})
            if tick >= 2:                 # the first rounds open the files
                rounds.append(time.perf_counter() - start)
                model_seconds.append(time.perf_counter() - features_done)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        cv2.setNumThreads(-1)             # OpenCV's default again for the next rows
    return np.array(rounds), np.array(model_seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8,32,64", help="batch sizes to time, comma-separated")
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="detector precisions (malt.stream)")
    parser.add_argument("--cycles", type=int, default=2, help="refresh cycles (4 steps) timed per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    parser.add_argument("--e2e-sources", default="1,2,4", help="live source counts, comma-separated")
    parser.add_argument("--e2e-seconds", type=float, default=5.0, help="video seconds timed per source count")
    parser.add_argument("--no-e2e", action="store_true", help="model rows only")
    parser.add_argument("--no-model", action="store_true", help="end-to-end rows only")
    args = parser.parse_args(argv)
    args.streams = [int(b) for b in args.streams.split(",")]
    args.precisions = args.precisions.split(",")
    args.e2e_sources = [int(s) for s in args.e2e_sources.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with measured("bench/streams.py", args.threads):    # sets the threads, then names them
        run(args)


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    if not args.no_model:
        model_rows(args, rng)
    if not args.no_e2e:
        end_to_end_rows(args)


if __name__ == "__main__":
    main()
