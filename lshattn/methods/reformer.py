"""Reformer: attention inside sorted angular-LSH buckets, chunked, over several hash rounds."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.api import Inputs, SparseMethod
from lshattn.blocks import (
    block_layout,
    compute_dtype,
    finish_output,
    matched_key_blocks,
    merge_entry,
    merge_rounds,
    pad_tokens,
    padded_valid,
    pair_entries,
    query_key_blocks,
    sorted_block_attention,
)
from lshattn.cost import Cost, sorted_blocks_cost
from lshattn.hashing import (
    MAX_BUCKETS_PER_FACTOR,
    angular_buckets,
    angular_factors,
    draw_per_group,
    hashed_once_a_group,
    inverse_order,
    sort_order,
)
from lshattn.local import cover_rule, local_pairs, merge_counted, with_local_cost
from lshattn.methods.simhash import PAIR_BUDGET, CollisionSoftmax, build_collisions

__all__ = ["Reformer", "ReformerAux"]


class ReformerAux(NamedTuple):
    """What ``Reformer`` did, enough to rebuild its attention pattern.

    In round r, query i attends key j when ``key_chunks[..., r, j] - query_chunks[..., r, i]``
    lies in ``[-chunks_before, chunks_after]`` (and the masks allow it).

    Attributes:
        buckets: `(B, H, R, T)` query buckets; padded tokens are in the extra bucket
            ``num_buckets``, sorted after every real one.
        key_buckets: `(B, H, R, S)` key buckets (equal to ``buckets`` at tokens that are real
            queries and real keys when ``shared_qk``).
        query_chunks: `(B, H, R, T)` the key chunk each query's window is centred on: the chunk
            of the query after the sort when queries and keys fill as many chunks.
        key_chunks: `(B, H, R, S)` chunk of each key after the sort.
        dot_products: scores computed (B·H summed; padding slots included), the slots of
            ``sinks`` and ``window`` included.
    """

    buckets: Tensor
    key_buckets: Tensor
    query_chunks: Tensor
    key_chunks: Tensor
    dot_products: int


@dataclasses.dataclass(frozen=True)
class Reformer(SparseMethod):
    """Reformer LSH attention (Kitaev et al. 2020).

    Each round hashes tokens with angular LSH, ``bucket = argmax([xR, −xR])`` for a random
    rotation R per head, sorts them by (bucket, position), cuts the sorted sequence into chunks
    of ``bucket_size`` and lets every chunk attend to itself, ``chunks_before`` earlier and
    ``chunks_after`` later chunks of the same round (a window never wraps around the ends).
    Softmax runs inside the window; the ``num_hashes`` rounds are merged by their log-sum-exp,
    so the result approximates softmax attention over the keys that share a bucket with the
    query in some round. More rounds or larger windows miss fewer high-scoring keys; a window
    covering the whole sequence gives exact attention.

    ``shared_qk=True`` is the paper's setting: keys are the unit-normalised queries (pass
    ``k=q``), and a token attends to itself only when nothing else is visible in any round.
    ``shared_qk=False`` is for pretrained models with separate Q and K: both are hashed with
    the same rotations and sorted separately, chunk n of the queries meeting chunk n of the keys.
    Where a sequence's real queries and real keys fill different numbers of chunks (a key mask
    alone, or T ≠ S, which ``shared_qk=False`` allows without ``causal``), query chunk n meets
    the key chunk of the same relative rank instead (``lshattn.blocks.matched_key_blocks``), so
    a real query never faces only padding.

    Logits are ``scale · q·k`` with ``scale = D**-0.5`` by default, as in lucidrains'
    implementation; trax and HF use unit keys with no scale, which is ``scale=1.0``.

    ``num_buckets`` is fixed rather than tied to the length, so padding a batch never changes a
    sequence's buckets; the paper's rule of thumb is ``num_buckets ≈ 2·T / bucket_size``. Above
    64 it must be a power of two (at most 2**24, the ids the sort keeps exact) and is factorised
    into independent hashes of at most 64 buckets, which keeps hashing O(T·D·log num_buckets)
    instead of O(T·D·num_buckets).

    ``correct_duplicates=True`` subtracts log(number of rounds attending a pair) from its logit,
    so a pair found by several rounds counts once (the trax option); by default, as in HF and the
    paper, it counts once per round.

    ``causal=True`` masks keys after the query (comparing original positions). With
    ``shared_qk=False`` every query also attends to its own position's key once per round, so it
    always has a visible key.

    ``sinks`` and ``window`` (``lshattn.SparseMethod``) add exact pairs the buckets may miss: a
    covered pair counts as one every round found (once with ``correct_duplicates``). With
    ``shared_qk`` the own position stays out of them too; a token attends to itself only when
    no other key, covered or found, is visible.

    ``whole_buckets=True`` (with ``shared_qk=False``) drops the sort and the chunks: in each
    round a query attends every visible key of its bucket, the pattern the chunks approximate
    (computed pair by pair on colliding pairs, as ``SimHash``, never a T×S matrix;
    ``bucket_size``, ``chunks_before`` and ``chunks_after`` are unused). It is strictly causal:
    what query t attends depends on the tokens up to t only, so decoding through a cache
    (``lshattn.decode``) reproduces this prefill exactly, where the chunked prefill's chunks
    follow the sort of the whole sequence and decoding departs from it. The work then depends
    on the data: about ``R·T·S / num_buckets`` scores for random directions (half when causal),
    more where real keys crowd into a few buckets (``return_aux`` counts them). No dropout.

    Cost per round: ``T·(chunks_before + 1 + chunks_after)·bucket_size`` scores (see ``cost``).
    """

    name: ClassVar[str] = "reformer"
    num_hashes: int = 2
    bucket_size: int = 64
    num_buckets: int = 64
    chunks_before: int = 1
    chunks_after: int = 0
    shared_qk: bool = True
    correct_duplicates: bool = False
    whole_buckets: bool = False

    @property
    def cost_depends_on_data(self) -> bool:  # type: ignore[override]
        """Whole buckets score the pairs that collide, which depends on the data."""
        return self.whole_buckets

    @property
    def supports_dropout(self) -> bool:  # type: ignore[override]
        """Whole buckets run the collision kernel, which has no dropout."""
        return not self.whole_buckets

    def _check_fields(self) -> None:
        """Ranges; ``Method.__post_init__`` has checked the types and calls this."""
        if self.whole_buckets and self.shared_qk:
            raise ValueError(
                "Reformer(whole_buckets=True) needs shared_qk=False: it attends every key of the query's "
                "bucket, while shared QK hides the own key unless nothing else is visible; pass shared_qk=False"
            )
        for field in ("num_hashes", "bucket_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"Reformer {field} must be >= 1, got {getattr(self, field)}")
        for field in ("chunks_before", "chunks_after"):
            if getattr(self, field) < 0:
                raise ValueError(f"Reformer {field} must be >= 0, got {getattr(self, field)}")
        nb = self.num_buckets
        if nb < 2 or nb % 2:
            raise ValueError(f"Reformer num_buckets must be even and >= 2 (argmax over [xR, -xR]), got {nb}")
        # hashing.sort_order sorts bucket ids as float32 keys, exact only up to 2**24: above it
        # neighbouring buckets would merge. (A larger count is meaningless anyway: it exceeds
        # any sequence length that fits in memory.)
        max_buckets = 2**24
        if nb > max_buckets:
            raise ValueError(
                f"Reformer num_buckets must be at most 2**24 = {max_buckets} (bucket ids are sorted as "
                f"float32), got {nb}; the rule of thumb is num_buckets ≈ 2·T / bucket_size"
            )
        if nb > MAX_BUCKETS_PER_FACTOR and nb & (nb - 1):
            raise ValueError(
                f"Reformer num_buckets above {MAX_BUCKETS_PER_FACTOR} must be a power of two to be "
                f"factorised, got {nb}; use {1 << (nb.bit_length() - 1)} or {1 << nb.bit_length()}"
            )

    def _check_inputs(self, inputs: Inputs) -> None:
        T, S = inputs.q.shape[2], inputs.k.shape[2]
        if self.whole_buckets and inputs.dropout_p > 0:
            raise ValueError(
                f"Reformer(whole_buckets=True) does not implement attention dropout, got "
                f"dropout_p={inputs.dropout_p}; pass dropout_p=0 (e.g. evaluate the model in eval mode), "
                f"or use the chunked Reformer (whole_buckets=False)"
            )
        if self.shared_qk and inputs.k is not inputs.q and not torch.equal(inputs.k, inputs.q):
            raise ValueError(
                f"Reformer(shared_qk=True) uses the normalised queries as keys, so k must be q (got "
                f"T={T} queries and S={S} keys); pass k=q, or use Reformer(shared_qk=False) for "
                f"separate queries and keys, cross-attention included"
            )

    def _attend(self, inputs: Inputs) -> tuple[Tensor, ReformerAux]:
        if self.whole_buckets:
            return self._attend_whole_buckets(inputs)
        q, k, v = inputs.q, inputs.k, inputs.v
        B, H, T, D = q.shape
        S = k.shape[2]
        dtype = compute_dtype(q.dtype)
        layout = block_layout(T, S, self.bucket_size, self.bucket_size)
        t_pad, s_pad = layout.padded_queries, layout.padded_keys
        q_valid = padded_valid(inputs.query_padding_mask, B, T, t_pad, q.device)
        k_valid = padded_valid(inputs.key_padding_mask, B, S, s_pad, q.device)
        q_pad, k_raw, v_pad = pad_tokens(q.to(dtype), t_pad), pad_tokens(k.to(dtype), s_pad), pad_tokens(v.to(dtype), s_pad)
        # Shared QK: the keys are the unit queries. They come from k (which is q, with its
        # padded keys zeroed by the key mask) so that a token that is a real key but a padded
        # query keeps its key.
        k_pad = F.normalize(k_raw, dim=-1) if self.shared_qk else k_raw
        # Both masks alike (or none): queries and keys are the same tokens, hashed and sorted once.
        same_tokens = self.shared_qk and _same_mask(inputs.query_padding_mask, inputs.key_padding_mask)

        factors = angular_factors(self.num_buckets)
        rotations = draw_per_group(
            (H, D, self.num_hashes, sum(factors) // 2), inputs.kv_groups, inputs.generator, q.device
        )
        with torch.no_grad():
            q_buckets = angular_buckets(q_pad, rotations, factors)
            q_order = sort_order(q_buckets, q_valid)
            if same_tokens:
                k_buckets, k_order = q_buckets, q_order
            else:
                k_buckets = hashed_once_a_group(
                    partial(angular_buckets, factors=factors), k_raw, rotations, inputs.kv_groups
                )
                k_order = sort_order(k_buckets, k_valid)
            key_blocks = matched_key_blocks(q_valid, k_valid, layout)

        # A window reaching more than the other blocks would only hold padding.
        before, after = (min(n, layout.k_blocks - 1) for n in (self.chunks_before, self.chunks_after))
        self_pairs = "exclude" if self.shared_qk else ("column" if inputs.causal else "none")
        result = sorted_block_attention(
            q_pad, k_pad, v_pad, q_order, k_order, k_valid, key_blocks,
            q_block=layout.q_block, k_block=layout.k_block, before=before, after=after,
            causal=inputs.causal, self_pairs=self_pairs,
            correct_duplicates=self.correct_duplicates,
            scale=inputs.scale, dropout_p=inputs.dropout_p,
        )  # fmt: skip
        out, lse = merge_rounds(result.out, result.lse)
        dot_products = result.dot_products
        pairs = local_pairs(inputs, self.sinks, self.window, own_key=not self.shared_qk)
        if pairs is not None:
            entries = pair_entries(
                q_order, k_order, key_blocks, pairs, q_block=layout.q_block, k_block=layout.k_block,
                before=before, after=after, self_pairs=self_pairs, correct_duplicates=self.correct_duplicates,
            )  # fmt: skip
            counted = 1 if self.correct_duplicates else self.num_hashes
            out, lse = merge_counted(pairs, out[:, :, :T], lse[:, :, :T], q_pad[:, :, :T], k_pad, v_pad, entries, counted, inputs.scale)
            dot_products += B * H * T * pairs.slots
        if self.shared_qk:
            # A token attends to itself only when no other key was visible in any round.
            length = out.shape[2]  # T == S: the padded queries are the padded keys
            alone = torch.isinf(lse) & k_valid[:, None, :length]
            out = torch.where(alone[..., None], v_pad[:, :, :length], out)
        out = finish_output(out, T, inputs.query_padding_mask, q.dtype)

        def real(x: Tensor, valid: Tensor, length: int) -> Tensor:
            return x.masked_fill(~valid[:, None, None, :], self.num_buckets)[..., :length]

        aux = ReformerAux(
            buckets=real(q_buckets, q_valid, T),
            key_buckets=real(k_buckets, k_valid, S),
            query_chunks=query_key_blocks(q_order, layout.q_block, key_blocks)[..., :T],
            key_chunks=(inverse_order(k_order) // layout.k_block)[..., :S],
            dot_products=dot_products,
        )
        return out, aux

    def _attend_whole_buckets(self, inputs: Inputs) -> tuple[Tensor, ReformerAux]:
        """Every visible key of the query's bucket, each round; rounds counted as the chunks count
        them. Causal: the own key apart, once per round, as the chunked prefill's own column."""
        q, k, v = inputs.q, inputs.k, inputs.v
        B, H, T, D = q.shape
        dtype = compute_dtype(q.dtype)
        factors = angular_factors(self.num_buckets)
        rotations = draw_per_group(
            (H, D, self.num_hashes, sum(factors) // 2), inputs.kv_groups, inputs.generator, q.device
        )
        with torch.no_grad():
            q_buckets = angular_buckets(q, rotations, factors)
            k_buckets = hashed_once_a_group(partial(angular_buckets, factors=factors), k, rotations, inputs.kv_groups)
            collisions = build_collisions(
                q_buckets, k_buckets, inputs.query_padding_mask, inputs.key_padding_mask,
                int(self.num_buckets - 1).bit_length(), causal=inputs.causal, dedup=self.correct_duplicates,
                covered=cover_rule(inputs, self.sinks, self.window), exclude_own=inputs.causal,
            )  # fmt: skip
        q, k, v = (x.to(dtype) for x in (q, k, v))
        out, lse, count = CollisionSoftmax.apply(q, k, v, collisions, inputs.scale, False)
        dot_products = int(count)
        counted = 1 if self.correct_duplicates else self.num_hashes
        if inputs.causal:
            out, lse = _with_own_key(out, lse, q, k, v, inputs.key_padding_mask, counted, inputs.scale)
            dot_products += B * H * T
        pairs = local_pairs(inputs, self.sinks, self.window, own_key=not inputs.causal)
        if pairs is not None:  # left out of the collisions: nothing found to take out
            out, lse = merge_counted(pairs, out, lse, q, k, v, 0, counted, inputs.scale)
            dot_products += B * H * T * pairs.slots
        out = finish_output(out, T, inputs.query_padding_mask, inputs.q.dtype)

        def real(buckets: Tensor, mask: Tensor | None) -> Tensor:
            return buckets if mask is None else buckets.masked_fill(~mask[:, None, None, :], self.num_buckets)

        zeros = torch.zeros_like
        aux = ReformerAux(
            buckets=real(q_buckets, inputs.query_padding_mask), key_buckets=real(k_buckets, inputs.key_padding_mask),
            query_chunks=zeros(q_buckets), key_chunks=zeros(k_buckets), dot_products=dot_products,
        )  # fmt: skip
        return out, aux

    def cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4
    ) -> Cost:
        """Analytic cost (``lshattn.cost.sorted_blocks_cost``) with chunks of
        ``c = min(bucket_size, T)`` queries and ``min(bucket_size, S)`` keys, ``Tp`` = T rounded
        up to a multiple of c, windows of ``w = (before + 1 + after)·min(bucket_size, S)`` keys
        (before and after clamped to the other key chunks), and hashing
        ``2·B·H·R·(Tp + n·Sp)·D·Σfactors/2`` flops with n = 0 (shared QK) or 1.
        An own-key column is added when causal with separate Q and K; and the slots of ``sinks``
        and ``window`` (``lshattn.local.local_cost``).

        ``whole_buckets``: the expected cost for random directions, whose buckets are about
        equally likely: each round scores ``1/num_buckets`` of the ``n = B·H·T·S`` pairs
        (``B·H·T·(T − 1)/2`` when causal, plus ``B·H·T`` own keys), the union of the rounds with
        ``correct_duplicates``; flops ``2·scores·(D + Dv)`` plus the hashing; memory one chunk of
        scores (``lshattn.methods.simhash.PAIR_BUDGET``) or the per-query accumulators."""
        if self.whole_buckets:
            return self._whole_buckets_cost(B, H, T, S, D, Dv, causal=causal, itemsize=itemsize)
        layout = block_layout(T, S, self.bucket_size, self.bucket_size)
        before, after = (min(n, layout.k_blocks - 1) for n in (self.chunks_before, self.chunks_after))
        rotations = sum(angular_factors(self.num_buckets)) // 2
        hashed = layout.padded_queries + (0 if self.shared_qk else layout.padded_keys)
        cost = sorted_blocks_cost(
            B=B, H=H, T=T, S=S, D=D, Dv=Dv, rounds=self.num_hashes, padded_queries=layout.padded_queries,
            q_block=layout.q_block, window=(before + 1 + after) * layout.k_block,
            self_column=causal and not self.shared_qk,
            hashing_flops=2 * B * H * self.num_hashes * hashed * D * rotations, itemsize=itemsize,
        )  # fmt: skip
        return with_local_cost(cost, self, B, H, T, S, D, Dv, causal=causal, itemsize=itemsize)


    def _whole_buckets_cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool, itemsize: int
    ) -> Cost:  # fmt: skip
        pairs = B * H * T * (T - 1) // 2 if causal else B * H * T * S
        share = 1 / self.num_buckets
        found = 1 - (1 - share) ** self.num_hashes if self.correct_duplicates else self.num_hashes * share
        dots = round(found * pairs) + (B * H * T if causal else 0)
        rotations = sum(angular_factors(self.num_buckets)) // 2
        hashing = 2 * B * H * self.num_hashes * (T + S) * D * rotations
        memory = max(min(PAIR_BUDGET, B * H * T * S), B * H * T * (Dv + 2)) * itemsize
        flops = 2 * dots * (D + Dv) + hashing
        cost = Cost(flops=flops, dot_products=dots, memory_bytes=memory, budget=dots / (B * H * T * S))
        return with_local_cost(cost, self, B, H, T, S, D, Dv, causal=causal, itemsize=itemsize)


def _with_own_key(
    out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, counted: int,
    scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Merge each query's own key (T == S), counted ``counted`` times, into `(B, H, T, Dv)` ``out``
    of log-sum-exp `(B, H, T)` ``lse``; a padded own key is no key."""
    own = (q * k).sum(-1) * scale + math.log(counted)
    if key_padding_mask is not None:
        own = own.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
    return merge_entry(out, lse, own, v)


def _same_mask(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two padding masks mark the same tokens (None: every token is real)."""
    if a is None or b is None:
        return a is b
    return a is b or torch.equal(a, b)
