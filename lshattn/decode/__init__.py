"""Decoding through a cache: a few new queries against every cached key, without rehashing the
cache at every step (issue 14).

A *store* keeps, per layer, what a method needs to answer new queries against the cached keys,
and grows with them (``lshattn.hf`` holds one in each layer's state)::

    result = decode.step(store, method, q, k, v, visible, scale, generator)
    store = result.store        # for the next step; result.out is `(B, H, T, Dv)`

Each step hashes only the new keys. If the cached keys are not the ones the store holds (a new
prompt, a cropped cache) it hashes them all once and starts again; a beam search's reordering
reorders the stores with the cache (``reordered``; ``lshattn.hf`` does it). The step grows the
store in place. What each method keeps (one module each):

* ``SimHash`` (``simhash.py``): the table codes of the cached keys. A new query collides with
  them (O(S·R) integer comparisons) and scores only the keys it collides with (gathered, never a
  ``(T, S, D)`` product of all keys). Collisions are decided pair by pair, so a decoding step
  reproduces the causal prefill exactly.
* ``YOSO`` (YOSO-m, ``yoso.py``): per hash, a table of the sums of the cached values in each
  bucket, one add per new key, one lookup per new query: O(m·Dv) a query whatever the context
  (when the 2^τ buckets are fewer than the keys; otherwise the codes are compared, O(S·m)), plus
  the keys' codes for the sinks and window. The causal prefill sums the same keys, so decoding
  reproduces it.
* YOSO-E (``YOSO(expectation=True)``, ``yoso.py``): no store; the exact kernel
  ``(1 − θ/π)^τ`` over every visible cached key, as its prefill (O(S) a query, as exact attention).
* ``Reformer``, ``SMYRF`` (``rounds.py``): each cached key's bucket, or projection, per round; a
  new query attends its bucket, or its ``k_cluster_size`` nearest keys in projection, in each
  round. That is ``Reformer(whole_buckets=True)``'s causal prefill, which decoding reproduces;
  the chunked Reformer's prefill cuts buckets into chunks, and SMYRF's draws clusters, by the
  sort of the whole sequence, which a decoding step cannot know: decoding is not their prefill.
* ``SketchTopK`` (``sketch.py``): the SimHash sketch of each cached key, a byte per table; a new
  query ranks every cached key with one lookup per byte and scores only its top ones. The
  estimates are the prefill's integers, so decoding reproduces the causal prefill.
* ``TopK``, ``Local`` (``selection.py``): no store; the oracle scores every key to choose, the
  baseline attends its sinks and window, as their causal prefill.

Sinks and windows are ranked among the real keys, as in the prefill (``lshattn.local``).

Under grouped-query attention K and V are read per key head, never repeated. The stores of
SimHash, YOSO and SketchTopK are kept a query head (each query head's own projections, as the
prefill given repeated keys), or, with ``per_kv_head=True``, a key head: its G query heads share
its projections (as the prefill given the key heads, ``Inputs.kv_groups``), so each new key is
hashed once and the store is 1/G as large (``lshattn.hf.use(..., gqa="shared")``).

Shape legend: B batch, H query heads, H_kv key heads (H = G·H_kv, GQA), T new queries, S keys
(cached and new), R tables, m hashes, C the most keys any query lists in the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from lshattn.api import Method
from lshattn.decode.common import Step, causal_visible
from lshattn.decode.rounds import RoundsStore, rounds_step
from lshattn.decode.selection import selection_step
from lshattn.decode.simhash import SimHashStore, simhash_step
from lshattn.decode.sketch import SketchStore, sketch_step
from lshattn.decode.yoso import TABLE_ADD_ROWS, YOSOStore, expectation_step, yoso_step
from lshattn.methods import SMYRF, YOSO, Local, RandomClusters, Reformer, SimHash, SketchTopK, TopK

__all__ = [
    "TABLE_ADD_ROWS",
    "RoundsStore",
    "SimHashStore",
    "SketchStore",
    "Step",
    "Store",
    "YOSOStore",
    "decodes",
    "reordered",
    "step",
]

Store = SimHashStore | SketchStore | YOSOStore | RoundsStore


def reordered(store: Store, beam_idx: Tensor) -> Store:
    """``store`` with its sequences in the order `(B,)` ``beam_idx`` gives (beam search reorders
    the cache so; ``lshattn.hf`` reorders every layer's store with it): every tensor with a batch
    dim, in nested stores too (SimHash's bucket index); the projections (per head) stay."""
    changes = {}
    for field in dataclasses.fields(store):
        value = getattr(store, field.name)
        if isinstance(value, Tensor) and field.name not in ("planes", "packed"):
            changes[field.name] = value.index_select(0, beam_idx.to(value.device))
        elif dataclasses.is_dataclass(value) and not isinstance(value, Method):
            changes[field.name] = reordered(value, beam_idx)
    return dataclasses.replace(store, **changes)


def decodes(method: Method | None) -> bool:
    """Whether ``method`` has a decoding step here (``lshattn.hf`` runs exact attention over the
    cache for those that do not: ``Dense``, the ``RandomClusters`` control)."""
    if type(method) is RandomClusters:
        return False
    return isinstance(method, (SimHash, SketchTopK, YOSO, Reformer, SMYRF, TopK, Local))


def step(
    store: Store | None, method: Method, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float,
    generator: torch.Generator | Callable[[], torch.Generator] | None, *, per_kv_head: bool = False,
) -> Step:  # fmt: skip
    """``method``'s attention of the T new queries over all S keys, the last T of them new.

    Args:
        store: what the previous step returned (None at the first): extended by the new keys when
            it holds exactly the S − T before them, else rebuilt from all of them with projections
            from ``generator`` (the prefill's, for the same seed), or from what it returns when it
            is a function (called only then).
        q: `(B, H, T, D)`, the queries at the last T positions; k: `(B, H_kv, S, D)`, v:
            `(B, H_kv, S, Dv)`: query head h reads key head ``h // (H / H_kv)`` (GQA: K and V are
            never repeated).
        visible: `(B, 1 or H, T, S)` bool: the keys each query may see (causality and padding);
            the last query sees every real key. None: no padding, query t sees the keys up to its
            position S − T + t.
        scale: the logit scale (SimHash; YOSO's kernel has none).
        per_kv_head: under GQA, draw the projections a key head, shared by its G query heads, as
            the prefill does given `(B, H_kv, ·)` keys (``Inputs.kv_groups``), and keep the store a
            key head: SimHash's codes, YOSO's codes and tables, SketchTopK's sketches are hashed
            once, 1/G of the memory (Reformer's and SMYRF's stores stay a query head's, their
            projections shared). False: projections and stores a query head, as the prefill
            given repeated keys.

    Raises:
        ValueError: ``store`` was filled by another method, or the mask hides a cached real key
            from a new query (YOSO's tables sum every cached key).
    """
    if store is not None and store.method != method:
        raise ValueError(
            f"this layer's decoding store was filled by {store.method}, not {method}: a cache must be decoded "
            f"with the method that filled it; start a new generation (a new prompt) after lshattn.hf.use"
        )
    if not decodes(method):
        raise ValueError(f"{method} has no decoding step (lshattn.decode.decodes); use exact attention")
    if isinstance(method, Reformer) and method.shared_qk:
        raise ValueError(
            "Reformer(shared_qk=True) cannot decode through a cache: the cache holds the key projection's "
            "outputs, while shared-QK attention uses the queries as keys. Generate with use_cache=False (every "
            "step a full forward), or use Reformer(shared_qk=False)"
        )
    if isinstance(method, YOSO) and method.expectation:
        return expectation_step(method, q, k, v, visible)
    if isinstance(method, YOSO):  # YOSO's tables need no S-long pass when nothing is padded
        return yoso_step(store, method, q, k, v, visible, generator, per_kv_head)
    if isinstance(method, SimHash):  # SimHash's native step reads positions when nothing is padded
        return simhash_step(store, method, q, k, v, visible, scale, generator, per_kv_head)
    if isinstance(method, SketchTopK):
        return sketch_step(store, method, q, k, v, visible, scale, generator, per_kv_head)
    if visible is None:
        visible = causal_visible(q.shape[0], q.shape[2], k.shape[2], q.device)
    if isinstance(method, (Reformer, SMYRF)):
        return rounds_step(store, method, q, k, v, visible, scale, generator, per_kv_head)
    return Step(*selection_step(method, q, k, v, visible, scale))
