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
from torch.utils import flop_counter

__all__ = [
    "NativeKernelWarning",
    "available",
    "bucket_sums",
    "collision_grads",
    "decodes_natively",
    "load",
    "packed_planes",
    "project_signs",
    "simhash_decode",
    "sketch_decode",
    "yoso_decode",
]

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

# A SimHash decoding step runs on several threads from this many (query, cached key) slots on
# (one sequence's 9 heads at 8k: 72k, one thread). Measured at 8k: one step 0.4 ms on one thread.
THREADED_DECODE_KEYS = 1 << 21
# A YOSO decoding step runs on several threads from this much work, in multiply-adds of hashing
# (D·τ a hash) and values read (Dv a hash) for each head and query. SmolLM2's 9 heads × 40
# hashes × (64·8 + 64) at 8k are 207k: 0.15–0.22 ms on one thread, 0.45 ms on two (2 cores,
# 2026-12-01: torch's own threads still spin after its last operation), so a sequence's step
# stays on one.
THREADED_YOSO_WORK = 1 << 22
# A SketchTopK decoding step runs on several threads from this many sketch lookups (query heads
# × cached keys × bytes a sketch): SmolLM2's 9 heads × 8k keys × 32 bytes are 2.3M, one thread.
THREADED_SKETCH_LOOKUPS = 1 << 24
# project_signs: rows projected together (PROJECT_ROWS in cpu.cpp), and the multiply-adds from
# which a call runs on several threads (a decoding step's few tokens stay on one).
PROJECT_ROWS = 4
THREADED_PROJECTIONS = 1 << 22
# Projections a pass of project_signs keeps in registers (PROJECT_WIDTH in cpu.cpp): the kernels
# read the planes packed in blocks of this many (``packed_planes``).
PROJECT_WIDTH = 16


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
    "lshattn_simhash_decode_f32": [_PTR] * 12 + [_I64] * 13 + [_INT, ctypes.c_double, _I64, _I64],
    "lshattn_simhash_decode_f64": [_PTR] * 12 + [_I64] * 13 + [_INT, ctypes.c_double, _I64, _I64],
    "lshattn_yoso_decode_f32": [_PTR] * 11 + [_I64] * 12 + [_INT, _I64, _I64],
    "lshattn_yoso_decode_f64": [_PTR] * 11 + [_I64] * 12 + [_INT, _I64, _I64],
    "lshattn_sketch_decode_f32": [_PTR] * 11 + [_I64] * 11 + [ctypes.c_double, _I64, _I64],
    "lshattn_sketch_decode_f64": [_PTR] * 11 + [_I64] * 11 + [ctypes.c_double, _I64, _I64],
    "lshattn_project_signs_i32": [_PTR] * 3 + [_I64] * 7,
    "lshattn_project_signs_i64": [_PTR] * 3 + [_I64] * 7,
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
    head = (*(t.data_ptr() for t in tensors), *sizes, ranges)
    _run_spans(kernel, head, N * ranges, min(N * ranges, torch.get_num_threads()), flags)


def _run_spans(kernel, head: tuple, units: int, spans: int, tail: tuple = ()) -> None:
    """Run ``kernel(*head, unit_begin, unit_end, *tail)`` over ``units`` units of work, in
    ``spans`` contiguous spans, one a thread."""
    _run([(kernel, *head, units * s // spans, units * (s + 1) // spans, *tail) for s in range(spans)])


class _Counts:
    """Two counts per query a decoding kernel writes (the keys it scored, whether its output is
    all zeros), in a ctypes array summed in Python: a step's dozen queries cost no torch
    operation (a small tensor's sum and its read are about 20 µs in a model's decoding step)."""

    def __init__(self, queries: int) -> None:
        self.queries = queries
        self.values = (ctypes.c_int64 * (2 * queries))()

    @property
    def pointers(self) -> tuple[int, int]:
        base = ctypes.addressof(self.values)
        return base, base + self.queries * ctypes.sizeof(ctypes.c_int64)

    def totals(self) -> tuple[int, int]:
        return sum(self.values[: self.queries]), sum(self.values[self.queries :])


def _decode_step(
    name: str, q: Tensor, k: Tensor, v: Tensor, store: tuple[Tensor, ...], visible: Tensor | None, last_key: Tensor,
    sizes: tuple, flags: tuple, threaded: bool, shared: int,
) -> tuple[Tensor, int, int]:  # fmt: skip
    """Run the decoding kernel ``lshattn_<name>`` as ``kernel(q, k, v, *store, visible, out, scored,
    empty, last_key, H, H_kv, shared, T, S, D, Dv, *sizes, *flags, unit_begin, unit_end)`` over the
    B·H / ``shared`` store heads, each serving ``shared`` query heads (on several threads if
    ``threaded``): `(B, H, T, Dv)` out, the pairs scored, the queries left empty."""
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    seen = None if visible is None else visible.reshape(B, T, S).contiguous().view(torch.uint8)
    # written (B, T, H, Dv), the layout the model's attention returns: its transpose is then no copy
    out, counts = q.new_empty(B, T, H, Dv), _Counts(B * H * T)
    pointers = [None if x is None else x.data_ptr() for x in (q, k, v, *store, seen, out)]
    if shared < 1 or (H // H_kv) % shared:
        raise ValueError(f"a store head serves shared={shared} query heads: it must divide G = H / H_kv = {H // H_kv}")
    head = (*pointers, *counts.pointers, last_key.data_ptr(), H, H_kv, shared, T, S, D, Dv, *sizes, *flags)
    units = B * H // shared
    _run_spans(_kernel(name, q), head, units, min(units, torch.get_num_threads()) if threaded else 1)
    return out.transpose(1, 2), *counts.totals()


def simhash_decode(
    q: Tensor, k: Tensor, v: Tensor, planes: Tensor, buffer: Tensor, index_keys: Tensor, starts: Tensor,
    visible: Tensor | None, last_key: Tensor, *, bits: int, sinks: int, window: int | None, importance: bool,
    scale: float, shared: int = 1,
) -> tuple[Tensor, int, int]:  # fmt: skip
    """SimHash's decoding step (``lshattn.decode.simhash``, sparse and importance modes, codes of
    at most 15 bits), natively: hashes the T new keys into ``buffer`` and the T new queries (as
    ``project_signs``: the prefill's codes), then gives each query the softmax over the visible
    keys it collides with in some table and those ``sinks`` and ``window`` cover, each once (see
    cpu.cpp). Call it where ``decodes_natively`` says so.

    Args:
        q: `(B, H, T, D)`; k: `(B, H_kv, S, D)`; v: `(B, H_kv, S, Dv)` (GQA: read per key head), of
            one dtype, float32 or float64.
        planes: `(H_s, D·R·bits)` the projections, packed (``packed_planes``), H_s = H / ``shared``
            store heads, each read by ``shared`` consecutive query heads (1, or G: a key head's).
        buffer: `(B, H_s, R, capacity)` int16, contiguous, capacity >= S: the cached keys' codes in
            the first S − T slots; the new keys' are written after them (once a store head).
        index_keys: `(B, H_s, R, N)` int32, the first N keys sorted by code; starts: `(B, H_s, R,
            2^bits + 1)` int32, where each code's run begins (``decode.simhash.BucketIndex``); the
            keys after the first N are compared one by one.
        visible: `(B, 1, T, S)` bool, or None: query t sees the keys up to position S − T + t.
        last_key: `(B, H_kv, D)` of q's dtype, contiguous: receives each key head's last key (the
            store's check that the next step continues its cache; a clone is a dozen µs more).

    Returns:
        out `(B, H, T, Dv)`, the query–key pairs scored, and the queries left with no key (their
        output all zeros).
    """
    B, H, T = q.shape[:3]
    R, N = index_keys.shape[2], index_keys.shape[3]
    sizes = (R, N, bits, buffer.shape[-1], sinks, -1 if window is None else window)
    # a decoding step of one sequence lists a few thousand keys: less work than handing it to threads
    threaded = B * H * T * k.shape[2] >= THREADED_DECODE_KEYS
    store = (planes, buffer, index_keys.contiguous(), starts.contiguous())
    flags = (int(importance), scale)
    return _decode_step("simhash_decode", q, k, v, store, visible, last_key, sizes, flags, threaded, shared)


def yoso_decode(
    q: Tensor, k: Tensor, v: Tensor, planes: Tensor, buffer: Tensor, tables: Tensor, visible: Tensor | None,
    last_key: Tensor, *, bits: int, sinks: int, window: int | None, normalize: bool, shared: int = 1,
) -> tuple[Tensor, int, int]:  # fmt: skip
    """YOSO-m's decoding step (``lshattn.decode.yoso``, with bucket tables), natively: hashes the
    T new keys into ``buffer`` and the T new queries (as ``project_signs``: the prefill's codes),
    gives each query ``(1/m)·Σ_h`` its bucket's row of each table plus the new keys up to it that
    share its bucket, corrects the keys ``sinks`` and ``window`` cover to the exact kernel
    ``(1 − θ/π)^τ``, L2-normalises with ``normalize``, then adds the new real keys' values to the
    tables (see cpu.cpp). Call it where ``decodes_natively`` says so.

    Args:
        q: `(B, H, T, D)`; k: `(B, H_kv, S, D)`; v: `(B, H_kv, S, Dv)` (GQA: read per key head), of
            one dtype, float32 or float64.
        planes: `(H_s, D·m·bits)` the projections, packed (``packed_planes``), H_s = H / ``shared``
            store heads, each read by ``shared`` consecutive query heads (1, or G: a key head's).
        buffer: `(B, H_s, capacity, m)` int16 (codes of at most 15 bits), contiguous, capacity >= S:
            the cached keys' codes in the first S − T slots; the new keys' are written after them.
        tables: `(B, H_s·m·2^bits, Dv)` of q's dtype, contiguous: the value sums of the cached real
            keys by bucket (``decode.yoso.YOSOStore``), grown in place by the new real keys' once a
            store head, after its query heads read them.
        visible: `(B, 1, T, S)` bool, or None: query t sees the keys up to position S − T + t.
        last_key: `(B, H_kv, D)` of q's dtype, contiguous: receives each key head's last key.

    Returns:
        out `(B, H, T, Dv)`, the query–key pairs scored (those ``sinks`` and ``window`` cover;
        the tables' rows are not counted), and the queries whose output is all zeros.
    """
    B, H, T, D = q.shape
    m = buffer.shape[-1]
    if buffer.dtype != torch.int16 or bits > 15:
        raise ValueError(f"yoso_decode takes int16 codes of at most 15 bits, got {buffer.dtype} and bits={bits}")
    sizes = (m, bits, buffer.shape[2], sinks, -1 if window is None else window)
    threaded = B * H * T * m * (D * bits + v.shape[-1]) >= THREADED_YOSO_WORK
    return _decode_step(
        "yoso_decode", q, k, v, (planes, buffer, tables), visible, last_key, sizes, (int(normalize),), threaded, shared
    )


def sketch_decode(
    q: Tensor, k: Tensor, v: Tensor, planes: Tensor, buffer: Tensor, keep: Tensor, visible: Tensor | None,
    last_key: Tensor, *, sinks: int, window: int | None, scale: float, shared: int = 1,
) -> tuple[Tensor, int, int]:  # fmt: skip
    """SketchTopK's decoding step (``lshattn.decode.sketch``), natively: sketches the T new keys
    into ``buffer`` (as ``project_signs``: the prefill's sketches), ranks every visible key not
    covered by ``sinks`` and ``window`` by the query's estimate (the prefill's integers, one table
    lookup a byte), keeps the ``keep[n]`` highest of the n (ties to the earlier key), and gives
    each query the softmax over the kept and the covered keys (see cpu.cpp). Call it where
    ``decodes_natively`` says so.

    Args:
        q: `(B, H, T, D)`; k: `(B, H_kv, S, D)`; v: `(B, H_kv, S, Dv)` (GQA: read per key head), of
            one dtype, float32 or float64.
        planes: `(H_s, D·R·8)` the projections, packed (``packed_planes``), H_s = H / ``shared``
            store heads, each read by ``shared`` consecutive query heads (1, or G: a key head's).
        buffer: `(B, H_s, R, capacity)` uint8, contiguous, capacity >= S: the cached keys' sketches
            in the first S − T slots; the new keys' are written after them.
        keep: `(S + 1,)` int64: the keys kept of n ranked (``methods.topk.kept_counts``).
        visible: `(B, 1, T, S)` bool, or None: query t sees the keys up to position S − T + t.
        last_key: `(B, H_kv, D)` of q's dtype, contiguous: receives each key head's last key.

    Returns:
        out `(B, H, T, Dv)`, the query–key pairs scored (kept and covered; the ranking reads every
        visible key's sketch), and the queries left with no key.
    """
    B, H, T = q.shape[:3]
    R, capacity = buffer.shape[2], buffer.shape[3]
    if keep.shape[0] <= k.shape[2] or keep.dtype != torch.int64:
        raise ValueError(
            f"keep must be int64 with S + 1 = {k.shape[2] + 1} entries, got {tuple(keep.shape)} {keep.dtype}"
        )
    sizes = (R, capacity, sinks, -1 if window is None else window)
    threaded = B * H * T * k.shape[2] * R >= THREADED_SKETCH_LOOKUPS
    store = (planes, buffer, keep.contiguous())
    return _decode_step("sketch_decode", q, k, v, store, visible, last_key, sizes, (scale,), threaded, shared)


def decodes_natively(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None) -> bool:
    """Whether the decoding kernels (``simhash_decode``, ``yoso_decode``, ``sketch_decode``) run on these inputs:
    compiled kernels, CPU tensors of one dtype (float32 or float64), a mask shared by the heads."""
    return (
        _kernel("simhash_decode", q) is not None
        and k.dtype == v.dtype == q.dtype
        and k.device.type == v.device.type == "cpu"
        and (visible is None or visible.shape[1] == 1)
    )


def project_signs(x: Tensor, planes: Tensor, codes: Tensor) -> None:
    """SimHash codes natively: ``codes[n, l, r] = Σ_b [x[n, l]·planes[n % H, :, r, b] ≥ 0]·2^b``
    (a projection's sign bit clear; a projection of exactly zero counts as positive). Each
    projection is summed over d in order by the same instructions whatever else is hashed, so a
    token alone (a decoding step) gets the codes it gets in a whole prompt. A torch operator
    (``torch.ops.lshattn.project_signs``), so that ``lshattn.cost.count_flops`` counts its
    ``2·N·L·D·R·bits`` FLOPs as those of the matrix product it replaces.

    Args:
        x: `(N, L, D)` float32 on the CPU; row n is of head n % H.
        planes: `(H, D, R, bits)` float32.
        codes: `(N, L, R)` int32 or int64, written.
    """
    if _kernel("project_signs", codes) is None or x.dtype != torch.float32 or x.device.type != "cpu":
        raise RuntimeError(
            f"lshattn.kernels.project_signs needs the native kernels, float32 inputs and int32/int64 codes on the "
            f"CPU, got {x.dtype} inputs and {codes.dtype} codes on {x.device}"
        )
    torch.ops.lshattn.project_signs(x.contiguous(), packed_planes(planes), codes)


def packed_planes(planes: Tensor) -> Tensor:
    """`(H, D, R, bits)` projections as the kernels read them: `(H, D·K)` float32 (K = R·bits),
    per head the blocks of ``PROJECT_WIDTH`` projections one after another, each block a
    row-major `(D, width)` matrix (the last one narrower). A pass over one block then reads
    memory in order; a decoding step's stores keep their planes packed so (a step reads every
    plane once, mostly from memory)."""
    H, D = planes.shape[:2]
    flat = planes.to(torch.float32).reshape(H, D, -1)
    K = flat.shape[-1]
    whole = K - K % PROJECT_WIDTH
    blocks = flat[:, :, :whole].reshape(H, D, whole // PROJECT_WIDTH, PROJECT_WIDTH).transpose(1, 2)
    return torch.cat([blocks.reshape(H, -1), flat[:, :, whole:].reshape(H, -1)], 1).contiguous()


@torch.library.custom_op("lshattn::project_signs", mutates_args=("codes",), device_types="cpu")
def _project_signs(x: Tensor, planes: Tensor, codes: Tensor) -> None:
    """``project_signs`` with the planes packed (``packed_planes``)."""
    N, L, D = x.shape
    H, R = planes.shape[0], codes.shape[2]
    bits = planes.shape[1] // (D * R)
    units = N * -(-L // PROJECT_ROWS)
    spans = min(units, torch.get_num_threads()) if units * PROJECT_ROWS * D * R * bits >= THREADED_PROJECTIONS else 1
    head = (x.data_ptr(), planes.data_ptr(), codes.data_ptr(), H, L, D, R, bits)
    _run_spans(_kernel("project_signs", codes), head, units, spans)


@flop_counter.register_flop_formula(torch.ops.lshattn.project_signs)
def _project_signs_flops(x_shape, planes_shape, codes_shape, *args, **kwargs) -> int:
    """The matrix product's: 2·N·L·D·R·bits (the packed planes hold D·R·bits a head)."""
    N, L, _ = x_shape
    return 2 * N * L * planes_shape[1]
