"""SketchTopK's decoding step: the SimHash sketch of every cached key, a byte per table; a new
query builds one lookup table per byte of the sketch (its estimate for each of the 256 byte
values), ranks every cached key with ``num_bits / 8`` lookups, and scores only the top ones.
The estimates are the prefill's integers, so a decoding step reproduces the causal prefill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from lshattn.decode.common import (
    Step,
    appended,
    causal_visible,
    continues,
    covered_keys,
    drawn_from,
    per_query_head,
    softmax_over,
)
from lshattn.methods.sketch import BYTE_SIGNS, SketchTopK, key_sketches, query_weights
from lshattn.methods.topk import top_keys

__all__ = ["SketchStore", "sketch_step"]


@dataclasses.dataclass
class SketchStore:
    """The sketches of a layer's cached keys.

    Attributes:
        method: the SketchTopK setting that drew them (a store refuses another).
        planes: `(H, D, R, 8)` its projections.
        buffer: `(B, H, R, capacity)` uint8: the sketches of the ``length`` cached keys in its
            first slots (``sketches``), room for more after them.
        length: S, the keys sketched.
        last_key: `(B, H_kv, D)` the last cached key, to recognise the same cache at the next step.
    """

    method: SketchTopK
    planes: Tensor
    buffer: Tensor
    length: int
    last_key: Tensor

    @property
    def sketches(self) -> Tensor:
        """`(B, H, R, S)` the sketches of the cached keys."""
        return self.buffer[..., : self.length]


def _sketched(
    store: SketchStore | None, method: SketchTopK, keys: Tensor, new: int,
    generator: torch.Generator | Callable[[], torch.Generator] | None, groups: int,
) -> SketchStore:  # fmt: skip
    """The store holding the sketches of all S keys of `(B, H_kv, S, D)` ``keys``, the last
    ``new`` of them new: extended when it holds the others, else built from all of them."""
    H_kv, S, D = keys.shape[1:]
    H = H_kv * groups
    last = keys[:, :, -1].clone()
    if continues(store, keys, new, H):
        added = key_sketches(per_query_head(keys[:, :, S - new :], groups), store.planes).to(torch.uint8)
        return SketchStore(method, store.planes, appended(store.buffer, S - new, added, -1), S, last)
    planes = method.planes(H, D, drawn_from(generator), keys.device)
    sketches = key_sketches(per_query_head(keys, groups), planes).to(torch.uint8)
    return SketchStore(method, planes, sketches, S, last)


def sketch_step(
    store: SketchStore | None, method: SketchTopK, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None,
    scale: float, generator: torch.Generator | Callable[[], torch.Generator] | None,
) -> Step:  # fmt: skip
    """Each new query keeps the covered keys and the top ``fraction`` of the other visible keys
    by sketch estimate, as ``SketchTopK`` does causally in the prefill, and scores only those
    (gathered; no `(T, S, D)` product). ``visible`` None: no padding."""
    B, H, T, _ = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    store = _sketched(store, method, k, T, generator, H // H_kv)
    if visible is None:
        visible = causal_visible(B, T, S, q.device)
    with torch.no_grad():
        lookup = query_weights(q, store.planes) @ BYTE_SIGNS.to(q.device)  # (B, H, T, R, 256)
        sketches = store.sketches.long()[:, :, None].expand(B, H, T, -1, S)  # (B, H, T, R, S)
        ranking = lookup.gather(-1, sketches).sum(3)  # (B, H, T, S): the prefill's integers
    covered = covered_keys(visible, method.sinks, method.window)
    selected = top_keys(ranking, visible & ~covered, method.fraction) | covered
    out, scored = softmax_over(selected.long(), q, k, v, scale)
    return Step(out, store, scored)
