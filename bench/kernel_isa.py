"""Instruction counts of the triton kernels for sm_90 (H100/H200), compiled without a GPU.

Each kernel is compiled the way the backend launches it on the benchmark tensor (bf16 [65536, 4096],
the tiles of the built-in H200 table unless --tiles says otherwise), through triton's own host code:
a stand-in driver reports an sm_90 target and every launch only compiles. The PTX comes from
triton.compile, the SASS from the bundled cuobjdump. Printed per kernel: PTX instructions and SASS
instructions in the kernel body (static counts), the SASS instructions one thread runs on the common
path (every forward conditional branch taken: the rare slow paths of IEEE divisions and the 2^80 lift
of tiny scales jumped over), the values each thread handles, the registers per thread, and the count
of a few instruction classes. A loop body (fp8_channel over several column steps) is counted once.
Needs triton (3.6.0 gave the counts in bench/NOTES-kernels.md); no GPU, no CUDA driver.

    python bench/kernel_isa.py [--json out.json] [--dump DIR] [--tiles '{"nvfp4": {"R": 64, "num_warps": 2}}']
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROWS, COLS = 65536, 4096
HALVES = {"R": 128, "num_warps": 2, "HALVES": 1}  # the NVFP4 variant with one thread per block, also counted
# SASS opcode classes worth watching (the part of the opcode before the first dot)
CLASSES = {"fp32 mul/add/fma": ("FMUL", "FADD", "FFMA", "FMNMX"), "int/logic": ("LOP3", "IADD3", "IMAD", "SHF",
           "LEA", "IMNMX", "ISETP", "SEL", "FSEL", "FSETP", "PRMT", "F2F", "MUFU"), "memory": ("LDG", "STG", "LDS", "STS"),
           "branch": ("BRA", "BSSY", "BSYNC", "EXIT")}


class _CompileOnlyDriver:
    """Just enough of triton's CUDA driver to compile for sm_90 on a machine without one."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _capture_compiles():
    """Make every `kernel[grid](...)` compile (warm-up mode) and record the compiled kernel by name."""
    from triton.runtime.jit import JITFunction

    compiled: dict[str, object] = {}
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled[self.fn.__name__] = kernel
        return kernel

    JITFunction.run = run
    return compiled


def _cuobjdump(cubin: bytes, flag: str) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def _sass(cubin: bytes) -> str:
    return _cuobjdump(cubin, "-sass")


def registers(cubin: bytes) -> tuple[int, int]:
    """Registers per thread and stack bytes (non-zero: spilled) of the kernel."""
    usage = _cuobjdump(cubin, "-res-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def ptx_instructions(ptx: str) -> list[str]:
    """The instruction lines of the .entry body (no directives, labels, braces or comments)."""
    body = ptx[ptx.index(".entry"):]
    body = body[body.index("{") + 1:]
    out = []
    for line in body.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".", "$", "{", "}", ")", "(")) or s.endswith(":"):
            continue
        out.append(s)
    return out


def sass_instructions(sass: str) -> list[str]:
    """Opcodes of the SASS listing (the trailing NOP padding left out)."""
    ops = []
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass):
        ops.append(m.group(2))
    while ops and ops[-1] == "NOP":
        ops.pop()
    return ops


def sass_listing(sass: str) -> list[tuple[int, str, str]]:
    """(address, predicate, instruction text) of each SASS instruction."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][^;]*);", sass):
        out.append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3).strip()))
    return out


def common_path(sass: str) -> tuple[int, list[int]]:
    """Instructions executed per thread when every forward conditional branch is taken, up to EXIT.

    In these kernels every such branch jumps over a rare case: the slow path of an IEEE division
    (a call for subnormal or huge operands) or the multiply by 2^80 of a tensor with a tiny scale.
    Returns the count and the sizes of the blocks jumped over."""
    listing = sass_listing(sass)
    index = {addr: i for i, (addr, _, _) in enumerate(listing)}
    i, count, skipped = 0, 0, []
    while i < len(listing):
        addr, pred, text = listing[i]
        count += 1
        op = text.split()[0]
        if op == "EXIT" and not pred:
            break
        target = re.match(r"BRA\s+(?:!?U?P\w+,\s*)?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) > addr:
            j = index[int(target.group(1), 16)]
            skipped.append(j - i - 1)
            i = j
            continue
        i += 1
    return count, skipped


def compile_all(tiles: dict | None = None) -> dict[str, dict]:
    """kernel name -> its PTX, SASS opcodes and tile, each compiled as the backend launches it."""
    from triton.runtime.driver import driver

    driver.set_active(_CompileOnlyDriver())
    compiled = _capture_compiles()
    from qgate.backends.triton import TritonBackend
    from qgate.backends.triton_tuning import KNOWN
    from qgate.formats import get_format

    tiles = tiles if tiles is not None else KNOWN["NVIDIA H200"]
    b = TritonBackend(tiles=tiles)
    x = torch.empty(ROWS, COLS, dtype=torch.bfloat16)  # never read: only shapes, dtypes and alignment matter
    out = torch.empty_like(x)
    amax = torch.zeros(1, dtype=torch.int32)
    runs = {
        "_mx_kernel": lambda: b._mx(x, out, COLS, get_format("mxfp4").element, 32),
        "_mx_kernel (rceil)": lambda: b._mx(x, out, COLS, get_format("mxfp4_rceil").element, 32, rceil=True),
        "_amax_finite_kernel": lambda: b.tensor_amax_bits(x),
        "_nvfp4_kernel": lambda: b._nvfp4(x, out, COLS, 16, amax),
        "_nvfp4_kernel (halves)": lambda: TritonBackend(tiles=dict(tiles, nvfp4=HALVES))._nvfp4(x, out, COLS, 16, amax),
        "_fp8_tensor_kernel": lambda: b._fp8_tensor(x, out),
        "_fp8_row_kernel": lambda: b._fp8_rows(x, out, COLS),
    }
    results = {}
    for label, launch in runs.items():
        compiled.clear()
        launch()
        name = label.split()[0]
        k = compiled[name]
        results[label] = {"ptx": k.asm["ptx"], "sass": _sass(k.asm["cubin"]), "num_warps": k.metadata.num_warps,
                          "registers": registers(k.asm["cubin"])}
    return results


def values_per_thread(label: str, tiles: dict, num_warps: int) -> float:
    from qgate.backends.triton_tuning import DEFAULT

    t = {k: dict(DEFAULT[k], **tiles.get(k, {})) for k in DEFAULT}
    per_program = {"_mx_kernel": t["mx"]["R"] * 32, "_mx_kernel (rceil)": t["mx_rceil"]["R"] * 32,
                   "_amax_finite_kernel": t["amax"]["BLOCK"] * t["amax"]["TILES"], "_nvfp4_kernel": t["nvfp4"]["R"] * 16,
                   "_nvfp4_kernel (halves)": HALVES["R"] * 16,
                   "_fp8_tensor_kernel": 2048, "_fp8_row_kernel": t["fp8_row"]["ROWS"] * min(t["fp8_row"]["BLOCK_K"], COLS)}
    return per_program[label] / (32 * num_warps)


def summarize(results: dict, tiles: dict) -> dict:
    out = {}
    for label, r in results.items():
        ptx = ptx_instructions(r["ptx"])
        sass = sass_instructions(r["sass"])
        base = Counter(op.split(".")[0] for op in sass)
        common, skipped = common_path(r["sass"])
        out[label] = {"ptx_instructions": len(ptx), "sass_instructions": len(sass), "num_warps": r["num_warps"],
                      "sass_common_path": common, "sass_skipped_blocks": skipped,
                      "registers": r["registers"][0], "stack_bytes": r["registers"][1],
                      "values_per_thread": values_per_thread(label, tiles, r["num_warps"]),
                      "sass_classes": {c: sum(base[o] for o in ops) for c, ops in CLASSES.items()},
                      "ptx_float_ops": Counter(i.split()[0] for i in ptx if re.match(r"(mul|add|sub|fma|div|rcp|min|max)"
                                                                                    r"\.(rn\.)?f32", i.split()[0]))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the counts here")
    ap.add_argument("--dump", default=None, help="write each kernel's PTX and SASS into this folder")
    ap.add_argument("--tiles", default=None, help="JSON {kernel: config} (default: the built-in H200 table)")
    args = ap.parse_args(argv)
    from qgate.backends.triton_tuning import KNOWN

    tiles = json.loads(args.tiles) if args.tiles else KNOWN["NVIDIA H200"]
    results = compile_all(tiles)
    summary = summarize(results, tiles)
    print(f"{'kernel':22s} {'PTX':>5s} {'SASS':>5s} {'path':>5s} {'warps':>5s} {'values':>6s} {'path/value':>10s}"
          f" {'regs':>4s}  SASS classes (static)")
    for label, s in summary.items():
        cls = ", ".join(f"{k} {v}" for k, v in s["sass_classes"].items())
        print(f"{label:22s} {s['ptx_instructions']:5d} {s['sass_instructions']:5d} {s['sass_common_path']:5d} "
              f"{s['num_warps']:5d} {s['values_per_thread']:6.0f} {s['sass_common_path'] / s['values_per_thread']:10.1f}"
              f" {s['registers']:4d}  {cls}")
    if args.dump:
        d = Path(args.dump)
        d.mkdir(parents=True, exist_ok=True)
        for label, r in results.items():
            stem = label.replace(" ", "").replace("(", "_").replace(")", "")
            (d / f"{stem}.ptx").write_text(r["ptx"])
            (d / f"{stem}.sass").write_text(r["sass"])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=dict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
