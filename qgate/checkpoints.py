"""Checkpoint candidates: a quantized checkpoint a tool produced (compressed-tensors), gated like a format.

A candidate is named (`--candidate NAME=PATH`, or a policy's `checkpoints:` entry) and points to a local
directory or a hub id. Its scheme is read from the checkpoint's own quantization_config; it is identified
by the content hash of its config and weight files (a hub id: its commit), loaded through transformers +
compressed-tensors and dequantized so that it runs anywhere (the CPU included). For a checkpoint whose
scheme is a format qgate knows, `fidelity` compares its dequantized weights with qgate's fake quantization
of the same baseline, tensor by tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgate.errors import QgateError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class CheckpointCandidate:
    name: str
    location: str  # as given: a directory or a hub id
    member: str | None = None  # the family member it was made from (None: the one member gated)
    revision: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.location, "member": self.member, "revision": self.revision}


def parse_candidate_option(text: str) -> CheckpointCandidate:
    """--candidate NAME=PATH (a directory or hub id)."""
    name, sep, where = text.partition("=")
    if not sep or not name or not where:
        raise QgateError(f"--candidate {text!r}: expected NAME=PATH (a quantized checkpoint directory or hub id)")
    check_name(name, f"--candidate {text!r}")
    return CheckpointCandidate(name, where)


def check_name(name: str, where: str) -> str:
    from qgate.formats import list_formats

    if not _NAME.match(name):
        raise QgateError(f"{where}: candidate name {name!r} must be letters, digits, '.', '_', '+' or '-'")
    if name in {f.name for f in list_formats()}:
        raise QgateError(f"{where}: candidate name {name!r} is a format's name; choose another (e.g. {name}-ckpt)")
    return name


# --------------------------------------------------------------------------------------------
# Resolving: where the files are, what the scheme is, the content hash
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedCandidate:
    candidate: CheckpointCandidate
    directory: Path
    checkpoint_id: str  # "sha256:<hex>" of the directory's config and weights, "git:<sha>" for a hub revision
    quantization_config: dict
    scheme: list[dict] = field(default_factory=list)  # one entry per config group
    qgate_format: str | None = None  # the qgate format every quantized weight is in, if one (activations aside)
    loader: str = "compressed-tensors"  # or "modelopt" (qgate.modelopt_checkpoint decodes it)
    rotations: str = ""  # rotations fused into the weights (compressed-tensors transform_config), in words

    @property
    def name(self) -> str:
        return self.candidate.name

    def scheme_text(self) -> str:
        text = "; ".join(g["text"] for g in self.scheme) or "no quantized weights"
        return f"{text}; rotations fused into the weights: {self.rotations}" if self.rotations else text

    def config(self) -> dict:
        """What the store hashes for this candidate (its quant config key): the checkpoint's content and
        how it is run (dequantized by compressed-tensors)."""
        from importlib import metadata

        if self.loader == "modelopt":
            return {"checkpoint_candidate": self.checkpoint_id, "loader": "qgate.modelopt_checkpoint, dequantized"}
        return {"checkpoint_candidate": self.checkpoint_id, "loader": "transformers+compressed-tensors, dequantized",
                "compressed_tensors": metadata.version("compressed-tensors")}

    @property
    def decodes_to_bfloat16(self) -> bool:
        """compressed-tensors decodes NVFP4 into bfloat16; qgate's ModelOpt decoder is exact in float32."""
        return self.loader == "compressed-tensors"

    def describe(self) -> dict:
        return {"name": self.name, "path": self.candidate.location, "checkpoint": self.checkpoint_id,
                "member": self.candidate.member, "scheme": self.scheme_text(), "qgate_format": self.qgate_format,
                "quant_method": self.quantization_config.get("quant_method"),
                "compression_format": self.quantization_config.get("format") or self.quantization_config.get("quant_algo")}


def _weights_text(w: dict) -> tuple[str, str | None]:
    """A compressed-tensors weights QuantizationArgs (as JSON) in words, and the qgate format it is, if any."""
    bits, kind, strategy, group = w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("group_size")
    text = f"W{bits} {kind} {strategy}" + (f" group {group}" if group else "")
    scale_dtype = str(w.get("scale_dtype") or "")
    fmt = None
    if kind == "float":
        if bits == 4 and strategy == "tensor_group" and group == 16:
            fmt = "nvfp4"
        elif bits == 4 and strategy == "group" and group == 32:
            fmt = "mxfp4"
        elif bits == 6 and strategy == "group" and group == 32:
            fmt = "mxfp6_e2m3"
        elif bits == 8 and strategy == "group" and group == 32 and "uint8" in scale_dtype:
            fmt = "mxfp8_e4m3"
        elif bits == 8 and strategy == "tensor":
            fmt = "fp8"
        elif bits == 8 and strategy == "channel":
            fmt = "fp8_channel"
    if not w.get("symmetric", True):
        text += " asymmetric"
        fmt = None
    return text, fmt


def read_scheme(qconfig: dict) -> tuple[list[dict], str | None]:
    groups, formats = [], set()
    for gname, group in (qconfig.get("config_groups") or {}).items():
        weights = group.get("weights")
        w_text, fmt = _weights_text(weights) if weights else ("weights unquantized", None)
        acts = group.get("input_activations")
        a_text = ""
        if acts:
            dyn = acts.get("dynamic")
            a_text = f", activations {acts.get('num_bits')}-bit {acts.get('type')} {acts.get('strategy')}" + (
                " dynamic" if dyn in (True, "local") else " static")
        fmt_text = (f" (weights = qgate {fmt})" if acts else f" (= qgate {fmt})") if fmt else ""
        groups.append({"group": gname, "format": group.get("format") or qconfig.get("format"),
                       "targets": list(group.get("targets") or []), "weights": weights, "input_activations": acts,
                       "qgate_format": fmt,
                       "text": f"{group.get('format') or qconfig.get('format')}: {w_text}{a_text}{fmt_text}"})
        formats.add(fmt)
    one = next(iter(formats)) if len(formats) == 1 else None
    return groups, one


_FUSED_LOCATIONS = ("weight_input", "weight_output")


def _online_transforms(transform_config) -> list[str]:
    """The transforms a checkpoint must apply at run time (anything not fused into the saved weights)."""
    if not transform_config:
        return []
    groups = transform_config.get("config_groups") if isinstance(transform_config, dict) else None
    if not isinstance(groups, dict):
        return ["unreadable transform_config"]
    online = []
    for gname, group in groups.items():
        for arg in (group or {}).get("apply") or []:
            location = (arg or {}).get("location")
            if location not in _FUSED_LOCATIONS:
                online.append(f"{gname} at {location}")
    return online


def _fused_rotations(transform_config) -> str:
    """e.g. "R1 hadamard block 32, R2 hadamard block 64" (SpinQuant's offline rotations)."""
    groups = (transform_config or {}).get("config_groups") or {}
    return ", ".join(f"{name} {g.get('type')}" + (f" block {g['head_dim']}" if g.get("head_dim") else "")
                     for name, g in groups.items())


def resolve_candidate(cand: CheckpointCandidate) -> ResolvedCandidate:
    """Find the checkpoint's files and read its quantization_config; one clear line when it is not one."""
    from qgate import modelopt_checkpoint
    from qgate.models import MemberSpec, _hub_snapshot, directory_hash

    path = Path(cand.location).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QgateError(f"candidate {cand.name}: {path} is not a directory; give a quantized checkpoint folder")
        directory = path.resolve()
        hub = False
    elif cand.location.startswith((".", "/", "~")) or cand.location.count("/") != 1:
        raise QgateError(f"candidate {cand.name}: {cand.location} does not exist (expected a checkpoint directory "
                         f"or a hub id owner/name)")
    else:
        directory = _hub_snapshot(MemberSpec("checkpoint", cand.name, "hub", cand.location, cand.revision))
        hub = True
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise QgateError(f"candidate {cand.name}: {directory} has no config.json; expected a quantized checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise QgateError(f"candidate {cand.name}: {config_file} is not JSON ({exc})") from None
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    ident = f"git:{directory.name}" if hub else f"sha256:{directory_hash(directory)}"
    if modelopt_checkpoint.is_modelopt(directory, qconfig):
        settings = modelopt_checkpoint.read_config(cand.name, directory, qconfig)
        groups, fmt = modelopt_checkpoint.scheme(settings)
        return ResolvedCandidate(cand, directory, ident, dict(qconfig or {}, **settings, quant_method="modelopt"),
                                 groups, fmt, loader="modelopt")
    if not isinstance(qconfig, dict):
        raise QgateError(f"candidate {cand.name}: {config_file} has no quantization_config; expected a quantized "
                         f"checkpoint (compressed-tensors, as llm-compressor or qgate export-checkpoint write, or "
                         f"ModelOpt's)")
    method = qconfig.get("quant_method")
    if method != "compressed-tensors":
        raise QgateError(f"candidate {cand.name}: {config_file}: quantization_config.quant_method is {method!r}; "
                         f"qgate loads compressed-tensors and modelopt checkpoints")
    online = _online_transforms(qconfig.get("transform_config"))
    if online:
        raise QgateError(f"candidate {cand.name}: {config_file}: quantization_config.transform_config holds online "
                         f"rotations ({', '.join(online)}; e.g. llm-compressor's QuIP Hadamard transforms), which "
                         f"transformers' dequantizing loader drops; qgate cannot run this checkpoint faithfully (use "
                         f"a checkpoint whose rotations are fused into the weights, e.g. SpinQuant R1/R2, or qgate's "
                         f"own recipe rotation to emulate one)")
    groups, fmt = read_scheme(qconfig)
    return ResolvedCandidate(cand, directory, ident, qconfig, groups, fmt,
                             rotations=_fused_rotations(qconfig.get("transform_config")))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_candidate(resolved: ResolvedCandidate, device, dtype, fallback_tokenizer_dir: Path | None = None,
                   progress: bool = True):
    """(model, tokenizer): the checkpoint dequantized (by compressed-tensors, or for a ModelOpt checkpoint by
    qgate.modelopt_checkpoint), weights in `dtype` on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from qgate.models import _corrupt_errors, _load_error, _transformers_bars

    where = f"{resolved.directory} (candidate {resolved.name})"
    with _transformers_bars(progress):
        try:
            if resolved.loader == "modelopt":
                from qgate import modelopt_checkpoint

                model = modelopt_checkpoint.load(resolved.directory, resolved.quantization_config["quant_algo"],
                                                 dtype, where)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    resolved.directory, dtype=dtype, quantization_config=CompressedTensorsConfig(run_compressed=False))
        except (*_corrupt_errors(), ImportError) as exc:
            raise _load_error(where, exc) from exc
    tokenizer_dir = resolved.directory
    if not any((resolved.directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer_dir = fallback_tokenizer_dir or resolved.directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except _corrupt_errors() as exc:
        raise _load_error(f"{tokenizer_dir} (tokenizer of candidate {resolved.name})", exc) from exc
    model.to(torch.device(device)).eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Emulation fidelity: the checkpoint's weights against qgate's fake quantization of the baseline
# --------------------------------------------------------------------------------------------


_FUSED = (re.compile(r"(q_proj|k_proj|v_proj)(\.weight)?$"), re.compile(r"(gate_proj|up_proj)(\.weight)?$"))


def _fused_siblings(name: str, names: set[str]) -> list[str]:
    """The projections vLLM fuses into one GEMM with `name` (q/k/v, gate/up), present in `names`."""
    for pattern in _FUSED:
        if pattern.search(name):
            stem = pattern.sub("", name)
            return sorted(n for n in names if pattern.search(n) and pattern.sub("", n) == stem)
    return [name]


def _nvfp4_with_tensor_amax(x, amax):
    """qgate's NVFP4 with the second-level scale taken from `amax` instead of the tensor's own."""
    import torch

    from qgate.backends import reference as ref

    s_tensor = ref.true_div(amax.reshape(()).to(torch.float32), 6.0 * 448.0)
    xb, last = ref._blocks(x.to(torch.float32), 16)
    q, _, total, _ = ref.quantize_nvfp4_blocks(xb, s_tensor)
    return ref._unblocks(q * total, last, x.shape)


def _rule(fmt: str, same: float, shared_same: float | None) -> str:
    """The rule that accounts for a difference, in words (each checked on the tensor, not assumed)."""
    if same == 1.0:
        return "identical" if fmt != "nvfp4" else "identical (in the bfloat16 compressed-tensors decodes to)"
    if shared_same == 1.0:
        return ("global scale: one per-tensor scale shared by the fused projections (q/k/v, gate/up), from their "
                "largest amax (as llm-compressor and ModelOpt export fused layers); with it, identical")
    if fmt == "nvfp4":
        return ("block scales or element codes differ (another scale or clamp rule, or a weight-changing method "
                "such as GPTQ)")
    if fmt.startswith("mx"):
        return "scale rule or element codes differ (e.g. RCEIL vs FLOOR E8M0 scales, or GPTQ-style rounding)"
    return "scale or element codes differ (another amax/scale rule, or GPTQ-style rounding)"


def fidelity(baseline, candidate, fmt: str, decoded_bfloat16: bool = True) -> list[dict]:
    """Per quantized tensor of the candidate: share of elements identical to qgate's fake quantization of the
    baseline (NVFP4: its bfloat16 rounding, what compressed-tensors decodes to), max and mean relative
    difference, and the rule that explains a difference."""
    import torch

    from qgate.backends import fake_quantize

    base = {n: p for n, p in baseline.named_parameters()}
    quantized = {n for n, p in candidate.named_parameters()
                 if p.dim() == 2 and n in base and base[n].shape == p.shape and not torch.equal(base[n].data, p.data)}
    rows = []
    with torch.no_grad():
        for name, p in candidate.named_parameters():
            if name not in quantized:
                continue
            b = base[name].data.float()
            got = p.data.float()
            emu = fake_quantize(b, fmt)
            ref = emu.to(torch.bfloat16).float() if fmt == "nvfp4" and decoded_bfloat16 else emu
            same = float((ref == got).float().mean())
            shared_same = None
            if same < 1.0 and fmt == "nvfp4":
                siblings = _fused_siblings(name, quantized)
                if len(siblings) > 1:
                    amax = max(base[s].data.float().abs().amax() for s in siblings)
                    alt = _nvfp4_with_tensor_amax(b, amax)
                    alt = alt.to(torch.bfloat16).float() if decoded_bfloat16 else alt
                    shared_same = float((alt == got).float().mean())
            nz = ref.abs() > 0
            rel = (ref - got).abs()[nz] / ref.abs()[nz]
            rows.append({"name": name.removesuffix(".weight"), "format": fmt, "numel": p.numel(),
                         "identical_share": same,
                         "max_rel_diff": float(rel.max()) if rel.numel() else 0.0,
                         "mean_rel_diff": float(rel.mean()) if rel.numel() else 0.0,
                         "identical_share_shared_global_scale": shared_same,
                         "rule": _rule(fmt, same, shared_same)})
    return rows


def fidelity_summary(rows: list[dict]) -> dict:
    n = sum(r["numel"] for r in rows)
    if not n:
        return {"tensors": 0}
    same = sum(r["identical_share"] * r["numel"] for r in rows) / n
    rules: dict[str, int] = {}
    for r in rows:
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    return {"tensors": len(rows), "identical_share": same,
            "max_rel_diff": max(r["max_rel_diff"] for r in rows),
            "mean_rel_diff": sum(r["mean_rel_diff"] * r["numel"] for r in rows) / n,
            "identical_tensors": sum(1 for r in rows if r["identical_share"] == 1.0), "rules": rules}


def candidate_fidelity(resolved: ResolvedCandidate, baseline, candidate) -> tuple[list[dict], dict | None, list[str]]:
    """(rows, summary, lines) of `fidelity` for a resolved candidate: skipped where its weights live in a rotated
    basis (rotations fused into them) or its scheme is no qgate format."""
    if resolved.rotations:
        return [], None, [f"emulation fidelity: not compared, the weights are rotated ({resolved.rotations})"]
    if not resolved.qgate_format:
        return [], None, fidelity_lines(None, [])
    rows = fidelity(baseline, candidate, resolved.qgate_format, decoded_bfloat16=resolved.decodes_to_bfloat16)
    return rows, fidelity_summary(rows), fidelity_lines(resolved.qgate_format, rows)


def fidelity_lines(fmt: str | None, rows: list[dict]) -> list[str]:
    if fmt is None:
        return ["emulation fidelity: the checkpoint's scheme is not a format qgate emulates"]
    s = fidelity_summary(rows)
    if not s["tensors"]:
        return [f"emulation fidelity ({fmt}): no quantized tensor matched the baseline's"]
    lines = [f"emulation fidelity vs qgate {fmt}: {100 * s['identical_share']:.3f}% of elements identical over "
             f"{s['tensors']} tensors ({s['identical_tensors']} entirely), max rel diff {s['max_rel_diff']:.3g}, "
             f"mean {s['mean_rel_diff']:.3g}"]
    for rule, count in s["rules"].items():
        lines.append(f"  {count} tensor(s): {rule}")
    return lines


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
