"""Quickstart: every method on the same random inputs, against exact attention.

Run with ``python examples/quickstart.py``.
"""

import torch

import lshattn

torch.manual_seed(0)
B, H, T, D = 2, 4, 1024, 64
# Tokens near one of 16 topics, so that each query has a few keys that matter: the regime LSH
# attention is built for (on i.i.d. Gaussian inputs attention is nearly uniform and no sparse
# method can do well).
topics = torch.randn(B, H, 16, D) * 0.6
assignment = torch.randint(0, 16, (B, H, T, 1)).expand(-1, -1, -1, D)
q = topics.gather(2, assignment) + 0.15 * torch.randn(B, H, T, D)
k = topics.gather(2, assignment) + 0.15 * torch.randn(B, H, T, D)
q, k = q * D**0.25, k * D**0.25
v = torch.randn(B, H, T, D)
mask = torch.ones(B, T, dtype=torch.bool)
mask[1, 700:] = False  # the second sequence is padded after 700 tokens

exact = lshattn.Dense()(q, k, v, key_padding_mask=mask, query_padding_mask=mask)
methods = [
    lshattn.SMYRF(num_hashes=2, q_cluster_size=64, k_cluster_size=64),
    lshattn.SMYRF(num_hashes=4, q_cluster_size=64, k_cluster_size=64),
    lshattn.Reformer(num_hashes=2, bucket_size=64, shared_qk=False),
    lshattn.Reformer(num_hashes=4, bucket_size=64, num_buckets=32, shared_qk=False),
    lshattn.SimHash(num_bits=4, mode="sparse"),
    lshattn.SimHash(num_hashes=4, num_bits=6, mode="sparse"),
    lshattn.YOSO(num_hashes=32, num_bits=8),
]
generator = torch.Generator().manual_seed(0)
print(f"{'method':<60} {'budget':>7} {'rel. error':>10}")
for method in methods:
    out, aux = method(q, k, v, key_padding_mask=mask, query_padding_mask=mask, generator=generator, return_aux=True)
    error = (out - exact).norm() / exact.norm()
    budget = aux.dot_products / (B * H * T * T)  # YOSO-m computes no dot product
    print(f"{str(method):<60} {budget:>7.1%} {error:>10.3f}")
