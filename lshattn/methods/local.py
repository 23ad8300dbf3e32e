"""Local: exact attention over sinks and a local window only, no hashing (the locality baseline)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from lshattn.api import Inputs, SparseMethod
from lshattn.blocks import compute_dtype, finish_output
from lshattn.cost import Cost
from lshattn.local import LocalPairs, local_cost, local_pairs, local_scores, merge_local

__all__ = ["Local", "LocalAux"]


class LocalAux(NamedTuple):
    """What ``Local`` did.

    Attributes:
        dot_products: scores computed, ``B·H·T·A`` (every slot, used or not; ``lshattn.local``).
    """

    dot_products: int


@dataclasses.dataclass(frozen=True)
class Local(SparseMethod):
    """Softmax over the first ``sinks`` real keys and the real keys within ``window`` of each
    query, and nothing else: the sinks-and-sliding-window pattern of StreamingLLM and Longformer,
    without hashing. Not from the four papers; it is the baseline that tells what an LSH method
    adds to locality: every LSH method can take the same ``sinks`` and ``window`` on top of its
    own selection, and should beat this at the same budget.

    ``sinks`` and ``window`` are those of every method (``lshattn.SparseMethod``); the defaults
    here are 4 sinks and a window of 64, as MagicPIG's long-context runs. A window covering the
    whole sequence is exact attention. O(B·H·T·A·D) time, A = sinks + 2·window + 1 slots.

    ``tail=True`` adds the keys a query may see but does not cover as one more softmax entry, a
    *mean-field* estimate: their mean value, at the logit ``log n + scale·q·k̄`` of n keys all
    equal to their mean key k̄ (a lower bound on their mass, by Jensen). Their sums are the
    sequence's (or, causal, its prefix's) minus the covered keys': one more dot product per
    query. Biased, but cheap and never worse in the demo's measurements than leaving them out
    (docs/fidelity-ideas.md); an unbiased uniform sample of them was far worse.
    """

    name: ClassVar[str] = "local"
    supports_dropout: ClassVar[bool] = False
    tail: bool = False
    sinks: int = dataclasses.field(default=4, kw_only=True)
    window: int | None = dataclasses.field(default=64, kw_only=True)

    def _check_fields(self) -> None:
        """``SparseMethod`` checked sinks and window; one of them must attend something."""
        if self.sinks == 0 and self.window is None:
            raise ValueError("Local with sinks=0 and window=None attends no key; give sinks >= 1 or a window >= 0")

    def _check_inputs(self, inputs: Inputs) -> None:
        if inputs.dropout_p > 0:
            raise ValueError(
                f"Local does not implement attention dropout, got dropout_p={inputs.dropout_p}; pass dropout_p=0"
            )

    def _attend(self, inputs: Inputs) -> tuple[Tensor, LocalAux]:
        q, k, v = inputs.q, inputs.k, inputs.v
        B, H, T, _ = q.shape
        dtype = compute_dtype(q.dtype)
        pairs = local_pairs(inputs, self.sinks, self.window)
        q_ranked, k_ranked, v_ranked = pairs.queries(q.to(dtype)), pairs.keys(k.to(dtype)), pairs.keys(v.to(dtype))
        scores = local_scores(q_ranked, k_ranked, pairs, inputs.scale)
        if self.tail:  # the other visible keys, as one entry
            out, lse = _mean_field_tail(inputs, pairs, q_ranked, k_ranked, v_ranked)
        else:  # nothing but the covered pairs
            out = torch.zeros(B, H, T, v.shape[-1], dtype=dtype, device=q.device)
            lse = torch.full(scores.shape[:3], float("-inf"), dtype=dtype, device=q.device)
        out, _ = merge_local(out, lse, scores, torch.full_like(scores, float("-inf")), v_ranked, pairs)
        out = finish_output(pairs.restore(out), T, inputs.query_padding_mask, q.dtype)
        return out, LocalAux(B * H * T * (pairs.slots + self.tail))

    def cost(self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4) -> Cost:
        """The slots' cost (``lshattn.local.local_cost``): ``B·H·T·A`` scores, ``2·B·H·T·A·(D + Dv)``
        flops, the `(B, H, T, A)` scores in memory. ``tail`` adds one score per query and the
        covered keys' and values' sums, ``B·H·T`` dot products and ``2·B·H·T·(A + 1)·(D + Dv)`` flops."""
        cost = local_cost(B, H, T, S, D, Dv, self.sinks, self.window, causal=causal)
        cost = cost._replace(memory_bytes=cost.memory_bytes * itemsize)
        if not self.tail:
            return cost
        slots = cost.dot_products // (B * H * T)
        dots = cost.dot_products + B * H * T
        return cost._replace(
            dot_products=dots, flops=cost.flops + 2 * B * H * T * (slots + 1) * (D + Dv), budget=dots / (B * H * T * S)
        )


def _mean_field_tail(inputs: Inputs, pairs: LocalPairs, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The visible keys no slot covers, as one softmax entry: their mean value `(B, H, T, Dv)` and
    its logit ``log n + scale·q·k̄`` `(B, H, T)` (-inf where n = 0), in rank order.

    Args:
        q: `(B, H, T, D)`, k: `(B, H, S, D)`, v: `(B, H, S, Dv)` in rank order (padded keys zero).
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    key_mask = inputs.key_padding_mask
    real = torch.ones(B, S, dtype=q.dtype, device=q.device) if key_mask is None else key_mask.to(q.dtype)
    k_positions, v_positions = inputs.k.to(q.dtype), inputs.v.to(q.dtype)  # position order, padded keys zero
    if inputs.causal:  # query at position t sees the keys at positions <= t (T == S)
        seen_k, seen_v, seen = (x.cumsum(2) for x in (k_positions, v_positions, real[:, None, :, None]))
        seen_k, seen_v, seen = pairs.queries(seen_k), pairs.queries(seen_v), pairs.queries(seen)[..., 0]
    else:
        seen_k, seen_v = k_positions.sum(2, keepdim=True), v_positions.sum(2, keepdim=True)
        seen = real.sum(1).view(B, 1, 1)
    covered = pairs.valid[:, None].to(q.dtype).expand(B, H, T, pairs.slots)
    rest = seen - covered.sum(-1)  # (B, H or 1, T)
    count = rest.clamp_min(1)[..., None]
    mean_k = (seen_k - pairs.weighted_sum(covered, k)) / count
    mean_v = (seen_v - pairs.weighted_sum(covered, v)) / count
    logit = torch.log(rest.clamp_min(1)) + (q * mean_k).sum(-1) * inputs.scale
    return mean_v, torch.where(rest > 0.5, logit, float("-inf"))
