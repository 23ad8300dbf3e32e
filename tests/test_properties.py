"""The properties every method must satisfy (DESIGN §4), run over every entry of the catalogue."""

from __future__ import annotations

import pytest
import torch
from catalogue import CROSS_CASES, METHODS, SELF_CASES, Case

import lshattn
from lshattn import testing

# On the CPU, YOSO-m and SimHash run native kernels (lshattn.kernels). Their "@torch" copies run
# the PyTorch path instead: the one other devices, and machines without a compiler, take.
TORCH_PATH = "@torch"
NAMES = list(METHODS) + [
    name + TORCH_PATH
    for name, entry in METHODS.items()
    if isinstance(entry.method, lshattn.SimHash)
    or (isinstance(entry.method, lshattn.YOSO) and not entry.method.expectation)
]


def entry_of(name: str):
    return METHODS[name.removesuffix(TORCH_PATH)]


@pytest.fixture(autouse=True)
def kernel_path(request, native_kernels):
    """Runs an "@torch" entry's test on the PyTorch path."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and str(callspec.params.get("name", "")).endswith(TORCH_PATH):
        native_kernels(False)


def grid(*, cross: bool = True, with_pattern: bool = False, causal: bool = False):
    """pytest params (name, case[, causal]) for every method and every case it accepts."""
    params = []
    for name in NAMES:
        entry = entry_of(name)
        if with_pattern and entry.brute_force is None:
            continue
        for case in SELF_CASES + (CROSS_CASES if cross and entry.cross else []):
            for is_causal in (False, True) if causal and case.T == case.S else (False,):
                tag = f"{name}-{case.id}" + ("-causal" if is_causal else "")
                params.append(pytest.param(name, case, is_causal, id=tag))
    return params


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def masks_for(case: Case, seed: int = 1):
    """Right-padding masks; with B >= 2 the last sequence is fully padded."""
    fully = case.B - 1 if case.B >= 2 else None
    keys = testing.make_padding_mask(case.B, case.S, seed=seed, fully_padded=fully)
    queries = keys if case.S == case.T else testing.make_padding_mask(case.B, case.T, seed=seed + 1)
    return keys, queries


@pytest.mark.parametrize("name, case, causal", grid(causal=True))
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_exact_limit(name, case, causal, padded):
    """One block or cluster holding everything is exact attention (fp32, 1e-5)."""
    entry = entry_of(name)
    q, k, v = entry.inputs(case, dtype=entry.exact_dtype)
    key_mask, query_mask = masks_for(case) if padded else (None, None)
    kw = dict(key_padding_mask=key_mask, query_padding_mask=query_mask, causal=causal)
    out = entry.exact(q, k, v, generator=gen(), **kw)
    expected = entry.exact_reference(q, k, v, **kw)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, case, causal", grid(causal=True, with_pattern=True))
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_brute_force(name, case, causal, padded):
    """With the assignments from return_aux, a naive loop over the same pairs gives the output."""
    entry = entry_of(name)
    q, k, v = entry.inputs(case, seed=2)
    key_mask, query_mask = masks_for(case) if padded else (None, None)
    kw = dict(key_padding_mask=key_mask, query_padding_mask=query_mask, causal=causal)
    out, aux = entry.method(q, k, v, generator=gen(3), return_aux=True, **kw)
    expected = entry.reference(q, k, v, aux, **kw)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def spread(x, positions, length, fill):
    """`(B, H, L, E)` tokens put at ``positions`` `(B, L)` of a `(B, H, length, E)` tensor; the
    other slots hold ``fill``."""
    B, H, L, E = x.shape
    out = x.new_full((B, H, length, E), fill)
    return out.scatter(2, positions[:, None, :, None].expand(B, H, L, E), x)


def real_positions(B, real, length, layout, seed):
    """`(B, real)` ascending positions of the real tokens among ``length`` slots: on the right
    (padding after), on the left (padding before) or scattered at random per sequence."""
    if layout == "right":
        return torch.arange(real).expand(B, -1)
    if layout == "left":
        return torch.arange(length - real, length).expand(B, -1)
    g = gen(seed)
    return torch.stack([torch.randperm(length, generator=g)[:real].sort().values for _ in range(B)])


def mask_at(positions, length):
    return torch.zeros(positions.shape[0], length, dtype=torch.bool).scatter(1, positions, True)


@pytest.mark.parametrize("name, case, causal", grid(causal=True))
@pytest.mark.parametrize("layout", ["right", "left", "scattered"])
def test_pad_invariance(name, case, causal, layout):
    """Real tokens among padded ones (after, before or between them, the padded slots holding
    NaN and inf) give the outputs they give alone; padded queries output zeros."""
    entry = entry_of(name)
    q, k, v = entry.inputs(case, seed=4)
    t_len, s_len = case.T + 13, case.S + (13 if case.S == case.T else 7)
    q_at = real_positions(case.B, case.T, t_len, layout, seed=20)
    k_at = q_at if case.S == case.T else real_positions(case.B, case.S, s_len, layout, seed=21)
    q2 = spread(q, q_at, t_len, float("nan"))
    k2 = q2 if entry.shared_qk else spread(k, k_at, s_len, float("inf"))
    v2 = spread(v, k_at, s_len, float("nan"))
    query_mask, key_mask = mask_at(q_at, t_len), mask_at(k_at, s_len)
    out = entry.method(q, k, v, generator=gen(5), causal=causal)
    out_padded = entry.method(
        q2, k2, v2, generator=gen(5), causal=causal, key_padding_mask=key_mask, query_padding_mask=query_mask
    )
    real_rows = out_padded.gather(2, q_at[:, None, :, None].expand_as(out))
    torch.testing.assert_close(real_rows, out, atol=1e-6, rtol=1e-6)
    padded_rows = out_padded.masked_select(~query_mask[:, None, :, None])
    assert torch.equal(padded_rows, torch.zeros_like(padded_rows))


@pytest.mark.parametrize("name, case", [(p.values[0], p.values[1]) for p in grid() if entry_of(p.values[0]).cross])
def test_key_mask_alone_equals_attention_to_the_real_keys(name, case):
    """With a key mask and no query mask, every query attends as if only the real keys were
    given: the same as cross-attention to them. So a sequence with fewer real keys than real
    queries never leaves a query facing padding only: a real query that can see a key never
    outputs zeros (where the method promises it)."""
    entry = entry_of(name)
    q, k, v = entry.inputs(case, seed=22)
    real_keys = [max(1, case.S // (2 + b)) for b in range(case.B)]  # fewer real keys than queries
    key_mask = torch.stack([mask_at(real_positions(1, n, case.S, "scattered", seed=23 + b), case.S)[0]
                            for b, n in enumerate(real_keys)])  # fmt: skip
    out = entry.method(q, k, v, key_padding_mask=key_mask, generator=gen(24))
    for b in range(case.B):
        real = key_mask[b]
        alone = entry.method(q[b : b + 1], k[b : b + 1, :, real], v[b : b + 1, :, real], generator=gen(24))
        torch.testing.assert_close(out[b : b + 1], alone, atol=1e-6, rtol=1e-6)
    if entry.zero_free:
        assert (out.abs().amax(-1) > 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_batch_independence(name, padded):
    """Changing one sequence does not change another's output, bit for bit."""
    entry = entry_of(name)
    case = Case(3, 2, 45, 45, 16, 16)
    q, k, v = entry.inputs(case, seed=6)
    key_mask = torch.tensor([[True] * 45, [True] * 20 + [False] * 25, [True] * 33 + [False] * 12]) if padded else None
    out = entry.method(q, k, v, generator=gen(7), key_padding_mask=key_mask, query_padding_mask=key_mask)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[1] = torch.randn_like(x[1]) * 3
    if entry.shared_qk:
        k2 = q2
    out2 = entry.method(q2, k2, v2, generator=gen(7), key_padding_mask=key_mask, query_padding_mask=key_mask)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.equal(out[1], out2[1])


@pytest.mark.parametrize("name", NAMES)
def test_causal_values(name):
    """Causal: outputs at t never depend on the values, or (for strictly causal methods) on
    anything at all, after t."""
    entry = entry_of(name)
    case = Case(2, 2, 50, 50, 16, 16)
    q, k, v = entry.inputs(case, seed=8)
    t = 29
    out = entry.method(q, k, v, causal=True, generator=gen(9))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    later = (q2, k2, v2) if entry.strictly_causal else (v2,)
    for x in later:
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
    if entry.shared_qk:
        k2 = q2
    out2 = entry.method(q2, k2, v2, causal=True, generator=gen(9))
    torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out2[:, :, t + 1 :], out[:, :, t + 1 :])


@pytest.mark.parametrize("name", [n for n, e in METHODS.items() if not e.strictly_causal])
def test_causal_pattern_sees_the_whole_sequence(name):
    """Documents the limit of causal sort-and-chunk attention: which earlier keys share a query's
    chunk or cluster is decided by sorting the whole sequence, so later tokens can change an
    earlier output (never through a later key or value being attended: see above)."""
    entry = entry_of(name)
    case = Case(1, 4, 96, 96, 16, 16)
    q, k, v = entry.inputs(case, seed=10)
    t = 47
    out = entry.method(q, k, v, causal=True, generator=gen(11))
    q2, k2 = q.clone(), k.clone()
    q2[:, :, t + 1 :], k2[:, :, t + 1 :] = torch.randn_like(q2[:, :, t + 1 :]), torch.randn_like(k2[:, :, t + 1 :])
    out2 = entry.method(q2, q2 if entry.shared_qk else k2, v, causal=True, generator=gen(11))
    assert not torch.allclose(out2[:, :, : t + 1], out[:, :, : t + 1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_determinism(name, causal):
    """The same generator state gives bit-identical outputs and gradients; another state
    (for a hashing method) draws other hashes."""
    entry = entry_of(name)
    case = Case(2, 3, 40, 40, 16, 16)

    def run(seed):
        q, k, v = (x.requires_grad_() for x in entry.inputs(case, seed=12))
        out, aux = entry.method(q, q if entry.shared_qk else k, v, causal=causal, generator=gen(seed), return_aux=True)
        out.pow(2).sum().backward()
        return (out.detach(), q.grad, (q.grad if entry.shared_qk else k.grad), v.grad), aux[0]

    (first, hashes), (second, _) = run(13), run(13)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    if entry.draws_hashes:  # the first aux field holds codes, buckets or projections
        assert not torch.equal(hashes, run(14)[1])


@pytest.mark.parametrize("name, case, causal", grid(causal=True, with_pattern=True))
def test_gradients_match_reference(name, case, causal):
    """In float64, gradients equal those of the brute-force reference over the same pairs."""
    if case.T * case.S * case.B * case.H > 20000:
        case = Case(2, 2, case.T, case.S, 8, 8)
    entry = entry_of(name)
    q, k, v = entry.inputs(case, seed=15, dtype=torch.float64)
    key_mask, query_mask = masks_for(case)
    kw = dict(key_padding_mask=key_mask, query_padding_mask=query_mask, causal=causal)
    weight = torch.randn(case.B, case.H, case.T, case.Dv, dtype=torch.float64)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        qq, kk, vv = leaves
        out = fn(qq, qq if entry.shared_qk else kk, vv)
        (out * weight).sum().backward()
        return [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]

    _, aux = entry.method(q, k, v, generator=gen(16), return_aux=True, **kw)
    ours = grads(lambda a, b, c: entry.method(a, b, c, generator=gen(16), **kw))
    expected = grads(lambda a, b, c: entry.reference(a, b, c, aux, **kw))
    for label, a, b in zip("qkv", ours, expected):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m: f"grad {label}: {m}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_visible_key_gives_zeros(name, causal):
    """A fully padded sequence outputs zeros, never NaN, and its gradients are finite."""
    entry = entry_of(name)
    case = Case(2, 2, 20, 20, 8, 8)
    q, k, v = (x.requires_grad_() for x in entry.inputs(case, seed=17))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    out = entry.method(q, q if entry.shared_qk else k, v, key_padding_mask=mask, causal=causal, generator=gen())
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, v))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(name, dtype):
    """Any float dtype works; the output has q's dtype and is close to the float32 result."""
    entry = entry_of(name)
    case = Case(2, 2, 33, 33, 16, 16)
    q, k, v = entry.inputs(case, seed=18)
    expected = entry.method(q, k, v, generator=gen(19))
    out = entry.method(q.to(dtype), k.to(dtype), v.to(dtype), generator=gen(19))
    assert out.dtype == dtype
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 5e-2, torch.float64: 1e-5}[dtype]
    # A low-precision sort key may order a near-tie differently: allow a few rows to differ.
    close = torch.isclose(out.float(), expected, atol=tolerance, rtol=tolerance).all(-1)
    assert close.float().mean() >= (1.0 if dtype == torch.float64 else 0.9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_changes_nothing_inside_a_method(name, dtype):
    """Under mixed precision (torch.autocast, as Trainer's bf16) a method gets half-precision
    inputs and computes exactly as it does on them without autocast: its hashing and products
    stay in float32 (autocast would run them in half precision, flipping near-ties and mixing
    dtypes), and gradients are finite."""
    entry = entry_of(name)
    case = Case(2, 2, 40, 40, 16, 16)
    q, k, v = (x.to(dtype).requires_grad_() for x in entry.inputs(case, seed=25))
    k = q if entry.shared_qk else k
    expected = entry.method(q, k, v, generator=gen(26))
    with torch.autocast("cpu", dtype=dtype):
        out = entry.method(q, k, v, generator=gen(26))
    assert out.dtype == dtype and torch.equal(out, expected)
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, v))
