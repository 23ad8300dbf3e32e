"""What each method costs and loses against exact attention, on a real model and real data.

* ``capture``: the Q, K, V (and masks, scale) every attention layer of a Hugging Face model sees.
* ``fidelity``: each method on captured inputs against exact attention: error, budget, FLOPs, time.
* ``tasks``: sentence embeddings with a method swapped in, and zero-shot linear probes.
* ``report``: Markdown, PNG plots and JSON.
* ``demo``: the default run behind ``lshattn demo`` / ``make demo``.

Everything here needs the ``eval`` extra (transformers, scikit-learn, matplotlib, tqdm).
"""
