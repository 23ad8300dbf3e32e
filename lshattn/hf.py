"""Put an lshattn method into a pretrained Hugging Face model: no retraining, no forked model file.

::

    model = AutoModel.from_pretrained(path)
    lshattn.hf.use(model, lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32))
    lshattn.hf.use(model, method, layers=[3, 4, 5])    # the method on these layers, exact elsewhere
    lshattn.hf.use(model, None)                        # back to the model's own attention

How it works. Transformers (v5) computes attention through two registries keyed by
``config._attn_implementation``: ``AttentionInterface`` (the attention function, given q, k, v
of shape `(B, H, T, D)`) and ``AttentionMaskInterface`` (what the model's mask is turned into,
once per forward). This module registers one name, ``"lshattn"``, in both:

* the **mask function** passes the 2-D padding mask through as `(B, S)` bool (True = real
  token), never as a T×S tensor. Registering it is what keeps padding: with an attention function
  alone, transformers silently passes ``attention_mask=None``. The one exception is a cached
  decoding step of a causal model (fewer queries than keys), which gets transformers' own exact
  `(B, 1, T, S)` mask, see below.
* the **attention function** is a dispatcher: it reads the method of the calling layer from the
  attention module (``use`` stores it there, it is never in the state dict) and calls it with
  ``key_padding_mask``, ``query_padding_mask`` (self-attention), ``causal=module.is_causal``,
  ``scale=scaling``, ``dropout_p`` (in training) and the layer's generator. Layers without a
  method run exact attention (``lshattn.Dense``).

Decisions a user should know:

* **Grouped-query attention** (Llama with fewer K/V heads): by default (``gqa="shared"``) the
  G query heads of a key head share its projections: the methods take the key heads unrepeated
  (``Inputs.kv_groups``), and decoding hashes and stores each key head once (codes, tables,
  sketches: 1/G of the state). ``gqa="per-query-head"`` repeats K and V per query head
  (``repeat_interleave``) and each query head draws its own projections, G times the store
  (the setting of lshattn before 2026-12-01, and of models saved then). Either way a query head
  attends on its own: folding the G query heads of a group into the query length would change
  the method (queries of different heads would share clusters or buckets, and causal masks and
  SMYRF's cluster counts break).
* **Cached decoding** (causal, fewer queries than keys, e.g. ``generate`` after the prompt):
  every method but ``Dense`` runs its own decoding step (``lshattn.decode``), with a
  store in each layer that grows with the cache: only the new keys are hashed. ``SimHash``,
  ``YOSO`` (bucket tables of the cached values), ``SketchTopK`` (the keys' sketches), ``TopK``
  and ``Local`` are strictly causal, so
  teacher-forced decoding equals their causal prefill, sinks and window included. ``Reformer``
  and ``SMYRF`` attend the new query's bucket, or the keys nearest it in projection, in each
  round: their causal prefill depends on the sort of the whole sequence, which decoding cannot
  know, so the two differ (measured in docs/longctx.md). ``Reformer(shared_qk=True)`` cannot
  decode through a cache (it holds keys, not queries): generate with ``use_cache=False``.
  ``Dense`` runs transformers' sdpa over the cache with its own mask. ``use(...,
  prefill="exact")`` keeps whole-sequence forwards exact and runs the method in the decoding
  steps alone (the dense prefill of LLM decoding systems: MagicPIG, Quest, vAttention).
* **Reproducible by default**: hash projections come from a ``torch.Generator`` seeded by
  ``(seed, layer index)``. In eval every forward draws the same projections, so two forwards
  give identical outputs, in this process or after ``save_pretrained`` and re-applying.
* **Training redraws per optimizer step**: in training (``module.training``) the projections
  are redrawn once per *optimizer step* (the SMYRF and Reformer reference code redraws them on
  every call), from ``(seed, layer, step + 1)``, so even step 0 trains on other projections than
  eval's. Every forward of one step draws the same ones: the forward recomputed in backward under
  gradient checkpointing (whose gradients are therefore those of the plain forward), the
  micro-batches of gradient accumulation, and every DDP rank. The step is a per-model counter
  that a global ``torch.optim`` step post-hook (registered on import) advances after each
  ``step()`` of any optimizer holding at least one of the model's parameters, so plain loops,
  ``transformers.Trainer``, accelerate and DDP need no code; ``set_step(model, n)`` sets it (a
  training callback on resume). An optimizer that holds other tensors than the model's own
  parameters (FSDP with flattened parameters can be one) does not advance it: the projections
  then stay those of the last step until ``set_step`` is called. ``redraw_in_training=False`` keeps
  the eval projections in training.
* **Layer indices** are the positions of the attention modules in ``model.named_modules()``
  order (``attention_layers(model)`` lists them); for BERT-likes, GPT-2 and Llama they are the
  usual layer numbers. Each ``use`` call sets the whole model: the method on ``layers`` (all by
  default), exact attention on every other layer.
* **ALBERT** shares one attention module across its layers (``num_hidden_groups`` modules for
  ``num_hidden_layers`` layers), so a method there covers every layer of a group; ``layers=`` is
  refused unless each group has its own module. All depths served by one module draw the same
  projections: in eval, and in training within one optimizer step.
* **Refused models**: those whose attention does not go through ``AttentionInterface``
  (DeBERTa-v2, MPNet, …: ``_supports_attention_backend=False``), and calls that need a score
  bias or a pattern the methods do not have (T5's ``position_bias``, sliding windows, logit
  soft-capping, attention sinks, packed sequences). The errors say which and why.
* **Attention dropout** (in training) goes to methods that have attention probabilities to drop
  (Dense, Reformer, SMYRF); YOSO and SimHash apply none, and a warning says so.
* ``Reformer(shared_qk=True)`` is refused: it replaces the keys by the normalised queries, which
  a pretrained model with separate Q and K projections was not trained for. Use
  ``shared_qk=False``, or, for a model trained from scratch with shared QK (the Reformer
  paper's setting; its key projection is then unused), ``allow_shared_qk=True``.
* ``use`` records its setting in ``model.config.lshattn`` (a small dict that
  ``save_pretrained`` writes to config.json); ``use_saved(model)`` re-applies it after
  ``from_pretrained``. ``config._attn_implementation`` itself is not saved, so a saved model
  loads with exact attention wherever lshattn is not installed.

Supported and tested on tiny random configs: BERT, RoBERTa, ALBERT, DistilBERT, ELECTRA, ViT,
GPT-2 and Llama; on a real model: all-MiniLM-L6-v2 (``lshattn.data.load_minilm``). See
``docs/hf.md``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import numbers
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from lshattn import decode
from lshattn.api import Method, parse
from lshattn.methods import Dense, Reformer, SimHash

try:
    import transformers
    from packaging.version import Version
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers import masking_utils
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError("lshattn.hf needs transformers >= 5.24: pip install 'lshattn[hf]'") from _err
# 5.24 named a model's cache argument and output ``cache``; earlier 5.x releases take
# ``past_key_values`` and ignore ``cache=`` without a word (measured on 5.23: a decoding step
# then runs without its cache), so lshattn's decoding code would be silently wrong there.
if Version(transformers.__version__) < Version("5.24"):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"lshattn.hf needs transformers >= 5.24, found {transformers.__version__}: pip install -U 'transformers>=5.24'"
    )

__all__ = [
    "NAME", "PREFILLS", "GQA_MODES", "use", "use_saved", "set_step", "attention_layers", "AttentionLayer",
    "mean_pool", "count",
    "Tally", "eval_generator",
]  # fmt: skip

NAME = "lshattn"
"""The name registered in transformers' AttentionInterface and AttentionMaskInterface."""
PREFILLS = ("method", "exact")  # what use(..., prefill=) takes
GQA_MODES = ("per-query-head", "shared")  # what use(..., gqa=) takes

_STATE = "_lshattn_state"  # attribute of an attention module holding its _LayerState
_ORIGINAL = "_lshattn_original_attn_implementation"  # attribute of the model: what `None` restores
_STEPS = "_lshattn_steps"  # attribute of the model: its _StepCounter, shared by its layers' states
_RECORD = "lshattn"  # attribute of model.config: the setting, saved with save_pretrained

# Keyword arguments some models pass to the attention function that change the scores or the
# pattern in ways the methods cannot honour: (kwarg, what it is).
_UNSUPPORTED_KWARGS = (
    ("position_bias", "a relative position bias added to every score (T5-like models)"),
    ("sliding_window", "sliding-window attention"),
    ("softcap", "logit soft-capping"),
    ("s_aux", "attention sinks"),
    ("sinks", "attention sinks"),
    ("cu_seq_lens_q", "packed (varlen) sequences"),
    ("block_indices", "block-sparse attention"),
)

# Why known families cannot be routed; the generic reason covers the others.
_REFUSED = {
    "deberta": "its disentangled attention adds content-to-position and position-to-content terms to every score",
    "deberta-v2": "its disentangled attention adds content-to-position and position-to-content terms to every score",
    "mpnet": "its attention adds a learned relative position bias to every score",
    "t5": "its attention adds a learned relative position bias (position_bias) to every score",
    "mt5": "its attention adds a learned relative position bias (position_bias) to every score",
    "umt5": "its attention adds a learned relative position bias (position_bias) to every score",
    "longt5": "its attention adds a learned relative position bias (position_bias) to every score",
}


class _StepCounter:
    """The optimizer step of one model: how many ``step()`` calls of optimizers holding its
    parameters have run since ``use`` (or the last ``set_step``). Lives in the model's
    ``__dict__``; every layer's ``_LayerState`` holds the same one (``copy.deepcopy`` of the
    model keeps it shared among the copy's layers)."""

    __slots__ = ("step",)

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def __reduce__(self) -> tuple:
        return _StepCounter, (self.step,)

    def __repr__(self) -> str:
        return f"_StepCounter(step={self.step})"


@dataclass
class Tally:
    """What the attention layers of a model scored while ``count`` was active.

    Attributes:
        dot_products: query–key scores the layers computed (``aux.dot_products`` of each call;
            every real key for each query of a cached decoding step, which runs exact
            attention), summed over layers, batch and heads.
        pairs: real queries times real keys, summed likewise: the denominator of the budget, as
            ``cost().budget`` divides by T·S (causal or not).
        calls: attention calls counted (one per layer per forward).
        seconds: wall time spent inside those calls (the attention function alone, from the
            projected q, k, v to its output), for timing attention apart from the rest of a model.
        empty: (query, head) rows of cached decoding steps that attended no key (a budget that
            leaves a query nothing: no sink, no window, no collision); their output is zeros.
    """

    dot_products: int = 0
    pairs: int = 0
    calls: int = 0
    seconds: float = 0.0
    empty: int = 0

    @property
    def budget(self) -> float:
        """``dot_products / pairs``: the share of exact attention's scores spent (0 when nothing ran)."""
        return self.dot_products / self.pairs if self.pairs else 0.0


@dataclass
class _LayerState:
    """What ``use`` stores on an attention module: its method, seed, layer index and the model's
    step; and the ``Tally`` of an active ``count``."""

    method: Method | None
    index: int
    seed: int
    redraw_in_training: bool
    steps: _StepCounter
    exact_prefill: bool = False  # use(..., prefill="exact"): the method in cached decoding steps only
    shared_kv: bool = False  # use(..., gqa="shared"): projections and decoding stores a key head
    tally: Tally | None = None
    store: Any = None  # lshattn.decode's store of cached key codes, for cached decoding steps

    def generator(self, training: bool) -> torch.Generator:
        """The generator for this call: seeded by (seed, layer) in eval, (seed, layer, step + 1) in training."""
        step = self.steps.step + 1 if training and self.redraw_in_training else 0
        return _seeded(self.seed, self.index, step)


class AttentionLayer(NamedTuple):
    """One attention module of a model, as ``attention_layers`` lists it.

    Attributes:
        index: the layer index ``use(..., layers=)`` takes.
        name: the module's name in ``model.named_modules()``.
        module: the attention module.
        method: the method it runs now, None for the model's exact attention.
    """

    index: int
    name: str
    module: torch.nn.Module
    method: Method | None


def use(
    model: PreTrainedModel,
    method: Method | str | Mapping[int, Method | str | None] | None,
    layers: Iterable[int] | None = None,
    *,
    seed: int = 0,
    redraw_in_training: bool = True,
    allow_shared_qk: bool = False,
    prefill: str = "method",
    gqa: str = "shared",
) -> PreTrainedModel:
    """Run ``method`` as the attention of ``model`` (in place), or restore exact attention.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through transformers'
            ``AttentionInterface`` (BERT, RoBERTa, ALBERT, DistilBERT, ELECTRA, ViT, GPT-2,
            Llama, …), with or without a task head.
        method: a method spec (``lshattn.SMYRF(...)``), its string form
            (``"smyrf:num_hashes=2"``), or None for the model's own exact attention everywhere;
            or a mapping from layer index to method (or None): a setting per layer, exact
            attention on the layers it leaves out (``lshattn.eval.calibrate.split_budget``
            makes one).
        layers: indices of the attention layers that run ``method`` (see ``attention_layers``);
            every other layer runs exact attention. None: all layers.
        seed: seeds the per-layer hash projections, ``(seed, layer index)``; the same seed gives
            the same outputs in eval, in any process.
        redraw_in_training: in training mode, draw new projections once per optimizer step,
            from ``(seed, layer, step + 1)``: every forward between two ``optimizer.step()``
            calls (recomputed forwards under gradient checkpointing, accumulated micro-batches,
            DDP ranks) hashes alike; see ``set_step``. False keeps the eval projections in
            training too.
        allow_shared_qk: accept ``Reformer(shared_qk=True)``, whose keys are the normalised
            queries (the model's key projection goes unused): for a model trained from scratch
            that way. A pretrained model was trained with its own keys: leave it False.
        prefill: ``"method"``: the method in every call; ``"exact"``: exact attention over whole
            sequences (the prompt) and the method in cached decoding steps only.
        gqa: on grouped-query models (Llama with fewer key heads than query heads): with
            ``"shared"`` the G query heads of a key head share its projections (the methods take
            the key heads unrepeated: ``Inputs.kv_groups``), and decoding hashes and stores each
            key head once (``lshattn.decode.step(..., per_kv_head=True)``). ``"per-query-head"``
            draws projections a query head (K and V repeated per query head), so the decoding
            stores hold a query head's codes, tables or sketches: G times the state and its
            hashing, for no better quality (docs/longctx.md, "A store a key head"). The two draw
            different projections, so their outputs differ; no difference on models without GQA.

    Returns:
        ``model``, changed in place. Its training step counter (see ``set_step``) starts at 0 on
        the first ``use`` and is kept by later calls, so switching methods mid-training keeps
        counting; ``use(model, None)`` removes it.

    Raises:
        ValueError: a model whose attention cannot be routed (the message says why), an index
            out of range, ``layers=`` on ALBERT with shared layers, or
            ``Reformer(shared_qk=True)`` without ``allow_shared_qk``, a mapping given with
            ``layers=``, a ``prefill`` other than ``"method"`` or ``"exact"``, or a ``gqa`` other
            than ``"per-query-head"`` or ``"shared"``.
        TypeError: ``model`` is not a transformers ``PreTrainedModel`` or ``method`` is not a
            method spec.
    """
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")
    per_layer_given = isinstance(method, Mapping)
    if per_layer_given:
        if layers is not None:
            raise ValueError(
                "a mapping of layers to methods already names its layers; pass layers=None (the layers it "
                "leaves out run exact attention)"
            )
        given = {index: _method_spec(m, allow_shared_qk) for index, m in method.items()}
        layers = list(given)
        if all(m is None for m in given.values()):
            method = None
    else:
        method = _method_spec(method, allow_shared_qk)
    found = attention_layers(model)
    chosen = _select_layers(model, found, layers)

    if method is None:
        for layer in found:
            layer.module.__dict__.pop(_STATE, None)
        model.set_attn_implementation(_original_implementation(model))
        model.__dict__.pop(_ORIGINAL, None)
        model.__dict__.pop(_STEPS, None)
        model.__dict__.pop("_reorder_cache", None)
        _MODELS.discard(model)
        _remove_step_registration(model)
        if hasattr(model.config, _RECORD):
            delattr(model.config, _RECORD)
        return model

    if model.config._attn_implementation != NAME:
        setattr(model, _ORIGINAL, model.config._attn_implementation)
    steps = model.__dict__.get(_STEPS)
    if steps is None:
        steps = model.__dict__[_STEPS] = _StepCounter()
    _register_for_steps(model)
    # beam search reorders the cache through model._reorder_cache when a model has one
    # (a partial, not a bound method: it pickles and deep-copies with the model)
    model.__dict__["_reorder_cache"] = functools.partial(_reorder_cache, model)
    for layer in found:
        if per_layer_given:
            layer_method = given.get(layer.index)
        else:
            layer_method = method if layer.index in chosen else None
        state = _LayerState(
            layer_method, layer.index, int(seed), bool(redraw_in_training), steps, exact_prefill=prefill == "exact",
            shared_kv=gqa == "shared",
        )  # fmt: skip
        setattr(layer.module, _STATE, state)
    if per_layer_given:  # JSON keys are strings
        record_method: Any = {str(i): None if m is None else str(m) for i, m in sorted(given.items())}
        record_layers = None
    else:
        record_method, record_layers = str(method), None if layers is None else sorted(chosen)
    setattr(
        model.config,
        _RECORD,
        {
            "method": record_method,
            "layers": record_layers,
            "seed": int(seed),
            "redraw_in_training": bool(redraw_in_training),
            "allow_shared_qk": bool(allow_shared_qk),
            "prefill": prefill,
            "gqa": gqa,
        },
    )
    model.set_attn_implementation(NAME)
    return model


def use_saved(model: PreTrainedModel) -> PreTrainedModel:
    """Re-apply the setting ``use`` recorded in ``model.config.lshattn`` (it survives
    ``save_pretrained`` / ``from_pretrained``); a model without a record is left as it is.

    ::

        lshattn.hf.use(model, method, seed=0); model.save_pretrained(d)
        model = AutoModel.from_pretrained(d)       # exact attention: the record is only data
        lshattn.hf.use_saved(model)                # same method, layers and seed: same outputs
    """
    record = getattr(model.config, _RECORD, None)
    if not record:
        return model
    saved = record["method"]
    if isinstance(saved, dict):  # a setting per layer
        method: Any = {int(i): None if m is None else parse(m) for i, m in saved.items()}
    else:
        method = parse(saved)
    return use(
        model,
        method,
        record.get("layers"),
        seed=record.get("seed", 0),
        redraw_in_training=record.get("redraw_in_training", True),
        allow_shared_qk=record.get("allow_shared_qk", False),
        prefill=record.get("prefill", "method"),
        gqa=record.get("gqa", "per-query-head"),  # saved before the option: a projection a query head
    )


def _method_spec(method: Method | str | None, allow_shared_qk: bool) -> Method | None:
    """A method spec from what ``use`` was given (a spec, its string form or None), checked."""
    if isinstance(method, str):
        method = parse(method)
    if method is not None and not isinstance(method, Method):
        raise TypeError(f"method must be a lshattn method spec, its string form or None, got {type(method).__name__}")
    if isinstance(method, Reformer) and method.shared_qk and not allow_shared_qk:
        raise ValueError(
            "Reformer(shared_qk=True) uses the normalised queries as keys, but a pretrained model has "
            "separate query and key projections and was not trained for that; use "
            f"lshattn.Reformer(shared_qk=False, ...) instead (got {method}), or, for a model trained "
            "from scratch with shared QK, hf.use(..., allow_shared_qk=True)"
        )
    return method


def set_step(model: PreTrainedModel, step: int) -> PreTrainedModel:
    """Set the optimizer step that seeds ``model``'s training-mode hash projections.

    In training, each layer draws its projections from ``(seed, layer, step + 1)``, where
    ``step`` counts the ``step()`` calls of optimizers holding the model's parameters since
    ``use`` (a global optimizer hook advances it; nothing else does). Every forward between two
    optimizer steps therefore hashes alike. Set it explicitly when the count is not the one
    wanted: when resuming a run (``trainer.state.global_step``), or when the optimizer does not
    hold the model's own parameters (as FSDP with flattened parameters may not), where the hook
    cannot see the step. After ``set_step(model, n)`` the model hashes as one that reached ``n``
    by optimizer steps, and counting goes on from ``n``. Eval projections do not depend on the
    step.

    Args:
        model: a model given a method by ``use``.
        step: optimizer steps taken so far, an integer ≥ 0.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel`` or ``step`` is not an integer.
        ValueError: ``step`` is negative, or ``model`` has no lshattn method (call ``use`` first).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"set_step takes a transformers PreTrainedModel, got {type(model).__name__}")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer (optimizer steps taken), got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ValueError(f"step must be >= 0 (optimizer steps taken), got {step}")
    steps = model.__dict__.get(_STEPS)
    if steps is None:
        raise ValueError(
            f"{type(model).__name__} runs no lshattn method, so it has no step to set; call "
            f"lshattn.hf.use(model, method) first"
        )
    steps.step = int(step)
    _register_for_steps(model)
    return model


@contextlib.contextmanager
def count(model: PreTrainedModel, tally: Tally | None = None) -> Iterator[Tally]:
    """Count the query–key scores every attention layer of ``model`` computes inside the block::

        lshattn.hf.use(model, lshattn.SimHash(num_hashes=16, num_bits=6, mode="importance"))
        with lshattn.hf.count(model) as tally:
            model(**batch)
        tally.budget   # the share of exact attention's scores spent on these inputs

    Methods with a data-dependent cost (SimHash) spend what the inputs make them spend, not
    ``cost()``'s expectation; this measures it. Each call asks its method for ``return_aux``.
    ``tally``: add to this one (several blocks, one total) instead of a new one.

    Raises:
        ValueError: the model has no lshattn setting (call ``use`` first).
    """
    states = [layer.module.__dict__.get(_STATE) for layer in attention_layers(model)]
    if not states or any(state is None for state in states):
        raise ValueError(
            "lshattn.hf.count needs a model set up by lshattn.hf.use(model, method) (any method; layers "
            "without one are counted as exact attention)"
        )
    tally = Tally() if tally is None else tally
    for state in states:
        state.tally = tally
    try:
        yield tally
    finally:
        for state in states:
            state.tally = None


def _real_pairs(B: int, H: int, T: int, S: int, key_mask: Tensor | None, query_mask: Tensor | None) -> int:
    """Real queries times real keys, over B sequences and H heads: the denominator of a budget
    (``cost().budget`` is dot products over T·S, causal or not; padding is left out here)."""
    if key_mask is None and query_mask is None:  # a decoding step's usual case: no tensor operation
        return B * T * S * H
    keys = torch.full((B,), S) if key_mask is None else key_mask.sum(-1).cpu()
    queries = torch.full((B,), T) if query_mask is None else query_mask.sum(-1).cpu()
    return int((queries * keys).sum()) * H


def attention_layers(model: PreTrainedModel) -> list[AttentionLayer]:
    """The attention modules ``use`` can drive, in ``model.named_modules()`` order.

    A module qualifies when its class calls transformers' attention registry in ``forward``.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: the model's attention does not go through the registry; the message says why.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"lshattn.hf works on transformers PreTrainedModel instances, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", "")
    if not type(model).is_backend_compatible() or model_type in _REFUSED:
        why = _REFUSED.get(
            model_type,
            "it computes attention inside its own modules instead of through transformers' AttentionInterface",
        )
        raise ValueError(
            f"{type(model).__name__} (model_type {model_type!r}) cannot take an lshattn method: {why}, and "
            f"the methods see only queries, keys, values and padding (transformers marks it "
            f"_supports_attention_backend={type(model).is_backend_compatible()}). Replacing its attention "
            f"would mean forking its model file, which lshattn.hf does not do. Models that work: BERT, "
            f"RoBERTa, ALBERT, DistilBERT, ELECTRA, ViT, GPT-2, Llama and other families whose attention "
            f"goes through AttentionInterface without a score bias."
        )
    found = []
    for name, module in model.named_modules():
        if _routes_through_registry(type(module)):
            state = module.__dict__.get(_STATE)
            found.append(AttentionLayer(len(found), name, module, None if state is None else state.method))
    if not found:
        raise ValueError(
            f"found no attention module in {type(model).__name__} that calls transformers' "
            f"ALL_ATTENTION_FUNCTIONS in its forward, so lshattn.hf has nothing to route"
        )
    return found


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True) -> Tensor:
    """Sentence embeddings as sentence-transformers makes them for all-MiniLM-L6-v2.

    Args:
        last_hidden_state: `(B, T, hidden)`.
        attention_mask: `(B, T)`, 1/True = real token; None: every token is real.
        normalize: L2-normalise each embedding.

    Returns:
        `(B, hidden)`: the mean over real tokens (normalised).
    """
    if attention_mask is None:
        pooled = last_hidden_state.mean(1)
    else:
        weights = attention_mask.to(last_hidden_state.dtype)[..., None]
        pooled = (last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


# --- the two registered functions ---------------------------------------------------------------


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """Mask function registered as ``"lshattn"``: the `(B, kv_length)` bool padding mask, or None.

    Causality is not put in the mask: the attention function takes it from the module. A causal
    call with fewer queries than keys (a cached decoding step) gets transformers' exact
    `(B, 1, T, S)` sdpa mask instead, which places the queries after the cached keys for any
    cache type.
    """
    if mask_function is masking_utils.causal_mask_function:
        if q_length != kv_length or int(q_offset) != int(kv_offset):
            return masking_utils.sdpa_mask(
                batch_size=batch_size,
                q_length=q_length,
                kv_length=kv_length,
                q_offset=q_offset,
                kv_offset=kv_offset,
                mask_function=mask_function,
                attention_mask=attention_mask,
                **kwargs,
            )
    elif mask_function is not masking_utils.bidirectional_mask_function:
        pattern = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(
            f"this model asks for an attention pattern beyond padding and causality ({pattern}: a sliding "
            f"window, packed sequences or an overlay such as image tokens); lshattn methods support only "
            f"padding masks and causal attention. Pass an attention_mask for padded batches, or use the "
            f"model's own attention (lshattn.hf.use(model, None))"
        )
    if attention_mask is None:
        return None
    mask = masking_utils.prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
    return mask[:, kv_offset : kv_offset + kv_length]


def _attention(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
    """Attention function registered as ``"lshattn"``: ``_dispatch`` (same arguments), timed
    into the ``Tally`` of an active ``count``."""
    state: _LayerState | None = module.__dict__.get(_STATE)
    if state is None or state.tally is None:
        return _dispatch(module, *args, **kwargs)
    start = time.perf_counter()
    out = _dispatch(module, *args, **kwargs)
    state.tally.seconds += time.perf_counter() - start
    return out


def _dispatch(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention of one call: dispatches to the layer's method.

    Args:
        module: the calling attention module (holds the method ``use`` gave it).
        query: `(B, H, T, D)`; key: `(B, H_kv, S, D)`; value: `(B, H_kv, S, Dv)`, H_kv dividing H.
        attention_mask: what ``_padding_mask`` returned: `(B, S)` bool or None; `(B, 1, T, S)`
            for cached decoding steps or a 4-D mask the caller built.
        scaling: the logit scale (None: ``D ** -0.5``).
        dropout: attention dropout, applied in training only.

    Returns:
        `(B, T, H, Dv)` and None (no attention weights).
    """
    for kwarg, what in _UNSUPPORTED_KWARGS:
        if kwargs.get(kwarg) is not None:
            raise ValueError(
                f"{type(module).__name__} passes {kwarg}= ({what}) to its attention function; lshattn "
                f"methods cannot honour it. Use the model's own attention: lshattn.hf.use(model, None)"
            )
    if kwargs.get("cache") is not None:
        raise ValueError("lshattn methods do not support transformers' paged attention cache (continuous batching)")
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    state: _LayerState | None = module.__dict__.get(_STATE)
    method = None if state is None else state.method
    T, S = query.shape[2], key.shape[2]

    decoding = is_causal and T < S
    if state is not None and state.exact_prefill and not decoding:
        method = None  # use(..., prefill="exact"): whole sequences run exact attention
    if decoding or (attention_mask is not None and attention_mask.dim() != 2):
        if method is not None and not decoding:
            raise ValueError(
                f"{type(module).__name__} got a {attention_mask.dim()}-D attention mask of shape "
                f"{tuple(attention_mask.shape)}; lshattn methods take only (batch, length) padding masks. "
                f"Pass a 2-D attention_mask (1 = real token) to the model"
            )
        if attention_mask is not None and attention_mask.dim() == 2:
            # Only if a model built a plain padding mask for a causal step: the T queries are
            # the last T positions of the S keys.
            behind = torch.arange(S, device=query.device) <= torch.arange(S - T, S, device=query.device)[:, None]
            attention_mask = attention_mask[:, None, None, :] & behind
        if decoding and decode.decodes(method):  # through the layer's store (lshattn.decode)
            return _decode(module, state, method, query, key, value, attention_mask, scaling), None
        # A cached decoding step of another method (or a caller's own 4-D mask on an exact
        # layer): transformers' exact sdpa attention, with the mask transformers built.
        if state is not None and state.tally is not None:
            _count_exact(state.tally, query, key, attention_mask)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout if module.training else 0.0,
            scaling=scaling, is_causal=is_causal, **kwargs,
        )  # fmt: skip

    groups = query.shape[1] // key.shape[1]
    if groups > 1 and not (state is not None and state.shared_kv):
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # a projection a query head
    self_attention = T == S and not _is_cross_attention(module)
    if isinstance(method, Reformer) and method.shared_qk:  # use(..., allow_shared_qk=True)
        if not self_attention:
            raise ValueError(
                f"{type(module).__name__} is cross-attention, but Reformer(shared_qk=True) takes its keys "
                f"from the queries; use Reformer(shared_qk=False) in this layer"
            )
        # the method normalises them; the model's key projection goes unused. Keys a query head:
        # the values a query head too (under GQA with gqa="shared" they come unrepeated)
        key, value = query, repeat_kv(value, query.shape[1] // value.shape[1])
    counting = state is not None and state.tally is not None
    if state is not None:
        state.store = None  # a forward over whole sequences (a new prompt): decoding starts afresh
    out = (method or Dense())(
        query,
        key,
        value,
        key_padding_mask=attention_mask,
        query_padding_mask=attention_mask if self_attention else None,
        causal=is_causal,
        scale=scaling,
        generator=state.generator(module.training) if state is not None and method is not None else None,
        dropout_p=_dropout(method, dropout if module.training else 0.0),
        return_aux=counting,
    )
    if counting:
        out, aux = out
        B, H = query.shape[:2]
        query_mask = attention_mask if self_attention else None
        state.tally.dot_products += int(aux.dot_products)
        state.tally.pairs += _real_pairs(B, H, T, S, attention_mask, query_mask)
        state.tally.calls += 1
    return out.transpose(1, 2).contiguous(), None


def _decode(
    module: torch.nn.Module, state: _LayerState, method: Method, query: Tensor, key: Tensor, value: Tensor,
    attention_mask: Tensor | None, scaling: float | None,
) -> Tensor:  # fmt: skip
    """A cached decoding step through the layer's store (``lshattn.decode``): the T new queries
    against every cached key, the store extended by the new keys. Returns `(B, T, H, Dv)`."""
    B, H, T = query.shape[:3]
    S = key.shape[2]
    # None: transformers saw no padding (query t is position S − T + t), which lets YOSO's step
    # skip every pass over the S keys
    visible = None
    if attention_mask is not None:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # GQA: K and V are read per key head, never repeated
    generator = functools.partial(state.generator, module.training)  # seeded only if a store is built
    result = decode.step(state.store, method, query, key, value, visible, scale, generator, per_kv_head=state.shared_kv)
    state.store = result.store
    if state.tally is not None:
        state.tally.empty += int((result.out == 0).all(-1).sum()) if result.empty is None else result.empty
        state.tally.dot_products += result.scored
        state.tally.pairs += _real_pairs(B, H, T, S, None if visible is None else visible[:, 0, -1, :], None)
        state.tally.calls += 1
    return result.out.transpose(1, 2).contiguous()


def _reorder_cache(model: PreTrainedModel, cache: Any, beam_idx: Tensor) -> Any:
    """Beam search's reordering of the cache (``generate`` calls ``model._reorder_cache`` when the
    model has one; ``use`` gives it this), applied to every layer's decoding store as well, so the
    stores follow their sequences."""
    own = getattr(type(model), "_reorder_cache", None)
    if own is not None:
        cache = own(model, cache, beam_idx)
    else:
        cache.reorder_cache(beam_idx)
    for layer in attention_layers(model):
        state = layer.module.__dict__.get(_STATE)
        if state is not None and state.store is not None:
            state.store = decode.reordered(state.store, beam_idx)
    return cache


def _count_exact(tally: Tally, query: Tensor, key: Tensor, attention_mask: Tensor | None) -> None:
    """Add an exact (sdpa) call to ``tally``: each query against every real key."""
    B, H, T = query.shape[:3]
    S = key.shape[2]
    key_mask = attention_mask
    if attention_mask is not None and attention_mask.dim() == 4:  # (B, 1 or H, T, S), causal
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        key_mask = allowed[:, 0, -1, :]  # the last query sees every real key
    pairs = _real_pairs(B, H, T, S, key_mask, None)
    tally.dot_products += pairs
    tally.pairs += pairs
    tally.calls += 1


def _dropout(method: Method | None, dropout: float) -> float:
    """The attention dropout a method gets: the module's, or 0 (with a warning) for a method
    that has no attention probabilities to drop (YOSO, SimHash)."""
    if dropout > 0 and method is not None and not method.supports_dropout:
        warnings.warn(
            f"{type(method).__name__} applies no attention dropout; training runs without the model's "
            f"attention dropout of {dropout} in its layers",
            stacklevel=3,
        )
        return 0.0
    return dropout


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _padding_mask)


# --- the training step: advanced by every optimizer step ------------------------------------------

# Models with a step counter, held weakly. ``use`` adds a model; so does a forward pre-hook that
# ``use`` puts on the model, which re-registers copies (``copy.deepcopy``, pickling) at their
# first forward: a copy keeps its own counter, starting at the step it was copied at.
_MODELS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _register_model(model: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook on a model given a method: keeps the model in ``_MODELS``."""
    if _STEPS in model.__dict__:
        _MODELS.add(model)


def _refuse_fixed_size_caches(model: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook on a model given a method: refuse a cache whose layers are allocated at a
    fixed size (``StaticCache``: ``generate(cache_implementation="static")``). Its keys hold
    unwritten slots after the tokens seen so far, and a prompt arrives as fewer queries than
    keys, where the decoding steps (``lshattn.decode``) take the new queries to be the last
    keys: the output would be silently wrong (measured: other tokens than the default cache's)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder model's
    if not any(getattr(layer, "is_compileable", False) for layer in getattr(cache, "layers", ())):
        return
    states = (layer.module.__dict__.get(_STATE) for layer in attention_layers(model))
    if any(state is not None and decode.decodes(state.method) for state in states):  # Dense reads the mask: fine
        raise ValueError(
            f"lshattn methods decode through a cache that grows with the sequence (transformers' DynamicCache, "
            f"generate's default), but this call passes a {type(cache).__name__} of fixed-size layers "
            f"(cache_implementation='static', or a preallocated cache): its unwritten slots would be read as keys. "
            f"Use the default cache, or exact attention (lshattn.hf.use(model, None))"
        )


def _register_for_steps(model: PreTrainedModel) -> None:
    _MODELS.add(model)
    if _register_model not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_register_model)
    if _refuse_fixed_size_caches not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_refuse_fixed_size_caches, with_kwargs=True)


def _remove_step_registration(model: PreTrainedModel) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook in (_register_model, _refuse_fixed_size_caches):
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def _advance_steps(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer step post-hook: advance the step of every model with a parameter in ``optimizer``."""
    if not _MODELS:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in list(_MODELS):
        steps = model.__dict__.get(_STEPS)
        if steps is not None and any(id(p) in held for p in model.parameters()):
            steps.step += 1


_STEP_HOOK = register_optimizer_step_post_hook(_advance_steps)


# --- helpers --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _routes_through_registry(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention function up in transformers' registry."""
    if not issubclass(cls, torch.nn.Module) or cls.forward is torch.nn.Module.forward:
        return False
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def _is_cross_attention(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "CrossAttention" in type(module).__name__


def _shared_groups(model: PreTrainedModel) -> tuple[int, int] | None:
    """``(num_hidden_layers, num_hidden_groups)`` when attention modules are shared across layers (ALBERT)."""
    config = model.config
    layers, groups = getattr(config, "num_hidden_layers", None), getattr(config, "num_hidden_groups", None)
    if config.model_type == "albert" and layers and groups and groups < layers:
        return layers, groups
    return None


def _select_layers(model: PreTrainedModel, found: list[AttentionLayer], layers: Iterable[int] | None) -> set[int]:
    if layers is None:
        return {layer.index for layer in found}
    if isinstance(layers, int):
        layers = [layers]
    chosen = set()
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layers must be integers, got {index!r}")
        chosen.add(index)
    shared = _shared_groups(model)
    if shared is not None:
        num_layers, groups = shared
        raise ValueError(
            f"{type(model).__name__} shares its attention modules across layers ({num_layers} layers, "
            f"{groups} module(s), num_hidden_groups={groups}), so a method applies to every layer of a "
            f"group or to none; call lshattn.hf.use(model, method) without layers="
        )
    bad = sorted(i for i in chosen if not 0 <= i < len(found))
    if bad:
        names = ", ".join(f"{layer.index}: {layer.name}" for layer in found[:4])
        raise ValueError(
            f"layer indices {bad} are out of range: {type(model).__name__} has {len(found)} attention layers, "
            f"0 to {len(found) - 1} ({names}{', ...' if len(found) > 4 else ''}); see lshattn.hf.attention_layers"
        )
    return chosen


def _original_implementation(model: PreTrainedModel) -> str:
    original = model.__dict__.get(_ORIGINAL) or model.config._attn_implementation
    return "sdpa" if original in (None, NAME) else original


def eval_generator(seed: int, index: int) -> torch.Generator:
    """The generator the layer of ``index`` draws its projections from in eval after
    ``use(model, method, seed=seed)``: to measure a method on a layer's captured inputs with the
    projections the model will run (``lshattn.eval.calibrate``)."""
    return _seeded(seed, index, 0)


def _seeded(seed: int, index: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix_seed(seed, index, step))


def _mix_seed(seed: int, index: int, step: int) -> int:
    """A 63-bit generator seed from (seed, layer, step), the same on every machine."""
    digest = hashlib.blake2b(f"lshattn:{seed}:{index}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
