"""One test per verified defect of the public reference code (docs/methods.md §0, §4, §5),
showing that we do not have it. SimHash/BERT-LSH and YOSO defects are tested beside those
methods (tests/test_simhash.py, tests/test_yoso.py); the ALBERT-LSH drop-in defects in
tests/test_hf.py."""

from __future__ import annotations

import torch

import lshattn
from lshattn import testing


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_smyrf_padding_mask_is_aligned_per_batch_and_head():
    """SMYRF tiled the padding mask over heads in the wrong order: with batch 2, heads 2 and a
    single cluster (so exact), two of four (b, h) rows had errors of 0.95 and 0.89."""
    q, k, v = testing.make_qkv(2, 2, 32, 32, 16)
    mask = torch.tensor([[True] * 32, [True] * 11 + [False] * 21])
    one_cluster = lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32)
    out = one_cluster(q, k, v, key_padding_mask=mask, generator=gen())
    expected = testing.dense_reference(q, k, v, key_padding_mask=mask)
    for b in range(2):
        for h in range(2):
            torch.testing.assert_close(out[b, h].double(), expected[b, h], atol=1e-5, rtol=1e-5)


def test_smyrf_lengths_not_dividing_the_cluster_never_mix_sequences():
    """SMYRF did not check N % cluster_size: with N = 48 and clusters of 32, clusters spanned
    two sequences and sequence 1's values changed sequence 0's output."""
    q, k, v = testing.make_qkv(2, 2, 48, 48, 16)
    method = lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32)
    out = method(q, k, v, generator=gen())
    v2 = v.clone()
    v2[1] = torch.randn_like(v2[1])
    assert torch.equal(method(q, k, v2, generator=gen())[0], out[0])


def test_smyrf_xbox_plus_runs_on_current_pytorch():
    """SMYRF's XBOX+ called ``tensor.repeat(shape, 1)``, a TypeError since torch 1.x; ours
    runs with batch and head dims on this torch and gives every transformed vector one norm."""
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8)
    valid_q, valid_k = torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 12, dtype=torch.bool)
    q_aug, k_aug = lshattn.hashing.xbox_plus(q, k, valid_q, valid_k)
    norms = torch.cat([q_aug.norm(dim=-1), k_aug.norm(dim=-1)], -1)
    torch.testing.assert_close(norms, norms[..., :1].expand_as(norms))


def test_smyrf_causal_keeps_a_visible_key_for_every_query():
    """SMYRF has no causal mode (its GPT-2 attempt is unfinished); ours masks later keys inside
    each cluster and adds each query's own key, so no real query is left without a key."""
    q, k, v = testing.make_qkv(2, 4, 64, 64, 16)
    method = lshattn.SMYRF(num_hashes=1, q_cluster_size=8, k_cluster_size=8)
    out = method(q, k, v, causal=True, generator=gen())
    assert (out.abs().sum(-1) > 0).all()
    assert torch.isfinite(out).all()


def test_reformer_divides_logits_by_sqrt_d():
    """LRA's JAX Reformer multiplied the logits by √d instead of dividing. Ours in its exact
    limit (one chunk) equals softmax(q·k/√d) attention."""
    q, k, v = testing.make_qkv(1, 2, 50, 50, 64)
    out = lshattn.Reformer(bucket_size=64, shared_qk=False)(q, k, v, generator=gen())
    torch.testing.assert_close(out.double(), testing.dense_reference(q, k, v, scale=64**-0.5), atol=1e-5, rtol=1e-5)


def test_reformer_hash_is_not_a_fixed_key():
    """LRA's JAX Reformer hashed with the fixed PRNGKey(0) in every layer and call. Ours draws
    rotations from the caller's generator (or the global RNG): other states, other buckets."""
    q, _, v = testing.make_qkv(1, 2, 64, 64, 16)
    method = lshattn.Reformer(num_hashes=1, bucket_size=8, num_buckets=8)
    buckets = [method(q, q, v, generator=gen(seed), return_aux=True)[1].buckets for seed in range(3)]
    assert not torch.equal(buckets[0], buckets[1]) and not torch.equal(buckets[1], buckets[2])
    _, first = method(q, q, v, return_aux=True)
    _, second = method(q, q, v, return_aux=True)
    assert not torch.equal(first.buckets, second.buckets)
