"""Dense: exact softmax attention, the oracle every method is measured against."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lshattn.api import Inputs, Method
from lshattn.cost import Cost

__all__ = ["Dense", "DenseAux"]


class DenseAux(NamedTuple):
    """What ``Dense`` did.

    Attributes:
        dot_products: scores computed, B·H·T·S.
    """

    dot_products: int


@dataclasses.dataclass(frozen=True)
class Dense(Method):
    """Exact attention ``softmax(q kᵀ · scale) v`` through ``scaled_dot_product_attention``.

    Padding masks and ``causal`` combine into one boolean mask; a query that sees no key gets
    zeros (its mask row is opened for the kernel, which would return NaN, then its output is
    zeroed, so gradients stay finite). Without masks the call goes straight to SDPA and so to
    the fastest kernel of the device (flash on CPU and GPU).
    """

    name: ClassVar[str] = "dense"

    def _attend(self, inputs: Inputs) -> tuple[Tensor, DenseAux]:
        q, k, v = inputs.q, inputs.k, inputs.v
        B, H, T, _ = q.shape
        S = k.shape[2]
        mask = visible_keys(inputs.key_padding_mask, inputs.causal, B, T, S, q.device)
        sees_a_key = None
        if mask is not None:
            sees_a_key = mask.any(-1, keepdim=True)  # (B, 1, T, 1)
            mask = mask | ~sees_a_key
        is_causal = inputs.causal and mask is None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=inputs.dropout_p, is_causal=is_causal, scale=inputs.scale
        )
        if sees_a_key is not None:
            out = out * sees_a_key
        if inputs.query_padding_mask is not None:
            out = out * inputs.query_padding_mask[:, None, :, None]
        return out, DenseAux(B * H * T * S)

    def cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4
    ) -> Cost:
        """Scores ``B·H·T·S``; flops ``2·B·H·T·S·(D + Dv)``; memory: the `(B, H, T, S)` score
        matrix a non-fused implementation holds (SDPA's fused kernels need only O(T·D))."""
        dots = B * H * T * S
        return Cost(flops=2 * dots * (D + Dv), dot_products=dots, memory_bytes=dots * itemsize, budget=1.0)


def visible_keys(
    key_padding_mask: Tensor | None, causal: bool, B: int, T: int, S: int, device: torch.device
) -> Tensor | None:
    """`(B, 1, T, S)` bool mask of the keys each query may see, or None when it sees all.

    Causal attention with no padding returns None: SDPA's ``is_causal`` handles it.
    """
    if key_padding_mask is None:
        return None
    mask = key_padding_mask[:, None, None, :].expand(B, 1, T, S)
    if causal:
        mask = mask & torch.ones(T, S, dtype=torch.bool, device=device).tril()
    return mask
