"""``SketchTopK``: top keys by SimHash sketch estimate, exact softmax over them. The properties
every method has (exact limit, brute force, padding, batch, causality, determinism) run on its
catalogue entries; these are its own."""

from __future__ import annotations

import math

import pytest
import torch

import lshattn
from lshattn import testing
from lshattn.methods.sketch import BYTE_SIGNS, key_sketches, query_weights, sketch_estimates


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_bits", [64, 256])
def test_a_key_along_the_query_is_always_kept(num_bits):
    """A key in the query's direction agrees with it on every bit: the largest estimate there is,
    so a selection of one key keeps it, wherever it is and however small its norm. (With 8 bits
    a random key agrees on all of them one time in 256, and the tie goes to the earlier key.)"""
    B, H, S, D = 2, 3, 64, 16
    q, k, v = testing.make_qkv(B, H, 1, S, D, D, seed=1)
    at = torch.tensor([5, 40])
    k[torch.arange(B), :, at] = 0.01 * q[:, :, 0]
    method = lshattn.SketchTopK(fraction=1 / S, num_bits=num_bits)
    _, aux = method(q, k, v, generator=gen(0), return_aux=True)
    assert aux.selected.sum(-1).eq(1).all()
    assert aux.selected[torch.arange(B), :, 0, at].all()


def test_estimates_are_exact_integers_in_any_order():
    """A decoding step sums the estimate by byte lookups, the prefill by a matrix product: both
    give the same integers, so the same keys are kept."""
    q, k, _ = testing.make_qkv(1, 2, 7, 50, 32, 32, seed=3)
    planes = lshattn.SketchTopK(num_bits=64).planes(2, 32, gen(1), q.device)
    weights, sketches = query_weights(q, planes), key_sketches(k, planes)
    product = sketch_estimates(weights, sketches)
    lookup = weights @ BYTE_SIGNS  # (B, H, T, R, 256)
    looked_up = lookup.gather(-1, sketches[:, :, None].expand(-1, -1, 7, -1, -1)).sum(3)
    assert torch.equal(product, looked_up)
    assert torch.equal(product, product.round())
    assert product.abs().max() <= 64 * 2**20


def test_the_estimate_follows_the_angle():
    """The estimate averages to ``b·√(2/π)·|q|·cos θ`` (scaled): across keys at known angles to
    the query its ranking follows the cosine (Spearman-like: the order of the means)."""
    D, S = 64, 400
    g = gen(7)
    q = torch.randn(1, 1, 1, D, generator=g)
    unit = q / q.norm()
    noise = torch.randn(1, 1, S, D, generator=g)
    noise = noise - (noise @ unit.transpose(-1, -2)) * unit
    cosines = torch.linspace(-0.9, 0.9, S)
    k = cosines[:, None] * unit[0, 0] + (1 - cosines[:, None] ** 2).sqrt() * noise[0, 0] / noise[0, 0].norm(
        dim=-1, keepdim=True
    )
    planes = lshattn.SketchTopK(num_bits=256).planes(1, D, gen(2), q.device)
    estimate = sketch_estimates(query_weights(q, planes), key_sketches(k[None, None], planes))[0, 0, 0]
    means = estimate.view(8, -1).mean(-1)  # 8 groups of keys, rising cosine
    assert (means.diff() > 0).all()


def test_cost_and_budget_keep_the_oracles_share():
    """``for_budget`` gives SketchTopK the oracle's fraction; ``cost`` counts the kept pairs and
    the sketch estimates of every pair."""
    oracle = lshattn.for_budget("topk", 1 / 16, 4096, D=64, causal=True, sinks=4, window=64)
    sketch = lshattn.for_budget("sketchtopk", 1 / 16, 4096, D=64, causal=True, sinks=4, window=64)
    assert sketch.fraction == oracle.fraction and sketch.num_bits == 256
    assert lshattn.work_share(sketch, 4096, 4096, 64, causal=True) == lshattn.work_share(
        oracle, 4096, 4096, 64, causal=True
    )
    cost = lshattn.SketchTopK(fraction=0.25).cost(1, 2, 100, 100, 16, 16)
    assert cost.dot_products == 2 * 100 * 25 and cost.budget == 0.25
    assert cost.flops == 2 * 2 * 100 * 100 * (256 + 32) + 2 * 2 * 200 * 16 * 256


@pytest.mark.parametrize("num_bits", [0, 12, -8])
def test_bits_must_be_whole_bytes(num_bits):
    with pytest.raises(ValueError, match=rf"num_bits must be a positive multiple of 8 .*got {num_bits}"):
        lshattn.SketchTopK(num_bits=num_bits)


def test_the_aux_counts_kept_pairs_and_estimates():
    q, k, v = testing.make_qkv(2, 3, 20, 20, 8, 8, seed=4)
    method = lshattn.SketchTopK(fraction=0.25, num_bits=16)
    _, aux = method(q, k, v, causal=True, generator=gen(0), return_aux=True)
    per_row = sum(math.ceil(0.25 * n) for n in range(1, 21))
    assert aux.dot_products == int(aux.selected.sum()) == 2 * 3 * per_row
    assert aux.estimates == 2 * 3 * 20 * 20
