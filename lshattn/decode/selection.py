"""The oracle's (``TopK``) and the locality baseline's (``Local``) decoding step: no store, the
same selection as their causal prefill."""

from __future__ import annotations

import torch
from torch import Tensor

from lshattn.blocks import compute_dtype
from lshattn.decode.common import covered_keys, softmax_over
from lshattn.methods import Local, TopK
from lshattn.methods.topk import ranking_scores, selection_weights, top_keys

__all__ = ["selection_step"]


def selection_step(method: TopK | Local, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> tuple:
    """The oracle's and the locality baseline's step, as their causal prefill: ``TopK`` scores
    every visible key (it is the ceiling, O(S) a query like exact attention) and keeps the
    covered keys and the top ``fraction`` of the others; ``Local`` attends the covered keys
    (``tail``: and the others as one mean-field entry, from their sums, O(S·D) a query)."""
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = H // H_kv
    dtype = compute_dtype(q.dtype)
    covered = covered_keys(visible, method.sinks, method.window).expand(B, H, T, S)
    if isinstance(method, Local) and not method.tail:
        out, scored = softmax_over(covered.long(), q, k, v, scale)
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
