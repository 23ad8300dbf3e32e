"""Test helpers and brute-force references, shared by the tests and the benchmark's verify step.

The references here are written to be read, not to be fast, and share no code with the methods
they check: each builds the dense `(B, H, T, S)` table of which query sees which key (and how
many times), in float64, and takes one masked softmax (or kernel sum) over it. They are
differentiable (the gradient tests compare against them) with finite gradients everywhere,
including rows with no visible key. Padded slots are inert: the references zero q at padded
queries and k, v at padded keys before computing, so NaN or inf held there never reaches an
output or a gradient. Memory is O(B·H·R·T·S): keep T, S to a few hundred.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "collisions_from_aux",
    "covered_pairs",
    "covered_by",
    "exact_derivative_reference",
    "simhash_brute_force",
    "simhash_reference",
    "yoso_brute_force",
    "yoso_expectation_reference",
    "yoso_lsh_reference",
    "make_qkv",
    "make_padding_mask",
    "dense_reference",
    "local_brute_force",
    "rounds_reference",
    "reformer_rounds",
    "smyrf_rounds",
    "topk_brute_force",
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


def _real(x: Tensor, mask: Tensor | None) -> Tensor:
    """x `(B, H, L, E)` in float64 with the slots ``mask`` `(B, L)` calls padded set to zero."""
    x = x.double()
    return x if mask is None else torch.where(mask[:, None, :, None], x, 0.0)


def _visible_pairs(B, T, S, key_padding_mask, causal, device="cpu"):
    """`(B, 1, T, S)` bool: the keys each query may see (real keys, and j <= i when causal)."""
    visible = torch.ones(B, 1, T, S, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(T, S, dtype=torch.bool, device=device).tril()
    return visible


def _zero_padded_queries(out: Tensor, query_padding_mask: Tensor | None) -> Tensor:
    return out if query_padding_mask is None else torch.where(query_padding_mask[:, None, :, None], out, 0.0)


def _weighted_softmax(logits: Tensor, weights: Tensor, v: Tensor) -> Tensor:
    """``Σ_j w_ij e^{l_ij} v_j / Σ_j w_ij e^{l_ij}``: softmax in which entry (i, j) counts w_ij times.

    Args:
        logits: `(B, H, T, S)` float64. weights: `(B, H, T, S)` (or broadcastable), >= 0; pairs
            with weight 0 are not entries (their logits are never read). v: `(B, H, S, Dv)`.

    Returns:
        `(B, H, T, Dv)`, zeros for a row with no entry. Gradients are finite everywhere: logits
        of non-entries are replaced before the exponential (no -inf - -inf, no exp overflow).
    """
    weights = weights.double()
    entry = weights > 0
    row_max = torch.where(entry, logits, float("-inf")).amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()  # softmax is shift-invariant
    shifted = torch.where(entry, logits - row_max, 0.0)  # <= 0 on entries
    e = weights * torch.exp(shifted)
    total = e.sum(-1, keepdim=True)
    return (e @ v) / torch.where(total > 0, total, 1.0)


def dense_reference(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
) -> Tensor:  # fmt: skip
    """Exact attention in float64 by explicit softmax; zeros where a query sees no key and at
    padded queries."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
    visible = _visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal, q.device)
    out = _weighted_softmax(q @ k.transpose(-1, -2) * scale, visible, v)
    return _zero_padded_queries(out, query_padding_mask)


def covered_pairs(
    B: int, T: int, S: int, *, sinks: int = 0, window: int | None = None, key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None, causal: bool = False, own_key: bool = True, device="cpu",
) -> Tensor:  # fmt: skip
    """`(B, 1, T, S)` bool: the pairs ``sinks`` and ``window`` cover, from their definition.

    Tokens are ranked among the real ones (keys by the key mask; queries by the query mask, or
    by the key mask when only keys are masked and T == S; a mask with every token real counts as
    none, as the API drops it). A real key is covered for query i
    when its rank is below ``sinks``, or, if query i is itself real under that ranking, within
    ``window`` of the query's rank (causal: at most ``window`` below it, not above); causal
    attention also hides keys after the query; ``own_key=False`` leaves out the query's own
    position.
    """
    key_real = torch.ones(B, S, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask
    # A mask with every token real is no mask (the API drops it): queries are then ranked by the keys'.
    query_ref = None if query_padding_mask is None or bool(query_padding_mask.all()) else query_padding_mask
    if query_ref is None:
        query_ref = key_padding_mask if T == S and key_padding_mask is not None else torch.ones(B, T, dtype=torch.bool)
    key_rank = key_real.long().cumsum(1) - key_real.long()  # real keys before each position
    query_rank = query_ref.long().cumsum(1) - query_ref.long()
    gap = key_rank[:, None, :] - query_rank[:, :, None]  # (B, T, S)
    covered = (key_rank < sinks)[:, None, :].expand(B, T, S)
    if window is not None:
        near = (gap <= 0) if causal else (gap <= window)
        covered = covered | (near & (gap >= -window) & query_ref[:, :, None])
    covered = covered & key_real[:, None, :]
    if causal:
        covered = covered & torch.ones(T, S, dtype=torch.bool, device=device).tril()
    if not own_key:
        covered = covered & ~torch.eye(T, S, dtype=torch.bool, device=device)
    return covered[:, None]


def covered_by(method, q: Tensor, k: Tensor, *, key_padding_mask=None, query_padding_mask=None, causal=False,
               **_) -> Tensor:  # fmt: skip
    """``covered_pairs`` for a method spec's ``sinks`` and ``window`` on these inputs (shared-QK
    Reformer never attends the own position)."""
    own_key = not getattr(method, "shared_qk", False)
    return covered_pairs(
        q.shape[0], q.shape[2], k.shape[2], sinks=getattr(method, "sinks", 0), window=getattr(method, "window", None),
        key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, causal=causal, own_key=own_key,
        device=q.device,
    )  # fmt: skip


def local_brute_force(method, q, k, v, aux=None, *, key_padding_mask=None, query_padding_mask=None, causal=False,
                      scale=None) -> Tensor:  # fmt: skip
    """``Local``: softmax over the pairs ``covered_pairs`` lists, densely in float64; with
    ``method.tail``, plus one entry for the other visible keys: their mean value at the logit
    ``log n + scale·q·(their mean key)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    covered = covered_by(method, q, k, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, causal=causal)
    q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
    logits = q @ k.transpose(-1, -2) * scale
    if not method.tail:
        return _zero_padded_queries(_weighted_softmax(logits, covered, v), query_padding_mask)
    rest = (_visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal, q.device) & ~covered).double()
    n = rest.sum(-1, keepdim=True)  # (B, 1, T, 1)
    mean_k, mean_v = (rest @ k) / n.clamp_min(1), (rest @ v) / n.clamp_min(1)
    tail_logit = torch.log(n.clamp_min(1)) + (q * mean_k).sum(-1, keepdim=True) * scale
    entries = torch.cat([torch.where(covered, logits, float("-inf")), torch.where(n > 0, tail_logit, float("-inf"))], -1)
    top = entries.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0).detach()
    weights = torch.exp(entries - top)
    total = weights.sum(-1, keepdim=True)
    out = (weights[..., :-1] @ v + weights[..., -1:] * mean_v) / torch.where(total > 0, total, 1.0)
    return _zero_padded_queries(out, query_padding_mask)


def reformer_rounds(method, aux) -> Tensor:
    """`(B, H, R, T, S)` bool: pairs inside one window of a round, from a ``ReformerAux``; with
    ``whole_buckets``, pairs sharing a bucket in a round."""
    if method.whole_buckets:
        return aux.buckets[..., :, None] == aux.key_buckets[..., None, :]
    diff = aux.key_chunks[..., None, :] - aux.query_chunks[..., :, None]
    return (diff >= -method.chunks_before) & (diff <= method.chunks_after)


def smyrf_rounds(aux) -> Tensor:
    """`(B, H, R, T, S)` bool: pairs sharing a cluster in a round, from a ``SMYRFAux``."""
    return aux.query_clusters[..., :, None] == aux.key_clusters[..., None, :]


def rounds_reference(
    q: Tensor, k: Tensor, v: Tensor, in_round: Tensor, *, key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None, causal: bool = False, self_pairs: str = "none",
    correct_duplicates: bool = False, scale: float | None = None, covered: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Multi-round sparse attention, as one softmax over a dense table of entry counts.

    Every (round, key) a query attends is one softmax entry, so a pair found in several rounds
    counts once per round (``correct_duplicates`` makes it count once). ``self_pairs`` follows
    ``lshattn.blocks.SelfPairs``: "exclude" never attends the own position unless nothing else
    is visible in any round (then the output is the own value, if that key is real), "column"
    attends it once per round on top of the round's pairs (if that key is real). Both need T == S.
    Padded queries, and queries with no entry, output zeros. ``covered`` `(B, 1, T, S)` (from
    ``covered_pairs``): pairs that count as found by every round, whatever the rounds did.

    Args:
        q `(B, H, T, D)`, k `(B, H, S, D)`, v `(B, H, S, Dv)`.
        in_round: `(B, H, R, T, S)` bool, the pairs each round puts together.

    Returns:
        `(B, H, T, Dv)` float64.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
    B, _, R, T, S = in_round.shape
    visible = _visible_pairs(B, T, S, key_padding_mask, causal, q.device)  # (B, 1, T, S)
    own = torch.eye(T, S, dtype=torch.bool, device=q.device)  # the query's own position
    if self_pairs != "none":
        visible = visible & ~own
    counts = (in_round & visible[:, :, None]).sum(2)  # (B, H, T, S): entries per pair over rounds
    if self_pairs == "column":
        own_real = own if key_padding_mask is None else own & key_padding_mask[:, None, None, :]
        counts = counts + R * own_real
    if covered is not None:
        counts = torch.where(covered, R, counts)
    weights = counts > 0 if correct_duplicates else counts
    out = _weighted_softmax(q @ k.transpose(-1, -2) * scale, weights, v)
    if self_pairs == "exclude":
        alone = (counts == 0).all(-1, keepdim=True)  # (B, H, T, 1)
        if key_padding_mask is not None:
            alone = alone & key_padding_mask[:, None, :, None]
        out = torch.where(alone, v, out)
    return _zero_padded_queries(out, query_padding_mask)


# --- TopK (the oracle) ------------------------------------------------------------------------------


def topk_brute_force(method, q, k, v, aux, *, key_padding_mask=None, query_padding_mask=None, causal=False,
                     scale=None) -> Tensor:  # fmt: skip
    """`(B, H, T, Dv)` float64: softmax over the pairs ``aux.selected`` says ``TopK`` kept; with
    ``method.tail``, plus the other visible keys as one entry: their exact total probability
    (of the softmax over every visible key) times the mean of their values."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
    visible = _visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal, q.device)
    selected = aux.selected & visible
    logits = q @ k.transpose(-1, -2) * scale
    if not getattr(method, "tail", False):  # SketchTopK has none
        return _zero_padded_queries(_weighted_softmax(logits, selected, v), query_padding_mask)
    rest = visible & ~selected
    eye = torch.eye(k.shape[2], dtype=torch.float64, device=q.device)
    probability = _weighted_softmax(logits, visible.expand_as(logits), eye)  # (B, H, T, S): row j of eye picks p_j
    rest_mass = (probability * rest).sum(-1, keepdim=True)
    rest_mean = (rest.double() @ v) / rest.sum(-1, keepdim=True).clamp_min(1)
    out = (probability * selected) @ v + rest_mass * rest_mean
    return _zero_padded_queries(out, query_padding_mask)


# --- SimHash (BERT-LSH) ---------------------------------------------------------------------------


def collisions_from_aux(aux, rule: str) -> Tensor:
    """`(B, H, T, S)` bool: pairs whose codes are equal in some table ("any") or all ("all")."""
    equal = aux.query_codes[..., :, None] == aux.key_codes[..., None, :]  # (B, H, R, T, S)
    return equal.any(2) if rule == "any" else equal.all(2)


def collision_probability(q: Tensor, k: Tensor, num_bits: int, num_hashes: int) -> Tensor:
    """`(B, H, T, S)`: the chance ``1 − (1 − (1 − θ/π)^num_bits)^num_hashes`` that some table of
    SimHash codes collides for each pair, θ their angle (a zero vector: θ = π/2), densely."""
    cosine = (_unit(q) @ _unit(k).transpose(-1, -2)).clamp(-1, 1)
    per_table = (1 - torch.acos(cosine) / math.pi) ** num_bits
    return -torch.expm1(num_hashes * torch.log1p(-per_table))  # 1 − (1 − p)^L, accurate for tiny p


def simhash_reference(
    q, k, v, collide, *, faithful: bool, key_padding_mask=None, query_padding_mask=None, causal=False, scale=None,
    covered=None, importance: tuple[int, int] | None = None,
):  # fmt: skip
    """The BERT-LSH attention, densely in float64.

    Every key query i may see is a softmax entry: colliding pairs (``collide`` `(B, H, T, S)`
    bool) with logit ``scale·q_i·k_j``, the others with logit 0 (faithful) or left out
    (sparse). A query with no entry, and a padded query, gets zeros. ``covered`` pairs
    (``covered_pairs``) count as colliding.

    ``importance=(num_bits, num_hashes)``: MagicPIG's estimator instead: the covered pairs
    count once, the other colliding ones ``1 / collision_probability`` times (of the detached
    inputs: no gradient through the weights), the rest not at all.
    """
    if importance is not None:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        covered = torch.zeros_like(collide) if covered is None else covered
        q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
        probability = collision_probability(q.detach(), k.detach(), *importance)
        visible = _visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal, q.device)
        sampled = torch.where(collide & visible, 1 / probability, 0.0)
        weights = torch.where(covered & visible, 1.0, sampled)
        out = _weighted_softmax(q @ k.transpose(-1, -2) * scale, weights, v)
        return _zero_padded_queries(out, query_padding_mask)
    if covered is not None:
        collide = collide | covered
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
    visible = _visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal, q.device)
    scores = q @ k.transpose(-1, -2) * scale
    if faithful:
        out = _weighted_softmax(torch.where(collide, scores, 0.0), visible, v)
    else:
        out = _weighted_softmax(scores, visible & collide, v)
    return _zero_padded_queries(out, query_padding_mask)


def simhash_brute_force(method, q, k, v, aux, **kw):
    """``Entry.brute_force`` for SimHash: the reference over the collisions ``aux`` reports."""
    importance = None
    if method.mode == "importance":  # rule "all" is one table of all the bits
        tables = method.num_hashes if method.rule == "any" else 1
        importance = (method.num_hashes * method.num_bits // tables, tables)
    return simhash_reference(
        q, k, v, collisions_from_aux(aux, method.rule), faithful=method.mode == "faithful",
        covered=covered_by(method, q, k, **kw), importance=importance, **kw,
    )  # fmt: skip


# --- YOSO -------------------------------------------------------------------------------------------


def _finish_yoso(y, normalize_output, query_padding_mask):
    if normalize_output:
        y = y / torch.clamp(y.norm(dim=-1, keepdim=True), min=1e-12)  # norm's gradient at 0 is 0
    return _zero_padded_queries(y, query_padding_mask)


def _unit(x: Tensor) -> Tensor:
    """Rows of x divided by their norm (zero rows stay zero, with finite gradients)."""
    return x / torch.clamp(x.norm(dim=-1, keepdim=True), min=1e-12)


def yoso_expectation_reference(
    q, k, v, *, num_bits, normalize_output=True, key_padding_mask=None, query_padding_mask=None, causal=False,
    scale=None, backward=None,
):  # fmt: skip
    """YOSO-E densely in float64:
    ``Y_i = Σ_{j visible} (1 − arccos(q̂_i·k̂_j)/π)^τ · v_j``, then L2-normalised.

    ``backward=None`` differentiates this formula; "approx" or "exact" keeps the value and gives
    q and k the paper's surrogate gradients instead, as ``YOSO(expectation=True, backward=...)``
    does: the kernel's derivative in q̂·k̂ replaced by (τ/2)·kernel ("approx") or taken exactly
    at q̂·k̂ clamped to ±0.99 ("exact"). ``scale`` is accepted and ignored (the kernel has none).
    """
    q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
    visible = _visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal, q.device)
    cosine = _unit(q) @ _unit(k).transpose(-1, -2)
    clamped = torch.clamp(torch.where(visible, cosine, 0.0), -1.0, 1.0)  # arccos never sees a hidden pair
    kernel = torch.where(visible, (1 - torch.acos(clamped) / math.pi) ** num_bits, 0.0)
    if backward is None:
        y = kernel @ v
    else:
        kernel = kernel.detach()
        if backward == "approx":
            slope = (num_bits / 2) * kernel
        else:
            slope = visible * exact_derivative_reference(cosine.detach(), num_bits)
        surrogate = (slope * cosine) @ v.detach()
        y = kernel @ v + (surrogate - surrogate.detach())
    return _finish_yoso(y, normalize_output, query_padding_mask)


def exact_derivative_reference(x, num_bits, clamp=0.99):
    """τ(1 − arccos(x)/π)^(τ−1) / (π√(1 − x²)) at x clamped to ±clamp."""
    x = torch.clamp(x, -clamp, clamp)
    return num_bits * (1 - torch.acos(x) / math.pi) ** (num_bits - 1) / (math.pi * torch.sqrt(1 - x * x))


def yoso_lsh_reference(
    q, k, v, query_codes, key_codes, *, num_bits, backward, normalize_output=True, key_padding_mask=None,
    query_padding_mask=None, causal=False, covered=None,
):  # fmt: skip
    """YOSO-m given its codes, densely in float64, with the paper's gradient rules.

    Forward: ``Y_i = (1/m) Σ_h Σ_{j visible} [c_h(q_i) = c_h(k_j)] · v_j``. Y does not depend on
    q and k given the codes; their gradients are those of the surrogate
    ``Σ_j φ(q̂_i·k̂_j) v_j`` (value 0 added to Y), with ``φ'`` = (τ/2)·(collision fraction)
    ("approx") or the exact kernel derivative on pairs colliding in some hash ("exact").
    ``covered`` pairs (``covered_pairs``) take YOSO-E's weight and slope instead: the exact
    kernel, and (τ/2)·kernel or the exact derivative.

    Args:
        query_codes: `(B, H, m, T)` integer codes. key_codes: `(B, H, m, S)`.
    """
    q, k, v = _real(q, query_padding_mask), _real(k, key_padding_mask), _real(v, key_padding_mask)
    m = query_codes.shape[2]
    visible = _visible_pairs(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal, q.device)
    if query_padding_mask is not None:
        visible = visible & query_padding_mask[:, None, :, None]
    hits = (query_codes[..., :, None] == key_codes[..., None, :]).sum(2) * visible  # (B, H, T, S)
    weight = hits.double() / m
    cosine = _unit(q) @ _unit(k).transpose(-1, -2)
    if backward == "approx":
        slope = (num_bits / 2) * weight
    else:
        slope = (hits > 0).double() * exact_derivative_reference(cosine.detach(), num_bits)
    if covered is not None:
        # The angle as 2·atan2(‖q̂ − k̂‖, ‖q̂ + k̂‖), accurate near 0 and π where arccos of a rounded
        # cosine is not (the method computes it so; a difference of rounding in the cosine would
        # otherwise move the kernel of identical vectors by ~1e-7 in float64).
        q_unit, k_unit = _unit(q).detach()[..., :, None, :], _unit(k).detach()[..., None, :, :]
        theta = 2 * torch.atan2((q_unit - k_unit).norm(dim=-1), (q_unit + k_unit).norm(dim=-1))
        kernel = (1 - theta / math.pi) ** num_bits
        exact_slope = (num_bits / 2) * kernel if backward == "approx" else exact_derivative_reference(cosine.detach(), num_bits)
        weight = torch.where(covered, kernel, weight)
        slope = torch.where(covered, exact_slope, slope)
    y = weight @ v
    surrogate = (slope * cosine) @ v.detach()
    y = y + (surrogate - surrogate.detach())
    return _finish_yoso(y, normalize_output, query_padding_mask)


def yoso_brute_force(method, q, k, v, aux, **kw):
    """``Entry.brute_force`` for YOSO: the dense reference over the codes ``aux`` reports."""
    kw.pop("scale", None)
    return yoso_lsh_reference(
        q, k, v, aux.query_codes, aux.key_codes, num_bits=method.num_bits, backward=method.backward,
        normalize_output=method.normalize_output, covered=covered_by(method, q, k, **kw), **kw,
    )  # fmt: skip
