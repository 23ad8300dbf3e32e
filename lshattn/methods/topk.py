"""TopK: the oracle selection, exact softmax over each query's highest-scoring keys.

Not an LSH method and not cheap: it computes every score to find the best ones. It is the
ceiling a sparse method's selection can reach at a given budget, shown beside every method in
the reports.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from lshattn.api import Inputs, SparseMethod
from lshattn.blocks import compute_dtype
from lshattn.cost import Cost
from lshattn.local import local_pairs
from lshattn.methods.dense import visible_keys

__all__ = ["TopK", "TopKAux", "attend_top_keys", "kept_counts", "ranking_scores", "selection_weights", "top_keys"]


class TopKAux(NamedTuple):
    """What ``TopK`` did.

    Attributes:
        selected: `(B, H, T, S)` bool, the keys each query kept (its top-k among those it may see,
            and those ``sinks`` and ``window`` cover).
        dot_products: scores computed, B·H·T·S: the oracle scores every pair to choose.
        selected_pairs: pairs kept (``selected.sum()``): the budget a sparse method matching
            this selection would spend.
    """

    selected: Tensor
    dot_products: int
    selected_pairs: int


@dataclasses.dataclass(frozen=True)
class TopK(SparseMethod):
    """Oracle top-k: exact softmax restricted to each query's ``fraction`` highest-scoring keys.

    A query that may see ``n`` keys (real ones, and only earlier ones when causal) keeps
    ``k = ceil(fraction · n)`` of them, the ones of largest ``q·k``; ties go to the earlier
    position, so the choice is deterministic and unchanged by padding. No selection of the same
    size holds more of the query's softmax mass, so this is the ceiling of what a sparse method
    keeping that share of the pairs can reach (the "oracle top-k" of the sparse-attention
    literature). It computes every score to choose: O(T·S) time and memory, like ``Dense``.

    ``tail=True`` adds the keys it did not keep, as one term: their exact total softmax weight
    times the mean of their values. What is left of the error is then only how far the tail's
    values are from their mean — the ceiling of a method that selects the top-k *and* estimates
    the rest (a tail estimator can at best know the tail's mass and mean value).

    ``fraction=1`` keeps every key: exact attention, with or without ``tail``.

    ``sinks`` and ``window`` (``lshattn.SparseMethod``): the keys they cover are always kept,
    and ``ceil(fraction · n)`` of the other n visible keys are chosen as above — the ceiling of
    a method that adds a selection to sinks and a window.
    """

    name: ClassVar[str] = "topk"
    fraction: float = 0.25
    tail: bool = False

    def _check_fields(self) -> None:
        """Ranges; ``Method.__post_init__`` has checked the types and calls this."""
        if not 0 < self.fraction <= 1:
            raise ValueError(f"TopK fraction must be in (0, 1], got {self.fraction}; 0.25 keeps a quarter of the keys")

    def _attend(self, inputs: Inputs) -> tuple[Tensor, TopKAux]:
        B, H, T, _ = inputs.q.shape
        S = inputs.k.shape[2]
        ranking = ranking_scores(inputs.q, inputs.k, inputs.scale)
        out, selected = attend_top_keys(inputs, ranking, self.fraction, self.sinks, self.window, tail=self.tail)
        return out, TopKAux(selected=selected, dot_products=B * H * T * S, selected_pairs=int(selected.sum()))

    def cost(self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4) -> Cost:
        """Every score, ``B·H·T·S`` dot products (``budget`` 1: the oracle chooses from all of
        them); flops ``2·B·H·T·S·(2·D + Dv)``: the scores twice (once in float64 to rank them,
        ``ranking_scores``) and the weighted sum over a dense weight matrix that is zero off the
        selection; memory the `(B, H, T, S)` scores."""
        dots = B * H * T * S
        return Cost(flops=2 * dots * (2 * D + Dv), dot_products=dots, memory_bytes=dots * itemsize, budget=1.0)


def attend_top_keys(
    inputs: Inputs, ranking: Tensor, fraction: float, sinks: int, window: int | None, *, tail: bool = False
) -> tuple[Tensor, Tensor]:
    """Exact softmax over each query's keys of highest ``ranking`` (``top_keys``: ``fraction`` of
    the visible keys besides those ``sinks`` and ``window`` cover, and those): the attention of
    ``TopK`` (ranked by the exact scores) and ``SketchTopK`` (by SimHash sketches).

    Args:
        inputs: the call's validated inputs.
        ranking: `(B, H, T, S)` what to rank the keys by (larger: kept first).

    Returns:
        `(B, H, T, Dv)` in q's dtype, and the `(B, H, T, S)` bool selection (covered keys included).
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    B, _, T, _ = q.shape
    S = k.shape[2]
    dtype = compute_dtype(q.dtype)
    visible = visible_keys(inputs.key_padding_mask, inputs.causal, B, T, S, q.device)
    if visible is None:  # no padding: every key, or the causal triangle
        visible = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device)
        if inputs.causal:
            visible = visible.tril()
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * inputs.scale
    pairs = local_pairs(inputs, sinks, window)
    if pairs is None:
        selected = top_keys(ranking, visible, fraction)
    else:
        hits = torch.zeros(B, T, S, dtype=torch.int32, device=q.device)  # rows in the slots' rank order
        hits.scatter_add_(2, pairs.key_positions, pairs.valid.int())
        covered = pairs.restore(hits[:, None]) > 0  # (B, 1, T, S)
        selected = top_keys(ranking, visible & ~covered, fraction) | covered
    weights = selection_weights(scores, selected, visible, tail=tail)
    if inputs.dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, inputs.dropout_p)
    out = weights @ v.to(dtype)
    if inputs.query_padding_mask is not None:
        out = out * inputs.query_padding_mask[:, None, :, None]
    return out.to(q.dtype), selected


def ranking_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """`(B, H, T, S)` float32 logits to rank keys by: computed in float64, then rounded to float32.

    A matrix product rounds a dot product differently by where its row falls in the product's
    tiles, so two identical keys (repeated tokens) get scores a last bit apart, in an order that
    changes with the batch's shape and padding; the oracle's choice between them would then
    follow the rounding. Rounding float64 scores to float32 makes such ties exact again, and the
    stable sort of ``top_keys`` gives them to the earlier position in every layout.
    """
    with torch.no_grad():
        return ((q.double() @ k.double().transpose(-1, -2)) * scale).float()


def kept_counts(count: Tensor, fraction: float) -> Tensor:
    """int64 ``ceil(fraction · count)`` of an integer tensor, the product rounded to 6 decimals
    first (so that 0.07 · 100 keeps 7 keys, not 8), in float64: in float32 the rounding itself
    moved products above 1,000 to the next integer (0.13 · 8,300 kept 1,080 keys). A decoding
    kernel reads it from a table of every count, so the two agree."""
    return torch.ceil(torch.round(count.double() * fraction, decimals=6)).long()


def top_keys(scores: Tensor, visible: Tensor, fraction: float) -> Tensor:
    """`(B, H, T, S)` bool: each query's ``ceil(fraction · n)`` highest-scoring visible keys.

    Args:
        scores: `(B, H, T, S)` logits.
        visible: `(B or 1, 1, T, S)` bool: the keys each query may see.

    Keys above a row's k-th largest score are kept, then as many of those equal to it as fit,
    earliest first: ties go to the earlier position. ``topk`` finds the k-th score, a partial
    sort (2–4× faster than sorting whole rows at S = 512); when every row keeps as many keys
    (no padding, not causal) it need not even order them.
    """
    if not bool(visible.all()):
        scores = scores.masked_fill(~visible, float("-inf"))
    keep = kept_counts(visible.sum(-1, keepdim=True), fraction)  # (B or 1, 1, T, 1)
    most = int(keep.max()) if keep.numel() else 0
    if most == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if int(keep.min()) == most:
        threshold = torch.topk(scores, most, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    else:
        top = torch.topk(scores, most, dim=-1, sorted=True).values  # (B, H, T, most), descending
        threshold = top.gather(-1, (keep - 1).clamp_min(0).expand(*top.shape[:-1], 1))
    candidates = (scores >= threshold) & visible
    if bool((candidates.sum(-1, keepdim=True) <= keep).all()):  # no row has more ties than room: keep them all
        return candidates
    above = scores > threshold
    tied = candidates & ~above
    room = keep - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))


def selection_weights(scores: Tensor, selected: Tensor, visible: Tensor, *, tail: bool) -> Tensor:
    """`(B, H, T, S)` attention weights: softmax over the selected keys, or with ``tail`` over
    every visible key, with the unselected keys' total weight spread evenly over them (their
    values then enter as their mean). Zero rows for queries with no visible key.

    Args:
        scores: `(B, H, T, S)` logits (their value where nothing is counted does not matter).
        selected, visible: bool, broadcastable to it.
    """
    counted = visible if tail else selected
    logits = scores.masked_fill(~counted, float("-inf"))
    empty = ~counted.any(-1, keepdim=True)
    if bool(empty.any()):
        # Softmax of a row of -inf is NaN, in the backward too even where the output is zeroed:
        # such a row is opened, then zeroed, as Dense does.
        weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1) * ~empty
    else:
        weights = torch.softmax(logits, dim=-1)
    if not tail:
        return weights
    rest = visible & ~selected
    rest_weight = (weights * rest).sum(-1, keepdim=True)
    spread = rest_weight / rest.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(rest, spread, weights * selected)
