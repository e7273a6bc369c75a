"""qgate.recipes: recipes as data, their validation, and the quantization config, all without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qgate import recipes
from qgate.errors import QgateError


def test_builtin_recipes_and_unknown_name():
    assert recipes.list_recipes() == ["uniform", "uniform-all", "mixed-fp4"]
    with pytest.raises(QgateError, match=r"unknown recipe 'q4km'.*uniform, uniform-all, mixed-fp4"):
        recipes.load_recipe("q4km")


def test_recipe_from_dict_and_yaml(tmp_path):
    data = {"name": "attn-only", "rules": [{"match": r"v_proj$", "format": "keep"},
                                            {"match": r"self_attn", "format": "$candidate"}]}
    recipe = recipes.load_recipe(data)
    assert recipe.name == "attn-only" and recipe.to_dict() == data
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: attn-only\nrules:\n  - {match: 'v_proj$', format: keep}\n  - {match: self_attn, format: $candidate}\n"
    )
    assert recipes.load_recipe(str(path)) == recipe


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rules": [{"match": "(", "format": "mxfp4"}]}, r"rules\[0\]\.match: invalid regular expression"),
        ({"rules": [{"match": "x", "format": "int3"}]}, r"rules\[0\]\.format: unknown format 'int3'"),
        ({"rules": [{"match": "x"}]}, r"rules\[0\]: expected a mapping with 'match'"),
        ({"rules": []}, r"'rules' must be a non-empty list"),
        ({"rules": [{"match": "x", "format": "keep", "when": 1}]}, r"rules\[0\]\.when: unknown key"),
    ],
)
def test_bad_recipes_name_the_field(bad, message):
    with pytest.raises(QgateError, match=message):
        recipes.load_recipe(bad)


def test_recipes_import_neither_torch_nor_a_kernel():
    code = ("import sys, qgate.recipes; "
            "assert not {'torch', 'qgate.backends', 'qgate.quantize'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("options", [
    {},
    {"promote": "mxfp8_e4m3@0.3"},
    {"promote": {"to": "mxfp6_e2m3", "max_rel_error": 0.5}, "act_quant": "mxfp8_e4m3", "kv_quant": "mxfp8_e4m3"},
    {"act_quant": True},
])
def test_quant_config_is_what_quantization_result_config_returns(options):
    from qgate.models import build_tiny_model
    from qgate.quantize import quantize_model

    for fmt, recipe in (("nvfp4", "mixed-fp4"), ("mxfp4", "uniform"),
                        ("fp8", {"name": "x", "rules": [{"match": "v_proj$", "format": "keep"},
                                                        {"match": ".", "format": "$candidate"}]})):
        result = quantize_model(build_tiny_model("qwen2"), fmt, recipe, progress=False, **options)
        planned = recipes.quant_config(fmt, recipe, "reference", options.get("promote"), options.get("act_quant"),
                                       options.get("kv_quant"))
        assert planned == result.config()
        assert list(planned) == list(result.config())


def test_quant_config_without_a_candidate_format():
    config = recipes.quant_config(None, {"name": "x", "rules": [{"match": ".", "format": "fp8"}]}, "reference")
    assert config == {"format": None, "recipe": {"name": "x", "rules": [{"match": ".", "format": "fp8"}]},
                      "backend": "reference", "promote": None, "act_quant": None, "kv_quant": None}
