"""Training with LSH attention, as thin recipes over transformers' ``Trainer``.

Three recipes, each a function and a command (``lshattn train finetune|mlm|adapt``):

* ``finetune``: a pretrained encoder plus a new classification head, trained with a method in
  its attention and evaluated with several (trained with X, evaluated with Y);
* ``mlm``: masked-language-model pretraining of a BERT from scratch on the offline corpora;
* ``adapt``: label-free self-distillation that teaches a pretrained model to work with its
  LSH attention, the same weights with exact attention as the teacher.

Because the loop is ``Trainer``'s, a recipe runs unchanged on one CPU, one GPU, or many
GPUs and nodes (``accelerate launch -m lshattn.train finetune ...`` or ``torchrun``). Hash
projections are redrawn once per optimizer step (``lshattn.hf.set_step``), so gradient
checkpointing, gradient accumulation and every DDP rank see the same ones within a step.
See docs/training.md.
"""

from __future__ import annotations

from lshattn.train.adapt import AdaptConfig, adapt
from lshattn.train.common import RecipeConfig, StepCallback
from lshattn.train.finetune import FinetuneConfig, finetune
from lshattn.train.mlm import MLMConfig, pretrain
from lshattn.train.models import extend_positions

__all__ = ["RecipeConfig", "StepCallback", "FinetuneConfig", "finetune", "extend_positions", "AdaptConfig", "adapt", "MLMConfig", "pretrain", "RECIPES"]

# name -> module with add_arguments(parser) and run_from_args(args); the CLI builds from it.
RECIPES = ("finetune", "mlm", "adapt")
