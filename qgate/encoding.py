"""Real encodings: element codes packed to their bit width, plus the scales, and back.

`decode(encode(x, fmt))` equals `fake_quantize(x, fmt)` bit for bit, and the packed size is the
format's effective bits per value (FP4 two codes per byte, FP6 four codes per three bytes).
The element grid and the scales come from the reference backend, so there is one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qgate.backends import reference as ref
from qgate.formats import (
    E4M3,
    ElementType,
    Format,
    ScaleKind,
    get_format,
)

E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_NAN = 0x7F


@dataclass
class Encoded:
    format: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes: torch.Tensor                 # uint8, element codes packed to the element's bit width
    scales: torch.Tensor | None         # uint8 per block: E8M0 exponent or E4M3 code
    tensor_scales: torch.Tensor | None  # float32: NVFP4/fp8 one per tensor, fp8_channel one per row

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.tensor_scales) if t is not None)


# --- element codes ---------------------------------------------------------------------------

def element_to_code(q: torch.Tensor, elem: ElementType) -> torch.Tensor:
    """Code (int32: sign | exponent field | mantissa) of values already on the element grid."""
    if elem.is_int:
        return torch.round(q * 2.0 ** (elem.mbits - 1)).to(torch.int32) & 0xFF
    sign = torch.signbit(q).to(torch.int32) << (elem.ebits + elem.mbits)
    a = q.abs()
    e = torch.clamp(ref.floor_log2(a), min=elem.emin)
    subnormal = a < 2.0**elem.emin
    mant_sub = a / ref.exact_pow2(torch.full_like(e, elem.emin - elem.mbits))
    mant_norm = a / ref.exact_pow2(e - elem.mbits) - 2**elem.mbits
    mant = torch.where(subnormal, mant_sub, mant_norm).to(torch.int32)
    exp_field = torch.where(subnormal, 0, e + elem.bias)
    return sign | (exp_field << elem.mbits) | mant


def code_to_element(code: torch.Tensor, elem: ElementType) -> torch.Tensor:
    code = code.to(torch.int32)
    if elem.is_int:
        signed = torch.where(code >= 128, code - 256, code)
        return signed.to(torch.float32) / 2.0 ** (elem.mbits - 1)
    mant = code & ((1 << elem.mbits) - 1)
    exp_field = (code >> elem.mbits) & ((1 << elem.ebits) - 1)
    negative = (code >> (elem.ebits + elem.mbits)) & 1
    subnormal = exp_field == 0
    significand = torch.where(subnormal, mant, mant + (1 << elem.mbits)).to(torch.float32)
    exponent = torch.where(subnormal, elem.emin, exp_field - elem.bias) - elem.mbits
    value = significand * ref.exact_pow2(exponent)
    return torch.where(negative.bool(), -value, value)


# --- bit packing -----------------------------------------------------------------------------

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat int tensor of `bits`-wide codes into bytes, first code in the lowest bits."""
    c = codes.reshape(-1).to(torch.int32)
    if bits == 8:
        return c.to(torch.uint8)
    if bits == 4:
        c = c.view(-1, 2)
        return (c[:, 0] | (c[:, 1] << 4)).to(torch.uint8)
    if bits == 6:
        c = c.view(-1, 4)
        word = c[:, 0] | (c[:, 1] << 6) | (c[:, 2] << 12) | (c[:, 3] << 18)
        return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=1).reshape(-1).to(torch.uint8)
    raise ValueError(f"no packing for {bits}-bit codes")


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    p = packed.to(torch.int32)
    if bits == 8:
        return p[:count]
    if bits == 4:
        return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:count]
    if bits == 6:
        b = p.view(-1, 3)
        word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], dim=1).reshape(-1)[:count]
    raise ValueError(f"no packing for {bits}-bit codes")


# --- encode / decode -------------------------------------------------------------------------

def encode(x: torch.Tensor, fmt: Format | str) -> Encoded:
    fmt = get_format(fmt)
    shape, dtype = tuple(x.shape), x.dtype
    if fmt.scale is ScaleKind.NONE:
        raw = x.contiguous().reshape(-1).view(torch.uint8)
        return Encoded(fmt.name, shape, dtype, raw.clone(), None, None)
    xf = x.to(torch.float32)
    elem = fmt.element
    if fmt.scale in (ScaleKind.FP32_TENSOR, ScaleKind.FP32_CHANNEL):
        rows = xf.reshape(-1, xf.shape[-1])
        s = ref.fp8_scales(rows, per_row=fmt.scale is ScaleKind.FP32_CHANNEL)
        codes = element_to_code(ref.round_to_element(rows / s, elem), elem)
        codes = torch.where(torch.isfinite(rows), codes, E4M3_NAN)
        return Encoded(fmt.name, shape, dtype, pack(codes, elem.bits), None, s.reshape(-1).clone())
    xb, _ = ref._blocks(xf, fmt.block_size)
    if fmt.scale is ScaleKind.E8M0:
        q, shared, bad = ref.quantize_mx_blocks(xb, elem, fmt.scale_rule)
        scales = torch.where(bad, E8M0_NAN, shared + E8M0_BIAS).to(torch.uint8)
        tensor_scales = None
    elif fmt.scale is ScaleKind.E4M3_FP32:
        s_tensor = ref.nvfp4_tensor_scale(xf)
        q, s_block, _, bad = ref.quantize_nvfp4_blocks(xb, s_tensor)
        scales = torch.where(bad, E4M3_NAN, element_to_code(s_block, E4M3)).to(torch.uint8)
        tensor_scales = s_tensor.reshape(1).clone()
    else:
        raise AssertionError(fmt.scale.value)
    codes = element_to_code(torch.where(bad.unsqueeze(-1), 0.0, q), elem)
    return Encoded(fmt.name, shape, dtype, pack(codes, elem.bits), scales.reshape(-1), tensor_scales)


def decode(enc: Encoded) -> torch.Tensor:
    fmt = get_format(enc.format)
    shape = torch.Size(enc.shape)
    if fmt.scale is ScaleKind.NONE:
        return enc.codes.view(enc.dtype).reshape(shape).clone()
    elem = fmt.element
    last = shape[-1] if len(shape) else 1
    n_rows = shape.numel() // last if last else 0
    if fmt.scale in (ScaleKind.FP32_TENSOR, ScaleKind.FP32_CHANNEL):
        codes = unpack(enc.codes, elem.bits, shape.numel()).view(n_rows, last)
        s = enc.tensor_scales.view(-1, 1)
        out = code_to_element(codes, elem) * s
        out = torch.where(codes == E4M3_NAN, float("nan"), out)
        return out.reshape(shape).to(enc.dtype)
    block = fmt.block_size
    n_blocks = -(-last // block)
    codes = unpack(enc.codes, elem.bits, n_rows * n_blocks * block).view(n_rows, n_blocks, block)
    q = code_to_element(codes, elem)
    if fmt.scale is ScaleKind.E8M0:
        e = enc.scales.view(n_rows, n_blocks).to(torch.int32)
        out = q * ref.exact_pow2(e - E8M0_BIAS).unsqueeze(-1)
        bad = e == E8M0_NAN
    else:
        sc = enc.scales.view(n_rows, n_blocks)
        total = code_to_element(sc, E4M3) * enc.tensor_scales
        out = q * total.unsqueeze(-1)
        bad = sc == E4M3_NAN
    out = torch.where(bad.unsqueeze(-1), float("nan"), out)
    return ref._unblocks(out, last, shape).to(enc.dtype)
