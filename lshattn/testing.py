"""Test helpers and brute-force references, shared by the tests and the benchmark's verify step.

The references here are written to be read, not to be fast: explicit Python loops over every
query and key, float64, and no code shared with the methods they check. Keep their inputs small
(T, S of a few hundred at most).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "make_qkv",
    "make_padding_mask",
    "dense_reference",
    "rounds_reference",
    "reformer_rounds",
    "smyrf_rounds",
]


def make_qkv(
    B: int, H: int, T: int, S: int, D: int, Dv: int | None = None, *, seed: int = 0,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Random q `(B, H, T, D)`, k `(B, H, S, D)`, v `(B, H, S, Dv)` from a private generator."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, Dv or D, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))  # type: ignore[return-value]


def make_padding_mask(B: int, L: int, *, seed: int = 0, fully_padded: int | None = None) -> Tensor:
    """`(B, L)` bool right-padding mask with random real lengths in [1, L]; sequence
    ``fully_padded`` (if given) has no real token at all."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    if fully_padded is not None:
        mask[fully_padded] = False
    return mask


def dense_reference(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
) -> Tensor:  # fmt: skip
    """Exact attention in float64 by explicit softmax; zeros where a query sees no key."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    visible = torch.ones(B, 1, T, S, dtype=torch.bool)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(T, S, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = probs @ v
    if query_padding_mask is not None:
        out = out * query_padding_mask[:, None, :, None]
    return out


def reformer_rounds(aux, chunks_before: int, chunks_after: int) -> Tensor:
    """`(B, H, R, T, S)` bool: pairs inside one window of a round, from a ``ReformerAux``."""
    diff = aux.key_chunks[..., None, :] - aux.query_chunks[..., :, None]
    return (diff >= -chunks_before) & (diff <= chunks_after)


def smyrf_rounds(aux) -> Tensor:
    """`(B, H, R, T, S)` bool: pairs sharing a cluster in a round, from a ``SMYRFAux``."""
    return aux.query_clusters[..., :, None] == aux.key_clusters[..., None, :]


def rounds_reference(
    q: Tensor, k: Tensor, v: Tensor, in_round: Tensor, *, key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None, causal: bool = False, self_pairs: str = "none",
    correct_duplicates: bool = False, scale: float | None = None,
) -> Tensor:  # fmt: skip
    """Multi-round sparse attention by a naive loop over queries, rounds and keys.

    Every (round, key) a query attends is one softmax entry, so a pair found in several rounds
    counts once per round (``correct_duplicates`` makes it count once). ``self_pairs`` follows
    ``lshattn.blocks.SelfPairs``: "exclude" never attends the own position unless nothing else
    is visible, "column" attends it once per round on top of the round's pairs.

    Args:
        q `(B, H, T, D)`, k `(B, H, S, D)`, v `(B, H, S, Dv)`.
        in_round: `(B, H, R, T, S)` bool, the pairs each round puts together.

    Returns:
        `(B, H, T, Dv)` float64.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    B, H, R, T, S = in_round.shape
    key_ok = torch.ones(B, S, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    query_ok = torch.ones(B, T, dtype=torch.bool) if query_padding_mask is None else query_padding_mask
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                if not query_ok[b, i]:
                    continue
                entries: list[int] = []  # one key index per softmax entry
                for r in range(R):
                    for j in range(S):
                        visible = bool(in_round[b, h, r, i, j]) and bool(key_ok[b, j])
                        visible = visible and (not causal or j <= i)
                        visible = visible and (self_pairs == "none" or j != i)
                        if visible:
                            entries.append(j)
                    if self_pairs == "column" and key_ok[b, i]:
                        entries.append(i)
                if not entries:
                    if self_pairs == "exclude" and key_ok[b, i]:
                        out[b, h, i] = v[b, h, i]
                    continue
                logits = torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in entries])
                if correct_duplicates:
                    logits = logits - torch.tensor([math.log(entries.count(j)) for j in entries], dtype=torch.float64)
                weights = torch.softmax(logits, 0)
                out[b, h, i] = sum(w * v[b, h, j] for w, j in zip(weights, entries))
    return out
