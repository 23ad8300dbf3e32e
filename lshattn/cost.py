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

from typing import NamedTuple

__all__ = ["Cost"]


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
