"""Adapt a pretrained encoder to its LSH attention: label-free self-distillation on unlabelled text.

::

    lshattn train adapt --out runs/adapt                   # MiniLM, SMYRF 1x32, Rotten Tomatoes, 128 tokens
    lshattn train adapt --trainable attention --method "reformer:num_hashes=1,bucket_size=16,num_buckets=16,shared_qk=False" --out runs/a2

The teacher is the pretrained model itself with exact attention, frozen (a copy in eval mode, no
gradient); the student is the same weights with the method in its attention (``lshattn.hf.use``),
and it learns to give the teacher's hidden states: per-token cosine distance and relative squared
error of the last layer's states (or of every layer's, ``--match all``) over real tokens, plus
the cosine distance of the mean-pooled sentence embedding. No label is used anywhere.

Before and after, on Rotten Tomatoes documents the model never adapted on (the adaptation
documents are built from snippets that come after every snippet of the probe's documents), the
run measures the sentence-embedding cosine to the teacher with the method and with exact
attention on the adapted weights, and a zero-shot probe (a logistic regression trained on the
original model's exact-attention embeddings, tested on each setting's): does the adapted model
work with its method, and does it still work with exact attention? ``--bbc`` adds BBC News
articles (512 tokens) as an out-of-domain check.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lshattn.api import parse
from lshattn.train import common, tasks

try:
    from transformers import Trainer, TrainerCallback
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError("lshattn.train needs transformers >= 5.24 and accelerate: pip install 'lshattn[train]'") from _err

__all__ = [
    "AdaptConfig",
    "AdaptTrainer",
    "LossWeights",
    "adapt",
    "distillation_loss",
    "set_trainable",
    "adaptation_texts",
    "add_arguments",
    "run_from_args",
]

TRAINABLE = ("all", "attention", "layernorm")
MATCH = ("last", "all")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The terms of the distillation loss (see ``distillation_loss``) and their weights.

    Attributes:
        token_cosine: mean over real tokens of 1 − cos(student state, teacher state).
        token_mse: relative squared error over real tokens, Σ‖s − t‖² / Σ‖t‖².
        pooled_cosine: mean over texts of 1 − cos of the mean-pooled sentence embeddings.
        match: which hidden states the token terms compare: "last" (the last layer's) or "all"
            (the output of every layer, averaged over layers).
    """

    token_cosine: float = 1.0
    token_mse: float = 1.0
    pooled_cosine: float = 1.0
    match: str = "all"

    def check(self) -> None:
        for name in ("token_cosine", "token_mse", "pooled_cosine"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"loss weight {name} must be a number >= 0, got {value!r}")
        if self.token_cosine + self.token_mse + self.pooled_cosine == 0:
            raise ValueError("every loss weight is 0: nothing to train; give token_cosine, token_mse or pooled_cosine a weight")
        if self.match not in MATCH:
            raise ValueError(f"unknown match {self.match!r}; choose one of {', '.join(MATCH)}")


@dataclasses.dataclass(frozen=True)
class AdaptConfig(common.RecipeConfig):
    """An adaptation run (the shared settings are ``common.RecipeConfig``'s).

    The defaults were measured on MiniLM with SMYRF 1×32 at 128 tokens (docs/training.md): at
    equal compute, batches of 8 beat batches of 16; 3e-4 beat 1e-4, 6e-4 and 1e-3; matching every
    layer's states beat matching the last layer's; training every weight beat training the
    attention projections alone. No weight decay: it pulls the weights toward zero, away from the
    teacher's, which are the right answer wherever the method changes nothing.

    Attributes:
        method: the LSH method the student runs (not exact attention: there the student is the
            teacher). Default SMYRF 1×32: a 25 % budget at 128 tokens.
        trainable: "all" (every weight), "attention" (the Q, K, V and output projections of
            every attention layer) or "layernorm" (the LayerNorms only).
        max_length: tokens per text.
        train_size: adaptation documents (None: every Rotten Tomatoes document left after the
            probe's and the validation's, about 1,300 at 128 tokens).
        val_size: held-out documents scored every ``eval_steps`` (the cosine-over-steps curve).
        probe_train, probe_test: the zero-shot probe's splits (the demo's: 600 and 300); the
            before/after cosines are measured on the test split.
        loss: the loss terms and weights.
        dropout: dropout probability in the student during training (None: the model's own,
            0.1 for MiniLM); the teacher never drops.
        redraw: draw new hash projections every optimizer step (``lshattn.hf``'s default);
            False trains with the fixed projections the model is evaluated with.
        bbc: also evaluate on BBC News articles (512 tokens), out of domain (``bbc_train`` and
            ``bbc_test`` articles for the probe).
        model: a local Hugging Face model directory (None: the bundled all-MiniLM-L6-v2).
        max_minutes: stop training after this many minutes of it, at the end of a step, even
            before ``max_steps`` (the learning-rate schedule stays planned for ``max_steps``);
            None: no limit.
        save_model: write the adapted model (``save_pretrained``, its method recorded in the
            config, see ``lshattn.hf.use_saved``) and tokenizer to ``out/model``.
    """

    method: Any = "smyrf:num_hashes=1,q_cluster_size=32,k_cluster_size=32"
    max_steps: int = 400
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    eval_steps: int = 100
    save_steps: int = 100
    trainable: str = "all"
    max_length: int = 128
    train_size: int | None = None
    val_size: int = 64
    probe_train: int = 600
    probe_test: int = 300
    loss: LossWeights = LossWeights()
    dropout: float | None = 0.0
    redraw: bool = True
    bbc: bool = False
    bbc_train: int = 300
    bbc_test: int = 150
    model: str | None = None
    save_model: bool = True
    max_minutes: float | None = None

    def quick(self) -> AdaptConfig:
        """A run of about a minute on two CPU cores, to see it work (evaluation included)."""
        return dataclasses.replace(
            self, train_size=96, val_size=16, probe_train=60, probe_test=30, max_steps=12, batch_size=8,
            eval_steps=6, save_steps=12, learning_rate=3e-4, bbc=False,
        )  # fmt: skip


# --- the loss ------------------------------------------------------------------------------------


def distillation_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], attention_mask: Tensor, weights: LossWeights
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss that pulls the student's hidden states onto the teacher's.

    Args:
        student, teacher: hidden states to match, each `(B, T, hidden)`, the last one the last
            layer's (whose mean pool is the sentence embedding); the same number of each.
        attention_mask: `(B, T)`, 1/True = real token; padded tokens count nowhere.
        weights: the weight of each term.

    Returns:
        The weighted sum (a scalar) and each term by name, plus ``cosine``, the per-text
        `(B,)` sentence-embedding cosine (detached; what the evaluation reports).
    """
    from lshattn import hf

    mask = attention_mask.float()
    real = mask.sum().clamp_min(1)
    cosine_terms, mse_terms = [], []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-6)
        cosine_terms.append(((1 - cos) * mask).sum() / real)
        mse_terms.append(((s - t).square().sum(-1) * mask).sum() / (t.square().sum(-1) * mask).sum().clamp_min(1e-12))
    pooled = (hf.mean_pool(student[-1].float(), mask) * hf.mean_pool(teacher[-1].float(), mask)).sum(-1)
    terms = {
        "token_cosine": torch.stack(cosine_terms).mean(),
        "token_mse": torch.stack(mse_terms).mean(),
        "pooled_cosine": (1 - pooled).mean(),
    }
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    return loss, {**terms, "cosine": pooled.detach()}


# --- the trainer ---------------------------------------------------------------------------------


class AdaptTrainer(Trainer):
    """``transformers.Trainer`` for self-distillation: ``compute_loss`` runs the frozen teacher
    and the student on the same batch and returns ``distillation_loss``.

    Args:
        teacher: the model with exact attention; frozen here (eval mode, no gradient) and moved
            to the training device. It is not wrapped for DDP/FSDP: every process holds a whole
            copy (small for the encoders this is meant for).
        loss_weights: the terms of the loss.
        *args, **kwargs: ``Trainer``'s. Add ``common.StepCallback()`` to the callbacks when the
            student runs an lshattn method.

    Evaluation (``trainer.evaluate()``) reports ``eval_loss`` and ``eval_cosine``, the mean
    sentence-embedding cosine of student and teacher on the evaluation set, with the student in
    eval mode (its fixed evaluation projections). Logged training losses carry each term
    (``loss_token_cosine``, ...) averaged since the last log.
    """

    def __init__(self, *args: Any, teacher: torch.nn.Module, loss_weights: LossWeights = LossWeights(), **kwargs: Any):
        kwargs.setdefault("compute_metrics", _mean_cosine)
        super().__init__(*args, **kwargs)
        loss_weights.check()
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.loss_weights = loss_weights
        self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by accumulation steps
        self._terms: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key in ("input_ids", "attention_mask", "token_type_ids")}
        every_layer = self.loss_weights.match == "all"
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, output_hidden_states=every_layer)
        student_out = model(**inputs, output_hidden_states=every_layer)
        pick = (lambda out: out.hidden_states[1:]) if every_layer else (lambda out: (out.last_hidden_state,))
        loss, terms = distillation_loss(pick(student_out), pick(teacher_out), inputs["attention_mask"], self.loss_weights)
        if model.training:
            for name in ("token_cosine", "token_mse", "pooled_cosine"):
                self._terms.setdefault(name, []).append(float(terms[name].detach()))
        return (loss, {"cosine": terms["cosine"]}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss and the per-text sentence-embedding cosine (returned as predictions, and
        again as labels, which ``evaluate`` needs to call ``compute_metrics``)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs["cosine"], outputs["cosine"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._terms:
            logs.update({f"loss_{name}": float(np.mean(values)) for name, values in self._terms.items()})
            self._terms = {}
            logs["load_1m"] = os.getloadavg()[0]
        super().log(logs, *args, **kwargs)


class TimeLimit(TrainerCallback):
    """Stop training at the end of the first optimizer step after ``minutes`` of training."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_evaluate = control.should_save = True
        return control


def _mean_cosine(prediction: Any) -> dict[str, float]:
    return {"cosine": float(np.mean(prediction.predictions))}


# --- which weights train -------------------------------------------------------------------------


def set_trainable(model: torch.nn.Module, which: str) -> list[str]:
    """Freeze every parameter of ``model`` but those ``which`` names, and return their names.

    Args:
        which: "all"; "attention": the parameters of each attention module (``lshattn.hf.attention_layers``:
            Q, K, V, and the output projection where it lives there) and of the Linear layers of
            its parent when the parent is an attention block (BERT's ``attention.output.dense``),
            never a normalisation; "layernorm": every LayerNorm (or other ``*Norm`` module).

    Raises:
        ValueError: an unknown ``which``, or one that selects nothing in this model.
    """
    from lshattn import hf

    if which not in TRAINABLE:
        raise ValueError(f"unknown --trainable {which!r}; choose one of {', '.join(TRAINABLE)}")
    names = dict(model.named_modules())
    chosen: set[str] = set()
    if which == "all":
        chosen = {name for name, _ in model.named_parameters()}
    elif which == "layernorm":
        for module_name, module in names.items():
            if _is_norm(module):
                chosen |= {f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters()}
    else:
        for layer in hf.attention_layers(model):
            for sub_name, sub in layer.module.named_modules():  # Q, K, V (and the output projection in some models)
                if not _is_norm(sub):
                    prefix = ".".join(p for p in (layer.name, sub_name) if p)
                    chosen |= {f"{prefix}.{p}" for p, _ in sub.named_parameters(recurse=False)}
            parent_name = layer.name.rpartition(".")[0]
            parent = names.get(parent_name)
            if parent is not None and type(parent).__name__.endswith("Attention"):  # BERT's attention.output.dense
                for sub_name, sub in parent.named_modules():
                    if isinstance(sub, torch.nn.Linear):
                        prefix = ".".join(p for p in (parent_name, sub_name) if p)
                        chosen |= {f"{prefix}.{p}" for p, _ in sub.named_parameters(recurse=False)}
    if not chosen:
        raise ValueError(f"--trainable {which} selects no parameter in {type(model).__name__}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    return sorted(name for name, _ in model.named_parameters() if name in chosen)


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm", "Norm"))


# --- the texts -----------------------------------------------------------------------------------


def adaptation_texts(
    tokenizer: Any, *, max_length: int, probe_train: int, probe_test: int, val_size: int, train_size: int | None, seed: int
) -> tuple[Any, list[str], list[str]]:
    """The probe's task and the validation and adaptation documents, disjoint from it.

    The probe is ``lshattn.eval.tasks.rotten_tomatoes_task`` (the demo's): per label, the first
    ``ceil((probe_train + probe_test) / 2)`` documents that ``lshattn.data.join_to_tokens`` builds
    from that label's snippets in file order. The documents here are joined the same way from the
    snippets after those, leaving out every snippet whose text is in a probe document or already
    used (the corpus repeats some snippets, even whole runs of them): no snippet text is in both,
    nor in validation and adaptation both. Labels are dropped; fresh and rotten documents
    alternate (validation first, then adaptation).

    Returns:
        ``(task, validation texts, adaptation texts)``.

    Raises:
        ValueError: fewer documents are left than asked for.
        MissingPackageError: the data package is not installed.
    """
    from lshattn import data
    from lshattn.eval.tasks import rotten_tomatoes_task

    task = rotten_tomatoes_task(tokenizer, max_length=max_length, train=probe_train, test=probe_test, seed=seed)
    used = (probe_train + probe_test + 1) // 2
    snippets = data.rotten_tomatoes()
    rest, seen = [], set()
    for label in ("fresh", "rotten"):
        texts = [t for t, c in snippets if c == label]
        boundary = _texts_in_documents(texts, tokenizer, max_length, used)
        seen.update(texts[:boundary])
        left = []
        for text in texts[boundary:]:
            if text not in seen:
                seen.add(text)
                left.append(text)
        rest.append(data.join_to_tokens(left, tokenizer, max_length))
    mixed = [doc for pair in zip(*rest) for doc in pair] + rest[0][len(rest[1]) :] + rest[1][len(rest[0]) :]
    wanted = val_size + (train_size if train_size is not None else 1)
    if len(mixed) < wanted:
        raise ValueError(
            f"Rotten Tomatoes gives {len(mixed)} documents of {max_length} tokens besides the probe's "
            f"{2 * used}; {val_size} validation + {train_size or 'some'} adaptation documents were asked for"
        )
    val = mixed[:val_size]
    train = mixed[val_size:] if train_size is None else mixed[val_size : val_size + train_size]
    probe = set(task.train_texts) | set(task.test_texts)
    if not (probe.isdisjoint(train) and probe.isdisjoint(val) and set(val).isdisjoint(train)):  # pragma: no cover
        raise RuntimeError("adaptation, validation and probe documents overlap; this is a bug in adaptation_texts")
    return task, val, train


def _texts_in_documents(texts: Sequence[str], tokenizer: Any, num_tokens: int, count: int) -> int:
    """How many of ``texts`` the first ``count`` documents of ``lshattn.data.join_to_tokens``
    take (its rule, replayed and checked against its output)."""
    from lshattn import data

    documents = data.join_to_tokens(texts, tokenizer, num_tokens, count=count)
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    special = tokenizer.num_special_tokens_to_add(pair=False)
    start, index, length, made = 0, 0, special, 0
    while made < count:
        length += lengths[index]
        index += 1
        if length >= num_tokens:
            if " ".join(texts[start:index]) != documents[made]:  # pragma: no cover - join_to_tokens changed its rule
                raise RuntimeError("lshattn.data.join_to_tokens no longer joins as adaptation_texts expects")
            start, length, made = index, special, made + 1
    return index


def _dataset(texts: Sequence[str], tokenizer: Any, max_length: int) -> tasks.TokenizedDataset:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return tasks.TokenizedDataset(
        {"input_ids": ids, "attention_mask": mask} for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])
    )


# --- the recipe ----------------------------------------------------------------------------------


def _check(config: AdaptConfig) -> Any:
    """Everything that can be checked before loading anything; returns the method."""
    if config.trainable not in TRAINABLE:
        raise ValueError(f"unknown --trainable {config.trainable!r}; choose one of {', '.join(TRAINABLE)}")
    config.loss.check()
    if config.dropout is not None and not 0 <= config.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {config.dropout}")
    for name in ("max_length", "val_size", "probe_train", "probe_test", "max_steps", "batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.train_size is not None and (not isinstance(config.train_size, int) or config.train_size < 1):
        raise ValueError(f"train_size must be a positive integer or None (all), got {config.train_size!r}")
    if config.max_minutes is not None and not config.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {config.max_minutes}")
    if config.probe_train < 2:
        raise ValueError(f"probe_train must be at least 2 (both classes), got {config.probe_train}")
    method = common.resolve_method(config.method)
    if method is None or method == parse("dense"):
        raise ValueError(
            "adapt teaches a model to work with an LSH method; with exact attention (dense) the student is the "
            "teacher and there is nothing to learn: give --method, e.g. "
            "'smyrf:num_hashes=1,q_cluster_size=32,k_cluster_size=32'"
        )
    return method


def _load_model(config: AdaptConfig) -> tuple[Any, Any]:
    from lshattn import data

    if config.model is None:
        return data.load_minilm()
    from transformers import AutoModel, AutoTokenizer

    path = Path(config.model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {config.model}: no such directory (a local Hugging Face model: config.json, weights, tokenizer)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True), AutoModel.from_pretrained(path, local_files_only=True).eval()


def _check_layers(model: Any, layers: Sequence[int] | None) -> None:
    from lshattn import hf

    if layers is None:
        return
    count = len(hf.attention_layers(model))
    bad = sorted(i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count)
    if bad:
        raise ValueError(f"--layers {bad} out of range: the model has {count} attention layers, 0 to {count - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"--layers repeats a layer: {list(layers)}")


def _use(model: Any, method: Any, config: AdaptConfig) -> None:
    """The training setting: the method on ``config.layers``, redrawn per step or not."""
    from lshattn import hf

    hf.use(model, method, layers=config.layers, seed=config.seed, redraw_in_training=config.redraw)


def _embed(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int) -> Tensor:
    """Mean-pooled, normalised embeddings with whatever attention ``model`` runs now, in eval mode."""
    from lshattn import hf

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt").to(device)  # fmt: skip
            chunks.append(hf.mean_pool(model(**batch).last_hidden_state.float(), batch["attention_mask"]).cpu())
    model.train(was_training)
    return torch.cat(chunks)


def _settings(model, tokenizer, method, layers, seed, split, length, batch_size) -> Tensor:
    """Embeddings of ``split`` with ``method`` on ``layers`` (None: exact attention everywhere)."""
    common.use_method(model, method, layers if method is not None else None, seed)
    try:
        return _embed(model, tokenizer, split, length, batch_size)
    finally:
        common.use_method(model, None, None, seed)


def _score(exact_train, train_labels, exact_test, test_labels, embeddings: dict[str, Tensor]) -> dict[str, dict]:
    """Cosine to the teacher's test embeddings and zero-shot probe accuracy of each setting."""
    from lshattn.eval.tasks import probe_accuracy

    accuracy = probe_accuracy(exact_train, train_labels, {"exact": exact_test, **embeddings}, test_labels)
    rows = {"exact": {"cosine": 1.0, "cosine_min": 1.0, "probe_accuracy": accuracy["exact"]}}
    for name, x in embeddings.items():
        cos = (x * exact_test).sum(-1)
        rows[name] = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "probe_accuracy": accuracy[name]}
    return rows


def adapt(config: AdaptConfig, out: str | Path) -> dict[str, Any]:
    """Adapt, evaluate before and after, write ``metrics.json``, ``report.md``, ``loss.png``,
    ``cosine.png`` (and ``model/`` with ``config.save_model``) into ``out``; return the metrics.

    Everything that can be wrong with the settings (an unknown ``trainable``, a method that
    cannot train or is exact attention, layers out of range, a length above the model's
    positions, a missing data package, too few texts) fails before any training or evaluation.
    """
    from transformers import DataCollatorWithPadding, set_seed

    started = time.perf_counter()
    out = Path(out)
    method = _check(config)
    tokenizer, student = _load_model(config)
    tasks.check_length(config.max_length, student.config.max_position_embeddings, "--max-length")
    _check_layers(student, config.layers)
    task, val_texts, train_texts = adaptation_texts(
        tokenizer, max_length=config.max_length, probe_train=config.probe_train, probe_test=config.probe_test,
        val_size=config.val_size, train_size=config.train_size, seed=config.seed,
    )  # fmt: skip
    bbc = None
    if config.bbc:
        from lshattn.eval.tasks import bbc_task

        bbc = bbc_task(max_length=512, train=config.bbc_train, test=config.bbc_test, seed=config.seed)
        tasks.check_length(512, student.config.max_position_embeddings, "BBC's 512 tokens")
    set_seed(config.seed)
    args = common.training_arguments(config, out)
    is_main = args.process_index == 0
    device = args.device
    student.to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    eval_batch = max(config.batch_size, 16)
    label = common.method_label(method)
    load_start = os.getloadavg()

    # Before: the original weights, exact attention (the teacher) and the method.
    evaluation_sets = [("rt", task, config.max_length, eval_batch)] + ([("bbc", bbc, 512, 8)] if bbc is not None else [])
    before: dict[str, dict] = {}
    exact: dict[str, tuple[Tensor, Tensor]] = {}
    eval_seconds = 0.0
    if is_main:
        tick = time.perf_counter()
        for key, data_task, length, size in evaluation_sets:
            train_x = _settings(student, tokenizer, None, None, config.seed, data_task.train_texts, length, size)
            test_x = _settings(student, tokenizer, None, None, config.seed, data_task.test_texts, length, size)
            exact[key] = (train_x, test_x)
            method_x = _settings(student, tokenizer, method, config.layers, config.seed, data_task.test_texts, length, size)
            before[key] = _score(train_x, data_task.train_labels, test_x, data_task.test_labels, {"method": method_x})
        eval_seconds += time.perf_counter() - tick

    # Train.
    _use(student, method, config)
    trainable = set_trainable(student, config.trainable)
    if config.dropout is not None:
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.dropout
    trainer = AdaptTrainer(
        model=student,
        args=args,
        train_dataset=_dataset(train_texts, tokenizer, config.max_length),
        eval_dataset=_dataset(val_texts, tokenizer, config.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[common.StepCallback()] + ([TimeLimit(config.max_minutes)] if config.max_minutes else []),
        teacher=teacher,
        loss_weights=config.loss,
    )
    result, seconds = common.run_trainer(trainer, config, out)
    load_end = os.getloadavg()

    # After: the adapted weights with the method, and with exact attention.
    after: dict[str, dict] = {}
    if is_main:
        tick = time.perf_counter()
        for key, data_task, length, size in evaluation_sets:
            train_x, test_x = exact[key]
            settings = {
                "method": _settings(student, tokenizer, method, config.layers, config.seed, data_task.test_texts, length, size),
                "dense": _settings(student, tokenizer, None, None, config.seed, data_task.test_texts, length, size),
            }
            after[key] = _score(train_x, data_task.train_labels, test_x, data_task.test_labels, settings)
        eval_seconds += time.perf_counter() - tick
    _use(student, method, config)
    if config.save_model and is_main:
        trainer.save_model(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))

    history = trainer.state.log_history
    curve = [(e["step"], e["eval_cosine"]) for e in history if "eval_cosine" in e]
    loads = [e["load_1m"] for e in history if "load_1m" in e]
    budget = method.cost(1, 1, config.max_length, config.max_length, 32, 32).budget
    metrics = {
        "recipe": "adapt",
        "model": "all-MiniLM-L6-v2" if config.model is None else str(config.model),
        "method": label,
        "budget": budget,
        "layers": None if config.layers is None else list(config.layers),
        "trainable": config.trainable,
        "trainable_parameters": int(sum(p.numel() for n, p in student.named_parameters() if n in set(trainable))),
        "parameters": int(sum(p.numel() for p in student.parameters())),
        "config": {**dataclasses.asdict(config), "method": label},
        "max_length": config.max_length,
        "texts": {
            "adaptation": len(train_texts), "validation": len(val_texts), "probe_train": len(task.train_texts),
            "probe_test": len(task.test_texts),
            "disjoint": "adaptation and validation documents are joined from the Rotten Tomatoes snippets after "
                        "those of the probe's documents, without any snippet text of the probe's (the corpus "
                        "repeats some) or of each other's",
        },  # fmt: skip
        "steps": result.global_step,
        "stopped_by_time_limit": result.global_step < config.max_steps,
        "texts_seen": result.global_step * config.batch_size * args.world_size,
        "train_loss": result.training_loss,
        "seconds": seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - started,
        "load_average": {"start": load_start[0], "end": load_end[0], "mean_during_training": float(np.mean(loads)) if loads else None},
        "validation_cosine": curve,
        "before": before,
        "after": after,
        "environment": common.environment(),
    }
    if is_main:
        common.write_outputs(out, metrics, _report(metrics), history, f"adaptation, {label}")
        if curve and _plot_cosine(curve, before.get("rt", {}).get("method", {}).get("cosine"), out / "cosine.png", label):
            with open(out / "report.md", "a") as f:
                f.write("\n![validation cosine over steps](cosine.png)\n")
    return metrics


def _plot_cosine(curve: list[tuple[int, float]], start: float | None, path: Path, label: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*curve)
    if start is not None:
        steps, values = (0, *steps), (None, *values)
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.plot([s for s, v in zip(steps, values) if v is not None], [v for v in values if v is not None], marker="o",
              label="validation texts, eval projections")  # fmt: skip
    if start is not None:
        axis.axhline(start, color="grey", linestyle="--", label=f"probe test texts before adapting ({start:.3f})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("mean embedding cosine to the teacher")
    axis.set_title(f"adaptation, {label}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _report(metrics: dict[str, Any]) -> str:
    names = {"rt": f"Rotten Tomatoes, {metrics['max_length']} tokens", "bbc": "BBC News, 512 tokens (out of domain)"}
    sections = []
    for key, before in metrics["before"].items():
        after = metrics["after"].get(key, {})
        rows = [
            ("original", "exact (the teacher)", before["exact"]),
            ("original", metrics["method"], before["method"]),
            ("adapted", metrics["method"], after.get("method")),
            ("adapted", "exact", after.get("dense")),
        ]
        table = "\n".join(
            f"| {weights} | {attention} | {row['cosine']:.3f} | {row['cosine_min']:.3f} | {row['probe_accuracy']:.3f} |"
            for weights, attention, row in rows if row is not None
        )  # fmt: skip
        sections.append(f"""### {names.get(key, key)}

| weights | attention | mean cosine to the teacher | min cosine | probe accuracy |
|---|---|---|---|---|
{table}
""")
    layers = "all layers" if metrics["layers"] is None else f"layers {metrics['layers']}"
    load = metrics["load_average"]["mean_during_training"]
    config, texts, loss = metrics["config"], metrics["texts"], metrics["config"]["loss"]
    dropout = "the model's own dropout" if config["dropout"] is None else f"dropout {config['dropout']:g}"
    projections = "new hash projections every optimizer step" if config["redraw"] else "the fixed evaluation projections"
    stopped = f" (stopped by --max-minutes {config['max_minutes']:g}; {config['max_steps']} planned)" if metrics["stopped_by_time_limit"] else ""
    terms = " + ".join(
        f"{weight:g} × {name}" for name, weight in (
            (f"token cosine distance ({'every layer' if loss['match'] == 'all' else 'last layer'})", loss["token_cosine"]),
            (f"token relative MSE ({'every layer' if loss['match'] == 'all' else 'last layer'})", loss["token_mse"]),
            ("sentence-embedding cosine distance", loss["pooled_cosine"]),
        ) if weight
    )  # fmt: skip
    return f"""# Adaptation: {metrics['method']}

{metrics['model']} with **{metrics['method']}** in {layers} ({metrics['budget']:.1%} of exact attention's
dot products at {metrics['max_length']} tokens), taught by itself with exact attention (a frozen
teacher) to give the same hidden states, on unlabelled text.

- Training: {metrics['steps']} optimizer steps{stopped} of {config['batch_size']} texts ({metrics['texts_seen']:,} texts seen) over
  {texts['adaptation']:,} Rotten Tomatoes documents; `--trainable {metrics['trainable']}`
  ({metrics['trainable_parameters']:,} of {metrics['parameters']:,} parameters); learning rate {config['learning_rate']:g},
  {dropout}, {projections}.
- Loss: {terms}.
- Time: {metrics['seconds'] / 60:.1f} min of training, {metrics['eval_seconds'] / 60:.1f} min of evaluation
  ({metrics['environment']['device']}; 1-minute load average {'?' if load is None else f'{load:.1f}'} during training).
- Texts: measured on texts the model did not adapt on ({texts['disjoint']}).
  *Cosine*: each sentence embedding (mean-pooled) against the teacher's, over the probe's
  {texts['probe_test']} test texts. *Probe*: a logistic regression trained on the original model's
  exact-attention embeddings of {texts['probe_train']} texts, tested on each row's embeddings of the test texts.

{chr(10).join(sections)}"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = AdaptConfig()
    common.add_recipe_arguments(parser, defaults)
    parser.add_argument("--trainable", default=defaults.trainable, help=f"which weights train: {', '.join(TRAINABLE)}")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per text")
    parser.add_argument("--train-size", type=int, default=None, help="adaptation documents (default: all left, ~1,300)")
    parser.add_argument("--val-size", type=int, default=defaults.val_size, help="held-out documents scored during training")
    parser.add_argument("--probe-train", type=int, default=defaults.probe_train)
    parser.add_argument("--probe-test", type=int, default=defaults.probe_test)
    parser.add_argument("--token-cosine", type=float, default=defaults.loss.token_cosine, help="weight of the token cosine distance")
    parser.add_argument("--token-mse", type=float, default=defaults.loss.token_mse, help="weight of the token relative MSE")
    parser.add_argument("--pooled-cosine", type=float, default=defaults.loss.pooled_cosine, help="weight of the sentence cosine distance")
    parser.add_argument("--match", default=defaults.loss.match, help=f"hidden states the token terms match: {', '.join(MATCH)}")
    parser.add_argument("--dropout", type=float, default=defaults.dropout, help="student dropout in training (-1: the model's own)")
    parser.add_argument("--no-redraw", action="store_true", help="train with the fixed evaluation projections")
    parser.add_argument("--bbc", action="store_true", help="also evaluate on BBC News (512 tokens), out of domain")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes (default: no limit)")
    parser.add_argument("--model", default=None, help="a local Hugging Face model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--no-save-model", action="store_true", help="do not write the adapted model to OUT/model")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config = AdaptConfig(
        **common.recipe_settings(args),
        trainable=args.trainable,
        max_length=args.max_length,
        train_size=args.train_size,
        val_size=args.val_size,
        probe_train=args.probe_train,
        probe_test=args.probe_test,
        loss=LossWeights(args.token_cosine, args.token_mse, args.pooled_cosine, args.match),
        dropout=None if args.dropout is not None and args.dropout < 0 else args.dropout,
        redraw=not args.no_redraw,
        bbc=args.bbc,
        model=args.model,
        save_model=not args.no_save_model,
        max_minutes=args.max_minutes,
    )
    return adapt(config.quick() if args.quick else config, args.out)
