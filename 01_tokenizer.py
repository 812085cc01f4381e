"""Chapter 1: where OpenMoE's text comes from, and how it becomes token ids and training rows.

OpenMoE's first phase trained on 50% RedPajama (web, books, papers, Wikipedia) and 50% The Stack
(deduplicated source code), sampled as a mixture of documents by seqio, T5's data library (arXiv
2402.01739, §2.2 and Table 1). Its tokenizer is umT5's SentencePiece unigram model: 256,000
pieces with byte fallback, the T5 id layout (0 = pad, also the decoder's start token; 1 = eos;
2 = unk), plus 300 sentinels `<extra_id_0>`… at the top (the hidden spans of T5's span
corruption, 09), padded to 256,384 embedding rows.
This file builds the same two halves offline, from what every Python installation carries: *code*
is the standard library's `.py` files (test suites skipped), *text* its English prose
(`pydoc_data.topics`, the docstrings), plus chats answered by a stdlib function's docstring or
code (§5 proposes instruction data in warm-up). Real runs stream hub datasets instead. A small
unigram model is trained on the embedded corpus and cached; umT5's own `spiece.model` loads
unchanged. Last, a mixture's documents become one stream of ids, packed into training rows.
Left out: umT5's Unicode normalization (text stays byte-exact). Self-test: `python 01_tokenizer.py`."""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import pathlib
import re
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import datasets
import numpy as np
import sentencepiece as spm
from datasets.distributed import split_dataset_by_node

from support import cli, files

log = logging.getLogger(__name__)

# --- The embedded corpus: Python's own prose and code, as two `datasets.Dataset`s. ----------------
# Directories inside a Python source tree that hold test suites or third-party code, not stdlib.
SKIPPED_DIRECTORIES = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
# Documents are cut into chunks of at most this many characters, at paragraph boundaries: mixing
# by documents (as seqio does) is then also mixing by bytes, as for RedPajama's and The Stack's.
MAX_DOCUMENT_CHARS = 4096
VALIDATION_FRACTION = 0.05  # share of documents (whole files, before chunking) held out for validation


def split_into_chunks(document: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """Cut a document into consecutive chunks of at most `max_chars`, preferring blank lines;
    paragraphs keep their separators, so the chunks concatenate back to the document exactly:
    >>> split_into_chunks("para one\\n\\npara two\\n", max_chars=12)
    ['para one\\n\\n', 'para two\\n']"""
    pieces = []
    for paragraph in re.split(r"(?<=\n\n)", document):
        # A paragraph longer than a chunk is cut at line ends, and a single huge line hard-cut.
        for line in (paragraph.splitlines(keepends=True) if len(paragraph) > max_chars else [paragraph]):
            pieces.extend(line[i:i + max_chars] for i in range(0, len(line), max_chars))
    chunks = [""]
    for piece in pieces:
        if chunks[-1] and len(chunks[-1]) + len(piece) > max_chars:
            chunks.append("")
        chunks[-1] += piece
    return [chunk for chunk in chunks if chunk]


def is_validation(document_id: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """Deterministic split by document: a hash of the id, the same on every machine."""
    return int.from_bytes(hashlib.sha256(document_id.encode()).digest()[:8], "big") / 2**64 < fraction


def python_files(directory: pathlib.Path) -> tuple[list[tuple[str, str]], int]:
    """(relative path, source) of every `.py` file under `directory` outside test suites, and how
    many were skipped as not UTF-8 (a source tree may hold a few; they must not stop a run)."""
    sources, undecodable = [], 0
    for path in sorted(directory.rglob("*.py")):
        relative = path.relative_to(directory)
        if SKIPPED_DIRECTORIES.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            sources.append((relative.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            undecodable += 1
    return sources, undecodable


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except SyntaxError:  # a file written for another Python version
        return None


def docstrings(source: str) -> list[str]:
    """The module, class and function docstrings of a Python source, outermost first."""
    nodes = (n for n in ast.walk(_parse(source) or ast.Module([], []))
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return [doc for doc in map(ast.get_docstring, nodes) if doc]


@functools.lru_cache(maxsize=2)
def embedded_documents(directory: pathlib.Path | None = None) -> list[dict[str, str]]:
    """Every embedded document as {"id", "source", "text"}, before chunking and splitting."""
    import pydoc_data.topics
    directory = pathlib.Path(directory or sysconfig.get_paths()["stdlib"])
    sources, undecodable = python_files(directory)
    if undecodable:
        log.warning("skipped %d undecodable .py files under %s", undecodable, directory)
    documents = [{"id": f"pydoc_topics/{name}", "source": "text", "text": text}
                 for name, text in sorted(pydoc_data.topics.topics.items())]
    for relative, source in sources:  # a module's docstrings read as one prose document about it
        if prose := "\n\n".join(docstrings(source)):
            documents.append({"id": f"docstrings/{relative}", "source": "text", "text": prose})
        documents.append({"id": f"stdlib/{relative}", "source": "code", "text": source})
    return documents


@functools.lru_cache(maxsize=4)
def embedded_corpus(split: str = "train", directory: str | None = None) -> dict[str, datasets.Dataset]:
    """The default corpus: {"text": Dataset, "code": Dataset}, columns `id`, `source`, `text`. A
    document's split is a hash of its id (a path in the standard library: the same on every
    machine with the same Python); its chunks keep that split, so nothing leaks."""
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is not a split of the embedded corpus; use 'train' or 'validation'")
    by_source: dict[str, list[dict[str, str]]] = {}
    for document in embedded_documents(pathlib.Path(directory) if directory else None):
        if is_validation(document["id"]) != (split == "validation"):
            continue
        by_source.setdefault(document["source"], []).extend(
            {**document, "id": f"{document['id']}#{index}", "text": chunk}
            for index, chunk in enumerate(split_into_chunks(document["text"])))
    if not by_source:
        raise ValueError(f"the embedded corpus under {directory or 'the standard library'} is empty")
    return {source: datasets.Dataset.from_list(rows) for source, rows in sorted(by_source.items())}


# Text the corpus lacks, to see what a model does with it (11 routes both): chats, other languages.
OTHER_LANGUAGES = pathlib.Path(__file__).resolve().parent / "data" / "other_languages.txt"


def chat_text(turns: Sequence[str], *, ask_reply: bool = False) -> str:
    """Turns alternating User and Assistant (MT-Bench's shape), e.g. "### User:\\nHi?\\n\\n###
    Assistant:\\nHello."; `ask_reply` adds an empty Assistant turn: a prompt for the reply."""
    text = "\n\n".join(f"### {'Assistant' if i % 2 else 'User'}:\n{t}" for i, t in enumerate(turns))
    return text + "\n\n### Assistant:\n" if ask_reply else text


def chat_formatted(texts: list[str]) -> list[str]:
    """Each document as a chat prompt, its paragraphs the turns. The words are in distribution;
    the format is what the router never trained on (unless warm-up mixed in instructions)."""
    return [chat_text([p.strip() for p in t.split("\n\n") if p.strip()], ask_reply=True) for t in texts]


def other_language_texts(path: pathlib.Path = OTHER_LANGUAGES) -> list[str]:
    """data/other_languages.txt's documents (German … Japanese), one per `== name ==` header."""
    lines = path.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.startswith("#"))
    return [document.strip() for document in re.split(r"^== .* ==$", text, flags=re.M)
            if document.strip()]


# Instruction pairs (§5: mix instruction data into warm-up, so the router learns to balance chat
# tokens too). Offline, each public stdlib function asks "what does it do" (answered by its
# docstring's first paragraph) and, if it has at most 12 lines and no decorator, its code.


def instruction_pairs(split: str = "train", directory: str | None = None) -> list[dict[str, str]]:
    """Chat pairs {"user", "assistant"} from public modules of the standard library, e.g. "What
    does `os.walk` do?" → "Directory tree generator.". A pair has its file's split (the corpus'
    `is_validation`), so no held-out file leaks; the order is the files', on every machine."""
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is not a split of the instruction pairs; "
                         "use 'train' or 'validation'")
    pairs = []
    for document in embedded_documents(pathlib.Path(directory) if directory else None):
        module = document["id"].removeprefix("stdlib/").removesuffix(".py").removesuffix("/__init__")
        if (document["source"] != "code" or is_validation(document["id"]) != (split == "validation")
                or "/_" in f"/{module}" or (tree := _parse(document["text"])) is None):
            continue  # prose, the other split, a private module (_strptime, __main__), or unparsable
        for node in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name[0] != "_"):
            name = f"`{module.replace('/', '.')}.{node.name}`"
            if doc := ast.get_docstring(node):
                pairs.append({"user": f"What does {name} do?",
                              "assistant": doc.split("\n\n")[0].strip()})
            if node.end_lineno - node.lineno < 12 and not node.decorator_list:
                code = "\n".join(document["text"].splitlines()[node.lineno - 1:node.end_lineno])
                pairs.append({"user": f"Show me the code of {name}.",
                              "assistant": f"```python\n{code}\n```"})
    return pairs


@functools.lru_cache(maxsize=4)
def instruction_corpus(split: str = "train", directory: str | None = None) -> datasets.Dataset:
    """instruction_pairs as the mixture source "instructions": `text` is the chat (chat_text)."""
    return datasets.Dataset.from_list([
        {**pair, "source": "instructions", "text": chat_text([pair["user"], pair["assistant"]])}
        for pair in instruction_pairs(split, directory)])


# --- Hub corpora, streamed by name for real runs, and mixtures of sources, sampled like seqio -----
@dataclasses.dataclass(frozen=True)
class HubSource:
    """Where one mixture component lives: a hub dataset (or a local json/parquet builder)."""
    path: str                          # hub name, e.g. "bigcode/the-stack-dedup", or "json"/"parquet"
    config: str | None = None          # the dataset's configuration (RedPajama: "c4", "arxiv", …)
    column: str = "text"               # which column holds the document (The Stack: "content")
    split: str = "train"               # which split to stream
    data_files: str | Sequence[str] | None = None  # local files, for the "json"/"parquet" builders


# OpenMoE's datasets (RedPajama subsets, The Stack dedup; gated: accept its terms and log in), and
# English Wikipedia of the phase-II and 34B mixtures (TFDS 20190301.en then; the hub's dump now).
HUB_SOURCES: dict[str, HubSource] = {
    **{f"redpajama_{subset}": HubSource("togethercomputer/RedPajama-Data-1T", subset) for subset in (
        "c4", "wikipedia", "stackexchange", "arxiv", "book", "github", "common_crawl")},
    "the_stack_dedup": HubSource("bigcode/the-stack-dedup", column="content"),
    "wikipedia": HubSource("wikimedia/wikipedia", "20231101.en"),
}


def load_hub_source(spec: HubSource | str, *, name: str | None = None, process_index: int = 0,
                    process_count: int = 1) -> datasets.IterableDataset:
    """Stream one source (a `HubSource` or a key of `HUB_SOURCES`) as an `IterableDataset` with
    columns `text` and `source`; with several hosts, each its own shard (`process_index` of
    `process_count`). Errors name the dataset and what to check, before any training starts."""
    if isinstance(spec, str):
        if spec not in HUB_SOURCES:
            raise ValueError(f"unknown hub source {spec!r}; known: {sorted(HUB_SOURCES)}, "
                             "or pass a HubSource(path=..., column=...) for any other dataset")
        name, spec = name or spec, HUB_SOURCES[spec]
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    label = f"{spec.path}" + (f" ({spec.config})" if spec.config else "")
    try:
        stream = datasets.load_dataset(spec.path, spec.config, split=spec.split,
                                       data_files=spec.data_files, streaming=True)
    except Exception as error:  # the hub client raises many types; all mean "cannot load this name"
        raise ValueError(f"hub dataset {label} could not be loaded: {error}. Check the name and "
                         "configuration on the hub, your login for gated datasets, and the network "
                         "(HF_HUB_OFFLINE=1 forbids downloads)") from error
    first = next(iter(stream.take(1)), None)  # a wrong column fails now, not hours into a run
    if first is None:
        raise ValueError(f"hub dataset {label} split {spec.split!r} is empty")
    if spec.column not in first:
        raise ValueError(f"hub dataset {label} has no column {spec.column!r}; "
                         f"its columns are {sorted(first)}. Set HubSource(column=...)")
    stream = stream.select_columns([spec.column])
    if spec.column != "text":
        stream = stream.rename_column(spec.column, "text")
    stream = stream.map(lambda example: {"source": name or spec.path})
    if process_count > 1:
        stream = split_dataset_by_node(stream, process_index, process_count)
    return stream

# Sampling rates per source (normalized to probabilities by `mixture_probabilities`), from
# OpenMoE's seqio mixtures (t5/data/mixtures.py of its t5 fork; paper Table 1).
MIXTURES: dict[str, dict[str, float]] = {
    "embedded": {"text": 1.0, "code": 1.0},  # the embedded default: phase I's 50% text / 50% code
    "embedded-code30": {"text": 0.7, "code": 0.3},  # §5: ~30% code, not 50% (the 34B mixture: 35%)
    # For 09's warmup_mixture (§5): a pair is ~66 tokens, a document ~600-900, so 12 pairs per
    # text and code document make instruction chats about a third of the warm-up's tokens.
    "embedded-instructions": {"text": 1.0, "code": 1.0, "instructions": 12.0},
    # Version I (OpenMoE-Base and 8B before 780B tokens): 50% RedPajama, 50% The Stack.
    "openmoe_v1": {"redpajama_c4": 15, "redpajama_wikipedia": 4.5, "redpajama_stackexchange": 2,
                   "redpajama_arxiv": 2.5, "redpajama_book": 4.5, "redpajama_github": 4.5,
                   "redpajama_common_crawl": 67, "the_stack_dedup": 100},
    # Version II (OpenMoE-8B after 780B tokens): code cut to 15%.
    "openmoe_v2": {"redpajama_c4": 15, "redpajama_wikipedia": 6.5, "wikipedia": 6.5,
                   "redpajama_stackexchange": 2.5, "redpajama_arxiv": 4.5, "redpajama_book": 6.5,
                   "redpajama_github": 5, "redpajama_common_crawl": 43.5, "the_stack_dedup": 10},
    # Version III (OpenMoE-34B, whole run): 35% code.
    "openmoe_v3": {"redpajama_c4": 15, "redpajama_wikipedia": 4.5, "wikipedia": 2.5,
                   "redpajama_stackexchange": 1, "redpajama_arxiv": 4.5, "redpajama_book": 4.5,
                   "redpajama_github": 5, "redpajama_common_crawl": 33, "the_stack_dedup": 30},
}


def mixture_probabilities(name: str) -> dict[str, float]:
    """A named mixture's rates, normalized to probabilities that sum to 1."""
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; known: {sorted(MIXTURES)}")
    total = sum(MIXTURES[name].values())
    return {source: rate / total for source, rate in MIXTURES[name].items()}


def mix(sources: Mapping[str, datasets.Dataset | datasets.IterableDataset],
        probabilities: Mapping[str, float], *, seed: int = 0, stopping_strategy: str = "all_exhausted"):
    """Interleave sources, drawing each next document's source with the given probabilities
    (fixed by `seed`). "all_exhausted" samples until every source has been seen once, repeating
    the smaller ones (as a mixture should); "first_exhausted" stops at the first to run out."""
    if set(probabilities) != set(sources):
        raise ValueError(f"mixture probabilities are given for {sorted(probabilities)} but the "
                         f"sources are {sorted(sources)}; give one probability per source")
    if any(not p >= 0 for p in probabilities.values()) or not math.isclose(
            sum(probabilities.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"mixture probabilities {dict(probabilities)} must be non-negative and "
                         f"sum to 1 (they sum to {sum(probabilities.values()):.6g})")
    names = sorted(sources)  # only the shared columns survive interleaving (sources may add more)
    parts = [sources[name].select_columns(["text", "source"]) for name in names]
    return datasets.interleave_datasets(parts, probabilities=[probabilities[n] for n in names],
                                        seed=seed, stopping_strategy=stopping_strategy)


# --- The tokenizer: a SentencePiece unigram model in umT5's layout, with sentinels on top. --------
# Pieces SentencePiece reserves before it learns any: pad, eos, unk and the 256 byte pieces.
RESERVED_PIECES = 3 + 256


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """How to train (or complete) a tokenizer. Defaults are OpenMoE's umT5 tokenizer."""
    vocab_size: int = 256_000            # SentencePiece pieces (umT5: 256,000)
    num_extra_ids: int = 300             # span-corruption sentinels (OpenMoE: 300; early configs 100)
    pad_vocab_to_multiple: int = 128     # embedding rows are padded (256,300 -> 256,384)
    model_type: str = "unigram"          # umT5's SentencePiece algorithm ("bpe" also works)
    character_coverage: float = 0.9995   # rarer characters are left to byte fallback
    max_training_chars: int = 6_000_000  # size of the corpus sample the model is trained on
    seed: int = 0                        # which sample of the corpus

    def __post_init__(self):
        cli.check_fields(self, {
            "vocab_size": (cli.int_at_least(RESERVED_PIECES + 1), f"an int > {RESERVED_PIECES} (reserved)"),
            "model_type": (lambda v: v in ("unigram", "bpe"), "'unigram' (umT5) or 'bpe'"),
            "character_coverage": (lambda v: 0.9 <= v <= 1.0, "in [0.9, 1]"),
            **{name: (cli.int_at_least(low), f"an int >= {low}") for name, low in (
                ("num_extra_ids", 0), ("pad_vocab_to_multiple", 1), ("max_training_chars", 1))}})


# The tokenizer the embedded default run uses: small enough to train in seconds on a laptop.
EMBEDDED_TOKENIZER = TokenizerConfig(vocab_size=8_000)


class Tokenizer:
    """Text <-> ids in T5's layout: SentencePiece ids, then sentinels, then padding rows. For a
    model of P pieces with X sentinels, ids 0..P-1 are SentencePiece's own (a loaded `spiece.model`
    gives exactly its ids), `<extra_id_0>` is P+X-1 and `<extra_id_{X-1}>` is P (T5 counts them
    down from the top); `vocab_size` rounds P+X up to a multiple of `pad_vocab_to_multiple`."""

    def __init__(self, model_proto: bytes, *, num_extra_ids: int = 300,
                 pad_vocab_to_multiple: int = 128, path: str | None = None):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path, self.num_extra_ids = path, num_extra_ids
        self.piece_count = self.processor.get_piece_size()
        self.pad_id, self.eos_id, self.unk_id = (
            self.processor.pad_id(), self.processor.eos_id(), self.processor.unk_id())
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path or ''} has pad_id={self.pad_id}, "
                             f"eos_id={self.eos_id}; OpenMoE's T5 layout needs both pieces")
        rows = self.piece_count + num_extra_ids
        self.vocab_size = -(-rows // pad_vocab_to_multiple) * pad_vocab_to_multiple

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_extra_ids: int = 300,
             pad_vocab_to_multiple: int = 128) -> "Tokenizer":
        """Load an existing SentencePiece `.model` file unchanged (umT5's `spiece.model`, say)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer model {str(path)!r} does not exist or is not a file")
        try:
            return cls(path.read_bytes(), num_extra_ids=num_extra_ids,
                       pad_vocab_to_multiple=pad_vocab_to_multiple, path=str(path))
        except RuntimeError as error:  # SentencePiece's message for a file it cannot parse
            raise ValueError(f"tokenizer model {str(path)!r} is not a valid SentencePiece "
                             f"model: {error}") from error

    def sentinel_id(self, index: int) -> int:
        """The id of `<extra_id_{index}>`: sentinel 0 is the highest id in use."""
        if not 0 <= index < self.num_extra_ids:
            raise ValueError(f"sentinel index {index} is outside [0, {self.num_extra_ids})")
        return self.piece_count + self.num_extra_ids - 1 - index

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        """Ids of one string; with `add_eos`, the eos id closes it (a document boundary)."""
        return self.processor.encode(text, add_eos=add_eos)

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = False) -> list[list[int]]:
        """Ids of many strings at once (SentencePiece encodes them on several threads)."""
        return self.processor.encode(list(texts), add_eos=add_eos, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of ids. Sentinels print as `<extra_id_i>`; pad and eos print nothing;
        ids of padding rows, which a model should never emit, print as unk (" ⁇ ")."""
        text, run = [], []
        for token in map(int, ids):
            if self.piece_count <= token < self.piece_count + self.num_extra_ids:
                index = self.piece_count + self.num_extra_ids - 1 - token
                text += [self.processor.decode(run), f"<extra_id_{index}>"]
                run = []
            else:
                run.append(token if 0 <= token < self.piece_count else self.unk_id)
        return "".join(text) + self.processor.decode(run)

    def pieces(self, text: str) -> list[str]:
        """The pieces a string is cut into: what a reader wants to see in a worked example."""
        return self.processor.encode(text, out_type=str)

    def tokens_per_byte(self, texts: Iterable[str]) -> float:
        """Tokens per UTF-8 byte over `texts`: lower means the tokenizer compresses better."""
        texts = list(texts)
        return sum(map(len, self.encode_batch(texts))) / max(1, sum(len(t.encode()) for t in texts))


def default_cache_dir() -> pathlib.Path:
    """Where trained tokenizers are kept: $OPENMOE_CACHE_DIR, else `.cache/` beside this file."""
    return pathlib.Path(os.environ.get("OPENMOE_CACHE_DIR") or pathlib.Path(__file__).parent / ".cache")


def training_sample(sources: Mapping[str, datasets.Dataset | datasets.IterableDataset],
                    max_chars: int, seed: int) -> list[str]:
    """Equal shares of `max_chars` from each source, drawn in a seeded random order."""
    share, sample = max_chars // max(1, len(sources)), []
    for name in sorted(sources):
        taken = 0
        for example in sources[name].shuffle(seed=seed):
            if taken >= share:
                break
            sample.append(example["text"])
            taken += len(example["text"])
    return sample


def train_tokenizer(sources: Mapping[str, datasets.Dataset | datasets.IterableDataset],
                    config: TokenizerConfig = EMBEDDED_TOKENIZER,
                    cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Train a SentencePiece model on a sample of `sources`, or load it from the cache, whose key
    hashes the training text, the config and the SentencePiece version: the same corpus and
    settings load in milliseconds, any change retrains (atomic writes: support/files.py)."""
    texts = training_sample(sources, config.max_training_chars, config.seed)
    if not any(texts):
        raise ValueError(f"cannot train a tokenizer on an empty corpus (sources: {sorted(sources)})")
    key = files.content_key(json.dumps([dataclasses.asdict(config), spm.__version__]), texts)

    def train() -> bytes:
        # umT5's layout (pad 0, eos 1, unk 2, no bos) with byte fallback, so no text becomes unk.
        # Identity normalization and kept whitespace make decode(encode(x)) == x, which code needs.
        model = io.BytesIO()
        spm.set_random_generator_seed(config.seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=model, vocab_size=config.vocab_size,
                model_type=config.model_type, character_coverage=config.character_coverage,
                byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, max_sentence_length=4 * MAX_DOCUMENT_CHARS + 16,
                num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as error:
            if limit := re.search(r"value <= (\d+)", str(error)):
                raise ValueError(f"vocab_size={config.vocab_size} is larger than this corpus supports "
                                 f"(at most {limit.group(1)} pieces for {sum(map(len, texts)):,} "
                                 "characters); lower vocab_size or train on more text") from error
            raise
        return model.getvalue()

    return files.load_or_build(
        pathlib.Path(cache_dir or default_cache_dir()) / "tokenizers" / key / "spiece.model",
        functools.partial(Tokenizer.load, num_extra_ids=config.num_extra_ids,
                          pad_vocab_to_multiple=config.pad_vocab_to_multiple),
        train, notes={"config.json": json.dumps(dataclasses.asdict(config), indent=2)},
        redo="training the cached tokenizer again")


def embedded_tokenizer(cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The default run's tokenizer: trained on the embedded corpus' train split, then cached."""
    return train_tokenizer(embedded_corpus("train"), EMBEDDED_TOKENIZER, cache_dir)


# --- From documents to training rows: a mixture's texts → one stream of ids → packed rows ---------
# The arrays of every training row (as 06's loss_fn reads them), each [L] for a row of L tokens.
ROW_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
              "segment_ids": np.int32, "positions": np.int32}


def document_texts(sources: Mapping[str, datasets.Dataset], probabilities: Mapping[str, float],
                   seed: int) -> Iterator[str]:
    """Endless texts from a mixture of `sources`. Each pass reshuffles every source (seed + pass
    number), so the order is a pure function of the seed: a resumed run can replay it exactly."""
    for epoch in itertools.count():
        shuffled = {name: s.shuffle(seed=seed + epoch) for name, s in sources.items()}
        for row in mix(shuffled, probabilities, seed=seed + epoch):
            yield row["text"]


def token_stream(texts: Iterator[str], tokenizer: Tokenizer, chunk: int = 64) -> Iterator[int]:
    """Every document's ids followed by eos, as one stream (encoded `chunk` documents at a time)."""
    while batch := list(itertools.islice(texts, chunk)):
        for ids in tokenizer.encode_batch(batch, add_eos=True):
            yield from ids


def pack_lm_rows(tokens: Iterator[int], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Cut the stream into rows of seq_len + 1 tokens: inputs row[:-1], targets row[1:]. Documents
    are concatenated (eos between them), attention runs across them, as in OpenMoE's full_lm: no
    padding. E.g. seq_len 4: [a b eos c d e ...] → inputs [a b eos c], targets [b eos c d]."""
    while len(row := np.fromiter(itertools.islice(tokens, seq_len + 1), np.int32)) == seq_len + 1:
        yield {"inputs": row[:-1], "targets": row[1:], "loss_mask": np.ones(seq_len, np.float32),
               "segment_ids": np.ones(seq_len, np.int32), "positions": np.arange(seq_len, dtype=np.int32)}


def decoder_row(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Pack (inputs, targets) examples into one decoder row, as seqio's DecoderFeatureConverter:
    each example is the sequence inputs+targets, its decoder inputs shifted right by one with the
    start token 0, loss on targets only, its own segment id and positions from 0; zeros pad."""
    row, end = {name: np.zeros(seq_len, dtype) for name, dtype in ROW_DTYPES.items()}, 0
    for segment, (inputs, targets) in enumerate(examples, start=1):
        sequence = np.concatenate([inputs, targets])
        start, end = end, end + len(sequence)
        row["targets"][start:end] = sequence
        row["inputs"][start + 1:end] = sequence[:-1]
        row["loss_mask"][start + len(inputs):end] = 1.0
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(len(sequence))
    return row


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of ROW_DTYPES arrays → one batch of arrays [B, L]."""
    return {name: np.stack([row[name] for row in rows]) for name in ROW_DTYPES}


def mixture_sources(mixture: str, process_index: int = 0, process_count: int = 1) -> dict:
    """This host's share of every source of a named mixture (hub sources stream; errors early)."""
    names = sorted(mixture_probabilities(mixture))
    if not set(names) <= {"text", "code", "instructions"}:
        return {name: load_hub_source(name, process_index=process_index, process_count=process_count)
                for name in names}
    return {name: (instruction_corpus("train") if name == "instructions" else embedded_corpus("train")[name])
            .shard(process_count, process_index) for name in names}


def validation_batches(tokenizer: Tokenizer, seq_len: int, rows: int, count: int) -> dict[str, list]:
    """Up to `count` held-out next-token batches of `rows` rows per domain (text, code), from the
    embedded corpus' validation split; a domain without one full batch is left out."""
    batches = {}
    for domain, ds in embedded_corpus("validation").items():
        flat = list(itertools.islice(pack_lm_rows(token_stream(iter(ds["text"]), tokenizer), seq_len),
                                     rows * count))
        batches[domain] = [stack_rows(flat[i:i + rows]) for i in range(0, len(flat) - rows + 1, rows)]
    return {domain: domain_batches for domain, domain_batches in batches.items() if domain_batches}


# --- Self-test: build the corpus, train a tokenizer, show it working, check the round trips. ------
if __name__ == "__main__":
    parser = cli.ArgumentParser(description=(
        "Build the embedded text+code corpus and instruction chats, train (or load from cache) a small "
        "umT5-style SentencePiece tokenizer, print worked examples and tokens per byte, check round trips."))
    parser.add_argument("--cache-dir", default=None, help="where trained tokenizers are cached "
                        "(default: $OPENMOE_CACHE_DIR or .cache/ beside this file)")
    args = parser.parse_args()
    datasets.disable_progress_bars()

    # 1. The corpus (text, code, instruction chats; split by file), the tokenizer (cached).
    start = time.time()
    train, validation = ({**embedded_corpus(split), "instructions": instruction_corpus(split)}
                         for split in ("train", "validation"))
    tokenizer = embedded_tokenizer(args.cache_dir)
    print(f"Corpus and tokenizer ready in {time.time() - start:.1f} s (from Python's own files). "
          f"Tokens per byte, the measure of the paper's Table 10, on held-out documents:\n"
          f"  {'source':13}{'train docs':>11}{'val docs':>10}{'train MB':>10}{'tokens/byte':>13}")
    for source in train:
        megabytes, sample = sum(map(len, train[source]["text"])) / 1e6, validation[source]["text"][:200]
        print(f"  {source:13}{len(train[source]):>11,}{len(validation[source]):>10,}{megabytes:>10.1f}"
              f"{tokenizer.tokens_per_byte(sample):>13.3f}")
        if [tokenizer.decode(ids) for ids in tokenizer.encode_batch(sample)] != sample:
            sys.exit(f"self-test FAILED: a held-out {source} document does not round-trip")
    ids = lambda corpus: {i for name in ("text", "code") for i in corpus[name]["id"]}
    if leaked := ids(train) & ids(validation):
        sys.exit(f"self-test FAILED: {len(leaked)} files are in both splits, e.g. {min(leaked)}")
    chats = train["instructions"]["text"]
    print("An instruction pair as a chat:\n" + next((c for c in chats if "`os.walk`" in c), chats[0]))

    # 2. A mixture draws each document's source by its rate, as seqio did (here §5's warm-up).
    rates = mixture_probabilities("embedded-instructions")
    first, p = mix(train, rates, seed=0).select(range(3000))["source"], rates["text"]
    print(f"\nMixture 'embedded-instructions': first 8 draws {first[:8]}; "
          f"text share of 3000 draws = {first.count('text') / 3000:.3f} (expected {p:.3f})")
    if abs(first.count("text") / 3000 - p) >= 4 * math.sqrt(p * (1 - p) / 3000):
        sys.exit(f"self-test FAILED: the text share is more than 4 standard errors from {p:.3f}")

    # 3. T5's id layout, and worked examples: a sentence, a line of code, text the corpus never saw.
    print(f"\nTokenizer {tokenizer.path}: {tokenizer.piece_count:,} pieces + {tokenizer.num_extra_ids} "
          f"sentinels -> {tokenizer.vocab_size:,} embedding rows (a multiple of 128)\n  "
          f"pad={tokenizer.pad_id} eos={tokenizer.eos_id} unk={tokenizer.unk_id}  "
          f"<extra_id_0>={tokenizer.sentinel_id(0)}  <extra_id_299>={tokenizer.sentinel_id(299)}")
    if ((tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) != (0, 1, 2) or tokenizer.vocab_size % 128
            or tokenizer.decode([tokenizer.sentinel_id(0)]) != "<extra_id_0>"):
        sys.exit("self-test FAILED: the ids are not T5's layout (pad 0, eos 1, unk 2, sentinels on top)")
    for label, text in [("sentence", "The quick brown fox jumps over the lazy dog."),
                        ("code", "    for key, value in sorted(items.items()):\n"),
                        ("unseen", "東京は晴れ 🙂")]:
        ids = tokenizer.encode(text)
        print(f"\n  {label}: {text!r}\n    pieces {tokenizer.pieces(text)}\n    ids    {ids}")
        if tokenizer.decode(ids) != text or tokenizer.unk_id in ids:
            sys.exit(f"self-test FAILED: {text!r} does not round-trip without <unk>")
    print("  (unseen characters fall back to their UTF-8 bytes, <0xE6> ..., never to <unk>)\n\n"
          "All round trips exact, no <unk>: OK")
