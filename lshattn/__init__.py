"""lshattn: locality-sensitive-hashing attention for PyTorch.

Every method is a frozen dataclass spec that is called like a function on ``(B, H, T, D)``
queries and keys::

    import lshattn
    method = lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32)
    out = method(q, k, v, key_padding_mask=mask)          # == lshattn.attention(q, k, v, method)
    lshattn.parse(str(method)) == method                  # string round-trip
"""

from lshattn.api import Method, attention, method_names, parse
from lshattn.budget import for_budget, work_share
from lshattn.cost import Cost
from lshattn.methods import (
    SMYRF, YOSO, Dense, DenseAux, Local, LocalAux, RandomClusters, Reformer, ReformerAux, SimHash, SimHashAux, SketchTopK,
    SketchTopKAux, SMYRFAux, TopK, TopKAux, YOSOAux,
)

__version__ = "0.1.0"

__all__ = [
    "Cost",
    "Dense",
    "DenseAux",
    "Local",
    "LocalAux",
    "Method",
    "RandomClusters",
    "Reformer",
    "ReformerAux",
    "SMYRF",
    "SMYRFAux",
    "SimHash",
    "SimHashAux",
    "SketchTopK",
    "SketchTopKAux",
    "TopK",
    "TopKAux",
    "YOSO",
    "YOSOAux",
    "__version__",
    "attention",
    "for_budget",
    "method_names",
    "parse",
    "work_share",
]


def __getattr__(name: str):
    """``lshattn.hf`` and ``lshattn.data`` load on first use: ``import lshattn`` must not need
    transformers, an optional extra."""
    if name in ("hf", "data"):
        import importlib

        return importlib.import_module(f"lshattn.{name}")
    raise AttributeError(f"module 'lshattn' has no attribute {name!r}")
