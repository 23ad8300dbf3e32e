"""Speed and memory of each method next to ``scaled_dot_product_attention``, as ratios.

Every (method, length, mode) point runs in a fresh subprocess, so its peak memory is its own:
on CPU the peak resident set size over the inputs' baseline, on CUDA the peak allocated bytes.
Time is the median of ``--reps`` calls after one warm-up. "fwd" runs under ``no_grad``;
"fwdbwd" runs ``out.sum().backward()`` with q, k, v requiring grad. SDPA is measured in the same
run, and every method's speedup is SDPA's time divided by its own.

Before timing, a verify gate checks every method on a small input in its exact limit (one
block or cluster holding everything) against SDPA; no speedup is reported on a red gate.

Examples::

    lshattn bench                                         # the default table (≈20 min on 2 cores)
    lshattn bench --lengths 4096 16384 --modes fwd        # a quick look
    lshattn bench --methods "smyrf:num_hashes=4" --json out.json
    lshattn bench --device cuda                           # on a GPU, against SDPA's flash backend
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import lshattn

DEFAULT_METHODS = [
    "reformer:num_hashes=1,shared_qk=False",
    "reformer:shared_qk=False",
    "reformer:num_hashes=4,shared_qk=False",
    "smyrf:num_hashes=1,q_cluster_size=64,k_cluster_size=64",
    "smyrf:q_cluster_size=64,k_cluster_size=64",
    "smyrf:num_hashes=4,q_cluster_size=64,k_cluster_size=64",
    "simhash:num_bits=8",
    "yoso:num_hashes=32,num_bits=8",
]
SDPA = "sdpa"
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]


def attention_fn(spec: str, seed: int, causal: bool = False):
    """The callable for a method string, or SDPA itself."""
    if spec == SDPA:
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    method = lshattn.parse(spec)
    generator = torch.Generator().manual_seed(seed)
    return lambda q, k, v: method(q, k, v, causal=causal, generator=generator)


def measure(
    spec: str, T: int, mode: str, reps: int, device: str, B: int, H: int, D: int, seed: int = 0, causal: bool = False
) -> dict:
    """Time and peak memory of one point (run inside the child process)."""
    torch.manual_seed(seed)
    fb = mode == "fwdbwd"
    q, k, v = (torch.randn(B, H, T, D, device=device, requires_grad=fb) for _ in range(3))
    fn = attention_fn(spec, seed, causal)
    cuda = device.startswith("cuda")

    def step():
        if fb:
            fn(q, k, v).sum().backward()
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "min": min(times), "max": max(times), "extra_bytes": peak - base}


def run_child(spec: str, T: int, mode: str, reps: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "lshattn.bench", "--child", spec, str(T), mode, str(reps),
        "--device", args.device, "--batch", str(args.batch), "--heads", str(args.heads), "--dim", str(args.dim),
        "--seed", str(args.seed), *(["--causal"] if args.causal else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() else tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


# Each method's exact limit on the verify input (96 tokens): one block, cluster or bucket holding
# everything, or codes of 0 bits (every pair collides). YOSO is not softmax attention and has no
# such limit; its limit, YOSO-E, is checked in tests/test_yoso.py.
EXACT_LIMITS = {
    "dense": {},
    "reformer": dict(bucket_size=128),
    "smyrf": dict(q_cluster_size=128, k_cluster_size=128),
    "simhash": dict(num_bits=0),
}


def verify(specs: list[str], device: str) -> None:
    """Each method in its exact limit must equal SDPA before any timing is reported."""
    q, k, v = (torch.randn(2, 4, 96, 32, device=device) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    checked = 0
    for spec in specs:
        method = lshattn.parse(spec)
        if method.name not in EXACT_LIMITS or getattr(method, "shared_qk", False):
            continue  # no softmax exact limit (YOSO), or another function of (q, k) (shared QK)
        exact = dataclasses.replace(method, **EXACT_LIMITS[method.name])
        error = (exact(q, k, v) - expected).abs().max().item()
        if error > 1e-4:
            raise RuntimeError(f"verify gate failed: {spec} in its exact limit differs from SDPA by {error:.2e}")
        checked += 1
    print(f"verify gate passed: {checked} of {len(specs)} methods equal SDPA in their exact limits", file=sys.stderr)


def machine_header(device: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(device)
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
        hardware = f"{model}, {os.cpu_count()} cores"
    return f"{hardware} | torch {torch.__version__} | Python {platform.python_version()} | lshattn {lshattn.__version__} @ {commit}"


def format_table(results: list[dict], lengths: list[int], modes: list[str], specs: list[str]) -> str:
    lines = []
    for mode in modes:
        causal = ", causal" if results[0].get("causal") else ""
        lines += [f"\n**{mode}** (B={results[0]['B']}, H={results[0]['H']}, D={results[0]['D']}, fp32{causal}): "
                  "time, speedup over SDPA, extra memory\n"]  # fmt: skip
        lines.append("| method | " + " | ".join(f"T={T}" for T in lengths) + " |")
        lines.append("|---" * (len(lengths) + 1) + "|")
        for spec in [SDPA] + specs:
            cells = []
            for T in lengths:
                point = next(r for r in results if r["method"] == spec and r["T"] == T and r["mode"] == mode)
                base = next(r for r in results if r["method"] == SDPA and r["T"] == T and r["mode"] == mode)
                if "error" in point:
                    cells.append(point["error"])
                    continue
                cell = f"{_ms(point['seconds'])}"
                if spec != SDPA and "seconds" in base:
                    cell += f" ({base['seconds'] / point['seconds']:.1f}×)"
                cells.append(cell + f", {point['extra_bytes'] / 2**20:.0f} MiB")
            lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lshattn bench`` (also used by ``python -m lshattn.bench``)."""
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method strings for lshattn.parse")
    parser.add_argument("--lengths", nargs="+", type=int, default=DEFAULT_LENGTHS)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--reps", type=int, default=5, help="timed calls per point (3 from 16k, 2 from 32k)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random inputs and the hash projections")
    parser.add_argument("--causal", action="store_true", help="causal attention (SDPA with is_causal=True)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    parser.add_argument("--json", help="write every measured point to this file")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "T", "MODE", "REPS"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; prints the table, returns an exit code."""
    if args.child:
        spec, T, mode, reps = args.child
        sizes = (args.device, args.batch, args.heads, args.dim, args.seed, args.causal)
        print(json.dumps(measure(spec, int(T), mode, int(reps), *sizes)))
        return 0

    verify(args.methods, args.device)
    results = []
    points = [(mode, T, spec) for mode in args.modes for T in args.lengths for spec in [SDPA] + args.methods]
    for i, (mode, T, spec) in enumerate(points, 1):
        reps = args.reps if T < 16384 else (3 if T < 32768 else 2)
        point = run_child(spec, T, mode, reps, args)
        point.update(method=spec, T=T, mode=mode, B=args.batch, H=args.heads, D=args.dim, causal=args.causal)
        results.append(point)
        shown = point.get("error") or f"{_ms(point['seconds'])}, {point['extra_bytes'] / 2**20:.0f} MiB"
        print(f"[{i}/{len(points)}] {mode} T={T} {spec}: {shown}", file=sys.stderr)

    header = machine_header(args.device)
    print(header)
    print(format_table(results, args.lengths, args.modes, args.methods))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "results": results}, f, indent=1)
    return 1 if any("error" in r and r["error"] != "out of memory" for r in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
