"""lshattn reproduce bert-lsh: pretraining then fine-tuning from the pretrained checkpoint, the
report, resuming, and the settings (seconds: tiny models on the Bible)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.reproduce needs transformers (pip install 'lshattn[train]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")

from lshattn import cli, data  # noqa: E402
from lshattn.reproduce import bert_lsh, common  # noqa: E402
from lshattn.train import mlm, models  # noqa: E402
from lshattn.train.common import method_label  # noqa: E402
from assets import or_skip  # noqa: E402

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread gains nothing and waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pretraining(config: mlm.MLMConfig) -> mlm.MLMConfig:
    return dataclasses.replace(
        config, seq_len=32, hidden_size=32, intermediate_size=64, sources=("bible",), train_sequences=32,
        eval_sequences=8, max_steps=2, eval_steps=2, save_steps=2, batch_size=8,
    )  # fmt: skip


def tiny_finetuning(config):
    return dataclasses.replace(
        config, max_length=32, train_size=16, eval_size=8, max_steps=2, eval_steps=2, save_steps=2, batch_size=8
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    """``--quick`` shrunk to 2 steps of tiny models (the patch lasts for this module's tests)."""
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    tokenizer = models.minilm_tokenizer()
    or_skip(lambda: mlm.tokenized_documents("bible", tokenizer))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bert_lsh, "quick_pretrain", tiny_pretraining)
        patch.setattr(common, "quick_config", tiny_finetuning)
        yield


@pytest.fixture(scope="module")
def reproduced(tiny, tmp_path_factory):
    """One tiny reproduction through the command line: its folder and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bert-lsh")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["reproduce", "bert-lsh", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, printed.getvalue()


def test_pretrains_fine_tunes_from_each_checkpoint_reports_and_resumes(reproduced, capsys):
    tmp_path, out = reproduced
    assert "[3/3] SimHash sparse, seed 0: training" in out and "report:" in out

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    pretraining = metrics["pretraining"]
    assert set(pretraining) == set(bert_lsh.METHODS)
    for title, method in bert_lsh.METHODS.items():
        folder = bert_lsh.FOLDERS[title]
        assert pretraining[title]["method"] == method_label(method)
        assert pretraining[title]["steps"] == 2 and len(pretraining[title]["budget_per_layer"]) == 2
        # fine-tuned from its own pretraining's final checkpoint, with its own attention
        tuned = json.loads((tmp_path / folder / "seed0" / "metrics.json").read_text())
        checkpoint = tmp_path / f"pretrain-{folder}" / "seed0" / "checkpoints" / "checkpoint-2"
        assert tuned["config"]["model"] == str(checkpoint)
        assert tuned["trained_with"] == method_label(method)
        assert set(tuned["evaluated_with"]) == {method_label(m) for m in bert_lsh.METHODS.values()}
    assert pretraining["dense"]["budget_per_layer"] == [1.0, 1.0]
    assert all(0 < b < 1 for b in pretraining["SimHash sparse"]["budget_per_layer"])

    report = (tmp_path / "report.md").read_text()
    assert "| SimHash faithful (BERT-LSH's) | 76.0 (SST-2, GLUE dev) |" in report
    assert "## Pretraining: masked language modelling at matched steps (2 steps, held out)" in report
    assert "(paper 5.331)" in report and "| --quick |" in report
    assert (tmp_path / "pretraining.png").stat().st_size > 0

    argv = ["reproduce", "bert-lsh", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0  # again: the pretrainings and the fine-tunings are read back
    assert capsys.readouterr().out.count("done before") == 6


def test_the_fine_tuned_model_starts_from_the_pretrained_encoder(reproduced):
    """``FinetuneConfig.model``: every encoder weight of the checkpoint is loaded; the head is new."""
    from transformers import BertForMaskedLM

    tmp_path, _ = reproduced
    checkpoint = tmp_path / "pretrain-dense" / "seed0" / "checkpoints" / "checkpoint-2"
    pretrained = BertForMaskedLM.from_pretrained(checkpoint).bert.state_dict()
    classifier = models.minilm_classifier(["fresh", "rotten"], checkpoint)
    loaded = classifier.bert.state_dict()
    encoder = [name for name in pretrained if not name.startswith("pooler")]
    assert encoder and all(torch.equal(loaded[name], pretrained[name]) for name in encoder)
    assert classifier.classifier.out_features == 2


def test_a_missing_final_checkpoint_says_how_to_pretrain_again(reproduced, tmp_path):
    shutil.copytree(reproduced[0], tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "pretrain-simhash" / "seed0" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="delete .*pretrain-simhash/seed0 to pretrain again"):
        bert_lsh.reproduce(tmp_path, quick=True, seeds=(0,), progress=False)


def test_a_model_folder_without_a_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.minilm_classifier(["a", "b"], tmp_path)


def test_the_full_settings_are_matched_and_fit_the_data():
    """The pretrainings differ in their attention only; the fine-tuning fits the model's
    positions and the 1,936 Rotten Tomatoes documents; every row reads an evaluation that runs."""
    pretraining = bert_lsh.pretraining_runs()
    settings = [{**dataclasses.asdict(run.config), "method": None} for run in pretraining]
    assert all(s == settings[0] for s in settings)
    assert [method_label(run.config.method) for run in pretraining] == [
        method_label(m) for m in bert_lsh.METHODS.values()
    ]
    tuning = bert_lsh.finetuning_runs({title: f"ckpt-{title}" for title in bert_lsh.METHODS})
    for run in tuning:
        assert run.config.max_length <= bert_lsh.PRETRAIN.seq_len
        assert run.config.train_size + run.config.eval_size <= 1936
        assert run.config.model == f"ckpt-{run.label}" and run.config.method == bert_lsh.METHODS[run.label]
    labels = {method_label(m) for m in bert_lsh.FINETUNE.eval_methods}
    assert {method_label(row.evaluated_with) for row in bert_lsh.ROWS} <= labels
    assert {row.run for row in bert_lsh.ROWS} <= {run.name for run in tuning}
