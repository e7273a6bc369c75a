"""Memory footprint and roofline decode speed of a quantized model, from its config alone.

The model is built on the meta device (shapes, no weights), the recipe assigns every tensor a
format exactly as `qgate quantize` would, and bytes are counted at each format's effective bits
(kept tensors at 16 bits). The decode ceiling at batch 1 is memory-bound:

    tokens/s = bandwidth / bytes read per token

where a token reads every weight once, except an embedding table that only serves lookups (one row).
The KV cache is not counted: at batch 1 and short contexts it is small next to the weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgate.errors import QgateError
from qgate.families import list_families

if TYPE_CHECKING:
    import torch

# H100 SXM (HBM3): the default for the roofline when no bandwidth is given
DEFAULT_BANDWIDTH = 3.35e12

_GROUPS = [
    ("q", r"q_proj$"),
    ("k", r"k_proj$"),
    ("v", r"v_proj$"),
    ("qkv", r"(qkv_proj|query_key_value|c_attn)$"),
    ("o", r"(o_proj|out_proj|dense|c_proj)$"),
    ("gate", r"gate_proj$"),
    ("up", r"up_proj$"),
    ("gate_up", r"gate_up_proj$"),
    ("down", r"down_proj$"),
    ("router", r"(router|\.gate|shared_expert_gate)$"),
    ("embeddings", r"(embed_tokens|wte|wpe|embed_positions)$"),
    ("lm_head", r"lm_head$"),
    ("norms", r"norm"),
]


def tensor_group(name: str) -> str:
    """The group a tensor's bytes are reported under; biases join their projection."""
    base = name[: -len(".bias")] if name.endswith(".bias") else name
    for group, pattern in _GROUPS:
        if re.search(pattern, base):
            return group
    return "other"


@dataclass
class GroupBytes:
    params: int = 0
    bytes: float = 0.0
    formats: dict[str, int] = field(default_factory=dict)  # format (or "keep") -> params

    def to_dict(self) -> dict:
        return {"params": self.params, "bytes": self.bytes, "formats": dict(self.formats)}


@dataclass
class Footprint:
    model: str
    format: str | None
    recipe: str
    params: int
    total_bytes: float
    bf16_bytes: float
    bytes_per_token: float
    bandwidth: float
    groups: dict[str, GroupBytes]
    untied: list[tuple[str, str]]
    bf16_bytes_per_token: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.bandwidth / self.bytes_per_token if self.bytes_per_token else float("inf")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "format": self.format,
            "recipe": self.recipe,
            "params": self.params,
            "total_bytes": self.total_bytes,
            "bf16_bytes": self.bf16_bytes,
            "ratio": self.total_bytes / self.bf16_bytes if self.bf16_bytes else 1.0,
            "bytes_per_token": self.bytes_per_token,
            "bandwidth": self.bandwidth,
            "tokens_per_s": self.tokens_per_s,
            "bf16_tokens_per_s": self.bandwidth / self.bf16_bytes_per_token,
            "groups": {name: g.to_dict() for name, g in self.groups.items()},
            "untied": [list(p) for p in self.untied],
        }

    def table_lines(self) -> list[str]:
        rows = [("group", "params", "bytes", "formats")]
        for name, g in self.groups.items():
            by_share = sorted(g.formats.items(), key=lambda kv: -kv[1])
            fmts = ", ".join(_share(f, n, g.params, len(g.formats)) for f, n in by_share)
            rows.append((name, f"{g.params:,}", _human(g.bytes), fmts))
        rows.append(("total", f"{self.params:,}", _human(self.total_bytes), f"bf16 {_human(self.bf16_bytes)}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows
        ]
        lines.append(
            f"{self.model}  {self.format or 'bf16'} ({self.recipe}): {_human(self.total_bytes)} "
            f"= {self.total_bytes / self.bf16_bytes:.3f}x bf16; decode ceiling at batch 1: "
            f"{self.tokens_per_s:,.1f} tokens/s at {self.bandwidth / 1e12:g} TB/s "
            f"(bf16: {self.bandwidth / self.bf16_bytes_per_token:,.1f})"
        )
        return lines


def _share(fmt: str, n: int, total: int, count: int) -> str:
    if count == 1:
        return fmt
    share = n / total
    return f"{fmt} {share:.0%}" if share >= 0.01 else f"{fmt} <1%"


def _human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------------------------
# Finding a config
# --------------------------------------------------------------------------------------------


def _config_from_dict(data: dict, where: str):
    from transformers import AutoConfig

    data = dict(data)
    data.pop("quantization_config", None)  # a quantized checkpoint's config describes the same shapes
    model_type = data.pop("model_type", None)
    if not model_type:
        raise QgateError(f"{where}: no model_type; expected a transformers config.json")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise QgateError(f"{where}: cannot build a config ({str(exc).splitlines()[0]})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QgateError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise QgateError(f"{path}: expected a JSON object")
    return data


def load_config(model: Any, revision: str | None = None):
    """A transformers config from a config dict, a config.json, a model directory, a .gguf file, a
    family name (`smollm2`, `qwen2.5/qwen2.5-72b-instruct`) or a hub id (read from the HF cache when offline)."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        return _config_from_dict(model, "config")
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _config_from_dict(_read_json(path), str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QgateError(f"model directory {path} has no config.json")
        return _config_from_dict(_read_json(path / "config.json"), str(path / "config.json"))
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(path)
    if path.exists():
        raise QgateError(f"{path}: expected a config.json, a model directory or a .gguf file")
    from qgate import models

    family, _, member = text.partition("/")
    if family.lower() in list_families():
        spec = models.resolve_member(family, member or None, revision=revision)
        if spec.source == "gguf":
            return _gguf_config(Path(spec.location))
        text = spec.location
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise QgateError(
            f"model {text!r} is not a file, a directory, a family ({', '.join(list_families())}) "
            "or a hub id (owner/name)"
        )
    return _hub_config(text, revision)


def _gguf_config(path: Path):
    from qgate import models

    cached = models.gguf_cache_dir(models.file_sha256(path)) / "config.json"
    if cached.is_file():  # already converted: no need to parse the GGUF header
        return _config_from_dict(_read_json(cached), str(cached))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the gguf reader raises bare Exceptions on malformed files
        raise QgateError(f"cannot read the config of {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return _config_from_dict(config.to_dict(), str(path))


def _hub_config(repo: str, revision: str | None):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from qgate.offline import hub_offline

    try:
        offline = hub_offline()  # no waiting out the hub's retries without network
        path = hf_hub_download(repo, "config.json", revision=revision, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise QgateError(
            f"the config of {repo} is not in the Hugging Face cache and the hub is offline; "
            "pass its config.json (or the model directory) with --model"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise QgateError(f"cannot fetch the config of {repo}: {str(exc).splitlines()[0]}") from None
    return _config_from_dict(_read_json(Path(path)), f"{repo}/config.json")


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def meta_model(config) -> torch.nn.Module:
    """The model's module tree on the meta device: every shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise QgateError(f"no causal-LM architecture for model_type {config.model_type!r}: {exc}") from None


def footprint(
    model: Any,
    fmt: str | None,
    recipe: Any = "uniform",
    bandwidth: float | None = None,
    revision: str | None = None,
) -> Footprint:
    """Bytes per tensor group and in total for `model` (see load_config) quantized with `recipe`."""
    from qgate.formats import get_format
    from qgate.recipes import load_recipe, plan_model, tensor_bits

    if bandwidth is not None and not bandwidth > 0:
        raise QgateError(f"bandwidth {bandwidth}: expected a positive number of bytes per second")
    bandwidth = float(bandwidth) if bandwidth else DEFAULT_BANDWIDTH
    recipe = load_recipe(recipe)
    if fmt is not None:
        fmt = get_format(fmt).name
    config = load_config(model, revision=revision)
    module = meta_model(config)
    plan = plan_model(module, recipe, fmt)

    groups: dict[str, GroupBytes] = {}
    for name, _ in _GROUPS:
        groups[name] = GroupBytes()
    groups["other"] = GroupBytes()
    total = bf16 = per_token = bf16_per_token = 0.0
    params = 0
    for target in plan.targets:
        n = target.param.numel()
        bits = tensor_bits(target)
        nbytes = n * bits / 8
        group = groups[tensor_group(target.name)]
        group.params += n
        group.bytes += nbytes
        key = target.format or "keep"
        group.formats[key] = group.formats.get(key, 0) + n
        params += n
        total += nbytes
        bf16 += 2.0 * n
        # a lookup-only embedding reads one row per token; everything else is read whole
        read = 1.0 / target.param.shape[0] if target.is_embedding_only and target.param.dim() == 2 else 1.0
        per_token += nbytes * read
        bf16_per_token += 2.0 * n * read
    groups = {k: g for k, g in groups.items() if g.params}
    result = Footprint(
        model=str(model) if not isinstance(model, dict) else str(model.get("_name_or_path", "config")),
        format=fmt,
        recipe=recipe.name,
        params=params,
        total_bytes=total,
        bf16_bytes=bf16,
        bytes_per_token=per_token,
        bandwidth=bandwidth,
        groups=groups,
        untied=list(plan.untie),
        bf16_bytes_per_token=bf16_per_token,
    )
    return result


def parse_bandwidth(text: str | None) -> float | None:
    """'3.35e12', '3350GB/s', '3.35TB/s' -> bytes per second."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kMGT]?)(?:B(?:/s)?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise QgateError(f"bandwidth {text!r}: expected bytes per second, e.g. 3.35e12 or 3.35TB/s")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if value <= 0:
        raise QgateError(f"bandwidth {text!r}: expected a positive number")
    return value


__all__ = [
    "DEFAULT_BANDWIDTH", "Footprint", "footprint", "load_config", "meta_model", "parse_bandwidth", "tensor_group",
]
