"""The files the presets need: from a local data bundle, from the download cache, or fetched and checked.

A preset names its files by their path inside the bundle (e.g. ``wikitext-2-raw/wiki.test.raw``). ``bundle_file``
finds one in this order:

1. an explicit bundle folder (the ``data_dir`` argument, else ``$ATTNFREE_DATA``): authoritative, it must hold
   the file (no silent fallback to somewhere else);
2. a ``shared/data`` folder beside the working directory or beside any folder above this package, if it holds
   the file (a checkout next to the project's data bundle);
3. the download cache, ``$ATTNFREE_CACHE/data/<path>`` (default ``~/.cache/attnfree/data``), if its sha256 is right;
4. a download from the file's public source (``SOURCES``; or ``$ATTNFREE_MIRROR/<path>`` when set), checked
   against the known sha256 before it is stored in the cache. A corrupted or altered download is refused and
   nothing is kept; offline, the error says which file is missing and how to provide it.

Tiny Shakespeare, the text of ``make demo`` and of the tests, ships inside the package (``packaged_text``), so a
clone with nothing beside it runs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DATA_ENV = "ATTNFREE_DATA"  # a data bundle folder
CACHE_ENV = "ATTNFREE_CACHE"  # the cache folder (tokens, downloads)
MIRROR_ENV = "ATTNFREE_MIRROR"  # a base URL serving the bundle's layout, tried instead of the public sources
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Source:
    """Where a bundle file comes from: its sha256, and a URL (of the file, or of a zip holding it as ``member``)."""

    sha256: str
    url: str | None  # None: no public source (the file was assembled for the bundle)
    member: str | None = None  # path inside the zip at ``url``
    note: str = ""


WIKITEXT2_ZIP = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"  # Merity et al.'s own release of WikiText-2

SOURCES: dict[str, Source] = {
    "tinyshakespeare/input.txt": Source(
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
    "wikitext-2-raw/wiki.valid.raw": Source(
        "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7", WIKITEXT2_ZIP,
        "wikitext-2-raw/wiki.valid.raw"),
    "wikitext-2-raw/wiki.test.raw": Source(
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", WIKITEXT2_ZIP,
        "wikitext-2-raw/wiki.test.raw"),
    # OpenAI's GPT-2 byte-level BPE: merges.txt is their vocab.bpe byte for byte; vocab.json as the Hub serves it
    "tokenizers/gpt2/merges.txt": Source(
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"),
    "tokenizers/gpt2/vocab.json": Source(
        "03087853bc70c618b66e7c7a43e787d2db4c469416beac9a483e53dad1f72f27",
        "https://huggingface.co/openai-community/gpt2/resolve/main/vocab.json"),
    "shakespeare/complete-works.txt": Source(
        "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387", None,
        note="42 Project Gutenberg plays and poems concatenated for the project's bundle; no public copy of this "
             "exact file exists, so pass --data-dir (or $ATTNFREE_DATA) pointing at a bundle that holds it"),
}

PACKAGED = {"tinyshakespeare/input.txt": "tinyshakespeare.txt.gz"}  # bundle path -> gzip inside attnfree.data


class FetchError(FileNotFoundError):
    """A bundle file that is neither local nor cached and could not be fetched (offline, or a bad download)."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_cache_dir() -> Path:
    """``$ATTNFREE_CACHE``, else ``~/.cache/attnfree``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "attnfree")).expanduser()


def packaged_text(relative: str) -> str:
    """A bundle file that ships inside the package (``PACKAGED``), checked against its sha256, as text."""
    if relative not in PACKAGED:
        raise KeyError(f"{relative} is not shipped with attnfree; shipped: {', '.join(PACKAGED)}")
    data = gzip.decompress(resources.files("attnfree.data").joinpath(PACKAGED[relative]).read_bytes())
    if sha256_of(data) != SOURCES[relative].sha256:
        raise ValueError(f"the packaged copy of {relative} is damaged (sha256 mismatch): reinstall attnfree")
    return data.decode("utf-8")


# ----------------------------------------------------------------------------------------------
# 1-2: local bundles
# ----------------------------------------------------------------------------------------------


def explicit_data_dir(path: str | Path | None = None) -> Path | None:
    """The bundle folder the caller named (``path``, else ``$ATTNFREE_DATA``), which must exist; None if unnamed."""
    named = path if path is not None else os.environ.get(DATA_ENV)
    if named is None:
        return None
    where = Path(named).expanduser()
    if not where.is_dir():
        source = "argument" if path is not None else f"${DATA_ENV}"
        raise FileNotFoundError(f"data directory {where} (from {source}) does not exist")
    return where


def sibling_bundles() -> list[Path]:
    """``shared/data`` beside the working directory and beside every folder above this package, where present."""
    candidates = [Path.cwd().parent / "shared" / "data"]
    candidates += [parent / "shared" / "data" for parent in Path(__file__).resolve().parents]
    return [c for c in dict.fromkeys(candidates) if c.is_dir()]


def resolve_data_dir(path: str | Path | None = None) -> Path:
    """A local data bundle folder: the explicit one, else the first sibling bundle (FileNotFoundError if none)."""
    explicit = explicit_data_dir(path)
    if explicit is not None:
        return explicit
    found = sibling_bundles()
    if not found:
        raise FileNotFoundError(f"no data bundle found; set ${DATA_ENV} or pass a path (looked for a shared/data "
                                f"folder beside {Path.cwd()} and beside the folders above the attnfree package)")
    return found[0]


# ----------------------------------------------------------------------------------------------
# 3-4: the cache and the download
# ----------------------------------------------------------------------------------------------


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (http(s) URLs from SOURCES)
            return bytes(response.read())
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise FetchError(f"could not download {url} ({reason})") from None


def fetch(relative: str, source: Source, cache_dir: Path) -> Path:
    """Download one bundle file from ``$ATTNFREE_MIRROR`` or its source, check its sha256, store it in the cache."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        data = _download(mirror.rstrip("/") + "/" + relative)
        origin = f"{mirror} (${MIRROR_ENV})"
    elif source.url is None:
        raise FetchError(f"{relative} is not in a local data bundle and has no public source: {source.note}")
    else:
        data = _download(source.url)
        origin = source.url
        if source.member is not None:
            try:
                data = zipfile.ZipFile(io.BytesIO(data)).read(source.member)
            except (zipfile.BadZipFile, KeyError) as err:
                raise FetchError(f"{source.url} is not a zip holding {source.member} ({err})") from None
    got = sha256_of(data)
    if got != source.sha256:
        raise FetchError(f"refusing {relative} downloaded from {origin}: sha256 {got} is not the expected "
                         f"{source.sha256} (a damaged or altered file); nothing was stored")
    target = cache_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".partial") as tmp:
        tmp.write(data)
    os.replace(tmp.name, target)  # atomic: a concurrent reader never sees half a file
    return target


def bundle_file(relative: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local path of bundle file ``relative``, fetching it into the cache if needed (see the module docstring)."""
    explicit = explicit_data_dir(data_dir)
    if explicit is not None:  # 1. authoritative
        if not (explicit / relative).is_file():
            raise FileNotFoundError(f"{relative} not found in the data directory {explicit}")
        return explicit / relative
    for bundle in sibling_bundles():  # 2.
        if (bundle / relative).is_file():
            return bundle / relative
    if relative not in SOURCES:
        raise FileNotFoundError(f"{relative} is in no local data bundle and attnfree knows no source for it")
    source = SOURCES[relative]
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "data"
    cached = cache / relative
    if cached.is_file() and sha256_of(cached.read_bytes()) == source.sha256:  # 3.
        return cached
    try:  # 4.
        return fetch(relative, source, cache)
    except FetchError as err:
        raise FetchError(f"{relative} is in no local data bundle nor the cache, and fetching it failed: {err}. "
                         f"Provide it instead: --data-dir or ${DATA_ENV} pointing at a data bundle, or "
                         f"${MIRROR_ENV} at a server with the bundle's layout") from None
