"""The duplication task (lshattn.train.synthetic) and ``lshattn reproduce reformer``: the
generator, the labels and the metric on hand-made examples, and a tiny reproduction end to end."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.train needs transformers (pip install 'lshattn[train]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")

from lshattn import reproduce  # noqa: E402
from lshattn.reproduce import reformer  # noqa: E402
from lshattn.train import synthetic  # noqa: E402
from lshattn.train.synthetic import IGNORE, copy_accuracy, duplication_labels, duplication_sequences  # noqa: E402


def test_sequences_are_zero_w_zero_w():
    seqs = duplication_sequences(50, half_length=6, vocab_size=5, seed=3)
    assert seqs.shape == (50, 12) and seqs.dtype == torch.long
    assert (seqs[:, 0] == 0).all() and (seqs[:, 6] == 0).all()
    words = seqs[:, 1:6]
    assert torch.equal(seqs[:, 7:], words)
    assert words.min() >= 1 and words.max() <= 4
    assert set(words.unique().tolist()) == {1, 2, 3, 4}  # every symbol is drawn


def test_sequences_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first = duplication_sequences(8, half_length=10, vocab_size=20, seed=0)
    assert torch.equal(first, duplication_sequences(8, half_length=10, vocab_size=20, seed=0))
    assert not torch.equal(first, duplication_sequences(8, half_length=10, vocab_size=20, seed=1))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(half_length=1, vocab_size=5), "half_length must be >= 2"),
        (dict(half_length=4, vocab_size=1), "vocab_size must be >= 2"),
    ],
)
def test_sequences_refuse_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        duplication_sequences(2, seed=0, **kwargs)


def test_labels_score_only_the_second_copy():
    seqs = duplication_sequences(3, half_length=4, vocab_size=9, seed=0)
    labels = duplication_labels(seqs, 4)
    assert (labels[:, :5] == IGNORE).all()
    assert torch.equal(labels[:, 5:], seqs[:, 1:4])
    with pytest.raises(ValueError, match="pass the half_length they were drawn with"):
        duplication_labels(seqs, 5)


def test_copy_accuracy_on_a_hand_made_example():
    # half_length 3: "0 a b 0 a b"; the scored tokens are positions 4 and 5, predicted at 3 and 4.
    labels = torch.tensor([[IGNORE] * 4 + [1, 2], [IGNORE] * 4 + [3, 3]])
    predictions = torch.tensor(
        [
            [9, 9, 9, 1, 2, 9],  # both right (the guesses at 0-2 and 5 are not scored)
            [9, 9, 9, 3, 1, 9],  # one of two right
        ]
    )
    scores = copy_accuracy(predictions, labels)
    assert scores["accuracy"] == pytest.approx(3 / 4)
    assert scores["sequence_accuracy"] == pytest.approx(1 / 2)
    assert copy_accuracy(predictions.numpy(), labels.numpy()) == scores


def test_the_reproduction_is_registered_and_its_table_has_every_cell_of_the_papers():
    assert reproduce.load("reformer") is reformer
    assert len(reformer.ROWS) == 4 * 5
    assert [run.name for run in reformer.runs()] == ["full", "lsh4", "lsh2", "lsh1"]
    # Runs over 10 minutes a seed train seed 0 only; those under, 3 seeds.
    assert [run.seeds for run in reformer.runs()] == [(0,), (0,), None, None]
    assert all(run.config.eval_methods == tuple(reformer.METHODS.values()) for run in reformer.runs(quick=True))


def test_a_tiny_reproduction_writes_its_report_and_the_cross_table(tmp_path, monkeypatch):
    length = 16
    methods = {"full": reformer.full_attention(length)}
    methods |= {f"LSH-{r}": reformer.lsh(r, length, 4) for r in (8, 4, 2, 1)}
    tiny = dataclasses.replace(
        reformer.FULL, half_length=length // 2, vocab_size=8, hidden_size=16, num_heads=2, max_steps=3, batch_size=4,
        eval_steps=3, save_steps=3, eval_size=8, eval_methods=tuple(methods.values()),
    )  # fmt: skip
    monkeypatch.setattr(reformer, "METHODS", methods)
    row = reformer.Row("trained LSH-1, evaluated LSH-1", "77.9", "lsh1", methods["LSH-1"])
    monkeypatch.setattr(reformer, "ROWS", [row])
    monkeypatch.setattr(reformer, "FULL", tiny)
    monkeypatch.setattr(reformer, "quick_config", lambda config: config)
    metrics = reformer.reproduce(tmp_path, quick=True, seeds=(0,), progress=False)

    report = (tmp_path / "report.md").read_text()
    assert "| trained with ↓ / evaluated with → | full | LSH-8 | LSH-4 | LSH-2 | LSH-1 |" in report
    assert "| LSH-4 | 0.8 | 100.0 | 99.9 | 99.4 | 91.9 |" in report  # the paper's table beside ours
    assert "| --quick |" in report and "Quick run" in report
    assert set(metrics["interchange"]) == {"full", "lsh4", "lsh2", "lsh1"}
    seed = json.loads((tmp_path / "lsh1" / "seed0" / "metrics.json").read_text())
    label = synthetic.common.method_label
    assert seed["steps"] == 3 and seed["trained_with"] == label(methods["LSH-1"])
    assert set(seed["evaluated_with"]) == {label(m) for m in methods.values()}
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in seed["evaluated_with"].values())
    assert (tmp_path / "lsh1" / "seed0" / "report.md").is_file() and (tmp_path / "accuracy.png").is_file()
