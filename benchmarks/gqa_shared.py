"""Projections and decoding stores a key head (``hf.use(..., gqa="shared")``) against a query
head (the default) on SmolLM2 (9 query heads, 3 key heads): decode perplexity and KL to exact at
4k tokens and 1/16 of the keys, and decoding speed and the stores' memory at 8k, for the three
methods whose stores hold hashes (SimHash, YOSO, SketchTopK), each after an exact prefill.

Both modes run in one process, the speed cells of each as ``lshattn longctx`` measures them
(two passes, the second in reverse order), so their ratios compare like with like on a noisy
machine. The reports go to ``--out``/per-query-head and ``--out``/shared (resumed, as
``lshattn longctx``); the comparison prints as a Markdown table::

    python benchmarks/gqa_shared.py --out docs/longctx-gqa

Results are in docs/longctx.md with the command that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lshattn import data
from lshattn.eval import longctx

METHODS = (longctx.SIMHASH, longctx.YOSO, longctx.SKETCH)


def config(gqa: str, length: int, context: int) -> longctx.LongCtxConfig:
    """The cells compared: decode perplexity at ``length`` and 1/16, speed at ``context``."""
    return dataclasses.replace(
        longctx.LongCtxConfig(gqa=gqa).exact_prefill(), lengths=(length,), budgets=(1 / 16,), methods=METHODS,
        references=(), passkey_lengths=(), speed_contexts=(context,),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="longctx-gqa")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--context", type=int, default=8000)
    args = parser.parse_args()
    tokenizer, model = data.load_smollm2()
    results = {}
    for gqa in ("per-query-head", "shared"):
        results[gqa] = longctx.run(config(gqa, args.length, args.context), Path(args.out) / gqa, model=model,
                                   tokenizer=tokenizer)  # fmt: skip
    print(f"| method | gqa | decode ppl ({args.length}) | decode KL | attention ms/step ({args.context}) | "
          "store MB | state MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for text in ("exact", *METHODS):
        for gqa, result in results.items():
            ppl = next(r for r in result["perplexity"]["rows"] if r.get("text", r["method"]) == text)
            speed = next(r for r in result["speed"]["rows"][0]["methods"] if r.get("text", r["method"]) == text)
            kl = "—" if ppl.get("decode_kl") is None else f"{ppl['decode_kl']:.4f}"
            print(f"| {text.partition(':')[0]} | {gqa} | {ppl['decode_ppl']:.2f} | {kl} | "
                  f"{speed['attention_ms']:.1f} | {speed['store_bytes'] / 2**20:.0f} | "
                  f"{speed['state_bytes'] / 2**20:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
