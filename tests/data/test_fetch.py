"""Bundle files without a bundle: the packaged Tiny Shakespeare, and downloads checked against their sha256.

The downloads come from a real HTTP server on loopback that serves the bundle's files (the machine has no
internet), reached through $ATTNFREE_MIRROR or through a source URL, including a corrupted file and a zip.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from attnfree.data import FetchError, bundle_file, load_corpus, load_tokenizer
from attnfree.data import fetch as fetch_module
from attnfree.data.fetch import SOURCES, Source, packaged_text


@pytest.fixture
def no_bundle(monkeypatch, tmp_path: Path) -> Path:
    """No local bundle anywhere (none named, none beside the checkout), and an empty cache; returns the cache."""
    monkeypatch.delenv("ATTNFREE_DATA", raising=False)
    monkeypatch.delenv("ATTNFREE_MIRROR", raising=False)
    monkeypatch.setattr(fetch_module, "sibling_bundles", lambda: [])
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTNFREE_CACHE", str(cache))
    return cache


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _serve(root: Path, data_dir: Path, *relative: str) -> None:
    for rel in relative:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, root / rel)


def test_the_packaged_tiny_shakespeare_is_the_canonical_file(data_dir: Path) -> None:
    text = packaged_text("tinyshakespeare/input.txt")
    assert text.encode("utf-8") == (data_dir / "tinyshakespeare" / "input.txt").read_bytes()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SOURCES["tinyshakespeare/input.txt"].sha256


def test_tinyshakespeare_loads_with_no_bundle_and_no_network(no_bundle: Path) -> None:
    corpus = load_corpus("tinyshakespeare")
    assert len(corpus.train_text) + len(corpus.valid_text) == 1_115_394
    assert not no_bundle.exists()  # nothing fetched


def test_the_sources_agree_with_the_bundle(data_dir: Path) -> None:
    """Every file the presets know is in the bundle with the sha256 that downloads are checked against."""
    sums = dict(reversed(line.split()) for line in (data_dir / "SHA256SUMS").read_text().splitlines() if line)
    for rel, source in SOURCES.items():
        assert sums[f"./{rel}"] == source.sha256, rel


def test_a_preset_is_fetched_through_a_mirror_checked_and_cached(no_bundle, server, data_dir, monkeypatch) -> None:
    url, root = server
    _serve(root, data_dir, "wikitext-2-raw/wiki.valid.raw", "wikitext-2-raw/wiki.test.raw")
    monkeypatch.setenv("ATTNFREE_MIRROR", url)
    corpus = load_corpus("wikitext2-offline")
    assert corpus.train_text == (data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    cached = no_bundle / "data" / "wikitext-2-raw" / "wiki.test.raw"
    assert cached.read_bytes() == (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    shutil.rmtree(root)  # the server now has nothing: the second load reads the cache
    assert load_corpus("wikitext2-offline").valid_text == corpus.valid_text


def test_the_gpt2_tokenizer_is_fetched_too(no_bundle, server, data_dir, monkeypatch) -> None:
    url, root = server
    _serve(root, data_dir, "tokenizers/gpt2/vocab.json", "tokenizers/gpt2/merges.txt")
    monkeypatch.setenv("ATTNFREE_MIRROR", url)
    assert load_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_a_corrupted_download_is_refused_and_not_kept(no_bundle, server, data_dir, monkeypatch) -> None:
    url, root = server
    _serve(root, data_dir, "wikitext-2-raw/wiki.test.raw")
    damaged = root / "wikitext-2-raw" / "wiki.test.raw"
    data = bytearray(damaged.read_bytes())
    data[1000] ^= 1  # one flipped bit
    damaged.write_bytes(bytes(data))
    monkeypatch.setenv("ATTNFREE_MIRROR", url)
    with pytest.raises(FetchError, match="sha256"):
        bundle_file("wikitext-2-raw/wiki.test.raw")
    assert not (no_bundle / "data" / "wikitext-2-raw" / "wiki.test.raw").exists()


def test_a_corrupted_cache_entry_is_fetched_again(no_bundle, server, data_dir, monkeypatch) -> None:
    url, root = server
    _serve(root, data_dir, "wikitext-2-raw/wiki.test.raw")
    bad = no_bundle / "data" / "wikitext-2-raw" / "wiki.test.raw"
    bad.parent.mkdir(parents=True)
    bad.write_text("truncated")
    monkeypatch.setenv("ATTNFREE_MIRROR", url)
    assert bundle_file("wikitext-2-raw/wiki.test.raw").read_bytes() == (data_dir / "wikitext-2-raw/wiki.test.raw"
                                                                        ).read_bytes()


def test_a_member_of_a_zip_source(no_bundle, server, data_dir, monkeypatch) -> None:
    """The WikiText-2 files come as members of one zip at their public source."""
    url, root = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for split in ("valid", "test"):
            archive.write(data_dir / "wikitext-2-raw" / f"wiki.{split}.raw", f"wikitext-2-raw/wiki.{split}.raw")
    (root / "wikitext-2-raw-v1.zip").write_bytes(buffer.getvalue())
    rel = "wikitext-2-raw/wiki.test.raw"
    monkeypatch.setitem(SOURCES, rel, Source(SOURCES[rel].sha256, f"{url}/wikitext-2-raw-v1.zip", rel))
    assert bundle_file(rel).read_bytes() == (data_dir / rel).read_bytes()


def test_offline_the_error_says_what_is_missing_and_how_to_provide_it(no_bundle, monkeypatch) -> None:
    monkeypatch.setenv("ATTNFREE_MIRROR", "http://127.0.0.1:9")  # the discard port: connection refused
    with pytest.raises(FetchError, match=r"wiki\.valid\.raw is in no local data bundle.*--data-dir"):
        load_corpus("wikitext2-offline")


def test_a_preset_without_a_public_source_says_so(no_bundle) -> None:
    with pytest.raises(FetchError, match="no public source"):
        load_corpus("shakespeare")


def test_an_explicit_bundle_is_authoritative(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"wiki\.test\.raw not found in the data directory"):
        bundle_file("wikitext-2-raw/wiki.test.raw", data_dir=tmp_path)
