"""SimHash's decoding step: the table codes of the cached keys; a new query scores only the keys
it collides with. Collisions are decided pair by pair, so a decoding step reproduces the causal
prefill exactly.

Finding the colliding keys: an index per table (``BucketIndex``: the keys sorted by code, and
where each code's run starts) gives a query its bucket's keys directly, O(R·S / 2^τ) a query
instead of comparing its codes with all S·R; the keys appended since the index was built are
compared one by one, and the index is rebuilt when they grow past ``index_slack(S)``. Codes of
more than ``MAX_INDEX_BITS`` bits (``rule="all"``) are compared one by one throughout.
"""

from __future__ import annotations

import dataclasses
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
    native_store,
    per_query_head,
    shared_by,
)
from lshattn.hashing import simhash_codes
from lshattn.methods import SimHash
from lshattn.methods.simhash import inverse_log_probability

__all__ = ["MAX_INDEX_BITS", "BucketIndex", "SimHashStore", "index_slack", "simhash_step"]

# Codes of up to this many bits get a bucket index (its starts hold 2^bits + 1 offsets a table).
MAX_INDEX_BITS = 12


def index_slack(indexed: int) -> int:
    """Keys appended after an index of ``indexed`` keys is built that are compared one by one
    before it is rebuilt: about √(2·S·log2 S), which balances the rebuild (a sort of S codes,
    spread over the steps) against comparing the new keys at every step."""
    return max(64, int(math.sqrt(2 * indexed * math.log2(max(indexed, 2)))))


@dataclasses.dataclass
class BucketIndex:
    """The first ``indexed`` cached keys of each table listed by code.

    Attributes:
        keys: `(B, H_s, R, indexed)` key positions sorted by (code, position), H_s the store's heads.
        starts: `(B, H_s, R, 2^bits + 1)` where each code's run begins in ``keys`` (the last entry
            is ``indexed``).
    """

    keys: Tensor
    starts: Tensor

    @property
    def indexed(self) -> int:
        return self.keys.shape[-1]

    @classmethod
    def build(cls, codes: Tensor, bits: int) -> BucketIndex:
        """The index of `(B, H, R, N)` codes in ``[0, 2^bits)``."""
        ordered, keys = torch.sort(codes, dim=-1, stable=True)
        every_code = torch.arange(2**bits + 1, dtype=codes.dtype, device=codes.device)
        starts = torch.searchsorted(ordered, every_code.expand(*codes.shape[:-1], -1).contiguous(), out_int32=True)
        return cls(keys.int(), starts)  # positions and offsets below 2^31: int32, half the memory

    def colliding(self, q_codes: Tensor, S: int) -> Tensor:
        """`(B, H, T, S)` bool: the indexed keys that share a code with each query in some table.

        Args:
            q_codes: `(B, H, R, T)` the queries' codes.
        """
        B, H, R, T = q_codes.shape
        N = self.indexed
        begin = self.starts.gather(-1, q_codes).long()  # (B, H, R, T)
        lengths = (self.starts.gather(-1, q_codes + 1) - begin).reshape(-1)
        found = torch.zeros(B * H * T * S, dtype=torch.bool, device=q_codes.device)
        total = int(lengths.sum())
        if total:
            # one entry per (query, table, key of its bucket): the run of each (b, h, r, t) laid end to end
            run = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=q_codes.device), lengths, output_size=total
            )
            first = lengths.cumsum(0) - lengths
            at = begin.reshape(-1)[run] + torch.arange(total, device=q_codes.device) - first[run]
            key = self.keys.reshape(-1)[(run // T) * N + at].long()  # (b, h, r) row of keys, position in its run
            query_row = (run // (R * T)) * T + run % T  # (b, h, t)
            found[query_row * S + key] = True
        return found.view(B, H, T, S)


@dataclasses.dataclass
class SimHashStore:
    """The collision codes of a layer's cached keys.

    Attributes:
        method: the SimHash setting that hashed them (a store refuses another).
        planes: `(H_s, D, num_hashes, num_bits)` its projections: H_s = H query heads, or H_kv
            key heads when the store is kept per key head (``decode.step(..., per_kv_head=True)``).
        buffer: `(B, H_s, R, capacity)` the table codes (``SimHash.table_codes``) of the ``length``
            cached keys in its first slots (``codes``), room for more after them.
        length: S, the keys hashed.
        last_key: `(B, H_kv, D)` the last cached key, to recognise the same cache at the next step.
        index: the bucket index of the first keys (None: codes too long to index, or none yet).
        packed: the projections as the native step reads them (``kernels.packed_planes``; None
            until it runs).
    """

    method: SimHash
    planes: Tensor
    buffer: Tensor
    length: int
    last_key: Tensor
    index: BucketIndex | None = None
    packed: Tensor | None = None

    @property
    def codes(self) -> Tensor:
        """`(B, H_s, R, S)` the codes of the cached keys."""
        return self.buffer[..., : self.length]


def _simhash_codes(method: SimHash, planes: Tensor, keys: Tensor) -> Tensor:
    """`(B, H, R, L)` table codes of `(B, H, L, D)` keys, in the smallest integer type that holds them."""
    with torch.no_grad():
        codes, bits = method.table_codes(simhash_codes(keys, planes))
        return codes.to(code_dtype(bits))


def _hashed(
    store: SimHashStore | None,
    method: SimHash,
    queries: Tensor,
    keys: Tensor,
    generator: torch.Generator | Callable[[], torch.Generator] | None,
    groups: int,
    shared: int,
) -> tuple[SimHashStore, Tensor]:
    """The store holding the codes of all S keys of `(B, H_kv, S, D)` ``keys``, the last
    ``new`` of them new, and the table codes `(B, H_s, R, P·T)` of the `(B, H_s, P·T, D)`
    ``queries`` (``fold_heads``; P = ``shared``, H_s = H / P the store's heads): hashed in one
    call with the new keys when the store continues (a decoding step's few tokens)."""
    new = queries.shape[2] // shared
    H_kv, S, D = keys.shape[1:]
    H_s = H_kv * groups // shared
    cached = S - new
    if not continues(store, keys, new, H_s):
        planes = method.planes(H_s, D, drawn_from(generator), keys.device)
        codes = _simhash_codes(method, planes, per_query_head(keys, groups // shared))
        return SimHashStore(method, planes, codes, S, keys[:, :, -1].clone()), _simhash_codes(method, planes, queries)
    tokens = torch.cat([queries, per_query_head(keys[:, :, cached:], groups // shared).to(queries.dtype)], 2)
    q_codes, added = _simhash_codes(method, store.planes, tokens).split(queries.shape[2], -1)
    buffer = appended(store.buffer, cached, added, -1)
    return SimHashStore(method, store.planes, buffer, S, keys[:, :, -1].clone(), store.index), q_codes


def _indexed(store: SimHashStore, bits: int) -> SimHashStore:
    """``store`` with a bucket index that leaves at most ``index_slack`` keys out (built anew
    when more are), or none for codes longer than ``MAX_INDEX_BITS``."""
    if bits > MAX_INDEX_BITS:
        return store
    if store.index is None or store.length - store.index.indexed > index_slack(store.index.indexed):
        store.index = BucketIndex.build(store.codes, bits)
    return store


def _colliding(store: SimHashStore, q_codes: Tensor) -> Tensor:
    """`(B, H_s, P·T, S)` bool: the keys whose codes equal a query's (`(B, H_s, R, P·T)` codes) in
    some table: through the index, then the keys appended after it one by one."""
    if store.index is None:
        return (q_codes[..., :, None] == store.codes[..., None, :]).any(2)
    N, S = store.index.indexed, store.length
    found = store.index.colliding(q_codes, S)
    if S > N:
        found[..., N:] = (q_codes[..., :, None] == store.buffer[..., None, N:S]).any(2)
    return found


def _native_step(
    store: SimHashStore | None, method: SimHash, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None,
    scale: float, generator: torch.Generator | Callable[[], torch.Generator] | None, groups: int, shared: int,
) -> Step:  # fmt: skip
    """``simhash_step`` in one native call (``lshattn.kernels.simhash_decode``): the index of the
    cached keys kept up to date here, the new keys hashed into the store and the step done there."""
    T, S = q.shape[2], k.shape[2]
    cached = S - T

    def hash_keys(planes: Tensor, keys: Tensor) -> Tensor:
        return _simhash_codes(method, planes, keys)

    store = native_store(store, method, k, T, groups, shared, generator, hash_keys, SimHashStore)
    store.length = cached
    store = _indexed(store, method.num_bits)
    if store.packed is None:
        store.packed = kernels.packed_planes(store.planes)
    last_key = k.new_empty(k.shape[0], k.shape[1], k.shape[3])  # the kernel copies the last key in
    out, scored, empty = kernels.simhash_decode(
        q, k, v, store.packed, store.buffer, store.index.keys, store.index.starts, visible, last_key,
        bits=method.num_bits, sinks=method.sinks, window=method.window, importance=method.mode == "importance",
        scale=scale, shared=shared,
    )  # fmt: skip
    store.length, store.last_key = S, last_key
    return Step(out, store, scored, empty)


def simhash_step(
    store: SimHashStore | None, method: SimHash, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float,
    generator: torch.Generator | Callable[[], torch.Generator] | None, per_kv_head: bool = False,
) -> Step:  # fmt: skip
    """Each query attends the visible keys its codes collide with, as ``SimHash`` does causally in
    the prefill: sparse softmax over them, importance-weighted by 1 / P(collide | θ) in
    ``mode="importance"``, or, in faithful mode, every other visible key at logit 0. The keys
    ``sinks`` and ``window`` cover are attended with their own score, once. ``visible`` None: no
    padding (query t sees the keys up to position S − T + t). ``per_kv_head``: the store and
    its projections a key head, shared by its query heads (as the prefill with GQA inputs draws
    them), else a query head.

    Sparse and importance modes with a bucket index run natively on the CPU (``_native_step``:
    hashing and attending in one call, no tensor of S entries per query); otherwise, and where
    the kernels do not run, in torch operations."""
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = H // H_kv
    shared = shared_by(groups, per_kv_head)
    bits = method.num_bits if method.rule == "any" else method.num_bits * method.num_hashes  # of a table's codes
    differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    native = method.mode != "faithful" and method.rule == "any" and bits <= MAX_INDEX_BITS and S > T
    if native and not differentiable and kernels.decodes_natively(q, k, v, visible):
        return _native_step(store, method, q, k, v, visible, scale, generator, groups, shared)
    store, q_codes = _hashed(store, method, fold_heads(q, shared), k, generator, groups, shared)
    q_codes = q_codes.long()
    store = _indexed(store, bits)
    if visible is None:
        visible = causal_visible(B, T, S, q.device)
    with torch.no_grad():
        collide = _colliding(store, q_codes).view(B, H, T, S) & visible
    covered = covered_keys(visible, method.sinks, method.window)
    entries = collide | covered  # colliding or covered, each once
    order, taken, count = listed(entries)  # (B, H, T, C)
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype)
    exact = torch.gather(covered.expand(B, H, T, -1), 3, order) & taken  # covered: weight 1, its own score
    # rows of the flat keys by F.embedding: 3× faster than index_select here, more than torch.gather
    rows = flat_rows(order, B, H, groups, S)
    keys = F.embedding(rows, k.to(dtype).reshape(-1, D)).view(B, H, T, -1, D)
    values = F.embedding(rows, v.to(dtype).reshape(-1, Dv)).view(B, H, T, -1, Dv)
    products = (keys @ qf[..., None])[..., 0]  # (B, H, T, C)
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
    numerator = (weights[..., None, :] @ values)[..., 0, :]
    denominator = weights.sum(-1, keepdim=True)
    if method.mode == "faithful":
        zero_logit = torch.exp(-top)
        per_kv_head = rest.reshape(B, H_kv, groups * T, -1) @ v.to(dtype)  # (B, H_kv, G·T, Dv)
        numerator = numerator + zero_logit * per_kv_head.view(B, H, T, Dv)
        denominator = denominator + zero_logit * rest_count
    out = numerator / denominator.clamp_min(torch.finfo(dtype).tiny)
    return Step(out.to(q.dtype), store, int(count.sum()))
