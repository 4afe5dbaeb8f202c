"""Corpora, tokenizers, token caching and the torch datasets that feed ``transformers.Trainer``.

Data flows text -> ``TextTokenizer.encode`` -> 1-D token tensor (cached as ``.npy``) -> windows
``{"input_ids": [T], "labels": [T]}``. Labels equal the inputs: the model shifts them internally,
as GPT-2 does. Glossary: B batch, T time (sequence), V vocabulary.

Offline by design: the presets read the shared data bundle (see ``resolve_data_dir``); Hugging Face
dataset names go through ``datasets.load_dataset`` and fail with a one-line hint when offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

DATA_ENV = "ATTNFREE_DATA"
CACHE_ENV = "ATTNFREE_CACHE"
META_FILE = "attnfree_tokenizer.json"  # our marker inside a saved tokenizer directory


# ----------------------------------------------------------------------------------------------
# Where the data bundle lives
# ----------------------------------------------------------------------------------------------


def resolve_data_dir(path: str | Path | None = None) -> Path:
    """Find the data bundle: ``path``, else ``$ATTNFREE_DATA``, else ``../shared/data`` from the
    working directory, else a ``shared/data`` folder beside any ancestor of this file (the repo's
    sibling). An explicit path or the environment variable is authoritative: if it is missing we
    say so rather than silently falling back."""
    explicit = path if path is not None else os.environ.get(DATA_ENV)
    if explicit is not None:
        where = Path(explicit).expanduser()
        if not where.is_dir():
            source = "argument" if path is not None else f"${DATA_ENV}"
            raise FileNotFoundError(f"data directory {where} (from {source}) does not exist")
        return where
    candidates = [Path.cwd().parent / "shared" / "data"]
    candidates += [parent / "shared" / "data" for parent in Path(__file__).resolve().parents]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"data bundle not found; set ${DATA_ENV} or pass a path (looked in: {looked})")


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


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


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes are ids 0..255; pad, bos, eos are 256, 257, 258 (V = 259)."""

    def __init__(self) -> None:
        self.name = "byte"
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
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
        from transformers import PreTrainedTokenizerFast

        names = self.special_tokens
        hf = PreTrainedTokenizerFast(
            tokenizer_object=self.backend,
            pad_token=names["pad"],
            bos_token=names["bos"],
            eos_token=names["eos"],
        )
        hf.save_pretrained(str(directory))
        self.backend.save(str(Path(directory) / "tokenizer.json"))  # exactly our backend, byte for byte
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

    folder = resolve_data_dir(data_dir) / "tokenizers" / "gpt2"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for file in (vocab, merges):
        if not file.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file {file} not found")
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


# ----------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A training text and a held-out text, with a plain sentence saying how they were split."""

    train_text: str
    valid_text: str
    name: str
    protocol: str


@dataclass(frozen=True)
class _Preset:
    train_file: str  # relative to the data bundle
    valid_file: str | None  # None: hold out the tail of train_file
    train_fraction: float
    protocol: str


PRESETS: dict[str, _Preset] = {
    "tinyshakespeare": _Preset(
        "tinyshakespeare/input.txt",
        None,
        0.9,
        "Tiny Shakespeare, nanoGPT split: first 90% of characters train, last 10% validation",
    ),
    "wikitext2-offline": _Preset(
        "wikitext-2-raw/wiki.valid.raw",
        "wikitext-2-raw/wiki.test.raw",
        1.0,
        "WikiText-2 raw, OFFLINE protocol: trained on the official validation split (wiki.valid.raw), "
        "evaluated on the official test split (wiki.test.raw); the official train split was unavailable, "
        "so numbers are not comparable to published WikiText-2 results",
    ),
    "shakespeare": _Preset(
        "shakespeare/complete-works.txt",
        None,
        0.95,
        "Complete works of Shakespeare (Gutenberg): first 95% of characters train, last 5% validation",
    ),
}

# short names -> (Hugging Face dataset path, config)
HF_DATASETS: dict[str, tuple[str, str | None]] = {
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
    "tiny_shakespeare": ("tiny_shakespeare", None),
}


def read_text(path: str | Path) -> str:
    """Read a UTF-8 file exactly (no newline translation). One-line errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text file {file} not found")
    data = file.read_bytes()
    if not data:
        raise ValueError(f"text file {file} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {file} is not valid UTF-8 at byte offset {err.start}") from None


def split_tail(text: str, train_fraction: float) -> tuple[str, str]:
    """Character split as nanoGPT does it: ``train = text[:int(n * train_fraction)]``, the rest held out."""
    cut = int(len(text) * train_fraction)
    if cut == 0 or cut == len(text):
        raise ValueError(f"text of {len(text)} characters is too short to hold out {1 - train_fraction:.0%}")
    return text[:cut], text[cut:]


def _load_preset(name: str, data_dir: str | Path | None) -> Corpus:
    preset, root = PRESETS[name], resolve_data_dir(data_dir)
    train = read_text(root / preset.train_file)
    if preset.valid_file is not None:
        return Corpus(train, read_text(root / preset.valid_file), name, preset.protocol)
    return Corpus(*split_tail(train, preset.train_fraction), name, preset.protocol)


def _join_rows(rows: Sequence[str]) -> str:
    """Rows that carry their own newlines (WikiText lines) are concatenated; others joined by '\\n'."""
    return "".join(rows) if all(r.endswith("\n") for r in rows) else "\n".join(rows)


def load_hf_corpus(path: str, config: str | None = None, text_column: str = "text") -> Corpus:
    """Load a Hugging Face dataset's ``train`` and ``validation`` (else ``test``) splits as text."""
    label = path if config is None else f"{path}:{config}"
    try:
        import datasets

        splits = datasets.load_dataset(path, config)
    except Exception as err:  # offline, unknown name, gated ... : one actionable line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(
            f"could not load Hugging Face dataset {label!r} ({reason}); "
            "offline? pass local files instead: a .txt file, 'train.txt,valid.txt', or a folder of .txt"
        ) from err
    valid_split = "validation" if "validation" in splits else "test"
    if "train" not in splits or valid_split not in splits:
        raise ValueError(f"dataset {label!r} needs train and validation/test splits, has {list(splits)}")
    texts = [_join_rows(splits[s][text_column]) for s in ("train", valid_split)]
    protocol = f"Hugging Face dataset {label}: train split for training, {valid_split} split for evaluation"
    return Corpus(texts[0], texts[1], label, protocol)


def _read_folder(folder: Path) -> str:
    """Concatenate the folder's ``*.txt`` in sorted name order (a newline added where one is missing)."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"folder {folder} contains no .txt files")
    texts = [read_text(f) for f in files]
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts[:-1]) + texts[-1]


def _load_local(spec: str) -> Corpus:
    if "," in spec:
        train_file, valid_file = (s.strip() for s in spec.split(",", 1))
        protocol = f"train on {train_file}, evaluate on {valid_file}"
        return Corpus(read_text(train_file), read_text(valid_file), spec, protocol)
    where = Path(spec).expanduser()
    if where.is_dir():
        text, what = _read_folder(where), f"the .txt files of {where} concatenated in sorted order"
    elif where.is_file() or where.suffix or os.sep in spec:
        text, what = read_text(where), str(where)
    else:
        valid = ", ".join([*PRESETS, *HF_DATASETS, "hf:NAME[:CONFIG]", "a path"])
        raise ValueError(f"unknown corpus {spec!r}; valid: {valid}")
    protocol = f"{what}: first 90% of characters train, last 10% validation"
    return Corpus(*split_tail(text, 0.9), spec, protocol)


def load_corpus(spec: str, data_dir: str | Path | None = None) -> Corpus:
    """Load a corpus by preset name (``PRESETS``), Hugging Face name (``HF_DATASETS`` or
    ``hf:NAME[:CONFIG]``), a text file (last 10% held out), ``train.txt,valid.txt``, or a folder."""
    if spec in PRESETS:
        return _load_preset(spec, data_dir)
    if spec in HF_DATASETS:
        return load_hf_corpus(*HF_DATASETS[spec])
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return load_hf_corpus(name, config or None)
    return _load_local(spec)


# ----------------------------------------------------------------------------------------------
# Token cache
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$ATTNFREE_CACHE``, else ``~/.cache/attnfree``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "attnfree")).expanduser()


def tokenize_cached(text: str, tokenizer: TextTokenizer, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Tokens of ``text`` as an int64 tensor [T], read from / written to ``cache_dir`` as int32 .npy.

    The key is sha256 over the text and the tokenizer's ``fingerprint`` (for BPE, a hash of its whole
    serialisation: vocabulary and merges), so a retrained tokenizer never reads stale ids.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{tokenizer.fingerprint}\n".encode() + text.encode("utf-8")).hexdigest()
    file = folder / f"tokens-{key[:40]}.npy"
    if file.is_file():
        return torch.from_numpy(np.load(file).astype(np.int64))
    ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{file.stem}.{os.getpid()}.partial.npy"
    np.save(partial, ids)
    os.replace(partial, file)  # atomic: a concurrent reader never sees half a file
    return torch.from_numpy(ids.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Torch datasets for Trainer
# ----------------------------------------------------------------------------------------------


def _as_tokens(tokens: torch.Tensor | Sequence[int], block_size: int) -> torch.Tensor:
    data = torch.as_tensor(tokens, dtype=torch.long)
    if data.dim() != 1:
        raise ValueError(f"tokens must be 1-D [T], got shape {tuple(data.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if data.numel() < block_size + 1:
        need = block_size + 1
        raise ValueError(f"text has {data.numel()} tokens; block_size {block_size} needs at least {need}")
    return data


def _example(window: torch.Tensor) -> dict[str, torch.Tensor]:
    window = window.clone()
    return {"input_ids": window, "labels": window.clone()}


class RandomWindowDataset(Dataset[dict[str, torch.Tensor]]):
    """``num_samples`` windows of ``block_size`` tokens at random offsets, nanoGPT's ``get_batch``.

    Offsets are drawn in ``[0, len - block_size)`` as nanoGPT's ``torch.randint(len(data) - block_size)``
    (so the token after each window exists). Item ``i`` depends only on ``(seed, i)``: a run resumed
    at step k sees the same windows it would have seen.
    """

    def __init__(
        self,
        tokens: torch.Tensor | Sequence[int],
        block_size: int,
        num_samples: int,
        seed: int = 0,
    ) -> None:
        self.tokens = _as_tokens(tokens, block_size)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.block_size, self.num_samples, self.seed = block_size, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])  # SeedSequence: no collisions between (seed, i)
        return int(rng.integers(0, self.tokens.numel() - self.block_size))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.offset(index)
        return _example(self.tokens[start : start + self.block_size])  # [T]


class BlockDataset(Dataset[dict[str, torch.Tensor]]):
    """Non-overlapping contiguous blocks of ``block_size`` tokens, in order.

    The last partial block is dropped (training wants full-length batches); evaluation must not drop
    it, so score held-out text with ``attnfree.metrics.evaluate_bpc`` rather than this dataset.
    """

    def __init__(self, tokens: torch.Tensor | Sequence[int], block_size: int) -> None:
        self.tokens = _as_tokens(tokens, block_size)
        self.block_size = block_size

    def __len__(self) -> int:
        return self.tokens.numel() // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.block_size
        return _example(self.tokens[start : start + self.block_size])  # [T]
