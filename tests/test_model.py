"""MALT model: shapes for every ablation, causality, decoder sharing (windows: test_window.py;
config checks: test_malt_config.py; model-info: test_info.py)."""
import numpy as np
import pytest
import torch

from vidpipe.malt.model import Decoder, TransformerStack, layer_kwargs
from vidpipe.malt.window import num_long_tokens, window_indices
from model_helpers import offline_probs, random_video, tiny_config, tiny_model


def random_batch(cfg, batch=2, num_short=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, S = num_long_tokens(cfg), num_short or cfg.short_memory_steps
    valid = torch.ones(batch, L, dtype=torch.bool)
    valid[0, :2] = False                                # padding at the oldest slots
    return (torch.randn(batch, L, cfg.rgb_dim, generator=g), torch.randn(batch, L, cfg.flow_dim, generator=g),
            valid, torch.randn(batch, S, cfg.rgb_dim, generator=g), torch.randn(batch, S, cfg.flow_dim, generator=g))


@pytest.mark.parametrize("num_branches", [1, 2, 3, 4])
@pytest.mark.parametrize("sparse_k", [3, None])
@pytest.mark.parametrize("decoder", ["recurrent", "cascaded"])
def test_every_ablation_runs_forward_and_backward(num_branches, sparse_k, decoder):
    model = tiny_model(num_branches=num_branches, sparse_k=sparse_k, decoder=decoder).train()
    cfg = model.cfg
    for num_short in (cfg.short_memory_steps, 2):       # full window, and one near the video start
        out = model(*random_batch(cfg, num_short=num_short))
        assert out.logits.shape == (2, num_short, cfg.num_classes)
        assert len(out.aux_logits) == num_branches
        assert all(a.shape == (2, cfg.branch_queries[0], cfg.num_classes) for a in out.aux_logits)
        loss = out.logits.logsumexp(-1).sum() + sum(a.logsumexp(-1).sum() for a in out.aux_logits)
        model.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.encoder.branches[-1].queries.grad.abs().sum() > 0


def test_empty_long_memory_gives_finite_outputs_and_gradients():
    model = tiny_model().train()
    batch = list(random_batch(model.cfg))
    batch[2] = torch.zeros_like(batch[2])               # no valid long-memory slot at all
    out = model(*batch)
    assert torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_slot_contents_do_not_matter():
    model = tiny_model()
    rgb_l, flow_l, valid, rgb_s, flow_s = random_batch(model.cfg)
    noisy_rgb, noisy_flow = rgb_l.clone(), flow_l.clone()
    noisy_rgb[~valid] = 100.0
    noisy_flow[~valid] = -7.0
    with torch.no_grad():
        a = model(rgb_l, flow_l, valid, rgb_s, flow_s)
        b = model(noisy_rgb, noisy_flow, valid, rgb_s, flow_s)
    torch.testing.assert_close(a.logits, b.logits)


def test_short_memory_is_causal_within_a_window():
    model = tiny_model()
    batch = list(random_batch(model.cfg))
    with torch.no_grad():
        before = model(*batch).logits
        batch[3] = batch[3].clone()
        batch[3][:, 2:] += 3.0                          # change short steps 2, 3
        after = model(*batch).logits
    torch.testing.assert_close(before[:, :2], after[:, :2])
    assert not torch.allclose(before[:, 2:], after[:, 2:])


@pytest.mark.parametrize("changes", [{}, {"num_branches": 3, "decoder": "cascaded", "sparse_k": None}])
def test_offline_outputs_up_to_t_ignore_features_after_t(changes):
    model = tiny_model(**changes)
    rgb, flow = random_video(45, model.cfg)
    t0 = 30
    before = offline_probs(model, rgb, flow, range(t0 + 1))
    rgb2, flow2 = rgb.copy(), flow.copy()
    rgb2[t0 + 1:] += 5.0
    flow2[t0 + 1:] = -flow2[t0 + 1:]
    np.testing.assert_array_equal(before, offline_probs(model, rgb2, flow2, range(t0 + 1)))
    assert not np.allclose(offline_probs(model, rgb, flow, [44]), offline_probs(model, rgb2, flow2, [44]))


def test_long_memory_reaches_the_output():
    model = tiny_model()
    rgb, flow = random_video(40, model.cfg)
    long_idx, _ = window_indices(39, model.cfg)
    rgb2 = rgb.copy()
    rgb2[long_idx[0]] += 4.0                            # only the oldest long-memory step changes
    assert not np.allclose(offline_probs(model, rgb, flow, [39]), offline_probs(model, rgb2, flow, [39]))


def test_sparse_attention_changes_the_model():
    sparse, vanilla = tiny_model(sparse_k=2), tiny_model(sparse_k=None)
    vanilla.load_state_dict(sparse.state_dict())
    batch = random_batch(sparse.cfg)
    with torch.no_grad():
        assert not torch.allclose(sparse(*batch).logits, vanilla(*batch).logits, atol=1e-4)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("num_branches", [1, 2, 3, 4])
@pytest.mark.parametrize("decoder_layers", [1, 2])
def test_recurrent_decoder_has_one_stage_of_parameters_cascaded_has_n(num_branches, decoder_layers):
    cfg = tiny_config(num_branches=num_branches, decoder_layers=decoder_layers)
    one_stage = count(TransformerStack(cfg.d_model, decoder_layers, **layer_kwargs(cfg)))
    recurrent = Decoder(cfg)
    cascaded = Decoder(tiny_config(num_branches=num_branches, decoder_layers=decoder_layers,
                                            decoder="cascaded"))
    assert count(recurrent) == one_stage
    assert count(cascaded) == num_branches * one_stage
    assert len({id(s) for s in recurrent.stage_stacks()}) == 1
    assert len({id(s) for s in cascaded.stage_stacks()}) == num_branches
