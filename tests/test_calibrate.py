"""The per-layer budget split (``lshattn.eval.calibrate``): the allocation rule on made-up scores,
and a split measured on a tiny model and run through ``lshattn.hf``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lshattn
from lshattn import hf
from lshattn.eval import calibrate
from lshattn.eval.calibrate import LayerScore


def test_allocate_upgrades_the_layer_that_gains_most_per_spend():
    """Two layers, three candidates each: both start at the cheapest; the upgrade that removes
    the most error per unit of mean spend goes first, and nothing past the budget is taken."""
    scores = [
        [LayerScore(0.30, 0.1), LayerScore(0.25, 0.2), LayerScore(0.00, 0.5)],  # layer 0 gains little early
        [LayerScore(0.40, 0.1), LayerScore(0.05, 0.2), LayerScore(0.04, 0.5)],  # layer 1 gains a lot at 0.2
    ]
    assert calibrate.allocate(scores, 0.1) == [0, 0]
    assert calibrate.allocate(scores, 0.15) == [0, 1]  # layer 1's step: 0.35 error for 0.05 mean spend
    assert calibrate.allocate(scores, 0.35) == [2, 1]  # then layer 0's jump to 0.5 fits
    assert calibrate.allocate(scores, 1.0) == [2, 2]
    with pytest.raises(ValueError, match="cheapest candidates spend 10.00%"):
        calibrate.allocate(scores, 0.05)


def test_allocate_skips_candidates_that_cost_more_and_keep_less():
    scores = [[LayerScore(0.3, 0.1), LayerScore(0.5, 0.3), LayerScore(0.1, 0.4)]]
    assert calibrate.allocate(scores, 0.35) == [0]
    assert calibrate.allocate(scores, 0.4) == [2]


def test_split_budget_measures_a_model_and_runs_in_it():
    """On a tiny BERT: exact attention costs 1 and loses nothing, a window of 0 (the own key and
    one sink) costs little and loses much; at a budget that pays for one exact layer, one layer
    gets it, and the model runs the split within the budget (``hf.count``)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    cheap, exact = lshattn.Local(sinks=1, window=0), lshattn.TopK(fraction=1.0)
    scores = calibrate.layer_scores(model, [batch], [cheap, exact], progress=False)
    assert len(scores) == 2
    for row in scores:
        assert row[0].error > 0.01 and row[1].error == pytest.approx(0.0, abs=1e-6)
        assert row[1].spend == pytest.approx(1.0)
        assert row[0].spend < 0.2
    split = calibrate.split_budget(model, [batch], [cheap, exact], budget=0.6, progress=False)
    worse = max(range(2), key=lambda i: scores[i][0].error)
    assert split == {worse: exact, 1 - worse: cheap}
    hf.use(model, split)
    with torch.no_grad(), hf.count(model) as tally:
        out = model(**batch).last_hidden_state
    assert torch.isfinite(out).all()
    assert tally.calls == 2
    with pytest.raises(ValueError, match="at least one candidate"):
        calibrate.split_budget(model, [batch], [], budget=0.5)
