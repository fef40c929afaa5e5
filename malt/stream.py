"""Causal, exact, constant-cost streaming inference for MALT, for one stream or many at once.

`MultiStreamDetector(model)` serves many independent streams (cameras, channels): each
joins (`add_stream`), steps and leaves (`remove_stream`) on its own, with its own position,
memories and refresh phase; one `step({key: (rgb_vec, flow_vec)})` runs the streams that
have a new step as ONE batch and returns each one's class probabilities. `OnlineDetector`
is the same detector serving a single stream. Every output equals the offline forward of
the same model (eval mode) on the window ending at that step (`malt.window.window_indices`),
last short-memory output, up to float rounding, including the first steps while the
memories fill.

Why it is cheap: the long memory samples a grid fixed to absolute step indices
(`malt.window`), so it changes only once every `long_memory_stride` steps. Everything that
depends on the long memory alone (the whole hierarchical encoder, f_1..f_N, and the
decoder's cross-attention keys/values over them) is computed once per long memory and
reused until the next one; every step runs the short-memory path: fuse the newest step,
then the decoder.

Flat latency: the next long memory is known `stride` steps before it is needed (its newest
step left the short memory's future long ago: S >= stride). Its encoding is therefore split
into `stride` chunks of about equal multiply-adds (`_encoder_ops`, measured once) and one
chunk runs on each of the `stride` steps before the switch, so no step pays the whole
encoder. A stream whose next memory was not prepared in time (after `feed_history`, or when
S < stride) encodes the rest at the switch: the outputs never depend on the schedule.

Exact reuse (all identities, the model is frozen):
- Each step is fused (concat + Linear + ReLU) once per input head when it arrives; the long
  head only sees grid steps, the only ones that ever enter the long memory.
- Long memory: every key/value projection of the long memory is W(x + p) + b, where x is a
  grid step's fused feature and p its slot's positional encoding. W x is computed once per
  grid step, when it arrives, for every encoder layer that reads the long memory, and kept
  in a ring buffer indexed by grid number; W p + b is precomputed per slot. An encoding
  then only gathers rows and adds: the slot a step occupies changes, its W x never does.
- The first layer of each encoder branch has learned queries as input: its self-attention
  output and cross-attention query projection are constants, computed once.
- The encoding of the empty long memory (start of every stream) is a constant too.
- The decoder's first self-attention projects the short memory the same way (W x per step
  cached, W p + b per position).
- Only the newest short-memory step is output, so the decoder's last layer of its last
  stage is run for that query alone (causal masking makes this exact).
- Streams younger than S steps are batched with full ones: their steps sit at positions
  0..t, the positions after t hold finite leftovers that the causal mask hides from them.
What runs every step: the decoder over the short memory (the window slides by one step, so
every position holds a different step than before). Buffers have fixed size, so the cost
per step does not depend on how long a stream has run.

int8 (`int8=True`, CPU only): every Linear layer, including the detector's fused
projections, becomes torch's dynamic int8 Linear (weights int8, activations quantised per
call); the cached W p + b constants stay fp32. Outputs then differ from the fp32 model's by
the quantisation error (bench/streams.py reports the speed, docs/malt.md the accuracy).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vidpipe.core.errors import VidpipeError
from vidpipe.malt.model import MALT, causal_mask
from vidpipe.malt.window import long_grid_phase, num_long_tokens


@dataclass
class _Stream:
    slot: int                         # its row in every state tensor
    steps_seen: int = 0
    encoded: Optional[int] = None     # long memory the decoder's keys/values come from (its newest step)
    pending: Optional[int] = None     # long memory being encoded ahead of its switch
    done: int = 0                     # chunks of `pending` completed
    due: int = 0                      # chunks of `pending` that must be complete after this step


class _Work(dict):
    """Tensors (B, ...) handed from one encoder op to the next, for one batch of streams
    encoding one long memory each. A name not set in this batch was set by an earlier chunk
    (an earlier step) and is read back from the streams' saved state; `save` keeps what this
    batch set."""

    def __init__(self, state: dict[str, torch.Tensor], slots: torch.Tensor, long_idx: torch.Tensor):
        super().__init__()
        self.state, self.slots, self.long_idx = state, slots, long_idx    # (B,), (B, L)
        self.loaded: set[str] = set()

    def __missing__(self, name: str) -> torch.Tensor:
        value = self.state["work." + name][self.slots]
        super().__setitem__(name, value)
        self.loaded.add(name)
        return value

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        super().__setitem__(name, value)
        self.loaded.discard(name)

    def save(self) -> None:
        for name, value in self.items():
            if name not in self.loaded:
                key = "work." + name
                if key not in self.state:
                    capacity = len(next(iter(self.state.values())))
                    self.state[key] = value.new_zeros(capacity, *value.shape[1:])
                self.state[key][self.slots] = value


class _FromCheckpoint:
    """`from_checkpoint`, shared by the many-stream and the one-stream detector."""

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: Optional[str | torch.device] = None, **kwargs):
        """The detector of a trained checkpoint (malt.checkpoint.load_model); None: cuda when present."""
        from vidpipe.malt.checkpoint import load_model
        model, _ = load_model(path, device)
        return cls(model, **kwargs)


class MultiStreamDetector(_FromCheckpoint):
    """One MALT serving many independent streams; the streams that have a new step run as one batch.

    The model is moved to `device` (default: where its parameters are) and put in eval mode.
    `max_streams` caps the streams served at once (state for them is allocated up front);
    None grows the state as streams join. `int8=True` quantises the Linear layers (CPU).
    Call `reset()` after changing the model's weights.
    """

    def __init__(self, model: MALT, device: Optional[str | torch.device] = None,
                 max_streams: Optional[int] = None, int8: bool = False):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if int8 and self.device.type != "cpu":
            raise VidpipeError(f"int8 streaming runs on the CPU only, not on {self.device}")
        if max_streams is not None and max_streams < 1:
            raise VidpipeError(f"max_streams must be >= 1, got {max_streams}")
        self.source_model = model.to(self.device).eval()
        self.cfg, self.int8, self.max_streams = model.cfg, int8, max_streams
        # Grid steps kept: the L in the long memory plus those still in the short memory
        # (at most ceil(S / stride)), which enter the long memory later.
        stride = self.cfg.long_memory_stride
        self.ring_size = num_long_tokens(self.cfg) + -(-self.cfg.short_memory_steps // stride)
        self._streams: dict[Hashable, _Stream] = {}
        self.reset()

    @property
    def streams(self) -> list[Hashable]:
        return list(self._streams)

    def position(self, key: Hashable) -> int:
        """Steps the stream `key` has consumed."""
        return self._stream(key).steps_seen

    # -- streams joining and leaving ---------------------------------------------------------

    @torch.inference_mode()
    def add_stream(self, key: Hashable) -> None:
        """A new stream at position 0 (empty memories), stepping from the next `step` on."""
        if key in self._streams:
            raise VidpipeError(f"stream {key!r} is already served")
        used = {s.slot for s in self._streams.values()}
        slot = next(i for i in range(len(used) + 1) if i not in used)
        if slot >= self._capacity:
            if self.max_streams is not None and slot >= self.max_streams:
                raise VidpipeError(f"stream {key!r}: this detector serves at most {self.max_streams} streams")
            self._grow(max(2 * self._capacity, slot + 1))
        self._streams[key] = _Stream(slot)
        self._start(self._streams[key])

    def remove_stream(self, key: Hashable) -> None:
        """Stop serving `key`; its state rows go to the next stream that joins."""
        self._stream(key)
        del self._streams[key]

    @torch.inference_mode()
    def reset(self) -> None:
        """Recompute the weight-dependent constants; every stream restarts at position 0."""
        self.model = self.source_model
        self._capacity = 0
        self._state: dict[str, torch.Tensor] = {}
        self._precompute_constants()
        if self.int8:
            self.model, self._long_proj, self._short_proj = _quantized(
                self.source_model, self._long_proj, self._short_proj)
        self._grow(max([1, self.max_streams or 0] + [s.slot + 1 for s in self._streams.values()]))
        self._encoder_chunks = self._split_encoder()
        for stream in self._streams.values():
            self._start(stream)

    # -- stepping --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, inputs: dict[Hashable, tuple]) -> dict[Hashable, np.ndarray]:
        """{key: (rgb_vec (Dr,), flow_vec (Df,))} for the streams that have a new step ->
        {key: probabilities (C+1,)} of that step. Streams not named keep their state."""
        if not inputs:
            return {}
        keys = list(inputs)
        streams = [self._stream(key) for key in keys]
        vectors = [[self._as_tensor(x) for x in inputs[key]] for key in keys]
        for rgb_vec, flow_vec in vectors:
            self._check_dims(rgb_vec, flow_vec)
        rgb = torch.stack([r for r, _ in vectors])[:, None]                     # (B, 1, Dr)
        flow = torch.stack([f for _, f in vectors])[:, None]                    # (B, 1, Df)
        positions = np.array([s.steps_seen for s in streams])
        self._push(streams, positions, rgb, flow)
        self._update_encodings(streams, positions)
        logits = self._decode(streams, positions)                                # (B, C+1)
        probs = logits.softmax(-1).float().cpu().numpy()
        return dict(zip(keys, probs))

    @torch.inference_mode()
    def feed_history(self, key: Hashable, rgb: np.ndarray, flow: np.ndarray) -> None:
        """Consume T past steps rgb (T, Dr), flow (T, Df) of stream `key` without computing
        their outputs: afterwards the stream is in the state that T steps leave (the buffers
        hold the same rows, up to the rounding of batched matrix products); its next step
        encodes its long memory whole. A fast way to resume a stream or to measure a long one.
        """
        stream = self._stream(key)
        # Older steps would be overwritten anyway (the ring spans ring_size * stride >= S steps).
        keep = min(len(rgb), self.ring_size * self.cfg.long_memory_stride)
        stream.steps_seen += len(rgb) - keep
        stream.encoded = stream.pending = None
        self._push([stream], np.array([stream.steps_seen]),
                   self._as_tensor(rgb[len(rgb) - keep:])[None], self._as_tensor(flow[len(flow) - keep:])[None])

    # -- state -----------------------------------------------------------------------------

    def _stream(self, key: Hashable) -> _Stream:
        try:
            return self._streams[key]
        except KeyError:
            raise VidpipeError(f"unknown stream {key!r}: add_stream it first") from None

    def _start(self, stream: _Stream) -> None:
        # Position 0: the long memory is empty, whose encoding is a constant.
        stream.steps_seen, stream.encoded, stream.pending, stream.done = 0, -1, None, 0
        for name, value in self._empty_encoding.items():
            self._state[name][stream.slot] = value

    def _grow(self, capacity: int) -> None:
        cfg, d = self.cfg, self.cfg.d_model
        shapes = {"long_ring": (len(self._long_pos_kv), self.ring_size, d),   # W x of grid steps, by grid number
                  "short_ring": (cfg.short_memory_steps, d),                  # fused steps, by step % S
                  "short_qkv": (cfg.short_memory_steps, 3, d)}                # their decoder q/k/v W x
        for name, shape in shapes.items():
            self._state.setdefault(name, torch.zeros(0, *shape, device=self.device))
        for name, tensor in self._state.items():
            extra = tensor.new_zeros(capacity - self._capacity, *tensor.shape[1:])
            self._state[name] = torch.cat([tensor, extra])
        self._capacity = capacity

    def _as_tensor(self, x) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else np.asarray(x)
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)

    def _check_dims(self, rgb: torch.Tensor, flow: torch.Tensor) -> None:
        if rgb.shape[-1] != self.cfg.rgb_dim or flow.shape[-1] != self.cfg.flow_dim:
            raise VidpipeError(f"features have {rgb.shape[-1]} rgb + {flow.shape[-1]} flow dims, the "
                               f"model expects {self.cfg.rgb_dim} + {self.cfg.flow_dim}: features "
                               f"from a different extractor than the model was trained on?")

    def _precompute_constants(self) -> None:
        model = self.model
        # The cross-attention of every encoder layer that reads the long memory, in encoder order.
        self._long_attns = [layer.cross_attn for branch in model.encoder.branches
                            for layer in branch.compress.layers]
        projs = [proj for a in self._long_attns for proj in (a.k_proj, a.v_proj)]
        self._long_proj = _stacked_linear(projs)                                 # D -> 2n x D
        self._long_pos_kv = torch.stack([proj(model.long_pos) for proj in projs])   # (2n, L, D)
        # Constant first-layer state of each branch (learned queries in, nothing else).
        self._branch_start = []
        for branch in model.encoder.branches:
            layer = branch.compress.layers[0]
            sa, queries = layer.self_attn, branch.queries[None]                   # (1, Qn, D)
            x = layer.self_block(queries, sa.q_proj(queries), sa.k_proj(queries), sa.v_proj(queries))
            self._branch_start.append((x, layer.cross_attn.q_proj(x)))
        # Decoder stage 1, layer 1 self-attention on the short memory.
        first_sa = model.decoder.stage_stacks()[0].layers[0].self_attn
        projs = [first_sa.q_proj, first_sa.k_proj, first_sa.v_proj]
        self._short_proj = _stacked_linear(projs)                                # D -> 3 x D
        self._short_pos_qkv = torch.stack([p(model.short_pos) for p in projs], dim=1)   # (S, 3, D)
        self._causal = causal_mask(self.cfg.short_memory_steps, self.device)     # (1, S, S)
        stride, num_long = self.cfg.long_memory_stride, num_long_tokens(self.cfg)
        self._long_offsets = stride * np.arange(num_long - 1, -1, -1, dtype=np.int64)   # (L,)

    # -- new steps in -----------------------------------------------------------------------

    def _push(self, streams: list[_Stream], positions: np.ndarray, rgb: torch.Tensor,
              flow: torch.Tensor) -> None:
        # rgb (B, T, Dr), flow (B, T, Df): T new steps of each stream from `positions` (B,) on.
        # Fuse and project each step once; grid steps by grid number, every step by step % S.
        self._check_dims(rgb, flow)
        model, (batch, count) = self.model, rgb.shape[:2]
        stride, short = self.cfg.long_memory_stride, self.cfg.short_memory_steps
        as_index = lambda a: torch.as_tensor(a, device=self.device)            # noqa: E731
        slots = np.array([s.slot for s in streams])[:, None].repeat(count, 1)           # (B, T)
        steps = positions[:, None] + np.arange(count)                                    # (B, T)
        grid = steps % stride == long_grid_phase(self.cfg)       # only these ever enter M_L
        if grid.any():
            fused = model.long_fusion(rgb[as_index(grid)], flow[as_index(grid)])         # (G, D)
            ring_rows = as_index(steps[grid] // stride % self.ring_size)
            self._state["long_ring"][as_index(slots[grid]), :, ring_rows] = (
                self._long_proj(fused).view(len(fused), -1, self.cfg.d_model))          # (G, 2n, D)
        recent = min(count, short)                  # only these can be in the short memory
        fused = model.short_fusion(rgb[:, count - recent:], flow[:, count - recent:])   # (B, T', D)
        slots, ring_rows = as_index(slots[:, count - recent:]), as_index(steps[:, count - recent:] % short)
        self._state["short_ring"][slots, ring_rows] = fused
        self._state["short_qkv"][slots, ring_rows] = self._short_proj(fused).view(batch, recent, 3, -1)
        for stream in streams:
            stream.steps_seen += count

    # -- the long memory's encoding, spread over the steps before it is needed -----------------

    def _long_key(self, t: int) -> int:
        """The long memory of the window ending at step t, named by its newest step (-1: empty):
        the last grid step before the short memory (malt.window)."""
        stride, phase = self.cfg.long_memory_stride, long_grid_phase(self.cfg)
        short_start = max(0, t - self.cfg.short_memory_steps + 1)
        newest = (short_start - 1 - phase) // stride * stride + phase
        return max(newest, -1)

    def _next_switch(self, t: int) -> int:
        """The first step after t whose long memory differs from step t's: when a grid step
        leaves the short memory (step t' - S is a grid step)."""
        stride, short = self.cfg.long_memory_stride, self.cfg.short_memory_steps
        first = max(t + 1, short)
        return first + (long_grid_phase(self.cfg) - (first - short)) % stride

    def _update_encodings(self, streams: list[_Stream], positions: np.ndarray) -> None:
        chunks = len(self._encoder_chunks)
        # 1. Each stream's current long memory must be encoded now (normally it already is,
        # but for the swap), then 2. a share of the next one's encoding runs.
        switching = []
        for stream, t in zip(streams, positions):
            key = self._long_key(t)
            if stream.encoded != key:
                if stream.pending != key:
                    stream.pending, stream.done = key, 0
                stream.due = chunks
                switching.append(stream)
        self._run_chunks(switching)
        for stream in switching:
            self._swap_in(stream)
        ahead = []
        for stream, t in zip(streams, positions):
            switch = self._next_switch(t)
            key = self._long_key(switch)
            if key > t:             # its newest step has not arrived yet (stream start, or S < stride)
                continue
            if stream.pending != key:
                stream.pending, stream.done = key, 0
            stream.due = stream.done + -(-(chunks - stream.done) // (switch - t))
            ahead.append(stream)
        self._run_chunks(ahead)

    def _run_chunks(self, streams: list[_Stream]) -> None:
        # Chunk c runs once, as one batch, for every stream that still has to run it now.
        for c, ops in enumerate(self._encoder_chunks):
            batch = [s for s in streams if s.done <= c < s.due]
            if not batch:
                continue
            long_idx = np.stack([s.pending - self._long_offsets for s in batch])        # (B, L)
            work = _Work(self._state, torch.as_tensor([s.slot for s in batch], device=self.device),
                         torch.as_tensor(np.maximum(long_idx, -1), device=self.device))
            for _, op in ops:
                op(work)
            work.save()
        for stream in streams:
            stream.done = max(stream.done, stream.due)

    def _swap_in(self, stream: _Stream) -> None:
        slot = stream.slot
        for stage, depth in self._decoder_layers():
            self._state[f"kv{stage}.{depth}"][slot] = self._state[f"work.next_kv{stage}.{depth}"][slot]
        stream.encoded, stream.pending, stream.done = stream.pending, None, 0

    def _decoder_layers(self) -> list[tuple[int, int]]:
        return [(stage, depth) for stage, stack in enumerate(self.model.decoder.stage_stacks())
                for depth in range(len(stack.layers))]

    def _split_encoder(self) -> list[list[tuple[int, Callable[[_Work], None]]]]:
        """The encoder ops in `stride` consecutive chunks of about equal multiply-adds.

        Each op's multiply-adds are counted while encoding the empty long memory, whose
        result (a constant) every stream starts with."""
        ops, costs = self._encoder_ops(), []
        work = _Work(self._state, torch.zeros(1, dtype=torch.long, device=self.device),
                     torch.full((1, len(self._long_offsets)), -1, device=self.device))
        for op in ops:
            with FlopCounterMode(display=False) as counter:
                op(work)
            costs.append(counter.get_total_flops())
        self._empty_encoding = {f"kv{stage}.{depth}": work[f"next_kv{stage}.{depth}"][0]
                                for stage, depth in self._decoder_layers()}
        for name, value in self._empty_encoding.items():
            self._state[name] = value.new_zeros(self._capacity, *value.shape)
        chunks = [[] for _ in range(self.cfg.long_memory_stride)]
        for op, cost, chunk in zip(ops, costs, _balanced_split(costs, len(chunks))):
            chunks[chunk].append((cost, op))
        return chunks

    def _encoder_ops(self) -> list[Callable[[_Work], None]]:
        """The encoding of one long memory as a sequence of small ops on a batch of streams:
        f_1..f_N (the hierarchical encoder, `malt.model.EncoderBranch`) and, per decoder
        stage and layer, the cross-attention keys/values over f_n (`next_kv{stage}.{layer}`)."""
        stacks, ops, long_layer = self.model.decoder.stage_stacks(), [], 0
        for n, (branch, (x0, q0)) in enumerate(zip(self.model.encoder.branches, self._branch_start)):
            x = f"x{n}"
            for depth, layer in enumerate(branch.compress.layers):
                if depth > 0:
                    ops.append(_self_op(layer, x))
                ops.append(self._long_cross_op(layer, x, long_layer, (x0, q0) if depth == 0 else None))
                ops.append(_ffn_op(layer, x))
                long_layer += 1
            ops.append(_norm_op(branch.compress.norm, x, f"c{n}" if branch.refine else "f"))
            if branch.refine is not None:          # f_n: f_{n-1} attends to the compressed tokens
                for layer in branch.refine.layers:
                    ops += [_self_op(layer, "f"), _refine_cross_op(layer, "f", f"c{n}"), _ffn_op(layer, "f")]
                ops.append(_norm_op(branch.refine.norm, "f", "f"))
            ops += [_memory_kv_op(layer, f"next_kv{n}.{depth}") for depth, layer in enumerate(stacks[n].layers)]
        return ops

    def _long_cross_op(self, layer, x: str, long_layer: int, start) -> Callable[[_Work], None]:
        def run(work: _Work) -> None:
            # This layer's keys/values over the long memory: gather the grid steps' W x, add W p + b.
            ring_rows = work.long_idx // self.cfg.long_memory_stride % self.ring_size     # (B, L)
            slots, ring = work.slots[:, None], self._state["long_ring"]
            k = ring[slots, 2 * long_layer, ring_rows] + self._long_pos_kv[2 * long_layer]       # (B, L, D)
            v = ring[slots, 2 * long_layer + 1, ring_rows] + self._long_pos_kv[2 * long_layer + 1]
            allowed = (work.long_idx >= 0)[:, None]                               # (B, 1, L)
            batch = len(work.slots)
            if start is None:
                work[x] = layer.cross_block(work[x], k, v, allowed)
            else:                   # first layer: constant input and query projection
                x0, q0 = (t.expand(batch, -1, -1) for t in start)
                work[x] = layer.cross_block(x0, k, v, allowed, q=q0)
        return run

    # -- the decoder, every step ---------------------------------------------------------------

    def _decode(self, streams: list[_Stream], positions: np.ndarray) -> torch.Tensor:
        # -> logits (B, C+1) of each stream's newest step (positions (B,) = its index).
        short = self.cfg.short_memory_steps
        count = np.minimum(positions + 1, short)                # steps in each short memory
        # Position i holds step t - count + 1 + i; in a young stream positions past its newest
        # step hold leftovers, hidden from it by the causal mask.
        ring_rows = (positions - count + 1)[:, None] + np.arange(short)            # (B, S)
        slots = torch.as_tensor([s.slot for s in streams], device=self.device)
        index = (slots[:, None], torch.as_tensor(ring_rows % short, device=self.device))
        x = self._state["short_ring"][index] + self.model.short_pos                # (B, S, D)
        qkv = self._state["short_qkv"][index] + self._short_pos_qkv                # (B, S, 3, D)
        newest = torch.as_tensor(count - 1, device=self.device)                    # (B,)
        rows = torch.arange(len(streams), device=self.device)
        stacks = self.model.decoder.stage_stacks()
        for stage, depth in self._decoder_layers():
            layer = stacks[stage].layers[depth]
            memory_k, memory_v = self._state[f"kv{stage}.{depth}"][slots].unbind(1)   # (B, Q1, D) x 2
            last = stage == len(stacks) - 1 and depth == len(stacks[stage].layers) - 1
            if stage == 0 and depth == 0:
                q, k, v = qkv.unbind(2)                                            # (B, S, D) each
                q = q[rows, newest][:, None] if last else q
            else:
                sa = layer.self_attn
                k, v = sa.k_proj(x), sa.v_proj(x)
                q = sa.q_proj(x[rows, newest][:, None] if last else x)
            if last:        # only the newest step is output; causal masking makes this exact
                x, mask = x[rows, newest][:, None], self._causal[0, newest][:, None]   # (B, 1, D), (B, 1, S)
            else:
                mask = self._causal
            x = layer.self_block(x, q, k, v, mask)
            x = layer.cross_block(x, memory_k, memory_v)
            x = layer.ffn_block(x)
            if depth == len(stacks[stage].layers) - 1:
                x = stacks[stage].norm(x)
        return self.model.classifier(x)[:, 0]


class OnlineDetector(_FromCheckpoint):
    """Feed one step of features at a time; get that step's class probabilities.

    A `MultiStreamDetector` serving one stream: the same code and numbers. The model is moved
    to `device` (default: where its parameters are) and put in eval mode. Call `reset()`
    before a new stream, and after changing the model's weights.
    """

    def __init__(self, model: MALT, device: Optional[str | torch.device] = None, int8: bool = False):
        self.detector = MultiStreamDetector(model, device, max_streams=1, int8=int8)
        self.detector.add_stream(0)
        self.cfg, self.device = self.detector.cfg, self.detector.device

    @property
    def steps_seen(self) -> int:
        return self.detector.position(0)

    def reset(self) -> None:
        """Forget the stream; recompute the weight-dependent constants."""
        self.detector.reset()

    def step(self, rgb_vec, flow_vec) -> np.ndarray:
        """Consume the next step's rgb (Dr,) and flow (Df,) vectors -> probabilities (C+1,)."""
        return self.detector.step({0: (rgb_vec, flow_vec)})[0]

    def feed_history(self, rgb: np.ndarray, flow: np.ndarray) -> None:
        """Consume T past steps rgb (T, Dr), flow (T, Df) without computing their outputs
        (MultiStreamDetector.feed_history)."""
        self.detector.feed_history(0, rgb, flow)


# -- encoder ops: one sub-block of a TransformerLayer on the named work tensors ---------------

def _self_op(layer, x: str):
    def run(work: _Work) -> None:
        sa, h = layer.self_attn, work[x]
        work[x] = layer.self_block(h, sa.q_proj(h), sa.k_proj(h), sa.v_proj(h))
    return run


def _refine_cross_op(layer, x: str, memory: str):
    def run(work: _Work) -> None:
        ca, m = layer.cross_attn, work[memory]
        work[x] = layer.cross_block(work[x], ca.k_proj(m), ca.v_proj(m))
    return run


def _ffn_op(layer, x: str):
    def run(work: _Work) -> None:
        work[x] = layer.ffn_block(work[x])
    return run


def _norm_op(norm: nn.Module, x: str, out: str):
    def run(work: _Work) -> None:
        work[out] = norm(work[x])
    return run


def _memory_kv_op(layer, out: str):
    def run(work: _Work) -> None:
        # The decoder layer's cross-attention keys and values over f_n: (B, 2, Q1, D)
        work[out] = torch.stack([layer.cross_attn.k_proj(work["f"]), layer.cross_attn.v_proj(work["f"])], 1)
    return run


def _balanced_split(costs: list[int], parts: int) -> list[int]:
    """The part (0..parts-1) of each item when `costs` is cut into `parts` consecutive,
    non-empty runs (fewer when there are fewer items) whose largest sum is the smallest
    possible: dynamic programming over where each run starts."""
    count, runs = len(costs), min(parts, len(costs))
    prefix = np.concatenate([[0], np.cumsum(costs)])
    best = np.full((runs + 1, count + 1), np.inf)     # [k, i]: first i items in k runs
    best[0, 0] = 0
    start = np.zeros((runs + 1, count + 1), dtype=int)
    for k in range(1, runs + 1):
        for i in range(k, count + 1):
            options = [max(best[k - 1, j], prefix[i] - prefix[j]) for j in range(k - 1, i)]
            start[k, i] = k - 1 + int(np.argmin(options))
            best[k, i] = min(options)
    labels, end = [0] * count, count
    for k in range(runs, 0, -1):
        labels[start[k, end]:end] = [k - 1] * (end - start[k, end])
        end = start[k, end]
    return labels


def _stacked_linear(projs: list[nn.Linear]) -> nn.Linear:
    """One bias-free Linear computing the weight products of several: x -> [W_1 x, W_2 x, ...]."""
    weight = torch.cat([p.weight for p in projs])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    stacked.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return stacked.eval()


def _quantized(model: MALT, *linears: nn.Linear) -> tuple[nn.Module, ...]:
    """Copies with every Linear as torch's dynamic int8 Linear (weights int8 per tensor,
    activations quantised per call; fbgemm / oneDNN kernels, VNNI where the CPU has it)."""
    with warnings.catch_warnings():          # torch marks eager quantisation deprecated (-> torchao)
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        # (a bare Linear is wrapped: quantize_dynamic swaps submodules only)
        quantized = quantize_dynamic(nn.ModuleList([copy.deepcopy(m) for m in (model, *linears)]),
                                     {nn.Linear}, dtype=torch.qint8)
        return tuple(quantized)
