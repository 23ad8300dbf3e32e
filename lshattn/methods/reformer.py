"""Reformer: attention inside sorted angular-LSH buckets, chunked, over several hash rounds."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.api import Inputs, Method
from lshattn.blocks import (
    compute_dtype,
    finish_output,
    merge_rounds,
    pad_length,
    pad_tokens,
    padded_valid,
    sorted_block_attention,
)
from lshattn.cost import Cost, sorted_blocks_cost
from lshattn.hashing import MAX_BUCKETS_PER_FACTOR, angular_buckets, angular_factors, draw_normal, inverse_order, sort_order

__all__ = ["Reformer", "ReformerAux"]


class ReformerAux(NamedTuple):
    """What ``Reformer`` did, enough to rebuild its attention pattern.

    In round r, query i attends key j when ``key_chunks[..., r, j] - query_chunks[..., r, i]``
    lies in ``[-chunks_before, chunks_after]`` (and the masks allow it).

    Attributes:
        buckets: `(B, H, R, T)` query buckets; padded tokens are in the extra bucket
            ``num_buckets``, sorted after every real one.
        key_buckets: `(B, H, R, S)` key buckets (equal to ``buckets`` when ``shared_qk``).
        query_chunks: `(B, H, R, T)` chunk of each query after the sort.
        key_chunks: `(B, H, R, S)` chunk of each key after the sort.
        dot_products: scores computed (B·H summed; padding slots included).
    """

    buckets: Tensor
    key_buckets: Tensor
    query_chunks: Tensor
    key_chunks: Tensor
    dot_products: int


@dataclasses.dataclass(frozen=True)
class Reformer(Method):
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

    Logits are ``scale · q·k`` with ``scale = D**-0.5`` by default, as in lucidrains'
    implementation; trax and HF use unit keys with no scale, which is ``scale=1.0``.

    ``num_buckets`` is fixed rather than tied to the length, so padding a batch never changes a
    sequence's buckets; the paper's rule of thumb is ``num_buckets ≈ 2·T / bucket_size``. Above
    64 it must be a power of two and is factorised into independent hashes of at most 64
    buckets, which keeps hashing O(T·D·log num_buckets) instead of O(T·D·num_buckets).

    ``correct_duplicates=True`` subtracts log(number of rounds attending a pair) from its logit,
    so a pair found by several rounds counts once (the trax option); by default, as in HF and the
    paper, it counts once per round.

    ``causal=True`` masks keys after the query (comparing original positions). With
    ``shared_qk=False`` every query also attends to its own position's key once per round, so it
    always has a visible key.

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

    def __post_init__(self) -> None:
        for field in ("num_hashes", "bucket_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"Reformer {field} must be >= 1, got {getattr(self, field)}")
        for field in ("chunks_before", "chunks_after"):
            if getattr(self, field) < 0:
                raise ValueError(f"Reformer {field} must be >= 0, got {getattr(self, field)}")
        nb = self.num_buckets
        if nb < 2 or nb % 2:
            raise ValueError(f"Reformer num_buckets must be even and >= 2 (argmax over [xR, -xR]), got {nb}")
        if nb > MAX_BUCKETS_PER_FACTOR and nb & (nb - 1):
            raise ValueError(
                f"Reformer num_buckets above {MAX_BUCKETS_PER_FACTOR} must be a power of two to be "
                f"factorised, got {nb}; use {1 << (nb.bit_length() - 1)} or {1 << nb.bit_length()}"
            )

    def _check_inputs(self, inputs: Inputs) -> None:
        T, S = inputs.q.shape[2], inputs.k.shape[2]
        if T != S:
            raise ValueError(
                f"Reformer sorts queries and keys into the same chunks and needs T == S, got T={T}, "
                f"S={S}; for cross-attention use SMYRF, whose q_cluster_size and k_cluster_size may differ"
            )
        if self.shared_qk and inputs.k is not inputs.q and not torch.equal(inputs.k, inputs.q):
            raise ValueError(
                "Reformer(shared_qk=True) uses the normalised queries as keys, so k must be q; "
                "pass k=q, or use Reformer(shared_qk=False) for separate queries and keys"
            )

    def _attend(self, inputs: Inputs) -> tuple[Tensor, ReformerAux]:
        q, v = inputs.q, inputs.v
        B, H, T, D = q.shape
        dtype = compute_dtype(q.dtype)
        padded = pad_length(T, self.bucket_size)
        q_valid = padded_valid(inputs.query_padding_mask, B, T, padded, q.device)
        k_valid = padded_valid(inputs.key_padding_mask, B, T, padded, q.device)
        q_pad, v_pad = pad_tokens(q.to(dtype), padded), pad_tokens(v.to(dtype), padded)
        k_pad = F.normalize(q_pad, dim=-1) if self.shared_qk else pad_tokens(inputs.k.to(dtype), padded)

        factors = angular_factors(self.num_buckets)
        rotations = draw_normal((H, D, self.num_hashes, sum(factors) // 2), inputs.generator, q.device)
        with torch.no_grad():
            q_buckets = angular_buckets(q_pad, rotations, factors)
            if self.shared_qk:
                k_buckets = q_buckets
                k_order = q_order = sort_order(q_buckets, k_valid)
            else:
                k_buckets = angular_buckets(k_pad, rotations, factors)
                q_order, k_order = sort_order(q_buckets, q_valid), sort_order(k_buckets, k_valid)

        self_pairs = "exclude" if self.shared_qk else ("column" if inputs.causal else "none")
        result = sorted_block_attention(
            q_pad, k_pad, v_pad, q_order, k_order, k_valid,
            q_block=self.bucket_size, k_block=self.bucket_size,
            before=self.chunks_before, after=self.chunks_after,
            causal=inputs.causal, self_pairs=self_pairs,
            correct_duplicates=self.correct_duplicates,
            scale=inputs.scale, dropout_p=inputs.dropout_p,
        )  # fmt: skip
        out, lse = merge_rounds(result.out, result.lse)
        if self.shared_qk:
            # A token attends to itself only when no other key was visible in any round.
            alone = torch.isinf(lse) & k_valid[:, None, :]
            out = torch.where(alone[..., None], v_pad, out)
        out = finish_output(out, T, inputs.query_padding_mask, q.dtype)

        def real(x: Tensor, valid: Tensor) -> Tensor:
            return x.masked_fill(~valid[:, None, None, :], self.num_buckets)[..., :T]

        aux = ReformerAux(
            buckets=real(q_buckets, k_valid if self.shared_qk else q_valid),
            key_buckets=real(k_buckets, k_valid),
            query_chunks=(inverse_order(q_order) // self.bucket_size)[..., :T],
            key_chunks=(inverse_order(k_order) // self.bucket_size)[..., :T],
            dot_products=result.dot_products,
        )
        return out, aux

    def cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4
    ) -> Cost:
        """Analytic cost (``lshattn.cost.sorted_blocks_cost``) with ``Tp`` = T rounded up to a
        multiple of ``bucket_size``, windows of ``w = (chunks_before + 1 + chunks_after)·bucket_size``
        keys, and hashing ``2·B·H·R·n·Tp·D·Σfactors/2`` flops with n = 1 (shared QK) or 2.
        An own-key column is added when causal with separate Q and K."""
        padded = pad_length(T, self.bucket_size)
        rotations = sum(angular_factors(self.num_buckets)) // 2
        hashed = 1 if self.shared_qk else 2
        return sorted_blocks_cost(
            B=B, H=H, T=T, S=S, D=D, Dv=Dv, rounds=self.num_hashes, padded_queries=padded,
            q_block=self.bucket_size, window=(self.chunks_before + 1 + self.chunks_after) * self.bucket_size,
            self_column=causal and not self.shared_qk,
            hashing_flops=2 * B * H * self.num_hashes * hashed * padded * D * rotations, itemsize=itemsize,
        )  # fmt: skip
