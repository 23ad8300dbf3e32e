"""The models the recipes start from, and a tool to lengthen a pretrained model's positions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["minilm_tokenizer", "minilm_classifier", "reinit_attention", "extend_positions"]


def minilm_tokenizer() -> Any:
    """all-MiniLM-L6-v2's tokenizer (uncased WordPiece, BERT's 30,522 tokens), offline."""
    from transformers import AutoTokenizer

    from lshattn import data

    return AutoTokenizer.from_pretrained(data.minilm_path(), local_files_only=True)


def minilm_classifier(classes: list[str], path: str | Path | None = None) -> Any:
    """all-MiniLM-L6-v2 (from its package, offline), or the BERT checkpoint in folder ``path``
    (e.g. ``lshattn train mlm``'s ``out/checkpoints/checkpoint-N``, which uses MiniLM's
    vocabulary), with a new head over ``classes``: a ``BertForSequenceClassification`` whose
    new weights (the head, and the pooler a masked-LM checkpoint lacks) come from torch's
    global RNG (seed it first).

    Raises:
        FileNotFoundError: ``path`` is not a folder holding a ``config.json``.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lshattn import data

    if path is not None and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a model folder (no config.json in it); give a checkpoint folder such as "
            f"<mlm out>/checkpoints/checkpoint-N"
        )
    verbosity = hf_logging.get_verbosity()
    if path is not None:  # a masked LM has no pooler and no head: transformers lists them as new, as meant
        hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            data.minilm_path() if path is None else path, local_files_only=True, num_labels=len(classes),
            id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
        )  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)


def reinit_attention(model: Any, layers: Sequence[int] | None = None) -> list[str]:
    """Throw away a pretrained model's attention weights, in place: the query, key, value and
    output projections of each attention layer in ``layers`` (None: all; indices as
    ``lshattn.hf.attention_layers`` counts them) get new weights from torch's global RNG
    (seed it first), the model's own initialisation for linear layers (normal with
    ``config.initializer_range`` as the std, zero bias). Every other weight (embeddings,
    LayerNorms, feed-forward layers, the head) is kept.

    This is what ALBERT-LSH did by accident (it replaced ALBERT's attention by a new module);
    ``lshattn reproduce albert-lsh`` uses it as the control run.

    The projections are the ``torch.nn.Linear`` modules inside the attention module (Q, K, V;
    and the output projection where the module holds it, as in Llama) plus, in the BERT family,
    ``output.dense`` beside it (``BertSelfOutput``). Returns their names in
    ``model.named_modules()``.

    Raises:
        ValueError: a layer index out of range, or no projection found for a layer.
    """
    from lshattn import hf

    found = hf.attention_layers(model)
    chosen = range(len(found)) if layers is None else list(layers)
    wrong = sorted({i for i in chosen if not 0 <= i < len(found)})
    if wrong:
        raise ValueError(
            f"layer indices {wrong} are out of range: the model has {len(found)} attention layers (0..{len(found) - 1})"
        )
    modules = dict(model.named_modules())
    std = model.config.initializer_range
    names = []
    for index in chosen:
        layer = found[index]
        parent = layer.name.rpartition(".")[0]
        linear = [f"{layer.name}.{name}" for name, m in layer.module.named_modules() if isinstance(m, torch.nn.Linear)]
        beside = f"{parent}.output.dense"  # BERT family: the output projection sits next to the attention module
        if isinstance(modules.get(beside), torch.nn.Linear):
            linear.append(beside)
        if not linear:
            raise ValueError(f"attention layer {index} ({layer.name}) holds no torch.nn.Linear to re-initialise")
        for name in linear:
            torch.nn.init.normal_(modules[name].weight, mean=0.0, std=std)
            if modules[name].bias is not None:
                torch.nn.init.zeros_(modules[name].bias)
        names += linear
    return names


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
