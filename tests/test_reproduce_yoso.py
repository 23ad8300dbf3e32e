"""``lshattn reproduce yoso``: its runs, rows and settings agree with each other, the interchange
table leaves the cells a run was not evaluated with empty, and the ListOps part runs end to end
on a tiny model and resumes (seconds)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.reproduce needs transformers (pip install 'lshattn[train]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")

from assets import or_skip

from lshattn import cli, data, parse, reproduce
from lshattn.reproduce import common, yoso
from lshattn.train import FinetuneConfig
from lshattn.train.common import method_label
from lshattn.train.listops import ListOpsConfig


def test_the_reproduction_is_registered_with_its_parts():
    assert reproduce.load("yoso") is yoso
    args = cli.build_parser().parse_args(["reproduce", "yoso", "--part", "listops", "--quick"])
    assert args.part == "listops" and args.quick
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["reproduce", "yoso", "--part", "glue"])
    with pytest.raises(ValueError, match="unknown part 'glue'; choose all, listops, minilm"):
        yoso.runs(part="glue")


def test_parts_hold_every_run_once_with_the_recipe_it_needs():
    every = yoso.runs()
    assert [run.name for run in every] == [run.name for part in yoso.PARTS.values() for run in part]
    assert len({run.name for run in every}) == len(every) == 10
    assert all(isinstance(run.config, ListOpsConfig) for run in yoso.runs(part="listops"))
    assert all(isinstance(run.config, FinetuneConfig) for run in yoso.runs(part="minilm"))


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_every_row_reads_evaluations_its_runs_make(quick):
    """Each row's cells are evaluations its runs make (the quick runs keep the method strings)."""
    evaluations = {run.name: {method_label(m) for m in run.config.eval_methods} for run in yoso.runs(quick)}
    for row in yoso.ROWS:
        assert method_label(row.evaluated_with) in evaluations[row.run], row.what
        if row.minus is not None:
            assert method_label(row.minus[1]) in evaluations[row.minus[0]], row.what
        assert row.what and row.paper
    for run in yoso.runs(quick):
        assert method_label(run.config.method) in evaluations[run.name]  # each is evaluated as trained


def test_the_settings_fit_the_data_and_the_methods():
    for method in yoso.METHODS.values():
        assert method_label(method) == method_label(str(parse(method)))
    listops = yoso.LISTOPS
    reformer = parse(yoso.REFORMER)
    assert reformer.num_buckets == 2 * listops.max_length // reformer.bucket_size  # Reformer's rule
    assert listops.train_size >= listops.max_steps * listops.batch_size  # no expression seen twice
    for run in yoso.runs(part="minilm"):
        documents = {"rt": 1936, "bbc": 2225}[run.config.task]  # what each task has (lshattn.eval.tasks)
        assert run.config.train_size + run.config.eval_size <= documents


def test_the_interchange_table_leaves_cells_not_evaluated_empty(tmp_path):
    runs = [common.Run("a", "A", FinetuneConfig(method="dense")), common.Run("b", "B", FinetuneConfig(method="dense"))]
    results = {
        "a": [{"config": {"seed": 0}, "evaluated_with": {"dense": {"accuracy": 0.5}}}],
        "b": [{"config": {"seed": 0}, "evaluated_with": {"dense": {"accuracy": 0.7}, "yoso": {"accuracy": 0.6}}}],
    }
    columns = {"dense": "dense", "YOSO": "yoso"}
    assert common.evaluated(results, "b", "yoso") and not common.evaluated(results, "a", "yoso")
    table = common.cross_table(runs, columns, results)
    assert "| A | 50.0 | – |" in table and "| B | 70.0 | 60.0 |" in table
    assert common.plot_accuracies(runs, columns, results, tmp_path / "p.png", "t").is_file()


def test_the_listops_part_runs_end_to_end_and_resumes(monkeypatch, tmp_path, capsys):
    """The ListOps part, shrunk to 2 steps of a tiny BERT on expressions of 12–31 tokens: six
    runs, the report with the papers' numbers beside ours, then a second call that trains nothing."""

    quick = yoso.quick_config

    def tiny(config):
        if not isinstance(config, ListOpsConfig):
            return quick(config)
        return dataclasses.replace(
            config, min_length=12, max_length=31, max_depth=4, max_args=4, train_size=16, eval_size=8, hidden_size=16,
            intermediate_size=32, max_steps=2, batch_size=8, eval_steps=2, save_steps=2,
        )  # fmt: skip

    monkeypatch.setattr(yoso, "quick_config", tiny)
    argv = ["reproduce", "yoso", "--quick", "--part", "listops", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    assert "[6/6] SimHash 2 bits (ListOps), seed 0: training" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "| ListOps: dense (softmax) | 37.10 (LRA PyTorch code base" in report
    assert "| ListOps: Reformer − dense | −18.05 (code base)" in report
    assert "| --quick |" in report and "lshattn reproduce yoso --quick" in report and "--part listops" in report
    assert "Rotten Tomatoes" not in report.split("## Where we differ")[0]  # only the part that ran
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["interchange"]) == {run.name for run in yoso.PARTS["listops"]}
    assert set(metrics["interchange"]["listops-yoso"]) == {"YOSO-32 (τ 11)", "YOSO-E (τ 11)"}
    seed = json.loads((tmp_path / "listops-reformer" / "seed0" / "metrics.json").read_text())
    assert seed["steps"] == 2 and seed["trained_with"] == method_label(yoso.REFORMER)
    assert seed["config"]["max_length"] == 31

    assert cli.main(argv) == 0  # again: every seed is read back
    assert capsys.readouterr().out.count("done before") == 6


@pytest.mark.slow
def test_yoso_quick_runs(tmp_path):
    """The real ``--quick``, both parts (about 3 min on a busy 2-core machine)."""
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    or_skip(data.bbc_news)
    metrics = yoso.reproduce(tmp_path, quick=True, seeds=(0,), progress=False)
    assert set(metrics["interchange"]) == {run.name for run in yoso.runs()}
    assert (tmp_path / "report.md").is_file()
