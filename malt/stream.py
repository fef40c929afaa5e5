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
into `stride` parts of about equal time (`EncoderSchedule`: each op timed once, when the
detector is built; equal multiply-adds were not equal time) and one part runs on each of
the `stride` steps before the switch, so no step pays the whole encoder. A stream whose
next memory was not prepared in time (after `feed_history`, or when S < stride) encodes the
rest at the switch: the outputs never depend on the schedule.

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

One structure: the detector walks the model's own description of itself, the encoder's
passes (`HierarchicalEncoder.passes`) and the decoder's stages (`Decoder.stages`),
the same lists `MALT.forward` walks, and the window is `malt.window`'s (the long memory is
named by its newest step, `long_memory_newest`). A new encoder branch or decoder stage is a
change in malt/model.py alone.

The pieces, by job: `_Slots` (which stream has which state row), `StreamState` (every
stream's tensors, named fields, in `MultiStreamDetector.dtype` but the decoder's first q/k/v), `_Constants` (what
depends on the weights alone, and the int8 copy), `EncoderSchedule` (the long memory's
encoding as time-balanced parts), `_decode_newest` (the decoder, every step).

Precision (`precision=`, `core.precision`): fp32 is exact (the 1e-5 above). bf16 (and
fp16 on CUDA): a copy of the model, the state and the cached constants in that dtype, so
every matrix product runs in it (torch's softmax and layer norm accumulate in fp32 inside
their kernels; the output softmax is fp32). int8 (CPU): the Linear layers, the long
memory's fused projection included, become torch's dynamic int8 Linear (weights int8 per
output channel, activations quantised per call, VNNI kernels where the CPU has them); the
rest (state, attention, norms) runs in bf16 where the CPU multiplies bf16 natively, else
fp32. Kept out of the low precision, each for its measured share of the error (docs/malt.md):
the input heads (fusion, <1% of the multiply-adds) in fp32: they standardise raw,
heavy-tailed features, which bf16 or one int8 scale per call would round away; the
decoder's first q/k/v (`short_proj`, `StreamState.FLOAT32_FIELDS`) in fp32: its top-k
keeps k of S keys, and q/k rounded to bf16 flip near-ties; in int8, the decoder's attention
output projections and, where top-k selects among the keys, its q/k (`_int8_exempt`) in
the state's dtype. The constants W p + b are computed in fp32, then rounded to the state's
dtype (the short ones stay fp32). `auto`: int8 where the CPU has VNNI,
else bf16 where it has native bf16 (CUDA: bf16, else fp16), else fp32. The per-step
probabilities stay within 0.05 of fp32 (tests/test_stream_precision.py); bench/streams.py
reports the speed, docs/malt.md the accuracy.
"""
from __future__ import annotations

import copy
import functools
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Hashable, Optional

import numpy as np
import torch
from torch import nn

from vidpipe.core.errors import VidpipeError
from vidpipe.core.precision import DTYPES, device_capabilities, resolve_precision
from vidpipe.malt.config import ModelConfig
from vidpipe.malt.model import MALT, EncoderPass, causal_mask
from vidpipe.malt.window import (is_grid_step, long_grid_phase, long_memory_newest, long_memory_steps,
                                 next_long_memory_change, num_long_tokens)

__all__ = ["EncoderSchedule", "EncodingRows", "FromCheckpoint", "MultiStreamDetector",
           "OnlineDetector", "StreamState"]


# -- slot bookkeeping: which streams are served, and their row in the state -------------------

@dataclass
class _Stream:
    slot: int                         # its row in every state tensor
    steps_seen: int = 0
    # Long memories are named by their newest step (malt.window.long_memory_newest; -1: empty).
    encoded: Optional[int] = None     # the one the decoder's keys/values come from
    pending: Optional[int] = None     # the one being encoded ahead of its switch
    done: int = 0                     # parts of `pending` completed
    due: int = 0                      # parts of `pending` that must be complete after this step


class _Slots:
    """The streams served, by key, each with its own row of the state; at most `max_streams`."""

    def __init__(self, max_streams: Optional[int]):
        if max_streams is not None and max_streams < 1:
            raise VidpipeError(f"max_streams must be >= 1, got {max_streams}")
        self.max_streams = max_streams
        self.streams: dict[Hashable, _Stream] = {}

    def add(self, key: Hashable) -> _Stream:
        if key in self.streams:
            raise VidpipeError(f"stream {key!r} is already served")
        used = {s.slot for s in self.streams.values()}
        slot = next(i for i in range(len(used) + 1) if i not in used)
        if self.max_streams is not None and slot >= self.max_streams:
            raise VidpipeError(f"stream {key!r}: this detector serves at most {self.max_streams} streams")
        self.streams[key] = _Stream(slot)
        return self.streams[key]

    def get(self, key: Hashable) -> _Stream:
        try:
            return self.streams[key]
        except KeyError:
            raise VidpipeError(f"unknown stream {key!r}: add_stream it first") from None

    def remove(self, key: Hashable) -> None:
        """Its row goes to the next stream that joins."""
        self.get(key)
        del self.streams[key]

    def rows_needed(self) -> int:
        return max([1, self.max_streams or 0] + [s.slot + 1 for s in self.streams.values()])


# -- the state: one row per slot, one dtype (the decoder's first q/k/v: fp32) -----------------

@dataclass
class EncodingRows:
    """A long memory's encoding while its parts run, one row per slot (kept between steps)."""
    tokens: list[torch.Tensor]   # per encoder pass: (rows, Qp, D) its tokens mid-stack, then its output
    memory_kv: torch.Tensor      # (rows, decoder layers, 2, Q1, D) decoder cross-attention k/v over f_n

    def tensors(self) -> list[torch.Tensor]:
        return [*self.tokens, self.memory_kv]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "EncodingRows":
        return EncodingRows([fn(t) for t in self.tokens], fn(self.memory_kv))


@dataclass
class StreamState:
    """Every stream's state, one row per slot; fixed size, whatever a stream's length. In the
    detector's dtype, but `short_qkv` in fp32 whatever it is (FLOAT32_FIELDS)."""
    long_ring: torch.Tensor      # (rows, 2 x long layers, ring, D) grid steps' W x by grid number % ring
    short_ring: torch.Tensor     # (rows, S, D) fused steps by step % S
    short_qkv: torch.Tensor      # (rows, S, 3, D) their W x for the decoder's first self-attention
    memory_kv: torch.Tensor      # (rows, decoder layers, 2, Q1, D) the decoder's k/v in use
    next: EncodingRows           # the next long memory's encoding

    # The decoder's first self-attention keeps the top k of S keys per query: its q and k
    # rounded to bf16 flip near-ties between the k-th and (k+1)-th score, which was all of
    # bf16's worst-step error on the demo (0.084 -> 0.001 with them in fp32). They cost
    # one D x 3D product per new step (0.6% of a paper-size step's multiply-adds).
    FLOAT32_FIELDS = ("short_qkv",)

    @classmethod
    def zeros(cls, row_shapes: dict, device: torch.device, dtype: torch.dtype) -> "StreamState":
        """Zero rows of the shapes in `row_shapes` (one per field, `next` as a dict of its own)."""
        def zeros(shape, field_dtype=dtype):
            return torch.zeros(0, *shape, device=device, dtype=field_dtype)
        shapes = dict(row_shapes)
        upcoming = shapes.pop("next")
        return cls(**{name: zeros(shape, torch.float32 if name in cls.FLOAT32_FIELDS else dtype)
                      for name, shape in shapes.items()},
                   next=EncodingRows([zeros(s) for s in upcoming["tokens"]], zeros(upcoming["memory_kv"])))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, field by field (`next`'s in place of it)."""
        values = [getattr(self, f.name) for f in fields(self)]
        return [t for v in values for t in (v.tensors() if isinstance(v, EncodingRows) else [v])]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def grow(self, rows: int) -> None:
        """At least `rows` rows; new rows are zeros."""
        def grown(t):
            return torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])]) if rows > len(t) else t
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, value.map(grown) if isinstance(value, EncodingRows) else grown(value))


# -- what depends on the weights alone -----------------------------------------------------------

@dataclass
class _Constants:
    """Computed once per `refresh_weights` from the weights (exact identities, the model is frozen)."""
    model: nn.Module                  # the model served (bf16/fp16: a copy in that dtype; int8: a quantised copy)
    passes: list[EncoderPass]         # the encoder's structure (model.encoder.passes())
    long_proj: nn.Module              # D -> 2 x long layers x D: a grid step's W x for each k and v
    long_pos_kv: torch.Tensor         # (2 x long layers, L, D) W p + b per long slot
    latent_start: list[Optional[tuple[torch.Tensor, torch.Tensor]]]   # per pass with latent
                                      # queries: (x (1, Qp, D), q (1, Qp, D)) after its 1st self-attention
    short_proj: nn.Module             # D -> 3 x D: the decoder's first self-attention q/k/v W x (fp32)
    short_pos_qkv: torch.Tensor       # (S, 3, D) W p + b per short position (fp32)
    causal: torch.Tensor              # (1, S, S)
    decoder_layers: list[tuple[nn.Module, Optional[nn.Module]]]   # the served decoder's layers in
                                      # order, each with its stage's norm if it ends the stage

    @classmethod
    def of(cls, model: MALT, precision: str, dtype: torch.dtype) -> "_Constants":
        """From the fp32 `model`: constants computed in fp32, then rounded to `dtype` (the
        state's); the model served in `precision` (fp32: the model itself)."""
        passes = model.encoder.passes()
        long_layers = [layer for p in passes if p.memory is None for layer in p.stack.layers]
        long_projs = [proj for layer in long_layers for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)]
        first_sa = model.decoder.stages()[0].stack.layers[0].self_attn
        short_projs = [first_sa.q_proj, first_sa.k_proj, first_sa.v_proj]
        served = [model, _stacked_linear(long_projs)]
        if precision == "int8":
            kept = {id(m) for m in _int8_exempt(model, passes)}
            served = _quantized(dtype, *served, keep={f"0.{name}" for name, m in model.named_modules()
                                                      if id(m) in kept})
        elif dtype != torch.float32:
            served = [copy.deepcopy(m).to(dtype) for m in served]
        if served[0] is not model:
            # The input heads stay fp32 (<1% of the multiply-adds) and give fp32: raw
            # features are heavy-tailed and standardised inside the head (x - mean), which
            # bf16 inputs or one int8 scale per call would round away (most of the error,
            # measured); their output feeds the fp32 short_proj (StreamState.FLOAT32_FIELDS).
            for head in ("long_fusion", "short_fusion"):
                setattr(served[0], head, copy.deepcopy(getattr(model, head)))
        latent_start = [None if start is None else tuple(t.to(dtype) for t in start) for start in _latent_starts(passes)]
        return cls(served[0], served[0].encoder.passes(), served[1],
                   torch.stack([proj(model.long_pos) for proj in long_projs]).to(dtype), latent_start,
                   _stacked_linear(short_projs), torch.stack([p(model.short_pos) for p in short_projs], dim=1),
                   causal_mask(model.cfg.short_memory_steps, model.long_pos.device),
                   [(layer, stage.stack.norm if depth == len(stage.stack.layers) - 1 else None)
                    for stage in served[0].decoder.stages() for depth, layer in enumerate(stage.stack.layers)])


def _int8_exempt(model: MALT, passes: list[EncoderPass]) -> list[nn.Linear]:
    """The decoder's Linear layers that stay out of int8 (in the state's dtype), measured:
    every attention's out_proj (one int8 scale per call for their input, the attention
    contexts, was most of int8's worst-step error left on the demo: 0.081 -> 0.038; 13% of a
    paper-size step's multiply-adds), and the q/k projections of the attentions whose top-k
    selects among their keys (int8 q/k flip near-ties: the test model's worst step 0.069 ->
    0.04; at paper size k = 370 exceeds the decoder's 32 keys: none)."""
    tokens = _pass_tokens(passes)
    feature_tokens = [tokens[i] for i, p in enumerate(passes) if p.feature]
    exempt = []
    for stage in model.decoder.stages():
        for layer in stage.stack.layers:
            for attn, keys in ((layer.self_attn, model.cfg.short_memory_steps),
                               (layer.cross_attn, feature_tokens[stage.feature])):
                exempt.append(attn.out_proj)
                if attn.top_k is not None and attn.top_k < keys:
                    exempt += [attn.q_proj, attn.k_proj]
    return exempt


def _pass_tokens(passes: list[EncoderPass]) -> list[int]:
    """Tokens of each encoder pass's output: as many as its query (latent or an earlier pass)."""
    tokens: list[int] = []
    for p in passes:
        tokens.append(len(p.latent) if p.query is None else tokens[p.query])
    return tokens


def _latent_starts(passes: list[EncoderPass]) -> list[Optional[tuple[torch.Tensor, torch.Tensor]]]:
    # A pass whose query is the learned latent queries starts from constants: its first
    # layer's self-attention output and that layer's cross-attention query projection.
    starts = []
    for p in passes:
        if p.query is None:
            layer, latent = p.stack.layers[0], p.latent[None]                      # (1, Qp, D)
            sa = layer.self_attn
            x = layer.self_block(latent, sa.q_proj(latent), sa.k_proj(latent), sa.v_proj(latent))
            starts.append((x, layer.cross_attn.q_proj(x)))
        else:
            starts.append(None)
    return starts


# -- the long memory's encoding, spread over the steps before it is needed -------------------

class _EncodingBatch:
    """The encoding in progress of a batch of streams (state rows `slots` (B,)), each of one
    long memory (`long_steps` (B, L), -1 for padding). Reads a pass's tokens from the state
    once; `save` writes back what this batch computed."""

    def __init__(self, rows: EncodingRows, slots: torch.Tensor, long_steps: torch.Tensor):
        self.rows, self.slots, self.long_steps = rows, slots, long_steps
        self.computed: dict[int, torch.Tensor] = {}         # pass index -> (B, Qp, D)
        self.memory_kv: dict[int, torch.Tensor] = {}        # decoder layer -> (B, 2, Q1, D)

    def tokens(self, index: int) -> torch.Tensor:
        if index not in self.computed:
            self.computed[index] = self.rows.tokens[index][self.slots]
        return self.computed[index]

    def save(self) -> None:
        for index, value in self.computed.items():
            self.rows.tokens[index][self.slots] = value
        for layer, value in self.memory_kv.items():
            self.rows.memory_kv[self.slots, layer] = value


class EncoderSchedule:
    """The encoding of a long memory (f_1..f_N, then the decoder's cross-attention keys/values
    over them) as small ops on a batch of streams, walking the model's own structure
    (`HierarchicalEncoder.passes`, `Decoder.stages`), cut into `stride` parts of about equal
    time (`part_seconds`): each op is timed once, when the detector is built
    (`_measured_seconds`). Multiply-adds are not time: the top-k selection, the gathers, the
    int8 kernels and each op's fixed cost count for nothing in them, and an equal-FLOP split
    made one step of the cycle cost ~2x the others at paper size (docs/malt.md). Which part an
    op runs in changes no number, so outputs do not depend on how busy the machine was when
    the detector was built. (No op is split: an attention to the long memory run as two halves
    of its queries evened a single stream's steps, but gathered its keys twice, 10-35% of 64
    streams' throughput, and its halves round differently from the whole.) The encoding of the
    empty long memory, `empty_memory_kv`, is every stream's start (a constant)."""

    def __init__(self, constants: _Constants, state: StreamState, cfg: ModelConfig, ring_size: int):
        self.constants, self.state, self.cfg, self.ring_size = constants, state, cfg, ring_size
        ops = self._ops()
        empty = self._batch_of(-1)
        for op in ops:
            op(empty)
        self.empty_memory_kv = torch.stack([empty.memory_kv[i][0] for i in range(len(empty.memory_kv))])
        seconds, grid_seconds = self._measured_seconds(ops)
        # Part c runs on the c-th step of the cycle (part 0: the switch step); the step a grid
        # step arrives at also projects it (weight-bound products: ~1.6 ms at paper size, fp32).
        fixed = [0.0] * cfg.long_memory_stride
        fixed[(long_grid_phase(cfg) - next_long_memory_change(cfg.long_memory_steps, cfg)) % len(fixed)] = grid_seconds
        self.parts: list[list[Callable[[_EncodingBatch], None]]] = [[] for _ in range(cfg.long_memory_stride)]
        self.part_seconds = [0.0] * cfg.long_memory_stride
        for op, cost, part in zip(ops, seconds, _balanced_split(seconds, fixed)):
            self.parts[part].append(op)
            self.part_seconds[part] += cost

    def _batch_of(self, newest: int) -> _EncodingBatch:
        # The long memory whose newest step is `newest` (-1: empty), in state row 0; never saved.
        device = self.state.next.memory_kv.device
        return _EncodingBatch(self.state.next, torch.zeros(1, dtype=torch.long, device=device),
                              torch.as_tensor(long_memory_steps(newest, self.cfg), device=device)[None])

    def _measured_seconds(self, ops: list[Callable[[_EncodingBatch], None]]) -> tuple[list[float], float]:
        """(each op's seconds, a grid step's projection's seconds), on a full long memory of
        random features in state row 0 (restored after): every slot valid and scores without
        ties, so the top-k selection costs what it costs in a running stream (on the empty
        memory or on zero features, 5-10x less: its scores tie)."""
        ring, kept = self.state.long_ring[0], self.state.long_ring[0].clone()
        ring.normal_(generator=torch.Generator(ring.device).manual_seed(0))
        batch = self._batch_of(self.cfg.long_memory_steps - 1)         # its oldest slot: step >= 0
        rgb, flow = (torch.zeros(1, dim, device=ring.device) for dim in (self.cfg.rgb_dim, self.cfg.flow_dim))
        seconds = _shortest_seconds([functools.partial(op, batch) for op in ops]
                                    + [functools.partial(_grid_kv, self.constants, rgb, flow)], ring.device)
        ring.copy_(kept)
        return seconds[:-1], seconds[-1]

    def update(self, streams: list[_Stream], positions: np.ndarray) -> None:
        """Before stepping `streams` to `positions` (B,): each one's current long memory is
        encoded (normally it already is), then a share of its next one's encoding runs."""
        parts, cfg = len(self.parts), self.cfg
        switching = []
        for stream, t in zip(streams, positions):
            newest = long_memory_newest(t, cfg)
            if stream.encoded != newest:
                if stream.pending != newest:
                    stream.pending, stream.done = newest, 0
                stream.due = parts
                switching.append(stream)
        self._run(switching)
        for stream in switching:
            self.state.memory_kv[stream.slot] = self.state.next.memory_kv[stream.slot]
            stream.encoded, stream.pending, stream.done = stream.pending, None, 0
        ahead = []
        for stream, t in zip(streams, positions):
            switch = next_long_memory_change(t, cfg)
            newest = long_memory_newest(switch, cfg)
            if newest > t:          # its newest step has not arrived yet (stream start, or S < stride)
                continue
            if stream.pending != newest:
                stream.pending, stream.done = newest, 0
            stream.due = stream.done + -(-(parts - stream.done) // (switch - t))
            ahead.append(stream)
        self._run(ahead)

    def _run(self, streams: list[_Stream]) -> None:
        # Part c runs once, as one batch, for every stream that still has to run it now.
        device = self.state.memory_kv.device
        for c, ops in enumerate(self.parts):
            batch = [s for s in streams if s.done <= c < s.due]
            if not batch or not ops:
                continue
            long_steps = np.stack([long_memory_steps(s.pending, self.cfg) for s in batch])   # (B, L)
            work = _EncodingBatch(self.state.next, torch.as_tensor([s.slot for s in batch], device=device),
                                  torch.as_tensor(long_steps, device=device))
            for op in ops:
                op(work)
            work.save()
        for stream in streams:
            stream.done = max(stream.done, stream.due)

    def _ops(self) -> list[Callable[[_EncodingBatch], None]]:
        """Every pass of the encoder, layer by layer and sub-block by sub-block; after the pass
        that gives f_n, the keys/values of each decoder layer that attends to f_n."""
        model, starts = self.constants.model, self.constants.latent_start
        decoder_layers = [(stage.feature, layer) for stage in model.decoder.stages() for layer in stage.stack.layers]
        ops, long_layer, feature = [], 0, 0
        for index, p in enumerate(self.constants.passes):
            for depth, layer in enumerate(p.stack.layers):
                start = starts[index] if depth == 0 else None
                if start is None:
                    ops.append(_self_op(layer, p.query if depth == 0 else index, index))
                ops.append(self._cross_op(layer, index, p.memory, long_layer, start))
                ops.append(_ffn_op(layer, index))
                long_layer += p.memory is None
            ops.append(_norm_op(p.stack.norm, index))
            if p.feature:
                ops += [_memory_kv_op(layer, index, j) for j, (f, layer) in enumerate(decoder_layers) if f == feature]
                feature += 1
        return ops

    def _cross_op(self, layer, index: int, memory: Optional[int], long_layer: int, start):
        def run(batch: _EncodingBatch) -> None:
            if memory is None:
                k, v = self._long_kv(batch, long_layer)                                   # (B, L, D) x 2
                allowed = (batch.long_steps >= 0)[:, None]                                # (B, 1, L)
            else:
                m, ca, allowed = batch.tokens(memory), layer.cross_attn, None
                k, v = ca.k_proj(m), ca.v_proj(m)
            if start is None:
                x, q = batch.tokens(index), None                                          # (B, Q, D)
            else:               # first layer on latent queries: constant input and query projection
                x, q = (t.expand(len(batch.slots), -1, -1) for t in start)
            batch.computed[index] = layer.cross_block(x, k, v, allowed, q=q)              # (B, Q, D)
        return run

    def _long_kv(self, batch: _EncodingBatch, long_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Layer `long_layer`'s keys/values over the long memory: the grid steps' W x, + W p + b.
        ring_rows = batch.long_steps // self.cfg.long_memory_stride % self.ring_size     # (B, L)
        rows = self.state.long_ring[batch.slots[:, None], 2 * long_layer: 2 * long_layer + 2, ring_rows]
        pos_kv = self.constants.long_pos_kv
        return rows[:, :, 0] + pos_kv[2 * long_layer], rows[:, :, 1] + pos_kv[2 * long_layer + 1]


def _shortest_seconds(calls: list[Callable[[], object]], device: torch.device, rounds: int = 5) -> list[float]:
    """Each call's shortest wall time of `rounds` runs of all of them in turn (other work
    sharing the cores only ever adds time), after one untimed run (warm-up)."""
    seconds = np.zeros((rounds + 1, len(calls)))
    for run in seconds:
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)                # (kernels run asynchronously)
            run[i] = time.perf_counter() - start
    return list(seconds[1:].min(axis=0))


def _self_op(layer, source: int, index: int):
    def run(batch: _EncodingBatch) -> None:
        sa, h = layer.self_attn, batch.tokens(source)
        batch.computed[index] = layer.self_block(h, sa.q_proj(h), sa.k_proj(h), sa.v_proj(h))
    return run


def _ffn_op(layer, index: int):
    def run(batch: _EncodingBatch) -> None:
        batch.computed[index] = layer.ffn_block(batch.tokens(index))
    return run


def _norm_op(norm: nn.Module, index: int):
    def run(batch: _EncodingBatch) -> None:
        batch.computed[index] = norm(batch.tokens(index))
    return run


def _memory_kv_op(layer, index: int, decoder_layer: int):
    def run(batch: _EncodingBatch) -> None:
        f = batch.tokens(index)                                                           # (B, Q1, D)
        batch.memory_kv[decoder_layer] = torch.stack([layer.cross_attn.k_proj(f), layer.cross_attn.v_proj(f)], 1)
    return run


# -- the decoder, every step ---------------------------------------------------------------------

def _grid_kv(constants: _Constants, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Grid steps rgb (G, Dr), flow (G, Df) -> (G, 2 x long layers, D): each one's W x for every
    key/value projection of the long memory (fused by the fp32 long head, then in the state's dtype)."""
    fused = constants.model.long_fusion(rgb, flow)                                     # (G, D) fp32
    return constants.long_proj(fused.to(constants.long_pos_kv.dtype)).view(*fused.shape[:1], -1, fused.shape[-1])


def _decode_newest(constants: _Constants, state: StreamState, slots: torch.Tensor,
                   positions: np.ndarray) -> torch.Tensor:
    """Logits (B, C+1) of the newest step of the streams in state rows `slots` (B,) at
    `positions` (B,): the model's decoder stages over each short memory."""
    model, short = constants.model, len(constants.short_pos_qkv)
    device = slots.device
    count = np.minimum(positions + 1, short)                # steps in each short memory
    # Position i holds step t - count + 1 + i; in a young stream positions past its newest
    # step hold leftovers, hidden from it by the causal mask.
    ring_rows = (positions - count + 1)[:, None] + np.arange(short)                # (B, S)
    index = (slots[:, None], torch.as_tensor(ring_rows % short, device=device))
    x = state.short_ring[index] + model.short_pos                                  # (B, S, D)
    qkv = state.short_qkv[index] + constants.short_pos_qkv                         # (B, S, 3, D) fp32
    memory_kv = state.memory_kv[slots]                                             # (B, layers, 2, Q1, D)
    newest = torch.as_tensor(count - 1, device=device)                             # (B,)
    rows = torch.arange(len(slots), device=device)
    layers = constants.decoder_layers
    for j, (layer, stage_norm) in enumerate(layers):
        last = j == len(layers) - 1         # only the newest step is output: causal masking
        if j == 0:                          # makes running the last layer for it alone exact
            q, k, v = qkv.unbind(2)                       # (B, S, D) each; top-k on fp32 scores
            v = v.to(x.dtype)                             # the weighted sum in the model's dtype
            q = q[rows, newest][:, None] if last else q
        else:
            sa = layer.self_attn
            k, v = sa.k_proj(x), sa.v_proj(x)
            q = sa.q_proj(x[rows, newest][:, None] if last else x)
        if last:
            x, mask = x[rows, newest][:, None], constants.causal[0, newest][:, None]   # (B, 1, D), (B, 1, S)
        else:
            mask = constants.causal
        x = layer.self_block(x, q, k, v, mask)
        x = layer.cross_block(x, *memory_kv[:, j].unbind(1))
        x = layer.ffn_block(x)
        if stage_norm is not None:
            x = stage_norm(x)
    return model.classifier(x)[:, 0]


# -- the detectors -------------------------------------------------------------------------------

class FromCheckpoint:
    """The one `from_checkpoint` of every detector: this module's and `vidpipe.Detector`."""

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: Optional[str | torch.device] = None, **kwargs):
        """The detector of a trained checkpoint (malt.checkpoint.load_model; device None: cuda
        when present); `kwargs` go to the detector."""
        from vidpipe.malt.checkpoint import load_model
        model, checkpoint = load_model(path, device)
        return cls.from_loaded(model, checkpoint, path, **kwargs)

    @classmethod
    def from_loaded(cls, model: MALT, checkpoint, path: str | Path, **kwargs):
        """The detector of a loaded checkpoint's model (a detector that needs more of the
        checkpoint, e.g. its class names, overrides this)."""
        return cls(model, **kwargs)


class MultiStreamDetector(FromCheckpoint):
    """One MALT serving many independent streams; the streams that have a new step run as one batch.

    The model is moved to `device` (default: where its parameters are) and put in eval mode.
    `max_streams` caps the streams served at once (state for them is allocated up front);
    None grows the state as streams join. `precision`: fp32 (exact) | bf16 | fp16 (CUDA) |
    int8 (CPU) | auto (module notes); `int8=True` is `precision="int8"`. The model given is
    moved to `device` in fp32 (whatever its dtype); the detector serves a copy in the
    precision. Call `refresh_weights()` after changing the model's weights.
    """

    def __init__(self, model: MALT, device: Optional[str | torch.device] = None,
                 max_streams: Optional[int] = None, int8: bool = False, precision: str = "fp32"):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if int8 and precision not in ("fp32", "int8"):
            raise VidpipeError(f"int8=True is precision='int8': it contradicts precision='{precision}'")
        self.precision = resolve_precision("int8" if int8 else precision, self.device, int8_ok=True)
        self.source_model = model.to(self.device, torch.float32).eval()
        self.cfg = model.cfg
        self.dtype = self._state_dtype()              # of the state and the constants
        self._slots = _Slots(max_streams)
        # Grid steps kept: the L in the long memory plus those still in the short memory
        # (at most ceil(S / stride)), which enter the long memory later.
        self.ring_size = num_long_tokens(self.cfg) + -(-self.cfg.short_memory_steps // self.cfg.long_memory_stride)
        self.refresh_weights()

    def _state_dtype(self) -> torch.dtype:
        if self.precision == "int8":   # around the int8 Linear layers: bf16 where native, else fp32
            return torch.bfloat16 if device_capabilities(self.device).bf16 else torch.float32
        return DTYPES[self.precision]

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    def describe_precision(self) -> str:
        """What runs, for the records: e.g. 'int8 Linear layers, the rest bfloat16'."""
        rest = str(self.dtype).replace("torch.", "")
        return f"int8 Linear layers, the rest {rest}" if self.int8 else rest

    @property
    def streams(self) -> list[Hashable]:
        return list(self._slots.streams)

    @property
    def max_streams(self) -> Optional[int]:
        return self._slots.max_streams

    @property
    def model(self) -> nn.Module:
        """The model served: the source model, or its int8 copy."""
        return self.constants.model

    def position(self, key: Hashable) -> int:
        """Steps the stream `key` has consumed."""
        return self._slots.get(key).steps_seen

    # -- streams joining and leaving ---------------------------------------------------------

    @torch.inference_mode()
    def add_stream(self, key: Hashable) -> None:
        """A new stream at position 0 (empty memories), stepping from the next `step` on."""
        stream = self._slots.add(key)
        if stream.slot >= len(self.state.memory_kv):
            self.state.grow(max(2 * len(self.state.memory_kv), stream.slot + 1))
        self._start(stream)

    def remove_stream(self, key: Hashable) -> None:
        """Stop serving `key`; its state rows go to the next stream that joins."""
        self._slots.remove(key)

    @torch.inference_mode()
    def refresh_weights(self) -> None:
        """The model's weights changed: recompute what depends on them; every stream
        restarts at position 0."""
        self.constants = _Constants.of(self.source_model, self.precision, self.dtype)
        self.state = StreamState.zeros(self._row_shapes(), self.device, self.dtype)
        self.state.grow(self._slots.rows_needed())
        self.schedule = EncoderSchedule(self.constants, self.state, self.cfg, self.ring_size)
        for stream in self._slots.streams.values():
            self._start(stream)

    def _row_shapes(self) -> dict:
        cfg, d, passes = self.cfg, self.cfg.d_model, self.constants.passes
        long_layers = sum(len(p.stack.layers) for p in passes if p.memory is None)
        decoder_layers = sum(len(stage.stack.layers) for stage in self.constants.model.decoder.stages())
        tokens = _pass_tokens(passes)
        num_features = tokens[max(i for i, p in enumerate(passes) if p.feature)]
        return {"long_ring": (2 * long_layers, self.ring_size, d),
                "short_ring": (cfg.short_memory_steps, d),
                "short_qkv": (cfg.short_memory_steps, 3, d),
                "memory_kv": (decoder_layers, 2, num_features, d),
                "next": {"tokens": [(q, d) for q in tokens], "memory_kv": (decoder_layers, 2, num_features, d)}}

    def _start(self, stream: _Stream) -> None:
        # Position 0: the long memory is empty, whose encoding is a constant.
        stream.steps_seen, stream.encoded, stream.pending, stream.done = 0, -1, None, 0
        self.state.memory_kv[stream.slot] = self.schedule.empty_memory_kv

    # -- stepping --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, inputs: dict[Hashable, tuple]) -> dict[Hashable, np.ndarray]:
        """{key: (rgb_vec (Dr,), flow_vec (Df,))} for the streams that have a new step ->
        {key: probabilities (C+1,)} of that step. Streams not named keep their state."""
        if not inputs:
            return {}
        keys = list(inputs)
        streams = [self._slots.get(key) for key in keys]
        vectors = [[self._as_tensor(x) for x in inputs[key]] for key in keys]
        for rgb_vec, flow_vec in vectors:
            self._check_dims(rgb_vec, flow_vec)
        rgb = torch.stack([r for r, _ in vectors])[:, None]                     # (B, 1, Dr)
        flow = torch.stack([f for _, f in vectors])[:, None]                    # (B, 1, Df)
        positions = np.array([s.steps_seen for s in streams])
        self._push(streams, positions, rgb, flow)
        self.schedule.update(streams, positions)
        slots = torch.as_tensor([s.slot for s in streams], device=self.device)
        logits = _decode_newest(self.constants, self.state, slots, positions)    # (B, C+1)
        probs = self.model.probabilities(logits).cpu().numpy()                   # (B, C+1)
        return dict(zip(keys, probs))

    @torch.inference_mode()
    def feed_history(self, key: Hashable, rgb: np.ndarray, flow: np.ndarray) -> None:
        """Consume T past steps rgb (T, Dr), flow (T, Df) of stream `key` without computing
        their outputs: afterwards the stream is in the state that T steps leave (the buffers
        hold the same rows, up to the rounding of batched matrix products); its next step
        encodes its long memory whole. A fast way to resume a stream or to measure a long one.
        """
        stream = self._slots.get(key)
        # Older steps would be overwritten anyway (the ring spans ring_size * stride >= S steps).
        keep = min(len(rgb), self.ring_size * self.cfg.long_memory_stride)
        stream.steps_seen += len(rgb) - keep
        stream.encoded = stream.pending = None
        self._push([stream], np.array([stream.steps_seen]),
                   self._as_tensor(rgb[len(rgb) - keep:])[None], self._as_tensor(flow[len(flow) - keep:])[None])

    # -- new steps in -----------------------------------------------------------------------

    def _push(self, streams: list[_Stream], positions: np.ndarray, rgb: torch.Tensor,
              flow: torch.Tensor) -> None:
        # rgb (B, T, Dr), flow (B, T, Df): T new steps of each stream from `positions` (B,) on.
        # Fuse and project each step once; grid steps by grid number, every step by step % S.
        self._check_dims(rgb, flow)
        model, state, (batch, count) = self.model, self.state, rgb.shape[:2]
        stride, short = self.cfg.long_memory_stride, self.cfg.short_memory_steps
        as_index = lambda a: torch.as_tensor(a, device=self.device)            # noqa: E731
        slots = np.array([s.slot for s in streams])[:, None].repeat(count, 1)           # (B, T)
        steps = positions[:, None] + np.arange(count)                                    # (B, T)
        grid = is_grid_step(steps, self.cfg)                     # only these ever enter M_L
        if grid.any():
            ring_rows = as_index(steps[grid] // stride % self.ring_size)
            state.long_ring[as_index(slots[grid]), :, ring_rows] = _grid_kv(self.constants, rgb[as_index(grid)],
                                                                            flow[as_index(grid)])
        recent = min(count, short)                  # only these can be in the short memory
        fused = model.short_fusion(rgb[:, count - recent:], flow[:, count - recent:])   # (B, T', D) fp32
        slots, ring_rows = as_index(slots[:, count - recent:]), as_index(steps[:, count - recent:] % short)
        state.short_ring[slots, ring_rows] = fused.to(self.dtype)
        state.short_qkv[slots, ring_rows] = self.constants.short_proj(fused).view(batch, recent, 3, -1)
        for stream in streams:
            stream.steps_seen += count

    def _as_tensor(self, x) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else np.asarray(x)
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)   # the input heads are fp32

    def _check_dims(self, rgb: torch.Tensor, flow: torch.Tensor) -> None:
        if rgb.shape[-1] != self.cfg.rgb_dim or flow.shape[-1] != self.cfg.flow_dim:
            raise VidpipeError(f"features have {rgb.shape[-1]} rgb + {flow.shape[-1]} flow dims, the "
                               f"model expects {self.cfg.rgb_dim} + {self.cfg.flow_dim}: features "
                               f"from a different extractor than the model was trained on?")


class OnlineDetector(FromCheckpoint):
    """Feed one step of features at a time; get that step's class probabilities.

    A `MultiStreamDetector` serving one stream: the same code and numbers. The model is moved
    to `device` (default: where its parameters are) and put in eval mode. Call `restart()`
    before a new stream, `refresh_weights()` after changing the model's weights.
    """

    def __init__(self, model: MALT, device: Optional[str | torch.device] = None, int8: bool = False,
                 precision: str = "fp32"):
        self.multistream = MultiStreamDetector(model, device, max_streams=1, int8=int8, precision=precision)
        self.multistream.add_stream(0)
        self.cfg, self.device = self.multistream.cfg, self.multistream.device

    @property
    def steps_seen(self) -> int:
        return self.multistream.position(0)

    def restart(self) -> None:
        """Forget the stream: the next step is step 0 of a new one."""
        self.multistream.remove_stream(0)
        self.multistream.add_stream(0)

    def refresh_weights(self) -> None:
        """The model's weights changed (MultiStreamDetector.refresh_weights); restarts the stream."""
        self.multistream.refresh_weights()

    def step(self, rgb_vec, flow_vec) -> np.ndarray:
        """Consume the next step's rgb (Dr,) and flow (Df,) vectors -> probabilities (C+1,)."""
        return self.multistream.step({0: (rgb_vec, flow_vec)})[0]

    def feed_history(self, rgb: np.ndarray, flow: np.ndarray) -> None:
        """Consume T past steps rgb (T, Dr), flow (T, Df) without computing their outputs
        (MultiStreamDetector.feed_history)."""
        self.multistream.feed_history(0, rgb, flow)


# -- helpers -----------------------------------------------------------------------------------------

def _balanced_split(costs: list[float], fixed: list[float]) -> list[int]:
    """The part (0..len(fixed)-1) of each item when `costs` is cut into len(fixed) consecutive
    runs, run k also costing `fixed[k]`: the costliest run is the cheapest possible, and among
    the cuts that give it the runs are kept even (the smallest sum of squares found). A run
    may be empty: with one item costlier than the rest's share, it is better alone beside a
    run that holds only its fixed cost than on top of it. Dynamic programming over where each
    run starts, comparing (costliest run, sum of squares)."""
    count = len(costs)
    prefix = np.concatenate([[0], np.cumsum(costs)])
    best = {(0, 0): (0.0, 0.0)}          # (k, i): the first i items in k runs -> their score
    start = {}                           # (k, i): where the k-th run starts in that cut
    for k in range(1, len(fixed) + 1):
        for i in range(count + 1):
            options = {}
            for j in range(i + 1):
                if (k - 1, j) in best:
                    run = prefix[i] - prefix[j] + fixed[k - 1]
                    worst, squares = best[k - 1, j]
                    options[j] = (max(worst, run), squares + run * run)
            start[k, i] = min(options, key=options.get)
            best[k, i] = options[start[k, i]]
    labels, end = [0] * count, count
    for k in range(len(fixed), 0, -1):
        labels[start[k, end]:end] = [k - 1] * (end - start[k, end])
        end = start[k, end]
    return labels


def _stacked_linear(projs: list[nn.Linear]) -> nn.Linear:
    """One bias-free Linear computing the weight products of several: x -> [W_1 x, W_2 x, ...]."""
    weight = torch.cat([p.weight for p in projs])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    stacked.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return stacked.eval()


def _quantized(dtype: torch.dtype, *modules: nn.Module, keep: set[str] = frozenset()) -> list[nn.Module]:
    """Copies with every Linear but those named in `keep` ("i.name": module i's submodule) as
    torch's dynamic int8 Linear (weights int8 per output channel, activations quantised per
    call; fbgemm / oneDNN kernels, VNNI where the CPU has it) and everything else in `dtype`.
    The int8 kernels take and give fp32: in a bf16 model each one converts at its edges
    (`_Float32Edges`)."""
    with warnings.catch_warnings():          # torch marks eager quantisation deprecated (-> torchao)
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        # (a bare Linear is wrapped: quantize_dynamic swaps submodules only)
        quantized = quantize_dynamic(nn.ModuleList([copy.deepcopy(m) for m in modules]),
                                     {nn.Linear: per_channel_dynamic_qconfig, **dict.fromkeys(keep)})
    if dtype != torch.float32:
        quantized.to(dtype)                  # norms, positions, latent queries (int8 weights stay)
        for parent in list(quantized.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, DynamicLinear):
                    setattr(parent, name, _Float32Edges(child, dtype))
    return list(quantized)


class _Float32Edges(nn.Module):
    """An fp32 module inside a `dtype` model: inputs -> module(inputs in fp32) in `dtype`."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*(x.float() for x in inputs)).to(self.dtype)
