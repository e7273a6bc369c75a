"""Numeric formats as data: element types, scale kinds, the format registry. Imports no kernel.

A format says what one stored value is (its element type), how values share a scale (block size
and scale kind) and what that costs (effective bits per value). The arithmetic lives in the
backends (`qgate.backends.fake_quantize`); `qgate.backends.reference` is the definition every other
backend must match bit for bit, and `qgate.encoding` packs real codes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

from qgate.errors import UsageError


@dataclass(frozen=True)
class ElementType:
    """A small float (sign, exponent, mantissa) or a scaled integer, with IEEE-like subnormals.

    Saturating: no infinities, the largest finite value is `max_value`.
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max_value: float
    is_int: bool = False  # INT8 of MX: two's complement with an implied scale of 2^-(mbits-1)

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emax(self) -> int:
        """Exponent of the largest normal binade (OCP MX's emax_elem)."""
        return 0 if self.is_int else math.frexp(self.max_value)[1] - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade; below it values are subnormal."""
        return 1 - self.bias


E2M1 = ElementType("e2m1", ebits=2, mbits=1, bias=1, max_value=6.0)
E3M2 = ElementType("e3m2", ebits=3, mbits=2, bias=3, max_value=28.0)
E2M3 = ElementType("e2m3", ebits=2, mbits=3, bias=1, max_value=7.5)
E4M3 = ElementType("e4m3", ebits=4, mbits=3, bias=7, max_value=448.0)
E5M2 = ElementType("e5m2", ebits=5, mbits=2, bias=15, max_value=57344.0)
INT8 = ElementType("int8", ebits=0, mbits=7, bias=0, max_value=127 / 64, is_int=True)
BF16 = ElementType("bf16", ebits=8, mbits=7, bias=127, max_value=(2 - 2**-7) * 2.0**127)  # torch.finfo(bfloat16).max

class ScaleKind(enum.Enum):
    """How values share a scale, by how the scale is stored. The values are the names written in
    Format.to_dict() (hashed into store keys) and `qgate formats --json`: never change them."""

    E8M0 = "e8m0"                  # OCP MX: one power of two per block
    E4M3_FP32 = "e4m3*fp32"        # NVFP4: an E4M3 scale per block times one FP32 scale per tensor
    FP32_TENSOR = "fp32/tensor"    # one FP32 scale for the whole tensor
    FP32_CHANNEL = "fp32/channel"  # one FP32 scale per row (output channel of a Linear weight)
    NONE = "none"                  # no scale: not quantized


@dataclass(frozen=True)
class Format:
    name: str
    element: ElementType
    block_size: int | None
    scale: ScaleKind  # its string value is accepted too
    bits_per_value: float
    description: str
    # how an E8M0 block scale is chosen: "floor" (OCP MX: 2^(floor(log2 amax) - emax_elem)) or "rceil"
    # (cuBLAS/ModelOpt: the float32 amax / largest element rounded up to a power of two, never clipping;
    # capped at 2^(127 - emax_elem) so that every element times its scale stays finite in float32)
    scale_rule: str = "floor"

    def __post_init__(self):
        if not isinstance(self.scale, ScaleKind):
            object.__setattr__(self, "scale", ScaleKind(self.scale))

    @property
    def max_value(self) -> float | None:
        """Largest element value (before scaling); None where nothing is quantized."""
        return None if self.scale is ScaleKind.NONE else self.element.max_value

    @property
    def is_identity(self) -> bool:
        return self.scale is ScaleKind.NONE

    def describe(self) -> dict:
        return {
            "name": self.name,
            "element": self.element.name,
            "block_size": self.block_size,
            "scale": self.scale.value,
            "bits_per_value": self.bits_per_value,
            "max_value": self.max_value,
            "scale_rule": self.scale_rule if self.scale is ScaleKind.E8M0 else None,
            "description": self.description,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["element"] = asdict(self.element)
        d["scale"] = self.scale.value
        if d["scale_rule"] == "floor":  # the default is left out, so formats hash as they did before variants existed
            del d["scale_rule"]
        return d


def _mx(name: str, element: ElementType, bits: float) -> Format:
    return Format(name, element, 32, ScaleKind.E8M0, bits, f"OCP MX v1.0, {element.name.upper()} elements, block 32, E8M0 scale")


def _mx_rceil(floor_format: Format) -> Format:
    """The same MX format with the scale rounded up (RCEIL): a variant under its own name, never silent."""
    return Format(f"{floor_format.name}_rceil", floor_format.element, 32, ScaleKind.E8M0, floor_format.bits_per_value,
                  f"{floor_format.description}, scale rounded up (RCEIL: 2^ceil(log2(amax / {floor_format.element.max_value:g})), "
                  "as cuBLAS/ModelOpt; no block clips)", scale_rule="rceil")


_MX_FORMATS = (
    _mx("mxfp4", E2M1, 4.25),
    _mx("mxfp6_e3m2", E3M2, 6.25),
    _mx("mxfp6_e2m3", E2M3, 6.25),
    _mx("mxfp8_e4m3", E4M3, 8.25),
    _mx("mxfp8_e5m2", E5M2, 8.25),
    _mx("mxint8", INT8, 8.25),
)


_REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        *_MX_FORMATS,
        *(_mx_rceil(f) for f in _MX_FORMATS),
        Format("nvfp4", E2M1, 16, ScaleKind.E4M3_FP32, 4.5,
               "NVFP4: E2M1 elements, block 16, E4M3 block scale times an FP32 tensor scale"),
        Format("fp8", E4M3, None, ScaleKind.FP32_TENSOR, 8.0, "FP8 E4M3 with one FP32 scale per tensor"),
        Format("fp8_channel", E4M3, None, ScaleKind.FP32_CHANNEL, 8.0, "FP8 E4M3 with one FP32 scale per row"),
        Format("bf16", BF16, None, ScaleKind.NONE, 16.0, "no quantization (the baseline)"),
    )
}


def list_formats() -> list[Format]:
    return list(_REGISTRY.values())


def get_format(fmt: str | Format) -> Format:
    if isinstance(fmt, Format):
        return fmt
    try:
        return _REGISTRY[fmt]
    except (KeyError, TypeError):
        raise UsageError(f"unknown format {fmt!r}; expected one of: {', '.join(_REGISTRY)}") from None
