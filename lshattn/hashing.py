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

from lshattn import kernels

__all__ = [
    "draw_normal",
    "draw_per_group",
    "hashed_once_a_group",
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


def draw_per_group(
    shape: tuple[int, ...], groups: int, generator: torch.Generator | None, device: torch.device, head_dim: int = 0
) -> Tensor:
    """``draw_normal`` of ``shape`` whose ``head_dim`` (H heads) holds H / ``groups`` draws, each
    repeated for ``groups`` consecutive heads: under grouped-query attention the query heads of a
    key head share its projections, so its keys are hashed once (``Inputs.kv_groups``). With
    ``groups=1``, exactly ``draw_normal(shape)``."""
    if groups == 1:
        return draw_normal(shape, generator, device)
    drawn = list(shape)
    drawn[head_dim] //= groups
    return draw_normal(tuple(drawn), generator, device).repeat_interleave(groups, head_dim)


def hashed_once_a_group(hash_keys, keys: Tensor, planes: Tensor, groups: int) -> Tensor:
    """``hash_keys(keys, planes)`` for `(B, H, S, D)` keys repeated for ``groups`` consecutive
    heads (grouped-query inputs, ``Inputs.kv_groups``) and projections drawn a group
    (``draw_per_group``): hashed on the first head of each group, the result (heads in dim 1)
    repeated. The same values for 1/``groups`` of the work."""
    if groups == 1:
        return hash_keys(keys, planes)
    return hash_keys(keys[:, ::groups], planes[::groups]).repeat_interleave(groups, dim=1)


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

    Each projection is a product and a sum over the token's own row, not a matrix product: a
    GEMM rounds a row differently by where it falls in its tiles (its position, the batch's
    shape), so identical tokens, which tie exactly, would be ordered by rounding rather than by
    position, and a sequence's clusters would depend on the rest of the batch. The temporary,
    `(B, H, L, R, E)`, is the size of the tokens gathered for R rounds.

    Args:
        x: `(B, H, L, E)`.
        directions: `(H, R, E)`.

    Returns:
        `(B, H, R, L)`.
    """
    products = x[:, :, :, None, :] * directions.to(x.dtype)[None, :, None]  # (B, H, L, R, E)
    return products.sum(-1).transpose(-1, -2)


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


# --- SimHash codes (SimHash/BERT-LSH and YOSO) --------------------------------------------------

__all__ += ["MAX_SIMHASH_BITS", "packing_flops", "simhash_codes", "simhash_flops"]

# Codes are int64; 62 bits leave room above every code for the sentinels methods give padding.
MAX_SIMHASH_BITS = 62

# Bits packed per float32 word: sums of ±2^k below 2^24 are exact.
_BITS_PER_WORD = 24

# Projections computed at once (float32 elements): one chunk of tokens stays in cache while its
# sign bits are packed.
_PROJECTION_ELEMENTS = 1 << 19


def simhash_codes(x: Tensor, planes: Tensor, *, tables_last: bool = False, dtype: torch.dtype = torch.long) -> Tensor:
    """SimHash (Charikar 2002): per table, the sign bits of ``num_bits`` Gaussian projections.

    Bit k of table r is 1 when ``x · planes[h, :, r, k] > 0`` (computed in float32; an exact
    +0 counts as positive, -0 as negative) and the code is ``Σ_k bit_k · 2^k``. Two vectors at
    angle θ agree on one bit with probability 1 − θ/π, so their codes in a table are equal with
    probability (1 − θ/π)^num_bits, whatever their norms. The projections are float32 whatever
    the dtype of ``x``, so a float64 or half input hashes exactly like its float32 copy.

    On the CPU the native kernel projects and packs (``lshattn.kernels.project_signs``), each
    projection summed in the same order whatever else is hashed: a token hashed alone (a
    decoding step) gets its codes in a whole prompt bit for bit. Elsewhere the projections are
    matrix products over cache-sized chunks of tokens, packed in torch operations (``_pack_signs``).

    Args:
        x: `(B, H, L, D)`.
        planes: `(H, D, R, num_bits)`, standard normal; ``num_bits`` at most ``MAX_SIMHASH_BITS``
            (0 gives code 0 to every token).
        tables_last: return `(B, H, L, R)` instead (cheaper when R is large).
        dtype: ``torch.long``, or ``torch.int32`` (half the memory) when num_bits <= 31.

    Returns:
        `(B, H, R, L)` codes in ``[0, 2^num_bits)``.
    """
    B, H, L, D = x.shape
    R, num_bits = planes.shape[2], planes.shape[3]
    if num_bits > MAX_SIMHASH_BITS:
        raise ValueError(f"simhash_codes packs at most {MAX_SIMHASH_BITS} bits into an int64, got {num_bits}")
    if dtype not in (torch.long, torch.int32) or (dtype == torch.int32 and num_bits > 31):
        raise ValueError(f"simhash_codes returns int64, or int32 for at most 31 bits; got {dtype} for {num_bits} bits")
    if num_bits == 0:
        codes = torch.zeros(B, H, R, L, dtype=dtype, device=x.device)
        return codes.transpose(2, 3) if tables_last else codes
    codes = torch.empty(B * H, L, R, dtype=dtype, device=x.device)
    if x.device.type == "cpu" and kernels.available():
        kernels.project_signs(x.reshape(B * H, L, D).float(), planes, codes)
    else:
        _pack_signs(_projection_chunks(x, planes), codes, num_bits)
    codes = codes.view(B, H, L, R)
    return codes if tables_last else codes.transpose(2, 3).contiguous()


def _projection_chunks(x: Tensor, planes: Tensor):
    """Yield ``(lo, proj)``: the `(B·H, n, R·num_bits)` float32 projections of positions
    ``lo .. lo + n``, in chunks of at most ``_PROJECTION_ELEMENTS`` (one buffer, reused)."""
    B, H, L, D = x.shape
    K = planes.shape[2] * planes.shape[3]
    flat = x.reshape(B * H, L, D).float()
    weights = planes.to(device=x.device, dtype=torch.float32).reshape(1, H, D, K).expand(B, H, D, K)
    weights = weights.reshape(B * H, D, K)
    chunk = min(L, max(1, _PROJECTION_ELEMENTS // (B * H * K)))
    buffer = torch.empty(B * H * chunk * K, device=x.device)
    for lo in range(0, L, chunk):  # fixed-size chunks of tokens, never one token at a time
        n = min(chunk, L - lo)
        proj = buffer[: B * H * n * K].view(B * H, n, K)
        yield lo, torch.bmm(flat[:, lo : lo + n], weights, out=proj)


def _pack_signs(chunks, codes: Tensor, num_bits: int) -> None:
    """The sign bits of each chunk of projections into ``codes`` `(N, L, R)`, in torch operations
    (where the native kernel does not run): ``copysign(1, x·w)`` is ±1, and one small matrix
    product sums ``±2^k`` per table (``2·code − 2^num_bits + 1``), 24 bits per float32 word."""
    N, L, R = codes.shape
    device = codes.device
    words = [(start, min(num_bits, start + _BITS_PER_WORD)) for start in range(0, num_bits, _BITS_PER_WORD)]
    W = len(words)
    G = _tables_per_pack(R)
    pack = torch.zeros(G, num_bits, G, W, device=device)  # ±1 bits of G tables -> Σ ±2^k per (table, word)
    for w, (start, stop) in enumerate(words):
        pack[:, start:stop, :, w] = torch.eye(G, device=device)[:, None, :] * (
            2.0 ** torch.arange(stop - start, device=device)
        ).view(1, -1, 1)
    pack = pack.view(1, G * num_bits, G * W).expand(N, G * num_bits, G * W)
    widths = torch.tensor([stop - start for start, stop in words], device=device).repeat(R)
    shifts = torch.tensor([start for start, _ in words], device=device)
    one = torch.ones((), device=device)
    for lo, proj in chunks:
        n = proj.shape[1]
        torch.copysign(one, proj, out=proj)
        sums = torch.bmm(proj.view(N, n * R // G, G * num_bits), pack).view(N, n, R, W)
        sums = sums.add_(2.0**widths.view(R, W) - 1).mul_(0.5)
        packed = sums[..., 0] if W == 1 else (sums.long() << shifts).sum(-1)
        codes[:, lo : lo + n] = packed


def _tables_per_pack(R: int) -> int:
    """Tables whose bits one block-diagonal product packs: the largest divisor of R up to 16
    (the product costs G times the minimum, in exchange for being one matrix product)."""
    return max(d for d in range(1, min(R, 16) + 1) if R % d == 0)


def simhash_flops(tokens: int, D: int, num_hashes: int, num_bits: int) -> int:
    """FLOPs of the projections ``simhash_codes`` computes for ``tokens`` rows (B·H·L):
    ``2·tokens·D·R·b``. Where the native kernels do not run (not on the CPU, or no compiler),
    packing the bits adds the matrix product of ``packing_flops``."""
    return 2 * tokens * num_hashes * num_bits * D


def packing_flops(tokens: int, num_hashes: int, num_bits: int) -> int:
    """FLOPs of the product that packs the sign bits on the torch path (``_pack_signs``):
    ``2·tokens·R·b·G·ceil(b / 24)``, G being the tables packed by one block-diagonal product
    (the largest divisor of R up to 16). The native kernel packs them without arithmetic."""
    if num_bits == 0:
        return 0
    return 2 * tokens * num_hashes * num_bits * _tables_per_pack(num_hashes) * -(-num_bits // _BITS_PER_WORD)
