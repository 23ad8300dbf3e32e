"""Summarise several `lshattn train adapt` runs (one per seed) as the mean ± spread table of
docs/training.md ("Measured").

::

    for S in 0 1 2; do
      lshattn train adapt --out runs/adapt/seed$S --seed $S --max-steps 800 --max-minutes 20 \
          --no-redraw --bbc --save-steps 400 --no-progress
    done
    python benchmarks/adapt_seeds.py runs/adapt/seed*

Each cell is the mean over the runs ± their sample standard deviation (n - 1), with the range.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (label, weights, attention, where in metrics.json under the task)
ROWS = (
    ("original", "exact (the teacher)", "before", "exact"),
    ("original", "the method", "before", "method"),
    ("adapted", "the method", "after", "method"),
    ("adapted", "exact", "after", "dense"),
)
COLUMNS = (("mean cosine to the teacher", "cosine"), ("min cosine", "cosine_min"), ("probe accuracy", "probe_accuracy"))


def spread(values: list[float]) -> str:
    """``mean ± std (min–max)`` of ``values``; just the value for one run."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def table(runs: list[dict], task: str) -> str:
    lines = ["| weights | attention | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---|---|---|---|---|"]
    for weights, attention, when, row in ROWS:
        cells = [spread([run[when][task][row][key] for run in runs]) for _, key in COLUMNS]
        lines.append(f"| {weights} | {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(runs: list[dict]) -> str:
    """The markdown of ``runs`` (parsed metrics.json files): settings, time, and a table per task."""
    first = runs[0]
    seeds = ", ".join(str(run["config"]["seed"]) for run in runs)
    steps = [run["steps"] for run in runs]
    minutes = [run["seconds"] / 60 for run in runs]
    loads = [run["load_average"]["mean_during_training"] for run in runs]
    parts = [
        f"{first['model']}, `{first['method']}` in all layers ({first['budget']:.0%} of the dot products), "
        f"seeds {seeds}: {min(steps)}–{max(steps)} steps of {first['config']['batch_size']} texts in "
        f"{min(minutes):.1f}–{max(minutes):.1f} min of training each (1 thread; load average "
        f"{min(loads):.1f}–{max(loads):.1f} on 2 cores).",
    ]
    for task, title in (("rt", "Rotten Tomatoes, 128 tokens"), ("bbc", "BBC News, 512 tokens (out of domain)")):
        if all(task in run["before"] for run in runs):
            parts += [f"**{title}**", table(runs, task)]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of `lshattn train adapt`")
    args = parser.parse_args()
    missing = [str(run) for run in args.runs if not (run / "metrics.json").is_file()]
    if missing:
        parser.error(f"no metrics.json in {', '.join(missing)}: has each run finished?")
    print(summary([json.loads((run / "metrics.json").read_text()) for run in args.runs]))


if __name__ == "__main__":
    main()
