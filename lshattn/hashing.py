"""Hash families and the sort helpers built on them.

Hashing is kept apart from attending: every function here is a pure function of its inputs and
of explicit projections, which come from ``draw_normal`` and so from a caller's generator. The
attention given the resulting codes or orders is deterministic, which is what makes the exact
brute-force tests possible.

Shape legend: B batch, H heads, L sequence length, D head dim, R hash rounds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "draw_normal",
    "angular_factors",
    "angular_buckets",
    "xbox_plus",
    "e2lsh_projection",
    "sort_order",
    "inverse_order",
    "gather_rows",
]

# Largest bucket count hashed by one argmax. Above it the buckets are factorised into several
# independent angular hashes whose ids are combined (as HF Reformer does): argmax over
# num_buckets/2 rotations costs O(L·D·num_buckets), which at num_buckets ∝ L is O(L²) and
# dominated the run time at 32k tokens; factors of at most 64 keep it O(L·D·log num_buckets).
MAX_BUCKETS_PER_FACTOR = 64


def draw_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal float32 tensor drawn from ``generator`` (None: the global RNG of ``device``).

    Drawing on the generator's own device and moving the result makes the projections depend on
    the generator state alone, not on where the inputs live.
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def angular_factors(num_buckets: int) -> tuple[int, ...]:
    """Split ``num_buckets`` into factors of at most ``MAX_BUCKETS_PER_FACTOR`` buckets each.

    ``num_buckets`` must be even, and a power of two when it exceeds the factor limit.
    """
    if num_buckets <= MAX_BUCKETS_PER_FACTOR:
        return (num_buckets,)
    bits, factor_bits = int(math.log2(num_buckets)), int(math.log2(MAX_BUCKETS_PER_FACTOR))
    factors = [MAX_BUCKETS_PER_FACTOR] * (bits // factor_bits)
    if bits % factor_bits:
        factors.append(2 ** (bits % factor_bits))
    return tuple(factors)


def angular_buckets(x: Tensor, rotations: Tensor, factors: tuple[int, ...]) -> Tensor:
    """Angular LSH (Andoni et al. 2015, as used by Reformer): bucket = argmax([xR, -xR]).

    With several factors, each factor f hashes with its own f/2 rotations and the bucket id is
    the mixed-radix number of the per-factor argmaxes, so ``prod(factors)`` buckets cost only
    ``sum(factors)/2`` rotations per round.

    Args:
        x: `(B, H, L, D)`.
        rotations: `(H, D, R, sum(factors) // 2)`.
        factors: bucket counts of the factors, each even.

    Returns:
        `(B, H, R, L)` int64 buckets in ``[0, prod(factors))``.
    """
    rotated = torch.einsum("bhld,hdrf->bhrlf", x, rotations.to(x.dtype))
    buckets = torch.zeros(rotated.shape[:-1], dtype=torch.long, device=x.device)
    radix, start = 1, 0
    for factor in factors:  # a handful of factors, never a loop over buckets or tokens
        part = rotated[..., start : start + factor // 2]
        # argmax over [part, -part] without building it: the largest entry or the most negative.
        high, low = part.max(dim=-1), part.min(dim=-1)
        best = torch.where(high.values >= -low.values, high.indices, low.indices + factor // 2)
        buckets += radix * best
        radix, start = radix * factor, start + factor // 2
    return buckets


def xbox_plus(q: Tensor, k: Tensor, q_valid: Tensor, k_valid: Tensor) -> tuple[Tensor, Tensor]:
    """XBOX+ asymmetric transform (SMYRF): maximum inner product becomes nearest neighbour.

    With ``M² = max‖q‖² + max‖k‖²`` over the *real* tokens of each (batch, head),
    ``Q(q) = [q, 0, √(M² − ‖q‖²)]`` and ``K(k) = [k, √(M² − ‖k‖²), 0]``. Every transformed vector
    has norm M, and ``‖Q(q) − K(k)‖² = 2M² − 2 q·k``. Padding is excluded from the maxima so it
    cannot change the real tokens' transform (its own extra coordinate is clamped at 0).

    Args:
        q: `(B, H, T, D)`. k: `(B, H, S, D)`.
        q_valid: `(B, T)` bool. k_valid: `(B, S)` bool.

    Returns:
        `(B, H, T, D + 2)` and `(B, H, S, D + 2)`.
    """
    q_sq, k_sq = q.pow(2).sum(-1), k.pow(2).sum(-1)
    zero = q_sq.new_zeros(())
    max_q = torch.where(q_valid[:, None], q_sq, zero).amax(-1, keepdim=True)
    max_k = torch.where(k_valid[:, None], k_sq, zero).amax(-1, keepdim=True)
    total = max_q + max_k
    q_extra = (total - q_sq).clamp_min(0).sqrt()
    k_extra = (total - k_sq).clamp_min(0).sqrt()
    q_aug = torch.cat([q, torch.zeros_like(q_extra)[..., None], q_extra[..., None]], dim=-1)
    k_aug = torch.cat([k, k_extra[..., None], torch.zeros_like(k_extra)[..., None]], dim=-1)
    return q_aug, k_aug


def e2lsh_projection(x: Tensor, directions: Tensor) -> Tensor:
    """One Gaussian projection per round, the unquantised E2LSH hash SMYRF sorts by.

    The E2LSH offset β and width r of the reference code shift and scale every token alike, so
    they cannot change a sort and are left out.

    Args:
        x: `(B, H, L, E)`.
        directions: `(H, R, E)`.

    Returns:
        `(B, H, R, L)`.
    """
    return torch.einsum("bhle,hre->bhrl", x, directions.to(x.dtype))


def sort_order(sort_key: Tensor, valid: Tensor) -> Tensor:
    """Permutation sorting each row by ``sort_key``; invalid tokens last; ties by position.

    Args:
        sort_key: `(B, H, R, L)` float or integer (integers must be below 2**24).
        valid: `(B, L)` bool; False sorts last.

    Returns:
        `(B, H, R, L)` int64: ``order[..., p]`` is the token at sorted position p.
    """
    key = sort_key.float().masked_fill(~valid[:, None, None, :], float("inf"))
    return torch.sort(key, dim=-1, stable=True).indices


def inverse_order(order: Tensor) -> Tensor:
    """Inverse permutation along the last dim: ``inverse[order[p]] = p``."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def gather_rows(x: Tensor, order: Tensor) -> Tensor:
    """Rows of ``x`` in the order of each round: ``out[b, h, r, p] = x[b, h, order[b, h, r, p]]``.

    One flat ``index_select`` instead of ``gather`` with an index expanded over the feature
    dim, which would cost an int64 per element.

    Args:
        x: `(B, H, L, E)`, or `(B, H, R, L, E)` with a round dim of its own.
        order: `(B, H, R, L')` int64 indices into L.

    Returns:
        `(B, H, R, L', E)`.
    """
    B, H, R, L_out = order.shape
    L, E = x.shape[-2], x.shape[-1]
    if x.dim() == 4:
        rows = torch.arange(B * H, device=x.device).view(B, H, 1, 1) * L
    else:
        rows = torch.arange(B * H * R, device=x.device).view(B, H, R, 1) * L
    flat = x.reshape(-1, E).index_select(0, (order + rows).reshape(-1))
    return flat.view(B, H, R, L_out, E)
