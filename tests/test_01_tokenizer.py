"""Tests for 01_tokenizer.py: the corpus split, mixtures, hub loading, and the tokenizer's ids."""

import dataclasses
import json
import math
import os
import shutil

import datasets
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from conftest import load

tok = load("01_tokenizer")

# A small, fast tokenizer: a few hundred thousand characters train in about a second.
SMALL = tok.TokenizerConfig(vocab_size=700, max_training_chars=300_000)
UNSEEN = ["東京は晴れ、明日は雨。", "مرحبا بالعالم", "😀🚀 naïve café ﬁ", "Ελληνικά\tτέλος\r\n",
          "한국어 텍스트", "e\u0301 combining", "  leading and trailing  ", "", "\x00\x7f control"]


@pytest.fixture(scope="module")
def corpus():
    return {split: tok.embedded_corpus(split) for split in ("train", "validation")}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return tok.train_tokenizer(corpus["train"], SMALL, cache), cache


# --- The embedded corpus ---------------------------------------------------------------------

def test_corpus_has_text_and_code_with_required_columns(corpus):
    for split in corpus.values():
        assert sorted(split) == ["code", "text"]
        for source, dataset in split.items():
            assert {"text", "source", "id"} <= set(dataset.column_names)
            assert len(dataset) > 10 and set(dataset["source"]) == {source}


def test_split_is_by_document_disjoint_and_stable(corpus):
    def documents(split):
        return {i.split("#")[0] for ds in corpus[split].values() for i in ds["id"]}

    train, validation = documents("train"), documents("validation")
    assert train and validation and not train & validation
    # The split is a pure function of the document id, so every chunk agrees with its document.
    assert all(tok.is_validation(doc) for doc in validation)
    assert not any(tok.is_validation(doc) for doc in train)
    share = len(validation) / (len(train) + len(validation))
    assert abs(share - tok.VALIDATION_FRACTION) < 0.03


def test_code_half_skips_test_suites(corpus):
    ids = [i for split in corpus.values() for i in split["code"]["id"]]
    assert any(i.startswith("stdlib/json/") for i in ids)
    assert not any("/test/" in i or "/tests/" in i or "idle_test" in i for i in ids)


@pytest.mark.parametrize("max_chars", [1, 7, 64, tok.MAX_DOCUMENT_CHARS])
def test_chunks_restore_the_document_and_respect_the_limit(max_chars):
    document = "para one\n\npara two is longer\nwith lines\n\n" + "x" * 150 + "\n\nend"
    chunks = tok.split_into_chunks(document, max_chars)
    assert "".join(chunks) == document
    assert all(0 < len(chunk) <= max_chars for chunk in chunks)


def test_undecodable_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.py").write_text('"""A module docstring."""\nx = 1\n')
    (tmp_path / "latin1.py").write_bytes(b"# caf\xe9\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helper.py").write_text("y = 2\n")
    (tmp_path / "test_skipped.py").write_text("z = 3\n")
    files, undecodable = tok.python_files(tmp_path)
    assert [path for path, _ in files] == ["good.py"] and undecodable == 1
    assert tok.docstrings(files[0][1]) == ["A module docstring."]


def test_bad_split_name_is_a_clear_error():
    with pytest.raises(ValueError, match="'test'.*'train' or 'validation'"):
        tok.embedded_corpus("test")


# --- Mixtures -------------------------------------------------------------------------------

def _constant_source(name, size):
    return datasets.Dataset.from_dict({"text": [f"{name}{i}" for i in range(size)],
                                       "source": [name] * size})


def test_mixture_proportions_match_within_sampling_error():
    sources = {"a": _constant_source("a", 5000), "b": _constant_source("b", 5000)}
    mixed = tok.mix(sources, {"a": 0.7, "b": 0.3}, seed=3, stopping_strategy="first_exhausted")
    draws = mixed.select(range(4000))["source"]
    expected, sigma = 0.7, math.sqrt(0.7 * 0.3 / 4000)
    assert abs(draws.count("a") / 4000 - expected) < 4 * sigma


def test_mixture_is_deterministic_given_seed():
    sources = {"a": _constant_source("a", 300), "b": _constant_source("b", 300)}
    draw = lambda seed: tok.mix(sources, {"a": 0.5, "b": 0.5}, seed=seed)["text"][:200]
    assert draw(0) == draw(0) and draw(0) != draw(1)


@pytest.mark.parametrize("probabilities, message", [
    ({"a": 0.5}, "one probability per source"),
    ({"a": 0.5, "b": 0.5, "c": 0.0}, "one probability per source"),
    ({"a": 0.6, "b": 0.6}, "sum to 1"),
    ({"a": 1.5, "b": -0.5}, "non-negative"),
])
def test_bad_mixture_probabilities_are_clear_errors(probabilities, message):
    sources = {"a": _constant_source("a", 5), "b": _constant_source("b", 5)}
    with pytest.raises(ValueError, match=message):
        tok.mix(sources, probabilities)


def test_named_mixtures_have_openmoe_code_shares():
    # Code = The Stack + RedPajama's GitHub subset; shares from the paper's Table 1 / seqio rates.
    def code_share(name):
        p = tok.mixture_probabilities(name)
        assert math.isclose(sum(p.values()), 1.0)
        return p["the_stack_dedup"] + p["redpajama_github"]

    assert math.isclose(code_share("openmoe_v1"), 0.5225)
    assert math.isclose(code_share("openmoe_v2"), 0.15)
    assert math.isclose(code_share("openmoe_v3"), 0.35)
    assert all(name in tok.HUB_SOURCES for mix in ("openmoe_v1", "openmoe_v2", "openmoe_v3")
               for name in tok.MIXTURES[mix])
    with pytest.raises(ValueError, match="unknown mixture 'nope'"):
        tok.mixture_probabilities("nope")



def test_section_5_mixtures_have_their_code_shares():
    code30 = tok.mixture_probabilities("embedded-code30")
    assert math.isclose(code30["code"], 0.3) and math.isclose(code30["text"], 0.7)
    warmup = tok.mixture_probabilities("embedded-instructions")
    assert sorted(warmup) == ["code", "instructions", "text"]
    assert math.isclose(warmup["text"], 1 / 14) and math.isclose(warmup["instructions"], 12 / 14)
    sources = tok.mixture_sources("embedded-instructions")
    assert sorted(sources) == ["code", "instructions", "text"]
    assert sources["instructions"][0]["source"] == "instructions"
    assert sorted(tok.mixture_sources("embedded-code30")) == ["code", "text"]


# --- Instruction pairs: chats from the standard library --------------------------------------

STDLIB_LIKE = {
    "shapes.py": '"""Shapes."""\n\ndef area(w, h):\n    """Multiply.\n\n    More words."""\n'
                 '    return w * h\n\n\ndef _hidden():\n    """Private."""\n\n\n@staticmethod\n'
                 'def decorated():\n    """Decorated."""\n\n\ndef long(x):\n    """Long."""\n'
                 + "    x += 1\n" * 12 + "    return x\n",
    "pkg/__init__.py": "def helper():\n    return 1\n",
    "_private.py": 'def visible():\n    """Never asked: its module is private."""\n',
    "broken.py": "def (:\n",
}


def test_instruction_pairs_ask_what_a_function_does_and_for_short_code(tmp_path):
    for relative, source in STDLIB_LIKE.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    pairs = {split: tok.instruction_pairs(split, str(tmp_path)) for split in ("train", "validation")}
    # Each file's pairs are in its own split, as the corpus splits it (by the file's id).
    every = pairs["train"] + pairs["validation"]
    for split, split_pairs in pairs.items():
        for pair in split_pairs:
            module = pair["user"].split("`")[1].rsplit(".", 1)[0]
            file_id = f"stdlib/{module.replace('.', '/')}" + ("/__init__.py" if module == "pkg" else ".py")
            assert tok.is_validation(file_id) == (split == "validation")
    assert {(p["user"], p["assistant"]) for p in every} == {
        ("What does `shapes.area` do?", "Multiply."),
        ("Show me the code of `shapes.area`.", '```python\ndef area(w, h):\n    """Multiply.\n\n'
                                               '    More words."""\n    return w * h\n```'),
        ("What does `shapes.decorated` do?", "Decorated."),  # decorated: no code pair
        ("What does `shapes.long` do?", "Long."),            # 14 lines: no code pair
        ("Show me the code of `pkg.helper`.", "```python\ndef helper():\n    return 1\n```"),
    }
    assert all(set(p) == {"user", "assistant"} for p in every)
    with pytest.raises(ValueError, match="'test'.*'train' or 'validation'"):
        tok.instruction_pairs("test")


def test_instruction_corpus_is_chats_from_the_standard_library():
    corpus = tok.instruction_corpus("train")
    assert set(corpus["source"]) == {"instructions"} and {"text", "user", "assistant"} <= set(corpus.column_names)
    walk = [row for row in corpus if row["user"] == "What does `os.walk` do?"]
    assert len(walk) == 1 and walk[0]["assistant"] == "Directory tree generator."
    # The chat format is 01's one (11's chat prompts use it too): a User turn, then an Assistant turn.
    assert walk[0]["text"] == "### User:\nWhat does `os.walk` do?\n\n### Assistant:\nDirectory tree generator."
    assert tok.chat_formatted([walk[0]["user"] + "\n\n" + walk[0]["assistant"]]) == [
        walk[0]["text"] + "\n\n### Assistant:\n"]
    assert any(row["assistant"].startswith("```python\ndef ") for row in corpus)
    assert not set(corpus["user"]) & {p["user"] for p in tok.instruction_pairs("validation")}

# --- Hub sources, exercised on local files in the same schema (no network) -------------------

@pytest.fixture
def stack_like_json(tmp_path):
    path = tmp_path / "stack.jsonl"
    path.write_text("".join(json.dumps({"content": f"def f{i}(): pass\n", "lang": "python"}) + "\n"
                            for i in range(10)))
    return path


def test_hub_source_renames_column_and_labels_source(stack_like_json):
    spec = tok.HubSource("json", column="content", data_files=str(stack_like_json))
    stream = tok.load_hub_source(spec, name="the_stack_dedup")
    rows = list(stream)
    assert [row["text"] for row in rows] == [f"def f{i}(): pass\n" for i in range(10)]
    assert {row["source"] for row in rows} == {"the_stack_dedup"} and set(rows[0]) == {"text", "source"}


def test_hub_source_reads_parquet(tmp_path):
    path = tmp_path / "pages.parquet"
    datasets.Dataset.from_dict({"text": ["page one", "page two"], "url": ["a", "b"]}).to_parquet(path)
    rows = list(tok.load_hub_source(tok.HubSource("parquet", data_files=str(path)), name="c4"))
    assert [row["text"] for row in rows] == ["page one", "page two"]


def test_each_host_streams_its_own_shard(stack_like_json):
    spec = tok.HubSource("json", column="content", data_files=str(stack_like_json))
    shards = [[row["text"] for row in tok.load_hub_source(spec, process_index=i, process_count=2)]
              for i in range(2)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert len(shards[0]) + len(shards[1]) == 10


def test_hub_streams_mix_with_the_same_function(stack_like_json, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"word {i}"}) + "\n" for i in range(10)))
    sources = {"code": tok.load_hub_source(tok.HubSource("json", column="content",
                                                         data_files=str(stack_like_json)), name="code"),
               "text": tok.load_hub_source(tok.HubSource("json", data_files=str(text)), name="text")}
    rows = list(tok.mix(sources, {"code": 0.5, "text": 0.5}, seed=0))
    assert {row["source"] for row in rows} == {"code", "text"}


def test_missing_column_names_the_available_columns(stack_like_json):
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content', 'lang'\]"):
        tok.load_hub_source(tok.HubSource("json", data_files=str(stack_like_json)))


def test_unknown_hub_dataset_is_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: never touch the network
    with pytest.raises(ValueError, match="no-such-org/no-such-dataset could not be loaded"):
        tok.load_hub_source(tok.HubSource("no-such-org/no-such-dataset"))
    with pytest.raises(ValueError, match="unknown hub source 'redpajama'"):
        tok.load_hub_source("redpajama")


# --- The tokenizer --------------------------------------------------------------------------

def test_id_layout_is_t5s(trained):
    tokenizer, _ = trained
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert tokenizer.piece_count == SMALL.vocab_size
    # Sentinels count down from the top of the used ids; padding rows lie above them.
    assert tokenizer.sentinel_id(0) == SMALL.vocab_size + 300 - 1
    assert tokenizer.sentinel_id(299) == SMALL.vocab_size
    assert tokenizer.vocab_size == 1024  # 700 + 300 = 1000, rounded up to a multiple of 128
    ids = tokenizer.encode("span") + [tokenizer.sentinel_id(0)] + tokenizer.encode(" x") + [tokenizer.sentinel_id(7)]
    assert tokenizer.decode(ids) == "span<extra_id_0> x<extra_id_7>"
    assert tokenizer.encode("a", add_eos=True)[-1] == 1
    with pytest.raises(ValueError, match="sentinel index 300"):
        tokenizer.sentinel_id(300)


def test_openmoe_sizes_pad_to_256384(trained):
    # umT5's size, through the Tokenizer's own arithmetic: the small model's proto grown to
    # 256,000 real SentencePiece pieces (a second to build and load), with the default config's
    # 300 sentinels. By hand: 256,000 + 300 = 256,300 ids, and the next multiple of 128 above
    # them is 2,003 · 128 = 256,384 embedding rows.
    config = tok.TokenizerConfig()
    assert (config.vocab_size, config.num_extra_ids, config.pad_vocab_to_multiple) == (256_000, 300, 128)
    proto = sentencepiece_model_pb2.ModelProto.FromString(open(trained[0].path, "rb").read())
    for i in range(config.vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"filler{i}", -100.0 - i * 1e-6
    tokenizer = tok.Tokenizer(proto.SerializeToString(), num_extra_ids=config.num_extra_ids,
                              pad_vocab_to_multiple=config.pad_vocab_to_multiple)
    assert tokenizer.piece_count == 256_000
    assert tokenizer.vocab_size == 256_384
    assert (tokenizer.sentinel_id(0), tokenizer.sentinel_id(299)) == (256_299, 256_000)


@pytest.mark.parametrize("text", UNSEEN)
def test_unseen_unicode_round_trips_without_unk(trained, text):
    tokenizer, _ = trained
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text


def test_held_out_code_and_text_round_trip_exactly(trained, corpus):
    tokenizer, _ = trained
    for source, dataset in corpus["validation"].items():
        texts = dataset["text"][:50]
        batch = tokenizer.encode_batch(texts)
        assert batch == [tokenizer.encode(t) for t in texts]
        assert [tokenizer.decode(ids) for ids in batch] == texts
        assert 0 < tokenizer.tokens_per_byte(texts) < 1


def test_padding_row_ids_decode_as_unk_not_garbage(trained):
    tokenizer, _ = trained
    assert tokenizer.decode([tokenizer.vocab_size - 1]) == tokenizer.processor.decode([tokenizer.unk_id])


def test_second_run_loads_from_cache_without_training(trained, corpus, monkeypatch):
    tokenizer, cache = trained

    def fail(*args, **kwargs):
        raise AssertionError("retrained although a cached model exists")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", fail)
    again = tok.train_tokenizer(corpus["train"], SMALL, cache)
    assert again.path == tokenizer.path
    assert again.encode("def main():\n    return 0\n") == tokenizer.encode("def main():\n    return 0\n")


def test_truncated_cached_model_is_trained_again(trained, corpus, tmp_path, capsys):
    tokenizer, cache = trained
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    cached = next(copy.rglob("spiece.model"))
    whole = cached.read_bytes()
    cached.write_bytes(whole[:len(whole) // 2])
    again = tok.train_tokenizer(corpus["train"], SMALL, copy)
    assert "is not a valid SentencePiece model" in capsys.readouterr().err
    assert cached.read_bytes() == whole and again.path == str(cached)
    assert again.encode("def main():\n    return 0\n") == tokenizer.encode("def main():\n    return 0\n")


def test_changed_settings_get_a_new_cache_entry(trained, corpus):
    tokenizer, cache = trained
    other = tok.train_tokenizer(corpus["train"], dataclasses.replace(SMALL, vocab_size=650), cache)
    assert other.path != tokenizer.path and other.piece_count == 650
    assert os.path.exists(tokenizer.path)


def test_saved_model_file_loads_unchanged(trained, tmp_path):
    # Loading a .model file must give exactly SentencePiece's own ids (umT5's spiece.model case).
    tokenizer, _ = trained
    copy = tmp_path / "spiece.model"
    copy.write_bytes(open(tokenizer.path, "rb").read())
    loaded = tok.Tokenizer.load(copy)
    reference = spm.SentencePieceProcessor(model_file=str(copy))
    for text in UNSEEN + ["The quick brown fox.", "for i in range(10):\n\tprint(i)\n"]:
        assert loaded.encode(text) == reference.encode(text) == tokenizer.encode(text)


def test_missing_or_corrupt_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tok.Tokenizer.load(tmp_path / "missing.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        tok.Tokenizer.load(corrupt)
    assert corrupt.read_bytes() == b"this is not a protobuf"  # nothing on disk is touched


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = {"text": datasets.Dataset.from_dict({"text": [], "source": []})}
    with pytest.raises(ValueError, match="empty corpus"):
        tok.train_tokenizer(empty, SMALL, tmp_path)
    assert not any(tmp_path.iterdir())


def test_vocabulary_larger_than_corpus_supports_is_a_clear_error(tmp_path):
    tiny = {"text": datasets.Dataset.from_dict({"text": ["a tiny corpus of few words"] * 3,
                                                "source": ["text"] * 3})}
    config = dataclasses.replace(SMALL, vocab_size=5000)
    with pytest.raises(ValueError, match=r"vocab_size=5000 is larger than this corpus supports"):
        tok.train_tokenizer(tiny, config, tmp_path)
    assert not list(tmp_path.rglob("*.model"))  # nothing half-written into the cache


@pytest.mark.parametrize("field, value", [("vocab_size", 100), ("num_extra_ids", -1),
                                          ("pad_vocab_to_multiple", 0), ("model_type", "wordpiece"),
                                          ("character_coverage", 0.5), ("max_training_chars", 0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        tok.TokenizerConfig(**{field: value})
