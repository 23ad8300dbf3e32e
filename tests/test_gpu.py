"""Device-agnostic: every method on a CUDA device gives the CPU result (same generator).

Marked ``gpu``: ``make test`` deselects it; run ``pytest -m gpu`` on a machine with CUDA.
"""

from __future__ import annotations

import pytest
import torch
from catalogue import METHODS, Case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu(name, causal, dtype):
    entry = METHODS[name]
    case = Case(2, 3, 300, 300, 64, 64)
    q, k, v = entry.inputs(case, seed=1)
    mask = torch.arange(300)[None] < torch.tensor([[300], [211]])
    kw = dict(key_padding_mask=mask, query_padding_mask=mask, causal=causal)
    expected = entry.method(q, k, v, generator=torch.Generator().manual_seed(2), **kw)
    cuda = [x.cuda().to(dtype) for x in (q, k, v)]
    if entry.shared_qk:
        cuda[1] = cuda[0]
    out = entry.method(*cuda, generator=torch.Generator().manual_seed(2), **{**kw, "key_padding_mask": mask.cuda(),
                                                                           "query_padding_mask": mask.cuda()})
    assert out.device.type == "cuda" and out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    close = torch.isclose(out.float().cpu(), expected, atol=tolerance, rtol=tolerance).all(-1)
    assert close.float().mean() >= (1.0 if dtype == torch.float32 else 0.95)


@pytest.mark.parametrize("name", list(METHODS))
def test_cuda_backward(name):
    entry = METHODS[name]
    q, k, v = (x.cuda().requires_grad_() for x in entry.inputs(Case(1, 2, 257, 257, 32, 32), seed=3))
    out = entry.method(q, q if entry.shared_qk else k, v, causal=True, generator=torch.Generator().manual_seed(0))
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, v))
