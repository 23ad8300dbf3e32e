"""SimHash (BERT-LSH): softmax attention in which only query–key pairs with colliding SimHash
codes are scored.

The work is done on colliding pairs only, never on a T×S matrix: per hash table, queries and
keys are sorted by their code, cut into blocks of ``PAIR_BLOCK`` sorted slots, and each query
block is scored against the key blocks whose code range meets its own (``plan_collisions``).
Those block pairs are processed in chunks of at most about ``PAIR_BUDGET`` scores
(``collision_chunks``), so memory stays bounded even when coarse codes make a quarter of all
pairs collide. The same machinery computes YOSO's query and key gradients (``lshattn.methods.yoso``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.api import Inputs, SparseMethod
from lshattn.blocks import compute_dtype, finish_output, pad_length
from lshattn.cost import Cost
from lshattn.hashing import MAX_SIMHASH_BITS, draw_per_group, hashed_once_a_group, simhash_codes, simhash_flops
from lshattn.local import CoverRule, cover_rule, local_pairs, local_scores, merge_local, with_local_cost

__all__ = [
    "SimHash",
    "SimHashAux",
    "PAIR_BLOCK",
    "PAIR_BUDGET",
    "CollisionPlan",
    "CollisionChunk",
    "Collisions",
    "CollisionSoftmax",
    "CoveredRanks",
    "ImportanceWeights",
    "block_size",
    "build_collisions",
    "collision_chunks",
    "collision_fraction",
    "flat_codes",
    "plan_collisions",
]

# Sorted slots per block (fewer for short sequences: see ``block_size``). Buckets of a few dozen
# tokens (8-bit codes at 16k tokens hold ~64) then span one or two blocks, so a large part of the
# scores computed are colliding pairs.
PAIR_BLOCK = 64

# Scores computed at once: one chunk of block pairs (a chunk may exceed it by one query block's
# pairs, since a query block is never split).
PAIR_BUDGET = 1 << 22


class SimHashAux(NamedTuple):
    """What ``SimHash`` did, enough to rebuild its attention pattern.

    Query i and key j collide when their codes are equal in at least one table (``rule="any"``)
    or in every table (``rule="all"``); the masks then decide whether the pair is visible.

    Attributes:
        query_codes: `(B, H, R, T)` int64 code of each query in each of the R = num_hashes tables.
        key_codes: `(B, H, R, S)` likewise for keys.
        dot_products: colliding visible pairs scored, each pair once however many tables it
            collides in (B·H summed, real queries only): the paper's dot-product count; plus
            the slots of ``sinks`` and ``window`` (in importance mode the colliding pairs they
            cover are not scored twice: they leave the collisions).
        scores_computed: query–key products the blocked implementation evaluated, colliding
            or not (at least ``dot_products``; the rest is the price of working in blocks).
    """

    query_codes: Tensor
    key_codes: Tensor
    dot_products: int
    scores_computed: int


@dataclasses.dataclass(frozen=True)
class SimHash(SparseMethod):
    """SimHash attention (BERT-LSH, Li & Yip 2024): softmax over the pairs whose codes collide.

    Queries and keys are hashed by the same ``num_hashes`` tables of ``num_bits`` sign bits of
    Gaussian projections (``lshattn.hashing.simhash_codes``). A pair collides with probability
    1 − (1 − (1 − θ/π)^num_bits)^num_hashes for ``rule="any"`` (codes equal in some table: the
    reference code's rule, the default) or (1 − θ/π)^(num_hashes·num_bits) for ``rule="all"``
    (codes equal in every table: the paper's text), θ being the angle between q and k. Colliding
    pairs get the logit ``scale · q_i·k_j`` (the reference code wrote q_i·k_j into s[j, i] as
    well; here every pair gets its own score). With several tables a pair counts once.

    * ``mode="faithful"`` (default) reproduces the reference code: non-colliding visible keys
      keep logit 0, so they still share the softmax mass. It is computed without a T×S matrix
      from ``out_i = (Σ_{j∈C_i} (e^{s_ij} − 1)·v_j + Σ_j v_j) / (Σ_{j∈C_i} (e^{s_ij} − 1) + n_i)``,
      n_i being the keys query i may see: only colliding pairs are scored. A query none of whose
      keys collide gets the mean of the values it may see.
    * ``mode="sparse"`` excludes non-colliding pairs: softmax attention restricted to the
      colliding pairs. A query none of whose visible keys collide gets zeros (as a query that
      sees no key does).
    * ``mode="importance"`` is MagicPIG's estimator (Chen et al. 2024): the colliding pairs are
      a sample of the keys drawn by the hashing, each weighted by 1 / P(collide | θ), so that the
      weighted sums ``Σ_{j∈C_i} e^{s_ij}·v_j / P_ij`` and ``Σ_{j∈C_i} e^{s_ij} / P_ij`` are unbiased
      for the full softmax's numerator and denominator over all visible keys (the output, their
      ratio, is consistent, not unbiased). Keys similar to the query collide often and count
      about once; dissimilar ones rarely and count for many. Pairs covered by ``sinks`` and
      ``window`` are attended exactly and left out of the sample (so they count once, at weight
      1). The weights are constants of the inputs' directions: gradients flow through the
      scores and values, not through the weights. Many tables of several bits (MagicPIG uses
      K = 8–10 bits, L = 75–150 tables at long contexts) sample close to the softmax. A query
      with no collision and no covered key gets zeros.

    Fewer bits or more tables (``rule="any"``) let more pairs collide: ``num_bits=0`` makes every
    pair collide, which is exact softmax attention in both modes (the method's exact limit). The
    trained BERT-LSH models used ``num_bits=2, num_hashes=1`` (4 buckets, so a quarter of all
    pairs are scored); the default, 8 bits in one table, scores about 1/256 of the pairs of
    unrelated tokens and far more of similar ones. Expected work: see ``cost``; the work done is
    in ``return_aux``.

    ``causal=True`` counts only keys at positions <= the query's, both for collisions and for
    n_i. Collisions are decided pair by pair, so the output at t depends on nothing after t.
    Attention dropout is not supported (faithful mode would need a T×S dropout mask).

    ``sinks`` and ``window`` (``lshattn.SparseMethod``) give the pairs they cover their exact
    logit ``scale · q_i·k_j`` whether their codes collide or not (in faithful mode such a pair
    no longer sits at logit 0), each counted once.
    """

    name: ClassVar[str] = "simhash"
    supports_dropout: ClassVar[bool] = False
    cost_depends_on_data: ClassVar[bool] = True
    num_hashes: int = 1
    num_bits: int = 8
    rule: Literal["any", "all"] = "any"
    mode: Literal["faithful", "sparse", "importance"] = "faithful"

    def _check_fields(self) -> None:
        """Ranges; ``Method.__post_init__`` has checked the types (and ``rule`` and ``mode``
        against their options) and calls this."""
        if self.num_hashes < 1:
            raise ValueError(f"SimHash num_hashes must be >= 1, got {self.num_hashes}")
        if not 0 <= self.num_bits <= MAX_SIMHASH_BITS:
            raise ValueError(
                f"SimHash num_bits must be in [0, {MAX_SIMHASH_BITS}] (codes are int64), got {self.num_bits}"
            )
        if self.rule == "all" and self.num_hashes * self.num_bits > MAX_SIMHASH_BITS:
            raise ValueError(
                f"SimHash rule='all' packs the num_hashes·num_bits = {self.num_hashes}·{self.num_bits} = "
                f"{self.num_hashes * self.num_bits} bits of a token into one int64 code, at most "
                f"{MAX_SIMHASH_BITS}; use fewer tables or bits (h tables of b bits under rule='all' "
                f"collide exactly like one table of h·b bits)"
            )

    def _check_inputs(self, inputs: Inputs) -> None:
        if inputs.dropout_p > 0:
            raise ValueError(
                f"SimHash does not implement attention dropout, got dropout_p={inputs.dropout_p}: its "
                f"faithful mode gives mass to every visible key, which would need a T×S dropout mask; "
                f"pass dropout_p=0 (e.g. evaluate the model in eval mode)"
            )

    def _attend(self, inputs: Inputs) -> tuple[Tensor, SimHashAux]:
        q, k, v = inputs.q, inputs.k, inputs.v
        _, H, T, D = q.shape
        dtype = compute_dtype(q.dtype)

        planes = self.planes(H, D, inputs.generator, q.device, inputs.kv_groups)
        importance = self.mode == "importance"
        with torch.no_grad():
            q_codes = simhash_codes(q, planes)
            k_codes = hashed_once_a_group(simhash_codes, k, planes, inputs.kv_groups)
            q_tables, table_bits = self.table_codes(q_codes)
            k_tables, _ = self.table_codes(k_codes)
            # Importance weights stand for the keys not found; the covered ones are attended
            # exactly instead, so the collisions leave them out.
            covered = cover_rule(inputs, self.sinks, self.window) if importance else None
            collisions = build_collisions(
                q_tables, k_tables, inputs.query_padding_mask, inputs.key_padding_mask, table_bits,
                causal=inputs.causal, dedup=True, covered=covered,
            )  # fmt: skip

        out_dtype, (q, k, v) = q.dtype, (x.to(dtype) for x in (q, k, v))
        faithful = self.mode == "faithful"
        weights = None
        if importance:
            weights = ImportanceWeights.of(q, k, table_bits, q_tables.shape[2])
        pairs = local_pairs(inputs, self.sinks, self.window)
        aside_count = aside_values = None
        if pairs is not None:  # in the slots' rank order
            q_ranked, v_ranked = pairs.queries(q), pairs.keys(v)
            scores = local_scores(q_ranked, pairs.keys(k), pairs, inputs.scale)
            collide = pairs.per_slot(
                pairs.queries(q_tables.transpose(2, 3)), pairs.keys(k_tables.transpose(2, 3)),
                lambda query_codes, key_codes: (query_codes == key_codes).any(-1),
            ) & pairs.valid[:, None]  # fmt: skip
            if faithful:
                # Covered keys that collide with nothing leave the logit-0 part, by count and value
                # sum: subtracting their e^0 from the softmax afterwards would cancel catastrophically
                # when it outweighs their own e^s.
                apart = (pairs.valid[:, None] & ~collide).to(q.dtype)
                aside_count, aside_values = apart.sum(-1), pairs.weighted_sum(apart, v_ranked)
                aside_count, aside_values = pairs.restore(aside_count), pairs.restore(aside_values)
        out, lse, count = CollisionSoftmax.apply(
            q, k, v, collisions, inputs.scale, faithful, aside_count, aside_values, weights
        )
        dot_products = int(count)
        if pairs is not None:
            # The colliding covered pairs are in the method's part at their score already: the
            # same ``scores`` taken out and put back in cancel exactly. (Importance weighting
            # left them out.)
            found = scores.masked_fill(~collide | importance, float("-inf"))
            out, _ = merge_local(pairs.queries(out), pairs.queries(lse), scores, found, v_ranked, pairs)
            out = pairs.restore(out)
            dot_products += q.shape[0] * H * T * pairs.slots
        out = finish_output(out, T, inputs.query_padding_mask, out_dtype)
        aux = SimHashAux(q_codes, k_codes, dot_products, collisions.scores_computed)
        return out, aux

    def planes(
        self, H: int, D: int, generator: torch.Generator | None, device: torch.device, groups: int = 1
    ) -> Tensor:
        """`(H, D, num_hashes, num_bits)` projections, drawn from ``generator``, one a ``groups``
        heads (``hashing.draw_per_group``): a call and the decoding steps after it
        (``lshattn.decode``) hash alike with the same generator state."""
        return draw_per_group((H, D, self.num_hashes, self.num_bits), groups, generator, device)

    def table_codes(self, codes: Tensor) -> tuple[Tensor, int]:
        """The codes pairs collide on, from `(B, H, num_hashes, L)` SimHash codes, and their bits:
        the codes themselves under ``rule="any"``; under ``"all"`` (equal in every table = equal
        concatenated code) one table of ``num_hashes·num_bits`` bits, `(B, H, 1, L)`."""
        if self.rule == "any":
            return codes, self.num_bits
        shifts = torch.arange(self.num_hashes, device=codes.device).view(1, 1, -1, 1) * self.num_bits
        return (codes << shifts).sum(2, keepdim=True), self.num_hashes * self.num_bits

    def cost(self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4) -> Cost:
        """Expected cost for queries and keys of independent, uniformly random directions.

        The work depends on the data (how many pairs collide); ``return_aux`` reports what a
        call did. With ``n = B·H·T·S`` pairs (``B·H·T·(T+1)/2`` when causal) and ``f`` the
        probability that such a pair collides (``collision_fraction``: the angle of two random
        directions in D dims has density ∝ sin^(D−2) θ):

        * dot_products = ``f·n`` (the colliding pairs, each counted once);
        * flops = ``2·dot_products·(D + Dv)`` (scores and weighted values), plus
          ``2·dot_products·Dv`` in faithful mode with several tables under ``rule="any"`` (the
          colliding values' sum; one table gets it from bucket sums), plus the hashing
          ``hashing.simhash_flops(B·H·(T + S), D, num_hashes, num_bits)``; the block pairs also
          score the non-colliding pairs that share a block, which this does not count;
        * memory_bytes = the larger of one chunk of scores (``PAIR_BUDGET``, or every block pair
          when fewer) and the per-query accumulators ``B·H·T·(Dv + 2)``, times ``itemsize``;
        * in importance mode each colliding pair's weight (an arccos and two logarithms) is
          not counted;
        * plus the slots of ``sinks`` and ``window`` (``lshattn.local.local_cost``; in faithful
          mode also ``2·slots·Dv`` to take their values out of the logit-0 part).
        """
        pairs = B * H * T * (T + 1) // 2 if causal else B * H * T * S
        fraction = collision_fraction(D, self.num_bits, self.num_hashes, self.rule)
        dots = round(fraction * pairs)
        flops = 2 * dots * (D + Dv) + simhash_flops(B * H * (T + S), D, self.num_hashes, self.num_bits)
        if self.mode == "faithful" and self.rule == "any" and self.num_hashes > 1:
            flops += 2 * dots * Dv
        bits = self.num_bits if self.rule == "any" else self.num_bits * self.num_hashes
        block = block_size(T, S, S / 2 ** min(bits, 62))  # for random directions: about the mean bucket
        all_blocks = B * H * pad_length(T, block) * pad_length(S, block)
        largest = max(min(PAIR_BUDGET, all_blocks), B * H * T * (Dv + 2))
        cost = Cost(flops=flops, dot_products=dots, memory_bytes=largest * itemsize, budget=dots / (B * H * T * S))
        # in faithful mode the covered keys' values also leave the logit-0 part's sum
        aside = 2 * Dv if self.mode == "faithful" else 0
        return with_local_cost(cost, self, B, H, T, S, D, Dv, causal=causal, itemsize=itemsize, flops_per_slot=aside)


def collision_fraction(D: int, num_bits: int, num_hashes: int, rule: str = "any") -> float:
    """Probability that two independent, uniformly random directions in D dims collide.

    Per table the codes are equal with probability p(θ) = (1 − θ/π)^num_bits; the tables are
    independent given θ, so a pair collides with probability 1 − (1 − p)^num_hashes under
    ``rule="any"`` and p^num_hashes under ``rule="all"``. θ has density ∝ sin^(D−2) θ on [0, π]
    (θ is 0 or π with probability 1/2 each when D = 1); the mean is a Simpson quadrature.
    """

    def collide(theta: float) -> float:
        p = (1 - theta / math.pi) ** num_bits
        return 1 - (1 - p) ** num_hashes if rule == "any" else p**num_hashes

    if D == 1:
        return (collide(0.0) + collide(math.pi)) / 2
    n = 2048
    thetas = [math.pi * i / n for i in range(n + 1)]
    weights = [(1 if i in (0, n) else 4 if i % 2 else 2) * math.sin(t) ** (D - 2) for i, t in enumerate(thetas)]
    return sum(w * collide(t) for w, t in zip(weights, thetas)) / sum(weights)


# --- colliding pairs in blocks --------------------------------------------------------------


def block_size(T: int, S: int, bucket: float | None = None) -> int:
    """Slots per block: ``PAIR_BLOCK``, or the power of two that holds the longer sequence; given
    the typical ``bucket`` a token sits in, no more than the power of two that holds it (at least
    8), so that a block pair holds mostly colliding pairs when buckets are small (``row_blocks``
    chooses per row). At 128 tokens, 8 tables of 5 bits: blocks of 8 run 3.7× faster than blocks
    of 64 on random data, which score every pair 8 times over."""
    block = min(PAIR_BLOCK, 1 << (max(T, S) - 1).bit_length())
    if bucket is None:
        return block
    return min(block, max(8, 1 << (max(1, math.ceil(bucket)) - 1).bit_length()))


def row_blocks(k_codes: Tensor, k_valid: Tensor | None, T: int, num_bits: int) -> Tensor:
    """`(BH,)` slots per block for each row of `(BH, S)` key codes: ``block_size`` of the bucket a
    random valid key of that row sits in, ``Σ n² / Σ n`` over its buckets. Real activations crowd
    into a few buckets, far larger than ``S / 2^num_bits``; each row's choice depends on its own
    codes only, so no sequence changes another's blocks (nor its rounding)."""
    S = k_codes.shape[1]
    codes = k_codes.long()
    if k_valid is not None:
        codes = codes.masked_fill(~k_valid, 2**num_bits)
    codes = torch.sort(codes, dim=-1).values
    size = torch.searchsorted(codes, codes, right=True) - torch.searchsorted(codes, codes)  # own bucket's
    valid = codes < 2**num_bits
    typical = (size * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    largest = block_size(T, S)
    # the power of two at or above the typical bucket, in [8, largest]
    power = torch.ceil(torch.log2(typical.double().clamp_min(1))).long()
    return torch.minimum(torch.full_like(power, largest), 2 ** power.clamp(3, 6))


class CollisionPlan(NamedTuple):
    """The block pairs of one hash table that hold all of its colliding pairs.

    Queries and keys are sorted by code (ties by position) and cut into blocks of ``PAIR_BLOCK``
    slots; query block n is paired with every key block whose code range meets its own, so each
    colliding pair lies in exactly one block pair. Invalid tokens and the slots past the end
    carry sentinel codes that match nothing. Flat indices count rows of `(B·H·L, E)` tensors,
    ``(b·H + h)·L + t``; index ``B·H·L`` is a dump row for the slots past the end.

    Attributes:
        q_index: `(B·H·NQ, c)` flat query index of each sorted slot.
        k_index: `(B·H·NK, c)` flat key index of each sorted slot.
        q_codes: `(B·H·NQ, c)` code of each query slot. k_codes: `(B·H·NK, c)`.
        rows: `(P,)` query block of each block pair, ascending. cols: `(P,)` its key block.
        bounds: chunk boundaries into the P pairs; every chunk holds whole query blocks.
    """

    q_index: Tensor
    k_index: Tensor
    q_codes: Tensor
    k_codes: Tensor
    rows: Tensor
    cols: Tensor
    bounds: list[int]


class CollisionChunk(NamedTuple):
    """One chunk of block pairs, with the mask of the pairs that count.

    Attributes:
        q_index: `(P, c)` flat query index of each query slot of each block pair.
        k_index: `(P, c)` flat key index of each key slot.
        mask: `(P, c, c)` bool: the codes collide in this table (and in no earlier one when
            deduplicating), and the key is visible to the query.
        local: `(P,)` query block of each pair, counted from the chunk's first.
        block_index: `(N, c)` flat query index of the slots of the chunk's N query blocks.
        rows: `(P,)` query block of each pair (into the plan's blocks). cols: `(P,)` key block.
    """

    q_index: Tensor
    k_index: Tensor
    mask: Tensor
    local: Tensor
    block_index: Tensor
    rows: Tensor
    cols: Tensor


def plan_collisions(
    q_codes: Tensor, k_codes: Tensor, q_valid: Tensor | None, k_valid: Tensor | None, num_bits: int, *,
    causal: bool, block: int | None = None, budget: int | None = None, row_ids: Tensor | None = None,
    total_rows: int | None = None,
) -> CollisionPlan:  # fmt: skip
    """Sort one table's codes and list the block pairs that can hold colliding pairs.

    Args:
        q_codes: `(BH, T)` integer codes (int32 or int64) in ``[0, 2^num_bits)``. k_codes: `(BH, S)`.
        q_valid: `(BH, T)` bool or None (all valid). k_valid: `(BH, S)` bool or None.
        causal: drop block pairs whose keys all come after all of their queries.
        block: slots per block (default ``block_size(T, S)``).
        budget: scores per chunk (default ``PAIR_BUDGET``).
        row_ids: `(BH,)` the rows' indices among ``total_rows`` (a plan for some of the rows of a
            call: flat indices count all of them). Default: all rows, ``arange(BH)``.
    """
    BH, T = q_codes.shape
    S = k_codes.shape[1]
    budget = PAIR_BUDGET if budget is None else budget
    device = q_codes.device
    # int64 whatever the codes' dtype: the sentinels need num_bits + 1 bits (YOSO passes int32
    # codes for τ <= 31, and 2^31 does not fit them).
    q_codes, k_codes = q_codes.long(), k_codes.long()
    q_sentinel, k_sentinel = 2**num_bits, 2**num_bits + 1  # match nothing, not even each other
    if q_valid is not None:
        q_codes = q_codes.masked_fill(~q_valid, q_sentinel)
    if k_valid is not None:
        k_codes = k_codes.masked_fill(~k_valid, k_sentinel)
    q_sorted, q_order = torch.sort(q_codes, dim=-1, stable=True)
    k_sorted, k_order = torch.sort(k_codes, dim=-1, stable=True)
    block = block_size(T, S) if block is None else block
    row_ids = torch.arange(BH, device=device) if row_ids is None else row_ids
    total_rows = BH if total_rows is None else total_rows
    t_pad, s_pad = pad_length(T, block), pad_length(S, block)
    q_index = F.pad(q_order + row_ids[:, None] * T, (0, t_pad - T), value=total_rows * T)
    k_index = F.pad(k_order + row_ids[:, None] * S, (0, s_pad - S), value=total_rows * S)
    q_sorted = F.pad(q_sorted, (0, t_pad - T), value=q_sentinel).view(BH, -1, block)
    k_sorted = F.pad(k_sorted, (0, s_pad - S), value=k_sentinel).view(BH, -1, block)
    nq, nk = t_pad // block, s_pad // block

    # Key blocks whose code range [first, last] meets the query block's range of valid codes.
    q_real = q_sorted < q_sentinel
    q_first = q_sorted[..., 0].contiguous()
    q_last = q_sorted.masked_fill(~q_real, -1).amax(-1).contiguous()
    start = torch.searchsorted(k_sorted[..., -1].contiguous(), q_first, side="left")
    stop = torch.searchsorted(k_sorted[..., 0].contiguous(), q_last, side="right")
    counts = ((stop - start).clamp_min(0) * (q_last >= 0)).reshape(-1)
    rows = torch.repeat_interleave(torch.arange(BH * nq, device=device), counts)
    offsets = counts.cumsum(0) - counts
    cols = start.reshape(-1)[rows] + torch.arange(rows.numel(), device=device) - offsets[rows]
    cols = cols + (rows // nq) * nk
    if causal:  # positions within a (b, h) row are the flat index modulo the length
        q_pos = torch.where(q_real, q_index.view(BH, nq, block) % T, -1).amax(-1).reshape(-1)
        k_real = k_sorted <= 2**num_bits - 1
        k_pos = torch.where(k_real, k_index.view(BH, nk, block) % S, S).amin(-1).reshape(-1)
        keep = k_pos[cols] <= q_pos[rows]
        rows, cols = rows[keep], cols[keep]

    pairs = rows.numel()
    bounds = [0]
    if pairs:
        per_chunk = max(1, budget // (block * block))
        row_start = torch.ones(pairs, dtype=torch.bool, device=device)
        row_start[1:] = rows[1:] != rows[:-1]
        starts = row_start.nonzero()[:, 0]
        chunk_of = starts // per_chunk
        first = torch.ones_like(chunk_of, dtype=torch.bool)
        first[1:] = chunk_of[1:] != chunk_of[:-1]
        bounds = starts[first].tolist() + [pairs]
    return CollisionPlan(
        q_index.view(-1, block), k_index.view(-1, block), q_sorted.view(-1, block), k_sorted.view(-1, block),
        rows, cols, bounds,
    )  # fmt: skip


def collision_chunks(
    plan: CollisionPlan, *, causal: bool, T: int, S: int, earlier: tuple[Tensor, Tensor] | None = None,
    covered: CoveredRanks | None = None, exclude_own: bool = False,
) -> Iterator[CollisionChunk]:  # fmt: skip
    """The chunks of a plan, each with its mask of counted pairs.

    Args:
        plan: from ``plan_collisions``.
        causal: a key counts only at a position <= the query's.
        T, S: query and key lengths (flat index modulo length = position).
        earlier: flat codes `(B·H·T + 1, t)` and `(B·H·S + 1, t)` of the earlier tables; a pair
            that collides in one of them is not counted here, so with several tables every
            pair counts once.
        covered: pairs left out (the caller attends them). exclude_own: leave out the pairs of a
            query and the key at its own position (T == S).
    """
    for lo, hi in zip(plan.bounds[:-1], plan.bounds[1:]):
        rows, cols = plan.rows[lo:hi], plan.cols[lo:hi]
        first, last = int(rows[0]), int(rows[-1])
        q_index, k_index = plan.q_index.index_select(0, rows), plan.k_index.index_select(0, cols)
        mask = plan.q_codes.index_select(0, rows)[:, :, None] == plan.k_codes.index_select(0, cols)[:, None, :]
        if causal or exclude_own:
            q_pos, k_pos = (q_index % T)[:, :, None], (k_index % S)[:, None, :]
            if causal:
                mask &= q_pos > k_pos if exclude_own else q_pos >= k_pos
            else:
                mask &= q_pos != k_pos
        if earlier is not None:
            q_earlier, k_earlier = earlier[0][q_index], earlier[1][k_index]  # (P, c, t)
            for table in range(q_earlier.shape[-1]):  # one (P, c, c) mask at a time, not (P, c, c, t)
                mask &= q_earlier[:, :, None, table] != k_earlier[:, None, :, table]
        if covered is not None:
            mask &= ~covered.rule.covers(covered.queries[q_index][:, :, None], covered.keys[k_index][:, None, :])
        yield CollisionChunk(q_index, k_index, mask, rows - first, plan.q_index[first : last + 1], rows, cols)


def flat_codes(codes: Tensor, dump: int) -> Tensor:
    """`(B, H, R, L)` codes as `(B·H·L + 1, R)` rows of the flat index, the last row ``dump``."""
    B, H, R, L = codes.shape
    rows = codes.permute(0, 1, 3, 2).reshape(B * H * L, R)
    return torch.cat([rows, rows.new_full((1, R), dump)])


class CoveredRanks(NamedTuple):
    """A ``CoverRule`` with its ranks flat: `(B·H·T + 1,)` and `(B·H·S + 1,)`, the last entry
    (slots past the end) ``CoverRule.UNRANKED``."""

    rule: CoverRule
    queries: Tensor
    keys: Tensor

    @classmethod
    def of(cls, rule: CoverRule, H: int) -> CoveredRanks:
        def flat(ranks: Tensor) -> Tensor:
            rows = ranks[:, None, :].expand(ranks.shape[0], H, ranks.shape[1]).reshape(-1)
            return torch.cat([rows, rows.new_full((1,), CoverRule.UNRANKED)])

        return cls(rule, flat(rule.query_ranks), flat(rule.key_ranks))


class Collisions(NamedTuple):
    """Every table's plan for one call, and what the kernels need to read them.

    Attributes:
        plans: per table, its ``CollisionPlan`` parts: one per block size its rows chose
            (``row_blocks``), each over some of the rows.
        earlier: per table, the flat codes of the earlier tables (deduplication), or None.
        q_valid: `(B·H, T)` bool or None. k_valid: `(B·H, S)` bool or None.
        shape: (B, H, T, S). causal: whether keys after the query are hidden.
        scores_computed: query–key products the plans evaluate, colliding or not.
        q_codes: `(B, H, R, T)` the codes. k_codes: `(B, H, R, S)`. num_bits: their length.
        covered: pairs left out of every chunk (the caller attends them), or None.
        exclude_own: the pair of a query and the key at its own position is left out (T == S;
            whole-bucket Reformer attends it apart, counted once per round).
    """

    plans: list[list[CollisionPlan]]
    earlier: list[tuple[Tensor, Tensor] | None]
    q_valid: Tensor | None
    k_valid: Tensor | None
    shape: tuple[int, int, int, int]
    causal: bool
    scores_computed: int
    q_codes: Tensor
    k_codes: Tensor
    num_bits: int
    covered: CoveredRanks | None = None
    exclude_own: bool = False

    @property
    def tables(self) -> int:
        """The number of hash tables."""
        return len(self.plans)

    def parts(self) -> Iterator[tuple[int, CollisionPlan]]:
        """Every part of every table's plan, with its table."""
        return ((table, plan) for table, parts in enumerate(self.plans) for plan in parts)

    def chunks(self, table: int, plan: CollisionPlan) -> Iterator[CollisionChunk]:
        """The chunks of one part of a table's plan, with their masks (see ``collision_chunks``)."""
        _, _, T, S = self.shape
        return collision_chunks(
            plan, causal=self.causal, T=T, S=S, earlier=self.earlier[table], covered=self.covered,
            exclude_own=self.exclude_own,
        )  # fmt: skip


def build_collisions(
    q_codes: Tensor, k_codes: Tensor, query_padding_mask: Tensor | None, key_padding_mask: Tensor | None,
    num_bits: int, *, causal: bool, dedup: bool, covered: CoverRule | None = None, exclude_own: bool = False,
) -> Collisions:  # fmt: skip
    """Plans for every table of `(B, H, R, T)` and `(B, H, R, S)` codes in ``[0, 2^num_bits)``.

    ``dedup=True`` counts a pair in the first table where it collides only (the union over
    tables); ``dedup=False`` counts it in every table where it collides. ``covered``: pairs
    counted in no table (the caller attends them itself); ``exclude_own`` likewise for each
    query's own position (T == S).
    """
    B, H, R, T = q_codes.shape
    S = k_codes.shape[-1]

    def per_row(mask: Tensor | None, length: int) -> Tensor | None:
        return None if mask is None else mask[:, None, :].expand(B, H, length).reshape(B * H, length)

    q_valid, k_valid = per_row(query_padding_mask, T), per_row(key_padding_mask, S)
    plans = [
        _table_plans(q_codes[:, :, r].reshape(B * H, T), k_codes[:, :, r].reshape(B * H, S), q_valid, k_valid,
                     num_bits, causal)
        for r in range(R)  # a loop over hash tables
    ]  # fmt: skip
    earlier: list[tuple[Tensor, Tensor] | None] = [None] * R
    if dedup and R > 1:
        q_flat, k_flat = flat_codes(q_codes, -1), flat_codes(k_codes, -2)
        earlier = [None] + [(q_flat[:, :r], k_flat[:, :r]) for r in range(1, R)]
    computed = sum(p.rows.numel() * p.q_index.shape[1] ** 2 for parts in plans for p in parts)
    ranks = None if covered is None else CoveredRanks.of(covered, H)
    return Collisions(
        plans, earlier, q_valid, k_valid, (B, H, T, S), causal, computed, q_codes, k_codes, num_bits, ranks,
        exclude_own,
    )  # fmt: skip


def _table_plans(
    q_codes: Tensor, k_codes: Tensor, q_valid: Tensor | None, k_valid: Tensor | None, num_bits: int, causal: bool
) -> list[CollisionPlan]:
    """One table's plan, in one part per block size its rows choose (``row_blocks``; at most four)."""
    BH, T = q_codes.shape
    blocks = row_blocks(k_codes, k_valid, T, num_bits)
    sizes = torch.unique(blocks).tolist()
    if len(sizes) == 1:
        return [plan_collisions(q_codes, k_codes, q_valid, k_valid, num_bits, causal=causal, block=sizes[0])]
    parts = []
    for size in sizes:  # a loop over at most four block sizes
        ids = (blocks == size).nonzero()[:, 0]

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, ids)

        parts.append(plan_collisions(
            pick(q_codes), pick(k_codes), pick(q_valid), pick(k_valid), num_bits, causal=causal, block=size,
            row_ids=ids, total_rows=BH,
        ))  # fmt: skip
    return parts


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Rows of a flat `(N, E)` tensor at `(P, c)` indices: `(P, c, E)`. The dump index N (a
    slot past the end, whose pairs are all masked) reads row N − 1."""
    return x.index_select(0, index.reshape(-1).clamp_max(x.shape[0] - 1)).view(*index.shape, x.shape[-1])


class ImportanceWeights(NamedTuple):
    """MagicPIG's importance weights: a colliding pair counts 1 / P(collide | θ) times, its logit
    ``scale·q·k − log P``. P is the chance that ``num_hashes`` tables of ``num_bits`` bits collide
    in at least one, ``1 − (1 − (1 − θ/π)^num_bits)^num_hashes`` (rule "all" is one table of all
    the bits); the angle comes from the pair's product and the norms, so the weights are constants
    of the detached inputs (no gradient flows through them).

    Attributes:
        q_norms: `(B·H·T + 1,)` ‖q‖ of each flat query (the last: slots past the end).
        k_norms: `(B·H·S + 1,)` ‖k‖ likewise.
    """

    q_norms: Tensor
    k_norms: Tensor
    num_bits: int
    num_hashes: int

    @classmethod
    def of(cls, q: Tensor, k: Tensor, num_bits: int, num_hashes: int) -> ImportanceWeights:
        def flat(x: Tensor) -> Tensor:
            norms = x.detach().norm(dim=-1).reshape(-1)
            return torch.cat([norms, norms.new_ones(1)])

        return cls(flat(q), flat(k), num_bits, num_hashes)

    def log_inverse(self, products: Tensor, q_index: Tensor, k_index: Tensor) -> Tensor:
        """`(P, c, c)` ``−log P(collide | θ)`` of block pairs from their products ``q·k``
        `(P, c, c)` and flat indices `(P, c)`: 0 at θ = 0, at most ``−log tiny`` (a pair at θ = π
        cannot collide unless rounding lets it)."""
        norms = self.q_norms[q_index][:, :, None] * self.k_norms[k_index][:, None, :]
        return inverse_log_probability(products.detach(), norms, self.num_bits, self.num_hashes)


def inverse_log_probability(products: Tensor, norms: Tensor, num_bits: int, num_hashes: int) -> Tensor:
    """``−log P(collide | θ)`` of pairs from their products ``q·k`` and norm products ``‖q‖‖k‖``
    (same shape): P = 1 − (1 − (1 − θ/π)^num_bits)^num_hashes, by expm1/log1p (accurate for small
    P), at most ``−log tiny``. Importance-weighted SimHash's log-weight, in the prefill and in
    decoding (``lshattn.decode``)."""
    tiny = torch.finfo(products.dtype).tiny
    cosine = (products / norms.clamp_min(tiny)).clamp(-1, 1)
    per_table = (1 - torch.acos(cosine) / math.pi) ** num_bits
    return -torch.log((-torch.expm1(num_hashes * torch.log1p(-per_table))).clamp_min(tiny))


def _scores(
    q_blk: Tensor, k_blk: Tensor, mask: Tensor, scale: float, weights: ImportanceWeights | None = None,
    chunk: CollisionChunk | None = None,
) -> Tensor:  # fmt: skip
    """``scale · q·k`` of block pairs `(P, c, D)`, `(P, c, D)`, -inf off the mask: `(P, c, c)`;
    with importance ``weights``, plus each pair's ``−log P`` (the ``chunk`` gives the indices)."""
    if weights is None:
        zero = q_blk.new_zeros(()).expand(q_blk.shape[0], q_blk.shape[1], k_blk.shape[1])
        scores = torch.baddbmm(zero, q_blk, k_blk.transpose(1, 2), beta=0, alpha=scale)
    else:
        products = torch.bmm(q_blk, k_blk.transpose(1, 2))
        scores = weights.log_inverse(products, chunk.q_index, chunk.k_index).add_(products, alpha=scale)
    return scores.masked_fill_(~mask, float("-inf"))


def _bucket_hits(v: Tensor, col: Collisions) -> tuple[Tensor, Tensor]:
    """With one table, per query: the number of visible keys sharing its bucket and the sum of
    their values, `(B·H·T,)` and `(B·H·T, Dv)`, from bucket tables instead of pairs."""
    from lshattn.methods.yoso import bucket_sums  # yoso imports this module

    B, H, T, S = col.shape
    Dv = v.shape[-1]
    q_codes, k_codes = col.q_codes.reshape(B * H, T, 1), col.k_codes.reshape(B * H, S, 1)
    if col.q_valid is not None:
        q_codes = q_codes.masked_fill(~col.q_valid[..., None], -1)
    if col.k_valid is not None:
        k_codes = k_codes.masked_fill(~col.k_valid[..., None], -2)
    counts = bucket_sums(q_codes, k_codes, v.new_ones(B * H, S, 1), col.num_bits, causal=col.causal)
    sums = bucket_sums(q_codes, k_codes, v.reshape(B * H, S, Dv), col.num_bits, causal=col.causal)
    return counts.view(B * H * T), sums.view(B * H * T, Dv)


class CollisionSoftmax(torch.autograd.Function):
    """Softmax attention over colliding pairs, optionally with every other visible key at logit 0.

    Forward: per table and chunk, the scores of the block pairs, their per-query maximum, then
    ``exp(s − max)`` summed into per-query accumulators; tables are merged by their maxima and,
    in faithful mode, a last part holds the visible non-colliding keys: their count
    ``n_i − |C_i|`` and value sum ``Σ_visible v − Σ_{C_i} v``, at logit 0 (with one table,
    ``|C_i|`` and ``Σ_{C_i} v`` come from bucket sums; with several, from the pairs). Backward
    recomputes the scores chunk by chunk, as flash attention does: ``ds = p ∘ (g·vᵀ − g·o)`` on
    colliding pairs; in faithful mode each visible key also receives ``Σ_i e^{−lse_i}·g_i`` from
    the queries for which it has logit 0 (all visible queries, minus the colliding ones).

    Returns ``(out (B, H, T, Dv), lse (B, H, T), number of colliding pairs)``: ``lse`` is the
    log-sum-exp of every entry (-inf for a query with none), differentiable like ``out`` (its
    gradient reaches q and k through the colliding pairs: ``∂lse/∂s = p``), for merging with
    other pairs (``lshattn.local.merge_local``).

    With ``importance`` weights (``mode="importance"``) each colliding pair's logit is
    ``scale·q·k − log P(collide | θ)``, the weights constants of the inputs (the backward
    recomputes them and differentiates the scores only); pairs the collisions' ``covered`` rule
    names are left out of every chunk.
    """

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, col: Collisions, scale: float, faithful: bool,
        aside_count: Tensor | None = None, aside_values: Tensor | None = None,
        importance: ImportanceWeights | None = None,
    ):  # fmt: skip
        B, H, T, _ = col.shape
        D, Dv = q.shape[-1], v.shape[-1]
        rows = B * H * T + 1  # the last row takes the writes of slots past the end
        q_flat, k_flat, v_flat = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
        # One table: the colliding pairs counted from bucket sums (they are all of its pairs
        # unless some are left out as covered).
        single = col.tables == 1 and col.covered is None and not col.exclude_own
        hit_count, hit_values = (None, None) if not single else _bucket_hits(v, col)
        if not single and faithful:
            hit_count, hit_values = q.new_zeros(rows), q.new_zeros(rows, Dv)
        count = torch.zeros((), dtype=torch.long, device=q.device)
        acc = None
        for table in range(col.tables):
            t_max = q.new_full((rows,), float("-inf"))
            t_sum, t_out = q.new_zeros(rows), q.new_zeros(rows, Dv)
            for plan in col.plans[table]:  # its parts: disjoint rows, each written once
                # Sorted copies, so that a chunk gathers whole blocks rather than single rows.
                q_sorted, k_sorted = _gather(q_flat, plan.q_index), _gather(k_flat, plan.k_index)
                v_sorted = _gather(v_flat, plan.k_index)
                for chunk in col.chunks(table, plan):
                    n, block = chunk.block_index.shape
                    q_blk, k_blk = q_sorted.index_select(0, chunk.rows), k_sorted.index_select(0, chunk.cols)
                    scores = _scores(q_blk, k_blk, chunk.mask, scale, importance, chunk)
                    row_max = q.new_full((n, block), float("-inf"))
                    row_max.scatter_reduce_(0, chunk.local[:, None].expand(-1, block), scores.amax(-1), "amax")
                    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
                    weights = torch.exp(scores.sub_(shift[chunk.local][..., None]))  # 0 off the mask
                    values = v_sorted.index_select(0, chunk.cols)
                    slots = chunk.block_index.reshape(-1)
                    t_max[slots] = row_max.view(-1)
                    t_sum[slots] = q.new_zeros(n, block).index_add_(0, chunk.local, weights.sum(-1)).view(-1)
                    summed = q.new_zeros(n, block, Dv).index_add_(0, chunk.local, torch.bmm(weights, values))
                    t_out[slots] = summed.view(-1, Dv)
                    if not single:
                        count += chunk.mask.sum()
                        if faithful:
                            hits = chunk.mask.to(q.dtype)
                            hit_count.index_add_(0, chunk.q_index.reshape(-1), hits.sum(-1).view(-1))
                            hit_values.index_add_(0, chunk.q_index.reshape(-1), torch.bmm(hits, values).view(-1, Dv))
            acc = (t_max, t_sum, t_out) if acc is None else _merge(*acc, t_max, t_sum, t_out)

        acc_max, acc_sum, acc_out = (x[:-1] for x in acc)
        if single:
            count = hit_count.double().sum().round().long()
        elif faithful:
            hit_count, hit_values = hit_count[:-1], hit_values[:-1]
        background = None  # queries with visible keys at logit 0 (faithful mode)
        if faithful:  # the visible keys that collide with nothing: one more part, at logit 0
            if aside_count is not None:  # keys the caller attends itself leave the logit-0 part
                hit_count = hit_count + aside_count.reshape(-1)
                hit_values = hit_values + aside_values.reshape(-1, Dv)
            acc_max, acc_sum, background = _add_zero_logits(v, col, hit_count, hit_values, acc_max, acc_sum, acc_out)
        tiny = torch.finfo(q.dtype).tiny
        out = acc_out.div_(acc_sum.clamp_min(tiny)[:, None])  # 0 / tiny = 0 where nothing is seen
        lse = torch.where(acc_sum > 0, acc_max + acc_sum.clamp_min(tiny).log(), float("-inf"))
        ctx.save_for_backward(q, k, v, out, lse, background)
        ctx.col, ctx.scale, ctx.faithful, ctx.aside = col, scale, faithful, aside_count is not None
        ctx.importance = importance
        ctx.mark_non_differentiable(count)
        return out.view(B, H, T, Dv), lse.view(B, H, T), count

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor, _grad_count):
        q, k, v, out, lse, background = ctx.saved_tensors
        col, scale = ctx.col, ctx.scale
        B, H, T, S = col.shape
        D, Dv = q.shape[-1], v.shape[-1]
        q_flat, k_flat, v_flat = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
        g_flat = grad_out.reshape(-1, Dv).to(q.dtype)
        finite = torch.isfinite(lse)
        zero = lse.new_zeros(1)  # the dump row of slots past the end
        # ds = p ∘ (g·vᵀ − g·o + g_lse): the log-sum-exp's gradient enters as a shift of g·o.
        delta = torch.cat([(g_flat * out).sum(-1) - grad_lse.reshape(-1).to(q.dtype), zero])
        lse_x = torch.cat([torch.where(finite, lse, torch.zeros_like(lse)), zero])
        # e^{-lse_i}: the probability of each logit-0 key of query i. Only queries that have such
        # keys get it: for the others it is not a probability, and at very negative logits it is
        # huge, so adding it to every key and subtracting it from the colliding ones would cancel
        # the true gradient (all of it below a logit of about -17 in float32).
        has_zero_logits = finite if background is None else finite & background
        zero_weight = torch.cat([torch.where(has_zero_logits, torch.exp(-lse), torch.zeros_like(lse)), zero])
        grad_q, grad_k = q.new_zeros(B * H * T + 1, D), q.new_zeros(B * H * S + 1, D)
        grad_v = q.new_zeros(B * H * S + 1, Dv)
        for table, plan in col.parts():
            q_sorted, k_sorted = _gather(q_flat, plan.q_index), _gather(k_flat, plan.k_index)
            v_sorted, g_sorted = _gather(v_flat, plan.k_index), _gather(g_flat, plan.q_index)
            for chunk in col.chunks(table, plan):
                q_blk, k_blk = q_sorted.index_select(0, chunk.rows), k_sorted.index_select(0, chunk.cols)
                v_blk, g_blk = v_sorted.index_select(0, chunk.cols), g_sorted.index_select(0, chunk.rows)
                scores = _scores(q_blk, k_blk, chunk.mask, scale, ctx.importance, chunk)
                probs = torch.exp(scores.sub_(lse_x[chunk.q_index][..., None]))
                grad_scores = probs * (torch.bmm(g_blk, v_blk.transpose(1, 2)) - delta[chunk.q_index][..., None])
                grad_q.index_add_(0, chunk.q_index.reshape(-1), torch.bmm(grad_scores, k_blk).view(-1, D), alpha=scale)
                grad_k.index_add_(
                    0, chunk.k_index.reshape(-1), torch.bmm(grad_scores.transpose(1, 2), q_blk).view(-1, D), alpha=scale
                )
                if ctx.faithful:  # these keys' logit-0 share is counted below for every visible query
                    probs -= zero_weight[chunk.q_index][..., None] * chunk.mask
                grad_v.index_add_(0, chunk.k_index.reshape(-1), torch.bmm(probs.transpose(1, 2), g_blk).view(-1, Dv))
        grad_v = grad_v[:-1].view(B, H, S, Dv)
        if ctx.faithful:
            weighted = (zero_weight[:-1, None] * g_flat).view(B, H, T, Dv)
            if col.causal:  # key j is visible to the queries i >= j
                received = weighted.flip(2).cumsum(2).flip(2)
            else:
                received = weighted.sum(2, keepdim=True)
            if col.k_valid is not None:
                received = received * col.k_valid.view(B, H, S, 1)
            grad_v = grad_v + received
        grad_aside = None
        if ctx.aside:  # their values were subtracted from the logit-0 part's sum
            grad_aside = -(zero_weight[:-1, None] * g_flat).view(B, H, T, Dv)
        grads = grad_q[:-1].view(B, H, T, D), grad_k[:-1].view(B, H, S, D), grad_v
        return *grads, None, None, None, None, grad_aside, None


def _merge(
    max_a: Tensor, sum_a: Tensor, out_a: Tensor, max_b: Tensor, sum_b: Tensor, out_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two softmax parts kept as (max logit, Σ e^{s−max}, Σ e^{s−max}·v) per query.

    ``out_a`` is updated in place (and returned); ``out_b`` is consumed."""
    new_max = torch.maximum(max_a, max_b)
    shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
    scale_a, scale_b = torch.exp(max_a - shift), torch.exp(max_b - shift)
    out = out_a.mul_(scale_a[:, None]).add_(out_b.mul_(scale_b[:, None]))
    return new_max, sum_a * scale_a + sum_b * scale_b, out


def _add_zero_logits(
    v: Tensor, col: Collisions, hit_count: Tensor, hit_values: Tensor, acc_max: Tensor, acc_sum: Tensor, acc_out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge, into ``acc_out`` in place, the part of faithful mode's logit-0 keys: the visible
    keys minus the colliding ones (``hit_count`` of them, summing to ``hit_values``, which is
    consumed). Returns the merged max and sum, and `(B·H·T,)` bool: which queries have such keys."""
    n_visible, v_visible = _visible_sums(v, col)
    missed = n_visible - hit_count
    background = missed > 0.5
    missed_values = hit_values.neg_().view(v_visible.shape[0], -1, v.shape[-1]).add_(v_visible)
    missed_values = missed_values.view(-1, v.shape[-1]).mul_(background[:, None])  # exact zeros when none missed
    zero_logit = torch.where(background, 0.0, float("-inf")).to(v.dtype)
    acc_max, acc_sum, _ = _merge(acc_max, acc_sum, acc_out, zero_logit, missed, missed_values)
    return acc_max, acc_sum, background


def _visible_sums(v: Tensor, col: Collisions) -> tuple[Tensor, Tensor]:
    """Per query, the number of keys it may see `(B·H·T,)`, and the sum of their values:
    `(B·H, T, Dv)` when causal, else `(B·H, 1, Dv)` (every query of a row sees the same keys)."""
    B, H, T, S = col.shape
    Dv = v.shape[-1]
    v = v.reshape(B * H, S, Dv)
    if col.k_valid is None:
        valid = v.new_ones(B * H, S)
    else:
        valid = col.k_valid.to(v.dtype)
        v = v * valid[..., None]
    if col.causal:
        n_visible, v_visible = valid.cumsum(1), v.cumsum(1)
    else:
        n_visible, v_visible = valid.sum(1, keepdim=True).expand(B * H, T), v.sum(1, keepdim=True)
    if col.q_valid is not None:
        n_visible = n_visible * col.q_valid
    return n_visible.reshape(-1), v_visible
