"""SMYRF: attention inside balanced clusters of an asymmetric LSH, over several hash rounds."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from lshattn.api import Inputs, Method
from lshattn.blocks import (
    compute_dtype,
    finish_output,
    merge_rounds,
    pad_tokens,
    padded_valid,
    sorted_block_attention,
)
from lshattn.cost import Cost, sorted_blocks_cost
from lshattn.hashing import draw_normal, e2lsh_projection, inverse_order, sort_order, xbox_plus

__all__ = ["SMYRF", "SMYRFAux"]


class SMYRFAux(NamedTuple):
    """What ``SMYRF`` did, enough to rebuild its attention pattern.

    In round r, query i attends key j when ``query_clusters[..., r, i] == key_clusters[..., r, j]``
    (and the masks allow it).

    Attributes:
        query_projections: `(B, H, R, T)` the hash value queries were sorted by.
        key_projections: `(B, H, R, S)` the hash value keys were sorted by.
        query_clusters: `(B, H, R, T)` cluster of each query.
        key_clusters: `(B, H, R, S)` cluster of each key.
        dot_products: scores computed (B·H summed; padding slots included).
    """

    query_projections: Tensor
    key_projections: Tensor
    query_clusters: Tensor
    key_clusters: Tensor
    dot_products: int


@dataclasses.dataclass(frozen=True)
class SMYRF(Method):
    """SMYRF (Daras et al. 2020): balanced asymmetric-LSH clusters, made for pretrained models.

    Each round maps queries and keys through the XBOX+ transform, under which the nearest key
    in Euclidean distance is the one of largest inner product, projects them on one Gaussian
    direction (E2LSH, unquantised), sorts queries and keys separately by it and cuts them into
    clusters of ``q_cluster_size`` queries and ``k_cluster_size`` keys: the i-th query cluster
    attends to the i-th key cluster with exact softmax. The ``num_hashes`` rounds are merged by
    their log-sum-exp. The estimate improves with more rounds and larger clusters; one cluster
    holding every token is exact attention. Q and K stay separate, so it drops into a
    pretrained model without retraining, and T ≠ S works when both give the same number of
    clusters: ``ceil(T / q_cluster_size) == ceil(S / k_cluster_size)``.

    Lengths that do not divide the cluster sizes are padded inside, and padding (internal or
    from the masks) sorts after every real token of its own sequence, so it never takes a real
    token's place and never mixes sequences. The XBOX+ norms are taken over real tokens only.

    ``causal=True`` goes beyond the paper: inside a cluster a query sees only keys at earlier
    positions, and every query also attends to its own position's key once per round, so each
    query keeps at least one visible key (as in dense causal attention, where the diagonal is
    always visible).

    ``correct_duplicates=True`` counts a pair found by several rounds once (see ``Reformer``);
    the paper, and the default, count it once per round.

    Cost per round: ``clusters·q_cluster_size·k_cluster_size`` scores (see ``cost``).
    """

    name: ClassVar[str] = "smyrf"
    num_hashes: int = 2
    q_cluster_size: int = 32
    k_cluster_size: int = 32
    correct_duplicates: bool = False

    def __post_init__(self) -> None:
        for field in ("num_hashes", "q_cluster_size", "k_cluster_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"SMYRF {field} must be >= 1, got {getattr(self, field)}")

    def clusters(self, T: int, S: int) -> int:
        """Number of clusters per round for T queries and S keys; raises when they differ."""
        q_clusters, k_clusters = -(-T // self.q_cluster_size), -(-S // self.k_cluster_size)
        if q_clusters != k_clusters:
            k_fit, q_fit = _block_for(S, q_clusters), _block_for(T, k_clusters)
            fix = (
                f"use k_cluster_size={k_fit}" if k_fit else f"use q_cluster_size={q_fit}" if q_fit
                else "choose sizes with ceil(T / q_cluster_size) == ceil(S / k_cluster_size)"
            )
            raise ValueError(
                f"SMYRF needs as many query clusters as key clusters: T={T} with "
                f"q_cluster_size={self.q_cluster_size} gives {q_clusters}, S={S} with "
                f"k_cluster_size={self.k_cluster_size} gives {k_clusters}; {fix}"
            )
        return q_clusters

    def _check_inputs(self, inputs: Inputs) -> None:
        self.clusters(inputs.q.shape[2], inputs.k.shape[2])

    def _attend(self, inputs: Inputs) -> tuple[Tensor, SMYRFAux]:
        q, k, v = inputs.q, inputs.k, inputs.v
        B, H, T, D = q.shape
        S = k.shape[2]
        dtype = compute_dtype(q.dtype)
        clusters = self.clusters(T, S)
        t_pad, s_pad = clusters * self.q_cluster_size, clusters * self.k_cluster_size
        q_valid = padded_valid(inputs.query_padding_mask, B, T, t_pad, q.device)
        k_valid = padded_valid(inputs.key_padding_mask, B, S, s_pad, q.device)
        q_pad, k_pad, v_pad = pad_tokens(q.to(dtype), t_pad), pad_tokens(k.to(dtype), s_pad), pad_tokens(v.to(dtype), s_pad)

        directions = draw_normal((H, self.num_hashes, D + 2), inputs.generator, q.device)
        with torch.no_grad():
            q_aug, k_aug = xbox_plus(q_pad, k_pad, q_valid, k_valid)
            q_proj, k_proj = e2lsh_projection(q_aug, directions), e2lsh_projection(k_aug, directions)
            q_order, k_order = sort_order(q_proj, q_valid), sort_order(k_proj, k_valid)

        result = sorted_block_attention(
            q_pad, k_pad, v_pad, q_order, k_order, k_valid,
            q_block=self.q_cluster_size, k_block=self.k_cluster_size, before=0, after=0,
            causal=inputs.causal, self_pairs="column" if inputs.causal else "none",
            correct_duplicates=self.correct_duplicates,
            scale=inputs.scale, dropout_p=inputs.dropout_p,
        )  # fmt: skip
        out, _ = merge_rounds(result.out, result.lse)
        out = finish_output(out, T, inputs.query_padding_mask, q.dtype)
        aux = SMYRFAux(
            query_projections=q_proj[..., :T],
            key_projections=k_proj[..., :S],
            query_clusters=(inverse_order(q_order) // self.q_cluster_size)[..., :T],
            key_clusters=(inverse_order(k_order) // self.k_cluster_size)[..., :S],
            dot_products=result.dot_products,
        )
        return out, aux

    def cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4
    ) -> Cost:
        """Analytic cost (``lshattn.cost.sorted_blocks_cost``) with ``n = ceil(T / q_cluster_size)``
        clusters per round, windows of ``k_cluster_size`` keys, projections
        ``2·B·H·R·(Tp + Sp)·(D + 2)`` flops, and an own-key column when causal."""
        clusters = self.clusters(T, S)
        t_pad, s_pad = clusters * self.q_cluster_size, clusters * self.k_cluster_size
        return sorted_blocks_cost(
            B=B, H=H, T=T, S=S, D=D, Dv=Dv, rounds=self.num_hashes, padded_queries=t_pad,
            q_block=self.q_cluster_size, window=self.k_cluster_size, self_column=causal,
            hashing_flops=2 * B * H * self.num_hashes * (t_pad + s_pad) * (D + 2), itemsize=itemsize,
        )  # fmt: skip


def _block_for(length: int, blocks: int) -> int | None:
    """A block size cutting ``length`` tokens into exactly ``blocks`` blocks, if one exists."""
    size = -(-length // blocks)
    return size if -(-length // size) == blocks else None
