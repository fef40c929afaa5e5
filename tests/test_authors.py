"""The authors' run (issue 16): each remaining difference from the MALT authors' code
(yzp11/MALT-for-Online-Action-Detection at f910dd9, an LSTR fork) is a switch, checked here
against a restatement of their code (the file and lines are named at each restatement)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from vidpipe.malt.attention import SparseCrossAttention
from vidpipe.malt.losses import malt_loss
from vidpipe.malt.model import MALT, lstr_attention_init
from model_helpers import tiny_config


# -- model.init: torch | lstr ----------------------------------------------------------------

def authors_in_proj(dim):
    """MultiheadSparseAttention.__init__ (models/transformer/multihead_sparse_attention.py:90,
    95, 102, 105-106): in_proj_weight (3D, D) xavier_uniform_, in_proj_bias and out_proj.bias 0."""
    in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
    nn.init.xavier_uniform_(in_proj_weight)
    return in_proj_weight.detach()


def test_lstr_init_draws_the_authors_stacked_projection():
    attention = SparseCrossAttention(32, 4)
    torch.manual_seed(5)
    lstr_attention_init(attention)
    torch.manual_seed(5)
    stacked = authors_in_proj(32)
    ours = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(ours, stacked)
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        assert torch.count_nonzero(proj.bias) == 0


@pytest.mark.parametrize("init", ["torch", "lstr"])
def test_model_init_switch_changes_every_attention(init):
    dim = 64
    torch.manual_seed(0)
    model = MALT(tiny_config(d_model=dim, num_heads=4, init=init))
    attentions = [m for m in model.modules() if isinstance(m, SparseCrossAttention)]
    assert len(attentions) == 10    # 2 per layer: branch 1 (1 layer), branch 2 (1 + 2), decoder (1)
    xavier, default = math.sqrt(6 / (4 * dim)), 1 / math.sqrt(dim)
    for attention in attentions:
        weights = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        biases = torch.cat([p.bias for p in (attention.q_proj, attention.k_proj, attention.v_proj,
                                             attention.out_proj)])
        if init == "lstr":   # the authors' bound sqrt(6/4D), reached; zero biases
            assert default < weights.abs().max() <= xavier
            assert torch.count_nonzero(biases) == 0
        else:                # nn.Linear's default: bound 1/sqrt(D), non-zero biases
            assert weights.abs().max() <= default
            assert torch.count_nonzero(biases) == len(biases)
        assert attention.out_proj.weight.abs().max() <= default   # nn.Linear's default either way


# -- model.classifier_includes_ambiguous -----------------------------------------------------

def lstr_mce(logits, target, ignore_index):
    """LSTR's MultipCrossEntropyLoss with ignore_index >= 0, reduction 'mean'
    (criterions/criterions.py:49-57 at f910dd9), on (N, columns) rows."""
    notice = [i for i in range(target.shape[-1]) if i != ignore_index]
    output = torch.sum(-target[:, notice] * torch.log_softmax(logits[:, notice], dim=1), dim=1)
    return torch.mean(output[target[:, ignore_index] != 1])


def test_ambiguous_output_enters_the_test_softmax_and_gets_no_loss():
    cfg = tiny_config(num_classes=4, classifier_includes_ambiguous=True, aux_loss=False)
    torch.manual_seed(0)
    model = MALT(cfg)
    assert model.classifier.out_features == 5               # background + 3 actions + ambiguous
    logits = 3 * torch.randn(2, 4, 5)                        # (B, S, C+2)
    # test phase: det_score.softmax(dim=1) over all 22 THUMOS columns
    # (perframe_det_trainer.py:63), then column 21 dropped (evaluation/postprocessing.py:31-34)
    authors = torch.softmax(logits, dim=-1)[..., :4]
    assert torch.allclose(model.probabilities(logits), authors, atol=1e-7)
    assert not torch.allclose(torch.softmax(logits[..., :4], dim=-1), authors, atol=1e-3)
    # training: LSTR's MCE with ignore_index 4 (the ambiguous column) on 5-column targets
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, size=(2, 4))
    targets = torch.nn.functional.one_hot(torch.as_tensor(classes), 4).float()   # (B, S, C+1)
    ambiguous = torch.tensor([[False, True, False, False], [False, False, False, True]])
    lstr_targets = torch.cat([targets * ~ambiguous[..., None], ambiguous[..., None].float()], -1)
    expected = lstr_mce(logits.reshape(-1, 5), lstr_targets.reshape(-1, 5), ignore_index=4)
    ours = malt_loss(logits, [], targets, ~ambiguous, aux_weight=0.4, use_aux=False)
    assert ours.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_default_classifier_has_no_ambiguous_output():
    torch.manual_seed(0)
    model = MALT(tiny_config(num_classes=4))
    assert model.classifier.out_features == 4
    logits = torch.randn(3, 4)
    assert torch.allclose(model.probabilities(logits), torch.softmax(logits, -1))
    with pytest.raises(ValueError, match="6 columns for 4 target columns"):
        malt_loss(torch.randn(1, 2, 6), [], torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=bool), 0.4, False)
