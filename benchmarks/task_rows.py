"""Section 2 of the demo for any list of method strings: embedding cosine and probe accuracy on MiniLM.

Runs each method in every attention layer of the bundled all-MiniLM-L6-v2 on the demo's Rotten
Tomatoes split (128 tokens, 600 train / 300 test) or BBC split (512 tokens, 300 / 150), as
``lshattn demo`` does, and prints one Markdown row per method (budget = ``lshattn.budget.pairs_share``,
the expected share; "scored" = the share of the real query–key pairs the method scored on these
texts, from ``aux.dot_products``)::

    python benchmarks/task_rows.py rt "smyrf:sinks=2,window=8,num_hashes=1,q_cluster_size=12,k_cluster_size=12" "local:sinks=2,window=14"
    python benchmarks/task_rows.py bbc "local:sinks=2,window=62"

Results are in docs/fidelity-ideas.md with the command that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import lshattn
from lshattn import data
from lshattn.budget import pairs_share
from lshattn.eval import tasks

SCORED = {"dot_products": 0, "pairs": 0}


def counting(method: lshattn.Method) -> lshattn.Method:
    """``method`` as an instance of a subclass that adds each call's ``aux.dot_products`` and real
    query–key pairs to ``SCORED`` (a measurement for this script, not a method)."""

    def call(self, q, k, v, **kw):
        out, aux = super(cls, self).__call__(q, k, v, **{**kw, "return_aux": True})
        real = kw.get("key_padding_mask")
        per_row = torch.full((q.shape[0],), k.shape[2]) if real is None else real.sum(-1)
        SCORED["dot_products"] += aux.dot_products
        SCORED["pairs"] += int((per_row.double() ** 2).sum()) * q.shape[1]
        return out

    cls = type(type(method).__name__, (type(method),), {"__call__": call})
    return cls(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["rt", "bbc"])
    parser.add_argument("methods", nargs="+", help="method strings for lshattn.parse")
    args = parser.parse_args()
    tokenizer, model = data.load_minilm()
    if args.task == "rt":
        length, batch = 128, 32
        task = tasks.rotten_tomatoes_task(tokenizer, max_length=length, train=600, test=300, seed=0)
    else:
        length, batch = 512, 8
        task = tasks.bbc_task(max_length=length, train=300, test=150, seed=0)

    def embed(texts, method):
        return tasks.embed(
            model, tokenizer, texts, method=method, max_length=length, batch_size=batch, seed=0, progress=False
        )

    train, exact = embed(task.train_texts, None), embed(task.test_texts, None)
    print(
        "| task | setting | budget | scored | embedding cosine | probe accuracy | seconds |\n|---|---|---|---|---|---|---|"
    )
    for text in args.methods:
        method = lshattn.parse(text)
        start = time.perf_counter()
        SCORED.update(dot_products=0, pairs=0)
        ours = embed(task.test_texts, counting(method))
        accuracy = tasks.probe_accuracy(train, task.train_labels, {"exact": exact, "ours": ours}, task.test_labels)
        print(
            f"| {args.task} | `{text}` | {pairs_share(method, length, length, 32):.1%} | "
            f"{SCORED['dot_products'] / max(SCORED['pairs'], 1):.1%} | "
            f"{float((ours * exact).sum(-1).mean()):.3f} | {accuracy['ours']:.3f} (exact {accuracy['exact']:.3f}) | "
            f"{time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
