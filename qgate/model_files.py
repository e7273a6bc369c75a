"""Checks that a checkpoint's files are what they claim to be, before anything is loaded or converted:
a GGUF file's header, metadata and tensor table parse, its tensors lie inside the file and its
architecture is one transformers reads; a safetensors file's header parses and its tensors fill the
file exactly. Each problem is one QgateError naming the file. Reads headers only (milliseconds).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from qgate.errors import QgateError

_GGUF_MAGIC = b"GGUF"
# GGUF metadata value types (gguf.GGUFValueType): fixed sizes; 8 = string, 9 = array
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size

    def read(self, n: int) -> bytes:
        if n < 0 or self.fh.tell() + n > self.size:
            raise _Truncated
        return self.fh.read(n)

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> bytes:
        return self.read(self.u64())

    def skip_value(self, kind: int) -> None:
        if kind in _GGUF_FIXED:
            self.fh.seek(self._advance(_GGUF_FIXED[kind]))
        elif kind == _GGUF_STRING:
            self.string()
        elif kind == _GGUF_ARRAY:
            inner, count = self.u32(), self.u64()
            if inner in _GGUF_FIXED:
                self.fh.seek(self._advance(_GGUF_FIXED[inner] * count))
            else:
                for _ in range(count):
                    self.skip_value(inner)
        else:
            raise ValueError(f"unknown metadata value type {kind}")

    def _advance(self, n: int) -> int:
        end = self.fh.tell() + n
        if end > self.size:
            raise _Truncated
        return end


def check_gguf(path: str | os.PathLike) -> str:
    """Parse a GGUF file's header and tensor table; returns its architecture. QgateError when it is not a
    GGUF file, is cut short, or holds an architecture transformers cannot load."""
    from gguf.constants import GGML_QUANT_SIZES

    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            r = _Reader(fh, size)
            if r.read(4) != _GGUF_MAGIC:
                raise QgateError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
            version = r.u32()
            if version not in (2, 3):
                raise QgateError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
            n_tensors, n_kv = r.u64(), r.u64()
            arch, alignment = None, 32
            for _ in range(n_kv):
                key, kind = r.string(), r.u32()
                if key == b"general.architecture" and kind == _GGUF_STRING:
                    arch = r.string().decode("utf-8", "replace")
                elif key == b"general.alignment" and kind == 4:
                    alignment = r.u32()
                else:
                    r.skip_value(kind)
            extents = []
            for _ in range(n_tensors):
                r.string()
                dims = [r.u64() for _ in range(r.u32())]
                ggml_type, offset = r.u32(), r.u64()
                if ggml_type not in GGML_QUANT_SIZES:
                    raise QgateError(f"{path}: tensor of unknown GGML type {ggml_type}; not a GGUF file qgate can read")
                block, type_size = GGML_QUANT_SIZES[ggml_type]
                count = 1
                for d in dims:
                    count *= d
                extents.append(offset + count // block * type_size)
            data_start = -(-fh.tell() // alignment) * alignment
    except _Truncated:
        raise QgateError(f"{path}: truncated GGUF file (its header ends past the file's {size} bytes)") from None
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise QgateError(f"{path}: malformed GGUF header ({exc})") from None
    needed = data_start + max(extents) if extents else 0
    if needed > size:
        raise QgateError(f"{path}: truncated GGUF file ({size} bytes; its tensors need {needed})")
    if arch is None:
        raise QgateError(f"{path}: GGUF file without general.architecture; not a model qgate can load")
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if arch not in GGUF_CONFIG_MAPPING:
        known = ", ".join(sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer")))
        raise QgateError(f"{path}: GGUF architecture {arch!r} is not one transformers loads (known: {known})")
    return arch


def check_safetensors(path: str | os.PathLike) -> None:
    """A safetensors file: 8-byte header length, a JSON header, tensors filling the rest exactly."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise QgateError(f"{path}: not a readable safetensors file ({exc})") from None
    if 8 + n + end != size:
        raise QgateError(f"{path}: truncated or padded safetensors file ({size} bytes; its header describes "
                         f"{8 + n + end})")


def check_model_dir(directory: str | os.PathLike) -> None:
    """config.json parses as a JSON object and every *.safetensors file of the folder is whole."""
    directory = Path(directory)
    config = directory / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QgateError(f"{config}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise QgateError(f"{config}: expected a transformers config with a model_type")
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors(weights)
