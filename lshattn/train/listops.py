"""ListOps (Long Range Arena, Tay et al. 2021): nested list operations, and a recipe that trains a
small encoder from scratch to evaluate them.

An expression is an operator applied to 2 to ``max_args`` arguments, each a digit 0–9 or, down
to ``max_depth`` levels of operators, an expression itself, written with brackets::

    [ MAX 4 [ MIN 7 2 5 ] 0 [ SM 9 8 ] ]     ->  MAX(4, 2, 0, 7) = 7

The operators are MIN, MAX, MED (the median; for an even count, the mean of the two middle values
rounded down) and SM (the sum mod 10), so every value is a digit: the label, one of 10 classes.
The model sees the whole expression, one token per symbol, and must evaluate it: the answer
depends on tokens hundreds of positions apart.

The generator (``listops_examples``) is written from this grammar. An expression is grown to a
length drawn uniformly from ``[min_length, max_length]`` tokens: starting from ``[ OP d d ]``, each
step either adds a digit argument to a random operator that has fewer than ``max_args`` (+1
token) or, with probability ``NEST_PROBABILITY``, replaces a random digit above the deepest level
by a new ``[ OP d d ]`` (+4 tokens), never past ``max_length``; the operators, the digits and the
order of each operator's arguments are drawn when the tree is written out. All draws come from a
private ``random.Random(seed)``: the global torch, numpy and Python generators are not touched.

``train_listops`` trains a BERT encoder from a fresh ``BertConfig`` (the LRA PyTorch code
base's size by default: 2 layers, hidden 64, 2 heads of 32, feed-forward 128) with a method in
its attention, classifies the mean of its outputs over the expression's tokens
(``ListOpsClassifier``: mean pooling, as that code base), and reports accuracy on held-out
expressions with each of ``eval_methods``. ``lshattn reproduce yoso`` runs it.

Why mean pooling: classifying from a first (CLS) token, YOSO could not learn the task. Its
kernel (1 − θ/π)^τ with τ = 11 is near zero for all but near-parallel queries and keys, so a CLS
query collides with almost nothing and its output carries no information about the expression:
a YOSO-32 model trained 600 steps from scratch on expressions of 128–255 tokens predicted one
value for every expression (18.0 %, the most frequent value's share), where dense attention
reached 42 %. With mean pooling the same YOSO-32 run reached 44.4 % by step 300.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from lshattn import hf
from lshattn.api import Method
from lshattn.train import common

__all__ = [
    "CLASSES",
    "CLOSE",
    "DIGITS",
    "NEST_PROBABILITY",
    "OPEN",
    "OPERATORS",
    "PAD",
    "VOCAB",
    "ListOpsClassifier",
    "ListOpsConfig",
    "ListOpsExamples",
    "apply_operator",
    "build_model",
    "decode",
    "listops_examples",
    "max_tokens",
    "train_listops",
]

OPERATORS = ("MIN", "MAX", "MED", "SM")
VOCAB = ("<pad>", *map(str, range(10)), "[", "]", *OPERATORS)  # token id = index
PAD = 0
DIGITS = tuple(VOCAB.index(str(digit)) for digit in range(10))  # the ids of "0" .. "9"
OPEN, CLOSE = VOCAB.index("["), VOCAB.index("]")
_OPERATOR_IDS = tuple(VOCAB.index(op) for op in OPERATORS)
CLASSES = 10  # an expression's value is a digit

# The chance that a growth step nests (a digit becomes "[ OP d d ]") rather than adds an argument
# when both are possible: about 4 arguments per operator on average, and trees several levels deep.
NEST_PROBABILITY = 0.3

_DIGIT = -1  # an argument that is a digit, in the grown tree's children lists
_MIN_TOKENS = 5  # the shortest expression, "[ OP d d ]"
_MAX_DRAWS = 100  # trees drawn for one example before the settings are called unreachable


def apply_operator(operator: str, values: list[int]) -> int:
    """The value of ``operator`` (one of ``OPERATORS``) over the digits ``values`` (at least one).
    MED of an even count is the mean of the two middle values rounded down; SM is the sum mod 10."""
    if operator == "MIN":
        return min(values)
    if operator == "MAX":
        return max(values)
    if operator == "SM":
        return sum(values) % 10
    if operator == "MED":
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
    raise ValueError(f"unknown ListOps operator {operator!r}; choose one of {', '.join(OPERATORS)}")


def max_tokens(max_depth: int, max_args: int) -> int:
    """The longest expression the grammar allows: every operator has ``max_args`` arguments and
    every argument above level ``max_depth`` is an expression."""
    tokens = 3 + max_args  # one operator over digits
    for _ in range(max_depth - 1):
        tokens = 3 + max_args * tokens
    return tokens


class ListOpsExamples(NamedTuple):
    """Tokenised expressions, padded at the end with ``PAD``.

    Attributes:
        input_ids: (N, max_length) int64 token ids (``VOCAB``).
        attention_mask: (N, max_length) int64, 1 at the expression's tokens.
        labels: (N,) int64, the value of each expression (0–9).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def listops_examples(
    count: int, *, seed: int, max_depth: int = 10, max_args: int = 10, min_length: int = 500, max_length: int = 2000
) -> ListOpsExamples:
    """``count`` random ListOps expressions and their values, drawn from ``seed`` alone.

    Args:
        count: expressions to draw (N).
        seed: seeds a private ``random.Random``; the global RNGs are not touched.
        max_depth: levels of operators at most (1: an operator over digits).
        max_args: arguments per operator at most (each has 2 to ``max_args``).
        min_length, max_length: tokens per expression (brackets, operators and digits). The
            defaults are LRA's (max_depth 10, max_args 10, 500–2,000).

    Returns:
        ``ListOpsExamples`` of (N, max_length) tokens; the length of each expression is
        drawn uniformly from ``[min_length, max_length]`` (up to 3 tokens more where the last
        step nests, never above ``max_length``).

    Raises:
        ValueError: a negative ``count``, ``max_depth`` < 1, ``max_args`` < 2, ``min_length`` < 5
            (the shortest expression, ``[ OP d d ]``), ``min_length`` > ``max_length``, or a
            ``min_length`` the grammar cannot reach at this depth and arity (or, in a narrow
            range, cannot hit: see ``_draw_tree``).
        TypeError: a size that is not an int.
    """
    _check_settings(count, max_depth, max_args, min_length, max_length)
    rng = random.Random(seed)
    input_ids = np.full((count, max_length), PAD, dtype=np.int64)
    labels = np.empty(count, dtype=np.int64)
    for row in range(count):
        children = _draw_tree(rng, max_depth, max_args, min_length, max_length)
        tokens: list[int] = []
        labels[row] = _write(0, children, rng, tokens)
        input_ids[row, : len(tokens)] = tokens
    ids = torch.from_numpy(input_ids)
    return ListOpsExamples(ids, (ids != PAD).long(), torch.from_numpy(labels))


def _check_settings(count: int, max_depth: int, max_args: int, min_length: int, max_length: int) -> None:
    names = ("count", "max_depth", "max_args", "min_length", "max_length")
    for name, value in zip(names, (count, max_depth, max_args, min_length, max_length)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1 (one operator over digits), got {max_depth}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2 (an operator takes 2 to max_args arguments), got {max_args}")
    if min_length < _MIN_TOKENS:
        raise ValueError(f"min_length must be >= {_MIN_TOKENS} (the shortest expression, [ OP d d ]), got {min_length}")
    if min_length > max_length:
        raise ValueError(f"min_length {min_length} is above max_length {max_length}; give min_length <= max_length")
    longest = max_tokens(max_depth, max_args)
    if min_length > longest:
        raise ValueError(
            f"min_length {min_length} is above the {longest} tokens of the longest expression with max_depth "
            f"{max_depth} and max_args {max_args}; raise max_depth or max_args, or lower min_length"
        )


def _draw_tree(rng: random.Random, max_depth: int, max_args: int, min_length: int, max_length: int) -> list[list[int]]:
    """A tree of ``min_length`` to ``max_length`` tokens (``_grow``) towards a length drawn
    uniformly in that range; a tree that stops short of ``min_length`` (only possible when lengths
    leap by 4, with ``max_args`` = 2, or in a range narrower than 4) is drawn again.

    Raises:
        ValueError: ``_MAX_DRAWS`` trees in a row fell short.
    """
    for _ in range(_MAX_DRAWS):
        children, length = _grow(rng, rng.randint(min_length, max_length), max_depth, max_args, max_length)
        if length >= min_length:
            return children
    raise ValueError(
        f"no expression of {min_length} to {max_length} tokens in {_MAX_DRAWS} draws with max_depth {max_depth} "
        f"and max_args {max_args} (nesting adds 4 tokens at a time, and with max_args 2 only nesting grows a tree); "
        f"widen [min_length, max_length] or raise max_args"
    )


def _grow(
    rng: random.Random, target: int, max_depth: int, max_args: int, max_length: int
) -> tuple[list[list[int]], int]:
    """A random expression tree of at least ``target`` tokens where the grammar and
    ``max_length`` allow it, and its length in tokens: ``children[n]`` lists the arguments of
    operator n (node 0 the root), each a node id or ``_DIGIT``."""
    children = [[_DIGIT, _DIGIT]]
    depth = [1]
    nestable = [(0, 0), (0, 1)] if max_depth > 1 else []  # digits that may become expressions
    open_nodes = [0] if max_args > 2 else []  # operators that may take another argument
    length = _MIN_TOKENS
    while length < target:
        can_nest = bool(nestable) and length + 4 <= max_length
        if open_nodes and not (can_nest and rng.random() < NEST_PROBABILITY):
            i = rng.randrange(len(open_nodes))
            node = open_nodes[i]
            children[node].append(_DIGIT)
            if depth[node] < max_depth:
                nestable.append((node, len(children[node]) - 1))
            if len(children[node]) == max_args:
                open_nodes[i] = open_nodes[-1]
                open_nodes.pop()
            length += 1
        elif can_nest:
            i = rng.randrange(len(nestable))
            parent, slot = nestable[i]
            nestable[i] = nestable[-1]
            nestable.pop()
            node = len(children)
            children[parent][slot] = node
            children.append([_DIGIT, _DIGIT])
            depth.append(depth[parent] + 1)
            if depth[node] < max_depth:
                nestable += [(node, 0), (node, 1)]
            if max_args > 2:
                open_nodes.append(node)
            length += 4
        else:  # nothing fits: the tree is as large as max_depth, max_args and max_length allow
            break
    return children, length


def _write(node: int, children: list[list[int]], rng: random.Random, tokens: list[int]) -> int:
    """Append operator ``node``'s expression to ``tokens``, drawing its operator, its digits and
    the order of its arguments (every operator is symmetric, so the order carries no
    information), and return its value."""
    operator = rng.randrange(len(OPERATORS))
    tokens += (OPEN, _OPERATOR_IDS[operator])
    arguments = children[node][:]
    rng.shuffle(arguments)
    values = []
    for argument in arguments:
        if argument == _DIGIT:
            value = rng.randrange(10)
            tokens.append(DIGITS[value])
        else:
            value = _write(argument, children, rng, tokens)
        values.append(value)
    tokens.append(CLOSE)
    return apply_operator(OPERATORS[operator], values)


def decode(input_ids: torch.Tensor | list[int]) -> str:
    """One tokenised example as text ("[ MAX 4 [ MIN 7 2 ] ]"), without its padding.

    Args:
        input_ids: (max_length,) token ids, as a row of ``ListOpsExamples.input_ids``.
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    return " ".join(VOCAB[i] for i in ids if i != PAD)


@dataclasses.dataclass(frozen=True)
class ListOpsConfig(common.RecipeConfig):
    """A ListOps run (the shared settings are ``common.RecipeConfig``'s).

    Attributes:
        min_length, max_length, max_depth, max_args: the expressions (``listops_examples``).
        train_size: expressions to train on (drawn once; ``max_steps · batch_size`` larger
            than this makes several passes). eval_size: held-out expressions, drawn after the
            training ones from the same seed.
        hidden_size, num_layers, num_heads, intermediate_size: the BERT encoder (head size
            hidden_size / num_heads), read through mean pooling (``ListOpsClassifier``).
        dropout: dropout of the hidden states; attention dropout is 0 for every method, since
            YOSO and SimHash have no attention probabilities to drop.
        eval_methods: the methods the trained model is evaluated with (None: dense and the
            training method); each is put in every layer.
    """

    method: Method | str | None = "yoso:num_bits=11"
    min_length: int = 500
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10
    train_size: int = 96_000
    eval_size: int = 2000
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    dropout: float = 0.1
    eval_methods: tuple[str, ...] | None = None
    max_steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.2
    eval_steps: int = 500
    save_steps: int = 1000


class ListOpsClassifier(BertPreTrainedModel):
    """A BERT encoder (no pooler) whose outputs, averaged over each expression's tokens (mean
    pooling), feed a linear classifier over the ``num_labels`` values.

    ``forward(input_ids, attention_mask=None, labels=None)``: input_ids and attention_mask
    (B, T), labels (B,); returns a ``SequenceClassifierOutput`` with logits (B, num_labels) and,
    given labels, the mean cross-entropy as its loss. Its attention goes through transformers'
    registry, so ``lshattn.hf.use`` drives it like any BERT.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, hidden)
        pooled = hf.mean_pool(hidden, attention_mask, normalize=False)  # (B, hidden)
        logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


def build_model(config: ListOpsConfig) -> ListOpsClassifier:
    """A new ``ListOpsClassifier`` over ``VOCAB`` with ``CLASSES`` outputs (weights from torch's
    global RNG: seed it first).

    Raises:
        ValueError: ``num_heads`` does not divide ``hidden_size``.
    """
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}; "
            f"give a hidden_size divisible by the number of heads"
        )
    bert = BertConfig(
        vocab_size=len(VOCAB), hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=0.0,
        max_position_embeddings=config.max_length, type_vocab_size=1, pad_token_id=PAD, num_labels=CLASSES,
    )  # fmt: skip
    return ListOpsClassifier(bert)


def _dataset(examples: ListOpsExamples) -> torch.utils.data.Dataset:
    """Rows as ``{"input_ids", "attention_mask", "labels"}`` for ``default_data_collator``."""
    return torch.utils.data.StackDataset(**examples._asdict())


def _accuracy(prediction: Any) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(prediction.label_ids)).mean())}


def _eval_methods(config: ListOpsConfig, method: Any) -> dict[str, Any]:
    """The evaluation methods by label: the configured ones, or dense and the training method."""
    given = config.eval_methods if config.eval_methods is not None else ("dense", common.method_label(method))
    return {common.method_label(spec): spec for spec in map(common.resolve_method, given)}


def train_listops(config: ListOpsConfig, out: str | Path) -> dict[str, Any]:
    """Train on ListOps, evaluate the trained model with each of ``config.eval_methods`` on
    held-out expressions, write ``metrics.json``, ``report.md`` and ``loss.png`` into ``out``,
    and return the metrics (``evaluated_with[label]`` holds ``accuracy`` and ``loss``).

    A bad setting (a method that cannot train, expressions out of range, heads that do not
    divide the hidden size) fails before training starts.
    """
    from transformers import Trainer, default_data_collator, set_seed

    out = Path(out)
    method = common.resolve_method(config.method)
    eval_methods = _eval_methods(config, method)
    set_seed(config.seed)
    model = build_model(config)
    examples = listops_examples(
        config.train_size + config.eval_size, seed=config.seed, max_depth=config.max_depth,
        max_args=config.max_args, min_length=config.min_length, max_length=config.max_length,
    )  # fmt: skip
    train_set = _dataset(ListOpsExamples(*(x[: config.train_size] for x in examples)))
    eval_set = _dataset(ListOpsExamples(*(x[config.train_size :] for x in examples)))
    common.use_method(model, method, None, config.seed, from_scratch=True)

    trainer = Trainer(
        model=model,
        args=common.training_arguments(config, out),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        compute_metrics=_accuracy,
        callbacks=[common.StepCallback()] if method is not None else [],
    )
    result, seconds = common.run_trainer(trainer, config, out)

    evaluations = common.evaluate_with(trainer, eval_methods, method, None, config.seed, from_scratch=True)

    held_out = examples.labels[config.train_size :]
    trained = common.method_label(method)
    metrics = {
        "recipe": "listops",
        "trained_with": trained,
        "config": {**dataclasses.asdict(config), "method": trained},
        "train_size": config.train_size,
        "eval_size": config.eval_size,
        "mean_length": float(examples.attention_mask.sum(1).float().mean()),
        "majority": float(torch.bincount(held_out, minlength=CLASSES).max() / max(1, len(held_out))),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": seconds,
        "evaluated_with": evaluations,
        "environment": common.environment(),
    }
    common.write_outputs(out, metrics, _report(metrics), trainer.state.log_history, f"ListOps, {trained}")
    return metrics


def _report(metrics: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {label} | {s['accuracy']:.3f} | {s['loss']:.3f} |" for label, s in metrics["evaluated_with"].items()
    )
    config = metrics["config"]
    return f"""# ListOps (Long Range Arena)

Expressions of {config["min_length"]} to {config["max_length"]} tokens (mean {metrics["mean_length"]:.0f}),
max_depth {config["max_depth"]}, max_args {config["max_args"]}; a {config["num_layers"]}-layer BERT
(hidden {config["hidden_size"]}, {config["num_heads"]} heads, feed-forward {config["intermediate_size"]}, mean
pooling) trained from scratch with **{metrics["trained_with"]}**, {metrics["steps"]} steps of
{config["batch_size"]} on {metrics["train_size"]} expressions in {metrics["seconds"] / 60:.1f} min
({metrics["environment"]["device"]}).

Held-out accuracy ({metrics["eval_size"]} expressions; the most frequent value is {metrics["majority"]:.1%} of them)
with each attention at evaluation:

| evaluated with | accuracy | loss |
|---|---|---|
{rows}
"""
