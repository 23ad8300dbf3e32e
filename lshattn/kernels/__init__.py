"""Native CPU kernels, compiled on first use and loaded with ctypes.

The kernels are plain C++ with a C ABI (no Python or torch headers), so compiling one takes
about a second. The shared library is cached under ``$LSHATTN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/lshattn`` or ``~/.cache/lshattn``), keyed by the source, the compiler command,
its flags and the CPU, since it is built with ``-march=native``. Where no compiler works, each
kernel's caller falls back to its pure-torch path, with one warning that says why;
``LSHATTN_NATIVE=0`` forces the fallback.

Threads: a call splits its work into independent units and runs them on
``torch.get_num_threads()`` threads (ctypes releases the GIL while a kernel runs).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "bucket_sums", "collision_grads", "sign_codes", "load", "NativeKernelWarning"]

SOURCE_DIR = Path(__file__).parent
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second where the compiler rejects -march=native
# -fno-math-errno: the kernels never read errno, and without it a square root is a branch that
# keeps a loop from vectorising (results are unchanged).
BASE_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]

# Scalars of bucket tables one unit of work holds at once: 4 MiB in float32, about what a core's
# cache keeps. Larger groups of hashes save passes over the values but scatter into tables that
# miss the cache: at τ = 12, T = 4096 (m = 32, 8 heads) a 64 MiB budget made YOSO-m's forward
# 124 ms, 4 MiB 45 ms; at τ = 8 all 32 tables fit either way.
UNIT_TABLE_BUDGET = 1 << 20


class NativeKernelWarning(UserWarning):
    """A native kernel could not be built; the pure-torch path runs instead."""


def _enabled() -> bool:
    return os.environ.get("LSHATTN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("LSHATTN_CACHE_DIR"):
        return Path(os.environ["LSHATTN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lshattn"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(source: Path, target: Path) -> str | None:
    """Compile ``source`` into ``target`` atomically; None on success, else why it failed."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    errors = []
    for flags in FLAG_SETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [*compiler, *flags, *BASE_FLAGS, str(source), "-o", partial]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            os.unlink(partial)
            return f"{shlex.join(command)}: {error}"
        if result.returncode == 0:
            os.replace(partial, target)  # atomic: concurrent processes never load a partial file
            return None
        os.unlink(partial)
        errors.append(f"{shlex.join(command)}:\n{result.stderr.strip()[-2000:]}")
    return "\n".join(errors)


_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
# The C signature of every kernel in cpu.cpp.
SIGNATURES = {
    "lshattn_bucket_sums_f32": [_PTR] * 4 + [_I64] * 10 + [_INT] * 2,
    "lshattn_bucket_sums_f64": [_PTR] * 4 + [_I64] * 10 + [_INT] * 2,
    "lshattn_collision_grads_f32": [_PTR] * 8 + [_I64] * 10 + [_INT, _I64, ctypes.c_double],
    "lshattn_collision_grads_f64": [_PTR] * 8 + [_I64] * 10 + [_INT, _I64, ctypes.c_double],
    "lshattn_sign_codes_i32": [_PTR] * 2 + [_I64] * 7,
    "lshattn_sign_codes_i64": [_PTR] * 2 + [_I64] * 7,
}


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels (``lshattn/kernels/cpu.cpp``), or None when native kernels are
    disabled or cannot be built (with a ``NativeKernelWarning``)."""
    if not _enabled():
        return None
    source = SOURCE_DIR / "cpu.cpp"
    key = hashlib.sha256(
        b"\0".join(
            [
                source.read_bytes(),
                os.environ.get("CXX", "c++").encode(),
                repr((FLAG_SETS, BASE_FLAGS)).encode(),
                _cpu_signature().encode(),
            ]
        )  # fmt: skip
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu-{key}.so"
    if not target.exists():
        failure = _compile(source, target)
        if failure is not None:
            warnings.warn(
                f"lshattn: could not compile the native kernels {source.name}, so the slower pure-torch paths "
                f"run instead (set CXX to a working C++17 compiler, or LSHATTN_NATIVE=0 to silence this):\n{failure}",
                NativeKernelWarning,
                stacklevel=3,
            )
            return None
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:  # say, a cache directory mounted noexec
        warnings.warn(
            f"lshattn: could not load the native kernels {target}, so the slower pure-torch paths run instead "
            f"(set LSHATTN_CACHE_DIR to a directory that allows executables, or LSHATTN_NATIVE=0): {error}",
            NativeKernelWarning,
            stacklevel=3,
        )
        return None
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = None, argtypes
    return library


def available() -> bool:
    """Whether the native kernels run here (compiling them if needed)."""
    return load() is not None


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process: a forked child (a data-loader worker, say) inherits its parent's
    pool without its threads, so it gets its own (``pid`` is part of the cache key)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lshattn")


def _run(tasks: list[tuple]) -> None:
    """Run ``(function, *args)`` tasks on ``torch.get_num_threads()`` threads."""
    workers = min(len(tasks), torch.get_num_threads())
    if workers <= 1:
        for function, *args in tasks:
            function(*args)
        return
    for future in [_pool(workers, os.getpid()).submit(*task) for task in tasks]:
        future.result()


def bucket_sums(
    read_rows: Tensor, write_rows: Tensor, values: Tensor, rows: int, *, causal: bool, reverse: bool = False
) -> Tensor | None:
    """``out_i = Σ_h Σ_{j: write_rows[n, j, h] == read_rows[n, i, h]} values[n, j]``, natively.

    Args:
        read_rows: `(N, T, m)` table rows in ``[0, rows)``, negative for a reader that reads nothing.
        write_rows: `(N, S, m)`, negative for a writer that writes nothing.
        values: `(N, S, Dv)` float32 or float64 on the CPU.
        causal: reader i sums writers j <= i (T == S); with ``reverse``, j >= i.

    Returns:
        `(N, T, Dv)`, or None when the native kernel is unavailable or does not apply (not a CPU
        tensor, another dtype); the caller then runs its torch path.
    """
    kernel = _kernel("bucket_sums", values)
    if kernel is None:
        return None
    N, T, m = read_rows.shape
    S, Dv = values.shape[1], values.shape[2]
    values = values.contiguous()
    read_rows, write_rows = _codes(read_rows), _codes(write_rows)
    ranges = _hash_ranges(N, m)
    out = values.new_empty(ranges, N, T, Dv)
    group = max(1, UNIT_TABLE_BUDGET // (rows * Dv))
    _run_units(
        kernel,
        N,
        ranges,
        (values, write_rows, read_rows, out),
        (N, S, T, m, Dv, rows, group),
        (int(causal), int(reverse)),
    )
    return out[0] if ranges == 1 else out.sum(0)


def collision_grads(
    q: Tensor, k: Tensor, v: Tensor, grad: Tensor, q_codes: Tensor, k_codes: Tensor, rows: int, *, causal: bool,
    exact_bits: int = 0, clamp: float = 1.0,
) -> tuple[Tensor, Tensor] | None:  # fmt: skip
    """Surrogate gradients over the pairs that collide: with ``w_ij = (g_i·v_j)·φ_ij``,
    ``grad_q_i = Σ_j w_ij k_j`` and ``grad_k_j = Σ_i w_ij q_i``, natively (see cpu.cpp).

    ``exact_bits=0``: φ_ij = the number of hashes in which i and j collide, in O((T + S)·Dv·D)
    per hash however unevenly the codes fall. ``exact_bits=τ``: φ_ij = τ(1 − arccos(x)/π)^(τ−1) /
    (π√(1 − x²)) at ``x = q_i·k_j`` clamped to ±``clamp``, once for every pair that collides in
    at least one hash.

    Args:
        q: `(N, T, D)`; k: `(N, S, D)`; v: `(N, S, Dv)`; grad: `(N, T, Dv)`, float32 or float64.
        q_codes: `(N, T, m)` codes in ``[0, rows)``, negative for a query in no pair;
            k_codes: `(N, S, m)`, likewise.
        causal: pairs j <= i only (T == S).

    Returns:
        `(N, T, D)` and `(N, S, D)`, or None when the native kernel is unavailable or does not
        apply (not on the CPU, another dtype).
    """
    kernel = _kernel("collision_grads", q)
    if kernel is None:
        return None
    N, T, m = q_codes.shape
    S, D, Dv = k.shape[1], q.shape[2], v.shape[2]
    q, k, v, grad = (x.to(q.dtype).contiguous() for x in (q, k, v, grad))
    ranges = _hash_ranges(N, m)
    grad_q, grad_k = q.new_empty(ranges, N, T, D), q.new_empty(ranges, N, S, D)
    tensors = (q, k, v, grad, _codes(q_codes), _codes(k_codes), grad_q, grad_k)
    _run_units(kernel, N, ranges, tensors, (N, T, S, m, D, Dv, rows), (int(causal), exact_bits, clamp))
    return (grad_q[0], grad_k[0]) if ranges == 1 else (grad_q.sum(0), grad_k.sum(0))


# The variant of a kernel for the dtype of the tensor that selects it.
_VARIANTS = {torch.float32: "f32", torch.float64: "f64", torch.int32: "i32", torch.int64: "i64"}


def _kernel(name: str, x: Tensor):
    """``lshattn_<name>_<variant for x.dtype>``, or None where it does not run: x not on the
    CPU, a dtype the kernel has no variant for, or no compiled library."""
    library = load() if x.device.type == "cpu" else None
    return getattr(library, f"lshattn_{name}_{_VARIANTS.get(x.dtype)}", None) if library is not None else None


def _codes(codes: Tensor) -> Tensor:
    return codes.to(torch.int32).contiguous()


def _hash_ranges(N: int, m: int) -> int:
    """Ranges the m hashes of each row are split into: one, unless there are fewer rows than
    threads, so that every thread gets work. Each range writes its own partial output."""
    return min(m, -(-torch.get_num_threads() // N))


def _run_units(kernel, N: int, ranges: int, tensors, sizes, flags) -> None:
    """Run ``kernel(*pointers, *sizes, ranges, unit_begin, unit_end, *flags)`` over the N·ranges
    units (row, range of hashes), in one contiguous span of units per thread."""
    units = N * ranges
    spans = min(units, torch.get_num_threads())
    head = (*(t.data_ptr() for t in tensors), *sizes, ranges)
    _run([(kernel, *head, units * s // spans, units * (s + 1) // spans, *flags) for s in range(spans)])


def sign_codes(proj: Tensor, codes: Tensor, offset: int) -> None:
    """Pack the sign bits of a chunk of projections into ``codes``, natively (call it where
    ``available()`` and the tensors are on the CPU).

    Bit k of table r is 1 when ``proj[n, t, r·bits + k]`` has its sign bit clear (+0 counts as
    positive, -0 as negative, as ``torch.copysign`` has it); the code is ``Σ_k bit_k · 2^k``.

    Args:
        proj: `(N, n, R·bits)` float32, contiguous: the projections of positions
            ``offset .. offset + n`` of each of N rows.
        codes: `(N, L, R)` int32 or int64, contiguous; positions ``offset .. offset + n`` are written.
    """
    kernel = _kernel("sign_codes", codes)
    if kernel is None or proj.dtype != torch.float32 or proj.device.type != "cpu":
        raise RuntimeError(
            f"lshattn.kernels.sign_codes needs the native kernels and float32 projections and int32/int64 "
            f"codes on the CPU, got {proj.dtype} projections and {codes.dtype} codes on {proj.device}"
        )
    N, n, K = proj.shape
    L, R = codes.shape[1], codes.shape[2]
    kernel(proj.data_ptr(), codes.data_ptr(), n, R, K // R, L * R, offset, 0, N * n)
