from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnfree.data import (
    CORPORA,
    BlockDataset,
    ByteTokenizer,
    RandomWindowDataset,
    TextTokenizer,
    default_cache_dir,
    load_corpus,
    load_tokenizer,
    resolve_data_dir,
    tokenize_cached,
)

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\nCafé – naïve ‘quotes’ 日本 🎭\n"


# ---------------------------------------------------------------------------- data dir


def test_resolve_data_dir_prefers_argument_then_env(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ATTNFREE_DATA", str(tmp_path))
    assert resolve_data_dir(data_dir) == data_dir
    assert resolve_data_dir() == tmp_path


def test_resolve_data_dir_falls_back_to_the_repo_sibling(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ATTNFREE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # ../shared/data from here does not exist
    assert resolve_data_dir().resolve() == data_dir.resolve()


@pytest.mark.parametrize("via_env", [False, True], ids=["argument", "env"])
def test_resolve_data_dir_names_the_missing_place(tmp_path: Path, monkeypatch, via_env: bool) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("ATTNFREE_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_data_dir(None if via_env else missing)


# ---------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def gpt2(data_dir: Path) -> TextTokenizer:
    return load_tokenizer("gpt2", data_dir=data_dir)


@pytest.fixture(scope="module")
def bpe(data_dir: Path) -> TextTokenizer:
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    return load_tokenizer("bpe:400", train_text=text)


def test_byte_tokenizer_round_trip_and_specials() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == len(tok) == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and max(ids) < 256
    assert tok.decode([257, *ids, 258, 256]) == SAMPLE
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a truncated UTF-8 sequence decodes with a replacement


def test_gpt2_tokenizer_has_the_real_vocabulary(gpt2: TextTokenizer) -> None:
    assert gpt2.vocab_size == len(gpt2) == 50257
    assert gpt2.pad_token_id == gpt2.bos_token_id == gpt2.eos_token_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]  # OpenAI's ids (tiktoken r50k_base)
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.decode(gpt2.encode(SAMPLE)) == SAMPLE


def test_bpe_tokenizer_trains_to_the_requested_size(bpe: TextTokenizer) -> None:
    assert bpe.name == "bpe:400" and bpe.vocab_size == 400
    assert (bpe.pad_token_id, bpe.eos_token_id, bpe.bos_token_id) == (0, 1, 1)
    ids = bpe.encode(SAMPLE)
    assert max(ids) < 400 and bpe.decode(ids) == SAMPLE
    assert len(bpe.encode("To be, or not to be")) < len("To be, or not to be")  # merges were learned


@pytest.mark.parametrize("spec", ["byte", "gpt2", "bpe"])
def test_saved_tokenizer_reloads_to_identical_ids(
    spec: str, gpt2: TextTokenizer, bpe: TextTokenizer, tmp_path: Path
) -> None:
    tok = {"byte": ByteTokenizer(), "gpt2": gpt2, "bpe": bpe}[spec]
    tok.save(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert (again.name, again.vocab_size, again.fingerprint) == (tok.name, tok.vocab_size, tok.fingerprint)
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )


def test_transformers_tokenizer_directory_loads_offline(
    data_dir: Path,
    gpt2: TextTokenizer,
    tmp_path: Path,
) -> None:
    import json

    from transformers import GPT2Tokenizer

    folder = data_dir / "tokenizers" / "gpt2"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]  # skip "#version"
    merges = [tuple(line.split(" ")) for line in lines if line]
    # merges must be pairs at run time, whatever the annotation (list[str]) says
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(str(tmp_path))  # type: ignore[arg-type]
    hf = load_tokenizer(str(tmp_path))
    assert hf.vocab_size == 50257 and hf.eos_token_id == 50256
    assert hf.encode(SAMPLE) == gpt2.encode(SAMPLE)  # transformers and tokenizers agree on every id
    assert hf.decode(hf.encode(SAMPLE)) == SAMPLE


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("sentencepiece", {}, "valid: byte, gpt2, bpe:N"),
        ("bpe", {}, "valid: byte, gpt2, bpe:N"),
        ("bpe:lots", {"train_text": "abc"}, "integer"),
        ("bpe:100", {"train_text": "abc"}, ">= 258"),
        ("bpe:300", {}, "train_text"),
    ],
    ids=["unknown", "bpe-without-size", "bpe-not-int", "bpe-too-small", "bpe-without-text"],
)
def test_bad_tokenizer_specs(spec: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_tokenizer(spec, **kwargs)


# ---------------------------------------------------------------------------- corpora


def test_tinyshakespeare_is_split_exactly_as_nanogpt(data_dir: Path) -> None:
    data = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    n = len(data)
    corpus = load_corpus("tinyshakespeare", data_dir)
    assert corpus.train_text == data[: int(n * 0.9)] and corpus.valid_text == data[int(n * 0.9) :]
    assert (len(corpus.train_text), len(corpus.valid_text)) == (1_003_854, 111_540)
    assert "90%" in corpus.protocol


def test_wikitext2_offline_trains_on_valid_and_says_so(data_dir: Path) -> None:
    corpus = load_corpus("wikitext2-offline", data_dir)
    raw = data_dir / "wikitext-2-raw"
    assert corpus.train_text.encode("utf-8") == (raw / "wiki.valid.raw").read_bytes()
    assert corpus.valid_text.encode("utf-8") == (raw / "wiki.test.raw").read_bytes()
    assert "validation split" in corpus.protocol and "test split" in corpus.protocol
    assert "not comparable" in corpus.protocol


def test_shakespeare_holds_out_the_last_5_percent(data_dir: Path) -> None:
    corpus = load_corpus("shakespeare", data_dir)
    n = len(corpus.train_text) + len(corpus.valid_text)
    assert len(corpus.train_text) == int(n * 0.95)


def test_local_file_pair_and_folder(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("abcdefghij" * 10, encoding="utf-8")
    corpus = load_corpus(str(one))
    assert (len(corpus.train_text), len(corpus.valid_text)) == (90, 10)
    (tmp_path / "valid.txt").write_text("held out\n", encoding="utf-8")
    pair = load_corpus(f"{one},{tmp_path / 'valid.txt'}")
    assert pair.train_text == "abcdefghij" * 10 and pair.valid_text == "held out\n"
    folder = tmp_path / "books"
    folder.mkdir()
    for name, text in [("b.txt", "second\n"), ("a.txt", "first"), ("c.md", "ignored")]:
        (folder / name).write_text(text * 20, encoding="utf-8")
    whole = load_corpus(str(folder))
    assert whole.train_text + whole.valid_text == "first" * 20 + "\n" + "second\n" * 20


def test_corpus_errors_are_one_line_and_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(b"plain ascii then caf\xe9")
    (tmp_path / "no_text").mkdir()
    cases = [
        (str(tmp_path / "missing.txt"), FileNotFoundError, "missing.txt"),
        (str(tmp_path / "empty.txt"), ValueError, "empty.txt is empty"),
        (str(tmp_path / "latin1.txt"), ValueError, "latin1.txt is not valid UTF-8 at byte offset 20"),
        ("tinyshakespear", ValueError, "unknown corpus 'tinyshakespear'; valid: tinyshakespeare"),
        (str(tmp_path / "no_text"), FileNotFoundError, "no_text contains no .txt files"),
    ]
    for spec, error, match in cases:
        with pytest.raises(error, match=match) as info:
            load_corpus(spec)
        assert "\n" not in str(info.value)


def test_hf_dataset_rows_are_joined_into_text(monkeypatch) -> None:
    import datasets

    def fake_load_dataset(path: str, name: str | None = None) -> datasets.DatasetDict:
        assert (path, name) == ("wikitext", "wikitext-2-raw-v1")
        rows = {"train": [" = A = \n", "\n", " text \n"], "validation": [" b \n"], "test": [" c \n"]}
        return datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in rows.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("wikitext-2-raw-v1")
    assert (corpus.train_text, corpus.valid_text) == (" = A = \n\n text \n", " b \n")
    assert "validation split" in corpus.protocol


def test_hf_dataset_offline_says_pass_local_files() -> None:
    with pytest.raises(ValueError, match="pass local files") as info:
        load_corpus("hf:attnfree-test/no-such-dataset:none")
    assert "\n" not in str(info.value)


def test_presets_table_lists_the_bundle_files(data_dir: Path) -> None:
    for preset in CORPORA.values():
        assert (data_dir / preset.train_file).is_file()


# ---------------------------------------------------------------------------- token cache


class CountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return super().encode(text)


def test_tokenize_cached_encodes_once(tmp_path: Path, monkeypatch) -> None:
    tok = CountingTokenizer()
    first = tokenize_cached(SAMPLE, tok, tmp_path)
    assert tok.calls == 1 and first.dtype == torch.long and first.tolist() == tok.encode(SAMPLE)

    def refuse(text: str) -> list[int]:
        raise AssertionError("re-tokenized a cached text")

    monkeypatch.setattr(tok, "encode", refuse)
    assert torch.equal(tokenize_cached(SAMPLE, tok, tmp_path), first)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_tokenize_cached_keys_on_text_and_tokenizer(bpe: TextTokenizer, tmp_path: Path) -> None:
    byte_ids = tokenize_cached(SAMPLE, ByteTokenizer(), tmp_path)
    bpe_ids = tokenize_cached(SAMPLE, bpe, tmp_path)
    other = tokenize_cached(SAMPLE + "!", ByteTokenizer(), tmp_path)
    assert bpe_ids.tolist() == bpe.encode(SAMPLE) and byte_ids.numel() > bpe_ids.numel()
    assert other.numel() == byte_ids.numel() + 1
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ATTNFREE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    tokenize_cached("hello", ByteTokenizer())
    assert len(list((tmp_path / "c").glob("tokens-*.npy"))) == 1


# ---------------------------------------------------------------------------- datasets

TOKENS = torch.arange(103)  # awkward length: 103 = 6 blocks of 16 + 7


def test_random_windows_are_deterministic_slices() -> None:
    ds = RandomWindowDataset(TOKENS, block_size=16, num_samples=50, seed=3)
    again = RandomWindowDataset(TOKENS, block_size=16, num_samples=50, seed=3)
    other = RandomWindowDataset(TOKENS, block_size=16, num_samples=50, seed=4)
    assert len(ds) == 50
    starts = []
    for i in range(len(ds)):
        item = ds[i]
        start = int(item["input_ids"][0])
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (16,)
        assert torch.equal(item["input_ids"], TOKENS[start : start + 16])
        assert torch.equal(item["labels"], item["input_ids"])
        assert 0 <= start < 103 - 16  # the token after the window exists (nanoGPT's range)
        assert torch.equal(again[i]["input_ids"], item["input_ids"])
        starts.append(start)
    assert len(set(starts)) > 10
    assert [int(other[i]["input_ids"][0]) for i in range(50)] != starts
    assert torch.equal(ds[7]["input_ids"], ds[7]["input_ids"])  # order of access does not matter


def test_blocks_are_contiguous_and_drop_the_partial_tail() -> None:
    ds = BlockDataset(TOKENS, block_size=16)
    assert len(ds) == 6
    assert torch.equal(torch.cat([ds[i]["input_ids"] for i in range(len(ds))]), TOKENS[:96])
    assert torch.equal(ds[5]["labels"], TOKENS[80:96])
    with pytest.raises(IndexError):
        ds[6]


@pytest.mark.parametrize(
    "block_size, n_tokens, match",
    [(0, 10, "block_size must be >= 1"), (16, 16, "needs at least 17")],
    ids=["zero-block", "too-short"],
)
@pytest.mark.parametrize("cls", [BlockDataset, RandomWindowDataset], ids=["blocks", "random"])
def test_datasets_validate_sizes(cls, block_size: int, n_tokens: int, match: str) -> None:
    args = (torch.arange(n_tokens), block_size) + ((4,) if cls is RandomWindowDataset else ())
    with pytest.raises(ValueError, match=match):
        cls(*args)


def test_dataset_items_collate_for_trainer(data_dir: Path, tmp_path: Path) -> None:
    from transformers import default_data_collator

    corpus = load_corpus("tinyshakespeare", data_dir)
    tokens = tokenize_cached(corpus.valid_text, ByteTokenizer(), tmp_path)
    batch = default_data_collator([BlockDataset(tokens, 64)[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    assert ByteTokenizer().decode(batch["input_ids"][0].tolist()) == corpus.valid_text[:64]
