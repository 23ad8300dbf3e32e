"""Cost accounting: the analytic cost record every method's ``cost()`` returns.

Conventions, the same for every method:
    * ``dot_products``: query-key scores computed (B·H summed), padding slots included, because
      they are computed. Dense attention computes B·H·T·S of them; ``budget`` is the ratio.
    * ``flops``: multiply-adds count 2. Scores cost 2·D per dot product, the weighted sum of
      values 2·Dv per attended pair; hashing projections are counted; softmax, sorting and
      gathers are not (they are O(T) per row and memory-bound).
    * ``memory_bytes``: bytes of the largest intermediate the method's pure-PyTorch path holds
      at once (the score tensor for the sort-and-chunk methods).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.utils import flop_counter

__all__ = ["Cost", "count_flops", "sorted_blocks_cost"]


class Cost(NamedTuple):
    """Analytic cost of one forward call.

    Attributes:
        flops: floating-point operations (a multiply-add is 2).
        dot_products: query-key scores computed, summed over batch and heads.
        memory_bytes: bytes of the largest intermediate tensor.
        budget: dot_products / (B·H·T·S), the fraction of exact attention's scores.
    """

    flops: int
    dot_products: int
    memory_bytes: int
    budget: float


def sorted_blocks_cost(
    *, B: int, H: int, T: int, S: int, D: int, Dv: int, rounds: int, padded_queries: int, q_block: int,
    window: int, self_column: bool, hashing_flops: int, itemsize: int,
) -> Cost:  # fmt: skip
    """Cost of ``lshattn.blocks.sorted_block_attention`` plus the round merge (Reformer, SMYRF).

    With ``n = B·H·R·Tp`` query slots (Tp: queries padded to a multiple of ``q_block``) and ``w``
    keys per window:

    * dot_products = ``n·w``, plus ``n`` for the own-key column of causal attention;
    * flops = ``2·n·w·(D + Dv)`` (scores and weighted values) + ``n·(2·D + 4·Dv)`` for the
      own-key column and its merge (element-wise, counted as two multiply-adds per value) +
      ``2·n·Dv`` to merge the rounds when R > 1 + hashing;
    * memory_bytes = the larger of the score tensor (``n·w``, recomputed in the backward) and
      the gathered window keys (``n/q_block·w·max(D, Dv)``), times ``itemsize``.
    """
    slots = B * H * rounds * padded_queries
    dots = slots * window + (slots if self_column else 0)
    flops = 2 * slots * window * (D + Dv) + hashing_flops
    if self_column:
        flops += slots * (2 * D + 4 * Dv)
    if rounds > 1:
        flops += 2 * slots * Dv
    largest = max(slots * window, slots // q_block * window * max(D, Dv))
    return Cost(flops=flops, dot_products=dots, memory_bytes=largest * itemsize, budget=dots / (B * H * T * S))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    FlopCounterMode counts matrix products (mm, bmm, baddbmm, einsum through them, SDPA kernels
    with a registered formula), not element-wise work. PyTorch registers no formula for its
    CPU flash-attention kernel, so SDPA on CPU counts 0; importing this module registers the
    same formula PyTorch uses for its GPU kernels (see ``_register_cpu_sdpa_formulas``).
    """
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _register_cpu_sdpa_formulas() -> None:
    """Count PyTorch's CPU flash-attention kernel like its GPU siblings (once per process)."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return
    forward, backward = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(backward)
    def _(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_formulas()
