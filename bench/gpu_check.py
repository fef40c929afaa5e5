"""Every CUDA path once, for the first GPU machine: one table, under 5 minutes.

    .venv/bin/python bench/gpu_check.py [--only raft,cnn,train,detect,torchrun] [--seconds 4] [--list]

Checks (random weights, synthetic video; nothing downloaded):
- raft: RAFT flow + resnet18 CNNs extracting a generated 320x240 clip on CUDA, precision auto
  (bf16 on Ampere and later, else fp16);
- cnn: every recipe's RGB and flow network in fp16 and bf16 autocast against fp32 on the GPU
  (relative error per feature vector, bound 2% as on the CPU: tests/test_cnn_precision.py);
- train: one epoch of the demo model with train.precision=fp16 (autocast + GradScaler);
- detect: `detect` of the clip on CUDA, from the file and --live, precision auto;
- torchrun: a 1-process `torchrun ... vidpipe train` on CUDA (NCCL process group).
Without a GPU it refuses in one line (exit 2) and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from conditions import measured   # bench/conditions.py: machine and load, before and after

CHECKS = ("raft", "cnn", "train", "detect", "torchrun")
BOUND = 0.02          # relative error per feature vector (tests/test_cnn_precision.py)
TRAIN_OVERRIDES = ["train.epochs=1", "train.precision=fp16"]
DEVICE = "cuda"       # every check runs here (a dry run of the plumbing may set "cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CHECKS), help="checks to run, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the generated clip")
    parser.add_argument("--list", action="store_true", help="name the checks and exit")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in CHECKS]
    if unknown or not args.only:
        parser.error(f"--only: unknown check '{(unknown or [''])[0]}' (choose from {', '.join(CHECKS)})")
    if args.seconds <= 0:
        parser.error(f"--seconds must be > 0 (got {args.seconds:g})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(" ".join(CHECKS))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing run",
              file=sys.stderr)
        return 2
    with measured("bench/gpu_check.py"):
        rows = run_checks(args)
    print(f"\n| check | status | seconds | what ran |\n|---|---|---|---|")
    for name, status, seconds, note in rows:
        print(f"| {name} | {status} | {seconds:.1f} | {note} |")
    return 1 if any(status != "ok" for _, status, _, _ in rows) else 0


def run_checks(args: argparse.Namespace) -> list[tuple[str, str, float, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Workspace(Path(tmp), args.seconds)
        for name in args.only:
            started = time.perf_counter()
            try:
                status, note = "ok", CHECK_FUNCTIONS[name](work)
            except Exception as exc:   # every failure becomes a row: the table is the report
                status, note = "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.append((name, status, time.perf_counter() - started, note))
            print(f"  {name}: {status} ({rows[-1][2]:.1f} s) {note}", file=sys.stderr, flush=True)
    return rows


class Workspace:
    """The clip, cache and checkpoint the checks share (each made when first needed)."""

    def __init__(self, root: Path, seconds: float):
        self.root, self.seconds = root, seconds
        self._clip = self._cache = None

    def clip(self) -> Path:
        if self._clip is None:
            from vidpipe.pipeline.synthetic import SyntheticSpec, generate_dataset

            spec = SyntheticSpec(num_videos=2, duration_s=self.seconds, width=320, height=240, fps=30)
            data = generate_dataset(self.root / "videos", spec, progress=False)
            self._clip = data.videos_dir / data.test[0]
        return self._clip

    def settings(self):
        from vidpipe.extractors.features import FeatureSettings

        return FeatureSettings(rgb_backbone="resnet18", flow_backbone="resnet18", flow_method="raft",
                               random_init=True, precision="auto")

    def training_cache(self) -> Path:
        """Random features under the RAFT extractor's record, labelled: a checkpoint trained
        on it detects on video with that extractor."""
        if self._cache is None:
            from vidpipe.extractors.features import TwoStreamExtractor
            from vidpipe.store.cache import FeatureStore
            from vidpipe.store.labels import LABELS_FILE, LabelSet, VideoLabels

            record = TwoStreamExtractor(self.settings(), DEVICE).settings_record()
            store = FeatureStore.open_or_create(self.root / "cache", record)
            rng, labels, steps = np.random.default_rng(0), {}, 200
            for video_id in ("v0", "v1", "v2"):
                store.write(video_id, rng.standard_normal((steps, record["rgb_dim"]), dtype=np.float32),
                            rng.standard_normal((steps, record["flow_dim"]), dtype=np.float32),
                            np.arange(steps) * record["step_seconds"])
                labels[video_id] = VideoLabels(np.eye(3, dtype=np.float32)[rng.integers(0, 3, steps)],
                                               np.zeros(steps, bool))
            LabelSet(["background", "a", "b"], labels, {"v0": "train", "v1": "train", "v2": "test"}).save(
                store.root / LABELS_FILE)
            self._cache = store.root
        return self._cache



def check_raft(work: Workspace) -> str:
    from vidpipe.extractors.features import TwoStreamExtractor

    extractor = TwoStreamExtractor(work.settings(), DEVICE)
    started = time.perf_counter()
    rgb, flow, _ = extractor.extract(work.clip())
    seconds = time.perf_counter() - started
    assert np.isfinite(rgb).all() and np.isfinite(flow).all(), "non-finite features"
    return (f"{len(rgb)} steps, {len(rgb) / seconds:.1f} steps/s, {extractor.settings.raft_model} "
            f"{extractor.precision}")


def check_cnn(work: Workspace) -> str:
    import torch

    from vidpipe.core.precision import autocast
    from vidpipe.extractors.tsn import RECIPES, TSNFlowStream, TSNRGBStream

    cuda, rng = torch.device(DEVICE), np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (4, 240, 320, 3), dtype=np.uint8))
    images = torch.from_numpy(rng.integers(0, 256, (4, 5, 2, 256, 256), dtype=np.uint8))
    errors = {}
    for recipe in RECIPES.values():
        rgb = TSNRGBStream(recipe, weights_file=None, random_init=True, seed=0).to(cuda)
        flow = TSNFlowStream(recipe, 5, jpeg=False, weights_file=None, random_init=True, seed=1).to(cuda)
        for what, run in ((f"{recipe.name} rgb", lambda: rgb(frames)), (f"{recipe.name} flow", lambda: flow.embed(images))):
            with torch.inference_mode():
                reference = run().float()
                for precision in ("fp16", "bf16"):
                    with autocast(cuda, precision):
                        ours = run().float()
                    errors[f"{what} {precision}"] = ((ours - reference).norm(dim=1) / reference.norm(dim=1)).max().item()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= BOUND, f"{worst}: relative error {errors[worst]:.4f} > {BOUND}"
    return f"{len(errors)} network x precision runs; worst {worst} {errors[worst]:.4f} (bound {BOUND})"


def check_train(work: Workspace) -> str:
    from vidpipe.malt.train import train
    from vidpipe.pipeline.demo import DEMO_CONFIG

    history = train(DEMO_CONFIG, work.training_cache(), work.root / "run", overrides=TRAIN_OVERRIDES,
                    device=DEVICE, progress=False)
    assert np.isfinite(history[-1]["train_loss"]), "non-finite loss"
    return f"demo config, 1 epoch, {' '.join(TRAIN_OVERRIDES[1:])}: loss {history[-1]['train_loss']:.3f}"


def check_detect(work: Workspace) -> str:
    from vidpipe.pipeline.detect import detect

    checkpoint = work.root / "run" / "last.pt"
    if not checkpoint.is_file():
        check_train(work)
    notes = []
    for live in (False, True):
        [detection] = detect([work.clip()], checkpoint, out=work.root / f"detect_{live}", device=DEVICE,
                             precision="auto", live=live, picture=False)
        metadata = detection.timeline.metadata
        notes.append(f"{'live' if live else 'file'} {metadata['timings']['total_s']:.1f} s "
                     f"({metadata['precision']['runs']})")
    return ", ".join(notes) + f" for {work.seconds:g} s of video"


def check_torchrun(work: Workspace) -> str:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    vidpipe = shutil.which("vidpipe", path=str(Path(sys.executable).parent)) or "vidpipe"
    from vidpipe.pipeline.demo import DEMO_CONFIG

    overrides = [part for key in TRAIN_OVERRIDES for part in ("--set", key)]
    command = [torchrun, "--standalone", "--nproc-per-node", "1", "--no-python", vidpipe, "train",
               "--config", str(DEMO_CONFIG), "--cache", str(work.training_cache()),
               "--out", str(work.root / "run_ddp"), "--device", DEVICE, *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ})
    assert result.returncode == 0, (result.stderr.strip().splitlines() or ["no output"])[-1]
    return "torchrun --nproc-per-node 1 vidpipe train --device cuda (NCCL), 1 epoch fp16"


CHECK_FUNCTIONS = {"raft": check_raft, "cnn": check_cnn, "train": check_train, "detect": check_detect,
                   "torchrun": check_torchrun}


if __name__ == "__main__":
    sys.exit(main())
