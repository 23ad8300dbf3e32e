"""Capture the inputs of every attention layer of a Hugging Face model.

A recording method is put into the model with ``lshattn.hf.use``; it computes exact attention
(so the forward is the model's own) and keeps what each layer was called with: q, k, v after the
model's projections (and rotary embeddings, for models that have them), the padding masks, the
causal flag and the scale. Those are the real activations a method would see in that layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lshattn.api import Inputs, Method
from lshattn.methods import Dense

__all__ = ["capture_attention_inputs", "replay"]


@dataclasses.dataclass(frozen=True, eq=False)
class _Recorder(Method):
    """Exact attention that appends each call's validated inputs to ``calls`` (not registered)."""

    calls: list = dataclasses.field(default_factory=list)

    def _attend(self, inputs: Inputs):
        detached = [x.detach() if isinstance(x, Tensor) else x for x in inputs]
        self.calls.append(Inputs(*detached)._replace(generator=None, dropout_p=0.0))
        return Dense()._attend(inputs)


def capture_attention_inputs(model: Any, **model_inputs: Tensor) -> list[Inputs]:
    """Run ``model(**model_inputs)`` once with exact attention and return every layer's inputs.

    Args:
        model: a transformers model that ``lshattn.hf.use`` accepts.
        model_inputs: its inputs, e.g. ``input_ids`` `(B, T)` and ``attention_mask`` `(B, T)`.

    Returns:
        One ``lshattn.api.Inputs`` per attention call, in call order (layer 0 first): q
        `(B, H, T, D)`, k, v, masks, causal and scale, to replay with ``replay``. The model is
        left with its own exact attention (``lshattn.hf.use(model, None)``).
    """
    from lshattn import hf

    recorder = _Recorder()
    hf.use(model, recorder)
    try:
        with torch.no_grad():
            model(**model_inputs)
    finally:
        hf.use(model, None)
    return list(recorder.calls)


def replay(method: Method, inputs: Inputs, generator: torch.Generator | None = None, **kwargs: Any):
    """Call ``method`` on captured ``inputs`` (extra keyword arguments, e.g. ``return_aux``)."""
    return method(
        inputs.q, inputs.k, inputs.v,
        key_padding_mask=inputs.key_padding_mask, query_padding_mask=inputs.query_padding_mask,
        causal=inputs.causal, scale=inputs.scale, generator=generator, **kwargs,
    )  # fmt: skip
