"""MALT model: shapes for every ablation, causality, decoder sharing, config errors, info.
Windows: test_window.py."""
import numpy as np
import pytest
import torch

from vidpipe.malt.config import Config, validate_model_config
from vidpipe.malt.info import model_info
from vidpipe.malt.model import MALT, Decoder, TransformerStack, layer_kwargs
from vidpipe.malt.window import num_long_tokens, window_indices
from vidpipe.core.config import load_config
from vidpipe.core.errors import VidpipeError
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


@pytest.mark.parametrize("override, key", [
    ("model.num_branches=5", "model.num_branches"),
    ("model.num_branches=0", "model.num_branches"),
    ("model.branch_queries=[32]", "model.branch_queries"),
    ("model.branch_queries=[16, 16]", "model.branch_queries"),   # aux loss needs 32 = short memory
    ("model.branch_layers=[1, 0]", "model.branch_layers"),
    ("model.sparse_k=0", "model.sparse_k"),
    ("model.num_heads=7", "model.num_heads"),
    ("model.long_memory_stride=3", "model.long_memory_stride"),
    ("model.dropout=1.5", "model.dropout"),
])
def test_invalid_model_config_is_a_one_line_error_naming_the_key(override, key):
    cfg = load_config(Config, None, [override]).model
    with pytest.raises(VidpipeError) as info:
        MALT(cfg)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_aux_query_count_is_free_when_aux_loss_is_off():
    cfg = load_config(Config, None, ["model.branch_queries=[16, 16]", "model.aux_loss=false"]).model
    validate_model_config(cfg)


def test_model_info_counts_blocks_and_shows_recurrent_is_smaller():
    cfg = tiny_config(num_branches=3)
    info = model_info(cfg)
    total = info.params.pop("total")
    assert total == sum(info.params.values()) == count(MALT(cfg))
    assert info.decoder_params["cascaded"] == 3 * info.decoder_params["recurrent"]
    assert 0 < info.macs_per_step < info.macs_per_window
    # The encoder's work is spread over each cycle of long_memory_stride steps.
    assert 0 < info.macs_min_step <= info.macs_per_step <= info.macs_max_step < info.macs_per_window


def test_model_info_cli(capsys):
    from vidpipe.pipeline.cli import main
    main(["model-info", "--set", "model.d_model=32", "--set", "model.ffn_dim=32",
          "--set", "model.long_memory_steps=64", "--set", "model.short_memory_steps=8",
          "--set", "model.branch_queries=[8, 4]", "--set", "model.rgb_dim=8", "--set", "model.flow_dim=8"])
    out = capsys.readouterr().out
    assert "encoder branch 2" in out and "recurrent" in out and "cascaded" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["model-info", "--set", "model.num_branches=9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.num_branches" in err and "\n" not in err
