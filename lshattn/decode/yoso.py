"""YOSO-m's decoding step: per hash, a table of the sums of the cached values in each bucket, one
add per new key, one lookup per new query — O(m·Dv) a query whatever the context (when the 2^τ
buckets are fewer than the keys; otherwise the codes are compared, O(S·m)) — plus the keys'
codes for the sinks and window. The causal prefill sums the same keys, so decoding reproduces it."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn import kernels
from lshattn.blocks import compute_dtype
from lshattn.decode.common import (
    Step,
    appended,
    causal_visible,
    code_dtype,
    continues,
    covered_keys,
    drawn_from,
    flat_rows,
    fold_heads,
    listed,
    local_index,
    per_query_head,
    shared_by,
    with_room,
)
from lshattn.hashing import draw_normal, simhash_codes
from lshattn.methods import YOSO
from lshattn.methods.yoso import angle, expectation_kernel

__all__ = ["TABLE_ADD_ROWS", "YOSOStore", "expectation_step", "yoso_step"]

# Up to this many (key, hash) rows are added to YOSO's tables in one call (a copy of their values
# per hash); more, as when a whole prompt is stored, one hash at a time.
TABLE_ADD_ROWS = 1 << 12


@dataclasses.dataclass
class YOSOStore:
    """YOSO-m's bucket tables of a layer's cached values, and the cached keys' codes.

    Attributes:
        method: the YOSO setting that hashed them.
        planes: `(H_s, D, m, τ)` its projections: H_s = H query heads, or H_kv key heads when
            the store is kept per key head (``decode.step(..., per_kv_head=True)``: the tables of a
            key head then serve its G query heads, one add per new key).
        buffer: `(B, H_s, capacity, m)` the bucket of each cached key in each hash (``code_dtype``:
            int16 up to 15 bits, half of int32's memory) in its first ``length`` slots (``codes``).
        length: S, the keys hashed.
        tables: `(B, H_s·m·2^τ, Dv)`: row ``((b·H_s + h)·m + i)·2^τ + c`` of its flat view sums the
            values of the real cached keys of bucket c in hash i; None when 2^τ was above the keys
            (the codes are compared instead).
        last_key: `(B, H_kv, D)` the last cached key.
        packed: the projections as the native step reads them (``kernels.packed_planes``; None
            until it runs).
    """

    method: YOSO
    planes: Tensor
    buffer: Tensor
    length: int
    tables: Tensor | None
    last_key: Tensor
    packed: Tensor | None = None

    @property
    def codes(self) -> Tensor:
        """`(B, H_s, S, m)` the codes of the cached keys."""
        return self.buffer[:, :, : self.length]


def _yoso_codes(planes: Tensor, x: Tensor, num_bits: int) -> Tensor:
    """`(B, H, L, m)` bucket codes of `(B, H, L, D)` ``x``, in the smallest type that holds them
    (``code_dtype``; hashed as int32 or int64, which the hashing packs into)."""
    with torch.no_grad():
        codes = simhash_codes(x, planes, tables_last=True, dtype=torch.int32 if num_bits <= 31 else torch.long)
        return codes.to(code_dtype(num_bits))


def _table_rows(codes: Tensor, B: int, H: int, num_bits: int) -> Tensor:
    """Rows of the flat tables for `(B, H, L, m)` codes."""
    return _table_offsets(B, H, codes.shape[-1], num_bits, codes.device) + codes


@functools.lru_cache(maxsize=64)
def _table_offsets(B: int, H: int, m: int, num_bits: int, device: torch.device) -> Tensor:
    """`(B, H, 1, m)`: the first row of each (sequence, head, hash)'s table (cached: every layer of
    every step asks for the same)."""
    head_hash = torch.arange(B * H, device=device).view(B, H, 1, 1) * m + torch.arange(m, device=device)
    return head_hash * 2**num_bits


def _add_to_tables(tables: Tensor, codes: Tensor, values: Tensor, real: Tensor | None, num_bits: int) -> None:
    """Add to ``tables`` (in place) the values `(B, H, L, Dv)` of the real (`(B, L)` bool, None:
    all) keys of `(B, H, L, m)` ``codes``, into their buckets; padded keys add nothing (NaN included)."""
    B, H, L, m = codes.shape
    flat = tables.view(-1, tables.shape[-1])
    if real is not None:
        values = torch.where(real[:, None, :, None], values, 0.0)
    rows = _table_rows(codes, B, H, num_bits)
    if L * m <= TABLE_ADD_ROWS:  # a decoding step's few keys: one call
        flat.index_add_(0, rows.reshape(-1), values[:, :, :, None].expand(B, H, L, m, -1).reshape(B * H * L * m, -1))
        return
    values = values.reshape(B * H * L, -1)
    for hash_rows in rows.permute(3, 0, 1, 2).reshape(m, B * H * L):  # one pass per hash: no (L, m, Dv) copy
        flat.index_add_(0, hash_rows, values)


def _yoso_store(
    store: YOSOStore | None, method: YOSO, k: Tensor, v: Tensor, new: int, real: Tensor | None,
    generator: torch.Generator | Callable[[], torch.Generator] | None,
    groups: int,
    shared: int,
) -> YOSOStore:  # fmt: skip
    """The store of the S − new keys before the new ones: ``store`` when it holds them, else built
    from them (tables when 2^τ is at most their number), with H / ``shared`` heads (``shared_by``)."""
    H_s = k.shape[1] * groups // shared
    if continues(store, k, new, H_s):
        return store
    B, _, S, D = k.shape
    cached, Dv = S - new, v.shape[-1]
    planes = draw_normal((H_s, D, method.num_hashes, method.num_bits), drawn_from(generator), k.device)
    codes = _yoso_codes(planes, per_query_head(k[:, :, :cached], groups // shared), method.num_bits)
    tables = None
    if 2**method.num_bits <= max(cached, 1):
        tables = v.new_zeros(B, H_s * method.num_hashes * 2**method.num_bits, Dv, dtype=compute_dtype(v.dtype))
        values = per_query_head(v[:, :, :cached], groups // shared).to(tables.dtype)
        _add_to_tables(tables, codes, values, None if real is None else real[:, :cached], method.num_bits)
    return YOSOStore(method, planes, codes, cached, tables, k[:, :, max(cached - 1, 0)].clone())


def yoso_step(
    store: YOSOStore | None, method: YOSO, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None,
    generator: torch.Generator | Callable[[], torch.Generator] | None, per_kv_head: bool = False,
) -> Step:  # fmt: skip
    """YOSO-m's ``Y_i = (1/m) Σ_h Σ_{j visible, c_h(k_j) = c_h(q_i)} v_j`` for the new queries, as
    the causal prefill computes it: the cached keys from the tables (or by comparing codes), the
    new keys up to each query by comparing codes, the covered pairs corrected to the exact kernel
    (``lshattn.methods.yoso``); L2-normalised with ``normalize_output``.

    ``visible`` None (no padding) takes a path with no pass over the S keys: a step costs
    O(m·Dv) plus the sinks' and window's keys, whatever the context. With bucket tables, on the
    CPU, the step is one native call (``_native_step``); otherwise torch operations.
    ``per_kv_head``: the store (tables included) and its projections a key head, shared by its
    query heads, else a query head."""
    B, H, T = q.shape[:3]
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups, m, bits, cached = H // H_kv, method.num_hashes, method.num_bits, S - T
    shared = shared_by(groups, per_kv_head)
    H_s = H // shared
    real = None if visible is None else visible[:, 0, -1, :]  # (B, S): the last query sees every real key
    if visible is not None and not bool((visible[..., :cached] == real[:, None, None, :cached]).all()):
        raise ValueError(
            "YOSO decodes with bucket tables of every cached real key, but the attention mask hides some cached "
            "keys from a new query (a sliding window or a custom 4-D mask); use exact attention in this layer"
        )
    store = _yoso_store(store, method, k, v, T, real, generator, groups, shared)
    differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if (
        store.tables is not None
        and store.tables.dtype == q.dtype
        and store.buffer.dtype == torch.int16  # the kernel's codes: up to 15 bits
        and not differentiable
        and kernels.decodes_natively(q, k, v, visible)
    ):
        return _native_step(store, method, q, k, v, visible, shared)
    dtype = compute_dtype(q.dtype)
    # the queries' and the new keys' codes in one call: (B, H_s, P·T, m) and (B, H_s, T, m)
    q_codes, new_codes = _yoso_codes(
        store.planes, torch.cat([fold_heads(q, shared), per_query_head(k[:, :, cached:], groups // shared)], 2), bits
    ).split([shared * T, T], 2)
    new_values = v[:, :, cached:].to(dtype)  # (B, H_kv, T, Dv)
    if real is not None:
        new_values = torch.where(real[:, None, cached:, None], new_values, 0.0)

    if store.tables is not None:  # the cached keys, one table row per hash
        rows = _table_rows(q_codes, B, H_s, bits).reshape(B * H * T, m)
        summed = F.embedding_bag(rows, store.tables.view(-1, Dv), mode="sum").view(B, H, T, Dv)
    else:  # in how many hashes each query meets each cached key
        hits = (q_codes[:, :, :, None, :] == store.codes[:, :, None, :, :]).sum(-1).to(dtype)  # (B, H_s, P·T, cached)
        cached_values = v[:, :, :cached].to(dtype)
        if real is not None:
            cached_values = torch.where(real[:, None, :cached, None], cached_values, 0.0)
        summed = (hits.view(B, H_kv, groups * T, cached) @ cached_values).view(B, H, T, Dv)
    # the new keys up to each query (teacher forcing may bring several)
    block_hits = (q_codes[:, :, :, None, :] == new_codes[:, :, None, :, :]).sum(-1).to(dtype).view(B, H, T, T)
    block_hits = block_hits.tril() if visible is None else block_hits * visible[..., cached:]
    summed = summed + (block_hits.view(B, H_kv, groups * T, T) @ new_values).view(B, H, T, Dv)
    out = summed / m

    if store.tables is not None:  # the new keys into the tables (they were read before, above)
        new_real = None if real is None else real[:, cached:]
        _add_to_tables(store.tables, new_codes, per_query_head(new_values, groups // shared), new_real, bits)
    grown = YOSOStore(method, store.planes, appended(store.buffer, cached, new_codes, 2), S, store.tables,
                      k[:, :, -1].clone(), store.packed)  # fmt: skip

    scored = 0
    if method.sinks or method.window is not None:
        if visible is None:
            index, valid = local_index(T, S, method.sinks, method.window, q.device)  # (T, C)
            index, valid = index.expand(B, 1, T, -1), valid.expand(B, 1, T, -1)
        else:
            index, valid, _ = listed(covered_keys(visible, method.sinks, method.window))  # (B, 1 or H, T, C)
        out = out + _yoso_local_correction(
            method, q.to(dtype), k.to(dtype), v, q_codes.reshape(B, H, T, m), grown.buffer, index.expand(B, H, T, -1),
            valid.expand(B, H, T, -1), groups, shared,
        )  # fmt: skip
        scored = int(valid.sum()) * (H // valid.shape[1])
    if method.normalize_output:
        out = out / torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min(1e-12)
    return Step(out.to(q.dtype), grown, scored)


def _native_step(
    store: YOSOStore, method: YOSO, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, shared: int
) -> Step:
    """``yoso_step`` in one native call (``lshattn.kernels.yoso_decode``): the new keys hashed into
    the store's codes and added to its tables there, in place."""
    S, T = k.shape[2], q.shape[2]
    buffer = with_room(store.buffer, S - T, S, dim=2).contiguous()  # the kernel writes the new codes in it
    packed = kernels.packed_planes(store.planes) if store.packed is None else store.packed
    last_key = k.new_empty(k.shape[0], k.shape[1], k.shape[3])  # the kernel copies the last key in
    out, scored, empty = kernels.yoso_decode(
        q, k, v, packed, buffer, store.tables, visible, last_key, bits=method.num_bits, sinks=method.sinks,
        window=method.window, normalize=method.normalize_output, shared=shared,
    )  # fmt: skip
    return Step(out, YOSOStore(method, store.planes, buffer, S, store.tables, last_key, packed), scored, empty)


def _yoso_local_correction(
    method: YOSO, q: Tensor, k: Tensor, values: Tensor, q_codes: Tensor, codes: Tensor, index: Tensor, valid: Tensor,
    groups: int, shared: int,
) -> Tensor:  # fmt: skip
    """`(B, H, T, Dv)`: for the covered keys, the exact kernel (1 − θ/π)^τ in place of the sampled
    collision fraction, ``Σ_a (B_ia − hits_ia/m)·v_a``, as the prefill's correction.

    Args:
        q: `(B, H, T, D)`; k: `(B, H_kv, S, D)`; values: `(B, H_kv, S, Dv)`; q_codes: `(B, H, T, m)`;
        codes: `(B, H / shared, capacity ≥ S, m)` every key's (the store's buffer: its rows are
            read in place, never copied; query head h reads store head h // shared);
        index, valid: `(B, H, T, C)` the covered keys (all real).
    """
    B, H, T, C = index.shape
    S, D, Dv, m = k.shape[2], k.shape[-1], values.shape[-1], codes.shape[-1]
    rows = flat_rows(index, B, H, groups, S)
    keys = F.embedding(rows, k.reshape(-1, D)).view(B, H, T, C, D)
    picked = F.embedding(rows, values.to(q.dtype).reshape(-1, Dv)).view(B, H, T, C, Dv)
    store_head = torch.arange(B * H, device=index.device).view(B, H, 1, 1) // shared  # b·H_s + h // shared
    head_rows = (store_head * codes.shape[2] + index).reshape(-1)
    key_codes = codes.reshape(-1, m).index_select(0, head_rows).view(B, H, T, C, m)
    hits = (q_codes[:, :, :, None, :] == key_codes).sum(-1).to(q.dtype)
    theta = angle(F.normalize(q, dim=-1)[:, :, :, None, :], F.normalize(keys, dim=-1))
    kernel = (1 - theta / math.pi) ** method.num_bits
    weight = kernel - hits / m
    return torch.where(valid[..., None], weight[..., None] * picked, 0.0).sum(-2)


def expectation_step(method: YOSO, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None) -> Step:
    """YOSO-E's decoding step: ``Y_i = Σ_j (1 − θ_ij/π)^τ v_j`` over the visible keys (the
    expectation YOSO-m samples, computed exactly), L2-normalised with ``normalize_output``: the
    prefill's kernel (``methods.yoso.expectation_kernel``) for the T new queries, no store; it
    scores every visible key, as exact attention does. ``visible`` None: no padding.

    Args:
        q: `(B, H, T, D)`; k, v: `(B, H_kv, S, ·)` (GQA: a key head's G query heads as G·T
            queries of it); visible: `(B, 1 or H, T, S)` bool or None.
    """
    B, H, T, _ = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = H // H_kv
    if visible is None:
        visible = causal_visible(B, T, S, q.device)
    dtype = compute_dtype(q.dtype)
    per_kv_head = (
        visible.reshape(B, H_kv, groups * T, S) if visible.shape[1] == H else visible.repeat(1, H_kv, groups, 1)
    )
    q_hat = F.normalize(fold_heads(q.to(dtype), groups), dim=-1)  # (B, H_kv, G·T, D)
    kernel = expectation_kernel(q_hat, F.normalize(k.to(dtype), dim=-1), per_kv_head, method.num_bits)[1]
    out = (kernel @ v.to(dtype)).view(B, H, T, Dv)
    if method.normalize_output:
        out = out / torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min(1e-12)
    return Step(out.to(q.dtype), None, int(visible.sum()) * (H // visible.shape[1]))
