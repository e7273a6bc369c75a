"""The numerics contract: the reference backend against an independent brute-force definition,
edge cases, idempotence, torchao's implementation, and the real encodings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bruteforce
from qgate.cli import cli
from qgate.encoding import decode, encode
from qgate.backends import fake_quantize
from qgate.errors import UsageError
from qgate.formats import ScaleKind, get_format, list_formats

QUANTIZED = [f.name for f in list_formats() if not f.is_identity]
MX = [f.name for f in list_formats() if f.scale is ScaleKind.E8M0]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaNs in the same places (torch.equal says NaN != NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a, nan=1.2345), torch.nan_to_num(b, nan=1.2345))


def many_scales(rows=48, cols=96, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    scales = torch.logspace(-30, 20, rows, dtype=torch.float64).to(torch.float32).unsqueeze(1)
    return x * scales


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_bruteforce_on_many_scales(fmt, seed):
    x = many_scales(seed=seed)
    if fmt == "nvfp4":  # one tensor scale: give every row its own tensor so the scales all matter
        for row in x:
            want = torch.from_numpy(bruteforce.fake_quantize(row[None].numpy(), fmt))
            assert same_bits(fake_quantize(row[None], fmt), want)
        return
    want = torch.from_numpy(bruteforce.fake_quantize(x.numpy(), fmt))
    assert same_bits(fake_quantize(x, fmt), want)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_exact_ties_round_half_to_even(fmt):
    f = get_format(fmt)
    values, _ = bruteforce.grid(bruteforce.FORMAT_ELEMENT[fmt])
    mids = (values[:-1] + values[1:]) / 2  # exactly between two neighbours
    # Anchor every row's maximum at the largest element, so that the scale is exactly 1 and each
    # midpoint is an exact tie (NVFP4: amax 6*448 gives s_tensor 1 and block scales 448).
    block = f.block_size or len(mids) + 1
    n = len(mids)
    rows = []
    for start in range(0, n, block - 1):
        chunk = list(mids[start:start + block - 1])
        rows.append(chunk + [values[-1]] + [0.0] * (block - 1 - len(chunk)))
    x = torch.tensor(rows, dtype=torch.float32)
    if f.scale is ScaleKind.E4M3_FP32:
        x = x * 448
    got = fake_quantize(x, fmt)
    want = torch.from_numpy(bruteforce.fake_quantize(x.numpy(), fmt))
    assert same_bits(got, want)
    if f.scale is ScaleKind.E8M0 and f.element.name != "int8":
        # the tie values must land on the even neighbour, not merely agree with the brute force
        even_vals = [v for v, e in zip(*bruteforce.grid(bruteforce.FORMAT_ELEMENT[fmt])) if e]
        flat = got[:, : block - 1].reshape(-1)[: n]
        assert all(float(v) in even_vals for v in flat.abs())


@pytest.mark.parametrize("fmt", MX + ["nvfp4", "fp8", "fp8_channel"])
def test_edge_cases(fmt):
    f = get_format(fmt)
    block = f.block_size or 8
    zeros = torch.zeros(2, block * 2)
    assert torch.equal(fake_quantize(zeros, fmt), zeros)

    x = torch.randn(3, block * 2)
    x[0, 1] = float("nan")
    x[1, block + 2] = float("inf")
    x[2, 0] = float("-inf")
    y = fake_quantize(x, fmt)
    if f.block_size:  # the whole block holding a non-finite value is NaN, the others stay finite
        assert torch.isnan(y[0, :block]).all() and torch.isfinite(y[0, block:]).all()
        assert torch.isnan(y[1, block:]).all() and torch.isfinite(y[1, :block]).all()
    else:  # no blocks: the non-finite element itself is NaN
        assert torch.isnan(y[0, 1]) and torch.isnan(y[1, block + 2]) and torch.isnan(y[2, 0])
        assert torch.isfinite(y).sum() == y.numel() - 3

    # saturation: finite inputs never become inf, the largest value is the element max
    big = torch.tensor([[3.0e38, -3.0e38] + [1.0] * (block - 2)])
    out = fake_quantize(big, fmt)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= big.abs().max() * 1.01  # rounding may go up, never to inf

    # values near 1e-30 and 1e20 survive with the right order of magnitude
    for scale in (1e-30, 1e20):
        v = torch.randn(4, block * 2) * scale
        q = fake_quantize(v, fmt)
        assert torch.isfinite(q).all()
        assert (q.double() - v.double()).norm() / v.double().norm() < 0.5


@pytest.mark.parametrize("fmt", MX)
def test_subnormal_elements_are_kept(fmt):
    f = get_format(fmt)
    values, _ = bruteforce.grid(bruteforce.FORMAT_ELEMENT[fmt])
    smallest = values[1]
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0 ** f.element.emax  # shared scale exactly 1
    x[0, 1] = float(smallest)
    x[0, 2] = float(smallest) * 0.75  # rounds up to the smallest subnormal
    x[0, 3] = float(smallest) * 0.25  # rounds to zero
    y = fake_quantize(x, fmt)
    assert y[0, 1] == smallest and y[0, 2] == smallest and y[0, 3] == 0


def test_mx_scale_uses_exact_exponent_not_log2():
    # amax just under a power of two: (2 - 2^-23) * 2^k. A float log2 rounds up to k+1.
    amax = (2 - 2.0**-23) * 2.0**5
    x = torch.zeros(1, 32)
    x[0, 0] = amax
    x[0, 1] = 1.0
    assert torch.log2(torch.tensor(amax)).item() == 6.0  # the trap exists on this torch
    y = fake_quantize(x, "mxfp4")
    want = torch.from_numpy(bruteforce.fake_quantize(x.numpy(), "mxfp4"))
    assert same_bits(y, want)
    assert y[0, 0] == 6.0 * 8  # saturates at 6 * 2^3; the wrong scale 2^4 would give 4 * 16 = 64


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(fmt, dtype):
    x = (torch.randn(16, 64) * 3).to(dtype)
    y = fake_quantize(x, fmt)
    assert y.dtype == dtype and y.shape == x.shape
    # defined as: compute in float32 from the exactly-widened input, round once to the input dtype
    want = torch.from_numpy(bruteforce.fake_quantize(x.float().numpy(), fmt)).to(dtype)
    assert same_bits(y, want)


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("last", [1, 31, 33, 4097])
def test_tail_blocks(fmt, last):
    x = torch.randn(3, last) * 5
    x[:, -1] = 100.0  # the tail block's amax comes from its real elements only
    y = fake_quantize(x, fmt)
    assert y.shape == x.shape
    want = torch.from_numpy(bruteforce.fake_quantize(x.numpy(), fmt))
    assert same_bits(y, want)


def test_batched_shapes_block_along_last_dim():
    x = torch.randn(2, 3, 64)
    assert same_bits(fake_quantize(x, "mxfp4"), fake_quantize(x.reshape(6, 64), "mxfp4").reshape(2, 3, 64))


@pytest.mark.parametrize("fmt", MX + ["fp8_channel"])
def test_idempotent(fmt):
    x = many_scales(seed=3)
    once = fake_quantize(x, fmt)
    assert same_bits(fake_quantize(once, fmt), once)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_idempotent_with_tensor_scale(fmt):
    # one FP32 scale per tensor is recomputed from the quantized amax; it is unchanged when amax is
    # representable, so a second pass is a no-op there
    x = torch.randn(8, 64)
    x[0, 0] = 2688.0 if fmt == "nvfp4" else 448.0
    once = fake_quantize(x, fmt)
    assert same_bits(fake_quantize(once, fmt), once)


def test_bf16_is_identity():
    x = torch.randn(4, 7)
    assert torch.equal(fake_quantize(x, "bf16"), x)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UsageError, match="unknown format 'mxfp3'.*mxfp4"):
        fake_quantize(torch.zeros(2, 32), "mxfp3")
    with pytest.raises(UsageError, match="unknown backend 'cutlass'.*reference"):
        fake_quantize(torch.zeros(2, 32), "mxfp4", backend="cutlass")
    with pytest.raises(UsageError, match="float32, float16 or bfloat16"):
        fake_quantize(torch.zeros(2, 32, dtype=torch.int32), "mxfp4")


# --- an independent implementation: torchao's mx_formats ------------------------------------

torchao_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")


def _torchao_elem(fmt):
    from torchao.prototype.mx_formats import constants as C

    return {
        "mxfp4": torch.float4_e2m1fn_x2, "mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
        "mxfp6_e2m3": C.DTYPE_FP6_E2M3, "mxfp6_e3m2": C.DTYPE_FP6_E3M2,
    }[fmt]


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torchao_mx(fmt, dtype):
    x = many_scales(64, 256, seed=7).clamp(-1e30, 1e30).to(dtype)
    x = torch.where(x.abs() < 1e-28, 1e-28, x).to(dtype)  # stay clear of bf16 subnormal outputs
    scale, data = torchao_mx.to_mx(x, _torchao_elem(fmt), 32)
    theirs = torchao_mx.to_dtype(data, scale, _torchao_elem(fmt), 32, dtype)
    assert same_bits(fake_quantize(x, fmt), theirs)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2"])
def test_rceil_variants_match_torchao_rceil(fmt):
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    x = many_scales(64, 256, seed=11).clamp(-1e30, 1e30)
    x = torch.where(x.abs() < 1e-28, 1e-28, x)
    scale, data = torchao_mx.to_mx(x, _torchao_elem(fmt), 32, scaling_mode=ScaleCalculationMode.RCEIL)
    theirs = torchao_mx.to_dtype(data, scale, _torchao_elem(fmt), 32, torch.float32)
    assert same_bits(fake_quantize(x, f"{fmt}_rceil"), theirs)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "mxint8"])
def test_rceil_never_clips_where_floor_does(fmt):
    """FLOOR leaves amax / scale in [2^emax, 2^(emax+1)): above the largest element it clips; RCEIL never."""
    f = get_format(fmt)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(3))
    # every block's amax at 0.99 of the next power of two: the top of FLOOR's range
    x[:, 0] = 0.999 * 2.0 ** torch.randint(-20, 20, (256,), generator=torch.Generator().manual_seed(4)).float()
    x = x / x.abs().amax(dim=1, keepdim=True) * x[:, :1].abs()
    from qgate.backends import reference as ref

    amax = x.abs().amax(dim=1)
    floor_ratio = amax / ref.exact_pow2(ref.mx_shared_exponent(amax, f.element, "floor"))
    rceil_ratio = amax / ref.exact_pow2(ref.mx_shared_exponent(amax, f.element, "rceil"))
    assert (floor_ratio > f.element.max_value).all()  # every block clips under FLOOR...
    assert (rceil_ratio <= f.element.max_value).all() and (rceil_ratio > f.element.max_value / 2).all()
    err_floor = (fake_quantize(x, fmt) - x).norm()
    err_rceil = (fake_quantize(x, f"{fmt}_rceil") - x).norm()
    assert err_rceil < err_floor


def test_rceil_reads_the_exponent_exactly():
    # amax just above 448 * 2^10: the float32 quotient amax / 448 is one ulp above 2^10, whose exact
    # ceil(log2) is 11 while a float32 log2 rounds to exactly 10 (the trap a log2-based rule falls into)
    amax = torch.tensor(448.0 * 2**10).nextafter(torch.tensor(float("inf")))
    d = amax / 448
    assert d.item() > 2**10 and torch.ceil(torch.log2(d)).item() == 10
    x = torch.zeros(1, 32)
    x[0, 0] = amax
    x[0, 1] = 2.0  # 2^-9 (E4M3's smallest subnormal) at scale 2^10; half of it, a tie to 0, at 2^11
    y = fake_quantize(x, "mxfp8_e4m3_rceil")
    assert same_bits(y, torch.from_numpy(bruteforce.fake_quantize(x.numpy(), "mxfp8_e4m3_rceil")))
    assert y[0, 0] == 448.0 * 2**10 and y[0, 1] == 0.0  # scale 2^11: 224 * 2^11, and 2 rounds to zero


def test_matches_torchao_nvfp4_fp32():
    from torchao.prototype.mx_formats import nvfp4_tensor as N

    for seed in range(3):
        x = torch.randn(128, 512, generator=torch.Generator().manual_seed(seed))
        x = x * torch.logspace(-4, 4, 128).unsqueeze(1)
        pts = N.per_tensor_amax_to_scale(x.abs().amax())
        theirs = N.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts).dequantize(torch.float32)
        assert same_bits(fake_quantize(x, "nvfp4"), theirs)


# --- real encodings --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", QUANTIZED + ["bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_decode_round_trip_and_size(fmt, dtype):
    f = get_format(fmt)
    x = (many_scales(32, 128, seed=5).clamp(-1e30, 1e30)).to(dtype)
    x[3, 7] = float("nan")
    enc = encode(x, fmt)
    assert same_bits(decode(enc), fake_quantize(x, fmt))
    n = x.numel()
    if f.is_identity:
        assert enc.nbytes == n * x.element_size()
        return
    fixed = {ScaleKind.E4M3_FP32: 4, ScaleKind.FP32_TENSOR: 4, ScaleKind.FP32_CHANNEL: 4 * x.shape[0]}.get(f.scale, 0)
    assert enc.nbytes == n * f.bits_per_value / 8 + fixed


def test_packing_density():
    x = torch.randn(4, 64)
    assert encode(x, "mxfp4").codes.numel() == 4 * 64 // 2  # two FP4 codes per byte
    assert encode(x, "mxfp6_e2m3").codes.numel() == 4 * 64 * 3 // 4  # four FP6 codes per three bytes
    assert encode(x, "mxfp8_e4m3").codes.numel() == 4 * 64


# --- CLI -------------------------------------------------------------------------------------

def test_formats_cli_table_and_json():
    runner = CliRunner()
    res = runner.invoke(cli, ["formats"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0].split() == ["name", "element", "block", "scale", "bits/value", "largest"]
    mxfp4 = next(line for line in lines if line.startswith("mxfp4 "))
    assert mxfp4.split() == ["mxfp4", "e2m1", "32", "e8m0/floor", "4.25", "6"]
    rceil = next(line for line in lines if line.startswith("mxfp8_e4m3_rceil "))
    assert rceil.split() == ["mxfp8_e4m3_rceil", "e4m3", "32", "e8m0/rceil", "8.25", "448"]
    res = runner.invoke(cli, ["formats", "--json"])
    rows = {r["name"]: r for r in json.loads(res.output)}
    mx = {"mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8"}
    assert set(rows) == mx | {f"{m}_rceil" for m in mx} | {"nvfp4", "fp8", "fp8_channel", "bf16"}
    assert rows["mxfp4"]["scale_rule"] == "floor" and rows["mxfp4_rceil"]["scale_rule"] == "rceil"
    assert rows["nvfp4"]["scale_rule"] is None
    assert rows["nvfp4"]["block_size"] == 16 and rows["nvfp4"]["bits_per_value"] == 4.5
    assert rows["mxint8"]["max_value"] == 1.984375
    assert rows["mxfp8_e5m2"]["max_value"] == 57344.0


def test_version():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and "0.1.0" in res.output


def test_max_values_match_the_design_table():
    expected = {"mxfp4": 6.0, "mxfp6_e3m2": 28.0, "mxfp6_e2m3": 7.5, "mxfp8_e4m3": 448.0,
                "mxfp8_e5m2": 57344.0, "mxint8": 1.984375}
    for name, vmax in expected.items():
        assert get_format(name).max_value == vmax
        assert max(bruteforce.grid(bruteforce.FORMAT_ELEMENT[name])[0]) == vmax
        assert get_format(name).element.emax == bruteforce.EMAX[bruteforce.FORMAT_ELEMENT[name]]
    assert math.isclose(get_format("mxfp4").bits_per_value, 4 + 8 / 32)
    assert np.isclose(get_format("nvfp4").bits_per_value, 4 + 8 / 16)


def test_formats_are_data_and_import_no_kernel():
    """qgate.formats imports neither torch nor a backend, and a scale kind is an enum whose name is kept."""
    code = ("import sys, qgate.formats; "
            "assert not {'torch', 'qgate.backends', 'qgate.encoding'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    assert get_format("nvfp4").scale is ScaleKind.E4M3_FP32
    assert get_format("bf16").element.max_value == float(torch.finfo(torch.bfloat16).max)
    assert get_format("fp8").to_dict()["scale"] == "fp32/tensor"
