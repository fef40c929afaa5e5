"""Multi-head attention with MALT's top-k sparsification.

MALT (arXiv 2405.20892, Sec. 3) scores every key and keeps, per head and per query, only the
k highest scores; the others get zero probability after the softmax. The authors' code keeps
every key whose score ties the k-th largest, so a query may keep more than k keys on ties;
we do the same. `top_k=None` is vanilla attention, and a `top_k` at or above the number of
keys changes nothing, so one layer type serves every attention in the model.

Masking: `allowed` (True = the query may look at that key) expresses both padding (memory
slots not yet filled) and causality. Masked keys never receive weight, also when fewer than
k keys are valid. A query with NO valid key (the long memory at the start of a stream is
empty) attends to nothing: its output is defined as exactly zero, never NaN, so the
residual connection around the attention passes the query through unchanged.

The projections are exposed (`q_proj`, `k_proj`, `v_proj`) and `attend` takes projected
tensors, so the streaming detector can feed cached key/value projections through the very
same code as the offline forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["SparseCrossAttention"]


class SparseCrossAttention(nn.Module):
    """Multi-head attention of `query` tokens over `memory` tokens, keeping each query's top-k keys."""

    def __init__(self, dim: int, num_heads: int, top_k: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.top_k = top_k
        self.q_proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.k_proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.v_proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.out_proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, query: torch.Tensor, memory: torch.Tensor,
                allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        # query (B, Q, D), memory (B, K, D), allowed (B|1, Q|1, K) bool -> (B, Q, D)
        return self.attend(self.q_proj(query), self.k_proj(memory), self.v_proj(memory), allowed)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention on already projected q (B, Q, D), k, v (B, K, D) -> (B, Q, D)."""
        batch, num_queries, dim = q.shape
        weights = self.attention_weights(q, k, allowed)                  # (B, H, Q, K)
        # (weights from fp32 scores, e.g. the streaming detector's exact q/k, meet v's dtype)
        context = weights.to(v.dtype) @ self._split_heads(v)             # (B, H, Q, Dh)
        context = context.transpose(1, 2).reshape(batch, num_queries, dim)
        out = self.out_proj(context)                                     # (B, Q, D)
        if allowed is not None:
            # A query with no valid key attends to nothing: exactly zero output.
            has_key = allowed.any(dim=-1, keepdim=True)                  # (B|1, Q|1, 1)
            out = out * has_key.to(out.dtype)
        return out

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor,
                          allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Softmax weights (B, H, Q, K) after padding/causal masking and top-k selection."""
        scores = (self._split_heads(q) * self.scale) @ self._split_heads(k).transpose(-2, -1)
        # A finite floor instead of -inf: an all-masked row stays NaN-free (forward and
        # backward); exp(floor - max) is exactly 0 whenever the row has a valid key.
        floor = torch.finfo(scores.dtype).min
        if allowed is not None:
            scores = scores.masked_fill(~allowed.unsqueeze(1), floor)   # (B, H, Q, K)
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth_largest = scores.topk(self.top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
            scores = scores.masked_fill(scores < kth_largest, floor)     # ties with the k-th stay
        weights = scores.softmax(dim=-1)
        if allowed is not None:
            has_key = allowed.any(dim=-1, keepdim=True).unsqueeze(1)     # (B|1, 1, Q|1, 1)
            weights = weights * has_key.to(weights.dtype)
        return weights

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) -> (B, H, T, Dh)
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
