"""lshattn.train: the shared pieces and the fine-tuning recipe, on the real MiniLM and RT data
with tiny sizes (seconds each)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.train needs transformers (pip install 'lshattn[train]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")

import lshattn  # noqa: E402
from lshattn import cli, data  # noqa: E402
from lshattn import train  # noqa: E402
from lshattn.train import common, models, tasks  # noqa: E402
from lshattn.train.finetune import FinetuneConfig  # noqa: E402
from assets import or_skip  # noqa: E402

pytestmark = pytest.mark.hf

SMYRF = "smyrf:num_hashes=1,q_cluster_size=16,k_cluster_size=16"


def tiny(**overrides) -> FinetuneConfig:
    settings = dict(
        method=SMYRF, max_length=32, train_size=32, eval_size=16, max_steps=4, eval_steps=2, save_steps=2,
        batch_size=8, learning_rate=1e-4, progress=False,
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny fine-tuning run shared by the tests that read its outputs."""
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    out = tmp_path_factory.mktemp("finetune")
    return out, train.finetune(tiny(), out)


def test_finetune_writes_its_outputs_and_evaluates_with_each_method(run):
    out, metrics = run
    for name in ("metrics.json", "report.md", "loss.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert set(metrics["evaluated_with"]) == {"dense", "smyrf:num_hashes=1,q_cluster_size=16,k_cluster_size=16"}
    for scores in metrics["evaluated_with"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["loss"] > 0
    assert metrics["budget"] == pytest.approx(0.5)  # 16 keys of 32
    assert "| dense |" in (out / "report.md").read_text()


def test_resume_continues_from_the_last_checkpoint(run, tmp_path):
    out, _ = run
    assert common.last_checkpoint(out).endswith("checkpoint-4")
    metrics = train.finetune(tiny(max_steps=6, resume=True), out)
    assert metrics["steps"] == 6


def test_resume_without_a_checkpoint_says_so(tmp_path):
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*run without --resume"):
        train.finetune(tiny(resume=True), tmp_path)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(task="sst2"), ValueError, "unknown task 'sst2'; choose one of bbc, rt"),
        (dict(max_length=600), ValueError, "600 tokens is above the model's 512 position embeddings.*extend_positions"),
        (dict(layers=(9,)), ValueError, r"layer indices \[9\] are out of range"),
        (dict(method="smyrf:num_hashes=0"), ValueError, "num_hashes must be >= 1"),
        (dict(eval_methods=("nope",)), ValueError, "unknown method 'nope'"),
    ],
    ids=["task", "length", "layers", "method", "eval-method"],
)
def test_bad_settings_fail_before_training(tmp_path, overrides, error, message):
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    with pytest.raises(error, match=message):
        train.finetune(tiny(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_method_without_a_gradient_cannot_train():
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Frozen(lshattn.Dense):
        name: ClassVar[str] = ""

        def _attend(self, inputs):
            out, aux = super()._attend(inputs)
            return out.detach(), aux

    with pytest.raises(ValueError, match="gives no gradient .* cannot train"):
        common.resolve_method(Frozen())


def test_step_callback_puts_the_trainer_step_on_the_model():
    from transformers import BertConfig, BertModel, TrainerControl, TrainerState, TrainingArguments

    from lshattn import hf

    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))  # fmt: skip
    hf.use(model, lshattn.SMYRF(num_hashes=1, q_cluster_size=4, k_cluster_size=4))
    state = TrainerState()
    state.global_step = 7
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback = common.StepCallback()
    callback.on_step_begin(args, state, TrainerControl(), model=model)
    ids = torch.randint(0, 50, (1, 8))
    model.train()
    stepped = model(ids).last_hidden_state
    hf.set_step(model, 7)
    torch.testing.assert_close(model(ids).last_hidden_state, stepped, rtol=0, atol=0)
    hf.set_step(model, 8)
    assert not torch.equal(model(ids).last_hidden_state, stepped)


def test_extend_positions_tiles_them():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 vocab_size=50, max_position_embeddings=8))  # fmt: skip
    table = model.embeddings.position_embeddings.weight.detach().clone()
    models.extend_positions(model, 20)
    assert model.config.max_position_embeddings == 20
    torch.testing.assert_close(model.embeddings.position_embeddings.weight[8:16], table)
    assert model(torch.randint(0, 50, (2, 20))).last_hidden_state.shape == (2, 20, 16)


def test_check_length_names_the_fix():
    with pytest.raises(ValueError, match="extend_positions"):
        tasks.check_length(1024, 512, "--max-length")


def test_cli_runs_the_recipe(tmp_path, capsys):
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    code = cli.main([
        "train", "finetune", "--out", str(tmp_path), "--method", "dense", "--max-length", "32", "--train-size", "16",
        "--eval-size", "8", "--max-steps", "2", "--eval-steps", "2", "--save-steps", "2", "--batch-size", "8",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0 and "report:" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["trained_with"] == "dense"


def test_cli_reports_bad_settings(tmp_path, capsys):
    code = cli.main(["train", "finetune", "--out", str(tmp_path), "--task", "imdb", "--no-progress"])
    assert code == 1 and "unknown task 'imdb'" in capsys.readouterr().err


def test_bf16_mixed_precision_trains(tmp_path):
    """Trainer's bf16 on the CPU: autocast around the model; the method computes in float32
    inside (see test_autocast_changes_nothing_inside_a_method) and the loss stays finite."""
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    metrics = train.finetune(tiny(bf16=True, max_steps=2, eval_steps=2, eval_methods=(SMYRF,)), tmp_path)
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert torch.isfinite(torch.tensor(metrics["evaluated_with"][SMYRF]["loss"]))


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues(tmp_path):
    """An interrupted run stops with a message naming the last checkpoint (written every
    save_steps), and resume=True continues from it to the end."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": i % 2} for i in range(32)]
    dataset = tasks.TokenizedDataset(examples)
    settings = common.RecipeConfig(method=None, max_steps=4, batch_size=4, eval_steps=2, save_steps=2, progress=False)

    def trainer(config, callbacks):
        model = BertForSequenceClassification(BertConfig(**config.to_dict()))
        return Trainer(model=model, args=common.training_arguments(settings, tmp_path, eval_strategy="no"),
                       train_dataset=dataset, callbacks=callbacks)  # fmt: skip

    with pytest.raises(KeyboardInterrupt, match="checkpoint-2; continue with --resume"):
        common.run_trainer(trainer(config, [Interrupt()]), settings, tmp_path)
    import dataclasses

    result, _ = common.run_trainer(trainer(config, []), dataclasses.replace(settings, resume=True), tmp_path)
    assert result.global_step == 4


@pytest.mark.parametrize("accumulate", [2, 4])
def test_gradient_accumulation_trains_like_one_large_batch(tmp_path, accumulate):
    """With the loss declared a batch mean, a step over ``accumulate`` micro-batches of 8 / n
    moves the weights as one batch of 8 (Trainer would otherwise not divide a **kwargs model's
    loss by the accumulation steps)."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer

    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    dataset = tasks.TokenizedDataset(
        [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": i % 2} for i in range(8)]
    )
    settings = common.RecipeConfig(method=None, max_steps=1, batch_size=8, warmup_ratio=0.0, progress=False)

    def one_step(batch_size, steps):
        torch.manual_seed(0)
        model = common.loss_is_a_batch_mean(BertForSequenceClassification(config))
        args = common.training_arguments(
            settings, tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=steps,
            eval_strategy="no", save_strategy="no", lr_scheduler_type="constant", max_grad_norm=0.0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=dataset).train()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(one_step(8 // accumulate, accumulate), one_step(8, 1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("task", ["rt", "bbc"])
def test_the_default_splits_fit_each_task(task):
    """`lshattn train finetune` with its defaults asked Rotten Tomatoes for 2,000 + 500 texts,
    which it does not have (1,936)."""
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes if task == "rt" else data.bbc_news)
    defaults = FinetuneConfig()
    task_data, _ = tasks.load_task(
        task, models.minilm_tokenizer(), max_length=None, train=defaults.train_size, test=defaults.eval_size, seed=0
    )
    assert (len(task_data.train_texts), len(task_data.test_texts)) == (defaults.train_size, defaults.eval_size)
