"""Recipes: which tensor gets which format (rules, planning, promotion) and the quantization's identity. No kernels.

A recipe is an ordered list of rules (first match wins) from tensor names to a format or `keep`.
Tensor names are module names for a module's `weight` (`model.layers.3.self_attn.v_proj`) and the
full parameter name otherwise (`model.layers.3.mlp.experts.down_proj`). Only tensors of two or more
dimensions are candidates: norms and biases always stay in full precision. Patterns are Python
regular expressions matched with `re.search`, so `v_proj$` serves Qwen2, Llama and Mistral alike.

Planning works on any torch module tree, the meta device included (qgate.footprint sizes models that
way), yet this module imports neither torch nor a backend: `quant_config` gives the store's key for a
quantization without a model.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgate.errors import QgateError
from qgate.formats import get_format, list_formats
from qgate.validation import YamlDoc, did_you_mean

if TYPE_CHECKING:
    import torch

KEEP = "keep"
ROTATION_BLOCKS = (16, 32, 64, 128, 256)  # qgate.rotation.BLOCK_SIZES (recipes import no torch)
CANDIDATE = "$candidate"

# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    match: str
    format: str  # a format name, "keep", or "$candidate" (the format being gated)
    optional: bool = False  # built-in rules for parts some architectures lack (MoE routers)

    def to_dict(self) -> dict:
        d = {"match": self.match, "format": self.format}
        if self.optional:
            d["optional"] = True
        return d


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    # block size of a Hadamard rotation applied to every quantized Linear before quantizing (weights W H,
    # multiplied back by H^T; with activation quantization the inputs are rotated too); None: no rotation
    rotation: int | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "rules": [r.to_dict() for r in self.rules]}
        if self.rotation:  # left out when absent, so recipes hash as they did before rotations existed
            d["rotation"] = self.rotation
        return d

    @property
    def uses_candidate(self) -> bool:
        return any(r.format == CANDIDATE for r in self.rules)


# MoE routers (Qwen2-MoE `mlp.gate`, Mixtral `block_sparse_moe.gate`, `router`) are never quantized.
_ROUTERS = Rule(r"(^|\.)(router|gate|shared_expert_gate)$", KEEP, optional=True)
# Tensors inside the repeated decoder blocks, whatever the architecture calls the list.
_DECODER_BLOCKS = r"(^|\.)(layers|h|blocks)\.\d+\."

BUILTIN_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "uniform",
            (_ROUTERS, Rule(_DECODER_BLOCKS, CANDIDATE)),
            "every linear layer of the decoder blocks in the candidate format; embeddings, lm_head, "
            "norms, biases and MoE routers kept",
        ),
        Recipe(
            "uniform-all",
            (_ROUTERS, Rule(r".", CANDIDATE)),
            "every linear layer and embedding (lm_head included) in the candidate format; norms, "
            "biases and MoE routers kept",
        ),
        Recipe(
            "mixed-fp4",
            (
                _ROUTERS,
                Rule(r"(v_proj|down_proj)$", "mxfp8_e4m3"),
                Rule(r"(q_proj|k_proj|o_proj|gate_proj|up_proj)$", CANDIDATE),
                Rule(r"(embed_tokens|wte|lm_head)$", "mxfp6_e2m3"),
            ),
            "q/k/o/gate/up in the candidate FP4 format, v_proj and down_proj in mxfp8_e4m3, embeddings "
            "and lm_head in mxfp6_e2m3; norms, biases and MoE routers kept",
        ),
    )
}


def list_recipes() -> list[str]:
    return list(BUILTIN_RECIPES)


def _check_format_name(value: Any, doc: YamlDoc, path: tuple) -> str:
    if not isinstance(value, str):
        raise doc.error(path, f"format must be a string (a format name, keep or $candidate), got {value!r}")
    if value in (KEEP, CANDIDATE):
        return value
    try:
        get_format(value)
    except QgateError:
        names = [f.name for f in list_formats()]
        raise doc.error(path, f"unknown format {value!r}{did_you_mean(value, names)}; expected keep, $candidate "
                              f"or one of: {', '.join(names)}") from None
    return value


def load_recipe(recipe: str | dict | Recipe | Path) -> Recipe:
    """A built-in name, a dict as written in YAML ({name, rules: [{match, format}]}), or a .yaml path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and recipe.endswith((".yaml", ".yml"))):
        path = Path(recipe)
        if not path.is_file():
            raise QgateError(f"recipe file {path} does not exist")
        doc = YamlDoc.read(path)
        return _recipe_from_doc(doc)
    if isinstance(recipe, str):
        if recipe not in BUILTIN_RECIPES:
            raise QgateError(f"unknown recipe {recipe!r}{did_you_mean(recipe, list(BUILTIN_RECIPES))}; "
                             f"expected one of: {', '.join(BUILTIN_RECIPES)} (or a .yaml file)")
        return BUILTIN_RECIPES[recipe]
    if isinstance(recipe, dict):
        return _recipe_from_doc(YamlDoc.from_data("recipe", recipe))
    raise QgateError(f"recipe must be a name, a mapping or a .yaml path, got {type(recipe).__name__}")


def _recipe_from_doc(doc: YamlDoc) -> Recipe:
    """Validate a recipe's data; errors name the file, line and key path (qgate.validation)."""
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error((), f"expected a mapping with 'name' and 'rules', got {type(data).__name__}")
    doc.check_keys((), data, ("name", "rules", "description", "rotation"))
    rotation = data.get("rotation")
    if rotation is not None and (isinstance(rotation, bool) or rotation not in ROTATION_BLOCKS):
        raise doc.error(("rotation",), f"expected a Hadamard block size, one of {', '.join(map(str, ROTATION_BLOCKS))}; "
                                       f"got {rotation!r}")
    name = data.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise doc.error(("name",), f"'name' must be a non-empty string, got {name!r}")
    rules_in = data.get("rules")
    if not isinstance(rules_in, list) or not rules_in:
        raise doc.error(("rules",), "'rules' must be a non-empty list of {match, format} mappings")
    rules = []
    for i, raw in enumerate(rules_in):
        at = ("rules", i)
        if not isinstance(raw, dict) or "match" not in raw or "format" not in raw:
            raise doc.error(at, f"expected a mapping with 'match' (a regex) and 'format', got {raw!r}")
        doc.check_keys(at, raw, ("match", "format", "optional"))
        pattern = raw["match"]
        if not isinstance(pattern, str):
            raise doc.error(at + ("match",), f"expected a regular expression string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise doc.error(at + ("match",), f"invalid regular expression {pattern!r} ({exc})") from None
        fmt = _check_format_name(raw["format"], doc, at + ("format",))
        optional = raw.get("optional", False)
        if not isinstance(optional, bool):
            raise doc.error(at + ("optional",), f"expected true or false, got {optional!r}")
        rules.append(Rule(pattern, fmt, optional))
    return Recipe(name, tuple(rules), str(data.get("description", "")), rotation)


# --------------------------------------------------------------------------------------------
# Planning: which tensor gets which format (works on meta-device models too)
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One stored tensor and the names it is known by (several when weights are tied)."""

    names: list[str]
    param: torch.nn.Parameter
    owners: list[tuple[torch.nn.Module, str]]  # (module, attribute) holding this tensor
    format: str | None  # None = kept in full precision
    rule: int | None  # index of the rule that decided, None when no rule matched

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def is_embedding_only(self) -> bool:
        import torch

        return all(isinstance(m, torch.nn.Embedding) for m, _ in self.owners)


@dataclass
class Plan:
    recipe: Recipe
    targets: list[Target]  # every parameter of the model, tied ones once
    untie: list[tuple[str, str]]  # (kept name, name that gets its own copy) for tied tensors split by the recipe


def _tensor_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def _decide(name: str, compiled: list[tuple[re.Pattern, str]], candidate: str | None) -> tuple[str | None, int | None]:
    for i, (pattern, fmt) in enumerate(compiled):
        if pattern.search(name):
            if fmt == KEEP:
                return None, i
            if fmt == CANDIDATE:
                fmt = candidate
            return (None if get_format(fmt).is_identity else fmt), i
    return None, None


def plan_model(model: torch.nn.Module, recipe: str | dict | Recipe, fmt: str | None = None) -> Plan:
    """Assign a format (or keep) to every parameter; raises if a rule matches no tensor at all."""
    recipe = load_recipe(recipe)
    if fmt is not None:
        fmt = get_format(fmt).name
    elif recipe.uses_candidate:
        raise QgateError(f"recipe {recipe.name!r} has $candidate rules; give the format being gated (--format)")
    compiled = [(re.compile(r.match), r.format) for r in recipe.rules]
    matched = [False] * len(compiled)

    modules = dict(model.named_modules())
    by_param: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append((pname, param))

    targets: list[Target] = []
    untie: list[tuple[str, str]] = []
    for entries in by_param.values():
        param = entries[0][1]
        groups: dict[str | None, Target] = {}
        for pname, _ in entries:
            module_name, _, attr = pname.rpartition(".")
            owner = (modules[module_name], attr)
            tname = _tensor_name(pname)
            if param.dim() >= 2:
                for i, (pattern, _) in enumerate(compiled):
                    if not matched[i] and pattern.search(tname):
                        matched[i] = True
                decided, rule = _decide(tname, compiled, fmt)
            else:
                decided, rule = None, None
            if decided in groups:
                groups[decided].names.append(tname)
                groups[decided].owners.append(owner)
            else:
                groups[decided] = Target([tname], param, [owner], decided, rule)
        group_list = list(groups.values())
        targets.extend(group_list)
        for other in group_list[1:]:
            untie.append((group_list[0].name, other.name))

    unmatched = [recipe.rules[i].match for i, hit in enumerate(matched) if not hit and not recipe.rules[i].optional]
    if unmatched:
        raise QgateError(
            f"recipe {recipe.name!r}: rule(s) {', '.join(repr(u) for u in unmatched)} match no tensor of this "
            f"model (tensor names look like {_example_names(targets)})"
        )
    return Plan(recipe, targets, untie)


def _example_names(targets: list[Target]) -> str:
    names = [t.name for t in targets if t.param.dim() >= 2]
    picks = names[:2] + names[-1:] if len(names) > 3 else names
    return ", ".join(picks)


def tensor_bits(target: Target) -> float:
    return 16.0 if target.format is None else get_format(target.format).bits_per_value


# --------------------------------------------------------------------------------------------
# Promotion: blocks with extreme error take a wider format
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """Promote a block to `to` when its relative error ||x_hat - x|| / ||x|| exceeds `max_rel_error`."""

    to: str
    max_rel_error: float

    @classmethod
    def parse(cls, value: Any) -> Promotion | None:
        if value is None or value is False:
            return None
        if isinstance(value, Promotion):
            return value
        if isinstance(value, str):
            fmt, sep, bound = value.partition("@")
            if not sep:
                raise QgateError(f"promotion {value!r}: expected FORMAT@MAX_REL_ERROR, e.g. mxfp8_e4m3@0.3")
            value = {"to": fmt, "max_rel_error": bound}
        if not isinstance(value, dict) or set(value) != {"to", "max_rel_error"}:
            raise QgateError(f"promotion {value!r}: expected {{to: FORMAT, max_rel_error: NUMBER}}")
        try:
            bound = float(value["max_rel_error"])
        except (TypeError, ValueError):
            raise QgateError(f"promotion bound {value['max_rel_error']!r}: expected a number") from None
        if not bound > 0:
            raise QgateError(f"promotion bound {bound}: expected a positive relative error")
        return cls(get_format(value["to"]).name, bound)


# --------------------------------------------------------------------------------------------
# The quantization's identity (the store hashes it)
# --------------------------------------------------------------------------------------------


def quant_config(
    fmt: str | None,
    recipe: str | dict | Recipe | Path,
    backend: str,
    promote: Any = None,
    act_quant: bool | str | None = None,
    kv_quant: str | None = None,
) -> dict:
    """Everything that determines the quantized weights and the forward pass, as the store hashes it.

    QuantizationResult.config() is this function applied to what quantize_model did, so a planned key
    (computed without a model) and the key of a finished quantization cannot differ. Options are taken
    as quantize_model takes them: promote None, "FORMAT@BOUND", a mapping or a Promotion; act_quant
    False/None, True or "weight" (each Linear's own weight format), or a format name.
    """
    promotion = Promotion.parse(promote)
    if act_quant is True or act_quant == "weight":
        act_name = "weight"
    else:
        act_name = get_format(act_quant).name if act_quant else None
    return {
        "format": get_format(fmt).name if fmt else None,
        "recipe": load_recipe(recipe).to_dict(),
        "backend": backend,
        "promote": asdict(promotion) if promotion else None,
        "act_quant": act_name,
        "kv_quant": get_format(kv_quant).name if kv_quant else None,
    }
