"""MALT: Multi-scale Action Learning Transformer for online action detection (arXiv 2405.20892).

One window = a long-term memory M_L (L tokens sampled from the distant past, padding at the
oldest slots) and a short-term memory M_S (the last S steps). The hierarchical encoder
compresses M_L into coarse-to-fine features f_1..f_N; the recurrent decoder fuses them into
the short memory stage by stage; one classifier labels every short-memory step (and the
encoder tokens, for the auxiliary loss). Which steps form a window: `malt.window`.
Where the paper is silent the structure follows the authors' code and LSTR (docs/malt.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from vidpipe.malt.attention import SparseCrossAttention
from vidpipe.malt.config import ModelConfig, validate_model_config
from vidpipe.malt.window import num_long_tokens

__all__ = ["Decoder", "DecoderStage", "EncoderBranch", "EncoderPass", "FeatureFusion",
           "FeedForward", "HierarchicalEncoder", "MALT", "MALTOutput", "TransformerLayer",
           "TransformerStack", "causal_mask", "layer_kwargs", "lstr_attention_init",
           "sinusoidal_encoding"]


class MALTOutput(NamedTuple):
    logits: torch.Tensor              # (B, S, C+1) one per short-memory step (+1: MALT.probabilities)
    aux_logits: list[torch.Tensor]    # N x (B, Q, C+1) on encoder outputs f_1..f_N


class FeatureFusion(nn.Module):
    """Two-stream input head: concat(rgb, flow) -> Linear -> ReLU (LSTR's feature head).

    The input is first standardised with `shift` / `scale` (buffers, saved with the weights):
    the identity unless the trainer sets them from the training features
    (`train.normalize_features`, malt/train.py), so every user of the model sees the same input.
    """

    def __init__(self, rgb_dim: int, flow_dim: int, d_model: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("shift", torch.zeros(rgb_dim + flow_dim, **factory))
        self.register_buffer("scale", torch.ones(rgb_dim + flow_dim, **factory))
        self.proj = nn.Linear(rgb_dim + flow_dim, d_model, **factory)
        self.act = nn.ReLU()

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        # rgb (B, T, Dr), flow (B, T, Df) -> (B, T, D)
        x = (torch.cat([rgb, flow], dim=-1) - self.shift) / self.scale
        return self.act(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(ffn_dim, d_model, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))              # (B, T, D)


class TransformerLayer(nn.Module):
    """Post-norm transformer decoder layer: self-attention, cross-attention, FFN.

    Each sub-block is dropout -> residual -> LayerNorm, as in LSTR and the authors' code; both
    attentions are SparseCrossAttention (top-k only bites where there are more than k keys).
    The three sub-blocks are separate methods taking projected tensors so that the streaming
    detector can reuse cached projections through this same code.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 top_k: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = SparseCrossAttention(dim, num_heads, top_k, **factory)
        self.cross_attn = SparseCrossAttention(dim, num_heads, top_k, **factory)
        self.ffn = FeedForward(dim, ffn_dim, dropout, **factory)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, **factory) for _ in range(3))
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_allowed: Optional[torch.Tensor] = None,
                self_allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x (B, Q, D), memory (B, K, D), masks (B|1, Q, K|Q) -> (B, Q, D)
        sa, ca = self.self_attn, self.cross_attn
        x = self.self_block(x, sa.q_proj(x), sa.k_proj(x), sa.v_proj(x), self_allowed)
        x = self.cross_block(x, ca.k_proj(memory), ca.v_proj(memory), memory_allowed)
        return self.ffn_block(x)

    def self_block(self, x, q, k, v, allowed=None):
        # x (B, Q, D) residual; q (B, Q, D), k, v (B, K, D) projected by self_attn -> (B, Q, D)
        return self.norm1(x + self.drop1(self.self_attn.attend(q, k, v, allowed)))

    def cross_block(self, x, k, v, allowed=None, q=None):
        # x (B, Q, D); k, v (B, K, D) projected by cross_attn; q given when it is a constant
        q = self.cross_attn.q_proj(x) if q is None else q
        return self.norm2(x + self.drop2(self.cross_attn.attend(q, k, v, allowed)))

    def ffn_block(self, x):
        # (B, Q, D) -> (B, Q, D)
        return self.norm3(x + self.drop3(self.ffn(x)))


class TransformerStack(nn.Module):
    """`num_layers` TransformerLayers over one memory, then a final LayerNorm; the other
    keyword arguments are TransformerLayer's."""

    def __init__(self, dim: int, num_layers: int, device=None, dtype=None, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, device=device, dtype=dtype, **layer_kwargs)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim, device=device, dtype=dtype)

    def forward(self, x, memory, memory_allowed=None, self_allowed=None):
        # x (B, Q, D), memory (B, K, D) -> (B, Q, D)
        for layer in self.layers:
            x = layer(x, memory, memory_allowed, self_allowed)
        return self.norm(x)


@dataclass(frozen=True)
class EncoderPass:
    """One TransformerStack run of the hierarchical encoder: `query` tokens attend to `memory`.

    The encoder's structure is the list of its passes (`HierarchicalEncoder.passes`), walked
    by `HierarchicalEncoder.forward` and by the streaming detector (malt/stream.py) alike.
    Inputs name earlier passes by their index in that list; query None: the `latent`
    queries (the branch's own learned ones); memory None: the long memory (masked by its
    padding). `feature`: the pass's output is the branch's f_n.
    """
    stack: TransformerStack
    query: Optional[int]
    memory: Optional[int]
    latent: Optional[nn.Parameter] = None
    feature: bool = False


class EncoderBranch(nn.Module):
    """One branch of the hierarchical encoder.

    `compress`: learned latent queries (the branch's own) read the long memory with sparse
    cross-attention. Branch 1 stops there (f_1). A later branch then lets the previous
    branch's output f_{n-1} attend to its compressed tokens (`refine`), so f_n refines f_{n-1}
    (the authors' code, N = 2, generalised here to any n). `layer_kwargs`: TransformerLayer's.
    """

    def __init__(self, dim: int, num_queries: int, num_layers: int, first: bool,
                 device=None, dtype=None, **layer_kwargs):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.queries = nn.Parameter(torch.zeros(num_queries, dim, **factory))          # (Qn, D)
        self.compress = TransformerStack(dim, num_layers if first else 1, **factory, **layer_kwargs)
        self.refine = None if first else TransformerStack(dim, num_layers, **factory, **layer_kwargs)

    def passes(self, first: int, previous: Optional[int]) -> list[EncoderPass]:
        """This branch's passes, numbered from `first`; `previous`: the pass giving f_{n-1}."""
        compress = EncoderPass(self.compress, query=None, memory=None, latent=self.queries,
                               feature=self.refine is None)
        if self.refine is None:
            return [compress]                                    # f_1: the compressed tokens
        return [compress, EncoderPass(self.refine, query=previous, memory=first, feature=True)]


class HierarchicalEncoder(nn.Module):
    """N branches of increasing depth; outputs f_1..f_N go from coarse to fine."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.branches = nn.ModuleList(
            EncoderBranch(cfg.d_model, cfg.branch_queries[n], cfg.branch_layers[n], first=n == 0,
                          **layer_kwargs(cfg)) for n in range(cfg.num_branches))

    def passes(self) -> list[EncoderPass]:
        """The encoder's structure: every branch's passes, in the order they run."""
        passes: list[EncoderPass] = []
        for branch in self.branches:
            previous = max((i for i, p in enumerate(passes) if p.feature), default=None)
            passes += branch.passes(len(passes), previous)
        return passes

    def forward(self, long_memory: torch.Tensor, long_valid: torch.Tensor) -> list[torch.Tensor]:
        # long_memory (B, L, D), long_valid (B, L) -> N x (B, Q1, D)
        long_allowed = long_valid[:, None, :]                                    # (B, 1, L)
        passes, outputs = self.passes(), []
        for p in passes:
            query = p.latent.expand(len(long_memory), -1, -1) if p.query is None else outputs[p.query]
            memory, allowed = (long_memory, long_allowed) if p.memory is None else (outputs[p.memory], None)
            outputs.append(p.stack(query, memory, allowed))                      # (B, Qn, D)
        return [out for p, out in zip(passes, outputs) if p.feature]


@dataclass(frozen=True)
class DecoderStage:
    """Decoder stage n: its stack lets the previous stage's output (stage 1: the short memory)
    attend to the encoder output f_n, `features[feature]`, causally over the short steps."""
    stack: TransformerStack
    feature: int


class Decoder(nn.Module):
    """Fuses f_1..f_N into the short memory, stage n attending to f_n; recurrent or cascaded.

    recurrent (MALT): ONE stack of `decoder_layers` layers reused for all N stages; stage 1's
    query is the short memory, stage n's query is stage n-1's output. cascaded (the paper's
    comparison): each stage has its own stack. Self-attention is causal over short steps.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        num_stacks = 1 if cfg.decoder == "recurrent" else cfg.num_branches
        self.stacks = nn.ModuleList(TransformerStack(cfg.d_model, cfg.decoder_layers, **layer_kwargs(cfg))
                                    for _ in range(num_stacks))
        self.num_stages = cfg.num_branches

    def stage_stacks(self) -> list[TransformerStack]:
        """The stack used by each of the N stages (the same object N times when recurrent)."""
        if len(self.stacks) == 1:
            return [self.stacks[0]] * self.num_stages
        return list(self.stacks)

    def stages(self) -> list[DecoderStage]:
        """The decoder's structure, walked by `forward` and by the streaming detector alike."""
        return [DecoderStage(stack, n) for n, stack in enumerate(self.stage_stacks())]

    def forward(self, short_memory: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        # short_memory (B, S, D), features N x (B, Q1, D) -> (B, S, D)
        causal = causal_mask(short_memory.shape[1], short_memory.device)         # (1, S, S)
        x = short_memory
        for stage in self.stages():
            x = stage.stack(x, features[stage.feature], None, causal)
        return x


def layer_kwargs(cfg: ModelConfig) -> dict:
    """TransformerLayer's keyword arguments from the model's config."""
    return {"num_heads": cfg.num_heads, "ffn_dim": cfg.ffn_dim, "dropout": cfg.dropout, "top_k": cfg.sparse_k}


def sinusoidal_encoding(num_positions: int, d_model: int) -> torch.Tensor:
    """(num_positions, d_model) fixed encodings of LSTR's PositionalEncoding (the authors'
    too): sin on even dimensions, cos on odd ones, wavelengths from 2 pi to 10000 * 2 pi."""
    position = torch.arange(num_positions, dtype=torch.float).unsqueeze(1)             # (P, 1)
    frequency = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    table = torch.zeros(num_positions, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, length, length) bool: step i may attend to steps 0..i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None]


@torch.no_grad()
def lstr_attention_init(attention: SparseCrossAttention) -> None:
    """The authors' attention init (MultiheadSparseAttention.__init__,
    models/transformer/multihead_sparse_attention.py:90-106 at f910dd9): xavier_uniform_ over
    the stacked (3D, D) q/k/v projection, i.e. bound sqrt(6 / 4D), zero q/k/v and output
    biases; the output weight keeps nn.Linear's default (their weights_init redraws it alike)."""
    weight = attention.q_proj.weight
    stacked = torch.empty(3 * weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    nn.init.xavier_uniform_(stacked)
    for proj, rows in zip((attention.q_proj, attention.k_proj, attention.v_proj), stacked.chunk(3)):
        proj.weight.copy_(rows)
        nn.init.zeros_(proj.bias)
    nn.init.zeros_(attention.out_proj.bias)


class MALT(nn.Module):
    """The full model; forward on one batch of windows (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        d = cfg.d_model
        self.num_long_tokens = num_long_tokens(cfg)
        # Separate input heads for the two memories (LSTR, authors' code).
        self.long_fusion = FeatureFusion(cfg.rgb_dim, cfg.flow_dim, d)
        self.short_fusion = FeatureFusion(cfg.rgb_dim, cfg.flow_dim, d)
        # Positional encodings, one per long-memory slot (oldest first) and per short-memory
        # position, added to the fused features. sinusoidal (LSTR, the authors): a fixed
        # buffer, the short memory's positions following the long memory's (L .. L+S-1);
        # learned: parameters, init N(0, 0.02) truncated.
        num_short = cfg.short_memory_steps
        if cfg.pos_encoding == "sinusoidal":
            table = sinusoidal_encoding(self.num_long_tokens + num_short, d)
            self.register_buffer("long_pos", table[:self.num_long_tokens].clone(), persistent=False)
            self.register_buffer("short_pos", table[self.num_long_tokens:].clone(), persistent=False)
        else:
            self.long_pos = nn.Parameter(torch.zeros(self.num_long_tokens, d))   # (L, D)
            self.short_pos = nn.Parameter(torch.zeros(num_short, d))             # (S, D)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.encoder = HierarchicalEncoder(cfg)
        self.decoder = Decoder(cfg)
        # Shared by decoder and encoder outputs; C+1 outputs, or C+2 with the authors' extra
        # ambiguous output last (`classifier_includes_ambiguous`, see `probabilities`).
        self.classifier = nn.Linear(d, cfg.num_classes + int(cfg.classifier_includes_ambiguous))
        # init `torch`: every Linear layer keeps PyTorch's default, as the authors' Linear
        # layers outside attention (their weights_init redraws the same kaiming_uniform_);
        # timm's N(0, 0.02) leaves small models (d_model 32..64) unable to use the long memory
        # at all (tests/test_learning.py stays at chance with it). init `lstr`: attention as
        # the authors' (`lstr_attention_init`). Latent queries: N(0, 1) as the authors'
        # nn.Embedding, or N(0, 0.02) truncated.
        if cfg.init == "lstr":
            for module in self.modules():
                if isinstance(module, SparseCrossAttention):
                    lstr_attention_init(module)
        if cfg.pos_encoding == "learned":
            for p in (self.long_pos, self.short_pos):
                nn.init.trunc_normal_(p, std=0.02)
        for branch in self.encoder.branches:
            if cfg.query_init == "embedding":
                nn.init.normal_(branch.queries)
            else:
                nn.init.trunc_normal_(branch.queries, std=0.02)

    def forward(self, rgb_long: torch.Tensor, flow_long: torch.Tensor, long_valid: torch.Tensor,
                rgb_short: torch.Tensor, flow_short: torch.Tensor) -> MALTOutput:
        # rgb_long (B, L, Dr), flow_long (B, L, Df), long_valid (B, L) bool,
        # rgb_short (B, S, Dr), flow_short (B, S, Df) with 1 <= S <= short_memory_steps
        if rgb_long.shape[1] != self.num_long_tokens or rgb_short.shape[1] > self.cfg.short_memory_steps:
            raise ValueError(f"window of {rgb_long.shape[1]} long / {rgb_short.shape[1]} short tokens; "
                             f"model expects {self.num_long_tokens} / <= {self.cfg.short_memory_steps}")
        long_memory = self.pos_drop(self.long_fusion(rgb_long, flow_long) + self.long_pos)   # (B, L, D)
        features = self.encoder(long_memory, long_valid)                                     # N x (B, Q1, D)
        num_short = rgb_short.shape[1]
        short_memory = self.pos_drop(self.short_fusion(rgb_short, flow_short)
                                     + self.short_pos[:num_short])                           # (B, S, D)
        decoded = self.decoder(short_memory, features)                                       # (B, S, D)
        return MALTOutput(self.classifier(decoded), [self.classifier(f) for f in features])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (..., C+1) from classifier logits (..., C+1 or C+2): the softmax
        over all outputs, the authors' ambiguous output (when there is one) then dropped, as
        LSTR's test phase scores (det_score.softmax, perframe_det_trainer.py:63) and its THUMOS
        post-processing drops column 21 (evaluation/postprocessing.py:31-34)."""
        return logits.float().softmax(dim=-1)[..., :self.cfg.num_classes]
