"""MALT configuration: typed dataclasses, loaded from `configs/*.yaml` by pipeline.config.

Defaults are the paper's THUMOS'14 settings; where the paper is silent they follow LSTR
(see docs/malt.md for the source of every default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelConfig:
    rgb_dim: int = 2048
    flow_dim: int = 1024
    num_classes: int = 22            # C+1 outputs incl. background (THUMOS: 20 + bg + ambiguous col)
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


@dataclass
class DataConfig:
    train_split: str = "train"
    test_split: str = "test"
    num_workers: int = 0


@dataclass
class TrainConfig:
    epochs: int = 25
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 5e-5
    warmup_epochs: int = 10
    warmup_factor: float = 0.3
    seed: int = 0
    amp: bool = True                 # only on CUDA
    eval_every: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
