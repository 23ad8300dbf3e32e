"""Model-level evaluation: sentence embeddings with a method swapped in, and zero-shot probes.

A probe is a logistic regression trained on the exact-attention embeddings of a training split
and then tested, unchanged, on each method's embeddings of a test split: it measures how much of
what a downstream classifier relies on survives the swap, with no retraining anywhere.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lshattn.api import Method

__all__ = ["embed", "Task", "rotten_tomatoes_task", "bbc_task", "probe_accuracy"]


def embed(
    model: Any, tokenizer: Any, texts: Sequence[str], *, method: Method | None = None, max_length: int,
    batch_size: int, seed: int = 0, desc: str = "embedding", progress: bool = True, tally: Any = None,
) -> Tensor:  # fmt: skip
    """Mean-pooled, L2-normalised sentence embeddings `(N, hidden)` with ``method`` in every
    attention layer (None: exact attention). The model is left with exact attention. ``tally``:
    an ``lshattn.hf.Tally`` that adds up the scores spent (``hf.count``)."""
    from tqdm.auto import tqdm

    from lshattn import hf

    hf.use(model, method, seed=seed)
    chunks = []
    try:
        counting = hf.count(model, tally) if tally is not None else contextlib.nullcontext()
        with torch.no_grad(), counting:
            for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
                batch = tokenizer(
                    list(texts[start : start + batch_size]), truncation=True, max_length=max_length,
                    padding=True, return_tensors="pt",
                )  # fmt: skip
                hidden = model(**batch).last_hidden_state
                chunks.append(hf.mean_pool(hidden, batch["attention_mask"]))
    finally:
        hf.use(model, None)
    return torch.cat(chunks)


class Task:
    """A labelled text classification task with a train and a test split.

    Attributes:
        name: short name for reports. max_length: tokens per text (longer texts are cut).
        train_texts, train_labels, test_texts, test_labels: the splits.
    """

    def __init__(self, name: str, max_length: int, texts: Sequence[str], labels: Sequence[str], train: int, test: int, seed: int):
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        if train + test > len(order):
            raise ValueError(
                f"{name}: {len(order)} texts, {train} + {test} were asked for; ask for at most {len(order)} "
                "in all (--train-size and --eval-size in lshattn train)"
            )
        pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        self.name, self.max_length = name, max_length
        self.train_texts, self.train_labels = pick(order[:train])
        self.test_texts, self.test_labels = pick(order[train : train + test])

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.train_labels))


def rotten_tomatoes_task(tokenizer: Any, *, max_length: int = 128, train: int, test: int, seed: int = 0) -> Task:
    """Rotten Tomatoes sentiment (fresh / rotten) on documents of ``max_length`` tokens.

    Snippets are 26 tokens at the median, too short for sparse attention to mean anything, so
    consecutive snippets *of the same label* are joined into documents of ``max_length`` tokens
    (``lshattn.data.join_to_tokens``); classes are balanced.
    """
    from lshattn import data

    snippets = data.rotten_tomatoes()
    per_class = (train + test + 1) // 2
    texts, labels = [], []
    for label in ("fresh", "rotten"):
        docs = data.join_to_tokens([t for t, c in snippets if c == label], tokenizer, max_length, count=per_class)
        texts += docs
        labels += [label] * len(docs)
    return Task("Rotten Tomatoes sentiment", max_length, texts, labels, train, test, seed)


def bbc_task(*, max_length: int = 512, train: int, test: int, seed: int = 0) -> Task:
    """BBC News topics (5 classes), each article cut to its first ``max_length`` tokens."""
    from lshattn import data

    articles = data.bbc_news()
    return Task("BBC News topics", max_length, [t for t, _ in articles], [c for _, c in articles], train, test, seed)


def probe_accuracy(train_x: Tensor, train_y: Sequence[str], tests: dict[str, Tensor], test_y: Sequence[str]) -> dict[str, float]:
    """Train a logistic regression on ``train_x`` and return its accuracy on each of ``tests``."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=10.0, max_iter=5000)
    classifier.fit(train_x.numpy(), list(train_y))
    return {name: float(classifier.score(x.numpy(), list(test_y))) for name, x in tests.items()}
