"""MALT configuration: typed dataclasses, loaded from `configs/*.yaml` by core.config.

Defaults are the paper's THUMOS'14 settings; where the paper is silent they follow LSTR
(see docs/malt.md for the source of every default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vidpipe.core.errors import VidpipeError


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


def validate_model_config(cfg: ModelConfig, source: str = "config") -> None:
    """Raise a one-line VidpipeError naming `source` and the first invalid `model.*` key."""

    def fail(key: str, problem: str) -> None:
        raise VidpipeError(f"{source}: 'model.{key}' {problem}")

    for key in ("rgb_dim", "flow_dim", "d_model", "num_heads", "ffn_dim", "long_memory_steps",
                "long_memory_stride", "short_memory_steps", "decoder_layers"):
        if getattr(cfg, key) < 1:
            fail(key, f"must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_classes < 2:
        fail("num_classes", f"must be >= 2 (background + at least one action), got {cfg.num_classes}")
    if cfg.d_model % cfg.num_heads:
        fail("num_heads", f"must divide d_model={cfg.d_model}, got {cfg.num_heads}")
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
    if cfg.aux_weight < 0:
        fail("aux_weight", f"must be >= 0, got {cfg.aux_weight}")
    if cfg.aux_loss and cfg.branch_queries[0] != cfg.short_memory_steps:
        fail("branch_queries", f"[0]={cfg.branch_queries[0]} must equal short_memory_steps="
                               f"{cfg.short_memory_steps} when aux_loss is on (encoder token i "
                               f"is supervised with short-memory step i's label)")


@dataclass
class DataConfig:
    train_split: str = "train"
    test_split: str = "test"
    num_workers: int = 0


@dataclass
class TrainConfig:
    """Optimisation (malt/train.py). Adam; lr = lr * warmup-cosine factor, set every step:
    linear from warmup_factor to 1 over warmup_epochs, then half a cosine down to 0 (LSTR)."""
    epochs: int = 25
    batch_size: int = 16             # global: split over the DDP processes
    lr: float = 5e-5
    weight_decay: float = 5e-5
    warmup_epochs: int = 10
    warmup_factor: float = 0.3
    seed: int = 0
    amp: bool = True                 # only on CUDA
    eval_every: int = 1              # epochs between evaluations on the test split
    select_metric: Literal["mAP", "mcAP"] = "mAP"   # which result makes best.pt (TVSeries: mcAP)
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
