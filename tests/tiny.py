"""Small real building blocks for tests: an offline byte-level tokenizer for tiny random models, and a
consistent copy of a SQLite store."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path


def byte_tokenizer():
    """Byte-level BPE with no merges (one token per byte) plus an end-of-text token: a real, offline
    tokenizer for tiny models; transformers rebuilds it as a Qwen2 tokenizer without loss."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def copy_db(src: Path, dst: Path) -> Path:
    """A copy of a SQLite store with its write-ahead log folded in first."""
    con = sqlite3.connect(src)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    shutil.copy(src, dst)
    return dst
