"""The models the recipes start from, and a tool to lengthen a pretrained model's positions."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["minilm_tokenizer", "minilm_classifier", "extend_positions"]


def minilm_tokenizer() -> Any:
    """all-MiniLM-L6-v2's tokenizer (uncased WordPiece, BERT's 30,522 tokens), offline."""
    from transformers import AutoTokenizer

    from lshattn import data

    return AutoTokenizer.from_pretrained(data.minilm_path(), local_files_only=True)


def minilm_classifier(classes: list[str]) -> Any:
    """all-MiniLM-L6-v2 (from its package, offline) with a new head over ``classes``: a
    ``BertForSequenceClassification`` whose head's weights come from torch's global RNG (seed
    it first)."""
    from transformers import AutoModelForSequenceClassification

    from lshattn import data

    return AutoModelForSequenceClassification.from_pretrained(
        data.minilm_path(), local_files_only=True, num_labels=len(classes),
        id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
    )  # fmt: skip


def extend_positions(model: Any, length: int) -> Any:
    """Give a BERT-like model ``length`` absolute positions by tiling its position embeddings
    (Longformer's initialisation), in place. Positions past the original ones repeat them, so
    outputs there are meaningful only after training at that length.

    Raises:
        ValueError: the model has no absolute position embeddings to tile.
    """
    embeddings = getattr(getattr(model, model.base_model_prefix, model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no absolute position embeddings (embeddings.position_embeddings) to extend")
    old = table.num_embeddings
    if length <= old:
        return model
    repeats = -(-length // old)
    weight = table.weight.data.repeat(repeats, 1)[:length].clone()
    embeddings.position_embeddings = torch.nn.Embedding(length, weight.shape[1], _weight=weight)
    for name in ("position_ids", "token_type_ids"):
        if hasattr(embeddings, name):
            buffer = getattr(embeddings, name)
            values = torch.arange(length).expand(1, -1) if name == "position_ids" else buffer.new_zeros(1, length)
            embeddings.register_buffer(name, values.to(buffer.dtype), persistent=False)
    model.config.max_position_embeddings = length
    return model
