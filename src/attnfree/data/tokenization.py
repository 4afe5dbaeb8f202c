"""Tokenizers: the one ``TextTokenizer`` interface, byte / BPE / any saved transformers tokenizer, and the
spec strings that name them (``byte``, ``gpt2``, ``bpe:N``, a folder).

Every tokenizer saves as a real transformers tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json`` with
its special tokens), so ``AutoTokenizer.from_pretrained(run_dir)``, ``pipeline(...)`` and lm-evaluation-harness load
it without attnfree; ``attnfree_tokenizer.json`` beside them tells attnfree which of its own classes to rebuild.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnfree.data.fetch import bundle_file

META_FILE = "attnfree_tokenizer.json"  # our marker inside a saved tokenizer directory

class TextTokenizer(ABC):
    """The one interface the rest of the library sees.

    ``encode`` never adds special tokens; ``decode`` skips them. ``vocab_size`` is the number of ids
    (``len(tokenizer)``), so it is the embedding size a model needs. ``fingerprint`` identifies the
    exact mapping text -> ids (it keys the token cache).
    """

    name: str
    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def save(self, directory: str | Path) -> Path: ...

    @property
    @abstractmethod
    def fingerprint(self) -> str: ...

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _write_meta(directory: str | Path, meta: dict[str, Any]) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what a byte-level ``tokenizers`` model works on)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


BYTE_SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 256, 257, 258


def byte_level_backend() -> Any:
    """A ``tokenizers.Tokenizer`` with exactly ``ByteTokenizer``'s ids: byte b -> id b, specials 256-258.

    A BPE model with the 256 byte symbols and no merges, behind a byte-level pre-tokenizer without the regex split
    (so nothing but the bytes themselves decides the ids). Special-token text inside the input is encoded as its
    bytes (``encode_special_tokens``), as ``ByteTokenizer.encode`` does.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in BYTE_SPECIALS])
    backend.encode_special_tokens = True
    return backend


def save_hf_tokenizer(backend: Any, directory: str | Path, pad: str, bos: str, eos: str,
                      split_special_tokens: bool = False) -> None:
    """Write ``backend`` as a transformers tokenizer folder (tokenizer.json, tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos,
                                 split_special_tokens=split_special_tokens)
    hf.save_pretrained(str(directory))
    backend.save(str(Path(directory) / "tokenizer.json"))  # exactly our backend, byte for byte


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes are ids 0..255; pad, bos, eos are 256, 257, 258 (V = 259).

    Encoding is a plain UTF-8 encode (fast); ``save`` also writes the same mapping as a transformers tokenizer
    (``byte_level_backend``), which the tests check id for id.
    """

    def __init__(self) -> None:
        self.name = "byte"
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        save_hf_tokenizer(byte_level_backend(), directory, *BYTE_SPECIALS, split_special_tokens=True)
        return _write_meta(directory, {"kind": "byte", "name": self.name})

    @property
    def fingerprint(self) -> str:
        return "byte-v1"


class BPETokenizer(TextTokenizer):
    """A ``tokenizers.Tokenizer`` (byte-level BPE: GPT-2's or one trained here) with named specials.

    Saved as a ``transformers``-loadable folder (``tokenizer.json`` + ``tokenizer_config.json``)
    plus our ``attnfree_tokenizer.json``, so ``AutoTokenizer.from_pretrained(dir)`` also reads it.
    """

    def __init__(self, backend: Any, name: str, pad_token: str, bos_token: str, eos_token: str) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.name = name
        self.special_tokens = {"pad": pad_token, "bos": bos_token, "eos": eos_token}
        self.pad_token_id = self._id(pad_token)
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    def _id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.name!r} has no token {token!r}")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=True))

    def save(self, directory: str | Path) -> Path:
        names = self.special_tokens
        save_hf_tokenizer(self.backend, directory, names["pad"], names["bos"], names["eos"])
        return _write_meta(directory, {"kind": "bpe", "name": self.name, "special_tokens": names})

    @property
    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()


class PretrainedTokenizer(TextTokenizer):
    """Adapter for any ``transformers`` tokenizer directory (``AutoTokenizer.from_pretrained``).

    Missing specials fall back, in order: eos <- sep; bos <- cls, eos; pad <- eos.
    """

    def __init__(self, hf: Any, name: str) -> None:
        self.hf = hf
        self.name = name
        eos = _first_id(hf.eos_token_id, hf.sep_token_id)
        bos = _first_id(hf.bos_token_id, hf.cls_token_id, eos)
        pad = _first_id(hf.pad_token_id, eos)
        if eos is None or bos is None or pad is None:
            raise ValueError(f"tokenizer {name} defines no eos/sep token; cannot mark document ends")
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad, bos, eos
        self.vocab_size = len(hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=True))

    def save(self, directory: str | Path) -> Path:
        self.hf.save_pretrained(str(directory))
        return Path(directory)

    @property
    def fingerprint(self) -> str:
        backend = getattr(self.hf, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(self.hf.get_vocab(), sort_keys=True)
        return "hf-" + hashlib.sha256(f"{type(self.hf).__name__}\n{text}".encode()).hexdigest()


def _first_id(*ids: int | None) -> int | None:
    return next((int(i) for i in ids if i is not None), None)


GPT2_EOS = "<|endoftext|>"
BPE_PAD = "<|pad|>"


def gpt2_tokenizer(data_dir: str | Path | None = None) -> BPETokenizer:
    """GPT-2's byte-level BPE from the bundle's ``tokenizers/gpt2`` (V = 50257, same ids as OpenAI's).

    Padding reuses ``<|endoftext|>`` (pad = bos = eos = 50256) rather than adding a 50258th token:
    the vocabulary then stays exactly GPT-2's, and padded positions are masked anyway (attention mask
    and labels -100), so the pad id is never learned as a prediction target. The price: with pad == eos,
    ``generate`` cannot infer the mask from the ids, so always pass ``attention_mask`` to it.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer, Tokenizer

    vocab, merges = (bundle_file(f"tokenizers/gpt2/{name}", data_dir) for name in ("vocab.json", "merges.txt"))
    folder = vocab.parent
    # Not GPT2TokenizerFast(vocab_file=...): in transformers 5 it silently builds a 1-token vocabulary.
    backend = Tokenizer.from_str(ByteLevelBPETokenizer.from_file(str(vocab), str(merges)).to_str())
    backend.add_special_tokens([AddedToken(GPT2_EOS, special=True)])
    tokenizer = BPETokenizer(backend, "gpt2", pad_token=GPT2_EOS, bos_token=GPT2_EOS, eos_token=GPT2_EOS)
    if tokenizer.vocab_size != 50257:
        raise ValueError(f"GPT-2 tokenizer from {folder} has {tokenizer.vocab_size} tokens, expected 50257")
    return tokenizer


def train_bpe_tokenizer(text: str, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids on ``text`` (specials included).

    Ids 0 and 1 are ``<|pad|>`` and ``<|endoftext|>`` (bos = eos, as in GPT-2), then the 256 byte
    symbols, then merges. A text too small to support ``vocab_size - 258`` merges gives fewer ids:
    read ``tokenizer.vocab_size``, not the request.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + 2
    if vocab_size < minimum:
        raise ValueError(f"bpe vocab_size must be >= {minimum} (256 bytes + pad + eos), got {vocab_size}")
    if not text:
        raise ValueError("cannot train a BPE tokenizer on empty text")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_PAD, GPT2_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer=trainer)
    name = f"bpe:{vocab_size}"
    return BPETokenizer(backend, name, pad_token=BPE_PAD, bos_token=GPT2_EOS, eos_token=GPT2_EOS)


def load_saved_tokenizer(directory: str | Path) -> TextTokenizer:
    """Reload a tokenizer saved by ``TextTokenizer.save``, or any ``transformers`` tokenizer folder."""
    folder = Path(directory)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        from transformers import AutoTokenizer

        return PretrainedTokenizer(AutoTokenizer.from_pretrained(str(folder)), name=str(folder))
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    names = meta["special_tokens"]
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return BPETokenizer(backend, meta["name"], names["pad"], names["bos"], names["eos"])


def _bpe_from_spec(arg: str, train_text: str | None, data_dir: str | Path | None) -> TextTokenizer:
    if not arg.isdigit():
        raise ValueError(f"bpe tokenizer spec must be 'bpe:N' with an integer N, got 'bpe:{arg}'")
    if train_text is None:
        raise ValueError("'bpe:N' trains on the training text: pass train_text")
    return train_bpe_tokenizer(train_text, int(arg))


_TokenizerBuilder = Callable[[str, str | None, str | Path | None], TextTokenizer]

# spec prefix (before ':') -> builder(argument after ':', train_text, data_dir)
TOKENIZERS: dict[str, _TokenizerBuilder] = {
    "byte": lambda arg, text, data_dir: ByteTokenizer(),
    "gpt2": lambda arg, text, data_dir: gpt2_tokenizer(data_dir),
    "bpe": _bpe_from_spec,
}


def load_tokenizer(
    spec: str,
    train_text: str | None = None,
    data_dir: str | Path | None = None,
) -> TextTokenizer:
    """Build a tokenizer from ``spec``: ``byte``, ``gpt2``, ``bpe:N`` (trained on ``train_text``), or
    a directory holding a saved tokenizer (ours or a ``transformers`` one)."""
    kind, _, arg = spec.partition(":")
    takes_arg = kind == "bpe"  # 'bpe' needs its ':N'; 'byte' and 'gpt2' take none
    if kind in TOKENIZERS and takes_arg == bool(arg):
        return TOKENIZERS[kind](arg, train_text, data_dir)
    if Path(spec).is_dir():
        return load_saved_tokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}; valid: byte, gpt2, bpe:N, or a saved tokenizer directory")

