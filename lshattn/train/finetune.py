"""Fine-tune a pretrained encoder with an LSH method in its attention, then evaluate it with
every method of ``eval_methods``: SMYRF's interchange table (trained with X, evaluated with Y).

::

    lshattn train finetune --method "smyrf:num_hashes=2,q_cluster_size=16,k_cluster_size=16" --out runs/ft
    lshattn train finetune --task bbc --method "reformer:bucket_size=32,num_buckets=32,shared_qk=False" --layers 3 4 5
    lshattn train finetune --model runs/mlm/checkpoints/checkpoint-2000 --method simhash:num_bits=2 --out runs/ft-mlm

The model is all-MiniLM-L6-v2 with a new classification head, or (``--model``) a BERT checkpoint
with MiniLM's vocabulary, such as those ``lshattn train mlm`` writes; the task is Rotten Tomatoes
sentiment on 128-token documents (``--task rt``) or BBC News topics on 512-token articles
(``--task bbc``), with the splits of the demo's probes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from lshattn.train import common, models, tasks

__all__ = ["FinetuneConfig", "finetune", "add_arguments", "run_from_args"]


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(common.RecipeConfig):
    """A fine-tuning run (the shared settings are ``common.RecipeConfig``'s).

    Attributes:
        task: "rt" (Rotten Tomatoes, 2 classes, 128 tokens) or "bbc" (BBC News, 5 classes, 512).
        max_length: tokens per text (None: the task's).
        train_size, eval_size: texts in the train and held-out splits (Rotten Tomatoes gives 1,936
            documents of 128 tokens, BBC News 2,225 articles: the defaults fit both).
        eval_methods: the methods the trained model is evaluated with (None: dense and the
            training method), each in the same layers as the training method.
        reinit_attention: throw away the pretrained attention weights (Q, K, V and output
            projections of the layers in ``layers``) before training
            (``models.reinit_attention``): ALBERT-LSH's defect, as a control.
        model: the pretrained BERT to start from, a checkpoint folder (e.g. ``lshattn train
            mlm``'s ``out/checkpoints/checkpoint-N``; it must use MiniLM's vocabulary, as those
            do), or None: all-MiniLM-L6-v2.
    """

    task: str = "rt"
    max_length: int | None = None
    train_size: int = 1400
    eval_size: int = 500
    eval_methods: tuple[str, ...] | None = None
    reinit_attention: bool = False
    model: str | None = None

    def quick(self) -> FinetuneConfig:
        """A run of a couple of minutes on two CPU cores, to see it work."""
        return dataclasses.replace(
            self, train_size=320, eval_size=96, max_steps=30, eval_steps=15, save_steps=15, learning_rate=2e-4
        )


def finetune(config: FinetuneConfig, out: str | Path) -> dict[str, Any]:
    """Fine-tune, evaluate with each of ``config.eval_methods``, write ``metrics.json``,
    ``report.md`` and ``loss.png`` into ``out``, and return the metrics.

    Everything that can be wrong with the settings (an unknown task, a missing data package, a
    method that cannot train, layers out of range, a length above the model's positions) fails
    before training starts.
    """
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    out = Path(out)
    method = common.resolve_method(config.method)
    eval_methods = _eval_methods(config, method)
    set_seed(config.seed)
    tokenizer = models.minilm_tokenizer()
    task, length = tasks.load_task(
        config.task, tokenizer, max_length=config.max_length, train=config.train_size, test=config.eval_size,
        seed=config.seed,
    )  # fmt: skip
    model = common.loss_is_a_batch_mean(models.minilm_classifier(task.classes, config.model))
    tasks.check_length(length, model.config.max_position_embeddings, "--max-length")
    if config.reinit_attention:
        models.reinit_attention(model, config.layers)
    train_set = tasks.classification_dataset(task.train_texts, task.train_labels, task.classes, tokenizer, length)
    eval_set = tasks.classification_dataset(task.test_texts, task.test_labels, task.classes, tokenizer, length)
    common.use_method(model, method, config.layers, config.seed)

    trainer = Trainer(
        model=model,
        args=common.training_arguments(config, out),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
        callbacks=[common.StepCallback()] if method is not None else [],
    )
    result, seconds = common.run_trainer(trainer, config, out)

    evaluations = common.evaluate_with(trainer, eval_methods, method, config.layers, config.seed)

    trained = common.method_label(method)
    metrics = {
        "recipe": "finetune",
        "task": task.name,
        "max_length": length,
        "trained_with": trained,
        "layers": None if config.layers is None else list(config.layers),
        "model": config.model or "all-MiniLM-L6-v2",
        "config": {**dataclasses.asdict(config), "method": trained},
        "train_size": len(train_set),
        "eval_size": len(eval_set),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": seconds,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "evaluated_with": evaluations,
        "budget": None if method is None else method.cost(1, 1, length, length, 32, 32).budget,
        "environment": common.environment(),
    }
    common.write_outputs(out, metrics, _report(metrics), trainer.state.log_history, f"fine-tuning, {trained}")
    return metrics


def _eval_methods(config: FinetuneConfig, method: Any) -> dict[str, Any]:
    """The evaluation methods by label: the configured ones, or dense and the training method."""
    given = config.eval_methods if config.eval_methods is not None else ("dense", common.method_label(method))
    resolved = {}
    for text in given:
        spec = common.resolve_method(text)
        resolved[common.method_label(spec)] = spec
    return resolved


def _accuracy(prediction: Any) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(prediction.label_ids)).mean())}


def _report(metrics: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {label} | {scores['accuracy']:.3f} | {scores['loss']:.3f} |" for label, scores in metrics["evaluated_with"].items()
    )
    budget = "exact attention" if metrics["budget"] is None else f"{metrics['budget']:.1%} of exact attention's dot products"
    layers = "all layers" if metrics["layers"] is None else f"layers {metrics['layers']}"
    reinit = ", its pretrained attention weights re-initialised," if metrics["config"]["reinit_attention"] else ","
    return f"""# Fine-tuning: {metrics['task']}

{metrics['model']} with a new classification head{reinit} trained with **{metrics['trained_with']}** in
{layers} ({budget} at {metrics['max_length']} tokens), {metrics['steps']} steps on
{metrics['train_size']} texts in {metrics['seconds'] / 60:.1f} min ({metrics['environment']['device']}).

Held-out accuracy ({metrics['eval_size']} texts) with each attention at evaluation:

| evaluated with | accuracy | loss |
|---|---|---|
{rows}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_recipe_arguments(parser, FinetuneConfig())
    parser.add_argument("--task", default="rt", help="rt (Rotten Tomatoes, 128 tokens) or bbc (BBC News, 512)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the task's)")
    parser.add_argument("--train-size", type=int, default=FinetuneConfig.train_size)
    parser.add_argument("--eval-size", type=int, default=FinetuneConfig.eval_size)
    parser.add_argument(
        "--eval-methods", nargs="+", default=None, help="methods to evaluate with (default: dense and --method)"
    )
    parser.add_argument(
        "--reinit-attention", action="store_true",
        help="re-initialise the pretrained attention weights (Q, K, V, output) of --layers before training",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None,
        help="a BERT checkpoint folder to start from (e.g. lshattn train mlm's <out>/checkpoints/checkpoint-N; "
        "default: all-MiniLM-L6-v2)",
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config = FinetuneConfig(
        **common.recipe_settings(args),
        task=args.task,
        max_length=args.max_length,
        train_size=args.train_size,
        eval_size=args.eval_size,
        eval_methods=None if args.eval_methods is None else tuple(args.eval_methods),
        reinit_attention=args.reinit_attention,
        model=args.model,
    )
    return finetune(config.quick() if args.quick else config, args.out)
