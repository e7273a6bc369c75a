"""Tile shapes of the triton kernels, per GPU model: a built-in table, a measured sweep, a cache.

The best tile (blocks per program, warps, rows per program) differs between GPUs: on an H100 the
NVFP4 block pass runs at copy speed with 128 blocks and 4 warps, on an H200 the same tile leaves 15%
on the table. So every kernel takes its tile from a config chosen per device name:

    1. $QGATE_CACHE/triton-tiles.json, written by a measured sweep on that GPU
       (``python bench/kernels.py --sweep``), under the device's name;
    2. else the built-in table below (sweeps run on those GPUs);
    3. else DEFAULT.

Results never depend on the tile: every reduction that sets a scale is an exact integer maximum of
float bit patterns (a block's amax within one tile row, a row's amax over its column tiles, the
tensor's amax through an atomic max), and a block of 16 or 32 always lies whole inside one tile. A
tile changes only how fast the same bits are produced; tests/test_triton_backend.py runs every
config of SPACE through Triton's interpreter against the reference.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from qgate.files import cache_root, write_atomic

CACHE_NAME = "triton-tiles.json"

# kernel -> its tile parameters. R: blocks per program; ROWS/BLOCK_K: rows per program and columns per
# step of the per-row (fp8_channel) kernel; BLOCK/TILES: the tensor-amax pass of NVFP4 and fp8;
# HALVES (NVFP4, 0 when absent): each block loaded as its two halves, one thread per block.
DEFAULT: dict[str, dict[str, int]] = {
    "mx": {"R": 64, "num_warps": 4},
    "mx_rceil": {"R": 64, "num_warps": 4},
    "nvfp4": {"R": 128, "num_warps": 4},
    "amax": {"BLOCK": 4096, "TILES": 8, "num_warps": 8},
    "fp8_row": {"ROWS": 1, "BLOCK_K": 4096, "num_warps": 8},
}

# Measured sweeps (bench/NOTES-kernels.md). Missing kernels fall back to DEFAULT.
KNOWN: dict[str, dict[str, dict[str, int]]] = {
    "NVIDIA H100 80GB HBM3": {},  # DEFAULT was chosen on it
    # bench/kernels.py --sweep of 2026-12-01 with the leaner NVFP4/fp8 kernels (every config bit-identical):
    # MX 100.9%, RCEIL 100.8%, NVFP4 block pass 96.5% (half tiles), fp8_channel 94.8% (row held whole) of
    # copy; amax: DEFAULT was fastest
    "NVIDIA H200": {"mx": {"R": 32, "num_warps": 2}, "mx_rceil": {"R": 64, "num_warps": 2},
                    "nvfp4": {"R": 64, "num_warps": 2, "HALVES": 1},
                    "fp8_row": {"ROWS": 1, "BLOCK_K": 4096, "num_warps": 2}},
}


def _space() -> dict[str, list[dict[str, int]]]:
    blocks = [{"R": r, "num_warps": w} for r, w in itertools.product((32, 64, 128, 256), (2, 4, 8))]
    rows = [{"ROWS": r, "BLOCK_K": k, "num_warps": w}
            for (r, k), w in itertools.product(((1, 2048), (1, 4096), (2, 1024), (2, 2048), (2, 4096),
                                                (4, 1024), (4, 2048)), (4, 8, 16))]
    # rows of K <= 4096 held whole in registers (one load for the amax and the quantization): 32 or 64
    # values per thread, the counts that compile without spilling on sm_90 (128 per thread spill)
    rows += [{"ROWS": 1, "BLOCK_K": 4096, "num_warps": 2}, {"ROWS": 4, "BLOCK_K": 4096, "num_warps": 8},
             {"ROWS": 4, "BLOCK_K": 4096, "num_warps": 16}]
    amax = [{"BLOCK": b, "TILES": t, "num_warps": w}
            for b, t, w in ((4096, 8, 8), (4096, 4, 8), (2048, 8, 4), (4096, 16, 8), (8192, 4, 16), (2048, 16, 8))]
    # NVFP4 with each block loaded as two half tiles, so that one thread holds a whole block (HALVES)
    halves = [{"R": r, "num_warps": w, "HALVES": 1} for r, w in itertools.product((64, 128, 256), (2, 4))]
    return {"mx": blocks, "mx_rceil": blocks, "nvfp4": blocks + halves, "amax": amax, "fp8_row": rows}


# every config a sweep may choose (and that the interpreter test covers)
SPACE: dict[str, list[dict[str, int]]] = _space()

_resolved: dict[str, dict[str, dict[str, int]]] = {}  # device name -> configs, once per process


def cache_path():
    return cache_root() / CACHE_NAME


def _read_cache() -> dict[str, Any]:
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid(kernel: str, cfg: Any) -> bool:
    """A cached entry is used only if it is a config of SPACE (an edited or stale file cannot pick
    a tile no test has covered)."""
    return kernel in SPACE and cfg in SPACE[kernel]


def configs_for(device_name: str | None) -> dict[str, dict[str, int]]:
    """kernel -> tile config for the GPU called ``device_name`` (None: the interpreter, DEFAULT)."""
    key = device_name or ""
    if key not in _resolved:
        out = {k: dict(v) for k, v in DEFAULT.items()}
        if device_name:
            out.update({k: dict(v) for k, v in KNOWN.get(device_name, {}).items()})
            cached = _read_cache().get(device_name, {}).get("configs", {})
            out.update({k: dict(v) for k, v in cached.items() if _valid(k, v)})
        _resolved[key] = out
    return _resolved[key]


def source_of(device_name: str | None) -> str:
    """Where the configs of ``device_name`` come from, for a benchmark's header."""
    if device_name and _read_cache().get(device_name):
        return f"sweep cached in {cache_path()}"
    if device_name in KNOWN:
        return "built-in table"
    return "defaults"


def save_sweep(device_name: str, configs: dict[str, dict[str, int]], measured: dict[str, Any]) -> None:
    """Record a sweep's choice for ``device_name`` (other devices' entries are kept)."""
    bad = [k for k, v in configs.items() if not _valid(k, v)]
    if bad:
        raise ValueError(f"configs outside the tuning space: {bad}")
    data = _read_cache()
    data[device_name] = {"configs": configs, "measured": measured}
    write_atomic(cache_path(), json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o644)
    _resolved.pop(device_name, None)
