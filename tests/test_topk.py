"""The oracle (TopK) and the random-cluster control: what they select, beyond the shared properties
(tests/test_properties.py and tests/test_property_based.py run both over every property)."""

from __future__ import annotations

import math

import pytest
import torch

import lshattn
from lshattn import testing


def visible_counts(B, T, S, key_padding_mask, causal):
    """`(B, T)` keys each query may see."""
    visible = torch.ones(B, T, S, dtype=torch.bool)
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, :]
    if causal:
        visible &= torch.ones(T, S, dtype=torch.bool).tril()
    return visible


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.3, 0.5, 0.99])
@pytest.mark.parametrize("causal", [False, True])
def test_selection_is_each_querys_top_k(fraction, causal):
    """Each query keeps ceil(fraction · n) of its n visible keys, and no key it dropped scores
    higher than one it kept."""
    B, H, T, D = 2, 3, 30, 8
    q, k, v = testing.make_qkv(B, H, T, T, D, seed=3)
    mask = testing.make_padding_mask(B, T, seed=4)
    _, aux = lshattn.TopK(fraction=fraction)(q, k, v, key_padding_mask=mask, causal=causal, return_aux=True)
    visible = visible_counts(B, T, T, mask, causal)[:, None]  # (B, 1, T, S)
    scores = (q.double() @ k.double().transpose(-1, -2)).expand(B, H, T, T)
    n = visible.sum(-1).expand(B, H, T)
    expected = torch.tensor([math.ceil(round(fraction * c, 6)) for c in n.flatten().tolist()]).view_as(n)
    assert torch.equal(aux.selected.sum(-1), expected)
    assert not (aux.selected & ~visible).any()
    lowest_kept = torch.where(aux.selected, scores, math.inf).amin(-1)
    highest_dropped = torch.where(visible & ~aux.selected, scores, -math.inf).amax(-1)
    assert (lowest_kept >= highest_dropped - 1e-6).all()
    assert aux.selected_pairs == int(expected.sum()) and aux.dot_products == B * H * T * T


def test_seven_hundredths_of_a_hundred_keys_is_seven():
    """0.07 · 100 is 7.000000000000001 in floating point: the count is rounded first."""
    q, k, v = testing.make_qkv(1, 1, 1, 100, 4)
    _, aux = lshattn.TopK(fraction=0.07)(q, k, v, return_aux=True)
    assert aux.selected_pairs == 7


@pytest.mark.parametrize("fraction", [0.07, 0.1, 0.13, 0.29, 0.3, 1 / 3, 0.0625, 0.9])
def test_kept_counts_are_ceil_of_the_rounded_product_for_long_rows(fraction):
    """``ceil(fraction · n)`` as exact arithmetic gives it up to 20,000 keys: in float32 the
    6-decimal rounding moved products above 1,000 to the next integer (0.13 · 8,300 kept 1,080)."""
    from lshattn.methods.topk import kept_counts

    counts = torch.arange(20_000)
    expected = torch.tensor([math.ceil(round(n * fraction, 6)) for n in counts.tolist()])
    assert torch.equal(kept_counts(counts, fraction), expected)
    assert int(kept_counts(torch.tensor(8300), 0.13)) == 1079


def test_ties_go_to_the_earlier_key():
    """Identical keys score alike: the earlier positions are kept, in any padding layout."""
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    v = torch.randn(1, 1, 10, 4)
    _, aux = lshattn.TopK(fraction=0.3)(q, k, v, return_aux=True)
    assert aux.selected[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    mask = torch.tensor([[False, True, False, True, True, True, True, True, True, True]])
    _, aux = lshattn.TopK(fraction=0.3)(q, k, v, key_padding_mask=mask, return_aux=True)
    assert aux.selected[0, 0, 0].nonzero().flatten().tolist() == [1, 3, 4]


def test_tail_with_equal_values_is_exact():
    """The tail term is the dropped keys' exact mass times their mean value: when every key a
    query dropped holds the same value, the estimate is exact attention."""
    q, k, v = testing.make_qkv(2, 2, 1, 24, 8, seed=5)
    oracle = lshattn.TopK(fraction=0.25, tail=True)
    _, aux = oracle(q, k, v, return_aux=True)
    v = torch.where(aux.selected[:, :, 0, :, None], v, 1.5)
    torch.testing.assert_close(oracle(q, k, v).double(), testing.dense_reference(q, k, v), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(lshattn.TopK(fraction=0.25)(q, k, v).double(), testing.dense_reference(q, k, v))


def test_tail_is_closer_to_exact_than_the_selection_alone():
    q, k, v = testing.make_qkv(2, 4, 64, 64, 16, seed=6)
    exact = testing.dense_reference(q, k, v)
    plain = (lshattn.TopK(fraction=0.125)(q, k, v).double() - exact).norm()
    tail = (lshattn.TopK(fraction=0.125, tail=True)(q, k, v).double() - exact).norm()
    assert tail < plain


def own_key_found(method, q, k, v, seeds=range(4)) -> float:
    """Share of queries whose cluster holds their highest-scoring key (keys are noisy copies of
    the queries, so that key is their own), over a few hash draws."""
    found = []
    for seed in seeds:
        _, aux = method(q, k, v, generator=torch.Generator().manual_seed(seed), return_aux=True)
        together = testing.smyrf_rounds(aux).any(2)  # (B, H, T, S)
        best = (q @ k.transpose(-1, -2)).argmax(-1, keepdim=True)
        found.append(together.gather(-1, best).float().mean())
    return float(torch.stack(found).mean())


def test_random_clusters_select_nothing_and_smyrf_does():
    """With keys near their queries, SMYRF's clusters nearly always hold a query's own key;
    the random control's hold it about as often as chance, rounds·cluster/S."""
    q, k, v = testing.make_qkv(2, 4, 256, 256, 16, seed=7)
    k = q + 0.05 * k
    smyrf = own_key_found(lshattn.SMYRF(num_hashes=1, q_cluster_size=16, k_cluster_size=16), q, k, v)
    control = own_key_found(lshattn.RandomClusters(num_hashes=1, q_cluster_size=16, k_cluster_size=16), q, k, v)
    chance = 16 / 256
    assert smyrf > 0.5
    assert abs(control - chance) < 0.03, (control, chance)


def test_random_clusters_cost_what_smyrf_costs():
    for size in [(2, 3, 128, 128, 32, 32), (1, 12, 512, 512, 32, 32)]:
        control, smyrf = lshattn.RandomClusters(2, 16, 16), lshattn.SMYRF(2, 16, 16)
        assert control.cost(*size).dot_products == smyrf.cost(*size).dot_products
