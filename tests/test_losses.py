"""The training loss (malt/losses.py) by hand: soft cross-entropy, auxiliary term, ambiguous
steps, multi-action steps as LSTR weighs them."""
import math

import numpy as np
import pytest
import torch

from vidpipe.malt.losses import malt_loss


def test_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]]))    # (1, 2, 3)
    targets = torch.tensor([[[1.0, 0, 0], [0, 0.5, 0.5]]])
    valid = torch.tensor([[True, True]])
    aux = [torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]]))]
    terms = malt_loss(logits, aux, targets, valid, aux_weight=0.4, use_aux=True)
    decoder = (-np.log(0.5) + -(0.5 * np.log(0.6) + 0.5 * np.log(0.2))) / 2
    aux_term = (-np.log(0.25) + -(0.5 * np.log(0.1) + 0.5 * np.log(0.8))) / 2
    assert terms.decoder.item() == pytest.approx(decoder, rel=1e-5)
    assert terms.total.item() == pytest.approx(decoder + 0.4 * aux_term, rel=1e-5)
    # an ambiguous step counts nowhere; aux off leaves the decoder term alone
    terms = malt_loss(logits, aux, targets, torch.tensor([[True, False]]), 0.4, use_aux=False)
    assert terms.total.item() == pytest.approx(-np.log(0.5), rel=1e-5)


def test_multi_action_frames_weigh_as_in_lstr():
    logits = torch.log(torch.tensor([[[0.2, 0.6, 0.2]]]))
    targets = torch.tensor([[[0.0, 0.5, 0.5]]])           # stored: rows sum to 1
    valid = torch.tensor([[True]])
    lstr = malt_loss(logits, [], targets, valid, 0.0, False, multi_label="lstr").total.item()
    normalised = malt_loss(logits, [], targets, valid, 0.0, False, multi_label="normalised").total.item()
    assert lstr == pytest.approx(-(math.log(0.6) + math.log(0.2)), rel=1e-6)
    assert normalised == pytest.approx(lstr / 2, rel=1e-6)
