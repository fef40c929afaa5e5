"""Training engine: `vidpipe train`.

One process, or several under `torchrun` (same command): DDP with NCCL on GPUs, gloo on CPUs,
each process reading its share of the windows through a DistributedSampler. `train.batch_size`
is the global batch, and the loss is normalised by the valid steps of the global batch, so
any number of processes makes the same update.

A run folder holds config.yaml (the resolved config), metrics.jsonl (one line per epoch),
last.pt, best.pt (by `train.select_metric` on the test split) and checkpoints/epoch_NNN.pt
(the newest `train.keep_checkpoints`). `resume=True` continues from last.pt exactly: weights,
optimizer, AMP scaler, RNG states, epoch; windows and learning rates are functions of
(seed, epoch), so a resumed run ends with the weights of an uninterrupted one. A resume may
raise `train.epochs` to extend a finished run; any other change to the config is refused.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from vidpipe.malt.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from vidpipe.malt.config import Config, TrainConfig, validate_model_config
from vidpipe.malt.data import TrainWindows, feature_statistics, load_videos, resolve_labels
from vidpipe.malt.evaluate import check_compatible, evaluate_videos
from vidpipe.malt.losses import malt_loss
from vidpipe.malt.model import MALT
from vidpipe.core.atomic import write_text_atomically
from vidpipe.core.config import apply_overrides, load_config, resolve_config_path, to_dict
from vidpipe.core.device import resolve_device
from vidpipe.core.errors import VidpipeError
from vidpipe.store.cache import FeatureStore

LAST, BEST, CONFIG, METRICS, CHECKPOINTS = "last.pt", "best.pt", "config.yaml", "metrics.jsonl", "checkpoints"
# Model dimensions that come from the data: a config may leave them out.
DATA_KEYS = ("rgb_dim", "flow_dim", "num_classes")
# What `--resume` may change: more epochs extend a run (the cosine schedule stretches with them).
RESUME_MAY_CHANGE = ("train.epochs",)


def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """Multiplier of `lr` after `progress` epochs (fractional): LSTR's warmup-cosine.

    Linear from `warmup_factor` to 1 over `warmup_epochs`, then half a cosine down to 0 at
    `epochs`.
    """
    if progress < cfg.warmup_epochs:
        return cfg.warmup_factor + (1.0 - cfg.warmup_factor) * progress / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - cfg.warmup_epochs) / span, 1.0)))


def train(config: str | Path | None, cache: str | Path, out: str | Path,
          labels: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
          resume: bool = False, device: str | None = None, progress: bool = True) -> list[dict]:
    """Train MALT on the train split of `cache`; returns the metrics history (one dict per epoch;
    empty in DDP processes other than rank 0, which alone evaluates and writes the run folder).

    `config` may be None with `resume` (the run's own config is used); given with `resume`,
    it must resolve to the run's config.
    """
    out = Path(out)
    store = FeatureStore.open(cache)
    label_set, labels_source = resolve_labels(store, labels)
    rank, world, device = _setup_distributed(device)
    try:
        cfg, checkpoint = _resolve_config(config, overrides, out, store, label_set, labels_source, resume)
        return _run(cfg, checkpoint, out, store, label_set, labels_source, rank, world, device, progress)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# -- configuration -------------------------------------------------------------------------

def _resolve_config(config, overrides, out: Path, store, label_set, labels_source, resume):
    """The run's Config with the data's dimensions, and the checkpoint to resume (or None)."""
    if not store.video_ids():
        raise VidpipeError(f"{store.root}: the cache holds no videos")
    sample = store.read(store.video_ids()[0])
    data_dims = {"rgb_dim": sample.rgb.shape[1], "flow_dim": sample.flow.shape[1],
                 "num_classes": label_set.num_classes}
    requested = None
    if config is not None or not resume:
        requested = load_config(Config, config, overrides)
        source = str(config) if config is not None else "defaults"
        explicit = _explicit_model_keys(config, overrides)
        for key, value in data_dims.items():
            if key in explicit and getattr(requested.model, key) != value:
                raise VidpipeError(f"{source}: model.{key}={getattr(requested.model, key)} but the "
                                   f"data has {value} ({_describe_dim(key, store, labels_source)}); "
                                   f"leave {key} out to take it from the data")
            setattr(requested.model, key, value)
        validate_model_config(requested.model, source)
        _validate_train_config(requested.train, source)

    if not resume:
        if (out / LAST).exists():
            raise VidpipeError(f"{out}: already holds a run (last.pt); pass --resume to continue it "
                               f"or choose another --out")
        return requested, None

    checkpoint = read_checkpoint(out / LAST)
    cfg = checkpoint.model_config(str(out / LAST))
    for key, value in data_dims.items():
        if getattr(cfg.model, key) != value:
            raise VidpipeError(f"{out / LAST}: model.{key}={getattr(cfg.model, key)} but the data has "
                               f"{value} ({_describe_dim(key, store, labels_source)})")
    check_compatible(checkpoint, store, label_set.class_names, out / LAST, labels_source)
    if requested is None:      # --resume without --config: overrides apply to the run's config
        requested = apply_overrides(cfg, overrides)
    changed = [key for key in _differing_keys(to_dict(requested), to_dict(cfg))
               if key not in RESUME_MAY_CHANGE]
    if changed:
        raise VidpipeError(f"{config or '--set'}: differs from the config of the run in {out} "
                           f"({', '.join(changed)}); --resume continues with the run's own config "
                           f"(only {', '.join(RESUME_MAY_CHANGE)} may change)")
    return requested, checkpoint


def _validate_train_config(cfg: TrainConfig, source: str) -> None:
    """One-line error naming the first invalid `train.*` value."""
    checks = [("epochs", cfg.epochs >= 1, ">= 1"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
              ("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("warmup_epochs", cfg.warmup_epochs >= 0, ">= 0"),
              ("warmup_factor", 0 <= cfg.warmup_factor <= 1, "in [0, 1]"),
              ("eval_every", cfg.eval_every >= 1, ">= 1"),
              ("keep_checkpoints", cfg.keep_checkpoints >= 0, ">= 0")]
    for key, ok, rule in checks:
        if not ok:
            raise VidpipeError(f"{source}: 'train.{key}' must be {rule}, got {getattr(cfg, key)}")


def _explicit_model_keys(config, overrides) -> set[str]:
    """Data-dimension keys the user wrote (in the YAML file or as --set model.KEY=...)."""
    data = yaml.safe_load(resolve_config_path(config).read_text()) if config is not None else None
    model = data.get("model") if isinstance(data, dict) else None
    keys = set(model) if isinstance(model, dict) else set()
    keys |= {item.partition("=")[0].strip().removeprefix("model.") for item in overrides
             if item.strip().startswith("model.")}
    return keys & set(DATA_KEYS)


def _describe_dim(key: str, store, labels_source: str) -> str:
    if key == "num_classes":
        return f"classes incl. background in {labels_source}"
    return f"{key.split('_')[0]} feature size in the cache {store.root}"


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differing_keys(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


# -- processes -----------------------------------------------------------------------------

def _setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; starts the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":
        if target.index is None:   # None or 'cuda': this process's GPU
            target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        # Generous timeout: the other processes wait while rank 0 evaluates the test split.
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo",
                                timeout=timedelta(hours=2))
    return rank, world, target


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


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


# -- the loop ------------------------------------------------------------------------------

def _run(cfg: Config, checkpoint: Checkpoint | None, out: Path, store: FeatureStore, label_set,
         labels_source: str, rank: int, world: int, device: torch.device, progress: bool) -> list[dict]:
    train_cfg = cfg.train
    if train_cfg.batch_size % world:
        raise VidpipeError(f"train.batch_size={train_cfg.batch_size} must be divisible by the "
                           f"{world} processes (it is the global batch)")
    train_ids = label_set.split(cfg.data.train_split)
    if not train_ids:
        raise VidpipeError(f"{labels_source}: no videos in split '{cfg.data.train_split}'")
    train_videos = load_videos(store, label_set, train_ids, labels_source)
    test_ids = label_set.split(cfg.data.test_split) if rank == 0 else []
    test_videos = load_videos(store, label_set, test_ids, labels_source)
    if rank == 0 and progress and not label_set.splits:
        tqdm.write(f"note: {labels_source} records no split; evaluating on the training videos")

    torch.manual_seed(train_cfg.seed)          # the same initial weights in every process
    model = MALT(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    amp = train_cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    history: list[dict] = []
    step, start_epoch, best = 0, 0, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model_state)
        optimizer.load_state_dict(checkpoint.optimizer)
        if checkpoint.scaler:
            scaler.load_state_dict(checkpoint.scaler)
        step, start_epoch, best = checkpoint.step, checkpoint.epoch, checkpoint.best
        history = list(checkpoint.history)
        _restore_rng(checkpoint.rng, rank, world, device)
    else:
        if train_cfg.normalize_features:
            shift, scale = (torch.from_numpy(a) for a in feature_statistics(train_videos))
            for fusion in (model.long_fusion, model.short_fusion):
                fusion.shift.copy_(shift)
                fusion.scale.copy_(scale)
        torch.manual_seed(train_cfg.seed + rank)   # dropout draws differ between processes
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    windows = TrainWindows(train_videos, cfg.model, seed=train_cfg.seed)

    if start_epoch >= train_cfg.epochs and rank == 0 and progress:
        tqdm.write(f"{out}: the run has done its {train_cfg.epochs} epoch(s), nothing to do "
                   f"(extend it with --resume --set train.epochs=N)")
    for epoch in range(start_epoch, train_cfg.epochs):
        windows.set_epoch(epoch)
        if not len(windows):
            raise VidpipeError(f"{labels_source}: no training window: the videos of split "
                               f"'{cfg.data.train_split}' are shorter than "
                               f"model.short_memory_steps={cfg.model.short_memory_steps}")
        # A new sampler each epoch: the number of windows changes with the random offsets.
        sampler = DistributedSampler(windows, num_replicas=world, rank=rank, shuffle=True,
                                     seed=train_cfg.seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(windows, batch_size=train_cfg.batch_size // world, sampler=sampler,
                            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
        network.train()
        started = time.perf_counter()
        sums = {"loss": 0.0, "decoder_loss": 0.0, "aux_loss": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{train_cfg.epochs}", unit="batch",
                   disable=rank != 0 or not progress, leave=False)
        for index, batch in enumerate(bar):
            lr = train_cfg.lr * lr_factor(epoch + index / len(loader), train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            num_valid = batch["valid"].sum()
            if world > 1:
                dist.all_reduce(num_valid)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                output = network(batch["rgb_long"], batch["flow_long"], batch["long_valid"],
                                 batch["rgb_short"], batch["flow_short"])
            # DDP averages gradients over processes: dividing by (global valid steps / world)
            # makes that average the gradient of the global per-step mean.
            terms = malt_loss(output.logits, output.aux_logits, batch["targets"], batch["valid"],
                              cfg.model.aux_weight, cfg.model.aux_loss, num_valid=num_valid / world)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            sums["loss"] += terms.total.item()
            sums["decoder_loss"] += terms.decoder.item()
            sums["aux_loss"] += terms.aux.item()
            bar.set_postfix(loss=f"{terms.total.item():.4f}", lr=f"{lr:.2e}")
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": step, "lr": lr,
                  **{f"train_{k}": v / max(len(loader), 1) for k, v in sums.items()},
                  "train_windows": len(windows), "seconds": round(seconds, 3),
                  "windows_per_s": round(len(windows) / max(seconds, 1e-9), 2)}
        rng = _gather_rng(world, device)
        if rank == 0:
            best = _finish_epoch(cfg, model, optimizer, scaler, rng, record, history, best, step,
                                 out, store, label_set, test_videos, progress)
        _barrier(world)
    return history


def _finish_epoch(cfg: Config, model: MALT, optimizer, scaler, rng, record: dict, history: list,
                  best: float | None, step: int, out: Path, store, label_set, test_videos,
                  progress: bool) -> float | None:
    """Evaluate, then write last.pt, the epoch checkpoint, metrics.jsonl and best.pt."""
    train_cfg, epoch = cfg.train, record["epoch"]
    score = None
    if test_videos and (epoch % train_cfg.eval_every == 0 or epoch == train_cfg.epochs):
        report = evaluate_videos(model, test_videos, label_set.class_names)
        record.update(test_mAP=report["mAP"], test_mcAP=report["mcAP"])
        score = report[train_cfg.select_metric]
    elif not test_videos:
        score = -record["train_loss"]      # nothing to evaluate on: the lowest training loss
    history.append(record)
    improved = score is not None and not math.isnan(score) and (best is None or score > best)
    if improved:
        best = score
    checkpoint = Checkpoint(
        model_state=model.state_dict(), config=to_dict(cfg), feature_settings=store.settings,
        class_names=label_set.class_names, epoch=epoch, step=step,
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng,
        history=history, best=best)
    save_checkpoint(checkpoint, out / LAST)
    if train_cfg.keep_checkpoints > 0:
        _link(out / LAST, out / CHECKPOINTS / f"epoch_{epoch:03d}.pt")
        for old in sorted((out / CHECKPOINTS).glob("epoch_*.pt"))[:-train_cfg.keep_checkpoints]:
            old.unlink()
    if improved:
        _link(out / LAST, out / BEST)
    _write_metrics(out / METRICS, history)
    if progress:
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
        tqdm.write(json.dumps(shown))
    return best


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
