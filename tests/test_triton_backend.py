"""The triton backend against the reference backend, bit for bit.

The GPU tests need CUDA and skip without it (CI has none); bench/gpu_check.py runs them on a GPU.
The reference runs on the CPU: that is the contract's float32 arithmetic on any machine.
Every triton output is written into a buffer poisoned beforehand, twice with two different
poisons, so an element the kernel failed to write cannot agree with the reference by accident.
A CPU test runs the same kernels through Triton's interpreter, where triton is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bruteforce
from qgate.backends import get_backend
from qgate.backends.reference import ReferenceBackend, nvfp4_tensor_scale, quantize_nvfp4_blocks
from qgate.formats import ScaleKind, get_format, list_formats

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# TRITON_INTERPRET=1 runs the "GPU" tests on the CPU through Triton's interpreter (slow; for debugging).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not ((HAS_CUDA or INTERPRET) and HAS_TRITON), reason="needs a CUDA device and triton")
# the interpreter has no true fused multiply-add: the reciprocal-and-residual division runs on GPUs only
DIV_MODES = [0] if INTERPRET else [0, 1]
QUANTIZED = [f.name for f in list_formats() if not f.is_identity]
MX = [f.name for f in list_formats() if f.scale is ScaleKind.E8M0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POISONS = ("nan", "-max")  # NaN, then the dtype's most negative finite value
REF = ReferenceBackend()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, with every NaN made one pattern (the contract says NaN, not which NaN)."""
    t = t.cpu()
    t = torch.where(torch.isnan(t), torch.tensor(float("nan"), dtype=t.dtype), t)
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def reference(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return REF.fake_quantize(x.detach().cpu(), get_format(fmt))


def triton_poisoned(x: torch.Tensor, fmt: str, backend=None) -> list[torch.Tensor]:
    from qgate.backends.triton import TritonBackend

    backend = backend or TritonBackend()
    outs = []
    for poison in POISONS:
        value = float("nan") if poison == "nan" else -torch.finfo(x.dtype).max
        out = torch.full(x.shape, value, dtype=x.dtype, device=DEVICE)
        backend.fake_quantize(x.to(DEVICE), get_format(fmt), out=out)
        outs.append(out.cpu())
    return outs


def assert_bit_exact(x: torch.Tensor, fmt: str, backend=None, want=None) -> None:
    want = reference(x, fmt) if want is None else want
    for got in triton_poisoned(x, fmt, backend):
        differ = _bits(got) != _bits(want)
        if differ.any():
            i = differ.nonzero()[0].tolist()
            pytest.fail(f"{fmt} {x.dtype} {tuple(x.shape)}: {int(differ.sum())} elements differ; first at {i}: "
                        f"input {x.cpu()[tuple(i)].item()!r} triton {got[tuple(i)].item()!r} "
                        f"reference {want[tuple(i)].item()!r}")


def many_scales(rows=64, cols=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.logspace(-30, 20, rows, dtype=torch.float64).to(torch.float32).unsqueeze(1)


# --- GPU: bit-exactness ----------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_scales(fmt, dtype):
    for seed in range(3):
        x = many_scales(seed=seed).to(dtype)
        assert_bit_exact(x, fmt)
        if get_format(fmt).scale in (ScaleKind.E4M3_FP32, ScaleKind.FP32_TENSOR):  # one scale per tensor: each row alone too
            for row in x[::7]:
                assert_bit_exact(row[None], fmt)


@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_random_tensors(fmt, dtype):
    g = torch.Generator().manual_seed(11)
    for scale in (1e-3, 1.0, 1e3):
        x = (torch.randn(512, 4096, generator=g) * scale).to(dtype)
        x[7, 100] *= 50  # an outlier, so the tensor scale differs from most block scales
        assert_bit_exact(x, fmt)


@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("last", [1, 15, 16, 17, 31, 33, 100, 4097])
def test_tail_blocks(fmt, last):
    x = torch.randn(37, last) * 5
    x[:, -1] = 100.0  # the tail block's amax comes from its real elements only
    assert_bit_exact(x, fmt)
    assert_bit_exact(x.to(torch.bfloat16), fmt)


@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_batched_and_strided_inputs(fmt):
    x = torch.randn(3, 5, 7, 96).to(torch.bfloat16)
    assert_bit_exact(x, fmt)
    t = torch.randn(96, 64).t()  # not contiguous: blocks still run along the last dimension
    got = get_backend("triton").fake_quantize(t.to(DEVICE), get_format(fmt)).cpu()
    assert torch.equal(_bits(got), _bits(reference(t.contiguous(), fmt)))


@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_non_finite_zero_and_saturation(fmt):
    f = get_format(fmt)
    block = f.block_size or 8
    x = torch.randn(6, block * 4) * 3
    x[0, 1] = float("nan")
    x[1, block + 2] = float("inf")
    x[2, 0] = float("-inf")
    x[3] = 0.0
    x[4, :block] = -0.0
    x[5, :2] = torch.tensor([3.0e38, -3.0e38])
    for dtype in (torch.float32, torch.bfloat16):
        assert_bit_exact(x.to(dtype), fmt)
    assert_bit_exact(torch.zeros(4, 64), fmt)
    assert_bit_exact(torch.full((2, 64), float("nan")), fmt)


@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_subnormal_and_tiny_inputs(fmt):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, generator=g)
    x[0] *= 1e-40            # float32 subnormals
    x[1] *= 1e-38
    x[2, :32] = 2.0**-149    # the smallest subnormal
    x[3] *= 1e-36
    x[4] = 1.0
    x[4, 3] = 1e-42          # far below its block's scale
    x[5] *= 1e-30
    assert_bit_exact(x, fmt)
    for rows in (x[:1], x[1:2], x[3:4], x[5:6]):  # alone: the tensor scale itself tiny
        assert_bit_exact(rows, fmt)
    assert_bit_exact((torch.randn(8, 64, generator=g) * 1e-6).to(torch.float16), fmt)  # fp16 subnormals
    if not INTERPRET:  # the interpreter's own bf16 conversion mishandles bf16 subnormals
        assert_bit_exact((torch.randn(8, 64, generator=g) * 1e-39).to(torch.bfloat16), fmt)  # bf16 subnormals


@gpu
@pytest.mark.parametrize("fmt", MX)
def test_mx_exact_exponent_and_element_subnormals(fmt):
    f = get_format(fmt)
    values, _ = bruteforce.grid(bruteforce.FORMAT_ELEMENT[fmt])
    x = torch.zeros(3, 32)
    x[0, 0] = (2 - 2.0**-23) * 2.0**5  # amax just under a power of two: a float log2 rounds up
    x[0, 1] = 1.0
    x[1, 0] = 2.0**f.element.emax      # shared scale 1: the element grid itself
    x[1, 1:4] = torch.tensor([values[1], values[1] * 0.75, values[1] * 0.25])
    x[2] = torch.linspace(-1, 1, 32) * 2.0**-126
    assert_bit_exact(x, fmt)
    got = triton_poisoned(x, fmt)[0]
    assert got[1, 1] == values[1] and got[1, 2] == values[1] and got[1, 3] == 0


@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_exact_ties_round_half_to_even(fmt):
    f = get_format(fmt)
    values, _ = bruteforce.grid(bruteforce.FORMAT_ELEMENT[fmt])
    mids = (values[:-1] + values[1:]) / 2
    block = f.block_size or len(mids) + 1
    rows = []
    for start in range(0, len(mids), block - 1):
        chunk = list(mids[start:start + block - 1])
        rows.append(chunk + [values[-1]] + [0.0] * (block - 1 - len(chunk)))
    x = torch.tensor(rows, dtype=torch.float32)
    if f.scale is ScaleKind.E4M3_FP32:
        x = x * 448
    for sign in (1, -1):
        assert_bit_exact(sign * x, fmt)
        assert_bit_exact((sign * x).to(torch.bfloat16), fmt)


def _nvfp4_ties(seed: int) -> torch.Tensor:
    """Blocks whose elements sit on, and one float32 step either side of, m * total for every
    E2M1 midpoint m, where total is the reference's own float32 scale of that block."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = 256
    amax = torch.exp(torch.randn(n_blocks, generator=g) * 4)  # block maxima over many octaves
    x = torch.zeros(n_blocks, 16)
    x[:, 0] = amax
    s_tensor = nvfp4_tensor_scale(x)
    _, _, total, _ = quantize_nvfp4_blocks(x.view(1, n_blocks, 16), s_tensor)
    total = total.view(n_blocks, 1)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = (mids.view(1, 7) * total).to(torch.float32)                # rounded once in float32
    up = torch.nextafter(near, torch.tensor(float("inf")))
    x[:, 1:8] = near
    x[:, 8:15] = torch.where(torch.arange(n_blocks).view(-1, 1) % 2 == 0, up, -near)
    x[:, 15] = -torch.nextafter(near[:, 3], torch.tensor(0.0))
    return x


@gpu
@pytest.mark.parametrize("div_mode", DIV_MODES)
def test_nvfp4_ties_at_every_block_scale(div_mode):
    from qgate.backends.triton import TritonBackend

    backend = TritonBackend(div_mode=div_mode)
    for seed in range(4):
        x = _nvfp4_ties(seed)
        assert_bit_exact(x, "nvfp4", backend)
        assert_bit_exact(x.view(-1, 32), "nvfp4", backend)  # same values, two blocks to a row


@gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8_channel"])
@pytest.mark.parametrize("div_mode", DIV_MODES)
def test_fp8_ties_and_neighbours(fmt, div_mode):
    from qgate.backends.triton import TritonBackend

    values, _ = bruteforce.grid("e4m3")
    mids = torch.tensor((values[:-1] + values[1:]) / 2, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(64):
        amax = float(torch.exp(torch.randn(1, generator=g) * 6))
        s = torch.tensor(amax, dtype=torch.float32) / 448.0  # CPU: an IEEE float32 division
        near = (mids * s).to(torch.float32)
        row = torch.cat([torch.tensor([amax]), near, torch.nextafter(near, torch.tensor(float("inf"))),
                         -torch.nextafter(near, torch.tensor(0.0))])
        rows.append(row)
    x = torch.stack(rows)
    backend = TritonBackend(div_mode=div_mode)
    assert_bit_exact(x, fmt, backend)


@gpu
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_every_kernel_variant_agrees(fmt):
    from qgate.backends.triton import TritonBackend

    x = many_scales(40, 224, seed=9).to(torch.bfloat16)
    want = reference(x, fmt)
    for backend in (TritonBackend(force_int64=True), TritonBackend(div_mode=DIV_MODES[-1]),
                    TritonBackend(mx_blocks_per_program=16, nvfp4_blocks_per_program=32, num_warps=8),
                    TritonBackend(mx_blocks_per_program=256, nvfp4_blocks_per_program=512, num_warps=8),
                    TritonBackend(l2_reverse=True, row_warps=4)):
        assert_bit_exact(x, fmt, backend, want=want)


def _rows_for_scales(K: int, seed: int) -> torch.Tensor:
    """Rows that reach every case of the per-element path: normal and tiny scales (a row scale below
    2^-50 takes the 2^80 lift) side by side in one program, -0 and +0, rounding to -0, an all-zero
    row, NaN and Inf, a row of -0 only, a row of NaN and Inf only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, K, generator=g)
    x *= torch.tensor([1.0, 1e-20, 3.0, 1e-25, 1e3, 1e-16, 1.0, 1e-30, 2.0, 1.0, 1e-20, 1.0]).unsqueeze(1)
    x[0, :4] = torch.tensor([-0.0, 0.0, -1e-9, 1e-9])  # signed zeros and values that round to (signed) zero
    x[1, :3] = torch.tensor([-0.0, -1e-28, 1e-28])     # the same in a row that needs the lift
    x[2] = 0.0                                          # all zero: scale 1
    x[4, K // 2] = float("nan")
    x[5, -1] = float("inf")
    x[6, 0] = float("-inf")
    x[7, 1] = float("nan")                              # non-finite in a tiny row
    x[9] = -0.0
    x[11] = float("inf")                                # non-finite only: NaN, whatever the scale
    x[11, ::3] = float("-inf")
    x[11, 1::3] = float("nan")
    return x


@gpu
@pytest.mark.parametrize("div_mode", DIV_MODES)
@pytest.mark.parametrize("tile", [dict(ROWS=1, BLOCK_K=4096), dict(ROWS=4, BLOCK_K=4096), dict(ROWS=2, BLOCK_K=1024)])
def test_fp8_channel_one_load_and_two_loads_per_row(div_mode, tile):
    """K <= BLOCK_K: the row is loaded once and kept for both the amax and the quantization; K > BLOCK_K:
    read twice. Tiny and normal rows share programs, so the uniform lift branch runs for rows that do
    not need it (their lift is 1)."""
    from qgate.backends.triton import TritonBackend

    backend = TritonBackend(div_mode=div_mode, tiles={"fp8_row": dict(tile, num_warps=4)})
    for K, seed in ((300, 0), (1500, 1), (4096, 2)):
        x = _rows_for_scales(K, seed)
        for dtype in (torch.float32, torch.bfloat16):
            assert_bit_exact(x.to(dtype), "fp8_channel", backend)


@gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize("div_mode", DIV_MODES)
def test_tensor_scales_tiny_and_normal_with_signed_zeros_and_non_finite(fmt, div_mode):
    """One scale per tensor: the lift branch taken (tensor scale below 2^-50) or not, each with -0, values
    that round to -0, NaN and Inf (an NVFP4 block holding them is NaN through its scale)."""
    from qgate.backends.triton import TritonBackend

    backend = TritonBackend(div_mode=div_mode)
    for scale in (1.0, 1e-20, 1e-30):
        x = _rows_for_scales(64, 3)[[0, 2, 4, 5, 6, 9]] * scale
        x[1, :16] = torch.tensor([-0.0, -1e-3] * 8) * scale
        assert_bit_exact(x, fmt, backend)
        assert_bit_exact(x.to(torch.bfloat16), fmt, backend)
        finite = x.nan_to_num(0.0, 0.0, 0.0)
        assert_bit_exact(finite, fmt, backend)


@gpu
@pytest.mark.parametrize("div_mode", DIV_MODES)
def test_nvfp4_blocks_loaded_as_two_halves(div_mode):
    """HALVES tiles: tail blocks whose second half is empty, partly filled or full, a last program only
    partly filled, NaN/Inf in either half, many scales; the same bits as the reference."""
    from qgate.backends.triton import TritonBackend

    backend = TritonBackend(div_mode=div_mode, tiles={"nvfp4": {"R": 4, "num_warps": 2, "HALVES": 1}})
    g = torch.Generator().manual_seed(4)
    for last in (1, 7, 8, 9, 15, 16, 17, 25, 100):
        x = torch.randn(37, last, generator=g) * 5
        x[:, -1] = 100.0
        assert_bit_exact(x, "nvfp4", backend)
    x = many_scales(13, 96, seed=2)
    x[1, 3] = float("nan")    # first half of a block
    x[2, 45] = float("inf")   # second half of a block
    x[3, 16:32] = -0.0
    for dtype in DTYPES:
        assert_bit_exact(x.to(dtype), "nvfp4", backend)


@gpu
def test_nvfp4_block_pass_with_known_amax():
    from qgate.backends.triton import TritonBackend

    b = TritonBackend()
    x = torch.randn(64, 512, device=DEVICE, dtype=torch.bfloat16)
    amax = b.tensor_amax_bits(x)
    assert amax.view(torch.float32).item() == x.float().abs().max().item()
    assert torch.equal(_bits(b.nvfp4_block_pass(x, amax)), _bits(reference(x, "nvfp4")))


@gpu
def test_triton_is_the_default_on_cuda_and_fake_quantize_uses_it():
    from qgate.backends import fake_quantize

    assert get_backend(None, device="cuda").name == "triton"
    assert get_backend(None, device="cpu").name == "reference"
    x = torch.randn(32, 128, device=DEVICE, dtype=torch.bfloat16)
    got = fake_quantize(x, "mxfp4", backend=None if HAS_CUDA else "triton")
    assert got.device == x.device and got.dtype == torch.bfloat16
    assert torch.equal(_bits(got), _bits(reference(x, "mxfp4")))
    assert torch.equal(fake_quantize(x, "bf16"), x)


# --- CPU: no GPU here ------------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="checks the machine without a GPU")
def test_default_backend_without_cuda_is_reference():
    assert get_backend(None, device="cpu").name == "reference"
    assert get_backend(None, device="cuda").name == "reference"  # no device: the best available


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton is not installed")
def test_kernels_match_reference_in_the_triton_interpreter():
    """The same kernels, run on the CPU by Triton's interpreter (IEEE-division path), against the
    reference: every format, three dtypes, tails, many scales, non-finite blocks."""
    script = textwrap.dedent("""
        import torch
        from qgate.backends.reference import ReferenceBackend
        from qgate.backends.triton import TritonBackend
        from qgate.formats import ScaleKind, get_format, list_formats
        ref, tri = ReferenceBackend(), TritonBackend()
        g = torch.Generator().manual_seed(0)
        base = torch.randn(24, 96, generator=g) * torch.logspace(-30, 20, 24).unsqueeze(1)
        base[3, 5] = float("nan"); base[4, 40] = float("inf"); base[5, :32] = 0.0
        # tiny blocks: RCEIL's quotient amax / largest is subnormal; one quotient one ulp above 2^10
        tiny = torch.randn(4, 64, generator=g) * torch.tensor([1e-36, 3e-38, 1e-39, 5e-41]).unsqueeze(1)
        trap = torch.zeros(1, 32); trap[0, 0] = torch.tensor(448.0 * 2**10).nextafter(torch.tensor(1e30)); trap[0, 1] = 2.0
        cases = [base, torch.randn(5, 33, generator=g) * 3, torch.randn(2, 3, 17, generator=g), tiny, trap]
        float32_only = {id(tiny)}  # the interpreter's own bf16 conversion mishandles bf16 subnormals
        bad = []
        for f in list_formats():
            for x in cases:
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    if dtype != torch.float32 and id(x) in float32_only:
                        continue
                    xx = x.to(dtype)
                    if f.scale in (ScaleKind.E4M3_FP32, ScaleKind.FP32_TENSOR):
                        xx = xx[:1] if xx.dim() == 2 and xx.shape[0] == 24 else xx
                    a, b = tri.fake_quantize(xx, f), ref.fake_quantize(xx, f)
                    same = torch.equal(torch.nan_to_num(a.float(), nan=7.0), torch.nan_to_num(b.float(), nan=7.0))
                    if not same:
                        bad.append((f.name, str(dtype), tuple(xx.shape)))
        print("MISMATCHES", bad)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MISMATCHES []" in res.stdout, res.stdout[-3000:]


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA or INTERPRET, reason="needs triton and no GPU")
def test_triton_backend_refuses_cpu_tensors():
    from qgate.backends.triton import TritonBackend
    from qgate.errors import QgateError

    b = TritonBackend()
    assert not b.supports("cpu", torch.float32)
    with pytest.raises(QgateError, match="CUDA"):
        b.fake_quantize(torch.zeros(2, 32), get_format("mxfp4"))


def test_bruteforce_grid_is_the_element_grid_the_kernels_use():
    # the kernels' (EMIN, MBITS, MAX) per element type describe the same grid as the brute force
    for name, elem in [("e2m1", get_format("mxfp4").element), ("e4m3", get_format("fp8").element),
                       ("e5m2", get_format("mxfp8_e5m2").element), ("e3m2", get_format("mxfp6_e3m2").element),
                       ("e2m3", get_format("mxfp6_e2m3").element)]:
        values, _ = bruteforce.grid(name)
        smallest = 2.0 ** (elem.emin - elem.mbits)
        assert values[1] == smallest and values[-1] == elem.max_value
        assert np.all(np.diff(values) > 0)
