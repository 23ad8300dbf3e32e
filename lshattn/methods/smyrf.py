"""SMYRF: attention inside balanced clusters of an asymmetric LSH, over several hash rounds."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from lshattn.api import Inputs, SparseMethod
from lshattn.blocks import (
    block_layout,
    compute_dtype,
    finish_output,
    matched_key_blocks,
    merge_rounds,
    pad_tokens,
    padded_valid,
    pair_entries,
    query_key_blocks,
    sorted_block_attention,
)
from lshattn.cost import Cost, sorted_blocks_cost
from lshattn.hashing import draw_per_group, e2lsh_projection, inverse_order, sort_order, xbox_plus
from lshattn.local import local_pairs, merge_counted, with_local_cost

__all__ = ["RandomClusters", "SMYRF", "SMYRFAux"]


class SMYRFAux(NamedTuple):
    """What ``SMYRF`` did, enough to rebuild its attention pattern.

    In round r, query i attends key j when ``query_clusters[..., r, i] == key_clusters[..., r, j]``
    (and the masks allow it).

    Attributes:
        query_projections: `(B, H, R, T)` the hash value queries were sorted by.
        key_projections: `(B, H, R, S)` the hash value keys were sorted by.
        query_clusters: `(B, H, R, T)` the key cluster each query's cluster meets (its own
            cluster's index when queries and keys fill as many clusters).
        key_clusters: `(B, H, R, S)` cluster of each key.
        dot_products: scores computed (B·H summed; padding slots included), the slots of
            ``sinks`` and ``window`` included.
    """

    query_projections: Tensor
    key_projections: Tensor
    query_clusters: Tensor
    key_clusters: Tensor
    dot_products: int


@dataclasses.dataclass(frozen=True)
class SMYRF(SparseMethod):
    """SMYRF (Daras et al. 2020): balanced asymmetric-LSH clusters, made for pretrained models.

    Each round maps queries and keys through the XBOX+ transform, under which the nearest key
    in Euclidean distance is the one of largest inner product, projects them on one Gaussian
    direction (E2LSH, unquantised), sorts queries and keys separately by it and cuts them into
    clusters of ``q_cluster_size`` queries and ``k_cluster_size`` keys: the i-th query cluster
    attends to the i-th key cluster with exact softmax. The ``num_hashes`` rounds are merged by
    their log-sum-exp. The estimate improves with more rounds and larger clusters; one cluster
    holding every token is exact attention. Q and K stay separate, so it drops into a
    pretrained model without retraining, and T ≠ S works with any cluster sizes.

    In a sequence with n_q real queries and n_k real keys, the queries fill C_q = ceil(n_q /
    q_cluster_size) clusters and the keys C_k = ceil(n_k / k_cluster_size). When those counts
    differ (T ≠ S, a key mask alone, a padded encoder in cross-attention), query cluster n meets
    the key cluster of the same relative rank, ⌊(n + ½)·C_k / C_q⌋
    (``lshattn.blocks.matched_key_blocks``), so every real query meets real keys; when they are
    equal, cluster n meets cluster n, as in the paper.

    Lengths that do not divide the cluster sizes are padded inside, and padding (internal or
    from the masks) sorts after every real token of its own sequence, so it never takes a real
    token's place and never mixes sequences. The XBOX+ norms are taken over real tokens only.

    ``causal=True`` goes beyond the paper: inside a cluster a query sees only keys at earlier
    positions, and every query also attends to its own position's key once per round, so each
    query keeps at least one visible key (as in dense causal attention, where the diagonal is
    always visible).

    ``correct_duplicates=True`` counts a pair found by several rounds once (see ``Reformer``);
    the paper, and the default, count it once per round.

    ``sinks`` and ``window`` (``lshattn.SparseMethod``) add exact pairs the clusters may miss:
    a covered pair counts as one that every round found (once with ``correct_duplicates``),
    whether the clusters found it or not.

    Cost per round: ``clusters·q_cluster_size·k_cluster_size`` scores (see ``cost``).
    """

    name: ClassVar[str] = "smyrf"
    num_hashes: int = 2
    q_cluster_size: int = 32
    k_cluster_size: int = 32
    correct_duplicates: bool = False

    def _check_fields(self) -> None:
        """Ranges; ``Method.__post_init__`` has checked the types and calls this."""
        for field in ("num_hashes", "q_cluster_size", "k_cluster_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{type(self).__name__} {field} must be >= 1, got {getattr(self, field)}")

    def _attend(self, inputs: Inputs) -> tuple[Tensor, SMYRFAux]:
        q, k, v = inputs.q, inputs.k, inputs.v
        B, H, T, D = q.shape
        S = k.shape[2]
        dtype = compute_dtype(q.dtype)
        layout = block_layout(T, S, self.q_cluster_size, self.k_cluster_size)
        t_pad, s_pad = layout.padded_queries, layout.padded_keys
        q_valid = padded_valid(inputs.query_padding_mask, B, T, t_pad, q.device)
        k_valid = padded_valid(inputs.key_padding_mask, B, S, s_pad, q.device)
        q_pad, k_pad, v_pad = pad_tokens(q.to(dtype), t_pad), pad_tokens(k.to(dtype), s_pad), pad_tokens(v.to(dtype), s_pad)

        with torch.no_grad():
            q_proj, k_proj = self._projections(q_pad, k_pad, q_valid, k_valid, inputs.generator, inputs.kv_groups)
            q_order, k_order = sort_order(q_proj, q_valid), sort_order(k_proj, k_valid)
            key_blocks = matched_key_blocks(q_valid, k_valid, layout)

        self_pairs = "column" if inputs.causal else "none"
        result = sorted_block_attention(
            q_pad, k_pad, v_pad, q_order, k_order, k_valid, key_blocks,
            q_block=layout.q_block, k_block=layout.k_block, before=0, after=0,
            causal=inputs.causal, self_pairs=self_pairs,
            correct_duplicates=self.correct_duplicates,
            scale=inputs.scale, dropout_p=inputs.dropout_p,
        )  # fmt: skip
        out, lse = merge_rounds(result.out, result.lse)
        dot_products = result.dot_products
        pairs = local_pairs(inputs, self.sinks, self.window)
        if pairs is not None:
            entries = pair_entries(
                q_order, k_order, key_blocks, pairs, q_block=layout.q_block, k_block=layout.k_block,
                before=0, after=0, self_pairs=self_pairs, correct_duplicates=self.correct_duplicates,
            )  # fmt: skip
            counted = 1 if self.correct_duplicates else self.num_hashes
            out, lse = merge_counted(pairs, out[:, :, :T], lse[:, :, :T], q_pad[:, :, :T], k_pad, v_pad, entries, counted, inputs.scale)
            dot_products += B * H * T * pairs.slots
        out = finish_output(out, T, inputs.query_padding_mask, q.dtype)
        aux = SMYRFAux(
            query_projections=q_proj[..., :T],
            key_projections=k_proj[..., :S],
            query_clusters=query_key_blocks(q_order, layout.q_block, key_blocks)[..., :T],
            key_clusters=(inverse_order(k_order) // layout.k_block)[..., :S],
            dot_products=dot_products,
        )
        return out, aux

    def _projections(
        self, q: Tensor, k: Tensor, q_valid: Tensor, k_valid: Tensor, generator: torch.Generator | None, groups: int
    ) -> tuple[Tensor, Tensor]:
        """`(B, H, R, Tp)`, `(B, H, R, Sp)`: the values queries and keys are sorted by in each round,
        XBOX+ then one shared Gaussian direction per round and head (per key head under GQA:
        ``groups`` query heads share it).

        Args:
            q: `(B, H, Tp, D)`, k: `(B, H, Sp, D)`, padded; q_valid `(B, Tp)`, k_valid `(B, Sp)`.
        """
        H, D = q.shape[1], q.shape[-1]
        directions = draw_per_group((H, self.num_hashes, D + 2), groups, generator, q.device)
        q_aug, k_aug = xbox_plus(q, k, q_valid, k_valid)
        return e2lsh_projection(q_aug, directions), e2lsh_projection(k_aug, directions)

    def cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4
    ) -> Cost:
        """Analytic cost (``lshattn.cost.sorted_blocks_cost``) with cluster sizes clamped to the
        lengths, ``c = min(q_cluster_size, T)`` and ``w = min(k_cluster_size, S)``,
        ``n = ceil(T / c)`` query clusters per round, windows of ``w`` keys, projections
        ``2·B·H·R·(Tp + Sp)·(D + 2)`` flops, and an own-key column when causal; plus the slots of
        ``sinks`` and ``window`` (``lshattn.local.local_cost``)."""
        layout = block_layout(T, S, self.q_cluster_size, self.k_cluster_size)
        t_pad, s_pad = layout.padded_queries, layout.padded_keys
        cost = sorted_blocks_cost(
            B=B, H=H, T=T, S=S, D=D, Dv=Dv, rounds=self.num_hashes, padded_queries=t_pad,
            q_block=layout.q_block, window=layout.k_block, self_column=causal,
            hashing_flops=2 * B * H * self.num_hashes * (t_pad + s_pad) * (D + 2), itemsize=itemsize,
        )  # fmt: skip
        return with_local_cost(cost, self, B, H, T, S, D, Dv, causal=causal, itemsize=itemsize)


@dataclasses.dataclass(frozen=True)
class RandomClusters(SMYRF):
    """The control: SMYRF's balanced clusters and cost, with no information about which keys score high.

    Queries are sorted along one random Gaussian direction and keys along another, independent
    one, then cut and paired exactly as in ``SMYRF``; so a query's cluster meets keys that are,
    whatever their scores, as good as random. Sorting by a projection of each token (rather
    than drawing a random rank per position) keeps the clusters functions of the tokens alone,
    so padding, batch neighbours and the generator state act on it as on SMYRF and it passes
    the same property tests. A method that does not beat this control at the same budget is
    not selecting: the fidelity reports show it beside every method.

    The fields, the causal rule, the aux record and the cost are SMYRF's (the cost counts the
    same projections, ``D`` wide rather than ``D + 2``, as the same order of work).
    """

    name: ClassVar[str] = "random"

    def _projections(
        self, q: Tensor, k: Tensor, q_valid: Tensor, k_valid: Tensor, generator: torch.Generator | None, groups: int
    ) -> tuple[Tensor, Tensor]:
        """One independent Gaussian direction for queries and one for keys, per round and head
        (per key head under GQA)."""
        H, D = q.shape[1], q.shape[-1]
        directions = draw_per_group((2, H, self.num_hashes, D), groups, generator, q.device, head_dim=1)
        return e2lsh_projection(q, directions[0]), e2lsh_projection(k, directions[1])
