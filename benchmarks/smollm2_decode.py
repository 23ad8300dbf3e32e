"""SmolLM2-135M decoding through the cache: the last tokens decoded one at a time (teacher
forcing) against the same tokens in one prefill with the same method (issue 14).

The prompt (the first ``--tokens`` − ``--decode`` tokens of gensim's Wikipedia articles) is
prefilled with the method, then each of the last ``--decode`` tokens is fed alone through the
cache, each method through its own decoding step (``lshattn.decode``). Per method: perplexity of
those tokens in the prefill and decoded, the mean next-token KL(prefill ‖ decoded) — zero up to
rounding for the strictly causal methods (SimHash, YOSO, TopK, Local, whole-bucket Reformer),
and what chunked Reformer and SMYRF lose because their causal prefill depends on the sort of the whole sequence — the share of
the cached keys the decoding steps scored (``lshattn.hf.count``) and the time per step::

    python benchmarks/smollm2_decode.py --tokens 1024 --decode 128
    python benchmarks/smollm2_decode.py --tokens 1024 --decode 64 --only reformer smyrf

Results are in docs/longctx.md with the command that made them.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import lshattn
from lshattn import data, hf

METHODS = {
    "exact": lshattn.Dense(),
    "simhash": lshattn.SimHash(num_hashes=32, num_bits=8, mode="sparse", sinks=4, window=64),
    "yoso": lshattn.YOSO(num_hashes=32, num_bits=8, sinks=4, window=64),
    "reformer": lshattn.Reformer(num_hashes=2, bucket_size=64, num_buckets=32, shared_qk=False, sinks=4, window=64),
    # strictly causal: each round's whole bucket, what a decoding step attends
    "reformer-whole": lshattn.Reformer(
        num_hashes=2, num_buckets=32, shared_qk=False, whole_buckets=True, sinks=4, window=64
    ),
    "smyrf": lshattn.SMYRF(num_hashes=2, q_cluster_size=64, k_cluster_size=64, sinks=4, window=64),
    "topk": lshattn.TopK(fraction=1 / 16, sinks=4, window=64),
    "local": lshattn.Local(sinks=4, window=64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), help="methods to run (default: all)")
    args = parser.parse_args()
    tokenizer, model = data.load_smollm2()
    text = "\n\n".join(body for _, body in data.wikipedia())
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    start = args.tokens - args.decode
    targets = ids[0, start:]
    print(
        "| method | prefill perplexity (last tokens) | decoded perplexity | KL(prefill ‖ decoded) | "
        "scored (decoding) | ms per step |\n|---|---|---|---|---|---|"
    )
    for name in args.only or list(METHODS):
        method = METHODS[name]
        hf.use(model, method, seed=0)
        with torch.no_grad():
            prefill = model(input_ids=ids).logits[0, start - 1 : -1]
            out = model(input_ids=ids[:, :start], use_cache=True)
            cache, steps = out.cache, [out.logits[0, -1]]
            with hf.count(model) as tally:
                begin = time.perf_counter()
                for t in range(start, args.tokens - 1):
                    out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
                    cache = out.cache
                    steps.append(out.logits[0, -1])
                per_step = (time.perf_counter() - begin) / (args.tokens - 1 - start)
        decoded = torch.stack(steps)
        hf.use(model, None)
        perplexity = {key: math.exp(float(F.cross_entropy(x, targets))) for key, x in (("p", prefill), ("d", decoded))}
        kl = float(F.kl_div(decoded.log_softmax(-1), prefill.log_softmax(-1), log_target=True, reduction="batchmean"))
        print(
            f"| {method} | {perplexity['p']:.2f} | {perplexity['d']:.2f} | {kl:.4f} | {tally.budget:.1%} | "
            f"{per_step * 1e3:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
