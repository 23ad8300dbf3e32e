"""Cached decoding through ``lshattn.hf`` (``lshattn.decode``): the decoding steps hash only the
new keys, and teacher-forced decoding equals the causal prefill for every strictly causal method
(SimHash, YOSO, whole-bucket Reformer, TopK, Local; DESIGN §4, decoding)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lshattn
from lshattn import hf

VOCAB = 64


def tiny_llama(layers: int = 2) -> transformers.LlamaForCausalLM:
    """4 query heads sharing 2 key/value heads (GQA), 2 layers by default."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    """4 heads, 2 layers, learned positions, a per-layer logit scale."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     scale_attn_by_inverse_layer_idx=True)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def prompt(B: int = 2, L: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as generation pads
    return ids, mask


def decoded_logits(model, ids, mask, start: int) -> torch.Tensor:
    """Logits at positions start.. of ``ids``, the prompt ids[:, :start] prefilled, then one token
    a step through the cache (teacher forcing)."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :start], attention_mask=mask[:, :start], use_cache=True)
        past, steps = out.cache, []
        for t in range(start, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=past, use_cache=True)
            past = out.cache
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


SETTINGS = {
    "sparse": lshattn.SimHash(num_hashes=2, num_bits=3, mode="sparse"),
    "importance": lshattn.SimHash(num_hashes=3, num_bits=2, mode="importance"),
    "faithful": lshattn.SimHash(num_hashes=2, num_bits=3),
    "faithful-all": lshattn.SimHash(num_hashes=2, num_bits=2, rule="all"),
    "sparse-sinks-window": lshattn.SimHash(num_hashes=1, num_bits=4, mode="sparse", sinks=2, window=3),
    "importance-sinks-window": lshattn.SimHash(num_hashes=2, num_bits=4, mode="importance", sinks=1, window=2),
    "faithful-sinks": lshattn.SimHash(num_hashes=1, num_bits=3, sinks=2),
    "faithful-window": lshattn.SimHash(num_hashes=1, num_bits=3, window=4),
    "yoso-tables": lshattn.YOSO(num_hashes=4, num_bits=2),  # 4 buckets, 9 cached keys: tables
    "yoso-codes": lshattn.YOSO(num_hashes=3, num_bits=6),  # 64 buckets: codes compared
    "yoso-unnormalised-sinks-window": lshattn.YOSO(num_hashes=4, num_bits=3, normalize_output=False, sinks=2, window=3),
    "yoso-e": lshattn.YOSO(num_bits=3, expectation=True),
    "yoso-e-unnormalised": lshattn.YOSO(num_bits=5, expectation=True, normalize_output=False),
    "topk": lshattn.TopK(fraction=0.3),
    "topk-tail-sinks-window": lshattn.TopK(fraction=0.2, tail=True, sinks=1, window=2),
    "sketchtopk": lshattn.SketchTopK(fraction=0.3, num_bits=16),
    "sketchtopk-sinks-window": lshattn.SketchTopK(fraction=0.2, num_bits=8, sinks=1, window=2),
    "local": lshattn.Local(sinks=2, window=3),
    "local-tail": lshattn.Local(sinks=1, window=2, tail=True),
    # Reformer's strictly causal prefill: its whole buckets are what a decoding step attends.
    "reformer-whole-buckets": lshattn.Reformer(num_hashes=2, num_buckets=4, shared_qk=False, whole_buckets=True),
    "reformer-whole-buckets-dedup-sinks-window": lshattn.Reformer(
        num_hashes=3, num_buckets=8, shared_qk=False, whole_buckets=True, correct_duplicates=True, sinks=1, window=2
    ),
}


@pytest.mark.parametrize("family, gqa", [("llama", "per-query-head"), ("gpt2", "per-query-head"), ("llama", "shared")])
@pytest.mark.parametrize("name", SETTINGS)
def test_teacher_forced_decoding_equals_the_causal_prefill(name, family, gqa):
    """Over every strictly causal setting, on GQA Llama (projections and stores a query head, or
    a key head: ``gqa="shared"``) and GPT-2."""
    model = MODELS[family]()
    hf.use(model, SETTINGS[name], seed=5, gqa=gqa)
    ids, mask = prompt()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    start = 9
    steps = decoded_logits(model, ids, mask, start)
    torch.testing.assert_close(steps, full[:, start:], atol=1e-5, rtol=1e-5)
    # and the setting is not exact attention on these inputs
    hf.use(model, None)
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
    assert (exact[:, start:] - full[:, start:]).abs().max() > 1e-4


STORED = ["sparse-sinks-window", "yoso-tables", "sketchtopk-sinks-window"]


@pytest.mark.parametrize("name", STORED)
def test_shared_projections_store_each_key_head_once(name):
    """``gqa="shared"``: the stores of SimHash, YOSO (tables too) and SketchTopK hold a key head's
    codes once, 1/G of those a query head's projections need (G = 2 query heads a key head)."""
    ids, mask = prompt()
    stores = {}
    for gqa in hf.GQA_MODES:
        model = tiny_llama()
        hf.use(model, SETTINGS[name], seed=5, gqa=gqa)
        decoded_logits(model, ids, mask, 9)
        stores[gqa] = [layer.module.__dict__[hf._STATE].store for layer in hf.attention_layers(model)]
    for own, shared in zip(stores["per-query-head"], stores["shared"]):
        assert own.buffer.shape[1] == 4 and shared.buffer.shape[1] == 2  # query heads, key heads
        assert own.planes.shape[0] == 4 and shared.planes.shape[0] == 2
        if getattr(shared, "tables", None) is not None:
            assert shared.tables.numel() * 2 == own.tables.numel()


def test_shared_projections_change_nothing_without_gqa():
    """On a model with as many key heads as query heads the two ``gqa`` settings draw the same
    projections: the same logits, bit for bit, in the prefill and in decoding."""
    ids, mask = prompt()
    results = []
    for gqa in hf.GQA_MODES:
        model = tiny_gpt2()
        hf.use(model, SETTINGS["sparse-sinks-window"], seed=5, gqa=gqa)
        with torch.no_grad():
            results.append((model(input_ids=ids, attention_mask=mask).logits, decoded_logits(model, ids, mask, 9)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gqa_modes_differ_on_gqa_models_are_saved_and_bad_modes_are_refused(tmp_path):
    """On GQA Llama the two settings draw different projections (their outputs differ); the
    mode is recorded, and ``use_saved`` restores it; a mode other than the two is refused with
    them named."""
    ids, mask = prompt()
    logits = {}
    for gqa in hf.GQA_MODES:
        model = tiny_llama()
        hf.use(model, SETTINGS["sparse"], seed=5, gqa=gqa)
        assert model.config.lshattn["gqa"] == gqa
        with torch.no_grad():
            logits[gqa] = model(input_ids=ids, attention_mask=mask).logits
    assert (logits["shared"] - logits["per-query-head"]).abs().max() > 1e-4
    model.save_pretrained(tmp_path)  # the last: gqa="shared"
    loaded = hf.use_saved(transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits["shared"])
    with pytest.raises(ValueError, match="gqa must be one of .*'per-query-head', 'shared'.*got 'kv'"):
        hf.use(tiny_llama(), SETTINGS["sparse"], gqa="kv")


@pytest.mark.parametrize("mode", ["sparse", "importance", "faithful"])
def test_every_code_colliding_decodes_as_exact_attention(mode):
    model = tiny_llama()
    ids, mask = prompt()
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
    hf.use(model, lshattn.SimHash(num_hashes=2, num_bits=0, mode=mode))
    torch.testing.assert_close(decoded_logits(model, ids, mask, 9), exact[:, 9:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [name for name in SETTINGS if name.startswith("yoso")] + ["sparse-sinks-window"])
def test_without_padding_decoding_equals_the_prefill_too(name):
    """No padding: transformers passes no mask, and YOSO's step takes its path with no pass over
    the cached keys (the sinks and window from their positions)."""
    model = tiny_llama()
    hf.use(model, SETTINGS[name], seed=5)
    ids, _ = prompt()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(decoded_logits(model, ids, mask, 9), full[:, 9:], atol=1e-5, rtol=1e-5)


def test_a_yoso_window_over_everything_decodes_as_yoso_e():
    """YOSO's covered pairs take the exact kernel: a window over every key decodes as YOSO-E, the
    expectation YOSO-m samples (its exact limit)."""
    model = tiny_llama()
    ids, mask = prompt()
    hf.use(model, lshattn.YOSO(num_hashes=2, num_bits=3, expectation=True))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    hf.use(model, lshattn.YOSO(num_hashes=2, num_bits=3, sinks=1, window=20))
    torch.testing.assert_close(decoded_logits(model, ids, mask, 9), expected[:, 9:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method", [lshattn.YOSO(num_hashes=4, num_bits=2, sinks=1), lshattn.YOSO(num_hashes=2, num_bits=8)]
)
def test_yoso_generates_with_its_tables(method):
    """``generate`` with YOSO: each layer keeps bucket tables (or codes) that grow one key a step;
    only the sinks' pairs are scored."""
    model = tiny_llama()
    ids, mask = prompt()
    hf.use(model, method)
    with torch.no_grad(), hf.count(model) as tally:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 14 + 4)
    store = model.model.layers[0].self_attn.__dict__["_lshattn_state"].store
    assert isinstance(store, lshattn.decode.YOSOStore)
    assert store.length == 14 + 3  # the prompt and 3 generated tokens (the 4th is not fed back)
    assert (store.tables is None) == (2**method.num_bits > 14)
    layers, B, H = 2, 2, model.config.num_attention_heads
    # the sink slots: every query of the prefill (padded ones included, as its cost counts), then
    # the one real sink of each of the 3 decoding steps' queries
    assert tally.dot_products == layers * B * H * method.sinks * (14 + 3)


EVERY_METHOD = [
    lshattn.SimHash(num_hashes=2, num_bits=3),
    lshattn.YOSO(num_hashes=4, num_bits=3, sinks=1, window=2),
    lshattn.Reformer(num_hashes=2, bucket_size=4, num_buckets=4, shared_qk=False, sinks=1, window=2),
    lshattn.Reformer(num_hashes=3, bucket_size=4, num_buckets=8, shared_qk=False, correct_duplicates=True),
    lshattn.SMYRF(num_hashes=2, q_cluster_size=4, k_cluster_size=4, sinks=1, window=2),
    lshattn.SMYRF(num_hashes=2, q_cluster_size=4, k_cluster_size=3, correct_duplicates=True),
    lshattn.TopK(fraction=0.25, sinks=1),
    lshattn.SketchTopK(fraction=0.25, num_bits=16, sinks=1),
    lshattn.Local(sinks=2, window=3),
]


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("method", EVERY_METHOD, ids=str)
def test_every_method_generates_through_its_decoding_step(method, family):
    """``generate`` with each method: every cached step runs the method's decoding step (counted
    as fewer scores than the cached keys, but TopK's, which scores all to choose), never sdpa."""
    model = MODELS[family]()
    ids, mask = prompt()
    hf.use(model, method)
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)
        with hf.count(model) as tally:
            step = model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                         cache=prefill.cache, use_cache=True)  # fmt: skip
    assert torch.isfinite(step.logits).all()
    assert tally.calls == 2
    expected = 1.0 if isinstance(method, lshattn.TopK) else None
    assert tally.budget == expected if expected else 0 < tally.budget < 1
    assert lshattn.decode.decodes(method)
    for beams in (1, 2):  # greedy, and beam search (which reorders the cache and the stores)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=beams,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
        assert out.shape == (2, 14 + 3)


@pytest.mark.parametrize(
    "method",
    [
        lshattn.Reformer(num_hashes=2, bucket_size=4, num_buckets=4, shared_qk=False, sinks=1, window=20),
        lshattn.SMYRF(num_hashes=2, q_cluster_size=4, k_cluster_size=4, window=20),
        lshattn.SMYRF(num_hashes=3, q_cluster_size=32, k_cluster_size=32),  # every key in the cluster
        lshattn.SMYRF(num_hashes=3, q_cluster_size=32, k_cluster_size=32, correct_duplicates=True),
        lshattn.TopK(fraction=1.0),
        lshattn.SketchTopK(fraction=1.0, num_bits=8),
        lshattn.Local(sinks=0, window=20),
    ],
    ids=str,
)
def test_reformer_smyrf_and_the_baselines_decode_as_exact_attention_when_they_cover_everything(method):
    model = tiny_llama()
    ids, mask = prompt()
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
    hf.use(model, method)
    torch.testing.assert_close(decoded_logits(model, ids, mask, 9), exact[:, 9:], atol=1e-5, rtol=1e-5)


def test_reformer_with_shared_qk_refuses_to_decode_through_a_cache():
    model = tiny_llama()
    ids, mask = prompt()
    hf.use(model, lshattn.Reformer(num_hashes=1, bucket_size=4, num_buckets=4), allow_shared_qk=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        decoded_logits(model, ids, mask, 9)


def test_generate_runs_and_counts_the_decode_budget():
    """``generate`` works unchanged; ``hf.count`` sees each decoding step score only colliding keys."""
    model = tiny_llama()
    ids, mask = prompt()
    hf.use(model, lshattn.SimHash(num_hashes=1, num_bits=3, mode="sparse"))
    with torch.no_grad(), hf.count(model) as tally:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 14 + 5)
    assert tally.calls == 2 * 5  # the prompt and 4 decoding steps, in 2 layers
    assert 0 < tally.budget < 0.8


def test_a_query_left_without_keys_gets_zeros_and_is_counted():
    """Sparse SimHash with long codes and no sinks or window: most decoding queries collide with
    nothing; their attention is zeros, never NaN, and ``hf.count`` counts them."""
    model = tiny_llama()
    ids, mask = prompt()
    hf.use(model, lshattn.SimHash(num_hashes=1, num_bits=16, mode="sparse"))
    with hf.count(model) as tally:
        logits = decoded_logits(model, ids, mask, 9)
    assert torch.isfinite(logits).all()
    assert 0 < tally.empty <= 2 * 2 * 4 * 5  # layers · batch · heads · steps


def test_a_new_prompt_or_a_reordered_cache_rehashes():
    """The store follows the cache it is given: a second generation with another prompt of the same
    length gives what a fresh model gives (no stale codes)."""
    ids, mask = prompt()
    other = torch.roll(ids, 1, dims=1)
    method = lshattn.SimHash(num_hashes=2, num_bits=2, mode="sparse")
    model = tiny_llama()
    hf.use(model, method)
    decoded_logits(model, ids, mask, 9)  # leaves a store for ids
    again = decoded_logits(model, other, mask, 9)
    fresh = tiny_llama()
    hf.use(fresh, method)
    torch.testing.assert_close(again, decoded_logits(fresh, other, mask, 9), atol=0, rtol=0)


def test_a_window_over_everything_decodes_as_exact_attention():
    """Sinks and a window covering every key: exact attention in decoding too, whatever collides."""
    model = tiny_llama()
    ids, mask = prompt()
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
    hf.use(model, lshattn.SimHash(num_hashes=2, num_bits=6, mode="importance", sinks=1, window=20))
    torch.testing.assert_close(decoded_logits(model, ids, mask, 9), exact[:, 9:], atol=1e-5, rtol=1e-5)


# --- the method level, over random settings (hypothesis) -------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@st.composite
def decode_cases(draw):
    sinks = draw(st.integers(0, 3))
    window = draw(st.one_of(st.none(), st.integers(0, 5)))
    if draw(st.booleans()):
        mode = draw(st.sampled_from(["faithful", "sparse", "importance"]))
        rule = draw(st.sampled_from(["any", "all"]))
        num_hashes = draw(st.integers(1, 4))
        num_bits = draw(st.integers(0, 6 if rule == "any" else 6 // num_hashes))
        method = lshattn.SimHash(num_hashes, num_bits, rule, mode, sinks=sinks, window=window)
    elif draw(st.booleans()):  # 2^τ up to 256 buckets: tables (fewer buckets than cached keys) and compared codes
        num_hashes, num_bits = draw(st.integers(1, 6)), draw(st.integers(1, 8))
        normalize = draw(st.booleans())
        method = lshattn.YOSO(num_hashes, num_bits, normalize_output=normalize, sinks=sinks, window=window)
    else:  # the strictly causal Reformer
        method = lshattn.Reformer(
            num_hashes=draw(st.integers(1, 3)), num_buckets=draw(st.sampled_from([2, 4, 8, 128])), shared_qk=False,
            correct_duplicates=draw(st.booleans()), whole_buckets=True, sinks=sinks, window=window,
        )  # fmt: skip
    B, H, L, D = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 20)), draw(st.integers(1, 8))
    prompt_length = draw(st.integers(1, L - 1))
    padding = [draw(st.integers(0, L - 1)) for _ in range(B)]  # left padding of each sequence
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    groups = draw(st.integers(1, 3))  # query heads per key head (GQA)
    per_kv_head = draw(st.booleans())  # projections and store a key head, or a query head
    return method, (B, H, L, D), groups, prompt_length, padding, dtype, draw(st.integers(0, 2**16)), per_kv_head


@hypothesis.given(decode_cases())
def test_decoding_step_by_step_equals_the_causal_prefill(case):
    """``lshattn.decode`` over random SimHash, YOSO and Reformer settings, sizes, GQA groups, left
    paddings and dtypes: a prompt hashed into the store, then one query at a time against the
    keys so far (read per key head), equals the causal prefill of the whole sequence with the same
    generator, at every real query: the prefill given repeated keys (a projection a query head)
    for a store a query head, given the key heads (a projection a key head) for a store a key head."""
    from lshattn import decode

    method, (B, H_kv, L, D), groups, prompt_length, padding, dtype, seed, per_kv_head = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_kv * groups, L, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H_kv, L, D, generator=g, dtype=dtype) for _ in range(2))
    mask = torch.arange(L)[None, :] >= torch.tensor(padding)[:, None]  # (B, L), real suffixes
    repeats = 1 if per_kv_head else groups
    full = method(q, k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1), key_padding_mask=mask,
                  query_padding_mask=mask, causal=True, generator=torch.Generator().manual_seed(7))  # fmt: skip
    store = None
    for t in range(prompt_length, L):
        # no padding: the step is told so (None), as lshattn.hf does when transformers passes no mask
        visible = None if not any(padding) else mask[:, None, None, : t + 1]
        out, store, *_ = decode.step(store, method, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], visible,
                                    D**-0.5, torch.Generator().manual_seed(7), per_kv_head=per_kv_head)  # fmt: skip
        real = mask[:, t]
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(out[real, :, 0], full[real, :, t], atol=tol, rtol=tol)


@st.composite
def rounds_cases(draw):
    sinks, window = draw(st.integers(0, 2)), draw(st.one_of(st.none(), st.integers(0, 3)))
    rounds, duplicates = draw(st.integers(1, 3)), draw(st.booleans())
    if draw(st.booleans()):
        method = lshattn.Reformer(num_hashes=rounds, bucket_size=4, num_buckets=draw(st.sampled_from([2, 4, 8])),
                                  shared_qk=False, correct_duplicates=duplicates, sinks=sinks, window=window)  # fmt: skip
    else:
        method = lshattn.SMYRF(num_hashes=rounds, q_cluster_size=4, k_cluster_size=draw(st.integers(1, 6)),
                               correct_duplicates=duplicates, sinks=sinks, window=window)  # fmt: skip
    B, H_kv, L, D = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(2, 12)), draw(st.integers(1, 6))
    padding = [draw(st.integers(0, L - 1)) for _ in range(B)]
    return (
        method,
        (B, H_kv, L, D),
        draw(st.integers(1, 3)),
        draw(st.integers(1, L - 1)),
        padding,
        draw(st.integers(0, 2**16)),
        draw(st.booleans()),  # projections a key head (shared by its query heads) or a query head
    )


def rounds_brute_force(method, store, q, k, v, visible, scale, groups):
    """A loop over batch, heads, rounds and keys: the keys each round finds for each query (its
    bucket, or its cluster of the nearest keys in projection), its own key and the covered keys as
    found by every round, a softmax in which a key found n times enters n times (once with
    ``correct_duplicates``)."""
    from lshattn.decode.common import covered_keys
    from lshattn.hashing import angular_buckets, angular_factors

    B, H, T, D = q.shape
    S, R = k.shape[2], method.num_hashes
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    covered = covered_keys(visible, method.sinks, method.window)
    for b in range(B):
        for h in range(H):
            kv = h // groups
            for t in range(T):
                position = S - T + t
                times = [0] * S
                for r in range(R):
                    if isinstance(method, lshattn.Reformer):
                        bucket = angular_buckets(
                            q[b : b + 1, h : h + 1, t : t + 1],
                            store.planes[h : h + 1],
                            angular_factors(method.num_buckets),
                        )
                        found = [j for j in range(S) if store.buffer[b, h, r, j] == bucket[0, 0, r, 0]]
                    else:
                        total = store.largest_query[b, h] + store.largest_key[b, h]
                        d = store.planes[h, r]
                        keys_at = [
                            float(
                                k[b, kv, j].double() @ d[:D].double()
                                + (total - store.squares[b, h, j]).clamp_min(0).sqrt() * d[D]
                            )
                            for j in range(S)
                        ]
                        query_at = float(
                            q[b, h, t].double() @ d[:D].double()
                            + (total - q[b, h, t].double().pow(2).sum()).clamp_min(0).sqrt() * d[D + 1]
                        )
                        candidates = sorted(
                            (abs(keys_at[j] - query_at), j) for j in range(S) if visible[b, 0, t, j] and j != position
                        )
                        found = [j for _, j in candidates[: method.k_cluster_size]]
                    for j in found:
                        if visible[b, 0, t, j] and j != position:
                            times[j] += 1
                counted = 1 if method.correct_duplicates else R
                for j in range(S):
                    if covered[b, 0, t, j] or j == position:
                        times[j] = counted
                    if method.correct_duplicates:
                        times[j] = min(times[j], 1)
                entries = [j for j in range(S) if times[j]]
                if not entries:
                    continue
                logits = torch.stack(
                    [q[b, h, t].double() @ k[b, kv, j].double() * scale + math.log(times[j]) for j in entries]
                )
                out[b, h, t] = torch.softmax(logits, 0) @ v[b, kv, entries].double()
    return out


@hypothesis.given(rounds_cases())
def test_reformer_and_smyrf_decoding_steps_match_a_brute_force_loop(case):
    """Over random Reformer and SMYRF settings, GQA groups (projections a query or a key head) and
    left paddings, each decoding step (the prompt stored at the first) equals the loop of
    ``rounds_brute_force``."""
    from lshattn import decode

    method, (B, H_kv, L, D), groups, prompt_length, padding, seed, per_kv_head = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_kv * groups, L, D, generator=g)
    k, v = (torch.randn(B, H_kv, L, D, generator=g) for _ in range(2))
    mask = torch.arange(L)[None, :] >= torch.tensor(padding)[:, None]
    store = None
    for t in range(prompt_length, L):
        visible = (mask[:, None, None, : t + 1] & (torch.arange(t + 1) <= t)).clone()
        out, store, *_ = decode.step(store, method, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], visible,
                                    D**-0.5, torch.Generator().manual_seed(7), per_kv_head=per_kv_head)  # fmt: skip
        expected = rounds_brute_force(method, store, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], visible,
                                      D**-0.5, groups)  # fmt: skip
        real = mask[:, t]
        torch.testing.assert_close(out[real].double(), expected[real], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "method",
    [m for m in EVERY_METHOD if not isinstance(m, (lshattn.Reformer, lshattn.SMYRF))]
    + [lshattn.YOSO(num_hashes=3, num_bits=2), lshattn.SimHash(num_hashes=2, num_bits=2, mode="importance", window=2)],
    ids=str,
)
@pytest.mark.parametrize("gqa", hf.GQA_MODES)
def test_beam_search_reorders_the_stores_with_the_cache(method, gqa):
    """Beam search reorders the cache between steps; the stores follow (``hf`` gives the model a
    ``_reorder_cache``), kept a query head or a key head. For a strictly causal method, decoding
    through the cache then chooses the beams that full forwards without a cache choose."""
    model = tiny_llama()
    ids, mask = prompt()
    hf.use(model, method, gqa=gqa)
    settings = {"max_new_tokens": 5, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **settings)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    hf.use(model, None)
    assert "_reorder_cache" not in model.__dict__


@hypothesis.given(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 6), st.integers(1, 40),
    st.integers(0, 2**16),
)  # fmt: skip
def test_the_bucket_index_finds_the_keys_that_comparing_codes_finds(B, H, R, T, bits, S, seed):
    """SimHash's decoding index (keys sorted by code per table, the start of each code's run):
    a query's colliding keys, gathered from its buckets, are those that comparing its codes with
    every key's finds."""
    from lshattn.decode.simhash import BucketIndex

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (B, H, R, S), generator=g)
    q_codes = torch.randint(0, 2**bits, (B, H, R, T), generator=g)
    expected = (q_codes[..., :, None] == codes[..., None, :]).any(2)
    assert torch.equal(BucketIndex.build(codes, bits).colliding(q_codes, S), expected)


def test_a_long_decode_rebuilds_the_index_and_still_equals_the_prefill():
    """Past ``index_slack`` new keys the index is rebuilt; every step still equals the prefill."""
    from lshattn import decode
    from lshattn.decode.simhash import index_slack

    B, H_kv, groups, L, D = 2, 2, 2, 160, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H_kv * groups, L, D, generator=g)
    k, v = (torch.randn(B, H_kv, L, D, generator=g) for _ in range(2))
    mask = torch.arange(L)[None, :] >= torch.tensor([0, 5])[:, None]
    method = lshattn.SimHash(num_hashes=3, num_bits=3, mode="sparse", sinks=1, window=2)
    full = method(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), key_padding_mask=mask,
                  query_padding_mask=mask, causal=True, generator=torch.Generator().manual_seed(7))  # fmt: skip
    store, indexed = None, set()
    for t in range(8, L):
        visible = mask[:, None, None, : t + 1]
        out, store, *_ = decode.step(store, method, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], visible,
                                    D**-0.5, torch.Generator().manual_seed(7))  # fmt: skip
        indexed.add(store.index.indexed)
        real = mask[:, t]
        torch.testing.assert_close(out[real, :, 0], full[real, :, t], atol=2e-5, rtol=2e-5)
    assert len(indexed) >= 2 and max(indexed) > 9 + index_slack(9)  # rebuilt at least once


def test_decoding_past_the_models_positions_works_with_rotary_positions():
    """A context longer than ``max_position_embeddings`` (64 here): a rotary model decodes on
    through every method's step as exact attention does (RoPE has no table to run out of)."""
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 60), generator=torch.Generator().manual_seed(2))
    for method in (lshattn.SimHash(num_hashes=2, num_bits=3, mode="sparse", sinks=1, window=4), lshattn.YOSO(4, 3)):
        hf.use(model, method)
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 72) and model.config.max_position_embeddings == 64


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_a_reordered_store_reorders_its_bucket_index(native):
    """Beam search reorders the stores with the cache (``decode.reordered``): SimHash's bucket index
    too, so after a reordering each sequence's step finds its own keys, as a store built from the
    reordered cache does."""
    from unittest import mock

    from lshattn import decode, kernels

    method = lshattn.SimHash(num_hashes=3, num_bits=2, mode="sparse", sinks=1)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 1, 8, generator=g)
    k, v = (torch.randn(3, 2, 30, 8, generator=g) for _ in "kv")  # three different sequences
    switch = mock.patch.object(kernels, "decodes_natively", kernels.decodes_natively if native else lambda *a: False)
    with switch:
        store = decode.step(
            None, method, q, k[:, :, :29], v[:, :, :29], None, 0.3, torch.Generator().manual_seed(1)
        ).store
        assert store.index is not None
        order = torch.tensor([2, 0, 1])
        moved = decode.reordered(store, order)
        got = decode.step(moved, method, q, k[order], v[order], None, 0.3, None)
        assert got.store.planes is moved.planes and got.store.index.keys is moved.index.keys  # extended, not rebuilt
        fresh = decode.step(None, method, q, k[order], v[order], None, 0.3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got.out, fresh.out)


@pytest.mark.parametrize("name", ["sparse-sinks-window", "yoso-tables", "topk", "reformer-whole-buckets"])
def test_an_exact_prefill_leaves_the_method_to_the_decoding_steps(name):
    """``use(..., prefill="exact")``: the prompt runs exact attention (logits equal the model's own),
    and each decoding step runs the method. With one layer the cache holds the same K and V after
    either prefill, so the decoded logits are the method's causal prefill at those positions."""
    model = tiny_llama(layers=1)  # its cached K and V come from the embeddings alone
    ids, mask = prompt()
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
    hf.use(model, SETTINGS[name], seed=5)
    with torch.no_grad():
        method_prefill = model(input_ids=ids, attention_mask=mask).logits
    hf.use(model, SETTINGS[name], seed=5, prefill="exact")
    with torch.no_grad():
        prompt_logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(prompt_logits, exact, atol=0, rtol=0)
    start = 9
    torch.testing.assert_close(decoded_logits(model, ids, mask, start), method_prefill[:, start:], atol=1e-5, rtol=1e-5)
    assert (exact[:, start:] - method_prefill[:, start:]).abs().max() > 1e-4  # the method is not exact here


def test_an_exact_prefill_is_counted_recorded_and_checked(tmp_path):
    """``generate`` with ``prefill="exact"``: the prompt scores every pair, the decoding steps fewer;
    the setting is saved with the model and comes back with ``use_saved``; a bad value is refused."""
    model = tiny_llama()
    ids, mask = prompt()
    method = lshattn.SimHash(num_hashes=1, num_bits=3, mode="sparse")
    hf.use(model, method, prefill="exact")
    with torch.no_grad(), hf.count(model) as whole:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), hf.count(model) as prompt_only:
        model(input_ids=ids, attention_mask=mask)
    assert out.shape == (2, 19)
    assert prompt_only.dot_products == 2 * 4 * 14 * 14 * 2  # exact: every pair of the padded batch, 2 layers
    decoding = whole.dot_products - prompt_only.dot_products
    assert 0 < decoding < 0.8 * (whole.pairs - prompt_only.pairs)
    model.save_pretrained(tmp_path)
    loaded = hf.use_saved(transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval())
    assert loaded.config.lshattn["prefill"] == "exact"
    with torch.no_grad():
        again = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    with pytest.raises(ValueError, match="prefill must be one of"):
        hf.use(model, method, prefill="dense")


def test_a_fixed_size_cache_is_refused_with_the_fix():
    """A ``StaticCache`` holds unwritten slots after the tokens seen, and its prompt arrives as
    fewer queries than keys: the decoding steps would read it wrongly (other tokens than the
    default cache's, measured), so a method that decodes refuses it. ``Dense`` reads
    transformers' mask and works; ``use(model, None)`` removes the check."""
    model = tiny_llama()
    ids = prompt()[0][:1]  # one sequence, no padding
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    hf.use(model, lshattn.SimHash(num_hashes=2, num_bits=2, mode="sparse", window=3), seed=0)
    with pytest.raises(ValueError, match="StaticCache of fixed-size layers.*Use the default cache"):
        model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    model.generate(ids, max_new_tokens=4, do_sample=False)  # the default cache decodes
    hf.use(model, lshattn.Dense())
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static"), expected)
    hf.use(model, None)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static"), expected)


def test_store_buffers_grow_by_a_quarter_and_keep_their_slots():
    """``with_room``: the buffer itself while it has room; else one a quarter longer (64 slots at
    least), its first ``length`` slots copied: a decoding step after a long prompt leaves a fifth
    of the store empty, not half, and growing stays amortised O(1) (a copy every L/4 slots)."""
    from lshattn.decode.common import with_room

    buffer = torch.arange(2 * 3 * 800).view(2, 3, 800)
    assert with_room(buffer, 700, 800) is buffer
    grown = with_room(buffer, 800, 801)
    assert grown.shape == (2, 3, 1000) and torch.equal(grown[..., :800], buffer)
    assert with_room(buffer[..., :10].contiguous(), 10, 11).shape[-1] == 74  # 64 slots more at least
    assert with_room(buffer, 800, 5000).shape[-1] == 5000  # what is needed, when more than a quarter
    grown = with_room(buffer, 3, 900, dim=1)  # any dim; only the first `length` slots are kept
    assert grown.shape == (2, 900, 800) and torch.equal(grown[:, :3], buffer)
