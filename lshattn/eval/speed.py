"""Attention time against sequence length, in process: the quick sweep the report plots.

``lshattn bench`` (``lshattn/bench.py``) is the careful benchmark: one subprocess per point,
peak memory, forward and backward. This sweep times only the forward of each method next to
exact attention (SDPA) on random inputs of a model's head shape, in one process, so that a
report can show the crossover without minutes of set-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from lshattn.api import Method

__all__ = ["speed_rows", "median_seconds"]


def speed_rows(
    methods: Sequence[Method], lengths: Sequence[int], *, heads: int, dim: int, repeats: int = 3,
    progress: bool = True,
) -> list[dict]:  # fmt: skip
    """Median forward seconds of SDPA and each method at each length (B = 1, fp32).

    Returns:
        rows ``{"method", "T", "seconds", "sdpa_seconds", "speedup"}``; SDPA is timed next to
        every method at each length, and ``speedup`` = SDPA seconds / method seconds.
    """
    from tqdm.auto import tqdm

    rows = []
    jobs = [(T, m) for T in lengths for m in methods]
    generator = torch.Generator().manual_seed(0)
    sdpa_seconds: dict[int, float] = {}
    for T, method in tqdm(jobs, desc="speed", disable=not progress, leave=False):
        q, k, v = (torch.randn(1, heads, T, dim, generator=generator) for _ in range(3))
        with torch.no_grad():
            if T not in sdpa_seconds:
                sdpa_seconds[T] = median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats)
            seconds = median_seconds(lambda: method(q, k, v, generator=torch.Generator().manual_seed(0)), repeats)
        rows.append(
            {"method": str(method), "T": T, "seconds": seconds, "sdpa_seconds": sdpa_seconds[T],
             "speedup": sdpa_seconds[T] / seconds}
        )  # fmt: skip
    return rows


def median_seconds(fn, repeats: int, *, warm_up: bool = True) -> float:
    """Median wall time of ``repeats`` calls of ``fn()`` (after one untimed call if ``warm_up``)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
