"""One module per method, each with the same shape: an aux NamedTuple, a frozen spec dataclass
with ``_attend`` (the algorithm) and ``cost`` (its analytic cost)."""

from lshattn.methods.dense import Dense, DenseAux
from lshattn.methods.local import Local, LocalAux
from lshattn.methods.reformer import Reformer, ReformerAux
from lshattn.methods.simhash import SimHash, SimHashAux
from lshattn.methods.sketch import SketchTopK, SketchTopKAux
from lshattn.methods.smyrf import SMYRF, RandomClusters, SMYRFAux
from lshattn.methods.topk import TopK, TopKAux
from lshattn.methods.yoso import YOSO, YOSOAux

__all__ = [
    "Dense", "DenseAux", "Local", "LocalAux", "RandomClusters", "Reformer", "ReformerAux", "SMYRF", "SMYRFAux", "SimHash", "SimHashAux",
    "SketchTopK", "SketchTopKAux",
    "TopK", "TopKAux", "YOSO", "YOSOAux",
]
