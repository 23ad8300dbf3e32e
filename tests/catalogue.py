"""The method settings and input cases every property test runs on, named by id.

Each entry of ``METHODS`` says how to check its method: the exact limit it reaches and how to
rebuild its attention pattern from ``return_aux`` for the brute-force reference. Adding a method
to the library means adding its entries here; every property test then covers it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import lshattn
from lshattn import testing


@dataclasses.dataclass(frozen=True)
class Case:
    """Input sizes of one test case."""

    B: int
    H: int
    T: int
    S: int
    D: int
    Dv: int

    @property
    def id(self) -> str:
        cross = f"-S{self.S}" if self.S != self.T else ""
        return f"B{self.B}-H{self.H}-T{self.T}{cross}-D{self.D}" + (f"-Dv{self.Dv}" if self.Dv != self.D else "")


# Awkward sizes on purpose: T = 1, T not a multiple of any block, D = 60, B = 3, H = 5, T ≠ S.
SELF_CASES = [
    Case(1, 1, 1, 1, 8, 8),
    Case(2, 2, 48, 48, 16, 16),
    Case(3, 5, 37, 37, 60, 24),
    Case(2, 3, 100, 100, 32, 32),
]
CROSS_CASES = [Case(2, 3, 40, 20, 16, 8), Case(1, 2, 65, 33, 8, 8)]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A method setting under test and what the checks need to know about it.

    Attributes:
        method: the spec.
        exact: a spec of the same method that, on inputs of at most ``MAX_EXACT`` tokens, is
            in its exact limit (one block or cluster holding everything).
        keys: maps (q, k) to the keys the method really attends with (Reformer's shared QK
            normalises the queries).
        pattern: maps (aux) to the `(B, H, R, T, S)` pairs each round puts together, or None
            for a method with nothing to rebuild.
        self_pairs: ``lshattn.blocks.SelfPairs`` of the method, given ``causal``.
        cross: whether T ≠ S is allowed.
        strictly_causal: whether its pattern depends on earlier tokens only (see
            ``test_causal_pattern``).
    """

    method: lshattn.Method
    exact: lshattn.Method
    keys: Callable = lambda q, k: k
    pattern: Callable | None = None
    self_pairs: Callable = lambda causal: "none"
    cross: bool = True
    strictly_causal: bool = True

    @property
    def shared_qk(self) -> bool:
        return getattr(self.method, "shared_qk", False)

    def inputs(self, case: Case, seed: int = 0, dtype: torch.dtype = torch.float32):
        q, k, v = testing.make_qkv(case.B, case.H, case.T, case.S, case.D, case.Dv, seed=seed, dtype=dtype)
        return (q, q, v) if self.shared_qk else (q, k, v)

    def rounds_reference(self, q, k, v, aux, **kw):
        """The brute-force output over the pairs ``aux`` says the method attended."""
        return testing.rounds_reference(
            q, self.keys(q, k), v, self.pattern(aux),
            self_pairs=self.self_pairs(kw.get("causal", False)),
            correct_duplicates=getattr(self.method, "correct_duplicates", False), **kw,
        )  # fmt: skip


MAX_EXACT = 128


def _reformer(**kw) -> Entry:
    method = lshattn.Reformer(**kw)
    shared = method.shared_qk
    return Entry(
        method=method,
        exact=dataclasses.replace(method, bucket_size=MAX_EXACT),
        keys=(lambda q, k: F.normalize(q, dim=-1)) if shared else (lambda q, k: k),
        pattern=lambda aux: testing.reformer_rounds(aux, method.chunks_before, method.chunks_after),
        self_pairs=(lambda causal: "exclude") if shared else (lambda causal: "column" if causal else "none"),
        cross=False,
        strictly_causal=False,
    )


def _smyrf(**kw) -> Entry:
    method = lshattn.SMYRF(**kw)
    return Entry(
        method=method,
        exact=dataclasses.replace(method, q_cluster_size=MAX_EXACT, k_cluster_size=MAX_EXACT),
        pattern=testing.smyrf_rounds,
        self_pairs=lambda causal: "column" if causal else "none",
        strictly_causal=False,
    )


METHODS = {
    "dense": Entry(lshattn.Dense(), lshattn.Dense()),
    "reformer-shared": _reformer(num_hashes=3, bucket_size=8, num_buckets=8),
    "reformer-separate": _reformer(num_hashes=2, bucket_size=8, num_buckets=4, shared_qk=False),
    "reformer-window-dedup": _reformer(
        num_hashes=3, bucket_size=4, num_buckets=16, chunks_before=2, chunks_after=1, shared_qk=False,
        correct_duplicates=True,
    ),
    "reformer-factorised": _reformer(num_hashes=2, bucket_size=16, num_buckets=256, correct_duplicates=True),
    "smyrf": _smyrf(num_hashes=3, q_cluster_size=8, k_cluster_size=8),
    "smyrf-dedup": _smyrf(num_hashes=2, q_cluster_size=4, k_cluster_size=4, correct_duplicates=True),
}


def method_params(*, cross: bool = False, with_pattern: bool = False):
    """pytest params over METHODS (optionally only those allowing T ≠ S / having a pattern)."""
    return [
        pytest.param(name, id=name)
        for name, entry in METHODS.items()
        if (entry.cross or not cross) and (entry.pattern is not None or not with_pattern)
    ]


def case_params(*, cross: bool = True):
    cases = SELF_CASES + (CROSS_CASES if cross else [])
    return [pytest.param(c, id=c.id) for c in cases]


def for_case(entry: Entry, case: Case) -> Entry:
    """The entry adapted to the case: SMYRF needs as many key clusters as query clusters, so
    its k_cluster_size is fitted to S when T ≠ S."""
    method = entry.method
    if isinstance(method, lshattn.SMYRF) and case.S != case.T:
        clusters = -(-case.T // method.q_cluster_size)
        size = -(-case.S // clusters)
        assert -(-case.S // size) == clusters, f"case {case.id} has no fitting k_cluster_size"
        return dataclasses.replace(entry, method=dataclasses.replace(method, k_cluster_size=size))
    return entry
