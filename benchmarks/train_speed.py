"""Training speed and memory of each method against dense attention (SDPA) on the MLM model.

The model is ``lshattn train mlm``'s (``lshattn.train.mlm.build_model``): BERT with 2 layers,
hidden 128, 2 heads (head dim 64), FFN 512, the 30,522-token vocabulary and as many positions as
tokens, new weights (from scratch, so no position extension); by default the recipe's
``SparseMaskedLM``, which computes the prediction head on the masked tokens only (``--head
masked``), or, with ``--head full``, ``BertForMaskedLM``'s head on every token (the recipe's
``--full-prediction``), for comparison. One *step* is what the recipe's Trainer does per
optimizer step: forward, the MLM loss over the masked tokens (``lshattn.train.mlm._mlm_loss``,
in the model's forward with ``--head masked``), backward, AdamW's step and zeroing the gradients.
Every length gets the same tokens per step (``--tokens``, 4,096: batch 8 at 512 tokens, batch 1
at 4,096), so tokens/s compare across lengths. Inputs are random token ids with 15 % of the positions as labels: a model with new
weights attends about alike to any text, and a step's time does not depend on which tokens.

Each (method, length) point runs in a fresh process: ``--warmup`` steps (first calls, the
optimizer's state, native kernels), then the median of ``--steps`` timed steps. Within one run,
dense is measured first and last at each length and each method's speedup is the mean of the
two dense medians over the method's median (the two also show how much the machine drifted).

A last row (``--no-ceiling`` skips it) trains with no attention at all, each token passing its
own value on: dense's time over that bounds the speedup any attention method can give this model,
since the MLM head (30,522 logits per masked token, or per token with ``--head full``), the FFN,
the embeddings' gradient and AdamW stay. With the head on every token it takes most of a step at
4,096 tokens, which is why the recipe computes it on the masked tokens only.

Memory is the peak resident set size (RSS) of the point's process over its RSS just before the
first step, that is what the steps add to the model, its inputs and the interpreter: gradients,
AdamW's two moments (together about 53 MiB here, the same for every method), activations and
the attention's own buffers, plus whatever the allocator keeps. RSS because nothing finer sees
tensors on the CPU: ``tracemalloc`` traces only Python's allocator (a 400 MB tensor shows as
under 1 KB), and torch's CPU allocator keeps no peak statistics (``torch.cuda.max_memory_allocated``
exists for CUDA only, and is what ``--device cuda`` reports). The RSS peak cannot be reset
within a process, hence one process per point.

Targets (from the issue): at 4,096 tokens every sort-and-bucket method (Reformer, SMYRF) trains
at least 3× faster than dense. BERT-LSH's reference code trained 3.25× *slower* than dense
(169 against 549 samples/s at 512 tokens, docs/paper-numbers.md §1.3).

::

    python benchmarks/train_speed.py --json docs/benchmarks-train-cpu.json     # the full table
    python benchmarks/train_speed.py --head full --json docs/benchmarks-train-full-head-cpu.json
    python benchmarks/train_speed.py --lengths 256 --tokens 512 --steps 2 --warmup 1 \\
        --methods dense "smyrf:num_hashes=1,q_cluster_size=64,k_cluster_size=64"   # a smoke run

Run it on an idle machine: the load average of other processes should be at most about 1
(``uptime``); the header records it before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, NamedTuple

DEFAULT_METHODS = [
    "simhash:num_bits=2",  # BERT-LSH's trained setting: 1 table of 2 bits, faithful (a quarter of pairs)
    "simhash:num_bits=8,mode=sparse",  # SimHash sparse: 8 bits, softmax over colliding pairs only
    "yoso:num_hashes=32,num_bits=8",  # YOSO-m, the setting of docs/benchmarks.md
    "reformer:num_hashes=1,shared_qk=False",
    "reformer:num_hashes=1,shared_qk=True",  # the Reformer paper's shared-QK attention
    "reformer:shared_qk=False",  # 2 rounds
    "smyrf:num_hashes=1,q_cluster_size=64,k_cluster_size=64",
    "smyrf:q_cluster_size=64,k_cluster_size=64",  # 2 rounds
]
DENSE = "dense"
CEILING = "none"  # out = v: no attention at all, the fastest any method could make the step
DEFAULT_LENGTHS = [512, 4096]
SORT_AND_BUCKET = ("reformer", "smyrf")


def _rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the peak


def _method(spec: str) -> Any:
    """The method for ``spec`` as ``lshattn.hf.use`` takes it.

    ``lshattn.hf.use`` refuses ``Reformer(shared_qk=True)``, because a *pretrained* model has
    separate query and key projections; a model trained from scratch, as here, may share them
    (the Reformer paper does). It runs through a wrapper that calls it with the queries as keys,
    as it requires (so the model's key projection is unused and gets no gradient).
    """
    import lshattn
    from lshattn.api import Inputs, Method
    from lshattn.cost import Cost

    if spec == CEILING:

        class NoAux(NamedTuple):
            dot_products: int

        @dataclasses.dataclass(frozen=True, eq=False)
        class NoAttention(Method):
            """Each token's own value: no scores at all. Not a method anyone should train with;
            the step time without attention, so ``dense / this`` bounds every method's speedup."""

            def _attend(self, inputs: Inputs):
                return inputs.v.to(inputs.q.dtype), NoAux(0)

            def cost(self, B, H, T, S, D, Dv, **kwargs):
                return Cost(flops=0, dot_products=0, memory_bytes=0, budget=0.0)

        return NoAttention()

    method = lshattn.parse(spec)
    if not (isinstance(method, lshattn.Reformer) and method.shared_qk):
        return method

    @dataclasses.dataclass(frozen=True, eq=False)
    class SharedQK(Method):
        inner: Any = None

        def _attend(self, inputs: Inputs):
            return self.inner(  # the keys are the queries (the model's key projection is unused)
                inputs.q, inputs.q, inputs.v, key_padding_mask=inputs.key_padding_mask,
                query_padding_mask=inputs.query_padding_mask, causal=inputs.causal, scale=inputs.scale,
                generator=inputs.generator, dropout_p=inputs.dropout_p, return_aux=True,
            )  # fmt: skip

        def cost(self, *args, **kwargs):
            return self.inner.cost(*args, **kwargs)

    return SharedQK(method)


def measure(
    spec: str, T: int, batch: int, steps: int, warmup: int, device: str, seed: int, head: str = "masked"
) -> dict:
    """Time and peak memory of training steps of one (method, length) point (in the child)."""
    import torch

    from lshattn.train import mlm

    torch.manual_seed(seed)
    config = mlm.MLMConfig(seq_len=T, sparse_prediction=head == "masked")
    model = mlm.build_model(config, vocab_size=30522, pad_token_id=0).to(device)
    method = None if spec == DENSE else _method(spec)
    if method is not None:
        from lshattn import hf

        hf.use(model, method, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, T), generator=g)
    labels = torch.where(torch.rand(batch, T, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    ids, labels = ids.to(device), labels.to(device)
    cuda = device.startswith("cuda")

    def step() -> float:
        if isinstance(model, mlm.SparseMaskedLM):  # the recipe's model: the head on the masked tokens
            loss = model(input_ids=ids, labels=labels).loss
        else:  # --full-prediction: the head on every token, then the recipe's loss on the masked ones
            loss = mlm._mlm_loss(model(input_ids=ids), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes("VmRSS")
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")
    cost = None
    if method is not None:
        H, D = config.num_heads, config.hidden_size // config.num_heads
        cost = method.cost(batch, H, T, T, D, D)
    median = statistics.median(times)
    return {
        "seconds": median,
        "min": min(times),
        "max": max(times),
        "tokens_per_second": batch * T / median,
        "extra_bytes": peak - base,
        "budget": 1.0 if cost is None else cost.budget,
        "finite_loss": all(math.isfinite(x) for x in losses),
        "threads": torch.get_num_threads(),
    }


def run_child(spec: str, T: int, batch: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--child", spec, str(T), str(batch), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--device", args.device, "--seed", str(args.seed), "--head", args.head,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() else tail[-200:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_header(device: str) -> str:
    import torch

    import lshattn

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(device)
    else:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
        hardware = f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return (
        f"{hardware} | torch {torch.__version__} | Python {platform.python_version()} | "
        f"lshattn {lshattn.__version__} @ {commit or '?'}"
    )


def _dense_seconds(results: list[dict], T: int) -> float | None:
    times = [r["seconds"] for r in results if r["method"] == DENSE and r["T"] == T and "seconds" in r]
    return statistics.mean(times) if times else None


def format_table(results: list[dict], lengths: list[int], specs: list[str], head: str = "masked") -> str:
    lines = []
    on = "the masked tokens (the recipe's model)" if head == "masked" else "every token (--full-prediction)"
    for T in lengths:
        dense = _dense_seconds(results, T)
        rows = [r for r in results if r["T"] == T]
        batch = rows[0]["batch"]
        lines += [
            (
                f"\n**T={T}** (batch {batch}, {batch * T} tokens per step, MLM head on {on}): step time "
                "(median), tokens/s, speedup over dense, extra memory, budget (dot products over dense)\n"
            ),
            "| method | step | tokens/s | speedup | extra memory | budget |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            label = r["method"] if r["method"] != DENSE else f"dense (SDPA){' again' if r.get('again') else ''}"
            if r["method"] == CEILING:
                label = "no attention (out = v): the ceiling"
            if "error" in r:
                lines.append(f"| `{label}` | {r['error']} | | | | |")
                continue
            speedup = "" if r["method"] == DENSE or dense is None else f"{dense / r['seconds']:.2f}×"
            lines.append(
                f"| `{label}` | {_ms(r['seconds'])} | {r['tokens_per_second']:,.0f} | {speedup} | "
                f"{r['extra_bytes'] / 2**20:.0f} MiB | {r['budget']:.1%} |"
            )
    return "\n".join(lines)


def verdicts(results: list[dict], lengths: list[int]) -> list[str]:
    """The issue's target at the longest length, and where SimHash stands against BERT-LSH's 3.25× slower."""
    lines = []
    T = 4096 if 4096 in lengths else max(lengths)
    dense = _dense_seconds(results, T)
    if dense is None:
        return lines
    for r in results:
        if r["T"] != T or "seconds" not in r:
            continue
        name = r["method"].split(":")[0]
        ratio = dense / r["seconds"]
        if r["method"] == CEILING:
            lines.append(f"no attention at all at T={T}: {ratio:.2f}× dense, the most any method can gain here")
        elif name in SORT_AND_BUCKET:
            lines.append(
                f"target at T={T}, `{r['method']}` ≥ 3× dense: {ratio:.2f}× ({'met' if ratio >= 3 else 'missed'})"
            )
        elif name == "simhash":
            side = "faster" if ratio >= 1 else "slower"
            lines.append(
                f"`{r['method']}` at T={T}: {max(ratio, 1 / ratio):.2f}× {side} than dense "
                f"(BERT-LSH's code: 3.25× slower at 512)"
            )
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method strings for lshattn.parse")
    parser.add_argument("--lengths", nargs="+", type=int, default=DEFAULT_LENGTHS)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step: batch = tokens // length")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--head", choices=["masked", "full"], default="masked",
        help="the MLM head on the masked tokens only, as the recipe's SparseMaskedLM (masked, the default), "
        "or on every token, as BertForMaskedLM (full: the recipe's --full-prediction)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    parser.add_argument(
        "--no-ceiling", dest="ceiling", action="store_false",
        help="skip the step without attention (out = v), which bounds what any method can gain",
    )  # fmt: skip
    parser.add_argument("--json", help="write every point to this file")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "T", "BATCH"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        spec, T, batch = args.child
        print(json.dumps(measure(spec, int(T), int(batch), args.steps, args.warmup, args.device, args.seed, args.head)))
        return 0
    methods = [m for m in args.methods if m != DENSE]
    load_before = os.getloadavg()
    if load_before[0] > 1.2:
        print(f"warning: load average {load_before[0]:.2f}; other processes will slow some points", file=sys.stderr)
    results = []
    specs = [
        (DENSE, False),
        *[(m, False) for m in methods],
        *([(CEILING, False)] if args.ceiling else []),
        (DENSE, True),
    ]
    points = [(T, spec, again) for T in args.lengths for spec, again in specs]
    for i, (T, spec, again) in enumerate(points, 1):
        batch = max(1, args.tokens // T)
        point = run_child(spec, T, batch, args)
        point.update(method=spec, T=T, batch=batch, again=again)
        results.append(point)
        shown = point.get("error") or f"{_ms(point['seconds'])}, {point['extra_bytes'] / 2**20:.0f} MiB"
        print(f"[{i}/{len(points)}] T={T} {spec}{' (again)' if again else ''}: {shown}", file=sys.stderr)
    load_after = os.getloadavg()
    header = machine_header(args.device) + f" | load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    print(header)
    print(format_table(results, args.lengths, methods, args.head))
    for line in verdicts(results, args.lengths):
        print(f"- {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": header, "tokens_per_step": args.tokens, "head": args.head, "results": results}, f, indent=1
            )
    return 1 if any("error" in r and r["error"] != "out of memory" for r in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
