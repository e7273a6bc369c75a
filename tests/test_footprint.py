"""qgate.footprint and `qgate footprint`: bytes per tensor group from a config alone, and the decode roofline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qgate.cli import cli
from qgate.errors import QgateError
from qgate.footprint import DEFAULT_BANDWIDTH, footprint, meta_model, parse_bandwidth, tensor_group

# The shape of Qwen2.5-72B-Instruct's config.json (the few numbers that fix every tensor's size).
QWEN25_72B = {
    "model_type": "qwen2",
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "intermediate_size": 29568,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
H, L, I, KV, V = 8192, 80, 29568, 8 * 128, 152064


@pytest.mark.parametrize(
    "fmt, expected_gb",
    [("bf16", 145.4), ("mxfp8_e4m3", 75.0), ("mxfp6_e2m3", 56.8), ("mxfp4", 38.6), ("nvfp4", 40.9)],
)
def test_qwen25_72b_reproduces_the_familiar_figures(fmt, expected_gb):
    fp = footprint(QWEN25_72B, fmt, "uniform-all")
    assert fp.total_bytes / 1e9 == pytest.approx(expected_gb, abs=0.15)
    assert fp.bf16_bytes / 1e9 == pytest.approx(145.4, abs=0.1)


def test_qwen25_72b_groups_are_exact():
    fp = footprint(QWEN25_72B, "mxfp4", "uniform")
    g = fp.groups
    assert g["q"].params == L * (H * H + H)  # Qwen2 q/k/v carry biases, counted with their projection
    assert g["k"].params == g["v"].params == L * (KV * H + KV)
    assert g["o"].params == L * H * H
    assert g["gate"].params == g["up"].params == g["down"].params == L * H * I
    assert g["embeddings"].params == g["lm_head"].params == V * H
    assert g["norms"].params == (2 * L + 1) * H
    assert fp.params == sum(x.params for x in g.values()) == 72_706_203_648
    # uniform keeps embeddings, lm_head, norms and biases at 16 bits
    assert g["embeddings"].bytes == g["lm_head"].bytes == 2 * V * H
    assert g["o"].bytes == L * H * H * 4.25 / 8
    assert g["q"].bytes == L * H * H * 4.25 / 8 + L * H * 2
    assert g["q"].formats == {"mxfp4": L * H * H, "keep": L * H}


def test_roofline_reads_every_weight_but_only_one_embedding_row():
    fp = footprint(QWEN25_72B, "mxfp8_e4m3", "uniform-all", bandwidth=4.8e12)
    embedding_bytes = V * H * 8.25 / 8
    assert fp.bytes_per_token == pytest.approx(fp.total_bytes - embedding_bytes + embedding_bytes / V)
    assert fp.tokens_per_s == pytest.approx(4.8e12 / fp.bytes_per_token)
    assert footprint(QWEN25_72B, "bf16", "uniform").bandwidth == DEFAULT_BANDWIDTH


def test_tied_embedding_is_counted_once_and_read_whole():
    tied = dict(QWEN25_72B, num_hidden_layers=2, tie_word_embeddings=True)
    untied = dict(tied, tie_word_embeddings=False)
    a, b = footprint(tied, "mxfp4", "uniform-all"), footprint(untied, "mxfp4", "uniform-all")
    assert b.params - a.params == V * H
    assert "lm_head" not in a.groups  # the one tensor is reported under embeddings
    assert a.bytes_per_token == pytest.approx(a.total_bytes)  # lm_head reads the shared table whole
    # a recipe that splits the tied pair counts both copies, as quantize_model would store them
    split = footprint(tied, "mxfp4", {"name": "head", "rules": [{"match": "lm_head$", "format": "$candidate"}]})
    assert split.untied == [("model.embed_tokens", "lm_head")] and split.params == b.params


def test_meta_model_holds_no_memory():
    from qgate.footprint import load_config

    module = meta_model(load_config(QWEN25_72B))
    assert {p.device.type for p in module.parameters()} == {"meta"}


def test_footprint_and_the_report_need_recipes_not_the_kernel_loop():
    code = ("import sys, qgate.report.roofline; assert 'torch' not in sys.modules; "
            "from qgate.footprint import footprint; "
            "fp = footprint({'model_type': 'qwen2', 'hidden_size': 64, 'num_hidden_layers': 2, "
            "'intermediate_size': 128, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 256}, "
            "'mxfp4', 'mixed-fp4'); assert fp.total_bytes < fp.bf16_bytes; "
            "assert not {'qgate.quantize', 'qgate.backends'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_tensor_groups():
    assert tensor_group("model.layers.3.self_attn.q_proj.bias") == "q"
    assert tensor_group("model.layers.3.mlp.down_proj") == "down"
    assert tensor_group("model.layers.3.input_layernorm.weight") == "norms"
    assert tensor_group("model.layers.3.mlp.gate") == "router"
    assert tensor_group("model.embed_tokens") == "embeddings"


def test_bandwidth_parsing():
    assert parse_bandwidth("3.35e12") == 3.35e12
    assert parse_bandwidth("4.8TB/s") == 4.8e12
    assert parse_bandwidth("900 GB/s") == 9e11
    with pytest.raises(QgateError, match="expected bytes per second"):
        parse_bandwidth("fast")


# --- CLI --------------------------------------------------------------------------------------


def _invoke(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.stdout, result.stderr


def test_cli_json_from_a_config_file_offline(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN25_72B))
    code, out, err = _invoke(["footprint", "--model", str(path), "--format", "mxfp6_e2m3", "--recipe", "uniform-all",
                              "--bandwidth", "3.35e12", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["total_bytes"] / 1e9 == pytest.approx(56.8, abs=0.1)
    assert set(data["groups"]) >= {"q", "k", "v", "o", "gate", "up", "down", "embeddings", "norms"}
    assert data["tokens_per_s"] == pytest.approx(3.35e12 / data["bytes_per_token"])
    # a model directory holding that config works the same
    code, out2, _ = _invoke(["footprint", "--model", str(tmp_path), "--format", "mxfp6_e2m3", "--recipe",
                             "uniform-all", "--json"])
    assert code == 0 and json.loads(out2)["total_bytes"] == data["total_bytes"]


def test_cli_table(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN25_72B))
    code, out, err = _invoke(["footprint", "--model", str(path), "--format", "nvfp4", "--recipe", "mixed-fp4"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["group", "params", "bytes", "formats"]
    assert any(line.split()[:1] == ["v"] and "mxfp8_e4m3" in line for line in lines)
    assert "tokens/s" in lines[-1]


def test_cli_errors_exit_2(tmp_path):
    code, _, err = _invoke(["footprint", "--model", "Qwen/Qwen2.5-72B-Instruct-NotCached", "--format", "mxfp4"])
    assert code == 2 and "not in the Hugging Face cache" in err and "config.json" in err
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN25_72B))
    code, _, err = _invoke(["footprint", "--model", str(path), "--format", "mxfp5"])
    assert code == 2 and "unknown format 'mxfp5'" in err
    code, _, err = _invoke(["footprint", "--model", str(path), "--format", "mxfp4", "--bandwidth", "-1"])
    assert code == 2 and "bandwidth" in err
    (tmp_path / "broken.json").write_text("{not json")
    code, _, err = _invoke(["footprint", "--model", str(tmp_path / "broken.json"), "--format", "mxfp4"])
    assert code == 2 and "broken.json" in err


def test_cli_smollm2_from_the_package_gguf():
    code, out, err = _invoke(["footprint", "--model", "smollm2", "--format", "mxfp4", "--recipe", "mixed-fp4",
                              "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["params"] == 134_515_008 and data["total_bytes"] == pytest.approx(93.52e6, rel=1e-3)
