"""Decoding through a cache: a few new queries against every cached key, without rehashing the
cache at every step (issue 14). Built so far for ``SimHash``, whose collisions are decided pair by
pair, so a decoding step reproduces the causal prefill exactly.

A ``SimHashStore`` keeps the codes of the cached keys (per layer: ``lshattn.hf`` holds one in each
layer's state). Each step hashes only the new keys and appends their codes; if the cached keys are
not the ones it holds (a new prompt, a beam search reordering the cache), it hashes them all once
and starts again — never a wrong code. The new queries then collide with the stored codes: O(S·R)
integer comparisons per query, and scores only for the colliding keys (gathered, never a
``(T, S, D)`` product of all keys).

Shape legend: B batch, H heads, T new queries, S keys (cached and new), R tables, C the most
colliding keys of any query in the step.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lshattn.hashing import simhash_codes
from lshattn.methods import SimHash
from lshattn.methods.simhash import inverse_log_probability

__all__ = ["SimHashStore", "simhash_decode", "store_for"]


@dataclasses.dataclass
class SimHashStore:
    """The collision codes of a layer's cached keys.

    Attributes:
        method: the SimHash setting that hashed them (a store refuses another).
        planes: `(H, D, num_hashes, num_bits)` its projections.
        codes: `(B, H, R, S)` the table codes of the S cached keys (``SimHash.table_codes``).
        last_key: `(B, H, D)` the last cached key, to recognise the same cache at the next step.
    """

    method: SimHash
    planes: Tensor
    codes: Tensor
    last_key: Tensor

    @property
    def length(self) -> int:
        """S, the keys hashed."""
        return self.codes.shape[-1]


def _hash(method: SimHash, planes: Tensor, keys: Tensor) -> Tensor:
    with torch.no_grad():
        return method.table_codes(simhash_codes(keys, planes))[0]


def _covered(visible: Tensor, sinks: int, window: int | None) -> Tensor:
    """`(B, 1 or H, T, S)` bool: the visible keys among the first ``sinks`` real keys or within
    ``window`` real keys before the query (ranks among the real keys, as ``lshattn.local``)."""
    real = visible[:, :, -1:, :]  # the last query sees every real key
    key_rank = real.long().cumsum(-1) - 1  # (B, ., 1, S)
    query_rank = visible.long().sum(-1, keepdim=True) - 1  # (B, ., T, 1): real keys up to it, less one
    covered = key_rank < sinks
    if window is not None:
        covered = covered | (query_rank - key_rank <= window)
    return covered & visible


def store_for(
    store: SimHashStore | None, method: SimHash, keys: Tensor, new: int, generator: torch.Generator | None,
    groups: int = 1,
) -> SimHashStore:  # fmt: skip
    """The store holding the codes of all S keys of `(B, H_kv, S, D)` ``keys``, the last ``new``
    of them just appended: ``store`` extended by those when it holds exactly the S − new before
    them, else all S hashed afresh with projections from ``generator``. With ``groups`` query
    heads per key head (GQA), each query head hashes its group's keys with its own projections,
    as the prefill does on repeated keys; only the keys being hashed are repeated.

    Raises:
        ValueError: ``store`` was filled by another method (its codes would mean nothing here).
    """
    if store is not None and store.method != method:
        raise ValueError(
            f"this layer's decoding store was filled by {store.method}, not {method}: a cache must be decoded "
            f"with the method that filled it; start a new generation (a new prompt) after lshattn.hf.use"
        )
    B, H_kv, S, D = keys.shape
    H = H_kv * groups
    cached = S - new
    same = (
        store is not None
        and store.length == cached
        and cached > 0
        and store.codes.shape[:2] == (B, H)
        and torch.equal(store.last_key, keys[:, :, cached - 1])
    )
    if not same:
        planes = method.planes(H, D, generator, keys.device)
        codes = _hash(method, planes, keys.repeat_interleave(groups, dim=1))
        return SimHashStore(method, planes, codes, keys[:, :, -1].clone())
    added = _hash(method, store.planes, keys[:, :, cached:].repeat_interleave(groups, dim=1))
    return SimHashStore(method, store.planes, torch.cat([store.codes, added], dim=-1), keys[:, :, -1].clone())


def simhash_decode(
    method: SimHash, store: SimHashStore, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float
) -> tuple[Tensor, int]:
    """``method``'s attention of T new queries over the S keys whose codes ``store`` holds.

    Each query attends the visible keys its codes collide with, as ``SimHash`` does causally in
    the prefill: sparse softmax over them, importance-weighted by 1 / P(collide | θ) in
    ``mode="importance"``, or, in faithful mode, every other visible key at logit 0. The keys
    ``sinks`` and ``window`` cover (ranks among the real keys, as in the prefill) are attended
    with their own score, once.

    Args:
        q: `(B, H, T, D)`, k: `(B, H_kv, S, D)`, v: `(B, H_kv, S, Dv)`: query head h reads key head
            ``h // (H / H_kv)`` (GQA; K and V are never repeated).
        visible: `(B, 1 or H, T, S)` bool: the keys each query may see (causality and padding).

    Returns:
        `(B, H, T, Dv)` in q's dtype (zeros for a query with no entry) and the pairs scored
        (colliding or covered, each once).
    """
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = H // H_kv
    with torch.no_grad():
        q_codes, bits = method.table_codes(simhash_codes(q, store.planes))
        collide = (q_codes[..., :, None] == store.codes[..., None, :]).any(2) & visible  # (B, H, T, S)
    covered = _covered(visible, method.sinks, method.window)
    collide = collide | covered  # the entries: colliding or covered
    count = collide.sum(-1)  # (B, H, T)
    most = int(count.max()) if count.numel() else 0
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(dtype)
    # The colliding keys of each query, first (a stable sort of the collision flags), C of them.
    order = torch.sort((~collide).to(torch.int8), dim=-1, stable=True).indices[..., :most]  # (B, H, T, C)
    taken = torch.arange(most, device=q.device) < count[..., None]
    exact = torch.gather(covered.expand(B, H, T, -1), 3, order) & taken  # covered: weight 1, its own score
    # Rows of the flat `(B·H_kv·S, ·)` keys and values: index_select, several times faster than
    # torch.gather over an expanded index.
    kv_row = (torch.arange(B, device=q.device)[:, None] * H_kv + torch.arange(H, device=q.device) // groups) * S
    rows = (kv_row.view(B, H, 1, 1) + order).reshape(-1)
    keys = k.to(dtype).reshape(-1, D).index_select(0, rows).view(B, H, T, most, D)
    values = v.to(dtype).reshape(-1, Dv).index_select(0, rows).view(B, H, T, most, Dv)
    products = (qf[..., None, :] * keys).sum(-1)  # (B, H, T, C)
    logits = products * scale
    if method.mode == "importance":
        norms = qf.norm(dim=-1)[..., None] * keys.norm(dim=-1)
        inverse = inverse_log_probability(products, norms, bits, store.codes.shape[2])
        logits = logits + torch.where(exact, 0.0, inverse)
    logits = logits.masked_fill(~taken, float("-inf"))
    top = logits.amax(-1, keepdim=True) if most else logits.new_full((B, H, T, 1), float("-inf"))
    if method.mode == "faithful":  # the visible keys that do not collide, at logit 0
        rest = (visible & ~collide).to(dtype)  # (B, H, T, S): neither colliding nor covered
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
    return out.to(q.dtype), int(count.sum())
