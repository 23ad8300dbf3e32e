"""The budget knob: ``for_budget`` returns settings that spend at most the budget, and close to it."""

from __future__ import annotations

import pytest

import lshattn
from lshattn import testing

FRACTIONS = [1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2]
SIZES = [(128, 128, 32), (512, 512, 64), (100, 300, 16), (300, 100, 16)]
SETTINGS = [
    ("smyrf", {}), ("smyrf", {"num_hashes": 4}), ("random", {}), ("reformer", {"shared_qk": False}),
    ("reformer", {"shared_qk": False, "num_hashes": 1, "chunks_before": 0}), ("simhash", {"mode": "sparse"}),
    ("yoso", {"num_bits": 8}), ("topk", {}), ("topk", {"tail": True}),
]  # fmt: skip


def budget_reachable(name: str, fixed: dict, fraction: float, T: int, S: int, D: int) -> bool:
    """Whether the method's cheapest setting fits in ``fraction``: one-token clusters or chunks,
    one YOSO hash, SimHash's longest code."""
    cheapest = {
        "smyrf": {"q_cluster_size": 1, "k_cluster_size": 1}, "random": {"q_cluster_size": 1, "k_cluster_size": 1},
        "reformer": {"bucket_size": 1}, "yoso": {"num_hashes": 1}, "simhash": {"num_bits": 62},
        "topk": {"fraction": fraction},
    }[name]  # fmt: skip
    method = type(lshattn.parse(name))(**fixed, **cheapest)
    return lshattn.work_share(method, T, S, D) <= fraction


@pytest.mark.parametrize(
    "name, fixed", SETTINGS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in f.items())}" for n, f in SETTINGS]
)
@pytest.mark.parametrize("T, S, D", SIZES, ids=lambda x: str(x))
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.4f}")
def test_setting_spends_at_most_the_budget_and_at_least_half(name, fixed, T, S, D, fraction):
    if not budget_reachable(name, fixed, fraction, T, S, D):
        with pytest.raises(ValueError, match=f"no {name} setting spends"):
            lshattn.for_budget(name, fraction, T, S, D, **fixed)
        return
    method = lshattn.for_budget(name, fraction, T, S, D, **fixed)
    assert isinstance(method, type(lshattn.parse(name)))
    assert all(getattr(method, field) == value for field, value in fixed.items())
    share = lshattn.work_share(method, T, S, D)
    assert share <= fraction
    # Not needlessly cheap: one step of a cluster, bucket or hash count moves the share by at most
    # half these budgets; one bit more or less of SimHash halves or doubles the collisions.
    assert share >= fraction / (2.1 if name == "simhash" else 2), (method, share)


@pytest.mark.parametrize(
    "name, fixed", [("smyrf", {}), ("random", {}), ("reformer", {"shared_qk": False}), ("topk", {})]
)
@pytest.mark.parametrize("causal", [False, True])
def test_a_call_spends_what_the_knob_promised(name, fixed, causal):
    """The dot products a call reports (pairs kept, for the oracle) stay within the budget."""
    T, D, fraction = 200, 16, 0.25
    method = lshattn.for_budget(name, fraction, T, T, D, causal=causal, **fixed)
    q, k, v = testing.make_qkv(2, 3, T, T, D)
    _, aux = method(q, k, v, causal=causal, return_aux=True)
    spent = getattr(aux, "selected_pairs", aux.dot_products) / (2 * 3 * T * T)
    assert spent <= fraction


def test_the_papers_settings_come_back():
    """SMYRF 2×32 is 25 % at 256 tokens; YOSO m = 4, τ = 8 is 25 % of the FLOPs at 128 tokens, dim 32."""
    assert lshattn.for_budget("smyrf", 0.25, 256) == lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32)
    assert lshattn.for_budget("yoso", 0.25, 128, D=32, num_bits=8) == lshattn.YOSO(num_hashes=4, num_bits=8)
    assert lshattn.for_budget("topk", 0.125, 999) == lshattn.TopK(fraction=0.125)
    assert lshattn.for_budget("dense", 1.0, 64) == lshattn.Dense()


def test_work_share_of_the_oracle_is_what_it_keeps():
    assert lshattn.work_share(lshattn.TopK(fraction=0.1), 100, 100, 8) == 0.1
    assert lshattn.work_share(lshattn.Dense(), 100, 100, 8) == 1.0
    assert lshattn.work_share(lshattn.SMYRF(2, 16, 16), 128, 128, 8) == 0.25


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: lshattn.for_budget("dense", 0.5, 128),
            r"no dense setting spends 50\.00% or less .*spends 100\.00%; raise the budget",
        ),
        (
            lambda: lshattn.for_budget("smyrf", 0.001, 128),
            r"the smallest, smyrf:q_cluster_size=1,k_cluster_size=1, spends 1\.56%",
        ),
        (
            lambda: lshattn.for_budget("smyrf", 0.5, 128, k_cluster_size=3),
            r"smyrf's budget turns k_cluster_size: leave it out",
        ),
        (
            lambda: lshattn.for_budget("smyrf", 0.5, 128, bucket_size=3),
            r"smyrf has no field bucket_size; its fields: correct_dup",
        ),
        (lambda: lshattn.for_budget("smyrf", 0, 128), r"the budget must be a fraction in \(0, 1\], got 0"),
        (lambda: lshattn.for_budget("smyrf", 1.5, 128), r"the budget must be a fraction in \(0, 1\], got 1\.5"),
        (lambda: lshattn.for_budget("smyrf", 0.5, 0), r"sizes must be positive, got T=0"),
        (lambda: lshattn.for_budget("nope", 0.5, 128), r"unknown method 'nope'"),
    ],
)
def test_bad_budgets_name_the_problem_and_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction": "0.5"}, r"the budget must be a real number in \(0, 1\], got '0.5' \(str\); pass e.g. 0.25"),
        ({"fraction": True}, r"the budget must be a real number .*got True \(bool\)"),
        ({"T": 128.0}, r"T must be an int, got 128.0 \(float\); pass e.g. T=512"),
        ({"T": True}, r"T must be an int, got True \(bool\)"),
        ({"S": "64"}, r"S must be an int, got '64' \(str\)"),
        ({"D": None}, r"D must be an int, got None"),
    ],
)
def test_wrong_types_are_refused_naming_the_argument(kwargs, message):
    arguments = {"name": "smyrf", "fraction": 0.5, "T": 128, **kwargs}
    with pytest.raises(TypeError, match=message):
        lshattn.for_budget(**arguments)


def test_long_lengths():
    assert lshattn.for_budget("smyrf", 0.125, 16384, D=64) == lshattn.SMYRF(2, 1024, 1024)
    assert lshattn.for_budget("yoso", 1 / 16, 16384, D=64, num_bits=8) == lshattn.YOSO(num_hashes=128, num_bits=8)


def test_pairs_share_is_the_analytic_budget_or_what_the_oracle_keeps():
    assert lshattn.budget.pairs_share(lshattn.SMYRF(2, 16, 16), 128, 128, 8) == 0.25
    assert lshattn.budget.pairs_share(lshattn.TopK(fraction=0.125), 128, 128, 8) == 0.125
    assert lshattn.budget.pairs_share(lshattn.YOSO(num_hashes=4, num_bits=8), 128, 128, 32) == 0.0  # no dot products
    assert lshattn.work_share(lshattn.YOSO(num_hashes=4, num_bits=8), 128, 128, 32) == 0.25  # its FLOPs
