"""ModelOpt checkpoints (NVIDIA TensorRT Model Optimizer's unified HF export), read and dequantized.

A ModelOpt checkpoint says `quant_method: modelopt` in config.json's quantization_config (older exports: only
hf_quant_config.json) and stores, per quantized Linear:

    NVFP4 (quant_algo NVFP4, W4A16_NVFP4): weight uint8 [out, in/2], two E2M1 codes a byte (low nibble first),
        weight_scale E4M3 [out, in/16] per 16-element block, weight_scale_2 FP32 per tensor:
        w = e2m1 * weight_scale * weight_scale_2
    FP8 (quant_algo FP8): weight E4M3 [out, in], weight_scale FP32 per tensor: w = e4m3 * weight_scale

plus input_scale (static activation scale) where activations are quantized.

Why qgate decodes these itself: transformers 5.24 has no ModelOpt loader (its `nvfp4` method quantizes on the
fly; a ModelOpt NVFP4 folder fails on the packed uint8 shapes, and a ModelOpt FP8 folder loads with its E4M3
codes taken as values and the scales dropped, i.e. silently wrong); compressed-tensors reads only its own
format; ModelOpt's own loaders restore a model it quantized in the same process or hand the folder to vLLM /
TensorRT-LLM GPU kernels, and its package pins another transformers range. The arithmetic is the two lines
above, so this module holds it, checked against qgate's fake quantization of the same baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

from qgate.errors import QgateError

# quant_algo -> (qgate format of the weights, activations in words or None)
_ALGOS = {
    "NVFP4": ("nvfp4", "4-bit float (NVFP4) static"),
    "W4A16_NVFP4": ("nvfp4", None),
    "FP8": ("fp8", "8-bit float (E4M3) per-tensor static"),
}
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def is_modelopt(config_dir: Path, qconfig: dict | None) -> bool:
    if isinstance(qconfig, dict):
        return qconfig.get("quant_method") == "modelopt"
    return (config_dir / "hf_quant_config.json").is_file()


def read_config(name: str, directory: Path, qconfig: dict | None) -> dict:
    """The checkpoint's ModelOpt quantization settings: quant_algo, group_size, exclude_modules, producer."""
    if isinstance(qconfig, dict):
        where = directory / "config.json"
        algo, group = qconfig.get("quant_algo"), None
        groups = qconfig.get("config_groups") or {}
        weights = next(iter(groups.values()), {}).get("weights") if groups else None
        if isinstance(weights, dict):
            group = weights.get("group_size")
        settings = {"quant_algo": algo, "group_size": group, "exclude_modules": qconfig.get("ignore") or [],
                    "producer": qconfig.get("producer")}
        field = "quantization_config.quant_algo"
    else:
        where = directory / "hf_quant_config.json"
        try:
            doc = json.loads(where.read_text())
        except ValueError as exc:
            raise QgateError(f"candidate {name}: {where} is not JSON ({exc})") from None
        quant = doc.get("quantization") if isinstance(doc, dict) else None
        if not isinstance(quant, dict):
            raise QgateError(f"candidate {name}: {where} has no 'quantization' object; expected ModelOpt's "
                             f"hf_quant_config.json")
        settings = {"quant_algo": quant.get("quant_algo"), "group_size": quant.get("group_size"),
                    "exclude_modules": quant.get("exclude_modules") or [], "producer": doc.get("producer")}
        field = "quantization.quant_algo"
    algo = settings["quant_algo"]
    if algo not in _ALGOS:
        raise QgateError(f"candidate {name}: {where}: {field} is {algo!r}; qgate reads ModelOpt checkpoints "
                         f"with quant_algo {', '.join(_ALGOS)}")
    if _ALGOS[algo][0] == "nvfp4" and settings["group_size"] not in (None, 16):
        raise QgateError(f"candidate {name}: {where}: group_size is {settings['group_size']!r}; "
                         f"ModelOpt {algo} uses blocks of 16")
    return settings


def scheme(settings: dict) -> tuple[list[dict], str]:
    """The scheme in words (one group) and the qgate format of its weights."""
    algo = settings["quant_algo"]
    fmt, acts = _ALGOS[algo]
    w_text = ("W4 float (E2M1) group 16, E4M3 block scales, FP32 tensor scale" if fmt == "nvfp4"
              else "W8 float (E4M3) tensor, FP32 tensor scale")
    a_text = f", activations {acts} (not emulated: weights are dequantized)" if acts else ""
    fmt_text = f" (weights = qgate {fmt})" if acts else f" (= qgate {fmt})"
    producer = settings.get("producer") or {}
    made = f"modelopt {producer.get('version')}" if producer.get("version") else "modelopt"
    return [{"group": algo, "format": f"modelopt {algo}", "targets": ["Linear"],
             "exclude": list(settings["exclude_modules"]), "qgate_format": fmt,
             "text": f"{made} {algo}: {w_text}{a_text}{fmt_text}"}], fmt


def _e2m1_unpack(packed, torch):
    """uint8 [..., n/2] -> float32 [..., n]: low nibble is the even element; bit 3 is the sign."""
    table = torch.tensor(_E2M1, dtype=torch.float32)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()
    values = table[codes & 0x7]
    return torch.where(codes >= 8, -values, values)


def dequantize(state: dict, algo: str) -> dict:
    """The checkpoint's tensors -> plain float32 weights (scales and activation scales consumed)."""
    import torch

    out = {}
    for key, tensor in state.items():
        if key.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        stem = key.removesuffix(".weight")
        if key.endswith(".weight") and f"{stem}.weight_scale" in state:
            scale = state[f"{stem}.weight_scale"]
            if _ALGOS[algo][0] == "nvfp4":
                values = _e2m1_unpack(tensor, torch)
                block = scale.to(torch.float32).repeat_interleave(16, dim=-1)
                global_scale = state[f"{stem}.weight_scale_2"].to(torch.float32)
                out[key] = values * (block * global_scale)
            else:
                out[key] = tensor.to(torch.float32) * scale.to(torch.float32)
        else:
            out[key] = tensor
    return out


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))


def load(directory: Path, algo: str, dtype, where: str):
    """The model of `directory`, built from its config without the quantization settings, with the
    dequantized weights; every parameter must be covered (strict)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    shards = _shards(directory)
    if not shards:
        raise QgateError(f"cannot load checkpoint {where}: no .safetensors weights in {directory}")
    state: dict = {}
    for shard in shards:
        state.update(load_file(shard))
    weights = dequantize(state, algo)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise QgateError(f"cannot load checkpoint {where}: weights do not match the config's model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    return model
