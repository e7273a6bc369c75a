"""qgate export-checkpoint: compressed-tensors' own decompression (through transformers) gives back qgate's
fake-quantized weights bit for bit (NVFP4: their bfloat16 rounding, the dtype compressed-tensors decodes to)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from qgate.backends import fake_quantize
from qgate.cli import cli
from qgate.errors import QgateError
from qgate.checkpoint_export import EXPORTABLE, export_model
from qgate.models import build_tiny_model
from tests.tiny import byte_tokenizer


def load_decompressed(path):
    """The checkpoint as compressed-tensors decompresses it when transformers loads it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(run_compressed=False))


def expected(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    fq = fake_quantize(weight.float(), fmt)
    return fq.to(torch.bfloat16).float() if fmt == "nvfp4" else fq


def mismatches(original, decompressed, fmt, quantized=lambda name: name.startswith("model.layers")):
    """{name: number of differing elements} over every 2-D weight (quantized ones against qgate's
    fake quantization, the others against themselves); also the names that were not quantized at all."""
    got = dict(decompressed.named_parameters())
    out, unchanged = {}, []
    for name, p in original.named_parameters():
        if name not in got:
            continue
        want = expected(p.data, fmt) if quantized(name) and p.dim() == 2 else p.data
        bad = int((want != got[name].data.float()).sum())
        if bad:
            out[name] = bad
        if quantized(name) and p.dim() == 2 and torch.equal(p.data, got[name].data):
            unchanged.append(name)
    return out, unchanged


@pytest.mark.parametrize("fmt", EXPORTABLE)
def test_tiny_qwen2_round_trip_is_bit_exact(tmp_path, fmt):
    model = build_tiny_model("qwen2", vocab_size=257)
    result = export_model(model, byte_tokenizer(), fmt, "uniform", tmp_path / "ckpt", progress=False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == {"nvfp4": "nvfp4-pack-quantized", "mxfp6": "mxfp6-pack-quantized",
                                "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized",
                                "fp8": "float-quantized"}[fmt.split("_")[0]]
    assert len(result.tensors) == 2 * 7  # every linear of the two decoder blocks
    bad, unchanged = mismatches(model, load_decompressed(tmp_path / "ckpt"), fmt)
    assert bad == {}
    assert unchanged == []  # the weights really are quantized (the test would pass on a plain copy otherwise)


def test_nvfp4_global_scale_reproduces_the_float32_tensor_scale(tmp_path):
    """compressed-tensors divides the E4M3 block scale by the stored global scale; qgate multiplies by
    s_tensor = amax / 2688. The stored global scale is the float32 that makes both agree in bfloat16."""
    from safetensors.torch import load_file

    model = build_tiny_model("qwen2", vocab_size=257)
    export_model(model, byte_tokenizer(), "nvfp4", "uniform", tmp_path / "c", progress=False)
    state = load_file(tmp_path / "c" / "model.safetensors")
    w = model.model.layers[1].mlp.down_proj.weight.data
    g = state["model.layers.1.mlp.down_proj.weight_global_scale"]
    s_tensor = w.abs().amax() / torch.tensor(2688.0)
    assert g.dtype == torch.float32 and abs(float(g) * float(s_tensor) - 1) < 1e-5
    assert state["model.layers.1.mlp.down_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert state["model.layers.1.mlp.down_proj.weight_packed"].shape == (w.shape[0], w.shape[1] // 2)


def test_mixed_recipe_exports_each_format_and_keeps_the_rest(tmp_path):
    """Two formats in one checkpoint (mixed-precision), decompressed module by module by compressed-tensors'
    compressors (transformers 5.24's dequantizing loader refuses mixed-precision checkpoints)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model = build_tiny_model("llama", vocab_size=257)
    recipe = {"name": "two", "rules": [{"match": "v_proj$", "format": "fp8_channel"},
                                       {"match": "layers\\.\\d+\\.", "format": "$candidate"}]}
    export_model(model, byte_tokenizer(), "mxfp4", recipe, tmp_path / "c", progress=False)
    config = QuantizationConfig.model_validate(
        json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"])
    assert config.format == "mixed-precision" and len(config.config_groups) == 2
    state = load_file(tmp_path / "c" / "model.safetensors")
    schemes = {}
    for scheme in config.config_groups.values():
        for target in scheme.targets:
            schemes[target.removeprefix("re:^").removesuffix("$").replace("\\", "")] = scheme
    for name, p in model.named_parameters():
        module = name.removesuffix(".weight")
        if module not in schemes:
            assert torch.equal(state[name], p.data), name  # embeddings, norms: untouched
            continue
        scheme = schemes[module]
        local = {k.removeprefix(module + "."): v for k, v in state.items() if k.startswith(module + ".")}
        out = BaseCompressor.get_value_from_registry(scheme.format).decompress(local, scheme)["weight"]
        fmt = "fp8_channel" if "v_proj" in name else "mxfp4"
        assert scheme.format == ("float-quantized" if fmt == "fp8_channel" else "mxfp4-pack-quantized")
        assert torch.equal(out.float(), fake_quantize(p.data, fmt)), name
        assert not torch.equal(out.float(), p.data)


def test_export_refuses_what_compressed_tensors_cannot_hold(tmp_path):
    model = build_tiny_model("qwen2", vocab_size=257)
    with pytest.raises(QgateError, match="mxfp8_e5m2 cannot be exported.*E4M3 elements only"):
        export_model(model, None, "mxfp8_e5m2", "uniform", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    runner = CliRunner()
    done = runner.invoke(cli, ["export-checkpoint", "--format", "mxint8", "-o", str(tmp_path / "o")])
    assert done.exit_code == 2 and "mxint8 cannot be exported" in done.output and "Traceback" not in done.output
    assert not (tmp_path / "o").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    done = runner.invoke(cli, ["export-checkpoint", "--format", "nvfp4", "-o", str(full)])
    assert done.exit_code == 2 and "is not empty" in done.output
    assert [p.name for p in full.iterdir()] == ["x"]


@pytest.mark.slow
def test_smollm2_nvfp4_export_round_trips_through_the_cli(tmp_path):
    """The real model through the command line; the first and last decoder blocks only (the whole path at a
    fraction of the time: the other 28 blocks are the same code on the same shapes)."""
    from qgate.models import load

    recipe = tmp_path / "ends.yaml"
    recipe.write_text("name: ends\nrules:\n  - {match: 'layers\\.(0|29)\\.', format: $candidate}\n")
    out = tmp_path / "smollm2-nvfp4"
    done = CliRunner().invoke(cli, ["export-checkpoint", "--format", "nvfp4", "--recipe", str(recipe), "-o", str(out),
                                    "--json"])
    assert done.exit_code == 0, done.output
    info = json.loads(done.output[done.output.index("{"):])
    assert len(info["tensors"]) == 2 * 7
    baseline = load("smollm2", device="cpu", dtype="float32", progress=False).model
    bad, unchanged = mismatches(baseline, load_decompressed(out), "nvfp4",
                                quantized=lambda name: ".layers.0." in name or ".layers.29." in name)
    assert bad == {} and unchanged == []
