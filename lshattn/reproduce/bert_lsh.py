"""BERT-LSH (Li & Yip 2024): a small BERT pretrained from scratch with SimHash attention, then
fine-tuned for sentiment, against the same BERT with dense attention.

::

    lshattn reproduce bert-lsh --out runs/reproduce-bert-lsh          # 3 pretrainings + 9 fine-tunings
    lshattn reproduce bert-lsh --quick --out runs/bert-lsh-quick      # tiny runs, to see it work

Two stages, each on the training recipes:

1. **Pretraining** (``lshattn.train.mlm.pretrain``): BERT-LSH's model (``BertForMaskedLM``, 2
   layers, hidden 128, 2 heads, FFN 512, 512 positions, new weights) trained by masked language
   modelling at matched steps, data, masks and seed with three attentions: dense; BERT-LSH's
   SimHash in its faithful mode (2 sign bits, one table, non-colliding keys kept at logit 0,
   as the reference code did); and SimHash in sparse mode (the same collisions, non-colliding
   keys left out: attention restricted to the colliding pairs). Held-out loss, masked-token
   accuracy and perplexity over the steps, training speed, and the dot products each layer
   scored, counted from the method's own record on a held-out batch.
2. **Fine-tuning** (``lshattn.train.finetune`` with ``model=`` the final pretraining
   checkpoint): each pretrained model fine-tuned on Rotten Tomatoes sentiment (the critic
   snippets SST-2 was built from) with the attention it was pretrained with, as the paper
   fine-tuned its LSH model on SST-2 with LSH; each then evaluated with all three attentions.

Full settings, and why. Pretraining: 1,500 steps of 8 sequences of 512 tokens (the paper's
batch and length; it ran 88,245 steps), learning rate 1e-3 (``MLMConfig``'s default, which says
why not the paper's 5e-5). At 391–422 ms a step on 2 idle cores (docs/benchmarks.md,
"Training", T = 512), that is about 10–11 min per attention, 32 min for the three. One seed:
a pretraining takes over 10 minutes. Fine-tuning: 300 steps of 16 on 1,400 documents of 128
tokens (3.4 epochs; the paper ran 3 epochs of SST-2), 500 held out, learning rate 1e-4
(the paper's 2e-5 is for 6,000 steps), 3 seeds from each checkpoint: a run of this
4.6 M-parameter model takes under a minute. About 40 min in all; measured: 39.1 min (pretraining
11.2 min dense, 12.3 min faithful, about 12 min sparse; 0.4–0.6 min a fine-tuning).
``--quick``: 30 pretraining steps at 128 tokens on 320 sequences, 8 fine-tuning steps; one seed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lshattn.reproduce import common
from lshattn.reproduce.common import Row, Run, Scaled
from lshattn.train import FinetuneConfig
from lshattn.train.mlm import MLMConfig, pretrain

__all__ = [
    "FAITHFUL",
    "FINETUNE",
    "METHODS",
    "PRETRAIN",
    "PRETRAIN_SEED",
    "SPARSE",
    "add_arguments",
    "final_checkpoint",
    "finetuning_runs",
    "pretraining_runs",
    "reproduce",
    "run_from_args",
]

NAME = "bert-lsh"

FAITHFUL = "simhash:num_bits=2"  # BERT-LSH's trained setting: 2 bits, 1 table, non-colliding keys at logit 0
SPARSE = "simhash:num_bits=2,mode=sparse"

# column title -> method string; every fine-tuned model is evaluated with each.
METHODS = {"dense": "dense", "SimHash faithful": FAITHFUL, "SimHash sparse": SPARSE}

# title -> folder of the fine-tuning runs; the pretraining runs are in "pretrain-<folder>".
FOLDERS = {"dense": "dense", "SimHash faithful": "simhash", "SimHash sparse": "simhash-sparse"}

PRETRAIN_SEED = 0  # one pretraining per attention (each over 10 minutes); the fine-tunings vary the seed

PRETRAIN = MLMConfig(
    method="dense", seq_len=512, max_steps=1500, batch_size=8, learning_rate=1e-3, eval_steps=250, save_steps=500,
    eval_sequences=128,
)  # fmt: skip

FINETUNE = FinetuneConfig(
    method="dense", task="rt", max_length=128, train_size=1400, eval_size=500, max_steps=300, batch_size=16,
    learning_rate=1e-4, eval_steps=50, save_steps=300, eval_methods=tuple(METHODS.values()),
)  # fmt: skip

# The paper's pretraining results (docs/paper-numbers.md §1.3): title -> (loss, accuracy %, perplexity, seconds).
PAPER_PRETRAINING = {
    "dense": (5.4955, 15.05, 243.6, 1285.0),
    "SimHash faithful": (5.3308, 18.19, 206.6, 4178.0),
}

ROWS = [
    Row("dense", "76.7 (SST-2, GLUE dev)", "dense", "dense"),
    Row("SimHash faithful (BERT-LSH's)", "76.0 (SST-2, GLUE dev)", "simhash", FAITHFUL),
    Row("SimHash sparse", "not in the paper", "simhash-sparse", SPARSE),
    Row("SimHash faithful − dense", "−0.7", "simhash", FAITHFUL, minus=("dense", "dense")),
    Row("SimHash sparse − dense", "–", "simhash-sparse", SPARSE, minus=("dense", "dense")),
]

SCALED = [
    Scaled("pretraining corpus", "BookCorpus, 10 % (235,314 sequences of 512 tokens, about 120 M tokens)",
           "the corpora that ship in packages: Wikipedia articles, news, the King James Bible (4.4 M tokens), "
           "split by document", "nothing can be downloaded here (docs/offline-assets.md)"),
    Scaled("vocabulary", "32,000 (its config)", "30,522: MiniLM's uncased WordPiece (bert-base-uncased's)",
           "the tokenizer that ships offline"),
    Scaled("pretraining steps", "88,245 steps of 8 at 512 tokens (3 epochs), lr 5e-5, linear decay",
           f"{PRETRAIN.max_steps:,} steps of {PRETRAIN.batch_size} at {PRETRAIN.seq_len} tokens, lr "
           f"{PRETRAIN.learning_rate:g}, 6 % warm-up, linear decay",
           "about 10 min per attention on 2 cores; at 5e-5 a few thousand steps barely move new weights "
           "(docs/training.md, mlm)"),
    Scaled("SimHash", "2 hyperplanes, 1 table, fresh hyperplanes every forward for each sequence and head; "
           "scores q_i·k_j written to both (i, j) and (j, i); non-colliding keys at logit 0",
           "2 bits, 1 table, projections drawn per layer and optimizer step (the same for every sequence); "
           "each pair its own score; non-colliding keys at logit 0 (faithful) or left out (sparse)",
           "the mirrored score is a defect of the reference code (docs/methods.md); sparse mode is what "
           "the paper's text describes"),
    Scaled("held-out set", "2,625 sequences (1 % of the corpus)",
           f"{PRETRAIN.eval_sequences} sequences from other documents, masks fixed", "evaluation time"),
    Scaled("fine-tuning task", "GLUE SST-2 (single sentences padded to 512), dev set as the test",
           f"Rotten Tomatoes: {FINETUNE.max_length}-token documents joined from same-label critic snippets, "
           f"{FINETUNE.train_size:,} to train, {FINETUNE.eval_size} held out",
           "no GLUE offline; SST-2 was built from these snippets"),
    Scaled("fine-tuning", "lr 2e-5, batch 32, 3 epochs (6,000 steps), weight decay 0.01",
           f"lr {FINETUNE.learning_rate:g}, batch {FINETUNE.batch_size}, {FINETUNE.max_steps} steps "
           f"(3.4 epochs), weight decay {FINETUNE.weight_decay:g}", "5 times fewer steps than the paper's at 2e-5"),
    Scaled("dot products", "“KFLOPs”: the profiler's matrix products at 10 tokens, which count the "
           "hashing and none of the scores (docs/paper-numbers.md §1.2)",
           "every query–key score the method computed, counted per layer on a held-out batch of "
           f"{PRETRAIN.batch_size} × {PRETRAIN.seq_len} tokens", "what the chart meant to show"),
    Scaled("seeds", "one run (seed 42)",
           f"one pretraining per attention (seed {PRETRAIN_SEED}); 3 fine-tuning seeds from each, which also "
           "draw the split: the spread is the fine-tuning's, not the pretraining's",
           "a pretraining takes over 10 minutes"),
]  # fmt: skip


def quick_pretrain(config: MLMConfig) -> MLMConfig:
    """A pretraining shrunk for ``--quick`` (``MLMConfig.quick``: 30 steps at 128 tokens)."""
    return config.quick()


def pretraining_runs(quick: bool = False) -> list[Run]:
    """One pretraining per attention, into ``pretrain-<folder>``."""
    base = quick_pretrain(PRETRAIN) if quick else PRETRAIN
    return [
        Run(f"pretrain-{folder}", title, dataclasses.replace(base, method=METHODS[title]))
        for title, folder in FOLDERS.items()
    ]


def final_checkpoint(folder: Path, metrics: Mapping[str, Any]) -> str:
    """The checkpoint a finished pretraining in ``folder`` ended with (its last step).

    Raises:
        FileNotFoundError: the checkpoint is gone (the message says how to train it again).
    """
    path = folder / "checkpoints" / f"checkpoint-{metrics['steps']}"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} finished pretraining but its final checkpoint {path} is missing; "
            f"delete {folder} to pretrain again"
        )
    return str(path)


def finetuning_runs(checkpoints: Mapping[str, str], quick: bool = False) -> list[Run]:
    """Each pretrained model (``checkpoints``: title -> checkpoint folder) fine-tuned with the
    attention it was pretrained with."""
    base = common.quick_config(FINETUNE) if quick else FINETUNE
    return [
        Run(folder, title, dataclasses.replace(base, method=METHODS[title], model=checkpoints[title]))
        for title, folder in FOLDERS.items()
    ]


def reproduce(
    out: str | Path, *, quick: bool = False, seeds: tuple[int, ...] = (0, 1, 2), progress: bool = True
) -> dict[str, Any]:
    """Pretrain once per attention, fine-tune each checkpoint once per seed (skipping what is
    already done in ``out``) and write the report. Returns the metrics written to
    ``out/metrics.json``."""
    out = Path(out)
    pretraining = pretraining_runs(quick)
    pretrained = common.run_seeds(pretraining, (PRETRAIN_SEED,), out, progress=progress, recipe=pretrain)
    checkpoints = {
        run.label: final_checkpoint(out / run.name / f"seed{PRETRAIN_SEED}", pretrained[run.name][0])
        for run in pretraining
    }
    runs = finetuning_runs(checkpoints, quick)
    results = common.run_seeds(runs, seeds, out, progress=progress)
    summary = _pretraining_summary(pretraining, pretrained)
    _plot_pretraining(pretraining, pretrained, out / "pretraining.png")
    scaled = SCALED + ([_quick_line()] if quick else [])
    return common.write_reproduction(
        out, name=NAME, title="BERT-LSH: pretrained and fine-tuned with SimHash attention", intro=_intro(quick, summary),
        rows=ROWS, runs=runs, evaluated_with=METHODS, results=results, scaled=scaled,
        command=common.command_line(NAME, out, quick, seeds), sections=_pretraining_section(pretraining, summary),
        extra={"pretraining": summary},
        extra_seconds=sum(m.get("wall_seconds") or 0.0 for ms in pretrained.values() for m in ms),
    )  # fmt: skip


def _pretraining_summary(runs: Sequence[Run], pretrained: Mapping[str, list[dict]]) -> dict[str, Any]:
    """Per attention (by title): the final held-out numbers, the speed and the dot products."""
    summary = {}
    for run in runs:
        metrics = pretrained[run.name][0]
        final = metrics["final"]
        summary[run.label] = {
            "folder": f"{run.name}/seed{PRETRAIN_SEED}",
            "method": metrics["trained_with"],
            "steps": metrics["steps"],
            "eval_loss": final["eval_loss"],
            "eval_accuracy": 100.0 * final["eval_accuracy"],
            "perplexity": final["perplexity"],
            "tokens_per_second": metrics["tokens_per_second"],
            "seconds": metrics["seconds"],
            "budget": metrics["budget"],
            "budget_per_layer": [row["budget"] for row in metrics["dot_products"]],
            "eval_curve": metrics["eval_curve"],
        }
    return summary


def _speed(summary: Mapping[str, Any], title: str) -> str:
    """Training speed against dense's, from the tokens per second of each run."""
    ours, dense = summary[title]["tokens_per_second"], summary["dense"]["tokens_per_second"]
    return "–" if not ours or not dense else f"{ours / dense:.2f}× dense's"


def _pretraining_section(runs: Sequence[Run], summary: Mapping[str, Any]) -> str:
    """The pretraining table (paper beside ours), the dot products per layer and the curves."""
    head = (
        "| pretrained with | held-out MLM loss | masked-token accuracy % | perplexity | training speed "
        "| dot products over dense, per layer |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for run in runs:
        s = summary[run.label]
        paper = PAPER_PRETRAINING.get(run.label)
        loss, accuracy, perplexity = (f"{s['eval_loss']:.3f}", f"{s['eval_accuracy']:.2f}", f"{s['perplexity']:.1f}")
        if paper is not None:
            loss += f" (paper {paper[0]:.3f})"
            accuracy += f" (paper {paper[1]:.2f})"
            perplexity += f" (paper {paper[2]:.1f})"
        speed = _speed(summary, run.label)
        if paper is not None and run.label != "dense":
            speed += f" (paper {PAPER_PRETRAINING['dense'][3] / paper[3]:.2f}× dense's)"
        layers = ", ".join(f"{b:.1%}" for b in s["budget_per_layer"])
        lines.append(f"| {run.label} (`{s['method']}`) | {loss} | {accuracy} | {perplexity} | {speed} | {layers} |")
    reports = ", ".join(f"[{run.label}]({summary[run.label]['folder']}/report.md)" for run in runs)
    steps = next(iter(summary.values()))["steps"]
    return f"""
## Pretraining: masked language modelling at matched steps ({steps} steps, held out)

{chr(10).join(lines)}

The paper's numbers are after 88,245 steps on BookCorpus (docs/paper-numbers.md §1.3); its
speed is the ratio of its training runtimes (1,285 s dense, 4,178 s BERT-LSH). Dot products:
the pairs each layer scored on a held-out batch, over dense's T²·H (SimHash at 2 bits expects
25 % for random directions; trained queries and keys are not random).

![held-out loss and accuracy over the pretraining steps](pretraining.png)

Each pretraining's report (curves, dot products per layer): {reports}.
"""


def _plot_pretraining(runs: Sequence[Run], pretrained: Mapping[str, list[dict]], path: Path) -> Path:
    """Held-out loss and masked-token accuracy over the steps, one line per attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for run in runs:
        curve = pretrained[run.name][0]["eval_curve"]
        steps = [c["step"] for c in curve]
        loss_axis.plot(steps, [c["eval_loss"] for c in curve], marker="o", label=run.label)
        accuracy_axis.plot(steps, [100.0 * (c["eval_accuracy"] or 0.0) for c in curve], marker="o", label=run.label)
    loss_axis.set_ylabel("held-out MLM loss")
    accuracy_axis.set_ylabel("held-out masked-token accuracy (%)")
    for axis in (loss_axis, accuracy_axis):
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle("MLM pretraining at matched steps")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _quick_line() -> Scaled:
    small, tuned = quick_pretrain(PRETRAIN), common.quick_config(FINETUNE)
    return Scaled(
        "--quick", "–",
        f"pretraining {small.max_steps} steps at {small.seq_len} tokens on {small.train_sequences} sequences; "
        f"fine-tuning {tuned.max_steps} steps on {tuned.train_size} documents, instead of the settings above",
        "a smoke test of the pipeline: its numbers are not results",
    )  # fmt: skip


def _intro(quick: bool, summary: Mapping[str, Any]) -> str:
    pretraining, tuning = (quick_pretrain(PRETRAIN), common.quick_config(FINETUNE)) if quick else (PRETRAIN, FINETUNE)
    smoke = "**Quick run: a smoke test of the pipeline, not a result.** " if quick else ""
    return (
        f"{smoke}BERT-LSH's model (2 layers, hidden 128, 2 heads, FFN 512) pretrained from scratch by masked "
        f"language modelling, {pretraining.max_steps} steps of {pretraining.batch_size} sequences of "
        f"{pretraining.seq_len} tokens, with dense attention, BERT-LSH's SimHash (`{FAITHFUL}`, faithful mode) "
        f"and SimHash in sparse mode (`{SPARSE}`), at matched steps, data and masks; then each fine-tuned on "
        f"Rotten Tomatoes sentiment ({tuning.max_length}-token documents, {tuning.train_size:,} to train, "
        f"{tuning.eval_size} held out, {tuning.max_steps} steps of {tuning.batch_size}, learning rate "
        f"{tuning.learning_rate:g}) with the attention it was pretrained with, and evaluated with each. "
        f"The paper's fine-tuning numbers are SST-2's (docs/paper-numbers.md §1.4). Pretraining ended at "
        f"held-out loss {summary['SimHash faithful']['eval_loss']:.3f} with BERT-LSH's SimHash and "
        f"{summary['dense']['eval_loss']:.3f} with dense attention (paper: 5.331 and 5.495)."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_arguments(parser, NAME)


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return reproduce(args.out, quick=args.quick, seeds=common.seeds_from_args(args), progress=not args.no_progress)
