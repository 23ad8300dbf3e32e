"""One budget knob: the setting of a method that spends at most a given share of exact attention.

    lshattn.for_budget("smyrf", 0.25, T=512, D=64)            # SMYRF(num_hashes=2, 32, 32)
    lshattn.for_budget("yoso", 0.25, T=128, D=32, num_bits=8)  # YOSO(num_hashes=4, num_bits=8)

The share is what ``work_share`` measures: query-key dot products over exact attention's
``T·S`` (``Cost.budget``), or, for a method that computes none (YOSO-m), its FLOPs over exact
attention's; for the oracle ``TopK``, the share of pairs it keeps. Each method has one field the
budget turns (its *knob*); the others keep their defaults or the values passed. The result is
the setting of largest share not above the budget, found by trying every value of the knob
against the method's analytic ``cost``, so it holds for any length, padding aside.

SimHash's cost depends on how many pairs collide, so its share here is the expectation for
random directions (``SimHash.cost``); real activations collide more. The reports print the
budget each call actually spent.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from lshattn.api import Method, parse
from lshattn.local import local_cost
from lshattn.methods import SMYRF, YOSO, Dense, Local, RandomClusters, Reformer, SimHash, SketchTopK, TopK

__all__ = ["for_budget", "pairs_share", "work_share"]


def pairs_share(method: Method, T: int, S: int, D: int, Dv: int | None = None, *, causal: bool = False) -> float:
    """Share of the ``T·S`` query-key pairs ``method`` scores (``cost().budget``); for ``TopK``, the
    share it keeps (``fraction`` of the pairs besides those its ``sinks`` and ``window`` cover,
    and those): it scores every pair to choose, but stands for a method that would score only
    those it keeps; ``SketchTopK`` alike (it ranks every key by sketch, and keeps the oracle's
    share at the same ``fraction``)."""
    if isinstance(method, (TopK, SketchTopK)):
        covered = _covered_share(T, S, method.sinks, method.window, causal)
        return covered + method.fraction * (1 - covered)
    return method.cost(1, 1, T, S, D, D if Dv is None else Dv, causal=causal).budget


def work_share(method: Method, T: int, S: int, D: int, Dv: int | None = None, *, causal: bool = False) -> float:
    """Share of exact attention's work ``method`` spends on one (batch, head) of these sizes:
    ``pairs_share``, or FLOPs over exact attention's for a method that computes no dot product
    (YOSO-m: its work is hashing)."""
    Dv = D if Dv is None else Dv
    if isinstance(method, YOSO) and not method.expectation:
        return method.cost(1, 1, T, S, D, Dv, causal=causal).flops / Dense().cost(1, 1, T, S, D, Dv).flops
    return pairs_share(method, T, S, D, Dv, causal=causal)


def for_budget(
    name: str, fraction: float, T: int, S: int | None = None, D: int = 64, Dv: int | None = None, *,
    causal: bool = False, **fixed: Any,
) -> Method:  # fmt: skip
    """The setting of method ``name`` that spends at most ``fraction`` of exact attention's work.

    Args:
        name: a method name (``lshattn.method_names()``).
        fraction: the budget, in (0, 1].
        T, S: query and key lengths (S defaults to T). D, Dv: head dims (Dv defaults to D).
        causal: cost of causal attention (SMYRF and Reformer add an own-key column).
        **fixed: fields to keep as given, e.g. ``num_hashes=4`` (the budget then turns the
            cluster or bucket size).

    Returns:
        The spec whose ``work_share`` is the largest not above ``fraction``.

    Raises:
        ValueError: an unknown method, a budget outside (0, 1], the knob among ``fixed``, or a
            budget below the method's smallest setting (naming it).
    """
    _check_types(fraction, T=T, S=S, D=D, Dv=Dv)
    S = T if S is None else S
    if not 0 < fraction <= 1:
        raise ValueError(
            f"the budget must be a fraction in (0, 1], got {fraction}; 0.25 spends a quarter of exact attention's work"
        )
    if min(T, S, D) < 1 or (Dv is not None and Dv < 1):
        raise ValueError(f"sizes must be positive, got T={T}, S={S}, D={D}, Dv={Dv}")
    base = parse(name)  # unknown names raise here, listing the known ones
    fields = {field.name for field in dataclasses.fields(base)}
    if set(fixed) - fields:
        raise ValueError(
            f"{name} has no field {', '.join(sorted(set(fixed) - fields))}; its fields: {', '.join(sorted(fields))}"
        )
    knob, candidates = _knob(type(base), fraction, T, S, fixed, causal)
    if knob in fixed:
        raise ValueError(f"{name}'s budget turns {knob}: leave it out of the fixed fields {sorted(fixed)}")
    best: tuple[float, Method] | None = None
    smallest: tuple[float, Method] | None = None
    for setting in candidates:
        method = type(base)(**{**fixed, **setting})
        share = work_share(method, T, S, D, Dv, causal=causal)
        if smallest is None or share < smallest[0]:
            smallest = (share, method)
        if share <= fraction * (1 + 1e-9) and (best is None or share > best[0]):
            best = (share, method)
    if best is None:
        assert smallest is not None
        raise ValueError(
            f"no {name} setting spends {fraction:.2%} or less at T={T}, S={S}, D={D}: the smallest, "
            f"{smallest[1]}, spends {smallest[0]:.2%}; raise the budget"
        )
    return best[1]


def _check_types(fraction: Any, **sizes: Any) -> None:
    """TypeError for a budget that is not a real number or a size that is not an int (a bool is
    neither: ``True`` would read as a budget of 1 or a length of 1)."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise TypeError(
            f"the budget must be a real number in (0, 1], got {fraction!r} ({type(fraction).__name__}); pass e.g. 0.25"
        )
    for name, value in sizes.items():
        if value is None and name in ("S", "Dv"):  # default to T and D
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); pass e.g. {name}=512")


def _knob(cls: type, fraction: float, T: int, S: int, fixed: dict, causal: bool) -> tuple[str, Iterable[dict]]:
    """The field the budget turns for ``cls`` and the field values to try (largest first)."""
    turns: dict[type, tuple[str, Callable[[], Iterable[dict]]]] = {
        Dense: ("", lambda: [{}]),
        TopK: ("fraction", lambda: _topk_fractions(fraction, T, S, fixed, causal)),
        SketchTopK: ("fraction", lambda: _topk_fractions(fraction, T, S, fixed, causal)),
        SMYRF: ("k_cluster_size", lambda: (_clusters(c, T, S) for c in range(S, 0, -1))),
        RandomClusters: ("k_cluster_size", lambda: (_clusters(c, T, S) for c in range(S, 0, -1))),
        Reformer: ("bucket_size", lambda: (_buckets(b, S, fixed) for b in range(max(T, S), 0, -1)))
        if not fixed.get("whole_buckets")
        # whole buckets have no chunk: more buckets, fewer pairs (powers of two, as factorised)
        else ("num_buckets", lambda: ({"num_buckets": 2**n} for n in range(1, 25))),
        SimHash: ("num_bits", lambda: ({"num_bits": b} for b in range(63))),
        YOSO: ("num_hashes", lambda: ({"num_hashes": m} for m in range(1, 4097))),
        Local: ("window", lambda: ({"window": w} for w in range(S - 1, -1, -1))),
    }
    knob, candidates = turns[cls]
    return knob, candidates()


def _topk_fractions(fraction: float, T: int, S: int, fixed: dict, causal: bool) -> list[dict]:
    """The oracle's ``fraction`` that keeps ``fraction`` of the pairs with its sinks and window
    (the smallest there is, for ``for_budget`` to refuse, when they alone spend more)."""
    covered = _covered_share(T, S, fixed.get("sinks", 0), fixed.get("window"), causal)
    if covered >= 1:
        return [{"fraction": 1.0}]
    rest = (fraction - covered) / (1 - covered)
    return [{"fraction": min(1.0, rest) if rest > 0 else 1e-9}]


def _covered_share(T: int, S: int, sinks: int, window: int | None, causal: bool) -> float:
    """Share of the ``T·S`` pairs that ``sinks`` and ``window`` score (``lshattn.local.local_cost``)."""
    return local_cost(1, 1, T, S, 1, 1, sinks, window, causal=causal).budget


def _clusters(k_cluster_size: int, T: int, S: int) -> dict:
    """Query clusters as many as key clusters: ``q_cluster_size`` scaled by T / S."""
    return {"k_cluster_size": k_cluster_size, "q_cluster_size": max(1, round(k_cluster_size * T / S))}


def _buckets(bucket_size: int, S: int, fixed: dict) -> dict:
    """``num_buckets`` about ``S / bucket_size`` (a power of two, at least 2), as in the Reformer
    paper, unless fixed."""
    if "num_buckets" in fixed:
        return {"bucket_size": bucket_size}
    return {"bucket_size": bucket_size, "num_buckets": 2 ** max(1, round(math.log2(max(1.0, S / bucket_size))))}
