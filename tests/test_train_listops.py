"""ListOps (lshattn.train.listops): every generated expression is checked against the grammar
and evaluated by an independent parser here; the lengths and labels are spread as the generator
says; the recipe masks padding and runs end to end on a tiny model (seconds)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
from collections import Counter

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.train needs transformers (pip install 'lshattn[train]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")

from hypothesis import given
from hypothesis import strategies as st

from lshattn.train import common
from lshattn.train.listops import (
    PAD,
    ListOpsConfig,
    apply_operator,
    build_model,
    decode,
    listops_examples,
    max_tokens,
    train_listops,
)

DIGIT_TEXT = {str(d) for d in range(10)}


def evaluate(text: str) -> tuple[int, int, list[int]]:
    """Parse one expression written as text, checking the grammar as it goes, and return its
    value, its depth (levels of operators) and the number of arguments of each operator."""
    tokens = text.split()
    arities: list[int] = []

    def expression(at: int) -> tuple[int, int, int]:  # value, depth, position after it
        assert tokens[at] == "[", f"an expression opens with '[', found {tokens[at]!r} at {at}"
        operator = tokens[at + 1]
        at += 2
        values, depth = [], 1
        while tokens[at] != "]":
            if tokens[at] == "[":
                value, inner, at = expression(at)
                depth = max(depth, inner + 1)
            else:
                assert tokens[at] in DIGIT_TEXT, f"an argument is a digit or an expression, found {tokens[at]!r}"
                value, at = int(tokens[at]), at + 1
            values.append(value)
        arities.append(len(values))
        rules = {
            "MIN": min,
            "MAX": max,
            "MED": lambda v: int(statistics.median(v)),  # the mean of the middle two, floored
            "SM": lambda v: sum(v) % 10,
        }
        return rules[operator](values), depth, at + 1

    value, depth, end = expression(0)
    assert end == len(tokens), "tokens after the outermost expression"
    return value, depth, arities


@st.composite
def settings(draw):
    max_depth = draw(st.integers(1, 6))
    max_args = draw(st.integers(3, 10))
    min_length = draw(st.integers(5, min(200, max_tokens(max_depth, max_args))))
    max_length = draw(st.integers(min_length + 3, min_length + 200))
    return {"max_depth": max_depth, "max_args": max_args, "min_length": min_length, "max_length": max_length}


@given(settings(), st.integers(0, 2**32), st.integers(1, 12))
def test_expressions_follow_the_grammar_and_are_labelled_with_their_value(sizes, seed, count):
    examples = listops_examples(count, seed=seed, **sizes)
    assert examples.input_ids.shape == examples.attention_mask.shape == (count, sizes["max_length"])
    assert examples.labels.shape == (count,)
    for ids, mask, label in zip(*examples):
        length = int(mask.sum())
        assert sizes["min_length"] <= length <= sizes["max_length"]
        assert torch.equal(mask, (ids != PAD).long())
        assert (ids[:length] != PAD).all() and (ids[length:] == PAD).all()  # padding only at the end
        text = decode(ids)
        assert len(text.split()) == length
        value, depth, arities = evaluate(text)
        assert value == label
        assert depth <= sizes["max_depth"]
        assert all(2 <= n <= sizes["max_args"] for n in arities)


def test_the_seed_alone_decides_and_the_global_generators_are_left_alone():
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = listops_examples(20, seed=5, min_length=30, max_length=60)
    again = listops_examples(20, seed=5, min_length=30, max_length=60)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.input_ids, listops_examples(20, seed=6, min_length=30, max_length=60).input_ids)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]


def test_lengths_spread_uniformly_over_the_range():
    low, high = 100, 300
    lengths = listops_examples(1500, seed=0, min_length=low, max_length=high).attention_mask.sum(1).float()
    assert lengths.min() >= low and lengths.max() <= high
    # Uniform on [low, high], plus at most 3 tokens of overshoot: the mean within 5 standard
    # errors of the midpoint, and every tenth of the range holds some expressions.
    standard_error = (high - low) / 12**0.5 / len(lengths) ** 0.5
    assert abs(lengths.mean() - (low + high) / 2 - 1.5) < 5 * standard_error + 1.5
    tenths = torch.histc(lengths, bins=10, min=low, max=high + 1)
    assert (tenths > len(lengths) / 10 / 2).all()


def test_labels_cover_every_value_and_sum_mod_10_is_uniform():
    from scipy.stats import chisquare

    examples = listops_examples(3000, seed=1, min_length=50, max_length=150)
    counts = torch.bincount(examples.labels, minlength=10)
    assert (counts > 0).all() and counts.max() < len(examples.labels) / 3  # no value dominates
    roots = [decode(ids).split()[1] for ids in examples.input_ids]
    sums = [int(label) for root, label in zip(roots, examples.labels) if root == "SM"]
    assert chisquare(np.bincount(sums, minlength=10)).pvalue > 1e-3  # a sum of random digits mod 10
    assert set(Counter(roots)) == {"MIN", "MAX", "MED", "SM"}


def test_the_longest_expression_fills_every_level_with_max_args_arguments():
    longest = max_tokens(3, 3)
    assert longest == 3 + 3 * (3 + 3 * (3 + 3))
    examples = listops_examples(5, seed=0, max_depth=3, max_args=3, min_length=longest, max_length=longest)
    for ids in examples.input_ids:
        _, depth, arities = evaluate(decode(ids))
        assert depth == 3 and arities == [3] * (1 + 3 + 9)


def test_with_two_arguments_an_expression_grows_by_nesting_alone():
    examples = listops_examples(50, seed=0, max_depth=10, max_args=2, min_length=20, max_length=60)
    lengths = examples.attention_mask.sum(1)
    assert ((lengths - 5) % 4 == 0).all() and lengths.min() >= 20 and lengths.max() <= 60
    with pytest.raises(ValueError, match="no expression of 6 to 8 tokens .* widen \\[min_length, max_length\\]"):
        listops_examples(1, seed=0, max_args=2, min_length=6, max_length=8)


def test_apply_operator():
    assert apply_operator("MED", [3, 9, 1]) == 3
    assert apply_operator("MED", [1, 9]) == 5 and apply_operator("MED", [1, 2, 7, 8]) == 4  # even: mean, floored
    assert apply_operator("SM", [9, 8, 7]) == 4
    assert apply_operator("MIN", [4, 2]) == 2 and apply_operator("MAX", [4, 2]) == 4
    with pytest.raises(ValueError, match="unknown ListOps operator 'SUM'; choose one of MIN, MAX, MED, SM"):
        apply_operator("SUM", [1, 2])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"count": -1}, ValueError, "count must be >= 0, got -1"),
        ({"count": 2.0}, TypeError, "count must be an int, got float"),
        ({"max_depth": True}, TypeError, "max_depth must be an int, got bool"),
        ({"max_depth": 0}, ValueError, "max_depth must be >= 1 .*, got 0"),
        ({"max_args": 1}, ValueError, "max_args must be >= 2 .*, got 1"),
        ({"min_length": 4}, ValueError, r"min_length must be >= 5 \(the shortest expression, \[ OP d d \]\), got 4"),
        ({"min_length": 50, "max_length": 40}, ValueError, "min_length 50 is above max_length 40; give min_length <="),
        (
            {"max_depth": 1, "max_args": 3, "min_length": 10, "max_length": 20},
            ValueError,
            "above the 6 tokens of the longest expression with max_depth 1 and max_args 3; raise max_depth or max_args",
        ),
    ],
    ids=["negative-count", "float-count", "bool-depth", "depth-0", "one-arg", "too-short", "min-above-max", "too-deep"],
)
def test_bad_settings_are_refused_with_the_fix(kwargs, error, message):
    settings = {"count": 1, "seed": 0, "min_length": 20, "max_length": 40} | kwargs
    with pytest.raises(error, match=message):
        listops_examples(settings.pop("count"), **settings)


TINY = ListOpsConfig(
    method="dense", min_length=12, max_length=31, max_depth=4, max_args=4, train_size=32, eval_size=16,
    hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_steps=3, batch_size=8, eval_steps=3,
    save_steps=3, learning_rate=1e-3, progress=False,
)  # fmt: skip

# Small enough settings that nothing is exact at 32 tokens.
METHODS = [
    "dense",
    "yoso:num_hashes=8,num_bits=4",
    "yoso:num_bits=4,expectation=True",
    "reformer:num_hashes=2,bucket_size=4,num_buckets=8",
    "smyrf:num_hashes=2,q_cluster_size=4,k_cluster_size=4",
    "simhash:num_bits=2",
]


@pytest.mark.parametrize("method", METHODS)
def test_padding_is_masked(method):
    """The encoder's outputs at an expression's tokens in a padded batch equal those of the
    expression alone, unpadded (without the mask they differ by 1e-3 or more)."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    common.use_method(model, common.resolve_method(method), None, seed=0, from_scratch=True)
    examples = listops_examples(3, seed=2, min_length=8, max_length=TINY.max_length, max_depth=3, max_args=4)
    lengths = examples.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really pads
    with torch.no_grad():
        hidden = model.bert(input_ids=examples.input_ids, attention_mask=examples.attention_mask).last_hidden_state
        logits = model(input_ids=examples.input_ids, attention_mask=examples.attention_mask).logits
        for row, length in enumerate(lengths.tolist()):
            ids = examples.input_ids[row : row + 1, :length]
            torch.testing.assert_close(hidden[row, :length], model.bert(input_ids=ids).last_hidden_state[0])
            torch.testing.assert_close(logits[row], model(input_ids=ids).logits[0])


def test_heads_must_divide_the_hidden_size():
    with pytest.raises(ValueError, match="hidden_size 16 is not a multiple of num_heads 3"):
        build_model(ListOpsConfig(hidden_size=16, num_heads=3))


def test_a_tiny_run_trains_evaluates_and_writes_its_report(tmp_path):
    config = dataclasses.replace(TINY, method=METHODS[1], eval_methods=("dense", METHODS[1], METHODS[2]))
    metrics = train_listops(config, tmp_path)
    label = common.method_label
    assert metrics["steps"] == 3 and metrics["trained_with"] == label(METHODS[1])
    assert set(metrics["evaluated_with"]) == {label(m) for m in ("dense", METHODS[1], METHODS[2])}
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in metrics["evaluated_with"].values())
    assert TINY.min_length <= metrics["mean_length"] <= TINY.max_length and 0.1 <= metrics["majority"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["max_length"] == TINY.max_length
    assert "ListOps" in (tmp_path / "report.md").read_text() and (tmp_path / "loss.png").is_file()
