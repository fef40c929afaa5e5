"""Training engine: `vidpipe train`.

One process, or several under `torchrun` (same command): DDP with NCCL on GPUs, gloo on CPUs,
each process reading its share of the windows through a DistributedSampler. `train.batch_size`
is the global batch, and the loss is normalised by the valid steps of the global batch, so
any number of processes makes the same update.

What `train` does, in order: resolve the config (read once, where each value came
from known) -> choose the videos of each role (train / validation / test) -> load them and
take the feature sizes from the cache -> build model, optimiser and scaler (fresh, resumed,
or initialised from another checkpoint) -> per epoch: train over the windows with the lr of
`learning_rate` set every iteration, evaluate, save.

A run folder holds config.yaml (the resolved config), metrics.jsonl (one line per epoch),
last.pt, best.pt (by `train.select_metric` on the validation videos: `data.val_split` or
`data.val_fraction`; on the test split only with `train.select_on_test`; without either,
no best.pt), checkpoints/epoch_NNN.pt (the newest `train.keep_checkpoints`), curves.png and,
when tensorboard is installed, its event files (malt.monitor). `remove_run` deletes these
files only: what else the folder holds (e.g. `vidpipe detect`'s detections/) stays.
`resume=True` continues from last.pt exactly: weights, optimizer, AMP scaler, RNG states,
epoch; windows and learning rates are functions of (seed, epoch, iteration), so a resumed
run ends with the weights of an uninterrupted one. A resume may raise `train.epochs` to
extend a finished run; any other change to the config is refused.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from vidpipe.malt.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from vidpipe.malt.config import (Config, LoadedConfig, TrainConfig, describe_selection,
                                 load_run_config, validate_config)
from vidpipe.malt.data import (TrainWindows, VideoData, feature_dims, feature_statistics,
                               held_out_videos, load_videos, resolve_labels)
from vidpipe.malt.evaluate import check_compatible, evaluate_videos
from vidpipe.malt.losses import malt_loss
from vidpipe.malt.model import MALT
from vidpipe.malt.monitor import CURVES, TENSORBOARD_FILES, RunMonitor
from vidpipe.core.atomic import write_text_atomically
from vidpipe.core.config import apply_overrides, to_dict
from vidpipe.core.distributed import ProcessGroupEnv, distributed_env, process_device
from vidpipe.core.errors import VidpipeError
from vidpipe.core.lock import folder_lock
from vidpipe.core.device import loader_workers
from vidpipe.core.log import HEARTBEAT_S, progress_bar
from vidpipe.core.precision import autocast, resolve_precision
from vidpipe.core.settings import differing_keys
from vidpipe.store.cache import FeatureStore
from vidpipe.store.labels import LabelSet

__all__ = ["DATA_KEYS", "RESUME_MAY_CHANGE", "build_optimizer", "iterations_per_epoch",
           "learning_rate", "load_initial_weights", "lr_factor", "remove_run", "train"]

LAST, BEST, CONFIG, METRICS, CHECKPOINTS = "last.pt", "best.pt", "config.yaml", "metrics.jsonl", "checkpoints"
# Model dimensions that come from the data: a config may leave them out.
DATA_KEYS = ("rgb_dim", "flow_dim", "num_classes")
# What `--resume` may change: more epochs extend a run (the cosine schedule stretches with them).
RESUME_MAY_CHANGE = ("train.epochs",)
log = logging.getLogger(__name__)


def remove_run(out: str | Path) -> None:
    """Delete the files `train` writes into `out` (see the module notes), and nothing else."""
    out = Path(out)
    for name in (LAST, BEST, CONFIG, METRICS, CURVES):
        (out / name).unlink(missing_ok=True)
    for events in out.glob(TENSORBOARD_FILES):
        events.unlink()
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


# -- the learning-rate schedule ------------------------------------------------------------

def learning_rate(cfg: TrainConfig, iteration: int, iters_per_epoch: int) -> float:
    """The lr that optimiser step `iteration` (0-based, counted over the whole run) trains at.

    lstr_warmup_cosine: LSTR's WarmupCosineLR (optimizers/lr_scheduler.py) as LSTR's trainer
    steps it, i.e. its curve g one step ahead: lr(i) = g(i + 1), with
    g(n) = lr * w(n) * 0.5 * (1 + cos(pi * n / max_iters)), max_iters = epochs *
    iters_per_epoch, w(n) = f * (1 - n / W) + n / W for n < W = int(warmup_epochs *
    iters_per_epoch), then 1. Why one ahead: LSTR builds the scheduler with last_epoch =
    (START_EPOCH - 1) * iters = 0, PyTorch's constructor steps it once (to 1), and the trainer
    calls scheduler.step() after each optimizer.step(); so the last iteration trains at
    g(max_iters) = 0. As in LSTR, `iters_per_epoch` is the first epoch's number of batches
    (malt.train uses the same count on resume).
    warmup_then_cosine: `lr * lr_factor(it / iters_per_epoch)`.
    """
    if cfg.schedule == "warmup_then_cosine":
        return cfg.lr * lr_factor(iteration / iters_per_epoch, cfg)
    step = iteration + 1                     # the scheduler's last_epoch during this iteration
    max_iters = cfg.epochs * iters_per_epoch
    warmup_iters = int(cfg.warmup_epochs * iters_per_epoch)
    warmup = 1.0
    if step < warmup_iters:
        alpha = step / warmup_iters
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    return cfg.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * step / max_iters))


def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """warmup_then_cosine's multiplier of `lr` after `progress` epochs (fractional).

    Linear from `warmup_factor` to 1 over `warmup_epochs`, then half a cosine down to 0 at
    `epochs`.
    """
    if progress < cfg.warmup_epochs:
        return cfg.warmup_factor + (1.0 - cfg.warmup_factor) * progress / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - cfg.warmup_epochs) / span, 1.0)))


def iterations_per_epoch(windows: TrainWindows, batch_size: int, world: int) -> int:
    """Batches per process in the first epoch (LSTR's len(data_loader) when it builds its
    scheduler): a function of (seed, data), so a resumed run computes the same."""
    windows.set_epoch(0)
    per_process = math.ceil(len(windows) / world)           # DistributedSampler, no drop_last
    return max(math.ceil(per_process / (batch_size // world)), 1)


# -- the run, step by step ------------------------------------------------------------------

def train(config: str | Path | None, cache: str | Path, out: str | Path,
          labels: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
          resume: bool = False, device: str | None = None, progress: bool = True,
          init_from: str | Path | None = None, log_every_s: float = HEARTBEAT_S) -> list[dict]:
    """Train MALT on the train split of `cache`; returns the metrics history (one dict per epoch;
    empty in DDP processes other than rank 0, which alone evaluates and writes the run folder).
    Rank 0 logs one info line per epoch (`logging`); `progress` draws a bar on a terminal,
    or off one logs a progress line every `log_every_s` seconds (malt.monitor).

    `config` may be None with `resume` (the run's own config is used); given with `resume`,
    it must resolve to the run's config. `init_from`: a checkpoint whose weights start the
    run (new optimiser; the classifier re-initialised when the class count differs).
    """
    if resume and init_from is not None:
        raise VidpipeError("--init-from starts a new run from another model's weights; "
                           "--resume continues a run: use one of them")
    out = Path(out)
    store = FeatureStore.open(cache)
    label_set, labels_source = resolve_labels(store, labels)
    env = distributed_env()
    target = _setup_distributed(device, env)
    try:
        # one run per folder (core.lock), held by rank 0, which alone writes it
        with folder_lock(out, "train") if env.rank == 0 else contextlib.nullcontext():
            run = _Run(out, store, label_set, labels_source, env, target, progress, log_every_s)
            cfg, checkpoint, videos = _resolve_config(run, config, overrides, resume)
            state = _build_state(run, cfg, checkpoint, init_from, videos.train)
            return _train_epochs(run, cfg, state, videos)
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What does not change during a run."""
    out: Path
    store: FeatureStore
    label_set: LabelSet
    labels_source: str
    env: ProcessGroupEnv
    device: torch.device
    progress: bool
    log_every_s: float

    @property
    def rank0(self) -> bool:
        return self.env.rank == 0

    def say(self, text: str) -> None:
        """An info line (logging), from rank 0 only."""
        if self.rank0:
            log.info(text)


@dataclass
class _Videos:
    """The videos of each role. Validation chooses best.pt; test is reported (rank 0 only)."""
    train: dict[str, VideoData]
    val: dict[str, VideoData]
    test: dict[str, VideoData]
    selection: str                       # describe_selection of the config


@dataclass
class _State:
    """What an epoch changes (and a checkpoint holds)."""
    model: MALT
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str                 # what runs (core.precision.resolve_precision)
    step: int = 0
    start_epoch: int = 0
    best: float | None = None
    history: list[dict] = field(default_factory=list)


# -- configuration -------------------------------------------------------------------------

def _resolve_config(run: _Run, config, overrides, resume: bool) -> tuple[Config, Checkpoint | None, _Videos]:
    """The run's Config with the data's dimensions, the checkpoint to resume (or None) and
    the videos of each role."""
    if not run.store.video_ids():
        raise VidpipeError(f"{run.store.root}: the cache holds no videos")
    loaded = load_run_config(config, overrides) if config is not None or not resume else None
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(run.out / LAST)
        check_compatible(checkpoint, run.store, run.label_set.class_names, run.out / LAST,
                         run.labels_source)
    elif (run.out / LAST).exists():
        raise VidpipeError(f"{run.out}: already holds a run (last.pt); pass resume=True to continue "
                           f"it or choose another out folder")
    if checkpoint is not None and loaded is None:   # --resume without --config
        own = checkpoint.model_config(str(run.out / LAST))
        loaded = LoadedConfig(apply_overrides(own, overrides), None, set(),
                              {item.partition("=")[0].strip(): item for item in overrides})
    cfg = loaded.config
    validate_config(cfg, loaded.source)
    videos = _load_videos(run, cfg)
    _set_data_dims(run, loaded, videos)
    validate_config(cfg, loaded.source)         # again with the data's dimensions
    if checkpoint is not None:
        _check_resume(run, config, cfg, checkpoint)
    else:
        run.say(f"model selection (best.pt): {videos.selection}")
    return cfg, checkpoint, videos


def _set_data_dims(run: _Run, loaded: LoadedConfig, videos: _Videos) -> None:
    """rgb_dim / flow_dim from the cache, num_classes from the labels; a config that states
    them must agree."""
    rgb_dim, flow_dim = feature_dims(run.store, videos.train)
    data_dims = {"rgb_dim": rgb_dim, "flow_dim": flow_dim,
                 "num_classes": run.label_set.num_classes}
    model = loaded.config.model
    for key, value in data_dims.items():
        if loaded.is_explicit(f"model.{key}") and getattr(model, key) != value:
            raise VidpipeError(f"{loaded.source('model.' + key)}: model.{key}={getattr(model, key)} "
                               f"but the data has {value} ({_describe_dim(key, run)}); "
                               f"leave {key} out to take it from the data")
        setattr(model, key, value)


def _check_resume(run: _Run, config, cfg: Config, checkpoint: Checkpoint) -> None:
    """--resume continues the run's own config; only RESUME_MAY_CHANGE may differ."""
    own = checkpoint.model_config(str(run.out / LAST))
    for key in DATA_KEYS:
        if getattr(own.model, key) != getattr(cfg.model, key):
            raise VidpipeError(f"{run.out / LAST}: model.{key}={getattr(own.model, key)} but the data "
                               f"has {getattr(cfg.model, key)} ({_describe_dim(key, run)})")
    new, old = to_dict(cfg), to_dict(own)
    changed = [f"{section}.{key}" for section in new
               for key in differing_keys(new[section], old.get(section, {}))
               if f"{section}.{key}" not in RESUME_MAY_CHANGE]
    if changed:
        raise VidpipeError(f"{config or '--set'}: differs from the config of the run in {run.out} "
                           f"({', '.join(changed)}); --resume continues with the run's own config "
                           f"(only {', '.join(RESUME_MAY_CHANGE)} may change)")


def _describe_dim(key: str, run: _Run) -> str:
    if key == "num_classes":
        return f"classes incl. background in {run.labels_source}"
    return f"{key.split('_')[0]} feature size in the cache {run.store.root}"


def _load_videos(run: _Run, cfg: Config) -> _Videos:
    """Train, validation and test videos; a validation split or fraction keeps its videos
    out of training. Validation and test are loaded by rank 0 only (it alone evaluates)."""
    labels, source, data = run.label_set, run.labels_source, cfg.data
    train_ids = labels.split(data.train_split)
    if not train_ids:
        raise VidpipeError(f"{source}: no videos in split '{data.train_split}'{_known_splits(labels)}")
    val_ids: list[str] = []
    if data.val_split is not None:
        val_ids = labels.split(data.val_split)
        if not val_ids:
            raise VidpipeError(f"{source}: no videos in split '{data.val_split}' (data.val_split)"
                               f"{_known_splits(labels)}")
    elif data.val_fraction is not None:
        val_ids = held_out_videos(train_ids, data.val_fraction, cfg.train.seed)
        train_ids = [v for v in train_ids if v not in set(val_ids)]
        if not train_ids:
            raise VidpipeError(f"data.val_fraction={data.val_fraction:g} leaves no training video "
                               f"of the {len(val_ids)} in split '{data.train_split}'")
    test_ids = labels.split(data.test_split)
    if run.rank0 and not test_ids:   # a misspelt split would silently give no test figures
        log.warning("%s: no videos in split '%s' (data.test_split)%s: no test figures", source,
                    data.test_split, _known_splits(labels))
    if set(val_ids) & set(test_ids) and not cfg.train.select_on_test:
        raise VidpipeError(f"{source}: validation videos are also in the test split "
                           f"'{data.test_split}'; choose a validation split without test videos")
    if run.rank0 and not labels.splits:
        run.say(f"note: {source} records no split; the test figures are on the training videos")

    def load(ids: list[str]) -> dict[str, VideoData]:
        return load_videos(run.store, labels, ids, source, data.empty_target_rows)

    return _Videos(train=load(train_ids), val=load(val_ids if run.rank0 else []),
                   test=load(test_ids if run.rank0 else []), selection=describe_selection(cfg))


def _known_splits(labels) -> str:
    names = sorted(set(labels.splits.values()))
    return f" (splits there: {', '.join(names)})" if names else ""


# -- processes -----------------------------------------------------------------------------

def _setup_distributed(device: str | None, env: ProcessGroupEnv) -> torch.device:
    """This process's device (core.distributed); starts the process group under torchrun."""
    target = process_device(device, env)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if env.world_size > 1 and not dist.is_initialized():
        # Generous timeout: the other processes wait while rank 0 evaluates.
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo",
                                timeout=timedelta(hours=2))
    return target


def _gather_rng(world: int, device: torch.device) -> dict:
    """Every process's RNG states (dropout), so that a resumed run draws what it would have."""
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return {"torch": [state["torch"]], "cuda": [state["cuda"]]}
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return {"torch": [s["torch"].cpu() for s in states],
            "cuda": [s["cuda"].cpu() if s["cuda"] is not None else None for s in states]}


def _restore_rng(rng: dict | None, rank: int, world: int, device: torch.device) -> None:
    if not rng or len(rng["torch"]) != world:
        return   # another number of processes: dropout draws cannot match anyway
    torch.set_rng_state(rng["torch"][rank].cpu())
    if device.type == "cuda" and rng["cuda"][rank] is not None:
        torch.cuda.set_rng_state(rng["cuda"][rank].cpu(), device)


# -- model, optimiser, starting point -------------------------------------------------------

def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over all parameters, as LSTR's build_optimizer ('adam'); the lr is set per step."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _build_state(run: _Run, cfg: Config, checkpoint: Checkpoint | None,
                 init_from: str | Path | None, train_videos: dict[str, VideoData]) -> _State:
    """Model, optimiser and scaler: resumed from `checkpoint`, or fresh (optionally from
    the weights of `init_from`)."""
    rank, world = run.env.rank, run.env.world_size
    if cfg.train.batch_size % world:
        raise VidpipeError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                           f"{world} processes (it is the global batch)")
    torch.manual_seed(cfg.train.seed)          # the same initial weights in every process
    model = MALT(cfg.model).to(run.device)
    optimizer = build_optimizer(model, cfg.train)
    precision = resolve_precision(cfg.train.precision, run.device)
    scaler = torch.amp.GradScaler(run.device.type, enabled=precision == "fp16")   # fp16 only
    state = _State(model, model, optimizer, scaler, precision)
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model_state)
        optimizer.load_state_dict(checkpoint.optimizer)
        if checkpoint.scaler:
            scaler.load_state_dict(checkpoint.scaler)
        state.step, state.start_epoch, state.best = checkpoint.step, checkpoint.epoch, checkpoint.best
        state.history = list(checkpoint.history)
        _restore_rng(checkpoint.rng, rank, world, run.device)
    else:
        if cfg.train.normalize_features:
            shift, scale = (torch.from_numpy(a) for a in feature_statistics(train_videos))
            for fusion in (model.long_fusion, model.short_fusion):
                fusion.shift.copy_(shift)
                fusion.scale.copy_(scale)
        if init_from is not None:
            run.say(load_initial_weights(model, init_from))
        torch.manual_seed(cfg.train.seed + rank)   # dropout draws differ between processes
    if world > 1:
        state.network = DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return state


def load_initial_weights(model: MALT, path: str | Path) -> str:
    """Start `model` from the weights of checkpoint `path` (`--init-from`): every tensor must
    fit, except the classifier when the class count differs (then it keeps its fresh
    initialisation). The input standardisation (FeatureFusion shift/scale) comes with the
    weights it was trained with. Returns a line saying what was loaded."""
    source = read_checkpoint(path)
    weights = dict(source.model_state)
    own = model.state_dict()
    note = f"{path}: weights loaded (epoch {source.epoch})"
    head = [k for k in own if k.startswith("classifier.")]
    if any(k in weights and weights[k].shape != own[k].shape for k in head):
        for key in head:
            weights.pop(key, None)
        note += (f"; classifier re-initialised for {model.cfg.num_classes} classes "
                 f"(it had {len(source.class_names)})")
    problems = sorted({k for k in own if k not in weights and k not in head}
                      | {k for k in weights if k not in own}
                      | {k for k in weights if k in own and weights[k].shape != own[k].shape})
    if problems:
        raise VidpipeError(f"{path}: --init-from needs the same architecture as the config "
                           f"(only the class count may differ); its weights differ in "
                           f"{', '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}")
    model.load_state_dict(weights, strict=False)
    return note


# -- the loop ------------------------------------------------------------------------------

def _train_epochs(run: _Run, cfg: Config, state: _State, videos: _Videos) -> list[dict]:
    """Every remaining epoch: train, then (rank 0) evaluate and save."""
    if run.rank0:
        run.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(run.out / CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    windows = TrainWindows(videos.train, cfg.model, seed=cfg.train.seed,
                           long_memory_sampler=cfg.data.long_memory_sampler)
    iters_per_epoch = iterations_per_epoch(windows, cfg.train.batch_size, run.env.world_size)
    if state.start_epoch >= cfg.train.epochs:
        run.say(f"{run.out}: the run has done its {cfg.train.epochs} epoch(s), nothing to do "
                f"(extend it with --resume --set train.epochs=N)")
    monitor = RunMonitor(run.out, cfg.train.epochs, state.start_epoch) if run.rank0 else None
    for epoch in range(state.start_epoch, cfg.train.epochs):
        record = _train_epoch(run, cfg, state, windows, epoch, iters_per_epoch)
        record["selection"] = videos.selection
        rng = _gather_rng(run.env.world_size, run.device)
        if monitor is not None:
            _finish_epoch(run, cfg, state, rng, record, videos)
            monitor.epoch_done(record)
        if run.env.world_size > 1:
            dist.barrier()
    if monitor is not None:
        monitor.close(state.history)
    return state.history


def _train_epoch(run: _Run, cfg: Config, state: _State, windows: TrainWindows, epoch: int,
                 iters_per_epoch: int) -> dict:
    """One pass over the epoch's windows; the metrics record of the epoch."""
    rank, world, train_cfg = run.env.rank, run.env.world_size, cfg.train
    windows.set_epoch(epoch)
    if not len(windows):
        raise VidpipeError(f"{run.labels_source}: no training window: the videos of split "
                           f"'{cfg.data.train_split}' are shorter than "
                           f"model.short_memory_steps={cfg.model.short_memory_steps}")
    # A new sampler each epoch: the number of windows changes with the random offsets.
    sampler = DistributedSampler(windows, num_replicas=world, rank=rank, shuffle=True,
                                 seed=train_cfg.seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(windows, batch_size=train_cfg.batch_size // world, sampler=sampler,
                        num_workers=loader_workers(cfg.data.num_workers),
                        pin_memory=run.device.type == "cuda")
    state.network.train()
    started = time.perf_counter()
    sums = {"loss": 0.0, "decoder_loss": 0.0, "aux_loss": 0.0}
    bar = progress_bar(loader, enabled=run.rank0 and run.progress, leave=False,
                       heartbeat_s=run.log_every_s, desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
                       unit="batch")
    for index, batch in enumerate(bar):
        lr = learning_rate(train_cfg, state.step, iters_per_epoch)
        terms = _train_step(run, cfg, state, batch, lr)
        _check_finite(terms.total, batch, windows, epoch, world)
        state.step += 1
        for key, value in (("loss", terms.total), ("decoder_loss", terms.decoder), ("aux_loss", terms.aux)):
            sums[key] += value.item()
        bar.set_postfix(loss=f"{terms.total.item():.4f}", lr=f"{lr:.2e}")
    seconds = time.perf_counter() - started
    return {"epoch": epoch + 1, "step": state.step, "lr": lr, "lr_iteration": state.step - 1,
            **{f"train_{k}": v / max(len(loader), 1) for k, v in sums.items()},
            "train_windows": len(windows), "seconds": round(seconds, 3),
            "windows_per_s": round(len(windows) / max(seconds, 1e-9), 2)}


def _train_step(run: _Run, cfg: Config, state: _State, batch: dict, lr: float):
    """One optimiser step at learning rate `lr`; the loss terms (before the step)."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    num_valid = batch["valid"].sum()
    if run.env.world_size > 1:
        dist.all_reduce(num_valid)
    with autocast(run.device, state.precision):
        output = state.network(batch["rgb_long"], batch["flow_long"], batch["long_valid"],
                               batch["rgb_short"], batch["flow_short"])
    # DDP averages gradients over processes: dividing by (global valid steps / world)
    # makes that average the gradient of the global per-step mean.
    terms = malt_loss(output.logits, output.aux_logits, batch["targets"], batch["valid"],
                      cfg.model.aux_weight, cfg.model.aux_loss,
                      num_valid=num_valid / run.env.world_size,
                      multi_label=cfg.model.multi_label_targets)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(terms.total).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return terms


def _check_finite(loss: torch.Tensor, batch: dict, windows: TrainWindows, epoch: int, world: int) -> None:
    """Stop on a non-finite loss (every process agrees, so none waits for the others): the
    weights are already damaged and every later step would train on NaN."""
    bad = (~torch.isfinite(loss.detach())).float()
    if world > 1:
        dist.all_reduce(bad)
    if bad.item():
        videos = sorted({windows.video_of(int(i)) for i in batch["window"]})
        where = f"{', '.join(videos)}" + (" (or another process's batch)" if world > 1 else "")
        raise VidpipeError(f"epoch {epoch + 1}: the training loss is {loss.item()} (not finite) "
                           f"on a batch of windows from {where}; "
                           f"training stopped (last.pt, if any, is the last finished epoch). Check those "
                           f"videos' features and lower train.lr")


def _finish_epoch(run: _Run, cfg: Config, state: _State, rng: dict, record: dict,
                  videos: _Videos) -> None:
    """Evaluate (validation: selection; test: report), then write last.pt, the epoch
    checkpoint, metrics.jsonl and best.pt."""
    train_cfg, epoch = cfg.train, record["epoch"]
    score = None
    if epoch % train_cfg.eval_every == 0 or epoch == train_cfg.epochs:
        for role, role_videos in (("val", videos.val), ("test", videos.test)):
            if role_videos:
                report = evaluate_videos(state.model, role_videos, run.label_set.class_names)
                record.update({f"{role}_mAP": report["mAP"], f"{role}_mcAP": report["mcAP"]})
        chooser = "val" if videos.val else "test" if train_cfg.select_on_test else None
        score = record.get(f"{chooser}_{train_cfg.select_metric}") if chooser else None
    state.history.append(record)
    improved = score is not None and not math.isnan(score) and (state.best is None or score > state.best)
    if improved:
        state.best = score
    checkpoint = Checkpoint(
        model_state=state.model.state_dict(), config=to_dict(cfg),
        feature_settings=run.store.settings, class_names=run.label_set.class_names, epoch=epoch,
        step=state.step, optimizer=state.optimizer.state_dict(), scaler=state.scaler.state_dict(),
        rng=rng, history=state.history, best=state.best)
    save_checkpoint(checkpoint, run.out / LAST)
    if train_cfg.keep_checkpoints > 0:
        _link(run.out / LAST, run.out / CHECKPOINTS / f"epoch_{epoch:03d}.pt")
        for old in sorted((run.out / CHECKPOINTS).glob("epoch_*.pt"))[:-train_cfg.keep_checkpoints]:
            old.unlink()
    if improved:
        _link(run.out / LAST, run.out / BEST)
    _write_metrics(run.out / METRICS, state.history)


def _link(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source` (a hard link: at paper size a checkpoint is
    0.7 GB). Safe because checkpoints are replaced, never rewritten in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:   # a filesystem without hard links
        shutil.copyfile(source, target)


def _write_metrics(path: Path, history: list[dict]) -> None:
    """The whole history, rewritten atomically: after a resume it matches the checkpoint."""
    write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in history))
