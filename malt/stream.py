"""Causal, exact, constant-cost streaming inference for MALT.

`OnlineDetector(model).step(rgb_vec, flow_vec)` returns the class probabilities for the step
just received. The result equals the offline forward of the same model (eval mode) on the
window ending at that step (`malt.window.window_indices`), last short-memory output, up to
float rounding, including the first steps while the memories fill.

Why it is cheap: the long memory samples a grid fixed to absolute step indices
(`malt.window`), so it changes only once every `long_memory_stride` steps. Everything that
depends on the long memory alone (the whole hierarchical encoder, f_1..f_N, and the
decoder's cross-attention keys/values over them) is computed on those steps only ("encoder
refresh") and reused until the next one; the steps in between run the short-memory path
only: fuse the newest step, then the decoder.

Exact reuse (all identities, the model is frozen):
- Each step is fused (concat + Linear + ReLU) once per input head when it arrives; the long
  head only sees grid steps, the only ones that ever enter the long memory.
- Long memory: every key/value projection of the long memory is W(x + p) + b, where x is a
  grid step's fused feature and p its slot's positional encoding. W x is computed once per
  grid step, when it arrives, for every encoder layer that reads the long memory, and kept
  in a ring buffer indexed by grid number; W p + b is precomputed per slot. A refresh then
  only gathers rows and adds: the slot a step occupies changes, its W x never does.
- The first layer of each encoder branch has learned queries as input: its self-attention
  output and cross-attention query projection are constants, computed once.
- The decoder's first self-attention projects the short memory the same way (W x per step
  cached, W p + b per position).
- Only the newest short-memory step is output, so the decoder's last layer of its last
  stage is run for that query alone (causal masking makes this exact).
What runs every step: the decoder over the short memory (the window slides by one step, so
every position holds a different step than before). Buffers have fixed size, so the cost
per step does not depend on how long the stream has run.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from vidpipe.malt.model import MALT, causal_mask
from vidpipe.malt.window import long_grid_phase, num_long_tokens, window_indices
from vidpipe.core.errors import VidpipeError


class OnlineDetector:
    """Feed one step of features at a time; get that step's class probabilities.

    The model is moved to `device` (default: where its parameters are) and put in eval mode.
    Call `reset()` before a new stream, and after changing the model's weights.
    """

    def __init__(self, model: MALT, device: Optional[str | torch.device] = None):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        # Grid steps kept: the L in the long memory plus those still in the short memory
        # (at most ceil(S / stride)), which enter the long memory later.
        stride = self.cfg.long_memory_stride
        self.ring_size = num_long_tokens(self.cfg) + -(-self.cfg.short_memory_steps // stride)
        self.reset()

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget the stream; recompute the weight-dependent constants."""
        model, d = self.model, self.cfg.d_model
        self.steps_seen = 0
        self._invalidate_long_memory()
        # The cross-attention of every layer that reads the long memory, in encoder order.
        attns = [layer.cross_attn for branch in model.encoder.branches for layer in branch.compress.layers]
        self._long_weight = torch.cat([w for a in attns for w in (a.k_proj.weight, a.v_proj.weight)])
        self._long_pos_kv = torch.stack(                                          # (2n, L, D)
            [proj(model.long_pos) for a in attns for proj in (a.k_proj, a.v_proj)])
        self._long_ring = torch.zeros(2 * len(attns), self.ring_size, d, device=self.device)  # by grid number
        self._long_kv = torch.empty_like(self._long_pos_kv)                      # (2n, L, D) scratch
        # Constant first-layer state of each branch (learned queries in, nothing else).
        self._branch_start = []
        for branch in model.encoder.branches:
            layer = branch.compress.layers[0]
            sa, queries = layer.self_attn, branch.queries[None]                   # (1, Qn, D)
            x = layer.self_block(queries, sa.q_proj(queries), sa.k_proj(queries), sa.v_proj(queries))
            self._branch_start.append((x, layer.cross_attn.q_proj(x)))
        # Decoder stage 1, layer 1 self-attention on the short memory.
        first_sa = model.decoder.stage_stacks()[0].layers[0].self_attn
        projs = (first_sa.q_proj, first_sa.k_proj, first_sa.v_proj)
        self._short_weight = torch.cat([p.weight for p in projs])                 # (3D, D)
        self._short_pos_qkv = torch.stack([p(model.short_pos) for p in projs])    # (3, S, D)
        self._short_ring = torch.zeros(self.cfg.short_memory_steps, d, device=self.device)
        self._short_ring_qkv = torch.zeros(self.cfg.short_memory_steps, 3, d, device=self.device)

    @torch.inference_mode()
    def step(self, rgb_vec, flow_vec) -> np.ndarray:
        """Consume the next step's rgb (Dr,) and flow (Df,) vectors -> probabilities (C+1,)."""
        self._push(self._as_rows(rgb_vec), self._as_rows(flow_vec))
        logits = self._predict(self.steps_seen - 1)                               # (C+1,)
        return logits.softmax(-1).float().cpu().numpy()

    @torch.inference_mode()
    def feed_history(self, rgb: np.ndarray, flow: np.ndarray) -> None:
        """Consume T past steps rgb (T, Dr), flow (T, Df) without computing their outputs.

        Afterwards the detector is in the state that T calls of `step` leave (the buffers hold
        the same rows, up to the rounding of batched matrix products): a fast way to resume a
        stream or to measure a long-running one.
        """
        # Older steps would be overwritten anyway (the ring spans ring_size * stride >= S steps).
        keep = min(len(rgb), self.ring_size * self.cfg.long_memory_stride)
        self.steps_seen += len(rgb) - keep
        self._invalidate_long_memory()
        self._push(self._as_rows(rgb[len(rgb) - keep:]), self._as_rows(flow[len(flow) - keep:]))

    def _invalidate_long_memory(self) -> None:
        # Encoder outputs are cached for one long memory, named by its steps (window_indices).
        self._encoded_long_idx: Optional[np.ndarray] = None
        self._decoder_memory_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def _as_rows(self, x) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else np.asarray(x)
        return torch.as_tensor(x, dtype=torch.float32, device=self.device).reshape(1, -1, x.shape[-1])

    def _check_dims(self, rgb: torch.Tensor, flow: torch.Tensor) -> None:
        if rgb.shape[-1] != self.cfg.rgb_dim or flow.shape[-1] != self.cfg.flow_dim:
            raise VidpipeError(f"features have {rgb.shape[-1]} rgb + {flow.shape[-1]} flow dims, the "
                               f"model expects {self.cfg.rgb_dim} + {self.cfg.flow_dim}: features "
                               f"from a different extractor than the model was trained on?")

    def _push(self, rgb: torch.Tensor, flow: torch.Tensor) -> None:
        # rgb (1, T, Dr), flow (1, T, Df): fuse and project each step once; store grid steps by
        # grid number, every step by short-memory position.
        self._check_dims(rgb, flow)
        model, count, stride = self.model, rgb.shape[1], self.cfg.long_memory_stride
        steps = np.arange(self.steps_seen, self.steps_seen + count)
        grid_rows = np.flatnonzero(steps % stride == long_grid_phase(self.cfg))  # only these enter M_L
        if len(grid_rows):
            rows = torch.as_tensor(grid_rows, device=self.device)
            long_fused = model.long_fusion(rgb[:, rows], flow[:, rows])[0]        # (G, D)
            ring_slots = torch.as_tensor(steps[grid_rows] // stride % self.ring_size, device=self.device)
            self._long_ring[:, ring_slots] = F.linear(long_fused, self._long_weight).view(
                len(rows), -1, self.cfg.d_model).transpose(0, 1)                  # (2n, G, D)
        recent = min(count, self.cfg.short_memory_steps)    # only these can be in the short memory
        short_fused = model.short_fusion(rgb[:, count - recent:], flow[:, count - recent:])[0]  # (T', D)
        slots = torch.as_tensor(steps[count - recent:] % self.cfg.short_memory_steps, device=self.device)
        self._short_ring[slots] = short_fused
        self._short_ring_qkv[slots] = F.linear(short_fused, self._short_weight).view(recent, 3, -1)
        self.steps_seen += count

    def _predict(self, t: int) -> torch.Tensor:
        long_idx, short_idx = window_indices(t, self.cfg)
        if self._encoded_long_idx is None or not np.array_equal(long_idx, self._encoded_long_idx):
            self._refresh_long_memory(long_idx)          # once every long_memory_stride steps
        decoded = self._decode(torch.as_tensor(short_idx, device=self.device))   # (1, 1, D)
        return self.model.classifier(decoded)[0, -1]

    def _refresh_long_memory(self, long_idx: np.ndarray) -> None:
        # Everything that depends on the long memory alone: f_1..f_N and, per decoder stage
        # and layer, the cross-attention keys/values over f_n.
        features = self._encode(torch.as_tensor(long_idx, device=self.device))   # N x (1, Q1, D)
        self._decoder_memory_kv = [
            [(layer.cross_attn.k_proj(feature), layer.cross_attn.v_proj(feature))  # (1, Q1, D) x 2
             for layer in stack.layers]
            for stack, feature in zip(self.model.decoder.stage_stacks(), features)]
        self._encoded_long_idx = long_idx

    def _encode(self, long_idx: torch.Tensor) -> list[torch.Tensor]:
        # long_idx (L,) step per slot, -1 = padding -> N x (1, Q1, D)
        allowed = (long_idx >= 0)[None, None]                                     # (1, 1, L)
        # One gather + in-place add into a fixed buffer: this is memory-bound at paper size.
        # Padding slots read an arbitrary (finite) row; the mask gives them no weight.
        ring_slots = long_idx // self.cfg.long_memory_stride % self.ring_size
        kv = torch.index_select(self._long_ring, 1, ring_slots, out=self._long_kv)
        kv = kv.add_(self._long_pos_kv)[:, None]                                  # (2n, 1, L, D)
        layer_kv = zip(kv[0::2], kv[1::2])              # (k, v) of each layer, in encoder order
        features, previous = [], None
        for branch, (x, q) in zip(self.model.encoder.branches, self._branch_start):
            for depth, (layer, (k, v)) in enumerate(zip(branch.compress.layers, layer_kv)):
                if depth > 0:
                    sa = layer.self_attn
                    x = layer.self_block(x, sa.q_proj(x), sa.k_proj(x), sa.v_proj(x))
                x = layer.cross_block(x, k, v, allowed, q=q if depth == 0 else None)
                x = layer.ffn_block(x)
            compressed = branch.compress.norm(x)                                  # (1, Qn, D)
            previous = compressed if branch.refine is None else branch.refine(previous, compressed)
            features.append(previous)
        return features

    def _decode(self, short_idx: torch.Tensor) -> torch.Tensor:
        # short_idx (S,) steps of the short memory -> decoder output of the newest step (1, 1, D)
        num_short = len(short_idx)
        slots = short_idx % self.cfg.short_memory_steps
        x = (self._short_ring[slots] + self.model.short_pos[:num_short])[None]    # (1, S, D)
        qkv = self._short_ring_qkv[slots].transpose(0, 1) + self._short_pos_qkv[:, :num_short]
        causal = causal_mask(num_short, self.device)                              # (1, S, S)
        stacks = self.model.decoder.stage_stacks()
        for stage, (stack, memory_kv) in enumerate(zip(stacks, self._decoder_memory_kv)):
            for depth, (layer, (memory_k, memory_v)) in enumerate(zip(stack.layers, memory_kv)):
                last = stage == len(stacks) - 1 and depth == len(stack.layers) - 1
                if stage == 0 and depth == 0:
                    q, k, v = (t[None] for t in qkv)                              # (1, S, D) each
                    q = q[:, -1:] if last else q
                else:
                    sa = layer.self_attn
                    k, v = sa.k_proj(x), sa.v_proj(x)
                    q = sa.q_proj(x[:, -1:] if last else x)
                if last:        # only the newest step is output; causal masking makes this exact
                    x, mask = x[:, -1:], causal[:, -1:]
                else:
                    mask = causal
                x = layer.self_block(x, q, k, v, mask)
                x = layer.cross_block(x, memory_k, memory_v)
                x = layer.ffn_block(x)
            x = stack.norm(x)
        return x
