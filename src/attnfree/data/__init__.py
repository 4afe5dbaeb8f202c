"""Data: corpora and presets, tokenizers, the token cache and training windows, and the bundle files' fetching.

- ``corpora``: ``load_corpus`` (presets, local files and folders, Hugging Face datasets) -> ``Corpus``
- ``tokenization``: ``TextTokenizer`` (byte, BPE, any transformers tokenizer), ``load_tokenizer`` by spec
- ``windows``: ``tokenize_cached`` and the torch datasets for ``transformers.Trainer``
- ``fetch``: where the bundle files come from (local bundle, cache, or a checked download)
"""

from attnfree.data.corpora import CORPORA, HF_DATASETS, Corpus, load_corpus, load_hf_corpus, read_text, split_tail
from attnfree.data.fetch import (
    CACHE_ENV,
    DATA_ENV,
    MIRROR_ENV,
    FetchError,
    bundle_file,
    default_cache_dir,
    resolve_data_dir,
)
from attnfree.data.tokenization import (
    META_FILE,
    TOKENIZERS,
    BPETokenizer,
    ByteTokenizer,
    PretrainedTokenizer,
    TextTokenizer,
    gpt2_tokenizer,
    load_saved_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)
from attnfree.data.windows import BlockDataset, RandomWindowDataset, tokenize_cached

__all__ = [
    "CACHE_ENV", "DATA_ENV", "HF_DATASETS", "META_FILE", "MIRROR_ENV", "CORPORA", "TOKENIZERS", "BPETokenizer",
    "BlockDataset", "ByteTokenizer", "Corpus", "FetchError", "PretrainedTokenizer", "RandomWindowDataset",
    "TextTokenizer", "bundle_file", "default_cache_dir", "gpt2_tokenizer", "load_corpus", "load_hf_corpus",
    "load_saved_tokenizer", "load_tokenizer", "read_text", "resolve_data_dir", "split_tail", "tokenize_cached",
    "train_bpe_tokenizer",
]
