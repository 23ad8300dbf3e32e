"""lshattn.reproduce: aggregation over seeds, the tables, resuming, the re-initialisation of
attention weights, the command line, and one tiny reproduction end to end (seconds)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="lshattn.reproduce needs transformers (pip install 'lshattn[train]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")

from lshattn import cli, data, reproduce  # noqa: E402
from lshattn.reproduce import albert_lsh, common, smyrf  # noqa: E402
from lshattn.reproduce.common import Row, Run  # noqa: E402
from lshattn.train import FinetuneConfig, models  # noqa: E402
from lshattn.train.common import method_label  # noqa: E402
from assets import or_skip  # noqa: E402

pytestmark = pytest.mark.hf

SMYRF = "smyrf:num_hashes=2,q_cluster_size=16,k_cluster_size=16"


def fake_metrics(config: FinetuneConfig, accuracy: dict[str, float]) -> dict:
    """What ``finetune`` returns, reduced to what the reproductions read."""
    return {
        "config": json.loads(json.dumps({**dataclasses.asdict(config), "method": method_label(config.method)})),
        "evaluated_with": {label: {"accuracy": a, "loss": 0.5} for label, a in accuracy.items()},
        "wall_seconds": 60.0,
    }


RUNS = [
    Run("dense", "dense", FinetuneConfig(method="dense")),
    Run("lsh", "SMYRF 2×16", FinetuneConfig(method=SMYRF)),
]
EVALUATED = {"dense": "dense", "SMYRF 2×16": SMYRF}


def seeded(run: Run, seed: int) -> FinetuneConfig:
    return dataclasses.replace(run.config, seed=seed)


@pytest.fixture
def results():
    """Three seeds of two runs, each evaluated with dense and SMYRF."""
    dense = [0.80, 0.82, 0.84]
    lsh = [0.79, 0.80, 0.84]
    label = method_label(SMYRF)
    return {
        "dense": [fake_metrics(seeded(RUNS[0], s), {"dense": d, label: d - 0.1}) for s, d in enumerate(dense)],
        "lsh": [fake_metrics(seeded(RUNS[1], s), {"dense": a - 0.02, label: a}) for s, a in enumerate(lsh)],
    }


def test_spread_is_the_mean_the_sample_std_and_the_range():
    stats = common.spread([80.0, 82.0, 84.0])
    assert stats["mean"] == pytest.approx(82.0)
    assert stats["std"] == pytest.approx(2.0)  # sample std (n - 1), not 1.63
    assert (stats["min"], stats["max"], stats["n"]) == (80.0, 84.0, 3)
    assert common.spread([81.5])["std"] is None
    with pytest.raises(ValueError, match="no seed finished"):
        common.spread([])


def test_format_spread():
    assert common.format_spread(common.spread([80.0, 82.0, 84.0])) == "82.0 ± 2.0 (80.0 to 84.0, 3 seeds)"
    assert common.format_spread(common.spread([81.25])) == "81.2 (1 seed)"
    assert common.format_spread(common.spread([-1.0, 0.5]), signed=True).startswith("-0.2 ± 1.1 (-1.0 to +0.5")


def test_results_table_puts_the_paper_beside_ours_and_pairs_differences_by_seed(results):
    rows = [
        Row("dense", "82.69", "dense", "dense"),
        Row("SMYRF − dense", "−0.95", "lsh", SMYRF, minus=("dense", "dense")),
    ]
    table = common.results_table(rows, RUNS, EVALUATED, results).splitlines()
    assert table[0].startswith("| | paper | ours")
    assert table[2].startswith("| dense | 82.69 | 82.0 ± 2.0 (80.0 to 84.0, 3 seeds) | trained with dense")
    assert "| 1.0 min per seed |" in table[2]
    # per seed: -1, -2, 0 -> mean -1, sample std 1
    assert table[3].startswith("| SMYRF − dense | −0.95 | -1.0 ± 1.0 (-2.0 to +0.0, 3 seeds) | trained with SMYRF 2×16")
    assert table[3].endswith("| – |")
    assert common.row_values(rows[1], results) == pytest.approx([-1.0, -2.0, 0.0])


def test_cross_table_has_a_row_per_trained_and_a_column_per_evaluated_method(results):
    table = common.cross_table(RUNS, EVALUATED, results).splitlines()
    assert table[0] == "| trained with ↓ / evaluated with → | dense | SMYRF 2×16 |"
    assert table[2] == "| dense | 82.0 ± 2.0 | 72.0 ± 2.0 |"
    assert table[3].startswith("| SMYRF 2×16 | 79.0 ± 2.6 | 81.0 ± 2.6")


def test_accuracies_name_the_evaluations_a_run_has(results):
    with pytest.raises(KeyError, match="not evaluated with 'smyrf'; it was with dense, smyrf:q_cluster_size"):
        common.accuracies(results, "dense", "smyrf")


def test_write_reproduction_writes_the_report_metrics_and_plot(results, tmp_path):
    rows = [Row("dense", "82.69", "dense", "dense")]
    scaled = [common.Scaled("steps", "3 epochs", "200 steps", "an hour on 2 cores")]
    metrics = common.write_reproduction(
        tmp_path, name="test", title="a test", intro="Intro.", rows=rows, runs=RUNS, evaluated_with=EVALUATED,
        results=results, scaled=scaled, command="lshattn reproduce test --out x --seeds 0 1 2",
    )  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    for text in ("| dense | 82.69 | 82.0 ± 2.0", "| steps | 3 epochs | 200 steps | an hour on 2 cores |",
                 "lshattn reproduce test --out x", "[seed 2](lsh/seed2/loss.png)", "![accuracy"):  # fmt: skip
        assert text in report, text
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["rows"][0]["mean"] == pytest.approx(82.0) == metrics["rows"][0]["mean"]
    assert stored["seeds"] == [0, 1, 2]
    assert stored["wall_seconds"] == pytest.approx(360.0)


def test_run_seeds_skips_the_seeds_already_done(tmp_path, capsys):
    calls = []

    def recipe(config, out):
        calls.append((config.seed, out))
        out.mkdir(parents=True)
        metrics = fake_metrics(config, {"dense": 0.8})
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    runs = [Run("dense", "dense", FinetuneConfig(method="dense", max_steps=3))]
    first = common.run_seeds(runs, (0, 1), tmp_path, progress=False, recipe=recipe)
    assert [seed for seed, _ in calls] == [0, 1] and calls[1][1] == tmp_path / "dense" / "seed1"
    assert first["dense"][1]["wall_seconds"] >= 0
    assert "wall_seconds" in json.loads((tmp_path / "dense" / "seed1" / "metrics.json").read_text())
    again = common.run_seeds(runs, (0, 1, 2), tmp_path, progress=True, recipe=recipe)  # progress: not a setting
    assert [seed for seed, _ in calls] == [0, 1, 2]
    assert [m["config"]["seed"] for m in again["dense"]] == [0, 1, 2]
    assert "seed 0: done before" in capsys.readouterr().out


def test_a_run_with_its_own_seeds_trains_only_those_and_pairs_on_the_seeds_shared(tmp_path, capsys):
    """A run too long for 3 seeds (``Run.seeds``) trains its seeds only; a difference to it pairs
    by seed over the seeds both runs have; the report links each run's own curves."""
    trained = []

    def recipe(config, out):
        trained.append((config.method, config.seed))
        out.mkdir(parents=True)
        accuracy = 0.8 + 0.01 * config.seed + (0.05 if config.method == "dense" else 0.0)
        return fake_metrics(config, {"dense": accuracy, method_label(SMYRF): accuracy - 0.1})

    runs = [dataclasses.replace(RUNS[0], seeds=(0,)), RUNS[1]]
    results = common.run_seeds(runs, (0, 1, 2), tmp_path, progress=False, recipe=recipe)
    assert trained == [("dense", 0), (SMYRF, 0), (SMYRF, 1), (SMYRF, 2)]
    assert "[4/4]" in capsys.readouterr().out
    assert common.seeds_of(results, "dense") == [0] and common.seeds_of(results, "lsh") == [0, 1, 2]
    difference = Row("lsh − dense", "–", "lsh", "dense", minus=("dense", "dense"))
    assert common.row_values(difference, results) == pytest.approx([-5.0])  # seed 0 alone
    assert common.row_values(Row("lsh", "–", "lsh", "dense"), results) == pytest.approx([80.0, 81.0, 82.0])
    common.write_reproduction(
        tmp_path, name="test", title="a test", intro="Intro.", rows=[difference], runs=runs, evaluated_with=EVALUATED,
        results=results, scaled=[], command="lshattn reproduce test",
    )  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    assert "- dense: [seed 0](dense/seed0/loss.png)\n" in report and "[seed 2](lsh/seed2/loss.png)" in report
    assert "seed 1](dense" not in report
    assert json.loads((tmp_path / "metrics.json").read_text())["seeds"] == [0, 1, 2]


def test_an_interrupted_reproduction_keeps_the_seeds_done_and_says_how_to_continue(tmp_path):
    def recipe(config, out):
        if config.seed == 1:
            raise KeyboardInterrupt
        out.mkdir(parents=True)
        return fake_metrics(config, {"dense": 0.8})

    runs = [Run("dense", "dense", FinetuneConfig(method="dense"))]
    with pytest.raises(KeyboardInterrupt, match="in dense, seed 1; the 1 runs finished are kept: the same command"):
        common.run_seeds(runs, (0, 1), tmp_path, recipe=recipe)
    assert (tmp_path / "dense" / "seed0" / "metrics.json").is_file()


def test_run_seeds_refuses_a_finished_seed_with_other_settings(tmp_path):
    folder = tmp_path / "dense" / "seed0"
    folder.mkdir(parents=True)
    done = FinetuneConfig(method="dense", max_steps=3, seed=0)
    (folder / "metrics.json").write_text(json.dumps(fake_metrics(done, {"dense": 0.8})))
    runs = [Run("dense", "dense", FinetuneConfig(method="dense", max_steps=200))]
    with pytest.raises(ValueError, match="other settings \\(max_steps: 3 there, 200 now\\).*another --out.*delete"):
        common.run_seeds(runs, (0,), tmp_path, recipe=lambda config, out: pytest.fail("should not train"))


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def test_reinit_attention_changes_the_attention_projections_and_nothing_else():
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(1)
    names = models.reinit_attention(model, layers=[0, 2])
    projections = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    assert names == [f"bert.encoder.layer.{i}.{p}" for i in (0, 2) for p in projections]
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        if module not in names:
            assert torch.equal(param, before[name]), f"{name} changed"
        elif kind == "weight":
            assert not torch.equal(param, before[name]), f"{name} kept"
        else:
            assert torch.equal(param, torch.zeros_like(param)), f"{name} is not zero"
    assert float(model.bert.encoder.layer[0].attention.self.query.weight.detach().std()) == pytest.approx(0.02, rel=0.3)


def test_reinit_attention_checks_layers():
    with pytest.raises(ValueError, match=r"layer indices \[3\] are out of range: the model has 3 attention layers"):
        models.reinit_attention(tiny_bert(), layers=[3])


def test_reinit_attention_on_minilm_resets_four_projections_per_layer():
    or_skip(data.minilm_path)
    model = models.minilm_classifier(["fresh", "rotten"])
    assert len(models.reinit_attention(model)) == 6 * 4


def test_finetune_cli_passes_reinit_attention(monkeypatch, tmp_path):
    finetune_module = importlib.import_module("lshattn.train.finetune")  # lshattn.train.finetune is the function
    seen = []
    monkeypatch.setattr(finetune_module, "finetune", lambda config, out: seen.append(config) or {"seconds": 0.0})
    assert cli.main(["train", "finetune", "--out", str(tmp_path), "--reinit-attention", "--no-progress"]) == 0
    assert seen[0].reinit_attention is True


def test_the_registry_names_only_the_reproductions_that_exist():
    for name in reproduce.REPRODUCTIONS:
        module = reproduce.load(name)
        assert all(callable(getattr(module, f)) for f in ("reproduce", "add_arguments", "run_from_args"))
    assert reproduce.load("albert-lsh") is albert_lsh
    known = ", ".join(reproduce.REPRODUCTIONS)
    with pytest.raises(ValueError, match=f"unknown reproduction 'nonesuch'; choose one of {known}$"):
        reproduce.load("nonesuch")


def test_reproduce_help_lists_the_names(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reproduce", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in reproduce.REPRODUCTIONS) and "nonesuch" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce"], "the following arguments are required: NAME"),
        (["reproduce", "nonesuch"], "invalid choice: 'nonesuch'"),
        (["reproduce", "smyrf", "--seeds", "one"], "invalid int value: 'one'"),
        (["reproduce", "smyrf", "--steps", "3"], "unrecognized arguments: --steps"),
    ],
    ids=["no-name", "unknown-name", "seed-not-int", "unknown-flag"],
)
def test_reproduce_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("seeds", [["0", "0"], ["-1"]])
def test_reproduce_cli_rejects_bad_seeds(seeds, tmp_path, capsys):
    assert cli.main(["reproduce", "smyrf", "--out", str(tmp_path), "--seeds", *seeds]) == 1
    assert "--seeds must be distinct non-negative integers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_seeds_default_to_three_or_one_when_quick():
    parser = cli.build_parser()
    assert common.seeds_from_args(parser.parse_args(["reproduce", "smyrf"])) == (0, 1, 2)
    assert common.seeds_from_args(parser.parse_args(["reproduce", "smyrf", "--quick"])) == (0,)
    assert common.seeds_from_args(parser.parse_args(["reproduce", "smyrf", "--quick", "--seeds", "4", "5"])) == (4, 5)


def test_the_full_settings_fit_the_data():
    """Train + held out must fit in the 1,936 Rotten Tomatoes documents of 128 tokens; every run
    is evaluated with the methods its rows read."""
    for module in (smyrf, albert_lsh):
        for run in module.runs():
            assert run.config.train_size + run.config.eval_size <= 1936
            labels = {method_label(m) for m in run.config.eval_methods}
            assert {method_label(row.evaluated_with) for row in module.ROWS if row.run == run.name} <= labels
        assert [run.config.reinit_attention for run in albert_lsh.runs()] == [False, False, True]


def test_a_tiny_reproduction_runs_end_to_end_and_resumes(monkeypatch, tmp_path, capsys):
    """albert-lsh through the command line, shrunk to 2 steps on 16 texts of 32 tokens: three
    runs (the third re-initialises the attention), the report, then a second call that trains
    nothing."""
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)

    def tiny(config):
        return dataclasses.replace(
            config, max_length=32, train_size=16, eval_size=8, max_steps=2, eval_steps=2, save_steps=2, batch_size=8
        )  # fmt: skip

    monkeypatch.setattr(common, "quick_config", tiny)
    argv = ["reproduce", "albert-lsh", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[3/3] Reformer, attention re-initialised, seed 0: training" in out and "report:" in out
    report = (tmp_path / "report.md").read_text()
    assert "| Reformer, attention re-initialised | 50.9 (ALBERT_LSH, SST-2); MRPC 77.7 |" in report
    assert "| --quick |" in report and "lshattn reproduce albert-lsh --quick" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["runs"]["reformer-reinit"]["config"]["reinit_attention"] is True
    seed = tmp_path / "reformer-reinit" / "seed0"
    assert json.loads((seed / "metrics.json").read_text())["steps"] == 2
    assert "pretrained attention weights re-initialised" in (seed / "report.md").read_text()

    assert cli.main(argv) == 0  # again: every seed is read back
    assert capsys.readouterr().out.count("done before") == 3


@pytest.mark.slow
def test_smyrf_quick_runs(tmp_path):
    """The real ``--quick`` (about 1.5 min on a busy 2-core machine)."""
    or_skip(data.minilm_path)
    or_skip(data.rotten_tomatoes)
    metrics = smyrf.reproduce(tmp_path, quick=True, seeds=(0,), progress=False)
    assert set(metrics["interchange"]) == {"dense", "smyrf-2x32", "smyrf-2x16"}
    assert (tmp_path / "report.md").is_file()

