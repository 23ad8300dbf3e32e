"""YOSO: the kernel Σ_j (1 − θ_ij/π)^τ v_j, sampled with m hashes (YOSO-m) or computed exactly (YOSO-E).

YOSO-m never forms a T×S matrix: per hash, the values are summed into one row per bucket
(``index_add_``) and each query reads its bucket's row (``embedding_bag`` over the hashes), so
time and memory are O((T + S)·m·Dv) plus the bucket tables. Causal YOSO-m fills the tables in
position order, one block of positions at a time, and each query reads them as they stood before
its block, plus the keys of its own block up to its position: per-bucket running sums.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn import kernels
from lshattn.api import Inputs, SparseMethod
from lshattn.blocks import compute_dtype, finish_output
from lshattn.cost import Cost
from lshattn.hashing import MAX_SIMHASH_BITS, draw_per_group, hashed_once_a_group, simhash_codes, simhash_flops
from lshattn.local import LocalPairs, local_pairs, with_local_cost
from lshattn.methods.simhash import Collisions, build_collisions

__all__ = [
    "YOSO",
    "YOSOAux",
    "EXPECTATION_MAX_BYTES",
    "EXACT_GRAD_CLAMP",
    "TABLE_BUDGET",
    "CAUSAL_BLOCK",
    "angle",
    "bucket_sums",
    "expectation_bytes",
    "kernel_derivative",
    "LSHCumulation",
    "ExpectationCumulation",
]

# YOSO-E holds (B, H, T, S) matrices; above this many bytes it refuses with a ValueError.
EXPECTATION_MAX_BYTES = 4 << 30

# The exact derivative of the kernel, τ(1 − θ/π)^(τ−1) / (π sin θ), is infinite at q̂·k̂ = 1
# (and at −1 for τ = 1): it is evaluated at q̂·k̂ clamped to ±EXACT_GRAD_CLAMP. (The v2
# reference code evaluates it at 0.99·q̂·k̂ for the same reason.)
EXACT_GRAD_CLAMP = 0.99

# Elements of the bucket tables held at once; more hashes than fit are processed in groups.
TABLE_BUDGET = 1 << 24


class YOSOAux(NamedTuple):
    """What ``YOSO`` did, enough to rebuild its output.

    YOSO-m: ``out_i ∝ (1/m) Σ_h Σ_j [query_codes[h, i] == key_codes[h, j]] · v_j`` over the
    visible keys j (then L2-normalised with ``normalize_output``).

    Attributes:
        query_codes: `(B, H, m, T)` bucket of each query per hash (int32 when τ <= 31, else
            int64); None for YOSO-E.
        key_codes: `(B, H, m, S)` bucket of each key per hash; None for YOSO-E.
        dot_products: query–key products computed: 0 for YOSO-m, which only sums values by
            bucket (plus the slots of ``sinks`` and ``window``); B·H·T·S for YOSO-E.
    """

    query_codes: Tensor | None
    key_codes: Tensor | None
    dot_products: int


@dataclasses.dataclass(frozen=True)
class YOSO(SparseMethod):
    """YOSO (Zeng et al. 2021): "You Only Sample (Almost) Once", a hashing kernel attention.

    Queries and keys are L2-normalised; the attention is not a softmax but the kernel
    ``Y_i = Σ_j B(q̂_i, k̂_j) · v_j`` with ``B = (1 − arccos(q̂·k̂)/π)^τ``, τ = ``num_bits``: the
    probability that a τ-bit SimHash puts q and k in one bucket.

    * YOSO-m (``expectation=False``) draws ``num_hashes`` = m such hashes and averages, over
      them, the sum of the values in the query's bucket: an unbiased estimate of Y whose error
      falls as 1/√m. O((T + S)·m·Dv) time and memory; no T×S matrix.
    * YOSO-E (``expectation=True``) computes Y exactly, in O(T·S) time and memory; it refuses
      inputs whose (B, H, T, S) matrices need more than ``EXPECTATION_MAX_BYTES``.

    ``normalize_output=True`` (the paper's setting, default) L2-normalises each output row, as
    the paper does in place of a softmax's division by a partition function; False returns Y.
    ``scale`` has no effect: the kernel depends on angles only.

    Gradients (custom ``autograd.Function``): the values' gradient is exact for the sampled
    buckets (the same sums with queries and keys swapped). Hashes have no gradient, so the query
    and key gradients are the paper's surrogates, over the pairs the hashes put together:
    ``backward="approx"`` (v1, default) replaces ∂B/∂(q̂·k̂) by (τ/2)·B, estimating B by the
    fraction of hashes in which the pair collides; ``backward="exact"`` (v2) gives every pair
    that collides in at least one hash the exact derivative τ(1 − θ/π)^(τ−1)/(π sin θ), with
    q̂·k̂ clamped to ±``EXACT_GRAD_CLAMP``. YOSO-E uses the same two rules over all pairs.

    ``causal=True`` goes beyond the paper: query t sums only keys at positions <= t, read from
    per-bucket running sums in position order, so the output at t depends on nothing after t.

    ``sinks`` and ``window`` (``lshattn.SparseMethod``): YOSO-m replaces, for the pairs they
    cover, the sampled collision fraction by the exact kernel B (and its gradient by YOSO-E's
    rule), an additive correction ``Σ_a (B_ia − hits_ia/m)·v_a`` that keeps the estimate
    unbiased and lowers its variance where the kernel is largest. YOSO-E computes every pair
    exactly already: there they change nothing.

    Settings of the paper: m = 32, τ = 9 for BERT (the defaults); τ = 10–12 with m = 32 (v1) or
    16 (v2) on Long Range Arena. Attention dropout is not supported (there are no attention
    probabilities to drop).
    """

    name: ClassVar[str] = "yoso"
    supports_dropout: ClassVar[bool] = False
    num_hashes: int = 32
    num_bits: int = 9
    expectation: bool = False
    backward: Literal["approx", "exact"] = "approx"
    normalize_output: bool = True

    def _check_fields(self) -> None:
        """Ranges; ``Method.__post_init__`` has checked the types (and ``backward`` against its
        options) and calls this."""
        if self.num_hashes < 1:
            raise ValueError(f"YOSO num_hashes must be >= 1, got {self.num_hashes}")
        if not 1 <= self.num_bits <= MAX_SIMHASH_BITS:
            raise ValueError(
                f"YOSO num_bits (τ) must be in [1, {MAX_SIMHASH_BITS}] (bucket ids are int64), got {self.num_bits}"
            )

    def _check_inputs(self, inputs: Inputs) -> None:
        if inputs.dropout_p > 0:
            raise ValueError(
                f"YOSO does not implement attention dropout, got dropout_p={inputs.dropout_p}: its kernel "
                f"has no attention probabilities to drop; pass dropout_p=0"
            )
        if self.expectation:
            B, H, T, _ = inputs.q.shape
            S = inputs.k.shape[2]
            needed = expectation_bytes(B, H, T, S, torch.finfo(compute_dtype(inputs.q.dtype)).bits // 8)
            if needed > EXPECTATION_MAX_BYTES:
                raise ValueError(
                    f"YOSO(expectation=True) computes the (B, H, T, S) = ({B}, {H}, {T}, {S}) kernel matrix "
                    f"exactly and needs about {needed / 2**30:.1f} GiB for it, above "
                    f"lshattn.methods.yoso.EXPECTATION_MAX_BYTES = {EXPECTATION_MAX_BYTES / 2**30:.1f} GiB; use "
                    f"YOSO-m (expectation=False), which holds no T×S matrix, or shorter sequences"
                )

    def _attend(self, inputs: Inputs) -> tuple[Tensor, YOSOAux]:
        q, k, v = inputs.q, inputs.k, inputs.v
        B, H, T, D = q.shape
        S = k.shape[2]
        dtype = compute_dtype(q.dtype)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if self.expectation or needs_grad:
            q_hat, k_hat = F.normalize(q.to(dtype), dim=-1), F.normalize(k.to(dtype), dim=-1)
        else:  # the hash is scale-invariant: the normalised vectors serve the backward only
            q_hat, k_hat = q.to(dtype), k.to(dtype)

        if self.expectation:
            visible = _visible(inputs.key_padding_mask, inputs.causal, B, T, S, q.device)
            out = ExpectationCumulation.apply(q_hat, k_hat, v.to(dtype), visible, self.num_bits, self.backward)
            aux = YOSOAux(None, None, B * H * T * S)
        else:
            shape = (H, D, self.num_hashes, self.num_bits)
            planes = draw_per_group(shape, inputs.kv_groups, inputs.generator, q.device)
            code_dtype = torch.int32 if self.num_bits <= 31 else torch.long  # half the memory traffic
            with torch.no_grad():
                q_codes = simhash_codes(q, planes, tables_last=True, dtype=code_dtype)  # (B, H, T, m)
                k_codes = hashed_once_a_group(
                    partial(simhash_codes, tables_last=True, dtype=code_dtype), k, planes, inputs.kv_groups
                )
            out = LSHCumulation.apply(
                q_hat, k_hat, v.to(dtype), q_codes, k_codes, inputs.query_padding_mask, inputs.key_padding_mask,
                self.num_bits, inputs.causal, self.backward,
            )  # fmt: skip
            dot_products = 0
            pairs = local_pairs(inputs, self.sinks, self.window)
            if pairs is not None:
                out = out + _local_correction(
                    q.to(dtype), k.to(dtype), v.to(dtype), q_codes, k_codes, pairs, self.num_bits, self.backward
                )
                dot_products = B * H * T * pairs.slots
            aux = YOSOAux(q_codes.transpose(2, 3), k_codes.transpose(2, 3), dot_products)
        if self.normalize_output:
            if torch.is_grad_enabled():
                out = F.normalize(out, dim=-1)
            else:  # in place: one (B, H, T, Dv) tensor less to allocate
                out = out.div_(torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min_(1e-12))
        return finish_output(out, T, inputs.query_padding_mask, q.dtype), aux

    def cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4
    ) -> Cost:
        """Analytic cost of the forward.

        YOSO-E: dot_products = ``B·H·T·S``; flops = ``2·B·H·T·S·(D + Dv)``; memory_bytes =
        ``expectation_bytes`` (``2·B·H·T·S·itemsize``: the cosines and the kernel).

        YOSO-m: dot_products = 0; flops = the hashing products
        ``hashing.simhash_flops(B·H·(T + S), D, m, τ)``; the bucket sums are ``m·(T + S)·Dv``
        additions per (b, h), scatter and gather work that ``lshattn.cost`` does not count;
        memory_bytes = the bucket tables (at most ``kernels.UNIT_TABLE_BUDGET`` scalars per
        thread on the native path, ``B·H·g·(rows + 2)·Dv·itemsize`` for a group of g hashes
        under ``TABLE_BUDGET`` on the torch path, with ``rows = 2^τ``, or S when 2^τ > 2S), the
        codes (``B·H·(T + S)·m·4``, int32) and the output, whichever is largest.

        These are the native CPU kernels' costs. Where they do not run (not on the CPU, or no
        compiler), packing the hash bits adds ``hashing.packing_flops``, and causal sums add
        ``2·B·H·Dv·Σ n²`` per group of hashes for the products that sum each block of
        n <= ``CAUSAL_BLOCK`` positions' own keys.

        YOSO-m with ``sinks`` or ``window`` adds their slots (``lshattn.local.local_cost``) and
        ``6·D`` flops a slot for its angle (``angle``).
        """
        if self.expectation:
            dots = B * H * T * S
            return Cost(2 * dots * (D + Dv), dots, expectation_bytes(B, H, T, S, itemsize), 1.0)
        rows = _table_rows(self.num_bits, S) + 2
        group = min(self.num_hashes, max(1, TABLE_BUDGET // (B * H * rows * Dv)))
        code_bytes = 4 if self.num_bits <= 31 else 8
        memory = max(group * rows * Dv * itemsize, (T + S) * self.num_hashes * code_bytes, T * Dv * itemsize) * B * H
        flops = simhash_flops(B * H * (T + S), D, self.num_hashes, self.num_bits)
        cost = Cost(flops=flops, dot_products=0, memory_bytes=memory, budget=0.0)
        # and each slot's angle, 2·atan2(‖q̂ − k̂‖, ‖q̂ + k̂‖): two differences and two norms, 6·D
        return with_local_cost(cost, self, B, H, T, S, D, Dv, causal=causal, itemsize=itemsize, flops_per_slot=6 * D)


def expectation_bytes(B: int, H: int, T: int, S: int, itemsize: int) -> int:
    """Bytes YOSO-E holds at once: two (B, H, T, S) matrices, the cosines and the kernel."""
    return 2 * B * H * T * S * itemsize


def _local_correction(
    q: Tensor, k: Tensor, v: Tensor, q_codes: Tensor, k_codes: Tensor, pairs: LocalPairs, num_bits: int, backward: str
) -> Tensor:
    """`(B, H, T, Dv)` to add to YOSO-m's Y: for the covered pairs, the exact kernel in place of
    the sampled collision fraction, ``Σ_a (B_ia − hits_ia/m)·v_a``, with gradients to match.

    The value gradient is that weight; q and k get YOSO-E's surrogate slope in place of
    YOSO-m's on those pairs (``backward``: (τ/2)·B against (τ/2)·hits/m, or the exact derivative
    on every covered pair against it on the colliding ones), through ``slope·q̂·k̂`` added with
    value 0.

    Args:
        q: `(B, H, T, D)`, k: `(B, H, S, D)`, v: `(B, H, S, Dv)`; q_codes: `(B, H, T, m)`, k_codes: `(B, H, S, m)`.
    """
    m = q_codes.shape[-1]
    q_unit, k_unit = pairs.queries(F.normalize(q, dim=-1)), pairs.keys(F.normalize(k, dim=-1))
    cosine = pairs.per_slot(q_unit, k_unit, lambda queries, keys: (queries * keys).sum(-1))
    valid = pairs.valid[:, None].to(q.dtype)
    with torch.no_grad():
        hits = pairs.per_slot(
            pairs.queries(q_codes), pairs.keys(k_codes), lambda query_codes, key_codes: (query_codes == key_codes).sum(-1)
        )
        sampled = hits.to(q.dtype) / m
        kernel = (1 - pairs.per_slot(q_unit, k_unit, angle) / math.pi) ** num_bits
        if backward == "approx":
            slope = (num_bits / 2) * (kernel - sampled)
        else:
            slope = kernel_derivative(cosine, num_bits) * (hits == 0)
        weight, slope = (kernel - sampled) * valid, slope * valid
    surrogate = slope * cosine
    # The surrogate term has value 0, so the values' gradient is ``weight`` alone.
    return pairs.restore(pairs.weighted_sum(weight + (surrogate - surrogate.detach()), pairs.keys(v)))


def angle(a: Tensor, b: Tensor) -> Tensor:
    """The angle between unit vectors `(..., D)`, ``2·atan2(‖a − b‖, ‖a + b‖)``: accurate to rounding
    everywhere, where ``arccos(a·b)`` loses half the digits near 0 and π (a cosine rounded by δ moves
    the angle by √(2δ)), so that identical vectors are at angle 0 however their product rounds."""
    return 2 * torch.atan2(torch.linalg.vector_norm(a - b, dim=-1), torch.linalg.vector_norm(a + b, dim=-1))


def kernel_derivative(x: Tensor, num_bits: int) -> Tensor:
    """∂/∂x (1 − arccos(x)/π)^τ = τ(1 − arccos(x)/π)^(τ−1) / (π√(1 − x²)), at x clamped to
    ±``EXACT_GRAD_CLAMP``."""
    x = x.clamp(-EXACT_GRAD_CLAMP, EXACT_GRAD_CLAMP)
    return num_bits * (1 - torch.acos(x) / math.pi) ** (num_bits - 1) / (math.pi * torch.sqrt(1 - x * x))


def _visible(key_padding_mask: Tensor | None, causal: bool, B: int, T: int, S: int, device) -> Tensor | None:
    """`(B, 1, T, S)` bool of the keys each query may see, or None when it sees all."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if causal:
        tril = torch.ones(T, S, dtype=torch.bool, device=device).tril()
        mask = tril if mask is None else mask & tril
    return None if mask is None else mask.expand(B, 1, T, S)


class ExpectationCumulation(torch.autograd.Function):
    """YOSO-E: ``Y = B·V`` with ``B_ij = (1 − arccos(q̂_i·k̂_j)/π)^τ`` on visible pairs.

    Backward: ``∂V = Bᵀ·G``; with ``W = (G·Vᵀ) ∘ B'``, ``∂q̂ = W·k̂`` and ``∂k̂ = Wᵀ·q̂``, where
    B' is the exact derivative (``kernel_derivative``) for ``backward="exact"`` and (τ/2)·B for
    ``backward="approx"``.
    """

    @staticmethod
    def forward(ctx, q_hat: Tensor, k_hat: Tensor, v: Tensor, visible: Tensor | None, num_bits: int, rule: str):
        kernel = expectation_kernel(q_hat, k_hat, visible, num_bits)[1]
        ctx.save_for_backward(q_hat, k_hat, v, visible)
        ctx.num_bits, ctx.rule = num_bits, rule
        return kernel @ v

    @staticmethod
    def backward(ctx, grad: Tensor):
        q_hat, k_hat, v, visible = ctx.saved_tensors
        cosine, kernel = expectation_kernel(q_hat, k_hat, visible, ctx.num_bits)
        grad_v = kernel.transpose(-1, -2) @ grad
        if ctx.rule == "approx":
            weight = kernel.mul_(ctx.num_bits / 2)
        else:
            weight = kernel_derivative(cosine, ctx.num_bits)
            if visible is not None:
                weight = weight * visible
        weight = weight * (grad @ v.transpose(-1, -2))
        return weight @ k_hat, weight.transpose(-1, -2) @ q_hat, grad_v, None, None, None


def expectation_kernel(q_hat: Tensor, k_hat: Tensor, visible: Tensor | None, num_bits: int) -> tuple[Tensor, Tensor]:
    """The cosines `(B, H, T, S)` of unit queries and keys, and YOSO-E's kernel
    ``(1 − arccos(cos)/π)^τ`` on the visible pairs (``visible`` broadcast; None: all); the
    decoding step (``lshattn.decode.yoso.expectation_step``) computes it alike."""
    cosine = (q_hat @ k_hat.transpose(-1, -2)).clamp_(-1, 1)
    kernel = (1 - torch.acos(cosine) / math.pi) ** num_bits
    if visible is not None:
        kernel = kernel * visible
    return cosine, kernel


class LSHCumulation(torch.autograd.Function):
    """YOSO-m given its codes: ``Y_i = (1/m) Σ_h Σ_{j visible, c_h(k_j) = c_h(q_i)} v_j``.

    Backward: ``∂v_j = (1/m) Σ_h Σ_{i: c_h(q_i) = c_h(k_j)} g_i`` by the same bucket sums with
    queries and keys swapped (exact: Y is linear in V). Y does not depend on q̂ and k̂ given the
    codes, so their gradients are the paper's surrogates over the colliding pairs: with
    ``w_ij = (g_i·v_j)·φ_ij``, ``∂q̂_i = Σ_j w_ij k̂_j`` and ``∂k̂_j = Σ_i w_ij q̂_i``, where
    ``φ_ij = (τ/2)·(hashes in which i and j collide)/m`` for ``"approx"`` and
    ``φ_ij = kernel_derivative(q̂_i·k̂_j)`` on pairs colliding in at least one hash for ``"exact"``.
    On the CPU both rules run natively (``kernels.collision_grads``), per hash and bucket:
    ``"approx"`` pair by pair or through two (Dv, D) matrices, whichever is cheaper, so a hash
    costs O((T + S)·Dv·D) at most; ``"exact"`` pair by pair, each pair in the first hash where it
    collides. Elsewhere the pairs are visited in sorted blocks (``lshattn.methods.simhash``);
    never as a T×S matrix.
    """

    @staticmethod
    def forward(
        ctx, q_hat: Tensor, k_hat: Tensor, v: Tensor, q_codes: Tensor, k_codes: Tensor,
        query_padding_mask: Tensor | None, key_padding_mask: Tensor | None, num_bits: int, causal: bool, rule: str,
    ) -> Tensor:  # fmt: skip
        B, H, T, m = q_codes.shape
        S, Dv = v.shape[2], v.shape[3]
        readers = _masked_codes(q_codes, query_padding_mask, -1)
        writers = _masked_codes(k_codes, key_padding_mask, -2)
        values = v if key_padding_mask is None else v * key_padding_mask[:, None, :, None]
        out = bucket_sums(readers, writers, values.reshape(B * H, S, Dv), num_bits, causal=causal)
        ctx.save_for_backward(q_hat, k_hat, v, q_codes, k_codes, query_padding_mask, key_padding_mask)
        ctx.num_bits, ctx.causal, ctx.rule = num_bits, causal, rule
        return out.div_(m).view(B, H, T, Dv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q_hat, k_hat, v, q_codes, k_codes, query_padding_mask, key_padding_mask = ctx.saved_tensors
        B, H, T, m = q_codes.shape
        S, Dv = v.shape[2], v.shape[-1]
        grad = grad.to(v.dtype)
        if query_padding_mask is not None:
            grad = grad * query_padding_mask[:, None, :, None]
        grad_v = None
        if ctx.needs_input_grad[2]:
            readers = _masked_codes(k_codes, key_padding_mask, -1)
            writers = _masked_codes(q_codes, query_padding_mask, -2)
            grad = grad.reshape(B * H, T, Dv)
            grad_v = bucket_sums(readers, writers, grad, ctx.num_bits, causal=ctx.causal, reverse=True)
            grad_v = grad_v.div_(m).view(B, H, S, Dv)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            surrogate = _native_surrogate_grads(q_hat, k_hat, v, grad, q_codes, k_codes, query_padding_mask,
                                                key_padding_mask, ctx.num_bits, ctx.causal, ctx.rule)  # fmt: skip
            if surrogate is not None:
                return *surrogate, grad_v, None, None, None, None, None, None, None
            col = build_collisions(
                q_codes.transpose(2, 3), k_codes.transpose(2, 3), query_padding_mask, key_padding_mask, ctx.num_bits,
                causal=ctx.causal, dedup=ctx.rule == "exact",
            )  # fmt: skip
            grad_q, grad_k = _surrogate_grads(q_hat, k_hat, v, grad, col, ctx.num_bits, ctx.rule)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


def _masked_codes(codes: Tensor, mask: Tensor | None, fill: int) -> Tensor:
    """`(B, H, L, m)` codes as `(B·H, L, m)`, with ``fill`` at padded tokens."""
    B, H, L, m = codes.shape
    if mask is not None:
        codes = codes.masked_fill(~mask[:, None, :, None], fill)
    return codes.reshape(B * H, L, m)


def _native_surrogate_grads(
    q_hat: Tensor, k_hat: Tensor, v: Tensor, grad: Tensor, q_codes: Tensor, k_codes: Tensor,
    query_padding_mask: Tensor | None, key_padding_mask: Tensor | None, num_bits: int, causal: bool, rule: str,
) -> tuple[Tensor, Tensor] | None:  # fmt: skip
    """The query and key gradients by the native kernel (``kernels.collision_grads``); None
    where it does not run."""
    B, H, T, m = q_codes.shape
    S, D = k_hat.shape[2], q_hat.shape[-1]
    readers, writers, rows = _table_codes(
        _masked_codes(q_codes, query_padding_mask, -1), _masked_codes(k_codes, key_padding_mask, -2), num_bits, S
    )
    flat = (x.reshape(B * H, -1, x.shape[-1]) for x in (q_hat, k_hat, v, grad))
    exact_bits = num_bits if rule == "exact" else 0
    grads = kernels.collision_grads(
        *flat, readers, writers, rows, causal=causal, exact_bits=exact_bits, clamp=EXACT_GRAD_CLAMP
    )
    if grads is None:
        return None
    # "approx": ∂B/∂(q̂·k̂) ≈ (τ/2)·B, with B estimated by the collision count / m.
    weight = num_bits / (2 * m) if rule == "approx" else 1.0
    return grads[0].mul_(weight).view(B, H, T, D), grads[1].mul_(weight).view(B, H, S, D)


def _surrogate_grads(
    q_hat: Tensor, k_hat: Tensor, v: Tensor, grad: Tensor, col: Collisions, num_bits: int, rule: str
) -> tuple[Tensor, Tensor]:
    """The query and key gradients of ``LSHCumulation`` over the colliding pairs in blocks."""
    B, H, T, S = col.shape
    D, m = q_hat.shape[-1], col.tables

    def rows(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])

    q_x, k_x, v_x, g_x = rows(q_hat), rows(k_hat), rows(v), rows(grad)
    grad_q, grad_k = torch.zeros_like(q_x), torch.zeros_like(k_x)
    for table, plan in col.parts():  # a loop over hashes (and their block sizes)
        # Sorted copies, so that a chunk gathers whole blocks rather than single rows.
        q_sorted, k_sorted = q_x[plan.q_index], k_x[plan.k_index]
        v_sorted, g_sorted = v_x[plan.k_index], g_x[plan.q_index]
        for chunk in col.chunks(table, plan):
            q_blk, k_blk = q_sorted.index_select(0, chunk.rows), k_sorted.index_select(0, chunk.cols)
            v_blk, g_blk = v_sorted.index_select(0, chunk.cols), g_sorted.index_select(0, chunk.rows)
            weight = torch.bmm(g_blk, v_blk.transpose(1, 2))
            if rule == "approx":
                weight = weight.mul_(chunk.mask).mul_(num_bits / (2 * m))
            else:
                cosine = torch.bmm(q_blk, k_blk.transpose(1, 2))
                weight = weight.mul_(chunk.mask).mul_(kernel_derivative(cosine, num_bits))
            grad_q.index_add_(0, chunk.q_index.reshape(-1), torch.bmm(weight, k_blk).view(-1, D))
            grad_k.index_add_(0, chunk.k_index.reshape(-1), torch.bmm(weight.transpose(1, 2), q_blk).view(-1, D))
    return grad_q[:-1].view(B, H, T, D), grad_k[:-1].view(B, H, S, D)


# --- bucket sums --------------------------------------------------------------------------------


def _table_rows(num_bits: int, S: int) -> int:
    """Rows per hash of a bucket table: one per bucket, or one per key when 2^τ > 2S."""
    return 2**num_bits if 2**num_bits <= 2 * S else S


def bucket_sums(
    read_codes: Tensor, write_codes: Tensor, values: Tensor, num_bits: int, *, causal: bool, reverse: bool = False
) -> Tensor:
    """``out_i = Σ_h Σ_{j: write_codes[h, j] == read_codes[h, i]} values_j``, summed over hashes.

    Per hash, the writers' values are added into one table row per bucket and each reader reads
    its bucket's row. When 2^τ > 2S the codes are first replaced by their rank among the
    writers' codes, so a table never has more rows than writers. Only additions, so no
    precision is lost to cancellation, whatever the magnitudes.

    On the CPU in float32 or float64 this runs the native kernel (``lshattn.kernels``): one
    pass over the positions per hash group, causal sums included. Elsewhere, or without a
    compiler, it runs ``_torch_bucket_sums``.

    Args:
        read_codes: `(N, T, m)` integer codes in ``[0, 2^num_bits)``, -1 for a reader that reads
            nothing. write_codes: `(N, S, m)`, -2 for a writer that writes nothing.
        values: `(N, S, Dv)`.
        causal: reader i sums only writers j <= i (T == S); with ``reverse`` only j >= i.

    Returns:
        `(N, T, Dv)` in the dtype of ``values``.
    """
    read_codes, write_codes, rows = _table_codes(read_codes, write_codes, num_bits, values.shape[1])
    out = kernels.bucket_sums(read_codes, write_codes, values, rows, causal=causal, reverse=reverse)
    if out is None:
        out = _torch_bucket_sums(read_codes, write_codes, values, rows, causal=causal, reverse=reverse)
    return out


def _torch_bucket_sums(
    read_codes: Tensor, write_codes: Tensor, values: Tensor, valid_rows: int, *, causal: bool, reverse: bool
) -> Tensor:
    """``bucket_sums`` in torch operations, given codes in ``[0, valid_rows)``.

    Hashes are processed in groups whose tables fit ``TABLE_BUDGET``: ``index_add_`` adds the
    writers' values into the tables and ``embedding_bag`` sums each reader's rows over the
    group. Causal: positions are taken in blocks of ``CAUSAL_BLOCK``; a reader reads the table
    as it stood before its block (the writers of earlier blocks) plus the writers of its own
    block at positions <= its own, and then the block's writers are added to the table.
    """
    if causal and reverse:
        flipped = _torch_bucket_sums(
            read_codes.flip(1), write_codes.flip(1), values.flip(1), valid_rows, causal=True, reverse=False
        )
        return flipped.flip(1)
    N, T, m = read_codes.shape
    S, Dv = values.shape[1], values.shape[2]
    rows = valid_rows + 2  # a dump row for writers marked -2, a zero row for readers marked -1
    group = min(m, max(1, TABLE_BUDGET // (N * rows * Dv)))
    # Table rows fit int32 (TABLE_BUDGET), which halves the index traffic; index_add_ wants int64.
    index_dtype = torch.int32 if N * group * rows < 2**31 else torch.long
    readers, writers = read_codes.to(index_dtype), write_codes.to(index_dtype)
    if bool(readers.min() < 0):
        readers = torch.where(readers < 0, valid_rows + 1, readers)
    if bool(writers.min() < 0):
        writers = torch.where(writers < 0, valid_rows, writers)
    out = None
    for first in range(0, m, group):  # groups of hashes, sized to bound the tables' memory
        g = min(group, m - first)
        base = (torch.arange(N, device=values.device)[:, None] * g + torch.arange(g, device=values.device)) * rows
        base = base.to(index_dtype)
        read_index = readers[:, :, first : first + g] + base[:, None, :]  # (N, T, g) rows of the tables
        write_index = writers[:, :, first : first + g] + base[:, None, :]
        if causal:
            part = _running_sums(read_index.long(), write_index.long(), values, N * g * rows)
        else:
            table = values.new_zeros(N * g * rows, Dv)
            flat_values = values.reshape(N * S, Dv)
            for index in write_index.permute(2, 0, 1).contiguous().view(g, N * S):  # one pass per hash
                table.index_add_(0, index.long(), flat_values)
            part = F.embedding_bag(read_index.reshape(N * T, g), table, mode="sum").view(N, T, Dv)
        out = part if out is None else out.add_(part)
    return out


# Positions per block of causal bucket sums.
CAUSAL_BLOCK = 64


def _running_sums(read_index: Tensor, write_index: Tensor, values: Tensor, rows: int) -> Tensor:
    """Causal bucket sums for one group of hashes, given table rows (equal row = same bucket)."""
    N, L, g = read_index.shape
    Dv = values.shape[-1]
    table = values.new_zeros(rows, Dv)
    out = values.new_empty(N, L, Dv)
    for lo in range(0, L, CAUSAL_BLOCK):  # blocks of positions, in order
        hi = min(L, lo + CAUSAL_BLOCK)
        n = hi - lo
        reads, writes, block_values = read_index[:, lo:hi], write_index[:, lo:hi], values[:, lo:hi]
        earlier = F.embedding_bag(reads.reshape(N * n, g), table, mode="sum").view(N, n, Dv)
        # (N, n, n): in how many hashes reader i and writer j of the block collide, j <= i
        hits = (reads[:, :, None, :] == writes[:, None, :, :]).sum(-1).tril_()
        out[:, lo:hi] = torch.baddbmm(earlier, hits.to(values.dtype), block_values)
        table.index_add_(0, writes.reshape(-1), block_values[:, :, None, :].expand(N, n, g, Dv).reshape(-1, Dv))
    return out


def _table_codes(read_codes: Tensor, write_codes: Tensor, num_bits: int, S: int) -> tuple[Tensor, Tensor, int]:
    """The codes as rows of a bucket table, and its number of rows: the codes themselves (2^τ
    rows), or their ranks among the writers' codes when 2^τ > 2S (``_compact_codes``)."""
    rows = _table_rows(num_bits, S)
    if rows != 2**num_bits:
        read_codes, write_codes = _compact_codes(read_codes, write_codes)
    return read_codes, write_codes, rows


def _compact_codes(read_codes: Tensor, write_codes: Tensor) -> tuple[Tensor, Tensor]:
    """Replace codes by their rank among the writers' distinct codes (per row and hash), so a
    bucket table needs S rows instead of 2^τ; a reader whose code no writer has gets -1."""
    writers = write_codes.transpose(1, 2).contiguous()  # (N, m, S)
    readers = read_codes.transpose(1, 2).contiguous()
    S = writers.shape[-1]
    ordered = torch.sort(writers, dim=-1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    rank = new.long().cumsum(-1) - 1
    write_rank = torch.where(writers >= 0, rank.gather(-1, torch.searchsorted(ordered, writers)), -2)
    at = torch.searchsorted(ordered, readers).clamp_max(S - 1)
    found = (ordered.gather(-1, at) == readers) & (readers >= 0)
    read_rank = torch.where(found, rank.gather(-1, at), -1)
    return read_rank.transpose(1, 2), write_rank.transpose(1, 2)
