"""The long-context report (``lshattn.eval.longctx``, ``lshattn longctx``): end to end on a tiny
random Llama with a character tokenizer, the passkey prompt and its scoring, and (slow) ``--quick``
on SmolLM2."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lshattn
from lshattn import cli
from lshattn.eval import longctx, longctx_report

VOCAB = 128


class CharTokenizer:
    """A stand-in tokenizer: one token per ASCII character (id = code point; 0 pad, 1 bos, 2 eos
    are special), with a chat template of its own."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs) -> dict:
        return {"input_ids": [ord(c) if 3 <= ord(c) < VOCAB else ord("?") for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i >= 3 or not skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def tiny_llama(positions: int = 512) -> transformers.LlamaForCausalLM:
    """4 query heads sharing 2 key/value heads (GQA), 2 layers."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=positions,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def corpus(n: int = 4000) -> torch.Tensor:
    """Random printable characters as token ids."""
    return torch.randint(32, 127, (n,), generator=torch.Generator().manual_seed(3))


SIMHASH = "simhash:num_hashes=2,mode=sparse,sinks=2,window=8"
TINY = longctx.LongCtxConfig(
    lengths=(96, 128), budgets=(0.5, 0.25, 0.01),
    methods=(SIMHASH, "smyrf:num_hashes=1,sinks=2,window=8", "topk:sinks=2,window=8", "local:sinks=2"),
    passkey_methods=(SIMHASH, "local:sinks=2"),
    references=("local:sinks=2,window=8",), decode_tokens=8, exclude=(("topk", 128, 0.25, "too slow here (a test)"),),
    passkey_lengths=(320,), passkey_depths=(0.0, 0.5, 1.0), passkey_trials=1, passkey_budget=0.5,
    passkey_new_tokens=6, speed_contexts=(96,), speed_steps=2, speed_budget=0.5, chunk=40,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("longctx")
    results = longctx.run(TINY, out, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=False)
    return results, out


def rows(results: dict, length: int) -> dict[tuple, dict]:
    return {
        (r.get("budget"), r.get("text", r["method"])): r for r in results["perplexity"]["rows"] if r["length"] == length
    }


def test_report_files_and_every_cell(tiny_report):
    results, out = tiny_report
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "perplexity.png", "passkey.png"}
    assert json.loads((out / "report.json").read_text())["perplexity"] == results["perplexity"]
    per_length = 1 + len(TINY.budgets) * len(TINY.methods) + len(TINY.references)
    assert len(results["perplexity"]["rows"]) == len(TINY.lengths) * per_length
    assert [r.get("text", r["method"]) for r in results["passkey"]["rows"]] == ["exact", *TINY.passkey_methods]
    markdown = (out / "report.md").read_text()
    assert results["model"]["id"] == "LlamaForCausalLM|2x32"
    assert "| — | `local:sinks=2,window=8` (baseline) |" in markdown  # a fixed reference keeps its string
    assert "## Targets (issue 14)" in markdown and "## 2. Passkey retrieval" in markdown
    assert (
        "Left out of the passkey grid to bound the run's time" in markdown
        and "`topk:sinks=2,window=8` (the" in markdown
    )
    assert "### 128 tokens" in markdown and "![perplexity against budget](perplexity.png)" in markdown


def test_exact_row_is_the_reference(tiny_report):
    """Exact attention's KL to itself is 0, and its decoding reproduces its prefill."""
    results, _ = tiny_report
    exact = rows(results, 96)[(None, "exact")]
    assert exact["prefill_kl"] == pytest.approx(0, abs=1e-6) and exact["decode_kl"] == pytest.approx(0, abs=1e-5)
    assert exact["decode_ppl"] == pytest.approx(exact["prefill_ppl_last"], rel=1e-4)
    assert exact["prefill_budget"] > 0.5 and exact["decode_budget"] == pytest.approx(1.0)
    assert 1 < exact["prefill_ppl"] < 2 * VOCAB  # a random model: about uniform over the vocabulary


def test_simhash_decodes_to_its_prefill_and_spends_less(tiny_report):
    """SimHash decodes natively, strictly causal: its decoded perplexity is its prefill's over the
    same tokens, it differs from exact, and it scores fewer keys."""
    results, _ = tiny_report
    table = rows(results, 128)
    row, exact = table[(0.5, SIMHASH)], table[(None, "exact")]
    assert row["status"] == "ok" and row["method"].startswith("simhash:")
    assert row["decode_ppl"] == pytest.approx(row["prefill_ppl_last"], rel=1e-4)
    assert row["prefill_kl"] > 1e-6 and row["decode_kl"] > 1e-6
    assert row["decode_budget"] < 1 and row["prefill_budget"] < exact["prefill_budget"]
    assert row["method"] == str(longctx.setting(SIMHASH, 0.5, 128, 8))


def test_unreachable_and_excluded_cells_are_recorded_not_run(tiny_report):
    results, out = tiny_report
    unreachable = rows(results, 96)[(0.01, SIMHASH)]
    assert unreachable["status"] == "unreachable" and "raise the budget" in unreachable["reason"]
    assert "prefill_ppl" not in unreachable
    excluded = rows(results, 128)[(0.25, "topk:sinks=2,window=8")]
    assert excluded["status"] == "excluded" and excluded["reason"] == "too slow here (a test)"
    assert rows(results, 96)[(0.25, "topk:sinks=2,window=8")]["status"] == "ok"  # below the length excluded
    assert rows(results, 128)[(0.5, "topk:sinks=2,window=8")]["status"] == "excluded"  # and above the budget
    assert rows(results, 128)[(0.01, "topk:sinks=2,window=8")]["status"] == "unreachable"  # below it
    markdown = (out / "report.md").read_text()
    assert "## Not run" in markdown and "too slow here (a test)" in markdown


def test_baseline_turns_the_window_to_the_budget(tiny_report):
    results, _ = tiny_report
    table = rows(results, 96)
    quarter, half = table[(0.25, "local:sinks=2")], table[(0.5, "local:sinks=2")]
    assert lshattn.parse(quarter["method"]).window < lshattn.parse(half["method"]).window
    assert quarter["expected_budget"] <= 0.25 and quarter["prefill_budget"] < half["prefill_budget"]


def test_passkey_rows(tiny_report):
    results, _ = tiny_report
    passkey = {r.get("text", r["method"]): r for r in results["passkey"]["rows"]}
    exact = passkey["exact"]
    assert len(exact["answers"]) == len(TINY.passkey_depths) == len(exact["correct"])
    assert all(10_000 <= k < 100_000 for k in exact["keys"])
    assert exact["needle_at"][0] < exact["needle_at"][1] < exact["needle_at"][2]
    assert passkey[SIMHASH]["keys"] == exact["keys"]  # the same prompts for every method
    assert passkey[SIMHASH]["budget"] == 0.5 and passkey[SIMHASH]["status"] == "ok"
    assert 0 < passkey[SIMHASH]["scored"] < 1 and passkey["exact"]["scored"] > 0.5


def test_speed_rows(tiny_report):
    results, _ = tiny_report
    (cell,) = results["speed"]["rows"]
    by_text = {r.get("text", r["method"]): r for r in cell["methods"]}
    exact, simhash = by_text["exact"], by_text[SIMHASH]
    assert exact["attention_ratio"] == 1 and exact["store_bytes"] == 0
    assert len(exact["passes_ms_per_step"]) == 2 and exact["ms_per_step"] == min(exact["passes_ms_per_step"])
    # the exact KV cache: 2 layers, K and V, 2 key heads of dim 8, context + 3 tokens, float32
    assert exact["cache_bytes"] == 2 * 2 * 2 * (96 + 3) * 8 * 4
    assert simhash["store_bytes"] > 0 and simhash["decode_budget"] < 1
    assert all(r["ms_per_step"] > 0 and r["attention_ms"] > 0 for r in cell["methods"] if r["status"] == "ok")
    # the peak holds the copied cache and, at each step, the concatenated one beside it; SimHash's stores besides
    assert exact["peak_bytes"] > exact["cache_bytes"] and simhash["peak_bytes"] > exact["peak_bytes"]


def test_allocation_peak_counts_what_is_held_at_once():
    """A cache grown by concatenation: 12 MB copied, then three steps each holding the old cache, the
    new token's 1 MB and the new cache at once: 12 + 1 + 13 → … → 14 + 1 + 15 = 30 MB at the last."""
    x = torch.empty(3_000_000)

    def grow() -> None:
        cache = x.clone()
        for _ in range(3):
            cache = torch.cat([cache, torch.empty(250_000)])

    assert 30_000_000 <= longctx.allocation_peak(grow, torch.device("cpu")) < 30_000_000 + 2**16


def test_allocation_peak_keeps_stderr_but_the_profilers_lines(capfd):
    def write() -> None:
        os.write(2, b"a line of the run\n")

    longctx.allocation_peak(write, torch.device("cpu"))
    err = capfd.readouterr().err
    assert "a line of the run" in err and "ActivityProfilerHandler" not in err


def test_resume_reuses_cells_and_measures_only_new_ones(tiny_report, tmp_path, monkeypatch):
    results, out = tiny_report
    (tmp_path / "report.json").write_text((out / "report.json").read_text())
    more = dataclasses.replace(TINY, lengths=(96,), budgets=(0.5,), passkey_lengths=(), speed_contexts=(),
                               methods=(SIMHASH, "smyrf:num_hashes=2,sinks=2,window=8"))  # fmt: skip
    measured = []
    real = longctx.perplexity_cell
    monkeypatch.setattr(longctx, "perplexity_cell", lambda *a, **k: measured.append(a[2]) or real(*a, **k))
    again = longctx.run(more, tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=False)
    assert measured == [longctx.setting("smyrf:num_hashes=2,sinks=2,window=8", 0.5, 96, 8)]  # the only new cell
    assert again["reused_cells"] == 3  # exact, SimHash at 1/2, the reference
    assert rows(again, 96)[(0.5, SIMHASH)] == rows(results, 96)[(0.5, SIMHASH)]
    assert "commit" in rows(again, 96)[(0.5, SIMHASH)]  # each cell says which code measured it


def test_a_run_over_part_of_the_grid_keeps_the_other_cells_for_the_next(tiny_report, tmp_path, monkeypatch):
    """A run that stops early, or covers less, keeps the earlier cells it did not reach (under
    ``unvisited``, out of the report): the whole grid run after it measures nothing again."""
    results, out = tiny_report
    (tmp_path / "report.json").write_text((out / "report.json").read_text())
    part = dataclasses.replace(TINY, lengths=(96,), passkey_lengths=(), speed_contexts=())
    longctx.run(part, tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=False)
    kept = json.loads((tmp_path / "report.json").read_text())
    assert not kept["passkey"]["rows"] and not kept["speed"]["rows"] and kept["unvisited"]
    for name in ("perplexity_cell", "_passkey_row", "_speed_rows"):
        monkeypatch.setattr(longctx, name, lambda *a, name=name, **k: pytest.fail(f"{name} measured again"))
    again = longctx.run(TINY, tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=False)
    assert again["passkey"]["rows"] == results["passkey"]["rows"] and again["speed"]["rows"] == results["speed"]["rows"]
    assert not again["unvisited"]


def test_a_run_of_the_decoding_speed_alone_writes_its_report(tiny_report, tmp_path, monkeypatch):
    """No perplexity lengths and no passkey lengths: the speed section alone (reused here from the
    full run), and a report that says the other targets were not measured."""
    results, out = tiny_report
    (tmp_path / "report.json").write_text((out / "report.json").read_text())
    monkeypatch.setattr(longctx, "_speed_rows", lambda *a, **k: pytest.fail("measured again"))
    speed_only = dataclasses.replace(TINY, lengths=(), passkey_lengths=())
    again = longctx.run(
        speed_only, tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=False
    )
    assert not again["perplexity"]["rows"] and not again["passkey"]["rows"]
    assert again["speed"]["rows"] == results["speed"]["rows"]
    report = (tmp_path / "report.md").read_text()
    assert "Decoding speed" in report and "no perplexity measured" in report and "no passkey measured" in report


def test_a_length_past_the_model_positions_is_refused_before_running(tmp_path):
    config = dataclasses.replace(TINY, lengths=(600,))
    with pytest.raises(ValueError, match="has 512 positions, the run asks for 600 tokens"):
        longctx.run(config, tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=False)
    assert not (tmp_path / "report.json").exists()


# --- passkey prompt and scoring ------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_hides_the_key_at_its_depth(depth):
    tokenizer = CharTokenizer()
    filler = tokenizer("abcdefghij" * 50)["input_ids"]
    ids, at = longctx.passkey_prompt(tokenizer, filler, 400, depth, 12345)
    text = tokenizer.decode(ids)
    needle = longctx.PASSKEY_NEEDLE.format(key=12345)
    assert len(ids) == 400 and text[at : at + len(needle)] == needle
    assert text.count("12345") == 2  # in the needle only
    start = text.index(longctx.PASSKEY_INTRO) + len(longctx.PASSKEY_INTRO) + 2  # after the blank line
    end = text.index(f"\n\n{longctx.PASSKEY_QUESTION}")
    n = end - start - len(needle)  # filler tokens
    assert at - start == round(depth * n)
    assert text.endswith(f"<assistant>{longctx.PASSKEY_ANSWER}") and text.startswith("<user>" + longctx.PASSKEY_INTRO)


def test_passkey_prompt_errors():
    tokenizer = CharTokenizer()
    filler = tokenizer("x" * 100)["input_ids"]
    with pytest.raises(ValueError, match="needs at least"):
        longctx.passkey_prompt(tokenizer, filler, 50, 0.5, 12345)
    with pytest.raises(ValueError, match="the filler has 100 tokens"):
        longctx.passkey_prompt(tokenizer, filler, 400, 0.5, 12345)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        longctx.passkey_prompt(tokenizer, filler * 4, 400, 1.5, 12345)


@pytest.mark.parametrize(
    "answer, correct",
    [(" 12345.", True), ("12345", True), (" is 12345 and", True), (" 1234", False), (" 123456", False),
     (" 912345", False), (" 12 345", False), ("", False)],
)  # fmt: skip
def test_passkey_scoring(answer, correct):
    assert longctx.passkey_correct(answer, 12345) is correct


def test_passkey_keys_are_seeded_five_digit_numbers():
    keys = longctx.passkey_keys(0, 1024, 0, 50)
    assert keys == longctx.passkey_keys(0, 1024, 0, 50) and keys != longctx.passkey_keys(0, 1024, 1, 50)
    assert all(10_000 <= k < 100_000 for k in keys) and len(set(keys)) > 40


# --- pieces --------------------------------------------------------------------------------------


def test_token_scores_match_cross_entropy_and_kl_in_chunks():
    head = torch.nn.Linear(6, 11, bias=False)
    hidden, reference = torch.randn(13, 6), torch.randn(13, 6)
    targets = torch.randint(0, 11, (13,))
    losses, kl = longctx.token_scores(head, hidden, targets, reference, chunk=4)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
        p, q = torch.log_softmax(head(reference), -1), torch.log_softmax(head(hidden), -1)
        expected_kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(kl, expected_kl)
    assert (kl >= 0).all() and longctx.token_scores(head, hidden, targets)[1] is None


def test_setting_keeps_the_named_fields_and_refuses_what_it_cannot_reach():
    method = longctx.setting("smyrf:num_hashes=2,sinks=4,window=64", 1 / 16, 4096, 64)
    assert (method.num_hashes, method.sinks, method.window) == (2, 4, 64)
    assert lshattn.work_share(method, 4096, 4096, 64, causal=True) <= 1 / 16
    assert longctx.setting("local:sinks=4,window=64", None, 4096, 64) == lshattn.Local(sinks=4, window=64)
    with pytest.raises(ValueError, match="raise the budget"):
        longctx.setting("smyrf:num_hashes=2,sinks=4,window=64", 1 / 16, 1024, 64)


def test_state_bytes_counts_each_storage_once():
    a = torch.zeros(10)
    assert longctx.state_bytes([a, a[2:5], {"b": torch.zeros(3, dtype=torch.int64)}]) == 40 + 24
    assert longctx.state_bytes(None, [None]) == 0


def test_targets_say_what_a_run_did_not_measure(tiny_report):
    results, _ = tiny_report
    perplexity, passkey, speed = longctx_report.targets(results)
    assert perplexity[2] == passkey[2] == speed[2] == "not measured"
    assert perplexity[1] == "not in this run"  # no 1/16 among the budgets
    assert passkey[1] == "the methods ran at 1/2, above 1/16" and "this run stops at 96" in speed[1]


def test_targets_met_and_not_met():
    def perplexity(role, text, ppl, budget=1 / 16, length=4096):
        return {"role": role, "text": text, "method": text, "status": "ok", "length": length, "budget": budget,
                "decode_ppl": ppl, "decode_budget": 0.05}  # fmt: skip

    results = {"perplexity": {"rows": [perplexity("exact", "exact", 10.0, None), perplexity("method", "smyrf", 10.4),
                                       perplexity("method", "simhash", 11.0), perplexity("oracle", "topk", 10.1)]}}  # fmt: skip
    (_, measured, met), *_ = longctx_report.targets(results)
    assert met == "yes" and "`smyrf` 10.40 against exact 10.00 (1.040×" in measured
    results["perplexity"]["rows"][1]["decode_ppl"] = 10.6
    assert longctx_report.targets(results)[0][2] == "no"  # the oracle does not count
    speed = {"context": 8000, "methods": [
        {"text": "exact", "method": "exact", "status": "ok", "attention_ms": 100.0, "attention_ratio": 1.0},
        {"text": "simhash", "method": "simhash", "status": "ok", "attention_ms": 20.0, "attention_ratio": 0.2}]}  # fmt: skip
    results["speed"] = {"rows": [speed]}
    assert longctx_report.targets(results)[2][2] == "yes"
    speed["methods"][1].update(attention_ms=30.0, attention_ratio=0.3)
    assert longctx_report.targets(results)[2][2] == "no"


# --- the command ---------------------------------------------------------------------------------


def test_cli_runs_the_report_with_its_flags(tmp_path, monkeypatch, capsys):
    """``lshattn longctx`` hands its flags to the run (here on the tiny model) and prints the targets."""
    calls = []
    real = longctx.run

    def tiny_run(config, out, *, progress, resume):
        calls.append((config, progress, resume))
        config = dataclasses.replace(TINY, lengths=config.lengths, budgets=config.budgets, methods=config.methods,
                                     seed=config.seed, passkey_lengths=(), speed_contexts=())  # fmt: skip
        return real(config, out, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=progress)

    monkeypatch.setattr(longctx, "run", tiny_run)
    code = cli.main(["longctx", "--quick", "--out", str(tmp_path), "--lengths", "96", "--budgets", "0.5",
                     "--methods", SIMHASH, "--seed", "3", "--passkey-trials", "3", "--no-progress", "--fresh",
                     "--references", "local:sinks=4,window=8"])  # fmt: skip
    assert code == 0
    config, progress, resume = calls[0]
    assert config.lengths == (96,) and config.budgets == (0.5,) and config.methods == (SIMHASH,) and config.seed == 3
    assert config.references == ("local:sinks=4,window=8",)
    assert config.passkey_methods == (SIMHASH,) and config.passkey_trials == 3
    assert config.decode_tokens == 32 and not progress and not resume  # --quick's other settings kept
    printed = capsys.readouterr().out
    assert "not measured: at 4,096 tokens" in printed and f"report: {tmp_path}/report.md" in printed
    assert json.loads((tmp_path / "report.json").read_text())["config"]["seed"] == 3


def test_demo_full_adds_the_long_context_report_as_section_4(tmp_path, monkeypatch):
    """``lshattn demo --full`` runs the long-context report into the demo's ``longctx/`` folder
    and puts its targets in the demo's page (here the tiny model, MiniLM left out)."""
    from lshattn import data
    from lshattn.eval import demo

    real, calls = longctx.run, []

    def tiny_run(config, out, *, progress):
        calls.append(config)
        config = dataclasses.replace(TINY, seed=config.seed, passkey_lengths=(), speed_contexts=())
        return real(config, out, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=progress)

    def no_minilm():
        raise data.MissingPackageError("MiniLM is left out of this test")

    monkeypatch.setattr(longctx, "run", tiny_run)
    monkeypatch.setattr(data, "load_minilm", no_minilm)
    config = dataclasses.replace(demo.DemoConfig(seed=5).full(quick=True), speed_lengths=(), speed_methods=())
    results = demo.run(config, tmp_path, progress=False)
    assert calls == [longctx.LongCtxConfig(seed=5).quick()]
    section = results["long_context"]
    assert section["report"] == "longctx/report.md" and (tmp_path / section["report"]).exists()
    assert [t[0] for t in section["targets"]] == [t for t, _, _ in longctx_report.targets(json.loads(
        (tmp_path / "longctx" / "report.json").read_text()))]  # fmt: skip
    page = (tmp_path / "report.md").read_text()
    assert "## 4. Long context" in page and "(longctx/report.md)" in page
    assert all(f"| {target} | {measured} | {met} |" in page for target, measured, met in section["targets"])
    assert "demo" not in json.loads((tmp_path / "report.json").read_text())["long_context"]["command"]
    assert demo.DemoConfig().long_context is None and demo.DemoConfig().full().long_context == longctx.LongCtxConfig()


def test_cli_demo_full_flag(tmp_path, monkeypatch):
    from lshattn.eval import demo

    calls = []
    monkeypatch.setattr(demo, "run", lambda config, out: calls.append(config) or {"headline": "h", "seconds": 1.0})
    for flags in ([], ["--full"], ["--quick", "--full"]):
        assert cli.main(["demo", "--out", str(tmp_path), "--seed", "4", *flags]) == 0
    plain, full, quick = calls
    assert plain.long_context is None and full.long_context == longctx.LongCtxConfig(seed=4)
    assert quick == demo.DemoConfig(seed=4).quick().full(quick=True)
    assert quick.long_context == longctx.LongCtxConfig(seed=4).quick()


def test_cli_bad_method_string_exits_non_zero(capsys, tmp_path):
    assert cli.main(["longctx", "--methods", "bogus", "--out", str(tmp_path)]) == 1
    assert "unknown method 'bogus'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_report_on_smollm2(tmp_path):
    """``lshattn longctx --quick`` on the real model: exact attention finds the passkey, decoding
    reproduces exact's prefill, and every method spends less than exact attention."""
    from lshattn import data

    try:
        data.load_smollm2()
    except data.MissingPackageError as missing:
        pytest.skip(str(missing))
    assert cli.main(["longctx", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "report.json").read_text())
    exact = next(r for r in results["perplexity"]["rows"] if r["role"] == "exact")
    assert exact["decode_ppl"] == pytest.approx(exact["prefill_ppl_last"], rel=1e-3)
    assert 5 < exact["prefill_ppl"] < 100 and math.isfinite(exact["decode_ppl"])
    passkey = next(r for r in results["passkey"]["rows"] if r["method"] == "exact")
    assert sum(passkey["correct"]) >= 1
    methods = [r for r in results["perplexity"]["rows"] if r["role"] == "method" and r["status"] == "ok"]
    assert methods and all(r["prefill_budget"] < 0.5 for r in methods)
    assert (tmp_path / "passkey.png").exists() and (tmp_path / "perplexity.png").exists()


def test_command_names_the_flags_of_a_known_config():
    config = longctx.LongCtxConfig(seed=2)
    assert longctx.command(config) == "`lshattn longctx --seed 2 --out DIR`"
    assert longctx.command(dataclasses.replace(config, corpus="bible").quick()) == (
        "`lshattn longctx --quick --seed 2 --corpus bible --out DIR`"
    )
    assert longctx.command(config.exact_prefill()) == "`lshattn longctx --prefill exact --seed 2 --out DIR`"
    assert longctx.command(config.quick().exact_prefill()).startswith("`lshattn longctx --quick --prefill exact")
    assert "LongCtxConfig(**config)" in longctx.command(TINY)
    speed_only = dataclasses.replace(config.exact_prefill(), lengths=(), passkey_lengths=())
    assert longctx.command(speed_only) == (
        "`lshattn longctx --prefill exact --seed 2 --lengths --passkey-lengths --out DIR`"
    )


def test_cli_sections_given_no_lengths_are_left_out(tmp_path, monkeypatch):
    """``--lengths`` and ``--passkey-lengths`` with no values leave their sections out (a run of
    the decoding speed alone)."""
    calls = []
    monkeypatch.setattr(longctx, "run", lambda config, out, **kw: calls.append(config) or {"seconds": 0.0})
    monkeypatch.setattr(longctx_report, "targets", lambda results: [])
    argv = ["longctx", "--prefill", "exact", "--lengths", "--passkey-lengths", "--speed-contexts", "8000"]
    assert cli.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    config = calls[0]
    assert config.lengths == () and config.passkey_lengths == () and config.speed_contexts == (8000,)
    assert config.methods == longctx.LongCtxConfig().methods and config.prefill == "exact"


def test_the_passkey_reaches_8k_with_an_exact_prefill_only_by_default():
    """The methods' prefills of ten 8k prompts a cell take hours on 2 cores: the default grid's
    passkey stops at 4k, the exact prefill's reaches 8k; lengths a user chose stay."""
    config = longctx.LongCtxConfig()
    assert config.passkey_lengths == (1024, 2048, 4096)
    assert config.exact_prefill().passkey_lengths == (1024, 2048, 4096, 8000)
    chosen = dataclasses.replace(config, passkey_lengths=(2048,))
    assert chosen.exact_prefill().passkey_lengths == (2048,)


def test_exclusions_by_length_and_budget_leave_decoding_speed_alone():
    config = dataclasses.replace(TINY, exclude=(("simhash", 4096, 0.25, "slow"),))
    assert longctx.excluded(config, SIMHASH, 4096, 0.25) == "slow"
    assert longctx.excluded(config, SIMHASH, 8000, 0.5) == "slow"
    assert longctx.excluded(config, SIMHASH, 2048, 0.25) is None
    assert longctx.excluded(config, SIMHASH, 8000, 1 / 16) is None
    assert longctx.excluded(config, "smyrf:num_hashes=1", 8000, 0.5) is None
    method, row = longctx._resolve(config, SIMHASH, 0.5, 4096, 8, speed=True)
    assert method is not None and row["status"] == "ok"


def test_an_exact_prefill_run_leaves_the_methods_to_decoding(tiny_report, tmp_path):
    """``prefill="exact"`` (``--prefill exact``): every prefill is exact attention's, so each
    method's prefill perplexity is exact's while its decoding is its own; none of the cells of a run
    with the methods' prefill is reused but decoding speed's; nothing is excluded and the oracle joins the passkey."""
    results, out = tiny_report
    (tmp_path / "report.json").write_text((out / "report.json").read_text())
    config = dataclasses.replace(TINY, lengths=(96,), budgets=(0.25,)).exact_prefill()
    assert config.exclude == () and "topk:sinks=2,window=8" in config.passkey_methods
    dense = longctx.run(
        config, tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(), progress=False
    )
    assert dense["reused_cells"] == 1  # the speed cell alone: decoding speed always prefills exactly
    by = rows(dense, 96)
    exact = by[(None, "exact")]
    for text in (SIMHASH, "topk:sinks=2,window=8"):
        assert by[(0.25, text)]["prefill_ppl"] == pytest.approx(exact["prefill_ppl"], rel=1e-6)
        assert by[(0.25, text)]["decode_ppl"] != pytest.approx(exact["decode_ppl"], rel=1e-6)
        assert by[(0.25, text)]["prefill_budget"] >= 1.0  # exact scores every pair
    assert by[(0.25, SIMHASH)]["decode_budget"] < 1.0  # (the oracle scores every pair to choose)
    # the decoding budget counts the decoding steps alone: 2 sinks + 8 window of ~90 keys a step,
    # where an exact prefill counted with them would take it near 1
    assert by[(None, "local:sinks=2,window=8")]["decode_budget"] == pytest.approx(10 / 91.5, rel=0.1)
    assert by[(0.25, SIMHASH)]["decode_ppl"] != rows(results, 96)[(0.25, SIMHASH)]["decode_ppl"]
    assert {r["text"] for r in dense["passkey"]["rows"] if "text" in r} == set(config.passkey_methods)
    # exact attention generating on from the shared exact cache answers as it does from the prompt
    exact_answers = [r["answers"] for run in (dense, results) for r in run["passkey"]["rows"] if r["method"] == "exact"]
    assert exact_answers[0] == exact_answers[1]
    assert "**Exact prefill**" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="prefill must be one of"):
        longctx.run(dataclasses.replace(config, prefill="dense"), tmp_path, model=tiny_llama(),
                    tokenizer=CharTokenizer(), corpus=corpus(), progress=False)  # fmt: skip


def test_cli_prefill_flag(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(longctx, "run", lambda config, out, **kw: calls.append(config) or {"seconds": 0.0})
    monkeypatch.setattr(longctx_report, "targets", lambda results: [])
    assert cli.main(["longctx", "--prefill", "exact", "--out", str(tmp_path), "--no-progress"]) == 0
    assert calls[0] == longctx.LongCtxConfig().exact_prefill()


def test_a_projection_a_query_head_keeps_a_larger_store_keyed_apart(tiny_report, tmp_path, monkeypatch):
    """``gqa="per-query-head"`` (``--gqa per-query-head``) against the default ``"shared"``: its
    cells are keyed apart (none is reused), SimHash's stores hold a query head's codes (twice the
    default's at 4 query heads over 2 key heads), the command names the flag; a bad mode is
    refused before running."""
    results, out = tiny_report
    assert results["config"]["gqa"] == "shared"
    (tmp_path / "report.json").write_text((out / "report.json").read_text())
    config = dataclasses.replace(
        TINY, lengths=(96,), budgets=(0.25,), methods=(SIMHASH,), references=(), passkey_lengths=(),
        gqa="per-query-head",
    )  # fmt: skip
    own = longctx.run(config, tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(), corpus=corpus(),
                      progress=False)  # fmt: skip
    assert own["reused_cells"] == 0
    store = {r["text"]: r["store_bytes"] for r in own["speed"]["rows"][0]["methods"] if "text" in r}
    shared = {r["text"]: r["store_bytes"] for r in results["speed"]["rows"][0]["methods"] if "text" in r}
    assert 0 < shared[SIMHASH] < store[SIMHASH]
    assert rows(own, 96)[(0.25, SIMHASH)]["decode_ppl"] != rows(results, 96)[(0.25, SIMHASH)]["decode_ppl"]
    expected = "`lshattn longctx --seed 0 --gqa per-query-head --out DIR`"
    assert longctx.command(longctx.LongCtxConfig(gqa="per-query-head")) == expected
    with pytest.raises(ValueError, match="gqa must be one of"):
        longctx.run(dataclasses.replace(config, gqa="kv"), tmp_path, model=tiny_llama(), tokenizer=CharTokenizer(),
                    corpus=corpus(), progress=False)  # fmt: skip
    calls = []
    monkeypatch.setattr(longctx, "run", lambda config, out, **kw: calls.append(config) or {"seconds": 0.0})
    monkeypatch.setattr(longctx_report, "targets", lambda results: [])
    assert cli.main(["longctx", "--gqa", "per-query-head", "--out", str(tmp_path), "--no-progress"]) == 0
    assert calls[0] == longctx.LongCtxConfig(gqa="per-query-head")
