"""Every saved tokenizer is a real transformers tokenizer with exactly attnfree's ids."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2Config

from attnfree.data import ByteTokenizer, TextTokenizer, load_saved_tokenizer, load_tokenizer

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "Café – naïve ‘quotes’ 日本 🎭 \u00a0nbsp",
    "tabs\tand\r\nCRLF and a NUL \x00 and DEL \x7f",
    "  leading and trailing spaces  ",
    "<|eos|><|bos|><|pad|><|endoftext|> special tokens as text",
    "",
]


def _random_texts(n: int = 50, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [range(32, 127), range(0, 32), range(0xA0, 0x250), range(0x3040, 0x30FF), range(0x1F300, 0x1F5FF)]
    return ["".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def _same_ids(ours: TextTokenizer, folder: Path, texts: list[str]) -> None:
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert len(hf) == ours.vocab_size
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_token_id, ours.bos_token_id,
                                                                   ours.eos_token_id)
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text


def test_the_byte_tokenizer_saves_as_a_transformers_tokenizer_with_its_ids(tmp_path: Path) -> None:
    ours = ByteTokenizer()
    ours.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    _same_ids(ours, tmp_path, TEXTS + _random_texts())
    assert isinstance(load_saved_tokenizer(tmp_path), ByteTokenizer)


def test_beside_a_gpt2_config_the_byte_tokenizer_is_not_an_empty_gpt2_one(tmp_path: Path) -> None:
    """The GPT-2 baseline's byte checkpoint: AutoTokenizer must not build a vocabulary-less GPT-2 tokenizer."""
    GPT2Config(vocab_size=259, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == 259 and hf.encode("ROMEO:", add_special_tokens=False) == list(b"ROMEO:")


@pytest.mark.parametrize("spec", ["bpe:400", "gpt2"])
def test_bpe_tokenizers_round_trip_through_transformers(spec: str, data_dir: Path, tmp_path: Path) -> None:
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:50_000]
    ours = load_tokenizer(spec, train_text=text, data_dir=data_dir)
    ours.save(tmp_path)
    _same_ids(ours, tmp_path, TEXTS[:4] + _random_texts(20))
    assert load_saved_tokenizer(tmp_path).encode(TEXTS[1]) == ours.encode(TEXTS[1])
