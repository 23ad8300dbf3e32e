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
    "collisions_from_aux",
    "exact_derivative_reference",
    "simhash_brute_force",
    "simhash_reference",
    "yoso_brute_force",
    "yoso_expectation_reference",
    "yoso_lsh_reference",
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
    visible = _visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal)
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


# --- SimHash (BERT-LSH) ---------------------------------------------------------------------------


def collisions_from_aux(aux, rule: str) -> Tensor:
    """`(B, H, T, S)` bool: pairs whose codes are equal in some table ("any") or all ("all")."""
    equal = aux.query_codes[..., :, None] == aux.key_codes[..., None, :]  # (B, H, R, T, S)
    return equal.any(2) if rule == "any" else equal.all(2)


def simhash_reference(
    q, k, v, collide, *, faithful: bool, key_padding_mask=None, query_padding_mask=None, causal=False, scale=None
):
    """The BERT-LSH attention by a naive loop over queries, in float64.

    Every key query i may see is a softmax entry: colliding pairs with logit ``scale·q_i·k_j``,
    the others with logit 0 (faithful) or left out (sparse). A query with no entry gets zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                if query_padding_mask is not None and not query_padding_mask[b, i]:
                    continue
                logits, keys = [], []
                for j in range(S):
                    if key_padding_mask is not None and not key_padding_mask[b, j]:
                        continue
                    if causal and j > i:
                        continue
                    if collide[b, h, i, j]:
                        logits.append(q[b, h, i] @ k[b, h, j] * scale)
                    elif faithful:
                        logits.append(q.new_zeros(()))
                    else:
                        continue
                    keys.append(j)
                if keys:
                    weights = torch.softmax(torch.stack(logits), 0)
                    out[b, h, i] = weights @ v[b, h, keys]
    return out + 0 * (q.sum() + k.sum() + v.sum())  # in the graph even when no pair collides


def simhash_brute_force(method, q, k, v, aux, **kw):
    """``Entry.brute_force`` for SimHash: the reference over the collisions ``aux`` reports."""
    return simhash_reference(q, k, v, collisions_from_aux(aux, method.rule), faithful=method.mode == "faithful", **kw)


# --- YOSO -------------------------------------------------------------------------------------------


def _visible_pairs(B, T, S, key_padding_mask, causal):
    """`(B, 1, T, S)` bool: the keys each query may see."""
    visible = torch.ones(B, 1, T, S, dtype=torch.bool)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(T, S, dtype=torch.bool).tril()
    return visible


def _finish_yoso(y, normalize_output, query_padding_mask):
    if normalize_output:
        y = y / torch.clamp(y.norm(dim=-1, keepdim=True), min=1e-12)  # norm's gradient at 0 is 0
    if query_padding_mask is not None:
        y = y * query_padding_mask[:, None, :, None]
    return y


def yoso_expectation_reference(
    q, k, v, *, num_bits, normalize_output=True, key_padding_mask=None, query_padding_mask=None, causal=False,
    scale=None,
):  # fmt: skip
    """YOSO-E by a naive loop over queries and keys, in float64:
    ``Y_i = Σ_{j visible} (1 − arccos(q̂_i·k̂_j)/π)^τ · v_j``, then L2-normalised."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    visible = _visible_pairs(B, T, S, key_padding_mask, causal)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                qi = q[b, h, i] / torch.clamp(q[b, h, i].norm(), min=1e-12)
                for j in range(S):
                    if visible[b, 0, i, j]:
                        kj = k[b, h, j] / torch.clamp(k[b, h, j].norm(), min=1e-12)
                        cosine = torch.clamp(qi @ kj, -1.0, 1.0)
                        out[b, h, i] += (1 - torch.acos(cosine) / math.pi) ** num_bits * v[b, h, j]
    return _finish_yoso(out, normalize_output, query_padding_mask)


def exact_derivative_reference(x, num_bits, clamp=0.99):
    """τ(1 − arccos(x)/π)^(τ−1) / (π√(1 − x²)) at x clamped to ±clamp."""
    x = torch.clamp(x, -clamp, clamp)
    return num_bits * (1 - torch.acos(x) / math.pi) ** (num_bits - 1) / (math.pi * torch.sqrt(1 - x * x))


def yoso_lsh_reference(
    q, k, v, query_codes, key_codes, *, num_bits, backward, normalize_output=True, key_padding_mask=None,
    query_padding_mask=None, causal=False,
):  # fmt: skip
    """YOSO-m given its codes, densely in float64, with the paper's gradient rules.

    Forward: ``Y_i = (1/m) Σ_h Σ_{j visible} [c_h(q_i) = c_h(k_j)] · v_j``. Y does not depend on
    q and k given the codes; their gradients are those of the surrogate
    ``Σ_j φ(q̂_i·k̂_j) v_j`` (value 0 added to Y), with ``φ'`` = (τ/2)·(collision fraction)
    ("approx") or the exact kernel derivative on pairs colliding in some hash ("exact").
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    m = query_codes.shape[2]
    visible = _visible_pairs(B, T, S, key_padding_mask, causal)
    if query_padding_mask is not None:
        visible = visible & query_padding_mask[:, None, :, None]
    hits = (query_codes[..., :, None] == key_codes[..., None, :]).sum(2) * visible  # (B, H, T, S)
    y = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64) + 0 * v.sum()
    for h_ in range(m):  # per hash: the values in the query's bucket
        same = (query_codes[:, :, h_, :, None] == key_codes[:, :, h_, None, :]) & visible
        y = y + same.double() @ v / m
    q_hat = q / torch.clamp(q.norm(dim=-1, keepdim=True), min=1e-12)
    k_hat = k / torch.clamp(k.norm(dim=-1, keepdim=True), min=1e-12)
    cosine = q_hat @ k_hat.transpose(-1, -2)
    if backward == "approx":
        slope = (num_bits / 2) * hits.double() / m
    else:
        slope = (hits > 0).double() * exact_derivative_reference(cosine.detach(), num_bits)
    surrogate = (slope * cosine) @ v.detach()
    y = y + (surrogate - surrogate.detach())
    return _finish_yoso(y, normalize_output, query_padding_mask)


def yoso_brute_force(method, q, k, v, aux, **kw):
    """``Entry.brute_force`` for YOSO: the dense reference over the codes ``aux`` reports."""
    kw.pop("scale", None)
    return yoso_lsh_reference(
        q, k, v, aux.query_codes, aux.key_codes, num_bits=method.num_bits, backward=method.backward,
        normalize_output=method.normalize_output, **kw,
    )  # fmt: skip
