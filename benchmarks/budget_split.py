"""A per-layer budget split against one setting everywhere, on the demo's Rotten Tomatoes split.

Calibrates ``lshattn.eval.calibrate.split_budget`` on 64 unlabelled *training* texts (the first
two batches of 32), then runs the split in every layer of MiniLM on the 300 test texts, as
``benchmarks/task_rows.py`` does (embedding cosine to exact attention, probe accuracy, and the
share of real pairs scored, ``lshattn.hf.count``), beside the best single setting within the same
budget::

    python benchmarks/budget_split.py              # the 25 % and 12.5 % splits, ~6 min on 2 cores

Results are in docs/fidelity-ideas.md with the command that made them.
"""

from __future__ import annotations

import argparse
import time

import lshattn
from lshattn import data, hf
from lshattn.eval import calibrate, tasks

# The ladder a layer may climb: the locality baseline's windows and importance-weighted SimHash
# from 12 % to 32 % of the pairs scored on these texts (docs/fidelity-ideas.md).
CANDIDATES = [lshattn.Local(sinks=2, window=w) for w in (2, 4, 6, 8, 11, 14, 20, 28)] + [
    lshattn.SimHash(num_hashes=L, num_bits=K, mode="importance", sinks=2, window=2)
    for L, K in ((24, 8), (16, 7), (16, 6), (20, 6), (16, 5))
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125])
    args = parser.parse_args()
    tokenizer, model = data.load_minilm()
    task = tasks.rotten_tomatoes_task(tokenizer, max_length=128, train=600, test=300, seed=0)

    def embed(texts, method, tally=None):
        return tasks.embed(
            model, tokenizer, texts, method=method, max_length=128, batch_size=32, seed=0, progress=False, tally=tally
        )

    train, exact = embed(task.train_texts, None), embed(task.test_texts, None)
    batches = [
        tokenizer(
            list(task.train_texts[i : i + 32]), truncation=True, max_length=128, padding=True, return_tensors="pt"
        )
        for i in (0, 32)
    ]
    start = time.perf_counter()
    scores = calibrate.layer_scores(model, batches, CANDIDATES, seed=0)
    print(f"calibration: {len(CANDIDATES)} candidates × {len(scores)} layers in {time.perf_counter() - start:.0f} s")
    print("| layer | " + " | ".join(str(c) for c in CANDIDATES) + " |")
    for index, row in enumerate(scores):
        print(f"| {index} | " + " | ".join(f"{s.error:.3f} @ {s.spend:.1%}" for s in row) + " |")

    print("\n| budget | setting | scored (test) | embedding cosine | probe accuracy |\n|---|---|---|---|---|")
    for budget in args.budgets:
        split = {i: CANDIDATES[c] for i, c in enumerate(calibrate.allocate(scores, budget))}
        tally = hf.Tally()
        ours = embed(task.test_texts, split, tally)
        accuracy = tasks.probe_accuracy(train, task.train_labels, {"exact": exact, "ours": ours}, task.test_labels)
        text = "; ".join(f"{i}: `{m}`" for i, m in split.items())
        print(
            f"| {budget:.1%} | {text} | {tally.budget:.1%} | {float((ours * exact).sum(-1).mean()):.3f} | "
            f"{accuracy['ours']:.3f} (exact {accuracy['exact']:.3f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
