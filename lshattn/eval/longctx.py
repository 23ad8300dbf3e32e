"""Long contexts on a causal LM: perplexity in the prefill and in cached decoding, passkey
retrieval and decoding speed, each method against exact attention (issue 14).

``lshattn longctx --out DIR`` runs ``run(LongCtxConfig(), DIR)`` on SmolLM2-135M-Instruct
(``lshattn.data.load_smollm2``) and long real text (``lshattn.data.wikipedia``, or the King James
Bible); every attention layer runs the method (``lshattn.hf.use``):

1. **Perplexity.** One text per length, teacher-forced. *Prefill*: one forward over every token.
   *Decode*: the text but its last ``decode_tokens`` prefilled with the method, then those tokens
   fed one at a time through the cache, each step predicting the next. Beside each perplexity,
   the mean next-token KL(exact ‖ method) over the same predictions, and the share of the keys
   the calls scored (``lshattn.hf.count``), prefill and decoding apart. Each method runs at each
   budget with the setting ``lshattn.for_budget`` picks; a budget it cannot reach is recorded
   with the reason. The references: the oracle ``TopK`` with the methods' sinks and window (the
   ceiling of any selection of that budget), sinks and a window alone at the same budget
   (``Local``; the window turned), and the sinks and window every method includes, alone.
2. **Passkey.** A random 5-digit number hidden at several depths of filler text from the corpus,
   asked for through the model's chat template; greedy generation; correct when the number is in
   the answer (``passkey_prompt``, ``passkey_correct``).
3. **Decoding speed.** A context prefilled once with exact attention; each method then decodes a
   few tokens from a copy of that cache, in one run: whole-model time per step, attention time per
   step (``Tally.seconds``), the bytes of the state decoding keeps (the KV cache and each
   layer's store of key codes) and the peak of what it holds during its first steps.

Nothing here assumes SmolLM2: any Hugging Face causal LM whose logits are its output embeddings
applied to the last hidden state works (the tests use a tiny random Llama). ``report.json`` is
written after every cell, and a run given a folder that holds one reuses the cells measured with
the same settings (each cell's key names them), so a long run can be stopped and resumed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lshattn
from lshattn.api import Method, parse
from lshattn.budget import work_share
from lshattn.eval.longctx_report import family

__all__ = [
    "LongCtxConfig", "allocation_peak", "kl_divergence", "passkey_correct", "passkey_prompt", "run", "setting",
    "state_bytes", "token_scores",
]  # fmt: skip

# The methods, each with 4 sinks and a 64-token window (SmolLM2 leans on its first tokens and
# neighbours: docs/longctx.md); the budget turns each one's knob (lshattn.budget), the fields
# named here stay fixed. SimHash in sparse mode with 32 tables (docs/longctx.md: importance
# weighting is worse with few tables); YOSO-m with 8-bit codes; SMYRF with 2 rounds; Reformer
# with the model's own keys (a pretrained model has separate query and key projections).
SIMHASH = "simhash:num_hashes=32,mode=sparse,sinks=4,window=64"
YOSO = "yoso:num_bits=8,sinks=4,window=64"
REFORMER = "reformer:shared_qk=False,sinks=4,window=64"
# Reformer's strictly causal form: each round's whole bucket (decoding reproduces its prefill).
REFORMER_WHOLE = "reformer:shared_qk=False,whole_buckets=True,sinks=4,window=64"
# --quick's SimHash: half the tables (LongCtxConfig.quick says why)
QUICK_SIMHASH = "simhash:num_hashes=16,mode=sparse,sinks=4,window=64"
SMYRF = "smyrf:num_hashes=2,sinks=4,window=64"
# The same sign bits read softly: the top keys by their 256-bit SimHash sketch's estimate.
SKETCH = "sketchtopk:num_bits=256,sinks=4,window=64"
ORACLE = "topk:sinks=4,window=64"  # the ceiling: exact top keys besides the same sinks and window
BASELINE = "local:sinks=4"  # sinks and a window alone at the same budget (the window turned)
LOCALITY = "local:sinks=4,window=64"  # the locality every method includes, alone (no budget)
EXACT = "exact"
ROLES = {"topk": "oracle", "local": "baseline"}
# Cells left out of the full grid: (method name, from this length, from this budget, why). The
# oracle scores and ranks every pair in float64: at 8,000 tokens its (1, 9, T, T) scores and ranks
# take about 10 GB a layer, more than a 23 GB machine shared with other work can give.
# SimHash's prefill took 25 s at 1k (1/4), 43 s at 2k (1/16) and 111-119 s at 4k (1/16, 1/4) on
# 2 cores, about 4 times per doubling: some 8 min a forward at 8k, and a perplexity cell runs two;
# at 8k it keeps 1/16 and 1/64, where the targets are. The baseline (sinks and a window
# alone) at 1/4 and 8k is a window of ~2,000 tokens: one pass over the keys per slot, >17 min a cell.
EXCLUDED: tuple[tuple[str, int, float, str], ...] = (
    ("topk", 8000, 0.0, "the oracle scores and ranks every pair (float64): about 10 GB a layer at 8k tokens"),
    (
        "sketchtopk",
        8000,
        0.0,
        "its prefill ranks every pair by sketch (float64), as the oracle: about 10 GB a layer at 8k",
    ),
    ("simhash", 8000, 0.25, "about 8 min a forward at 8k on 2 cores (4x its 4k time); the targets are at 1/16"),
    # measured: still running after 17 min (a window of ~2,000 tokens is ~2,000 passes over the keys a layer)
    ("local", 8000, 0.25, "the baseline's 2,000-token window at 8k takes over 17 min a cell on 2 cores"),
)
# The passkey grid leaves the oracle and SketchTopK out: their prefills rank every pair, 3 min a
# forward at 4k on 2 cores, and a passkey cell runs ten (5 depths, 2 trials).
PASSKEY_METHODS = (SIMHASH, YOSO, REFORMER, REFORMER_WHOLE, SMYRF, BASELINE)
# With the methods' prefill the passkey stops at 4k: at 8k SimHash's prefill took 19.5 min for two
# prompts on 2 cores (2026-11-30), so the ten prompts of each method's cell would take hours. The
# exact prefill (``exact_prefill``) reaches 8k, where the decoding steps are what differs.
PASSKEY_LENGTHS = (1024, 2048, 4096)
EXACT_PASSKEY_LENGTHS = (*PASSKEY_LENGTHS, 8000)


@dataclasses.dataclass(frozen=True)
class LongCtxConfig:
    """Everything the long-context report does; the defaults are the full report.

    Attributes:
        seed: seeds the methods' projections (``hf.use``) and the passkeys and their filler.
        corpus: ``"wikipedia"`` (gensim's articles) or ``"bible"`` (the King James Bible).
        lengths: tokens per text for the perplexity (at most the model's positions).
        budgets: shares of exact attention's work (``lshattn.work_share``: dot products over T·S).
        methods: method strings for ``lshattn.parse``; the budget turns each one's knob, the fields
            a string names stay fixed (``setting``).
        references: method strings run as they are, once per length (no budget).
        decode_tokens: the last tokens of each text decoded one at a time through the cache.
        exclude: ``(method name, from length, from budget, reason)``: perplexity and passkey cells
            left out of the grid (at that length and budget or more), with the reason; decoding
            speed, which prefills with exact attention, runs every method.
        passkey_methods: the methods of the passkey task (strings, as ``methods``).
        passkey_lengths, passkey_depths, passkey_trials: the passkey grid (depth 0 = the start
            of the filler, 1 = its end); each trial has its own number and filler.
        passkey_budget: the methods' budget in the passkey task.
        passkey_new_tokens: tokens generated for the answer.
        speed_contexts, speed_steps, speed_budget: decoding speed: context lengths, steps timed
            after the first (which may hash the whole cache), the methods' budget.
        chunk: positions per chunk of logits when scoring (memory: ``chunk`` × vocabulary).
        prefill: ``"method"``: each method runs in the prefill and in decoding. ``"exact"``: the
            prompts (and the prefill of the decoded texts) run exact attention, the methods only
            the cached decoding steps (``hf.use(..., prefill="exact")``: the dense prefill of LLM
            decoding systems such as MagicPIG); the prefill columns are then exact's.
        gqa: ``hf.use``'s ``gqa``: projections ``"shared"`` by the query heads of a key head
            (SmolLM2: 3 of them), a store a key head; or ``"per-query-head"``, a store a query
            head (the committed reports of 2026-11-30 and 2026-12-01 ran so).
    """

    seed: int = 0
    corpus: str = "wikipedia"
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)
    budgets: tuple[float, ...] = (1 / 4, 1 / 16, 1 / 64)
    methods: tuple[str, ...] = (SIMHASH, YOSO, REFORMER, REFORMER_WHOLE, SMYRF, SKETCH, ORACLE, BASELINE)
    references: tuple[str, ...] = (LOCALITY,)
    decode_tokens: int = 256
    exclude: tuple[tuple[str, int, float, str], ...] = EXCLUDED
    passkey_methods: tuple[str, ...] = PASSKEY_METHODS
    passkey_lengths: tuple[int, ...] = PASSKEY_LENGTHS
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int = 2
    passkey_budget: float = 1 / 16
    passkey_new_tokens: int = 10
    speed_contexts: tuple[int, ...] = (2048, 4096, 8000)
    speed_steps: int = 8
    speed_budget: float = 1 / 16
    chunk: int = 512
    prefill: str = "method"
    gqa: str = "shared"

    def exact_prefill(self) -> LongCtxConfig:
        """The methods in the cached decoding steps only, every prefill exact (``prefill``). What
        left cells out of the grid was the prefill's cost (the oracle's and SimHash's at 8k, the
        baseline's wide windows, the passkey at 8k), so nothing is excluded and the default
        passkey lengths reach 8k; the oracle joins the passkey methods (a decoding step scores
        one query against the cache)."""
        lengths = EXACT_PASSKEY_LENGTHS if self.passkey_lengths == PASSKEY_LENGTHS else self.passkey_lengths
        return dataclasses.replace(
            self, prefill="exact", exclude=(), passkey_methods=self.methods, passkey_lengths=lengths
        )

    def quick(self) -> LongCtxConfig:
        """A first look in under 5 minutes on 2 CPU cores: 1,024 tokens at 1/4, 32 decoded
        tokens, SimHash, SMYRF, the oracle and the baselines, one passkey trial at depth 50 % (at
        1/4; at 100 % the key sits inside the 64-token window, which finds it without any
        hashing), speed at 2k with 4 steps (at 1/16). Why 1/4: at 1k the methods' 4 sinks and
        64-token window alone cover 6.7 % of T·S, past 1/16; and 2k at 1/16 costs SimHash 43 s a
        forward against 25 s, and the oracle 36 s against 10 s. SketchTopK is left out: it added
        80 s (its prefill ranks every pair, as the oracle's). One passkey depth, not two: with
        depths 0 and 50 % the run took 5.2 min in a slow hour (2026-12-01; SimHash's two 1k
        passkey prompts alone 73 s). SimHash with 16 tables, not the grid's 32: its prefill at 1k and
        1/4 compares every pair in each table (32 tables took 85 s of a 4.8 min run and its passkey
        prompt 40 s, 2026-12-01; 16 tables are 4× faster a layer)."""
        methods = (QUICK_SIMHASH, SMYRF, ORACLE, BASELINE)
        return dataclasses.replace(
            self, lengths=(1024,), budgets=(1 / 4,), methods=methods, decode_tokens=32, passkey_methods=methods,
            passkey_lengths=(1024,), passkey_depths=(0.5,), passkey_trials=1, passkey_budget=1 / 4,
            speed_contexts=(2048,), speed_steps=4,
        )  # fmt: skip


def setting(text: str, fraction: float | None, T: int, D: int) -> Method:
    """The method a string names at a budget: ``lshattn.for_budget`` at ``fraction`` of exact
    attention's work for causal self-attention over ``T`` tokens with heads of dim ``D``, the
    fields the string names kept fixed; the string's own setting when ``fraction`` is None.

    Raises:
        ValueError: the method cannot spend that little (``for_budget``'s message says its
            smallest setting), or a bad string.
    """
    spec = parse(text)
    if fraction is None:
        return spec
    named = [item.partition("=")[0].strip() for item in text.partition(":")[2].split(",") if item.strip()]
    return lshattn.for_budget(spec.name, fraction, T, D=D, causal=True, **{key: getattr(spec, key) for key in named})


def excluded(config: LongCtxConfig, text: str, length: int, fraction: float | None) -> str | None:
    """Why ``config`` leaves the method out at ``length`` and budget ``fraction`` (None: it does not)."""
    name, budget = text.partition(":")[0], 0.0 if fraction is None else fraction
    rules = config.exclude
    return next((why for family, T, b, why in rules if family == name and length >= T and budget >= b), None)


# --- scoring -------------------------------------------------------------------------------------


def kl_divergence(reference: Tensor, other: Tensor) -> Tensor:
    """KL(reference ‖ other) of next-token distributions given as log-probabilities.

    Args:
        reference, other: `(N, V)` log-probabilities.

    Returns:
        `(N,)` the divergence per row, in nats.
    """
    return (reference.exp() * (reference - other)).sum(-1)


@torch.no_grad()
def token_scores(
    head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, reference: Tensor | None = None, chunk: int = 512
) -> tuple[Tensor, Tensor | None]:
    """Next-token losses of a model's last hidden states, and their KL from a reference's.

    Logits are made ``chunk`` positions at a time: at 8,000 tokens a vocabulary of 49,152 would
    take 1.6 GB a copy in float32.

    Args:
        head: the output embeddings (hidden states to logits).
        hidden: `(N, d)` the last hidden states at the positions that predict ``targets``.
        targets: `(N,)` the next tokens.
        reference: `(N, d)` exact attention's hidden states at the same positions, or None.
        chunk: positions per chunk.

    Returns:
        `(N,)` cross-entropy per position (nats), and `(N,)` KL(exact ‖ this) per position (None
        without a reference).
    """
    losses, divergences = [], []
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        logp = torch.log_softmax(head(hidden[part]).float(), -1)
        losses.append(-logp.gather(-1, targets[part, None])[:, 0])
        if reference is not None:
            divergences.append(kl_divergence(torch.log_softmax(head(reference[part]).float(), -1), logp))
    return torch.cat(losses), torch.cat(divergences) if reference is not None else None


def _perplexity(losses: Tensor) -> float:
    return math.exp(float(losses.mean()))


def _head(model: Any) -> Callable[[Tensor], Tensor]:
    """The model's output embeddings; refused where the logits are not just that."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (final_logit_softcapping); the long-context report scores "
            "the output embeddings of the last hidden state, which would differ from the model's logits"
        )
    return model.get_output_embeddings()


def _hidden(model: Any, ids: Tensor) -> Tensor:
    """`(T, d)` the last hidden states of the batch of one `(1, T)` ``ids``, without the logits."""
    with torch.no_grad():
        return model.base_model(input_ids=ids).last_hidden_state[0]


def _prefilled(model: Any, ids: Tensor, n: int) -> Any:
    """The cache of all but the last ``n + 1`` tokens of `(1, T)` ``ids``, filled by a forward
    with the model's attention as it is set."""
    with torch.no_grad():
        return model.base_model(input_ids=ids[:, : ids.shape[1] - n - 1], use_cache=True).cache


def _decoded_hidden(model: Any, ids: Tensor, n: int, cache: Any) -> Tensor:
    """`(n, d)` the last hidden states predicting the last ``n`` tokens of `(1, T)` ``ids``, one
    token a step through ``cache`` (which holds all but the last ``n + 1`` tokens)."""
    T, steps = ids.shape[1], []
    with torch.no_grad():
        for t in range(T - n - 1, T - 1):
            out = model.base_model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.last_hidden_state[0, -1])
    return torch.stack(steps)


def perplexity_cell(
    model: Any, ids: Tensor, method: Method, seed: int, decode_tokens: int, exact: Tensor | None, chunk: int,
    exact_prefill: Callable[[], Any] | None = None, gqa: str = "shared",
) -> dict:  # fmt: skip
    """Perplexity, KL to exact and the budget spent, in the prefill and in decoding, of one method.

    Args:
        ids: `(1, T)` the text.
        exact: `(T, d)` exact attention's last hidden states over ``ids`` (the reference for the
            KL), or None to leave the KL out.
        decode_tokens: N, the last tokens decoded one at a time; the decoding budget and seconds
            are those of these N steps alone (not of the prefill before them).
        exact_prefill: None: the method prefills (all tokens for the prefill's numbers, all but
            the last N + 1 before decoding). Otherwise a function returning a fresh copy of exact
            attention's cache of all but the last N + 1 tokens: the method only decodes from it
            (``hf.use(..., prefill="exact")``), and the prefill's numbers are exact's (``exact``).
        gqa: ``hf.use``'s.
    """
    from lshattn import hf

    head, T, N = _head(model), ids.shape[1], decode_tokens
    targets = ids[0, 1:]
    if exact_prefill is not None and exact is None:
        raise ValueError("an exact prefill takes its prefill numbers from exact: pass exact's hidden states")
    started = time.perf_counter()
    shared = None if exact_prefill is None else exact_prefill()  # before use(): it sets exact attention
    hf.use(model, method, seed=seed, prefill="method" if exact_prefill is None else "exact", gqa=gqa)
    try:
        if exact_prefill is None:
            with hf.count(model) as prefill_tally:
                hidden = _hidden(model, ids)
            prefill_budget = prefill_tally.budget
            cache = _prefilled(model, ids, N)
        else:  # the prefill is exact attention's, shared by every method of this text
            hidden, prefill_budget, cache = exact, 1.0, shared
        prefill_seconds = time.perf_counter() - started
        losses, kl = token_scores(head, hidden[:-1], targets, None if exact is None else exact[:-1], chunk)
        started = time.perf_counter()
        with hf.count(model) as decode_tally:
            decoded = _decoded_hidden(model, ids, N, cache)
        decode_seconds = time.perf_counter() - started
    finally:
        hf.use(model, None)
    last = slice(T - N - 1, T - 1)  # the positions predicting the last N tokens
    decode_losses, decode_kl = token_scores(head, decoded, targets[last], None if exact is None else exact[last], chunk)
    return {
        "prefill_ppl": _perplexity(losses),
        "prefill_ppl_last": _perplexity(losses[last]),
        "decode_ppl": _perplexity(decode_losses),
        "prefill_kl": None if kl is None else float(kl.mean()),
        "prefill_kl_last": None if kl is None else float(kl[last].mean()),
        "decode_kl": None if decode_kl is None else float(decode_kl.mean()),
        "prefill_budget": prefill_budget,
        "decode_budget": decode_tally.budget,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
    }


# --- passkey -------------------------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key."
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
# Measured on SmolLM2-135M-Instruct at 512 and 1,024 tokens (10 prompts each, exact attention):
# asked only "What is the pass key?" and given "The pass key is" it found 1 of 10 at 1k (it
# rambles: "a term used in the context of anarchism"); asked for "the 5-digit number only" and
# given "The pass key is " it found 10 of 10 at both.
PASSKEY_QUESTION = "What is the pass key? Answer with the 5-digit number only."
PASSKEY_ANSWER = "The pass key is "  # the answer's start, after the chat template's assistant turn
_HAYSTACK = "\x00HAYSTACK\x00"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def passkey_prompt(tokenizer: Any, filler: Sequence[int], length: int, depth: float, key: int) -> tuple[list[int], int]:
    """A passkey prompt of exactly ``length`` tokens, the key hidden at ``depth`` of the filler.

    The user turn of the model's chat template (``tokenizer.apply_chat_template``) holds the
    instruction, the filler with the needle ("The pass key is 12345. Remember it. ...") inside,
    and the question; the assistant turn starts with "The pass key is", so the next tokens are the
    answer. Pieces are tokenised apart and joined as token ids, so the needle sits exactly
    ``round(depth · n)`` filler tokens in, whatever the tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template (or anything with
            ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``,
            ``__call__(text, add_special_tokens=False)["input_ids"]``).
        filler: token ids of filler text, at least as many as the prompt needs.
        length: the prompt's tokens.
        depth: where the needle goes, from 0 (right after the instruction) to 1 (right before
            the question).
        key: the number to hide.

    Returns:
        The prompt's token ids and the index of the needle's first token.

    Raises:
        ValueError: a depth outside [0, 1], or a length or filler too short for the prompt.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1] (0: the start of the filler, 1: its end), got {depth}")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{PASSKEY_INTRO}\n\n{_HAYSTACK}\n\n{PASSKEY_QUESTION}"}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    before, _, after = text.partition(_HAYSTACK)
    prefix, suffix = _encode(tokenizer, before), _encode(tokenizer, after + PASSKEY_ANSWER)
    needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
    n = length - len(prefix) - len(needle) - len(suffix)
    if n < 0:
        raise ValueError(
            f"a passkey prompt needs at least {length - n} tokens (instruction, needle, question), got length={length}"
        )
    if len(filler) < n:
        raise ValueError(f"the filler has {len(filler)} tokens, the prompt needs {n}; give a longer corpus")
    at = round(depth * n)
    ids = prefix + list(filler[:at]) + needle + list(filler[at:n]) + suffix
    return ids, len(prefix) + at


def passkey_correct(answer: str, key: int) -> bool:
    """Whether the generated ``answer`` gives the passkey: its digits appear in it, as a number
    of their own (not inside a longer one)."""
    return re.search(rf"(?<!\d){key}(?!\d)", answer) is not None


def passkey_keys(seed: int, length: int, trial: int, count: int) -> list[int]:
    """``count`` 5-digit numbers for one (length, trial), the same for every method."""
    generator = torch.Generator().manual_seed(_mix(seed, length, trial, 0))
    return torch.randint(10_000, 100_000, (count,), generator=generator).tolist()


def _mix(*numbers: int) -> int:
    """A seed from several integers, the same in every process (``hash`` of a str is not)."""
    mixed = 0
    for number in numbers:
        mixed = (mixed * 1_000_003 + number) % 2**61
    return mixed


def _filler(corpus: Tensor, seed: int, length: int, trial: int) -> list[int]:
    """``length`` tokens of the corpus from a seeded offset: each trial reads other text."""
    generator = torch.Generator().manual_seed(_mix(seed, length, trial, 1))
    start = int(torch.randint(0, max(1, corpus.numel() - length), (1,), generator=generator))
    return corpus[start : start + length].tolist()


def passkey_cell(
    model: Any, tokenizer: Any, prompts: list[list[int]], keys: list[int], new_tokens: int, cache: Any = None,
) -> dict:  # fmt: skip
    """Greedy answers to a batch of prompts of one length, and whether each gives its key.

    ``cache``: None: the model's attention as set processes the prompts, and ``scored`` counts
    the prompt and the answer. Otherwise a cache of every prompt token but the last (exact
    attention's, ``prefill="exact"``; it is extended): generation goes on from it (the last
    prompt token is the first decoding step), and ``scored`` counts the decoding steps alone.
    """
    from lshattn import hf

    ids = torch.tensor(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), hf.count(model) as tally:
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=pad, cache=cache,
        )  # fmt: skip
    answers = [tokenizer.decode(row[ids.shape[1] :].tolist(), skip_special_tokens=True) for row in out]
    return {
        "answers": answers,
        "correct": [passkey_correct(a, k) for a, k in zip(answers, keys)],
        "scored": tally.budget,
    }


# --- decoding speed ------------------------------------------------------------------------------


def state_bytes(*objects: Any) -> int:
    """Bytes of the tensors held by ``objects`` (walking lists, dicts, dataclasses and object
    attributes), each storage counted once: what a decoding state keeps in memory."""
    seen: set[int] = set()
    visited: set[int] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return
        if isinstance(obj, (str, bytes, int, float, bool, type(None))) or id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, dict):
            items: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple, set)):
            items = obj
        elif hasattr(obj, "__dict__"):
            items = vars(obj).values()
        else:
            return
        for item in items:
            walk(item)

    for obj in objects:
        walk(obj)
    return total


def allocation_peak(run: Callable[[], Any], device: torch.device) -> int:
    """The high-water mark of the bytes torch's allocator held on ``device`` while ``run()`` ran,
    over what it held when it began. On a GPU, the allocator's peak statistics; on the CPU, which
    keeps none, the running sum of the allocator's own events, through torch's profiler, which
    sees the allocations of the caller's thread and the frees of what they allocated only: let
    ``run`` allocate what it frees (a copy of a cache it then grows by concatenation, say, whose
    every step then counts the moment both copies are held)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_lines(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes = sorted(
        (
            (event.start_ns(), event.nbytes())
            for event in prof.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch._C._autograd.DeviceType.CPU
        ),
        key=lambda change: change[0],
    )
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _without_profiler_lines() -> Iterator[None]:
    """Kineto, the profiler's backend, prints a line to the process's stderr when a profile starts
    and one when it stops, which no setting silences (torch 2.13); meanwhile stderr goes to a
    file, and what else was written there comes back."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr (a process started without one): nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if "ActivityProfilerHandler" not in line))


def _stores(model: Any) -> list[Any]:
    """Each attention layer's decoding store (``lshattn.decode``), where it has one."""
    from lshattn import hf

    return [getattr(layer.module.__dict__.get("_lshattn_state"), "store", None) for layer in hf.attention_layers(model)]


def speed_row(
    model: Any, ids: Tensor, prefill: Any, method: Method, seed: int, steps: int, gqa: str = "shared"
) -> dict:
    """Decode ``steps + 1`` tokens of `(1, context + steps + 1)` ``ids`` with ``method`` from a copy
    of the exact ``prefill`` cache (``hf.use(..., gqa=gqa)``); time the steps after the first
    (which may hash the cache). Before, untimed, the first two steps from another copy, for the
    peak of the memory decoding holds (``_decoding_peak``; the first step builds the stores)."""
    from lshattn import hf

    context = ids.shape[1] - steps - 1
    hf.use(model, method, seed=seed, gqa=gqa)
    try:
        with torch.no_grad():
            peak = _decoding_peak(model, ids[:, context : context + 2], prefill)
            hf.use(model, method, seed=seed, gqa=gqa)  # no stores: the first step below builds them again
            cache = copy.deepcopy(prefill)
            started = time.perf_counter()
            cache = model(input_ids=ids[:, context : context + 1], cache=cache, use_cache=True).cache
            first = time.perf_counter() - started
            times = []
            with hf.count(model) as tally:
                for t in range(context + 1, context + steps + 1):
                    started = time.perf_counter()
                    cache = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).cache
                    times.append(time.perf_counter() - started)
        store = state_bytes(_stores(model))
        cache_size = state_bytes(cache)
    finally:
        hf.use(model, None)
    step = statistics.median(times)
    return {
        "first_step_ms": first * 1e3, "ms_per_step": step * 1e3, "tokens_per_s": 1 / step,
        "attention_ms": tally.seconds / steps * 1e3, "decode_budget": tally.budget,
        "cache_bytes": cache_size, "store_bytes": store, "state_bytes": cache_size + store,
        "peak_bytes": peak,
    }  # fmt: skip


def _decoding_peak(model: Any, ids: Tensor, prefill: Any) -> int:
    """The most bytes decoding `(1, n)` ``ids`` one token a step from a copy of the ``prefill``
    cache holds, the copy included (made inside ``allocation_peak``: on the CPU it sees the frees
    only of what was allocated while it ran)."""

    def decode() -> None:
        cache = copy.deepcopy(prefill)
        for t in range(ids.shape[1]):
            cache = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).cache

    return allocation_peak(decode, ids.device)


# --- the run -------------------------------------------------------------------------------------


def corpus_ids(tokenizer: Any, corpus: str, tokens: int) -> Tensor:
    """`(tokens,)` the first ``tokens`` token ids of the corpus, its texts joined by blank lines
    (tokenised a text at a time, as far as needed: the whole of Wikipedia is 779k tokens)."""
    from lshattn import data

    loaders = {"wikipedia": data.wikipedia, "bible": data.bible}
    if corpus not in loaders:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(loaders)}")
    ids: list[int] = []
    for _, text in loaders[corpus]():
        ids += _encode(tokenizer, f"\n\n{text}" if ids else text)
        if len(ids) >= tokens:
            break
    return torch.tensor(ids[:tokens])


def corpus_tokens(config: LongCtxConfig) -> int:
    """How much of the corpus a run reads: 8 times its longest text, at least 64k tokens (the
    passkey filler is drawn from anywhere in it, a seeded offset per trial)."""
    longest = max((*config.lengths, *config.passkey_lengths, *config.speed_contexts), default=0)
    return max(65_536, 8 * (longest + config.speed_steps + 1))


def check_lengths(config: LongCtxConfig, model: Any, corpus: Tensor) -> None:
    """ValueError for lengths the model or the corpus cannot give, before anything runs."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(
        (*config.lengths, *config.passkey_lengths, *(c + config.speed_steps + 1 for c in config.speed_contexts))
    )
    if limit is not None and longest > limit:
        raise ValueError(
            f"{type(model).__name__} has {limit} positions, the run asks for {longest} tokens (lengths, passkey "
            f"lengths, or a speed context plus its {config.speed_steps + 1} decoded tokens); choose lengths of at most "
            f"{limit} (speed contexts of at most {limit - config.speed_steps - 1})"
        )
    if longest > corpus.numel():
        raise ValueError(f"the corpus has {corpus.numel()} tokens, the run asks for {longest}; choose shorter lengths")
    if min(config.lengths, default=config.decode_tokens + 2) < config.decode_tokens + 2:
        raise ValueError(
            f"decode_tokens={config.decode_tokens} needs texts of at least {config.decode_tokens + 2} tokens, "
            f"got lengths {config.lengths}"
        )


def _model_id(model: Any) -> str:
    c = model.config
    name = Path(getattr(c, "_name_or_path", "") or type(model).__name__).name  # no machine's path in a report
    return f"{name}|{c.num_hidden_layers}x{c.hidden_size}"


def _head_dim(model: Any) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _budget_key(fraction: float | None) -> str:
    return "fixed" if fraction is None else f"{fraction:.6g}"


class _Journal:
    """The results, written to ``report.json`` after every cell; cells of an earlier run with
    the same key are reused. The earlier cells this run has not reached (yet) are kept under
    ``"unvisited"`` (not in the report), so a run that stops early loses none of them."""

    def __init__(self, out: Path, results: dict, previous: dict[str, dict]) -> None:
        self.out, self.results, self.previous, self.reused = out, results, previous, 0
        self.visited: set[str] = set()

    def cell(self, section: str, key: str, compute: Callable[[], dict]) -> dict:
        row = self.previous.get(key)
        if row is not None:
            self.reused += 1
        else:  # the commit it was measured at: a reused cell may predate a change to its method
            row = {"key": key, **compute(), "commit": self.results["machine"].get("commit")}
        self.results[section]["rows"].append(row)
        self.visited.add(key)
        self.save()
        return row

    def save(self) -> None:
        self.results["unvisited"] = [row for key, row in self.previous.items() if key not in self.visited]
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "report.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.out / "report.json")  # a reader never sees half a file


def _previous_cells(out: Path) -> dict[str, dict]:
    try:
        old = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    rows = [row for section in ("perplexity", "passkey", "speed") for row in old.get(section, {}).get("rows", [])]
    return {
        row["key"]: row for row in rows + old.get("unvisited", []) if "key" in row and row.get("status") != "failed"
    }


def run(
    config: LongCtxConfig, out_dir: str | Path, *, model: Any = None, tokenizer: Any = None,
    corpus: Tensor | None = None, progress: bool = True, resume: bool = True,
) -> dict:  # fmt: skip
    """Run every section, write ``report.md``, ``report.json`` and the plots into ``out_dir``,
    return the results.

    Args:
        config: what to run.
        out_dir: the report's folder; a ``report.json`` there from an earlier run is resumed
            (its cells with the same settings are kept, not measured again) unless ``resume`` is
            False.
        model, tokenizer: a causal LM and its tokenizer (with a chat template, for the passkey);
            None: SmolLM2-135M-Instruct (``lshattn.data.load_smollm2``).
        corpus: `(N,)` token ids of long text; None: ``config.corpus`` through ``tokenizer``.
        progress: tqdm progress bars.

    Raises:
        ValueError: a length past the model's positions or the corpus, or a bad method string.
    """
    from tqdm.auto import tqdm

    from lshattn import data
    from lshattn.eval.demo import machine

    started = time.perf_counter()
    if config.prefill not in lshattn.hf.PREFILLS:
        raise ValueError(f"prefill must be one of {lshattn.hf.PREFILLS}, got {config.prefill!r}")
    if config.gqa not in lshattn.hf.GQA_MODES:
        raise ValueError(f"gqa must be one of {lshattn.hf.GQA_MODES}, got {config.gqa!r}")
    for text in (*config.methods, *config.references, *config.passkey_methods):
        parse(text)  # a bad string fails before the model loads
    if model is None:
        tokenizer, model = data.load_smollm2()
    model.eval()
    corpus = corpus_ids(tokenizer, config.corpus, corpus_tokens(config)) if corpus is None else corpus
    check_lengths(config, model, corpus)
    out = Path(out_dir)
    model_id, seed, D = _model_id(model), config.seed, _head_dim(model)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "model": {"id": model_id, "class": type(model).__name__, "positions": model.config.max_position_embeddings},
        "machine": machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command(config),
        "perplexity": {"rows": []}, "passkey": {"rows": []}, "speed": {"rows": []},
    }  # fmt: skip
    journal = _Journal(out, results, _previous_cells(out) if resume else {})
    bar = tqdm(total=_cell_count(config), desc="longctx", disable=not progress)

    def tick(what: str) -> None:
        bar.set_postfix_str(what[:60])
        bar.update()

    # 1. Perplexity: exact first at each length (the KL's reference), then each method and budget.
    for length in config.lengths:
        ids = corpus[None, :length]
        base = f"perplexity|{model_id}|{config.corpus}|seed={seed}|T={length}|N={config.decode_tokens}{_setting_key(config)}"
        reference = _exact_reference(model, ids)
        shared = _exact_prefill(model, ids, config.decode_tokens) if config.prefill == "exact" else None
        jobs = [(EXACT, None)] + [(t, f) for f in config.budgets for t in config.methods]
        jobs += [(t, None) for t in config.references]
        for text, fraction in jobs:
            key = f"{base}|budget={_budget_key(fraction)}|{text}"
            row = partial(_perplexity_row, config, model, ids, text, fraction, D, reference, shared)
            journal.cell("perplexity", key, row)
            tick(f"perplexity {length}: {text}")
    # 2. Passkey: each method at the passkey budget; a batch of every depth per trial.
    for length in config.passkey_lengths:
        for trial in range(config.passkey_trials):
            keys = passkey_keys(seed, length, trial, len(config.passkey_depths))
            filler = _filler(corpus, seed, length, trial)
            built = [passkey_prompt(tokenizer, filler, length, d, k) for d, k in zip(config.passkey_depths, keys)]
            base = f"passkey|{model_id}|{config.corpus}|seed={seed}|T={length}|trial={trial}"
            base += f"|depths={','.join(map(str, config.passkey_depths))}|new={config.passkey_new_tokens}"
            base += _setting_key(config)
            prompts = torch.tensor([ids for ids, _ in built])
            shared = _exact_prefill(model, prompts, 0) if config.prefill == "exact" else None
            for text in (EXACT, *config.passkey_methods):
                fraction = None if text == EXACT else config.passkey_budget
                key = f"{base}|budget={_budget_key(fraction)}|{text}"
                row = partial(_passkey_row, config, model, tokenizer, built, keys, text, length, trial, D, shared)
                journal.cell("passkey", key, row)
                tick(f"passkey {length}: {text}")
    # 3. Speed: every method in one run per context, from one exact prefill.
    for context in config.speed_contexts:
        key = f"speed|{model_id}|{config.corpus}|seed={seed}|T={context}|steps={config.speed_steps}{_gqa_key(config)}"
        key += f"|budget={_budget_key(config.speed_budget)}|{','.join((EXACT, *config.methods))}"
        journal.cell("speed", key, partial(_speed_rows, config, model, corpus, context, D))
        tick(f"speed {context}")
    bar.close()
    results["reused_cells"] = journal.reused
    results["seconds"] = time.perf_counter() - started
    journal.save()
    write(results, out)
    return results


# The sections a run can leave out, by the flag that, given no values, leaves it out.
_SECTION_FLAGS = {"lengths": "--lengths", "passkey_lengths": "--passkey-lengths", "speed_contexts": "--speed-contexts"}


def command(config: LongCtxConfig) -> str:
    """The command that runs ``config``, where one does: a known config (the default, ``--quick``,
    ``--prefill exact``) with some sections left out (``--speed-contexts`` with no values, say)."""
    default = LongCtxConfig(seed=config.seed, corpus=config.corpus, gqa=config.gqa)
    left_out = {field: () for field in _SECTION_FLAGS if getattr(config, field) == ()}
    rest = "".join(f" {_SECTION_FLAGS[field]}" for field in left_out)
    rest += "" if config.corpus == "wikipedia" else f" --corpus {config.corpus}"
    rest += "" if config.gqa == LongCtxConfig.gqa else f" --gqa {config.gqa}"
    for flags, known in (("", default), (" --quick", default.quick())):
        if config == dataclasses.replace(known.exact_prefill(), **left_out):
            return f"`lshattn longctx{flags} --prefill exact --seed {config.seed}{rest} --out DIR`"
        if config == dataclasses.replace(known, **left_out):
            return f"`lshattn longctx{flags} --seed {config.seed}{rest} --out DIR`"
    return "`lshattn.eval.longctx.run(LongCtxConfig(**config), DIR)`"


def _exactly(model: Any, compute: Callable[[], Any]) -> Any:
    """``compute()`` with exact attention in every layer, the model's setting cleared after."""
    lshattn.hf.use(model, lshattn.Dense())
    try:
        return compute()
    finally:
        lshattn.hf.use(model, None)


def _exact_once(model: Any, compute: Callable[[], Any]) -> Callable[[], Any]:
    """A function giving ``compute()``'s result under exact attention, computed on the first call
    only: a length whose cells are all reused computes nothing."""
    cached: list[Any] = []

    def result() -> Any:
        if not cached:
            cached.append(_exactly(model, compute))
        return cached[0]

    return result


def _exact_reference(model: Any, ids: Tensor) -> Callable[[], Tensor]:
    """A function giving exact attention's `(T, d)` last hidden states over `(1, T)` ``ids``."""
    return _exact_once(model, partial(_hidden, model, ids))


def _exact_prefill(model: Any, ids: Tensor, n: int) -> Callable[[], Any]:
    """A function giving a fresh copy of exact attention's cache of all but the last ``n + 1``
    tokens of `(B, T)` ``ids``: one prefill shared by every method's decoding of those texts."""
    prefilled = _exact_once(model, partial(_prefilled, model, ids, n))
    return lambda: copy.deepcopy(prefilled())


def _setting_key(config: LongCtxConfig) -> str:
    """The prefill's and GQA's part of a cell's key: none for the methods' prefill and a projection
    a query head (the keys of the earlier reports)."""
    return ("" if config.prefill == "method" else f"|prefill={config.prefill}") + _gqa_key(config)


def _gqa_key(config: LongCtxConfig) -> str:
    """The GQA part of a cell's key: none for a projection a query head (the cells measured before
    ``gqa`` existed keep their keys)."""
    return "" if config.gqa == "per-query-head" else f"|gqa={config.gqa}"


def _cell_count(config: LongCtxConfig) -> int:
    perplexity = len(config.lengths) * (1 + len(config.budgets) * len(config.methods) + len(config.references))
    passkey = len(config.passkey_lengths) * config.passkey_trials * (1 + len(config.passkey_methods))
    return perplexity + passkey + len(config.speed_contexts)


def _resolve(
    config: LongCtxConfig, text: str, fraction: float | None, T: int, D: int, *, speed: bool = False
) -> tuple[Method | None, dict]:
    """The method for a cell, or None with the row saying why it is not run (``speed``: decoding
    only, where ``config.exclude`` does not apply)."""
    if text == EXACT:
        return lshattn.Dense(), {"method": EXACT, "role": "exact", "status": "ok"}
    role = ROLES.get(text.partition(":")[0], "method")
    row: dict[str, Any] = {"text": text, "role": role, "method": text}
    reason = None if speed else excluded(config, text, T, fraction)
    if reason is not None:
        return None, {**row, "status": "excluded", "reason": reason}
    try:
        method = setting(text, fraction, T, D)
    except ValueError as error:
        return None, {**row, "status": "unreachable", "reason": str(error)}
    # A fixed reference keeps its string (str(Local(sinks=4, window=64)) is "local": the defaults)
    row.update(method=text if fraction is None else str(method), status="ok")
    row["expected_budget"] = work_share(method, T, T, D, causal=True)
    return method, row


def _perplexity_row(
    config: LongCtxConfig, model: Any, ids: Tensor, text: str, fraction: float | None, D: int,
    reference: Callable[[], Tensor], exact_prefill: Callable[[], Any] | None,
) -> dict:  # fmt: skip
    T = ids.shape[1]
    method, row = _resolve(config, text, fraction, T, D)
    row.update(length=T, budget=fraction, family=family(text))
    if method is None:
        return row
    exact = reference()
    cell = perplexity_cell(
        model, ids, method, config.seed, config.decode_tokens, exact, config.chunk, exact_prefill, config.gqa
    )
    return {**row, **cell}


def _passkey_row(
    config: LongCtxConfig, model: Any, tokenizer: Any, built: list[tuple[list[int], int]], keys: list[int], text: str,
    length: int, trial: int, D: int, exact_prefill: Callable[[], Any] | None,
) -> dict:  # fmt: skip
    fraction = None if text == EXACT else config.passkey_budget
    method, row = _resolve(config, text, fraction, length, D)
    row.update(length=length, trial=trial, budget=fraction, depths=list(config.passkey_depths), keys=keys)
    row["needle_at"] = [at for _, at in built]
    if method is None:
        return row
    started = time.perf_counter()
    cache = None if exact_prefill is None else exact_prefill()  # before use(): it sets exact attention
    lshattn.hf.use(model, method, seed=config.seed, prefill=config.prefill, gqa=config.gqa)
    try:
        prompts = [ids for ids, _ in built]
        cell = passkey_cell(model, tokenizer, prompts, keys, config.passkey_new_tokens, cache)
    finally:
        lshattn.hf.use(model, None)
    return {**row, **cell, "seconds": time.perf_counter() - started}


def _speed_rows(config: LongCtxConfig, model: Any, corpus: Tensor, context: int, D: int) -> dict:
    ids = corpus[None, : context + config.speed_steps + 1]
    prefill = _exactly(model, partial(_prefilled, model, ids[:, : context + 1], 0))  # the first `context` tokens
    texts = (EXACT, *config.methods)
    resolved = [_resolve(config, t, None if t == EXACT else config.speed_budget, context, D, speed=True) for t in texts]
    # Two passes, the second in reverse order, each method keeping its faster one: a load that
    # comes or goes during the run (another job on the machine) then tilts no ratio one way.
    passes: dict[int, list[dict]] = {}
    for order in (range(len(texts)), reversed(range(len(texts)))):
        for i in order:
            method = resolved[i][0]
            if method is not None:
                row = speed_row(model, ids, prefill, method, config.seed, config.speed_steps, config.gqa)
                passes.setdefault(i, []).append(row)
    rows = []
    for i, (_, row) in enumerate(resolved):
        if i in passes:
            row.update(min(passes[i], key=lambda r: r["ms_per_step"]))
            row["attention_ms"] = min(r["attention_ms"] for r in passes[i])
            row["passes_ms_per_step"] = [r["ms_per_step"] for r in passes[i]]
        rows.append(row)
    exact = rows[0]
    for row in rows:
        if row["status"] == "ok":
            row["attention_ratio"] = row["attention_ms"] / exact["attention_ms"]
            row["step_ratio"] = row["ms_per_step"] / exact["ms_per_step"]
    return {"context": context, "steps": config.speed_steps, "budget": config.speed_budget, "methods": rows}


# --- the report ----------------------------------------------------------------------------------


def write(results: dict, out_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns report.md's path."""
    from lshattn.eval import longctx_report

    return longctx_report.write(results, out_dir)
