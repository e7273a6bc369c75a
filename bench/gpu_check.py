"""Everything the triton backend needs checked and timed on a GPU, in one call.

    python bench/gpu_check.py --out DIR [--phase check|bench|all] [--mx-path .peers]

check: the GPU tests (tests/test_triton_backend.py, log in DIR/tests.log); bit-exactness on the
       512 MiB benchmark tensor for every format (MX against the reference on the GPU, where it is
       exact; NVFP4 and fp8 against the reference on the CPU, the contract's float32 divisions);
       whether the reference itself gives the same bits on CUDA as on the CPU.
bench: kernel variants (tile sizes, warps, division path) on the 512 MiB tensor, each checked
       bit for bit against the default; then bench/kernels.py (copy, qgate, peers) and the
       whole-model figure. The benchmark table is printed last; JSON and logs go to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import kernels as bench  # noqa: E402
from qgate.backends.reference import ReferenceBackend  # noqa: E402
from qgate.backends.triton import DIV_MARKSTEIN, DIV_RN, TritonBackend  # noqa: E402
from qgate.formats import get_format, list_formats  # noqa: E402

QUANTIZED = [f.name for f in list_formats() if not f.is_identity]
CPU_REFERENCE = {"nvfp4", "fp8", "fp8_channel"}  # formats with float32 divisions by a Python scalar


def say(msg: str, log) -> None:
    print(msg, flush=True)
    log.write(msg + "\n")
    log.flush()


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((bench._bits(a.to(b.device)) != bench._bits(b)).sum())


def big_tensor(size_mib: int = 512) -> torch.Tensor:
    torch.manual_seed(0)
    cols = 4096
    x = torch.randn(size_mib * 2**20 // (2 * cols), cols, device="cuda", dtype=torch.bfloat16)
    # a spread of magnitudes across rows, and a few outliers, so block and tensor scales vary
    x *= torch.logspace(-3, 3, x.shape[0], device="cuda", dtype=torch.float32).to(torch.bfloat16).unsqueeze(1)
    x[::4097, 7] *= 40
    return x


def phase_check(out: Path, log) -> dict:
    summary: dict = {}
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(out / "tests.log", "w") as tlog:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                             "tests/test_triton_backend.py"], cwd=REPO, env=env, stdout=tlog,
                            stderr=subprocess.STDOUT).returncode
    tail = (out / "tests.log").read_text().strip().splitlines()
    summary["pytest"] = {"rc": rc, "summary": tail[-1] if tail else "", "seconds": round(time.perf_counter() - t0, 1)}
    say(f"pytest tests/test_triton_backend.py: rc={rc} {summary['pytest']['summary']}", log)
    if rc != 0:
        for line in tail[-40:]:
            say("  " + line, log)

    x = big_tensor()
    x_cpu = x.cpu()
    ref = ReferenceBackend()
    tri = TritonBackend()
    full = {}
    for name in QUANTIZED:
        fmt = get_format(name)
        t1 = time.perf_counter()
        got = []
        for poison in (float("nan"), -3.0e38):
            o = torch.full_like(x, poison)
            tri.fake_quantize(x, fmt, out=o)
            got.append(o)
        want_gpu = ref.fake_quantize(x, fmt)
        entry = {"elements": x.numel()}
        if name in CPU_REFERENCE:
            want_cpu = ref.fake_quantize(x_cpu, fmt)
            entry["vs_reference_cpu"] = max(differing(g.cpu(), want_cpu) for g in got)
            entry["reference_cuda_vs_cpu"] = differing(want_gpu.cpu(), want_cpu)
            del want_cpu
        else:
            entry["vs_reference_cuda"] = max(differing(g, want_gpu) for g in got)
        entry["seconds"] = round(time.perf_counter() - t1, 1)
        full[name] = entry
        say(f"512 MiB bit-exactness {name}: {entry}", log)
        del got, want_gpu
        torch.cuda.empty_cache()
    summary["full_tensor"] = full
    return summary


def variants(x: torch.Tensor, log) -> list[dict]:
    """Tile shapes, warps and division paths, each checked against the default's bits."""
    rows = []
    default = TritonBackend()
    plan = []
    for r, w in ((64, 4), (32, 4), (64, 8), (128, 4)):
        plan.append(("mxfp4", dict(mx_blocks_per_program=r, num_warps=w)))
        plan.append(("mxfp8_e4m3", dict(mx_blocks_per_program=r, num_warps=w)))
    for dm in (DIV_RN, DIV_MARKSTEIN):
        for rev in (False, True):
            plan.append(("nvfp4", dict(nvfp4_blocks_per_program=128, num_warps=4, div_mode=dm, l2_reverse=rev)))
    for rev in (False, True):
        plan.append(("fp8", dict(div_mode=DIV_MARKSTEIN, l2_reverse=rev)))
    for w in (4, 8, 16):
        for dm in (DIV_RN, DIV_MARKSTEIN):
            plan.append(("fp8_channel", dict(row_warps=w, div_mode=dm)))
    nbytes = 2 * x.numel() * x.element_size()
    want = {}
    out = torch.empty_like(x)
    for name, kw in plan:
        fmt = get_format(name)
        if name not in want:
            want[name] = default.fake_quantize(x, fmt)
        b = TritonBackend(**kw)
        out.fill_(float("nan"))
        b.fake_quantize(x, fmt, out=out)
        diff = differing(out, want[name])
        ms = bench.time_ms(lambda: b.fake_quantize(x, fmt, out=out), 150)
        row = {"format": name, **kw, "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6), "differing": diff}
        rows.append(row)
        say(f"variant {row}", log)
    return rows


def phase_bench(out: Path, log, mx_path: str | None, model: bool, deadline: float) -> dict:
    summary: dict = {}
    x = big_tensor()
    summary["variants"] = variants(x, log)
    del x
    torch.cuda.empty_cache()
    res = bench.run(512, None, True, mx_path, deadline=deadline - 100)
    (out / "bench_table.txt").write_text(bench.format_table(res) + "\n")
    say(bench.format_table(res), log)  # in the log now, in case the model figure runs out of time
    if model and time.monotonic() > deadline - 100:
        say("model figure skipped: not enough time left in this call", log)
    elif model:
        try:
            res.model = bench.model_figure()
        except Exception as exc:  # noqa: BLE001 - the kernel table still matters without it
            say(f"model figure failed: {type(exc).__name__}: {exc}", log)
    (out / "bench.json").write_text(json.dumps(bench.to_json(res), indent=2))
    summary["table"] = bench.format_table(res)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    ap.add_argument("--phase", choices=("check", "bench", "all"), default="all")
    ap.add_argument("--mx-path", default=None)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting slow peers after this")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"gpu_check_{args.phase}.log", "w") as log:
        say(f"device: {bench.device_line()}; {bench.software_line()}", log)
        summary = {}
        if args.phase in ("check", "all"):
            summary["check"] = phase_check(out, log)
        if args.phase in ("bench", "all"):
            summary["bench"] = phase_bench(out, log, args.mx_path, not args.no_model, deadline)
        (out / f"summary_{args.phase}.json").write_text(json.dumps(summary, indent=2, default=str))
        if "bench" in summary:
            say("", log)
            say("kernel variants (ms, GB/s, differing elements vs default):", log)
            for v in summary["bench"]["variants"]:
                keys = {k: v[k] for k in v if k not in ("format", "ms", "gbps", "differing")}
                say(f"  {v['format']:12s} {keys}  {v['ms']:.3f} ms  {v['gbps']} GB/s  diff={v['differing']}", log)
            say("", log)
            say(summary["bench"]["table"], log)
        if "check" in summary:
            c = summary["check"]
            say(f"tests: {c['pytest']['summary']} (rc {c['pytest']['rc']})", log)
            for name, e in c["full_tensor"].items():
                say(f"  512 MiB {name:12s} {e}", log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
