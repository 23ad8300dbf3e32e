"""SimHash (BERT-LSH): the collision estimator, the faithful and sparse modes, bounded work with
coarse codes, and the BERT-LSH reference-code defect.

The property suite (tests/test_properties.py) covers SimHash through the entries of
tests/catalogue.py, which use ``lshattn.testing.simhash_brute_force``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from scipy import stats

import lshattn
from lshattn import hashing, kernels, testing
from lshattn.testing import collisions_from_aux, simhash_brute_force
from lshattn.methods import simhash as simhash_module


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the hash -------------------------------------------------------------------------------------


@pytest.mark.parametrize("R, bits", [(1, 1), (3, 5), (7, 8), (64, 8), (37, 3), (2, 24), (3, 25), (2, 62)])
def test_simhash_codes_pack_the_sign_bits(R, bits):
    """Code = Σ_k [x·w_k > 0]·2^k per table, in both layouts, for every word split of the bits."""
    x = torch.randn(2, 3, 50, 16, generator=gen(50))
    planes = torch.randn(3, 16, R, bits, generator=gen(51))
    proj = torch.einsum("bhld,hdrk->bhrlk", x, planes)
    expected = ((proj > 0).long() * 2 ** torch.arange(bits)).sum(-1)
    assert torch.equal(hashing.simhash_codes(x, planes), expected)
    assert torch.equal(hashing.simhash_codes(x, planes, tables_last=True), expected.transpose(2, 3))


def test_simhash_codes_ignore_norms_and_dtype():
    x = torch.randn(1, 2, 40, 8, generator=gen(52))
    planes = torch.randn(2, 8, 4, 6, generator=gen(53))
    codes = hashing.simhash_codes(x, planes)
    assert torch.equal(hashing.simhash_codes(x * torch.rand(1, 2, 40, 1) * 7, planes), codes)
    assert torch.equal(hashing.simhash_codes(x.double(), planes), codes)
    assert torch.equal(hashing.simhash_codes(x, planes[:, :, :, :0]), torch.zeros(1, 2, 4, 40, dtype=torch.long))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_simhash_flops_are_what_torch_counts(native, native_kernels):
    """The projections on either path; the torch path also packs the bits with a product."""
    from lshattn.cost import count_flops

    native_kernels(native)
    if native and not kernels.available():
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    x = torch.randn(2, 3, 70, 16)
    for R, bits in [(1, 8), (32, 8), (3, 30), (37, 3)]:
        planes = torch.randn(3, 16, R, bits)
        flops = count_flops(lambda planes=planes: hashing.simhash_codes(x, planes))
        packing = 0 if native else hashing.packing_flops(2 * 3 * 70, R, bits)
        assert flops == hashing.simhash_flops(2 * 3 * 70, 16, R, bits) + packing


# --- the estimator ------------------------------------------------------------------------------


def pair_at_angle(theta: float, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors of different norms at angle ``theta``, in a random orientation."""
    g = gen(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))
    a = basis[:, 0] * 3.0
    b = (math.cos(theta) * basis[:, 0] + math.sin(theta) * basis[:, 1]) * 0.5
    return a.float(), b.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("theta", [0.3, math.pi / 2, 2.5])
@pytest.mark.parametrize("num_bits", [1, 3, 8])
def test_collision_rate_is_one_minus_angle_over_pi_to_the_bits(seed, theta, num_bits):
    """Monte Carlo over 20000 tables: the codes of a pair at angle θ are equal with probability
    (1 − θ/π)^num_bits (binomial test)."""
    D, tables = 16, 20000
    a, b = pair_at_angle(theta, D, seed)
    x = torch.stack([a, b]).view(1, 1, 2, D)
    planes = hashing.draw_normal((1, D, tables, num_bits), gen(100 + seed), torch.device("cpu"))
    codes = hashing.simhash_codes(x, planes)[0, 0]  # (tables, 2)
    hits = int((codes[:, 0] == codes[:, 1]).sum())
    expected = (1 - theta / math.pi) ** num_bits
    assert stats.binomtest(hits, tables, expected).pvalue > 1e-4, (hits / tables, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", ["any", "all"])
def test_method_collisions_follow_the_rule(seed, rule):
    """Through the method itself: one query and one key at angle θ, repeated over 20000 heads
    (each head draws its own projections). The pair collides in a fraction 1 − (1 − p)^R of
    them (any) or p^R (all), p = (1 − θ/π)^bits."""
    theta, num_bits, num_hashes, heads = 1.0, 2, 3, 20000
    a, b = pair_at_angle(theta, 8, seed)
    q, k = a.expand(1, heads, 1, 8).contiguous(), b.expand(1, heads, 1, 8).contiguous()
    method = lshattn.SimHash(num_hashes=num_hashes, num_bits=num_bits, rule=rule, mode="sparse")
    _, aux = method(q, k, torch.ones(1, heads, 1, 1), generator=gen(200 + seed), return_aux=True)
    p = (1 - theta / math.pi) ** num_bits
    expected = 1 - (1 - p) ** num_hashes if rule == "any" else p**num_hashes
    assert stats.binomtest(aux.dot_products, heads, expected).pvalue > 1e-4, (aux.dot_products / heads, expected)


@pytest.mark.parametrize("rule", ["any", "all"])
@pytest.mark.parametrize("theta", [1.0, 2.2])
def test_importance_weights_make_the_sampled_mass_unbiased(rule, theta):
    """Importance mode, through the method: a sink key (attended exactly, weight 1) and one more
    key at angle θ from the query, over 20000 heads (each draws its own projections). The second
    key enters only when it collides, then weighted 1 / P(collide | θ); with values e_0 and e_1 the
    output's ratio out_1 / out_0 is its weight times e^{s_1 − s_0}, whose mean over the heads must
    be e^{s_1 − s_0}: the sampled mass is unbiased (z-test on the Bernoulli mean, 5 sigmas)."""
    num_bits, num_hashes, heads, D = 2, 3, 20000, 8
    a, b = pair_at_angle(theta, D, seed=7)
    sink = a / a.norm()  # a key parallel to the query: collides always, but the sink takes it
    q = a.expand(1, heads, 1, D).contiguous()
    k = torch.stack([sink, b]).expand(1, heads, 2, D).contiguous()
    v = torch.eye(2).expand(1, heads, 2, 2).contiguous()
    method = lshattn.SimHash(num_hashes=num_hashes, num_bits=num_bits, rule=rule, mode="importance", sinks=1)
    out, aux = method(q, k, v, generator=gen(300), return_aux=True)
    ratio = (out[0, :, 0, 1] / out[0, :, 0, 0]).double()
    logits = (q[0, 0, 0] @ k[0, 0].T).double() * D**-0.5
    relative_mass = math.exp(float(logits[1] - logits[0]))
    p = (1 - theta / math.pi) ** num_bits
    collide = 1 - (1 - p) ** num_hashes if rule == "any" else p**num_hashes
    hits = int((ratio > 0).sum())
    assert aux.dot_products == heads + hits  # the sink, and the collisions besides it
    expected = torch.full_like(ratio[ratio > 0], relative_mass / collide)
    torch.testing.assert_close(ratio[ratio > 0], expected, rtol=1e-5, atol=0)  # float32 outputs
    sigma = relative_mass * math.sqrt((1 - collide) / (collide * heads))
    assert abs(float(ratio.mean()) - relative_mass) < 5 * sigma, (float(ratio.mean()), relative_mass)


def test_collision_fraction_matches_random_directions():
    """cost()'s expected collision fraction for random directions matches a Monte Carlo count."""
    D, num_bits, num_hashes = 8, 2, 2
    fraction = simhash_module.collision_fraction(D, num_bits, num_hashes, "any")
    q, k, v = testing.make_qkv(4, 4, 64, 64, D, seed=3)
    method = lshattn.SimHash(num_hashes=num_hashes, num_bits=num_bits)
    _, aux = method(q, k, v, generator=gen(4), return_aux=True)
    pairs = 4 * 4 * 64 * 64
    # Pairs share their tokens, so they are not independent: allow 6 binomial sigmas.
    assert abs(aux.dot_products / pairs - fraction) < 6 * math.sqrt(fraction * (1 - fraction) / pairs) + 0.01
    assert method.cost(4, 4, 64, 64, D, D).dot_products == round(fraction * pairs)
    assert simhash_module.collision_fraction(D, 0, 3) == 1.0
    assert simhash_module.collision_fraction(1, 5, 1) == pytest.approx(0.5)


# --- what the modes compute ---------------------------------------------------------------------


def test_faithful_gives_non_colliding_keys_logit_zero():
    """Faithful mode is dense softmax with the non-colliding logits set to 0 (not -inf), which
    is what the reference code computes; a query with no collision averages the visible values."""
    q, k, v = testing.make_qkv(1, 2, 30, 30, 8, seed=5)
    method = lshattn.SimHash(num_bits=6)
    out, aux = method(q, k, v, generator=gen(6), return_aux=True)
    collide = collisions_from_aux(aux, "any")
    scores = (q @ k.transpose(-1, -2) * 8**-0.5).double().masked_fill(~collide, 0.0)
    expected = torch.softmax(scores, -1) @ v.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
    lonely = ~collide.any(-1)
    assert lonely.any()
    mean = v.double().mean(2, keepdim=True).expand_as(out)
    torch.testing.assert_close(out[lonely].double(), mean[lonely], atol=1e-6, rtol=0)


def test_sparse_query_with_no_collision_gets_zeros():
    q, k, v = testing.make_qkv(1, 2, 30, 30, 8, seed=5)
    out, aux = lshattn.SimHash(num_bits=6, mode="sparse")(q, k, v, generator=gen(6), return_aux=True)
    lonely = ~collisions_from_aux(aux, "any").any(-1)
    assert lonely.any() and (~lonely).any()
    assert torch.equal(out[lonely], torch.zeros_like(out[lonely]))


@pytest.mark.parametrize("mode", ["faithful", "sparse", "importance"])
@pytest.mark.parametrize("rule", ["any", "all"])
def test_zero_bits_is_exact_attention(mode, rule):
    q, k, v = testing.make_qkv(2, 2, 50, 40, 16, 8, seed=7)
    mask = testing.make_padding_mask(2, 40, seed=8)
    out = lshattn.SimHash(num_hashes=2, num_bits=0, rule=rule, mode=mode)(q, k, v, key_padding_mask=mask)
    expected = testing.dense_reference(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_pairs_in_several_tables_count_once():
    """With identical tables (0 bits) every pair collides in each, yet counts once."""
    q, k, v = testing.make_qkv(2, 3, 20, 20, 8, seed=9)
    _, aux = lshattn.SimHash(num_hashes=3, num_bits=0)(q, k, v, return_aux=True)
    assert aux.dot_products == 2 * 3 * 20 * 20
    _, aux = lshattn.SimHash(num_hashes=3, num_bits=0)(q, k, v, causal=True, return_aux=True)
    assert aux.dot_products == 2 * 3 * 20 * 21 // 2


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dot_products_count_the_colliding_visible_pairs(causal):
    q, k, v = testing.make_qkv(2, 3, 45, 45, 8, seed=10)
    mask = testing.make_padding_mask(2, 45, seed=11)
    method = lshattn.SimHash(num_hashes=2, num_bits=3)
    _, aux = method(q, k, v, key_padding_mask=mask, query_padding_mask=mask, causal=causal, return_aux=True)
    visible = (mask[:, None, :, None] & mask[:, None, None, :]) & collisions_from_aux(aux, "any")
    if causal:
        visible &= torch.ones(45, 45, dtype=torch.bool).tril()
    assert aux.dot_products == int(visible.sum())
    assert aux.scores_computed >= aux.dot_products


# --- bounded work ---------------------------------------------------------------------------------


def test_coarse_codes_are_processed_in_bounded_chunks(monkeypatch):
    """2 bits = 4 buckets: a quarter of all pairs collide, yet no chunk holds much more than
    the budget of scores and the result still matches the reference."""
    monkeypatch.setattr(simhash_module, "PAIR_BUDGET", 8 * 64 * 64)
    q, k, v = testing.make_qkv(1, 2, 700, 700, 8, seed=12)
    codes = hashing.simhash_codes(torch.cat([q, k], 2), torch.randn(2, 8, 1, 2, generator=gen(13)))
    q_codes, k_codes = codes[..., :700], codes[..., 700:]
    plan = simhash_module.plan_collisions(
        q_codes.reshape(2, 700), k_codes.reshape(2, 700), None, None, 2, causal=False, budget=8 * 64 * 64
    )
    sizes = [hi - lo for lo, hi in zip(plan.bounds[:-1], plan.bounds[1:])]
    blocks_per_row = torch.bincount(plan.rows).max().item()
    assert len(sizes) > 4 and max(sizes) < 8 + blocks_per_row
    # Every colliding pair lies in exactly one block pair.
    covered = 0
    for chunk in simhash_module.collision_chunks(plan, causal=False, T=700, S=700):
        covered += int(chunk.mask.sum())
    assert covered == int((q_codes.reshape(2, 700, 1) == k_codes.reshape(2, 1, 700)).sum())


def test_coarse_codes_match_the_reference_with_small_chunks(monkeypatch):
    monkeypatch.setattr(simhash_module, "PAIR_BUDGET", 2 * 64 * 64)
    q, k, v = testing.make_qkv(2, 2, 150, 150, 8, seed=14)
    mask = testing.make_padding_mask(2, 150, seed=15)
    method = lshattn.SimHash(num_hashes=2, num_bits=1)
    kw = dict(key_padding_mask=mask, query_padding_mask=mask, causal=True)
    out, aux = method(q, k, v, generator=gen(16), return_aux=True, **kw)
    torch.testing.assert_close(out.double(), simhash_brute_force(method, q, k, v, aux, **kw), atol=1e-5, rtol=1e-5)


def test_causal_plans_skip_key_blocks_after_the_queries():
    """One bucket holding everything, causal: only block pairs on or below the diagonal."""
    codes = torch.zeros(1, 256, dtype=torch.long)
    plan = simhash_module.plan_collisions(codes, codes, None, None, 0, causal=True)
    assert plan.rows.numel() == 4 * 5 // 2
    assert bool((plan.cols <= plan.rows).all())


# --- the reference-code defect (docs/methods.md §0) -------------------------------------------------


def test_bert_lsh_scores_each_direction_of_a_pair():
    """BERT-LSH computed q_i·k_j for i <= j only and wrote it into s[j, i] too, where q_j·k_i
    belongs. Here, with every pair colliding, each query gets its own scores: the output is
    exact attention, which the mirrored matrix is not."""
    q, k, v = testing.make_qkv(1, 1, 2, 2, 4, seed=17)
    out = lshattn.SimHash(num_bits=0)(q, k, v)
    torch.testing.assert_close(out.double(), testing.dense_reference(q, k, v), atol=1e-6, rtol=1e-6)
    upper = (q @ k.transpose(-1, -2)).triu()
    mirrored = upper + upper.transpose(-1, -2) - torch.diag_embed(torch.diagonal(upper, dim1=-2, dim2=-1))
    buggy = torch.softmax(mirrored * 4**-0.5, -1) @ v
    assert not torch.allclose(out, buggy, atol=1e-3)


# --- parameters and bad input ------------------------------------------------------------------------


def test_parse_round_trip_and_defaults():
    method = lshattn.SimHash(num_hashes=2, num_bits=4, rule="all", mode="sparse")
    assert lshattn.parse(str(method)) == method
    assert str(method) == "simhash:num_hashes=2,num_bits=4,rule=all,mode=sparse"
    assert lshattn.parse("simhash") == lshattn.SimHash()
    assert dataclasses.asdict(lshattn.SimHash()) == dict(
        num_hashes=1, num_bits=8, rule="any", mode="faithful", sinks=0, window=None
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lshattn.SimHash(num_hashes=0), r"SimHash num_hashes must be >= 1, got 0"),
        (lambda: lshattn.SimHash(num_bits=-1), r"num_bits must be in \[0, 62\] \(codes are int64\), got -1"),
        (lambda: lshattn.SimHash(num_bits=63), r"num_bits must be in \[0, 62\] \(codes are int64\), got 63"),
        (lambda: lshattn.SimHash(rule="some"), r"rule must be 'any' or 'all', got 'some'"),
        (lambda: lshattn.SimHash(mode="dense"), r"mode must be 'faithful', 'sparse' or 'importance', got 'dense'"),
        (lambda: lshattn.SimHash(num_hashes=8, num_bits=8, rule="all"), r"8·8 = 64 bits .* at most 62; use fewer"),
        (lambda: lshattn.parse("simhash:rule=some"), r"cannot read 'some' as .*Literal\['any', 'all'\]"),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_dropout_is_refused():
    q, k, v = testing.make_qkv(1, 1, 8, 8, 4)
    message = r"SimHash does not implement attention dropout, got dropout_p=0.1.*pass dropout_p=0"
    with pytest.raises(ValueError, match=message):
        lshattn.SimHash()(q, k, v, dropout_p=0.1)


def test_gradients_of_the_faithful_background_are_finite_and_match():
    """Faithful mode gives gradients to the values of non-colliding keys through their logit-0
    share; check them against the reference in float64 with padding and causality."""
    q, k, v = testing.make_qkv(2, 2, 24, 24, 8, seed=18, dtype=torch.float64)
    mask = testing.make_padding_mask(2, 24, seed=19)
    method = lshattn.SimHash(num_hashes=2, num_bits=4)
    kw = dict(key_padding_mask=mask, query_padding_mask=mask, causal=True)
    _, aux = method(q, k, v, generator=gen(20), return_aux=True, **kw)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    method(*leaves, generator=gen(20), **kw).pow(2).sum().backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    simhash_brute_force(method, *ref_leaves, aux, **kw).pow(2).sum().backward()
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-10, rtol=1e-8)
