"""qgate.quantize: recipes applied in place, statistics, promotion, tied weights, act/KV options, CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qgate import quantize as q
from qgate.backends import fake_quantize
from qgate.cli import cli
from qgate.errors import QgateError
from qgate.hf_cache import cache_argument, output_cache
from qgate.models import build_tiny_model

DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _ids(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (1, n), generator=g)


# --- recipes through quantize_model (the recipes themselves: test_recipes.py) -----------------


def test_rule_matching_nothing_is_an_error():
    model = build_tiny_model("qwen2")
    recipe = {"name": "typo", "rules": [{"match": "v_porj$", "format": "mxfp8_e4m3"},
                                        {"match": "q_proj$", "format": "mxfp4"}]}
    before = _snapshot(model)
    with pytest.raises(QgateError, match=r"recipe 'typo': rule\(s\) 'v_porj\$' match no tensor"):
        q.quantize_model(model, "mxfp4", recipe, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing half-done


def test_candidate_rule_needs_a_format():
    with pytest.raises(QgateError, match=r"\$candidate rules; give the format"):
        q.quantize_model(build_tiny_model("qwen2"), None, "uniform", progress=False)


# --- what gets quantized ----------------------------------------------------------------------


def test_uniform_quantizes_exactly_the_decoder_linears():
    model = build_tiny_model("qwen2", seed=1)
    before = _snapshot(model)
    result = q.quantize_model(model, "nvfp4", "uniform", progress=False)
    expected = {f"model.layers.{i}.{'self_attn' if p in DECODER_LINEARS[:4] else 'mlp'}.{p}"
                for i in range(2) for p in DECODER_LINEARS}
    assert {t.name for t in result.tensors} == expected
    for name, param in model.named_parameters():
        tensor = name.removesuffix(".weight")
        if tensor in expected:
            # chunked, in place, bit for bit what fake_quantize does to the whole tensor
            assert torch.equal(param, fake_quantize(before[name], "nvfp4")), name
        else:  # embeddings, lm_head, norms, biases untouched
            assert torch.equal(param, before[name]), name
    assert set(result.kept) == {"model.embed_tokens", "lm_head"}


def test_mixed_fp4_assigns_formats_by_role():
    model = build_tiny_model("qwen2", seed=2)
    result = q.quantize_model(model, "nvfp4", "mixed-fp4", progress=False)
    by_name = {t.name: t.format for t in result.tensors}
    assert by_name["model.layers.1.self_attn.v_proj"] == "mxfp8_e4m3"
    assert by_name["model.layers.1.mlp.down_proj"] == "mxfp8_e4m3"
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert by_name[f"model.layers.0.{proj}"] == "nvfp4"
    assert by_name["model.embed_tokens"] == by_name["lm_head"] == "mxfp6_e2m3"
    assert result.kept == []
    # biases stay in full precision even on quantized projections
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.float32


def test_first_matching_rule_wins():
    model = build_tiny_model("qwen2", seed=3)
    before = _snapshot(model)
    recipe = {"name": "no-v", "rules": [{"match": "v_proj$", "format": "keep"}, {"match": ".", "format": "mxfp4"}]}
    result = q.quantize_model(model, None, recipe, progress=False)
    names = {t.name for t in result.tensors}
    assert "model.layers.0.self_attn.v_proj" not in names and "model.layers.0.self_attn.q_proj" in names
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, before["model.layers.0.self_attn.v_proj.weight"])


# --- tied embeddings --------------------------------------------------------------------------


def test_quantizing_lm_head_unties_it_from_the_embedding():
    model = build_tiny_model("llama", seed=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    original = model.model.embed_tokens.weight.detach().clone()
    result = q.quantize_model(model, None, {"name": "head", "rules": [{"match": "lm_head$", "format": "mxfp4"}]},
                              progress=False)
    assert result.untied == [("model.embed_tokens", "lm_head")]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, original)  # the embedding was not quantized
    assert torch.equal(model.lm_head.weight, fake_quantize(original, "mxfp4"))
    assert model.config.tie_word_embeddings is False
    assert any(line.startswith("untied lm_head from model.embed_tokens") for line in result.log_lines())
    # the untied copy is counted: embedding at 16 bits plus lm_head at 4.25 bits
    n = original.numel()
    assert result.quantized_bytes == pytest.approx(result.bf16_bytes - 2 * n + n * 4.25 / 8)
    assert result.params == sum(p.numel() for p in model.parameters())


def test_quantizing_the_embedding_leaves_lm_head_alone():
    model = build_tiny_model("llama", seed=5)
    original = model.lm_head.weight.detach().clone()
    result = q.quantize_model(model, None, {"name": "emb", "rules": [{"match": "embed_tokens$", "format": "mxfp4"}]},
                              progress=False)
    assert result.untied == [("model.embed_tokens", "lm_head")]
    assert torch.equal(model.lm_head.weight, original)
    assert torch.equal(model.model.embed_tokens.weight, fake_quantize(original, "mxfp4"))


def test_same_format_keeps_weights_tied_and_counts_them_once():
    model = build_tiny_model("llama", seed=6)
    result = q.quantize_model(model, "mxfp4", "mixed-fp4", progress=False)
    assert result.untied == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = [t for t in result.tensors if t.name == "model.embed_tokens"]
    assert len(emb) == 1 and emb[0].also == ["lm_head"] and emb[0].format == "mxfp6_e2m3"
    assert result.params == sum(p.numel() for p in model.parameters())  # shared tensor once


# --- statistics -------------------------------------------------------------------------------


def _independent_mxfp4_saturation(w: torch.Tensor) -> float:
    """Blocks of 32 whose amax / 2^(floor(log2 amax) - 2) exceeds 6, counted with math.frexp."""
    blocks = w.reshape(-1, 32).abs().amax(dim=1).tolist()
    saturated = 0
    for amax in blocks:
        mantissa, exponent = math.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
        scaled = amax / 2.0 ** ((exponent - 1) - 2)
        saturated += scaled > 6.0
    return saturated / len(blocks)


def test_tensor_statistics_are_right():
    model = build_tiny_model("qwen2", seed=7)
    w = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    result = q.quantize_model(model, None, {"name": "down", "rules": [{"match": r"layers\.1\.mlp\.down_proj$",
                                                                      "format": "mxfp4"}]}, progress=False)
    (t,) = result.tensors
    w_hat = fake_quantize(w, "mxfp4")
    signal = float(w.double().square().sum())
    noise = float((w_hat.double() - w.double()).square().sum())
    assert t.shape == (128, 256) and t.numel == 128 * 256
    assert t.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert t.rel_mse == pytest.approx(noise / signal, rel=1e-6)
    assert t.blocks == 128 * 256 // 32 and t.promoted_blocks == 0
    assert t.bytes == 128 * 256 * 4.25 / 8
    assert t.saturated_block_share == pytest.approx(_independent_mxfp4_saturation(w))
    assert 0 < t.saturated_block_share < 1
    summary = result.summary()
    assert summary["sqnr_db"] == pytest.approx(t.sqnr_db)
    total = sum(p.numel() for p in model.parameters())
    assert summary["bf16_bytes"] == 2 * total
    assert summary["quantized_bytes"] == pytest.approx(2 * (total - t.numel) + t.bytes)
    assert summary["footprint_ratio"] == pytest.approx(summary["quantized_bytes"] / summary["bf16_bytes"])


def test_aggregate_sqnr_weights_tensors_by_energy():
    model = build_tiny_model("qwen2", seed=8)
    result = q.quantize_model(model, "mxfp6_e2m3", "uniform", progress=False)
    signal = sum(t.signal for t in result.tensors)
    noise = sum(t.noise for t in result.tensors)
    assert result.summary()["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise))
    per_tensor = [t.sqnr_db for t in result.tensors]
    assert min(per_tensor) <= result.summary()["sqnr_db"] <= max(per_tensor)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "fp8_channel", "mxfp8_e4m3"])
def test_chunked_quantization_equals_whole_tensor(monkeypatch, fmt):
    monkeypatch.setattr(q, "_CHUNK_ELEMENTS", 300)  # a few rows per chunk
    model = build_tiny_model("qwen2", seed=9)
    w = model.model.embed_tokens.weight.detach().clone()
    w[100, 5] = 3.0  # the tensor-wide amax sits in one chunk only
    model.model.embed_tokens.weight.data.copy_(w)
    q.quantize_model(model, None, {"name": "e", "rules": [{"match": "embed_tokens$", "format": fmt}]}, progress=False)
    assert torch.equal(model.model.embed_tokens.weight, fake_quantize(w, fmt))


def test_log_lines_look_like_a_calibration_log():
    model = build_tiny_model("qwen2", seed=10)
    lines = q.quantize_model(model, "mxfp8_e4m3", "uniform", progress=False).log_lines()
    assert re.fullmatch(r"model\.layers\.0\.self_attn\.q_proj +mxfp8_e4m3 +SQNR +\d+\.\d dB +promoted 0/\d+", lines[0])
    assert re.fullmatch(r"promoted 0 of \d+ blocks \(0\.00%\)", lines[-2])
    assert lines[-1].startswith("footprint ") and "at bf16" in lines[-1]


# --- promotion --------------------------------------------------------------------------------


def test_promotion_takes_blocks_above_the_bound_to_the_wider_format():
    base = build_tiny_model("qwen2", seed=11)
    w = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    rule = {"name": "up", "rules": [{"match": r"layers\.0\.mlp\.up_proj$", "format": "mxfp4"}]}
    plain = q.quantize_model(build_tiny_model("qwen2", seed=11), None, rule, progress=False).tensors[0]
    assert plain.promoted_blocks == 0

    # bound between the typical and the worst block: some promoted, exactly those above the bound
    bound = plain.max_block_rel_error * 0.8
    model = build_tiny_model("qwen2", seed=11)
    t = q.quantize_model(model, None, rule, promote=f"mxfp8_e4m3@{bound}", progress=False).tensors[0]
    blocks_w = w.reshape(-1, 32)
    rel = ((fake_quantize(w, "mxfp4").reshape(-1, 32) - blocks_w).norm(dim=1) / blocks_w.norm(dim=1))
    expected = rel > bound
    assert t.promoted_blocks == int(expected.sum()) > 0
    got = model.model.layers[0].mlp.up_proj.weight.reshape(-1, 32)
    assert torch.equal(got[expected], fake_quantize(w, "mxfp8_e4m3").reshape(-1, 32)[expected])
    assert torch.equal(got[~expected], fake_quantize(w, "mxfp4").reshape(-1, 32)[~expected])
    assert t.bytes == pytest.approx((t.numel - 32 * t.promoted_blocks) * 4.25 / 8 + 32 * t.promoted_blocks * 8.25 / 8)
    assert t.sqnr_db > plain.sqnr_db

    with pytest.raises(QgateError, match="expected FORMAT@MAX_REL_ERROR"):
        q.quantize_model(build_tiny_model("qwen2"), "mxfp4", promote="mxfp8_e4m3", progress=False)


# --- config (the store's key) -----------------------------------------------------------------


def test_config_is_json_and_captures_every_option():
    a = q.quantize_model(build_tiny_model("qwen2"), "nvfp4", "mixed-fp4", progress=False).config()
    assert json.loads(json.dumps(a)) == a
    assert a["format"] == "nvfp4" and a["recipe"]["name"] == "mixed-fp4" and a["backend"] == "reference"
    assert a["recipe"]["rules"][1] == {"match": "(v_proj|down_proj)$", "format": "mxfp8_e4m3"}
    b = q.quantize_model(build_tiny_model("qwen2"), "nvfp4", "mixed-fp4", kv_quant="mxfp8_e4m3",
                         promote="mxfp8_e4m3@0.5", progress=False).config()
    assert b["kv_quant"] == "mxfp8_e4m3" and b["promote"] == {"to": "mxfp8_e4m3", "max_rel_error": 0.5}
    assert b != a


# --- activation and KV-cache quantization -----------------------------------------------------


def test_activation_quantization_is_off_by_default_and_quantizes_linear_inputs():
    ids = _ids()
    plain = build_tiny_model("qwen2", seed=12)
    result = q.quantize_model(plain, "mxfp4", "uniform", progress=False)
    assert result.hooks == [] and result.config()["act_quant"] is None

    model = build_tiny_model("qwen2", seed=12)
    seen = {}
    target = model.model.layers[1].mlp.down_proj
    target.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    result = q.quantize_model(model, "mxfp4", "uniform", act_quant=True, progress=False)
    target.register_forward_hook(lambda m, args, out: seen.__setitem__("y", out.detach().clone()))
    with torch.no_grad():
        out_act = model(ids).logits
        out_plain = plain(ids).logits
    # the Linear saw its input quantized in blocks of 32 along K
    expected = torch.nn.functional.linear(fake_quantize(seen["x"], "mxfp4"), target.weight, target.bias)
    assert torch.equal(seen["y"], expected)
    assert not torch.equal(out_act, out_plain)
    result.remove_hooks()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out_plain)


def test_kv_cache_quantization_quantizes_keys_after_rope_and_values():
    ids = _ids(12, seed=1)
    model = build_tiny_model("qwen2", seed=13)
    with torch.no_grad():
        reference = model(ids)
    result = q.quantize_model(model, "bf16", "uniform", kv_quant="mxfp4", progress=False)
    assert result.tensors == []  # bf16 weights: only the KV cache changes
    with torch.no_grad():
        full = model(ids)
        no_cache = model(ids, use_cache=False)  # quantized too: every forward path agrees
        first = model(ids[:, :7])
        step = model(ids[:, 7:], **{cache_argument(): output_cache(first)})
    layer = output_cache(full).layers[1]
    assert torch.equal(fake_quantize(layer.keys, "mxfp4"), layer.keys)
    assert torch.equal(fake_quantize(layer.values, "mxfp4"), layer.values)
    # layer 0's stored keys and values are the quantized post-RoPE ones of the unquantized run
    # (later layers see inputs already changed by the quantized cache of the layers before them)
    for kind in ("keys", "values"):
        stored = getattr(output_cache(full).layers[0], kind)
        assert torch.equal(stored, fake_quantize(getattr(output_cache(reference).layers[0], kind), "mxfp4"))
    assert not torch.equal(full.logits, reference.logits)
    assert torch.equal(no_cache.logits, full.logits)
    assert torch.allclose(step.logits, full.logits[:, 7:], atol=1e-5)
    result.remove_hooks()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.logits)


# --- memory -----------------------------------------------------------------------------------


def test_quantizing_adds_less_than_one_tensor_of_memory():
    """Peak RSS while quantizing a 134 MB tensor grows by less than the tensor's size.

    A full copy in float32 plus the quantizer's temporaries would take several times that.
    """
    script = textwrap.dedent(
        """
        import resource, torch
        from qgate.quantize import quantize_model
        from qgate.backends import get_backend
        get_backend(None)  # imports done before the baseline is taken
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Linear(8192, 4096, bias=False)])
        torch.nn.init.normal_(model.layers[0].weight, std=0.02, generator=torch.Generator().manual_seed(0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        quantize_model(model, "nvfp4", "uniform-all", progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    tensor_bytes = 8192 * 4096 * 4
    assert grown < tensor_bytes, f"peak grew by {grown / 1e6:.0f} MB for a {tensor_bytes / 1e6:.0f} MB tensor"


# --- CLI errors (exit 2, one line) ------------------------------------------------------------


def _invoke(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def tiny_dir(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_models import byte_tokenizer

    folder = tmp_path / "tiny"
    build_tiny_model("qwen2", seed=0).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_cli_unknown_member_missing_and_corrupt_checkpoints_exit_2(tmp_path):
    code, out, err = _invoke(["quantize", "--family", "qwen2.5", "--member", "qwen2.5-9b", "--format", "nvfp4"])
    assert code == 2 and "unknown member 'qwen2.5-9b'" in err and "qwen2.5-0.5b-instruct" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = _invoke(["quantize", "--model-path", str(tmp_path / "nope"), "--format", "nvfp4"])
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 4096)
    code, _, err = _invoke(["quantize", "--model-path", str(bad), "--format", "nvfp4", "--docs", "1"])
    assert code == 2 and f"{bad}: not a GGUF file" in err and "converting" not in err
    code, _, err = _invoke(["quantize", "--family", "qwen2.5", "--format", "nvfp4"])
    assert code == 2 and "Qwen/Qwen2.5-0.5B-Instruct" in err and "--model DIR" in err


def test_cli_recipe_rule_matching_nothing_exits_2(tiny_dir, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: typo\nrules:\n  - {match: 'v_porj$', format: mxfp8_e4m3}\n")
    code, out, err = _invoke(["quantize", "--model-path", str(tiny_dir), "--format", "nvfp4", "--recipe", str(recipe)])
    assert code == 2 and "rule(s) 'v_porj$' match no tensor" in err and out == ""
    code, _, err = _invoke(["quantize", "--model-path", str(tiny_dir), "--format", "int3"])
    assert code == 2 and "unknown format 'int3'" in err


def test_cli_quantize_tiny_model_json(tiny_dir):
    code, out, err = _invoke(["quantize", "--model-path", str(tiny_dir), "--format", "mxfp4", "--recipe",
                              "mixed-fp4", "--docs", "2", "--json"])
    assert code == 0, err
    payload = json.loads(out)
    assert payload["summary"]["recipe"] == "mixed-fp4" and payload["summary"]["tensors"] == 16
    check = payload["check"]
    assert check["documents"] == 2 and (check["task"], check["metric"]) == ("smoke/perplexity", "word_perplexity")
    assert re.search(r"sha256 [0-9a-f]{64}", check["data"]), check["data"]
    assert payload["check"]["perplexity_after"] != payload["check"]["perplexity_before"]


# --- the real model (done-when of the issue) --------------------------------------------------


def _combined(*results):
    """Summary numbers of several quantizations of disjoint tensor sets, as if done in one pass."""
    tensors = [t for r in results for t in r.tensors]
    signal, noise = sum(t.signal for t in tensors), sum(t.noise for t in tensors)
    saturated = sum(t.saturated_block_share * t.blocks for t in tensors) / sum(t.blocks for t in tensors)
    embedded = sum(r.bf16_bytes - r.quantized_bytes for r in results)
    return {"sqnr_db": 10 * math.log10(signal / noise), "saturated_block_share": saturated,
            "quantized_bytes": results[0].bf16_bytes - embedded}


@pytest.fixture(scope="module")
def smollm2_results():
    """Uniform MX/NV formats, mixed-fp4, and the embedding alone (to extend uniform to uniform-all)."""
    from qgate.models import load

    loaded = load("smollm2", device="cpu", progress=False)
    pristine = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    embedding_only = {"name": "embedding", "rules": [{"match": "(embed_tokens|lm_head)$", "format": "$candidate"}]}
    out = {}
    for fmt, recipe in [("mxfp8_e4m3", "uniform"), ("mxfp8_e4m3_rceil", "uniform"), ("mxfp6_e2m3", "uniform"), ("mxfp6_e2m3_rceil", "uniform"), ("nvfp4", "uniform"),
                        ("mxfp4", "uniform"), ("mxfp4", "mixed-fp4"), ("mxfp4", embedding_only),
                        ("mxfp8_e4m3", embedding_only)]:
        loaded.model.load_state_dict(pristine)
        out[fmt, recipe if isinstance(recipe, str) else "embedding"] = q.quantize_model(
            loaded.model, fmt, recipe, progress=False)
    return out


@pytest.mark.slow
def test_smollm2_sqnr_orders_the_formats(smollm2_results):
    s = {fmt: smollm2_results[fmt, "uniform"].summary() for fmt in ("mxfp8_e4m3", "mxfp6_e2m3", "nvfp4", "mxfp4")}
    sqnr = {fmt: v["sqnr_db"] for fmt, v in s.items()}
    # 8- and 6-bit MX formats both carry 3 mantissa bits (~30 dB); FP4 carries 1 (~18-20 dB)
    assert min(sqnr["mxfp8_e4m3"], sqnr["mxfp6_e2m3"]) > sqnr["nvfp4"] + 8 > sqnr["mxfp4"] + 8
    assert sqnr["nvfp4"] > sqnr["mxfp4"] + 1  # finer blocks and an E4M3 scale
    # OCP FLOOR scaling: E4M3 saturates above 448 = 1.75 * 2^8, E2M3 only above 7.5 = 1.875 * 2^2,
    # so more mxfp8_e4m3 blocks clip, and with equal mantissas that costs it its lead over mxfp6_e2m3
    assert s["mxfp8_e4m3"]["saturated_block_share"] > 1.5 * s["mxfp6_e2m3"]["saturated_block_share"]
    assert abs(sqnr["mxfp8_e4m3"] - sqnr["mxfp6_e2m3"]) < 1.5
    # the same 8-bit format with the scale rounded up (RCEIL, its own name): nothing clips, and the
    # order the bit widths promise holds: mxfp8_e4m3 > mxfp6_e2m3 > nvfp4 > mxfp4
    rceil = smollm2_results["mxfp8_e4m3_rceil", "uniform"].summary()
    assert rceil["saturated_block_share"] == 0
    assert rceil["sqnr_db"] > sqnr["mxfp6_e2m3"] + 0.3 and sqnr["mxfp6_e2m3"] > sqnr["nvfp4"] > sqnr["mxfp4"]
    assert rceil["quantized_bytes"] == s["mxfp8_e4m3"]["quantized_bytes"]
    # like for like, both under RCEIL: E4M3's wider exponent range keeps small values E2M3 loses
    assert rceil["sqnr_db"] > smollm2_results["mxfp6_e2m3_rceil", "uniform"].summary()["sqnr_db"] + 0.3
    # bytes follow the bits per value
    sizes = [s[f]["quantized_bytes"] for f in ("mxfp8_e4m3", "mxfp6_e2m3", "nvfp4", "mxfp4")]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.slow
def test_smollm2_mixed_fp4_lands_between_mxfp4_and_mxfp8(smollm2_results):
    mixed = smollm2_results["mxfp4", "mixed-fp4"].summary()
    lo, hi = smollm2_results["mxfp4", "uniform"].summary(), smollm2_results["mxfp8_e4m3", "uniform"].summary()
    assert lo["sqnr_db"] < mixed["sqnr_db"] < hi["sqnr_db"]
    # bytes over the same tensors: mixed-fp4 also quantizes the (tied) embedding, uniform keeps it,
    # so compare with uniform extended to the embedding (= the uniform-all recipe)
    lo_all = _combined(smollm2_results["mxfp4", "uniform"], smollm2_results["mxfp4", "embedding"])
    hi_all = _combined(smollm2_results["mxfp8_e4m3", "uniform"], smollm2_results["mxfp8_e4m3", "embedding"])
    assert lo_all["quantized_bytes"] < mixed["quantized_bytes"] < hi_all["quantized_bytes"]
    assert lo_all["sqnr_db"] < mixed["sqnr_db"] < hi_all["sqnr_db"]


@pytest.mark.slow
def test_cli_quantize_smollm2_prints_log_and_perplexity(tmp_path):
    # the first and last decoder blocks only: the whole path on the real model, at a fraction of the time
    recipe = tmp_path / "ends.yaml"
    recipe.write_text("name: ends\nrules:\n  - {match: 'layers\\.(0|29)\\.', format: $candidate}\n")
    code, out, err = _invoke(["quantize", "--format", "mxfp8_e4m3", "--recipe", str(recipe), "--docs", "2"])
    assert code == 0, err
    lines = out.strip().splitlines()
    logged = [line for line in lines if line.startswith("model.layers.") and " SQNR " in line]
    assert len(logged) == 2 * 7 and all(" mxfp8_e4m3 " in line for line in logged)
    assert re.fullmatch(r"promoted 0 of 221184 blocks \(0\.00%\)", lines[-3])
    m = re.fullmatch(r"perplexity (\d+\.\d+) -> (\d+\.\d+) \(([+-]\d+\.\d+)%, word_perplexity, task smoke/perplexity\)"
                     r" on 2 documents of .*; sha256 [0-9a-f]{64}", lines[-1])
    assert m, lines[-1]
    before, after = float(m.group(1)), float(m.group(2))
    assert 5 < before < 100 and after != before and abs(after / before - 1) < 0.02  # mxfp8 barely moves it


# --- CUDA (bf16, the default there) -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_quantization_matches_the_reference_on_cpu():
    model = build_tiny_model("qwen2", seed=14, dtype=torch.bfloat16).cuda()
    before = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    result = q.quantize_model(model, "nvfp4", "mixed-fp4", kv_quant="mxfp8_e4m3", act_quant=True, progress=False)
    params = dict(model.named_parameters())
    assert len(result.tensors) == 16
    for t in result.tensors:
        name = t.name + ".weight"
        expected = fake_quantize(before[name], t.format, backend="reference")
        assert params[name].dtype == torch.bfloat16 and params[name].is_cuda
        assert torch.equal(params[name].cpu(), expected), name
    with torch.no_grad():
        out = model(_ids().cuda())
    keys = output_cache(out).layers[0].keys
    assert torch.equal(fake_quantize(keys, "mxfp8_e4m3"), keys)
    assert torch.isfinite(out.logits).all()
