"""What the training recipes share: the method in the model, the step callback, the Trainer's
arguments, the checks made before any work starts, and the outputs every run writes.

A recipe is a thin layer over transformers' ``Trainer``: it builds a model, a dataset and a
``TrainingArguments``, hands them to ``Trainer`` and writes what came out. Because the loop is
``Trainer``'s, the same recipe runs on one CPU, one GPU, or many GPUs and nodes under
``accelerate launch`` or ``torchrun`` (DDP; FSDP and DeepSpeed through ``TrainingArguments``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lshattn.api import Method, parse

try:
    from transformers import TrainerCallback
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError("lshattn.train needs transformers >= 5.24 and accelerate: pip install 'lshattn[train]'") from _err

__all__ = [
    "RecipeConfig",
    "StepCallback",
    "check_trainable",
    "resolve_method",
    "use_method",
    "loss_is_a_batch_mean",
    "training_arguments",
    "last_checkpoint",
    "run_trainer",
    "write_outputs",
    "evaluate_with",
    "plot_curves",
    "method_label",
    "add_recipe_arguments",
    "recipe_settings",
]


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Settings every recipe has. Methods are specs or strings for ``lshattn.parse``.

    Attributes:
        method: the attention method trained with (None: exact attention).
        layers: the attention layers that run it (None: all; see ``lshattn.hf.attention_layers``).
        seed: seeds the data order, the new weights and the hash projections.
        max_steps: optimizer steps. batch_size: sequences per step on each device.
        learning_rate, warmup_ratio, weight_decay: AdamW with linear decay, as BERT.
        eval_steps: evaluate every this many steps (and at the end). save_steps: checkpoint
            every this many steps, so an interrupted run leaves one to ``resume`` from.
        bf16: mixed precision (on the CPU too).
        resume: continue from the last checkpoint in ``out/checkpoints``.
        progress: progress bars.
    """

    method: Method | str | None = "smyrf:num_hashes=2"
    layers: tuple[int, ...] | None = None
    seed: int = 0
    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    eval_steps: int = 50
    save_steps: int = 100
    bf16: bool = False
    resume: bool = False
    progress: bool = True


class StepCallback(TrainerCallback):
    """Keeps the hash projections on the optimizer step: sets ``lshattn.hf.set_step`` from the
    Trainer's ``global_step`` when training begins (a resumed run continues where it stopped)
    and at each step, so every forward of a step, on every rank, hashes alike.

    (lshattn.hf advances the step itself after each optimizer step; this makes it exact where
    the optimizer does not hold the model's own parameters, as with FSDP or DeepSpeed, and after
    a resume.) Add it to a Trainer whose model runs an lshattn method.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _set_step(model, state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        _set_step(model, state.global_step)


def _set_step(model: Any, step: int) -> None:
    from lshattn import hf

    hf.set_step(model, step)


def resolve_method(method: Method | str | None) -> Method | None:
    """A method given as a spec, a string for ``parse`` or None (exact attention), checked to train."""
    if isinstance(method, str):
        method = None if method.strip().lower() in ("", "none", "dense") else parse(method)
    if method is not None:
        if not isinstance(method, Method):
            raise TypeError(f"method must be a lshattn method spec, its string form or None, got {type(method).__name__}")
        check_trainable(method)
    return method


def check_trainable(method: Method) -> None:
    """Refuse a method whose output carries no gradient to the queries, keys or values, before
    any work starts (a model trained through it would learn nothing in its attention)."""
    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    try:
        out = method(leaves[0], leaves[0] if getattr(method, "shared_qk", False) else leaves[1], leaves[2])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{method} cannot run on a small test input, so it cannot train: {error}") from error
    if not out.requires_grad:
        raise ValueError(
            f"{method} gives no gradient to its queries, keys or values (its output does not require grad), "
            f"so a model cannot train through it; use a method with a backward (every lshattn method has one)"
        )
    out.square().sum().backward()
    if all(x.grad is None or not torch.isfinite(x.grad).all() for x in leaves):
        raise ValueError(f"{method} gives no finite gradient to its queries, keys or values, so it cannot train")


def use_method(
    model: Any, method: Method | None, layers: Sequence[int] | None, seed: int, *, from_scratch: bool = False
) -> None:
    """Put ``method`` into ``model`` on ``layers`` (exact attention elsewhere; None: exact
    everywhere), through ``lshattn.hf.use``; layer indices are checked there. ``from_scratch``:
    the model's weights are new, so ``Reformer(shared_qk=True)`` is allowed (it trains its
    attention with shared QK, as the Reformer paper did)."""
    from lshattn import hf

    hf.use(model, method, layers=layers, seed=seed, allow_shared_qk=from_scratch)


def evaluate_with(
    trainer: Any,
    methods: Mapping[str, Method | None],
    trained: Method | None,
    layers: Sequence[int] | None,
    seed: int,
    *,
    from_scratch: bool = False,
    keys: Sequence[str] = ("accuracy", "loss"),
) -> dict[str, dict[str, float]]:
    """Evaluate ``trainer``'s model with each of ``methods`` (label -> method; None: exact
    attention everywhere) on its eval set, then put ``trained`` back on ``layers``: the
    trained-with × evaluated-with row of a run. Returns label -> {key: the eval metric}."""
    evaluations = {}
    for label, method in methods.items():
        use_method(trainer.model, method, layers if method is not None else None, seed, from_scratch=from_scratch)
        scores = trainer.evaluate(metric_key_prefix="eval")
        evaluations[label] = {key: scores[f"eval_{key}"] for key in keys}
    use_method(trainer.model, trained, layers, seed, from_scratch=from_scratch)
    return evaluations


def loss_is_a_batch_mean(model: Any) -> Any:
    """Tell ``Trainer`` that ``model``'s loss is a mean over its batch.

    Trainer decides from the forward's signature: a ``**kwargs`` (as every transformers task
    model has) makes it believe the model normalises by ``num_items_in_batch``, so it does not
    divide the loss by the gradient-accumulation steps and multiplies it by the number of
    processes. ``BertForSequenceClassification`` takes a plain mean, so accumulation and DDP
    would scale its loss and gradients. Returns ``model``."""
    model.accepts_loss_kwargs = False
    return model


def method_label(method: Method | str | None) -> str:
    """How a method is named in reports: its string form, or "dense"."""
    if isinstance(method, str):
        method = resolve_method(method) if method.strip() else None
    return "dense" if method is None or method == parse("dense") else str(method)


def training_arguments(config: RecipeConfig, out: Path, **overrides: Any):
    """The ``TrainingArguments`` of a recipe: steps, AdamW with warmup and linear decay,
    evaluation and checkpoints every few steps into ``out/checkpoints``, no external loggers."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=str(out / "checkpoints"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=math.ceil(config.warmup_ratio * config.max_steps),
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        logging_strategy="steps",
        logging_steps=max(1, min(10, config.eval_steps)),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def last_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoint-N`` folder in ``out/checkpoints``, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def run_trainer(trainer: Any, config: RecipeConfig, out: Path) -> tuple[Any, float]:
    """``trainer.train()``, resumed from the last checkpoint when ``config.resume``. Returns the
    train output and the wall time. Ctrl-C stops with a message saying which checkpoint
    ``--resume`` continues from (checkpoints are written every ``save_steps``)."""
    resume_from = None
    if config.resume:
        resume_from = last_checkpoint(out)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not config.progress:  # Trainer's own bars follow disable_tqdm; checkpoint writing's follow this
        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        found = last_checkpoint(out)
        where = f"the last checkpoint is {found}" if found else f"no checkpoint was written yet (every {config.save_steps} steps)"
        raise KeyboardInterrupt(f"training interrupted; {where}; continue with --resume") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return result, time.perf_counter() - start


def plot_curves(log_history: Iterable[dict], path: Path, title: str) -> Path | None:
    """Training loss (and every logged ``eval_*`` loss) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = list(log_history)
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        for key, value in entry.items():
            if (key == "loss" or (key.startswith("eval_") and key.endswith("loss"))) and "step" in entry:
                series.setdefault(key, []).append((entry["step"], value))
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for key, points in sorted(series.items()):
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, label="train" if key == "loss" else key)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(out: Path, metrics: dict, report: str, log_history: Iterable[dict] | None, title: str) -> None:
    """``metrics.json``, ``report.md`` and ``loss.png`` (when something was logged) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    if log_history is not None and plot_curves(log_history, out / "loss.png", title) is not None:
        report += "\n![loss curves](loss.png)\n"
    (out / "report.md").write_text(report)


def environment() -> dict[str, Any]:
    """Where a run ran: versions, device, threads; recorded in every metrics.json."""
    import platform

    import transformers

    import lshattn

    return {
        "lshattn": lshattn.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads",
        "world_size": int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1,
    }


def add_recipe_arguments(parser: Any, defaults: RecipeConfig) -> None:
    """The command-line flags of ``RecipeConfig``'s settings, with a recipe's defaults."""
    parser.add_argument("--out", required=True, help="directory for metrics.json, report.md, loss.png and checkpoints")
    parser.add_argument(
        "--method", default=method_label(defaults.method),
        help=f"method to train with, a string for lshattn.parse, or dense (default: {method_label(defaults.method)})",
    )  # fmt: skip
    parser.add_argument("--layers", nargs="+", type=int, default=None, help="attention layers that run it (default: all)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step and device")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--eval-steps", type=int, default=defaults.eval_steps)
    parser.add_argument("--save-steps", type=int, default=defaults.save_steps, help="checkpoint every this many steps")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (CPU included)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--quick", action="store_true", help="a small run of a couple of minutes, to see it work")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def recipe_settings(args: Any) -> dict[str, Any]:
    """``RecipeConfig`` keyword arguments from the flags of ``add_recipe_arguments``."""
    return dict(
        method=args.method,
        layers=None if args.layers is None else tuple(args.layers),
        seed=args.seed,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        bf16=args.bf16,
        resume=args.resume,
        progress=not args.no_progress,
    )
