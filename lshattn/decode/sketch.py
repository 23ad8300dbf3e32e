"""SketchTopK's decoding step: the SimHash sketch of every cached key, a byte per table; a new
query builds one lookup table per byte of the sketch (its estimate for each of the 256 byte
values), ranks every cached key with ``num_bits / 8`` lookups, and scores only the top ones.
The estimates are the prefill's integers, so a decoding step reproduces the causal prefill.

On the CPU the step runs natively (``lshattn.kernels.sketch_decode``): the ranking reads each
cached key's ``num_bits / 8`` bytes, the estimates never make an `(S,)` tensor per query in torch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import Tensor

from lshattn import kernels
from lshattn.decode.common import (
    Step,
    appended,
    causal_visible,
    continues,
    covered_keys,
    drawn_from,
    fold_heads,
    native_store,
    per_query_head,
    shared_by,
    softmax_over,
)
from lshattn.methods.sketch import BYTE_SIGNS, SketchTopK, key_sketches, query_weights
from lshattn.methods.topk import kept_counts, top_keys

__all__ = ["SketchStore", "sketch_step"]


@dataclasses.dataclass
class SketchStore:
    """The sketches of a layer's cached keys.

    Attributes:
        method: the SketchTopK setting that drew them (a store refuses another).
        planes: `(H_s, D, R, 8)` its projections: H_s = H query heads, or H_kv key heads when the
            store is kept per key head (``decode.step(..., per_kv_head=True)``).
        buffer: `(B, H_s, R, capacity)` uint8: the sketches of the ``length`` cached keys in its
            first slots (``sketches``), room for more after them.
        length: S, the keys sketched.
        last_key: `(B, H_kv, D)` the last cached key, to recognise the same cache at the next step.
        packed: the projections as the native step reads them (``kernels.packed_planes``; None
            until it runs).
    """

    method: SketchTopK
    planes: Tensor
    buffer: Tensor
    length: int
    last_key: Tensor
    packed: Tensor | None = None

    @property
    def sketches(self) -> Tensor:
        """`(B, H_s, R, S)` the sketches of the cached keys."""
        return self.buffer[..., : self.length]


def _sketched(
    store: SketchStore | None, method: SketchTopK, keys: Tensor, new: int,
    generator: torch.Generator | Callable[[], torch.Generator] | None, groups: int, shared: int,
) -> SketchStore:  # fmt: skip
    """The store holding the sketches of all S keys of `(B, H_kv, S, D)` ``keys``, the last
    ``new`` of them new: extended when it holds the others, else built from all of them, with
    H / ``shared`` heads (``shared_by``)."""
    H_kv, S, D = keys.shape[1:]
    H_s, repeats = H_kv * groups // shared, groups // shared
    last = keys[:, :, -1].clone()
    if continues(store, keys, new, H_s):
        added = key_sketches(per_query_head(keys[:, :, S - new :], repeats), store.planes).to(torch.uint8)
        return SketchStore(method, store.planes, appended(store.buffer, S - new, added, -1), S, last)
    planes = method.planes(H_s, D, drawn_from(generator), keys.device)
    sketches = key_sketches(per_query_head(keys, repeats), planes).to(torch.uint8)
    return SketchStore(method, planes, sketches, S, last)


@functools.lru_cache(maxsize=16)
def _kept_table(fraction: float, counts: int) -> Tensor:
    """`(counts,)` the keys ``top_keys`` keeps of 0 … counts − 1 ranked (the native step's table;
    built once per size of the sketch buffer, which doubles as it grows)."""
    return kept_counts(torch.arange(counts), fraction)


def _native_step(
    store: SketchStore | None, method: SketchTopK, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None,
    scale: float, generator: torch.Generator | Callable[[], torch.Generator] | None, groups: int, shared: int,
) -> Step:  # fmt: skip
    """``sketch_step`` in one native call (``lshattn.kernels.sketch_decode``): the new keys
    sketched into the store and the step done there."""
    T, S = q.shape[2], k.shape[2]

    def hash_keys(planes: Tensor, keys: Tensor) -> Tensor:
        return key_sketches(keys, planes).to(torch.uint8)

    store = native_store(store, method, k, T, groups, shared, generator, hash_keys, SketchStore)
    if store.packed is None:
        store.packed = kernels.packed_planes(store.planes)
    last_key = k.new_empty(k.shape[0], k.shape[1], k.shape[3])  # the kernel copies the last key in
    keep = _kept_table(method.fraction, store.buffer.shape[-1] + 1)
    out, scored, empty = kernels.sketch_decode(
        q, k, v, store.packed, store.buffer, keep, visible, last_key, sinks=method.sinks, window=method.window,
        scale=scale, shared=shared,
    )  # fmt: skip
    store.length, store.last_key = S, last_key
    return Step(out, store, scored, empty)


def sketch_step(
    store: SketchStore | None, method: SketchTopK, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None,
    scale: float, generator: torch.Generator | Callable[[], torch.Generator] | None, per_kv_head: bool = False,
) -> Step:  # fmt: skip
    """Each new query keeps the covered keys and the top ``fraction`` of the other visible keys
    by sketch estimate, as ``SketchTopK`` does causally in the prefill, and scores only those
    (gathered; no `(T, S, D)` product). ``visible`` None: no padding. ``per_kv_head``: the store
    and its projections a key head, shared by its query heads, else a query head.

    Without gradients, on the CPU, natively (``_native_step``); otherwise in torch operations."""
    B, H, T, _ = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    groups = H // H_kv
    shared = shared_by(groups, per_kv_head)
    differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if S > T and not differentiable and kernels.decodes_natively(q, k, v, visible):
        return _native_step(store, method, q, k, v, visible, scale, generator, groups, shared)
    store = _sketched(store, method, k, T, generator, groups, shared)
    if visible is None:
        visible = causal_visible(B, T, S, q.device)
    with torch.no_grad():
        lookup = query_weights(fold_heads(q, shared), store.planes) @ BYTE_SIGNS.to(q.device)  # (B, H_s, P·T, R, 256)
        sketches = store.sketches.long()[:, :, None].expand(B, H // shared, shared * T, -1, S)  # (B, H_s, P·T, R, S)
        ranking = lookup.gather(-1, sketches).sum(3).view(B, H, T, S)  # the prefill's integers
    covered = covered_keys(visible, method.sinks, method.window)
    selected = top_keys(ranking, visible & ~covered, method.fraction) | covered
    out, scored = softmax_over(selected.long(), q, k, v, scale)
    return Step(out, store, scored)
