"""Model size and cost: parameters per block and multiply-adds per streaming step / window.

Multiply-adds are measured, not estimated: torch's FlopCounterMode counts the matrix
products (linear, bmm, ...) that actually run, on random inputs; element-wise work
(softmax, top-k, LayerNorm) is not counted and is small next to them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from vidpipe.malt.config import ModelConfig, load_run_config, validate_model_config
from vidpipe.malt.model import MALT, Decoder
from vidpipe.malt.stream import OnlineDetector
from vidpipe.malt.window import gather_window

__all__ = ["ModelInfo", "count_macs", "count_params", "describe_model", "format_info",
           "model_info", "parameter_counts"]


@dataclass
class ModelInfo:
    params: dict[str, int]          # block -> parameter count, ending with 'total'
    decoder_params: dict[str, int]  # 'recurrent' / 'cascaded' -> decoder parameters for this config
    # Measured multiply-adds (None when only parameters were asked for):
    macs_per_step: Optional[int] = None    # streaming step once both memories are full, mean over steps
    macs_max_step: Optional[int] = None    # the costliest step of a cycle of long_memory_stride steps
    macs_min_step: Optional[int] = None    # the cheapest (the encoder's work is spread over the cycle)
    macs_per_window: Optional[int] = None  # offline forward of one full window (= recompute per step)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(fn) -> int:
    """Multiply-adds of the matrix products that `fn()` runs. Call it outside no_grad /
    inference_mode: FlopCounterMode's module tracker fails under them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def parameter_counts(cfg: ModelConfig) -> ModelInfo:
    """Parameters per block, counted on a model built on the meta device (no memory, no
    initialisation work: instant at paper size)."""
    with torch.device("meta"):
        model = MALT(cfg)
        decoder_params = {kind: count_params(Decoder(dataclasses.replace(cfg, decoder=kind)))
                          for kind in ("recurrent", "cascaded")}
    learned_positions = sum(p.numel() for p in (model.long_pos, model.short_pos)
                            if isinstance(p, torch.nn.Parameter))   # sinusoidal: buffers, no parameters
    params = {"input fusion + positions": count_params(model.long_fusion) + count_params(model.short_fusion)
              + learned_positions}
    for n, branch in enumerate(model.encoder.branches, start=1):
        params[f"encoder branch {n}"] = count_params(branch)
    params[f"decoder ({cfg.decoder}, {cfg.num_branches} stages)"] = count_params(model.decoder)
    params["classifier"] = count_params(model.classifier)
    params["total"] = count_params(model)
    return ModelInfo(params, decoder_params)


def model_info(cfg: ModelConfig, seed: int = 0) -> ModelInfo:
    """Parameters per block and the multiply-adds measured on a random model."""
    info = parameter_counts(cfg)
    torch.manual_seed(seed)
    model = MALT(cfg).eval()
    # Random features long enough that both memories are full, then one whole cycle of
    # `long_memory_stride` steps: the encoder of the next long memory is spread over it
    # (malt.stream). The cycle before it settles the schedule after feed_history.
    full, stride = cfg.long_memory_steps + cfg.short_memory_steps, cfg.long_memory_stride
    rng = np.random.default_rng(seed)
    rgb = rng.standard_normal((full + 2 * stride, cfg.rgb_dim), dtype=np.float32)
    flow = rng.standard_normal((full + 2 * stride, cfg.flow_dim), dtype=np.float32)
    detector = OnlineDetector(model, device="cpu")
    detector.feed_history(rgb[:full], flow[:full])
    for t in range(full, full + stride):
        detector.step(rgb[t], flow[t])
    cycle = [count_macs(lambda: detector.step(rgb[t], flow[t]))
             for t in range(full + stride, full + 2 * stride)]
    window = [torch.as_tensor(a)[None] for a in gather_window(rgb, flow, full, cfg)]
    return dataclasses.replace(info, macs_per_step=sum(cycle) // stride, macs_max_step=max(cycle),
                               macs_min_step=min(cycle), macs_per_window=count_macs(lambda: model(*window)))


def format_info(info: ModelInfo) -> str:
    width = max(len(name) for name in info.params) + 2
    lines = [f"{'block':<{width}}{'parameters':>14}"]
    lines += [f"{name:<{width}}{count:>14,}" for name, count in info.params.items()]
    rec, cas = info.decoder_params["recurrent"], info.decoder_params["cascaded"]
    lines += ["",
              f"decoder parameters: recurrent {rec:,} vs cascaded {cas:,} "
              f"({cas - rec:,} fewer, {cas / rec:.1f}x)"]
    if info.macs_per_step is None:
        return "\n".join(lines)
    lines += [f"multiply-adds per streaming step: {_giga(info.macs_per_step)} on average "
              f"({_giga(info.macs_min_step)} to {_giga(info.macs_max_step)}: the encoder's work "
              f"is spread over the steps before each long-memory change)",
              f"multiply-adds per window (recompute from scratch): {_giga(info.macs_per_window)} "
              f"({info.macs_per_window / info.macs_per_step:.1f}x a streaming step)"]
    return "\n".join(lines)


def _giga(count: int) -> str:
    return f"{count / 1e9:.3f} G" if count >= 1e8 else f"{count / 1e6:.2f} M"


def describe_model(config_path=None, overrides=(), macs: bool = True) -> str:
    """`vidpipe model-info`: load the config (file + dotted overrides); the table as text
    (`macs=False`: parameters only, without building a real model)."""
    loaded = load_run_config(config_path, overrides)
    validate_model_config(loaded.config.model, loaded.source)   # names the --set or the file
    cfg = loaded.config.model
    return format_info(model_info(cfg) if macs else parameter_counts(cfg))
