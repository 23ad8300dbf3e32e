"""DDP through the MLM recipe: ``torchrun --nproc_per_node=2`` (gloo, CPU) against one process.

A tiny BERT (2 layers, hidden 32) pretrains for a few steps with SMYRF in its attention, once as
two DDP processes with 4 sequences each and once as one process with the same 8 (same seed, so
the same sequences in the same order and the same masks: the recipe seeds masks per sequence).
Checked:

(a) both ranks end with bit-identical parameters (DDP all-reduces the gradients, so both apply
    the same AdamW update);
(b) the loss of every step, summed over the ranks, equals the single process's loss within a
    relative 1e-5, and the final parameters agree within 1e-6. Not bit for bit: one process
    reduces the cross-entropy and the gradients over 8 sequences in one pass, two reduce 4 each
    and gloo adds the halves, so float sums run in another order (a few ulp, about 1e-7
    relative); AdamW's m/√v then makes slightly different updates, and a few steps carry that
    into the loss. Measured: 2e-8 relative on the losses, 6e-8 absolute on the parameters
    (which are about 0.02 in size), so the bounds leave a margin of 100 or more;
(c) the hash projections were the same on both ranks, and the same as one process's, at every
    step: every attention call records the seed of the generator it was given (the layers draw
    their projections from it; lshattn.hf seeds it by (seed, layer, optimizer step), the
    recipe's StepCallback sets the step from the Trainer's global_step), and the seeds differ
    from step to step and layer to layer (they are redrawn, not fixed).

This file is also the script each process runs: ``python tests/test_train_distributed.py OUT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQUENCES_PER_STEP = 8
STEPS = 4
LOSS_RTOL = 1e-5  # see (b) above
PARAM_ATOL = 1e-6


def _config(world: int):
    """The run of each process: the global batch of SEQUENCES_PER_STEP split over ``world``."""
    import lshattn
    from lshattn.train.mlm import MLMConfig

    @dataclasses.dataclass(frozen=True)
    class SpySMYRF(lshattn.SMYRF):
        """SMYRF that records the seed of every generator it is given (not registered)."""

        name: ClassVar[str] = ""

        def _attend(self, inputs):
            seed = None if inputs.generator is None else inputs.generator.initial_seed()
            _SEEDS.append((torch_grad_enabled(), seed))
            return super()._attend(inputs)

    return MLMConfig(
        method=SpySMYRF(num_hashes=1, q_cluster_size=8, k_cluster_size=8),
        seq_len=32, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, dropout=0.0,
        sources=("bible",), train_sequences=64, eval_sequences=8, max_steps=STEPS, eval_steps=STEPS,
        save_steps=100, batch_size=SEQUENCES_PER_STEP // world, learning_rate=1e-3, progress=False,
    )  # fmt: skip


_SEEDS: list[tuple[bool, int]] = []


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def _child(out: Path) -> None:
    """One process of a run: pretrain, then save its parameters, its per-step losses (its share
    of each step's loss) and the generator seeds of its attention calls."""
    import torch
    from transformers import TrainerCallback

    from lshattn.train import mlm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    losses: list[float] = []
    loss = mlm._mlm_loss

    def recording_loss(outputs, labels, num_items_in_batch=None):
        value = loss(outputs, labels, num_items_in_batch)
        if torch.is_grad_enabled():  # training (evaluation runs without grad)
            losses.append(float(value.detach()))  # this rank's masked tokens over the step's
        return value

    mlm._mlm_loss = recording_loss
    final: dict[str, torch.Tensor] = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            final.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    mlm.pretrain(_config(world), out, callbacks=[Keep()])
    torch.save(
        {"params": final, "losses": losses, "seeds": _SEEDS, "world": world},
        out / f"rank{rank}-of-{world}.pt",
    )


def _run(command: list[str], timeout: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).parents[1]
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )


@pytest.mark.slow
@pytest.mark.hf
def test_ddp_two_processes_match_one(tmp_path):
    pytest.importorskip("transformers", reason="lshattn.train needs transformers (pip install 'lshattn[train]')")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'lshattn[train]')")
    import torch
    import torch.distributed as dist

    from lshattn import data
    from lshattn.train import mlm, models

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend for CPU processes")
    try:
        tokenizer = models.minilm_tokenizer()
        mlm.tokenized_documents("bible", tokenizer)  # build the corpus cache once, before the processes start
    except data.MissingPackageError as err:
        pytest.skip(str(err))

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    script = str(Path(__file__).resolve())
    start = time.perf_counter()
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    _run([*launcher, "--standalone", "--nproc_per_node=2", script, str(tmp_path / "ddp")], timeout=600)
    _run([sys.executable, script, str(tmp_path / "one")], timeout=600)
    print(f"two DDP processes and one process: {time.perf_counter() - start:.0f} s")

    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}-of-2.pt") for r in (0, 1)]
    one = torch.load(tmp_path / "one" / "rank0-of-1.pt")

    # (a) both ranks hold the same parameters, bit for bit
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys() == one["params"].keys()
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name

    # (b) the step losses of the two ranks add up to the single process's, parameters agree
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == len(one["losses"]) == STEPS
    summed = torch.tensor(ranks[0]["losses"], dtype=torch.float64) + torch.tensor(
        ranks[1]["losses"], dtype=torch.float64
    )
    torch.testing.assert_close(summed, torch.tensor(one["losses"], dtype=torch.float64), rtol=LOSS_RTOL, atol=0)
    assert one["losses"][-1] < one["losses"][0]  # it trained
    for name, value in one["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=0, atol=PARAM_ATOL)

    # (c) the same hash projections on both ranks and in one process, at every step, redrawn each step
    # (the recipe's checks before training call the method with no generator, then with seed 0)
    training = [[seed for grad, seed in r["seeds"] if grad and seed not in (None, 0)] for r in (*ranks, one)]
    assert len(training[0]) == STEPS * 2  # one call per layer and step
    assert training[0] == training[1] == training[2]
    per_step = [tuple(training[0][2 * s : 2 * s + 2]) for s in range(STEPS)]
    assert len(set(per_step)) == STEPS and all(a != b for a, b in per_step)  # per step, per layer

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["environment"]["world_size"] == 2 and metrics["global_batch"] == SEQUENCES_PER_STEP


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
