"""Tiny MALT configs and random features for CPU-fast model/stream tests."""
import dataclasses

import numpy as np
import torch

from vidpipe.malt.config import ModelConfig
from vidpipe.malt.model import MALT

TINY = ModelConfig(rgb_dim=6, flow_dim=5, num_classes=4, d_model=16, num_heads=2, ffn_dim=24,
                   dropout=0.1, long_memory_steps=16, long_memory_stride=4, short_memory_steps=4,
                   sparse_k=3, num_branches=2, branch_queries=[4, 3, 2, 5],
                   branch_layers=[1, 2, 1, 2], decoder="recurrent", decoder_layers=1,
                   # learned positions and small queries keep these random models' outputs
                   # unsaturated; the paper's switches are tested in test_stream.py too
                   pos_encoding="learned", query_init="trunc_normal")


def tiny_config(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def tiny_model(seed=0, **changes) -> MALT:
    """A random-init tiny model in eval mode, with logits scaled up so that probabilities
    differ clearly between classes (a near-uniform output would hide errors)."""
    torch.manual_seed(seed)
    model = MALT(tiny_config(**changes)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)
    return model


def random_video(num_steps, cfg, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((num_steps, cfg.rgb_dim), dtype=np.float32),
            rng.standard_normal((num_steps, cfg.flow_dim), dtype=np.float32))


def offline_probs(model, rgb, flow, steps):
    """Offline forward on the window ending at each step; probabilities of its last step.

    Windows of equal length are batched (one forward per short-memory length)."""
    from vidpipe.malt.window import gather_window
    windows = {t: gather_window(rgb, flow, t, model.cfg) for t in steps}
    probs = {}
    for length in sorted({len(w.rgb_short) for w in windows.values()}):
        group = [t for t, w in windows.items() if len(w.rgb_short) == length]
        batch = [torch.as_tensor(np.stack(parts)) for parts in zip(*(windows[t] for t in group))]
        with torch.no_grad():
            out = model(*batch).logits[:, -1].softmax(-1).numpy()
        probs.update(zip(group, out))
    return np.stack([probs[t] for t in steps])
