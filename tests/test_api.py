"""The public surface: specs, parse, attention(), cost(), aux records."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from catalogue import METHODS, Case

import lshattn
from lshattn import testing

SPECS = [pytest.param(entry.method, id=name) for name, entry in METHODS.items()]


def test_public_names():
    """Pins the public API: a change here is a change users see."""
    expected = {
        "Cost", "Dense", "DenseAux", "Method", "Reformer", "ReformerAux", "SMYRF", "SMYRFAux", "SimHash",
        "SimHashAux", "YOSO", "YOSOAux", "__version__", "attention", "method_names", "parse",
    }  # fmt: skip
    assert expected <= set(lshattn.__all__)
    for name in lshattn.__all__:
        assert hasattr(lshattn, name), name


@pytest.mark.parametrize("spec", SPECS)
def test_specs_are_frozen_hashable_and_round_trip(spec):
    assert lshattn.parse(str(spec)) == spec
    assert hash(spec) == hash(lshattn.parse(str(spec)))
    assert {spec: 1}[lshattn.parse(str(spec))] == 1
    assert repr(spec).startswith(type(spec).__name__)
    fields = dataclasses.fields(spec)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec, fields[0].name, getattr(spec, fields[0].name))


def test_parse_reads_types_and_defaults():
    assert lshattn.parse("smyrf") == lshattn.SMYRF()
    assert lshattn.parse(" SMYRF : num_hashes=4 , k_cluster_size=16 ") == lshattn.SMYRF(num_hashes=4, k_cluster_size=16)
    assert lshattn.parse("reformer:shared_qk=false,correct_duplicates=True") == lshattn.Reformer(
        shared_qk=False, correct_duplicates=True
    )
    assert str(lshattn.SMYRF()) == "smyrf"
    assert str(lshattn.Reformer(num_hashes=4)) == "reformer:num_hashes=4"


@pytest.mark.parametrize(
    "text, message",
    [
        ("flash", "unknown method 'flash'"),
        ("smyrf:clusters=3", "keys correct_duplicates, k_cluster_size, num_hashes, q_cluster_size"),
        ("smyrf:num_hashes", "key=value"),
        ("smyrf:num_hashes=two", "cannot read 'two'"),
        ("reformer:shared_qk=maybe", "cannot read 'maybe'"),
        ("smyrf:num_hashes=0", "num_hashes must be >= 1"),
    ],
)
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        lshattn.parse(text)


def test_method_names():
    assert {"dense", "random", "reformer", "simhash", "smyrf", "topk", "yoso"} <= set(lshattn.method_names())


def test_attention_function_equals_calling_the_spec():
    q, k, v = testing.make_qkv(2, 2, 40, 40, 16)
    spec = lshattn.SMYRF(q_cluster_size=8, k_cluster_size=8)
    expected = spec(q, k, v, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lshattn.attention(q, k, v, spec, generator=torch.Generator().manual_seed(0)), expected)
    assert torch.equal(lshattn.attention(q, k, v, str(spec), generator=torch.Generator().manual_seed(0)), expected)
    assert torch.equal(lshattn.attention(q, k, v), lshattn.Dense()(q, k, v))
    with pytest.raises(TypeError, match="method must be"):
        lshattn.attention(q, k, v, 3)


@pytest.mark.parametrize("name", list(METHODS))
def test_scale_none_means_inverse_sqrt_d(name):
    entry = METHODS[name]
    spec = entry.method
    q, k, v = entry.inputs(Case(2, 2, 24, 24, 16, 16))
    default = spec(q, k, v, generator=torch.Generator().manual_seed(0))
    explicit = spec(q, k, v, scale=16**-0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default, explicit)
    other = spec(q, k, v, scale=1.0, generator=torch.Generator().manual_seed(0))
    if entry.uses_scale:
        assert not torch.allclose(default, other)
    else:  # YOSO's kernel depends on angles only: there is no temperature
        assert torch.equal(default, other)


@pytest.mark.parametrize("name", METHODS)
def test_global_rng_is_used_but_never_reseeded(name):
    """generator=None draws from the global RNG (so two calls hash differently) and leaves it
    advanced, never reset."""
    entry = METHODS[name]
    spec = entry.method
    q, k, v = entry.inputs(Case(1, 2, 64, 64, 16, 16))
    torch.manual_seed(123)
    seeded = torch.get_rng_state()
    first, first_aux = spec(q, k, v, return_aux=True)
    advanced = not torch.equal(seeded, torch.get_rng_state())
    second, second_aux = spec(q, k, v, return_aux=True)
    torch.manual_seed(123)
    assert torch.equal(spec(q, k, v), first)
    if not entry.draws_hashes:  # Dense, TopK: nothing to draw
        assert not advanced and torch.equal(first, second)
    else:  # a method that reseeded would repeat itself; the first aux field holds its hashes
        assert advanced and not torch.equal(first_aux[0], second_aux[0])


@pytest.mark.parametrize("name", ["reformer-separate", "smyrf", "reformer-shared"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cost_matches_measured_dot_products(name, causal):
    """cost() is analytic; aux.dot_products is counted from the tensors the method built."""
    spec = METHODS[name].method
    for T in (1, 37, 64, 100):
        q, k, v = testing.make_qkv(2, 3, T, T, 16, 8)
        k = q if getattr(spec, "shared_qk", False) else k
        _, aux = spec(q, k, v, causal=causal, return_aux=True)
        cost = spec.cost(2, 3, T, T, 16, 8, causal=causal)
        assert cost.dot_products == aux.dot_products
        assert cost.budget == pytest.approx(aux.dot_products / (2 * 3 * T * T))
        assert cost.flops > 2 * cost.dot_products * (16 + 8) - 1
        assert cost.memory_bytes >= cost.dot_products * 4


def test_dense_cost_and_aux():
    q, k, v = testing.make_qkv(2, 3, 10, 7, 16, 8)
    _, aux = lshattn.Dense()(q, k, v, return_aux=True)
    cost = lshattn.Dense().cost(2, 3, 10, 7, 16, 8)
    assert aux.dot_products == cost.dot_products == 2 * 3 * 10 * 7
    assert cost.flops == 2 * 2 * 3 * 10 * 7 * (16 + 8) and cost.budget == 1.0


def test_smyrf_budget_halves_with_half_the_cluster():
    """SMYRF's budget is num_hashes·k_cluster_size / S, the paper's memory figure."""
    assert lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32).cost(1, 1, 128, 128, 64, 64).budget == 0.5
    assert lshattn.SMYRF(num_hashes=2, q_cluster_size=16, k_cluster_size=16).cost(1, 1, 128, 128, 64, 64).budget == 0.25


def test_subclass_without_its_own_name_does_not_take_over_parse():
    class Variant(lshattn.SMYRF):
        pass

    assert lshattn.parse("smyrf") == lshattn.SMYRF() and type(lshattn.parse("smyrf")) is lshattn.SMYRF
