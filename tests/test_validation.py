"""Bad input gets a clear error naming the sizes and the fix; nothing is silently wrong."""

from __future__ import annotations

import pytest
import torch
from catalogue import METHODS

import lshattn
from lshattn import testing

SPECS = [pytest.param(entry.method, id=name) for name, entry in METHODS.items()]


def qkv(B=2, H=3, T=20, S=20, D=16, Dv=16):
    return testing.make_qkv(B, H, T, S, D, Dv)


def call(spec, q, k, v, **kw):
    if getattr(spec, "shared_qk", False) and k.shape == q.shape:
        k = q
    return spec(q, k, v, **kw)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dims \(B, H, T, D\), got shape \(3, 20, 16\)"),
        (lambda q, k, v: (q, k[None], v), ValueError, r"k must have 4 dims"),
        (lambda q, k, v: (q, k, v[:1]), ValueError, r"batch sizes differ: q has B=2, k has B=2, v has B=1"),
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), ValueError, r"head counts differ: q has H=3, k has H=2.*repeat"),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, r"head dims differ: q has D=16, k has D=8"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, r"lengths differ: k has S=20, v has S=5"),
        (lambda q, k, v: (q.int(), k, v), TypeError, r"q must be a floating-point tensor, got torch.int32"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"share a dtype"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, r"q must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, r"every size must be positive"),
    ],
    ids=["q-rank", "k-rank", "batch", "heads", "dim", "kv-length", "int-dtype", "mixed-dtype", "numpy", "empty"],
)
def test_bad_tensors(spec, make, error, message):
    q, k, v = make(*qkv())
    with pytest.raises(error, match=message):
        spec(q, k, v)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key_padding_mask=torch.ones(2, 21, dtype=torch.bool)), r"key_padding_mask must have shape \(B, S\) = \(2, 20\), got \(2, 21\)"),
        (dict(key_padding_mask=torch.ones(2, 20)), r"key_padding_mask must be a bool tensor.*mask.bool\(\)"),
        (dict(query_padding_mask=torch.ones(20, dtype=torch.bool)), r"query_padding_mask must have shape \(B, T\)"),
        (dict(key_padding_mask=[[True] * 20] * 2), r"key_padding_mask must be a bool tensor"),
        (dict(scale=-1.0), r"scale must be a positive finite number"),
        (dict(scale=float("nan")), r"scale must be a positive finite number"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ],
    ids=["mask-shape", "mask-dtype", "qmask-rank", "mask-list", "negative-scale", "nan-scale", "dropout"],
)
def test_bad_arguments(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(spec, *qkv(), **kwargs)


@pytest.mark.parametrize("spec", SPECS)
def test_causal_needs_equal_lengths(spec):
    q, k, v = qkv(T=20, S=12)
    with pytest.raises(ValueError, match=r"causal=True needs T == S.*T=20, S=12"):
        spec(q, k, v, causal=True)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        lshattn.SMYRF()(*qkv(), generator=0)


def test_reformer_refuses_cross_attention():
    q, k, v = qkv(T=20, S=12)
    with pytest.raises(ValueError, match=r"Reformer .* needs T == S, got T=20, S=12; .* use SMYRF"):
        lshattn.Reformer(shared_qk=False)(q, k, v)


def test_reformer_shared_qk_needs_k_to_be_q():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"shared_qk=True\) uses the normalised queries as keys, so k must be q.*shared_qk=False"):
        lshattn.Reformer()(q, k, v)
    lshattn.Reformer()(q, q.clone(), v)  # equal values are accepted


def test_smyrf_cluster_counts_must_match():
    q, k, v = qkv(T=64, S=40)
    with pytest.raises(ValueError, match=r"as many query clusters as key clusters: T=64 .* gives 4, S=40 .* gives 5; use k_cluster_size=10"):
        lshattn.SMYRF(q_cluster_size=16, k_cluster_size=8)(q, k, v)
    lshattn.SMYRF(q_cluster_size=16, k_cluster_size=10)(q, k, v)  # the suggested fix works


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lshattn.SMYRF(num_hashes=0), "SMYRF num_hashes must be >= 1, got 0"),
        (lambda: lshattn.SMYRF(q_cluster_size=-2), "SMYRF q_cluster_size must be >= 1, got -2"),
        (lambda: lshattn.SMYRF(k_cluster_size=0), "SMYRF k_cluster_size must be >= 1, got 0"),
        (lambda: lshattn.Reformer(bucket_size=0), "Reformer bucket_size must be >= 1, got 0"),
        (lambda: lshattn.Reformer(num_hashes=0), "Reformer num_hashes must be >= 1, got 0"),
        (lambda: lshattn.Reformer(chunks_before=-1), "Reformer chunks_before must be >= 0, got -1"),
        (lambda: lshattn.Reformer(num_buckets=7), "num_buckets must be even and >= 2"),
        (lambda: lshattn.Reformer(num_buckets=0), "num_buckets must be even and >= 2"),
        (lambda: lshattn.Reformer(num_buckets=96), "must be a power of two to be factorised, got 96; use 64 or 128"),
    ],
)
def test_bad_method_sizes(make, message):
    with pytest.raises(ValueError, match=message):
        make()
