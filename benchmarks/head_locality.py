"""Where each head of MiniLM puts its attention: inside sinks and a window, or beyond (issue 13).

Per layer and head of the bundled all-MiniLM-L6-v2, on 64 Rotten Tomatoes test texts (128 tokens),
the mean over real queries of the share of exact softmax mass inside 2 sinks and a ±14 window (the
demo's `local:sinks=2,window=14`, 24 % of the pairs) and inside the query's top 25 % of keys (the
oracle). Heads whose mass the window holds need no hashing; the others are where a per-head budget
split would send the budget::

    python benchmarks/head_locality.py      # about a minute on 2 cores

Results: docs/fidelity-ideas.md.
"""

import torch

from lshattn import data, testing
from lshattn.eval import capture, tasks

tokenizer, model = data.load_minilm()
task = tasks.rotten_tomatoes_task(tokenizer, max_length=128, train=600, test=300, seed=0)
enc = tokenizer(list(task.test_texts[:64]), padding="max_length", truncation=True, max_length=128, return_tensors="pt")
calls = capture.capture_attention_inputs(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
for layer, inp in enumerate(calls):
    B, H, T, _ = inp.q.shape
    m = inp.key_padding_mask if inp.key_padding_mask is not None else torch.ones(B, T, dtype=torch.bool)
    s = (inp.q.double() @ inp.k.double().transpose(-1, -2)) * inp.scale
    s = s.masked_fill(~m[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    cov = testing.covered_pairs(B, T, T, sinks=2, window=14, key_padding_mask=m, query_padding_mask=m)
    local = (p * cov).sum(-1)
    n = m.sum(1).view(B, 1, 1, 1)
    keep = torch.ceil(n * 0.25).long()
    top = torch.sort(p, -1, descending=True).values
    oracle = top.cumsum(-1).gather(-1, (keep - 1).expand(B, H, T, 1)).squeeze(-1)
    real = m[:, None, :].expand(B, H, T)
    loc = [float(local[:, h][real[:, h]].mean()) for h in range(H)]
    orc = [float(oracle[:, h][real[:, h]].mean()) for h in range(H)]
    print(f"layer {layer}: local " + " ".join(f"{x:.2f}" for x in loc))
    print("         oracle " + " ".join(f"{x:.2f}" for x in orc))
