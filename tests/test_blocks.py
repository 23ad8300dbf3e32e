"""The shared block attention: its custom autograd Function, the merge, the windows."""

from __future__ import annotations

import pytest
import torch

from lshattn import blocks


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def block_inputs(N=3, c=4, w=6, D=5, Dv=5, per_query=True, seed=0):
    g = gen(seed)
    q = torch.randn(N, c, D, generator=g, dtype=torch.float64)
    k = torch.randn(N, w, D, generator=g, dtype=torch.float64)
    v = torch.randn(N, w, Dv, generator=g, dtype=torch.float64)
    allowed = torch.rand(N, c if per_query else 1, w, generator=g) > 0.4
    allowed[0, 0] = False  # a query (or a whole block) that sees no key
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    bias = bias - torch.rand(allowed.shape, generator=g, dtype=torch.float64)  # like a -log count
    return q, k, v, bias


def reference(q, k, v, bias, scale):
    scores = q @ k.transpose(1, 2) * scale + bias
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v, lse


@pytest.mark.parametrize("per_query", [True, False], ids=["bias-per-query", "bias-per-block"])
@pytest.mark.parametrize("Dv", [5, 3], ids=["fused", "matmul"])  # the CPU kernel needs D == Dv
def test_block_softmax_forward(per_query, Dv):
    q, k, v, bias = block_inputs(Dv=Dv, per_query=per_query)
    out, lse = blocks.block_softmax(q, k, v, bias, 0.7, 0.0)
    expected_out, expected_lse = reference(q, k, v, bias, 0.7)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    assert torch.isneginf(lse[0, 0]) and torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))


@pytest.mark.parametrize("per_query", [True, False], ids=["bias-per-query", "bias-per-block"])
@pytest.mark.parametrize("Dv", [5, 3], ids=["fused", "matmul"])
def test_block_softmax_gradcheck(per_query, Dv):
    """Both outputs are differentiated, as the multi-round merge needs the lse gradient."""
    q, k, v, bias = block_inputs(Dv=Dv, per_query=per_query)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    finite = ~torch.isneginf(torch.logsumexp(bias, -1)).expand(q.shape[:2])  # rows with a key

    def fn(q, k, v):
        out, lse = blocks.BlockSoftmax.apply(q, k, v, bias, 0.7)
        return out, torch.where(finite, lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_block_softmax_dropout_path_matches_without_dropout_in_expectation():
    q, k, v, bias = (x.float() for x in block_inputs(N=2, c=3, w=5))
    torch.manual_seed(0)
    outs = torch.stack([blocks.block_softmax(q, k, v, bias, 0.7, 0.3)[0] for _ in range(4000)])
    expected, _ = reference(q.double(), k.double(), v.double(), bias.double(), 0.7)
    torch.testing.assert_close(outs.mean(0).double(), expected, atol=0.05, rtol=0.05)


def test_softmax_with_lse_empty_rows_have_finite_gradients():
    scores = torch.tensor([[0.5, float("-inf"), 1.0], [float("-inf")] * 3], requires_grad=True)
    probs, lse = blocks.softmax_with_lse(scores)
    assert torch.equal(probs[1], torch.zeros(3)) and torch.isneginf(lse[1])
    (probs.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert torch.isfinite(scores.grad).all()


def test_merge_softmax_equals_one_softmax_over_the_union():
    g = gen()
    logits = [torch.randn(4, n, generator=g, dtype=torch.float64) for n in (3, 5, 2)]
    values = [torch.randn(4, n, 6, generator=g, dtype=torch.float64) for n in (3, 5, 2)]
    outs = torch.stack([torch.einsum("tn,tnv->tv", torch.softmax(s, -1), v) for s, v in zip(logits, values)], 1)
    lses = torch.stack([torch.logsumexp(s, -1) for s in logits], 1)
    merged, merged_lse = blocks.merge_softmax(outs, lses)
    union = torch.cat(logits, -1)
    expected = torch.einsum("tn,tnv->tv", torch.softmax(union, -1), torch.cat(values, 1))
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(merged_lse, torch.logsumexp(union, -1))


def test_merge_rounds_ignores_empty_rounds_and_zeroes_empty_queries():
    out = torch.randn(1, 1, 2, 3, 4)
    lse = torch.tensor([[[[0.0, float("-inf"), float("-inf")], [float("-inf"), 1.0, float("-inf")]]]])
    out[:, :, 0, 1:] = 0
    out[:, :, 1, [0, 2]] = 0
    merged, merged_lse = blocks.merge_rounds(out, lse)
    assert torch.equal(merged[0, 0, 0], out[0, 0, 0, 0]) and torch.equal(merged[0, 0, 1], out[0, 0, 1, 1])
    assert torch.equal(merged[0, 0, 2], torch.zeros(4)) and torch.isneginf(merged_lse[0, 0, 2])


def test_windows_never_wrap():
    order = torch.arange(4).view(1, 1, 1, 4)  # four key blocks of one token, in order
    identity = torch.arange(4).view(1, 4)
    windows = blocks.window_positions(order, identity, k_block=1, before=1, after=1)
    assert windows[0, 0, 0].tolist() == [[-1, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, -1]]
    assert blocks.window_positions(order, identity, 1, 0, 0)[0, 0, 0].tolist() == [[0], [1], [2], [3]]


def test_windows_are_centred_on_the_matched_key_blocks():
    order = torch.tensor([[[[5, 4, 3, 2, 1, 0]]]])  # three key blocks of two keys
    centres = torch.tensor([[0, 0, 2, 1]])  # four query blocks
    windows = blocks.window_positions(order, centres, k_block=2, before=1, after=0)
    assert windows[0, 0, 0].tolist() == [[-1, -1, 5, 4], [-1, -1, 5, 4], [3, 2, 1, 0], [5, 4, 3, 2]]


@pytest.mark.parametrize(
    "real_queries, real_keys, expected",
    [
        (8, 8, [0, 1, 2, 3]),  # as many blocks: block n meets block n
        (8, 2, [0, 0, 0, 0]),  # one block of keys: every query block meets it
        (8, 3, [0, 0, 1, 1]),  # two blocks of keys: by relative rank
        (8, 5, [0, 1, 1, 2]),  # three: ⌊(n + ½)·3 / 4⌋
        (3, 8, [1, 3, 3, 3]),  # two blocks of queries, four of keys: centred; padded blocks clamp
        (8, 0, [0, 0, 0, 0]),  # no real key: nothing to meet, block 0 holds padding
    ],
)
def test_matched_key_blocks_pair_blocks_by_relative_rank(real_queries, real_keys, expected):
    layout = blocks.block_layout(8, 8, 2, 2)
    q_valid = torch.arange(8)[None] < real_queries
    k_valid = torch.arange(8)[None] < real_keys
    assert blocks.matched_key_blocks(q_valid, k_valid, layout)[0].tolist() == expected


def test_block_layout_clamps_blocks_to_the_sequence():
    assert blocks.block_layout(64, 10, 4096, 3) == (64, 3, 1, 4)
    layout = blocks.block_layout(37, 37, 8, 8)
    assert (layout.q_blocks, layout.padded_queries, layout.padded_keys) == (5, 40, 40)
