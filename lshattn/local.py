"""Sinks and a local window: pairs a sparse method attends exactly, whatever its hashing finds.

Every method but ``Dense`` takes ``sinks=s`` and ``window=w``. Each real query then also attends,
with its exact score,

* the first ``s`` real keys of its sequence (the "attention sinks" that trained models park
  mass on: [CLS], [SEP], a BOS token), and
* the real keys within ``w`` tokens of its own position, counting real tokens only: ranks
  ``r(i) − w … r(i) + w``, or ``r(i) − w … r(i)`` when causal (``w = 0``: its own key).

Positions are ranks among real tokens (``token_ranks``), so padding on the left, right or
scattered leaves every sequence's pairs unchanged. A covered pair counts as the method counts a
pair its hashing finds — once, or once per round for Reformer and SMYRF, whose rounds each
count their pairs (unless ``correct_duplicates``) — whether the hashing found it or not, and
never more: the window skips the sinks, and each method takes the covered pairs its hashing
found out of its own part before adding them back (``merge_local`` for the softmax methods, an
additive correction for YOSO). One bucket holding everything therefore stays exact attention.

Pairs are listed per query as ``A = min(s, S) + min(span, S)`` slots (span = 2w + 1, or w + 1
when causal), gathered, scored and masked: memory O(B·H·T·A·(D + Dv)), never T×S. The slots are
the same for every head and depend on the masks and positions alone, not on the hashing.

Shape legend: B batch, H heads, T queries, S keys, A slots per query, D, Dv dims.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lshattn.api import Inputs
from lshattn.cost import Cost
from lshattn.hashing import gather_rows

__all__ = [
    "LocalPairs",
    "add_local_cost",
    "local_cost",
    "local_pairs",
    "local_scores",
    "local_slots",
    "merge_local",
    "token_ranks",
    "with_entries",
]


class LocalPairs(NamedTuple):
    """The covered pairs of one call, the same for every head.

    Attributes:
        positions: `(B, T, A)` int64 key position of each slot (any valid index where unused).
        valid: `(B, T, A)` bool, True where the slot holds a covered pair: a real key that is a
            sink or in the query's window (and, when causal, not after the query).
    """

    positions: Tensor
    valid: Tensor

    @property
    def slots(self) -> int:
        """A, slots per query."""
        return self.positions.shape[-1]


def local_slots(S: int, sinks: int, window: int | None, causal: bool) -> int:
    """A: slots per query for ``sinks`` and ``window`` over S keys (no more than S of each kind)."""
    span = 0 if window is None else (window + 1 if causal else 2 * window + 1)
    return min(sinks, S) + min(span, S)


def local_cost(
    B: int, H: int, T: int, S: int, D: int, Dv: int, sinks: int, window: int | None, *, causal: bool
) -> Cost:
    """What the covered pairs add to a method's cost: ``B·H·T·A`` scores (every slot is scored,
    used or not), ``2·B·H·T·A·(D + Dv)`` flops for scores and weighted values; memory the
    gathered keys and values, ``B·H·T·A·(D + Dv)`` elements (returned as a count, for the caller
    to compare with its own largest intermediate); budget the scores over ``B·H·T·S``."""
    dots = B * H * T * local_slots(S, sinks, window, causal)
    return Cost(
        flops=2 * dots * (D + Dv), dot_products=dots, memory_bytes=dots * (D + Dv), budget=dots / (B * H * T * S)
    )


def add_local_cost(cost: Cost, local: Cost, itemsize: int) -> Cost:
    """A method's cost with its covered pairs added (``local_cost``): scores and flops add up,
    memory is the larger of the two intermediates."""
    dots = cost.dot_products + local.dot_products
    return Cost(
        flops=cost.flops + local.flops,
        dot_products=dots,
        memory_bytes=max(cost.memory_bytes, local.memory_bytes * itemsize),
        budget=cost.budget + local.budget,
    )


def token_ranks(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """`(B, L)` int64: the number of real tokens before each position (its rank, if it is real)."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    counts = mask.long()
    return counts.cumsum(1) - counts


def local_pairs(inputs: Inputs, sinks: int, window: int | None, *, own_key: bool = True) -> LocalPairs | None:
    """The pairs ``sinks`` and ``window`` cover in this call, or None when both are off.

    Keys are ranked by the key mask. Queries are ranked by the query mask, or, when only keys
    are masked (T == S), by the key mask: the same tokens. The window needs T == S (checked by
    the spec); sinks work for any T and S.

    Args:
        inputs: the call's validated inputs (masks, causal, sizes).
        own_key: False for a method that never attends a query's own position (shared-QK
            Reformer): the slot of the own key is left unused.
    """
    if sinks == 0 and window is None:
        return None
    q, k = inputs.q, inputs.k
    B, T, S, device = q.shape[0], q.shape[2], k.shape[2], q.device
    key_mask = inputs.key_padding_mask
    query_mask = inputs.query_padding_mask
    if query_mask is None and T == S:
        query_mask = key_mask
    key_rank = token_ranks(key_mask, B, S, device)
    query_rank = token_ranks(query_mask, B, T, device)[..., None]  # (B, T, 1)
    real_keys = torch.full((B, 1, 1), S, device=device) if key_mask is None else key_mask.sum(1).view(B, 1, 1)

    sink_ranks = torch.arange(min(sinks, S), device=device).expand(B, T, -1)
    span = local_slots(S, 0, window, inputs.causal)
    ranks = sink_ranks
    if span:
        # The window's ranks r(i) − w … r(i) + w fit in ``span`` slots starting at ``first``,
        # shifted inwards at the ends of the sequence so that no slot is wasted past them.
        first = (query_rank - window).clamp(min=0)
        first = torch.minimum(first, (real_keys - span).clamp(min=0))
        window_ranks = first + torch.arange(span, device=device)
        distance = window_ranks - query_rank
        in_window = (distance <= 0 if inputs.causal else distance <= window) & (distance >= -window)
        ranks = torch.cat([sink_ranks, window_ranks], dim=-1)
    valid = ranks < real_keys
    if span:
        # A window key that is also a sink is attended once, as a sink.
        window_valid = in_window & (window_ranks >= min(sinks, S))
        valid = valid & torch.cat([torch.ones_like(sink_ranks, dtype=torch.bool), window_valid], dim=-1)

    # Position of the key of each rank: real keys scatter their positions to their ranks;
    # padded keys write into a spare column past the end.
    if key_mask is None:
        positions = ranks
    else:
        target = torch.where(key_mask, key_rank, S)
        position_of_rank = torch.zeros(B, S + 1, dtype=torch.long, device=device)
        position_of_rank.scatter_(1, target, torch.arange(S, device=device).expand(B, S))
        positions = position_of_rank.gather(1, ranks.clamp(max=S - 1).reshape(B, -1)).view_as(ranks)
    query_position = torch.arange(T, device=device).view(1, T, 1)
    if inputs.causal:
        valid = valid & (positions <= query_position)
    if not own_key:
        valid = valid & (positions != query_position)
    return LocalPairs(positions.clamp(max=S - 1), valid)


def local_scores(q: Tensor, k: Tensor, v: Tensor, pairs: LocalPairs, scale: float) -> tuple[Tensor, Tensor]:
    """Scores and values of the covered pairs.

    Args:
        q: `(B, H, T, D)`, k: `(B, H, S, D)`, v: `(B, H, S, Dv)` in the compute dtype.

    Returns:
        scores `(B, H, T, A)`, ``scale·q·k``, -inf in unused slots; values `(B, H, T, A, Dv)`.
    """
    B, H, T, _ = q.shape
    index = pairs.positions.reshape(B, 1, 1, -1).expand(B, H, 1, -1)
    keys = gather_rows(k, index).view(B, H, T, pairs.slots, -1)
    values = gather_rows(v, index).view(B, H, T, pairs.slots, -1)
    # A batched product per query, (1, D) by (D, A): a bmm whatever A (einsum turns A = 1 into
    # an element-wise product, which FLOP counters do not see).
    scores = (q[..., None, :] @ keys.transpose(-1, -2)).squeeze(-2) * scale
    return scores.masked_fill(~pairs.valid[:, None], float("-inf")), values


def merge_local(out: Tensor, lse: Tensor, kept: Tensor, found: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """A softmax method's part merged with the covered pairs, each pair counted as the method says.

    The method's part is ``out = Σ_j w_j v_j / Σ_j w_j`` with ``lse = log Σ_j w_j`` over the pairs
    it found (``w_j = e^{s_j}`` times the number of rounds that found it, or faithful SimHash's
    ``e^0``). Of the covered pairs, ``found = log w_j`` is what the method gave them (-inf where
    it did not find them) and ``kept`` the log-weight they get instead (``s_j``, plus log R for a
    method whose R rounds each count a pair: a covered pair counts as one every round found, so
    one bucket holding everything stays exact attention):

        out' = (e^lse·out − Σ_a e^found_a·v_a + Σ_a e^kept_a·v_a) / (e^lse − Σ_a e^found_a + Σ_a e^kept_a),

    all shifted by one maximum. Differentiable in every input.

    Args:
        out: `(B, H, T, Dv)`, lse: `(B, H, T)` (-inf: the method saw no key).
        kept, found: `(B, H, T, A)`, -inf in unused slots; values: `(B, H, T, A, Dv)`.

    Returns:
        out `(B, H, T, Dv)`, zero where no pair is left, and lse `(B, H, T)`.
    """
    top = torch.maximum(lse, torch.maximum(kept.amax(-1), found.amax(-1)))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    method_mass = torch.exp(lse - top)
    net = torch.exp(kept - top[..., None]) - torch.exp(found - top[..., None])  # (B, H, T, A)
    total = method_mass + net.sum(-1)
    weighted = method_mass[..., None] * out + (net[..., None, :] @ values).squeeze(-2)
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
