"""The Reformer paper's synthetic duplication task, and a recipe that trains a small causal LM on it.

Sequences are ``0 w 0 w``: a separator (token 0), a string ``w`` of random symbols, the
separator again and ``w`` once more. Only the second copy of ``w`` is scored (loss and
accuracy), and it can only be predicted by attending to the first copy, so the task measures
whether an attention finds the one key that matters (Kitaev et al. 2020, Table 2).

``train_duplication`` trains a one-layer GPT-2 from scratch with a method in its attention
(``Reformer(shared_qk=True)`` is allowed: the weights are new) on fresh sequences, one per
example, and evaluates the trained model on held-out sequences with each of ``eval_methods``:
the trained-with × evaluated-with table of the paper. ``lshattn reproduce reformer`` runs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lshattn.api import Method
from lshattn.train import common

__all__ = [
    "DuplicationConfig",
    "IGNORE",
    "copy_accuracy",
    "duplication_labels",
    "duplication_sequences",
    "train_duplication",
]

IGNORE = -100  # the label transformers' losses skip


def duplication_sequences(count: int, *, half_length: int, vocab_size: int, seed: int) -> torch.LongTensor:
    """``count`` sequences ``0 w 0 w`` of ``2 · half_length`` tokens, drawn from ``seed`` alone.

    Args:
        count: sequences to draw (N).
        half_length: tokens per half: the separator and ``half_length - 1`` symbols of ``w``.
        vocab_size: token ids are 0 (the separator) and the symbols 1 .. vocab_size − 1, drawn
            uniformly and independently.
        seed: seeds a private ``torch.Generator``; the global RNG is not touched.

    Returns:
        (N, 2 · half_length) int64: column 0 and column ``half_length`` hold 0, and
        ``seq[:, half_length + 1:] == seq[:, 1:half_length]``.

    Raises:
        ValueError: ``count`` < 0, ``half_length`` < 2 (``w`` would be empty) or ``vocab_size``
            < 2 (no symbol besides the separator).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if half_length < 2:
        raise ValueError(f"half_length must be >= 2 (a separator and at least one symbol), got {half_length}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (the separator 0 and at least one symbol), got {vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(1, vocab_size, (count, half_length - 1), generator=generator)
    half = torch.cat([torch.zeros(count, 1, dtype=torch.long), words], dim=1)
    return half.repeat(1, 2)


def duplication_labels(sequences: torch.Tensor, half_length: int) -> torch.LongTensor:
    """The language-model labels that score only the second copy of ``w``.

    Args:
        sequences: (N, 2 · half_length) from ``duplication_sequences``.

    Returns:
        (N, 2 · half_length): ``sequences`` at positions ``half_length + 1`` onwards (the
        second ``w``), ``IGNORE`` elsewhere. A causal LM predicts position t from the tokens
        before it (transformers shifts the labels), so every scored token is the copy of a
        token the model has seen.
    """
    if sequences.shape[-1] != 2 * half_length:
        raise ValueError(
            f"sequences have {sequences.shape[-1]} tokens, but half_length {half_length} makes them "
            f"{2 * half_length}; pass the half_length they were drawn with"
        )
    labels = sequences.clone()
    labels[..., : half_length + 1] = IGNORE
    return labels


def copy_accuracy(predictions: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Teacher-forced accuracy on the scored tokens.

    Args:
        predictions: (N, T) the argmax of the model's logits at each position, i.e. its guess
            for the *next* token.
        labels: (N, T) the tokens, ``IGNORE`` where not scored (``duplication_labels``).

    Returns:
        ``accuracy``: the share of scored tokens predicted exactly (the paper's metric);
        ``sequence_accuracy``: the share of sequences whose scored tokens are all right.
    """
    predictions, labels = torch.as_tensor(np.asarray(predictions)), torch.as_tensor(np.asarray(labels))
    guess, target = predictions[:, :-1], labels[:, 1:]
    scored = target != IGNORE
    right = (guess == target) & scored
    per_sequence = right.sum(1) == scored.sum(1)
    return {
        "accuracy": float(right.sum() / scored.sum().clamp(min=1)),
        "sequence_accuracy": float(per_sequence[scored.any(1)].float().mean()) if scored.any() else 0.0,
    }


@dataclasses.dataclass(frozen=True)
class DuplicationConfig(common.RecipeConfig):
    """A duplication-task run (the shared settings are ``common.RecipeConfig``'s).

    Attributes:
        half_length: tokens per half (sequences are ``2 · half_length`` long).
        vocab_size: the separator 0 and ``vocab_size − 1`` symbols.
        hidden_size, num_layers, num_heads: the GPT-2 (feed-forward width = hidden_size, as
            the paper's d_ff = d_model; no dropout).
        eval_size: held-out sequences, drawn apart from the training ones.
        eval_methods: the methods the trained model is evaluated with (None: dense and the
            training method); each is put in every layer.

    Training draws ``max_steps · batch_size`` fresh sequences: no sequence is seen twice.
    """

    method: Method | str | None = "reformer:num_hashes=1,bucket_size=16,num_buckets=16,shared_qk=True"
    half_length: int = 64
    vocab_size: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    num_heads: int = 4
    eval_size: int = 256
    eval_methods: tuple[str, ...] | None = None
    learning_rate: float = 1e-3
    batch_size: int = 32
    max_steps: int = 600
    eval_steps: int = 100
    save_steps: int = 600


def build_model(config: DuplicationConfig) -> Any:
    """A new ``GPT2LMHeadModel`` for the task (weights from torch's global RNG: seed it first).
    GPT-2's learned absolute positions let one layer find "the same place in the first half"."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(
        vocab_size=config.vocab_size, n_positions=2 * config.half_length, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.hidden_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(gpt2)


def _dataset(sequences: torch.Tensor, half_length: int) -> torch.utils.data.Dataset:
    """Rows as ``{"input_ids", "labels"}`` for ``default_data_collator``."""
    return torch.utils.data.StackDataset(input_ids=sequences, labels=duplication_labels(sequences, half_length))


def _argmax(logits: Any, labels: Any) -> torch.Tensor:
    """Keep only the argmax of the logits during evaluation (``preprocess_logits_for_metrics``)."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def _metrics(prediction: Any) -> dict[str, float]:
    return copy_accuracy(prediction.predictions, prediction.label_ids)


def _eval_methods(config: DuplicationConfig, method: Any) -> dict[str, Any]:
    """The evaluation methods by label: the configured ones, or dense and the training method."""
    given = config.eval_methods if config.eval_methods is not None else ("dense", common.method_label(method))
    return {common.method_label(spec): spec for spec in map(common.resolve_method, given)}


def train_duplication(config: DuplicationConfig, out: str | Path) -> dict[str, Any]:
    """Train on the duplication task, evaluate the trained model with each of
    ``config.eval_methods`` on held-out sequences, write ``metrics.json``, ``report.md`` and
    ``loss.png`` into ``out``, and return the metrics (``evaluated_with[label]`` holds
    ``accuracy``, ``sequence_accuracy`` and ``loss`` per evaluation method).

    A bad setting (a method that cannot train, a sequence half or vocabulary out of range)
    fails before training starts.
    """
    from transformers import Trainer, default_data_collator, set_seed

    out = Path(out)
    method = common.resolve_method(config.method)
    eval_methods = _eval_methods(config, method)
    train_count = config.max_steps * config.batch_size
    sequences = duplication_sequences(
        train_count + config.eval_size, half_length=config.half_length, vocab_size=config.vocab_size, seed=config.seed
    )
    train_set = _dataset(sequences[:train_count], config.half_length)
    eval_set = _dataset(sequences[train_count:], config.half_length)
    set_seed(config.seed)
    model = build_model(config)
    common.use_method(model, method, None, config.seed, from_scratch=True)

    trainer = Trainer(
        model=model,
        args=common.training_arguments(config, out),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        compute_metrics=_metrics,
        preprocess_logits_for_metrics=_argmax,
        callbacks=[common.StepCallback()] if method is not None else [],
    )
    result, seconds = common.run_trainer(trainer, config, out)

    evaluations = common.evaluate_with(
        trainer, eval_methods, method, None, config.seed, from_scratch=True,
        keys=("accuracy", "sequence_accuracy", "loss"),
    )  # fmt: skip

    trained = common.method_label(method)
    metrics = {
        "recipe": "duplication",
        "trained_with": trained,
        "config": {**dataclasses.asdict(config), "method": trained},
        "sequence_length": 2 * config.half_length,
        "train_size": train_count,
        "eval_size": config.eval_size,
        "chance": 1.0 / (config.vocab_size - 1),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": seconds,
        "evaluated_with": evaluations,
        "environment": common.environment(),
    }
    common.write_outputs(out, metrics, _report(metrics), trainer.state.log_history, f"duplication, {trained}")
    return metrics


def _report(metrics: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {label} | {s['accuracy']:.3f} | {s['sequence_accuracy']:.3f} | {s['loss']:.3f} |"
        for label, s in metrics["evaluated_with"].items()
    )
    config = metrics["config"]
    return f"""# Duplication task (Reformer paper, Table 2)

Sequences `0 w 0 w` of {metrics["sequence_length"]} tokens over {config["vocab_size"] - 1} symbols; a
{config["num_layers"]}-layer GPT-2 (hidden {config["hidden_size"]}, {config["num_heads"]} heads) trained from
scratch with **{metrics["trained_with"]}**, {metrics["steps"]} steps of {config["batch_size"]} fresh sequences
in {metrics["seconds"] / 60:.1f} min ({metrics["environment"]["device"]}). Loss and accuracy count the second
copy of `w` only (chance: {metrics["chance"]:.3f}).

Held-out accuracy ({metrics["eval_size"]} sequences, teacher-forced) with each attention at evaluation:

| evaluated with | token accuracy | whole second copy right | loss |
|---|---|---|---|
{rows}
"""
