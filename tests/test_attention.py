"""SparseCrossAttention: top-k semantics, masking, ties, empty memories."""
import pytest
import torch

from vidpipe.malt.attention import SparseCrossAttention

DIM, HEADS = 16, 2


def make(top_k, seed=0):
    torch.manual_seed(seed)
    return SparseCrossAttention(DIM, HEADS, top_k).eval()


def projected(attn, num_queries=5, num_keys=12, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, num_queries, DIM, generator=g)
    memory = torch.randn(batch, num_keys, DIM, generator=g)
    return query, memory, attn.q_proj(query), attn.k_proj(memory), attn.v_proj(memory)


def heads(x):
    """(B, T, D) -> (B, H, T, D / H), written independently of the module's code path."""
    return x.view(x.shape[0], x.shape[1], HEADS, DIM // HEADS).transpose(1, 2)


def vanilla_reference(attn, query, memory, allowed=None):
    """Textbook multi-head attention, written independently of the module's code path."""
    q, k, v = attn.q_proj(query), attn.k_proj(memory), attn.v_proj(memory)
    b, nq, _ = q.shape
    scores = heads(q) @ heads(k).transpose(-1, -2) / (DIM // HEADS) ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(b, nq, DIM)
    return attn.out_proj(out)


@pytest.mark.parametrize("k", [1, 4, 7, 11])
def test_exactly_k_nonzero_weights_per_query(k):
    attn = make(k)
    _, _, q, keys, _ = projected(attn)
    weights = attn.attention_weights(q, keys)                          # (B, H, Q, K)
    assert ((weights > 0).sum(-1) == k).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_kept_keys_are_the_top_scores_and_renormalised():
    attn = make(3)
    _, _, q, keys, _ = projected(attn, batch=1, num_queries=1)
    weights = attn.attention_weights(q, keys)[0, 0, 0]                 # (K,)
    scores = (heads(q) @ heads(keys).transpose(-1, -2))[0, 0, 0]
    top = scores.topk(3).indices
    assert set(torch.nonzero(weights).flatten().tolist()) == set(top.tolist())
    expected = torch.softmax(scores[top] * attn.scale, -1)
    torch.testing.assert_close(weights[top], expected)


@pytest.mark.parametrize("k", [None, 12, 13, 500])
def test_k_at_or_above_number_of_keys_is_vanilla(k):
    attn = make(k)
    query, memory, *_ = projected(attn)
    torch.testing.assert_close(attn(query, memory), vanilla_reference(attn, query, memory))


def test_top_k_changes_the_output_when_it_bites():
    attn = make(3)
    query, memory, *_ = projected(attn)
    assert not torch.allclose(attn(query, memory), vanilla_reference(attn, query, memory), atol=1e-4)


def test_ties_at_the_threshold_are_kept():
    attn = make(2)
    _, memory, q, keys, _ = projected(attn, batch=1, num_keys=6)
    keys = keys.clone()
    keys[0, 1] = keys[0, 0]                 # two identical keys -> identical scores everywhere
    scores = (heads(q) @ heads(keys).transpose(-1, -2))
    weights = attn.attention_weights(q, keys)
    # Where the duplicated key is the 2nd best, both copies are kept: 3 non-zero weights.
    second = scores.topk(2, dim=-1).values[..., 1]
    tied = (scores[..., 0] == second)
    assert tied.any()
    assert ((weights > 0).sum(-1)[tied] == 3).all()
    assert ((weights > 0).sum(-1)[~tied] >= 2).all()


@pytest.mark.parametrize("k", [None, 2, 5, 9])
def test_masked_keys_never_receive_weight(k):
    attn = make(k)
    _, _, q, keys, _ = projected(attn, batch=2, num_keys=10)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    valid[0, 6:] = True                     # 4 valid keys (fewer than k for k=5, 9)
    valid[1, 1:] = True                     # 9 valid keys
    allowed = valid[:, None, :]
    weights = attn.attention_weights(q, keys, allowed)
    assert (weights.masked_select(~allowed[:, None].expand_as(weights)) == 0).all()
    nonzero = (weights > 0).sum(-1)                                    # (B, H, Q)
    expected = torch.tensor([4, 9]) if k is None else torch.tensor([min(4, k), min(9, k)])
    assert (nonzero == expected[:, None, None]).all()


def test_masked_keys_do_not_change_the_output():
    attn = make(4)
    query, memory, *_ = projected(attn, batch=1, num_keys=10)
    allowed = torch.ones(1, 1, 10, dtype=torch.bool)
    allowed[..., :3] = False
    other = memory.clone()
    other[:, :3] = 1e3 * torch.randn(1, 3, DIM)
    torch.testing.assert_close(attn(query, memory, allowed), attn(query, other, allowed))


def test_masked_matches_vanilla_on_the_valid_keys_when_k_is_large():
    attn = make(8)
    query, memory, *_ = projected(attn, batch=1, num_keys=10)
    allowed = torch.ones(1, 5, 10, dtype=torch.bool)
    allowed[..., :4] = False                # 6 valid keys <= k: plain softmax over them
    torch.testing.assert_close(attn(query, memory, allowed),
                               vanilla_reference(attn, query, memory, allowed))


@pytest.mark.parametrize("k", [None, 3])
def test_query_without_valid_key_outputs_zeros_and_finite_gradients(k):
    attn = make(k).train()
    query, memory, *_ = projected(attn, batch=2, num_keys=6)
    query.requires_grad_(True)
    allowed = torch.ones(2, 1, 6, dtype=torch.bool)
    allowed[0] = False                      # batch item 0: empty memory
    out = attn(query, memory, allowed)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())
    assert torch.isfinite(query.grad).all()


def test_causal_mask_blocks_future_keys():
    attn = make(None)
    x = torch.randn(1, 6, DIM)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None]
    out = attn(x, x, causal)
    changed = x.clone()
    changed[:, 4:] += 5.0
    out2 = attn(changed, changed, causal)
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4:], out2[:, 4:])
