"""The native CPU kernels (lshattn.kernels): equal to the torch path they replace, in every
layout they split the work into, and a clean fallback where they cannot be built."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch

import lshattn
from lshattn import kernels, testing
from lshattn.methods import yoso as yoso_module

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None, reason="no C++ compiler on PATH: the native kernels cannot be built here"
)


def random_codes(N: int, L: int, m: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reader and writer codes with some invalid entries (-1 readers, -2 writers)."""
    g = torch.Generator().manual_seed(seed)
    read = torch.randint(0, rows, (N, L, m), generator=g)
    write = torch.randint(0, rows, (N, L, m), generator=g)
    read[torch.rand(N, L, m, generator=g) < 0.1] = -1
    write[torch.rand(N, L, m, generator=g) < 0.1] = -2
    return read, write


def both_paths(read, write, values, num_bits, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    native = kernels.bucket_sums(read, write, values, 2**num_bits, **kwargs)
    assert native is not None
    reference = yoso_module._torch_bucket_sums(read, write, values, 2**num_bits, **kwargs)
    return native, reference


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("Dv", [5, 32, 64, 128], ids=lambda d: f"dv{d}")
@pytest.mark.parametrize("order", ["full", "causal", "reverse"])
def test_native_bucket_sums_equal_the_torch_path(dtype, Dv, order):
    """Every unrolled width (32, 64, 128) and the generic one, in both dtypes and all orders."""
    read, write = random_codes(3, 50, 6, 8, seed=1)
    values = torch.randn(3, 50, Dv, dtype=dtype, generator=torch.Generator().manual_seed(2))
    native, reference = both_paths(read, write, values, 3, causal=order != "full", reverse=order == "reverse")
    assert native.dtype == dtype and native.shape == (3, 50, Dv)
    torch.testing.assert_close(native, reference)


@needs_compiler
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_native_bucket_sums_split_hashes_over_threads_and_groups(monkeypatch, causal):
    """One row on three threads splits the hashes into three ranges, and a small table budget
    makes each range pass over the positions in groups of two hashes: the sums are unchanged."""
    read, write = random_codes(1, 40, 7, 16, seed=3)
    values = torch.randn(1, 40, 8, dtype=torch.float64)
    expected = yoso_module._torch_bucket_sums(read, write, values, 16, causal=causal, reverse=False)
    threads = torch.get_num_threads()
    monkeypatch.setattr(kernels, "UNIT_TABLE_BUDGET", 2 * 16 * 8)
    try:
        torch.set_num_threads(3)
        split = kernels.bucket_sums(read, write, values, 16, causal=causal)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(split, expected)


@needs_compiler
def test_yoso_and_simhash_give_the_same_result_on_both_paths(native_kernels):
    """End to end: YOSO-m (forward and all gradients of both backward rules, causal too) and SimHash's faithful mode
    under the rule "all" (which uses the bucket sums) agree between the native and torch paths."""
    q, k, v = (x.requires_grad_() for x in testing.make_qkv(2, 3, 33, 33, 16, seed=4, dtype=torch.float64))
    cases = [
        (lshattn.YOSO(num_hashes=8, num_bits=4), False),
        (lshattn.YOSO(num_hashes=8, num_bits=4), True),
        (lshattn.YOSO(num_hashes=8, num_bits=4, backward="exact"), False),
        (lshattn.YOSO(num_hashes=8, num_bits=4, backward="exact"), True),
        (lshattn.SimHash(num_hashes=3, num_bits=2, rule="all"), False),
    ]

    def run(method, causal):
        out = method(q, k, v, causal=causal, generator=torch.Generator().manual_seed(5))
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    native_kernels(False)
    fallback = [run(method, causal) for method, causal in cases]
    native_kernels(True)
    assert kernels.available()
    for (method, causal), expected in zip(cases, fallback):
        for got, want in zip(run(method, causal), expected):
            torch.testing.assert_close(got, want, msg=f"{method} causal={causal}")


def test_a_missing_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LSHATTN_CACHE_DIR", str(tmp_path / "cache"))
    kernels.load.cache_clear()
    try:
        with pytest.warns(kernels.NativeKernelWarning, match="no-such-compiler"):
            assert not kernels.available()
        read, write = random_codes(2, 10, 3, 4, seed=6)
        values = torch.randn(2, 10, 4)
        assert kernels.bucket_sums(read, write, values, 4, causal=False) is None  # cached: no second warning
        out = yoso_module.bucket_sums(read, write, values, 2, causal=False)
        torch.testing.assert_close(
            out, yoso_module._torch_bucket_sums(read, write, values, 4, causal=False, reverse=False)
        )
    finally:
        monkeypatch.undo()
        kernels.load.cache_clear()


def test_native_kernels_can_be_switched_off(native_kernels, recwarn):
    native_kernels(False)
    assert kernels.load() is None
    assert not recwarn.list


@needs_compiler
def test_the_kernel_is_compiled_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LSHATTN_CACHE_DIR", str(tmp_path))
    kernels.load.cache_clear()
    try:
        assert kernels.available()
        built = list(tmp_path.glob("cpu-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        kernels.load.cache_clear()
        assert kernels.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
        assert list(tmp_path.iterdir()) == built  # no partial files left behind
    finally:
        monkeypatch.undo()
        kernels.load.cache_clear()


def collision_grads_reference(q, k, v, grad, q_codes, k_codes, causal, exact_bits=0):
    """From the dense (N, T, S) collision counts: weighted by the count, or for the exact rule by
    the kernel's derivative on pairs that collide at all."""
    valid = (q_codes[:, :, None, :] >= 0) & (k_codes[:, None, :, :] >= 0)
    counts = ((q_codes[:, :, None, :] == k_codes[:, None, :, :]) & valid).sum(-1).to(q.dtype)
    if exact_bits:
        derivative = yoso_module.kernel_derivative(q @ k.transpose(1, 2), exact_bits)
        counts = (counts > 0) * derivative
    if causal:
        counts = counts.tril()
    weight = (grad @ v.transpose(1, 2)) * counts
    return weight @ k, weight.transpose(1, 2) @ q


@needs_compiler
@pytest.mark.parametrize(
    "rows, L", [(1, 40), (1, 300), (8, 40), (64, 40)], ids=["one-bucket", "one-bucket-chunks", "rows8", "rows64"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_native_collision_grads_by_brute_force(rows, L, causal):
    """One bucket holding everything (done through the (Dv, D) matrices; causal, in several
    chunks of 64 members when L = 300), buckets of about five (packed pair blocks) and mostly
    single-member buckets (pair by pair, unpacked) all equal the dense sum."""
    N, m, D, Dv = 3, 5, 8, 6
    g = torch.Generator().manual_seed(7)
    q, k, grad = (torch.randn(N, L, n, dtype=torch.float64, generator=g) for n in (D, D, Dv))
    v = torch.randn(N, L, Dv, dtype=torch.float64, generator=g)
    q_codes, k_codes = random_codes(N, L, m, rows, seed=8)
    grad_q, grad_k = kernels.collision_grads(q, k, v, grad, q_codes, k_codes, rows, causal=causal)
    expected_q, expected_k = collision_grads_reference(q, k, v, grad, q_codes, k_codes, causal)
    torch.testing.assert_close(grad_q, expected_q)
    torch.testing.assert_close(grad_k, expected_k)


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_threads_of_its_own():
    """The thread pool of the parent has no threads in a forked child (a data-loader worker):
    the child must not wait on it forever."""
    read, write = random_codes(1, 30, 4, 8, seed=9)
    values = torch.randn(1, 30, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = kernels.bucket_sums(read, write, values, 8, causal=False)  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the sums come back equal
            ok = torch.equal(kernels.bucket_sums(read, write, values, 8, causal=False), expected)
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on the parent's thread pool")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(threads)


@needs_compiler
@pytest.mark.parametrize("rows", [3, 64], ids=["rows3", "rows64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_native_exact_collision_grads_count_each_pair_once(causal, dtype, rows):
    """The exact rule weighs a pair by the kernel's derivative at its cosine (clamped), once
    however many hashes it collides in: with 3 buckets most pairs collide in several (packed
    pair blocks); with 64, buckets hold a pair or two (done pair by pair, unpacked). (float32
    takes arccos from a polynomial, float64 from std::acos.)"""
    N, L, m, D, Dv = 2, 30, 6, 8, 5
    g = torch.Generator().manual_seed(10)
    q, k = (torch.nn.functional.normalize(torch.randn(N, L, D, dtype=dtype, generator=g), dim=-1) for _ in "qk")
    k[0, 3] = q[0, 5]  # a cosine of 1, where the derivative is clamped
    k[1, 4] = -q[1, 7]  # and of -1
    v, grad = (torch.randn(N, L, n, dtype=dtype, generator=g) for n in (Dv, Dv))
    q_codes, k_codes = random_codes(N, L, m, rows, seed=11)
    got = kernels.collision_grads(q, k, v, grad, q_codes, k_codes, rows, causal=causal, exact_bits=5, clamp=0.99)
    double = [x.double() for x in (q, k, v, grad)]
    expected = collision_grads_reference(*double, q_codes, k_codes, causal, exact_bits=5)
    tolerance = {"rtol": 2e-6, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got[0].double(), expected[0], **tolerance)
    torch.testing.assert_close(got[1].double(), expected[1], **tolerance)


@needs_compiler
def test_project_signs_refuses_what_it_cannot_pack_and_packs_signs():
    codes = torch.zeros(1, 4, 2, dtype=torch.int32)
    planes = torch.eye(3).repeat(1, 2).view(1, 3, 2, 3)  # 2 tables of 3 bits, each bit one coordinate
    with pytest.raises(RuntimeError, match="float32 inputs.*got torch.float64 inputs"):
        kernels.project_signs(torch.zeros(1, 4, 3, dtype=torch.float64), planes, codes)
    x = torch.tensor([[[1.0, -1.0, 0.0], [-0.0, -2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]])
    kernels.project_signs(x, planes, codes)
    # a projection of exactly zero (a sum from +0, even of -0 terms) counts as positive
    assert codes[0].tolist() == [[0b101, 0b101], [0b101, 0b101], [0b111, 0b111], [0, 0]]


@needs_compiler
@pytest.mark.parametrize("L", [1, 3, 4, 9])
def test_a_token_hashed_alone_gets_its_codes_in_a_whole_prompt(L):
    """Every projection is summed in one order, so hashing one token (a decoding step) gives the
    codes it has when the whole sequence is hashed at once, bit for bit (the matrix product of
    the torch path does not promise this)."""
    g = torch.Generator().manual_seed(L)
    x, planes = torch.randn(2, 3, 40, 64, generator=g), torch.randn(3, 64, 16, 9, generator=g)
    whole = lshattn.hashing.simhash_codes(x, planes)
    alone = torch.cat([lshattn.hashing.simhash_codes(x[:, :, i : i + L], planes) for i in range(0, 40, L)], -1)
    assert torch.equal(whole, alone)


# --- SimHash's decoding step ------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def decode_case(draw, method, cached: int = 1) -> tuple:
    """``method`` with the rest of a decoding case (``native_and_torch_steps``): B sequences, H_kv
    key heads of ``groups`` query heads, T new queries after at least ``cached`` keys (S in all,
    at most 40), left padding or none, the dtype, a seed and whether the store is kept a key head
    (``per_kv_head``) or a query head."""
    B, H_kv, groups = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    T, D = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    S = draw(st.integers(cached + T, 40))
    padding = [draw(st.integers(0, S - 1)) for _ in range(B)] if draw(st.booleans()) else None
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return method, (B, H_kv, groups, S, T, D), padding, dtype, draw(st.integers(0, 2**16)), draw(st.booleans())


@st.composite
def simhash_decode_cases(draw):
    mode = draw(st.sampled_from(["sparse", "importance"]))
    method = lshattn.SimHash(
        num_hashes=draw(st.integers(1, 6)), num_bits=draw(st.integers(0, 6)), mode=mode,
        sinks=draw(st.integers(0, 3)), window=draw(st.one_of(st.none(), st.integers(0, 5))),
    )  # fmt: skip
    return decode_case(draw, method)


def key_codes(store) -> torch.Tensor:
    """The codes (SimHash, YOSO) or sketches (SketchTopK) of a store's cached keys."""
    return store.sketches if hasattr(store, "sketches") else store.codes


def native_and_torch_steps(case):
    """A store of the first S − T keys (filled by decoding), then the step of the T new queries
    natively and in torch operations, from copies of it: (native, reference) ``decode.Step``."""
    from unittest import mock

    from lshattn import decode

    method, (B, H_kv, groups, S, T, D), padding, dtype, seed, per_kv_head = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_kv * groups, T, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H_kv, S, D, generator=g, dtype=dtype) for _ in "kv")
    visible = None
    if padding is not None:
        real = torch.arange(S)[None, :] >= torch.tensor(padding)[:, None]
        causal = torch.arange(S) <= torch.arange(S - T, S)[:, None]  # (T, S)
        visible = (real[:, None, :] & causal)[:, None]  # (B, 1, T, S)
    cached = S - T
    prompt = None if visible is None else visible[:, :, -1:, :cached]
    store = decode.step(None, method, q[:, :, -1:], k[:, :, :cached], v[:, :, :cached], prompt, 0.3,
                        torch.Generator().manual_seed(seed), per_kv_head=per_kv_head).store  # fmt: skip
    assert key_codes(store).shape[1] == (H_kv if per_kv_head else H_kv * groups)  # a store head per key or query head
    assert kernels.decodes_natively(q, k, v, visible)  # so the native step runs
    native = decode.step(copy_store(store), method, q, k, v, visible, 0.3, None, per_kv_head=per_kv_head)
    with mock.patch.object(kernels, "decodes_natively", lambda *a: False):
        reference = decode.step(copy_store(store), method, q, k, v, visible, 0.3, None, per_kv_head=per_kv_head)
    assert native.scored == reference.scored
    assert native.empty == int((reference.out == 0).all(-1).sum())  # the queries left with no key, counted
    assert torch.equal(key_codes(native.store), key_codes(reference.store))  # the new keys hashed alike
    tolerance = {} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(native.out, reference.out, **tolerance)
    return native, reference


@needs_compiler
@hypothesis.given(simhash_decode_cases())
def test_native_simhash_decoding_equals_its_torch_path(case):
    """The native decoding step gives the torch step's output, counts and codes, over random
    settings, GQA groups (a store a query head or a key head), several new queries, left padding
    (or none: positions) and both dtypes."""
    native_and_torch_steps(case)  # sparse and importance modes only: faithful has no native step


@st.composite
def yoso_decode_cases(draw):
    method = lshattn.YOSO(
        num_hashes=draw(st.integers(1, 6)), num_bits=draw(st.integers(1, 3)), normalize_output=draw(st.booleans()),
        sinks=draw(st.integers(0, 3)), window=draw(st.one_of(st.none(), st.integers(0, 5))),
    )  # fmt: skip
    return decode_case(draw, method, cached=2**method.num_bits + 1)  # the store has bucket tables: 2^τ <= its keys


@st.composite
def sketch_decode_cases(draw):
    method = lshattn.SketchTopK(
        fraction=draw(st.floats(0.05, 1.0)), num_bits=8 * draw(st.integers(1, 4)),
        sinks=draw(st.integers(0, 3)), window=draw(st.one_of(st.none(), st.integers(0, 5))),
    )  # fmt: skip
    return decode_case(draw, method)


@needs_compiler
@hypothesis.given(sketch_decode_cases())
def test_native_sketch_decoding_equals_its_torch_path(case):
    """The native SketchTopK step ranks as the torch step (the prefill's integer estimates, ties
    to the earlier key: small D and one byte make many equal sketches) and gives its output,
    counts and sketches, over random settings, GQA groups, several new queries, left padding (or
    none) and both dtypes."""
    native_and_torch_steps(case)


@needs_compiler
@hypothesis.given(yoso_decode_cases())
def test_native_yoso_decoding_equals_its_torch_path(case):
    """The native YOSO-m step gives the torch step's output, counts, codes and grown tables, over
    random settings, GQA groups, several new queries, left padding (or none) and both dtypes."""
    native, reference = native_and_torch_steps(case)
    assert native.store.tables is not None  # the native step needs them
    tolerance = {} if case[3] == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(native.store.tables, reference.store.tables, **tolerance)


@needs_compiler
@pytest.mark.parametrize(
    "method",
    [
        lshattn.SimHash(num_hashes=4, num_bits=3, mode="sparse", sinks=1, window=3),
        lshattn.YOSO(num_hashes=4, num_bits=3, window=3),
        lshattn.SketchTopK(fraction=0.3, num_bits=16, sinks=1, window=3),
    ],
    ids=["simhash", "yoso", "sketchtopk"],
)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_native_decoding_on_several_threads_equals_the_torch_step(monkeypatch, method, padded, per_kv_head):
    """Large batches split their store heads over threads (each writes only its own rows, tables
    and codes): the result is the torch step's, as on one thread."""
    monkeypatch.setattr(kernels, "THREADED_DECODE_KEYS", 0)
    monkeypatch.setattr(kernels, "THREADED_YOSO_WORK", 0)
    monkeypatch.setattr(kernels, "THREADED_SKETCH_LOOKUPS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        padding = [0, 5, 11] if padded else None
        native_and_torch_steps((method, (3, 2, 3, 40, 2, 16), padding, torch.float32, 1, per_kv_head))
    finally:
        torch.set_num_threads(threads)


@needs_compiler
@pytest.mark.parametrize(
    "method",
    [
        lshattn.SimHash(num_hashes=32, num_bits=9, mode="sparse"),
        lshattn.YOSO(num_hashes=40, num_bits=8),
        lshattn.SketchTopK(fraction=0.05, num_bits=256, sinks=4, window=64),
    ],
    ids=["simhash", "yoso", "sketchtopk"],
)
@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_native_decoding_hashes_like_the_prefill_at_a_models_shapes(method, T, per_kv_head):
    """At SmolLM2's shapes (9 query heads, 3 key heads, dim 64, the settings longctx decodes with
    at 8k), the native step's codes of its new keys (projected 2 rows at a time for one token,
    4 for more) equal those the prefill's hashing gives them: its output equals the torch step's."""
    from unittest import mock

    from lshattn import decode

    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, 9, T, 64, generator=g)
    k, v = (torch.randn(1, 3, 300, 64, generator=g) for _ in "kv")
    store = decode.step(None, method, q[:, :, -1:], k[:, :, : 300 - T], v[:, :, : 300 - T], None, 0.125,
                        torch.Generator().manual_seed(0), per_kv_head=per_kv_head).store  # fmt: skip
    native = decode.step(copy_store(store), method, q, k, v, None, 0.125, None, per_kv_head=per_kv_head)
    with mock.patch.object(kernels, "decodes_natively", lambda *a: False):
        reference = decode.step(copy_store(store), method, q, k, v, None, 0.125, None, per_kv_head=per_kv_head)
    assert torch.equal(key_codes(native.store), key_codes(reference.store))
    torch.testing.assert_close(native.out, reference.out, atol=1e-5, rtol=1e-5)


def copy_store(store):
    """A store whose buffers a step may grow in place without touching ``store``'s."""
    import copy

    return copy.deepcopy(store)
