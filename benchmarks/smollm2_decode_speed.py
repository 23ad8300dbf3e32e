"""Time per decoding step of SmolLM2-135M at long contexts: exact attention (SDPA over the cache)
against SimHash and YOSO decoding through their stores (issue 14); attention time apart
(``hf.count``'s ``seconds``).

The prompt (gensim's Wikipedia articles) is prefilled once with exact attention; each method then
decodes ``--steps`` tokens after it, teacher-forced, from a copy of that cache. SimHash's first
step hashes the whole cache once (timed apart); the others hash one key per layer. Whole-model
time per step (30 layers, their MLPs included), measured in one run::

    python benchmarks/smollm2_decode_speed.py --context 2048 4096 8000

Results are in docs/longctx.md with the command that made them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lshattn
from lshattn import data, hf

METHODS = {
    "exact (SDPA)": lshattn.Dense(),
    "SimHash sparse 32 × 8 + 4 sinks + 64 window": lshattn.SimHash(
        num_hashes=32, num_bits=8, mode="sparse", sinks=4, window=64
    ),
    "YOSO 32 × 8 + 4 sinks + 64 window": lshattn.YOSO(num_hashes=32, num_bits=8, sinks=4, window=64),
    "YOSO 16 × 8": lshattn.YOSO(num_hashes=16, num_bits=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    tokenizer, model = data.load_smollm2()
    text = "\n\n".join(body for _, body in data.wikipedia())
    ids = tokenizer(text, return_tensors="pt").input_ids
    print(
        "| context | method | first step (ms) | ms per step (median) | attention ms per step (median) | "
        "scored (decoding) |\n|---|---|---|---|---|---|"
    )
    for context in args.context:
        hf.use(model, lshattn.Dense())
        with torch.no_grad():
            prefill = model(input_ids=ids[:, :context], use_cache=True).cache
        for name, method in METHODS.items():
            hf.use(model, method)
            cache, times, attention = copy.deepcopy(prefill), [], []
            with torch.no_grad(), hf.count(model) as tally:
                for t in range(context, context + args.steps + 1):
                    start, inside = time.perf_counter(), tally.seconds
                    out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
                    times.append(time.perf_counter() - start)
                    attention.append(tally.seconds - inside)
                    cache = out.cache
            print(
                f"| {context} | {name} | {times[0] * 1e3:.0f} | {statistics.median(times[1:]) * 1e3:.0f} | "
                f"{statistics.median(attention[1:]) * 1e3:.1f} | "
                f"{tally.budget:.1%} |",
                flush=True,
            )
        hf.use(model, None)


if __name__ == "__main__":
    main()
