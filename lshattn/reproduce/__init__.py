"""The seed papers' experiments, scaled to a CPU, with the papers' numbers beside ours.

Each reproduction is a module with ``reproduce(out, *, quick=False, seeds=(0, 1, 2))`` and a
command, ``lshattn reproduce NAME [--quick] [--out DIR] [--seeds ...]``, built on the training
recipes (``lshattn.train``). It trains every run once per seed into ``out/<run>/seed<N>``
(seeds already finished there are read back, so an interrupted reproduction resumes), and
writes ``out/report.md`` (the paper's numbers, ours as mean ± spread over seeds, every setting
scaled down and why, the command) with ``out/metrics.json`` and a plot. See docs/reproductions.md.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["REPRODUCTIONS", "load"]

# name -> module with reproduce(), add_arguments(parser) and run_from_args(args); the CLI builds from it.
REPRODUCTIONS = {
    "bert-lsh": "lshattn.reproduce.bert_lsh",
    "smyrf": "lshattn.reproduce.smyrf",
    "albert-lsh": "lshattn.reproduce.albert_lsh",
    "reformer": "lshattn.reproduce.reformer",
    "yoso": "lshattn.reproduce.yoso",
}


def load(name: str) -> ModuleType:
    """The module of reproduction ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; choose one of {', '.join(REPRODUCTIONS)}")
    return importlib.import_module(REPRODUCTIONS[name])
