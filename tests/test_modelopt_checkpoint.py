"""Checkpoints written by NVIDIA ModelOpt itself (tests/data/modelopt, made by bench/modelopt_produce.py in its own
venv): read, decoded by qgate.modelopt_checkpoint, compared with qgate's emulation of the same baseline, and
gated like any candidate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qgate.checkpoints import (CheckpointCandidate, candidate_fidelity, fidelity_summary, load_candidate,
                               resolve_candidate)
from qgate.cli import cli
from tests.tiny import llmc_producer
from qgate.errors import QgateError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "modelopt"
NVFP4 = DATA / "tiny-qwen2-w4a16_nvfp4"
FP8 = DATA / "tiny-qwen2-fp8_default"
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"


@pytest.fixture(scope="module")
def baseline():
    return llmc_producer().tiny_qwen2()


def test_fixture_is_small_and_says_who_made_it():
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 1_200_000
    for folder in (NVFP4, FP8):
        made = json.loads((folder / "qgate-producer.json").read_text())
        assert made["tool"] == "nvidia-modelopt" and made["version"] == "0.47.0"
        qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qconfig["quant_method"] == "modelopt" and qconfig["producer"]["name"] == "modelopt"


def test_schemes_are_read_from_the_checkpoints():
    n = resolve_candidate(CheckpointCandidate("n", str(NVFP4)))
    assert n.loader == "modelopt" and n.qgate_format == "nvfp4"
    assert n.scheme_text() == ("modelopt 0.47.0 W4A16_NVFP4: W4 float (E2M1) group 16, E4M3 block scales, FP32 "
                               "tensor scale (= qgate nvfp4)")
    f = resolve_candidate(CheckpointCandidate("f", str(FP8)))
    assert f.qgate_format == "fp8" and f.describe()["compression_format"] == "FP8"
    assert "activations 8-bit float (E4M3) per-tensor static (not emulated" in f.scheme_text()
    assert n.config()["loader"] == "qgate.modelopt_checkpoint, dequantized"
    assert n.checkpoint_id != f.checkpoint_id and n.checkpoint_id.startswith("sha256:")


def test_nvfp4_decoding_is_the_stored_codes_times_both_scales():
    """One packed byte holds two E2M1 codes, low nibble first, bit 3 the sign."""
    from safetensors.torch import load_file

    from qgate.modelopt_checkpoint import dequantize

    state = load_file(NVFP4 / "model.safetensors")
    key = "model.layers.0.mlp.down_proj"
    got = dequantize({k: v for k, v in state.items() if k.startswith(key)}, "W4A16_NVFP4")[f"{key}.weight"]
    packed, block = state[f"{key}.weight"], state[f"{key}.weight_scale"].float()
    assert got.shape == (packed.shape[0], 2 * packed.shape[1]) and block.shape[1] * 16 == got.shape[1]
    low, high = int(packed[0, 0]) & 0xF, int(packed[0, 0]) >> 4
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    value = lambda code: (-1 if code & 8 else 1) * e2m1[code & 7]  # noqa: E731
    total = float(block[0, 0]) * float(state[f"{key}.weight_scale_2"])
    assert float(got[0, 0]) == pytest.approx(value(low) * total, rel=1e-6)
    assert float(got[0, 1]) == pytest.approx(value(high) * total, rel=1e-6)


def test_fp8_weights_equal_qgates_emulation_bit_for_bit(baseline):
    resolved = resolve_candidate(CheckpointCandidate("f", str(FP8)))
    cand, _ = load_candidate(resolved, "cpu", torch.float32, progress=False)
    rows, summary, lines = candidate_fidelity(resolved, baseline, cand)
    assert len(rows) == 14 and all(r["identical_share"] == 1.0 and r["rule"] == "identical" for r in rows)
    assert lines[0].startswith("emulation fidelity vs qgate fp8: 100.000% of elements identical over 14 tensors")


def test_nvfp4_differs_from_qgate_only_by_the_fused_global_scale(baseline):
    """ModelOpt's export gives q/k/v and gate/up one global scale (their largest amax); qgate gives each tensor
    its own. Everything else - block scales rounded into E4M3, E2M1 codes - is identical, in float32 (the
    decoder is exact, unlike compressed-tensors' bfloat16)."""
    resolved = resolve_candidate(CheckpointCandidate("n", str(NVFP4)))
    cand, _ = load_candidate(resolved, "cpu", torch.float32, progress=False)
    rows, summary, _ = candidate_fidelity(resolved, baseline, cand)
    by_name = {r["name"].removeprefix("model."): r for r in rows}
    assert len(by_name) == 14
    for name, r in by_name.items():
        if name.endswith(("o_proj", "down_proj")):
            assert r["identical_share"] == 1.0, name
    differing = [r for r in rows if r["identical_share"] < 1]
    assert len(differing) == 2 * (2 + 1)  # per layer: two of q/k/v and one of gate/up
    for r in differing:
        assert r["identical_share"] < 0.2 and r["identical_share_shared_global_scale"] == 1.0
        assert r["rule"].startswith("global scale: one per-tensor scale shared by the fused projections")
    assert summary == fidelity_summary(rows) and summary["identical_tensors"] == 8


def test_decoded_model_runs_close_to_its_baseline(baseline):
    """The weights land in the right modules: the FP8 model's logits are near the baseline's."""
    cand, tokenizer = load_candidate(resolve_candidate(CheckpointCandidate("f", str(FP8))), "cpu", torch.float32,
                                     progress=False)
    ids = tokenizer("quantized checkpoints", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = baseline(ids).logits, cand(ids).logits
    assert float((want - got).norm() / want.norm()) < 0.1


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(quant_algo="W4A8_AWQ"),
     r"config.json: quantization_config.quant_algo is 'W4A8_AWQ'; qgate reads ModelOpt checkpoints with quant_algo "
     r"NVFP4, W4A16_NVFP4, FP8$"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=32),
     r"config.json: group_size is 32; ModelOpt W4A16_NVFP4 uses blocks of 16$"),
])
def test_unknown_modelopt_config_is_refused_in_one_line(tmp_path, edit, message):
    folder = tmp_path / "bad"
    shutil.copytree(NVFP4, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QgateError, match=message):
        resolve_candidate(CheckpointCandidate("bad", str(folder)))
    done = CliRunner().invoke(cli, ["run", "--family", "smollm2", "--candidate", f"bad={folder}",
                                    "--db", str(tmp_path / "q.db"), "--no-report"])
    assert done.exit_code == 2, done.output
    assert "Traceback" not in done.output and not (tmp_path / "q.db").exists()
    assert [line for line in done.output.splitlines() if line.strip()][-1].endswith(message.rstrip("$")
                                                                                       .replace("\\", ""))


def test_export_without_config_quantization_reads_hf_quant_config(tmp_path):
    """Older ModelOpt exports keep the settings in hf_quant_config.json only."""
    folder = tmp_path / "old"
    shutil.copytree(NVFP4, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    resolved = resolve_candidate(CheckpointCandidate("old", str(folder)))
    assert resolved.qgate_format == "nvfp4" and "W4A16_NVFP4" in resolved.scheme_text()
    doc = json.loads((folder / "hf_quant_config.json").read_text())
    doc["quantization"]["quant_algo"] = "INT4_AWQ"
    (folder / "hf_quant_config.json").write_text(json.dumps(doc))
    with pytest.raises(QgateError, match=r"hf_quant_config.json: quantization.quant_algo is 'INT4_AWQ'"):
        resolve_candidate(CheckpointCandidate("old", str(folder)))


def test_gate_the_modelopt_checkpoints_with_the_cli(tmp_path):
    base = tmp_path / "base"
    llmc_producer().tiny_qwen2().save_pretrained(base)
    llmc_producer().byte_tokenizer().save_pretrained(base)
    pol = tmp_path / "p.yaml"
    pol.write_text(f"""family: smollm2
members: [{{name: smollm2-135m-instruct, model: {base}}}]
suite: {SUITE}
fallback: []
tasks:
  mmlu: {{max_drop: 100, inconclusive: pass, blocking: false}}
  perplexity: {{metric: word_perplexity, min_recovery: 0.5, inconclusive: pass}}
checkpoints:
  modelopt-fp8: {FP8}
""")
    done = CliRunner().invoke(cli, ["run", "--family", "smollm2", "--policy", str(pol), "--db", str(tmp_path / "q.db"),
                                    "--candidate", f"modelopt-nvfp4={NVFP4}", "--json", "--limit", "2",
                                    "--no-report"])
    assert done.exit_code in (0, 1), done.output
    data = json.loads(done.output[done.output.index("{\n"):])
    assert data["formats"] == ["modelopt-nvfp4", "modelopt-fp8"]
    by_name = {c["name"]: c for c in data["candidates"]}
    assert by_name["modelopt-fp8"]["fidelity"]["identical_share"] == 1.0
    assert by_name["modelopt-nvfp4"]["quant_method"] == "modelopt"
    assert by_name["modelopt-nvfp4"]["scheme"].startswith("modelopt 0.47.0 W4A16_NVFP4")
    assert 0.5 < by_name["modelopt-nvfp4"]["fidelity"]["identical_share"] < 1
    assert {(t["format"], t["task"]) for t in data["tasks"]} == {
        (f, t) for f in ("modelopt-nvfp4", "modelopt-fp8") for t in ("mmlu", "perplexity")}
