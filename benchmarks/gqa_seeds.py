"""Projections a key head (``gqa="shared"``) against a query head over several seeds: SmolLM2's
perplexity after each method's own prefill (the prefill over all tokens, then the last 256
decoded through the cache) at one length and budget, one row per method, seed and mode.

One draw of projections per setting moves the perplexity a good deal at 1k tokens (``lshattn
longctx --quick`` gave SimHash 45.3 a query head and 35.0 a key head with seed 0); this says
whether the modes differ beyond that spread::

    python benchmarks/gqa_seeds.py --seeds 0 1 2 3

Results are in docs/longctx.md with the command that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile

from lshattn import data
from lshattn.eval import longctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--methods", nargs="+", default=[longctx.QUICK_SIMHASH, longctx.SMYRF])
    args = parser.parse_args()
    tokenizer, model = data.load_smollm2()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for seed in args.seeds:
        for gqa in ("per-query-head", "shared"):
            config = dataclasses.replace(
                longctx.LongCtxConfig(seed=seed, gqa=gqa), lengths=(args.length,), budgets=(args.budget,),
                methods=tuple(args.methods), references=(), passkey_lengths=(), speed_contexts=(),
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as out:
                run = longctx.run(config, out, model=model, tokenizer=tokenizer, progress=False)
            for row in run["perplexity"]["rows"]:
                if row.get("status") == "ok" and row.get("text"):
                    results.setdefault((row["text"], gqa), []).append((row["prefill_ppl"], row["decode_ppl"]))
    print(f"| method | projections | prefill perplexity, seeds {args.seeds} | mean | decode perplexity | mean |")
    print("|---|---|---|---|---|---|")
    for (text, gqa), values in results.items():
        prefill, decoded = zip(*values)
        print(f"| {text.partition(':')[0]} | {gqa} | {', '.join(f'{p:.2f}' for p in prefill)} | "
              f"{statistics.mean(prefill):.2f} | {', '.join(f'{d:.2f}' for d in decoded)} | "
              f"{statistics.mean(decoded):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
