"""Analytic costs against what was measured: dot products from aux, FLOPs from FlopCounterMode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from catalogue import METHODS

import lshattn
from lshattn import kernels, testing
from lshattn.blocks import block_layout
from lshattn.cost import count_flops

SIZES = [(2, 3, 64, 64, 16, 16), (1, 2, 100, 100, 32, 8), (2, 1, 37, 37, 8, 8)]


@pytest.mark.parametrize("name", [n for n, e in METHODS.items() if not e.data_dependent_cost])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-H{}-T{}-S{}-D{}-Dv{}".format(*s))
def test_flops_counted_by_torch_equal_the_formula(name, size):
    """FlopCounterMode counts matrix products only; the formula also counts the element-wise
    work of the causal own-key column (its dot product, 2·D, and its merge with the block's
    output, 4·Dv, per query slot), of SMYRF's hash projections and of the pairs ``sinks`` and
    ``window`` cover, so those terms are removed."""
    spec = METHODS[name].method
    if isinstance(spec, lshattn.YOSO) and not spec.expectation and not kernels.available():
        pytest.skip("no C++ compiler: YOSO's cost formula is that of the native kernels")
    B, H, T, S, D, Dv = size
    q, k, v = testing.make_qkv(B, H, T, S, D, Dv)
    k = q if getattr(spec, "shared_qk", False) else k
    for causal in (False, True):
        measured = count_flops(lambda: spec(q, k, v, causal=causal))
        cost = spec.cost(B, H, T, S, D, Dv, causal=causal)
        elementwise = 0
        if causal and not isinstance(spec, (lshattn.Dense, lshattn.Local)) and not getattr(spec, "shared_qk", False):
            plain = dataclasses.replace(spec, sinks=0, window=None)  # a window is narrower when causal
            own_key_slots = plain.cost(B, H, T, S, D, Dv, causal=True).dot_products - plain.cost(B, H, T, S, D, Dv).dot_products
            elementwise = (2 * D + 4 * Dv) * own_key_slots
        if isinstance(spec, lshattn.Local):  # slots and tail sums: element-wise passes, no matrix product
            elementwise = cost.flops
        elif getattr(spec, "sinks", 0) or getattr(spec, "window", None) is not None:
            # the covered pairs' work is element-wise, one pass per slot over views (lshattn.local):
            # all that the formula adds for them (nothing for YOSO-E and the oracle, which score every pair)
            plain = dataclasses.replace(spec, sinks=0, window=None)
            elementwise += cost.flops - plain.cost(B, H, T, S, D, Dv, causal=causal).flops
        if isinstance(spec, lshattn.SMYRF):
            # its hash projections are a product and a sum over each token's own row
            # (hashing.e2lsh_projection), which FlopCounterMode does not see
            layout = block_layout(T, S, spec.q_cluster_size, spec.k_cluster_size)
            elementwise += 2 * B * H * spec.num_hashes * (layout.padded_queries + layout.padded_keys) * (D + 2)
        assert measured == cost.flops - elementwise, (causal, measured, cost.flops)


def test_dense_flops_on_cpu_are_counted():
    """PyTorch counts 0 FLOPs for SDPA on CPU; lshattn.cost registers its formula."""
    q, k, v = testing.make_qkv(1, 8, 1024, 1024, 64)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 4 * 8 * 1024 * 1024 * 64
