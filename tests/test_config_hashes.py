"""Pinned content hashes: the quantization config and the format records the store keys by.

The hashes below were computed once and must never change: a changed hash orphans every stored
evaluation (a baseline or candidate would be evaluated again under a new key). Moving code around
must leave them byte-identical.
"""

from __future__ import annotations

import json

import pytest

from qgate.canonical import content_hash
from qgate.formats import list_formats
from qgate.quantize import QuantizationResult
from qgate.recipes import Promotion, load_recipe, quant_config

RECIPES = ("uniform", "uniform-all", "mixed-fp4")
BACKENDS = ("reference", "triton")

PINNED_CONFIGS = {
    # (format, recipe, backend, promote, act_quant, kv_quant) -> content_hash(QuantizationResult.config())
    ("mxfp4", "uniform", "reference", None, None, None):
        "4fc9236006869f39383b907a242d1c490a46cbd86c0f840a5f05e73622f6b85d",
    ("mxfp4", "mixed-fp4", "reference", None, None, None):
        "968e974c4ad0e83b0fe8fe63b6fa96da602484e700516773b66fc5d6414bdf87",
    ("mxfp8_e4m3_rceil", "uniform", "reference", None, None, None):
        "eea65b4b7c902398ff16431b0e68da5fdd1ebef3a4d9e0f610f630b39af7835b",
    ("nvfp4", "uniform", "reference", None, None, None):
        "8e3a024a425e2401ba8e4f626f1e2b8f4e3bee84594ed74b8eebd3e8db282248",
    ("nvfp4", "mixed-fp4", "triton", None, None, None):
        "1dfdb1732cd397d9c2478580785c029a935b698870e90b27ecd59042f0648e00",
    ("fp8", "uniform", "reference", None, None, None):
        "b282a0cf05ebef8af2443e8afbd2e8f9b52e321ab98a77141c1ee6d6e5e23a92",
    ("fp8_channel", "uniform-all", "reference", None, None, None):
        "55532b3fd46423417b4653a3fa0933ba75a12fa8a496009e2b53bf3bc3eb5c8f",
    ("mxint8", "uniform", "reference", None, None, None):
        "89515224872be83334ce94e21434545037357f286e68728d535dcd37a02ff182",
    ("bf16", "uniform", "reference", None, None, None):
        "632aec6938cdda9ad6066efbdabaac715999c334c78e9ab3fef068986b1f7a4c",
    ("nvfp4", "uniform", "reference", "mxfp8_e4m3@0.3", None, None):
        "ddb8f5dc450b4a4183c3efd510363dfbe95ee83631fa597415b50c008b593165",
    ("mxfp4", "mixed-fp4", "reference", None, "weight", "mxfp8_e4m3"):
        "5cc346c65b943dd678a5ef1b370c76d8af38d692fec50931a03ee6389c3816bb",
}
CUSTOM_RECIPE = {"name": "x", "rules": [{"match": "v_proj$", "format": "keep", "optional": True},
                                        {"match": ".", "format": "$candidate"}]}
# every registered format x built-in recipe x built-in backend: a hash of the {key: hash} map
ALL_CONFIGS_DIGEST = "76af18b6cb46aee07fa833f48e3d0a00f61798e54019c7b547c9fba49a923197"
FORMAT_DICT_DIGEST = "19dcaa39cca8b5b7f22410413fcc88d6cb8893d43c53fa27336feb088a1ff9f1"
PINNED_FORMAT_DICTS = {
    "mxfp4": "48b34c7989a0c8e8f7a76c1922a43413541df12a587ecb20dce254f1beeceb29",
    "mxfp4_rceil": "35951d2a6559d7ade711dea868206f2b8cf1827fb14cda0dd84e74ea2666e63b",
    "nvfp4": "498478a94a16d4a4adc8ab484a6e1fac098af230bcd37a9bf7948d98bf4d398a",
    "fp8": "44cf20a7fd7b1718807d4f96e905c46243c167f00f7cee04c0adbfad9082eb11",
    "fp8_channel": "c7ffd61c8b422adc7bb7b9070533920675996647b816764dec13d58df6be29db",
    "bf16": "41e6b8c5f4846ea0ee82c8faa3555d36ac92f3ff792f43efc0cbb85c97c7fdf1",
}
FORMATS_JSON_DIGEST = "2f547ee9388f7df1edb7a68ff59c8f56a2128feff8ed42500dc4cd7f7439f6bb"  # `qgate formats --json`


def _config(fmt, recipe, backend, promote=None, act_quant=None, kv_quant=None) -> dict:
    """QuantizationResult.config() as quantize_model would report it (normalized options)."""
    return QuantizationResult(format=fmt, recipe=load_recipe(recipe), backend=backend, promote=Promotion.parse(promote),
                              act_quant=act_quant, kv_quant=kv_quant, tensors=[], kept=[], untied=[],
                              quantized_bytes=0.0, bf16_bytes=0.0, params=0).config()


@pytest.mark.parametrize("key", list(PINNED_CONFIGS), ids=lambda k: "-".join(str(p) for p in k if p))
def test_quantization_config_hashes_are_pinned(key):
    assert content_hash(_config(*key)) == PINNED_CONFIGS[key]
    assert content_hash(quant_config(*key)) == PINNED_CONFIGS[key]  # planned without a model: the same key


def test_quantization_config_hashes_of_custom_recipes_are_pinned():
    options = ("mxfp4", CUSTOM_RECIPE, "reference", {"to": "mxfp6_e2m3", "max_rel_error": 0.5}, "mxfp8_e4m3")
    assert content_hash(_config(*options)) == "4188fb016dab5ce2cce283423cafe135f82621fde4359864f5d4d3f1bc23f603"
    assert content_hash(quant_config(*options)) == "4188fb016dab5ce2cce283423cafe135f82621fde4359864f5d4d3f1bc23f603"
    no_candidate = _config(None, {"name": "x", "rules": [{"match": ".", "format": "fp8"}]}, "reference")
    assert content_hash(no_candidate) == "aa58ef1d0dd3368eb320e82ea549817c93fec162239451ba4df723d2129ee227"


def test_every_format_recipe_and_backend_hashes_as_pinned():
    hashes = {f"{f.name}/{r}/{b}": content_hash(_config(f.name, r, b))
              for f in list_formats() for r in RECIPES for b in BACKENDS}
    assert len(hashes) == 96
    assert content_hash(hashes) == ALL_CONFIGS_DIGEST
    planned = {f"{f.name}/{r}/{b}": content_hash(quant_config(f.name, r, b))
               for f in list_formats() for r in RECIPES for b in BACKENDS}
    assert planned == hashes


def test_format_records_and_formats_json_are_pinned():
    dicts = {f.name: content_hash(f.to_dict()) for f in list_formats()}
    for name, digest in PINNED_FORMAT_DICTS.items():
        assert dicts[name] == digest, name
    assert content_hash({f"to_dict/{k}": v for k, v in dicts.items()}) == FORMAT_DICT_DIGEST
    assert content_hash(json.dumps([f.describe() for f in list_formats()], indent=2)) == FORMATS_JSON_DIGEST


def test_loglikelihood_tasks_below_float32_are_keyed_on_float32_logprobs():
    """Scores summed in bf16 (before FastLM computed log-probabilities in float32) are never reused;
    generation tasks and float32 runs keep their keys."""
    from qgate.keys import evaluation_key, task_runtime

    gpu, cpu = {"device": "cuda", "dtype": "bfloat16"}, {"device": "cpu", "dtype": "float32"}
    scored, generated = {"name": "mmlu"}, {"name": "humaneval", "generation": {"max_gen_toks": 96}}
    assert task_runtime(gpu, scored) == {**gpu, "logprobs": "float32"}
    assert task_runtime(gpu, generated) == gpu
    assert task_runtime(cpu, scored) == cpu and task_runtime({**cpu, "backend": "reference"}, scored) == cpu
    old = evaluation_key("ck", None, "tc", "0.1.0", gpu)
    assert evaluation_key("ck", None, "tc", "0.1.0", task_runtime(gpu, scored)) != old
    assert evaluation_key("ck", None, "tc", "0.1.0", task_runtime(gpu, generated)) == old
