"""The main job: what each method keeps of exact attention, and what it saves, on a real model.

``lshattn demo --out DIR`` (and ``make demo``) runs ``run(DemoConfig(), DIR)``:

1. **Attention fidelity.** all-MiniLM-L6-v2 reads Wikipedia articles (gensim's test data) cut to
   512 tokens; the Q, K, V of all 6 layers are captured, and every method of a budget sweep runs
   on them against exact attention (``lshattn.eval.fidelity``).
2. **Model level.** Each method is swapped into every layer of MiniLM (``lshattn.hf.use``, no
   retraining) to embed Rotten Tomatoes documents (128 tokens) and BBC News articles (512
   tokens): the embeddings' cosine to exact, and a zero-shot probe, a logistic regression trained
   on exact-attention embeddings and tested on the method's (``lshattn.eval.tasks``).
3. **Speed.** Attention forward time against length, next to SDPA (``lshattn.eval.speed``).
4. **Long context** (``lshattn demo --full`` only: hours on 2 CPU cores). The long-context report
   on SmolLM2-135M (``lshattn.eval.longctx``: perplexity in prefill and cached decoding, passkey,
   decoding speed) in the folder ``longctx/`` of the report, its targets in the demo's page. It
   resumes: a second run in the same folder measures only the cells the first did not finish.

It writes ``report.md``, ``report.json`` and PNG plots (``lshattn.eval.report``). A section whose
data package is missing is skipped with a message naming the package to install.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import lshattn
from lshattn.api import parse
from lshattn.budget import pairs_share
from lshattn.eval.longctx import LongCtxConfig

__all__ = ["DemoConfig", "run"]

LONG_CONTEXT_DIR = "longctx"  # section 4's report, inside the demo's folder

# Budgets are dot products over exact attention's. MiniLM has 12 heads of dim 32.
# Beside the methods, the references (lshattn.eval.report): the oracle top-k and the random-cluster
# control at 25 %, and, at 128 tokens only, the oracle at 6.25 % and with its tail term (the
# oracle ranks every row, about 1 s a layer for 8 texts of 512 tokens on 2 cores), and the
# baseline of sinks and a window alone. The demo must stay under 10 minutes: it took 10.5 with the
# oracle at 12.5 %, 1×32 settings and 50 % rows at 512 tokens as well, and 9:42 to 10:08 with
# SimHash's sparse mode at 128 tokens, Reformer's 50 % row there and the plain control at 512.
# At 512 tokens: SMYRF R×32 costs R·32/512; Reformer R rounds of 32-token chunks that also see
# the chunk before cost R·64/512 (num_buckets = 2·T/bucket_size as in the paper). SimHash's cost
# depends on how many pairs collide (fewer with more bits, more with more tables); 2 bits in
# faithful mode is BERT-LSH's trained setting. YOSO-m computes no dot product at all; YOSO-E is
# its exact kernel, to separate the kernel's distance from softmax from the sampling error.
FIDELITY_METHODS = (
    "smyrf:num_hashes=1", "smyrf:num_hashes=2", "smyrf:num_hashes=4", "smyrf:num_hashes=8",
    "reformer:num_hashes=1,bucket_size=32,num_buckets=32,shared_qk=False",
    "reformer:num_hashes=2,bucket_size=32,num_buckets=32,shared_qk=False",
    "reformer:num_hashes=4,bucket_size=32,num_buckets=32,shared_qk=False",
    "simhash:num_bits=2", "simhash:num_bits=8",
    "simhash:num_bits=4,mode=sparse", "simhash:num_bits=8,mode=sparse",
    "yoso:num_bits=8", "yoso:num_bits=8,expectation=True",
    "topk:fraction=0.25", "random:num_hashes=4",
)  # fmt: skip
# About 25 % budgets at each task's length, and SimHash and YOSO settings; then SMYRF with 2
# sinks and a window at 12.5 and 25 % (lshattn.for_budget), importance-weighted SimHash at about
# the same spend (what it scores on these texts: 11.8 and 23.2 %), its control with the same
# clusters, sinks and window, and the baseline of the same sinks and a window alone (at 12.5 %
# also with its mean-field tail). The demo has 10 minutes: each row costs 6-15 s at 128 tokens
# (importance-weighted SimHash 40-60 s) and 15-30 s at 512 for 150 texts (the oracle 115 s;
# importance-weighted SimHash 120-220 s, so it is measured in docs/fidelity-ideas.md instead),
# so 512 tokens gets the 25 % rows and 100 test texts, and SMYRF 2×32 (50 % at 128) was cut.
RT_METHODS = (  # 128 tokens: SMYRF 2×16; Reformer chunks of 16
    "smyrf:q_cluster_size=16,k_cluster_size=16",
    "reformer:num_hashes=1,bucket_size=16,num_buckets=16,shared_qk=False",
    "simhash:num_bits=2", "yoso:num_bits=8",
    "smyrf:sinks=2,window=4,num_hashes=1,q_cluster_size=4,k_cluster_size=4",
    "smyrf:sinks=2,window=8,num_hashes=1,q_cluster_size=12,k_cluster_size=12",
    "simhash:num_hashes=24,num_bits=8,mode=importance,sinks=2,window=2",
    "simhash:num_hashes=20,num_bits=6,mode=importance,sinks=2,window=2",
    "topk:fraction=0.0625", "topk:fraction=0.25", "topk:fraction=0.25,tail=True",
    "random:q_cluster_size=16,k_cluster_size=16",
    "random:sinks=2,window=8,num_hashes=1,q_cluster_size=12,k_cluster_size=12",
    "local:sinks=2,window=6,tail=True", "local:sinks=2,window=14",
)  # fmt: skip
BBC_METHODS = (  # 512 tokens
    "smyrf:num_hashes=4",
    "reformer:bucket_size=32,num_buckets=32,shared_qk=False",
    "simhash:num_bits=2", "yoso:num_bits=8",
    "smyrf:sinks=2,window=32,num_hashes=1,q_cluster_size=58,k_cluster_size=58",
    "topk:fraction=0.25",
    "random:sinks=2,window=32,num_hashes=1,q_cluster_size=58,k_cluster_size=58", "local:sinks=2,window=62",
)  # fmt: skip
SPEED_METHODS = (
    "smyrf:num_hashes=4", "reformer:bucket_size=32,num_buckets=32,shared_qk=False", "simhash:num_bits=8,mode=sparse",
    "yoso:num_bits=8", "smyrf:num_hashes=4,sinks=2,window=8",
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; the defaults are the committed report (``docs/report``).

    Methods are strings for ``lshattn.parse``; those of methods this version does not have are
    left out (and listed in the report). ``long_context``: section 4's settings (None: no section 4;
    ``full()`` sets them).
    """

    seed: int = 0
    wikipedia_docs: int = 8
    fidelity_length: int = 512
    fidelity_methods: tuple[str, ...] = FIDELITY_METHODS
    rt_length: int = 128
    rt_train: int = 600
    rt_test: int = 300
    rt_methods: tuple[str, ...] = RT_METHODS
    bbc_length: int = 512
    bbc_train: int = 300
    bbc_test: int = 100
    bbc_methods: tuple[str, ...] = BBC_METHODS
    speed_lengths: tuple[int, ...] = (512, 2048, 8192, 16384)
    speed_methods: tuple[str, ...] = SPEED_METHODS
    headline_budget: float = 0.25
    long_context: LongCtxConfig | None = None

    def full(self, quick: bool = False) -> DemoConfig:
        """With section 4, the long-context report on SmolLM2 (``LongCtxConfig``; ``quick``: its
        ``--quick`` run, about 5 minutes, else the whole grid, hours on 2 CPU cores)."""
        long_context = LongCtxConfig(seed=self.seed)
        return dataclasses.replace(self, long_context=long_context.quick() if quick else long_context)

    def quick(self) -> DemoConfig:
        """A small version for tests and a first look (about a minute): a few methods, the oracle at
        25 %, the control and the baseline of sinks and a window alone."""
        references = ("topk:fraction=0.25", "random:num_hashes=1", "local:sinks=2,window=14")
        return dataclasses.replace(
            self, wikipedia_docs=2, rt_train=60, rt_test=30, bbc_train=50, bbc_test=20, speed_lengths=(512, 2048),
            fidelity_methods=self.fidelity_methods[:12:3] + references, rt_methods=self.rt_methods[:2] + references,
            bbc_methods=self.bbc_methods[:2] + references,
        )  # fmt: skip


def run(config: DemoConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Run every section of the demo, write the report into ``out_dir``, return the results."""
    from lshattn import data
    from lshattn.eval import report

    started = time.perf_counter()
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "machine": machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "skipped": [],
        "not_available": sorted({t for t in _all_methods(config) if t.partition(":")[0] not in lshattn.method_names()}),
    }
    try:
        tokenizer, model = data.load_minilm()
    except data.MissingPackageError as missing:
        results["skipped"].append(f"everything on MiniLM: {missing}")
        tokenizer = model = None
    if model is not None:
        _section(results, "fidelity", lambda: fidelity_section(config, tokenizer, model, progress))
        _section(results, "tasks", lambda: task_sections(config, tokenizer, model, progress))
    _section(results, "speed", lambda: speed_section(config, progress))
    if config.long_context is not None:
        _section(results, "long_context", lambda: long_context_section(config.long_context, out_dir, progress))
    results["seconds"] = time.perf_counter() - started
    results["headline"] = report.headline(results, config.headline_budget)
    report.write(results, out_dir)
    return results


def _section(results: dict, key: str, compute) -> None:
    from lshattn.data import MissingPackageError

    try:
        results[key] = compute()
    except MissingPackageError as missing:
        results["skipped"].append(f"{key}: {missing}")


def _all_methods(config: DemoConfig) -> tuple[str, ...]:
    return config.fidelity_methods + config.rt_methods + config.bbc_methods + config.speed_methods


def available(methods: tuple[str, ...]) -> list[lshattn.Method]:
    """Parse ``methods``, leaving out those whose method this version does not have."""
    return [parse(text) for text in methods if text.partition(":")[0] in lshattn.method_names()]


def fidelity_section(config: DemoConfig, tokenizer: Any, model: Any, progress: bool) -> dict:
    from lshattn import data
    from lshattn.eval import capture, fidelity

    articles = data.wikipedia(count=config.wikipedia_docs, min_words=config.fidelity_length)
    batch = tokenizer(
        [text for _, text in articles], truncation=True, max_length=config.fidelity_length, return_tensors="pt",
        padding=True,
    )  # fmt: skip
    layers = capture.capture_attention_inputs(model, **batch)
    methods = available(config.fidelity_methods)
    rows = fidelity.fidelity_rows(methods, layers, seeds=[config.seed], progress=progress)
    return {
        "source": "Wikipedia articles (gensim test data): " + ", ".join(title for title, _ in articles),
        "length": config.fidelity_length,
        "shape": list(layers[0].q.shape),
        "rows": rows,
        "summary": fidelity.summarise(rows),
    }


def task_sections(config: DemoConfig, tokenizer: Any, model: Any, progress: bool) -> list[dict]:
    from lshattn.data import MissingPackageError
    from lshattn.eval import tasks

    sections = []
    specs = [
        (lambda: tasks.rotten_tomatoes_task(tokenizer, max_length=config.rt_length, train=config.rt_train,
                                            test=config.rt_test, seed=config.seed), config.rt_methods, 32),
        (lambda: tasks.bbc_task(max_length=config.bbc_length, train=config.bbc_train, test=config.bbc_test,
                                seed=config.seed), config.bbc_methods, 8),
    ]  # fmt: skip
    for make_task, method_texts, batch_size in specs:
        try:
            task = make_task()
        except MissingPackageError as missing:
            sections.append({"skipped": str(missing)})
            continue
        sections.append(task_section(task, available(method_texts), tokenizer, model, batch_size, config.seed, progress))
    return sections


def task_section(task, methods, tokenizer, model, batch_size: int, seed: int, progress: bool) -> dict:
    from lshattn.eval import tasks

    from lshattn.hf import Tally

    def embed(texts, method, desc, tally=None):
        start = time.perf_counter()
        x = tasks.embed(model, tokenizer, texts, method=method, max_length=task.max_length, batch_size=batch_size,
                        seed=seed, desc=desc, progress=progress, tally=tally)  # fmt: skip
        return x, (time.perf_counter() - start) / len(texts)

    train_x, _ = embed(task.train_texts, None, f"{task.name}: exact (train)")
    exact_x, exact_seconds = embed(task.test_texts, None, f"{task.name}: exact (test)")
    embeddings, seconds = {"exact": exact_x}, {"exact": exact_seconds}
    tallies = {str(method): Tally() for method in methods}
    for method in methods:
        name = str(method)
        embeddings[name], seconds[name] = embed(task.test_texts, method, f"{task.name}: {method}", tallies[name])
    accuracy = tasks.probe_accuracy(train_x, task.train_labels, embeddings, task.test_labels)
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    rows = []
    for method in methods:
        name = str(method)
        cost = method.cost(1, heads, task.max_length, task.max_length, dim, dim)
        exact_flops = lshattn.Dense().cost(1, heads, task.max_length, task.max_length, dim, dim).flops
        expected, scored = pairs_share(method, task.max_length, task.max_length, dim), tallies[name].budget
        rows.append({
            "method": name,
            # a data-dependent cost counts as what it spent on these texts, not cost()'s expectation
            "budget": scored if method.cost_depends_on_data else expected,
            "expected_budget": expected,
            "scored": scored,
            "flops_ratio": cost.flops / exact_flops,
            "cosine": float((embeddings[name] * exact_x).sum(-1).mean()),
            "accuracy": accuracy[name],
            "accuracy_drop": accuracy["exact"] - accuracy[name],
            "seconds_per_text": seconds[name],
        })  # fmt: skip
    return {
        "name": task.name, "length": task.max_length, "classes": task.classes, "train": len(task.train_texts),
        "test": len(task.test_texts), "exact_accuracy": accuracy["exact"], "exact_seconds_per_text": exact_seconds,
        "rows": rows,
    }  # fmt: skip


def speed_section(config: DemoConfig, progress: bool) -> dict:
    from lshattn.eval import speed

    heads, dim = 12, 32  # MiniLM's attention heads
    rows = speed.speed_rows(available(config.speed_methods), config.speed_lengths, heads=heads, dim=dim, progress=progress)
    return {"heads": heads, "dim": dim, "rows": rows}


def long_context_section(config: LongCtxConfig, out_dir: str | Path, progress: bool) -> dict:
    """Section 4: ``lshattn.eval.longctx.run`` into the report's ``longctx/`` folder (resumed from
    the cells a run there left), summed up by its targets."""
    from lshattn.eval import longctx, longctx_report

    results = longctx.run(config, Path(out_dir) / LONG_CONTEXT_DIR, progress=progress)
    return {
        "report": f"{LONG_CONTEXT_DIR}/report.md", "model": results["model"]["id"], "command": results["command"],
        "seconds": results["seconds"], "reused_cells": results.get("reused_cells", 0),
        "targets": [list(target) for target in longctx_report.targets(results)],
    }  # fmt: skip


def machine() -> dict:
    """Where the numbers come from."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    return {
        "cpu": model, "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(), "lshattn": lshattn.__version__,
        "commit": commit or None,
    }  # fmt: skip
