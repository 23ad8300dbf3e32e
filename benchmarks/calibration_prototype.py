"""Prototype (issue 13): would SMYRF select better with sort directions calibrated on the model?

Per layer and head of the bundled all-MiniLM-L6-v2, SMYRF's directions are fitted on 64 unlabelled
Rotten Tomatoes training texts (128 tokens): the top principal components of the XBOX+ vectors of
queries and keys ("pca"), or the top eigenvectors of the symmetrised ``QᵀK`` ("cross"). On 64
held-out test texts it prints, per layer, the share of each real query's exact softmax mass that
falls inside the pairs the method attends (its clusters in any round, and its sinks and window),
for SMYRF with random directions, the random-cluster control and the two calibrations::

    python benchmarks/calibration_prototype.py      # about 4 minutes on 2 cores

A measurement, not a method: the calibrated directions live in a module-level dict that the
prototype's SMYRF subclass reads layer by layer. Results: docs/fidelity-ideas.md.
"""

import dataclasses
from typing import ClassVar

import torch

import lshattn
from lshattn import data, testing
from lshattn.eval import capture, tasks
from lshattn.hashing import e2lsh_projection, xbox_plus

tokenizer, model = data.load_minilm()
task = tasks.rotten_tomatoes_task(tokenizer, max_length=128, train=600, test=300, seed=0)


def captured(texts):
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    return capture.capture_attention_inputs(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


calib = captured(task.train_texts[:64])
held = captured(task.test_texts[:64])
DIRS = {}


def fit_directions(inp, R, mode):
    """`(H, R, D + 2)`: per head, the R directions of ``mode`` fitted on one batch's real tokens."""
    B, H, T, _ = inp.q.shape
    m = inp.key_padding_mask if inp.key_padding_mask is not None else torch.ones(B, T, dtype=torch.bool)
    qa, ka = xbox_plus(inp.q.float(), inp.k.float(), m, m)
    out = []
    for h in range(H):  # a prototype: a loop over heads is fine here
        queries, keys = qa[:, h][m], ka[:, h][m]
        if mode == "pca":  # the top principal components of queries and keys together
            x = torch.cat([queries, keys])
            out.append(torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:R])
        else:  # "cross": the top eigenvectors of the symmetrised QᵀK, where q·k is largest
            c = queries.T @ keys
            w, vecs = torch.linalg.eigh((c + c.T) / 2)
            out.append(vecs[:, torch.argsort(w.abs(), descending=True)[:R]].T)
    return torch.stack(out)


@dataclasses.dataclass(frozen=True)
class Calibrated(lshattn.SMYRF):
    name: ClassVar[str] = ""

    def _projections(self, q, k, q_valid, k_valid, generator):
        qa, ka = xbox_plus(q, k, q_valid, k_valid)
        d = DIRS["current"]
        return e2lsh_projection(qa, d), e2lsh_projection(ka, d)


def selected_dense(method, inp, aux):
    """`(B, H, T, S)` bool: the pairs SMYRF's clusters hold in some round, or its sinks and window cover."""
    sel = (aux.query_clusters[..., :, None] == aux.key_clusters[..., None, :]).any(2)  # (B,H,T,S)
    cov = testing.covered_by(
        method, inp.q, inp.k, key_padding_mask=inp.key_padding_mask, query_padding_mask=inp.query_padding_mask
    )
    return sel | cov


def recall(method, layer_dirs=None):
    vals = []
    for i, inp in enumerate(held):
        if layer_dirs is not None:
            DIRS["current"] = layer_dirs[i]
        _, aux = capture.replay(method, inp, generator=torch.Generator().manual_seed(i), return_aux=True)
        sel = selected_dense(method, inp, aux)
        m = (
            inp.key_padding_mask
            if inp.key_padding_mask is not None
            else torch.ones(inp.q.shape[0], inp.q.shape[2], dtype=torch.bool)
        )
        s = (inp.q.float() @ inp.k.float().transpose(-1, -2)) * inp.scale
        s = s.masked_fill(~m[:, None, None, :], float("-inf"))
        p = torch.softmax(s, -1)
        mass = (p * sel).sum(-1)  # (B,H,T)
        vals.append(float(mass[m[:, None, :].expand_as(mass)].mean()))
    return vals


for R, c, loc in [(2, 16, {}), (2, 12, {"sinks": 2, "window": 2}), (1, 32, {})]:
    base = {"num_hashes": R, "q_cluster_size": c, "k_cluster_size": c, **loc}
    print(f"R={R} c={c} {loc}")
    print("  smyrf  ", [round(x, 3) for x in recall(lshattn.SMYRF(**base))])
    print("  random ", [round(x, 3) for x in recall(lshattn.RandomClusters(**base))])
    for mode in ("pca", "cross"):
        dirs = [fit_directions(inp, R, mode) for inp in calib]
        print(f"  {mode:7s}", [round(x, 3) for x in recall(Calibrated(**base), dirs)])
