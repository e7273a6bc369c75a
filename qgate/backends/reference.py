"""The reference backend: pure torch, vectorized, CPU or CUDA. It is the numerics contract.

Every function here works in float32 on exact quantities: scales are powers of two or products
the contract defines as float32, divisions by powers of two are exact, and rounding is torch.round
(half to even). Exponents are read from the float's bits (frexp), never from a float log2.
"""

from __future__ import annotations

import torch

from qgate.backends.base import Backend
from qgate.formats import (
    E2M1,
    E4M3,
    ElementType,
    Format,
    ScaleKind,
)

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def true_div(a: torch.Tensor, constant: float) -> torch.Tensor:
    """a / constant as a true float32 division on every device.

    CUDA turns `tensor / python_float` into a multiplication by the reciprocal, which rounds
    differently; dividing by a tensor keeps the contract's arithmetic.
    """
    return a / a.new_tensor(constant)
NVFP4_BLOCK_SCALE_MIN = 2.0**-6  # smallest normal E4M3: block scales clamp here (torchao's rule)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(|a|)) read exactly from the float's exponent (int32). Zero gives -1; callers mask it."""
    return torch.frexp(a).exponent - 1


def exact_pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32, exact for every e in [-149, 127] (subnormal powers included).

    Built from float64 bit fields: float64 has the exponent range to hold 2^-149 as a normal number,
    and the cast to float32 is then exact.
    """
    bits = (e.to(torch.int64) + 1023) << 52
    return bits.view(torch.float64).to(torch.float32)


def round_to_element(v: torch.Tensor, elem: ElementType) -> torch.Tensor:
    """Round float32 `v` to the nearest value of `elem`: half to even, subnormals kept, saturating."""
    if elem.is_int:
        step = 2.0 ** (elem.mbits - 1)  # INT8 of MX: integer codes with an implied scale 2^-6
        return torch.clamp(torch.round(v * step), -127, 127) / step
    # The quantum of v's binade; below the normal range it is the fixed subnormal quantum.
    exp = torch.clamp(floor_log2(v), min=elem.emin, max=elem.emax)
    quantum = ((exp - elem.mbits + 127) << 23).view(torch.float32)  # normal float32: built from bits
    q = torch.round(v / quantum) * quantum
    return torch.clamp(q, -elem.max_value, elem.max_value)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """View x (float32) as [rows, n_blocks, block], zero-padding the tail block (zeros leave amax alone)."""
    last = x.shape[-1]
    rows = x.reshape(-1, last)
    pad = (-last) % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.view(rows.shape[0], -1, block), last


def _unblocks(blocks: torch.Tensor, last: int, shape: torch.Size) -> torch.Tensor:
    return blocks.reshape(blocks.shape[0], -1)[:, :last].reshape(shape)


def ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """ceil(log2(|a|)) read exactly from the float's bits (subnormals included); zero gives 0, callers mask it."""
    mantissa, exponent = torch.frexp(a)  # |mantissa| in [0.5, 1): a power of two has mantissa 0.5 exactly
    return exponent - (mantissa.abs() == 0.5).to(exponent.dtype)


def mx_shared_exponent(amax: torch.Tensor, elem: ElementType, rule: str = "floor") -> torch.Tensor:
    """The E8M0 shared scale exponent, clamped to E8M0's range.

    floor (OCP MX): floor(log2(amax)) - emax_elem; the largest values of a block may clip at the largest element.
    rceil (cuBLAS/ModelOpt): ceil(log2(amax / largest element)), the float32 quotient's exact exponent
    rounded up, so amax / scale never exceeds the largest element. Its top is 127 - emax_elem (FLOOR's own
    top), the largest scale at which every element stays finite in float32: above it, values saturate.
    """
    if rule == "rceil":
        return torch.clamp(ceil_log2(true_div(amax, elem.max_value)), E8M0_MIN_EXP, E8M0_MAX_EXP - elem.emax)
    return torch.clamp(floor_log2(amax) - elem.emax, E8M0_MIN_EXP, E8M0_MAX_EXP)


def quantize_mx_blocks(xb: torch.Tensor, elem: ElementType, rule: str = "floor"):
    """Quantize blocks [rows, n, block] -> (elements on the grid, shared exponents, non-finite block mask)."""
    amax = xb.abs().amax(dim=-1)
    bad = ~torch.isfinite(amax)
    shared = mx_shared_exponent(torch.where(bad, 0.0, amax), elem, rule)
    q = round_to_element(xb / exact_pow2(shared).unsqueeze(-1), elem)
    return q, shared, bad


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """s_tensor = amax(tensor) / (6 * 448) in float32, amax over the finite values."""
    finite_abs = torch.where(torch.isfinite(x), x.abs(), 0.0)
    return true_div(finite_abs.amax(), E2M1.max_value * E4M3.max_value)


def nvfp4_block_scale(block_amax: torch.Tensor, s_tensor: torch.Tensor) -> torch.Tensor:
    """s_block = e4m3(clamp((amax_block / 6) / s_tensor, 2^-6, 448)), as float32 values."""
    ratio = true_div(block_amax, E2M1.max_value) / s_tensor
    return round_to_element(torch.clamp(ratio, NVFP4_BLOCK_SCALE_MIN, E4M3.max_value), E4M3)


def quantize_nvfp4_blocks(xb: torch.Tensor, s_tensor: torch.Tensor):
    """Blocks [rows, n, 16] -> (E2M1 elements, E4M3 block scales, total float32 scale per block, non-finite mask)."""
    amax = xb.abs().amax(dim=-1)
    bad = ~torch.isfinite(amax)
    safe_t = torch.where(s_tensor > 0, s_tensor, 1.0)  # an all-zero tensor: any scale gives zeros
    s_block = nvfp4_block_scale(torch.where(bad, 0.0, amax), safe_t)
    total = (s_block * safe_t).unsqueeze(-1)  # one float32 scale per block, for quantizing and dequantizing
    q = round_to_element(xb / total, E2M1)
    return q, s_block, total, bad


def fp8_scales(rows: torch.Tensor, per_row: bool) -> torch.Tensor:
    """s = amax / 448 (float32), over finite values, per tensor or per row; zero amax -> scale 1."""
    finite_abs = torch.where(torch.isfinite(rows), rows.abs(), 0.0)
    amax = finite_abs.amax(dim=-1, keepdim=True) if per_row else finite_abs.amax().reshape(1, 1)
    s = true_div(amax, E4M3.max_value)
    return torch.where(s > 0, s, 1.0)


def _fake_quantize_f32(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    if fmt.scale is ScaleKind.E8M0:
        xb, last = _blocks(x, fmt.block_size)
        q, shared, bad = quantize_mx_blocks(xb, fmt.element, fmt.scale_rule)
        out = q * exact_pow2(shared).unsqueeze(-1)
        out = torch.where(bad.unsqueeze(-1), float("nan"), out)
        return _unblocks(out, last, x.shape)
    if fmt.scale is ScaleKind.E4M3_FP32:
        s_tensor = nvfp4_tensor_scale(x)
        xb, last = _blocks(x, fmt.block_size)
        q, _, total, bad = quantize_nvfp4_blocks(xb, s_tensor)
        out = q * total
        out = torch.where(bad.unsqueeze(-1), float("nan"), out)
        return _unblocks(out, last, x.shape)
    if fmt.scale in (ScaleKind.FP32_TENSOR, ScaleKind.FP32_CHANNEL):
        rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        s = fp8_scales(rows, per_row=fmt.scale is ScaleKind.FP32_CHANNEL)
        out = round_to_element(rows / s, fmt.element) * s
        out = torch.where(torch.isfinite(rows), out, float("nan"))
        return out.reshape(x.shape)
    raise AssertionError(f"unhandled scale kind {fmt.scale.value}")


class ReferenceBackend(Backend):
    """Pure torch: the definition of every format. Runs wherever torch runs."""

    name = "reference"

    def supports(self, device, dtype) -> bool:
        return dtype in (torch.float32, torch.float16, torch.bfloat16)

    def fake_quantize(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        if fmt.scale is ScaleKind.NONE:
            return x.clone()
        if x.numel() == 0:
            return x.clone()
        return _fake_quantize_f32(x.to(torch.float32), fmt).to(x.dtype)
