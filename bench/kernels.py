"""Kernel benchmark: qgate's triton backend against a device-to-device copy and the peers.

One run on one GPU times, on a bf16 tensor (512 MiB by default, shape [rows, 4096]):
  * copy       dst.copy_(src): the bandwidth ceiling
  * qgate      the triton backend, every quantized format (+ NVFP4's block pass with amax known)
  * peers      torchao's MX emulation (to_mx + to_dtype) and NVFP4 (to_nvfp4 + dequantize), eager
               and under torch.compile; microsoft/microxcaling's _quantize_mx (pure PyTorch).
GB/s counts the tensor read once plus the result written once (2 x bytes), whatever a kernel
moves internally, so every row of one format is the same work. "same bits" is the share of
elements where the peer's output equals qgate's bit for bit (NaN = NaN).

Peers are optional: torchao from an installed wheel, microxcaling from a source folder given by
--mx-path (its `mx` package). A missing peer is reported, not fatal.

--sweep first times every tile shape of qgate.backends.triton_tuning.SPACE on this GPU (the MX kernel
on mxfp4 and mxfp4_rceil, NVFP4's block pass, the amax pass, the per-row fp8 kernel), checks each one's
output bit for bit against the default tile's, keeps the fastest per kernel in $QGATE_CACHE/triton-tiles.json
under the device's name (the backend reads it from then on), prints the choice, then benchmarks with it.
The goals of the H200 (MX >= 100% of copy, RCEIL >= 99%, NVFP4 block pass >= 95%, fp8_channel >= 90%)
are printed under the table.

Also: a whole-model figure (--model): every decoder Linear of a random-weight model built on the
GPU from Qwen2.5-7B's configuration, quantized with the triton backend and with the reference
backend on the same GPU: the backend calls alone, and qgate.quantize.quantize_model end to end.

    python bench/kernels.py --size-mib 512 --model --json results.json
    python bench/kernels.py --sweep --budget-s 170 --json results.json
    qgate bench kernels --size-mib 512
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qgate.formats import ScaleKind, get_format, list_formats  # noqa: E402

GOAL_FORMATS = ("mxfp4", "nvfp4", "mxfp8_e4m3")
# the sweep times each kernel on one format (a tile does the same work for every element type)
SWEEP_FORMATS = {"mx": "mxfp4", "mx_rceil": "mxfp4_rceil", "nvfp4": "nvfp4", "amax": "nvfp4", "fp8_row": "fp8_channel"}
# % of copy each kind of row should reach (the H200 targets)
GOALS = (("MX formats (FLOOR)", 100.0), ("MX formats (RCEIL)", 99.0), ("nvfp4 block pass", 95.0),
         ("fp8_channel", 90.0))
TORCHAO_MX = {"mxfp4": "float4_e2m1fn_x2", "mxfp6_e2m3": "fp6_e2m3", "mxfp6_e3m2": "fp6_e3m2",
              "mxfp8_e4m3": "float8_e4m3fn", "mxfp8_e5m2": "float8_e5m2"}
MICROXCALING = {"mxfp4": "fp4_e2m1", "mxfp6_e2m3": "fp6_e2m3", "mxfp6_e3m2": "fp6_e3m2",
                "mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxint8": "int8"}
# Qwen2.5-7B(-Instruct) config.json, the fields that shape the decoder's Linear layers
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")


@dataclass
class Row:
    fmt: str
    impl: str
    ms: float | None
    gbps: float | None = None
    pct_copy: float | None = None
    qgate_speedup: float | None = None  # peer time / qgate time
    same_bits: float | None = None      # share of elements equal to qgate's output
    note: str = ""


@dataclass
class Result:
    date: str
    device: str
    software: str
    shape: tuple
    bytes_moved: int
    copy_ms: float
    copy_gbps: float
    rows: list[Row] = field(default_factory=list)
    model: dict | None = None
    tiles: dict = field(default_factory=dict)  # kernel -> the tile config the rows were measured with
    tiles_source: str = ""
    sweep: dict | None = None  # kernel -> every config's time and the chosen one (with --sweep)
    goals: list = field(default_factory=list)  # (goal, target %, measured %, which row, met)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
            f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")


def software_line() -> str:
    import triton

    parts = [f"torch {torch.__version__}", f"triton {triton.__version__}", f"CUDA {torch.version.cuda}",
             f"python {platform.python_version()}"]
    try:
        import torchao

        parts.append(f"torchao {torchao.__version__}")
    except Exception:  # noqa: BLE001 - optional peer
        pass
    return ", ".join(parts)


def time_ms(fn: Callable[[], object], rep_ms: int = 200, warmup_ms: int = 25) -> float:
    """Median of CUDA-event timings after warm-up (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("nan")
    a = a.to(torch.bfloat16) if a.dtype != torch.bfloat16 else a
    return float((_bits(a) == _bits(b)).float().mean())


# --- peers --------------------------------------------------------------------------------

def torchao_mx_fn(fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchao.prototype.mx_formats import mx_tensor

    elem = getattr(torch, TORCHAO_MX[fmt], None) or TORCHAO_MX[fmt]

    def fake_quantize(x: torch.Tensor) -> torch.Tensor:
        scale, data = mx_tensor.to_mx(x, elem, 32)
        return mx_tensor.to_dtype(data, scale, elem, 32, x.dtype)

    return fake_quantize


def torchao_nvfp4_fn() -> Callable[[torch.Tensor], torch.Tensor]:
    from torchao.prototype.mx_formats import nvfp4_tensor as N

    def fake_quantize(x: torch.Tensor) -> torch.Tensor:
        pts = N.per_tensor_amax_to_scale(torch.max(torch.abs(x)))
        return N.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts).dequantize(x.dtype)

    return fake_quantize


def microxcaling_fn(fmt: str, mx_path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if mx_path not in sys.path:
        sys.path.insert(0, mx_path)
    from mx.mx_ops import _quantize_mx

    elem = MICROXCALING[fmt]

    def fake_quantize(x: torch.Tensor) -> torch.Tensor:
        return _quantize_mx(x, 8, elem, shared_exp_method="max", axes=[-1], block_size=32, round="even")

    return fake_quantize


def peer_impls(fmt: str, mx_path: str | None, compile_formats: tuple[str, ...]) -> list[tuple[str, Callable]]:
    """(name, builder) pairs; a builder returns the callable or raises if the peer is missing."""
    out: list[tuple[str, Callable]] = []
    if fmt in TORCHAO_MX:
        out.append(("torchao eager", lambda: torchao_mx_fn(fmt)))
        if fmt in compile_formats:
            out.append(("torchao compiled", lambda: torch.compile(torchao_mx_fn(fmt))))
    if fmt == "nvfp4":
        out.append(("torchao eager", torchao_nvfp4_fn))
        if fmt in compile_formats:
            out.append(("torchao compiled", lambda: torch.compile(torchao_nvfp4_fn())))
    if fmt in MICROXCALING and mx_path:
        out.append(("microxcaling", lambda: microxcaling_fn(fmt, mx_path)))
    return out


# --- tiles ------------------------------------------------------------------------------

def tile_text(cfg: dict) -> str:
    short = {"num_warps": "w", "BLOCK_K": "K", "ROWS": "rows", "TILES": "tiles", "BLOCK": "block"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in cfg.items())


def kernels_of(fmt) -> tuple[str, ...]:
    """The tuned kernels a format runs (qgate.backends.triton_tuning names)."""
    if fmt.scale is ScaleKind.E8M0:
        return ("mx_rceil",) if fmt.scale_rule == "rceil" else ("mx",)
    return {ScaleKind.E4M3_FP32: ("nvfp4", "amax"), ScaleKind.FP32_TENSOR: ("amax",),
            ScaleKind.FP32_CHANNEL: ("fp8_row",)}.get(fmt.scale, ())


def sweep_tiles(x: torch.Tensor, copy_gbps: float, rep_ms: int = 40) -> dict:
    """Time every config of the tuning space on ``x``, keep the fastest per kernel whose output equals the
    default tile's bit for bit, and cache the choice under this GPU's name."""
    from qgate.backends.triton import TritonBackend
    from qgate.backends.triton_tuning import DEFAULT, SPACE, save_sweep

    device = torch.cuda.get_device_name(x.device)
    nbytes = 2 * x.numel() * x.element_size()
    started = time.perf_counter()
    out = torch.empty_like(x)
    amax = TritonBackend(tiles=DEFAULT).tensor_amax_bits(x)
    report: dict = {}
    chosen: dict = {}
    for kernel, space in SPACE.items():
        fmt = get_format(SWEEP_FORMATS[kernel])

        def call(b):
            if kernel == "amax":
                return b.tensor_amax_bits(x)
            if kernel == "nvfp4":
                return b.nvfp4_block_pass(x, amax, out=out)
            return b.fake_quantize(x, fmt, out=out)

        want = call(TritonBackend(tiles=DEFAULT)).clone()
        moved = nbytes // 2 if kernel == "amax" else nbytes  # the amax pass only reads
        timings = []
        for cfg in space:
            b = TritonBackend(tiles={kernel: cfg})
            got = call(b)  # compiles
            differ = int((_bits(got) != _bits(want)).sum()) if got.dtype != torch.int32 else int((got != want).sum())
            ms = time_ms(lambda: call(b), rep_ms, warmup_ms=10)
            timings.append({"config": cfg, "ms": round(ms, 4), "pct_copy": round(100 * moved / ms / 1e6 / copy_gbps, 1),
                            "differing_elements": differ})
            if differ:
                _log(f"sweep {kernel} {tile_text(cfg)}: {differ} elements differ from the default tile's output")
        exact = [t for t in timings if not t["differing_elements"]]
        best = min(exact, key=lambda t: t["ms"])
        default_ms = next(t["ms"] for t in timings if t["config"] == DEFAULT[kernel])
        chosen[kernel] = best["config"]
        report[kernel] = {"format": fmt.name, "chosen": best, "default": {"config": DEFAULT[kernel], "ms": default_ms},
                          "configs": timings}
        _log(f"sweep {kernel:9s} ({fmt.name}): {tile_text(best['config'])}  {best['ms']:.3f} ms "
             f"{best['pct_copy']:.1f}% of copy{' (reads only)' if kernel == 'amax' else ''}; default "
             f"{tile_text(DEFAULT[kernel])} {default_ms:.3f} ms; {len(timings)} configs, "
             f"{sum(1 for t in timings if t['differing_elements'])} differing")
    save_sweep(device, chosen, {k: {"format": v["format"], "ms": v["chosen"]["ms"], "pct_copy": v["chosen"]["pct_copy"]}
                                for k, v in report.items()})
    report["_seconds"] = round(time.perf_counter() - started, 1)
    report["_device"] = device
    return report


def goals(res: Result) -> list:
    """Each H200 goal: the worst row of its kind against the target."""
    def worst(pick):
        rows = [r for r in res.rows if pick(r) and r.pct_copy]
        return min(rows, key=lambda r: r.pct_copy) if rows else None

    picks = {
        "MX formats (FLOOR)": lambda r: r.impl == "qgate triton" and get_format(r.fmt).scale is ScaleKind.E8M0
        and get_format(r.fmt).scale_rule != "rceil",
        "MX formats (RCEIL)": lambda r: r.impl == "qgate triton" and get_format(r.fmt).scale_rule == "rceil",
        "nvfp4 block pass": lambda r: r.impl == "qgate block pass",
        "fp8_channel": lambda r: r.impl == "qgate triton" and r.fmt == "fp8_channel",
    }
    out = []
    for goal, target in GOALS:
        r = worst(picks[goal])
        out.append((goal, target, round(r.pct_copy, 1) if r else None, r.fmt if r else None,
                    bool(r and r.pct_copy >= target)))
    return out


# --- the benchmark ------------------------------------------------------------------------

def run(size_mib: int = 512, formats: tuple[str, ...] | None = None, peers: bool = True,
        mx_path: str | None = None, compile_formats: tuple[str, ...] = GOAL_FORMATS,
        rep_ms: int = 200, deadline: float | None = None, sweep: bool = False) -> Result:
    """deadline (time.monotonic()): peers not started by then are listed as skipped.
    sweep: first choose this GPU's tiles by a measured sweep (sweep_tiles), then benchmark with them."""
    from qgate.errors import QgateError

    if not torch.cuda.is_available():
        raise QgateError("bench kernels needs a CUDA device (none is visible to torch)")
    try:
        from qgate.backends.triton import TritonBackend
    except ImportError as exc:
        raise QgateError(f"bench kernels needs triton ({exc})") from exc
    from qgate.backends.triton_tuning import source_of

    every = [f.name for f in list_formats() if not f.is_identity]
    formats = formats or tuple(sorted(every, key=lambda n: (n not in GOAL_FORMATS, every.index(n))))
    cols = 4096
    rows = size_mib * 2**20 // (2 * cols)
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * x.numel() * x.element_size()
    dst = torch.empty_like(x)
    copy_ms = time_ms(lambda: dst.copy_(x), rep_ms)
    res = Result(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=device_line(),
                 software=software_line(), shape=tuple(x.shape), bytes_moved=nbytes, copy_ms=copy_ms,
                 copy_gbps=nbytes / copy_ms / 1e6)
    _log(f"copy: {copy_ms:.3f} ms, {res.copy_gbps:.0f} GB/s")
    if sweep:
        res.sweep = sweep_tiles(x, res.copy_gbps)

    def row(fmt, impl, ms, qgate_ms=None, same=None, note=""):
        gbps = nbytes / ms / 1e6 if ms else None
        r = Row(fmt, impl, ms, gbps, 100 * gbps / res.copy_gbps if gbps else None,
                (ms / qgate_ms) if (ms and qgate_ms) else None, same, note)
        res.rows.append(r)
        _log(f"{fmt:12s} {impl:18s} " + (f"{ms:8.3f} ms {gbps:7.0f} GB/s" if ms else note))
        return r

    backend = TritonBackend()
    res.tiles = backend.tiles(x.device)
    res.tiles_source = source_of(torch.cuda.get_device_name(x.device))
    out = torch.empty_like(x)
    for name in formats:
        fmt = get_format(name)
        backend.fake_quantize(x, fmt, out=out)  # compile + warm
        q_ms = time_ms(lambda: backend.fake_quantize(x, fmt, out=out), rep_ms)
        row(name, "qgate triton", q_ms, note="; ".join(f"{k} {tile_text(res.tiles[k])}" for k in kernels_of(fmt)))
        ours = out.clone()
        if name == "nvfp4":
            amax = backend.tensor_amax_bits(x)
            b_out = torch.empty_like(x)
            b_ms = time_ms(lambda: backend.nvfp4_block_pass(x, amax, out=b_out), rep_ms)
            row(name, "qgate block pass", b_ms, note=f"tensor amax given; {tile_text(res.tiles['nvfp4'])}")
            a_ms = time_ms(lambda: backend.tensor_amax_bits(x), rep_ms)
            res.rows.append(Row(name, "qgate amax pass", a_ms, x.numel() * 2 / a_ms / 1e6, None, None, None,
                                "reads the tensor once; GB/s of that read"))
        if not peers:
            continue
        for impl, build in peer_impls(name, mx_path, compile_formats):
            if deadline is not None and time.monotonic() > deadline:
                row(name, impl, None, note="skipped: time budget of this run")
                continue
            try:
                fn = build()
                started = time.perf_counter()
                theirs = fn(x)
                torch.cuda.synchronize()
                first_s = time.perf_counter() - started
                same = same_bits(theirs, ours)
                del theirs
                ms = time_ms(lambda: fn(x), rep_ms)
                row(name, impl, ms, q_ms, same, f"first call {first_s:.1f} s" if "compiled" in impl else "")
            except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
                row(name, impl, None, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            torch.cuda.empty_cache()
    res.goals = goals(res)
    return res


def model_figure(formats: tuple[str, ...] = GOAL_FORMATS, end_to_end: bool = True) -> dict:
    """Every decoder Linear of a random bf16 Qwen2.5-7B-shaped model on the GPU, both backends."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qgate.backends.reference import ReferenceBackend
    from qgate.backends.triton import TritonBackend

    started = time.perf_counter()
    config = Qwen2Config(**QWEN25_7B)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: 15 GB, never an fp32 copy
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    weights = [(n, m.weight) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    numel = sum(w.numel() for _, w in weights)
    moved = 2 * 2 * numel
    fig = {"config": "Qwen2.5-7B (random weights, bf16)", "linear_layers": len(weights), "params": numel,
           "build_s": round(time.perf_counter() - started, 1), "formats": {}}
    _log(f"model: {len(weights)} decoder Linear weights, {numel / 1e9:.2f} B params")
    tri, ref = TritonBackend(), ReferenceBackend()

    def sweep(backend, fmt, compare_to=None) -> tuple[float, int]:
        """Seconds for fake-quantizing every weight (out of place), and elements differing from compare_to."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        differ = 0
        for i, (_, w) in enumerate(weights):
            y = backend.fake_quantize(w, fmt)
            if compare_to is not None:
                differ += int((_bits(y) != _bits(compare_to[i])).sum())
        torch.cuda.synchronize()
        return time.perf_counter() - t0, differ

    for name in formats:
        fmt = get_format(name)
        for _, w in weights[:7]:
            tri.fake_quantize(w, fmt)  # compile every shape's kernel first
        t_tri = min(sweep(tri, fmt)[0] for _ in range(3))
        t_ref, _ = sweep(ref, fmt)
        entry = {"triton_s": round(t_tri, 4), "triton_gbps": round(moved / t_tri / 1e9),
                 "reference_s": round(t_ref, 3), "reference_gbps": round(moved / t_ref / 1e9),
                 "speedup": round(t_ref / t_tri, 1)}
        if fmt.scale is ScaleKind.E8M0:  # the reference on CUDA is exact for MX: compare every element
            refs = [ref.fake_quantize(w, fmt) for _, w in weights[:28]]
            differ = sum(int((_bits(tri.fake_quantize(w, fmt)) != _bits(r)).sum()) for (_, w), r in zip(weights, refs))
            entry["differing_elements_first_4_layers"] = differ
            del refs
        fig["formats"][name] = entry
        _log(f"model {name}: triton {t_tri:.3f} s ({entry['triton_gbps']} GB/s), reference {t_ref:.2f} s")
    if end_to_end:
        from qgate.quantize import quantize_model

        for backend_name in ("triton", "reference"):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = quantize_model(model, "mxfp4", backend=backend_name, progress=False)
            torch.cuda.synchronize()
            fig.setdefault("quantize_model_mxfp4_s", {})[backend_name] = round(time.perf_counter() - t0, 2)
            _log(f"quantize_model mxfp4 via {backend_name}: {time.perf_counter() - t0:.2f} s "
                 f"({len(result.tensors)} tensors)")
    del model
    torch.cuda.empty_cache()
    return fig


# --- output -------------------------------------------------------------------------------

def format_table(res: Result) -> str:
    lines = [f"qgate kernel benchmark  {res.date}",
             f"device: {res.device}",
             f"software: {res.software}",
             f"tensor: bf16 {res.shape[0]}x{res.shape[1]} ({res.bytes_moved / 2 / 2**20:.0f} MiB); "
             f"GB/s = (bytes read + bytes written) / time",
             f"copy (ceiling): {res.copy_ms:.3f} ms  {res.copy_gbps:.0f} GB/s",
             f"tiles: {res.tiles_source}",
             "",
             f"{'format':12s} {'implementation':18s} {'ms':>8s} {'GB/s':>7s} {'%copy':>6s} {'qgate x':>8s} "
             f"{'same bits':>9s}  note"]
    for r in res.rows:
        ms = f"{r.ms:8.3f}" if r.ms else f"{'-':>8s}"
        gb = f"{r.gbps:7.0f}" if r.gbps else f"{'-':>7s}"
        pc = f"{r.pct_copy:5.1f}%" if r.pct_copy else f"{'':>6s}"
        sp = f"{r.qgate_speedup:7.1f}x" if r.qgate_speedup else f"{'':>8s}"
        sb = f"{100 * r.same_bits:8.2f}%" if r.same_bits is not None and not math.isnan(r.same_bits) else f"{'':>9s}"
        lines.append(f"{r.fmt:12s} {r.impl:18s} {ms} {gb} {pc} {sp} {sb}  {r.note}".rstrip())
    if res.goals:
        lines += ["", "goals (% of copy; the worst format of each kind):"]
        for goal, target, got, fmt, met in res.goals:
            lines.append(f"  {goal:20s} >= {target:5.1f}%  " + (f"{got:5.1f}% ({fmt})  {'met' if met else 'NOT met'}"
                                                                if got is not None else "not measured"))
    if res.sweep:
        lines += ["", f"tile sweep ({res.sweep['_seconds']} s; cached for {res.sweep['_device']}; every config's "
                      "output compared bit for bit with the default tile's):"]
        for kernel, v in res.sweep.items():
            if kernel.startswith("_"):
                continue
            c = v["chosen"]
            n_bad = sum(1 for t in v["configs"] if t["differing_elements"])
            lines.append(f"  {kernel:9s} on {v['format']:12s} chosen {tile_text(c['config']):24s} {c['ms']:.3f} ms "
                         f"{c['pct_copy']:5.1f}%  default {tile_text(v['default']['config']):24s} "
                         f"{v['default']['ms']:.3f} ms  ({len(v['configs'])} configs, {n_bad} differing)")
    if res.model:
        m = res.model
        lines += ["", f"whole model: {m['config']}, {m['linear_layers']} decoder Linear weights, "
                      f"{m['params'] / 1e9:.2f} B params; backend calls only (read + write per weight)"]
        for name, e in m["formats"].items():
            extra = (f", differing elements (first 4 layers) {e['differing_elements_first_4_layers']}"
                     if "differing_elements_first_4_layers" in e else "")
            lines.append(f"  {name:12s} triton {e['triton_s']:.3f} s ({e['triton_gbps']} GB/s)   reference "
                         f"{e['reference_s']:.2f} s ({e['reference_gbps']} GB/s)   {e['speedup']}x{extra}")
        if "quantize_model_mxfp4_s" in m:
            q = m["quantize_model_mxfp4_s"]
            lines.append("  quantize_model(mxfp4, with statistics): " +
                         ", ".join(f"{k} {v:.2f} s" for k, v in q.items()))
    return "\n".join(lines)


def to_json(res: Result) -> dict:
    d = asdict(res)
    d["rows"] = [asdict(r) for r in res.rows]
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--formats", default="", help="comma-separated; default: every quantized format")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--mx-path", default=None, help="folder holding microxcaling's `mx` package")
    ap.add_argument("--compile-formats", default=",".join(GOAL_FORMATS),
                    help="formats whose torchao peer is also timed under torch.compile")
    ap.add_argument("--model", action="store_true", help="add the whole-model figure (Qwen2.5-7B shapes)")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--sweep", action="store_true",
                    help="first choose this GPU's tile shapes by a measured sweep (cached per device name)")
    ap.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="peers not started within this many seconds of the start are listed as skipped")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    formats = tuple(f for f in args.formats.split(",") if f) or None
    res = run(args.size_mib, formats, not args.no_peers, args.mx_path,
              tuple(f for f in args.compile_formats.split(",") if f), rep_ms=args.rep_ms, deadline=deadline,
              sweep=args.sweep)
    if args.model:
        res.model = model_figure()
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(res), indent=2))
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
