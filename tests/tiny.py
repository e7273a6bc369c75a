"""Small real building blocks for tests: an offline byte-level tokenizer for tiny random models, a
consistent copy of a SQLite store, and a throw-away schema on a PostgreSQL server."""

from __future__ import annotations

import contextlib
import shutil
import uuid
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


@contextlib.contextmanager
def pg_schema(base_url: str, prefix: str):
    """A throw-away schema on the PostgreSQL server at ``base_url``; yields a URL whose search_path is it."""
    import sqlalchemy as sa

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base_url)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        yield f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def llmc_producer():
    """bench/llmc_produce.py as a module (it is a script, not a package): its tiny_qwen2() is the baseline
    every committed checkpoint fixture (tests/data/llmc, tests/data/modelopt) was made from."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "bench" / "llmc_produce.py"
    spec = importlib.util.spec_from_file_location("llmc_produce", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
