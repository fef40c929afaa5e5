"""What a training run shows while it trains (rank 0), beside metrics.jsonl (the record).

- the console: one line a person reads per epoch (`epoch 3/60  loss 0.4123  lr 1.20e-04
  test mAP 0.712  4.1 s  ETA 3:12`); inside an epoch a bar on a terminal, or off one a
  progress line every `log_every_s` seconds (core.log.progress_bar's heartbeat);
- TensorBoard event files in the run folder when the `tensorboard` package is installed
  (`pip install vidpipe[tensorboard]`; `tensorboard --logdir runs/`): the same scalars,
  per epoch, under timm's names (train/loss, train/lr, val/mAP, test/mAP, ...);
- curves.png in the run folder at the end of the run: loss, learning rate and mAP per epoch.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from vidpipe.core.atomic import atomic_path
from vidpipe.core.log import format_duration

__all__ = ["CURVES", "RunMonitor", "TENSORBOARD_FILES", "draw_curves", "epoch_line", "scalars"]

CURVES = "curves.png"
TENSORBOARD_FILES = "events.out.tfevents.*"   # how TensorBoard names its event files
log = logging.getLogger(__name__)


class RunMonitor:
    """Shows the epochs of one `train` call, from `first_epoch` (0, or a resumed run's) to
    `epochs`; `close` draws the curves of the whole history."""

    def __init__(self, out: Path, epochs: int, first_epoch: int = 0) -> None:
        self.out, self.epochs, self.first_epoch = out, epochs, first_epoch
        self.started = time.monotonic()
        self.writer = _tensorboard_writer(out)

    def epoch_done(self, record: dict) -> None:
        """Log the epoch's line and give its scalars to TensorBoard."""
        done = record["epoch"] - self.first_epoch
        per_epoch = (time.monotonic() - self.started) / max(done, 1)
        log.info(epoch_line(record, self.epochs, eta_s=per_epoch * (self.epochs - record["epoch"])))
        if self.writer is not None:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, record["epoch"])
            self.writer.flush()

    def close(self, history: list[dict]) -> None:
        if self.writer is not None:
            self.writer.close()
        if history:
            draw_curves(history, self.out / CURVES)


def epoch_line(record: dict, epochs: int, eta_s: float) -> str:
    """`epoch 3/60  loss 0.4123  lr 1.20e-04  val mAP 0.702  test mAP 0.712  4.1 s  ETA 3:12`."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.4f}",
             f"lr {record['lr']:.2e}"]
    parts += [f"{role} {metric} {record[f'{role}_{metric}']:.3f}"
              for role in ("val", "test") for metric in ("mAP",) if f"{role}_{metric}" in record]
    parts.append(f"{record['seconds']:.1f} s")
    if record["epoch"] < epochs:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


def scalars(record: dict) -> dict[str, float]:
    """A metrics record's numbers under TensorBoard tags: train_loss -> train/loss,
    test_mAP -> test/mAP, lr -> train/lr (timm's names)."""
    tags = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        role, _, name = key.partition("_")
        if role in ("train", "val", "test") and name:
            tags[f"{role}/{name}"] = float(value)
        elif key in ("lr", "windows_per_s"):
            tags[f"train/{key}"] = float(value)
    return tags


def _tensorboard_writer(out: Path):
    """A SummaryWriter into the run folder, or None when tensorboard is not installed
    (torch's writer needs it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard is not installed: no event files (pip install vidpipe[tensorboard])")
        return None
    return SummaryWriter(log_dir=str(out))


def draw_curves(history: list[dict], path: Path) -> Path:
    """Loss, learning rate and mAP per epoch, side by side, as a PNG (atomic)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    loss_ax, lr_ax, map_ax = fig.subplots(1, 3)
    for key, label in (("train_loss", "loss"), ("train_decoder_loss", "decoder"),
                       ("train_aux_loss", "auxiliary")):
        if any(key in r for r in history):
            loss_ax.plot(epochs, [r.get(key, math.nan) for r in history], label=label)
    lr_ax.plot(epochs, [r["lr"] for r in history], color="tab:orange")
    for role in ("val", "test"):
        points = [(r["epoch"], r[f"{role}_mAP"]) for r in history if f"{role}_mAP" in r]
        if points:
            map_ax.plot(*zip(*points), marker="o", markersize=3, label=f"{role} mAP")
    for ax, title in ((loss_ax, "training loss"), (lr_ax, "learning rate (last iteration)"),
                      (map_ax, "per-frame mAP")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if not map_ax.lines:
        map_ax.text(0.5, 0.5, "no evaluation split", ha="center", va="center",
                    transform=map_ax.transAxes)
    with atomic_path(path, suffix=".png") as temp:
        fig.savefig(temp, format="png")
    return path
