"""SketchTopK: each query keeps its top keys as ranked by SimHash sketches, exact softmax over them.

SimHash's collisions ask whether a query and a key agree on *every* bit of a table; a key with
a large score but a few disagreeing bits in every table is never found, and on a real LLM the
key a retrieval head needs (a passkey's digits) is such a key (docs/longctx.md). The same sign
bits rank keys well when they are read *softly*: with ``w_1 … w_b`` Gaussian projections and a
key's bits ``s_i = sign(w_i·k)``, the asymmetric estimate ``Σ_i (w_i·q)·s_i`` has expectation
``b·√(2/π)·|q|·cos(q, k)``: the query is kept exact, the key is its ``b``-bit sketch. Ranking
the cached keys by it and attending the top ones is the soft-collision top-k of SOCKET (2026)
and the asymmetric distance of sketch-based search; with 256 bits it retrieves SmolLM2's
passkeys where 32 tables of hard collisions do not (docs/longctx.md).

What it costs: the exact softmax scores only the kept keys (``fraction`` of them, besides the
sinks and window), but ranking reads every key's sketch — ``num_bits / 8`` bytes, one table
lookup per byte in a decoding step (``lshattn.decode``), against the ``2·D`` floats of a key and
value exact attention reads. The prefill here ranks every pair in torch operations, a
`(B, H, T, S)` tensor, as the oracle ``TopK`` does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from lshattn.api import Inputs, SparseMethod
from lshattn.cost import Cost
from lshattn.hashing import draw_per_group, hashed_once_a_group, simhash_codes
from lshattn.local import local_cost
from lshattn.methods.topk import attend_top_keys

__all__ = ["BYTE_SIGNS", "SketchTopK", "SketchTopKAux", "key_sketches", "query_weights", "sketch_estimates"]

# The query's projections are rounded to integers of at most this magnitude (its largest
# projection), so that an estimate is a sum of integers, exact in float64 in any order: the
# prefill's matrix product and a decoding step's table lookups give the same ranking bit for bit.
LEVELS = 2**20

# (8, 256): entry (i, c) is +1 where bit i of byte c is set (a positive projection), else -1.
BYTE_SIGNS = (2 * ((torch.arange(256)[None, :] >> torch.arange(8)[:, None]) & 1) - 1).double()


class SketchTopKAux(NamedTuple):
    """What ``SketchTopK`` did.

    Attributes:
        selected: `(B, H, T, S)` bool, the keys each query kept (its top ones by sketch estimate
            among those it may see, and those ``sinks`` and ``window`` cover).
        dot_products: exact scores its softmax takes, ``selected.sum()``.
        estimates: sketch estimates ranked, B·H·T·S (every pair; each reads ``num_bits / 8``
            bytes of the key's sketch).
    """

    selected: Tensor
    dot_products: int
    estimates: int


@dataclasses.dataclass(frozen=True)
class SketchTopK(SparseMethod):
    """Top-k attention ranked by SimHash sketches: exact softmax over each query's
    ``ceil(fraction · n)`` visible keys of largest asymmetric estimate ``Σ_i (w_i·q)·sign(w_i·k)``
    over ``num_bits`` Gaussian projections per head (see the module docstring), besides the keys
    ``sinks`` and ``window`` cover. Ties go to the earlier key. The estimate ranks by the angle
    between query and key (the key's norm is not in its sketch).

    ``fraction=1`` keeps every key: exact attention. Strictly causal: a decoding step
    (``lshattn.decode``) keeps each key's sketch and reproduces the causal prefill.
    """

    name: ClassVar[str] = "sketchtopk"
    cost_depends_on_data: ClassVar[bool] = True  # each row keeps ceil(fraction · n) keys
    fraction: float = 0.25
    num_bits: int = 256

    def _check_fields(self) -> None:
        """Ranges; ``Method.__post_init__`` has checked the types and calls this."""
        if not 0 < self.fraction <= 1:
            raise ValueError(
                f"SketchTopK fraction must be in (0, 1], got {self.fraction}; 0.0625 keeps a sixteenth of the keys"
            )
        if self.num_bits <= 0 or self.num_bits % 8:
            raise ValueError(
                f"SketchTopK num_bits must be a positive multiple of 8 (sketches are read a byte at a time), got "
                f"{self.num_bits}; 256 bits retrieve where 64 lose a passkey in two"
            )

    def planes(
        self, H: int, D: int, generator: torch.Generator | None, device: torch.device, groups: int = 1
    ) -> Tensor:
        """`(H, D, num_bits / 8, 8)` projections, a byte's worth per table, drawn from ``generator``,
        one a ``groups`` heads (``hashing.draw_per_group``): a call and the decoding steps after it
        sketch alike with the same generator state."""
        return draw_per_group((H, D, self.num_bits // 8, 8), groups, generator, device)

    def _attend(self, inputs: Inputs) -> tuple[Tensor, SketchTopKAux]:
        q, k = inputs.q, inputs.k
        B, H, T, D = q.shape
        S = k.shape[2]
        planes = self.planes(H, D, inputs.generator, q.device, inputs.kv_groups)
        with torch.no_grad():
            sketches = hashed_once_a_group(key_sketches, k, planes, inputs.kv_groups)
            ranking = sketch_estimates(query_weights(q, planes), sketches)
        out, selected = attend_top_keys(inputs, ranking, self.fraction, self.sinks, self.window)
        return out, SketchTopKAux(selected=selected, dot_products=int(selected.sum()), estimates=B * H * T * S)

    def cost(self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4) -> Cost:
        """Expected cost (each row keeps ``ceil(fraction · n)`` keys; ``return_aux`` counts them).

        * dot_products: the kept pairs: those ``sinks`` and ``window`` cover (``c``) and
          ``fraction`` of the other visible ones (``n`` visible: ``B·H·T·S``, or
          ``B·H·T·(T+1)/2`` causal), ``c + fraction·(n − c)``;
        * flops, of this torch path: the estimates, ``2·num_bits`` a pair; every score and the
          weighted values over a dense weight matrix zero off the selection, ``2·(D + Dv)`` a
          pair; the sketches, ``2·B·H·(T + S)·D·num_bits``;
        * memory: the `(B, H, T, S)` float64 estimates.
        """
        pairs = B * H * T * S
        visible = B * H * T * (T + 1) // 2 if causal else pairs
        covered = local_cost(B, H, T, S, D, Dv, self.sinks, self.window, causal=causal).dot_products
        covered = min(covered, visible)
        kept = round(covered + self.fraction * (visible - covered))
        flops = 2 * pairs * (self.num_bits + D + Dv) + 2 * B * H * (T + S) * D * self.num_bits
        return Cost(flops=flops, dot_products=kept, memory_bytes=pairs * 8, budget=kept / pairs)


def key_sketches(x: Tensor, planes: Tensor) -> Tensor:
    """`(B, H, R, L)` int64 bytes in ``[0, 256)``: the sign bits of `(B, H, L, D)` ``x`` against
    `(H, D, R, 8)` ``planes`` (``lshattn.hashing.simhash_codes``: 8-bit codes in R tables; a
    token hashed alone gets the bits it gets in a whole prompt)."""
    return simhash_codes(x, planes)


def query_weights(q: Tensor, planes: Tensor) -> Tensor:
    """`(B, H, T, R, 8)` float64 integers: each query's projections on `(H, D, R, 8)` ``planes``,
    scaled so that its largest is ``LEVELS`` and rounded (a query of zeros gets zeros)."""
    z = torch.einsum("bhtd,hdrk->bhtrk", q.double(), planes.double())
    largest = z.abs().amax((-2, -1), keepdim=True)
    return torch.round(z * (LEVELS / torch.where(largest > 0, largest, 1.0)))


def sketch_estimates(weights: Tensor, sketches: Tensor) -> Tensor:
    """`(B, H, T, S)` float64: ``Σ_i weight_i · (±1 by bit i of the key's sketch)``, exact.

    Args:
        weights: `(B, H, T, R, 8)` the queries' ``query_weights``.
        sketches: `(B, H, R, S)` the keys' ``key_sketches``.
    """
    B, H, R, S = sketches.shape
    signs = BYTE_SIGNS.to(weights.device)[:, sketches]  # (8, B, H, R, S)
    signs = signs.permute(1, 2, 4, 3, 0).reshape(B, H, S, R * 8)
    return weights.flatten(-2) @ signs.transpose(-1, -2)
