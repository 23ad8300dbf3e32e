"""Sinks and a local window (``lshattn.local``): which pairs they cover, that no pair counts twice,
and what they cost. The DESIGN §4 properties run on them through the catalogue (``*-local``
entries) and the hypothesis suite (every method draws ``sinks`` and ``window``)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from catalogue import METHODS

import lshattn
from lshattn import testing
from lshattn.api import validate_inputs
from lshattn.local import local_pairs, local_slots

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the test extra installs it
    st = None


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_of(pairs, T: int, S: int) -> torch.Tensor:
    """`(B, 1, T, S)` bool in position order from the slots of ``LocalPairs``, failing if a pair
    has two slots (it would count twice)."""
    B = pairs.key_positions.shape[0]
    hits = torch.zeros(B, T, S, dtype=torch.int64).scatter_add_(2, pairs.key_positions, pairs.valid.long())
    assert hits.numel() == 0 or int(hits.max()) <= 1, "a covered pair holds two slots: it would count twice"
    return pairs.restore(hits[:, None]) > 0


def mask_of(style: str, B: int, L: int, seed: int) -> torch.Tensor | None:
    g = gen(seed)
    if style == "none":
        return None
    if style == "scattered":
        return torch.rand(B, L, generator=g) < 0.6
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    right = torch.arange(L)[None, :] < lengths[:, None]
    return right if style == "right" else right.flip(1)


if st is not None:

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(
        B=st.integers(1, 3), T=st.integers(1, 40), sinks=st.integers(0, 6), window=st.sampled_from([None, 0, 1, 2, 7, 50]),
        keys=st.sampled_from(["none", "right", "left", "scattered"]), queries=st.sampled_from(["none", "same", "other"]),
        causal=st.booleans(), own_key=st.booleans(), seed=st.integers(0, 10_000),
    )  # fmt: skip
    def test_the_slots_hold_exactly_the_pairs_of_the_definition(
        B, T, sinks, window, keys, queries, causal, own_key, seed
    ):
        """Scattered into a T×S table, the slots are ``testing.covered_pairs`` (written from the
        definition, densely), each pair once, for any padding, causal or not, with or without the own key."""
        key_mask = mask_of(keys, B, T, seed)
        query_mask = {"none": None, "same": key_mask, "other": mask_of("scattered", B, T, seed + 1)}[queries]
        method = lshattn.SMYRF(sinks=sinks, window=window)
        q = torch.zeros(B, 1, T, 4)
        inputs = validate_inputs(method, q, q, q, key_mask, query_mask, causal, None, None, 0.0)
        pairs = local_pairs(inputs, sinks, window, own_key=own_key)
        expected = testing.covered_pairs(
            B, T, T, sinks=sinks, window=window, key_padding_mask=inputs.key_padding_mask,
            query_padding_mask=inputs.query_padding_mask, causal=causal, own_key=own_key,
        )  # fmt: skip
        if pairs is None:
            assert sinks == 0 and window is None and not expected.any()
            return
        assert pairs.slots == local_slots(T, sinks, window, causal)
        assert torch.equal(dense_of(pairs, T, T), expected)


def test_ranks_count_real_tokens_only():
    """Under scattered padding the window is the nearest *real* tokens and the sinks the first real ones."""
    mask = torch.tensor([[False, True, False, False, True, True, False, True]])
    covered = testing.covered_pairs(1, 8, 8, sinks=1, window=1, key_padding_mask=mask, query_padding_mask=mask)
    q = torch.zeros(1, 1, 8, 4)
    method = lshattn.SMYRF(sinks=1, window=1)
    pairs = local_pairs(validate_inputs(method, q, q, q, mask, mask, False, None, None, 0.0), 1, 1)
    assert torch.equal(dense_of(pairs, 8, 8), covered)
    # Query at position 5 (real rank 2): the sink (position 1) and ranks 1..3 (positions 4, 5, 7).
    assert covered[0, 0, 5].nonzero().flatten().tolist() == [1, 4, 5, 7]


# Every method of the catalogue that adds sinks and a window to a selection of its own.
SPARSE = [name for name, entry in METHODS.items() if not isinstance(entry.method, (lshattn.Dense, lshattn.Local))]


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_window_covering_everything_is_the_exact_limit(name, causal):
    """Whatever the hashing found, a window over the whole sequence gives the method's exact limit:
    a covered pair counts as much as a found one, never twice (dense softmax; YOSO-E for YOSO)."""
    entry = METHODS[name]
    method = dataclasses.replace(entry.method, window=40, sinks=2)
    q, k, v = testing.make_qkv(2, 3, 33, 33, 16, 8, seed=5, dtype=torch.float64)
    if entry.shared_qk:
        k = q
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, [5, 9, 30]] = False
    kw = dict(key_padding_mask=mask, query_padding_mask=mask, causal=causal)
    out = method(q, k, v, generator=gen(1), **kw)
    expected = entry.exact_reference(q, k, v, **kw)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", SPARSE)
def test_dot_products_and_cost_count_the_slots(name):
    """``aux.dot_products`` and ``cost().dot_products`` grow by B·H·T·A, the slots scored
    (SimHash's aux by exactly that much too: it adds the slots to the colliding pairs, which
    in importance mode leave out the covered ones)."""
    entry = METHODS[name]
    plain = dataclasses.replace(entry.method, sinks=0, window=None)
    local = dataclasses.replace(entry.method, sinks=3, window=2)
    B, H, T, D = 2, 3, 30, 8
    q, k, v = testing.make_qkv(B, H, T, T, D, D, seed=2)
    if entry.shared_qk:
        k = q
    slots = local_slots(T, 3, 2, causal=False)
    assert slots == 3 + 5
    _, aux_plain = plain(q, k, v, generator=gen(3), return_aux=True)
    _, aux_local = local(q, k, v, generator=gen(3), return_aux=True)
    if isinstance(local, lshattn.TopK):
        assert aux_local.dot_products == aux_plain.dot_products == B * H * T * T  # it scores every pair anyway
        return
    if isinstance(local, lshattn.SketchTopK):  # it keeps the slots and a fraction of the keys they leave
        covered = testing.covered_by(local, q, k).sum(-1)  # (B, T): the slots each query has
        kept = covered + torch.ceil((T - covered) * local.fraction)
        assert aux_local.dot_products == H * int(kept.sum())
        assert aux_plain.dot_products == B * H * T * math.ceil(T * local.fraction)
        return
    if isinstance(local, lshattn.YOSO) and local.expectation:
        assert aux_local.dot_products == aux_plain.dot_products  # YOSO-E computes every pair exactly already
        return
    # importance-weighted SimHash and whole-bucket Reformer leave the covered pairs out of their collisions
    overlap = 0
    if isinstance(local, lshattn.SimHash) and local.mode == "importance":
        overlap = int((testing.collisions_from_aux(aux_plain, local.rule) & testing.covered_by(local, q, k)).sum())
        assert overlap > 0
    if isinstance(local, lshattn.Reformer) and local.whole_buckets:
        found = testing.reformer_rounds(local, aux_plain) & testing.covered_by(local, q, k)[:, :, None]
        overlap = int(found.any(2).sum() if local.correct_duplicates else found.sum())  # a pair once per round
        assert overlap > 0
    assert aux_local.dot_products - aux_plain.dot_products == B * H * T * slots - overlap
    extra = local.cost(B, H, T, T, D, D).dot_products - plain.cost(B, H, T, T, D, D).dot_products
    assert extra == B * H * T * slots


def test_local_attends_its_slots_and_counts_them():
    """``Local`` is softmax over the covered pairs alone; its dot products are its slots."""
    q, k, v = testing.make_qkv(2, 3, 30, 30, 8, seed=4, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :6] = False
    method = lshattn.Local(sinks=2, window=3)
    out, aux = method(q, k, v, key_padding_mask=mask, query_padding_mask=mask, causal=True, return_aux=True)
    expected = testing.local_brute_force(method, q, k, v, key_padding_mask=mask, query_padding_mask=mask, causal=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    assert aux.dot_products == 2 * 3 * 30 * (2 + 4) == method.cost(2, 3, 30, 30, 8, 8, causal=True).dot_products
    assert lshattn.for_budget("local", 0.25, 128, sinks=2) == lshattn.Local(sinks=2, window=14)


def test_yoso_e_is_unchanged_by_sinks_and_a_window():
    q, k, v = testing.make_qkv(1, 2, 20, 20, 8)
    method = lshattn.YOSO(expectation=True, num_bits=4)
    assert torch.equal(method(q, k, v), dataclasses.replace(method, sinks=2, window=3)(q, k, v))


def test_a_sink_gives_a_query_with_no_collision_a_key():
    """Sparse SimHash with 62-bit codes finds almost nothing: without sinks most queries output
    zeros; with one sink every real query attends at least the first real token."""
    q, k, v = testing.make_qkv(1, 2, 24, 24, 16, seed=7)
    sparse = lshattn.SimHash(num_bits=62, mode="sparse")
    alone = sparse(q, k, v, generator=gen(1))
    assert (alone == 0).all(-1).float().mean() > 0.9
    with_sink = dataclasses.replace(sparse, sinks=1)(q, k, v, generator=gen(1))
    assert not (with_sink == 0).all(-1).any()


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: lshattn.SMYRF(sinks=-1), ValueError, r"SMYRF sinks must be >= 0, got -1"),
        (lambda: lshattn.TopK(window=-2), ValueError, r"TopK window must be None \(no window\) or >= 0.*got -2"),
        (lambda: lshattn.YOSO(window=True), TypeError, r"YOSO window must be an int or None, got True"),
        (lambda: lshattn.SimHash(sinks=None), TypeError, r"SimHash sinks must be an int, got None"),
        (lambda: lshattn.Local(sinks=0, window=None), ValueError, r"Local with sinks=0 and window=None attends no key"),
    ],
)
def test_bad_settings_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("name", [name for name in SPARSE if not METHODS[name].shared_qk])  # refuses T != S anyway
def test_a_window_needs_as_many_queries_as_keys(name):
    entry = METHODS[name]
    q, k, v = testing.make_qkv(1, 2, 12, 20, 8)
    with pytest.raises(ValueError, match=r"window=1\) needs T == S .*got T=12 queries and S=20 keys; pass window=None"):
        dataclasses.replace(entry.method, window=1)(q, k, v)
    dataclasses.replace(entry.method, sinks=2, window=None)(q, k, v)  # sinks work in cross-attention


def test_positional_fields_keep_their_order():
    """``sinks`` and ``window`` are keyword-only: positional settings mean what they meant."""
    assert lshattn.SimHash(2, 4, "all", "sparse") == lshattn.SimHash(
        num_hashes=2, num_bits=4, rule="all", mode="sparse"
    )
    with pytest.raises(TypeError):
        lshattn.TopK(0.25, False, 2)


@pytest.mark.parametrize("name", ["smyrf", "random", "reformer", "simhash", "yoso", "topk"])
@pytest.mark.parametrize("T", [128, 512])
def test_for_budget_spends_the_budget_with_the_covered_pairs(name, T):
    fixed = dict(sinks=2, window=2) | ({"shared_qk": False} if name == "reformer" else {})
    method = lshattn.for_budget(name, 0.25, T, D=32, **fixed)
    assert (method.sinks, method.window) == (2, 2)
    share = lshattn.work_share(method, T, T, 32)
    assert 0.125 <= share <= 0.25 + 1e-9
    if name == "smyrf":
        assert share > lshattn.work_share(lshattn.for_budget(name, 0.25, T, D=32), T, T, 32) - 0.05


def test_for_budget_refuses_a_window_that_spends_the_budget_alone():
    with pytest.raises(ValueError, match=r"no smyrf setting spends 5.00% or less at T=128.*raise the budget"):
        lshattn.for_budget("smyrf", 0.05, 128, sinks=4, window=8)
    with pytest.raises(ValueError, match=r"no topk setting spends 5.00% or less"):
        lshattn.for_budget("topk", 0.05, 128, sinks=4, window=8)


def test_an_all_real_query_mask_is_no_mask():
    """A query mask with every token real is dropped by the API, so queries are ranked by the key
    mask, as with no query mask; the reference ranks them alike (a slow-profile hypothesis case:
    SMYRF 1×1 with its own key as the window, keys padded on the left, 3 tokens)."""
    q, k, v = testing.make_qkv(1, 1, 3, 3, 1, 1, seed=0)
    keys = torch.tensor([[False, True, True]])
    every = torch.ones(1, 3, dtype=torch.bool)
    method = lshattn.SMYRF(num_hashes=1, q_cluster_size=1, k_cluster_size=1, window=0)
    out, aux = method(q, k, v, key_padding_mask=keys, query_padding_mask=every, generator=gen(1), return_aux=True)
    assert torch.equal(out, method(q, k, v, key_padding_mask=keys, generator=gen(1)))
    expected = testing.rounds_reference(
        q, k, v, testing.smyrf_rounds(aux), key_padding_mask=keys, query_padding_mask=every,
        covered=testing.covered_by(method, q, k, key_padding_mask=keys, query_padding_mask=every),
    )  # fmt: skip
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_a_wide_window_does_not_fragment_memory(tmp_path):
    """The slots' scores were a list of A small tensors kept between A large temporaries, which
    fragmented the heap: 4,000 tokens with a 500-token window peaked at 4.4 GB (a 2,000-token
    window at 8k was killed past 23 GB). Written into one tensor as they come, 0.7 GB. (How much
    the old way fragmented depends on the heap's layout: this script showed it.)"""
    import subprocess
    import sys

    script = tmp_path / "wide_window.py"
    script.write_text(
        "import torch, resource, lshattn\n"
        "q = torch.randn(1, 9, 4000, 64); k = torch.randn(1, 9, 4000, 64); v = torch.randn(1, 9, 4000, 64)\n"
        "m = lshattn.Local(sinks=4, window=500)\n"
        "with torch.no_grad():\n"
        "    out = m(q, k, v, causal=True)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    peak_kb = int(subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout)
    assert peak_kb < 2_000_000, f"peak {peak_kb / 1e6:.1f} GB"
