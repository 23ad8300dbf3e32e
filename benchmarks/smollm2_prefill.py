"""First numbers on a causal LM: SmolLM2-135M's perplexity with each method in the prefill (issue 14).

Every attention layer of SmolLM2-135M-Instruct (``lshattn.data.load_smollm2``) runs the method,
causal, on one long text made of the Wikipedia articles that ship with gensim; the perplexity is
teacher-forced over all its tokens (one forward, no cache: the decoding path is not built yet).
*Scored* is the share of the real query–key pairs the layers scored (``lshattn.hf.count``; T·S
per call, causal or not, as ``cost().budget``: a causal method scores at most about half)::

    python benchmarks/smollm2_prefill.py --tokens 1024 2048
    python benchmarks/smollm2_prefill.py --tokens 1024 --only exact --more "simhash:num_hashes=64,num_bits=8,mode=importance,sinks=4,window=64"

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
    "oracle top-k 1/16": lshattn.TopK(fraction=1 / 16),
    "local: 4 sinks + 64 window": lshattn.Local(sinks=4, window=64),
    "simhash importance 16 × 8 + 4 sinks + 64 window": lshattn.SimHash(
        num_hashes=16, num_bits=8, mode="importance", sinks=4, window=64
    ),
    "simhash sparse 16 × 8 + 4 sinks + 64 window": lshattn.SimHash(
        num_hashes=16, num_bits=8, mode="sparse", sinks=4, window=64
    ),
    "smyrf 2 × 64 + 4 sinks + 64 window": lshattn.SMYRF(
        num_hashes=2, q_cluster_size=64, k_cluster_size=64, sinks=4, window=64
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), help="methods to run (default: all)")
    parser.add_argument("--more", nargs="+", default=[], help="more method strings for lshattn.parse")
    args = parser.parse_args()
    METHODS.update({text: lshattn.parse(text) for text in args.more})
    tokenizer, model = data.load_smollm2()
    text = "\n\n".join(body for _, body in data.wikipedia())
    ids = tokenizer(text, return_tensors="pt").input_ids
    print("| tokens | method | scored | perplexity | ratio to exact | seconds |\n|---|---|---|---|---|---|")
    for length in args.tokens:
        batch = ids[:, :length]
        exact = None
        for name in (args.only or list(METHODS)) + [t for t in args.more if args.only]:
            method = METHODS[name]
            start = time.perf_counter()
            hf.use(model, method if method is not None else lshattn.Dense(), seed=0)
            with torch.no_grad(), hf.count(model) as tally:
                loss = model(input_ids=batch, labels=batch).loss
            hf.use(model, None)
            perplexity = math.exp(float(loss))
            exact = perplexity if method is None else exact
            ratio = f"{perplexity / exact:.3f}" if exact else "—"
            print(
                f"| {length} | {name} | {tally.budget:.1%} | {perplexity:.2f} | {ratio} | "
                f"{time.perf_counter() - start:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
