"""Corpora: a training text and a held-out text, from a preset, a local file or folder, or a Hugging Face dataset.

Presets name files of the data bundle (``attnfree.data.fetch``): read locally where a bundle is, fetched and
checked otherwise; Tiny Shakespeare ships with the package. Hugging Face dataset names go through
``datasets.load_dataset`` and fail with a one-line hint when offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnfree.data.fetch import PACKAGED, bundle_file, packaged_text


@dataclass(frozen=True)
class Corpus:
    """A training text and a held-out text, with a plain sentence saying how they were split."""

    train_text: str
    valid_text: str
    name: str
    protocol: str


@dataclass(frozen=True)
class _Preset:
    train_file: str  # its path in the data bundle (attnfree.data.fetch.SOURCES)
    valid_file: str | None  # None: hold out the tail of train_file
    train_fraction: float
    protocol: str


CORPORA: dict[str, _Preset] = {
    "tinyshakespeare": _Preset(
        "tinyshakespeare/input.txt",
        None,
        0.9,
        "Tiny Shakespeare, nanoGPT split: first 90% of characters train, last 10% validation",  # ships with attnfree
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


def preset_text(relative: str, data_dir: str | Path | None = None) -> str:
    """A preset's file: the packaged copy where attnfree ships one, else the bundle's (local, cached or fetched)."""
    if relative in PACKAGED:
        return packaged_text(relative)
    return read_text(bundle_file(relative, data_dir))


def _load_preset(name: str, data_dir: str | Path | None) -> Corpus:
    preset = CORPORA[name]
    train = preset_text(preset.train_file, data_dir)
    if preset.valid_file is not None:
        return Corpus(train, preset_text(preset.valid_file, data_dir), name, preset.protocol)
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
        valid = ", ".join([*CORPORA, *HF_DATASETS, "hf:NAME[:CONFIG]", "a path"])
        raise ValueError(f"unknown corpus {spec!r}; valid: {valid}")
    protocol = f"{what}: first 90% of characters train, last 10% validation"
    return Corpus(*split_tail(text, 0.9), spec, protocol)


def load_corpus(spec: str, data_dir: str | Path | None = None) -> Corpus:
    """Load a corpus by preset name (``CORPORA``), Hugging Face name (``HF_DATASETS`` or
    ``hf:NAME[:CONFIG]``), a text file (last 10% held out), ``train.txt,valid.txt``, or a folder."""
    if spec in CORPORA:
        return _load_preset(spec, data_dir)
    if spec in HF_DATASETS:
        return load_hf_corpus(*HF_DATASETS[spec])
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return load_hf_corpus(name, config or None)
    return _load_local(spec)
