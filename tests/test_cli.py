"""The ``lshattn`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_bad_method_string_exits_non_zero(capsys):
    assert cli.main(["bench", "--methods", "bogus", "--lengths", "64"]) == 1
    assert "unknown method 'bogus'" in capsys.readouterr().err
