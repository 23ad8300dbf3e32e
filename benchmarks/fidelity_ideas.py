"""What candidate improvements to LSH selection would buy, measured before building them (issue 13).

Each candidate is a *brute-force prototype*: it builds the dense `(B, H, T, S)` table of which
query attends which key (from SMYRF's own clusters, or the oracle's top-k), adds sinks, a local
window or a tail term, and takes one float64 softmax over it. O(T·S): a measurement of what the
idea keeps, not an implementation of it (a method that promises less must never build T×S).
Each runs in every layer of the bundled MiniLM through ``lshattn.hf`` on the demo's Rotten
Tomatoes split (128 tokens, 600 train / 300 test), and prints the sentence-embedding cosine to
exact attention and the zero-shot probe accuracy, as ``lshattn demo`` section 2 does::

    python benchmarks/fidelity_ideas.py                 # every candidate below, ~1 min each on 2 cores
    python benchmarks/fidelity_ideas.py --only smyrf-2x16 mean-field

Results are in docs/fidelity-ideas.md with the command that made them.

Candidates (all at 25 % of the dot products at 128 tokens: 32 keys per query):

* ``selection``: SMYRF R×c's clusters, a key counted once however many rounds found it;
* ``sinks``, ``window``: the first real tokens, and the real tokens within ± window, always attended;
* ``tail="uniform"``: an unbiased estimate of the unselected keys' sum from a stratified uniform
  sample (each sample stands for its stratum);
* ``tail="mean-field"``: the unselected keys as one term, their mean value weighted by
  ``n_rest · exp(q · k̄_rest · scale)`` (Jensen's lower bound on their mass; one more dot product
  per query);
* ``oracle``: the oracle's top-k (``lshattn.TopK``) instead of SMYRF's clusters.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import ClassVar, NamedTuple

import torch

import lshattn
from lshattn import testing
from lshattn.api import Inputs, Method

SPENT = {"scored": 0, "pairs": 0}  # the prototypes' scored share of the real pairs, per candidate


class PrototypeAux(NamedTuple):
    dot_products: int


@dataclasses.dataclass(frozen=True)
class Prototype(Method):
    """A brute-force selection-plus-tail prototype (see the module docstring). Not a method."""

    name: ClassVar[str] = "prototype"
    supports_dropout: ClassVar[bool] = False
    num_hashes: int = 2
    cluster_size: int = 16
    sinks: int = 0
    window: int = 0
    tail: str = "none"  # "none", "uniform", "mean-field" or "lsh"
    tail_samples: int = 0
    lsh_bits: int = 0  # tail="lsh": SimHash tables of this many bits ...
    lsh_tables: int = 0  # ... this many of them
    oracle: float = 0.0  # > 0: the oracle's top-k at this fraction instead of SMYRF's clusters

    def _attend(self, x: Inputs) -> tuple[torch.Tensor, PrototypeAux]:
        q, k, v = x.q.double(), x.k.double(), x.v.double()
        B, H, T, _ = q.shape
        S = k.shape[2]
        real = torch.ones(B, S, dtype=torch.bool) if x.key_padding_mask is None else x.key_padding_mask
        visible = real[:, None, None, :].expand(B, 1, T, S)
        selected = self._selected(x) & visible
        rank = real.long().cumsum(-1) - 1  # position among the real keys (T == S here)
        if self.sinks:
            selected = selected | ((rank < self.sinks) & real)[:, None, None, :]
        if self.window:
            near = (rank[:, :, None] - rank[:, None, :]).abs() <= self.window
            selected = selected | (near & real[:, None, :])[:, None]
        weights = selected.double()
        if self.tail == "uniform":
            weights = weights + _uniform_tail(selected, real, self.tail_samples, H)
        if self.tail == "lsh":
            weights = weights + _lsh_tail(q, k, selected, visible, self.lsh_bits, self.lsh_tables)
        logits = q @ k.transpose(-1, -2) * x.scale
        counted = weights > 0
        top = torch.where(counted, logits, -math.inf).amax(-1, keepdim=True)
        mass = weights * torch.exp(torch.where(counted, logits - top, -math.inf))
        numerator, denominator = mass @ v, mass.sum(-1, keepdim=True)
        if self.tail == "mean-field":
            rest = (visible & ~selected).double()
            count = rest.sum(-1, keepdim=True)
            k_mean, v_mean = (rest @ k) / count.clamp_min(1), (rest @ v) / count.clamp_min(1)
            rest_logit = (q * k_mean).sum(-1, keepdim=True) * x.scale
            peak = torch.maximum(top, torch.where(count > 0, rest_logit, -math.inf))
            scale_old = torch.exp(top - peak)
            rest_mass = torch.where(count > 0, count * torch.exp(rest_logit - peak), 0.0)
            numerator = numerator * scale_old + rest_mass * v_mean
            denominator = denominator * scale_old + rest_mass
        out = torch.nan_to_num(numerator / denominator)
        if x.query_padding_mask is not None:
            out = out * x.query_padding_mask[:, None, :, None]
        real_pairs = visible.expand(B, H, T, S)
        if x.query_padding_mask is not None:
            real_pairs = real_pairs & x.query_padding_mask[:, None, :, None]
        SPENT["scored"] += int((counted & real_pairs).sum())
        SPENT["pairs"] += int(real_pairs.sum())
        return out.to(x.q.dtype), PrototypeAux(int(counted.sum()))

    def _selected(self, x: Inputs) -> torch.Tensor:
        if not self.num_hashes:
            B, T, S = x.q.shape[0], x.q.shape[2], x.k.shape[2]
            return torch.zeros(B, 1, T, S, dtype=torch.bool)
        if self.oracle:
            _, aux = lshattn.TopK(self.oracle)(x.q, x.k, x.v, key_padding_mask=x.key_padding_mask, return_aux=True)
            return aux.selected
        smyrf = lshattn.SMYRF(self.num_hashes, self.cluster_size, self.cluster_size)
        _, aux = smyrf(x.q, x.k, x.v, key_padding_mask=x.key_padding_mask, generator=x.generator, return_aux=True)
        return testing.smyrf_rounds(aux).any(2)

    def cost(self, B, H, T, S, D, Dv, *, causal=False, itemsize=4):
        per_query = self.num_hashes * self.cluster_size + self.sinks + 2 * self.window + 1 + self.tail_samples
        dots = B * H * T * (self.oracle * S if self.oracle else per_query)
        return lshattn.Cost(flops=0, dot_products=int(dots), memory_bytes=0, budget=dots / (B * H * T * S))


def _uniform_tail(selected: torch.Tensor, real: torch.Tensor, samples: int, H: int) -> torch.Tensor:
    """`(B, H, T, S)` weights of a stratified uniform sample of the real keys, each sample weighted
    by its stratum's size, and zero on the selected keys (the unselected keys' sum, unbiased)."""
    B, S = real.shape
    u = torch.rand(H, samples, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    stratum = torch.arange(samples, dtype=torch.float64)
    n = real.sum(-1).double()[:, None, None]
    low, high = torch.floor(stratum * n / samples), torch.floor((stratum + 1) * n / samples)
    rank = (low + torch.floor(u[None] * (high - low))).long().clamp(max=S - 1)  # (B, H, samples)
    index_of_rank = torch.argsort(torch.where(real, real.long().cumsum(-1) - 1, S + torch.arange(S)), dim=-1)
    keys = index_of_rank.gather(1, rank.view(B, -1)).view(B, H, samples)
    weight = torch.zeros(B, H, S, dtype=torch.float64).scatter_add_(-1, keys, (high - low).expand(B, H, -1))
    return torch.where(selected, 0.0, weight[:, :, None, :])


def _lsh_tail(q, k, selected, visible, bits: int, tables: int) -> torch.Tensor:
    """`(B, H, T, S)` weights of MagicPIG's estimator: an unselected visible key whose SimHash
    codes (``tables`` tables of ``bits`` bits, any table) collide with the query's gets weight
    1 / P(collide | θ), so its sum is unbiased for the unselected keys' sum; the others 0."""
    H, D = q.shape[1], q.shape[-1]
    planes = torch.randn(H, D, tables * bits, generator=torch.Generator().manual_seed(4321), dtype=torch.float64)
    powers = 2 ** torch.arange(bits, dtype=torch.long)

    def codes(x):
        signs = (torch.einsum("bhtd,hdn->bhtn", x, planes) > 0).long().view(*x.shape[:3], tables, bits)
        return (signs * powers).sum(-1)  # (B, H, L, tables)

    collide = (codes(q)[:, :, :, None, :] == codes(k)[:, :, None, :, :]).any(-1)
    cosine = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
    theta = torch.arccos(cosine.clamp(-1, 1))
    p = 1 - (1 - (1 - theta / math.pi) ** bits) ** tables
    return torch.where(collide & visible & ~selected, 1 / p.clamp_min(1e-12), 0.0)


CANDIDATES = {
    "smyrf-2x16": lshattn.SMYRF(2, 16, 16),
    "control-2x16": lshattn.RandomClusters(2, 16, 16),
    "selection-2x16": Prototype(2, 16),
    "uniform-tail": Prototype(2, 12, tail="uniform", tail_samples=8),
    "mean-field": Prototype(2, 16, tail="mean-field"),
    "sinks-window": Prototype(2, 12, sinks=2, window=2),
    "sinks-window-mean-field": Prototype(2, 12, sinks=2, window=2, tail="mean-field"),
    "lsh-tail-2x1": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=2, lsh_tables=1),
    "lsh-tail-4x4": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=4, lsh_tables=4),
    "lsh-tail-6x10": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=6, lsh_tables=10),
    "lsh-tail-w8-3x2": Prototype(0, 0, sinks=2, window=8, tail="lsh", lsh_bits=3, lsh_tables=2),
    "lsh-tail-w8-6x6": Prototype(0, 0, sinks=2, window=8, tail="lsh", lsh_bits=6, lsh_tables=6),
    "lsh-tail-5x8": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=5, lsh_tables=8),
    "lsh-tail-6x16": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=6, lsh_tables=16),
    "lsh-tail-7x10": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=7, lsh_tables=10),
    "lsh-tail-8x20": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=8, lsh_tables=20),
    "lsh-tail-8x10": Prototype(0, 0, sinks=2, window=2, tail="lsh", lsh_bits=8, lsh_tables=10),
    "oracle": lshattn.TopK(0.25),
    "oracle-mean-field": Prototype(oracle=0.25, tail="mean-field"),
    "oracle-exact-tail": lshattn.TopK(0.25, tail=True),
}


def main() -> None:
    from lshattn import data
    from lshattn.eval import tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="candidates to run (default: all)")
    args = parser.parse_args()
    tokenizer, model = data.load_minilm()
    task = tasks.rotten_tomatoes_task(tokenizer, max_length=128, train=600, test=300, seed=0)

    def embed(texts, method):
        return tasks.embed(
            model, tokenizer, texts, method=method, max_length=128, batch_size=32, seed=0, progress=False
        )

    train, exact = embed(task.train_texts, None), embed(task.test_texts, None)
    print("| candidate | setting | scored (prototypes) | embedding cosine | probe accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.only or CANDIDATES:
        start = time.perf_counter()
        SPENT.update(scored=0, pairs=0)
        ours = embed(task.test_texts, CANDIDATES[name])
        accuracy = tasks.probe_accuracy(train, task.train_labels, {"exact": exact, "ours": ours}, task.test_labels)
        print(
            f"| {name} | `{CANDIDATES[name]}` | {SPENT['scored'] / max(SPENT['pairs'], 1):.1%} | {float((ours * exact).sum(-1).mean()):.3f} | {accuracy['ours']:.3f} "
            f"(exact {accuracy['exact']:.3f}) | {time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
