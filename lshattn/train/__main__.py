"""``python -m lshattn.train RECIPE ...``: the same as ``lshattn train RECIPE ...``, for launchers
that take a module (``accelerate launch -m lshattn.train finetune ...``, ``torchrun -m``)."""

import sys

from lshattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
