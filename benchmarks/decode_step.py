"""One decoding step at the method level (``lshattn.decode.step``): each native step
(``lshattn.kernels.simhash_decode``, ``yoso_decode``, ``sketch_decode``) against the torch step
it replaces and exact attention (SDPA over the cache, GQA), on one thread, SmolLM2's shapes (9
query heads, 3 KV heads, dim 64) and the settings ``lshattn longctx`` decodes with at 1/16 of
the keys at 8k (SimHash 32 tables × 9 bits, YOSO-m 40 hashes × 8 bits, SketchTopK 256-bit
sketches keeping 5.4 % of the keys besides the sinks and window).

Random vectors collide far more than a model's queries and keys do (about 7 % of the keys at
32 × 9 bits here against SmolLM2's 2 %), so this is a pessimistic load for SimHash (YOSO's step
reads a table row per hash whatever collides); the cache is warm (one layer's tensors fit in
cache), where a model's 30 layers are not::

    python benchmarks/decode_step.py --context 2048 8000

``--gqa per-query-head shared`` times both kinds of store: a query head's, and a key head's
shared by its 3 query heads (the default, ``hf.use(..., gqa="shared")``: each new key hashed once).

Results are in docs/longctx.md with the command that made them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

import lshattn
from lshattn import decode, kernels

METHODS = {
    "SimHash": lshattn.SimHash(num_hashes=32, num_bits=9, mode="sparse", sinks=4, window=64),
    "YOSO": lshattn.YOSO(num_hashes=40, num_bits=8, sinks=4, window=64),
    "SketchTopK": lshattn.SketchTopK(fraction=0.0543, num_bits=256, sinks=4, window=64),
}


def timed(step, repeats: int) -> float:
    """Median milliseconds of ``step()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(method: lshattn.Method, S: int, repeats: int, per_kv_head: bool) -> tuple[float, float, float, int]:
    """(SDPA, torch step, native step) ms and the keys the step scored, at S cached keys, with a
    store a key head (``per_kv_head``) or a query head."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(1, 9, 1, 64, generator=g)
    k, v = (torch.randn(1, 3, S, 64, generator=g) for _ in "kv")
    store = decode.step(
        None, method, q, k[:, :, :-1], v[:, :, :-1], None, 0.125, torch.Generator().manual_seed(0),
        per_kv_head=per_kv_head,
    ).store  # fmt: skip

    def replay():
        # the same step again: the store forgets the last key it took (YOSO's tables keep adding
        # it, which changes a row's sum, not the work)
        store.length, store.last_key = S - 1, k[:, :, S - 2].clone()
        return decode.step(store, method, q, k, v, None, 0.125, None, per_kv_head=per_kv_head)

    native = timed(replay, repeats)
    scored = replay().scored
    with mock.patch.object(kernels, "decodes_natively", lambda *a: False):
        torch_step = timed(replay, repeats)
    exact = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeats)
    return exact, torch_step, native, scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 8000])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--gqa", nargs="+", choices=["per-query-head", "shared"], default=["shared"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| method | store | context | exact (SDPA) ms | torch step ms | native step ms | keys scored |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name in args.methods:
        for S in args.context:
            for gqa in args.gqa:
                exact, torch_step, native, scored = measure(METHODS[name], S, args.repeats, gqa == "shared")
                print(
                    f"| {name} | {gqa} | {S:,} | {exact:.2f} | {torch_step:.2f} | {native:.2f} | "
                    f"{scored / 9:.0f} a head |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
