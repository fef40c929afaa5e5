"""MALT configuration: typed dataclasses, loaded from `configs/*.yaml` by core.config.

Defaults are the paper's THUMOS'14 settings; where the paper is silent they follow LSTR
(see docs/malt.md for the source of every default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Union

from vidpipe.core.config import apply_overrides, from_dict, read_config_file
from vidpipe.core.errors import VidpipeError

__all__ = ["BEFORE_SWITCHES", "Config", "DataConfig", "LoadedConfig", "ModelConfig",
           "TrainConfig", "describe_selection", "load_run_config", "saved_config",
           "validate_config", "validate_model_config"]

# Where a value came from, for error messages: one name, or a function of the dotted key.
Source = Union[str, Callable[[str], str]]


@dataclass
class ModelConfig:
    """MALT's architecture. Every paper ablation is one of these keys (docs/malt.md).

    branch_queries[n] / branch_layers[n] describe encoder branch n+1 (the first num_branches
    entries are used): branch 1 compresses the long memory into branch_queries[0] latent
    queries with branch_layers[0] layers; branch n >= 2 compresses it into branch_queries[n-1]
    queries with one layer, then the previous branch's output attends to those tokens for
    branch_layers[n-1] layers. So every encoder output f_n has branch_queries[0] tokens.
    """
    rgb_dim: int = 2048
    flow_dim: int = 1024
    num_classes: int = 21            # C+1 outputs incl. background (THUMOS: 20 + bg; ambiguous is a mask)
    d_model: int = 1024
    num_heads: int = 16
    ffn_dim: int = 1024
    dropout: float = 0.2
    long_memory_steps: int = 2048    # 512 s at 4 steps/s
    long_memory_stride: int = 4      # every 4th step -> 512 tokens (LSTR)
    short_memory_steps: int = 32     # 8 s, every step
    sparse_k: Optional[int] = 370    # top-k of the long-memory scores; null = vanilla attention
    num_branches: int = 2            # N, 1..4
    branch_queries: list[int] = field(default_factory=lambda: [32, 16, 16, 16])
    branch_layers: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    decoder: Literal["recurrent", "cascaded"] = "recurrent"
    decoder_layers: int = 1
    aux_loss: bool = True
    aux_weight: float = 0.4
    # The authors' code / LSTR (the paper setup) vs our earlier choices; docs/malt.md.
    pos_encoding: Literal["sinusoidal", "learned"] = "sinusoidal"   # LSTR's PositionalEncoding
    query_init: Literal["embedding", "trunc_normal"] = "embedding"  # nn.Embedding: N(0, 1)
    # Frames with several actions: LSTR's multi-hot rows (each action weighs 1) or rows
    # normalised to sum 1 (each of k actions weighs 1/k).
    multi_label_targets: Literal["lstr", "normalised"] = "lstr"
    # The authors' code as it runs (configs/*_authors.yaml; docs/malt.md lists the sources):
    # an extra classifier output for the ambiguous column (no loss; it enters the test
    # softmax, whose other columns are the probabilities), and their attention init
    # (xavier_uniform_ over the stacked q/k/v projection, zero biases) instead of torch's.
    classifier_includes_ambiguous: bool = False
    init: Literal["torch", "lstr"] = "torch"


def _where(source: Source, key: str) -> str:
    return source(key) if callable(source) else source


def validate_model_config(cfg: ModelConfig, source: Source = "config") -> None:
    """Raise a one-line VidpipeError naming `source` and the first invalid `model.*` key."""

    def fail(key: str, problem: str) -> None:
        raise VidpipeError(f"{_where(source, 'model.' + key)}: 'model.{key}' {problem}")

    for key in ("rgb_dim", "flow_dim", "d_model", "num_heads", "ffn_dim", "long_memory_steps",
                "long_memory_stride", "short_memory_steps", "decoder_layers"):
        if getattr(cfg, key) < 1:
            fail(key, f"must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_classes < 2:
        fail("num_classes", f"must be >= 2 (background + at least one action), got {cfg.num_classes}")
    if cfg.d_model % cfg.num_heads:
        fail("num_heads", f"must divide d_model={cfg.d_model}, got {cfg.num_heads}")
    if cfg.pos_encoding == "sinusoidal" and cfg.d_model % 2:
        fail("d_model", f"must be even with sinusoidal positional encodings, got {cfg.d_model}")
    if not 0.0 <= cfg.dropout < 1.0:
        fail("dropout", f"must be in [0, 1), got {cfg.dropout}")
    if cfg.long_memory_steps % cfg.long_memory_stride:
        fail("long_memory_stride", f"must divide long_memory_steps={cfg.long_memory_steps}, "
                                   f"got {cfg.long_memory_stride}")
    if cfg.sparse_k is not None and cfg.sparse_k < 1:
        fail("sparse_k", f"must be >= 1 or null (vanilla attention), got {cfg.sparse_k}")
    if not 1 <= cfg.num_branches <= 4:
        fail("num_branches", f"must be in 1..4, got {cfg.num_branches}")
    for key in ("branch_queries", "branch_layers"):
        values = getattr(cfg, key)
        if len(values) < cfg.num_branches:
            fail(key, f"needs one entry per branch (num_branches={cfg.num_branches}), got {values}")
        if any(v < 1 for v in values[:cfg.num_branches]):
            fail(key, f"entries must be >= 1, got {values}")
    if not (math.isfinite(cfg.aux_weight) and cfg.aux_weight >= 0):
        fail("aux_weight", f"must be a finite number >= 0, got {cfg.aux_weight}")
    if cfg.aux_loss and cfg.branch_queries[0] != cfg.short_memory_steps:
        fail("branch_queries", f"[0]={cfg.branch_queries[0]} must equal short_memory_steps="
                               f"{cfg.short_memory_steps} when aux_loss is on (encoder token i "
                               f"is supervised with short-memory step i's label)")


@dataclass
class DataConfig:
    train_split: str = "train"
    test_split: str = "test"
    # Model selection (best.pt) on videos the test split never sees: a split of the labels,
    # or this fraction of the training videos held out by a rule seeded with train.seed.
    # Neither: training keeps last.pt only.
    val_split: Optional[str] = None
    val_fraction: Optional[float] = None
    num_workers: int = 0
    # Training windows' long memory: `grid` (malt.window, the inference rule) or `segment`
    # (LSTR's segment_sampler: linspace over the 2048 steps before the short memory).
    long_memory_sampler: Literal["grid", "segment"] = "grid"
    # Target rows with no class and not ambiguous (LSTR targets can have them): `background`,
    # or `zero_loss` (the row stays all-zero: no loss, still counted in the mean, as LSTR's MCE).
    empty_target_rows: Literal["background", "zero_loss"] = "background"


@dataclass
class TrainConfig:
    """Optimisation (malt/train.py): Adam, its lr set every iteration by `schedule`
    (malt.train.learning_rate):
    - lstr_warmup_cosine (LSTR's WarmupCosineLR, the authors' schedule): lr * w(n) * cosine(n),
      the cosine over the whole run, w rising linearly from warmup_factor to 1 over
      warmup_epochs; iteration i trains at n = i + 1 as in LSTR's trainer (the last at 0);
    - warmup_then_cosine (our earlier schedule): linear from warmup_factor to 1 over
      warmup_epochs, then half a cosine from 1 down to 0 over the remaining epochs.
    """
    epochs: int = 25
    batch_size: int = 16             # global: split over the DDP processes
    lr: float = 5e-5
    weight_decay: float = 5e-5
    schedule: Literal["lstr_warmup_cosine", "warmup_then_cosine"] = "lstr_warmup_cosine"
    warmup_epochs: float = 10
    warmup_factor: float = 0.3
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"   # autocast (core.precision); fp16
                                     # with a GradScaler (CUDA); LSTR and the authors train in fp32
    eval_every: int = 1              # epochs between evaluations (validation and test splits)
    select_metric: Literal["mAP", "mcAP"] = "mAP"   # which result makes best.pt (TVSeries: mcAP)
    # Choose best.pt on the test split (inflates any number reported on it): only on request.
    select_on_test: bool = False
    keep_checkpoints: int = 2        # newest per-epoch checkpoints kept in checkpoints/
    # Standardise the input features with statistics of the training split (stored in the
    # model). Off for the paper (LSTR feeds raw features); on for weak features, e.g. the
    # demo's random-init backbones whose RGB and flow values differ 20x in scale.
    normalize_features: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def validate_config(cfg: Config, source: Source = "config") -> None:
    """One-line error naming the first invalid value of any section (and where it came from)."""
    validate_model_config(cfg.model, source)
    train, data = cfg.train, cfg.data

    def finite(value: float) -> bool:
        return math.isfinite(value)

    checks = [
        ("train.epochs", train.epochs >= 1, ">= 1"),
        ("train.batch_size", train.batch_size >= 1, ">= 1"),
        ("train.lr", finite(train.lr) and train.lr > 0, "a finite number > 0"),
        ("train.weight_decay", finite(train.weight_decay) and train.weight_decay >= 0,
         "a finite number >= 0"),
        ("train.warmup_epochs", finite(train.warmup_epochs) and train.warmup_epochs >= 0,
         "a finite number >= 0"),
        ("train.warmup_factor", 0 <= train.warmup_factor <= 1, "in [0, 1]"),
        ("train.seed", train.seed >= 0, ">= 0"),
        ("train.eval_every", train.eval_every >= 1, ">= 1"),
        ("train.keep_checkpoints", train.keep_checkpoints >= 0, ">= 0"),
        ("data.num_workers", data.num_workers >= 0, ">= 0"),
        ("data.val_fraction", data.val_fraction is None or 0 < data.val_fraction < 1,
         "in (0, 1) or null"),
    ]
    for key, ok, rule in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise VidpipeError(f"{_where(source, key)}: '{key}' must be {rule}, got {value}")
    chosen = [key for key, on in (("data.val_split", data.val_split is not None),
                                  ("data.val_fraction", data.val_fraction is not None),
                                  ("train.select_on_test", train.select_on_test)) if on]
    if len(chosen) > 1:
        raise VidpipeError(f"{_where(source, chosen[1])}: {' and '.join(chosen)} both choose best.pt; "
                           f"set one of them")


@dataclass
class LoadedConfig:
    """A Config read once from its YAML file and `--set` overrides, knowing where each value
    came from: error messages name the `--set` that gave a bad value, else the file."""
    config: Config
    path: Optional[str]                 # the YAML file; None: the built-in defaults
    file_keys: set[str]                 # dotted keys the file sets
    overrides: dict[str, str]           # dotted key -> the `--set` item that set it

    def source(self, key: str) -> str:
        if key in self.overrides:
            return f"--set {self.overrides[key]}"
        return self.path or "defaults"

    def is_explicit(self, key: str) -> bool:
        """The user wrote this key (in the file or as an override)."""
        return key in self.file_keys or key in self.overrides


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> LoadedConfig:
    """Read the YAML file once, build the Config, apply the overrides (type errors name the
    file or `--set`); ranges are checked by `validate_config` once data dimensions are in."""
    data = read_config_file(path) if path is not None else {}
    config = from_dict(Config, data, str(path) if path is not None else "defaults")
    config = apply_overrides(config, overrides)
    items = {item.partition("=")[0].strip(): item for item in overrides}
    return LoadedConfig(config, str(path) if path is not None else None, _dotted_keys(data), items)


def _dotted_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.add(prefix + str(key))
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def describe_selection(cfg: Config) -> str:
    """Which videos chose best.pt under `cfg`: printed by train and eval, kept in metrics.jsonl."""
    if cfg.data.val_split is not None:
        return f"validation split '{cfg.data.val_split}'"
    if cfg.data.val_fraction is not None:
        return (f"validation videos held out of split '{cfg.data.train_split}' "
                f"(data.val_fraction={cfg.data.val_fraction:g}, seed {cfg.train.seed})")
    if cfg.train.select_on_test:
        return (f"TEST split '{cfg.data.test_split}' (train.select_on_test: figures on that "
                f"split are optimistic)")
    return "none (no validation split: last.pt is the last epoch's model, no best.pt)"


# Configs saved before the paper-setup switches existed (checkpoints, run folders) trained
# with what are now the non-default choices: reading them must rebuild that same model.
BEFORE_SWITCHES = {"model": {"pos_encoding": "learned", "query_init": "trunc_normal",
                             "multi_label_targets": "normalised"},
                   "train": {"schedule": "warmup_then_cosine"}}


def saved_config(data: dict, source: str = "checkpoint") -> Config:
    """The Config a checkpoint or run folder recorded; keys it predates take the values it
    was trained with (BEFORE_SWITCHES), not today's defaults."""
    data = {section: dict(values) if isinstance(values, dict) else values
            for section, values in (data or {}).items()}
    train = data.get("train")
    if isinstance(train, dict) and "amp" in train:   # saved before train.precision replaced it
        train.setdefault("precision", "fp16" if train.pop("amp") else "fp32")
    model = data.get("model")
    if isinstance(model, dict) and "pos_encoding" not in model:
        for section, values in BEFORE_SWITCHES.items():
            if isinstance(data.get(section), dict):
                for key, value in values.items():
                    data[section].setdefault(key, value)
    return from_dict(Config, data, source)
