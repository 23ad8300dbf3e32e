"""Bad input gets a clear error naming the sizes and the fix; nothing is silently wrong.

Wrong types included: every spec field and call argument is checked once (spec fields in
``Method.__post_init__`` from their type hints, call arguments in ``api.validate_inputs``), with
a TypeError or ValueError naming the field or argument, the value given and what to pass.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import numpy as np
import pytest
import torch
from catalogue import METHODS

import lshattn
from lshattn import testing

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the test extra installs it; without it only the property tests are skipped
    st = None

SPECS = [pytest.param(entry.method, id=name) for name, entry in METHODS.items()]
# The first setting of each method class in the catalogue, for what depends on the class only.
CLASS_SPECS: dict = {}
for _name, _entry in METHODS.items():
    CLASS_SPECS.setdefault(type(_entry.method), pytest.param(_entry.method, id=_name))
CLASSES = sorted(CLASS_SPECS, key=lambda cls: cls.__name__)


def fields_of_kind(kind: str) -> list:
    """``(class, field name)`` of every spec field whose hint is ``int``, ``float``, ``bool``, a
    Literal or ``int | None`` ("optional int")."""
    found = []
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            if typing.get_origin(hint) is typing.Literal:
                hint_kind = "literal"
            elif hint == (int | None):
                hint_kind = "optional int"
            else:
                hint_kind = hint.__name__
            if hint_kind == kind:
                found.append(pytest.param(cls, field.name, id=f"{cls.__name__}.{field.name}"))
    return found


INT_FIELDS, FLOAT_FIELDS = fields_of_kind("int"), fields_of_kind("float")
BOOL_FIELDS, LITERAL_FIELDS = fields_of_kind("bool"), fields_of_kind("literal")
OPTIONAL_INT_FIELDS = fields_of_kind("optional int")


def qkv(B=2, H=3, T=20, S=20, D=16, Dv=16):
    return testing.make_qkv(B, H, T, S, D, Dv)


def call(spec, q, k, v, **kw):
    if getattr(spec, "shared_qk", False) and k.shape == q.shape:
        k = q
    return spec(q, k, v, **kw)


BAD_TENSOR_CASES = ["q-rank", "k-rank", "batch", "heads", "kv-heads", "dim", "kv-length", "int-dtype", "mixed-dtype"]
BAD_TENSOR_CASES += ["numpy", "empty"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dims \(B, H, T, D\), got shape \(3, 20, 16\)"),
        (lambda q, k, v: (q, k[None], v), ValueError, r"k must have 4 dims"),
        (lambda q, k, v: (q, k, v[:1]), ValueError, r"batch sizes differ: q has B=2, k has B=2, v has B=1"),
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), ValueError, r"heads do not fit: q has H=3, k has H=2.*divide H"),
        (lambda q, k, v: (q, k[:, :1], v), ValueError, r"heads do not fit: q has H=3, k has H=1, v has H=3"),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, r"head dims differ: q has D=16, k has D=8"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, r"lengths differ: k has S=20, v has S=5"),
        (lambda q, k, v: (q.int(), k, v), TypeError, r"q must be a floating-point tensor, got torch.int32"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"share a dtype"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, r"q must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, r"every size must be positive"),
    ],
    ids=BAD_TENSOR_CASES,
)
def test_bad_tensors(spec, make, error, message):
    q, k, v = make(*qkv())
    with pytest.raises(error, match=message):
        spec(q, k, v)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key_padding_mask=torch.ones(2, 21, dtype=torch.bool)), r"key_padding_mask must have shape \(B, S\) = \(2, 20\), got \(2, 21\)"),
        (dict(key_padding_mask=torch.ones(2, 20)), r"key_padding_mask must be a bool tensor.*mask.bool\(\)"),
        (dict(query_padding_mask=torch.ones(20, dtype=torch.bool)), r"query_padding_mask must have shape \(B, T\)"),
        (dict(key_padding_mask=[[True] * 20] * 2), r"key_padding_mask must be a bool tensor"),
        (dict(scale=-1.0), r"scale must be a positive finite number"),
        (dict(scale=float("nan")), r"scale must be a positive finite number"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ],
    ids=["mask-shape", "mask-dtype", "qmask-rank", "mask-list", "negative-scale", "nan-scale", "dropout"],
)
def test_bad_arguments(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(spec, *qkv(), **kwargs)


@pytest.mark.parametrize("spec", SPECS)
def test_causal_needs_equal_lengths(spec):
    q, k, v = qkv(T=20, S=12)
    with pytest.raises(ValueError, match=r"causal=True needs T == S.*T=20, S=12"):
        spec(q, k, v, causal=True)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        lshattn.SMYRF()(*qkv(), generator=0)


def test_reformer_shared_qk_refuses_cross_attention():
    q, k, v = qkv(T=20, S=12)
    with pytest.raises(ValueError, match=r"k must be q \(got T=20 queries and S=12 keys\).*shared_qk=False"):
        lshattn.Reformer()(q, k, v)


def test_reformer_shared_qk_needs_k_to_be_q():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"shared_qk=True\) uses the normalised queries as keys, so k must be q.*shared_qk=False"):
        lshattn.Reformer()(q, k, v)
    lshattn.Reformer()(q, q.clone(), v)  # equal values are accepted


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lshattn.SMYRF(num_hashes=0), "SMYRF num_hashes must be >= 1, got 0"),
        (lambda: lshattn.SMYRF(q_cluster_size=-2), "SMYRF q_cluster_size must be >= 1, got -2"),
        (lambda: lshattn.SMYRF(k_cluster_size=0), "SMYRF k_cluster_size must be >= 1, got 0"),
        (lambda: lshattn.Reformer(bucket_size=0), "Reformer bucket_size must be >= 1, got 0"),
        (lambda: lshattn.Reformer(num_hashes=0), "Reformer num_hashes must be >= 1, got 0"),
        (lambda: lshattn.Reformer(chunks_before=-1), "Reformer chunks_before must be >= 0, got -1"),
        (lambda: lshattn.Reformer(num_buckets=7), "num_buckets must be even and >= 2"),
        (lambda: lshattn.Reformer(num_buckets=0), "num_buckets must be even and >= 2"),
        (lambda: lshattn.Reformer(num_buckets=96), "must be a power of two to be factorised, got 96; use 64 or 128"),
        (lambda: lshattn.TopK(fraction=0.0), r"TopK fraction must be in \(0, 1\], got 0.0; 0.25 keeps a quarter"),
        (lambda: lshattn.TopK(fraction=1.5), r"TopK fraction must be in \(0, 1\], got 1.5"),
        (lambda: lshattn.TopK(fraction=float("nan")), r"TopK fraction must be in \(0, 1\], got nan"),
    ],
)
def test_bad_method_sizes(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- wrong types and values of spec fields ------------------------------------------------------
# Checked once, from the fields' type hints, in Method.__post_init__; every field of every method.


def given_text(value) -> str:
    """How an error shows a given value: its repr and its type."""
    return re.escape(f"{value!r} ({type(value).__name__})")


def test_fields_of_every_kind_are_covered():
    """Every spec field is an int, a float, a bool, a Literal or an optional int: a new kind
    needs its own tests here."""
    kinds = INT_FIELDS, FLOAT_FIELDS, BOOL_FIELDS, LITERAL_FIELDS, OPTIONAL_INT_FIELDS
    assert sum(map(len, kinds)) == sum(len(dataclasses.fields(cls)) for cls in CLASSES)
    assert all(kinds)


@pytest.mark.parametrize("cls, field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 2.5, 2.0, "2", None, [2], torch.tensor(2)], ids=repr)
def test_int_fields_refuse_bools_floats_strings_and_tensors(cls, field, value):
    """True would pass ``>= 1`` and 2.5 would fail deep in torch: refused with the fix."""
    shown = re.escape(" ".join(repr(value).split()))
    with pytest.raises(TypeError, match=rf"{cls.__name__} {field} must be an int, got {shown} .*; pass e\.g\. {field}="):
        cls(**{field: value})


@pytest.mark.parametrize("cls, field", OPTIONAL_INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 2.5, 2.0, "2", "None", [2], torch.tensor(2)], ids=repr)
def test_optional_int_fields_refuse_bools_floats_strings_and_tensors(cls, field, value):
    shown = re.escape(" ".join(repr(value).split()))
    with pytest.raises(TypeError, match=rf"{cls.__name__} {field} must be an int or None, got {shown} .*; pass e\.g\. {field}="):
        cls(**{field: value})


@pytest.mark.parametrize("cls, field", OPTIONAL_INT_FIELDS)
def test_optional_int_fields_take_none_and_ints_and_read_back(cls, field):
    assert getattr(cls(**{field: None}), field) is None
    spec = cls(**{field: 3})
    assert getattr(spec, field) == 3 and lshattn.parse(str(spec)) == spec
    assert lshattn.parse(f"{cls.name}:{field}=None") == cls(**{field: None})
    with pytest.raises(ValueError, match=rf"{cls.__name__} {field} must fit in int64"):
        cls(**{field: 2**63})


@pytest.mark.parametrize("cls, field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [True, False, "0.5", None, [0.5], torch.tensor(0.5), 1j], ids=repr)
def test_float_fields_refuse_bools_strings_and_tensors(cls, field, value):
    shown = re.escape(" ".join(repr(value).split()))
    with pytest.raises(TypeError, match=rf"{cls.__name__} {field} must be a real number, got {shown} .*; pass e\.g\. {field}="):
        cls(**{field: value})


def test_smyrf_cluster_size_true_names_field_value_and_fix():
    with pytest.raises(TypeError) as error:
        lshattn.SMYRF(q_cluster_size=True)
    assert str(error.value) == "SMYRF q_cluster_size must be an int, got True (bool); pass e.g. q_cluster_size=32"


@pytest.mark.parametrize("cls", [cls for cls in CLASSES if "num_hashes" in {f.name for f in dataclasses.fields(cls)}])
@pytest.mark.parametrize("value", [2.5, "2"], ids=repr)
def test_num_hashes_refuses_float_and_str(cls, value):
    with pytest.raises(TypeError, match=rf"{cls.__name__} num_hashes must be an int, got {given_text(value)}"):
        cls(num_hashes=value)


@pytest.mark.parametrize("cls, field", INT_FIELDS)
@pytest.mark.parametrize("value", [2**63, 2**70, -(2**64), 10**400], ids=["2**63", "2**70", "-2**64", "10**400"])
def test_int_fields_refuse_values_beyond_int64(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__} {field} must fit in int64 .*got {str(value)[:20]}"):
        cls(**{field: value})


def test_reformer_num_buckets_has_an_upper_bound():
    """Bucket ids are sorted as float32 keys (hashing.sort_order), exact up to 2**24."""
    with pytest.raises(ValueError, match=r"Reformer num_buckets must fit in int64 .*got 1180591620717411303424"):
        lshattn.Reformer(num_buckets=2**70)
    with pytest.raises(ValueError, match=r"Reformer num_buckets must be at most 2\*\*24 = 16777216 .*got 33554432"):
        lshattn.Reformer(num_buckets=2**25)
    assert lshattn.Reformer(num_buckets=2**24).num_buckets == 2**24


@pytest.mark.parametrize("cls, field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["no", "False", "True", 0, 1, None, 1.0], ids=repr)
def test_bool_fields_refuse_strings_numbers_and_none(cls, field, value):
    """YOSO(expectation="no") used to run YOSO-E, Reformer(shared_qk="False") the shared mode."""
    with pytest.raises(
        TypeError,
        match=rf"{cls.__name__} {field} must be a bool, got {given_text(value)}; pass {field}=True or {field}=False",
    ):
        cls(**{field: value})


@pytest.mark.parametrize("cls, field", LITERAL_FIELDS)
def test_literal_fields_take_only_their_options(cls, field):
    options = typing.get_args(typing.get_type_hints(cls)[field])
    quoted = [repr(o) for o in options]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    with pytest.raises(ValueError, match=rf"{cls.__name__} {field} must be {re.escape(listed)}, got 'other'"):
        cls(**{field: "other"})
    for value in (1, True, None, [options[0]]):
        with pytest.raises(TypeError, match=rf"{cls.__name__} {field} must be .*got {given_text(value)}; pass {field}="):
            cls(**{field: value})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("int_type", [np.int64, np.int32, np.uint8, np.int16])
def test_numpy_scalars_are_accepted_and_normalised(cls, int_type):
    """A numpy scalar is a valid setting and becomes a Python one: equality, hashing and the
    string form are those of the Python value."""
    # An optional int is given a value to convert, an int default past uint8 (SketchTopK's 256
    # bits) one that every integer type tried holds.
    given = {name: 2 for cls_, name in (p.values for p in OPTIONAL_INT_FIELDS) if cls_ is cls}
    given |= {f.name: 128 for f in dataclasses.fields(cls) if type(f.default) is int and f.default > 255}
    plain = cls(**given)
    numpy_kind = {int: int_type, float: np.float64, bool: np.bool_, str: np.str_}
    kwargs = {f.name: numpy_kind[type(getattr(plain, f.name))](getattr(plain, f.name)) for f in dataclasses.fields(cls)}
    spec = cls(**kwargs)
    assert spec == plain and hash(spec) == hash(plain) and str(spec) == str(plain)
    for f in dataclasses.fields(cls):
        assert type(getattr(spec, f.name)) is type(getattr(plain, f.name)), f.name


# --- wrong types and values of call arguments ---------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("argument", ["causal", "return_aux"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True)], ids=repr)
def test_flag_arguments_refuse_non_bools(spec, argument, value):
    """causal="no" used to run causal attention."""
    shown = re.escape(" ".join(repr(value).split()))
    message = rf"{argument} must be a bool, got {shown} .*; pass {argument}=True or {argument}=False"
    with pytest.raises(TypeError, match=message):
        call(spec, *qkv(), **{argument: value})


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("value", [True, "0.5", torch.tensor(0.5), [0.5], 1j], ids=repr)
def test_scale_refuses_bools_strings_tensors(spec, value):
    shown = re.escape(" ".join(repr(value).split()))
    with pytest.raises(TypeError, match=rf"scale must be a real number or None .*got {shown} .*float\(x\)"):
        call(spec, *qkv(), scale=value)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [1e300, 1e39, 1e-300], ids=repr)
def test_scale_must_be_representable_in_the_compute_dtype(spec, dtype, value):
    """scale=1e300 becomes inf in float32 and every output NaN: refused, with the limits."""
    q, k, v = (x.to(dtype) for x in qkv())
    limits = r"in \[1\.17549e-38, 3\.40282e\+38\] to be representable in torch\.float32"
    with pytest.raises(ValueError, match=rf"scale must be {limits}, the compute dtype of {dtype} inputs, got {re.escape(repr(value))}"):
        call(spec, q, k, v, scale=value)
    with pytest.raises(ValueError, match=r"scale must be a positive finite number .*got 1000000000"):
        call(spec, q, k, v, scale=10**400)  # an int beyond every float


def test_scale_may_be_large_in_float64():
    q, k, v = (x.double() for x in qkv())
    lshattn.Dense()(q, k, v, scale=1e300)  # float64 holds it
    with pytest.raises(ValueError, match=r"representable in torch\.float64"):
        lshattn.Dense()(q, k, v, scale=1e-310)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("value", ["0.1", True, None, torch.tensor(0.1), [0.1]], ids=repr)
def test_dropout_p_refuses_bools_strings_tensors(spec, value):
    shown = re.escape(" ".join(repr(value).split()))
    message = rf"dropout_p must be a real number in \[0, 1\), got {shown} .*; pass e\.g\. dropout_p=0\.1"
    with pytest.raises(TypeError, match=message):
        call(spec, *qkv(), dropout_p=value)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, 1, 10**400], ids=repr)
def test_dropout_p_must_be_a_probability(spec, value):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got (nan|inf|-0\.1|1)"):
        call(spec, *qkv(), dropout_p=value)


@pytest.mark.parametrize("value", [0, "seed", torch.tensor(0), True], ids=repr)
def test_generator_refuses_seeds_and_others(value):
    with pytest.raises(TypeError, match=rf"generator must be a torch\.Generator or None, got .*\({type(value).__name__}|torch"):
        lshattn.SMYRF()(*qkv(), generator=value)


@pytest.mark.parametrize("spec", CLASS_SPECS.values())
def test_numpy_call_arguments_are_accepted(spec):
    """np.float32(0.5) is a valid scale (it is no Python float, unlike np.float64)."""
    q, k, v = qkv()

    def run(**kw):
        return call(spec, q, k, v, generator=torch.Generator().manual_seed(0), **kw)

    assert torch.equal(run(scale=np.float32(0.5)), run(scale=0.5))
    assert torch.equal(run(scale=np.int64(1)), run(scale=1.0))
    assert torch.equal(run(causal=np.bool_(True), dropout_p=np.float32(0.0)), run(causal=True))
    out, _ = run(return_aux=np.True_)
    assert torch.equal(out, run())


# --- parse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, 123, b"smyrf", lshattn.SMYRF(), ["smyrf"]], ids=lambda v: type(v).__name__)
def test_parse_refuses_non_strings(value):
    with pytest.raises(TypeError, match=rf"parse takes a string such as 'smyrf:num_hashes=2', got \S*{type(value).__name__}$"):
        lshattn.parse(value)


@pytest.mark.parametrize("text", ["smyrf:num_hashes=2,num_hashes=2", "smyrf:num_hashes=2, q_cluster_size=8,num_hashes=3"])
def test_parse_refuses_duplicate_keys(text):
    with pytest.raises(ValueError, match=rf"num_hashes is given twice in {re.escape(repr(text))}"):
        lshattn.parse(text)


@pytest.mark.parametrize(
    "cls, field, raw, expected",
    [pytest.param(*p.values, raw, "int", id=f"{p.id}={raw}") for p in INT_FIELDS for raw in ("2.5", "two", "True", "")]
    + [pytest.param(*p.values, raw, "bool", id=f"{p.id}={raw}") for p in BOOL_FIELDS for raw in ("no", "1", "FALSE")]
    + [pytest.param(*p.values, raw, r"int \| None", id=f"{p.id}={raw}") for p in OPTIONAL_INT_FIELDS for raw in ("2.5", "none", "")]
    + [pytest.param(*p.values, "other", r"Literal\[", id=f"{p.id}=other") for p in LITERAL_FIELDS],
)
def test_parse_refuses_values_that_do_not_read_as_the_field_type(cls, field, raw, expected):
    text = f"{cls.name}:{field}={raw}"
    message = rf"cannot read {re.escape(repr(raw))} as {expected}.* for {cls.name} {field} in {re.escape(repr(text))}; write "
    with pytest.raises(ValueError, match=message):
        lshattn.parse(text)


@pytest.mark.parametrize("spec", SPECS)
def test_parse_reads_back_every_spec(spec):
    assert lshattn.parse(str(spec)) == spec


# --- property: any wrong value of any field or argument is refused, naming it --------------------

FIELD_TARGETS = [
    (*p.values, kind)
    for kind, params in (("int", INT_FIELDS), ("float", FLOAT_FIELDS), ("bool", BOOL_FIELDS), ("literal", LITERAL_FIELDS))
    for p in params
]
CALL_ARGUMENTS = ["causal", "return_aux", "scale", "dropout_p", "generator", "key_padding_mask", "query_padding_mask"]

if st is not None:
    _TENSORS = st.sampled_from([torch.tensor(1), torch.tensor(0.5), torch.tensor(True), torch.ones(2), torch.ones(2, 20)])
    _ODD = st.one_of(st.text(max_size=6), st.none(), st.lists(st.integers(-3, 3), max_size=2), _TENSORS)
    _NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
    _BEYOND_INT64 = st.integers(min_value=2**63, max_value=2**200) | st.integers(min_value=-(2**200), max_value=-(2**63) - 1)
    _MASKS = st.sampled_from(
        [torch.ones(2, 20), torch.ones(2, 21, dtype=torch.bool), torch.ones(20, dtype=torch.bool), torch.ones(2, 20).long()]
    )

    WRONG_FIELD_VALUES = {
        "int": st.one_of(_ODD, st.booleans(), st.floats(), _NON_FINITE, st.integers(max_value=-1), _BEYOND_INT64),
        # Every float field is a fraction in (0, 1] (TopK.fraction): beyond that range is wrong.
        "float": st.one_of(
            _ODD, st.booleans(), _NON_FINITE, st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
            st.integers(max_value=0), st.integers(min_value=2), _BEYOND_INT64,
        ),
        "bool": st.one_of(_ODD, st.integers(), st.floats()),
        "literal": st.one_of(_ODD, st.booleans(), st.integers(), st.floats()),
    }
    _FLAGS = st.one_of(_ODD, st.integers(), st.floats())
    WRONG_ARGUMENTS = {
        "causal": _FLAGS,
        "return_aux": _FLAGS,
        "scale": st.one_of(
            st.text(max_size=6), st.lists(st.floats(), max_size=2), _TENSORS, st.booleans(), _NON_FINITE,
            st.floats(max_value=0.0), st.integers(max_value=0),  # not positive
            st.floats(min_value=0.0, max_value=1e-38),  # below float32's smallest normal: 0 to the kernels
            st.floats(min_value=3.5e38), st.integers(min_value=2**128),  # beyond float32
        ),
        "dropout_p": st.one_of(
            _ODD, st.booleans(), _NON_FINITE, st.floats(max_value=-1e-300), st.floats(min_value=1.0),
            st.integers(max_value=-1), st.integers(min_value=1),
        ),
        "generator": st.one_of(
            st.text(max_size=6), st.lists(st.integers(), max_size=2), _TENSORS, st.booleans(), st.integers(), st.floats()
        ),
        "key_padding_mask": st.one_of(
            st.text(max_size=6), st.lists(st.booleans(), max_size=3), st.booleans(), st.integers(), st.floats(), _MASKS
        ),
    }
    WRONG_ARGUMENTS["query_padding_mask"] = WRONG_ARGUMENTS["key_padding_mask"]

    @settings(max_examples=400, deadline=None, database=None)
    @given(data=st.data())
    def test_any_wrong_field_value_is_refused_naming_the_field(data):
        """A random field of a random method and a wrong value for its kind (str, bool, float,
        None, list, tensor, nan, inf, negative, beyond int64): TypeError or ValueError whose
        message names the method and field; never another exception, never accepted."""
        cls, field, kind = data.draw(st.sampled_from(FIELD_TARGETS), label="field")
        value = data.draw(WRONG_FIELD_VALUES[kind], label="value")
        options = typing.get_args(typing.get_type_hints(cls)[field]) if kind == "literal" else ()
        if isinstance(value, str) and value in options:
            return  # a valid option, drawn by chance
        with pytest.raises((TypeError, ValueError)) as error:
            cls(**{field: value})
        assert f"{cls.__name__} {field}" in str(error.value)

    _Q, _K, _V = qkv()

    @settings(max_examples=400, deadline=None, database=None)
    @given(data=st.data())
    def test_any_wrong_call_argument_is_refused_naming_the_argument(data):
        """A random method, a random call argument and a wrong value for it: TypeError or
        ValueError whose message names the argument; never another exception, never accepted."""
        spec = data.draw(st.sampled_from([entry.method for entry in METHODS.values()]), label="spec")
        argument = data.draw(st.sampled_from(CALL_ARGUMENTS), label="argument")
        value = data.draw(WRONG_ARGUMENTS[argument], label="value")
        with pytest.raises((TypeError, ValueError)) as error:
            call(spec, _Q, _K, _V, **{argument: value})
        assert argument in str(error.value)

else:

    @pytest.mark.skip(reason="hypothesis is not installed: pip install hypothesis (or -e '.[test]')")
    def test_property_tests_need_hypothesis():
        pass
