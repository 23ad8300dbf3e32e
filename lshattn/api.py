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
import math
import typing
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lshattn.cost import Cost

__all__ = ["Method", "Inputs", "attention", "parse", "method_names"]


class Inputs(NamedTuple):
    """Validated inputs of one call, as every method receives them.

    Attributes:
        q: `(B, H, T, D)`. k: `(B, H, S, D)`. v: `(B, H, S, Dv)`.
        key_padding_mask: `(B, S)` bool, True = real key; None when every key is real.
        query_padding_mask: `(B, T)` bool, True = real query; None when every query is real.
        causal: query t sees keys <= t (T == S).
        scale: the logit scale (``D ** -0.5`` when the caller gave None).
        generator: where hash projections come from (None: torch's global RNG).
        dropout_p: attention-probability dropout (0 in eval).
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


_REGISTRY: dict[str, type[Method]] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every method spec. Subclasses are frozen dataclasses with a ``name``.

    A subclass implements ``_attend(inputs) -> (out, aux)`` and ``cost(...)``; this class owns the
    call signature, input validation, the string form and the registry used by ``parse``.
    """

    name: ClassVar[str] = ""
    # Whether ``dropout_p`` is honoured; methods without attention probabilities to drop refuse it.
    supports_dropout: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only a class that names itself registers: a subclass inheriting ``name`` (a test spy,
        # a user's variant) must not take over what ``parse`` returns for its parent's name.
        if cls.__dict__.get("name"):
            _REGISTRY[cls.name] = cls

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
            k: keys `(B, H, S, D)`.
            v: values `(B, H, S, Dv)`.
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
            TypeError: q, k, v of a non-float dtype, of different dtypes or on different devices.
        """
        inputs = validate_inputs(
            self, q, k, v, key_padding_mask, query_padding_mask, causal, scale, generator, dropout_p
        )
        out, aux = self._attend(inputs)
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
    """
    name, _, params = text.strip().partition(":")
    name = name.strip().lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r} in {text!r}; known methods: {', '.join(method_names())}")
    cls = _REGISTRY[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(
                f"cannot read {item!r} in {text!r}: {name} takes key=value pairs with keys "
                f"{', '.join(sorted(fields))}"
            )
        kwargs[key] = _parse_value(raw.strip(), hints[key], f"{name}.{key}")
    return cls(**kwargs)


def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _parse_value(raw: str, hint: Any, where: str) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    if raw == "None" and type(None) in options:
        return None
    literal_options = [a for o in options if typing.get_origin(o) is typing.Literal for a in typing.get_args(o)]
    if raw in literal_options:
        return raw
    for option in options:
        if option is bool and raw in ("True", "False", "true", "false"):
            return raw.lower() == "true"
        if option is int:
            try:
                return int(raw)
            except ValueError:
                continue
        if option is float:
            try:
                return float(raw)
            except ValueError:
                continue
        if option is str:
            return raw
    raise ValueError(f"cannot read {raw!r} as {hint} for {where}")


_UnionType = type(int | None)


def validate_inputs(
    method: Method,
    q: Any,
    k: Any,
    v: Any,
    key_padding_mask: Any,
    query_padding_mask: Any,
    causal: bool,
    scale: float | None,
    generator: torch.Generator | None,
    dropout_p: float,
) -> Inputs:
    """Check every argument of a call and return them normalised; raise with sizes and the fix."""
    for label, x, dims in (("q", q, "(B, H, T, D)"), ("k", k, "(B, H, S, D)"), ("v", v, "(B, H, S, Dv)")):
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
    if not (H == Hk == Hv):
        raise ValueError(
            f"head counts differ: q has H={H}, k has H={Hk}, v has H={Hv}; for grouped-query "
            f"attention repeat k and v per group (k.repeat_interleave(H // H_kv, dim=1))"
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
    if causal and T != S:
        raise ValueError(
            f"causal=True needs T == S (query t sees keys <= t), got T={T}, S={S}; "
            f"for cross-attention pass causal=False"
        )
    if scale is None:
        scale = D**-0.5
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None (meaning D ** -0.5), got {scale!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    inputs = Inputs(q, k, v, key_padding_mask, query_padding_mask, bool(causal), float(scale), generator, dropout_p)
    method._check_inputs(inputs)
    return inputs


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
