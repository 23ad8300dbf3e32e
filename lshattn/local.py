"""Sinks and a local window: pairs a sparse method attends exactly, whatever its hashing finds.

Every method but ``Dense`` takes ``sinks=s`` and ``window=w``. Each query then also attends,
with its exact score,

* the first ``s`` real keys of its sequence (the "attention sinks" that trained models park
  mass on: [CLS], [SEP], a BOS token), and
* the real keys within ``w`` tokens of its own position, counting real tokens only: ranks
  ``r − w … r + w``, or ``r − w … r`` when causal (``w = 0``: its own key).

Positions are ranks among real tokens, so padding on the left, right or scattered leaves every
sequence's pairs unchanged. A covered pair counts as the method counts a pair its hashing
finds — once, or once per round for Reformer and SMYRF, whose rounds each count their pairs
(unless ``correct_duplicates``) — whether the hashing found it or not, and never more: the
window skips the sinks, and each method takes the covered pairs its hashing found out of its
own part before adding them back (``merge_local`` for the softmax methods, an additive
correction for YOSO). One bucket holding everything therefore stays exact attention.

How: queries and keys are put in rank order (real tokens first), where the window of every
query is the same shift of the keys. Each of the ``A = s + span`` slots (span = 2w + 1, or
w + 1 when causal) is then one vectorised pass over views of the keys (``LocalPairs.per_slot``):
O(B·H·T·A·D) time, O(B·H·T·A) memory for the scores, never a gathered `(T, A, D)` tensor nor a
T×S one. The slots depend on the masks and positions alone, not on the hashing.

Shape legend: B batch, H heads, T queries, S keys, A slots per query, D, Dv dims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.api import Inputs
from lshattn.cost import Cost

__all__ = [
    "CoverRule",
    "LocalPairs",
    "cover_rule",
    "local_cost",
    "local_pairs",
    "local_scores",
    "local_slots",
    "merge_counted",
    "merge_local",
    "with_local_cost",
    "with_entries",
]


@dataclasses.dataclass(frozen=True)
class LocalPairs:
    """The covered pairs of one call, in rank order, the same for every head.

    Queries and keys are listed in *rank order* (``queries``, ``keys``): the real tokens first,
    in their order, then the padded ones. Query r has ``A = sinks + span`` slots: slot a < sinks
    is key a (the a-th real key), slot ``sinks + o`` is key ``r + o − reach``.

    Attributes:
        query_order: `(B, T)` position of the query of each rank (None: the identity).
        key_order: `(B, S)` position of the key of each rank (None: the identity).
        key_positions: `(B, T, A)` position of each slot's key (a valid index where unused).
        valid: `(B, T, A)` bool: the slot holds a covered pair.
        sinks: sink slots, ``min(sinks, S)``. reach: window slots before the own one,
            ``min(window, S − 1)``. span: window slots, ``2·reach + 1`` (``reach + 1`` when causal).
    """

    query_order: Tensor | None
    key_order: Tensor | None
    key_positions: Tensor
    valid: Tensor
    sinks: int
    reach: int
    span: int

    @property
    def slots(self) -> int:
        """A, slots per query."""
        return self.sinks + self.span

    def queries(self, x: Tensor) -> Tensor:
        """`(B, H, T, ...)` from position order to rank order."""
        return _reorder(x, self.query_order)

    def keys(self, x: Tensor) -> Tensor:
        """`(B, H, S, ...)` from position order to rank order."""
        return _reorder(x, self.key_order)

    def restore(self, x: Tensor) -> Tensor:
        """`(B, H, T, ...)` from the queries' rank order back to position order."""
        return x if self.query_order is None else _reorder(x, torch.argsort(self.query_order, dim=1))

    def own(self) -> Tensor:
        """`(B, T, A)` bool: the slot's key is at the query's own position."""
        B, T, _ = self.valid.shape
        position = (
            torch.arange(T, device=self.valid.device).expand(B, T) if self.query_order is None else self.query_order
        )
        return self.key_positions == position[..., None]

    def key_views(self, keys: Tensor) -> Iterator[Tensor]:
        """For each slot a, `(B, H, T, ...)`: the row of ``keys`` `(B, H, S, ...)` (rank order) that
        slot a of each query holds, as a view (zeros past either end, where no slot is valid)."""
        B, H, S = keys.shape[:3]
        T = self.valid.shape[1]
        for a in range(self.sinks):
            yield keys[:, :, a : a + 1].expand(B, H, T, *keys.shape[3:])
        if self.span:
            after = max(0, T + self.span - self.reach - S)
            padded = F.pad(keys, [0, 0] * (keys.dim() - 3) + [self.reach, after])
            for o in range(self.span):
                yield padded[:, :, o : o + T]

    def per_slot(self, queries: Tensor, keys: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """`(B, H, T, A)`: ``fn(queries, key view of slot a)`` `(B, H, T)` for every slot a.

        Args:
            queries: `(B, H, T, ...)`, keys: `(B, H, S, ...)`, both in rank order.
        """
        # Each slot written into one preallocated tensor as it comes: a list of A small results kept
        # between A large temporaries fragments the heap (an 8k-token window of 2,000 grew past 23 GB).
        out = None
        for a, view in enumerate(self.key_views(keys)):
            part = fn(queries, view)
            if out is None:
                out = part.new_empty(*part.shape, self.slots)
            out[..., a] = part
        return out

    def weighted_sum(self, weights: Tensor, values: Tensor) -> Tensor:
        """`(B, H, T, Dv)`: ``Σ_a weights[..., a] · (value of slot a)``.

        Args:
            weights: `(B, H, T, A)`, values: `(B, H, S, Dv)`, both in rank order.
        """
        total = torch.zeros(*weights.shape[:3], values.shape[-1], dtype=values.dtype, device=values.device)
        for a, view in enumerate(self.key_views(values)):
            total = torch.addcmul(total, weights[..., a, None], view)  # not in place: weights may need a gradient
        return total


def _reorder(x: Tensor, order: Tensor | None) -> Tensor:
    """Rows of `(B, H, L, ...)` taken along L in ``order`` `(B, L)` (None: unchanged)."""
    if order is None:
        return x
    index = order.view(order.shape[0], 1, order.shape[1], *([1] * (x.dim() - 3)))
    return torch.gather(x, 2, index.expand(x.shape[0], x.shape[1], order.shape[1], *x.shape[3:]))


def _rank_order(mask: Tensor | None) -> Tensor | None:
    """`(B, L)` positions of the real tokens in order, then of the padded ones (None: the identity)."""
    return None if mask is None else torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


def local_slots(S: int, sinks: int, window: int | None, causal: bool) -> int:
    """A: slots per query for ``sinks`` and ``window`` over S keys."""
    if window is None:
        return min(sinks, S)
    reach = min(window, S - 1)
    return min(sinks, S) + (reach + 1 if causal else 2 * reach + 1)


def local_cost(
    B: int, H: int, T: int, S: int, D: int, Dv: int, sinks: int, window: int | None, *, causal: bool
) -> Cost:
    """What the covered pairs add to a method's cost: ``B·H·T·A`` scores (every slot is scored,
    used or not), ``2·B·H·T·A·(D + Dv)`` flops for the scores and the weighted values (element-wise
    products over views, no matrix product); memory the `(B, H, T, A)` scores (as a count of
    elements, for ``with_local_cost``); budget the scores over ``B·H·T·S``."""
    dots = B * H * T * local_slots(S, sinks, window, causal)
    return Cost(flops=2 * dots * (D + Dv), dot_products=dots, memory_bytes=dots, budget=dots / (B * H * T * S))


def with_local_cost(
    cost: Cost, method, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool, itemsize: int,
    flops_per_slot: int = 0,
) -> Cost:  # fmt: skip
    """A method's own ``cost`` with the pairs its ``sinks`` and ``window`` cover added
    (``local_cost``, plus ``flops_per_slot`` of the method's own per slot): scores and flops add
    up, memory is the larger of the two intermediates."""
    covered = local_cost(B, H, T, S, D, Dv, method.sinks, method.window, causal=causal)
    return Cost(
        flops=cost.flops + covered.flops + flops_per_slot * covered.dot_products,
        dot_products=cost.dot_products + covered.dot_products,
        memory_bytes=max(cost.memory_bytes, covered.memory_bytes * itemsize),
        budget=cost.budget + covered.budget,
    )


def local_pairs(inputs: Inputs, sinks: int, window: int | None, *, own_key: bool = True) -> LocalPairs | None:
    """The pairs ``sinks`` and ``window`` cover in this call, or None when both are off.

    Keys are ranked by the key mask; queries by the query mask, or, when only keys are masked
    and T == S, by the key mask (the same tokens): a query whose own position that mask pads has
    no rank and no window, but keeps its sinks. The window needs T == S (the spec checks it);
    sinks work for any T and S.

    Args:
        inputs: the call's validated inputs (masks, causal, sizes).
        own_key: False for a method that never attends a query's own position (shared-QK
            Reformer): that slot is left unused.
    """
    if sinks == 0 and window is None:
        return None
    q, k = inputs.q, inputs.k
    B, T, S, device = q.shape[0], q.shape[2], k.shape[2], q.device
    key_mask, query_mask = inputs.key_padding_mask, inputs.query_padding_mask
    if query_mask is None and T == S:
        query_mask = key_mask
    key_order, query_order = _rank_order(key_mask), _rank_order(query_mask)
    real_keys = torch.full((B, 1, 1), S, device=device) if key_mask is None else key_mask.sum(1).view(B, 1, 1)
    ranked = torch.full((B, 1, 1), T, device=device) if query_mask is None else query_mask.sum(1).view(B, 1, 1)

    num_sinks = min(sinks, S)
    reach = 0 if window is None else min(window, S - 1)
    span = 0 if window is None else (reach + 1 if inputs.causal else 2 * reach + 1)
    rank = torch.arange(T, device=device).view(1, T, 1)
    sink_ranks = torch.arange(num_sinks, device=device).expand(B, T, -1)
    window_ranks = (rank + torch.arange(span, device=device) - reach).expand(B, T, -1)
    key_ranks = torch.cat([sink_ranks, window_ranks], dim=-1)  # (B, T, A)
    # The window belongs to ranked queries and skips the sinks: a key is attended once.
    in_window = (window_ranks >= num_sinks) & (rank < ranked)
    valid = (
        (key_ranks >= 0)
        & (key_ranks < real_keys)
        & torch.cat([torch.ones_like(sink_ranks, dtype=torch.bool), in_window], -1)
    )

    key_ranks = key_ranks.clamp(0, S - 1)
    if key_order is None:
        key_positions = key_ranks
    else:
        key_positions = torch.gather(key_order, 1, key_ranks.reshape(B, -1)).view_as(key_ranks)
    query_positions = rank if query_order is None else query_order[..., None]
    if inputs.causal:  # by positions: the masks of queries and keys may differ
        valid = valid & (key_positions <= query_positions)
    if not own_key:
        valid = valid & (key_positions != query_positions)
    return LocalPairs(query_order, key_order, key_positions, valid, num_sinks, reach, span)


@dataclasses.dataclass(frozen=True)
class CoverRule:
    """The covered pairs as a rule on ranks, for a method that meets pairs one by one and must
    leave the covered ones out of its own part (importance-weighted SimHash).

    The same pairs as ``local_pairs`` lists: key rank below ``sinks``, or a ranked query and a
    key at or past the sinks within ``reach`` ranks (before it only, when causal). Causality by
    position is the method's own mask.

    Attributes:
        query_ranks: `(B, T)` int64 rank of each query among the ranked ones, ``UNRANKED`` if none.
        key_ranks: `(B, S)` int64 rank of each key among the real keys, ``UNRANKED`` if padded.
    """

    query_ranks: Tensor
    key_ranks: Tensor
    sinks: int
    reach: int | None
    causal: bool

    UNRANKED = 2**40  # past every sink, and no window reaches it

    def covers(self, query_ranks: Tensor, key_ranks: Tensor) -> Tensor:
        """bool, broadcast: the pair of a query of rank ``query_ranks`` and a key of rank ``key_ranks``
        is covered."""
        covered = key_ranks < self.sinks
        if self.reach is not None:
            offset = key_ranks - query_ranks
            near = (offset >= -self.reach) & (offset <= (0 if self.causal else self.reach))
            covered = covered | (near & (key_ranks >= self.sinks))
        return covered


def _real_ranks(mask: Tensor | None, B: int, L: int, device: torch.device) -> Tensor:
    """`(B, L)` rank of each position among the real ones (None: all real); padded: ``UNRANKED``."""
    if mask is None:
        return torch.arange(L, device=device).expand(B, L)
    return torch.where(mask, mask.long().cumsum(1) - 1, CoverRule.UNRANKED)


def cover_rule(inputs: Inputs, sinks: int, window: int | None) -> CoverRule | None:
    """The rule of the pairs ``local_pairs(inputs, sinks, window)`` covers, or None when both are
    off: queries ranked by the query mask, or by the key mask when only keys are masked and
    T == S, as there."""
    if sinks == 0 and window is None:
        return None
    B, T, S, device = inputs.q.shape[0], inputs.q.shape[2], inputs.k.shape[2], inputs.q.device
    key_mask, query_mask = inputs.key_padding_mask, inputs.query_padding_mask
    if query_mask is None and T == S:
        query_mask = key_mask
    reach = None if window is None else min(window, S - 1)
    return CoverRule(
        _real_ranks(query_mask, B, T, device), _real_ranks(key_mask, B, S, device), min(sinks, S), reach, inputs.causal
    )


def local_scores(q: Tensor, k: Tensor, pairs: LocalPairs, scale: float) -> Tensor:
    """`(B, H, T, A)`: ``scale·q·k`` of every slot, -inf where unused.

    Args:
        q: `(B, H, T, D)`, k: `(B, H, S, D)`, in rank order (``pairs.queries``, ``pairs.keys``).
    """
    scores = pairs.per_slot(q, k, lambda queries, keys: (queries * keys).sum(-1)) * scale
    return scores.masked_fill(~pairs.valid[:, None], float("-inf"))


def merge_local(
    out: Tensor, lse: Tensor, kept: Tensor, found: Tensor, values: Tensor, pairs: LocalPairs
) -> tuple[Tensor, Tensor]:
    """A softmax method's part merged with the covered pairs, each pair counted as the method says.

    The method's part is ``out = Σ_j w_j v_j / Σ_j w_j`` with ``lse = log Σ_j w_j`` over the pairs
    it found (``w_j = e^{s_j}`` times the number of rounds that found it, or faithful SimHash's
    ``e^0``). Of the covered pairs, ``found = log w_j`` is what the method gave them (-inf where
    it did not find them) and ``kept`` the log-weight they get instead (``s_j``, plus log R for a
    method whose R rounds each count a pair: a covered pair counts as one every round found, so
    one bucket holding everything stays exact attention):

        out' = (e^lse·out − Σ_a e^found_a·v_a + Σ_a e^kept_a·v_a) / (e^lse − Σ_a e^found_a + Σ_a e^kept_a),

    all shifted by one maximum. A method whose ``found`` is the same tensor as ``kept`` where it
    found a pair cancels exactly there. Differentiable in every input.

    Args:
        out: `(B, H, T, Dv)`, lse: `(B, H, T)` (-inf: the method saw no key), in rank order.
        kept, found: `(B, H, T, A)`, -inf in unused slots. values: `(B, H, S, Dv)` in rank order.

    Returns:
        out `(B, H, T, Dv)`, zero where no pair is left, and lse `(B, H, T)`, in rank order.
    """
    top = torch.maximum(lse, torch.maximum(kept.amax(-1), found.amax(-1)))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    method_mass = torch.exp(lse - top)
    net = torch.exp(kept - top[..., None]) - torch.exp(found - top[..., None])  # (B, H, T, A)
    total = method_mass + net.sum(-1)
    weighted = method_mass[..., None] * out + pairs.weighted_sum(net, values)
    tiny = torch.finfo(total.dtype).tiny
    # Taking pairs out leaves the rest of the method's mass, which rounding may leave a few ulps
    # below zero when nothing else remains; every covered pair adds a positive term.
    seen = total > tiny
    merged = weighted / torch.where(seen, total, 1.0)[..., None]
    merged = torch.where(seen[..., None], merged, torch.zeros_like(merged))
    merged_lse = torch.where(seen, top + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    return merged, merged_lse


def with_entries(scores: Tensor, entries: Tensor | int) -> Tensor:
    """Log-weights ``s + log(entries)`` of pairs counted ``entries`` times (`(B, H, T, A)` or one
    count for all), -inf where 0: ``found`` and ``kept`` of ``merge_local``."""
    entries = torch.as_tensor(entries, device=scores.device)
    return torch.where(entries > 0, scores + entries.to(scores.dtype).log(), float("-inf"))


def merge_counted(
    pairs: LocalPairs, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, entries: Tensor, counted: int,
    scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``merge_local`` for a method that counts a pair ``entries`` times (Reformer's and SMYRF's
    rounds, ``blocks.pair_entries``) and should count a covered pair ``counted`` times.

    Args:
        out: `(B, H, T, Dv)`, lse: `(B, H, T)`: the method's merged rounds, in position order.
        q: `(B, H, T, D)`, k: `(B, H, S, D)`, v: `(B, H, S, Dv)` in position order (keys may be
            longer than S: slots never reach past it). entries: `(B, H, T, A)`, rank order.

    Returns:
        out `(B, H, T, Dv)` and lse `(B, H, T)`, in position order.
    """
    scores = local_scores(pairs.queries(q), pairs.keys(k), pairs, scale)
    out, lse = merge_local(
        pairs.queries(out), pairs.queries(lse), with_entries(scores, counted), with_entries(scores, entries),
        pairs.keys(v), pairs,
    )  # fmt: skip
    return pairs.restore(out), pairs.restore(lse)
