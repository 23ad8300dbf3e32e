"""SimHash's decoding step: the table codes of the cached keys; a new query collides with them
(O(S·R) integer comparisons) and scores only the keys it collides with. Collisions are decided
pair by pair, so a decoding step reproduces the causal prefill exactly."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lshattn.blocks import compute_dtype
from lshattn.decode.common import Step, appended, continues, covered_keys, flat_rows, listed, per_query_head
from lshattn.hashing import simhash_codes
from lshattn.methods import SimHash
from lshattn.methods.simhash import inverse_log_probability

__all__ = ["SimHashStore", "simhash_step"]


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
    if not continues(store, keys, new, H):
        planes = method.planes(H, D, generator, keys.device)
        codes = _simhash_codes(method, planes, per_query_head(keys, groups))
        return SimHashStore(method, planes, codes, S, keys[:, :, -1].clone())
    added = _simhash_codes(method, store.planes, per_query_head(keys[:, :, cached:], groups))
    return SimHashStore(method, store.planes, appended(store.buffer, cached, added, -1), S, keys[:, :, -1].clone())


def simhash_step(
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
    covered = covered_keys(visible, method.sinks, method.window)
    entries = collide | covered  # colliding or covered, each once
    order, taken, count = listed(entries)  # (B, H, T, C)
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype)
    exact = torch.gather(covered.expand(B, H, T, -1), 3, order) & taken  # covered: weight 1, its own score
    # index_select on the flat keys: several times faster than torch.gather over an expanded index
    rows = flat_rows(order, B, H, groups, S)
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
