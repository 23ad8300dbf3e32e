"""Decoding through a cache: a few new queries against every cached key, without rehashing the
cache at every step (issue 14).

A *store* keeps, per layer, what a method needs to answer new queries against the cached keys,
and grows with them (``lshattn.hf`` holds one in each layer's state)::

    result = decode.step(store, method, q, k, v, visible, scale, generator)
    store = result.store        # for the next step; result.out is `(B, H, T, Dv)`

Each step hashes only the new keys. If the cached keys are not the ones the store holds (a new
prompt, a beam search reordering the cache) it hashes them all once and starts again: never a
stale code. What each method keeps:

* ``SimHash``: the table codes of the cached keys. A new query collides with them (O(S·R)
  integer comparisons) and scores only the keys it collides with (gathered, never a
  ``(T, S, D)`` product of all keys). Collisions are decided pair by pair, so a decoding step
  reproduces the causal prefill exactly.
* ``YOSO`` (YOSO-m): per hash, a table of the sums of the cached values in each bucket, one add
  per new key, one lookup per new query: O(m·Dv) a query whatever the context (when the 2^τ
  buckets are fewer than the keys; otherwise the codes are compared, O(S·m)), plus the keys'
  codes for the sinks and window. The causal prefill sums the same keys, so decoding reproduces
  it.

Sinks and windows are ranked among the real keys, as in the prefill (``lshattn.local``).

Shape legend: B batch, H query heads, H_kv key heads (H = G·H_kv, GQA), T new queries, S keys
(cached and new), R tables, m hashes, C the most keys any query lists in the step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.api import Method
from lshattn.blocks import compute_dtype
from lshattn.hashing import angular_buckets, angular_factors, draw_normal, e2lsh_projection, simhash_codes
from lshattn.methods import SMYRF, YOSO, Local, RandomClusters, Reformer, SimHash, TopK
from lshattn.methods.simhash import inverse_log_probability
from lshattn.methods.topk import ranking_scores, selection_weights, top_keys
from lshattn.methods.yoso import angle

__all__ = [
    "TABLE_ADD_ROWS",
    "RoundsStore",
    "SimHashStore",
    "Step",
    "Store",
    "YOSOStore",
    "decodes",
    "reordered",
    "step",
]

# Up to this many (key, hash) rows are added to YOSO's tables in one call (a copy of their values
# per hash); more, as when a whole prompt is stored, one hash at a time.
TABLE_ADD_ROWS = 1 << 12


@dataclasses.dataclass
class SimHashStore:
    """The collision codes of a layer's cached keys.

    Attributes:
        method: the SimHash setting that hashed them (a store refuses another).
        planes: `(H, D, num_hashes, num_bits)` its projections.
        buffer: `(B, H, R, capacity)` the table codes (``SimHash.table_codes``) of the ``length``
            cached keys in its first slots (``codes``), room for more after them.
        length: S, the keys hashed.
        last_key: `(B, H_kv, D)` the last cached key, to recognise the same cache at the next step.
    """

    method: SimHash
    planes: Tensor
    buffer: Tensor
    length: int
    last_key: Tensor

    @property
    def codes(self) -> Tensor:
        """`(B, H, R, S)` the codes of the cached keys."""
        return self.buffer[..., : self.length]


@dataclasses.dataclass
class YOSOStore:
    """YOSO-m's bucket tables of a layer's cached values, and the cached keys' codes.

    Attributes:
        method: the YOSO setting that hashed them.
        planes: `(H, D, m, τ)` its projections.
        buffer: `(B, H, capacity, m)` the bucket of each cached key in each hash (int32, int64
            above 31 bits) in its first ``length`` slots (``codes``).
        length: S, the keys hashed.
        tables: `(B, H·m·2^τ, Dv)`: row ``((b·H + h)·m + i)·2^τ + c`` of its flat view sums the
            values of the real cached keys of bucket c in hash i; None when 2^τ was above the keys
            (the codes are compared instead).
        last_key: `(B, H_kv, D)` the last cached key.
    """

    method: YOSO
    planes: Tensor
    buffer: Tensor
    length: int
    tables: Tensor | None
    last_key: Tensor

    @property
    def codes(self) -> Tensor:
        """`(B, H, S, m)` the codes of the cached keys."""
        return self.buffer[:, :, : self.length]


def _appended(buffer: Tensor, length: int, new: Tensor, dim: int) -> Tensor:
    """``buffer`` holding ``new`` after its first ``length`` slots along ``dim``, written in place
    when there is room, else in a buffer twice as long: O(new) a step, amortised, where
    ``torch.cat`` would copy the whole cache every step."""
    need = length + new.shape[dim]
    if need > buffer.shape[dim]:
        shape = list(buffer.shape)
        shape[dim] = max(need, 2 * buffer.shape[dim])
        grown = buffer.new_empty(shape)
        grown.narrow(dim, 0, length).copy_(buffer.narrow(dim, 0, length))
        buffer = grown
    buffer.narrow(dim, length, new.shape[dim]).copy_(new)
    return buffer


class Step(NamedTuple):
    """One decoding step: ``out`` `(B, H, T, Dv)` in q's dtype, the ``store`` for the next step, and
    the query–key pairs it ``scored`` (colliding or covered keys, each once). The step grows the
    store it was given in place (its buffers and tables): decode on from the returned one."""

    out: Tensor
    store: Store | None
    scored: int


def reordered(store: Store, beam_idx: Tensor) -> Store:
    """``store`` with its sequences in the order `(B,)` ``beam_idx`` gives (beam search reorders
    the cache so; ``lshattn.hf`` reorders every layer's store with it)."""
    changes = {
        field.name: value.index_select(0, beam_idx.to(value.device))
        for field in dataclasses.fields(store)
        if field.name != "planes" and isinstance(value := getattr(store, field.name), Tensor)
    }
    return dataclasses.replace(store, **changes)


def decodes(method: Method | None) -> bool:
    """Whether ``method`` has a decoding step here (``lshattn.hf`` runs exact attention over the
    cache for those that do not: ``Dense``, YOSO-E, the ``RandomClusters`` control)."""
    if type(method) is RandomClusters or (isinstance(method, YOSO) and method.expectation):
        return False
    return isinstance(method, (SimHash, YOSO, Reformer, SMYRF, TopK, Local))


def step(
    store: Store | None, method: Method, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float,
    generator: torch.Generator | None,
) -> Step:  # fmt: skip
    """``method``'s attention of the T new queries over all S keys, the last T of them new.

    Args:
        store: what the previous step returned (None at the first): extended by the new keys when
            it holds exactly the S − T before them, else rebuilt from all of them with projections
            from ``generator`` (the prefill's, for the same seed).
        q: `(B, H, T, D)`, the queries at the last T positions; k: `(B, H_kv, S, D)`, v:
            `(B, H_kv, S, Dv)`: query head h reads key head ``h // (H / H_kv)`` (GQA: K and V are
            never repeated; each query head hashes with its own projections, as the prefill does
            on repeated keys).
        visible: `(B, 1 or H, T, S)` bool: the keys each query may see (causality and padding);
            the last query sees every real key.
        scale: the logit scale (SimHash; YOSO's kernel has none).

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
    if isinstance(method, SimHash):
        return _simhash_step(store, method, q, k, v, visible, scale, generator)
    if isinstance(method, YOSO):
        return _yoso_step(store, method, q, k, v, visible, generator)
    if isinstance(method, (Reformer, SMYRF)):
        return _rounds_step(store, method, q, k, v, visible, scale, generator)
    return Step(*_selection_step(method, q, k, v, visible, scale))


def _continues(store: Store | None, keys: Tensor, new: int, H: int) -> bool:
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


def _per_query_head(x: Tensor, groups: int) -> Tensor:
    """`(B, H_kv, L, ·)` → `(B, H, L, ·)`: only for the few tokens a step hashes."""
    return x.repeat_interleave(groups, dim=1)


def _flat_rows(index: Tensor, B: int, H: int, groups: int, S: int) -> Tensor:
    """Rows of `(B·H_kv·S, ·)` keys or values for `(B, H, T, C)` key positions ``index``."""
    kv_row = (
        torch.arange(B, device=index.device)[:, None] * (H // groups) + torch.arange(H, device=index.device) // groups
    ) * S
    return (kv_row.view(B, H, 1, 1) + index).reshape(-1)


def _listed(flags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The positions of the True entries of `(..., S)` ``flags``, in order, C per row (the most of
    any row): `(..., C)` positions (valid ones first, the rest point at S − 1), `(..., C)` valid,
    `(...)` counts. A running count and a binary search: O(S) a row, no sort."""
    running = flags.long().cumsum(-1)
    count = running[..., -1] if flags.shape[-1] else flags.new_zeros(flags.shape[:-1], dtype=torch.long)
    most = int(count.max()) if count.numel() else 0
    wanted = torch.arange(1, most + 1, device=flags.device).expand(*flags.shape[:-1], most).contiguous()
    index = torch.searchsorted(running, wanted).clamp_max_(max(flags.shape[-1] - 1, 0))
    return index, wanted <= count[..., None], count


def _covered(visible: Tensor, sinks: int, window: int | None) -> Tensor:
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


# --- SimHash ---------------------------------------------------------------------------------


def _simhash_codes(method: SimHash, planes: Tensor, keys: Tensor) -> Tensor:
    with torch.no_grad():
        return method.table_codes(simhash_codes(keys, planes))[0]


def _simhash_store(
    store: SimHashStore | None, method: SimHash, keys: Tensor, new: int, generator: torch.Generator | None, groups: int
) -> SimHashStore:
    """The store holding the codes of all S keys of `(B, H_kv, S, D)` ``keys``."""
    H_kv, S, D = keys.shape[1:]
    H = H_kv * groups
    cached = S - new
    if not _continues(store, keys, new, H):
        planes = method.planes(H, D, generator, keys.device)
        codes = _simhash_codes(method, planes, _per_query_head(keys, groups))
        return SimHashStore(method, planes, codes, S, keys[:, :, -1].clone())
    added = _simhash_codes(method, store.planes, _per_query_head(keys[:, :, cached:], groups))
    return SimHashStore(method, store.planes, _appended(store.buffer, cached, added, -1), S, keys[:, :, -1].clone())


def _simhash_step(
    store: SimHashStore | None, method: SimHash, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float,
    generator: torch.Generator | None,
) -> Step:  # fmt: skip
    """Each query attends the visible keys its codes collide with, as ``SimHash`` does causally in
    the prefill: sparse softmax over them, importance-weighted by 1 / P(collide | θ) in
    ``mode="importance"``, or, in faithful mode, every other visible key at logit 0. The keys
    ``sinks`` and ``window`` cover are attended with their own score, once."""
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = H // H_kv
    store = _simhash_store(store, method, k, T, generator, groups)
    with torch.no_grad():
        q_codes, bits = method.table_codes(simhash_codes(q, store.planes))
        collide = (q_codes[..., :, None] == store.codes[..., None, :]).any(2) & visible  # (B, H, T, S)
    covered = _covered(visible, method.sinks, method.window)
    entries = collide | covered  # colliding or covered, each once
    order, taken, count = _listed(entries)  # (B, H, T, C)
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype)
    exact = torch.gather(covered.expand(B, H, T, -1), 3, order) & taken  # covered: weight 1, its own score
    # index_select on the flat keys: several times faster than torch.gather over an expanded index
    rows = _flat_rows(order, B, H, groups, S)
    keys = k.to(dtype).reshape(-1, D).index_select(0, rows).view(B, H, T, -1, D)
    values = v.to(dtype).reshape(-1, Dv).index_select(0, rows).view(B, H, T, -1, Dv)
    products = (qf[..., None, :] * keys).sum(-1)  # (B, H, T, C)
    logits = products * scale
    if method.mode == "importance":
        norms = qf.norm(dim=-1)[..., None] * keys.norm(dim=-1)
        inverse = inverse_log_probability(products, norms, bits, store.codes.shape[2])
        logits = logits + torch.where(exact, 0.0, inverse)
    logits = logits.masked_fill(~taken, float("-inf"))
    top = logits.amax(-1, keepdim=True) if logits.shape[-1] else logits.new_full((B, H, T, 1), float("-inf"))
    if method.mode == "faithful":  # the visible keys that do not collide, at logit 0
        rest = (visible & ~entries).to(dtype)  # (B, H, T, S)
        rest_count = rest.sum(-1, keepdim=True)
        top = torch.maximum(top, torch.where(rest_count > 0, 0.0, float("-inf")))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(logits - top)
    numerator = (weights[..., None] * values).sum(-2)
    denominator = weights.sum(-1, keepdim=True)
    if method.mode == "faithful":
        zero_logit = torch.exp(-top)
        per_kv_head = rest.reshape(B, H_kv, groups * T, -1) @ v.to(dtype)  # (B, H_kv, G·T, Dv)
        numerator = numerator + zero_logit * per_kv_head.view(B, H, T, Dv)
        denominator = denominator + zero_logit * rest_count
    out = numerator / denominator.clamp_min(torch.finfo(dtype).tiny)
    return Step(out.to(q.dtype), store, int(count.sum()))


# --- YOSO ------------------------------------------------------------------------------------


def _yoso_codes(planes: Tensor, x: Tensor, num_bits: int) -> Tensor:
    """`(B, H, L, m)` bucket codes of `(B, H, L, D)` ``x``."""
    with torch.no_grad():
        return simhash_codes(x, planes, tables_last=True, dtype=torch.int32 if num_bits <= 31 else torch.long)


def _table_rows(codes: Tensor, B: int, H: int, num_bits: int) -> Tensor:
    """Rows of the flat tables for `(B, H, L, m)` codes."""
    m = codes.shape[-1]
    head_hash = torch.arange(B * H, device=codes.device).view(B, H, 1, 1) * m + torch.arange(m, device=codes.device)
    return head_hash * 2**num_bits + codes


def _add_to_tables(tables: Tensor, codes: Tensor, values: Tensor, real: Tensor, num_bits: int) -> None:
    """Add to ``tables`` (in place) the values `(B, H, L, Dv)` of the real (`(B, L)` bool) keys of
    `(B, H, L, m)` ``codes``, into their buckets; padded keys add nothing (NaN included)."""
    B, H, L, m = codes.shape
    flat = tables.view(-1, tables.shape[-1])
    values = torch.where(real[:, None, :, None], values, 0.0)
    rows = _table_rows(codes, B, H, num_bits)
    if L * m <= TABLE_ADD_ROWS:  # a decoding step's few keys: one call
        flat.index_add_(0, rows.reshape(-1), values[:, :, :, None].expand(B, H, L, m, -1).reshape(B * H * L * m, -1))
        return
    values = values.reshape(B * H * L, -1)
    for hash_rows in rows.permute(3, 0, 1, 2).reshape(m, B * H * L):  # one pass per hash: no (L, m, Dv) copy
        flat.index_add_(0, hash_rows, values)


def _yoso_store(
    store: YOSOStore | None, method: YOSO, k: Tensor, v: Tensor, new: int, real: Tensor, generator: torch.Generator | None,
    groups: int,
) -> YOSOStore:  # fmt: skip
    """The store of the S − new keys before the new ones: ``store`` when it holds them, else built
    from them (tables when 2^τ is at most their number)."""
    if _continues(store, k, new, k.shape[1] * groups):
        return store
    B, H_kv, S, D = k.shape
    H, cached, Dv = H_kv * groups, S - new, v.shape[-1]
    planes = draw_normal((H, D, method.num_hashes, method.num_bits), generator, k.device)
    codes = _yoso_codes(planes, _per_query_head(k[:, :, :cached], groups), method.num_bits)
    tables = None
    if 2**method.num_bits <= max(cached, 1):
        tables = v.new_zeros(B, H * method.num_hashes * 2**method.num_bits, Dv, dtype=compute_dtype(v.dtype))
        values = _per_query_head(v[:, :, :cached], groups).to(tables.dtype)
        _add_to_tables(tables, codes, values, real[:, :cached], method.num_bits)
    return YOSOStore(method, planes, codes, cached, tables, k[:, :, max(cached - 1, 0)].clone())


def _yoso_step(
    store: YOSOStore | None, method: YOSO, q: Tensor, k: Tensor, v: Tensor, visible: Tensor,
    generator: torch.Generator | None,
) -> Step:  # fmt: skip
    """YOSO-m's ``Y_i = (1/m) Σ_h Σ_{j visible, c_h(k_j) = c_h(q_i)} v_j`` for the new queries, as
    the causal prefill computes it: the cached keys from the tables (or by comparing codes), the
    new keys up to each query by comparing codes, the covered pairs corrected to the exact kernel
    (``lshattn.methods.yoso``); L2-normalised with ``normalize_output``."""
    B, H, T = q.shape[:3]
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups, m, bits, cached = H // H_kv, method.num_hashes, method.num_bits, S - T
    real = visible[:, 0, -1, :]  # (B, S): the last query sees every real key
    if not bool((visible[..., :cached] == real[:, None, None, :cached]).all()):
        raise ValueError(
            "YOSO decodes with bucket tables of every cached real key, but the attention mask hides some cached "
            "keys from a new query (a sliding window or a custom 4-D mask); use exact attention in this layer"
        )
    store = _yoso_store(store, method, k, v, T, real, generator, groups)
    dtype = compute_dtype(q.dtype)
    # the queries' and the new keys' codes in one call: (B, H, T, m) each
    q_codes, new_codes = _yoso_codes(
        store.planes, torch.cat([q, _per_query_head(k[:, :, cached:], groups)], 2), bits
    ).split(T, 2)
    new_values = torch.where(real[:, None, cached:, None], v[:, :, cached:].to(dtype), 0.0)  # (B, H_kv, T, Dv)

    if store.tables is not None:  # the cached keys, one table row per hash
        rows = _table_rows(q_codes, B, H, bits).reshape(B * H * T, m)
        summed = F.embedding_bag(rows, store.tables.view(-1, Dv), mode="sum").view(B, H, T, Dv)
    else:  # in how many hashes each query meets each cached key
        hits = (q_codes[:, :, :, None, :] == store.codes[:, :, None, :, :]).sum(-1).to(dtype)  # (B, H, T, cached)
        cached_values = torch.where(real[:, None, :cached, None], v[:, :, :cached].to(dtype), 0.0)
        summed = (hits.view(B, H_kv, groups * T, cached) @ cached_values).view(B, H, T, Dv)
    # the new keys up to each query (teacher forcing may bring several)
    block_hits = (q_codes[:, :, :, None, :] == new_codes[:, :, None, :, :]).sum(-1).to(dtype)  # (B, H, T, T)
    block_hits = block_hits * visible[..., cached:]
    summed = summed + (block_hits.view(B, H_kv, groups * T, T) @ new_values).view(B, H, T, Dv)
    out = summed / m

    if store.tables is not None:  # the new keys into the tables (they were read before, above)
        _add_to_tables(store.tables, new_codes, _per_query_head(new_values, groups), real[:, cached:], bits)
    grown = YOSOStore(method, store.planes, _appended(store.buffer, cached, new_codes, 2), S, store.tables,
                      k[:, :, -1].clone())  # fmt: skip

    scored = 0
    if method.sinks or method.window is not None:
        covered = _covered(visible, method.sinks, method.window)
        index, valid, count = _listed(covered)  # (B, 1 or H, T, C)
        out = out + _yoso_local_correction(
            method, q.to(dtype), k.to(dtype), v, q_codes, grown.buffer, index.expand(B, H, T, -1),
            valid.expand(B, H, T, -1), groups,
        )  # fmt: skip
        scored = int(count.sum()) * (H // covered.shape[1])
    if method.normalize_output:
        out = out / torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min(1e-12)
    return Step(out.to(q.dtype), grown, scored)


def _yoso_local_correction(
    method: YOSO, q: Tensor, k: Tensor, values: Tensor, q_codes: Tensor, codes: Tensor, index: Tensor, valid: Tensor,
    groups: int,
) -> Tensor:  # fmt: skip
    """`(B, H, T, Dv)`: for the covered keys, the exact kernel (1 − θ/π)^τ in place of the sampled
    collision fraction, ``Σ_a (B_ia − hits_ia/m)·v_a``, as the prefill's correction.

    Args:
        q: `(B, H, T, D)`; k: `(B, H_kv, S, D)`; values: `(B, H_kv, S, Dv)`; q_codes: `(B, H, T, m)`;
        codes: `(B, H, capacity ≥ S, m)` every key's (the store's buffer: its rows are read in
            place, never copied); index, valid: `(B, H, T, C)` the covered keys (all real).
    """
    B, H, T, C = index.shape
    S, D, Dv, m = k.shape[2], k.shape[-1], values.shape[-1], codes.shape[-1]
    rows = _flat_rows(index, B, H, groups, S)
    keys = k.reshape(-1, D).index_select(0, rows).view(B, H, T, C, D)
    picked = values.to(q.dtype).reshape(-1, Dv).index_select(0, rows).view(B, H, T, C, Dv)
    head_rows = (torch.arange(B * H, device=index.device).view(B, H, 1, 1) * codes.shape[2] + index).reshape(-1)
    key_codes = codes.reshape(-1, m).index_select(0, head_rows).view(B, H, T, C, m)
    hits = (q_codes[:, :, :, None, :] == key_codes).sum(-1).to(q.dtype)
    theta = angle(F.normalize(q, dim=-1)[:, :, :, None, :], F.normalize(keys, dim=-1))
    kernel = (1 - theta / math.pi) ** method.num_bits
    weight = kernel - hits / m
    return torch.where(valid[..., None], weight[..., None] * picked, 0.0).sum(-2)


# --- Reformer and SMYRF: rounds of buckets or clusters -----------------------------------------


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
    generator: torch.Generator | None, groups: int,
) -> RoundsStore:  # fmt: skip
    """The store of all S keys of `(B, H_kv, S, D)` ``k``: ``store`` grown by the last ``new``
    when it holds the others, else built afresh from all of them."""
    B, H_kv, S, D = k.shape
    H, cached = H_kv * groups, S - new
    if not _continues(store, k, new, H):
        if isinstance(method, Reformer):
            planes = draw_normal(
                (H, D, method.num_hashes, sum(angular_factors(method.num_buckets)) // 2), generator, k.device
            )
        else:
            planes = draw_normal((H, method.num_hashes, D + 2), generator, k.device)
        dtype = compute_dtype(k.dtype)
        values_dtype = torch.long if isinstance(method, Reformer) else dtype
        store = RoundsStore(
            method, planes, k.new_zeros(B, H, method.num_hashes, 0, dtype=values_dtype), k.new_zeros(B, H, 0, dtype=dtype),
            k.new_zeros(B, H, dtype=dtype), k.new_zeros(B, H, dtype=dtype), 0, k[:, :, 0],
        )  # fmt: skip
        cached = 0
    keys = _per_query_head(k[:, :, cached:], groups)
    store.buffer = _appended(store.buffer, cached, _round_values(method, store.planes, keys).to(store.buffer.dtype), -1)
    if isinstance(method, SMYRF):
        squares = keys.to(store.squares.dtype).pow(2).sum(-1)  # (B, H, new)
        store.squares = _appended(store.squares, cached, squares, -1)
        seen = torch.where(real[:, None, cached:], squares, 0.0)
        store.largest_key = torch.maximum(store.largest_key, seen.amax(-1)) if seen.shape[-1] else store.largest_key
    store.length, store.last_key = S, k[:, :, -1].clone()
    return store


def _rounds_step(
    store: RoundsStore | None, method: Reformer | SMYRF, q: Tensor, k: Tensor, v: Tensor, visible: Tensor,
    scale: float, generator: torch.Generator | None,
) -> Step:  # fmt: skip
    """Each round, a new query attends the visible keys of its bucket (Reformer: all of them, not
    a chunk of the sorted sequence) or the ``k_cluster_size`` visible keys nearest to it in the
    round's projection (SMYRF: the cluster it would sort into), its own key once per round
    (as the causal prefill), the covered keys as found by every round (``sinks``, ``window``).
    The rounds merge as the prefill merges them: a key found by n rounds enters the softmax n
    times (once with ``correct_duplicates``).

    This is not the causal prefill: there a query's bucket is cut into chunks, and its cluster
    drawn, by the sort of the whole sequence, later tokens included, which a decoding step
    cannot know. ``docs/longctx.md`` measures how far the two are apart."""
    H, T = q.shape[1:3]
    S = k.shape[2]
    groups, cached, R = H // k.shape[1], S - T, method.num_hashes
    real = visible[:, 0, -1, :]
    store = _rounds_store(store, method, k, T, real, generator, groups)
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
    times = torch.where(_covered(visible, method.sinks, method.window) | own, counted, times)
    if method.correct_duplicates:
        times = times.clamp_max(1)
    out, scored = _softmax_over(times, q, k, v, scale)
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


def _softmax_over(times: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, int]:
    """Softmax over the keys with ``times`` > 0, each entering that many times (logit + log
    times): `(B, H, T, Dv)` in q's dtype (zeros for a query with none) and the keys scored.

    Args:
        times: `(B, H, T, S)` integers; q: `(B, H, T, D)`; k, v: `(B, H_kv, S, ·)` (GQA).
    """
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[-1]
    index, taken, count = _listed(times > 0)  # (B, H, T, C)
    dtype = compute_dtype(q.dtype)
    rows = _flat_rows(index, B, H, H // k.shape[1], S)
    keys = k.to(dtype).reshape(-1, D).index_select(0, rows).view(B, H, T, -1, D)
    values = v.to(dtype).reshape(-1, Dv).index_select(0, rows).view(B, H, T, -1, Dv)
    logits = (q.to(dtype)[..., None, :] * keys).sum(-1) * scale + torch.gather(times, 3, index).to(dtype).log()
    logits = logits.masked_fill(~taken, float("-inf"))
    top = logits.amax(-1, keepdim=True) if logits.shape[-1] else logits.new_zeros(B, H, T, 1)
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0))
    out = (weights[..., None] * values).sum(-2) / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return out.to(q.dtype), int(count.sum())


# --- TopK and Local: selections without hashing --------------------------------------------------


def _selection_step(method: TopK | Local, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> tuple:
    """The oracle's and the locality baseline's step, as their causal prefill: ``TopK`` scores
    every visible key (it is the ceiling, O(S) a query like exact attention) and keeps the
    covered keys and the top ``fraction`` of the others; ``Local`` attends the covered keys
    (``tail``: and the others as one mean-field entry, from their sums, O(S·D) a query)."""
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = H // H_kv
    dtype = compute_dtype(q.dtype)
    covered = _covered(visible, method.sinks, method.window).expand(B, H, T, S)
    if isinstance(method, Local) and not method.tail:
        out, scored = _softmax_over(covered.long(), q, k, v, scale)
        return out, None, scored
    per_kv_head = q.to(dtype).reshape(B, H_kv, groups * T, D)  # query heads of a group, one after another
    scores = (per_kv_head @ k.to(dtype).transpose(-1, -2)).view(B, H, T, S) * scale
    if isinstance(method, TopK):
        ranking = ranking_scores(per_kv_head, k, scale).view(B, H, T, S)
        selected = top_keys(ranking, visible & ~covered, method.fraction) | covered
        weights = selection_weights(scores, selected, visible, tail=method.tail)
        scored = int(visible.sum()) * (H // visible.shape[1])  # every visible key, to choose
    else:  # Local(tail=True): the covered keys and one entry for the rest, at log n + scale·q·mean(k)
        rest = (visible & ~covered).to(dtype)  # (B, H, T, S)
        n = rest.sum(-1, keepdim=True)
        mean_key = (rest.view(B, H_kv, groups * T, S) @ k.to(dtype)).view(B, H, T, D) / n.clamp_min(1)
        tail_logit = torch.where(
            n > 0.5, n.clamp_min(1).log() + (q.to(dtype) * mean_key).sum(-1, keepdim=True) * scale, float("-inf")
        )
        logits = torch.cat([scores.masked_fill(~covered, float("-inf")), tail_logit], dim=-1)
        top = logits.amax(-1, keepdim=True)
        probabilities = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0))
        probabilities = probabilities / probabilities.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        weights = probabilities[..., :S] + probabilities[..., S:] * rest / n.clamp_min(1)  # the tail: mean value
        scored = int(covered.sum()) + B * H * T
    out = (weights.view(B, H_kv, groups * T, S) @ v.to(dtype)).view(B, H, T, Dv)
    return out.to(q.dtype), None, scored


Store = SimHashStore | YOSOStore | RoundsStore
