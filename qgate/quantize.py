"""The kernel loop: fake-quantize a torch model in place, tensor by tensor, with statistics.

Which tensor gets which format is qgate.recipes' job (a plan); this module walks the plan. Quantizing
walks each tensor in row chunks and writes the fake-quantized values back into the parameter, so
memory grows by at most one chunk, never by a copy of the model. Formats with a per-tensor scale
(nvfp4, fp8) see the tensor's amax through one extra "anchor" row appended to each chunk, which makes
chunked results identical to quantizing the whole tensor at once. Activation and KV-cache
quantization are forward hooks.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qgate.errors import QgateError
from qgate.formats import ScaleKind
from qgate.hf_cache import cache_argument
from qgate.recipes import Plan, Promotion, Recipe, Target, load_recipe, plan_model, quant_config

# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass
class TensorStats:
    name: str
    format: str
    shape: tuple[int, ...]
    numel: int
    sqnr_db: float  # inf when nothing changed
    rel_mse: float  # noise energy / signal energy
    saturated_block_share: float  # blocks whose largest value exceeded the element's range at their scale
    blocks: int
    promoted_blocks: int
    bytes: float  # at the format's effective bits (promoted blocks at the wider format's)
    max_block_rel_error: float = 0.0  # worst block's ||x_hat - x|| / ||x||, to choose a promotion bound
    also: list[str] = field(default_factory=list)  # other names of the same (tied) tensor
    signal: float = 0.0  # sum x^2, kept to aggregate SQNR over tensors
    noise: float = 0.0  # sum (x_hat - x)^2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        for key in ("sqnr_db", "max_block_rel_error"):
            if not math.isfinite(d[key]):
                d[key] = None  # JSON has no infinity
        return d


def summary_sqnr(summary: dict) -> str:
    """A summary's aggregate SQNR as text: "31.20 dB", "inf" (nothing changed) or "NaN" (non-finite weights)."""
    if summary.get("non_finite_tensors"):
        return "NaN"
    return f"{summary['sqnr_db']:.2f} dB" if summary.get("sqnr_db") is not None else "inf"


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf when nothing changed, NaN when the tensor holds NaN or inf."""
    if math.isnan(signal) or math.isnan(noise) or math.isinf(signal) or math.isinf(noise):
        return math.nan
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# --------------------------------------------------------------------------------------------
# Quantizing one tensor, chunk by chunk
# --------------------------------------------------------------------------------------------

_PER_TENSOR_SCALES = (ScaleKind.E4M3_FP32, ScaleKind.FP32_TENSOR)  # nvfp4's second-level scale, fp8's single scale
_CHUNK_ELEMENTS = 1 << 20  # 1M values (4 MB in float32) per chunk bounds the temporaries


def _finite_amax(rows: torch.Tensor) -> torch.Tensor:
    amax = torch.zeros((), dtype=torch.float32, device=rows.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0 : r0 + step].float().abs()
        amax = torch.maximum(amax, torch.where(torch.isfinite(chunk), chunk, 0.0).amax())
    return amax


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-x.shape[1]) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(x.shape[0], -1, block)


class _TensorQuantizer:
    """Fake-quantizes [rows, last] chunks of one tensor exactly as the whole tensor would be."""

    def __init__(self, fmt, backend, tensor_amax: torch.Tensor | None, last: int):
        self.fmt = fmt
        self.backend = backend
        self.per_tensor = fmt.scale in _PER_TENSOR_SCALES
        self.block = fmt.block_size or last  # per-row/per-tensor formats: one "block" per row
        self.anchor = None
        if self.per_tensor:
            self.anchor = torch.zeros(1, last, dtype=torch.float32, device=tensor_amax.device)
            self.anchor[0, 0] = tensor_amax
        self.tensor_amax = tensor_amax

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            return self.backend.fake_quantize(chunk, self.fmt)
        with_anchor = torch.cat([chunk, self.anchor.to(chunk.dtype)], dim=0)
        return self.backend.fake_quantize(with_anchor, self.fmt)[:-1]

    def saturated(self, block_amax: torch.Tensor) -> torch.Tensor:
        """Blocks whose largest magnitude exceeds the element's largest value at the block's scale."""
        from qgate.backends import reference as ref
        from qgate.formats import E2M1, E4M3

        elem = self.fmt.element
        finite = torch.isfinite(block_amax) & (block_amax > 0)
        amax = torch.where(finite, block_amax, 1.0)
        if self.fmt.scale is ScaleKind.E8M0:
            scaled = amax / ref.exact_pow2(ref.mx_shared_exponent(amax, elem, self.fmt.scale_rule))
        elif self.fmt.scale is ScaleKind.E4M3_FP32:
            # the reference's own scale functions, so CUDA and CPU count the same blocks
            s_tensor = ref.true_div(self.tensor_amax, E2M1.max_value * E4M3.max_value)
            s_tensor = torch.where(s_tensor > 0, s_tensor, 1.0)
            scaled = amax / (ref.nvfp4_block_scale(amax, s_tensor) * s_tensor)
        elif self.fmt.scale is ScaleKind.FP32_TENSOR:
            scaled = amax / torch.where(self.tensor_amax > 0, ref.true_div(self.tensor_amax, E4M3.max_value), 1.0)
        elif self.fmt.scale is ScaleKind.FP32_CHANNEL:
            scaled = amax / ref.true_div(amax, E4M3.max_value)
        else:
            return torch.zeros_like(finite)
        return finite & (scaled > elem.max_value)


def _quantize_tensor(
    target: Target, backend_for, promotion: Promotion | None, tensor_name: str, rotation: int | None = None
) -> TensorStats:
    from qgate.formats import get_format
    from qgate.rotation import hadamard_blocks

    fmt = get_format(target.format)
    param = target.param
    data = param.data
    if rotation:  # quantize W H; H is orthogonal, so the error energy (SQNR) is the same in both bases
        data.copy_(hadamard_blocks(data, rotation))
    last = data.shape[-1]
    rows = data.view(-1, last) if data.is_contiguous() else None
    if rows is None:  # unusual layouts: quantize through a contiguous copy written back at the end
        rows = data.contiguous().view(-1, last)
    backend = backend_for(data.device)
    wider_fmt = get_format(promotion.to) if promotion else None
    # only formats with a per-tensor scale need the tensor's amax (one extra pass over it)
    needs_amax = any(f is not None and f.scale in _PER_TENSOR_SCALES for f in (fmt, wider_fmt))
    tensor_amax = _finite_amax(rows) if needs_amax else None
    quant = _TensorQuantizer(fmt, backend, tensor_amax, last)
    wider = _TensorQuantizer(wider_fmt, backend, tensor_amax, last) if promotion else None
    block = quant.block

    signal = noise = 0.0
    blocks = saturated = promoted = 0
    max_rel = 0.0
    step = max(1, _CHUNK_ELEMENTS // last)
    with torch.no_grad():
        for r0 in range(0, rows.shape[0], step):
            x = rows[r0 : r0 + step]
            xq = quant(x).to(data.dtype)
            xf = x.float()
            xb = _blocked(xf, block)
            err = _blocked(xq.float() - xf, block)
            sig_b = xb.square().sum(-1)
            noise_b = err.square().sum(-1)
            rel_b = torch.sqrt(noise_b / torch.where(sig_b > 0, sig_b, 1.0))
            rel_b = torch.where(sig_b > 0, rel_b, 0.0)
            saturated += int(quant.saturated(xb.abs().amax(-1)).sum())
            if promotion is not None:
                promote = rel_b > promotion.max_rel_error
                n_prom = int(promote.sum())
                if n_prom:
                    xw = wider(x).to(data.dtype)
                    mask = promote.unsqueeze(-1).expand_as(xb).reshape(xb.shape[0], -1)[:, :last]
                    xq = torch.where(mask, xw, xq)
                    err = _blocked(xq.float() - xf, block)
                    noise_b = err.square().sum(-1)
                    promoted += n_prom
            if rel_b.numel():
                max_rel = max(max_rel, float(rel_b.max()))
            signal += float(sig_b.sum(dtype=torch.float64))
            noise += float(noise_b.sum(dtype=torch.float64))
            blocks += sig_b.numel()
            rows[r0 : r0 + step].copy_(xq)
    if rows.data_ptr() != data.data_ptr():
        data.copy_(rows.view_as(data))
    if rotation:  # back to the model's basis: Q(W H) H^T
        data.copy_(hadamard_blocks(data, rotation))

    numel = data.numel()
    promoted_values = min(numel, promoted * block)
    bits = fmt.bits_per_value * (numel - promoted_values)
    if promotion is not None:
        bits += get_format(promotion.to).bits_per_value * promoted_values
    return TensorStats(
        name=tensor_name,
        format=fmt.name,
        shape=tuple(data.shape),
        numel=numel,
        sqnr_db=sqnr_db(signal, noise),
        rel_mse=(noise / signal) if signal > 0 else 0.0,
        saturated_block_share=saturated / blocks if blocks else 0.0,
        blocks=blocks,
        promoted_blocks=promoted,
        bytes=bits / 8.0,
        max_block_rel_error=max_rel,
        also=target.names[1:],
        signal=signal,
        noise=noise,
    )


# --------------------------------------------------------------------------------------------
# Activation and KV-cache quantization (forward hooks)
# --------------------------------------------------------------------------------------------


def _activation_hook(fmt, backend, rotation: int | None = None):
    """Fake-quantize a Linear's input; with a rotation, Q(x H) H^T, so that the product with the rotated
    weight Q(W H) H^T is Q(x H) Q(W H)^T. fmt None: rotation only (x H H^T)."""
    from qgate.rotation import hadamard_blocks

    def hook(module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if rotation:
            x = hadamard_blocks(x, rotation)
        if fmt is not None:
            x = backend.fake_quantize(x, fmt)
        if rotation:
            x = hadamard_blocks(x, rotation)
        return (x,) + tuple(args[1:])

    return hook


class KVCacheQuantizer:
    """Quantizes keys (after RoPE) and values on their way into the KV cache.

    A forward pre-hook on the top-level model makes sure a cache exists (even when the caller runs
    with use_cache=False, so every path quantizes alike) and wraps that cache's `update`, which the
    attention layers call with the new keys and values; what they attend to is what the cache returns.
    Blocks run along head_dim, one row per token and head.
    """

    def __init__(self, fmt, backend, config):
        self.fmt = fmt
        self.backend = backend
        self.config = config

    def wrap(self, cache):
        if getattr(cache, "_qgate_kv_format", None) is not None:
            return cache
        original = cache.update
        fq = self.backend.fake_quantize
        fmt = self.fmt

        def update(key_states, value_states, *args, **kwargs):
            return original(fq(key_states, fmt), fq(value_states, fmt), *args, **kwargs)

        cache.update = update
        cache._qgate_kv_format = fmt.name
        return cache

    def __call__(self, module, args, kwargs):
        from transformers import DynamicCache

        name = cache_argument()
        cache = kwargs.get(name)
        if cache is None:
            cache = DynamicCache(config=self.config)
        kwargs[name] = self.wrap(cache)
        return args, kwargs


# --------------------------------------------------------------------------------------------
# The result and the entry point
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizationResult:
    format: str | None
    recipe: Recipe
    backend: str
    promote: Promotion | None
    act_quant: str | None  # "weight" (each Linear's own weight format), a format name, or None
    kv_quant: str | None
    tensors: list[TensorStats]
    kept: list[str]  # names of tensors left in full precision (2-D and up)
    untied: list[tuple[str, str]]
    quantized_bytes: float  # the whole model at the formats' effective bits (kept tensors at 16 bits)
    bf16_bytes: float  # the whole model at 16 bits
    params: int
    seconds: float = 0.0
    hooks: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        signal = sum(t.signal for t in self.tensors)
        noise = sum(t.noise for t in self.tensors)
        blocks = sum(t.blocks for t in self.tensors)
        promoted = sum(t.promoted_blocks for t in self.tensors)
        saturated = sum(t.saturated_block_share * t.blocks for t in self.tensors)
        sqnr = sqnr_db(signal, noise) if self.tensors else math.inf
        return {
            "format": self.format,
            "recipe": self.recipe.name,
            "tensors": len(self.tensors),
            "kept_tensors": len(self.kept),
            "quantized_params": sum(t.numel for t in self.tensors),
            "params": self.params,
            "sqnr_db": sqnr if math.isfinite(sqnr) else None,  # None: inf (nothing changed) or NaN, below
            "non_finite_tensors": [t.name for t in self.tensors if math.isnan(t.sqnr_db)],
            "rel_mse": (noise / signal) if signal > 0 else 0.0,
            "blocks": blocks,
            "promoted_blocks": promoted,
            "promoted_share": promoted / blocks if blocks else 0.0,
            "saturated_block_share": saturated / blocks if blocks else 0.0,
            "quantized_bytes": self.quantized_bytes,
            "bf16_bytes": self.bf16_bytes,
            "footprint_ratio": self.quantized_bytes / self.bf16_bytes if self.bf16_bytes else 1.0,
            "untied": [list(pair) for pair in self.untied],
            "seconds": round(self.seconds, 3),
        }

    def config(self) -> dict:
        """Everything that determines the quantized weights and the forward pass (the store hashes this):
        qgate.recipes.quant_config of this quantization's options."""
        return quant_config(self.format, self.recipe, self.backend, self.promote, self.act_quant, self.kv_quant)

    def log_lines(self) -> list[str]:
        width = max([len(t.name) for t in self.tensors] + [10])
        lines = []
        for t in self.tensors:
            sq = f"{t.sqnr_db:5.1f}" if math.isfinite(t.sqnr_db) else ("  NaN" if math.isnan(t.sqnr_db) else "  inf")
            line = f"{t.name:<{width}}  {t.format:<11}  SQNR {sq} dB  promoted {t.promoted_blocks}/{t.blocks}"
            if t.also:
                line += f"  (tied: {', '.join(t.also)})"
            lines.append(line)
        for kept, split in self.untied:
            lines.append(f"untied {split} from {kept}: the recipe gives them different formats")
        s = self.summary()
        sq = summary_sqnr(s)
        lines.append(f"aggregate SQNR {sq} over {s['tensors']} tensors ({s['quantized_params']:,} values)")
        if s["non_finite_tensors"]:
            lines.append(f"non-finite (NaN/inf) values in {len(s['non_finite_tensors'])} tensor(s): "
                         f"{', '.join(s['non_finite_tensors'][:5])}")
        lines.append(
            f"promoted {s['promoted_blocks']} of {s['blocks']} blocks ({100 * s['promoted_share']:.2f}%)"
        )
        lines.append(
            f"footprint {_fmt_bytes(self.quantized_bytes)} vs {_fmt_bytes(self.bf16_bytes)} at bf16 "
            f"({s['footprint_ratio']:.3f}x, {self.params:,} parameters)"
        )
        return lines

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


class _Progress:
    """A one-line bar on a TTY; otherwise a plain line every tenth of the work (stderr)."""

    def __init__(self, total: int, enabled: bool, label: str = "quantize"):
        self.total, self.enabled, self.label = total, enabled and total > 0, label
        self.tty = sys.stderr.isatty()
        self.next_mark = 0

    def step(self, done: int, name: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            filled = int(30 * done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} {name[:60]:<60}")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif done * 10 >= self.next_mark * self.total or done == self.total:
            print(f"{self.label}: {done}/{self.total} tensors", file=sys.stderr, flush=True)
            self.next_mark = done * 10 // self.total + 1


def _untie(model: torch.nn.Module, plan: Plan) -> None:
    """Give each tied name the recipe split apart its own copy of the tensor (one tensor's memory)."""
    seen: dict[int, Target] = {}
    for target in plan.targets:
        first = seen.setdefault(id(target.param), target)
        if first is target:
            continue
        copy = torch.nn.Parameter(target.param.detach().clone(), requires_grad=target.param.requires_grad)
        for module, attr in target.owners:
            setattr(module, attr, copy)
        target.param = copy
    if plan.untie and hasattr(model, "config"):
        # so that a later tie_weights() (e.g. in save_pretrained or resize) does not re-tie them
        model.config.tie_word_embeddings = False
        text_config = getattr(model.config, "get_text_config", lambda: None)()
        if text_config is not None and text_config is not model.config:
            text_config.tie_word_embeddings = False


def _rotation_for(target: Target, recipe: Recipe) -> int | None:
    """The recipe's rotation block for a Linear's weight (embeddings and other tensors are not rotated)."""
    if not recipe.rotation:
        return None
    if not all(isinstance(m, torch.nn.Linear) and attr == "weight" for m, attr in target.owners):
        return None
    if target.param.shape[-1] % recipe.rotation:
        raise QgateError(f"recipe {recipe.name!r}: rotation block {recipe.rotation} does not divide {target.name}'s "
                         f"{target.param.shape[-1]} input features")
    return recipe.rotation


def quantize_model(
    model: torch.nn.Module,
    fmt: str | None,
    recipe: str | dict | Recipe = "uniform",
    backend: str | None = None,
    promote: Any = None,
    act_quant: bool | str = False,
    kv_quant: str | None = None,
    progress: bool = True,
) -> QuantizationResult:
    """Fake-quantize `model` in place following `recipe` (`$candidate` = `fmt`); returns statistics.

    promote: None, "FORMAT@MAX_REL_ERROR" or {to, max_rel_error}: blocks whose relative error
      exceeds the bound take the wider format instead.
    act_quant: False, True (the inputs of each quantized Linear in that Linear's weight format) or a
      format name; blocks along K (the input's last dimension).
    kv_quant: None or a format name: keys after RoPE and values as they enter the KV cache.
    """
    from qgate.backends import check_support, get_backend
    from qgate.formats import get_format

    started = time.perf_counter()
    recipe = load_recipe(recipe)
    promotion = Promotion.parse(promote)
    plan = plan_model(model, recipe, fmt)
    _untie(model, plan)

    backends: dict[str, Any] = {}

    def backend_for(device: torch.device):
        key = str(device)
        if key not in backends:
            backends[key] = get_backend(backend, device=device)
        return backends[key]

    first_param = next(model.parameters(), None)
    first_backend = backend_for(first_param.device if first_param is not None else torch.device("cpu"))
    backend_name = first_backend.name
    weight_formats = {t.format for t in plan.targets if t.format is not None} | ({promotion.to} if promotion else set())
    for weight_format in sorted(weight_formats):  # checked before any tensor changes
        check_support(first_backend, weight_format, name=backend)

    todo = [t for t in plan.targets if t.format is not None]
    rotations = {id(t): _rotation_for(t, recipe) for t in todo}  # checked before any tensor changes
    bar = _Progress(len(todo), progress)
    stats: list[TensorStats] = []
    for i, target in enumerate(todo, 1):
        stats.append(_quantize_tensor(target, backend_for, promotion, target.name, rotations[id(target)]))
        bar.step(i, target.name)

    stat_bytes = {id(t.param): s.bytes for t, s in zip(todo, stats)}
    quantized_bytes = bf16_bytes = 0.0
    params = 0
    for t in plan.targets:
        n = t.param.numel()
        params += n
        bf16_bytes += 2.0 * n
        quantized_bytes += stat_bytes.get(id(t.param), 2.0 * n)

    hooks = []
    act_name = None
    if act_quant:
        act_name = "weight" if act_quant is True else get_format(act_quant).name
        if act_quant is not True:
            check_support(first_backend, act_name, name=backend)
        for target in todo:
            weight_fmt = get_format(target.format if act_quant is True else act_quant)
            for module, attr in target.owners:
                if isinstance(module, torch.nn.Linear) and attr == "weight":
                    hook = _activation_hook(weight_fmt, backend_for(target.param.device), rotations[id(target)])
                    hooks.append(module.register_forward_pre_hook(hook))
    kv_name = None
    if kv_quant:
        kv_fmt = get_format(kv_quant)
        kv_name = kv_fmt.name
        check_support(first_backend, kv_fmt, name=backend)
        import inspect

        if cache_argument() not in inspect.signature(model.forward).parameters:
            raise QgateError(f"kv_quant needs a model whose forward takes a KV cache (argument "
                             f"{cache_argument()!r} in this transformers release); {type(model).__name__} does not")
        quantizer = KVCacheQuantizer(kv_fmt, backend_for(first_param.device), getattr(model, "config", None))
        hooks.append(model.register_forward_pre_hook(quantizer, with_kwargs=True))

    return QuantizationResult(
        format=get_format(fmt).name if fmt else None,
        recipe=recipe,
        backend=backend_name,
        promote=promotion,
        act_quant=act_name,
        kv_quant=kv_name,
        tensors=stats,
        kept=[t.name for t in plan.targets if t.format is None and t.param.dim() >= 2],
        untied=list(plan.untie),
        quantized_bytes=quantized_bytes,
        bf16_bytes=bf16_bytes,
        params=params,
        seconds=time.perf_counter() - started,
        hooks=hooks,
    )
