"""The triton backend: one fused pass per tensor on a CUDA device, bit for bit equal to the reference.

How each format runs (reads and writes of the tensor in device memory):

* MX (all six element types): one kernel. Each program loads R blocks of 32 values, takes each
  block's amax as the integer maximum of |x|'s bit patterns (exact, and NaN/Inf sort above every
  finite value, so one reduction also flags non-finite blocks), reads floor(log2(amax)) from the
  exponent field, scales by an exact power of two, rounds to the element grid and writes back.
  One read, one write.
* NVFP4: a per-tensor amax pass (read), then the fused block pass (read + write). A tile may load
  each block as its two halves (HALVES) so that one thread holds a whole block and computes its
  scale alone.
* fp8 (per tensor): the same amax pass, then an elementwise pass.
* fp8_channel: a few rows per program. A row that fits one column step (K <= BLOCK_K) is loaded once
  and kept in registers for its amax and its quantization; a longer row is read twice, the second
  time mostly from L2.

NVFP4 and fp8 work on |x| (the bits without the sign) through the quotient and the rounding and put
x's sign back on the result with one logic op; the 2^80 lift of tiny scales (below) is a branch that
is uniform over a program, not a multiply per value; a non-finite NVFP4 block is made NaN through
its dequantization scale (one select per block), and with the residual division a non-finite fp8
value becomes NaN through the quotient itself (Inf - Inf in the residual), with no select per value.

Tile shapes (blocks or rows per program, warps) are chosen per GPU model (qgate.backends.triton_tuning);
no reduction that sets a scale spans more than one block or one row, and each is an exact integer
maximum, so the tile never changes a bit of the output.

Bit-exactness, and why it holds:

* Rounding to an element grid is done as (|v| + C) - C with C = quantum * 2^23, a power of two
  built from |v|'s exponent bits: the addition rounds half-to-even at exactly the quantum, the
  subtraction is exact. This is the reference's round(v / quantum) * quantum, computed without
  a division. |v| is clamped to the element maximum first (the same as rounding then clamping,
  since rounding is monotonic and the maximum lies on the grid).
* Scaling by 2^-shared instead of dividing by 2^shared gives the same correctly rounded value.
* Divisions that the contract defines as float32 divisions (NVFP4's amax/6 and /s_tensor, x/s)
  are IEEE divisions: `div_rn`, or for the per-element x / scale a reciprocal followed by one
  exact residual correction (Markstein: with r = RN(1/b) and q0 = RN(x*r), q0 + RN(x - q0*b)*r
  rounded once is RN(x/b)). Tiny scales are first multiplied by 2^80 together with x, which
  leaves the quotient unchanged and keeps the residual out of the subnormal range.
* NVFP4 ties: x / (s_block * s_tensor) is rounded to float32 first, then to E2M1; a value whose
  float32 quotient lands exactly on a midpoint between two E2M1 values goes to the even one,
  exactly as the reference does. Dividing by the product (not multiplying by a reciprocal, as
  torchao does) is the contract; the two can differ on such ties only.
* Kernels are compiled without contracting a*b+c into FMA, so every multiply and add rounds
  where the reference rounds.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch
import triton
import triton.language as tl

from qgate.backends.base import Backend
from qgate.backends.triton_tuning import configs_for
from qgate.errors import UsageError
from qgate.formats import (
    E2M1,
    E4M3,
    ElementType,
    Format,
    ScaleKind,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch options: no FMA contraction (the reference rounds every product). The interpreter takes none.
_LAUNCH = {} if _INTERPRET else {"enable_fp_fusion": False}

# Division modes for the per-element x / scale of NVFP4 and fp8.
DIV_RN = 0          # IEEE division per element
DIV_MARKSTEIN = 1   # reciprocal per block + one exact residual correction (same result, fewer ops)

# Tile shapes per GPU model: qgate.backends.triton_tuning. The elementwise fp8 pass keeps one shape.
ELEMENTWISE_BLOCK = 2048
ELEMENTWISE_WARPS = 4
L2_REVERSE = False


@triton.jit
def _pow2(e):
    """2**e as float32 for integer e in [-127, 127] (2^-127 is subnormal: built separately)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    sub = tl.full(e.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


@triton.jit
def _round_abs_to_element(a, EMIN: tl.constexpr, MBITS: tl.constexpr, MAXV: tl.constexpr, IS_INT: tl.constexpr,
                          NAN_THROUGH: tl.constexpr):
    """Round float32 a >= 0 to the element grid: half to even, subnormals kept, saturating at MAXV.
    NAN_THROUGH: a NaN stays NaN (else the saturation may turn it into MAXV)."""
    if NAN_THROUGH:
        a = tl.minimum(a, MAXV, propagate_nan=tl.PropagateNan.ALL)
    else:
        a = tl.minimum(a, MAXV)
    if IS_INT:
        # INT8 of MX: a fixed quantum of 2^-(MBITS-1); C = quantum * 2^23
        c = tl.full(a.shape, (127 + 23 - (MBITS - 1)) << 23, tl.int32).to(tl.float32, bitcast=True)
    else:
        # the quantum of a's binade (fixed below the normal range), times 2^23
        ebits = tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, (EMIN + 127) << 23)
        c = (ebits + ((23 - MBITS) << 23)).to(tl.float32, bitcast=True)
    return (a + c) - c


@triton.jit
def _round_to_element(v, EMIN: tl.constexpr, MBITS: tl.constexpr, MAXV: tl.constexpr, IS_INT: tl.constexpr):
    """Round float32 v to the element grid: half to even, subnormals kept, saturating at MAXV."""
    bits = v.to(tl.int32, bitcast=True)
    r = _round_abs_to_element((bits & 0x7FFFFFFF).to(tl.float32, bitcast=True), EMIN, MBITS, MAXV, IS_INT, False)
    return _with_sign(r, bits)


@triton.jit
def _with_sign(y, bits):
    """y (sign bit clear) with the sign bit of the int32 bit pattern `bits`: one 3-input logic op."""
    return (y.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _to_output(y, out_ty: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round float32 y to the output dtype (half to even). SOFT_BF16: done on the bits, for the
    CPU interpreter, whose own float32 -> bfloat16 cast truncates."""
    if SOFT_BF16 and out_ty == tl.bfloat16:
        bits = y.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, 0x7FC0, rounded)
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(out_ty)


@triton.jit
def _abs_quotient(a, b, nb, r, DIV_MODE: tl.constexpr):
    """RN(a / b) for float32 a >= 0, b > 0 normal, nb = -b, r = RN(1 / b).

    Callers divide |x| and put x's sign back on the rounded result once: RN is symmetric, and a = +0
    gives q0 = +0, a residual +0 and +0, so no signed zero needs restoring here. The residual takes
    -b (negated once per scale) rather than -q0: no negation per element.
    Non-finite a: DIV_MODE 0 gives Inf for Inf; DIV_MODE 1 gives NaN for both NaN and Inf (the
    residual of Inf is Inf - Inf)."""
    if DIV_MODE == 0:
        return tl.math.div_rn(a, b)
    else:
        q0 = a * r
        res = tl.fma(q0, nb, a)  # exact
        return tl.fma(res, r, q0)


@triton.jit
def _lifted_quotient(a, b, nb, r, lift, any_lift, DIV_MODE: tl.constexpr):
    """RN(a / b) where b and r were computed on scale * lift: lift is 2^80 for tiny scales (the
    quotient of a * 2^80 by scale * 2^80: the same value, no subnormal residual), else 1. The tiny
    case is rare and `any_lift` (a scalar: some lift of this program is not 1) is uniform over the
    program, so it is a branch around the one multiply, not a multiply on every element."""
    if any_lift:
        a = a * lift
    return _abs_quotient(a, b, nb, r, DIV_MODE)


@triton.jit
def _block_tile(pid, n_blocks, K, blocks_per_row, BLOCK: tl.constexpr, R: tl.constexpr,
                EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, INT64: tl.constexpr, WIDTH: tl.constexpr):
    """Offsets [R, WIDTH] of the first WIDTH values of the R blocks program `pid` owns (WIDTH = BLOCK:
    the whole blocks), and the mask of the real elements."""
    if INT64:
        blk = pid.to(tl.int64) * R + tl.arange(0, R).to(tl.int64)
    else:
        blk = pid * R + tl.arange(0, R)
    j = tl.arange(0, WIDTH)
    if EVEN_K:  # the last dimension is a whole number of blocks: blocks are contiguous in memory
        offs = blk[:, None] * BLOCK + j[None, :]
        if EVEN_N:  # a constant mask, folded away by the compiler
            mask = tl.full([R, WIDTH], 1, tl.int1)
        else:
            mask = (blk[:, None] < n_blocks) & (j[None, :] < WIDTH)
    else:  # a tail block per row: index (row, column block) and mask the padding
        row = blk // blocks_per_row
        col = (blk % blocks_per_row) * BLOCK
        offs = row[:, None] * K + col[:, None] + j[None, :]
        mask = ((col[:, None] + j[None, :]) < K) & (blk[:, None] < n_blocks)
    return offs, mask


@triton.jit
def _second_half_mask(pid, n_blocks, K, blocks_per_row, BLOCK: tl.constexpr, R: tl.constexpr,
                      EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, INT64: tl.constexpr, first_mask):
    """The mask of the second halves [R, BLOCK/2] of the blocks whose first halves `first_mask` masks."""
    if EVEN_K:  # whole blocks: the second half is there wherever the first is
        return first_mask
    else:
        if INT64:
            blk = pid.to(tl.int64) * R + tl.arange(0, R).to(tl.int64)
        else:
            blk = pid * R + tl.arange(0, R)
        col = (blk % blocks_per_row) * BLOCK + BLOCK // 2
        j = tl.arange(0, BLOCK // 2)
        return ((col[:, None] + j[None, :]) < K) & (blk[:, None] < n_blocks)


@triton.jit
def _mx_kernel(x_ptr, y_ptr, n_blocks, K, blocks_per_row,
               EMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr, MAXV: tl.constexpr,
               IS_INT: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr,
               EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, INT64: tl.constexpr, SOFT_BF16: tl.constexpr,
               RCEIL: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = _block_tile(pid, n_blocks, K, blocks_per_row, BLOCK, R, EVEN_K, EVEN_N, INT64, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # amax as the integer max of |x|'s bits: exact; Inf and NaN compare above every finite value
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    bad = amax_bits >= 0x7F800000
    if RCEIL:
        # ceil(log2(amax / MAXV)) from the float32 quotient's bits: the exponent, plus one unless a power of two
        d_bits = tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), MAXV).to(tl.int32, bitcast=True)
        mant = d_bits & 0x7FFFFF
        e_field = d_bits >> 23
        # a subnormal quotient (exponent field 0) lies in (0, 2^-126): ceil is -126 above 2^-127, else <= -127
        e = tl.where(e_field > 0, e_field - 127 + (mant != 0).to(tl.int32), tl.where(mant > 0x400000, -126, -127))
        shared = tl.minimum(tl.maximum(e, -127), 127 - EMAX)  # the top keeps MAXV * 2^shared finite
    else:
        # floor(log2(amax)) from the exponent field; zero and subnormal amax clamp to -127 either way
        shared = tl.minimum(tl.maximum((amax_bits >> 23) - 127 - EMAX, -127), 127)
    v = x * _pow2(-shared)[:, None]  # exact: a power of two (rounds like the division when tiny)
    q = _round_to_element(v, EMIN, MBITS, MAXV, IS_INT)
    y = q * _pow2(shared)[:, None]   # exact: few significant bits times a power of two
    y = tl.where(bad[:, None], float("nan"), y)
    tl.store(y_ptr + offs, _to_output(y, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _amax_finite_kernel(x_ptr, amax_ptr, n, BLOCK: tl.constexpr, TILES: tl.constexpr, INT64: tl.constexpr):
    """Max of |x| over the finite values, as float32 bits, folded into *amax_ptr (int32, zeroed).

    Each program reduces TILES consecutive tiles (unrolled, so their loads are all in flight)
    and makes one atomic: few atomics on the one address."""
    pid = tl.program_id(0)
    if INT64:
        start = pid.to(tl.int64) * (BLOCK * TILES)
    else:
        start = pid * (BLOCK * TILES)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for t in tl.static_range(TILES):
        offs = start + t * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        acc = tl.maximum(acc, tl.where(bits < 0x7F800000, bits, 0))
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0))


@triton.jit
def _tensor_scale(amax_ptr, DIVISOR: tl.constexpr):
    """float32 amax / DIVISOR (IEEE division); a zero scale becomes 1 (an all-zero tensor)."""
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    s = tl.math.div_rn(amax, DIVISOR)
    return tl.where(s > 0, s, 1.0)


# Tensor and row scales below 2^-50 take the quotient on values and scale multiplied by 2^80.
# (Literals inside the kernels: 8.881784197001252e-16 = 2^-50, 1.2089258196146292e+24 = 2^80.)


@triton.jit
def _nvfp4_values(x, total_l, recip, total_y, lift, tiny, DIV_MODE: tl.constexpr):
    """E2M1 fake quantization of float32 x [R, n] with per-block scales [R]: worked on |x| (the bits
    without the sign), the sign put back on the result. total_y: the scale to dequantize with (NaN for
    a block holding NaN or Inf: any q times NaN is NaN, one select per block instead of per value)."""
    bits = x.to(tl.int32, bitcast=True)
    a = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    v = _lifted_quotient(a, total_l[:, None], -total_l[:, None], recip[:, None], lift, tiny, DIV_MODE)
    q = _round_abs_to_element(v, 0, 1, 6.0, False, False)  # E2M1
    return _with_sign(q * total_y[:, None], bits)


@triton.jit
def _nvfp4_kernel(x_ptr, y_ptr, amax_ptr, n_blocks, K, blocks_per_row,
                  BLOCK: tl.constexpr, R: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                  INT64: tl.constexpr, DIV_MODE: tl.constexpr, SOFT_BF16: tl.constexpr, REVERSE: tl.constexpr,
                  HALVES: tl.constexpr):
    """HALVES: each block is loaded as two tiles of BLOCK/2 columns (its first and second halves). A
    16-byte load holds 8 bf16 values, so with one [R, 16] tile two threads share every block and each
    computes the block's scale; with two [R, 8] tiles one thread holds the whole block and computes
    its scale alone (half the per-block work per thread, at the price of two loads and two stores per
    block that each fill half of a 32-byte sector)."""
    pid = tl.program_id(0)
    if REVERSE:  # start where the amax pass ended: that part of the tensor may still be in L2
        pid = tl.num_programs(0) - 1 - pid
    s_tensor = _tensor_scale(amax_ptr, 2688.0)  # 6 * 448
    tiny = s_tensor < 8.881784197001252e-16
    lift = tl.where(tiny, 1.2089258196146292e+24, 1.0)
    if HALVES:
        offs, mask = _block_tile(pid, n_blocks, K, blocks_per_row, BLOCK, R, EVEN_K, EVEN_N, INT64, BLOCK // 2)
        offs_hi = offs + BLOCK // 2
        mask_hi = _second_half_mask(pid, n_blocks, K, blocks_per_row, BLOCK, R, EVEN_K, EVEN_N, INT64, mask)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + offs_hi, mask=mask_hi, other=0.0).to(tl.float32)
        amax_bits = tl.maximum(tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1),
                               tl.max(x_hi.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1))
    else:
        offs, mask = _block_tile(pid, n_blocks, K, blocks_per_row, BLOCK, R, EVEN_K, EVEN_N, INT64, BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    bad = amax_bits >= 0x7F800000
    amax = tl.where(bad, 0, amax_bits).to(tl.float32, bitcast=True)
    ratio = tl.math.div_rn(tl.math.div_rn(amax, 6.0), s_tensor)
    ratio = tl.minimum(tl.maximum(ratio, 0.015625), 448.0)
    s_block = _round_abs_to_element(ratio, -6, 3, 448.0, False, False)  # E4M3, RNE (ratio > 0)
    total = s_block * s_tensor
    total_l = total * lift
    recip = tl.math.div_rn(1.0, total_l)
    total_y = tl.where(bad, float("nan"), total)
    y = _nvfp4_values(x, total_l, recip, total_y, lift, tiny, DIV_MODE)
    tl.store(y_ptr + offs, _to_output(y, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)
    if HALVES:
        y_hi = _nvfp4_values(x_hi, total_l, recip, total_y, lift, tiny, DIV_MODE)
        tl.store(y_ptr + offs_hi, _to_output(y_hi, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask_hi)


@triton.jit
def _fp8_values(x, s, s_l, recip, lift, any_lift, DIV_MODE: tl.constexpr):
    """fp8 (E4M3) fake quantization of float32 x with the scale s (s_l = s * lift, recip = RN(1 / s_l)).
    NaN and Inf become NaN: with DIV_MODE 1 the quotient of either is NaN already and the rounding
    keeps it (no compare and select per element); with DIV_MODE 0 a select does it."""
    bits = x.to(tl.int32, bitcast=True)
    abits = bits & 0x7FFFFFFF
    v = _lifted_quotient(abits.to(tl.float32, bitcast=True), s_l, -s_l, recip, lift, any_lift, DIV_MODE)
    y = _with_sign(_round_abs_to_element(v, -6, 3, 448.0, False, DIV_MODE == 1) * s, bits)
    if DIV_MODE == 0:
        y = tl.where(abits < 0x7F800000, y, float("nan"))
    return y


@triton.jit
def _fp8_tensor_kernel(x_ptr, y_ptr, amax_ptr, n, BLOCK: tl.constexpr, INT64: tl.constexpr,
                       DIV_MODE: tl.constexpr, SOFT_BF16: tl.constexpr, REVERSE: tl.constexpr):
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    s = _tensor_scale(amax_ptr, 448.0)
    tiny = s < 8.881784197001252e-16
    lift = tl.where(tiny, 1.2089258196146292e+24, 1.0)
    s_l = s * lift
    recip = tl.math.div_rn(1.0, s_l)
    if INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _fp8_values(x, s, s_l, recip, lift, tiny, DIV_MODE)
    tl.store(y_ptr + offs, _to_output(y, y_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _row_scales(amax_bits):
    """Per row: s = amax / 448 (1 for an all-zero row), the lift, s * lift, RN(1 / (s * lift)) and
    whether any row of the program needs the lift."""
    s = tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), 448.0)
    s = tl.where(s > 0, s, 1.0)
    tiny = s < 8.881784197001252e-16
    lift = tl.where(tiny, 1.2089258196146292e+24, 1.0)
    s_l = s * lift
    recip = tl.math.div_rn(1.0, s_l)
    return s[:, None], s_l[:, None], recip[:, None], lift[:, None], tl.max(tiny.to(tl.int32), axis=0) > 0


@triton.jit
def _fp8_row_kernel(x_ptr, y_ptr, n_rows, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                    INT64: tl.constexpr, DIV_MODE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """ROWS rows per program: each row's amax over its finite values, then quantize with s = amax / 448.
    A row that fits one column step (K_TILES == 1) is loaded once and kept in registers for both;
    a longer row is read twice, the second time mostly from L2."""
    if INT64:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    else:
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    base = rows * K
    cols = tl.arange(0, BLOCK_K)
    if K_TILES == 1:
        m = row_ok[:, None] & (cols < K)[None, :]
        offs = base[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        # the max over finite |x| in one add per value: |x|'s bits + 2^23 stay positive for finite values
        # and wrap to negative for Inf and NaN (above 0x7F7FFFFF), so a signed max passes over them;
        # a row of non-finite values only has a negative max, and masked values (0) give 2^23: amax 0
        top = tl.max((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) + 0x00800000, axis=1)
        s, s_l, recip, lift, any_lift = _row_scales(tl.where(top > 0, top - 0x00800000, 0))
        y = _fp8_values(x, s, s_l, recip, lift, any_lift, DIV_MODE)
        tl.store(y_ptr + offs, _to_output(y, y_ptr.dtype.element_ty, SOFT_BF16), mask=m)
    else:
        acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.int32)
        for t in range(K_TILES):
            k0 = t * BLOCK_K
            m = row_ok[:, None] & ((k0 + cols) < K)[None, :]
            x = tl.load(x_ptr + base[:, None] + k0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            acc = tl.maximum(acc, tl.where(bits < 0x7F800000, bits, 0))
        # exact: an integer max, whatever BLOCK_K is
        s, s_l, recip, lift, any_lift = _row_scales(tl.max(acc, axis=1))
        for t in range(K_TILES):
            k0 = t * BLOCK_K
            m = row_ok[:, None] & ((k0 + cols) < K)[None, :]
            offs = base[:, None] + k0 + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            y = _fp8_values(x, s, s_l, recip, lift, any_lift, DIV_MODE)
            tl.store(y_ptr + offs, _to_output(y, y_ptr.dtype.element_ty, SOFT_BF16), mask=m)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TritonBackend(Backend):
    """Fused Triton kernels for every format; CUDA tensors of float32, float16 or bfloat16.

    Tile shapes come per GPU model from qgate.backends.triton_tuning (a measured sweep, else the
    built-in table); ``tiles`` ({kernel: config}) or the single-value arguments override them. A tile
    never changes the result, only the speed."""

    name = "triton"

    def __init__(self, div_mode: int | None = None, mx_blocks_per_program: int | None = None,
                 nvfp4_blocks_per_program: int | None = None, num_warps: int | None = None,
                 force_int64: bool = False, l2_reverse: bool = L2_REVERSE, row_warps: int | None = None,
                 tiles: dict[str, dict[str, int]] | None = None):
        # The interpreter (CPU) has no true fused multiply-add, so it checks the IEEE-division path.
        self.div_mode = (DIV_RN if _INTERPRET else DIV_MARKSTEIN) if div_mode is None else div_mode
        self.force_int64 = force_int64  # 64-bit offsets even for small tensors (tests of that path)
        self.l2_reverse = l2_reverse  # second pass of NVFP4/fp8 walks the tensor backwards
        self.overrides: dict[str, dict[str, int]] = {k: dict(v) for k, v in (tiles or {}).items()}
        for kernel, key, value in (("mx", "R", mx_blocks_per_program), ("mx_rceil", "R", mx_blocks_per_program),
                                   ("nvfp4", "R", nvfp4_blocks_per_program), ("mx", "num_warps", num_warps),
                                   ("mx_rceil", "num_warps", num_warps), ("nvfp4", "num_warps", num_warps),
                                   ("fp8_row", "num_warps", row_warps)):
            if value is not None:
                self.overrides.setdefault(kernel, {})[key] = value
        self._by_device: dict[Any, dict[str, dict[str, int]]] = {}

    def tiles(self, device: torch.device | str | None = None) -> dict[str, dict[str, int]]:
        """kernel -> tile config used on ``device`` (default: the current CUDA device)."""
        dev = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        if dev not in self._by_device:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
            tuned = configs_for(name)
            self._by_device[dev] = {k: dict(tuned[k], **self.overrides.get(k, {})) for k in tuned}
        return self._by_device[dev]

    def _int64(self, numel: int, tile: int) -> bool:
        return self.force_int64 or numel + tile >= 2**31

    def available(self) -> bool:
        return _INTERPRET or torch.cuda.is_available()

    def supports(self, device, dtype) -> bool:
        dev = torch.device(device)
        return (dev.type == "cuda" or (_INTERPRET and dev.type == "cpu")) and dtype in (
            torch.float32, torch.float16, torch.bfloat16)

    def fake_quantize(self, x: torch.Tensor, fmt: Format, out: torch.Tensor | None = None) -> torch.Tensor:
        """Same shape and dtype as x. `out` (contiguous, x's shape and dtype) receives the result if given."""
        if not self.supports(x.device, x.dtype):
            raise UsageError(f"the triton backend takes CUDA float32/float16/bfloat16 tensors, got {x.dtype} on {x.device}")
        if fmt.scale is ScaleKind.NONE or x.numel() == 0:
            return x.clone() if out is None else out.copy_(x)
        src = x.contiguous()
        K = src.shape[-1] if src.dim() else 1
        if out is None:
            out = torch.empty_like(src, memory_format=torch.contiguous_format)
        elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
            raise UsageError("out= must be a contiguous tensor of the input's shape, dtype and device")
        with torch.cuda.device(src.device) if src.is_cuda else nullcontext():
            if fmt.scale is ScaleKind.E8M0:
                self._mx(src, out, K, fmt.element, fmt.block_size, rceil=fmt.scale_rule == "rceil")
            elif fmt.scale is ScaleKind.E4M3_FP32:
                self._nvfp4(src, out, K, fmt.block_size)
            elif fmt.scale is ScaleKind.FP32_TENSOR:
                self._fp8_tensor(src, out)
            elif fmt.scale is ScaleKind.FP32_CHANNEL:
                self._fp8_rows(src, out, K)
            else:
                raise UsageError(f"the triton backend has no kernel for scale kind {fmt.scale.value!r} ({fmt.name})")
        return out

    # -- launches ---------------------------------------------------------------------------

    def _block_geometry(self, numel: int, K: int, block: int, r: int) -> dict:
        rows = numel // K
        per_row = _cdiv(K, block)
        n_blocks = rows * per_row
        return dict(n_blocks=n_blocks, blocks_per_row=per_row, EVEN_K=K % block == 0,
                    EVEN_N=n_blocks % r == 0, INT64=self._int64(numel + K, block * r))

    def _mx(self, src, out, K, elem: ElementType, block: int, rceil: bool = False) -> None:
        t = self.tiles(src.device)["mx_rceil" if rceil else "mx"]
        g = self._block_geometry(src.numel(), K, block, t["R"])
        grid = (_cdiv(g["n_blocks"], t["R"]),)
        _mx_kernel[grid](src, out, g["n_blocks"], K, g["blocks_per_row"],
                         EMAX=elem.emax, EMIN=elem.emin, MBITS=elem.mbits, MAXV=elem.max_value,
                         IS_INT=elem.is_int, BLOCK=block, R=t["R"], EVEN_K=g["EVEN_K"],
                         EVEN_N=g["EVEN_N"], INT64=g["INT64"], SOFT_BF16=_INTERPRET, RCEIL=rceil,
                         num_warps=t["num_warps"], **_LAUNCH)

    def tensor_amax_bits(self, src: torch.Tensor) -> torch.Tensor:
        """amax over the finite values of |src|, as a one-element int32 tensor of float32 bits."""
        t = self.tiles(src.device)["amax"]
        amax = torch.zeros(1, dtype=torch.int32, device=src.device)
        n = src.numel()
        block, tiles = t["BLOCK"], t["TILES"]
        _amax_finite_kernel[(_cdiv(n, block * tiles),)](src, amax, n, BLOCK=block, TILES=tiles,
                                                         INT64=self._int64(n, block * tiles),
                                                         num_warps=t["num_warps"], **_LAUNCH)
        return amax

    def _nvfp4(self, src, out, K, block: int, amax_bits: torch.Tensor | None = None) -> None:
        assert block == 16 and E2M1.max_value == 6.0 and E4M3.max_value == 448.0
        if amax_bits is None:
            amax_bits = self.tensor_amax_bits(src)
        t = self.tiles(src.device)["nvfp4"]
        g = self._block_geometry(src.numel(), K, block, t["R"])
        grid = (_cdiv(g["n_blocks"], t["R"]),)
        _nvfp4_kernel[grid](src, out, amax_bits, g["n_blocks"], K, g["blocks_per_row"],
                            BLOCK=block, R=t["R"], EVEN_K=g["EVEN_K"], EVEN_N=g["EVEN_N"],
                            INT64=g["INT64"], DIV_MODE=self.div_mode, SOFT_BF16=_INTERPRET, REVERSE=self.l2_reverse,
                            HALVES=bool(t.get("HALVES", 0)), num_warps=t["num_warps"], **_LAUNCH)

    def nvfp4_block_pass(self, src: torch.Tensor, amax_bits: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """NVFP4 with the tensor amax already known (e.g. calibrated): the fused block pass alone."""
        src = src.contiguous()
        out = torch.empty_like(src) if out is None else out
        self._nvfp4(src, out, src.shape[-1] if src.dim() else 1, 16, amax_bits)
        return out

    def _fp8_tensor(self, src, out) -> None:
        amax_bits = self.tensor_amax_bits(src)
        n = src.numel()
        _fp8_tensor_kernel[(_cdiv(n, ELEMENTWISE_BLOCK),)](
            src, out, amax_bits, n, BLOCK=ELEMENTWISE_BLOCK, INT64=self._int64(n, ELEMENTWISE_BLOCK),
            DIV_MODE=self.div_mode, SOFT_BF16=_INTERPRET, REVERSE=self.l2_reverse, num_warps=ELEMENTWISE_WARPS,
            **_LAUNCH)

    def _fp8_rows(self, src, out, K) -> None:
        t = self.tiles(src.device)["fp8_row"]
        rows = src.numel() // K
        block_k = min(t["BLOCK_K"], triton.next_power_of_2(K))
        _fp8_row_kernel[(_cdiv(rows, t["ROWS"]),)](
            src, out, rows, K, ROWS=t["ROWS"], BLOCK_K=block_k, K_TILES=_cdiv(K, block_k),
            INT64=self._int64(src.numel() + K * t["ROWS"], block_k), SOFT_BF16=_INTERPRET,
            DIV_MODE=self.div_mode, num_warps=t["num_warps"], **_LAUNCH)
