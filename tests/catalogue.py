"""The method settings and input cases every property test runs on, named by id.

Each entry of ``METHODS`` says how to check its method: the exact limit it reaches and how to
rebuild its attention pattern from ``return_aux`` for the brute-force reference. Adding a method
to the library means adding its entries here; every property test then covers it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

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
CROSS_CASES = [Case(2, 3, 40, 20, 16, 8), Case(1, 2, 65, 33, 8, 8), Case(2, 2, 12, 70, 8, 4)]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A method setting under test and what the checks need to know about it.

    Attributes:
        method: the spec.
        exact: a spec of the same method that, on inputs of at most ``MAX_EXACT`` tokens, is
            in its exact limit (one block or cluster holding everything, all codes colliding).
        exact_reference: ``(q, k, v, **call_kwargs) -> out`` float64, what ``exact`` must give.
        brute_force: ``(method, q, k, v, aux, **call_kwargs) -> out`` float64, a naive loop over
            the pairs ``aux`` says the method used; None for a method with nothing to rebuild.
        shared_qk: the method needs ``k is q``.
        cross: whether T ≠ S is allowed.
        strictly_causal: whether its pattern depends on earlier tokens only (see
            ``test_causal_pattern_sees_the_whole_sequence``).
        data_dependent_cost: ``cost()`` is an expectation, because the work depends on which
            pairs collide (SimHash): the FLOPs of one call differ from ``cost().flops``.
        uses_scale: whether ``scale`` changes the output (YOSO's kernel has no temperature).
        zero_free: a real query that can see a real key never outputs zeros (False where no
            collision legitimately means no key: YOSO-m, SimHash's sparse mode).
        near_keys: key i is a slightly perturbed query i, so that codes of many bits collide.
        draws_hashes: whether the output depends on the generator (not for Dense and TopK).
        exact_dtype: the dtype of the exact-limit check. YOSO-E's arccos of a float32 cosine
            near 1 is off by ~1e-3 (cos θ rounds to 1 below θ ≈ 3e-4), so near keys need float64.
    """

    method: lshattn.Method
    exact: lshattn.Method
    exact_reference: Callable = testing.dense_reference
    brute_force: Callable | None = None
    shared_qk: bool = False
    cross: bool = True
    strictly_causal: bool = True
    data_dependent_cost: bool = False
    uses_scale: bool = True
    zero_free: bool = True
    near_keys: bool = False
    draws_hashes: bool = True
    exact_dtype: torch.dtype = torch.float32

    def inputs(self, case: Case, seed: int = 0, dtype: torch.dtype = torch.float32):
        q, k, v = testing.make_qkv(case.B, case.H, case.T, case.S, case.D, case.Dv, seed=seed, dtype=dtype)
        if self.near_keys:
            n = min(case.T, case.S)
            k = torch.cat([q[:, :, :n] + 1e-4 * k[:, :, :n], k[:, :, n:]], dim=2)
        return (q, q, v) if self.shared_qk else (q, k, v)

    def reference(self, q, k, v, aux, **kw):
        """The brute-force output over the pairs ``aux`` says ``self.method`` attended."""
        return self.brute_force(self.method, q, k, v, aux, **kw)


MAX_EXACT = 128


def _sorted_rounds_reference(pattern: Callable, self_pairs: Callable, keys: Callable = lambda q, k: k):
    """brute_force for the sort-and-chunk methods: rebuild each round's pairs from aux."""

    def reference(method, q, k, v, aux, **kw):
        return testing.rounds_reference(
            q, keys(q, k), v, pattern(method, aux),
            self_pairs=self_pairs(kw.get("causal", False)),
            correct_duplicates=method.correct_duplicates, covered=testing.covered_by(method, q, k, **kw), **kw,
        )  # fmt: skip

    return reference


def _shared_qk_dense(q, k, v, **kw):
    """Exact shared-QK attention: keys are the normalised queries, a token sees itself only
    when nothing else is visible."""
    everything = torch.ones(q.shape[0], q.shape[1], 1, q.shape[2], k.shape[2], dtype=torch.bool)
    return testing.rounds_reference(q, F.normalize(q, dim=-1), v, everything, self_pairs="exclude", **kw)


def _reformer(**kw) -> Entry:
    method = lshattn.Reformer(**kw)
    shared = method.shared_qk
    # Whole buckets have no chunk to widen: every key a sink is their exact limit.
    exact = {"sinks": MAX_EXACT} if method.whole_buckets else {"bucket_size": MAX_EXACT}
    return Entry(
        method=method,
        exact=dataclasses.replace(method, **exact),
        exact_reference=_shared_qk_dense if shared else testing.dense_reference,
        brute_force=_sorted_rounds_reference(
            pattern=testing.reformer_rounds,
            self_pairs=(lambda causal: "exclude") if shared else (lambda causal: "column" if causal else "none"),
            keys=(lambda q, k: F.normalize(q, dim=-1)) if shared else (lambda q, k: k),
        ),
        shared_qk=shared,
        cross=not shared and method.window is None,
        strictly_causal=method.whole_buckets,
        # A query whose buckets hold no visible key sees none (causal: its own key, always).
        zero_free=not method.whole_buckets,
        data_dependent_cost=method.whole_buckets,
    )


def _smyrf(cls=lshattn.SMYRF, **kw) -> Entry:
    method = cls(**kw)
    return Entry(
        method=method,
        exact=dataclasses.replace(method, q_cluster_size=MAX_EXACT, k_cluster_size=MAX_EXACT),
        brute_force=_sorted_rounds_reference(
            pattern=lambda m, aux: testing.smyrf_rounds(aux),
            self_pairs=lambda causal: "column" if causal else "none",
        ),
        cross=method.window is None,
        strictly_causal=False,
    )


METHODS = {
    "dense": Entry(lshattn.Dense(), lshattn.Dense(), draws_hashes=False),
    "reformer-shared": _reformer(num_hashes=3, bucket_size=8, num_buckets=8),
    "reformer-separate": _reformer(num_hashes=2, bucket_size=8, num_buckets=4, shared_qk=False),
    "reformer-window-dedup": _reformer(
        num_hashes=3, bucket_size=4, num_buckets=16, chunks_before=2, chunks_after=1, shared_qk=False,
        correct_duplicates=True,
    ),
    "reformer-factorised": _reformer(num_hashes=2, bucket_size=16, num_buckets=256, correct_duplicates=True),
    "smyrf": _smyrf(num_hashes=3, q_cluster_size=8, k_cluster_size=8),
    "smyrf-dedup": _smyrf(num_hashes=2, q_cluster_size=4, k_cluster_size=4, correct_duplicates=True),
    # Unequal cluster sizes (causal crashed with q_cluster_size > k_cluster_size), both ways.
    "smyrf-wide-queries": _smyrf(num_hashes=2, q_cluster_size=6, k_cluster_size=4),
    "smyrf-wide-keys": _smyrf(num_hashes=1, q_cluster_size=3, k_cluster_size=10, correct_duplicates=True),
    # The control: SMYRF's clusters along random directions, unrelated to the scores.
    "random-clusters": _smyrf(lshattn.RandomClusters, num_hashes=2, q_cluster_size=6, k_cluster_size=8),
    # Clusters and buckets larger than any sequence here: clamped to it, so exact attention
    # (which is strictly causal).
    # Sinks and a window (lshattn.local): pairs every round counts, merged with what the rounds found.
    "smyrf-local": _smyrf(num_hashes=2, q_cluster_size=6, k_cluster_size=8, sinks=2, window=3),
    "smyrf-sinks-dedup": _smyrf(num_hashes=3, q_cluster_size=4, k_cluster_size=4, correct_duplicates=True, sinks=3),
    "random-local": _smyrf(lshattn.RandomClusters, num_hashes=1, q_cluster_size=5, k_cluster_size=5, window=0),
    "reformer-shared-local": _reformer(num_hashes=2, bucket_size=8, num_buckets=8, sinks=1, window=2),
    "reformer-separate-local": _reformer(
        num_hashes=2, bucket_size=4, num_buckets=8, shared_qk=False, correct_duplicates=True, sinks=2, window=1
    ),
    # Whole buckets: strictly causal, what decoding reproduces (lshattn.decode).
    "reformer-whole-buckets": _reformer(num_hashes=2, num_buckets=4, shared_qk=False, whole_buckets=True),
    "reformer-whole-buckets-local": _reformer(
        num_hashes=3, num_buckets=8, shared_qk=False, whole_buckets=True, correct_duplicates=True, sinks=2, window=3
    ),
    "reformer-whole-buckets-factorised": _reformer(num_hashes=1, num_buckets=128, shared_qk=False, whole_buckets=True),
    "smyrf-huge": dataclasses.replace(
        _smyrf(num_hashes=1, q_cluster_size=4096, k_cluster_size=300), strictly_causal=True
    ),
    "reformer-huge": dataclasses.replace(
        _reformer(num_hashes=2, bucket_size=4096, chunks_before=3, chunks_after=2, shared_qk=False),
        strictly_causal=True,
    ),
}


def _simhash(**kw) -> Entry:
    method = lshattn.SimHash(**kw)
    return Entry(
        method=method,
        exact=dataclasses.replace(method, num_bits=0),  # 0 bits: every pair collides
        brute_force=testing.simhash_brute_force,
        data_dependent_cost=True,
        zero_free=method.mode == "faithful",
        cross=method.window is None,
    )


METHODS.update(
    {
        "simhash": _simhash(num_hashes=2, num_bits=2),
        "simhash-sparse": _simhash(num_hashes=3, num_bits=3, mode="sparse"),
        "simhash-all": _simhash(num_hashes=2, num_bits=1, rule="all"),
        "simhash-all-sparse": _simhash(num_hashes=3, num_bits=1, rule="all", mode="sparse"),
        "simhash-62-bits": dataclasses.replace(_simhash(num_hashes=2, num_bits=62), near_keys=True),  # longest code
        "simhash-local": _simhash(num_hashes=1, num_bits=3, sinks=2, window=2),
        "simhash-sparse-sinks": _simhash(num_hashes=2, num_bits=4, mode="sparse", sinks=3),
        "simhash-importance": _simhash(num_hashes=4, num_bits=3, mode="importance"),
        "simhash-importance-all": _simhash(num_hashes=2, num_bits=2, rule="all", mode="importance"),
        "simhash-importance-local": _simhash(num_hashes=3, num_bits=4, mode="importance", sinks=2, window=2),
        "simhash-importance-sinks": _simhash(num_hashes=2, num_bits=5, mode="importance", sinks=1),
    }
)


def _yoso(**kw) -> Entry:
    method = lshattn.YOSO(**kw)
    return Entry(
        method=method,
        exact=dataclasses.replace(method, expectation=True),  # the expectation YOSO-m samples
        exact_reference=functools.partial(
            testing.yoso_expectation_reference, num_bits=method.num_bits, normalize_output=method.normalize_output
        ),
        brute_force=testing.yoso_brute_force,
        uses_scale=False,
        zero_free=method.expectation,
        cross=method.window is None,
    )


METHODS.update(
    {
        "yoso": _yoso(num_hashes=8, num_bits=3),
        "yoso-exact-grad": _yoso(num_hashes=6, num_bits=10, backward="exact"),  # 2^10 > 2S: compact tables
        "yoso-unnormalised": _yoso(num_hashes=8, num_bits=3, normalize_output=False),
        # The widest codes of each dtype: int32 up to τ = 31 (whose sentinels overflowed it), int64 above.
        "yoso-31-bits": dataclasses.replace(
            _yoso(num_hashes=4, num_bits=31), near_keys=True, exact_dtype=torch.float64
        ),
        "yoso-62-bits": dataclasses.replace(
            _yoso(num_hashes=4, num_bits=62, backward="exact"), near_keys=True, exact_dtype=torch.float64
        ),
        "yoso-local": _yoso(num_hashes=8, num_bits=3, sinks=2, window=2),
        "yoso-exact-grad-sinks": _yoso(num_hashes=4, num_bits=6, backward="exact", sinks=3),
    }
)


def _topk(**kw) -> Entry:
    method = lshattn.TopK(**kw)
    return Entry(
        method=method, exact=dataclasses.replace(method, fraction=1.0), brute_force=testing.topk_brute_force,
        draws_hashes=False, cross=method.window is None,
    )


def _sketch_topk(**kw) -> Entry:
    method = lshattn.SketchTopK(**kw)
    return Entry(
        method=method, exact=dataclasses.replace(method, fraction=1.0), brute_force=testing.topk_brute_force,
        cross=method.window is None, data_dependent_cost=True,
    )


METHODS.update(
    {
        # The locality baseline: sinks and a window, nothing else; a window past the sequence is exact.
        "local": Entry(
            lshattn.Local(sinks=2, window=3), lshattn.Local(sinks=0, window=MAX_EXACT),
            brute_force=testing.local_brute_force, cross=False, draws_hashes=False,
        ),
        "local-tail": Entry(
            lshattn.Local(sinks=1, window=2, tail=True), lshattn.Local(sinks=0, window=MAX_EXACT, tail=True),
            brute_force=testing.local_brute_force, cross=False, draws_hashes=False,
        ),
        "local-sinks-only": Entry(
            lshattn.Local(sinks=3, window=None), lshattn.Local(sinks=MAX_EXACT, window=None),  # every key a sink
            brute_force=testing.local_brute_force, draws_hashes=False,
        ),
        "topk": _topk(fraction=0.3),
        "topk-tail": _topk(fraction=0.1, tail=True),
        "topk-local": _topk(fraction=0.1, tail=True, sinks=1, window=1),
        "sketchtopk": _sketch_topk(fraction=0.3, num_bits=16),
        "sketchtopk-local": _sketch_topk(fraction=0.1, num_bits=8, sinks=1, window=2),
    }
)
