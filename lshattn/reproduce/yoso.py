"""YOSO (Zeng et al. 2021): ListOps from scratch with six attentions, and MiniLM fine-tuned with YOSO.

Two parts: ListOps (Long Range Arena) trained from scratch with dense attention, YOSO-32,
YOSO-E, Reformer, SMYRF and SimHash; and all-MiniLM-L6-v2 fine-tuned with YOSO against dense
attention on Rotten Tomatoes (128 tokens) and BBC News (512 tokens).

::

    lshattn reproduce yoso --out runs/reproduce-yoso                   # 30 runs, about 60 min on 2 cores
    lshattn reproduce yoso --part listops --out runs/reproduce-yoso    # 18 runs, about 20 min; no data package
    lshattn reproduce yoso --part minilm --out runs/reproduce-yoso     # 12 runs, about 40 min
    lshattn reproduce yoso --quick --out runs/yoso-quick               # 10 tiny runs, to see it work

The paper's own LRA and GLUE tables are not in our copies (docs/paper-numbers.md §2): its
abstract reports LRA results "consistent with softmax self-attention" and GLUE "favorable
performance relative to a standard pretrained Transformer". The numbers beside ours are the
baselines of the same PyTorch LRA code base (§5.4: 2 layers, dim 64; softmax 37.10 on ListOps,
Reformer 19.05), LRA's Table 1 (§5.2: softmax 36.37, Reformer 37.27) and the FlashAttention
paper's LRA (§5.5: Transformer 36.0, Reformer 36.5, SMYRF 36.1). The claim tested: YOSO trained
from scratch lands within a few points of softmax on ListOps.

ListOps here (``lshattn.train.listops``): expressions of 128–256 tokens from our own generator
with LRA's grammar settings (max_depth 10, max_args 10), a fresh set per seed; the code base's
model (2 layers, hidden 64, 2 heads of 32, feed-forward 128) as a BERT trained from scratch with
mean pooling over the real tokens (the code base's pooling); 400 steps of 32 expressions
(12,800, none seen twice), lr 1e-3 with 10 % warm-up and linear decay; accuracy on 1,000
held-out expressions. YOSO-32 is the code base's ListOps setting (τ = 11 bits, m = 32 hashes),
YOSO-E the same kernel computed exactly; Reformer the code base's 2 hashes with chunks of 32
(16 buckets = 2·256/32, each chunk seeing itself and the one before, shared QK), SMYRF 2 rounds
of clusters of 64 (Reformer's 64 keys per query and round), SimHash the trained BERT-LSH setting
(2 bits, one table). Each model is evaluated with the method it was trained with; the YOSO
models also with the other YOSO (YOSO-32 estimates YOSO-E).

Why mean pooling and 128–256 tokens: through a CLS token a YOSO-32 run (τ = 11, 600 steps at
128–256 tokens) predicted one value for every expression (18.0 %, the most frequent value's
share; dense attention 42 %): the kernel (1 − θ/π)^11 is near zero for the CLS query against
almost every key. With mean pooling the same run reached 44.4 %. At 256–512 tokens, mean
pooling left dense attention at 25 % after 300 steps. Learnable at the chosen settings (600-step
checks): dense 42.0 % at step 200 and 41.0 % at the end, YOSO-32 42.0 % and 41.2 %; the most
frequent value is about 22 %, and applying the outermost operator to its digit arguments alone
scores 38 %.

MiniLM here: YOSO-32 with the paper's BERT setting (τ = 9, m = 32) in every layer of the
softmax-pretrained all-MiniLM-L6-v2 (the paper pretrained with YOSO), fine-tuned 100 steps of
16 on Rotten Tomatoes (``common.ROTTEN_TOMATOES`` cut from 250 steps) and 32 steps of 8 on BBC
News at 512 tokens (lr 1e-4, 1,000 articles to draw from, 200 held out); each model evaluated
with dense attention and YOSO.

Full settings, and why. Timed on the busy machine (1 thread, load 2.3–3.9 on 2 cores while
another reproduction trained, which the lead puts at about 2× slower than idle), per step:
ListOps, 32 expressions of 256 tokens (60-step runs): dense 0.16 s, YOSO-32 0.52 s, YOSO-E
0.37 s, Reformer 0.28 s, SMYRF 0.24 s, SimHash 0.25 s (1.82 s for the six); MiniLM, Rotten
Tomatoes, 16 documents of 128 tokens: dense 2.23 s, YOSO 3.92 s; BBC, 8 articles of 512 tokens:
dense 10.4 s, YOSO 5.9 s; evaluation 29 (dense) and 13.5 (YOSO) Rotten Tomatoes documents a
second, 6 BBC articles a second. Halved for idle cores: ListOps 400 × 1.82 / 2 s = 6.1 min of
training and about 1 min of evaluation per seed, about 21 min for 3 seeds; MiniLM about 13 min
per seed, about 40 min for 3 seeds; about an hour in all (an estimate; the report records each
run's wall time). Every run is under 10 minutes, so every run has 3 seeds. The parts can run as
two commands into the same ``--out`` (``--part listops``, ``--part minilm``); a command without
``--part`` then writes the combined report, reading every seed back.
``--quick``: expressions of 64–128 tokens, 12 steps per ListOps run; 4 steps per MiniLM run on
a few dozen texts; one seed (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lshattn.reproduce import common
from lshattn.reproduce.common import Row, Run, Scaled
from lshattn.train import FinetuneConfig, finetune
from lshattn.train.listops import ListOpsConfig, train_listops

__all__ = [
    "LISTOPS",
    "METHODS",
    "MINILM_YOSO",
    "PARTS",
    "ROWS",
    "SCALED",
    "SHARED",
    "add_arguments",
    "quick_config",
    "reproduce",
    "run_from_args",
    "runs",
]

NAME = "yoso"

# ListOps methods: the code base's YOSO setting for ListOps (τ 11, m 32), its Reformer's 2 hashes
# (chunks of 32 at 256 tokens; 16 buckets = 2·256/32), SMYRF at Reformer's 64 keys per query and
# round, BERT-LSH's trained SimHash.
YOSO_M = "yoso:num_hashes=32,num_bits=11"
YOSO_E = "yoso:num_bits=11,expectation=True"
REFORMER = "reformer:num_hashes=2,bucket_size=32,num_buckets=16,shared_qk=True"
SMYRF = "smyrf:num_hashes=2,q_cluster_size=64,k_cluster_size=64"
SIMHASH = "simhash:num_hashes=1,num_bits=2"
# The paper's BERT setting (τ 9, m 32), for the fine-tuning part.
MINILM_YOSO = "yoso:num_hashes=32,num_bits=9"

# column title -> method string (the interchange table: a run not evaluated with one shows "–").
METHODS = {
    "dense": "dense",
    "YOSO-32 (τ 11)": YOSO_M,
    "YOSO-E (τ 11)": YOSO_E,
    "Reformer 2×32": REFORMER,
    "SMYRF 2×64": SMYRF,
    "SimHash 2 bits": SIMHASH,
    "YOSO-32 (τ 9)": MINILM_YOSO,
}

LISTOPS = ListOpsConfig(
    method="dense", min_length=128, max_length=256, max_depth=10, max_args=10, train_size=400 * 32, eval_size=1000,
    max_steps=400, batch_size=32, learning_rate=1e-3, warmup_ratio=0.1, eval_steps=200, save_steps=400,
)  # fmt: skip

RT = dataclasses.replace(
    common.ROTTEN_TOMATOES, max_steps=100, eval_steps=100, save_steps=100, eval_methods=("dense", MINILM_YOSO)
)
BBC = FinetuneConfig(
    method="dense", task="bbc", max_length=512, train_size=1000, eval_size=200, max_steps=32, batch_size=8,
    learning_rate=1e-4, eval_steps=32, save_steps=32, eval_methods=("dense", MINILM_YOSO),
)  # fmt: skip


def _listops_run(folder: str, title: str, method: str, also: tuple[str, ...] = ()) -> Run:
    """A ListOps run trained with ``method``, evaluated with it and with ``also``."""
    config = dataclasses.replace(LISTOPS, method=method, eval_methods=(method, *also))
    return Run(f"listops-{folder}", f"{title} (ListOps)", config)


# part -> its runs (at full size), in the order of the tables.
PARTS: dict[str, list[Run]] = {
    "listops": [
        _listops_run("dense", "dense", "dense"),
        _listops_run("yoso", "YOSO-32", YOSO_M, (YOSO_E,)),
        _listops_run("yoso-e", "YOSO-E", YOSO_E, (YOSO_M,)),
        _listops_run("reformer", "Reformer 2×32", REFORMER),
        _listops_run("smyrf", "SMYRF 2×64", SMYRF),
        _listops_run("simhash", "SimHash 2 bits", SIMHASH),
    ],
    "minilm": [
        Run("rt-dense", "dense (Rotten Tomatoes)", RT),
        Run("rt-yoso", "YOSO-32 (Rotten Tomatoes)", dataclasses.replace(RT, method=MINILM_YOSO)),
        Run("bbc-dense", "dense (BBC News)", BBC),
        Run("bbc-yoso", "YOSO-32 (BBC News)", dataclasses.replace(BBC, method=MINILM_YOSO)),
    ],
}

_SOFTMAX = "37.10 (LRA PyTorch code base, 2K tokens); 36.37 (LRA Table 1); 36.0 (FlashAttention Table 3)"
_NOT_FOUND = 'not in our copies; abstract: "consistent with softmax self-attention"'
_GLUE = 'GLUE table not in our copies; abstract: "favorable relative to a standard pretrained Transformer"'

ROWS = [
    Row("ListOps: dense (softmax)", _SOFTMAX, "listops-dense", "dense"),
    Row("ListOps: YOSO-32 (τ 11, m 32)", _NOT_FOUND, "listops-yoso", YOSO_M),
    Row("ListOps: YOSO-E (τ 11)", _NOT_FOUND, "listops-yoso-e", YOSO_E),
    Row("ListOps: Reformer, 2 hashes", "19.05 (code base); 37.27 (LRA Table 1); 36.5 (FlashAttention)",
        "listops-reformer", REFORMER),
    Row("ListOps: SMYRF", "36.1 (FlashAttention Table 3)", "listops-smyrf", SMYRF),
    Row("ListOps: SimHash (BERT-LSH)", "no number", "listops-simhash", SIMHASH),
    Row("ListOps: YOSO-32 − dense", "≈ 0 (\"consistent with softmax\")", "listops-yoso", YOSO_M,
        minus=("listops-dense", "dense")),
    Row("ListOps: YOSO-E − dense", "≈ 0 (\"consistent with softmax\")", "listops-yoso-e", YOSO_E,
        minus=("listops-dense", "dense")),
    Row("ListOps: Reformer − dense", "−18.05 (code base); +0.90 (LRA Table 1); +0.5 (FlashAttention)",
        "listops-reformer", REFORMER, minus=("listops-dense", "dense")),
    Row("ListOps: SMYRF − dense", "+0.1 (FlashAttention Table 3)", "listops-smyrf", SMYRF,
        minus=("listops-dense", "dense")),
    Row("ListOps: SimHash − dense", "no number", "listops-simhash", SIMHASH, minus=("listops-dense", "dense")),
    Row("ListOps: trained YOSO-32, evaluated YOSO-E − evaluated YOSO-32", "no number (YOSO-32 estimates YOSO-E)",
        "listops-yoso", YOSO_E, minus=("listops-yoso", YOSO_M)),
    Row("Rotten Tomatoes: dense", _GLUE, "rt-dense", "dense"),
    Row("Rotten Tomatoes: YOSO-32 (τ 9)", _GLUE, "rt-yoso", MINILM_YOSO),
    Row("Rotten Tomatoes: YOSO-32 − dense", "\"favorable\" (GLUE, YOSO pretrained)", "rt-yoso", MINILM_YOSO,
        minus=("rt-dense", "dense")),
    Row("Rotten Tomatoes: trained dense, evaluated YOSO-32 − dense", "no number", "rt-dense", MINILM_YOSO,
        minus=("rt-dense", "dense")),
    Row("BBC News (512 tokens): dense", _GLUE, "bbc-dense", "dense"),
    Row("BBC News (512 tokens): YOSO-32 (τ 9)", _GLUE, "bbc-yoso", MINILM_YOSO),
    Row("BBC News: YOSO-32 − dense", "\"favorable\" (GLUE at 512 tokens, YOSO pretrained)", "bbc-yoso", MINILM_YOSO,
        minus=("bbc-dense", "dense")),
]  # fmt: skip

# part -> where it differs from the paper (SHARED: both parts).
SCALED: dict[str, list[Scaled]] = {
    "listops": [
        Scaled("ListOps length", "500–2,000 tokens (LRA's generator; the code base pads to 2,048)",
               f"{LISTOPS.min_length}–{LISTOPS.max_length} tokens",
               "attention cost, and mean pooling learns slowly at 256–512 tokens: 6 methods × 3 seeds in about "
               "20 min on 2 CPU cores (module docstring)"),
        Scaled("ListOps generator", "LRA's (max_depth 10, max_args 10, MIN MAX MED SM over digits)",
               "ours, written from the grammar with the same settings: trees grown to a length drawn uniformly "
               "(lshattn.train.listops), one token per symbol (vocabulary 17); at 128–256 tokens 6.3 levels deep "
               "at the mean, 4.3 arguments per operator; the most frequent value 20–22 %, the outermost "
               "operator over its digits alone 38 %",
               "LRA's code is not copied; its trees are drawn otherwise, so our levels of accuracy are not LRA's: "
               "compare the methods with each other"),
        Scaled("ListOps data", "96,000 train, 2,000 dev, 2,000 test",
               f"{LISTOPS.train_size:,} train (each seen once), {LISTOPS.eval_size:,} held out, no dev set; "
               f"drawn afresh for each seed",
               f"what {LISTOPS.max_steps} steps use; one standard error of an accuracy near 40 % on 1,000: "
               f"1.5 points"),
        Scaled("ListOps training", "5,000 steps of 32, lr 1e-4, warm-up 1,000 steps, AdamW, linear decay (code base)",
               f"{LISTOPS.max_steps} steps of {LISTOPS.batch_size}, lr {LISTOPS.learning_rate:g}, 10 % warm-up, "
               f"AdamW, linear decay",
               "time; a larger rate for a short schedule: dense attention and YOSO-32 are at their plateau by "
               "step 200 (module docstring)"),
        Scaled("ListOps model", "2 layers, dim 64, 2 heads × 32, FFN 128, dropout 0.1, mean pooling (code base)",
               "the same, as a BERT from scratch (learned positions), with no attention dropout",
               "YOSO and SimHash have no attention probabilities to drop, so no method gets attention dropout; "
               "mean pooling kept: through a CLS token YOSO did not learn at all (lshattn.train.listops)"),
        Scaled("YOSO", "ListOps: τ = 11, m = 32 (v1); BERT: τ = 9, m = 32",
               "the same; the v1 backward (approx.); YOSO-E computes the same kernel exactly", "kept"),
        Scaled("Reformer", "the code base: HF LSH attention, 2 hashes, chunks of 64 at 2,048 tokens, shared QK",
               "2 hashes, chunks of 32, 16 buckets (2·256/32), each chunk sees itself and the one before, shared "
               "QK: 64 of 256 keys per round",
               "chunks halved with the length: chunks of 64 would show a query half of every sequence"),
        Scaled("SMYRF, SimHash", "SMYRF: not stated (FlashAttention's LRA); SimHash: no LRA run",
               "SMYRF 2 rounds of clusters of 64 (Reformer's 64 keys per query and round); SimHash 2 bits, one "
               "table (faithful mode), BERT-LSH's trained setting", "comparable budgets"),
    ],
    "minilm": [
        Scaled("fine-tuning model", "YOSO-BERT pretrained with YOSO (4 layers, dim 512, 512 tokens), then GLUE",
               "all-MiniLM-L6-v2, pretrained with softmax, YOSO put into every layer for fine-tuning",
               "no pretraining budget; YOSO as a drop-in is a harder test than the paper's"),
        Scaled("fine-tuning tasks", "GLUE at 512 tokens",
               "Rotten Tomatoes (128-token documents, 2 classes) and BBC News topics (512 tokens, 5 classes)",
               "the labelled data that ships offline"),
        Scaled("Rotten Tomatoes training", "–",
               f"{RT.max_steps} steps of {RT.batch_size} ({RT.max_steps * RT.batch_size:,} documents, 1.1 passes "
               f"over {RT.train_size:,}), lr {RT.learning_rate:g}, {RT.eval_size} held out: the smyrf "
               f"reproduction's settings with {RT.max_steps} steps instead of 250",
               "time: a YOSO step costs 1.8× a dense one; dense attention reached 90.5 % after 60 such steps "
               "(lshattn.reproduce.smyrf)"),
        Scaled("BBC training", "–",
               f"{BBC.max_steps} steps of {BBC.batch_size} ({BBC.max_steps * BBC.batch_size} of {BBC.train_size:,} "
               f"articles), lr {BBC.learning_rate:g}, {BBC.eval_size} held out",
               "a dense step of 8 articles of 512 tokens costs about 5 s on 2 idle cores"),
    ],
}  # fmt: skip

SHARED = [
    Scaled("seeds", "one run (not stated)", "3 seeds; a seed draws the data (ListOps) or the split, the weights, the "
           "data order and the hashes", "spread"),
]  # fmt: skip


def quick_config(config: ListOpsConfig | FinetuneConfig) -> ListOpsConfig | FinetuneConfig:
    """A run shrunk for ``--quick`` (the method strings stay the same): ListOps expressions of
    64–128 tokens, 12 steps; fine-tuning 4 steps on a few dozen texts. The numbers mean nothing."""
    if isinstance(config, ListOpsConfig):
        return dataclasses.replace(
            config, min_length=64, max_length=128, train_size=12 * 32, eval_size=64, max_steps=12, eval_steps=12,
            save_steps=12,
        )  # fmt: skip
    return dataclasses.replace(
        config, train_size=32, eval_size=16, max_steps=4, batch_size=4, eval_steps=4, save_steps=4, learning_rate=2e-4
    )


def _quick_line() -> Scaled:
    listops, rt = quick_config(LISTOPS), quick_config(RT)
    return Scaled(
        "--quick", "–",
        f"ListOps: {listops.min_length}–{listops.max_length} tokens, {listops.max_steps} steps of "
        f"{listops.batch_size}, {listops.eval_size} held out; fine-tuning: {rt.max_steps} steps of {rt.batch_size} "
        f"on {rt.train_size} texts, {rt.eval_size} held out; instead of the above",
        "a smoke test of the pipeline: its numbers are not results",
    )  # fmt: skip


def runs(quick: bool = False, part: str = "all") -> list[Run]:
    """The runs of ``part`` ("listops", "minilm" or "all"), shrunk with ``quick``.

    Raises:
        ValueError: an unknown part (the message lists the known ones).
    """
    if part != "all" and part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose all, {', '.join(PARTS)}")
    chosen = _chosen(PARTS, part)
    return [dataclasses.replace(run, config=quick_config(run.config)) for run in chosen] if quick else chosen


def _chosen(by_part: Mapping[str, list], part: str) -> list:
    """The entries of ``part`` ("all": every part's), in the order of the parts."""
    return [entry for name, entries in by_part.items() if part in ("all", name) for entry in entries]


def _train(config: ListOpsConfig | FinetuneConfig, out: Path) -> dict[str, Any]:
    """The recipe of a run: ``train_listops`` for ListOps, ``finetune`` for the rest."""
    return train_listops(config, out) if isinstance(config, ListOpsConfig) else finetune(config, out)


def reproduce(
    out: str | Path,
    *,
    quick: bool = False,
    seeds: tuple[int, ...] = (0, 1, 2),
    progress: bool = True,
    part: str = "all",
) -> dict[str, Any]:
    """Train the runs of ``part`` (skipping seeds already done in ``out``) and write the report
    over them. Returns the metrics written to ``out/metrics.json``."""
    out = Path(out)
    chosen = runs(quick, part)
    names = {run.name for run in chosen}
    rows = [row for row in ROWS if row.run in names and (row.minus is None or row.minus[0] in names)]
    results = common.run_seeds(chosen, seeds, out, progress=progress, recipe=_train)
    command = common.command_line(NAME, out, quick, seeds) + ("" if part == "all" else f" --part {part}")
    return common.write_reproduction(
        out, name=NAME, title="YOSO: ListOps from scratch, and MiniLM fine-tuned with YOSO",
        intro=_intro(quick, part, results), rows=rows, runs=chosen, evaluated_with=METHODS, results=results,
        scaled=[*_chosen(SCALED, part), *SHARED, *([_quick_line()] if quick else [])], command=command,
    )  # fmt: skip


def _intro(quick: bool, part: str, results: Mapping[str, Sequence[dict]]) -> str:
    smoke = "**Quick run: a smoke test of the pipeline, not a result.** " if quick else ""
    parts = {
        "listops": _listops_intro(quick, results),
        "minilm": "all-MiniLM-L6-v2 fine-tuned with dense attention or YOSO-32 (τ 9, m 32) in every layer on "
        "Rotten Tomatoes sentiment (128 tokens) and BBC News topics (512 tokens), each trained model evaluated "
        "with both.",
    }
    shown = " ".join(text for name, text in parts.items() if part in ("all", name))
    return (
        f"{smoke}{shown} The paper's own LRA and GLUE tables are not in our copies (docs/paper-numbers.md §2); "
        f"the numbers beside ours are softmax and Reformer in the same PyTorch LRA code base (§5.4), LRA's Table 1 "
        f"(§5.2) and the FlashAttention paper's LRA (§5.5), all at 2,000 tokens."
    )


def _listops_intro(quick: bool, results: Mapping[str, Sequence[dict]]) -> str:
    config = quick_config(LISTOPS) if quick else LISTOPS
    majority = [m["majority"] for m in results.get("listops-dense", []) if "majority" in m]
    chance = f" (the most frequent value: {100 * statistics.fmean(majority):.1f} % of them)" if majority else ""
    return (
        f"ListOps expressions of {config.min_length}–{config.max_length} tokens (max_depth {config.max_depth}, "
        f"max_args {config.max_args}): a {config.num_layers}-layer BERT (hidden {config.hidden_size}, "
        f"{config.num_heads} heads, feed-forward {config.intermediate_size}, mean pooling) trained from scratch, "
        f"{config.max_steps} steps of {config.batch_size}, lr {config.learning_rate:g}, with dense attention, "
        f"YOSO-32, YOSO-E, Reformer, SMYRF or SimHash; accuracy on {config.eval_size} held-out expressions{chance}."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_arguments(parser, NAME)
    parser.add_argument(
        "--part", choices=("all", *PARTS), default="all",
        help="listops (18 runs, about 20 min on 2 cores; needs no data package), minilm (12 runs, about 40 min) "
        "or all (default)",
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return reproduce(
        args.out, quick=args.quick, seeds=common.seeds_from_args(args), progress=not args.no_progress, part=args.part
    )
