"""An independent, slow definition of every format for the tests: enumerate each element type's
representable values from its bit layout, pick the nearest in float64, ties to the even code.

It shares no code with qgate.backends.reference on purpose.
"""

from __future__ import annotations

import math

import numpy as np

# name -> (ebits, mbits, bias, max) ; INT8 handled separately
ELEMENTS = {
    "e2m1": (2, 1, 1, 6.0),
    "e3m2": (3, 2, 3, 28.0),
    "e2m3": (2, 3, 1, 7.5),
    "e4m3": (4, 3, 7, 448.0),
    "e5m2": (5, 2, 15, 57344.0),
}
FORMAT_ELEMENT = {
    "mxfp4": "e2m1", "mxfp6_e3m2": "e3m2", "mxfp6_e2m3": "e2m3", "mxfp8_e4m3": "e4m3",
    "mxfp8_e5m2": "e5m2", "mxint8": "int8", "nvfp4": "e2m1", "fp8": "e4m3", "fp8_channel": "e4m3",
}
FORMAT_ELEMENT.update({f"{name}_rceil": e for name, e in list(FORMAT_ELEMENT.items()) if name.startswith("mx")})
EMAX = {"e2m1": 2, "e3m2": 4, "e2m3": 2, "e4m3": 8, "e5m2": 15, "int8": 0}
LARGEST = {**{e: v[3] for e, v in ELEMENTS.items()}, "int8": 127 / 64}


def mx_shared_exponent(amax: float, elem: str, rceil: bool) -> int:
    """floor: OCP's floor(log2 amax) - emax. rceil: ceil(log2(float32(amax / largest))), exactly."""
    if rceil:
        d = float(np.float32(amax) / np.float32(LARGEST[elem]))  # the float32 quotient, subnormal or not
        m, e = math.frexp(d)
        exp = e - 1 if m == 0.5 else e
        return min(max(exp, -127), 127 - EMAX[elem])  # above, the largest element times the scale overflows
    exp = math.frexp(amax)[1] - 1 - EMAX[elem]
    return min(max(exp, -127), 127)


def grid(elem: str) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative representable values (sorted) and whether each one's code is even."""
    if elem == "int8":
        ints = np.arange(0, 128)
        return ints / 64.0, ints % 2 == 0
    ebits, mbits, bias, vmax = ELEMENTS[elem]
    values, even = [], []
    for e in range(2**ebits):
        for m in range(2**mbits):
            v = (m / 2**mbits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
            if v <= vmax:
                values.append(v)
                even.append(m % 2 == 0)
    order = np.argsort(values)
    return np.array(values)[order], np.array(even)[order]


_GRIDS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def nearest(v: np.ndarray, elem: str) -> np.ndarray:
    """Round each float64 value to the element grid: nearest, ties to the even code, saturating."""
    if elem not in _GRIDS:
        _GRIDS[elem] = grid(elem)
    values, even = _GRIDS[elem]
    a = np.abs(v)
    hi = np.clip(np.searchsorted(values, a), 0, len(values) - 1)
    lo = np.clip(hi - 1, 0, len(values) - 1)
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & even[hi] & ~even[lo])
    out = np.where(pick_hi, values[hi], values[lo])
    out = np.where(a >= values[-1], values[-1], out)
    return np.copysign(out, v)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def fake_quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """x: float32 array (any shape), blocks along the last axis. Returns float32."""
    x = _f32(x)
    if fmt == "bf16":
        return x.copy()
    elem = FORMAT_ELEMENT[fmt]
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if fmt in ("fp8", "fp8_channel"):
        finite = np.isfinite(rows)
        absf = np.where(finite, np.abs(rows), 0)
        amax = absf.max(axis=1, keepdims=True) if fmt == "fp8_channel" else np.full((rows.shape[0], 1), absf.max())
        s = _f32(amax) / np.float32(448.0)
        s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
        q = nearest((rows / s).astype(np.float64), elem)
        out = (_f32(q) * s).astype(np.float32)
        return np.where(finite, out, np.nan).astype(np.float32).reshape(shape)
    block = 16 if fmt == "nvfp4" else 32
    out = np.empty_like(rows)
    if fmt == "nvfp4":
        finite_abs = np.where(np.isfinite(x), np.abs(x), 0)
        s_tensor = np.float32(finite_abs.max()) / np.float32(2688.0)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], block):
            b = rows[r, start:start + block]
            if not np.all(np.isfinite(b)):
                out[r, start:start + block] = np.nan
                continue
            amax = float(np.max(np.abs(b)))
            if fmt == "nvfp4":
                if s_tensor == 0:
                    out[r, start:start + block] = 0.0
                    continue
                ratio = (np.float32(amax) / np.float32(6.0)) / s_tensor
                s_block = np.float32(nearest(np.array([min(max(float(ratio), 2.0**-6), 448.0)]), "e4m3")[0])
                total = np.float32(s_block * s_tensor)
                q = nearest((b / total).astype(np.float32).astype(np.float64), elem)
                out[r, start:start + block] = _f32(q) * total
            else:
                if amax == 0:
                    out[r, start:start + block] = 0.0
                    continue
                shared = mx_shared_exponent(amax, elem, fmt.endswith("_rceil"))
                q = nearest(b.astype(np.float64) / 2.0**shared, elem)
                out[r, start:start + block] = (q * 2.0**shared).astype(np.float32)
    return out.reshape(shape)
