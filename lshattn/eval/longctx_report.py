"""Render the long-context results (``lshattn.eval.longctx``): ``report.md`` with the issue's
targets, ``report.json`` and PNG plots (perplexity against budget; passkey heat-maps)."""

from __future__ import annotations

import math
from pathlib import Path

from lshattn.api import parse

__all__ = ["family", "targets", "write"]

COLOURS = {"simhash": "tab:green", "yoso": "tab:red", "reformer": "tab:orange", "reformer whole buckets": "tab:brown", "smyrf": "tab:blue", "topk": "black",
           "local": "tab:purple", "sketchtopk": "tab:cyan"}  # fmt: skip
PLOT_CEILING = 2.0  # the perplexity plot's axis ends at this many times exact's perplexity
TARGET_LENGTH = 4096  # issue 14: decode perplexity within 5 % of exact at 4k tokens and 1/16
TARGET_BUDGET = 1 / 16
SPEED_CONTEXT = 8000  # attention per decoding step ≥ 4× lower than exact at 8k, with YOSO or SimHash


def write(results: dict, out_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns report.md's path."""
    from lshattn.eval import report

    return report.write(results, out_dir, plots=_plots, markdown=_markdown)


def _fraction(value: float | None) -> str:
    """1/16 for 0.0625; "—" for a row without a budget."""
    if value is None:
        return "—"
    inverse = 1 / value
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{value:.3g}"


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _kl(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _ratio(value: float, exact: float | None) -> str:
    return f"{value:.2f} ({value / exact:.3f}×)" if exact else f"{value:.2f}"


# --- targets -------------------------------------------------------------------------------------


def targets(results: dict) -> list[tuple[str, str, str]]:
    """The issue's targets as ``(target, what this run measured, met)``; met is "yes", "no" or
    "not measured" (with the measurement the run has nearest to it)."""
    return [_perplexity_target(results), _passkey_target(results), _speed_target(results)]


def _perplexity_target(results: dict) -> tuple[str, str, str]:
    target = f"at {TARGET_LENGTH:,} tokens and {_fraction(TARGET_BUDGET)}, the best method's decode perplexity within 5 % of exact"
    rows = results.get("perplexity", {}).get("rows", [])
    lengths = sorted({r["length"] for r in rows})
    if not lengths:
        return target, "no perplexity measured", "not measured"
    length = TARGET_LENGTH if TARGET_LENGTH in lengths else max(lengths)
    mine = [r for r in rows if r["length"] == length]
    exact = next((r for r in _ok(mine) if r["role"] == "exact"), None)
    at_budget = [r for r in mine if r["role"] == "method" and _same(r.get("budget"), TARGET_BUDGET)]
    measured_here = length == TARGET_LENGTH and exact is not None and at_budget
    methods = _ok(at_budget)
    if exact is None or not methods:
        reason = (
            f"no method reached {_fraction(TARGET_BUDGET)} at {length:,} tokens" if at_budget else "not in this run"
        )
        return target, reason, "no" if measured_here else "not measured"
    best = min(methods, key=lambda r: r["decode_ppl"])
    ratio = best["decode_ppl"] / exact["decode_ppl"]
    measured = (
        f"{length:,} tokens: `{best['method']}` {best['decode_ppl']:.2f} against exact {exact['decode_ppl']:.2f} "
        f"({ratio:.3f}×; it scored {best['decode_budget']:.1%} of the cached keys decoding)"
    )
    if not measured_here:
        return target, measured + f"; this run has no {TARGET_LENGTH:,}", "not measured"
    return target, measured, "yes" if ratio <= 1.05 else "no"


def _passkey_target(results: dict) -> tuple[str, str, str]:
    target = "passkey accuracy equal to exact's at every length up to 8k with a budget ≤ 1/16"
    rows = results.get("passkey", {}).get("rows", [])
    accuracy = _passkey_accuracy(rows)
    exact = accuracy.pop("exact", {})
    budget = next((r["budget"] for r in rows if r.get("budget") is not None), None)
    if not exact:
        return target, "no passkey measured", "not measured"
    if budget is not None and budget > TARGET_BUDGET * 1.01:
        return target, f"the methods ran at {_fraction(budget)}, above 1/16", "not measured"
    lengths = sorted(exact)
    equal = [
        m for m, cells in accuracy.items() if _role(m) == "method" and all(cells.get(t) == exact[t] for t in lengths)
    ]
    exact_cells = ", ".join(f"{t:,}: {exact[t]:.0%}" for t in lengths)
    measured = f"exact {exact_cells}; equal to exact at every length: " + (
        ", ".join(f"`{m}`" for m in equal) if equal else "no method"
    )
    if max(lengths) < 8000:
        return target, measured + f" (this run stops at {max(lengths):,} tokens)", "not measured"
    return target, measured, "yes" if equal else "no"


def _speed_target(results: dict) -> tuple[str, str, str]:
    target = "at 8k, attention time per decoding step ≥ 4× lower than exact's with YOSO or SimHash"
    contexts = results.get("speed", {}).get("rows", [])
    if not contexts:
        return target, "no speed measured", "not measured"
    cell = max(contexts, key=lambda c: c["context"])
    candidates = [r for r in _ok(cell["methods"]) if r.get("text", "").partition(":")[0] in ("yoso", "simhash")]
    if not candidates:
        return target, f"neither YOSO nor SimHash ran at {cell['context']:,}", "no"
    best = min(candidates, key=lambda r: r["attention_ms"])
    speedup = 1 / best["attention_ratio"]
    measured = (
        f"{cell['context']:,} tokens: `{best['method']}` {best['attention_ms']:.1f} ms of attention a step, exact "
        f"{cell['methods'][0]['attention_ms']:.1f} ms: exact's time over the method's {speedup:.2f} (the target: ≥ 4)"
    )
    if cell["context"] < SPEED_CONTEXT:
        return target, measured + f" (this run stops at {cell['context']:,})", "not measured"
    return target, measured, "yes" if speedup >= 4 else "no"


def _same(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-9 * b


def _prefiller(config: dict) -> str:
    """What prefilled the prompts: the method, or exact attention (``prefill="exact"``)."""
    return "exact attention" if config.get("prefill", "method") == "exact" else "the method"


def _role(text: str) -> str:
    return {"topk": "oracle", "local": "baseline", "exact": "exact"}.get(text.partition(":")[0], "method")


def family(text: str) -> str:
    """The curve (and passkey panel) of a method string's cells: its name, whole-bucket Reformer
    apart."""
    name = text.partition(":")[0]
    return f"{name} whole buckets" if name == "reformer" and getattr(parse(text), "whole_buckets", False) else name


def _passkey_accuracy(rows: list[dict], by_depth: bool = False) -> dict[str, dict]:
    """``{method text: {length: accuracy}}`` (or ``{(depth, length): accuracy}``) over the trials
    that ran."""
    hits: dict[str, dict] = {}
    for row in _ok(rows):
        name = row.get("text", row["method"])
        for depth, correct in zip(row["depths"], row["correct"]):
            cell = (depth, row["length"]) if by_depth else row["length"]
            hits.setdefault(name, {}).setdefault(cell, []).append(correct)
    return {name: {cell: sum(v) / len(v) for cell, v in cells.items()} for name, cells in hits.items()}


# --- markdown ------------------------------------------------------------------------------------


def _markdown(results: dict, plots: dict[str, str]) -> str:
    m, c = results["machine"], results["config"]
    reused = results.get("reused_cells", 0)
    lines = [
        "# Long contexts on a causal LM: perplexity, passkey and decoding speed",
        "",
        f"Model `{results['model']['id']}` ({results['model']['class']}, {results['model']['positions']:,} positions), "
        f"corpus: {c['corpus']}, seed {c['seed']}. Measured {results['date']} on {m['cpu']} ({m['threads']} threads"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ''}), torch {m['torch']}, lshattn {m['lshattn']}"
        + (f" @ {m['commit']}" if m.get("commit") else "")
        + (
            f"; the run took {results['seconds'] / 60:.1f} min"
            if "seconds" in results
            else "; the run stopped before its end (its cells kept, each naming the commit it was measured at)"
        )
        + (f", {reused} cells reused from an earlier run in this folder" if reused else "")
        + ". Every number is in `report.json`.",
        "",
        (
            "*Budget*: the share of exact attention's query–key dot products (T·S, causal or not, as `cost().budget`) "
            "the setting was chosen for (`lshattn.for_budget`); *scored*: the share the attention calls actually computed "
            "(`lshattn.hf.count`): in the prefill over T·S, in decoding over the cached keys of each step. The references: "
            "the **oracle** `topk` (exact softmax over each query's top keys besides the same sinks and window: the "
            "ceiling of any selection of that budget; it scores every pair to choose, so its *scored* is 100 %), the "
            "**baseline** `local` (4 sinks and a window alone, the window turned to the same budget), and, run as "
            f"they are (no budget), {', '.join(f'`{t}`' for t in c.get('references', ())) or 'nothing else'}. A "
            "decoding step of a method without a native decoder runs exact attention over the cache (scored 100 % "
            "while decoding)."
        ),
        "",
        *(
            [
                (
                    '**Exact prefill** (`prefill="exact"`): every prompt ran exact attention; the methods ran in '
                    "the cached decoding steps alone (the dense prefill of MagicPIG, Quest, vAttention). The prefill "
                    "columns are therefore exact attention's."
                ),
                "",
            ]
            if c.get("prefill", "method") == "exact"
            else []
        ),
        "## Targets (issue 14)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {measured} | {met} |" for t, measured, met in targets(results)]
    lines += _perplexity_section(results, plots)
    lines += _passkey_section(results, plots)
    lines += _speed_section(results)
    lines += _not_run(results)
    lines += ["", f"Reproduce: {results['command']} (settings in `report.json` → `config`).", ""]
    return "\n".join(lines)


def _perplexity_section(results: dict, plots: dict[str, str]) -> list[str]:
    rows = results.get("perplexity", {}).get("rows", [])
    if not rows:
        return []
    c = results["config"]
    lines = [
        "", "## 1. Perplexity", "",
        (f"Each text is the first T tokens of the corpus, teacher-forced. *Prefill*: one forward over all T tokens "
        f"(perplexity over all of them, and over the last {c['decode_tokens']} alone, the tokens decoding scores). "
        f"*Decode*: all but the last {c['decode_tokens']} + 1 tokens prefilled with {_prefiller(c)}, then one token a step "
        f"through the cache, each step predicting the next; the last {c['decode_tokens']} tokens scored. *KL*: the mean "
        f"next-token KL(exact ‖ method), nats, over the same predictions. In brackets: the ratio to exact."),
    ]  # fmt: skip
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        exact = next((r for r in _ok(mine) if r["role"] == "exact"), None)
        lines += [
            "", f"### {length:,} tokens", "",
            ("| budget | method | scored (prefill) | prefill ppl | prefill ppl, last tokens | prefill KL | scored (decode) "
             "| decode ppl | decode KL | seconds |"),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in mine:
            name = f"`{r['method']}`" + (f" ({r['role']})" if r["role"] in ("oracle", "baseline") else "")
            if r.get("status") != "ok":
                lines.append(f"| {_fraction(r.get('budget'))} | {name} | {r['status']}: {r['reason']} |||||||| ")
                continue
            lines.append(
                f"| {_fraction(r.get('budget'))} | {name} | {r['prefill_budget']:.1%} | "
                f"{_ratio(r['prefill_ppl'], exact and exact['prefill_ppl'])} | "
                f"{_ratio(r['prefill_ppl_last'], exact and exact['prefill_ppl_last'])} | {_kl(r['prefill_kl'])} | "
                f"{r['decode_budget']:.1%} | {_ratio(r['decode_ppl'], exact and exact['decode_ppl'])} | "
                f"{_kl(r['decode_kl'])} | {r['prefill_seconds'] + r['decode_seconds']:.0f} |"
            )
    if "perplexity" in plots:
        lines += ["", f"![perplexity against budget]({plots['perplexity']})"]
    return lines


def _passkey_section(results: dict, plots: dict[str, str]) -> list[str]:
    rows = results.get("passkey", {}).get("rows", [])
    if not rows:
        return []
    c = results["config"]
    accuracy = _passkey_accuracy(rows)
    lengths = sorted({r["length"] for r in rows})
    depths = ", ".join(f"{d:.0%}" for d in c["passkey_depths"])
    lines = [
        "", "## 2. Passkey retrieval", "",
        (f"A random 5-digit number hidden at depths {depths} of filler text from the corpus (a seeded offset per "
        f"trial), asked for through the model's chat template, the answer's start (\"The pass key is\") given; "
        f"greedy generation of {c['passkey_new_tokens']} tokens; correct when the number is in the answer. "
        f"{c['passkey_trials']} trial(s) per depth and length (each with its own number and filler, the same for "
         f"every method); methods at budget {_fraction(c['passkey_budget'])}, the prompt prefilled with {_prefiller(c)}. "
         f"Accuracy over depths and trials:"), "",
        "| method | " + " | ".join(f"{t:,}" for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|",
    ]  # fmt: skip
    settings: dict[str, dict[int, str]] = {}
    for r in rows:
        name = r.get("text", r["method"])
        settings.setdefault(name, {})[r["length"]] = "" if r.get("status") == "ok" else r["status"]
    for name, by_length in settings.items():
        cells = [
            f"{accuracy[name][t]:.0%}" if t in accuracy.get(name, {}) else (by_length.get(t) or "—") for t in lengths
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    left_out = [m for m in c["methods"] if m not in c.get("passkey_methods", c["methods"])]
    if left_out:
        lines += ["", "Left out of the passkey grid to bound the run's time (`passkey_methods` in `config`): "
                  + ", ".join(f"`{m}`" for m in left_out) + " (the oracle ranks every pair: about 3 min a forward at "
                  "4k tokens on 2 cores, and a passkey cell runs one per depth and trial)."]  # fmt: skip
    exact = accuracy.get("exact", {})
    if exact and max(exact.values()) == 0:
        lines += [
            "",
            "Exact attention itself never finds the key here: the model cannot do this task at these lengths.",
        ]
    if "passkey" in plots:
        lines += ["", f"![passkey accuracy by depth and length]({plots['passkey']})"]
    return lines


def _speed_section(results: dict) -> list[str]:
    contexts = results.get("speed", {}).get("rows", [])
    if not contexts:
        return []
    c = results["config"]
    lines = [
        "", "## 3. Decoding speed", "",
        (f"Each context prefilled once with exact attention; every method then decodes {c['speed_steps']} + 1 tokens "
        f"from a copy of that cache, in one run (so the ratios compare), twice (the second pass in reverse order; "
        f"each method's faster pass is shown, so a load that came or went during the run tilts no ratio; the "
        f"timings assume nothing else ran). *ms / step*: the whole model (all layers, "
        f"MLPs included), median of the {c['speed_steps']} steps after the first; *first step*: the first, where a "
        f"method with a store of key codes hashes the whole cache; *attention*: the time inside the attention calls "
        f"alone (`Tally.seconds`) per step, and its ratio to exact's. *State*: the bytes decoding keeps after the last "
        f"step, the KV cache plus each layer's store of key codes (counted tensor by tensor, each storage once). "
        f"*Peak*: the most memory decoding held in its first two steps (a copy of the prefilled cache, the stores "
        f"the first step builds, each step's buffers and the cache's concatenation), from the allocator's events "
        f"(`allocation_peak`); the model's weights are left out of both. "
        f"Methods at budget {_fraction(c['speed_budget'])}."), "",
        ("| context | method | ms / step | tokens / s | first step (ms) | attention ms / step | attention ÷ exact | "
         "scored (decode) | state (MB) | peak (MB) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for cell in contexts:
        for r in cell["methods"]:
            if r.get("status") != "ok":
                lines.append(f"| {cell['context']:,} | `{r['method']}` | {r['status']}: {r['reason']} |||||||| ")
                continue
            peak = f"{r['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in r else "—"  # cells measured before it
            lines.append(
                f"| {cell['context']:,} | `{r['method']}` | {r['ms_per_step']:.0f} | {r['tokens_per_s']:.1f} | "
                f"{r['first_step_ms']:.0f} | {r['attention_ms']:.1f} | {r['attention_ratio']:.2f}× | "
                f"{r['decode_budget']:.1%} | {r['state_bytes'] / 2**20:.1f} | {peak} |"
            )
    return lines


def _not_run(results: dict) -> list[str]:
    notes = {}
    for section in ("perplexity", "passkey"):
        for r in results.get(section, {}).get("rows", []):
            if r.get("status") in ("excluded", "unreachable"):
                notes.setdefault((r["status"], r["reason"]), set()).add(f"{section} at {r['length']:,}")
    for cell in results.get("speed", {}).get("rows", []):
        for r in cell["methods"]:
            if r.get("status") in ("excluded", "unreachable"):
                notes.setdefault((r["status"], r["reason"]), set()).add(f"speed at {cell['context']:,}")
    if not notes:
        return []
    lines = ["", "## Not run", ""]
    for (status, reason), where in notes.items():
        lines.append(f"- {status} ({', '.join(sorted(where))}): {reason}")
    return lines


# --- plots ---------------------------------------------------------------------------------------


def _plots(results: dict, out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made = {}
    rows = results.get("perplexity", {}).get("rows", [])
    if _ok(rows):
        # with an exact prefill the prefill panels would be exact's line alone: decoding only
        exact_prefill = results["config"].get("prefill", "method") == "exact"
        # (perplexity, title, x): after an exact prefill, what the decoding steps scored is the
        # spend to compare at (the settings were sized for the prefill's T·S; the steps spend less)
        decode = ("decode_ppl", "decode", "decode_budget" if exact_prefill else "budget")
        panels = (decode,) if exact_prefill else (("prefill_ppl", "prefill", "budget"), decode)
        _plot_perplexity(plt, rows, out / "perplexity.png", panels)
        made["perplexity"] = "perplexity.png"
    passkey = results.get("passkey", {}).get("rows", [])
    if _ok(passkey):
        _plot_passkey(plt, passkey, out / "passkey.png")
        made["passkey"] = "passkey.png"
    return made


def _plot_perplexity(plt, rows: list[dict], path: Path, panels: tuple[tuple[str, str, str], ...]) -> None:
    """Perplexity against spend: a column per length, a row per panel (its perplexity key, title
    and x key: the nominal ``budget``, or ``decode_budget``, the share the decoding steps scored,
    where the oracle, which scores every key to choose, stays at its budget); exact and the
    locality alone as horizontal lines, the oracle in black; the axis stops at ``PLOT_CEILING``
    times exact's perplexity, a point above it drawn on the ceiling with its value."""
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(
        len(panels), len(lengths), figsize=(4.6 * len(lengths), max(5.0, 3.5 * len(panels))), squeeze=False
    )
    for column, length in enumerate(lengths):
        mine = _ok([r for r in rows if r["length"] == length])
        for row_index, (key, what, x_key) in enumerate(panels):
            axis = axes[row_index][column]
            for r in mine:
                if r["role"] == "exact":
                    axis.axhline(r[key], linestyle="--", color="black", label="exact")
                elif r.get("budget") is None:
                    axis.axhline(r[key], linestyle=":", color="gray", label=f"{r['method']} (alone)")
            exact = next((r[key] for r in mine if r["role"] == "exact"), None)
            top = PLOT_CEILING * exact if exact else float("inf")
            for family in dict.fromkeys(r["family"] for r in mine if r.get("budget") is not None):
                role = _role(family)
                x = "budget" if role == "oracle" else x_key
                points = sorted((r[x], r[key]) for r in mine if r["family"] == family and r.get("budget"))
                # a method far off (YOSO zero-shot: 10^5) sits on the ceiling, its value written there
                axis.plot([b for b, _ in points], [min(p, top) for _, p in points], "s-" if role == "oracle" else "o-",
                          color=COLOURS.get(family), label=family + (f" ({role})" if role != "method" else ""))  # fmt: skip
                for budget, value in points:
                    if value > top:
                        axis.annotate(f"{value:.3g}", (budget, top), textcoords="offset points", xytext=(0, -10),
                                      ha="center", fontsize=6, color=COLOURS.get(family))  # fmt: skip
            if exact:
                axis.set_ylim(0.9 * exact, 1.05 * top)
            axis.set_xscale("log", base=2)
            axis.set_title(f"{length:,} tokens: {what}")
            axis.set_xlabel(
                "budget (share of T·S)" if x_key == "budget" else "share of the cached keys scored (oracle: budget)"
            )
            axis.grid(alpha=0.3)
        axes[0][column].legend(fontsize=6)
    for panel_row in axes:
        panel_row[0].set_ylabel("perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_passkey(plt, rows: list[dict], path: Path) -> None:
    """Accuracy by depth (rows) and length (columns), a panel per method; grey where it did not run."""
    import numpy as np

    accuracy = _passkey_accuracy(rows, by_depth=True)
    names = list(dict.fromkeys(r.get("text", r["method"]) for r in rows))
    depths = sorted({d for r in rows for d in r["depths"]})
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 1.1 * len(lengths) * len(names), 3.4), squeeze=False)
    for axis, name in zip(axes[0], names):
        grid = np.array([[accuracy.get(name, {}).get((d, t), math.nan) for t in lengths] for d in depths])
        axis.set_facecolor("0.85")
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                text = "n/a" if math.isnan(grid[i, j]) else f"{grid[i, j]:.0%}"
                axis.text(
                    j, i, text, ha="center", va="center", fontsize=7, color="white" if grid[i, j] < 0.6 else "black"
                )
        axis.set_xticks(range(len(lengths)), [f"{t:,}" for t in lengths], fontsize=7)
        axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if axis is axes[0][0] else [], fontsize=7)
        axis.set_title(family(name), fontsize=8)
        axis.set_xlabel("tokens", fontsize=7)
    axes[0][0].set_ylabel("depth of the key")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02)
    fig.suptitle("Passkey accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
