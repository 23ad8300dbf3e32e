"""The ``lshattn`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lshattn
from lshattn import cli


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lshattn"] == lshattn.__version__
    assert set(lshattn.method_names()) <= set(report["methods"])


def test_bench_tiny_run_prints_ratios(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "lshattn.cli", "bench", "--lengths", "256", "--modes", "fwd", "--reps", "1",
         "--methods", "smyrf:q_cluster_size=64,k_cluster_size=64", "--heads", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| `smyrf:q_cluster_size=64,k_cluster_size=64` |" in done.stdout and "×)" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert {r["method"] for r in results} == {"sdpa", "smyrf:q_cluster_size=64,k_cluster_size=64"}
    assert all(r["seconds"] > 0 for r in results)


def test_bench_causal_times_causal_calls(monkeypatch):
    """--causal reaches SDPA (is_causal) and the method (causal=True) in the child's measurement."""
    from lshattn import bench

    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append(("sdpa", kwargs.get("is_causal")))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for spec in ("sdpa", "yoso:num_hashes=2,num_bits=2"):
        point = bench.measure(spec, 32, "fwd", 1, "cpu", 1, 2, 8, causal=True)
        assert point["seconds"] > 0
    assert calls and all(causal for _, causal in calls)
    q = torch.randn(1, 1, 8, 4)
    method_fn = bench.attention_fn("yoso:num_hashes=2,num_bits=2", 0, causal=True)
    reference = lshattn.YOSO(num_hashes=2, num_bits=2)(q, q, q, causal=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(method_fn(q, q, q), reference)


def test_bad_method_string_exits_non_zero(capsys):
    assert cli.main(["bench", "--methods", "bogus", "--lengths", "64"]) == 1
    assert "unknown method 'bogus'" in capsys.readouterr().err


def test_fidelity_budget_sets_each_method_and_adds_the_oracle_the_control_and_the_baseline():
    """``--budget``: every method at its setting for the budget (keys the string names stay
    fixed), then the references at the same budget."""
    methods = cli.budgeted(["smyrf", "reformer:shared_qk=False,num_hashes=1", "topk"], 0.25, 128, 32)
    assert methods == [
        lshattn.SMYRF(num_hashes=2, q_cluster_size=16, k_cluster_size=16),
        lshattn.for_budget("reformer", 0.25, 128, D=32, shared_qk=False, num_hashes=1),
        lshattn.TopK(fraction=0.25),  # named once though asked for twice
        lshattn.RandomClusters(num_hashes=2, q_cluster_size=16, k_cluster_size=16),
        lshattn.Local(sinks=4, window=13),  # 4 + 27 keys of 128
    ]
    assert all(lshattn.work_share(m, 128, 128, 32) <= 0.25 for m in methods)


def test_fidelity_command_with_a_budget(capsys):
    from lshattn import data

    try:
        data.load_minilm()
    except data.MissingPackageError as missing:
        pytest.skip(str(missing))
    code = cli.main(["fidelity", "--methods", "smyrf", "--budget", "0.25", "--lengths", "64", "--docs", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    for method in ("smyrf:q_cluster_size=8,k_cluster_size=8", "topk ", "random:q_cluster_size=8,k_cluster_size=8"):
        assert method in printed
    assert " 25.0% " in printed  # the oracle keeps exactly a quarter at 64 tokens
