"""A per-layer budget split: each attention layer gets the setting that buys it the most fidelity,
at a fixed total budget (issue 13).

Layers of a pretrained model differ widely in what a sparse pattern keeps: in MiniLM some keep
nearly all their softmax mass within a few neighbours, and the last layer keeps under half of it
there (docs/fidelity-ideas.md, "Where each head attends"). One setting everywhere spends the same
on both. The split measures, on a few unlabelled calibration texts, each candidate setting's error
and spend in each layer, then gives every layer its cheapest candidate and upgrades, one at a time,
the layer whose next candidate removes the most error per unit of budget, while the mean spend
over layers stays within the budget::

    candidates = [lshattn.Local(sinks=2, window=w) for w in (2, 4, 8, 14, 28)] + [...]
    split = lshattn.eval.calibrate.split_budget(model, [batch], candidates, budget=0.25)
    lshattn.hf.use(model, split)            # {layer index: method}, stored in model.config
    model.save_pretrained(d)                # and lshattn.hf.use_saved re-applies it

Error: one minus the mean cosine, over real query rows and heads, between the layer's attention
output with the candidate and with exact attention, on the layer's captured inputs (the inputs of
the exact model: each layer is measured alone). Spend: the share of the real query–key pairs the
candidate scored there (``aux.dot_products``; for the oracle ``TopK``, the share it keeps; for
YOSO-m, which scores none, its FLOPs share, ``lshattn.budget.work_share``). Each layer hashes with
the generator ``lshattn.hf`` gives it in eval, so the split is measured on the projections it will
run with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from lshattn.api import Inputs, Method
from lshattn.budget import work_share
from lshattn.eval.capture import capture_attention_inputs, replay
from lshattn.methods import YOSO, Dense, TopK

__all__ = ["LayerScore", "allocate", "layer_scores", "split_budget"]


class LayerScore(NamedTuple):
    """One candidate in one layer: its ``error`` (1 − mean output cosine to exact attention) and
    ``spend`` (share of the real query–key pairs it scored), averaged over the calibration batches."""

    error: float
    spend: float


def layer_scores(
    model: Any, batches: Iterable[dict], candidates: Sequence[Method], *, seed: int = 0, progress: bool = True
) -> list[list[LayerScore]]:
    """`[layer][candidate]` scores of every candidate in every attention layer of ``model``.

    Args:
        model: a transformers model ``lshattn.hf.use`` accepts (its attention is left exact).
        batches: model inputs, e.g. the tokenizer's ``input_ids`` and ``attention_mask``.
        candidates: the settings a layer may get.
        seed: the seed ``hf.use`` will be given (the projections are those it draws in eval).
    """
    from tqdm.auto import tqdm

    from lshattn import hf

    errors: list[list[list[float]]] = []
    spends: list[list[list[float]]] = []
    for batch in batches:
        layers = capture_attention_inputs(model, **batch)
        if not errors:
            errors = [[[] for _ in candidates] for _ in layers]
            spends = [[[] for _ in candidates] for _ in layers]
        jobs = [(i, c) for i in range(len(layers)) for c in range(len(candidates))]
        for index, c in tqdm(jobs, desc="calibration", disable=not progress, leave=False):
            generator = hf.eval_generator(seed, index)
            error, spend = _score(candidates[c], layers[index], generator)
            errors[index][c].append(error)
            spends[index][c].append(spend)
    if not errors:
        raise ValueError("layer_scores needs at least one calibration batch")
    return [
        [LayerScore(sum(e) / len(e), sum(s) / len(s)) for e, s in zip(layer_errors, layer_spends)]
        for layer_errors, layer_spends in zip(errors, spends)
    ]


def _score(method: Method, inputs: Inputs, generator: torch.Generator) -> tuple[float, float]:
    """(1 − mean cosine to exact attention over real query rows, share of real pairs scored)."""
    B, H, T, D = inputs.q.shape
    S, Dv = inputs.k.shape[2], inputs.v.shape[-1]
    with torch.no_grad():
        exact = replay(Dense(), inputs)
        out, aux = replay(method, inputs, generator, return_aux=True)
    real_queries = (
        torch.ones(B, T, dtype=torch.bool) if inputs.query_padding_mask is None else inputs.query_padding_mask
    )
    real_keys = torch.ones(B, S, dtype=torch.bool) if inputs.key_padding_mask is None else inputs.key_padding_mask
    rows = real_queries[:, None, :].expand(B, H, T)
    cosine = torch.nn.functional.cosine_similarity(out[rows].double(), exact[rows].double(), dim=-1).mean()
    pairs = int((real_queries.sum(1) * real_keys.sum(1)).sum()) * H
    if isinstance(method, TopK):  # the pairs it keeps, of real queries
        spend = int((aux.selected & real_queries[:, None, :, None]).sum()) / pairs
    elif isinstance(method, YOSO) and not method.expectation:
        spend = work_share(method, T, S, D, Dv)
    else:
        spend = aux.dot_products / pairs
    return 1.0 - float(cosine), spend


def allocate(scores: Sequence[Sequence[LayerScore]], budget: float) -> list[int]:
    """The candidate each layer gets: the cheapest everywhere, then greedy upgrades, each the one
    that removes the most error per unit of mean spend and still fits ``budget``.

    Args:
        scores: `[layer][candidate]`, from ``layer_scores``.
        budget: the largest mean spend over layers, in (0, 1].

    Raises:
        ValueError: the cheapest candidates alone spend more than ``budget``.
    """
    layers = len(scores)
    choice = [min(range(len(row)), key=lambda c: (row[c].spend, row[c].error)) for row in scores]
    total = sum(scores[i][choice[i]].spend for i in range(layers)) / layers
    if total > budget * (1 + 1e-9):
        raise ValueError(
            f"the cheapest candidates spend {total:.2%} of the pairs on average, more than the budget "
            f"{budget:.2%}; add cheaper candidates or raise the budget"
        )
    while True:
        best: tuple[float, int, int] | None = None
        for i, row in enumerate(scores):
            now = row[choice[i]]
            for c, option in enumerate(row):
                extra = (option.spend - now.spend) / layers
                gain = now.error - option.error
                if extra <= 0 or gain <= 0 or total + extra > budget * (1 + 1e-9):
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, i, c)
        if best is None:
            return choice
        _, i, c = best
        total += (scores[i][c].spend - scores[i][choice[i]].spend) / layers
        choice[i] = c


def split_budget(
    model: Any, batches: Iterable[dict], candidates: Sequence[Method], budget: float, *, seed: int = 0,
    progress: bool = True,
) -> dict[int, Method]:  # fmt: skip
    """``{layer index: method}`` for ``lshattn.hf.use``: the per-layer split of ``budget`` among
    ``candidates`` measured on ``batches`` (``layer_scores``, then ``allocate``)."""
    if not candidates:
        raise ValueError("split_budget needs at least one candidate setting")
    if not 0 < budget <= 1:
        raise ValueError(f"the budget must be a fraction in (0, 1], got {budget}")
    scores = layer_scores(model, batches, candidates, seed=seed, progress=progress)
    return {index: candidates[c] for index, c in enumerate(allocate(scores, budget))}
