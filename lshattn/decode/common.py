"""What every decoding step shares: the step's result, the check that a store still holds the
cache it is given, the buffers that grow with it, the covered keys (sinks and window) and the
listing of each query's keys without a sort.

Shape legend: B batch, H query heads, H_kv key heads (H = G·H_kv, GQA), T new queries, S keys
(cached and new), C the most keys any query lists in the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.blocks import compute_dtype

__all__ = [
    "Step",
    "appended",
    "causal_visible",
    "code_dtype",
    "continues",
    "covered_keys",
    "drawn_from",
    "flat_rows",
    "fold_heads",
    "listed",
    "local_index",
    "native_store",
    "per_query_head",
    "shared_by",
    "softmax_over",
    "with_room",
]


class Step(NamedTuple):
    """One decoding step: ``out`` `(B, H, T, Dv)` in q's dtype, the ``store`` for the next step, the
    query–key pairs it ``scored`` (colliding or covered keys, each once) and, where the step
    counted them, the queries left ``empty`` (an output of zeros: no key; None: count the zero
    rows of ``out``). The step grows the store it was given in place (its buffers and tables):
    decode on from the returned one."""

    out: Tensor
    store: Any  # the method's store (lshattn.decode.Store), None for TopK and Local
    scored: int
    empty: int | None = None


def code_dtype(bits: int) -> torch.dtype:
    """The smallest signed integer type that holds codes of ``bits`` bits (stores keep one a key
    per table: int16 for 8-bit codes is a quarter of int64's memory)."""
    return torch.int16 if bits <= 15 else torch.int32 if bits <= 31 else torch.long


def drawn_from(generator: torch.Generator | Callable[[], torch.Generator] | None) -> torch.Generator | None:
    """The generator to draw a new store's projections from: ``generator``, or what it returns
    when it is a function (``lshattn.hf`` passes one: a step that extends its store draws nothing,
    so it need not seed a generator)."""
    return generator() if callable(generator) else generator


def with_room(buffer: Tensor, length: int, need: int, dim: int = -1) -> Tensor:
    """``buffer`` with room for ``need`` slots along ``dim``, its first ``length`` kept: itself when
    it has them, else a buffer a quarter longer (at least 64 slots more): amortised O(1) a slot,
    where growing by the slots needed would copy the whole cache every step. Not twice as long:
    a store built from a long prompt grows at the first step, and doubling left half of it empty
    (at 8k, half of SimHash's codes)."""
    if need <= buffer.shape[dim]:
        return buffer
    shape = list(buffer.shape)
    shape[dim] = max(need, buffer.shape[dim] + max(buffer.shape[dim] // 4, 64))
    grown = buffer.new_empty(shape)
    grown.narrow(dim, 0, length).copy_(buffer.narrow(dim, 0, length))
    return grown


def appended(buffer: Tensor, length: int, new: Tensor, dim: int) -> Tensor:
    """``buffer`` holding ``new`` after its first ``length`` slots along ``dim``, written in place
    when there is room (``with_room``): O(new) a step, amortised, where ``torch.cat`` would copy
    the whole cache every step."""
    buffer = with_room(buffer, length, length + new.shape[dim], dim)
    buffer.narrow(dim, length, new.shape[dim]).copy_(new)
    return buffer


def continues(store: Any, keys: Tensor, new: int, H: int) -> bool:
    """Whether ``store`` holds exactly the keys of `(B, H_kv, S, D)` ``keys`` before the last ``new``."""
    cached = keys.shape[2] - new
    return (
        store is not None
        and store.length == cached
        and cached > 0
        and store.last_key.shape[0] == keys.shape[0]
        and store.planes.shape[0] == H
        and torch.equal(store.last_key, keys[:, :, cached - 1])
    )


def shared_by(groups: int, per_kv_head: bool) -> int:
    """P, the query heads that share a store head (and its projections): the G of a key head when
    the store is kept ``per_kv_head`` (GQA hashed once a key head), else 1 (a store a query head).
    A store then has H / P heads, and its keys are the key heads repeated G / P times."""
    return groups if per_kv_head else 1


def fold_heads(x: Tensor, shared: int) -> Tensor:
    """`(B, H, T, ·)` → `(B, H / P, P·T, ·)`, P = ``shared``: the queries of the heads that share
    a store head as more queries of it (a view of contiguous ``x``; ``.view(B, H, T, ·)`` undoes it)."""
    B, H, T = x.shape[:3]
    return x.reshape(B, H // shared, shared * T, *x.shape[3:])


def native_store(
    store: Any, method: Any, k: Tensor, new: int, groups: int, shared: int,
    generator: torch.Generator | Callable[[], torch.Generator] | None, hash_keys: Callable[[Tensor, Tensor], Tensor],
    make: Callable[..., Any],
) -> Any:  # fmt: skip
    """The store a native decoding step writes the ``new`` keys' codes into, in place: ``store``
    with room for them when it holds the keys before them, else ``make(method, planes, buffer,
    length, last_key)`` from those keys of `(B, H_kv, S, D)` ``k``, hashed by ``hash_keys(planes,
    keys)`` with projections ``method.planes`` draws for the H / ``shared`` store heads."""
    S, D = k.shape[2], k.shape[3]
    cached, store_heads = S - new, k.shape[1] * groups // shared
    if continues(store, k, new, store_heads):
        store.buffer = with_room(store.buffer, cached, S).contiguous()
        return store
    planes = method.planes(store_heads, D, drawn_from(generator), k.device)
    codes = hash_keys(planes, per_query_head(k[:, :, :cached], groups // shared))
    return make(method, planes, with_room(codes, cached, S).contiguous(), cached, k[:, :, cached - 1])


def per_query_head(x: Tensor, groups: int) -> Tensor:
    """`(B, H_kv, L, ·)` → `(B, H, L, ·)`: only for the few tokens a step hashes."""
    return x.repeat_interleave(groups, dim=1)


def flat_rows(index: Tensor, B: int, H: int, groups: int, S: int) -> Tensor:
    """Rows of `(B·H_kv·S, ·)` keys or values for `(B, H, T, C)` key positions ``index``."""
    kv_row = (
        torch.arange(B, device=index.device)[:, None] * (H // groups) + torch.arange(H, device=index.device) // groups
    ) * S
    return (kv_row.view(B, H, 1, 1) + index).reshape(-1)


def listed(flags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The positions of the True entries of `(..., S)` ``flags``, in order, C per row (the most of
    any row): `(..., C)` positions (valid ones first, the rest point at S − 1), `(..., C)` valid,
    `(...)` counts. ``nonzero`` lists them row by row: O(S) a row, no sort."""
    *rows_shape, S = flags.shape
    flat = flags.reshape(-1, S)
    count = flat.sum(-1)
    most = int(count.max()) if count.numel() else 0
    index = torch.full((flat.shape[0], most), max(S - 1, 0), dtype=torch.long, device=flags.device)
    row, position = flat.nonzero(as_tuple=True)  # row-major: each row's positions in order
    slot = torch.arange(row.numel(), device=flags.device) - (count.cumsum(0) - count)[row]
    index[row, slot] = position
    valid = torch.arange(most, device=flags.device) < count[:, None]
    return index.view(*rows_shape, most), valid.view(*rows_shape, most), count.view(rows_shape)


def causal_visible(B: int, T: int, S: int, device: torch.device) -> Tensor:
    """`(B, 1, T, S)` bool: with no padding, query t (position S − T + t) sees the keys up to it."""
    return (torch.arange(S, device=device) <= torch.arange(S - T, S, device=device)[:, None]).expand(B, 1, T, S)


@functools.lru_cache(maxsize=64)
def local_index(T: int, S: int, sinks: int, window: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """With no padding (ranks are positions): the keys ``covered_keys`` gives the T new queries,
    as `(T, C)` positions (clamped into range) and `(T, C)` valid, C = sinks + window + 1,
    without an S-long pass. Cached: every layer of a step asks for the same."""
    position = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    first = torch.arange(sinks, device=device).expand(T, sinks)
    index, valid = first, first <= position
    if window is not None:
        near = position - window + torch.arange(window + 1, device=device)  # (T, window + 1)
        index, valid = torch.cat([index, near], 1), torch.cat([valid, near >= sinks], 1)  # the sinks once
    return index.clamp(0, S - 1), valid


def covered_keys(visible: Tensor, sinks: int, window: int | None) -> Tensor:
    """`(B, 1 or H, T, S)` bool: the visible keys among the first ``sinks`` real keys or within
    ``window`` real keys before the query (ranks among the real keys, as ``lshattn.local``)."""
    if sinks == 0 and window is None:
        return torch.zeros_like(visible)
    real = visible[:, :, -1:, :]  # the last query sees every real key
    key_rank = real.long().cumsum(-1) - 1  # (B, ., 1, S)
    query_rank = visible.long().sum(-1, keepdim=True) - 1  # (B, ., T, 1): real keys up to it, less one
    covered = key_rank < sinks
    if window is not None:
        covered = covered | (query_rank - key_rank <= window)
    return covered & visible


def softmax_over(times: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, int]:
    """Softmax over the keys with ``times`` > 0, each entering that many times (logit + log
    times): `(B, H, T, Dv)` in q's dtype (zeros for a query with none) and the keys scored.

    Args:
        times: `(B, H, T, S)` integers; q: `(B, H, T, D)`; k, v: `(B, H_kv, S, ·)` (GQA).
    """
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[-1]
    index, taken, count = listed(times > 0)  # (B, H, T, C)
    dtype = compute_dtype(q.dtype)
    rows = flat_rows(index, B, H, H // k.shape[1], S)
    keys = F.embedding(rows, k.to(dtype).reshape(-1, D)).view(B, H, T, -1, D)
    values = F.embedding(rows, v.to(dtype).reshape(-1, Dv)).view(B, H, T, -1, Dv)
    logits = (keys @ q.to(dtype)[..., None])[..., 0] * scale + torch.gather(times, 3, index).to(dtype).log()
    logits = logits.masked_fill(~taken, float("-inf"))
    top = logits.amax(-1, keepdim=True) if logits.shape[-1] else logits.new_zeros(B, H, T, 1)
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0))
    out = (weights[..., None, :] @ values)[..., 0, :] / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return out.to(q.dtype), int(count.sum())
