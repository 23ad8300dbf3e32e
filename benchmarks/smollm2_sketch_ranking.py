"""What ranks the passkey's digits among SmolLM2's cached keys: the oracle's selection (``TopK`` at
1/16, 4 sinks + 64 window, exact prefill) with its exact ranking swapped for estimates from
SimHash sign bits of the keys (issue 14; the experiment behind ``lshattn.SketchTopK``):

* hard collisions: how many of 32 tables of 8 bits a key shares with the query (SimHash's test);
* the asymmetric sketch estimate ``Σ_i (w_i·q)·sign(w_i·k)`` over 64, 128 or 256 projections,
  as it is (the angle), times the key's norm, or over keys centred by their mean (MagicPIG).

The selection and the softmax over it are the oracle's; only the ranking changes. Passkey prompts,
keys and filler are ``lshattn longctx``'s (the same trials)::

    python benchmarks/smollm2_sketch_ranking.py --lengths 2048 4096 --trials 2

Results are in docs/longctx.md with the command that made them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor

from lshattn import data, hf
from lshattn.decode import selection
from lshattn.eval import longctx
from lshattn.methods.topk import ranking_scores

PLANES = torch.randn(64, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Ranking = Callable[[Tensor, Tensor, float], Tensor]


def sketch(bits: int, *, norm: bool = False, centre: bool = False) -> Ranking:
    """Rank keys by ``(q·W)·sign(Wᵀk)`` over ``bits`` projections (times |k|; of centred keys)."""

    def rank(q: Tensor, k: Tensor, scale: float) -> Tensor:
        q, k = q.double(), k.double()
        if centre:
            k = k - k.mean(-2, keepdim=True)
        planes = PLANES[:, :bits]
        estimate = (q @ planes) @ torch.sign(k @ planes).transpose(-1, -2)
        return (estimate * k.norm(dim=-1)[..., None, :] if norm else estimate).float()

    return rank


def collisions(tables: int, bits: int) -> Ranking:
    """Rank keys by the tables (of ``bits`` sign bits each) whose code they share with the query."""

    def rank(q: Tensor, k: Tensor, scale: float) -> Tensor:
        planes, powers = PLANES[:, : tables * bits].float(), 2 ** torch.arange(bits)

        def codes(x: Tensor) -> Tensor:
            return ((x.float() @ planes > 0).long().view(*x.shape[:-1], tables, bits) * powers).sum(-1)

        return (codes(q)[..., :, None, :] == codes(k)[..., None, :, :]).sum(-1).float()

    return rank


RANKINGS: dict[str, Ranking] = {
    "exact scores (the oracle)": ranking_scores,
    "hard collisions, 32 tables x 8 bits": collisions(32, 8),
    "sketch 256 bits (angle)": sketch(256),
    "sketch 256 bits x |k|": sketch(256, norm=True),
    "sketch 128 bits x |k|": sketch(128, norm=True),
    "sketch 64 bits x |k|": sketch(64, norm=True),
    "sketch 256 bits x |k|, centred keys": sketch(256, norm=True, centre=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    tokenizer, model = data.load_smollm2()
    config = longctx.LongCtxConfig()
    corpus = longctx.corpus_ids(tokenizer, config.corpus, longctx.corpus_tokens(config))
    found: dict[tuple[str, int], list[bool]] = {}
    for length in args.lengths:
        oracle = longctx.setting(longctx.ORACLE, 1 / 16, length, 64)
        for trial in range(args.trials):
            keys = longctx.passkey_keys(config.seed, length, trial, len(config.passkey_depths))
            filler = longctx._filler(corpus, config.seed, length, trial)
            built = [
                longctx.passkey_prompt(tokenizer, filler, length, d, k) for d, k in zip(config.passkey_depths, keys)
            ]
            prefill = longctx._exact_prefill(model, torch.tensor([ids for ids, _ in built]), 0)
            for name, rank in RANKINGS.items():
                selection.ranking_scores = rank  # the oracle's decoding step ranks with it
                hf.use(model, oracle, seed=config.seed, prefill="exact")
                try:
                    cell = longctx.passkey_cell(model, tokenizer, [ids for ids, _ in built], keys, 10, prefill())
                finally:
                    hf.use(model, None)
                    selection.ranking_scores = ranking_scores
                found.setdefault((name, length), []).extend(cell["correct"])
                print(f"{length} trial {trial} {name}: {cell['correct']}", flush=True)
    print("\n| ranking | " + " | ".join(f"passkey {n:,}" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for name in RANKINGS:
        cells = [found[(name, n)] for n in args.lengths]
        print(f"| {name} | " + " | ".join(f"{sum(c)}/{len(c)}" for c in cells) + " |")


if __name__ == "__main__":
    main()
