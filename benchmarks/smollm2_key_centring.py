"""Does centring the keys before SimHash find more of SmolLM2's attention? (issue 14)

Subtracting one vector from every key leaves softmax unchanged (it shifts each query's scores
by a constant), but it changes which keys share a SimHash code with the query: LLM keys sit in
a narrow cone, so without centring most keys collide with one another. Sparse Attention Hub's
MagicPIG masker centres them. Here: one exact forward over ``--tokens`` of gensim's Wikipedia,
every ``--every``-th layer's captured q and k, the last ``--queries`` queries (the decoding
positions); for each centre and code length, the share of each query's attention probability
that the keys it would attend carry (4 sinks + a 64-token window + the keys colliding with it
in one of 32 tables), and the share of its visible keys that set is. Centres: none, the mean of
all keys (what a decoding store could take from the prompt), the mean of the first 68 keys (a
centre a causal prefill could use: the queries before it attend only sinks and window)::

    python benchmarks/smollm2_key_centring.py --tokens 4096

The question is recall at equal share, so the code length is swept. Results in docs/longctx.md.
"""

from __future__ import annotations

import argparse

import torch

from lshattn import data
from lshattn.eval import capture, longctx

SINKS, WINDOW, TABLES = 4, 64, 32


def codes(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """`(H, L, N)` integer codes of `(H, N, D)` vectors under `(H, L, bits, D)` hyperplanes."""
    weights = 2 ** torch.arange(planes.shape[2])
    return ((torch.einsum("hnd,hlbd->hlnb", x, planes) > 0).long() * weights).sum(-1)


def layer_rows(q: torch.Tensor, k: torch.Tensor, scale: float, queries: int, bits_list, generator) -> dict:
    """Recall and share per (centre, bits) for one layer's `(H, T, D)` q and k (K repeated per head)."""
    H, T, D = q.shape
    last = q[:, T - queries :]
    positions, query_positions = torch.arange(T), torch.arange(T - queries, T)
    visible = positions[None, :] <= query_positions[:, None]
    probs = (torch.einsum("hqd,hkd->hqk", last, k) * scale).masked_fill(~visible, float("-inf")).softmax(-1)
    exact = visible & ((positions[None, :] < SINKS) | (positions[None, :] > query_positions[:, None] - WINDOW - 1))
    centres = {
        "none": torch.zeros(H, 1, D),
        "mean of all keys": k.mean(1, keepdim=True),
        "mean of the first 68": k[:, : SINKS + WINDOW].mean(1, keepdim=True),
    }
    rows = {}
    for bits in bits_list:
        planes = torch.randn(H, TABLES, bits, D, generator=generator)
        query_codes = codes(last, planes)
        for name, centre in centres.items():
            collide = (query_codes[..., None] == codes(k - centre, planes)[:, :, None, :]).any(1)
            chosen = (collide & visible) | exact
            rows[(name, bits)] = (
                float((probs * chosen).sum(-1).mean()),
                float((chosen.sum(-1) / visible.sum(-1)).mean()),
            )
    rows[("sinks + window alone", 0)] = (
        float((probs * exact).sum(-1).mean()),
        float((exact.sum(-1) / visible.sum(-1)).mean()),
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=64, help="the last queries scored")
    parser.add_argument("--every", type=int, default=3, help="every n-th layer")
    parser.add_argument("--bits", type=int, nargs="+", default=[6, 8, 10, 12])
    args = parser.parse_args()
    tokenizer, model = data.load_smollm2()
    ids = longctx.corpus_ids(tokenizer, "wikipedia", args.tokens)[None, : args.tokens]
    calls = capture.capture_attention_inputs(model.eval(), input_ids=ids)
    generator = torch.Generator().manual_seed(0)
    totals: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for call in calls[:: args.every]:
        for key, row in layer_rows(call.q[0], call.k[0], call.scale, args.queries, args.bits, generator).items():
            totals.setdefault(key, []).append(row)
    print(f"SmolLM2, {args.tokens} tokens, layers 0::{args.every}, the last {args.queries} queries, {TABLES} tables")
    print("| centre | bits | attention recalled | share of the keys |\n|---|---|---|---|")
    for (name, bits), rows in sorted(totals.items(), key=lambda item: (item[0][0], item[0][1])):
        recall, share = (sum(r[i] for r in rows) / len(rows) for i in (0, 1))
        print(f"| {name} | {bits or '—'} | {recall:.3f} | {share:.3f} |")


if __name__ == "__main__":
    main()
