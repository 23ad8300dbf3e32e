"""YOSO: the estimator (unbiased, error ∝ 1/√m), the gradients of both backward rules, causal
YOSO, bad input, and the defects of the Hugging Face YOSO code.

The property suite (tests/test_properties.py) covers YOSO through the entries of
tests/catalogue.py, which use the references in ``lshattn.testing``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import lshattn
from lshattn import testing
from lshattn.testing import exact_derivative_reference, yoso_brute_force
from lshattn.methods import yoso as yoso_module


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the estimator -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_yoso_m_is_unbiased_for_yoso_e(seed):
    """The mean of YOSO-m over 400 independent draws (normalize_output=False) is YOSO-E, within
    5 standard errors per element (estimated from the draws)."""
    q, k, v = testing.make_qkv(1, 2, 12, 16, 8, seed=seed)
    exact = lshattn.YOSO(num_bits=3, expectation=True, normalize_output=False)(q, k, v).double()
    method = lshattn.YOSO(num_hashes=4, num_bits=3, normalize_output=False)
    g = gen(1000 + seed)
    draws = torch.stack([method(q, k, v, generator=g).double() for _ in range(400)])
    mean, std = draws.mean(0), draws.std(0)
    z = (mean - exact).abs() / (std / math.sqrt(400) + 1e-12)
    assert z.max() < 5, z.max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_yoso_m_error_falls_as_one_over_sqrt_m(seed):
    """Root-mean-square error against YOSO-E over 100 draws: 16 times more hashes give 4 times
    less error (the estimator is a mean of m independent samples)."""
    q, k, v = testing.make_qkv(1, 2, 24, 24, 16, seed=10 + seed)
    exact = lshattn.YOSO(num_bits=4, expectation=True, normalize_output=False)(q, k, v).double()

    def rms(m):
        method = lshattn.YOSO(num_hashes=m, num_bits=4, normalize_output=False)
        g = gen(2000 + seed)
        errors = [(method(q, k, v, generator=g).double() - exact).pow(2).mean() for _ in range(100)]
        return torch.stack(errors).mean().sqrt()

    ratio = (rms(2) / rms(32)).item()
    assert 3.4 < ratio < 4.7, ratio


def test_yoso_m_with_many_hashes_approaches_yoso_e():
    q, k, v = testing.make_qkv(2, 2, 40, 40, 16, seed=3)
    exact = lshattn.YOSO(num_bits=5, expectation=True)(q, k, v)
    errors = [
        (lshattn.YOSO(num_hashes=m, num_bits=5)(q, k, v, generator=gen(4)) - exact).pow(2).mean().sqrt().item()
        for m in (4, 64, 1024)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


# --- gradients ----------------------------------------------------------------------------------------


def _inputs64(B=2, H=2, T=9, S=11, D=6, Dv=5, seed=20):
    q, k, v = testing.make_qkv(B, H, T, S, D, Dv, seed=seed, dtype=torch.float64)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalize_output", [True, False], ids=["normalised", "raw"])
def test_gradcheck_yoso_e_exact(causal, normalize_output):
    """YOSO-E with backward="exact" is the true derivative (away from the clamp): gradcheck."""
    q, k, v = _inputs64(T=9, S=9)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    method = lshattn.YOSO(num_bits=3, expectation=True, backward="exact", normalize_output=normalize_output)
    assert torch.autograd.gradcheck(
        lambda a, b, c: method(a, b, c, key_padding_mask=mask, query_padding_mask=mask, causal=causal), (q, k, v)
    )


def test_yoso_e_approx_gradients_follow_their_formula():
    """YOSO-E with backward="approx": ∂q̂_i = Σ_j (τ/2)·B_ij (g_i·v_j) k̂_j, against a dense
    implementation of that formula; the values' gradient passes gradcheck."""
    q, k, v = _inputs64()
    tau = 3
    method = lshattn.YOSO(num_bits=tau, expectation=True, normalize_output=False)
    weight = torch.randn(2, 2, 9, 5, dtype=torch.float64)
    (method(q, k, v) * weight).sum().backward()

    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_hat, k_hat = F.normalize(q2, dim=-1), F.normalize(k2, dim=-1)
    cosine = q_hat @ k_hat.transpose(-1, -2)
    kernel = (1 - torch.acos(cosine.detach().clamp(-1, 1)) / math.pi) ** tau
    surrogate = ((tau / 2) * kernel * cosine) @ v.detach()  # ∂/∂cosine = (τ/2)·B
    (surrogate * weight).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(k.grad, k2.grad, atol=1e-10, rtol=1e-8)
    qd, kd = q.detach(), k.detach()
    assert torch.autograd.gradcheck(lambda c: method(qd, kd, c), (v.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("backward", ["approx", "exact"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_yoso_m_gradients(backward, causal):
    """YOSO-m: the values' gradient passes gradcheck (Y is linear in V given the codes); the
    query and key gradients equal the dense implementation of their rule over the same codes."""
    q, k, v = _inputs64(T=10, S=10)
    mask = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
    method = lshattn.YOSO(num_hashes=5, num_bits=2, backward=backward)
    kw = dict(key_padding_mask=mask, query_padding_mask=mask, causal=causal)
    qd, kd = q.detach(), k.detach()
    v_leaf = v.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: method(qd, kd, c, generator=gen(5), **kw), (v_leaf,))

    weight = torch.randn(2, 2, 10, 5, dtype=torch.float64)
    out, aux = method(q, k, v, generator=gen(5), return_aux=True, **kw)
    (out * weight).sum().backward()
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    (yoso_brute_force(method, *leaves, aux, **kw) * weight).sum().backward()
    for ours, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-10, rtol=1e-8)
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_yoso_m_exact_backward_is_the_kernel_derivative_on_colliding_pairs():
    """backward="exact": the query and key gradients are those of Σ_{j collides with i} B(q̂_i·k̂_j)·v_j,
    B = (1 − arccos/π)^τ differentiated by autograd, over the pairs colliding in some hash."""
    q, k, v = _inputs64(T=12, S=12)
    tau = 3
    method = lshattn.YOSO(num_hashes=4, num_bits=tau, backward="exact", normalize_output=False)
    weight = torch.randn(2, 2, 12, 5, dtype=torch.float64)
    out, aux = method(q, k, v, generator=gen(6), return_aux=True)
    (out * weight).sum().backward()

    union = (aux.query_codes[..., :, None] == aux.key_codes[..., None, :]).any(2)
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    cosine = F.normalize(q2, dim=-1) @ F.normalize(k2, dim=-1).transpose(-1, -2)
    assert cosine.detach().abs().max() < yoso_module.EXACT_GRAD_CLAMP  # the clamp does not act here
    kernel = (1 - torch.acos(cosine) / math.pi) ** tau * union
    ((kernel @ v.detach()) * weight).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(k.grad, k2.grad, atol=1e-10, rtol=1e-8)


def test_exact_derivative_is_clamped_off_plus_minus_one():
    x = torch.tensor([-1.0, -0.995, 0.0, 0.5, 0.995, 1.0], dtype=torch.float64)
    d = yoso_module.kernel_derivative(x, 4)
    assert torch.isfinite(d).all()
    assert d[4] == d[5] == yoso_module.kernel_derivative(torch.tensor(0.99, dtype=torch.float64), 4)
    torch.testing.assert_close(d[2:4], exact_derivative_reference(x[2:4], 4))
    # Where it is not clamped it is the derivative of the kernel.
    x0 = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    ((1 - torch.acos(x0) / math.pi) ** 4).sum().backward()
    torch.testing.assert_close(x0.grad, yoso_module.kernel_derivative(x0.detach(), 4))


# --- the bucket sums: both table layouts and the causal running sums ------------------------------


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("num_bits", [2, 5, 12, 40], ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bucket_sums_by_brute_force(num_bits, causal, native, native_kernels):
    """Direct tables (2^τ <= 2S), rank-compacted tables (2^τ > 2S) and causal running sums all
    equal a naive sum, with invalid readers (-1) and writers (-2), on the native kernel and on
    the torch path."""
    native_kernels(native)
    g = gen(30)
    N, L, m, Dv = 3, 20, 4, 5
    high = min(2**num_bits, 6)  # few distinct codes, so that buckets are shared
    read = torch.randint(0, high, (N, L, m), generator=g) * (2**num_bits // high)
    write = torch.randint(0, high, (N, L, m), generator=g) * (2**num_bits // high)
    read[0, 3], write[1, 5], write[2, :] = -1, -2, -2
    values = torch.randn(N, L, Dv, generator=g, dtype=torch.float64) * (write[..., :1] >= 0)
    out = yoso_module.bucket_sums(read, write, values, num_bits, causal=causal)
    expected = torch.zeros_like(out)
    for n in range(N):
        for i in range(L):
            for h in range(m):
                for j in range(L):
                    if read[n, i, h] >= 0 and read[n, i, h] == write[n, j, h] and (not causal or j <= i):
                        expected[n, i] += values[n, j]
    torch.testing.assert_close(out, expected)
    if causal:
        reverse = yoso_module.bucket_sums(read, write, values, num_bits, causal=True, reverse=True)
        flipped = yoso_module.bucket_sums(read.flip(1), write.flip(1), values.flip(1), num_bits, causal=True).flip(1)
        torch.testing.assert_close(reverse, flipped)


def test_bucket_tables_are_processed_in_groups_of_hashes(monkeypatch):
    q, k, v = testing.make_qkv(2, 2, 30, 30, 8, seed=31)
    method = lshattn.YOSO(num_hashes=7, num_bits=4)
    expected = method(q, k, v, generator=gen(32))
    monkeypatch.setattr(yoso_module, "TABLE_BUDGET", 2 * 2 * 18 * 8 * 2)  # two hashes per group
    torch.testing.assert_close(method(q, k, v, generator=gen(32)), expected, atol=1e-6, rtol=1e-6)


def test_output_rows_have_unit_norm():
    q, k, v = testing.make_qkv(2, 2, 30, 30, 8, seed=33)
    out = lshattn.YOSO(num_hashes=8, num_bits=3)(q, k, v, generator=gen(34))
    norms = out.norm(dim=-1)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)
    raw = lshattn.YOSO(num_hashes=8, num_bits=3, normalize_output=False)(q, k, v, generator=gen(34))
    torch.testing.assert_close(F.normalize(raw, dim=-1), out)


def test_causal_yoso_reads_running_sums():
    """Causal YOSO-m at t sums only keys <= t: it equals the brute force and, for the last
    query, the non-causal output."""
    q, k, v = testing.make_qkv(1, 2, 25, 25, 8, seed=35)
    method = lshattn.YOSO(num_hashes=6, num_bits=3, normalize_output=False)
    out, aux = method(q, k, v, causal=True, generator=gen(36), return_aux=True)
    full = method(q, k, v, generator=gen(36))
    torch.testing.assert_close(out[:, :, -1], full[:, :, -1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), yoso_brute_force(method, q, k, v, aux, causal=True), atol=1e-6, rtol=1e-6)


# --- the defects of the Hugging Face YOSO code (docs/methods.md §0, §3) ---------------------------


def test_padding_mask_is_honoured():
    """HF YOSO turned the 0/1 padding mask into all ones, so padded keys were attended. Here a
    padded key changes nothing, in YOSO-m and YOSO-E."""
    q, k, v = testing.make_qkv(1, 2, 10, 10, 8, seed=40)
    pad = torch.randn(1, 2, 6, 8) * 5
    mask = torch.tensor([[True] * 10 + [False] * 6])
    for method in (lshattn.YOSO(num_hashes=16, num_bits=2), lshattn.YOSO(num_bits=2, expectation=True)):
        out = method(q, k, v, generator=gen(41))
        padded = method(q, torch.cat([k, pad], 2), torch.cat([v, pad], 2), key_padding_mask=mask, generator=gen(41))
        torch.testing.assert_close(padded, out, atol=1e-6, rtol=1e-6)
        unmasked = method(q, torch.cat([k, pad], 2), torch.cat([v, pad], 2), generator=gen(41))
        assert not torch.allclose(unmasked, out, atol=1e-3)


def test_queries_are_hashed_with_their_own_codes():
    """HF YOSO's pure-PyTorch hashing returned the key codes for the queries too. Here the query
    codes are the queries' SimHash codes, and the output depends on the queries."""
    q, k, v = testing.make_qkv(1, 2, 20, 20, 8, seed=42)
    method = lshattn.YOSO(num_hashes=8, num_bits=4)
    out, aux = method(q, k, v, generator=gen(43), return_aux=True)
    planes = lshattn.hashing.draw_normal((2, 8, 8, 4), gen(43), torch.device("cpu"))
    assert torch.equal(aux.query_codes, lshattn.hashing.simhash_codes(q, planes))
    assert torch.equal(aux.key_codes, lshattn.hashing.simhash_codes(k, planes))
    assert not torch.equal(aux.query_codes, aux.key_codes)
    other = method(torch.randn_like(q), k, v, generator=gen(43))
    assert not torch.allclose(other, out)


def test_sampled_estimator_runs_on_cpu():
    """HF YOSO has no CPU path for the sampled estimator (it raised AttributeError). Here
    YOSO-m runs on CPU, forward and backward, and equals its brute-force reference."""
    q, k, v = (x.requires_grad_() for x in testing.make_qkv(2, 2, 16, 16, 8, seed=44))
    method = lshattn.YOSO(num_hashes=8, num_bits=3)
    out, aux = method(q, k, v, generator=gen(45), return_aux=True)
    assert out.device.type == "cpu" and out.abs().sum() > 0
    torch.testing.assert_close(out.double(), yoso_brute_force(method, q, k, v, aux), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))


# --- parameters, cost and bad input --------------------------------------------------------------------


def test_parse_round_trip_and_defaults():
    method = lshattn.YOSO(num_hashes=16, num_bits=10, backward="exact", normalize_output=False)
    assert lshattn.parse(str(method)) == method
    assert lshattn.parse("yoso:expectation=true") == lshattn.YOSO(expectation=True)
    assert dataclasses.asdict(lshattn.YOSO()) == dict(
        num_hashes=32, num_bits=9, expectation=False, backward="approx", normalize_output=True, sinks=0, window=None
    )


def test_scale_is_ignored():
    q, k, v = testing.make_qkv(1, 2, 20, 20, 8, seed=46)
    method = lshattn.YOSO(num_hashes=4, num_bits=3)
    assert torch.equal(method(q, k, v, generator=gen(47)), method(q, k, v, scale=3.0, generator=gen(47)))


def test_cost():
    method = lshattn.YOSO(num_hashes=32, num_bits=8)
    cost = method.cost(1, 8, 16384, 16384, 64, 64)
    assert cost.dot_products == 0 and cost.budget == 0.0
    assert cost.flops == lshattn.hashing.simhash_flops(8 * 32768, 64, 32, 8)
    assert cost.memory_bytes < 1 << 30
    exact = lshattn.YOSO(num_bits=8, expectation=True).cost(2, 3, 10, 7, 16, 8)
    assert exact.dot_products == 2 * 3 * 10 * 7 and exact.flops == 2 * 2 * 3 * 10 * 7 * 24 and exact.budget == 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lshattn.YOSO(num_hashes=0), r"YOSO num_hashes must be >= 1, got 0"),
        (lambda: lshattn.YOSO(num_bits=0), r"YOSO num_bits \(τ\) must be in \[1, 62\] \(bucket ids are int64\), got 0"),
        (lambda: lshattn.YOSO(num_bits=63), r"must be in \[1, 62\].*got 63"),
        (lambda: lshattn.YOSO(backward="v2"), r"YOSO backward must be 'approx' or 'exact', got 'v2'"),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_expectation_refuses_lengths_that_would_not_fit():
    q, k, v = (torch.zeros(1, 4, 40000, 2) for _ in range(3))
    with pytest.raises(
        ValueError,
        match=r"\(B, H, T, S\) = \(1, 4, 40000, 40000\) .* needs about 47.7 GiB .* use YOSO-m \(expectation=False\)"
    ):
        lshattn.YOSO(expectation=True)(q, k, v)


def test_dropout_is_refused():
    q, k, v = testing.make_qkv(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"YOSO does not implement attention dropout, got dropout_p=0.1"):
        lshattn.YOSO()(q, k, v, dropout_p=0.1)
