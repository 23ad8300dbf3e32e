"""lshattn.hf on tiny random configs of every family transformers routes through its registry.

Each test builds its model from a config (nothing comes from the Hub) and compares it with a copy
of the same weights running transformers' own eager attention.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import subprocess
import sys
from typing import Callable, ClassVar

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="lshattn.hf needs transformers (pip install 'lshattn[hf]')")

import lshattn  # noqa: E402
from lshattn import hf  # noqa: E402

pytestmark = pytest.mark.hf

L = 12  # sequence length of the text inputs
VOCAB = 128
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: how to build a tiny model and feed it."""

    make_config: Callable[[], object]
    model_class: str
    decoder: bool = False
    image: bool = False

    def config(self, **overrides):
        config = self.make_config()
        for key, value in overrides.items():
            setattr(config, key, value)
        return config


FAMILIES = {
    "bert": Family(lambda: transformers.BertConfig(**TINY), "BertModel"),
    "roberta": Family(lambda: transformers.RobertaConfig(**TINY, max_position_embeddings=64), "RobertaModel"),
    "albert": Family(lambda: transformers.AlbertConfig(**TINY, embedding_size=16), "AlbertModel"),
    "distilbert": Family(
        lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB),
        "DistilBertModel",
    ),
    "electra": Family(lambda: transformers.ElectraConfig(**TINY, embedding_size=16), "ElectraModel"),
    "vit": Family(
        lambda: transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=4,
        ),  # fmt: skip
        "ViTModel",
        image=True,
    ),
    "gpt2": Family(
        # scale_attn_by_inverse_layer_idx: the scaling differs per layer and must reach the method
        lambda: transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, scale_attn_by_inverse_layer_idx=True
        ),
        "GPT2Model",
        decoder=True,
    ),
    "llama": Family(
        # grouped-query attention: 4 query heads share 2 key/value heads
        lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2),
        "LlamaModel",
        decoder=True,
    ),
}


def build(family: Family, *, seed: int = 0, **overrides):
    """(eager reference, model to drive) with the same weights, both in eval mode.

    Each model gets its own deep copy of the config: ``_from_config`` and
    ``set_attn_implementation`` mutate it, and a shared one would switch both models.
    """
    torch.manual_seed(seed)
    config = family.config(**overrides)
    config._attn_implementation = "eager"
    cls = getattr(transformers, family.model_class)
    reference = cls(copy.deepcopy(config)).eval()
    model = cls(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


def inputs(family: Family, batch: int = 2, seed: int = 0) -> dict:
    """Model inputs with a padded second sequence (left padding for decoders); ViT has no mask."""
    g = torch.Generator().manual_seed(seed)
    if family.image:
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, L), generator=g)
    mask = torch.ones(batch, L, dtype=torch.long)
    if family.decoder:
        mask[1, :4] = 0
    else:
        mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def real(family: Family, batch: dict) -> torch.Tensor:
    """`(B, T)` bool: the tokens whose outputs must agree (padded positions differ by design)."""
    if family.image:
        return torch.ones(batch["pixel_values"].shape[0], 17, dtype=torch.bool)  # 16 patches + CLS
    return batch["attention_mask"].bool()


def hidden(model, batch: dict) -> torch.Tensor:
    return model(**batch).last_hidden_state


EXACT_LIMITS = {
    "dense": lshattn.Dense(),
    "smyrf-one-cluster": lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32),
    "reformer-one-bucket": lshattn.Reformer(num_hashes=2, bucket_size=32, shared_qk=False),
}
LSH_SETTINGS = {
    "smyrf": lshattn.SMYRF(num_hashes=2, q_cluster_size=4, k_cluster_size=4),
    "reformer": lshattn.Reformer(num_hashes=2, bucket_size=4, num_buckets=4, shared_qk=False),
    "simhash": lshattn.SimHash(num_bits=2, mode="sparse"),
    "yoso": lshattn.YOSO(num_hashes=8, num_bits=4),
    # sinks and a window ranked by the padding mask the drop-in passes
    "smyrf-sinks-window": lshattn.SMYRF(num_hashes=2, q_cluster_size=4, k_cluster_size=4, sinks=1, window=1),
}


@dataclasses.dataclass(frozen=True)
class Spy(lshattn.Dense):
    """Exact attention that records the validated inputs of every call."""

    name: ClassVar[str] = ""  # not registered: parse("dense") keeps meaning Dense
    calls: ClassVar[list] = []

    def _attend(self, inputs):
        Spy.calls.append(inputs)
        return super()._attend(inputs)


@pytest.fixture
def spy():
    Spy.calls = []
    yield Spy()
    Spy.calls = []


# --- 2. every family: exact limit and LSH setting ----------------------------------------------


@pytest.mark.parametrize("limit", EXACT_LIMITS, ids=list(EXACT_LIMITS))
@pytest.mark.parametrize("name", FAMILIES)
def test_exact_limit_matches_eager(name, limit):
    """A method in its exact limit reproduces the model's eager attention on real tokens
    (padded batch; left padding for decoders)."""
    family = FAMILIES[name]
    reference, model = build(family)
    batch = inputs(family)
    hf.use(model, EXACT_LIMITS[limit])
    with torch.no_grad():
        expected, got = hidden(reference, batch), hidden(model, batch)
    keep = real(family, batch)
    assert (expected - got)[keep].abs().max() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.filterwarnings("ignore:.*applies no attention dropout")
def test_local_baseline_runs_deterministically_and_trains(name):
    """``Local`` draws nothing: two forwards are identical, it is not exact, gradients flow through it
    (its padding invariance through the drop-in is the catalogue's, at the attention level)."""
    family = FAMILIES[name]
    reference, model = build(family)
    batch = inputs(family)
    hf.use(model, lshattn.Local(sinks=1, window=2))
    keep = real(family, batch)
    with torch.no_grad():
        got = hidden(model, batch)
        again = hidden(model, batch)
        expected = hidden(reference, batch)
    assert torch.isfinite(got).all() and torch.equal(got, again)
    assert (expected - got)[keep].abs().max() > 1e-3, "a window of 2 should not be exact on these inputs"
    model.train()
    out = hidden(model, batch)
    (out[keep] ** 2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("setting", LSH_SETTINGS, ids=list(LSH_SETTINGS))
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.filterwarnings("ignore:.*applies no attention dropout")  # tested on its own below
def test_lsh_setting_is_finite_differs_and_trains(name, setting):
    family = FAMILIES[name]
    reference, model = build(family)
    batch = inputs(family)
    hf.use(model, LSH_SETTINGS[setting])
    with torch.no_grad():
        expected, got = hidden(reference, batch), hidden(model, batch)
    keep = real(family, batch)
    assert torch.isfinite(got).all()
    assert (expected - got)[keep].abs().max() > 1e-3, "an LSH setting should not be exact on these inputs"

    model.train()
    out = hidden(model, batch)
    (out[keep] ** 2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    query_weights = [g for n, g in grads.items() if any(q in n for q in ("query", "q_proj", "q_lin", "c_attn"))]
    assert query_weights and all(g.abs().sum() > 0 for g in query_weights)  # gradients flow through the method


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_generation_matches_eager(name):
    """Greedy generation with a KV cache and left padding, SMYRF with one cluster holding every
    key: the prompt and the decoding steps (one query, many cached keys, through SMYRF's store)
    give exact attention's tokens."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    config = family.config()
    config._attn_implementation = "eager"
    cls = getattr(transformers, family.model_class.replace("Model", "LMHeadModel" if name == "gpt2" else "ForCausalLM"))
    reference = cls(copy.deepcopy(config)).eval()
    model = cls(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    batch = inputs(family)
    hf.use(model, EXACT_LIMITS["smyrf-one-cluster"])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(reference.generate(**batch, **kwargs), model.generate(**batch, **kwargs))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_count_tallies_the_scores_of_every_layer(name):
    """``hf.count``: every layer's call, its method's ``aux.dot_products`` and the real query–key
    pairs (padding left out; T·S when causal too, as ``cost().budget``). With Dense and no padding
    the two agree; a SimHash setting spends less on the same inputs."""
    family = FAMILIES[name]
    _, model = build(family)
    batch = inputs(family)
    mask = batch["attention_mask"].bool()
    layers = len(hf.attention_layers(model))
    heads = model.config.num_attention_heads
    unpadded = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}
    hf.use(model, lshattn.Dense())
    with torch.no_grad(), hf.count(model) as tally:
        model(**unpadded)
    B, T = mask.shape
    assert tally.calls == layers
    assert tally.dot_products == tally.pairs == layers * B * heads * T * T
    assert tally.budget == 1.0
    assert tally.seconds > 0  # the attention calls were timed

    hf.use(model, lshattn.SimHash(num_hashes=2, num_bits=3, mode="importance"))
    with torch.no_grad(), hf.count(model) as tally:
        model(**batch)
    n = mask.sum(1)
    assert tally.pairs == layers * heads * int((n * n).sum())
    assert 0 < tally.budget < 1
    state = model.get_submodule(hf.attention_layers(model)[0].name).__dict__["_lshattn_state"]
    assert state.tally is None  # the block is over


def test_count_covers_cached_decoding_and_needs_use():
    """Generation: the prompt's calls count the method's scores, each cached step every cached key
    it sees (exact attention); a model without an lshattn setting is refused."""
    family = FAMILIES["llama"]
    config = family.config()
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match="lshattn.hf.use"):
        with hf.count(model):
            pass
    batch = {"input_ids": torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))}
    hf.use(model, lshattn.Dense())
    new = 3
    with torch.no_grad(), hf.count(model) as tally:
        model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=0)
    layers, heads = len(hf.attention_layers(model)), config.num_attention_heads
    prompt = 10 * 10
    steps = sum(10 + i + 1 for i in range(new - 1))  # step i: one query, 10 + i + 1 keys
    assert tally.calls == layers * new
    assert tally.dot_products == tally.pairs == layers * heads * (prompt + steps)


# --- 1. what reaches the method ----------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_method_gets_2d_masks_causal_and_scaling(name, spy):
    """The padding mask arrives as (B, S) keys and (B, T) queries, never T×S; is_causal and the
    module's scaling reach the method; GQA keys and values arrive with one head per query head."""
    family = FAMILIES[name]
    _, model = build(family)
    batch = inputs(family)
    hf.use(model, spy)
    with torch.no_grad():
        hidden(model, batch)
    layers = hf.attention_layers(model)
    calls_per_forward = model.config.num_hidden_layers
    assert len(Spy.calls) == calls_per_forward
    for i, call in enumerate(Spy.calls):
        B, H, T, _ = call.q.shape
        assert call.k.shape[1] == H
        module = layers[min(i, len(layers) - 1)].module
        assert call.scale == pytest.approx(module.scaling if module.scaling is not None else call.q.shape[-1] ** -0.5)
        assert call.causal is family.decoder
        assert call.dropout_p == 0.0
        if family.image:
            assert call.key_padding_mask is None and call.query_padding_mask is None
        else:
            mask = batch["attention_mask"].bool()
            assert call.key_padding_mask.shape == (B, T) and torch.equal(call.key_padding_mask, mask)
            assert torch.equal(call.query_padding_mask, mask)


@pytest.mark.parametrize(
    "method", [lshattn.Dense(), *LSH_SETTINGS.values()], ids=["dense", *LSH_SETTINGS]
)  # fmt: skip
def test_padded_batch_equals_the_sequence_alone(method):
    """The padding mask reaches every method: padding a sequence in a batch changes none of
    its real outputs (the pitfall: without the mask entry, padded keys would be attended).

    In float64: in float32 the model's matrix products can differ in the last bits between the
    two batch shapes, and a near-tie in a hash could then flip (see docs/hf.md, "Padding")."""
    family = FAMILIES["bert"]
    _, model = build(family)
    model.double()
    hf.use(model, method)
    batch = inputs(family)
    short = {k: v[1:2, :8] for k, v in batch.items()}
    with torch.no_grad():
        padded, alone = hidden(model, batch)[1, :8], hidden(model, short)[0]
    assert padded.dtype == torch.float64
    assert (padded - alone).abs().max() <= 1e-10  # measured <= 5e-16


def test_mask_function_returns_the_padding_mask_and_exact_masks_only_for_decoding():
    from transformers import masking_utils

    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    common = dict(batch_size=2, attention_mask=mask, device="cpu", dtype=torch.float32)
    for pattern in (masking_utils.bidirectional_mask_function, masking_utils.causal_mask_function):
        out = hf._padding_mask(q_length=4, kv_length=4, mask_function=pattern, **common)
        assert out.shape == (2, 4) and torch.equal(out, mask)
    assert hf._padding_mask(q_length=4, kv_length=4, mask_function=masking_utils.causal_mask_function,
                            batch_size=2, attention_mask=None) is None  # fmt: skip
    step = hf._padding_mask(q_length=1, kv_length=4, q_offset=3, mask_function=masking_utils.causal_mask_function,
                            **common)  # fmt: skip
    assert step.shape == (2, 1, 1, 4) and torch.equal(step[:, 0, 0], mask)
    with pytest.raises(ValueError, match="beyond padding and causality"):
        hf._padding_mask(q_length=4, kv_length=4, mask_function=masking_utils.sliding_window_causal_mask_function(2),
                         **common)  # fmt: skip


def test_causal_step_with_a_2d_mask_sees_the_right_keys():
    """A causal call with T < S and a plain padding mask: queries are the last T positions."""
    from lshattn import testing

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = testing.make_qkv(2, 4, 2, 5, 8)
    mask = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    out, _ = hf._attention(module, q, k, v, mask, scaling=None)
    visible = mask[:, None, None, :] & (torch.arange(5) <= torch.arange(3, 5)[:, None])
    scores = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~visible, float("-inf"))
    expected = torch.softmax(scores, -1) @ v
    assert (out.transpose(1, 2) - expected).abs().max() <= 1e-5


def test_dropout_in_training_only(spy):
    family = FAMILIES["bert"]
    _, model = build(family, attention_probs_dropout_prob=0.25, hidden_dropout_prob=0.0)
    hf.use(model, spy)
    batch = inputs(family)
    model.train()
    hidden(model, batch)
    assert {c.dropout_p for c in Spy.calls} == {0.25}
    Spy.calls.clear()
    model.eval()
    hidden(model, batch)
    assert {c.dropout_p for c in Spy.calls} == {0.0}


def test_dropout_applies_to_lsh_methods_in_training():
    family = FAMILIES["bert"]
    _, model = build(family, attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    hf.use(model, LSH_SETTINGS["smyrf"], redraw_in_training=False)
    batch = inputs(family)
    with torch.no_grad():
        first, again = hidden(model, batch), hidden(model, batch)
        model.train()
        trained = hidden(model, batch)
    assert torch.equal(first, again)
    assert not torch.allclose(first, trained)


@pytest.mark.parametrize("method", [lshattn.YOSO(num_hashes=4, num_bits=4), lshattn.SimHash(num_bits=2)], ids=str)
def test_methods_without_dropout_train_without_it_and_say_so(method):
    family = FAMILIES["bert"]
    _, model = build(family, attention_probs_dropout_prob=0.25, hidden_dropout_prob=0.0)
    hf.use(model, method)
    model.train()
    with pytest.warns(UserWarning, match=f"{type(method).__name__} applies no attention dropout"):
        out = hidden(model, inputs(family))
    out.sum().backward()
    assert torch.isfinite(out).all()


# --- layers, switching, restoring ----------------------------------------------------------------


def test_layers_applies_the_method_to_those_layers_only():
    family = FAMILIES["bert"]
    reference, model = build(family)
    batch = inputs(family)
    keep = real(family, batch)
    hf.use(model, LSH_SETTINGS["smyrf"], layers=[1])
    assert [layer.method for layer in hf.attention_layers(model)] == [None, LSH_SETTINGS["smyrf"]]
    with torch.no_grad():
        expected = reference(**batch, output_hidden_states=True).hidden_states
        got = model(**batch, output_hidden_states=True).hidden_states
    assert (expected[1] - got[1])[keep].abs().max() <= 1e-5  # layer 0 is exact
    assert (expected[2] - got[2])[keep].abs().max() > 1e-3  # layer 1 runs SMYRF


def test_switching_back_and_forth_on_a_live_model():
    """Train with one attention, infer with the other (SMYRF does both ways)."""
    family = FAMILIES["gpt2"]
    reference, model = build(family)
    batch = inputs(family)
    keep = real(family, batch)
    smyrf = LSH_SETTINGS["smyrf"]
    with torch.no_grad():
        exact = hidden(reference, batch)
        hf.use(model, smyrf)
        first = hidden(model, batch)
        hf.use(model, None)
        assert model.config._attn_implementation == "eager"
        assert not hasattr(model.config, "lshattn")
        assert torch.equal(hidden(model, batch), exact)  # the model's own attention, bit for bit
        hf.use(model, smyrf)
        assert torch.equal(hidden(model, batch), first)
        hf.use(model, smyrf, layers=[0])
        partial = hidden(model, batch)
        assert not torch.allclose(partial[keep], first[keep])
        hf.use(model, smyrf)
        assert torch.equal(hidden(model, batch), first)
        hf.use(model, "dense")
        assert (hidden(model, batch) - exact)[keep].abs().max() <= 1e-5


def test_string_methods_and_layer_listing():
    _, model = build(FAMILIES["llama"])
    hf.use(model, "smyrf:num_hashes=1,q_cluster_size=4,k_cluster_size=4", layers=[0])
    layers = hf.attention_layers(model)
    assert [(layer.index, layer.name) for layer in layers] == [(0, "layers.0.self_attn"), (1, "layers.1.self_attn")]
    assert layers[0].method == lshattn.SMYRF(num_hashes=1, q_cluster_size=4, k_cluster_size=4)
    assert layers[1].method is None
    assert model.config.lshattn == {
        "method": "smyrf:num_hashes=1,q_cluster_size=4,k_cluster_size=4",
        "layers": [0],
        "seed": 0,
        "redraw_in_training": True,
        "allow_shared_qk": False,
        "prefill": "method",
        "gqa": "shared",
    }


# --- 4. reproducibility ------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", LSH_SETTINGS, ids=list(LSH_SETTINGS))
def test_eval_forwards_are_identical_and_follow_the_seed(setting):
    family = FAMILIES["bert"]
    _, model = build(family)
    batch = inputs(family)
    with torch.no_grad():
        hf.use(model, LSH_SETTINGS[setting], seed=0)
        a, b = hidden(model, batch), hidden(model, batch)
        hf.use(model, LSH_SETTINGS[setting], seed=1)
        c = hidden(model, batch)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- 5. training: projections per optimizer step ------------------------------------------------

NO_DROPOUT = {
    "bert": dict(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0),
    "llama": dict(attention_dropout=0.0),
    "albert": dict(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0),
}


def training_model(name: str, setting: str = "smyrf", **kwargs):
    """A tiny model without dropout, running an LSH setting, in training mode."""
    _, model = build(FAMILIES[name], **NO_DROPOUT[name])
    hf.use(model, LSH_SETTINGS[setting], **kwargs)
    return model.train()


def frozen_optimizer(model) -> torch.optim.Optimizer:
    """An optimizer over the model's parameters whose steps leave the weights as they are
    (lr 0): what changes after its step() is only the hash projections."""
    return torch.optim.SGD(model.parameters(), lr=0.0)


def enable_checkpointing(model) -> None:
    """Gradient checkpointing: ``activation_checkpointing_enable`` where transformers has it,
    else the older ``gradient_checkpointing_enable`` (a deprecated alias in recent versions)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def grads_of(model, batch: dict, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = hidden(model, batch)
    weights = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(5))
    ((out[keep] @ weights) ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def draws(monkeypatch):
    """The (layer, step) pairs every generator of a method layer is seeded with, in call order."""
    seen = []
    mix = hf._mix_seed

    def recording(seed, index, step):
        seen.append((index, step))
        return mix(seed, index, step)

    monkeypatch.setattr(hf, "_mix_seed", recording)
    return seen


@pytest.mark.parametrize("setting", LSH_SETTINGS, ids=list(LSH_SETTINGS))
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_forward(name, setting, draws):
    """The defect this guards: projections seeded by a per-forward counter made the forward
    recomputed in backward draw other projections, so with the default redraw_in_training the
    gradients were 0.8-144 % off while the loss was the same. Seeded by the optimizer step, the
    recomputed forward draws what the forward drew, and every gradient is the plain one."""
    family = FAMILIES[name]
    _, plain = build(family, **NO_DROPOUT[name])
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    batch = inputs(family)
    if family.decoder:
        batch["use_cache"] = False
    keep = real(family, batch)
    for model in (plain, checkpointed):
        hf.use(model, LSH_SETTINGS[setting])  # redraw_in_training=True: the default
        model.train()

    expected = grads_of(plain, batch, keep)
    forward_draws = list(draws)
    draws.clear()
    got = grads_of(checkpointed, batch, keep)
    layers = plain.config.num_hidden_layers
    assert forward_draws == [(i, 1) for i in range(layers)]  # step 0 trains with (seed, layer, 1)
    assert sorted(draws) == sorted(forward_draws * 2)  # really recomputed, with the same seeds

    assert expected.keys() == got.keys() and any("q_proj" in n or "query" in n for n in got)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")

    # The comparison is sensitive to the projections: other ones (the next step's, which the
    # recomputed forward drew before the fix) move the gradients far beyond that tolerance.
    hf.set_step(plain, 1)
    redrawn = grads_of(plain, batch, keep)
    assert max(relative_error(redrawn[n], expected[n]) for n in expected) > 1e-3


def test_forwards_between_optimizer_steps_hash_alike_and_a_step_redraws():
    """Micro-batches of one step (gradient accumulation) share projections; the model's
    optimizer.step() redraws them; an optimizer over other parameters does not."""
    family = FAMILIES["bert"]
    model = training_model("bert")
    batch = inputs(family)
    optimizer = frozen_optimizer(model)
    unrelated = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.0)
    outputs = []
    for _ in range(3):
        micro = [hidden(model, batch) for _ in range(3)]
        (micro[0] ** 2).mean().backward()  # a backward between forwards changes nothing either
        micro.append(hidden(model, batch))
        assert all(torch.equal(m, micro[0]) for m in micro)
        unrelated.step()
        assert torch.equal(hidden(model, batch), micro[0])  # unrelated steps do not count
        outputs.append(micro[0].detach())
        optimizer.step()
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert not torch.equal(outputs[0], outputs[2])


def test_copies_of_a_model_hash_alike_at_every_step():
    """Like DDP ranks: models built alike (or copied, or unpickled) with the same seed, each
    stepped by its own optimizer, draw the same projections at every step."""
    family = FAMILIES["llama"]
    batch = inputs(family)
    first, second = training_model("llama"), training_model("llama")
    copied = copy.deepcopy(first)  # a copy keeps its own counter
    pickled = pickle.loads(pickle.dumps(first))  # registered for steps at its first forward
    models = [first, second, copied, pickled]
    optimizers = [frozen_optimizer(model) for model in models]
    previous = None
    with torch.no_grad():
        for _ in range(3):
            outs = [hidden(model, batch) for model in models]
            assert all(torch.equal(out, outs[0]) for out in outs)
            assert previous is None or not torch.equal(outs[0], previous)
            previous = outs[0]
            for optimizer in optimizers:
                optimizer.step()
        optimizers[2].step()  # only the copy steps: the original does not follow
        assert not torch.equal(hidden(copied, batch), hidden(first, batch))


def test_set_step_equals_reaching_the_step_by_optimizer_steps():
    family = FAMILIES["bert"]
    batch = inputs(family)
    stepped, set_ = training_model("bert"), training_model("bert")
    optimizer = frozen_optimizer(stepped)
    with torch.no_grad():
        for _ in range(3):
            optimizer.step()
        assert hf.set_step(set_, 3) is set_
        assert torch.equal(hidden(set_, batch), hidden(stepped, batch))
        hf.set_step(stepped, 0)  # e.g. a callback resuming from global_step
        at_zero = hidden(stepped, batch)
        assert torch.equal(at_zero, hidden(training_model("bert"), batch))
        optimizer.step()  # counting goes on from the step set
        hf.set_step(set_, 1)
        assert torch.equal(hidden(stepped, batch), hidden(set_, batch))


def test_set_step_refuses_bad_arguments():
    _, model = build(FAMILIES["bert"])
    with pytest.raises(ValueError, match=r"no lshattn method.*lshattn\.hf\.use"):
        hf.set_step(model, 0)
    hf.use(model, LSH_SETTINGS["smyrf"])
    for bad in (1.0, "3", True, None):
        with pytest.raises(TypeError, match="step must be an integer"):
            hf.set_step(model, bad)
    with pytest.raises(ValueError, match="step must be >= 0"):
        hf.set_step(model, -1)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.set_step(torch.nn.Linear(2, 2), 0)
    hf.set_step(model, 2**40)  # any size: the seed is a hash of it
    hf.use(model, None)
    with pytest.raises(ValueError, match="no lshattn method"):
        hf.set_step(model, 0)


def test_use_again_keeps_the_step_and_none_removes_it():
    family = FAMILIES["bert"]
    batch = inputs(family)
    model = training_model("bert")
    optimizer = frozen_optimizer(model)
    optimizer.step()
    optimizer.step()
    hf.use(model, LSH_SETTINGS["reformer"])  # switching methods mid-training keeps counting
    at_two = training_model("bert", "reformer")
    hf.set_step(at_two, 2)
    with torch.no_grad():
        assert torch.equal(hidden(model, batch), hidden(at_two, batch))
        hf.use(model, None)
        hf.use(model, LSH_SETTINGS["reformer"])  # a fresh counter
        assert torch.equal(hidden(model, batch), hidden(training_model("bert", "reformer"), batch))
    # one of each, however many use calls
    assert list(model._forward_pre_hooks.values()) == [hf._register_model, hf._refuse_fixed_size_caches]
    hf.use(model, None)
    assert not model._forward_pre_hooks and not hasattr(model, hf._STEPS)


def test_eval_projections_do_not_move_with_training_steps():
    family = FAMILIES["bert"]
    batch = inputs(family)
    model = training_model("bert").eval()
    optimizer = frozen_optimizer(model)
    with torch.no_grad():
        evaluated = hidden(model, batch)
        model.train()
        trained = hidden(model, batch)
        for _ in range(2):
            optimizer.step()
        model.eval()
        assert torch.equal(hidden(model, batch), evaluated)
        hf.set_step(model, 7)
        assert torch.equal(hidden(model, batch), evaluated)
        hf.use(model, LSH_SETTINGS["smyrf"], redraw_in_training=False)
        model.train()
        fixed = hidden(model, batch)
    assert not torch.equal(trained, evaluated)  # step 0 trains on other projections than eval's
    assert torch.equal(fixed, evaluated)  # redraw_in_training=False keeps eval's


def test_albert_depths_share_projections_within_a_step(draws):
    """ALBERT's one shared attention module serves every depth: within a step (and in eval)
    all depths draw the same projections."""
    model = training_model("albert")
    batch = inputs(FAMILIES["albert"])
    with torch.no_grad():
        hidden(model, batch)
        frozen_optimizer(model).step()
        hidden(model, batch)
    assert draws == [(0, 1), (0, 1), (0, 2), (0, 2)]


def test_save_and_reload_gives_the_same_outputs(tmp_path):
    family = FAMILIES["bert"]
    _, model = build(family)
    batch = inputs(family)
    hf.use(model, LSH_SETTINGS["smyrf"], layers=[1], seed=7)
    with torch.no_grad():
        before = hidden(model, batch)
    model.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation != hf.NAME  # not saved: loads with exact attention anywhere
    assert loaded.config.lshattn["seed"] == 7
    hf.use_saved(loaded)
    with torch.no_grad():
        assert torch.equal(hidden(loaded, batch), before)
    again = transformers.BertModel.from_pretrained(tmp_path, attn_implementation=hf.NAME).eval()
    hf.use(again, LSH_SETTINGS["smyrf"], layers=[1], seed=7)  # re-applying by hand is the same
    with torch.no_grad():
        assert torch.equal(hidden(again, batch), before)


def test_a_setting_per_layer_runs_and_is_saved(tmp_path):
    """``use(model, {layer: method})``: each listed layer runs its method, the others exact
    attention; the same as one method on those layers when they share it; the record survives
    save_pretrained and ``use_saved`` re-applies it."""
    family = FAMILIES["bert"]
    _, model = build(family)
    batch = inputs(family)
    hf.use(model, {1: LSH_SETTINGS["smyrf"]}, seed=7)
    with torch.no_grad():
        mapped = hidden(model, batch)
    hf.use(model, LSH_SETTINGS["smyrf"], layers=[1], seed=7)
    with torch.no_grad():
        assert torch.equal(hidden(model, batch), mapped)
    split = {0: LSH_SETTINGS["simhash"], 1: "smyrf:num_hashes=2,q_cluster_size=4,k_cluster_size=4"}
    hf.use(model, split, seed=3)
    assert [layer.method for layer in hf.attention_layers(model)] == [LSH_SETTINGS["simhash"], LSH_SETTINGS["smyrf"]]
    with torch.no_grad():
        before = hidden(model, batch)
    model.save_pretrained(tmp_path)
    loaded = hf.use_saved(transformers.BertModel.from_pretrained(tmp_path).eval())
    assert [layer.method for layer in hf.attention_layers(loaded)] == [LSH_SETTINGS["simhash"], LSH_SETTINGS["smyrf"]]
    with torch.no_grad():
        assert torch.equal(hidden(loaded, batch), before)
    with pytest.raises(ValueError, match="already names its layers"):
        hf.use(model, split, layers=[0])
    with pytest.raises(TypeError, match="method must be a lshattn method spec"):
        hf.use(model, {0: 3})
    with pytest.raises(ValueError, match="out of range"):
        hf.use(model, {5: LSH_SETTINGS["smyrf"]})
    hf.use(model, {0: None, 1: None})  # nothing to run: exact attention, as use(model, None)
    assert model.config._attn_implementation != hf.NAME


def test_deepcopy_keeps_the_method():
    family = FAMILIES["bert"]
    _, model = build(family)
    batch = inputs(family)
    hf.use(model, LSH_SETTINGS["smyrf"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(hidden(model, batch), hidden(twin, batch))


def test_decoder_with_cross_attention_matches_eager():
    """BERT as a decoder: causal self-attention and cross-attention to encoder states of the same
    length (the encoder's padding is not mistaken for a query mask)."""
    family = FAMILIES["bert"]
    reference, model = build(family, is_decoder=True, add_cross_attention=True)
    names = [layer.name for layer in hf.attention_layers(model)]
    assert names[:2] == ["encoder.layer.0.attention.self", "encoder.layer.0.crossattention.self"]
    batch = inputs(family)
    batch["encoder_hidden_states"] = torch.randn(2, L, 32, generator=torch.Generator().manual_seed(3))
    batch["encoder_attention_mask"] = torch.ones(2, L, dtype=torch.long)
    batch["encoder_attention_mask"][0, 9:] = 0
    batch["use_cache"] = False
    hf.use(model, EXACT_LIMITS["smyrf-one-cluster"])
    with torch.no_grad():
        expected, got = hidden(reference, batch), hidden(model, batch)
    assert (expected - got)[real(family, batch)].abs().max() <= 1e-5


def test_task_head_models_work():
    torch.manual_seed(0)
    config = FAMILIES["bert"].config(num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    hf.use(model, LSH_SETTINGS["smyrf"])
    batch = inputs(FAMILIES["bert"])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: transformers.DebertaV2Model(transformers.DebertaV2Config(**TINY)), "disentangled"),
        (lambda: transformers.MPNetModel(transformers.MPNetConfig(**TINY)), "relative position bias"),
        (
            lambda: transformers.T5Model(
                transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=VOCAB)
            ),
            "position_bias",
        ),
    ],
    ids=["deberta-v2", "mpnet", "t5"],
)
def test_unroutable_models_are_refused_with_the_reason(make, why):
    model = make()
    with pytest.raises(ValueError, match=why) as err:
        hf.use(model, LSH_SETTINGS["smyrf"])
    assert type(model).__name__ in str(err.value) and "AttentionInterface" in str(err.value)


def test_reformer_shared_qk_is_refused():
    _, model = build(FAMILIES["bert"])
    with pytest.raises(ValueError, match="shared_qk=False"):
        hf.use(model, lshattn.Reformer(shared_qk=True))


def test_reformer_shared_qk_runs_when_allowed_and_ignores_the_key_projection(tmp_path):
    """``allow_shared_qk=True`` (a model trained from scratch with shared QK): the keys are the
    normalised queries, so the key projection's weights cannot change the output; the setting
    survives save_pretrained / from_pretrained."""
    family = FAMILIES["bert"]
    _, model = build(family)
    method = lshattn.Reformer(num_hashes=2, bucket_size=4, num_buckets=4, shared_qk=True)
    hf.use(model, method, allow_shared_qk=True)
    batch = inputs(family)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        for layer in model.encoder.layer:
            layer.attention.self.key.weight.normal_()
        other_keys = model(**batch).last_hidden_state
    torch.testing.assert_close(other_keys, out, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = hf.use_saved(type(model).from_pretrained(tmp_path).eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, out, atol=1e-6, rtol=1e-6)


def test_reformer_shared_qk_on_grouped_query_heads_is_the_same_in_both_gqa_modes():
    """Shared-QK keys are the queries, a query head each: the values follow them per query head
    (with ``gqa="shared"`` they arrive a key head each), and the projections are a query head's in
    both modes, so both give the same outputs."""
    family = FAMILIES["llama"]
    _, model = build(family)
    batch = inputs(family)
    method = lshattn.Reformer(num_hashes=2, bucket_size=4, num_buckets=4, shared_qk=True)
    outs = {}
    with torch.no_grad():
        for gqa in hf.GQA_MODES:
            hf.use(model, method, allow_shared_qk=True, gqa=gqa)
            outs[gqa] = hidden(model, batch)
    assert torch.isfinite(outs["shared"]).all()
    torch.testing.assert_close(outs["shared"], outs["per-query-head"], atol=0, rtol=0)


def test_albert_shared_layers_refuse_layers_but_take_all():
    family = FAMILIES["albert"]
    reference, model = build(family)
    with pytest.raises(ValueError, match="shares its attention modules"):
        hf.use(model, LSH_SETTINGS["smyrf"], layers=[1])
    assert len(hf.attention_layers(model)) == 1  # one module serves both layers
    hf.use(model, LSH_SETTINGS["smyrf"])
    batch = inputs(family)
    with torch.no_grad():
        assert torch.isfinite(hidden(model, batch)).all()


def test_bad_layers_and_bad_methods():
    _, model = build(FAMILIES["bert"])
    with pytest.raises(ValueError, match="out of range.*2 attention layers"):
        hf.use(model, LSH_SETTINGS["smyrf"], layers=[2])
    with pytest.raises(TypeError, match="integers"):
        hf.use(model, LSH_SETTINGS["smyrf"], layers=["1"])
    with pytest.raises(TypeError, match="method spec"):
        hf.use(model, object())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.use(torch.nn.Linear(2, 2), LSH_SETTINGS["smyrf"])


def test_sliding_window_models_are_refused():
    torch.manual_seed(0)
    config = transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=4)
    model = transformers.MistralModel(config).eval()
    hf.use(model, lshattn.Dense())
    batch = inputs(FAMILIES["llama"])
    with pytest.raises(ValueError, match="sliding"):
        model(**batch)


def test_a_4d_mask_is_refused_on_method_layers():
    family = FAMILIES["bert"]
    _, model = build(family)
    hf.use(model, LSH_SETTINGS["smyrf"])
    batch = inputs(family)
    mask4d = batch["attention_mask"].bool()[:, None, None, :].expand(2, 1, L, L)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=batch["input_ids"], attention_mask=mask4d)


def test_import_lshattn_does_not_import_transformers():
    code = (
        "import sys, lshattn; assert 'transformers' not in sys.modules; "
        "lshattn.data; assert 'transformers' not in sys.modules; "
        "lshattn.hf.use; assert 'transformers' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
