"""What the reproductions share: run a recipe once per seed (resuming where an earlier
invocation stopped), aggregate accuracies over seeds, and write ``metrics.json``,
``report.md`` and a plot with the paper's numbers beside ours.

A reproduction is a list of ``Run`` (one recipe configuration each, trained once per seed into
``out/<run name>/seed<N>``), the ``Row`` of its paper-vs-ours table, and the ``Scaled`` list of
every place where our setup differs from the paper's. Accuracies are in percent, like the
papers' tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lshattn.train import FinetuneConfig, finetune
from lshattn.train.common import RecipeConfig, environment, method_label

__all__ = [
    "ROTTEN_TOMATOES",
    "Row",
    "Run",
    "Scaled",
    "accuracies",
    "add_arguments",
    "command_line",
    "cross_table",
    "evaluated",
    "format_spread",
    "plot_accuracies",
    "quick_config",
    "quick_scaled",
    "results_table",
    "row_values",
    "run_seeds",
    "scaled_table",
    "seeds_from_args",
    "seeds_of",
    "spread",
    "write_reproduction",
]

# The fine-tuning runs of the smyrf and albert-lsh reproductions (their docstrings say why):
# MiniLM on Rotten Tomatoes at 128 tokens, 250 steps of 16. Train + held out stay under the
# 1,936 documents of 128 tokens the snippets make (968 per class).
ROTTEN_TOMATOES = FinetuneConfig(
    method="dense", task="rt", max_length=128, train_size=1400, eval_size=500, max_steps=250, batch_size=16,
    learning_rate=5e-5, eval_steps=50, save_steps=250,
)  # fmt: skip

# Settings a finished seed may differ in from the run asked for and still be reused.
_NOT_SETTINGS = ("progress", "resume")


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration of a reproduction, trained once per seed.

    Attributes:
        name: its folder under ``out`` (``out/<name>/seed<N>``); a plain word.
        label: how the tables name it (e.g. "SMYRF 2×32 (50 %)").
        config: the recipe's settings (a ``FinetuneConfig`` unless the reproduction passes
            another recipe); the seed is replaced per seed.
        seeds: the only seeds this run trains, of those asked for (None: every one). For a run
            too long for 3 seeds; its rows then pair with the other runs on the seeds they share.
    """

    name: str
    label: str
    config: RecipeConfig
    seeds: tuple[int, ...] | None = None

    def trains(self, seed: int) -> bool:
        return self.seeds is None or seed in self.seeds


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the paper-vs-ours table: the accuracy (percent) of run ``run`` evaluated with
    ``evaluated_with`` (a method string or "dense"), or, with ``minus`` = (run, evaluated_with),
    its difference to that cell, paired by seed (same seed: same split, same data order).

    Attributes:
        what: the row's name. paper: the paper's number, as text (with what it measured).
    """

    what: str
    paper: str
    run: str
    evaluated_with: str
    minus: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Scaled:
    """A place where our setup differs from the paper's: what the paper did, what we do, why."""

    what: str
    paper: str
    ours: str
    why: str


def quick_config(config: FinetuneConfig) -> FinetuneConfig:
    """A reproduction's run shrunk for ``--quick``: a handful of steps on small splits, to show the
    pipeline works (seconds per run; the numbers mean nothing)."""
    return dataclasses.replace(
        config, train_size=96, eval_size=48, max_steps=8, eval_steps=4, save_steps=8, learning_rate=2e-4
    )


def quick_scaled(config: FinetuneConfig) -> Scaled:
    """The line a ``--quick`` run adds to the scaled settings: what it shrank (from ``quick_config``)."""
    small = quick_config(config)
    return Scaled(
        "--quick", "–",
        f"{small.max_steps} steps of {small.batch_size} on {small.train_size} documents, {small.eval_size} held out, "
        f"lr {small.learning_rate:g}, instead of the settings above",
        "a smoke test of the pipeline: its numbers are not results",
    )  # fmt: skip


def run_seeds(
    runs: Sequence[Run],
    seeds: Sequence[int],
    out: Path,
    *,
    progress: bool = True,
    recipe: Callable[[Any, Path], dict] = finetune,
) -> dict[str, list[dict]]:
    """Train every run with every seed, each into ``out/<run.name>/seed<N>``, and return each run's
    per-seed metrics (the recipe's, plus ``wall_seconds``), in the order of ``seeds``, leaving out
    the seeds a run does not train (``Run.seeds``). Seed by seed: every run at the first seed, then
    at the next, so a reproduction stopped early still compares every run. ``progress``: the
    recipe's progress bars.

    A seed whose ``metrics.json`` exists is not trained again but read back, so an interrupted
    reproduction resumes where it stopped (a seed cut short restarts from its beginning; Ctrl-C
    says so). Prints a line per run and seed.

    Raises:
        ValueError: a finished seed was trained with other settings than ``run.config``.
    """
    results: dict[str, list[dict]] = {run.name: [] for run in runs}
    jobs = [(seed, run) for seed in seeds for run in runs if run.trains(seed)]
    total = len(jobs)
    for done, (seed, run) in enumerate(jobs, start=1):
        folder = out / run.name / f"seed{seed}"
        config = dataclasses.replace(run.config, seed=seed, progress=progress)
        found = folder / "metrics.json"
        if found.is_file():
            metrics = json.loads(found.read_text())
            _check_same_settings(metrics, config, folder)
            print(f"[{done}/{total}] {run.label}, seed {seed}: done before, read {found}", flush=True)
        else:
            print(f"[{done}/{total}] {run.label}, seed {seed}: training into {folder}", flush=True)
            start = time.perf_counter()
            try:
                metrics = recipe(config, folder)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(
                    f"interrupted in {run.label}, seed {seed}; the {done - 1} runs finished are kept: "
                    f"the same command continues from this one"
                ) from None
            metrics["wall_seconds"] = time.perf_counter() - start
            found.write_text(json.dumps(metrics, indent=1, default=str) + "\n")
            print(f"[{done}/{total}] {run.label}, seed {seed}: {metrics['wall_seconds'] / 60:.1f} min", flush=True)
        results[run.name].append(metrics)
    return results


def _check_same_settings(metrics: Mapping[str, Any], config: RecipeConfig, folder: Path) -> None:
    """Refuse to reuse a finished seed whose recorded settings differ from ``config``'s."""
    wanted = json.loads(json.dumps({**dataclasses.asdict(config), "method": method_label(config.method)}, default=str))
    stored = metrics.get("config", {})
    differ = sorted(k for k in wanted if k not in _NOT_SETTINGS and stored.get(k) != wanted[k])
    if differ:
        shown = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted[k]!r} now" for k in differ)
        raise ValueError(
            f"{folder} holds a finished run with other settings ({shown}); "
            f"give another --out, or delete {folder} to train it again"
        )


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean and spread of per-seed values: ``mean``, ``std`` (sample standard deviation, n − 1;
    None for one value), ``min``, ``max``, ``n`` and the ``values`` themselves."""
    if not values:
        raise ValueError("no values to aggregate (no seed finished)")
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def format_spread(stats: Mapping[str, Any], *, signed: bool = False) -> str:
    """``"85.3 ± 1.2 (83.9–86.5, 3 seeds)"``; one seed: ``"85.3 (1 seed)"``."""
    number = "{:+.1f}" if signed else "{:.1f}"
    mean = number.format(stats["mean"])
    if stats["n"] == 1:
        return f"{mean} (1 seed)"
    low, high = (number.format(stats[k]) for k in ("min", "max"))
    return f"{mean} ± {stats['std']:.1f} ({low} to {high}, {stats['n']} seeds)"


def accuracies(results: Mapping[str, list[dict]], run: str, evaluated_with: str) -> list[float]:
    """Per-seed accuracy in percent of ``run`` evaluated with ``evaluated_with``.

    Raises:
        KeyError: the run was not evaluated with that method (the message lists those it was).
    """
    label = method_label(evaluated_with)
    values = []
    for metrics in results[run]:
        scores = metrics["evaluated_with"]
        if label not in scores:
            raise KeyError(f"run {run!r} was not evaluated with {label!r}; it was with {', '.join(scores)}")
        values.append(100.0 * scores[label]["accuracy"])
    return values


def evaluated(results: Mapping[str, list[dict]], run: str, method: str) -> bool:
    """Whether every seed of ``run`` was evaluated with ``method``."""
    label = method_label(method)
    return all(label in metrics["evaluated_with"] for metrics in results[run])


def row_values(row: Row, results: Mapping[str, list[dict]]) -> list[float]:
    """The per-seed values of a table row: an accuracy, or a difference paired by seed (over the
    seeds both runs trained)."""
    values = accuracies(results, row.run, row.evaluated_with)
    if row.minus is None:
        return values
    other = dict(zip(seeds_of(results, row.minus[0]), accuracies(results, *row.minus)))
    return [a - other[seed] for a, seed in zip(values, seeds_of(results, row.run)) if seed in other]


def seeds_of(results: Mapping[str, list[dict]], run: str) -> list[int]:
    """The seeds ``run`` trained, in the order of its results."""
    return [m["config"]["seed"] for m in results[run]]


def _wall(results: Mapping[str, list[dict]], run: str) -> str:
    """Mean wall time of a run's seeds, in minutes ("–" when none was recorded)."""
    times = [m["wall_seconds"] for m in results[run] if m.get("wall_seconds") is not None]
    return f"{statistics.fmean(times) / 60:.1f} min per seed" if times else "–"


def results_table(
    rows: Sequence[Row], runs: Sequence[Run], evaluated_with: Mapping[str, str], results: Mapping[str, list[dict]]
) -> str:
    """The markdown table "| | paper | ours | settings | wall time |", one line per row; runs and
    evaluation methods are named by their titles (``Run.label``, the keys of ``evaluated_with``)."""
    runs_named = {run.name: run.label for run in runs}
    methods_named = {method_label(method): title for title, method in evaluated_with.items()}

    def cell(run: str, method: str) -> str:
        label = method_label(method)
        return f"trained with {runs_named[run]}, evaluated with {methods_named.get(label, f'`{label}`')}"

    lines = ["| | paper | ours (accuracy %, mean ± std (min to max)) | settings | wall time |", "|---|---|---|---|---|"]
    for row in rows:
        stats = spread(row_values(row, results))
        settings, wall = cell(row.run, row.evaluated_with), _wall(results, row.run)
        if row.minus is not None:
            settings, wall = f"{settings}; minus {cell(*row.minus)}; paired by seed", "–"
        ours = format_spread(stats, signed=row.minus is not None)
        lines.append(f"| {row.what} | {row.paper} | {ours} | {settings} | {wall} |")
    return "\n".join(lines)


def cross_table(runs: Sequence[Run], evaluated_with: Mapping[str, str], results: Mapping[str, list[dict]]) -> str:
    """The interchange table: one line per run (trained with), one column per evaluation method
    (``evaluated_with``: column title -> method string), cells mean ± std accuracy in percent
    ("–" where the run was not evaluated with the column's method)."""
    head = "| trained with ↓ / evaluated with → | " + " | ".join(evaluated_with) + " |"
    lines = [head, "|---" * (len(evaluated_with) + 1) + "|"]
    for run in runs:
        cells = []
        for method in evaluated_with.values():
            if not evaluated(results, run.name, method):
                cells.append("–")
                continue
            stats = spread(accuracies(results, run.name, method))
            cells.append(f"{stats['mean']:.1f}" + ("" if stats["std"] is None else f" ± {stats['std']:.1f}"))
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaled_table(scaled: Sequence[Scaled]) -> str:
    """Every scaled-down or changed setting as a markdown table."""
    lines = ["| setting | paper | ours | why |", "|---|---|---|---|"]
    lines += [f"| {s.what} | {s.paper} | {s.ours} | {s.why} |" for s in scaled]
    return "\n".join(lines)


def plot_accuracies(
    runs: Sequence[Run], evaluated_with: Mapping[str, str], results: Mapping[str, list[dict]], path: Path, title: str
) -> Path:
    """Accuracy per run (x) and evaluation method (colour): each seed a small dot, the mean a
    large one with a ±1 std bar (nothing where the run was not evaluated with the method).
    Written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.6 + 2.2 * len(runs), 4.0))
    width = 0.7 / max(1, len(evaluated_with))
    for j, (column, method) in enumerate(evaluated_with.items()):
        colour = f"C{j}"
        shown = [(i, run) for i, run in enumerate(runs) if evaluated(results, run.name, method)]
        for i, run in shown:
            stats = spread(accuracies(results, run.name, method))
            x = i - 0.35 + width * (j + 0.5)
            axis.scatter([x] * stats["n"], stats["values"], s=10, color=colour, alpha=0.5)
            axis.errorbar(x, stats["mean"], yerr=stats["std"] or 0.0, fmt="o", color=colour, capsize=3,
                          label=f"evaluated with {column}" if i == shown[0][0] else None)  # fmt: skip
    axis.set_xticks(range(len(runs)), [f"trained with\n{run.label}" for run in runs])
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def command_line(name: str, out: str | Path, quick: bool, seeds: Sequence[int]) -> str:
    """The command that makes a reproduction, as the report shows it."""
    return f"lshattn reproduce {name}{' --quick' if quick else ''} --out {out} --seeds {' '.join(map(str, seeds))}"


def write_reproduction(
    out: Path,
    *,
    name: str,
    title: str,
    intro: str,
    rows: Sequence[Row],
    runs: Sequence[Run],
    evaluated_with: Mapping[str, str],
    results: Mapping[str, list[dict]],
    scaled: Sequence[Scaled],
    command: str,
    sections: str = "",
    extra: Mapping[str, Any] | None = None,
    extra_seconds: float = 0.0,
) -> dict[str, Any]:
    """Write ``out/metrics.json``, ``out/report.md`` and ``out/accuracy.png`` and return the metrics.

    The report: ``intro``, the paper-vs-ours table, the interchange table (``cross_table``), the
    plot, ``sections`` (markdown the reproduction adds), every scaled setting, links to each
    seed's training curves, and the command. ``extra``: more entries for ``metrics.json``, from
    a stage before ``runs`` (e.g. pretraining), whose wall time ``extra_seconds`` counts in the
    total.
    """
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracies(runs, evaluated_with, results, out / "accuracy.png", title)
    seeds = sorted({seed for run in runs for seed in seeds_of(results, run.name)})
    wall = extra_seconds + sum(m.get("wall_seconds") or 0.0 for ms in results.values() for m in ms)
    methods = "; ".join(f"{title}: `{m}`" for title, m in evaluated_with.items())
    curves = "\n".join(
        f"- {run.label}: " + ", ".join(f"[seed {s}]({run.name}/seed{s}/loss.png)" for s in seeds_of(results, run.name))
        for run in runs
    )
    metrics = {
        "reproduction": name,
        "command": command,
        "seeds": seeds,
        "wall_seconds": wall,
        "rows": [{**dataclasses.asdict(row), **spread(row_values(row, results))} for row in rows],
        "interchange": {
            run.name: {
                column: spread(accuracies(results, run.name, m))
                for column, m in evaluated_with.items()
                if evaluated(results, run.name, m)
            }
            for run in runs
        },
        "runs": {
            run.name: {
                "label": run.label,
                "config": json.loads(json.dumps(dataclasses.asdict(run.config), default=str)),
                "seeds": [
                    {"seed": m["config"]["seed"]}
                    | {key: m.get(key) for key in ("steps", "train_loss", "seconds", "wall_seconds", "evaluated_with")}
                    for m in results[run.name]
                ],
            }
            for run in runs
        },
        "scaled": [dataclasses.asdict(s) for s in scaled],
        **(extra or {}),
        "environment": environment(),
    }
    report = f"""# Reproduction: {title}

{intro}

Measured on {metrics['environment']['device']}, lshattn {metrics['environment']['lshattn']}; seeds
{', '.join(map(str, seeds))}; {wall / 60:.1f} min of wall time in all.

{results_table(rows, runs, evaluated_with, results)}

## Interchange: trained with X, evaluated with Y (accuracy %, mean ± std over seeds)

{cross_table(runs, evaluated_with, results)}

Methods (strings for `lshattn.parse`): {methods}.

![accuracy per run and evaluation method](accuracy.png)
{sections}
## Where we differ from the paper

{scaled_table(scaled)}

## Training curves

{curves}

## Command

```bash
{command}
```
"""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    (out / "report.md").write_text(report)
    return metrics


def reproduce_paper(
    out: str | Path,
    *,
    name: str,
    title: str,
    runs: Sequence[Run],
    rows: Sequence[Row],
    evaluated_with: Mapping[str, str],
    scaled: Sequence[Scaled],
    full: RecipeConfig,
    intro: Callable[[bool, Mapping[str, list[dict]]], str],
    quick: bool,
    seeds: Sequence[int],
    progress: bool,
    sections: str = "",
    recipe: Callable[[Any, Path], dict] = finetune,
    quick_line: Scaled | None = None,
) -> dict[str, Any]:
    """What every reproduction's ``reproduce`` does: train ``runs`` once per seed with ``recipe``
    (skipping seeds already done in ``out``), then write the report (``write_reproduction``),
    whose introduction is ``intro(quick, results)``. ``quick_line``: what ``--quick`` shrank, for
    the scaled settings (default: ``quick_scaled(full)``, the finetune recipe's). Returns the
    metrics written to ``out/metrics.json``."""
    out = Path(out)
    results = run_seeds(runs, seeds, out, progress=progress, recipe=recipe)
    return write_reproduction(
        out, name=name, title=title, intro=intro(quick, results), rows=rows, runs=runs,
        evaluated_with=evaluated_with, results=results,
        scaled=list(scaled) + ([quick_line or quick_scaled(full)] if quick else []),
        command=command_line(name, out, quick, seeds), sections=sections,
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The flags every reproduction takes."""
    parser.add_argument("--out", default=f"runs/reproduce-{name}", help=f"directory (default: runs/reproduce-{name})")
    parser.add_argument("--quick", action="store_true", help="a tiny run (one seed, a few steps): the pipeline works")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; with --quick: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the line per run stays)")


def seeds_from_args(args: argparse.Namespace) -> tuple[int, ...]:
    """The seeds asked for, or the default: (0, 1, 2), or (0,) with ``--quick``.

    Raises:
        ValueError: a seed given twice or a negative seed.
    """
    if args.seeds is None:
        return (0,) if args.quick else (0, 1, 2)
    seeds = tuple(args.seeds)
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be distinct non-negative integers, got {' '.join(map(str, seeds))}")
    return seeds
