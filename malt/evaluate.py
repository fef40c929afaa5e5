"""Offline evaluation: per-step probabilities of whole videos, then per-frame mAP / mcAP.

Two protocols say which steps are scored and by which window output (`vidpipe eval
--protocol`; S = model.short_memory_steps, windows as `malt.window` defines them):
- `sliding` (default; LSTR's batch inference, what streaming outputs): every step t is scored
  by the last output of the window ending at t (stride 1). `predict_offline` is this
  reference output; the streaming detector and `vidpipe detect` must agree with it.
- `chunks` (the trainer's test phase of LSTR and the MALT authors, behind their published
  numbers; LSTR datasets/perframe_data_layers.py:37-47 with seed 0): non-overlapping windows
  ending at t = S-1, 2S-1, ... while t + 1 < T, each scoring all its S steps (step t - S + 1 + i
  by output i, which sees i + 1 short-memory steps); the steps from the last such window's
  end on are not scored at all (they leave the metrics, targets included). `predict_chunks`.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from vidpipe.malt.checkpoint import Checkpoint, load_model
from vidpipe.malt.config import describe_selection
from vidpipe.malt.data import VideoData, load_videos, resolve_labels
from vidpipe.malt.metrics import detection_report
from vidpipe.malt.model import MALT
from vidpipe.malt.window import window_indices
from vidpipe.core.atomic import write_text_atomically
from vidpipe.core.errors import VidpipeError
from vidpipe.core.precision import autocast, resolve_precision
from vidpipe.core.settings import differing_keys
from vidpipe.store.cache import FeatureStore

__all__ = ["PROTOCOLS", "check_compatible", "evaluate", "evaluate_videos", "predict_chunks",
           "predict_offline", "write_json_report"]
log = logging.getLogger(__name__)


PROTOCOLS = ("sliding", "chunks")


class _Windows:
    """Forward passes over windows of one video, named by the step they end at. Features
    stay on the model's device and windows are gathered there by index: copying every (L, D)
    window through the host would dominate the time. A zero row is appended so that padding
    slots (index -1) read zeros, as `malt.window.gather_window` gives them."""

    def __init__(self, model: MALT, rgb: np.ndarray, flow: np.ndarray):
        self.model, self.cfg = model, model.cfg
        self.device = next(model.parameters()).device
        self.rgb = _with_zero_row(rgb, self.device)                      # (T+1, Dr)
        self.flow = _with_zero_row(flow, self.device)                    # (T+1, Df)

    def probabilities(self, ends: list[int]) -> np.ndarray:
        """(B, S', C+1) class probabilities of every output of the windows ending at `ends`
        (all of one short-memory length S')."""
        indices = [window_indices(t, self.cfg) for t in ends]
        long_idx = torch.as_tensor(np.stack([i[0] for i in indices]), device=self.device)   # (B, L)
        short_idx = torch.as_tensor(np.stack([i[1] for i in indices]), device=self.device)  # (B, S')
        logits = self.model(self.rgb[long_idx], self.flow[long_idx], long_idx >= 0,
                            self.rgb[short_idx], self.flow[short_idx]).logits            # (B, S', C+1|C+2)
        return self.model.probabilities(logits).cpu().numpy()                            # (B, S', C+1)


@torch.no_grad()
def predict_offline(model: MALT, rgb: np.ndarray, flow: np.ndarray,
                    batch_size: int = 64) -> np.ndarray:
    """Probabilities (T, C+1) of one video with features rgb (T, Dr), flow (T, Df): the
    `sliding` protocol (module notes).

    The first window (steps 0..S-1) gives the outputs of all its steps: the decoder is causal
    and no long memory exists yet, so its output at step t equals that of the window ending
    at t. Every later step is the last output of its own window (sliding, stride 1).
    """
    num_steps = len(rgb)
    first = min(num_steps, model.cfg.short_memory_steps) - 1          # -1: no step at all
    head = [[first]] if num_steps else []     # a shorter window than the others: a pass of its own
    outputs = _window_outputs(model, rgb, flow, head + _batches(range(first + 1, num_steps), batch_size))
    # Built from the computed rows only: a step no forward pass covered cannot pass unseen.
    probs = _rows(model, [o[0] for o in outputs[:1]] + [o[:, -1] for o in outputs[1:]])
    assert len(probs) == num_steps, (len(probs), num_steps)
    return probs


@torch.no_grad()
def predict_chunks(model: MALT, rgb: np.ndarray, flow: np.ndarray,
                   batch_size: int = 64) -> np.ndarray:
    """Probabilities (N, C+1) of the first N = S * ((T - 1) // S) steps of one video: the
    `chunks` protocol (module notes); the steps after them are not scored."""
    length = model.cfg.short_memory_steps
    ends = range(length - 1, len(rgb) - 1, length)     # LSTR: work_end in range(S, T, S)
    outputs = _window_outputs(model, rgb, flow, _batches(ends, batch_size))
    return _rows(model, [o.reshape(-1, model.cfg.num_classes) for o in outputs])


def _batches(ends: range, batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(ends[i:i + batch_size]) for i in range(0, len(ends), batch_size)]


def _window_outputs(model: MALT, rgb: np.ndarray, flow: np.ndarray,
                    batches: list[list[int]]) -> list[np.ndarray]:
    """Every output (B, S', C+1) of the windows ending at each batch of steps (one forward
    pass a batch, all its windows of one length S'), the model in eval mode (its mode
    restored after)."""
    if not batches:
        return []
    was_training = model.training
    model.eval()
    windows = _Windows(model, rgb, flow)
    outputs = [windows.probabilities(batch) for batch in batches]
    model.train(was_training)
    return outputs


def _rows(model: MALT, parts: list[np.ndarray]) -> np.ndarray:
    """The rows (N, C+1) of `parts` as float32; (0, C+1) without any."""
    if not parts:
        return np.zeros((0, model.cfg.num_classes), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def _with_zero_row(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array, np.float32))
    return torch.cat([tensor, tensor.new_zeros(1, tensor.shape[1])]).to(device)


def evaluate_videos(model: MALT, videos: dict[str, VideoData], class_names: list[str],
                    batch_size: int = 64, protocol: str = "sliding") -> dict:
    """Per-frame metrics over the scored steps of `videos` pooled in their order (LSTR's
    metrics); `protocol` says which steps are scored and how (module notes)."""
    if not videos:
        raise ValueError("no videos to evaluate")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    predict = predict_offline if protocol == "sliding" else predict_chunks
    scores = [predict(model, v.rgb, v.flow, batch_size) for v in videos.values()]
    scored = [len(s) for s in scores]                 # chunks: a prefix of each video
    report = detection_report(np.concatenate(scores),
                              np.concatenate([v.targets[:n] for v, n in zip(videos.values(), scored)]),
                              class_names,
                              ambiguous=np.concatenate([v.ambiguous[:n] for v, n in
                                                        zip(videos.values(), scored)]))
    report.update(num_videos=len(videos), protocol=protocol)
    return report


def check_compatible(checkpoint: Checkpoint, store: FeatureStore, class_names: list[str],
                     checkpoint_path: str | Path, labels_source: str,
                     map_by_name: bool = False) -> list[int] | None:
    """A model only fits features made as its training features were, and the same classes.

    Returns None when the labels' classes are the checkpoint's, in its order. The same names
    in another order are, with `map_by_name`, the labels' columns in the checkpoint's order
    (each name once on both sides: unambiguous); otherwise a one-line error naming the fix."""
    if checkpoint.feature_settings != store.settings:
        keys = differing_keys(checkpoint.feature_settings, store.settings)
        raise VidpipeError(f"{checkpoint_path}: trained on features made with other settings than "
                           f"the cache {store.root} (differs in: {', '.join(keys)})")
    if checkpoint.class_names == class_names:
        return None
    fix = (f"build the labels in its order with `vidpipe labels ... --classes "
           f"{','.join(checkpoint.class_names[1:])}`")
    unique = len(set(class_names)) == len(class_names) == len(set(checkpoint.class_names))
    if unique and set(class_names) == set(checkpoint.class_names):
        if map_by_name:
            log.info("%s: the classes of %s in another order: mapped by name", labels_source,
                     checkpoint_path)
            return [class_names.index(name) for name in checkpoint.class_names]
        raise VidpipeError(f"{labels_source}: the classes of {checkpoint_path} in another order; {fix}")
    differences = [f"{where}: {', '.join(names)}" for where, names in (
        (f"only in {checkpoint_path}", [n for n in checkpoint.class_names if n not in class_names]),
        (f"only in {labels_source}", [n for n in class_names if n not in checkpoint.class_names]))
        if names] or ["a name appears twice"]
    raise VidpipeError(f"{labels_source}: classes differ from those of {checkpoint_path} "
                       f"({'; '.join(differences)}); {fix}")


def evaluate(checkpoint: str | Path, cache: str | Path, labels: str | Path | None = None,
             split: str | None = None, out: str | Path | None = None,
             device: str | None = None, batch_size: int = 64, protocol: str = "sliding",
             precision: str = "fp32") -> dict:
    """`vidpipe eval`: metrics of a checkpoint on a split of a cache (default: its test split),
    the model run in `precision` (fp32 | bf16 | fp16 | auto: autocast, core.precision).

    Returns {"mAP", "mcAP", "num_frames" (scored, ambiguous ones left out), "num_videos",
    "protocol", "precision" (what ran), "per_class", "checkpoint", "cache", "split", "epoch",
    "selection" (which videos chose the run's best.pt), "selected_on_test"} and writes it as
    JSON to `out` when given.
    """
    if protocol not in PROTOCOLS:
        raise VidpipeError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if batch_size < 1:
        raise VidpipeError(f"--batch-size must be >= 1 (windows per forward pass), got {batch_size}")
    model, ckpt = load_model(checkpoint, device)
    store = FeatureStore.open(cache)
    label_set, labels_source = resolve_labels(store, labels)
    order = check_compatible(ckpt, store, label_set.class_names, checkpoint, labels_source,
                             map_by_name=True)
    config = ckpt.model_config(str(checkpoint))
    split = split or config.data.test_split
    video_ids = label_set.split(split)
    if not video_ids:
        known = sorted(set(label_set.splits.values()))
        raise VidpipeError(f"{labels_source}: no videos in split '{split}'"
                           + (f" (splits there: {', '.join(known)})" if known else ""))
    videos = load_videos(store, label_set, video_ids, labels_source)
    for video in videos.values() if order else ():
        video.targets = video.targets[:, order]         # (T, C+1) in the checkpoint's order
    first = next(iter(videos.values()))
    if (first.rgb.shape[1], first.flow.shape[1]) != (model.cfg.rgb_dim, model.cfg.flow_dim):
        raise VidpipeError(f"{cache}: features are {first.rgb.shape[1]}+{first.flow.shape[1]}-dim, "
                           f"{checkpoint} expects {model.cfg.rgb_dim}+{model.cfg.flow_dim}")
    ran = resolve_precision(precision, next(model.parameters()).device)
    with autocast(next(model.parameters()).device, ran):
        report = evaluate_videos(model, videos, ckpt.class_names, batch_size, protocol)
    report.update(checkpoint=str(checkpoint), cache=str(cache), split=split, epoch=ckpt.epoch, precision=ran,
                  selection=describe_selection(config), selected_on_test=config.train.select_on_test)
    if out is not None:   # NaN (no class with a positive step) is not JSON: written as null.
        write_json_report(report, out)
    return report


def write_json_report(report: dict, path: str | Path) -> Path:
    """Atomic JSON of a report; a metric without data (NaN, +-inf) written as null: JSON has
    no such numbers."""
    return write_text_atomically(path, json.dumps(_finite_or_none(report), indent=2))


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
