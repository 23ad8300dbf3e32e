"""The public surface shared by every method: the spec base class, ``attention`` and ``parse``.

Shape legend (used in every docstring of the package):
    B batch, H heads, T query length, S key length, D query/key head dim, Dv value head dim.

A method spec is a frozen dataclass (hashable, comparable, printable) holding the method's
hyper-parameters. Calling it runs the attention::

    method = lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32)
    out = method(q, k, v)
    out, aux = method(q, k, v, key_padding_mask=m, causal=False, generator=g, return_aux=True)

Every spec validates its inputs here, once, then calls its ``_attend`` with checked, normalised
arguments (an ``Inputs`` record), so the method modules contain only their algorithm.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lshattn.cost import Cost

__all__ = ["Method", "SparseMethod", "Inputs", "attention", "parse", "method_names"]


class Inputs(NamedTuple):
    """Validated inputs of one call, as every method receives them.

    Attributes:
        q: `(B, H, T, D)`. k: `(B, H, S, D)`. v: `(B, H, S, Dv)`: a caller's grouped-query k and v
            (H_kv heads) are repeated to H here, ``kv_groups`` consecutive heads a key head.
        key_padding_mask: `(B, S)` bool, True = real key; None when every key is real.
        query_padding_mask: `(B, T)` bool, True = real query; None when every query is real.
        causal: query t sees keys <= t (T == S).
        scale: the logit scale (``D ** -0.5`` when the caller gave None).
        generator: where hash projections come from (None: torch's global RNG).
        dropout_p: attention-probability dropout (0 in eval).
        kv_groups: G = H / H_kv, the query heads that share a key head (1: none share). The
            hashing methods draw one projection a key head for its G query heads
            (``hashing.draw_per_group``), so each key head is hashed alike for its whole group.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    key_padding_mask: Tensor | None
    query_padding_mask: Tensor | None
    causal: bool
    scale: float
    generator: torch.Generator | None
    dropout_p: float
    kv_groups: int = 1


_REGISTRY: dict[str, type[Method]] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every method spec. Subclasses are frozen dataclasses with a ``name``.

    A subclass implements ``_attend(inputs) -> (out, aux)`` and ``cost(...)``, and may add range
    checks of its fields in ``_check_fields``; this class owns the call signature, the type checks
    of fields and the validation of inputs, the string form and the registry used by ``parse``.
    """

    name: ClassVar[str] = ""
    # Whether ``dropout_p`` is honoured; methods without attention probabilities to drop refuse it.
    supports_dropout: ClassVar[bool] = True
    # Whether the dot products spent depend on the inputs (``cost()`` is then an expectation and
    # ``aux.dot_products`` what a call spent): SimHash, whose collisions follow the data.
    cost_depends_on_data: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only a class that names itself registers: a subclass inheriting ``name`` (a test spy,
        # a user's variant) must not take over what ``parse`` returns for its parent's name.
        if cls.__dict__.get("name"):
            _REGISTRY[cls.name] = cls

    def __post_init__(self) -> None:
        """Check every field against its type hint, then the method's own ranges.

        Types are checked here, once, for every method: a bool or str where a number is meant
        would otherwise be accepted by a comparison (``True >= 1``) or a truth test (``"no"``)
        and silently run something else. numpy scalars are normalised to Python ones, so
        equality, hashing and ``str`` do not depend on where a value came from.
        """
        method = type(self).__name__
        for field, hint in _field_hints(type(self)):
            value = _check_field(method, field, hint, getattr(self, field.name))
            object.__setattr__(self, field.name, value)  # frozen: normalising is part of __init__
        self._check_fields()

    def _check_fields(self) -> None:
        """The method's range checks on its type-checked fields (override to add some)."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        /,
        *,
        key_padding_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        generator: torch.Generator | None = None,
        dropout_p: float = 0.0,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, NamedTuple]:
        """Attend with this method.

        Args:
            q: queries `(B, H, T, D)`.
            k: keys `(B, H_kv, S, D)`, H_kv dividing H: grouped-query attention when below H
                (query head h reads key head h // (H / H_kv)). The hashing methods then draw their
                projections per key head, shared by its query heads, so a key is hashed alike for
                all of them (decoding stores it once: ``lshattn.hf.use(..., gqa="shared")``).
            v: values `(B, H_kv, S, Dv)`.
            key_padding_mask: `(B, S)` bool, True = real key. Padded keys are never attended.
            query_padding_mask: `(B, T)` bool, True = real query. Padded queries output zeros.
            causal: query t sees only keys at positions <= t. Needs T == S.
            scale: logit scale; None means ``D ** -0.5``.
            generator: source of the hash projections. The same generator state gives
                bit-identical outputs; None draws from torch's global RNG, like dropout.
            dropout_p: dropout on the attention probabilities (pass 0 in eval).
            return_aux: also return the method's typed record of what it did.

        Returns:
            out `(B, H, T, Dv)` in q's dtype, and with ``return_aux`` the method's aux NamedTuple.
            A query that sees no key (all padded, say) gets zeros, never NaN.

        Raises:
            ValueError: shapes, masks or sizes that do not fit, with the sizes and the fix.
            TypeError: q, k, v of a non-float dtype, of different dtypes or on different devices;
                an argument of the wrong type (a str or bool where a number is meant, ...).
        """
        inputs = validate_inputs(
            self, q, k, v, key_padding_mask, query_padding_mask, causal, scale, generator, dropout_p,
            return_aux=return_aux,
        )
        # Under mixed precision (torch.autocast, Trainer's bf16/fp16) the method still computes in
        # its own dtypes: float32 at least (blocks.compute_dtype), the output in q's dtype. Autocast
        # would otherwise run the hash projections in half precision, where near-ties flip codes
        # and cluster orders, and mix dtypes inside the methods' own products.
        with torch.autocast(q.device.type, enabled=False):
            out, aux = self._attend(without_padding_values(inputs))
        return (out, aux) if return_aux else out

    def _attend(self, inputs: Inputs) -> tuple[Tensor, NamedTuple]:
        raise NotImplementedError

    def _check_inputs(self, inputs: Inputs) -> None:
        """Method-specific checks on validated inputs (override to add some)."""

    def cost(
        self, B: int, H: int, T: int, S: int, D: int, Dv: int, *, causal: bool = False, itemsize: int = 4
    ) -> Cost:
        """Analytic cost of one forward call on inputs of these sizes; each method's docstring
        gives its formula. ``itemsize`` is the bytes per element of the compute dtype."""
        raise NotImplementedError

    def __str__(self) -> str:
        """``name:key=value,...`` with the parameters that differ from their defaults; ``parse``
        reads it back. Record ``dataclasses.asdict`` too where defaults may change between
        versions."""
        params = ",".join(
            f"{f.name}={_format_value(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        )
        return f"{self.name}:{params}" if params else self.name


@dataclasses.dataclass(frozen=True)
class SparseMethod(Method):
    """Base of the methods that attend a subset of the pairs: every one takes ``sinks`` and ``window``.

    ``sinks=s``: every query also attends the first s real keys of its sequence, exactly.
    ``window=w``: every query also attends the real keys within w tokens of its own (ranks among
    real tokens; causal: the w before it and itself), exactly; None (default) for no window,
    0 for the own key alone. A covered pair counts as a pair the method's hashing found (once per
    round for Reformer and SMYRF), whether it found it or not, never twice; the cost and
    ``dot_products`` include the covered pairs' slots (``lshattn.local``). Keyword-only, so a
    method's positional fields keep their order.
    """

    sinks: int = dataclasses.field(default=0, kw_only=True)
    window: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"{type(self).__name__} sinks must be >= 0, got {self.sinks}; 0 attends no sink")
        if self.window is not None and self.window < 0:
            raise ValueError(
                f"{type(self).__name__} window must be None (no window) or >= 0 (the keys within that many "
                f"tokens of the query), got {self.window}"
            )

    def _check_local(self, inputs: Inputs) -> None:
        T, S = inputs.q.shape[2], inputs.k.shape[2]
        if self.window is not None and T != S:
            raise ValueError(
                f"{type(self).__name__}(window={self.window}) needs T == S (the window is around the "
                f"query's own position), got T={T} queries and S={S} keys; pass window=None for "
                f"cross-attention (sinks={self.sinks} works at any T and S)"
            )


def method_names() -> list[str]:
    """Names ``parse`` accepts, e.g. ``["dense", "reformer", "smyrf"]``."""
    return sorted(_REGISTRY)


def attention(q: Tensor, k: Tensor, v: Tensor, method: Method | str | None = None, /, **kwargs: Any):
    """Functional form: ``attention(q, k, v, method, **kw) == method(q, k, v, **kw)``.

    ``method`` may be a spec, a string for ``parse``, or None for exact (``Dense``) attention.
    """
    if method is None:
        method = _REGISTRY["dense"]()
    elif isinstance(method, str):
        method = parse(method)
    elif not isinstance(method, Method):
        raise TypeError(f"method must be a lshattn method spec or a string, got {type(method).__name__}")
    return method(q, k, v, **kwargs)


def parse(text: str) -> Method:
    """Build a method spec from its string form: ``parse("smyrf:num_hashes=2,q_cluster_size=32")``.

    Unnamed parameters keep their defaults, and ``parse(str(m)) == m`` for every spec ``m``.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: an unknown method or key, a key given twice, or a value that does not read
            as its field's type or is out of its range.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse takes a string such as 'smyrf:num_hashes=2', got {_type_name(text)}")
    name, _, params = text.strip().partition(":")
    name = name.strip().lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r} in {text!r}; known methods: {', '.join(method_names())}")
    cls = _REGISTRY[name]
    fields = {field.name: (field, hint) for field, hint in _field_hints(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(
                f"cannot read {item!r} in {text!r}: {name} takes key=value pairs with keys "
                f"{', '.join(sorted(fields))}"
            )
        if key in kwargs:  # last-one-wins would hide a typo or a botched merge of two settings
            raise ValueError(f"{key} is given twice in {text!r}; give each key once")
        field, hint = fields[key]
        kwargs[key] = _parse_value(raw.strip(), field, hint, f"{name} {key}", text)
    return cls(**kwargs)


def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _parse_value(raw: str, field: dataclasses.Field, hint: Any, where: str, text: str) -> Any:
    """``raw`` read as a value of ``hint`` (the inverse of ``_format_value``); the spec then
    checks its range. ValueError naming the field, the text and the type it expects."""
    for option in _hint_options(hint):
        value = _read_text(raw, option)
        if value is not _REJECT:
            return value
    raise ValueError(
        f"cannot read {raw!r} as {_hint_name(hint)} for {where} in {text!r}; write {_example(field, hint)}"
    )


def _read_text(raw: str, option: Any) -> Any:
    """``raw`` as a value of one alternative of a hint, or ``_REJECT``."""
    if option is type(None):
        return None if raw == "None" else _REJECT
    if typing.get_origin(option) is typing.Literal:
        return next((a for a in typing.get_args(option) if _format_value(a) == raw), _REJECT)
    if option is bool:
        return {"True": True, "true": True, "False": False, "false": False}.get(raw, _REJECT)
    if option in (int, float):
        try:
            return option(raw)
        except ValueError:
            return _REJECT
    return raw if option in (str, Any) else _REJECT


# --- checking values: one reader per kind of value, shared by spec fields and call arguments -----

# What a reader returns for a value it does not take (None is a value some fields take).
_REJECT: Any = object()

# Integer fields end up as torch sizes and indices, which are int64.
_INT64_MAX = 2**63 - 1


def _flag(value: Any) -> Any:
    """A bool (numpy's included) as a bool, else ``_REJECT``: 0, 1, "no" and None are not flags,
    though Python would happily test their truth."""
    return bool(value) if isinstance(value, bool) or _is_numpy_bool(value) else _REJECT


def _integer(value: Any) -> Any:
    """An integer (numpy's included) as an int, else ``_REJECT``. A bool is not one, though it
    is an int to Python (``True >= 1`` would pass a range check); nor is 2.0 or "2"."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return _REJECT


def _real(value: Any) -> Any:
    """A real number (numpy's included) as a float, else ``_REJECT``: not a bool, str or tensor.
    An integer beyond the float range becomes ±inf, for the range checks to refuse."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return _REJECT


def _is_numpy_bool(value: Any) -> bool:
    # By name: numpy is not a dependency of the core. Its bool type is numpy.bool (numpy.bool_
    # before 2.0), and it is not a numbers.Integral, unlike Python's bool.
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def _expect(read: typing.Callable[[Any], Any], value: Any, label: str, expected: str, fix: str) -> Any:
    """``read(value)``, or TypeError saying what ``label`` takes, what it got and what to pass."""
    checked = read(value)
    if checked is _REJECT:
        raise TypeError(f"{label} must be {expected}, got {_show(value)}; {fix}")
    return checked


def _show(value: Any) -> str:
    """A given value and its type for an error message: ``True (bool)``."""
    return f"{_short(value)} ({_type_name(value)})"


def _short(value: Any) -> str:
    """``repr`` on one line, shortened: a given value may be a large tensor or a 400-digit int."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# --- spec fields ----------------------------------------------------------------------------------


@functools.cache
def _field_hints(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """Each dataclass field of ``cls`` with its resolved type hint (``Any`` where none resolves).

    The modules use ``from __future__ import annotations``, so annotations are strings until
    ``typing.get_type_hints`` evaluates them. A subclass defined inside a function may annotate
    with names only it can see; then the hints of the nearest class that resolves are used.
    """
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        try:
            hints = typing.get_type_hints(klass)
            break
        except NameError:
            continue
    return tuple((field, hints.get(field.name, Any)) for field in dataclasses.fields(cls))


def _check_field(method: str, field: dataclasses.Field, hint: Any, value: Any) -> Any:
    """``value`` of ``method``'s ``field`` normalised to its hint: TypeError when no alternative
    of the hint takes it, ValueError for a str outside a Literal's options or an int beyond int64."""
    what = f"{method} {field.name}"
    for option in _hint_options(hint):
        checked = _read_value(value, option)
        if checked is not _REJECT:
            break
    else:
        options = _literal_options(hint)
        if any(_same_kind(value, a) for a in options):  # the right kind, not one of the options
            raise ValueError(f"{what} must be {_choices(options)}, got {value!r}")
        raise TypeError(f"{what} must be {_expected(hint)}, got {_show(value)}; pass {_example(field, hint)}")
    if type(checked) is int and not -_INT64_MAX - 1 <= checked <= _INT64_MAX:
        raise ValueError(f"{what} must fit in int64 (torch sizes and indices are int64), got {_short(checked)}")
    return checked


def _read_value(value: Any, option: Any) -> Any:
    """``value`` as a value of one alternative of a hint, normalised, or ``_REJECT``."""
    if option is Any:
        return value
    if option is type(None):
        return None if value is None else _REJECT
    if typing.get_origin(option) is typing.Literal:
        # The option itself is returned: a numpy str becomes a str.
        return next((a for a in typing.get_args(option) if _same_kind(value, a) and value == a), _REJECT)
    readers = {bool: _flag, int: _integer, float: _real}
    if option in readers:
        return readers[option](value)
    if typing.get_origin(option) is None and isinstance(option, type):
        return value if isinstance(value, option) else _REJECT
    return value  # a hint this cannot check (list[int], a Protocol): left to the method


def _same_kind(value: Any, option: Any) -> bool:
    """Whether ``value`` is of the type of a Literal option; compared with ``==`` alone, True
    would be the option 1."""
    return isinstance(value, type(option)) and isinstance(value, bool) == isinstance(option, bool)


def _hint_options(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union hint (``int | None`` -> ``(int, NoneType)``), else ``(hint,)``."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _literal_options(hint: Any) -> list[Any]:
    return [a for o in _hint_options(hint) if typing.get_origin(o) is typing.Literal for a in typing.get_args(o)]


def _choices(options: list[Any]) -> str:
    """``'any' or 'all'``; ``'a', 'b' or 'c'``."""
    shown = [repr(a) for a in options]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _hint_name(hint: Any) -> str:
    """The type a hint names, as code: ``int``, ``Literal['any', 'all']``, ``int | None``."""

    def name(option: Any) -> str:
        if option is type(None):
            return "None"
        if typing.get_origin(option) is typing.Literal:
            return f"Literal[{', '.join(repr(a) for a in typing.get_args(option))}]"
        return option.__name__ if isinstance(option, type) and typing.get_origin(option) is None else str(option)

    return " | ".join(name(o) for o in _hint_options(hint))


def _expected(hint: Any) -> str:
    """What a hint takes, in words: ``an int``, ``a bool``, ``'any' or 'all'``, ``an int or None``."""
    words = {bool: "a bool", int: "an int", float: "a real number", str: "a str", type(None): "None"}

    def word(option: Any) -> str:
        if typing.get_origin(option) is typing.Literal:
            return _choices(list(typing.get_args(option)))
        return words.get(option) or f"a {_hint_name(option)}"

    return " or ".join(word(o) for o in _hint_options(hint))


def _example(field: dataclasses.Field, hint: Any) -> str:
    """A setting of ``field`` to pass instead: ``shared_qk=True or shared_qk=False``,
    ``rule='any' or rule='all'``, ``e.g. q_cluster_size=32`` (its default)."""
    options = _hint_options(hint)
    if bool in options:
        return f"{field.name}=True or {field.name}=False"
    if _literal_options(hint):
        return " or ".join(f"{field.name}={a!r}" for a in _literal_options(hint))
    if field.default is not dataclasses.MISSING:
        return f"e.g. {field.name}={field.default!r}"
    return f"a {_hint_name(hint)} as {field.name}"


# --- call arguments -------------------------------------------------------------------------------


def validate_inputs(
    method: Method,
    q: Any,
    k: Any,
    v: Any,
    key_padding_mask: Any,
    query_padding_mask: Any,
    causal: Any,
    scale: Any,
    generator: Any,
    dropout_p: Any,
    *,
    return_aux: Any = False,
) -> Inputs:
    """Check every argument of a call and return them normalised; raise with sizes and the fix.

    ValueError for values out of range or sizes that do not fit; TypeError for the wrong kind
    of value (a str or bool where a number is meant, a tensor where a float is meant, ...).
    """
    for label, x, dims in (("q", q, "(B, H, T, D)"), ("k", k, "(B, H_kv, S, D)"), ("v", v, "(B, H_kv, S, Dv)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{label} must be a torch.Tensor {dims}, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{label} must have 4 dims {dims}, got shape {tuple(x.shape)}; "
                f"reshape (B, T, H, D) inputs with .transpose(1, 2), add a head dim with .unsqueeze(1)"
            )
        if not x.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them with .to()")
    if not (q.device == k.device == v.device):
        raise TypeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (B, H, T, D), (Bk, Hk, S, Dk), (Bv, Hv, Sv, _) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q has B={B}, k has B={Bk}, v has B={Bv}")
    if Hk != Hv or Hk < 1 or H % Hk:
        raise ValueError(
            f"heads do not fit: q has H={H}, k has H={Hk}, v has H={Hv}; k and v need the same "
            f"number of heads H_kv, and H_kv must divide H (grouped-query attention: query head h reads "
            f"key head h // (H / H_kv))"
        )
    if D != Dk:
        raise ValueError(f"q and k head dims differ: q has D={D}, k has D={Dk}")
    if S != Sv:
        raise ValueError(f"k and v lengths differ: k has S={S}, v has S={Sv}")
    if min(B, H, T, S, D, v.shape[-1]) < 1:
        raise ValueError(
            f"every size must be positive, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    key_padding_mask = _check_mask(key_padding_mask, "key_padding_mask", (B, S), "(B, S)", q.device)
    query_padding_mask = _check_mask(query_padding_mask, "query_padding_mask", (B, T), "(B, T)", q.device)
    causal = _expect(_flag, causal, "causal", "a bool", "pass causal=True or causal=False")
    if causal and T != S:
        raise ValueError(
            f"causal=True needs T == S (query t sees keys <= t), got T={T}, S={S}; "
            f"for cross-attention pass causal=False"
        )
    scale = D**-0.5 if scale is None else _check_scale(scale, q.dtype)
    dropout_p = _check_dropout(dropout_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {_show(generator)}")
    _expect(_flag, return_aux, "return_aux", "a bool", "pass return_aux=True or return_aux=False")
    kv_groups = H // Hk
    if kv_groups > 1:  # grouped-query attention: the methods attend per query head
        k, v = k.repeat_interleave(kv_groups, dim=1), v.repeat_interleave(kv_groups, dim=1)
    inputs = Inputs(q, k, v, key_padding_mask, query_padding_mask, causal, scale, generator, dropout_p, kv_groups)
    if isinstance(method, SparseMethod):
        method._check_local(inputs)
    method._check_inputs(inputs)
    return inputs


def _check_scale(scale: Any, dtype: torch.dtype) -> float:
    """A given logit scale as a float: positive, finite and representable in the dtype the
    logits are computed in (float32 for half and float32 inputs, as ``lshattn.blocks.compute_dtype``),
    where 1e300 would become inf and every output NaN."""
    value = _expect(
        _real, scale, "scale", "a real number or None (meaning D ** -0.5)",
        "pass a float, e.g. scale=0.125 (float(x) for a tensor or numpy array x)",
    )  # fmt: skip
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be a positive finite number or None (meaning D ** -0.5), got {_short(scale)}")
    compute = torch.promote_types(dtype, torch.float32)
    limits = torch.finfo(compute)
    if not limits.tiny <= value <= limits.max:
        raise ValueError(
            f"scale must be in [{limits.tiny:.6g}, {limits.max:.6g}] to be representable in {compute}, "
            f"the compute dtype of {dtype} inputs, got {_short(scale)}"
        )
    return value


def _check_dropout(dropout_p: Any) -> float:
    value = _expect(
        _real, dropout_p, "dropout_p", "a real number in [0, 1)", "pass e.g. dropout_p=0.1 (float(x) for a tensor x)"
    )
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {_short(dropout_p)}")
    return value


def without_padding_values(inputs: Inputs) -> Inputs:
    """Inputs whose padded slots hold zeros: padding is inert whatever it holds (NaN or inf
    included), and its gradient is zero. Keys and values follow the key mask, queries the query
    mask; one elementwise pass, only where a mask is given."""
    q, k, v = inputs.q, inputs.k, inputs.v
    if inputs.key_padding_mask is not None:
        padded = ~inputs.key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(padded, 0), v.masked_fill(padded, 0)
    if inputs.query_padding_mask is not None:
        q = q.masked_fill(~inputs.query_padding_mask[:, None, :, None], 0)
    return inputs._replace(q=q, k=k, v=v)


def _check_mask(mask: Any, label: str, shape: tuple[int, int], dims: str, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"{label} must be a bool tensor {dims}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"{label} must be a bool tensor (True = real token), got {mask.dtype}; "
            f"convert a 0/1 mask with mask.bool(), an additive mask with mask == 0"
        )
    if tuple(mask.shape) != shape:
        raise ValueError(f"{label} must have shape {dims} = {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{label} is on {mask.device} but q is on {device}; move it with .to(q.device)")
    return None if bool(mask.all()) else mask
