"""Property-based tests: hypothesis draws random methods, settings and inputs and checks every
property of DESIGN §4 on them, shrinking a failure to a minimal example.

Each test draws a method setting (``Setting``: the spec, and for SimHash and YOSO-m whether the
native CPU kernel or the PyTorch path runs) and a compact description of the inputs (``Spec``:
sizes, dtype, padding, causal, what padded slots hold, seeds) from which ``build`` makes the
tensors, so a falsifying example prints in a few lines and can be replayed by hand::

    setting, spec = Setting(lshattn.SMYRF(...), native=None), Spec(B=1, H=1, T=3, ...)
    inputs = build(spec, setting)
    out = call(setting, inputs)

Run (the default profile "ci", registered in conftest.py: 300 examples a test, about 4,000 in
all, derandomised; about half a minute on two cores, part of ``make test``)::

    .venv/bin/python -m pytest tests/test_property_based.py -q --hypothesis-show-statistics

The long run (profile "slow": the same tests with fresh random examples on every run, 1,000 a
test, 13,500 in all, about two minutes)::

    .venv/bin/python -m pytest tests/test_property_based.py -q --hypothesis-profile=slow --hypothesis-show-statistics

``LSHATTN_HYPOTHESIS_METHODS=smyrf,reformer`` restricts the drawn methods (names: dense, smyrf,
random, reformer, simhash, yoso, topk), to chase one method's failures without the others' shadowing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis", reason="the property-based tests need hypothesis: pip install -e '.[test]'")

from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import lshattn
from lshattn import kernels, testing

# --- method settings --------------------------------------------------------------------------------

KINDS = ("dense", "smyrf", "random", "reformer", "simhash", "yoso", "topk", "sketchtopk", "local")
_ONLY = [name.strip() for name in os.environ.get("LSHATTN_HYPOTHESIS_METHODS", "").split(",") if name.strip()]
assert set(_ONLY) <= set(KINDS), f"LSHATTN_HYPOTHESIS_METHODS names unknown methods: {_ONLY}; known: {KINDS}"

MAX_TOKENS = 200  # T, S <= this
MAX_BLOCK = 300  # cluster and bucket sizes up to this: sometimes larger than the sequence


@dataclasses.dataclass(frozen=True)
class Setting:
    """A method spec under test, and for SimHash and YOSO-m which path runs it on the CPU:
    ``native=True`` the C++ kernels, False the PyTorch path (``LSHATTN_NATIVE=0``, the path GPUs
    take); None for methods without a kernel. ``threads``: torch's intra-op threads during the
    call, which the native kernels split their work over (1 elsewhere: see ``one_thread``)."""

    method: lshattn.Method
    native: bool | None = None
    threads: int = 1

    @property
    def kind(self) -> str:
        return self.method.name

    @property
    def shared_qk(self) -> bool:
        return isinstance(self.method, lshattn.Reformer) and self.method.shared_qk

    @property
    def window(self) -> int | None:
        return getattr(self.method, "window", None)

    @property
    def cross(self) -> bool:
        """Whether T ≠ S is allowed (without causal): every method but shared-QK Reformer and a
        method with a window (around the query's own position)."""
        return not self.shared_qk and self.window is None

    @property
    def strictly_causal(self) -> bool:
        """Whether, when causal, the output at t depends on nothing after t (sort-and-chunk
        methods decide their clusters on the whole sequence: only later values are unseen)."""
        if isinstance(self.method, lshattn.Reformer):
            return self.method.whole_buckets
        return not isinstance(self.method, lshattn.SMYRF)

    @property
    def yoso_m(self) -> bool:
        return isinstance(self.method, lshattn.YOSO) and not self.method.expectation


def _uses_kernel(method: lshattn.Method) -> bool:
    return isinstance(method, lshattn.SimHash) or (isinstance(method, lshattn.YOSO) and not method.expectation)


def _bits(low: int, high: int) -> st.SearchStrategy[int]:
    """Code lengths in [low, high], the int32/int64 edges (30–32, 61, 62) drawn often."""
    edges = [b for b in (low, 1, 2, 30, 31, 32, 61, 62, high) if low <= b <= high]
    return st.one_of(st.sampled_from(sorted(set(edges))), st.integers(low, high))


@st.composite
def _simhash(draw) -> lshattn.SimHash:
    num_hashes, rule = draw(st.integers(1, 4)), draw(st.sampled_from(["any", "all"]))
    num_bits = draw(_bits(0, 62 if rule == "any" else 62 // num_hashes))  # "all": h·b <= 62
    mode = draw(st.sampled_from(["faithful", "sparse", "importance"]))
    return lshattn.SimHash(num_hashes, num_bits, rule, mode, sinks=draw(SINKS), window=draw(WINDOWS))


# Sinks and windows (lshattn.local) in about half the settings of every method but Dense.
SINKS = st.sampled_from([0, 0, 0, 1, 2, 5])
WINDOWS = st.sampled_from([None, None, None, 0, 1, 3])


def _clustered(cls) -> st.SearchStrategy:
    """SMYRF or its random control, with clusters sometimes larger than the sequence."""
    return st.builds(
        cls,
        num_hashes=st.integers(1, 4),
        q_cluster_size=st.integers(1, MAX_BLOCK),
        k_cluster_size=st.integers(1, MAX_BLOCK),
        correct_duplicates=st.booleans(),
        sinks=SINKS,
        window=WINDOWS,
    )


_METHODS = {
    "dense": st.just(lshattn.Dense()),
    "smyrf": _clustered(lshattn.SMYRF),
    "random": _clustered(lshattn.RandomClusters),
    "reformer": st.builds(
        lshattn.Reformer,
        num_hashes=st.integers(1, 4),
        bucket_size=st.integers(1, MAX_BLOCK),
        num_buckets=st.one_of(st.integers(1, 32).map(lambda n: 2 * n), st.sampled_from([128, 256, 512, 1024])),
        chunks_before=st.integers(0, 2),
        chunks_after=st.integers(0, 2),
        shared_qk=st.booleans(),
        correct_duplicates=st.booleans(),
        sinks=SINKS,
        window=WINDOWS,
    ).flatmap(
        # Whole buckets (strictly causal, separate Q and K) as often as chunks.
        lambda m: st.sampled_from([m, dataclasses.replace(m, shared_qk=False, whole_buckets=True)])
    ),
    "simhash": _simhash(),
    "yoso": st.builds(
        lshattn.YOSO,
        num_hashes=st.integers(1, 16),
        num_bits=_bits(1, 62),
        expectation=st.booleans(),
        backward=st.sampled_from(["approx", "exact"]),
        normalize_output=st.booleans(),
        sinks=SINKS,
        window=WINDOWS,
    ),
    "local": st.builds(lshattn.Local, tail=st.booleans(), sinks=st.integers(0, 5), window=st.sampled_from([0, 1, 3, 8, 300]))
    | st.builds(lshattn.Local, tail=st.booleans(), sinks=st.integers(1, 5), window=st.none()),
    "topk": st.builds(
        lshattn.TopK,
        fraction=st.one_of(st.sampled_from([1e-3, 0.1, 0.25, 0.5, 1.0]), st.floats(1e-3, 1.0)),
        tail=st.booleans(),
        sinks=SINKS,
        window=WINDOWS,
    ),
    "sketchtopk": st.builds(
        lshattn.SketchTopK,
        fraction=st.one_of(st.sampled_from([1e-3, 0.1, 0.25, 1.0]), st.floats(1e-3, 1.0)),
        num_bits=st.sampled_from([8, 16, 64, 256]),
        sinks=SINKS,
        window=WINDOWS,
    ),
}


@st.composite
def settings_of(draw, *kinds: str, where=None) -> Setting:
    """A setting of one of the given method kinds (all by default), with its kernel path drawn."""
    kinds = [k for k in (kinds or KINDS) if not _ONLY or k in _ONLY]
    method = draw(st.one_of(*[_METHODS[k] for k in kinds]))
    native = draw(st.booleans()) if _uses_kernel(method) else None
    setting = Setting(method, native, draw(st.sampled_from([1, 2])) if native else 1)
    if where is not None:
        assume(where(setting))
    event(f"method {setting.kind}" + {None: "", True: " (native)", False: " (torch path)"}[setting.native])
    return setting


def only(*kinds: str):
    """Skip a test drawing only these kinds when LSHATTN_HYPOTHESIS_METHODS leaves none of them."""
    return pytest.mark.skipif(
        bool(_ONLY) and not set(kinds) & set(_ONLY), reason=f"LSHATTN_HYPOTHESIS_METHODS excludes {', '.join(kinds)}"
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: its tensors are small, and on a loaded machine two
    threads of torch's pool spinning on two cores made examples 30 times slower. A setting with
    native kernels draws its own thread count (``Setting.threads``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running(setting: Setting):
    """Run the block as ``setting`` says: on the native kernels (native=True) or the PyTorch path
    (False; None: as is), on ``setting.threads`` threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(setting.threads)
    saved = os.environ.get("LSHATTN_NATIVE")
    if setting.native is not None:
        os.environ["LSHATTN_NATIVE"] = "1" if setting.native else "0"
        kernels.load.cache_clear()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if setting.native is not None:
            if saved is None:
                del os.environ["LSHATTN_NATIVE"]
            else:
                os.environ["LSHATTN_NATIVE"] = saved
            kernels.load.cache_clear()


# --- inputs -----------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
FILLS = {"random": None, "zero": 0.0, "nan": math.nan, "inf": math.inf, "-inf": -math.inf}
FILL_VALUES = ("random", "nan", "inf", "-inf")  # what padded slots hold in the pad-invariance tests


@dataclasses.dataclass(frozen=True)
class Pad:
    """Padding of one side (queries or keys) of a batch: ``real[b]`` real tokens in sequence b,
    placed first ("right" padding), last ("left") or at random places ("scattered", from seed)."""

    style: str
    real: tuple[int, ...]
    seed: int = 0

    def mask(self, length: int) -> torch.Tensor:
        rows = []
        for b, n in enumerate(self.real):
            row = torch.zeros(length, dtype=torch.bool)
            if self.style == "right":
                row[:n] = True
            elif self.style == "left":
                row[length - n :] = True
            else:
                places = torch.randperm(length, generator=torch.Generator().manual_seed(self.seed + b))[:n]
                row[places] = True
            rows.append(row)
        return torch.stack(rows)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything ``build`` needs to make one call's inputs.

    Attributes:
        B, H, T, S, D, Dv: sizes. dtype: a key of ``DTYPES``.
        keys: the key padding, None for no key mask. queries: the query padding, None for no
            query mask.
        causal: the call's flag.
        fill: what padded slots of q, k, v hold (a key of ``FILLS``).
        tokens: "random" (independent q and k), "near" (key j is query j mod T plus noise of
            1e-3: long codes collide, cosines near 1) or "repeated" (q and k drawn from a pool of
            three vectors: exact ties in every hash and sort).
        spread: standard deviation of q and k (4 gives logits of std ~16: sharp softmaxes and
            very negative logits).
        scale: the call's logit scale (None: D ** -0.5).
        seed: of the data; ``seed + 1`` seeds the method's generator.
    """

    B: int
    H: int
    T: int
    S: int
    D: int
    Dv: int
    dtype: str = "float32"
    keys: Pad | None = None
    queries: Pad | None = None
    causal: bool = False
    fill: str = "random"
    tokens: str = "random"
    spread: float = 1.0
    scale: float | None = None
    seed: int = 0


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None
    query_mask: torch.Tensor | None
    causal: bool
    scale: float | None
    seed: int

    @property
    def kw(self) -> dict:
        """The call's keyword arguments but the generator."""
        return dict(
            key_padding_mask=self.key_mask, query_padding_mask=self.query_mask, causal=self.causal, scale=self.scale
        )


def build(spec: Spec, setting: Setting, *, fill: str | None = None) -> Inputs:
    """The tensors of ``spec``. Padded slots hold ``fill`` (default ``spec.fill``): q's where the
    query is padded, k's and v's where the key is. With shared QK (``k is q``) a slot of q is
    filled only where it is padded as a query and as a key."""
    g = torch.Generator().manual_seed(spec.seed)
    q = torch.randn(spec.B, spec.H, spec.T, spec.D, generator=g, dtype=torch.float64) * spec.spread
    k = torch.randn(spec.B, spec.H, spec.S, spec.D, generator=g, dtype=torch.float64) * spec.spread
    v = torch.randn(spec.B, spec.H, spec.S, spec.Dv, generator=g, dtype=torch.float64)
    if spec.tokens == "near":
        noise = torch.randn(k.shape, generator=g, dtype=k.dtype)
        k = q[:, :, torch.arange(spec.S) % spec.T] + 1e-3 * spec.spread * noise
    elif spec.tokens == "repeated":
        pool = torch.randn(spec.B, spec.H, 3, spec.D, generator=g, dtype=torch.float64) * spec.spread
        q = pool[:, :, torch.randint(0, 3, (spec.T,), generator=g)]
        k = pool[:, :, torch.randint(0, 3, (spec.S,), generator=g)]
    key_mask = spec.keys.mask(spec.S) if spec.keys is not None else None
    query_mask = spec.queries.mask(spec.T) if spec.queries is not None else None
    value = FILLS[fill or spec.fill]
    filler = torch.Generator().manual_seed(spec.seed + 7)

    def padded_with(x, padded):
        if padded is None or not padded.any():
            return x
        if value is None:
            stuff = torch.randn(x.shape, generator=filler, dtype=x.dtype) * 10
        else:
            stuff = torch.full_like(x, value)
        return torch.where(padded[:, None, :, None], stuff, x)

    q_padded = None if query_mask is None else ~query_mask
    if setting.shared_qk:
        q_padded = None if q_padded is None or key_mask is None else q_padded & ~key_mask
    q = padded_with(q, q_padded)
    k = padded_with(k, None if key_mask is None else ~key_mask)
    v = padded_with(v, None if key_mask is None else ~key_mask)
    dtype = DTYPES[spec.dtype]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if setting.shared_qk:
        k = q
    return Inputs(q, k, v, key_mask, query_mask, spec.causal, spec.scale, spec.seed)


@st.composite
def pads(draw, B: int, length: int) -> Pad:
    style = draw(st.sampled_from(["right", "left", "scattered"]))
    real = tuple(draw(st.integers(0, length)) for _ in range(B))
    return Pad(style, real, draw(st.integers(0, 1000)) if style == "scattered" else 0)


@st.composite
def specs(
    draw, setting: Setting, *, masks=("none", "key", "query", "both"), causal: bool | None = None, dtypes=("float32",),
    fills=("random",), min_B: int = 1, budget: int = 60_000, cross: bool = True, aligned: bool = False,
    spreads=(1.0, 0.25, 4.0),
) -> Spec:  # fmt: skip
    """Inputs for ``setting``: B·H·T·S <= ``budget``; T ≠ S sometimes where the method and the
    call allow it (``cross``); ``masks`` "none" (no masks), "key" (the key mask alone), "query"
    (the query mask alone) or "both" (a key and a query mask: the same one, or sometimes another
    where T ≠ S or the method allows it: not with shared QK, nor when ``aligned`` and causal, so
    that each sequence's real tokens alone make a causal self-attention)."""
    causal = draw(st.booleans()) if causal is None else causal
    B = draw(st.integers(min_B, 3))
    H = draw(st.integers(1, 3))
    per_head = budget // (B * H)
    may_cross = cross and setting.cross and not causal
    if may_cross and draw(st.booleans()):
        T = draw(st.integers(1, min(MAX_TOKENS, per_head)))
        S = draw(st.integers(1, min(MAX_TOKENS, max(1, per_head // T))))
    else:
        T = S = draw(st.integers(1, min(MAX_TOKENS, math.isqrt(per_head))))
    event(f"B·H·T·S {next(f'< {n}' for n in (100, 1000, 10_000, 10**9) if B * H * T * S < n)}")
    D = draw(st.sampled_from([1, 2, 3, 8, 60, 64]))
    Dv = draw(st.one_of(st.just(D), st.sampled_from([1, 2, 3, 8, 60, 64])))
    mode = draw(st.sampled_from(masks))
    keys = queries = None
    if mode in ("key", "both"):
        keys = draw(pads(B, S))
    if mode == "query":
        queries = draw(pads(B, T))
    if mode == "both":
        # A window needs each sequence's real queries and keys to be the same tokens when
        # ``aligned``: the per-sequence reference is a self-attention of its real tokens.
        same = T == S and ((aligned and (causal or setting.window is not None)) or setting.shared_qk or draw(st.booleans()))
        queries = keys if same else draw(pads(B, T))
    return Spec(
        B=B, H=H, T=T, S=S, D=D, Dv=Dv, dtype=draw(st.sampled_from(dtypes)), keys=keys, queries=queries,
        causal=causal, fill=draw(st.sampled_from(fills)), tokens=draw(st.sampled_from(["random", "near", "repeated"])),
        spread=draw(st.sampled_from(spreads)),
        scale=draw(st.sampled_from([None, 0.3, 1.0])), seed=draw(st.integers(0, 2**20)),
    )  # fmt: skip


# --- running and references ---------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(setting: Setting, x: Inputs, q=None, k=None, v=None, **overrides):
    """``setting.method`` on ``x`` (or on the q, k, v given), on the setting's kernel path, with
    the generator seeded by ``x.seed + 1``."""
    q, k, v = (x.q if q is None else q), (x.k if k is None else k), (x.v if v is None else v)
    if setting.shared_qk:
        k = q
    kw = x.kw | overrides
    with running(setting):
        return setting.method(q, k, v, generator=gen(x.seed + 1), **kw)


def brute_force(setting: Setting, q, k, v, aux, **kw) -> torch.Tensor:
    """The float64 reference over the pairs (or codes) ``aux`` says the method used."""
    method = setting.method
    causal = kw.get("causal", False)
    if isinstance(method, lshattn.Dense):
        return testing.dense_reference(q, k, v, **kw)
    covered = testing.covered_by(method, q, k, **kw) if not isinstance(method, lshattn.Dense) else None
    if isinstance(method, lshattn.SMYRF):
        return testing.rounds_reference(
            q, k, v, testing.smyrf_rounds(aux), self_pairs="column" if causal else "none",
            correct_duplicates=method.correct_duplicates, covered=covered, **kw,
        )  # fmt: skip
    if isinstance(method, lshattn.Reformer):
        in_round = testing.reformer_rounds(method, aux)
        if method.shared_qk:  # keys are the unit queries; a token sees itself only when alone
            return testing.rounds_reference(
                q, F.normalize(q, dim=-1), v, in_round, self_pairs="exclude",
                correct_duplicates=method.correct_duplicates, covered=covered, **kw,
            )  # fmt: skip
        return testing.rounds_reference(
            q, k, v, in_round, self_pairs="column" if causal else "none",
            correct_duplicates=method.correct_duplicates, covered=covered, **kw,
        )  # fmt: skip
    if isinstance(method, lshattn.SimHash):
        return testing.simhash_brute_force(method, q, k, v, aux, **kw)
    if isinstance(method, (lshattn.TopK, lshattn.SketchTopK)):
        return testing.topk_brute_force(method, q, k, v, aux, **kw)
    if isinstance(method, lshattn.Local):
        return testing.local_brute_force(method, q, k, v, aux, **kw)
    if method.expectation:
        return testing.yoso_expectation_reference(
            q, k, v, num_bits=method.num_bits, normalize_output=method.normalize_output, backward=method.backward,
            **kw,
        )  # fmt: skip
    return testing.yoso_brute_force(method, q, k, v, aux, **kw)


def exact_reference(setting: Setting, q, k, v, **kw) -> torch.Tensor:
    """What the method's exact limit equals, float64."""
    method = setting.method
    if isinstance(method, lshattn.YOSO):
        return testing.yoso_expectation_reference(
            q, k, v, num_bits=method.num_bits, normalize_output=method.normalize_output, **kw
        )
    if setting.shared_qk:  # exact shared-QK attention: a token sees itself only when alone
        everything = torch.ones(q.shape[0], q.shape[1], 1, q.shape[2], q.shape[2], dtype=torch.bool)
        return testing.rounds_reference(q, F.normalize(q, dim=-1), v, everything, self_pairs="exclude", **kw)
    return testing.dense_reference(q, k, v, **kw)


def tolerance(x: Inputs, method: lshattn.Method | None = None) -> dict:
    """For one computation done two ways (another shape or layout, or the float64 reference):
    1e-10 in float64 (relative 1e-9), 1e-5 in float32 while logits stay within ±10. A float32 logit carries a
    rounding error proportional to its size, so beyond that the bound grows with the largest
    possible logit, ``scale·max‖q‖·max‖k‖`` over the real tokens.

    YOSO-E's weight ``(1 - θ/π)^τ`` takes the angle from a cosine, and arccos is ill-conditioned
    near ±1: a cosine rounded by ``δ`` moves θ by up to ``√(2δ)``, so the weight of nearly
    parallel vectors carries a relative error of up to ``ε_w = τ·√(2δ)/π`` (δ a few ulps of 1)
    in any precision, and an output, a weighted sum of values, one of up to ``ε_w`` times twice
    the largest value. That is the problem's conditioning, not the method's, so the bound
    includes it. (YOSO-m's weights count code collisions, exact: no such term.)"""
    if x.q.dtype == torch.float64:
        atol, rtol = 1e-10, 1e-9
    else:
        atol = rtol = 1e-5 * logit_factor(x)
    angle_atol, angle_rtol = angle_error(x, method, x.q.dtype)
    return dict(atol=max(atol, angle_atol), rtol=max(rtol, angle_rtol))


def angle_error(x: Inputs, method: lshattn.Method | None, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of YOSO-E's outputs from its angles computed in ``dtype`` (``tolerance``), and
    of YOSO-m's with sinks or a window, whose covered pairs take the exact kernel, and of
    importance-weighted SimHash's, whose weights 1 / P(θ) take the angle too; (0, 0) for every
    other method.

    The importance weight's logarithm moves by ``|d log P / dθ|·Δθ``, which grows without bound
    as P → 0 (nearly opposite vectors: ``K / (π − θ)`` for K bits): a weight that large is
    ill-conditioned in any precision, so the bound takes the largest over the real pairs."""
    angle_shift = math.sqrt(2 * 8 * torch.finfo(dtype).eps)  # Δθ for a cosine off by a few ulps of 1
    largest_value = float(_real_values(x).abs().max()) if x.v.numel() else 0.0
    if isinstance(method, lshattn.SimHash) and method.mode == "importance":
        tables = method.num_hashes if method.rule == "any" else 1
        log_shift = angle_shift * _largest_log_slope(x, method.num_hashes * method.num_bits // tables, tables)
        weight_error = min(math.expm1(min(log_shift, 50.0)), 1e6)
        return weight_error * 2 * largest_value, weight_error
    exact_kernel = isinstance(method, lshattn.YOSO) and (method.expectation or method.sinks or method.window is not None)
    if not exact_kernel:
        return 0.0, 0.0
    weight_error = method.num_bits * angle_shift / math.pi
    return weight_error * 2 * largest_value, weight_error


def _largest_log_slope(x: Inputs, bits: int, tables: int) -> float:
    """``max |d log P / dθ|`` over the real pairs, P = 1 − (1 − (1 − θ/π)^bits)^tables."""
    if bits == 0 or x.q.numel() == 0 or x.k.numel() == 0:
        return 0.0
    q = x.q.double() if x.query_mask is None else torch.where(x.query_mask[:, None, :, None], x.q.double(), 0.0)
    k = x.k.double() if x.key_mask is None else torch.where(x.key_mask[:, None, :, None], x.k.double(), 0.0)
    unit_q, unit_k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    cosine = (unit_q @ unit_k.transpose(-1, -2)).clamp(-1, 1)
    near = 1 - torch.acos(cosine) / math.pi  # 1 − θ/π
    per_table = near**bits
    collide = 1 - (1 - per_table) ** tables
    slope = tables * (1 - per_table) ** (tables - 1) * bits * near ** (bits - 1) / math.pi
    return float((slope / collide.clamp_min(1e-300)).max())


def _real_values(x: Inputs) -> torch.Tensor:
    """v `(B, H, S, Dv)` in float64, zero at padded keys (which may hold NaN or inf)."""
    v = x.v.double()
    return v if x.key_mask is None else torch.where(x.key_mask[:, None, :, None], v, 0.0)


def logit_factor(x: Inputs) -> float:
    """``max(1, L / 10)`` for the largest possible logit ``L = scale·max‖q‖·max‖k‖`` (real tokens)."""
    q = x.q.double() if x.query_mask is None else torch.where(x.query_mask[:, None, :, None], x.q.double(), 0.0)
    k = x.k.double() if x.key_mask is None else torch.where(x.key_mask[:, None, :, None], x.k.double(), 0.0)
    scale = q.shape[-1] ** -0.5 if x.scale is None else x.scale
    return max(1.0, float(q.norm(dim=-1).max() * k.norm(dim=-1).max() * scale) / 10)


def seen_keys(x: Inputs) -> torch.Tensor:
    """`(B, T)` number of real keys each query may see (padded queries included)."""
    B, T, S = x.q.shape[0], x.q.shape[2], x.k.shape[2]
    visible = torch.ones(B, T, S, dtype=torch.bool)
    if x.key_mask is not None:
        visible &= x.key_mask[:, None, :]
    if x.causal:
        visible &= torch.ones(T, S, dtype=torch.bool).tril()
    return visible.sum(-1)


def real_queries(x: Inputs) -> torch.Tensor:
    return torch.ones(x.q.shape[0], x.q.shape[2], dtype=torch.bool) if x.query_mask is None else x.query_mask


def grads(setting: Setting, x: Inputs, weight: torch.Tensor, fn=None):
    """Output and gradients of ``(out * weight).sum()`` for q, k, v (zeros where None), where
    ``out = fn(q, k, v)`` (default: the method on ``x``). Forward and backward run on the
    setting's kernel path (the native kernels also run in the backward)."""
    fn = fn or (lambda q, k, v: call(setting, x, q, k, v))
    leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v)]
    q, k, v = leaves
    with running(setting):
        out = fn(q, q if setting.shared_qk else k, v)
        (out * weight).sum().backward()
    return out.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


# --- profiles and budgets ---------------------------------------------------------------------------


def examples(weight: float):
    """This test's share of the profile's example budget (profiles: tests/conftest.py)."""
    return settings(
        max_examples=max(1, round(settings.default.max_examples * weight)),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- the properties ------------------------------------------------------------------------------------


@examples(1.0)
@given(data=st.data())
def test_brute_force(data):
    """With the assignments from ``return_aux``, the float64 reference over the same pairs gives
    the same output (fp32: 1e-5 while logits stay within ±10, see ``tolerance``)."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting, dtypes=("float32", "float64")), label="spec")
    x = build(spec, setting)
    out, aux = call(setting, x, return_aux=True)
    expected = brute_force(setting, x.q, x.k, x.v, aux, **x.kw)
    torch.testing.assert_close(out.double(), expected, **tolerance(x, setting.method))


def one_block(data, method: lshattn.SMYRF | lshattn.Reformer, spec: Spec) -> lshattn.Method:
    """``method`` with clusters (SMYRF: q_cluster_size >= T, k_cluster_size >= S) or buckets
    (Reformer: bucket_size >= T, S) drawn large enough that one holds the whole sequence;
    whole-bucket Reformer with every key a sink instead."""
    if isinstance(method, lshattn.SMYRF):
        return dataclasses.replace(
            method,
            q_cluster_size=data.draw(st.integers(spec.T, MAX_BLOCK), label="q_cluster_size"),
            k_cluster_size=data.draw(st.integers(spec.S, MAX_BLOCK), label="k_cluster_size"),
        )
    if method.whole_buckets:  # no chunk to widen: every key a sink
        return dataclasses.replace(method, sinks=data.draw(st.integers(spec.S, MAX_BLOCK), label="sinks"))
    bucket_size = data.draw(st.integers(max(spec.T, spec.S), MAX_BLOCK), label="bucket_size")
    return dataclasses.replace(method, bucket_size=bucket_size)


@examples(1.0)
@given(data=st.data())
def test_exact_limit(data):
    """One cluster or bucket holding everything (SMYRF q_cluster_size >= T and k_cluster_size >= S,
    Reformer bucket_size >= T, S), every code colliding (SimHash num_bits=0), or YOSO-E, equals the
    exact attention (fp32: 1e-5 while logits stay within ±10, see ``tolerance``)."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting), label="spec")
    method = setting.method
    if isinstance(method, (lshattn.SMYRF, lshattn.Reformer)):
        method = one_block(data, method, spec)
    elif isinstance(method, lshattn.SimHash):
        method = dataclasses.replace(method, num_bits=0)
    elif isinstance(method, lshattn.YOSO):
        method = dataclasses.replace(method, expectation=True)
    elif isinstance(method, (lshattn.TopK, lshattn.SketchTopK)):
        method = dataclasses.replace(method, fraction=1.0)
    elif isinstance(method, lshattn.Local):  # every key a sink (a query unranked by its mask has no window)
        method = dataclasses.replace(method, sinks=MAX_TOKENS, window=None)
    # SimHash keeps its kernel path; YOSO-E runs no kernel.
    setting = dataclasses.replace(setting, method=method) if isinstance(method, lshattn.SimHash) else Setting(method)
    note(f"exact setting: {setting}")
    x = build(spec, setting)
    out = call(setting, x)
    expected = exact_reference(setting, x.q, x.k, x.v, **x.kw)
    torch.testing.assert_close(out.double(), expected, **tolerance(x, setting.method))


def _per_sequence_reference(setting: Setting, x: Inputs, out: torch.Tensor, *, key_mask_only: bool):
    """Compare ``out`` (the padded call) with the method run on each sequence's real tokens alone."""
    key_mask = x.key_mask if x.key_mask is not None else torch.ones(x.k.shape[0], x.k.shape[2], dtype=torch.bool)
    queries = real_queries(x)
    for b in range(x.q.shape[0]):
        rows = torch.ones_like(queries[b]) if key_mask_only else queries[b]
        if not rows.any():
            continue
        mine = out[b : b + 1, :, rows]
        if not key_mask[b].any():
            assert torch.equal(mine, torch.zeros_like(mine)), f"sequence {b} has no real key: zeros expected"
            continue
        alone = call(
            setting, x, x.q[b : b + 1, :, rows], x.k[b : b + 1, :, key_mask[b]], x.v[b : b + 1, :, key_mask[b]],
            key_padding_mask=None, query_padding_mask=None,
        )  # fmt: skip
        torch.testing.assert_close(mine, alone, **tolerance(x, setting.method), msg=lambda m, b=b: f"sequence {b}: {m}")


@examples(1.0)
@given(data=st.data())
def test_pad_invariance_both_masks(data):
    """Real tokens among padded ones (left, right, scattered; padded slots holding random values,
    NaN or inf), with a key and a query mask: real outputs equal the method on each sequence's real
    tokens alone (same generator), padded queries output exactly zero, everything is finite."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(
        specs(setting, masks=("both",), dtypes=("float32", "float64"), fills=FILL_VALUES, aligned=True),
        label="spec",
    )
    x = build(spec, setting)
    out = call(setting, x)
    assert torch.isfinite(out).all()
    padded = ~real_queries(x)[:, None, :, None].expand_as(out)
    assert (out[padded] == 0).all(), "padded queries must output zeros"
    _per_sequence_reference(setting, x, out, key_mask_only=False)


@examples(1.0)
@given(data=st.data())
def test_pad_invariance_key_mask_alone(data):
    """The key mask alone (no query mask, not causal): ``method(q, k, v, key_padding_mask=m)`` equals,
    per sequence, the cross-attention ``method(q_b, k_b[real], v_b[real])`` on the real keys only."""
    setting = data.draw(settings_of(where=lambda s: s.cross), label="setting")
    spec = data.draw(
        specs(setting, masks=("key",), causal=False, dtypes=("float32", "float64"), fills=FILL_VALUES),
        label="spec",
    )
    x = build(spec, setting)
    out = call(setting, x)
    assert torch.isfinite(out).all()
    _per_sequence_reference(setting, x, out, key_mask_only=True)


def _never_zeroes(setting: Setting) -> bool:
    method = setting.method
    if isinstance(method, lshattn.SimHash):
        return method.mode == "faithful"
    if isinstance(method, lshattn.Reformer):  # whole buckets: a bucket may hold no visible key
        return not method.whole_buckets
    return isinstance(method, (lshattn.Dense, lshattn.SMYRF, lshattn.TopK))


@only("dense", "smyrf", "random", "reformer", "simhash", "topk")
@examples(1.0)
@given(data=st.data())
def test_no_real_query_zeroed(data):
    """A real query that may see a real key never outputs all zeros (Dense, SMYRF and its random
    control, chunked Reformer, faithful SimHash, TopK; when causal, for SMYRF and Reformer only if
    its own key is real)."""
    kinds = ("dense", "smyrf", "random", "reformer", "simhash", "topk")
    setting = data.draw(settings_of(*kinds, where=_never_zeroes), label="setting")
    spec = data.draw(specs(setting, masks=("key", "both")), label="spec")
    x = build(spec, setting)
    out = call(setting, x)
    must = real_queries(x) & (seen_keys(x) > 0)  # (B, T)
    if x.causal and not setting.strictly_causal and x.key_mask is not None:
        must &= x.key_mask  # T == S: the own key is real
    zero_rows = (out == 0).all(-1)  # (B, H, T)
    bad = zero_rows & must[:, None, :]
    assert not bad.any(), f"real queries that see a real key output zeros at (b, h, t) = {bad.nonzero().tolist()[:8]}"


@examples(1.0)
@given(data=st.data())
def test_padded_slots_inert(data):
    """NaN, inf or random values in padded slots of q, k, v change nothing: outputs bit-identical to
    the same call with zeros there, gradients finite, zero at padded positions, equal elsewhere."""
    setting = data.draw(settings_of(), label="setting")
    masks, dtypes = ("key", "query", "both"), ("float32", "float64")
    spec = data.draw(specs(setting, masks=masks, dtypes=dtypes, fills=FILL_VALUES, budget=20_000), label="spec")
    zeros = build(spec, setting, fill="zero")
    x = build(spec, setting)
    weight = torch.randn(x.q.shape[:3] + x.v.shape[-1:], generator=gen(spec.seed + 3), dtype=torch.float64)
    out0, grads0 = grads(setting, zeros, weight)
    out, grads1 = grads(setting, x, weight)
    assert torch.equal(out, out0), f"outputs differ: max {(out - out0).abs().max()}"
    keys = x.key_mask if x.key_mask is not None else torch.ones(x.k.shape[0], x.k.shape[2], dtype=torch.bool)
    for label, g, g0, real in zip("qkv", grads1, grads0, (real_queries(x), keys, keys)):
        assert torch.isfinite(g).all(), f"grad {label} not finite"
        if setting.shared_qk and label == "q":
            real = real | keys
        padded = ~real[:, None, :, None].expand_as(g)
        if not (setting.shared_qk and label == "k"):
            assert (g[padded] == 0).all(), f"grad {label} nonzero at padded positions"
        assert torch.equal(g, g0), f"grad {label} differs from the zero-filled call's"


@examples(1.0)
@given(data=st.data())
def test_batch_independence(data):
    """Changing one sequence (its tokens, and sometimes its padding) does not change another's
    output, bit for bit."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting, min_B=2, budget=40_000), label="spec")
    x = build(spec, setting)
    b = data.draw(st.integers(0, spec.B - 1), label="changed sequence")
    other = build(dataclasses.replace(spec, seed=spec.seed + 1000), setting)
    y = dataclasses.replace(x, q=x.q.clone(), k=x.k.clone(), v=x.v.clone())
    for mine, theirs in ((y.q, other.q), (y.k, other.k), (y.v, other.v)):
        mine[b] = theirs[b]
    if setting.shared_qk:
        y.k = y.q
    if data.draw(st.booleans(), label="change its padding too") and x.key_mask is not None:
        new = torch.rand(spec.S, generator=gen(spec.seed + 5)) < 0.5
        y.key_mask = x.key_mask.clone()
        y.key_mask[b] = new
        if x.query_mask is x.key_mask:
            y.query_mask = y.key_mask
    out, out2 = call(setting, x), call(setting, y)
    keep = [i for i in range(spec.B) if i != b]
    assert torch.equal(out[keep], out2[keep])


@examples(1.0)
@given(data=st.data())
def test_causality(data):
    """Causal: outputs at positions <= t do not change when anything after t changes (tokens and
    padding) for strictly causal methods (Dense, SimHash, YOSO), or when the values after t change
    for SMYRF and Reformer (whose clusters are decided on the whole sequence)."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting, causal=True, masks=("none", "both")), label="spec")
    x = build(spec, setting)
    t = data.draw(st.integers(0, spec.T - 1), label="t")
    other = build(dataclasses.replace(spec, seed=spec.seed + 1000), setting)
    y = dataclasses.replace(x, q=x.q.clone(), k=x.k.clone(), v=x.v.clone())
    later = (y.q, y.k, y.v) if setting.strictly_causal else (y.v,)
    sources = (other.q, other.k, other.v) if setting.strictly_causal else (other.v,)
    for mine, theirs in zip(later, sources):
        mine[:, :, t + 1 :] = theirs[:, :, t + 1 :]
    if setting.shared_qk:
        y.k = y.q
    if setting.strictly_causal and data.draw(st.booleans(), label="change later padding"):
        later = torch.rand(2, spec.B, spec.T - t - 1, generator=gen(spec.seed + 5)) < 0.5
        for name, new in (("key_mask", later[0]), ("query_mask", later[1])):
            if getattr(x, name) is not None:
                mask = getattr(x, name).clone()
                mask[:, t + 1 :] = new
                setattr(y, name, mask)
        if x.query_mask is x.key_mask:
            y.query_mask = y.key_mask
    out, out2 = call(setting, x), call(setting, y)
    torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], **tolerance(x, setting.method))


@examples(1.0)
@given(data=st.data())
def test_determinism(data):
    """The same generator state gives bit-identical outputs and gradients; the call leaves the
    global RNG alone."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting, budget=20_000), label="spec")
    x = build(spec, setting)
    weight = torch.randn(x.q.shape[:3] + x.v.shape[-1:], generator=gen(spec.seed + 3), dtype=x.q.dtype)
    state = torch.get_rng_state()
    first = grads(setting, x, weight)
    assert torch.equal(torch.get_rng_state(), state), "the call drew from torch's global RNG"
    second = grads(setting, x, weight)
    assert torch.equal(first[0], second[0]), "outputs differ"
    for label, a, b in zip("qkv", first[1], second[1]):
        assert torch.equal(a, b), f"grad {label} differs"


@examples(1.0)
@given(data=st.data())
def test_no_visible_key_gives_zeros(data):
    """A query that sees no real key (its sequence fully padded, or, causal, only padding up to it)
    outputs exactly zeros; every output and gradient is finite."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting, masks=("key", "both"), budget=20_000), label="spec")
    real = list(spec.keys.real)
    real[data.draw(st.integers(0, spec.B - 1), label="empty sequence")] = 0
    keys = dataclasses.replace(spec.keys, real=tuple(real))
    queries = keys if spec.queries is spec.keys else spec.queries
    spec = dataclasses.replace(spec, keys=keys, queries=queries)
    note(f"spec with an empty sequence: {spec}")
    x = build(spec, setting)
    weight = torch.randn(x.q.shape[:3] + x.v.shape[-1:], generator=gen(spec.seed + 3), dtype=x.q.dtype)
    out, (gq, gk, gv) = grads(setting, x, weight)
    blind = (seen_keys(x) == 0)[:, None, :, None].expand_as(out)
    assert (out[blind] == 0).all(), "a query that sees no key must output zeros"
    assert torch.isfinite(out).all()
    for label, g in zip("qkv", (gq, gk, gv)):
        assert torch.isfinite(g).all(), f"grad {label} not finite"


@examples(1.0)
@given(data=st.data())
def test_dtypes(data):
    """float16, bfloat16 and float64 inputs give an output of q's dtype, finite, close to the
    float32 result on the same (rounded) inputs in most rows (a hash near-tie may flip a row)."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting, dtypes=("float16", "bfloat16", "float64")), label="spec")
    x = build(spec, setting)
    out = call(setting, x)
    assert out.dtype == x.q.dtype
    assert torch.isfinite(out).all()
    as_float = call(setting, x, x.q.float(), x.k.float(), x.v.float())
    bound = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: 1e-5}[x.q.dtype] * logit_factor(x)
    angle_atol, angle_rtol = angle_error(x, setting.method, torch.float32)  # the float32 call's angles
    close = torch.isclose(out.float(), as_float, atol=max(bound, angle_atol), rtol=max(bound, angle_rtol)).all(-1)
    assert close.float().mean() >= 0.9, f"{(~close).sum()} of {close.numel()} rows differ"


@examples(1.0)
@given(data=st.data())
def test_layouts(data):
    """Non-contiguous inputs (q as a (B, T, H, D) tensor transposed, k and v expanded over heads
    from (B, 1, S, ·), masks as strided views) give the result of contiguous copies."""
    setting = data.draw(settings_of(), label="setting")
    spec = data.draw(specs(setting, dtypes=("float32", "float64")), label="spec")
    x = build(spec, setting)
    q = x.q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) storage
    k = x.k[:, :1].expand_as(x.k)
    v = x.v[:, :1].expand_as(x.v)
    masks = {}
    for name, mask in (("key_padding_mask", x.key_mask), ("query_padding_mask", x.query_mask)):
        if mask is not None:
            masks[name] = torch.stack([mask, mask], dim=-1)[..., 0]  # stride 2
    if masks.get("query_padding_mask") is not None and x.query_mask is x.key_mask:
        masks["query_padding_mask"] = masks["key_padding_mask"]
    assert not q.is_contiguous() or spec.H == 1 or spec.T == 1
    strided = call(setting, x, q, k, v, **masks)
    contiguous = call(setting, x, q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(strided, contiguous, **tolerance(x, setting.method))


@examples(1.0)
@given(data=st.data())
def test_gradients_match_reference(data):
    """In float64, the gradients of q, k, v equal those of the brute-force reference over the same
    pairs (YOSO: over the same codes, with the paper's surrogate gradients)."""
    setting = data.draw(settings_of(), label="setting")
    # Large spreads often: logits of ±100 and beyond, where a softmax's gradient can cancel.
    spec = data.draw(specs(setting, dtypes=("float64",), budget=20_000, spreads=(1.0, 4.0, 16.0)), label="spec")
    x = build(spec, setting)
    _, aux = call(setting, x, return_aux=True)
    weight = torch.randn(x.q.shape[:3] + x.v.shape[-1:], generator=gen(spec.seed + 3), dtype=torch.float64)
    _, ours = grads(setting, x, weight)
    _, expected = grads(setting, x, weight, lambda q, k, v: brute_force(setting, q, k, v, aux, **x.kw))
    # Importance-weighted SimHash: its weights 1/P(θ) take the angle from a rounded cosine
    # (``angle_error``); a gradient carries their relative error like the output does.
    _, weight_error = angle_error(x, setting.method, torch.float64)
    for label, a, b in zip("qkv", ours, expected):
        atol = max(1e-8, 2 * weight_error * float(b.abs().max()) if b.numel() else 0.0)
        torch.testing.assert_close(
            a, b, atol=atol, rtol=max(1e-6, 2 * weight_error), msg=lambda m, label=label: f"grad {label}: {m}"
        )


@only("smyrf", "reformer")
@examples(0.5)
@given(data=st.data())
def test_clusters_larger_than_the_sequence(data):
    """SMYRF clusters or Reformer buckets larger than the sequence cost no more than ones of the
    sequence's size: the input is not padded up to the cluster size."""
    setting = data.draw(settings_of("smyrf", "reformer"), label="setting")
    method = setting.method
    assume(not getattr(method, "whole_buckets", False))  # no chunks: bucket_size is unused
    spec = data.draw(specs(setting, cross=False), label="spec")
    big = one_block(data, method, spec)
    if isinstance(method, lshattn.SMYRF):
        fitted = dataclasses.replace(method, q_cluster_size=spec.T, k_cluster_size=spec.S)
    else:
        fitted = dataclasses.replace(method, bucket_size=spec.T)
    x = build(spec, setting)
    out, aux = call(Setting(big), x, return_aux=True)
    out_fitted, aux_fitted = call(Setting(fitted), x, return_aux=True)
    assert aux.dot_products <= aux_fitted.dot_products, (
        f"{big} computed {aux.dot_products} scores, {fitted} {aux_fitted.dot_products}"
    )
    torch.testing.assert_close(out, out_fitted, atol=1e-5, rtol=1e-5)


@examples(0.5)
@given(data=st.data())
def test_query_heads_share_their_key_heads_projections(data):
    """Grouped-query inputs (one key head for the H query heads): each query head's output, and
    the key head's gradients, are those of H one-head calls with the same generator state. The
    key head's projections are drawn once and shared by its query heads (``Inputs.kv_groups``),
    which is what lets decoding hash and store a key head once (``hf.use(..., gqa="shared")``)."""
    setting = data.draw(settings_of(where=lambda s: not s.shared_qk), label="setting")
    spec = data.draw(specs(setting, dtypes=("float32", "float64"), budget=20_000), label="spec")
    x = build(spec, setting)
    x = dataclasses.replace(x, k=x.k[:, :1].contiguous(), v=x.v[:, :1].contiguous())  # (B, 1, S, ·)
    weight = torch.randn(x.q.shape[:3] + x.v.shape[-1:], generator=gen(spec.seed + 3), dtype=x.q.dtype)
    out, (grad_q, grad_k, grad_v) = grads(setting, x, weight)

    def one_head_calls(q, k, v):
        return torch.cat([call(setting, x, q[:, h : h + 1], k, v) for h in range(spec.H)], 1)

    expected, (expected_q, expected_k, expected_v) = grads(setting, x, weight, one_head_calls)
    tol = tolerance(x, setting.method)
    torch.testing.assert_close(out, expected, **tol)
    for label, a, b in (("q", grad_q, expected_q), ("k", grad_k, expected_k), ("v", grad_v, expected_v)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, label=label: f"grad {label}: {m}")
