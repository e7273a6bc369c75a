"""Checkpoints written by llm-compressor itself (tests/data/llmc, made by bench/llmc_produce.py in its own
venv): read, compared with qgate's emulation of the same baseline, and gated like any candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qgate.checkpoints import CheckpointCandidate, fidelity, fidelity_summary, load_candidate, resolve_candidate
from qgate.cli import cli
from tests.tiny import llmc_producer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "llmc"
NVFP4 = DATA / "tiny-qwen2-nvfp4a16"
FP8 = DATA / "tiny-qwen2-fp8_dynamic"
GPTQ = DATA / "tiny-qwen2-nvfp4a16-gptq"
SPIN = DATA / "tiny-qwen2-mxfp4a16-spinquant32"
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"


@pytest.fixture(scope="module")
def baseline():
    return llmc_producer().tiny_qwen2()


def test_fixture_is_small_and_says_who_made_it():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 2_000_000
    for folder in (NVFP4, FP8, GPTQ, SPIN):
        made = json.loads((folder / "qgate-producer.json").read_text())
        assert made["tool"] == "llmcompressor" and made["version"] == "0.14.0.1"
        assert json.loads((folder / "config.json").read_text())["quantization_config"]["version"] == "0.19.0"


def test_schemes_are_read_from_the_checkpoints():
    n = resolve_candidate(CheckpointCandidate("n", str(NVFP4)))
    assert n.qgate_format == "nvfp4" and n.scheme_text() == "nvfp4-pack-quantized: W4 float tensor_group group 16 (= qgate nvfp4)"
    f = resolve_candidate(CheckpointCandidate("f", str(FP8)))
    assert f.qgate_format == "fp8_channel"
    assert f.scheme_text() == ("float-quantized: W8 float channel, activations 8-bit float token dynamic "
                               "(weights = qgate fp8_channel)")


def test_fp8_weights_equal_qgates_emulation(baseline):
    cand, _ = load_candidate(resolve_candidate(CheckpointCandidate("f", str(FP8))), "cpu", torch.float32, progress=False)
    rows = fidelity(baseline, cand, "fp8_channel")
    assert len(rows) == 14 and all(r["identical_share"] == 1.0 for r in rows)


def test_nvfp4_differs_from_qgate_only_by_the_fused_global_scale(baseline):
    cand, _ = load_candidate(resolve_candidate(CheckpointCandidate("n", str(NVFP4))), "cpu", torch.float32,
                             progress=False)
    rows = {r["name"].removeprefix("model."): r for r in fidelity(baseline, cand, "nvfp4")}
    assert len(rows) == 14
    for name, r in rows.items():
        if name.endswith(("o_proj", "down_proj")):  # never fused: qgate's own tensor scale, identical
            assert r["identical_share"] == 1.0, name
    differing = [r for r in rows.values() if r["identical_share"] < 1]
    # one projection per fused group (the largest amax) keeps its own scale; the others take it over
    assert len(differing) == 2 * (2 + 1)
    for r in differing:
        assert r["identical_share_shared_global_scale"] == 1.0 and r["rule"].startswith("global scale: one per-tensor")
        assert r["max_rel_diff"] > 0
    assert 0.5 < fidelity_summary(list(rows.values()))["identical_share"] < 1


def test_gptq_weights_differ_from_round_to_nearest_beyond_any_scale_rule(baseline):
    """GPTQ chooses other codes than round-to-nearest: no scale rule explains the difference."""
    cand, _ = load_candidate(resolve_candidate(CheckpointCandidate("g", str(GPTQ))), "cpu", torch.float32,
                             progress=False)
    rows = fidelity(baseline, cand, "nvfp4")
    assert len(rows) == 14
    for r in rows:
        assert r["identical_share"] < 0.95 and "GPTQ" in r["rule"]
        # with llm-compressor's fused global scale the codes still differ from round-to-nearest's
        assert (r["identical_share_shared_global_scale"] or r["identical_share"]) < 0.95


def test_gate_the_llmc_checkpoints_with_the_cli(tmp_path):
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
  llmc-fp8: {FP8}
  llmc-gptq: {{path: {GPTQ}, member: smollm2-135m-instruct}}
""")
    done = CliRunner().invoke(cli, ["run", "--family", "smollm2", "--policy", str(pol), "--db", str(tmp_path / "q.db"),
                                    "--candidate", f"llmc-nvfp4={NVFP4}", "--json", "--no-report"])
    assert done.exit_code in (0, 1), done.output
    data = json.loads(done.output[done.output.index("{\n"):])
    assert data["formats"] == ["llmc-nvfp4", "llmc-fp8", "llmc-gptq"]  # the command line's, then the policy's
    by_name = {c["name"]: c for c in data["candidates"]}
    assert by_name["llmc-fp8"]["fidelity"]["identical_share"] == 1.0
    assert 0.5 < by_name["llmc-nvfp4"]["fidelity"]["identical_share"] < 1
    assert {(t["format"], t["task"]) for t in data["tasks"]} == {
        (f, t) for f in ("llmc-nvfp4", "llmc-fp8", "llmc-gptq") for t in ("mmlu", "perplexity")}
    assert by_name["llmc-gptq"]["fidelity"]["identical_share"] < 0.9


def test_checkpoint_with_online_rotations_is_refused_in_one_line(tmp_path):
    """llm-compressor's QuIP Hadamard transform adds online input rotations (transform_config) that
    transformers' dequantizing loader drops (measured: logits 140% off on the tiny model): refused, not
    gated wrongly."""
    from qgate.errors import QgateError

    folder = tmp_path / "rotated"
    folder.mkdir()
    config = json.loads((NVFP4 / "config.json").read_text())
    config["quantization_config"]["transform_config"] = {"config_groups": {"v": {"type": "hadamard", "apply": [
        {"location": "input", "targets": ["Linear"], "inverse": False}]}}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QgateError, match="transform_config holds online rotations.*cannot run this checkpoint"):
        resolve_candidate(CheckpointCandidate("rot", str(folder)))


def test_checkpoint_with_rotations_fused_into_its_weights_runs_faithfully(baseline):
    """SpinQuant's R1/R2 rotations live in the saved weights (transform_config lists only weight_input /
    weight_output): the checkpoint computes the rotated model, so its output error is that of MXFP4 itself
    (about qgate's round-to-nearest MXFP4 error), not of a dropped rotation."""
    from qgate.checkpoints import candidate_fidelity
    from qgate.quantize import quantize_model
    from qgate.recipes import load_recipe

    resolved = resolve_candidate(CheckpointCandidate("spin", str(SPIN)))
    assert resolved.rotations == "R1 hadamard block 32, R2 hadamard block 32"
    assert resolved.scheme_text().endswith("(= qgate mxfp4); rotations fused into the weights: "
                                           "R1 hadamard block 32, R2 hadamard block 32")
    cand, _ = load_candidate(resolved, "cpu", torch.float32, progress=False)
    rows, summary, lines = candidate_fidelity(resolved, baseline, cand)
    assert rows == [] and summary is None and "not compared, the weights are rotated" in lines[0]
    emulated = llmc_producer().tiny_qwen2()
    quantize_model(emulated, "mxfp4", load_recipe("uniform"), progress=False)
    ids = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = baseline(ids).logits
        err_ckpt = float((cand(ids).logits - want).norm() / want.norm())
        err_rtn = float((emulated(ids).logits - want).norm() / want.norm())
    assert 0.5 * err_rtn < err_ckpt < 1.5 * err_rtn < 1
