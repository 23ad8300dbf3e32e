"""Reformer's and SMYRF's decoding step: per round, a new query attends the cached keys of its
bucket (Reformer) or the ``k_cluster_size`` nearest it in projection (SMYRF); the store keeps the
cached keys' buckets or projections. Reformer's step is ``Reformer(whole_buckets=True)``'s causal
prefill, one query at a time; not the chunked Reformer's nor SMYRF's, whose chunks and clusters
follow the sort of the whole sequence."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from lshattn.blocks import compute_dtype
from lshattn.decode.common import (
    Step,
    appended,
    code_dtype,
    continues,
    covered_keys,
    drawn_from,
    per_query_head,
    shared_by,
    softmax_over,
)
from lshattn.hashing import angular_buckets, angular_factors, draw_per_group, e2lsh_projection
from lshattn.methods import SMYRF, Reformer

__all__ = ["RoundsStore", "rounds_step"]


@dataclasses.dataclass
class RoundsStore:
    """What Reformer's or SMYRF's rounds know of a layer's cached keys.

    Attributes:
        method: the Reformer or SMYRF setting.
        planes: Reformer's rotations `(H, D, R, Σ factors / 2)`, or SMYRF's directions `(H, R, D + 2)`.
        buffer: `(B, H, R, capacity)`: each cached key's bucket in each round (Reformer), or its
            projection on the direction without XBOX+'s extra coordinate, ``k·d`` (SMYRF), in its
            first ``length`` slots.
        squares: `(B, H, capacity)` SMYRF's ‖k‖² of each cached key (XBOX+); empty for Reformer.
        largest_query, largest_key: `(B, H)` SMYRF's largest ‖q‖² and ‖k‖² over the real tokens
            seen, whose sum is XBOX+'s M² (the prompt's queries are not in the cache: queries
            count from the first decoding step on); zeros for Reformer.
        length: S, the keys stored.
        last_key: `(B, H_kv, D)` the last cached key.
    """

    method: Reformer | SMYRF
    planes: Tensor
    buffer: Tensor
    squares: Tensor
    largest_query: Tensor
    largest_key: Tensor
    length: int
    last_key: Tensor


def _round_values(method: Reformer | SMYRF, planes: Tensor, x: Tensor) -> Tensor:
    """`(B, H, R, L)`: Reformer's buckets of `(B, H, L, D)` ``x``, or SMYRF's ``x·d`` (no extra coordinate)."""
    with torch.no_grad():
        if isinstance(method, Reformer):
            return angular_buckets(x, planes, angular_factors(method.num_buckets))
        return e2lsh_projection(x, planes[..., : x.shape[-1]])


def _rounds_store(
    store: RoundsStore | None, method: Reformer | SMYRF, k: Tensor, new: int, real: Tensor,
    generator: torch.Generator | Callable[[], torch.Generator] | None, groups: int, shared: int,
) -> RoundsStore:  # fmt: skip
    """The store of all S keys of `(B, H_kv, S, D)` ``k``: ``store`` grown by the last ``new``
    when it holds the others, else built afresh from all of them, its projections drawn one a
    ``shared`` query heads (``hashing.draw_per_group``; the store stays a query head's: SMYRF's
    XBOX+ bound takes each query head's largest query)."""
    B, H_kv, S, D = k.shape
    H, cached = H_kv * groups, S - new
    if not continues(store, k, new, H):
        if isinstance(method, Reformer):
            shape = (H, D, method.num_hashes, sum(angular_factors(method.num_buckets)) // 2)
        else:
            shape = (H, method.num_hashes, D + 2)
        planes = draw_per_group(shape, shared, drawn_from(generator), k.device)
        dtype = compute_dtype(k.dtype)
        values_dtype = code_dtype(int(method.num_buckets - 1).bit_length()) if isinstance(method, Reformer) else dtype
        store = RoundsStore(
            method, planes, k.new_zeros(B, H, method.num_hashes, 0, dtype=values_dtype), k.new_zeros(B, H, 0, dtype=dtype),
            k.new_zeros(B, H, dtype=dtype), k.new_zeros(B, H, dtype=dtype), 0, k[:, :, 0],
        )  # fmt: skip
        cached = 0
    keys = per_query_head(k[:, :, cached:], groups)
    store.buffer = appended(store.buffer, cached, _round_values(method, store.planes, keys).to(store.buffer.dtype), -1)
    if isinstance(method, SMYRF):
        squares = keys.to(store.squares.dtype).pow(2).sum(-1)  # (B, H, new)
        store.squares = appended(store.squares, cached, squares, -1)
        seen = torch.where(real[:, None, cached:], squares, 0.0)
        store.largest_key = torch.maximum(store.largest_key, seen.amax(-1)) if seen.shape[-1] else store.largest_key
    store.length, store.last_key = S, k[:, :, -1].clone()
    return store


def rounds_step(
    store: RoundsStore | None, method: Reformer | SMYRF, q: Tensor, k: Tensor, v: Tensor, visible: Tensor,
    scale: float, generator: torch.Generator | Callable[[], torch.Generator] | None, per_kv_head: bool = False,
) -> Step:  # fmt: skip
    """Each round, a new query attends the visible keys of its bucket (Reformer: all of them, not
    a chunk of the sorted sequence) or the ``k_cluster_size`` visible keys nearest to it in the
    round's projection (SMYRF: the cluster it would sort into), its own key once per round
    (as the causal prefill), the covered keys as found by every round (``sinks``, ``window``).
    The rounds merge as the prefill merges them: a key found by n rounds enters the softmax n
    times (once with ``correct_duplicates``).

    For Reformer this is the causal prefill of ``whole_buckets=True``. It is not the chunked
    Reformer's nor SMYRF's: there a query's bucket is cut into chunks, and its cluster drawn, by
    the sort of the whole sequence, later tokens included, which a decoding step cannot know.
    ``docs/longctx.md`` measures how far the two are apart. ``per_kv_head``: the projections a key
    head, shared by its query heads (as the prefill with GQA inputs draws them)."""
    H, T = q.shape[1:3]
    S = k.shape[2]
    groups, cached, R = H // k.shape[1], S - T, method.num_hashes
    real = visible[:, 0, -1, :]
    store = _rounds_store(store, method, k, T, real, generator, groups, shared_by(groups, per_kv_head))
    keys = store.buffer[..., :S]  # (B, H, R, S)
    own = torch.zeros_like(visible)
    own[..., cached:] = torch.eye(T, dtype=torch.bool, device=q.device)  # query t's own position
    others = (visible & ~own)[:, :, None]  # (B, 1 or H, 1, T, S): the keys before it
    if isinstance(method, Reformer):
        found = (_round_values(method, store.planes, q)[..., None] == keys[..., None, :]) & others  # (B, H, R, T, S)
    else:
        found = _nearest_keys(method, store, q, keys, others)
    counted = 1 if method.correct_duplicates else R
    times = found.sum(2)  # (B, H, T, S): in how many rounds each key was found
    times = torch.where(covered_keys(visible, method.sinks, method.window) | own, counted, times)
    if method.correct_duplicates:
        times = times.clamp_max(1)
    out, scored = softmax_over(times, q, k, v, scale)
    return Step(out, store, scored)


def _nearest_keys(method: SMYRF, store: RoundsStore, q: Tensor, keys: Tensor, others: Tensor) -> Tensor:
    """`(B, H, R, T, S)` bool: per round, the ``k_cluster_size`` keys among ``others`` nearest to
    each query in XBOX+ projection, M² the largest squared norms seen so far."""
    D = q.shape[-1]
    with torch.no_grad():
        squares = q.to(keys.dtype).pow(2).sum(-1)  # (B, H, T)
        store.largest_query = torch.maximum(store.largest_query, squares.amax(-1))
        total = (store.largest_query + store.largest_key)[..., None, None]  # (B, H, 1, 1): M²
        key_extra = (total - store.squares[:, :, None, : keys.shape[-1]]).clamp_min(0).sqrt()
        keys = keys + key_extra * store.planes[None, :, :, D, None]  # (B, H, R, S): K(k)·d
        query_extra = (total - squares[:, :, None, :]).clamp_min(0).sqrt()  # (B, H, 1, T)
        queries = (
            _round_values(method, store.planes, q.to(keys.dtype)) + query_extra * store.planes[None, :, :, D + 1, None]
        )
        distance = (keys[..., None, :] - queries[..., None]).abs().masked_fill(~others, float("inf"))  # (B, H, R, T, S)
        size = min(method.k_cluster_size, distance.shape[-1])
        nearest = torch.topk(distance, size, dim=-1, largest=False)
        found = torch.zeros_like(distance, dtype=torch.bool)
        return found.scatter_(-1, nearest.indices, torch.isfinite(nearest.values))
