"""SmolLM2-135M decoding through the cache: perplexity of the last tokens decoded one at a time
(teacher forcing), against the same tokens in one prefill, and time per decoding step (issue 14).

The prompt (the first ``--tokens`` − ``--decode`` tokens of gensim's Wikipedia articles) is
prefilled with the method, then each of the last ``--decode`` tokens is fed alone through the
cache. SimHash decodes through its store of key codes (``lshattn.decode``); *scored* is the share
of the cached keys the decoding steps scored (``lshattn.hf.count``). Exact attention is the
model's own SDPA path::

    python benchmarks/smollm2_decode.py --tokens 1024 --decode 128

Results are in docs/longctx.md with the command that made them.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import lshattn
from lshattn import data, hf

METHODS = {
    "exact": None,
    "simhash sparse 32 × 8 + 4 sinks + 64 window": lshattn.SimHash(
        num_hashes=32, num_bits=8, mode="sparse", sinks=4, window=64
    ),
    "simhash importance 32 × 8 + 4 sinks + 64 window": lshattn.SimHash(
        num_hashes=32, num_bits=8, mode="importance", sinks=4, window=64
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=128)
    args = parser.parse_args()
    tokenizer, model = data.load_smollm2()
    text = "\n\n".join(body for _, body in data.wikipedia())
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    start = args.tokens - args.decode
    print(
        "| method | prefill perplexity (last tokens) | decoded perplexity | scored (decoding) | ms per step |\n"
        "|---|---|---|---|---|"
    )
    for name, method in METHODS.items():
        hf.use(model, method if method is not None else lshattn.Dense(), seed=0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, start - 1 : -1]
            prefill = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, start:])))
            out = model(input_ids=ids[:, :start], use_cache=True)
            cache, losses = (
                out.past_key_values,
                [torch.nn.functional.cross_entropy(out.logits[0, -1:], ids[0, start : start + 1])],
            )
            with hf.count(model) as tally:
                begin = time.perf_counter()
                for t in range(start, args.tokens - 1):
                    out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
                    cache = out.past_key_values
                    losses.append(torch.nn.functional.cross_entropy(out.logits[0, -1:], ids[0, t + 1 : t + 2]))
                per_step = (time.perf_counter() - begin) / (args.tokens - 1 - start)
        hf.use(model, None)
        decoded = math.exp(float(torch.stack(losses).mean()))
        print(f"| {name} | {prefill:.2f} | {decoded:.2f} | {tally.budget:.1%} | {per_step * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
