"""The defects an adversarial review found (18,000 random cases of the public API), each
reproduced as its minimal case and guarded. The property suites (tests/test_properties.py over
the catalogue, tests/test_property_based.py over random settings) cover the space around them.
"""

from __future__ import annotations

import os

import pytest
import torch

import lshattn
from lshattn import testing


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_smyrf_causal_runs_with_query_clusters_larger_than_key_clusters():
    """Crashed with IndexError: the own-key column indexed keys padded to fewer slots."""
    q, k, v = testing.make_qkv(1, 1, 6, 6, 8)
    method = lshattn.SMYRF(num_hashes=1, q_cluster_size=4, k_cluster_size=3)
    out, aux = method(q, k, v, causal=True, generator=gen(), return_aux=True)
    expected = testing.rounds_reference(q, k, v, testing.smyrf_rounds(aux), causal=True, self_pairs="column")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    smallest = lshattn.SMYRF(num_hashes=1, q_cluster_size=2, k_cluster_size=1)
    q1, k1, v1 = testing.make_qkv(1, 1, 1, 1, 4)
    torch.testing.assert_close(smallest(q1, k1, v1, causal=True), v1)


@pytest.mark.parametrize(
    "method",
    [lshattn.SMYRF(num_hashes=1, q_cluster_size=16, k_cluster_size=16),
     lshattn.Reformer(num_hashes=1, bucket_size=16, shared_qk=False)],
    ids=["smyrf", "reformer"],
)  # fmt: skip
def test_fewer_real_keys_than_real_queries_never_zero_a_real_query(method):
    """With T = 64 and 10 real keys, 48 of 64 rows (Reformer: 32) were all zeros: the query
    clusters past the first faced padded keys only."""
    q, k, v = testing.make_qkv(1, 2, 64, 64, 8)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[:, :10] = True
    out = method(q, k, v, key_padding_mask=mask, generator=gen())
    assert (out.abs().amax(-1) > 0).all()
    # ... and the same as attending to the ten real keys, which used to raise instead.
    alone = method(q, k[:, :, :10], v[:, :, :10], generator=gen())
    torch.testing.assert_close(out, alone)


def test_smyrf_accepts_any_cluster_counts():
    """T = 64 queries in clusters of 16 and S = 40 keys in clusters of 8 used to be refused."""
    q, k, v = testing.make_qkv(2, 2, 64, 40, 8)
    out, aux = lshattn.SMYRF(q_cluster_size=16, k_cluster_size=8)(q, k, v, generator=gen(), return_aux=True)
    expected = testing.rounds_reference(q, k, v, testing.smyrf_rounds(aux))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_simhash_faithful_value_gradient_at_very_negative_logits(scale):
    """q = [1, 0], k = -q: v.grad was [0, 0] at scale 20 and NaN at 100 (Dense: [1, 1]); the
    probability of the one key was computed as a huge e^{-lse} minus itself plus 1."""
    q = torch.tensor([[[[1.0, 0.0]]]])
    v = torch.ones(1, 1, 1, 2, requires_grad=True)
    lshattn.SimHash(num_bits=0)(q, -q, v, scale=scale).sum().backward()
    torch.testing.assert_close(v.grad, torch.ones_like(v))


@pytest.mark.parametrize("backward", ["approx", "exact"])
@pytest.mark.parametrize("num_bits", [31, 32, 62])
def test_yoso_widest_codes_train_on_the_torch_path(native_kernels, num_bits, backward):
    """τ = 31 failed in the backward on the PyTorch path (CUDA's): the sentinel 2^31 was written
    into int32 codes. Every τ the spec accepts trains, with padding."""
    native_kernels(False)
    q, k, v = (x.requires_grad_() for x in testing.make_qkv(2, 2, 16, 16, 8))
    mask = torch.arange(16).expand(2, -1) < torch.tensor([[16], [9]])
    method = lshattn.YOSO(num_hashes=4, num_bits=num_bits, backward=backward)
    method(q, k, v, key_padding_mask=mask, query_padding_mask=mask, generator=gen()).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize(
    "huge, small",
    [(lshattn.SMYRF(num_hashes=1, q_cluster_size=4096, k_cluster_size=4096),
      lshattn.SMYRF(num_hashes=1, q_cluster_size=64, k_cluster_size=64)),
     (lshattn.Reformer(num_hashes=1, bucket_size=4096, chunks_before=4, shared_qk=False),
      lshattn.Reformer(num_hashes=1, bucket_size=64, chunks_before=0, shared_qk=False))],
    ids=["smyrf", "reformer"],
)  # fmt: skip
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_clusters_larger_than_the_sequence_are_clamped_to_it(huge, small, causal):
    """At T = 64, clusters of 4,096 padded the input to 4,096 slots (3 s and +931 MiB against
    0.013 s and +14 MiB with clusters of 64) for the same output."""
    q, k, v = testing.make_qkv(1, 2, 64, 64, 8)
    out = huge(q, k, v, causal=causal, generator=gen())
    torch.testing.assert_close(out, small(q, k, v, causal=causal, generator=gen()))
    torch.testing.assert_close(out.double(), testing.dense_reference(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)
    assert huge.cost(1, 2, 64, 64, 8, 8, causal=causal) == small.cost(1, 2, 64, 64, 8, 8, causal=causal)


METHODS = {
    "dense": lshattn.Dense(),
    "yoso-e": lshattn.YOSO(expectation=True),
    "yoso": lshattn.YOSO(),
    "reformer": lshattn.Reformer(bucket_size=4, num_buckets=2),
    "reformer-separate": lshattn.Reformer(bucket_size=4, num_buckets=2, shared_qk=False),
    "smyrf": lshattn.SMYRF(q_cluster_size=4, k_cluster_size=4),
    "simhash": lshattn.SimHash(),
    "simhash-sparse": lshattn.SimHash(num_bits=1, mode="sparse"),
}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_padded_slots_stays_there(name, causal):
    """v[..., 7, :] = NaN with 6 real tokens turned every real row of Dense, YOSO-E, Reformer,
    SMYRF and SimHash into NaN, and padded rows into NaN instead of zeros."""
    method = METHODS[name]
    q, k, v = (x.requires_grad_() for x in testing.make_qkv(1, 1, 8, 8, 4))
    mask = torch.arange(8)[None] < 6
    poison = torch.zeros(1, 1, 8, 1)
    poison[..., 6:, :] = float("nan")

    def run(q, k, v):
        return method(q, q if name == "reformer" else k, v, key_padding_mask=mask, query_padding_mask=mask,
                      causal=causal, generator=gen())  # fmt: skip

    out = run(q + poison, k + poison, v + poison)
    clean = run(q, k, v)
    assert torch.equal(out, clean) and torch.equal(out[..., 6:, :], torch.zeros_like(out[..., 6:, :]))
    out.sum().backward()
    for x in (q, v) if name == "reformer" else (q, k, v):
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[..., 6:, :], torch.zeros_like(x.grad[..., 6:, :]))


def test_padded_encoder_never_zeroes_a_cross_attention_row():
    """Through lshattn.hf, a BERT decoder attending to a padded encoder got 24–26 of its 104 real
    rows zeroed in cross-attention (fewer real keys than real queries)."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lshattn import hf

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128,
        is_decoder=True, add_cross_attention=True,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    hf.use(model, lshattn.SMYRF(num_hashes=1, q_cluster_size=8, k_cluster_size=8))
    rows = []
    hooks = [
        layer.module.register_forward_hook(lambda module, args, output: rows.append(output[0]))
        for layer in hf.attention_layers(model) if "crossattention" in layer.name
    ]  # fmt: skip
    ids = torch.randint(3, 128, (2, 52))
    encoder = torch.randn(2, 40, 32)
    encoder_mask = torch.ones(2, 40, dtype=torch.long)
    encoder_mask[:, 6:] = 0  # 6 real encoder tokens for 52 decoder queries
    with torch.no_grad():
        model(input_ids=ids, encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask)
    for hook in hooks:
        hook.remove()
    assert len(rows) == 2
    for out in rows:  # (B, T, hidden): every decoder position is a real query
        assert (out.abs().amax(-1) > 0).all()


def test_smyrf_orders_identical_tokens_alike_in_any_batch():
    """Found by the property-based suite: with repeated tokens, a sequence alone and the same
    sequence next to a padded one got different outputs (up to 3.95 apart). The projections were
    one matrix product, which rounds a row by where it falls in its tiles, so identical tokens
    (exact ties) were ordered by last-bit rounding instead of by position."""
    torch.manual_seed(0)
    distinct = torch.randn(1, 1, 3, 60)
    pattern = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    q = distinct[:, :, pattern]
    k = distinct[:, :, pattern.roll(3)]
    v = torch.randn(1, 1, 7, 60)
    method = lshattn.SMYRF(num_hashes=1, q_cluster_size=1, k_cluster_size=1)
    alone = method(q, k, v, causal=True, generator=gen())
    mask = torch.tensor([[False] * 7, [True] * 7])
    batched = method(
        torch.cat([torch.randn_like(q), q]), torch.cat([torch.randn_like(k), k]), torch.cat([torch.randn_like(v), v]),
        causal=True, key_padding_mask=mask, query_padding_mask=mask, generator=gen(),
    )  # fmt: skip
    assert torch.equal(batched[1:], alone)
    _, aux = method(q, k, v, causal=True, generator=gen(), return_aux=True)
    projections = aux.query_projections[0, 0, 0]
    assert projections[0] == projections[1] == projections[6] and projections[2] == projections[3] == projections[4]
