"""Datasets the recipes train on: tokenized once, held in memory, padded per batch.

The labelled tasks are those of the demo (``lshattn.eval.tasks``): Rotten Tomatoes sentiment on
documents of 128 tokens and BBC News topics on articles cut to 512, with the same splits for the
same seed, so a model trained here can be probed like the demo's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["TokenizedDataset", "TASKS", "load_task", "classification_dataset", "check_length"]

# name -> (loader, default max_length). A loader takes (tokenizer, max_length, train, test, seed).
TASKS: dict[str, tuple[Callable[..., Any], int]] = {}


def _rotten_tomatoes(tokenizer: Any, max_length: int, train: int, test: int, seed: int):
    from lshattn.eval.tasks import rotten_tomatoes_task

    return rotten_tomatoes_task(tokenizer, max_length=max_length, train=train, test=test, seed=seed)


def _bbc(tokenizer: Any, max_length: int, train: int, test: int, seed: int):
    from lshattn.eval.tasks import bbc_task

    return bbc_task(max_length=max_length, train=train, test=test, seed=seed)


TASKS["rt"] = (_rotten_tomatoes, 128)
TASKS["bbc"] = (_bbc, 512)


def load_task(name: str, tokenizer: Any, *, max_length: int | None, train: int, test: int, seed: int):
    """The labelled task ``name`` (``lshattn.eval.tasks.Task``) and its max_length.

    Raises:
        ValueError: an unknown task (the message lists the known ones) or too few texts.
        MissingPackageError: the task's data package is not installed (the message says how).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    loader, default_length = TASKS[name]
    length = default_length if max_length is None else max_length
    return loader(tokenizer, length, train, test, seed), length


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples already tokenized, as dicts of lists (``input_ids``, ``attention_mask``, ...)."""

    def __init__(self, examples: Sequence[dict[str, Any]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def classification_dataset(
    texts: Sequence[str], labels: Sequence[str], classes: Sequence[str], tokenizer: Any, max_length: int
) -> TokenizedDataset:
    """Texts cut to ``max_length`` tokens, with integer labels in the order of ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return TokenizedDataset(
        {"input_ids": ids, "attention_mask": mask, "labels": index[label]}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels)
    )


def check_length(length: int, positions: int, what: str) -> None:
    """Refuse sequences longer than a pretrained model's position embeddings, saying how to
    extend them."""
    if length > positions:
        raise ValueError(
            f"{what} of {length} tokens is above the model's {positions} position embeddings; use at most "
            f"{positions}, or extend the positions first (lshattn.train.extend_positions(model, {length}) "
            f"tiles them, as Longformer did; outputs past {positions} then need training)"
        )
