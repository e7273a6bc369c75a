"""Export a fake-quantized model as a compressed-tensors checkpoint (what vLLM and llm-compressor read).

qgate computes the codes and scales (qgate.encoding, the reference backend's arithmetic); compressed-tensors'
own compressors pack them and write its quantization_config, so the files are that library's format.
Its decompression then reproduces qgate's fake-quantized weights bit for bit:

- fp8 / fp8_channel (float-quantized): E4M3 weights and float32 scales; dequantized in float32 as q * s,
  qgate's own product.
- mxfp4, mxfp6_e2m3, mxfp8_e4m3 and their _rceil variants (mxfp4/mxfp6-pack-quantized, mxfp8-quantized):
  E8M0 scales; every value is an element times a power of two, exact in the bfloat16 that
  compressed-tensors dequantizes to. The scale rule (FLOOR or RCEIL) only chooses the scale, which is stored.
- nvfp4 (nvfp4-pack-quantized): compressed-tensors dequantizes to bfloat16 as q * (s_block / g), g the
  stored global scale; qgate's value is q * (s_block * s_tensor) in float32. No float32 g makes
  fl(s_block / g) == fl(s_block * s_tensor) for every block scale in general (about one tensor in eight
  admits one), so the float32 products cannot always agree; the export picks g within a few float32 ulps of
  1 / s_tensor so that every (block scale, element) pair present decompresses to the bfloat16 rounding of
  qgate's value. NVFP4 is therefore bit-exact against qgate's fake-quantized weights rounded to bfloat16.

Not expressible: mxfp6_e3m2, mxfp8_e5m2 and mxint8 (compressed-tensors' MX compressors have E2M3 FP6,
E4M3 FP8 and E2M1 FP4 elements only), and anything that is not the weight of a Linear or Embedding.
Activation and KV-cache quantization are not exported (a checkpoint holds weights).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qgate.errors import QgateError
from qgate.formats import E4M3, Format, ScaleKind, get_format

# formats compressed-tensors can hold, and why the others cannot
EXPORTABLE = ("nvfp4", "mxfp4", "mxfp4_rceil", "mxfp6_e2m3", "mxfp6_e2m3_rceil", "mxfp8_e4m3",
              "mxfp8_e4m3_rceil", "fp8", "fp8_channel")
NOT_EXPORTABLE = {
    "mxfp6_e3m2": "compressed-tensors' MXFP6 compressor stores E2M3 elements only",
    "mxfp6_e3m2_rceil": "compressed-tensors' MXFP6 compressor stores E2M3 elements only",
    "mxfp8_e5m2": "compressed-tensors' MXFP8 compressor stores E4M3 elements only",
    "mxfp8_e5m2_rceil": "compressed-tensors' MXFP8 compressor stores E4M3 elements only",
    "mxint8": "compressed-tensors has no MX integer format",
    "mxint8_rceil": "compressed-tensors has no MX integer format",
}


def check_exportable(fmt: str | Format) -> Format:
    f = get_format(fmt)
    if f.is_identity or f.name in EXPORTABLE:
        return f
    why = NOT_EXPORTABLE.get(f.name, "compressed-tensors has no format for it")
    raise QgateError(f"format {f.name} cannot be exported as a compressed-tensors checkpoint: {why}; "
                     f"exportable: {', '.join(EXPORTABLE)}")


def weight_args(fmt: Format):
    """compressed-tensors' QuantizationArgs for weights in `fmt` (its presets' settings)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    if fmt.scale is ScaleKind.E4M3_FP32:
        return QuantizationArgs(num_bits=4, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR_GROUP,
                                symmetric=True, dynamic=False, group_size=16, scale_dtype=torch.float8_e4m3fn,
                                zp_dtype=torch.float8_e4m3fn)
    if fmt.scale is ScaleKind.E8M0:
        return QuantizationArgs(num_bits=fmt.element.bits, type=QuantizationType.FLOAT,
                                strategy=QuantizationStrategy.GROUP, symmetric=True, dynamic=False, group_size=32,
                                scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    strategy = QuantizationStrategy.TENSOR if fmt.scale is ScaleKind.FP32_TENSOR else QuantizationStrategy.CHANNEL
    return QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, strategy=strategy, symmetric=True, dynamic=False)


# --------------------------------------------------------------------------------------------
# Scales in compressed-tensors' conventions
# --------------------------------------------------------------------------------------------

_E2M1_MAGNITUDES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def nvfp4_global_scale(s_tensor: torch.Tensor, used_scales: torch.Tensor, window: int = 64) -> torch.Tensor:
    """The float32 global scale g (dequantization divides the block scale by it) nearest to 1 / s_tensor
    for which every used block scale e and every E2M1 magnitude q give bf16(q * fl(e / g)) ==
    bf16(q * fl(e * s_tensor)): compressed-tensors' bfloat16 output equals qgate's value rounded to bfloat16.
    Falls back to fl(1 / s_tensor) when no float32 within `window` ulps does (never seen on real weights)."""
    e = used_scales.to(torch.float32).reshape(-1, 1)
    q = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32).reshape(1, -1)
    want = (q * (e * s_tensor)).to(torch.bfloat16)
    g0 = (torch.ones((), dtype=torch.float32) / s_tensor).reshape(())
    bits = int(g0.view(torch.int32))
    for step in sorted(range(-window, window + 1), key=abs):
        g = torch.tensor(bits + step, dtype=torch.int32).view(torch.float32)
        if not math.isfinite(float(g)) or float(g) <= 0:
            continue
        if torch.equal((q * (e / g)).to(torch.bfloat16), want):
            return g.reshape(1)
    return g0.reshape(1)


@dataclass
class ExportedTensor:
    name: str
    format: str
    compression: str  # compressed-tensors' format name
    global_scale_ulps: int | None = None  # nvfp4: float32 ulps between g and fl(1 / s_tensor)


def _module_state(weight: torch.Tensor, fmt: Format) -> tuple[dict[str, torch.Tensor], int | None]:
    """(weight as qgate fake-quantizes it, its scales in compressed-tensors' layout) for one weight. The
    scales come from the reference backend's own scale functions, so they are the ones fake_quantize used."""
    from qgate.backends import fake_quantize
    from qgate.backends import reference as ref

    x = weight.detach().to(torch.float32)
    fq = fake_quantize(x, fmt, backend="reference")
    if fmt.scale in (ScaleKind.FP32_TENSOR, ScaleKind.FP32_CHANNEL):
        scale = ref.fp8_scales(x.reshape(-1, x.shape[-1]), per_row=fmt.scale is ScaleKind.FP32_CHANNEL)
        return {"weight": fq, "weight_scale": scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1)}, None
    xb, _ = ref._blocks(x, fmt.block_size)
    amax = xb.abs().amax(dim=-1)
    if fmt.scale is ScaleKind.E8M0:
        shared = ref.mx_shared_exponent(amax, fmt.element, fmt.scale_rule)
        return {"weight": fq, "weight_scale": ref.exact_pow2(shared)}, None
    s_tensor = ref.nvfp4_tensor_scale(x)
    if float(s_tensor) == 0.0:
        s_tensor = torch.ones((), dtype=torch.float32)
    s_block = ref.nvfp4_block_scale(amax, s_tensor)
    g = nvfp4_global_scale(s_tensor, torch.unique(s_block))
    ulps = int(g.view(torch.int32)) - int((torch.ones(()) / s_tensor).view(torch.int32))
    return {"weight": fq, "weight_scale": s_block, "weight_global_scale": g}, ulps


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    directory: Path
    tensors: list[ExportedTensor] = field(default_factory=list)
    quantization_config: dict[str, Any] = field(default_factory=dict)


def export_model(model: torch.nn.Module, tokenizer, fmt: str, recipe: Any, out_dir: str | os.PathLike,
                 progress: bool = True) -> ExportResult:
    """Write `model` (full precision, untouched) fake-quantized in `fmt` under `recipe` as a
    compressed-tensors checkpoint in `out_dir` (created; must not hold a checkpoint already)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    from qgate.recipes import plan_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise QgateError(f"output directory {out} is not empty; give a new or empty directory")
    plan = plan_model(model, recipe, fmt)
    targets = [t for t in plan.targets if t.format is not None]
    for t in targets:
        check_exportable(t.format)
        modules = [m for m, attr in t.owners if attr == "weight"]
        if len(t.owners) != 1 or not modules or not isinstance(modules[0], (torch.nn.Linear, torch.nn.Embedding)):
            raise QgateError(f"tensor {t.name} ({t.format}): compressed-tensors compresses the weight of one "
                             f"Linear or Embedding module; this tensor is not one (tied or another kind)")
        f = get_format(t.format)
        if f.block_size and t.param.shape[-1] % f.block_size:
            raise QgateError(f"tensor {t.name}: {t.param.shape[-1]} columns are not a multiple of {f.name}'s "
                             f"block of {f.block_size}; compressed-tensors needs whole groups")

    by_format: dict[str, list[str]] = {}
    for t in targets:
        by_format.setdefault(t.format, []).append(t.name)
    schemes = {name: QuantizationScheme(targets=[f"re:^{_escape(n)}$" for n in names],
                                        weights=weight_args(get_format(name)))
               for name, names in by_format.items()}

    state = {k: v for k, v in model.state_dict().items()}
    exported: list[ExportedTensor] = []
    formats_used: set[CompressionFormat] = set()
    with torch.no_grad():
        for t in targets:
            f = get_format(t.format)
            module = t.owners[0][0]
            scheme = schemes[f.name]
            module_state, ulps = _module_state(t.param.data, f)
            # fp8 is llm-compressor's float-quantized (inference would pick the generic naive-quantized)
            compression = (CompressionFormat.float_quantized if f.scale in _FP8_SCALES
                           else infer_module_format(type(module), scheme))
            formats_used.add(compression)
            compressor = BaseCompressor.get_value_from_registry(compression.value)
            compressed = compressor.compress(module_state, scheme)
            prefix = f"{t.name}."
            state.pop(prefix + "weight", None)
            for key, value in compressed.items():
                state[prefix + key] = value.detach().contiguous()
            exported.append(ExportedTensor(t.name, f.name, compression.value, ulps))

    for name, scheme in schemes.items():
        scheme.format = next(e.compression for e in exported if e.format == name)
    config_groups = {f"group_{i}": scheme for i, scheme in enumerate(schemes.values())}
    overall = (next(iter(formats_used)).value if len(formats_used) == 1 else CompressionFormat.mixed_precision.value) \
        if formats_used else CompressionFormat.dense.value
    qconfig = QuantizationConfig(config_groups=config_groups, format=overall,
                                 quantization_status=QuantizationStatus.COMPRESSED,
                                 ignore=sorted(_ignored_linears(model, {t.name for t in targets})))

    out.mkdir(parents=True, exist_ok=True)
    from qgate.models import _transformers_bars

    with _transformers_bars(progress):
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    ModelCompressor(quantization_config=qconfig).update_config(str(out))
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    return ExportResult(out, exported, written)


_FP8_SCALES = (ScaleKind.FP32_TENSOR, ScaleKind.FP32_CHANNEL)


def export_checkpoint(out_dir: str | os.PathLike, fmt: str, recipe: Any = "uniform", family: str | None = None,
                      member: str | None = None, model_path: str | None = None, revision: str | None = None,
                      progress: bool = True) -> ExportResult:
    """Load a family member (or `model_path`) in float32 on the CPU and export it fake-quantized in `fmt`.
    Everything a user typed is checked before the model is loaded."""
    from qgate.models import load
    from qgate.recipes import load_recipe

    f = check_exportable(fmt)
    if f.is_identity:
        raise QgateError(f"format {f.name} quantizes nothing; give a quantized format ({', '.join(EXPORTABLE)})")
    recipe = load_recipe(recipe)
    for rule in recipe.rules:
        if rule.format not in ("keep", "$candidate"):
            check_exportable(rule.format)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QgateError(f"output directory {out} is not empty; give a new or empty directory")
    loaded = load(family, member, model_path=model_path, revision=revision, device="cpu", dtype="float32",
                  progress=progress)
    return export_model(loaded.model, loaded.tokenizer, f.name, recipe, out, progress=progress)


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def _ignored_linears(model: torch.nn.Module, quantized: set[str]) -> list[str]:
    """Linear modules left in full precision (compressed-tensors' `ignore` list names them)."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in quantized]
