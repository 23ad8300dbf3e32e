"""Attention-level fidelity: each method on captured real Q, K, V against exact attention.

For every method and every captured layer the method's output is compared with exact attention
on the real query rows:

* ``rel_error``: ``‖out − exact‖ / ‖exact‖`` over all real rows of the layer;
* ``cosine``: mean over real rows of the cosine between the method's and the exact row;
* ``budget``: query-key scores computed over those exact attention computes (``aux.dot_products``
  over ``B·H·T·S``; 0 for YOSO-m, which computes none; for the oracle ``TopK``, the pairs it
  keeps, ``aux.selected_pairs``: it scores them all to choose), and ``flops_ratio``: the FLOPs of this
  very call as ``torch.utils.flop_counter`` counts them (matrix products: data-dependent work
  such as SimHash's collisions is what it was; YOSO's bucket additions are not counted) over
  exact attention's;
* ``seconds`` and ``exact_seconds``: median wall time of the method and of exact attention
  (``lshattn.Dense``, i.e. SDPA) on that layer's inputs, measured in the same loop.

Rows are per (method, layer); ``summarise`` averages them over layers.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

import torch

from lshattn.api import Inputs, Method
from lshattn.cost import count_flops
from lshattn.eval.capture import replay
from lshattn.eval.speed import median_seconds
from lshattn.methods import Dense, TopK

__all__ = ["layer_fidelity", "fidelity_rows", "summarise"]


def layer_fidelity(method: Method, inputs: Inputs, *, seed: int = 0, repeats: int = 3) -> dict:
    """Error, budget, FLOPs and time of ``method`` on one layer's captured inputs."""
    q, k, v = inputs.q, inputs.k, inputs.v
    B, H, T, D = q.shape
    S, Dv = k.shape[2], v.shape[-1]
    with torch.no_grad():
        exact = replay(Dense(), inputs)
        out, aux = replay(method, inputs, torch.Generator().manual_seed(seed), return_aux=True)
        real = torch.ones(B, T, dtype=torch.bool) if inputs.query_padding_mask is None else inputs.query_padding_mask
        rows = real[:, None, :].expand(B, H, T)
        difference = (out - exact)[rows]
        rel_error = (difference.norm() / exact[rows].norm()).item()
        cosine = torch.nn.functional.cosine_similarity(out[rows], exact[rows], dim=-1).mean().item()
        # Both have just run once above: no further warm-up.
        flops = count_flops(lambda: replay(method, inputs, torch.Generator().manual_seed(seed)))
        seconds = median_seconds(lambda: replay(method, inputs, torch.Generator().manual_seed(seed)), repeats, warm_up=False)
        exact_seconds = median_seconds(lambda: replay(Dense(), inputs), repeats, warm_up=False)
    return {
        "rel_error": rel_error,
        "cosine": cosine,
        "budget": (aux.selected_pairs if isinstance(method, TopK) else aux.dot_products) / (B * H * T * S),
        "flops_ratio": flops / Dense().cost(B, H, T, S, D, Dv).flops,
        "seconds": seconds,
        "exact_seconds": exact_seconds,
    }


def fidelity_rows(
    methods: Sequence[Method], layers: Sequence[Inputs], *, seeds: Iterable[int] = (0,), repeats: int = 3,
    progress: bool = True,
) -> list[dict]:  # fmt: skip
    """One row per (method, seed, layer): ``layer_fidelity`` plus ``method``, ``seed``, ``layer``.

    Each layer hashes with its own seed, ``seed * 1000 + layer``, as a model would.
    """
    from tqdm.auto import tqdm

    jobs = [(m, s, i) for m in methods for s in seeds for i in range(len(layers))]
    rows = []
    for method, seed, index in tqdm(jobs, desc="attention fidelity", disable=not progress, leave=False):
        row = layer_fidelity(method, layers[index], seed=seed * 1000 + index, repeats=repeats)
        rows.append({"method": str(method), "seed": seed, "layer": index, **row})
    return rows


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean of every measured field per method (over layers and seeds), in first-seen order."""
    fields = ("rel_error", "cosine", "budget", "flops_ratio", "seconds", "exact_seconds")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        summary.append({"method": name, **{f: statistics.fmean(r[f] for r in mine) for f in fields}})
    return summary
