"""Attention inside sorted blocks, and the merge of hash rounds: shared by Reformer and SMYRF.

Both methods reduce to the same computation once their hash has given each round a query order
and a key order: cut the sorted queries into blocks of ``q_block`` and the sorted keys into
blocks of ``k_block`` (real tokens first, padding after them); query block n attends to the
key blocks ``m(n) - before … m(n) + after`` of the same round (never wrapping around), where
``m`` matches the blocks of each sequence's real queries to those of its real keys by rank
(``matched_key_blocks``; the identity when both give as many blocks); softmax inside; unsort;
merge the rounds by their log-sum-exp. Everything here is vectorised over batch, heads, rounds
and blocks; the only Python loop runs, for the duplicate correction, over the rounds.

Shape legend: B batch, H heads, R rounds, Tp / Sp padded query / key length, Nq = Tp / q_block
query blocks and Nk = Sp / k_block key blocks per round, c = q_block, w = (before + 1 + after) ·
k_block keys per window, D, Dv dims.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.hashing import gather_rows, inverse_order

__all__ = [
    "SelfPairs",
    "BlockLayout",
    "BlockResult",
    "block_layout",
    "compute_dtype",
    "matched_key_blocks",
    "query_key_blocks",
    "pad_length",
    "padded_valid",
    "sorted_block_attention",
    "window_positions",
    "pair_entries",
    "softmax_with_lse",
    "block_softmax",
    "merge_softmax",
    "merge_entry",
    "merge_rounds",
    "finish_output",
]

# How a query's own position is treated (it needs T == S):
#   "none":    like any other key.
#   "exclude": never attended here; the caller falls back to it when nothing else is visible
#              (Reformer's shared-QK rule).
#   "column":  attended once per round through an extra score column, and removed from the
#              blocks so it is never counted twice; causal attention then always has a key.
SelfPairs = Literal["none", "exclude", "column"]


class BlockResult(NamedTuple):
    """Per-round outputs in the original token order.

    Attributes:
        out: `(B, H, R, Tp, Dv)`, zero where a query saw no key.
        lse: `(B, H, R, Tp)` log-sum-exp of the attended logits, -inf where none.
        dot_products: scores computed (B·H·R summed, padding slots included).
    """

    out: Tensor
    lse: Tensor
    dot_products: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 at least (half inputs), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def pad_length(length: int, block: int) -> int:
    """Smallest multiple of ``block`` that holds ``length``."""
    return -(-length // block) * block


class BlockLayout(NamedTuple):
    """How a call cuts its sorted queries and keys into blocks.

    Attributes:
        q_block: query slots per block, the method's size clamped to T (a larger block would
            only hold padding). k_block: key slots per block, clamped to S.
        q_blocks: Nq = ceil(T / q_block) query blocks per round. k_blocks: Nk = ceil(S / k_block).
    """

    q_block: int
    k_block: int
    q_blocks: int
    k_blocks: int

    @property
    def padded_queries(self) -> int:
        """Tp = Nq · q_block."""
        return self.q_blocks * self.q_block

    @property
    def padded_keys(self) -> int:
        """Sp = Nk · k_block."""
        return self.k_blocks * self.k_block


def block_layout(T: int, S: int, q_block: int, k_block: int) -> BlockLayout:
    """The blocks of T queries and S keys for a method's block sizes. Clamping a block to its
    sequence changes nothing a caller can see: every real token of a sequence of at most T
    tokens lands in block 0 either way."""
    q_block, k_block = min(q_block, T), min(k_block, S)
    return BlockLayout(q_block, k_block, -(-T // q_block), -(-S // k_block))


def matched_key_blocks(q_valid: Tensor, k_valid: Tensor, layout: BlockLayout) -> Tensor:
    """The key block each query block meets: `(B, Nq)` int64.

    Real tokens sort first, so a sequence with n_q real queries and n_k real keys fills
    C_q = ceil(n_q / q_block) query blocks and C_k = ceil(n_k / k_block) key blocks. Query block
    n meets the key block at the same relative rank, ``m(n) = ⌊(n + ½)·C_k / C_q⌋``: the identity
    when C_q == C_k (equal lengths and block sizes, no padding), and otherwise still a block of
    real keys for every block of real queries. So a real query never ends up facing only padding
    when its sequence has fewer real keys than real queries (a key mask alone, cross-attention
    with a padded encoder), and the blocks of a sequence depend on its real tokens only.

    Args:
        q_valid: `(B, Tp)` bool. k_valid: `(B, Sp)` bool.
    """
    q_real, k_real = q_valid.sum(1, keepdim=True), k_valid.sum(1, keepdim=True)
    q_filled = (-(-q_real // layout.q_block)).clamp_min(1)
    k_filled = -(-k_real // layout.k_block)
    n = torch.arange(layout.q_blocks, device=q_valid.device)
    # Blocks past C_q hold only padded queries, whose outputs are dropped: any key block will do.
    return ((2 * n + 1) * k_filled // (2 * q_filled)).clamp_max(layout.k_blocks - 1)


def query_key_blocks(q_order: Tensor, q_block: int, key_blocks: Tensor) -> Tensor:
    """For every query and round, the key block its block meets: `(B, H, R, Tp)` int64.

    Args:
        q_order: `(B, H, R, Tp)` sorted position -> query index. key_blocks: `(B, Nq)`.
    """
    B, H, R, Tp = q_order.shape
    block_of_query = inverse_order(q_order) // q_block
    return key_blocks[:, None, None, :].expand(B, H, R, -1).gather(-1, block_of_query)


def padded_valid(mask: Tensor | None, batch: int, length: int, padded: int, device: torch.device) -> Tensor:
    """`(B, padded)` bool: True for real tokens; the internal padding past ``length`` is False."""
    valid = torch.zeros(batch, padded, dtype=torch.bool, device=device)
    valid[:, :length] = True if mask is None else mask
    return valid


def pad_tokens(x: Tensor, padded: int) -> Tensor:
    """Zero-pad the token dim (-2) of `(B, H, L, E)` to ``padded`` (no copy when it fits)."""
    return x if padded == x.shape[-2] else F.pad(x, (0, 0, 0, padded - x.shape[-2]))


def sorted_block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_order: Tensor,
    k_order: Tensor,
    k_valid: Tensor,
    key_blocks: Tensor,
    *,
    q_block: int,
    k_block: int,
    before: int,
    after: int,
    causal: bool,
    self_pairs: SelfPairs,
    correct_duplicates: bool,
    scale: float,
    dropout_p: float,
) -> BlockResult:
    """Attention of sorted query blocks to windows of sorted key blocks, per round.

    Args:
        q: `(B, H, Tp, D)`, k: `(B, H, Sp, D)`, v: `(B, H, Sp, Dv)`, padded to multiples of
            ``q_block`` and ``k_block``.
        q_order: `(B, H, R, Tp)` sorted position -> query index. k_order: `(B, H, R, Sp)`.
        k_valid: `(B, Sp)` bool, False for padded keys.
        key_blocks: `(B, Nq)` the key block each query block's window is centred on
            (``matched_key_blocks``).
        before, after: key blocks attended before and after the centre block.
        causal: a key is visible only at a position <= the query's.
        self_pairs: how a query's own position is treated (see ``SelfPairs``; needs T == S).
        correct_duplicates: subtract log(number of rounds attending the pair) from each logit,
            so that the merged output is softmax over the union of attended pairs.
        scale: logit scale. dropout_p: dropout on the probabilities.

    Returns:
        ``BlockResult`` with per-round outputs and log-sum-exps in token order.
    """
    B, H, R, Tp = q_order.shape
    Sp = k_order.shape[-1]
    num_blocks = Tp // q_block
    rows = B * H * R * num_blocks

    def to_blocks(x: Tensor, block: int) -> Tensor:  # (B, H, R, L, E) -> (B, H, R, Nq, block, E)
        return x.view(B, H, R, num_blocks, block, x.shape[-1])

    q_pos = q_order.view(B, H, R, num_blocks, q_block)
    q_blocks = to_blocks(gather_rows(q, q_order), q_block)
    # Key positions of every window slot (-1 past either end), then keys and values gathered
    # straight into window layout: one copy each, no sorted intermediate to concatenate.
    k_pos = window_positions(k_order, key_blocks, k_block, before, after)
    window = k_pos.shape[-1]
    slots = k_pos.clamp_min(0).view(B, H, R, num_blocks * window)  # masked below, any row will do
    k_win, v_win = to_blocks(gather_rows(k, slots), window), to_blocks(gather_rows(v, slots), window)

    # The bias carries every mask as -inf (and the duplicate correction as -log count). It
    # depends on the query only for causal masks, self-pair exclusion and the correction;
    # otherwise one row per block is broadcast over the block's queries.
    per_query = causal or self_pairs != "none" or correct_duplicates
    allowed = key_is_valid(k_valid, k_pos)[..., None, :]  # k_pos < 0: past either end, never valid
    if causal or self_pairs != "none":  # one comparison: causal and no self pair is k < q
        keys, queries = k_pos[..., None, :], q_pos[..., :, None]
        if causal:
            order = keys < queries if self_pairs != "none" else keys <= queries
        else:
            order = keys != queries
        allowed = allowed & order
    bias_shape = (B, H, R, num_blocks, q_block if per_query else 1, window)
    zero, masked = (torch.tensor(x, dtype=q.dtype, device=q.device) for x in (0.0, float("-inf")))
    bias = torch.where(allowed, zero, masked)  # one pass over the (per-query) mask
    if correct_duplicates:
        counts = duplicate_counts(q_order, k_order, k_pos, q_block, k_block, key_blocks, before, after)
        bias = bias - counts.to(q.dtype).log()
    bias = bias.expand(bias_shape)
    out, lse = block_softmax(
        q_blocks.reshape(rows, q_block, -1), k_win.reshape(rows, window, -1), v_win.reshape(rows, window, -1),
        bias.reshape(rows, bias_shape[-2], window), scale, dropout_p,
    )  # fmt: skip
    dot_products = rows * q_block * window

    if self_pairs == "column":
        # The query's own key, merged in as one more softmax entry of its row. Slots past the
        # keys' padded length hold internal padding only (T == S), whose own key is no key.
        own = torch.where(q_order < Sp, q_order, -1)
        q_sorted = q_blocks.reshape(rows, q_block, -1)
        k_self = gather_rows(k, own.clamp_min(0)).view_as(q_sorted)
        v_self = gather_rows(v, own.clamp_min(0)).view(rows, q_block, -1)
        self_score = (q_sorted * k_self).sum(-1) * scale
        if correct_duplicates:
            self_score = self_score - math.log(R)
        self_score = self_score.masked_fill(~key_is_valid(k_valid, own).view(rows, q_block), float("-inf"))
        out, lse = merge_entry(out, lse, self_score, v_self)
        dot_products += rows * q_block

    inverse = inverse_order(q_order)
    out = gather_rows(out.reshape(B, H, R, Tp, -1), inverse)
    lse = torch.gather(lse.reshape(B, H, R, Tp), -1, inverse)
    return BlockResult(out, lse, dot_products)


def block_softmax(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, dropout_p: float
) -> tuple[Tensor, Tensor]:
    """``softmax(q kᵀ · scale + bias) v`` per row, and the log-sum-exp of each query's logits.

    Args:
        q: `(N, c, D)`. k: `(N, w, D)`. v: `(N, w, Dv)`.
        bias: `(N, c, w)` or `(N, 1, w)` additive, -inf where a pair is masked.

    Returns:
        out `(N, c, Dv)`, zero for a query with no visible key, and lse `(N, c)`, -inf there.
    """
    if dropout_p > 0:  # dropout needs the probabilities themselves: plain autograd
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
        probs, lse = softmax_with_lse(scores)
        return torch.bmm(F.dropout(probs, dropout_p), v), lse
    return BlockSoftmax.apply(q, k, v, bias, scale)


def _fused_cpu_kernel_fits(q: Tensor, v: Tensor) -> bool:
    """Whether PyTorch's CPU flash kernel can run this block attention (it needs D == Dv)."""
    return (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


class BlockSoftmax(torch.autograd.Function):
    """Block attention returning its log-sum-exp, differentiable in both outputs.

    Forward: on CPU, PyTorch's fused flash kernel (which already returns the log-sum-exp but
    has no gradient for it) so the `(N, c, w)` probabilities are never written out; elsewhere
    matmul and softmax. Backward recomputes the probabilities, as flash attention does, and
    adds the gradient that reaches the log-sum-exp (``∂lse/∂s = p``), which the multi-round
    merge needs: ``ds = p ∘ (dO·vᵀ − rowsum(dO ∘ O) + dlse)``.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        has_key = bias.ne(float("-inf")).any(-1)  # bias is finite or -inf: one pass, not isfinite's three
        if _fused_cpu_kernel_fits(q, v):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[None], k[None], v[None], 0.0, False, attn_mask=bias[None], scale=scale
            )
            out, lse = out[0], lse[0].to(q.dtype)
        else:
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
            lse = torch.logsumexp(scores, dim=-1)
            out = torch.bmm(torch.exp(scores.sub_(_finite(lse)[..., None])), v)
        # The kernel gives lse = 0 and out = 0 for a query that sees no key: mark it -inf.
        lse = lse.masked_fill(~has_key.expand_as(lse), float("-inf"))
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        q, k, v, bias, out, lse = ctx.saved_tensors
        probs = _probabilities(q, k, bias, lse, ctx.scale)
        grad_scores = torch.zeros_like(probs)
        grad_v = None
        if grad_out is not None:
            grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
            grad_scores += torch.bmm(grad_out, v.transpose(1, 2)) - (grad_out * out).sum(-1, keepdim=True)
        if grad_lse is not None:
            grad_scores += grad_lse[..., None]
        grad_scores *= probs
        grad_q = torch.bmm(grad_scores, k) * ctx.scale
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q) * ctx.scale
        return grad_q, grad_k, grad_v, None, None


def _probabilities(q: Tensor, k: Tensor, bias: Tensor, lse: Tensor, scale: float) -> Tensor:
    """``exp(q kᵀ·scale + bias − lse)``: 0 in rows whose lse is -inf (all entries are -inf)."""
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    return torch.exp(scores.sub_(_finite(lse)[..., None]))


def _finite(lse: Tensor) -> Tensor:
    """lse with -inf (a row with no visible key) replaced by 0, so subtracting it keeps -inf."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def key_is_valid(k_valid: Tensor, positions: Tensor) -> Tensor:
    """Validity of the keys at ``positions`` `(B, H, ...)` (negative: out of range, False)."""
    B = k_valid.shape[0]
    flat = positions.reshape(B, -1)
    valid = torch.gather(k_valid, 1, flat.clamp_min(0)) & (flat >= 0)
    return valid.view_as(positions)


def window_positions(k_order: Tensor, key_blocks: Tensor, k_block: int, before: int, after: int) -> Tensor:
    """Key position of every slot of every query block's window, -1 past either end.

    The window of query block n is key blocks ``key_blocks[n] - before … key_blocks[n] + after``
    of the same round, earlier blocks first; it never wraps around.

    Args:
        k_order: `(B, H, R, Sp)` sorted position -> key index. key_blocks: `(B, Nq)`.

    Returns:
        `(B, H, R, Nq, (before + 1 + after) · k_block)` int64.
    """
    B, H, R, Sp = k_order.shape
    num_q_blocks, span = key_blocks.shape[1], before + 1 + after
    blocks = F.pad(k_order.view(B, H, R, Sp // k_block, k_block), (0, 0, before, after), value=-1)
    # With `before` fill blocks in front, block c - before + o of the keys is row c + o here.
    index = key_blocks[:, :, None] + torch.arange(span, device=k_order.device)
    index = index.view(B, 1, 1, num_q_blocks * span, 1).expand(B, H, R, -1, k_block)
    return blocks.gather(3, index).view(B, H, R, num_q_blocks, span * k_block)


def duplicate_counts(
    q_order: Tensor,
    k_order: Tensor,
    k_pos: Tensor,
    q_block: int,
    k_block: int,
    key_blocks: Tensor,
    before: int,
    after: int,
) -> Tensor:
    """In how many rounds each (query, key) slot pair of the windows is attended, at least 1.

    A pair is attended in round r' when the key's block minus the centre of the query's window
    in that round lies in [-before, after]; the masks do not depend on the round, so this counts
    exactly the rounds in which the pair contributes. Loops over rounds to keep memory at one
    score tensor.

    Args:
        k_pos: `(B, H, R, Nq, w)` key position of each window slot (``window_positions``).

    Returns:
        float `(B, H, R, Nq, c, w)`.
    """
    B, H, R, Tp = q_order.shape
    centre_of = query_key_blocks(q_order, q_block, key_blocks)  # (B, H, R', Tp): per query and round
    k_block_of = inverse_order(k_order) // k_block  # (B, H, R', Sp): block of each key per round
    q_pos = q_order.view(*k_pos.shape[:4], q_block)
    counts = torch.zeros(q_pos.shape + k_pos.shape[-1:], device=q_order.device)
    k_index = k_pos.clamp_min(0).flatten(-2, -1)
    for r in range(R):
        centre = torch.gather(centre_of[:, :, r : r + 1].expand_as(q_order), -1, q_order)
        k_blk = torch.gather(k_block_of[:, :, r : r + 1].expand(*k_index.shape[:3], -1), -1, k_index)
        diff = k_blk.view_as(k_pos)[..., None, :] - centre.view_as(q_pos)[..., :, None]
        counts += ((diff >= -before) & (diff <= after)).float()
    return counts.clamp_min(1)


def pair_entries(
    q_order: Tensor,
    k_order: Tensor,
    key_blocks: Tensor,
    pairs,
    *,
    q_block: int,
    k_block: int,
    before: int,
    after: int,
    self_pairs: SelfPairs,
    correct_duplicates: bool,
) -> Tensor:
    """How many times the merged rounds count each covered pair: `(B, H, T, A)` int64, rank order.

    A pair enters round r when the key's block lies in the window of the query's block, as
    ``sorted_block_attention`` attends it: once per such round, with the own-position rule of
    ``self_pairs`` (not in the blocks unless "none"; R times through the column for "column");
    with ``correct_duplicates``, once in all if at all. The slots' own validity (real keys, not
    after the query when causal) is the caller's. Used to take the pairs a method found out of
    its softmax (``lshattn.local.merge_local``).

    Args:
        q_order: `(B, H, R, Tp)`, k_order: `(B, H, R, Sp)` sorted position -> token index.
        key_blocks: `(B, Nq)` (``matched_key_blocks``).
        pairs: the call's ``lshattn.local.LocalPairs`` (T queries, S keys; T <= Tp, S <= Sp).
    """
    R, T = q_order.shape[2], pairs.valid.shape[1]
    centre = query_key_blocks(q_order, q_block, key_blocks)[..., :T]  # (B, H, R, T)
    key_block = inverse_order(k_order) // k_block  # (B, H, R, Sp): slots past S are never valid
    counts = pairs.per_slot(
        pairs.queries(centre.transpose(2, 3)),
        pairs.keys(key_block.transpose(2, 3)),
        lambda query_centre, key: ((key - query_centre >= -before) & (key - query_centre <= after)).sum(-1),
    )
    if self_pairs != "none":
        counts = counts.masked_fill(pairs.own()[:, None], R if self_pairs == "column" else 0)
    if correct_duplicates:
        counts = counts.clamp(max=1)
    return counts


def softmax_with_lse(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its log-sum-exp, safe for rows that are all -inf.

    Such rows get probabilities 0 and lse -inf, with finite gradients everywhere: the row max
    is replaced by 0 before it is subtracted, and the log never sees an exact zero.

    Returns:
        probs like ``scores``, lse ``scores.shape[:-1]``.
    """
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    tiny = torch.finfo(total.dtype).tiny
    probs = weights / total.clamp_min(tiny)
    lse = torch.where(total > 0, row_max + total.clamp_min(tiny).log(), float("-inf"))
    return probs, lse.squeeze(-1)


def merge_softmax(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge softmax attentions over disjoint entry sets into one, by their log-sum-exps.

    ``Σ_p softmax_p(lse_p) · out_p`` equals one softmax over the union of the entries (an entry
    present in several parts counts once per part).

    Args:
        out: `(..., P, Dv)` per-part outputs. lse: `(..., P)` per-part log-sum-exps (-inf: empty).

    Returns:
        out `(..., Dv)` (zero where every part is empty) and lse `(...)`.
    """
    weights, merged_lse = softmax_with_lse(lse)
    return torch.einsum("...p,...pv->...v", weights, out), merged_lse


def merge_entry(out: Tensor, lse: Tensor, logit: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Merge one more softmax entry into each row: a softmax part ``out`` `(..., Dv)` of
    log-sum-exp ``lse`` `(...)` and an entry of ``logit`` `(...)` (-inf: none) and ``value``
    `(..., Dv)`. Two parts, weighed elementwise (``merge_softmax`` would stack both outputs)."""
    weights, lse = softmax_with_lse(torch.stack([lse, logit], dim=-1))
    return torch.addcmul(out * weights[..., :1], value, weights[..., 1:]), lse


def merge_rounds(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge hash rounds: ``Σ_r softmax_r(lse_r) · out_r`` (Reformer, SMYRF).

    Args:
        out: `(B, H, R, T, Dv)`. lse: `(B, H, R, T)`.

    Returns:
        out `(B, H, T, Dv)` (zero where no round saw a key) and lse `(B, H, T)`.
    """
    if out.shape[2] == 1:
        return out[:, :, 0], lse[:, :, 0]
    return merge_softmax(out.transpose(2, 3), lse.transpose(2, 3))


def finish_output(out: Tensor, length: int, query_valid: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Drop internal padding, zero padded queries, cast to the caller's dtype.

    Args:
        out: `(B, H, Tp, Dv)`. query_valid: `(B, T)` bool or None.
    """
    out = out[:, :, :length]
    if query_valid is not None:
        out = out * query_valid[:, None, :, None]
    return out.to(dtype)
