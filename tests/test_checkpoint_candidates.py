"""A quantized checkpoint as a gate candidate: exported by qgate, gated with `qgate run --candidate NAME=PATH`,
its scheme read from its quantization_config, keyed by its content hash, decided, stored and reported,
with its emulation fidelity against qgate's fake quantization of the same baseline."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qgate.checkpoints import CheckpointCandidate, fidelity, fidelity_summary, read_scheme, resolve_candidate
from qgate.cli import cli
from qgate.errors import QgateError
from qgate.checkpoint_export import export_model
from qgate.models import build_tiny_model
from tests.tiny import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny random Qwen2 saved as the baseline member, and its nvfp4 export."""
    root = tmp_path_factory.mktemp("cand")
    model, tok = build_tiny_model("qwen2", vocab_size=257), byte_tokenizer()
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    export_model(model, tok, "nvfp4", "uniform", root / "nvfp4", progress=False)
    export_model(model, tok, "mxfp4", "uniform", root / "mxfp4", progress=False)
    return root, model


def policy(root: Path, base: Path, extra: str = "") -> Path:
    path = root / "policy.yaml"
    path.write_text(f"""family: smollm2
members: [{{name: smollm2-135m-instruct, model: {base}}}]
suite: {SUITE}
formats: {{nvfp4: {{recipe: uniform}}}}
fallback: [fp8]
tasks:
  mmlu: {{max_drop: 100, inconclusive: pass, blocking: false}}
  perplexity: {{metric: word_perplexity, min_recovery: 0.5, inconclusive: pass}}
{extra}""")
    return path


def test_scheme_is_read_from_the_quantization_config(tiny_dirs):
    root, _ = tiny_dirs
    r = resolve_candidate(CheckpointCandidate("a", str(root / "nvfp4")))
    assert r.qgate_format == "nvfp4" and r.checkpoint_id.startswith("sha256:")
    assert "nvfp4-pack-quantized: W4 float tensor_group group 16 (= qgate nvfp4)" == r.scheme_text()
    assert resolve_candidate(CheckpointCandidate("b", str(root / "mxfp4"))).qgate_format == "mxfp4"
    groups, fmt = read_scheme({"config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                                   "group_size": 128, "symmetric": True}}}})
    assert fmt is None and "W4 int group group 128" in groups[0]["text"]


def test_fidelity_of_qgate_exports_is_total_and_of_another_rule_is_measured(tiny_dirs):
    from qgate.checkpoints import load_candidate

    root, model = tiny_dirs
    r = resolve_candidate(CheckpointCandidate("a", str(root / "mxfp4")))
    cand, _ = load_candidate(r, "cpu", torch.float32, progress=False)
    rows = fidelity(model, cand, "mxfp4")
    assert len(rows) == 14 and all(row["identical_share"] == 1.0 and row["rule"] == "identical" for row in rows)
    # the same checkpoint against another emulation (RCEIL scales): a measured, explained difference
    rows = fidelity(model, cand, "mxfp4_rceil")
    s = fidelity_summary(rows)
    assert 0 < s["identical_share"] < 1 and s["max_rel_diff"] > 0
    assert all("RCEIL vs FLOOR" in row["rule"] for row in rows if row["identical_share"] < 1)
    r = resolve_candidate(CheckpointCandidate("n", str(root / "nvfp4")))
    cand, _ = load_candidate(r, "cpu", torch.float32, progress=False)
    rows = fidelity(model, cand, "nvfp4")
    assert all(row["identical_share"] == 1.0 for row in rows)


def test_bad_candidates_are_one_line_exit_2_and_nothing_written(tmp_path, tiny_dirs):
    root, _ = tiny_dirs
    db = tmp_path / "q.db"
    pol = policy(tmp_path, root / "base")
    for arg, expected in (("nvfp4=" + str(root / "nvfp4"), "is a format's name"),
                          ("x", "expected NAME=PATH"),
                          ("x=" + str(tmp_path / "nope"), "does not exist"),
                          ("x=" + str(root / "base"), "has no quantization_config")):
        done = CliRunner().invoke(cli, ["run", "--family", "smollm2", "--policy", str(pol), "--db", str(db),
                                        "--candidate", arg])
        assert done.exit_code == 2 and expected in done.output and "Traceback" not in done.output, done.output
        assert not db.exists()
    with pytest.raises(QgateError, match="checkpoints.bad name: .*must be letters"):
        from qgate.policy import load_policy

        load_policy(policy(tmp_path, root / "base", "checkpoints: {'bad name': x}\n"))


def test_gate_a_checkpoint_candidate_end_to_end(tmp_path, tiny_dirs):
    root, _ = tiny_dirs
    db = tmp_path / "q.db"
    pol = policy(tmp_path, root / "base")
    args = ["run", "--family", "smollm2", "--policy", str(pol), "--db", str(db), "--candidate",
            f"mine={root / 'nvfp4'}", "--json", "-o", str(tmp_path / "r.html")]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code in (0, 1, 3), done.output
    data = json.loads(done.output[done.output.index("{\n"):])
    assert data["formats"] == ["mine"]  # --candidate alone gates only the checkpoint
    (cand,) = data["candidates"]
    assert cand["name"] == "mine" and cand["qgate_format"] == "nvfp4" and "nvfp4-pack-quantized" in cand["scheme"]
    assert cand["fidelity"]["identical_share"] == 1.0 and cand["fidelity"]["tensors"] == 14
    assert {t["task"] for t in data["tasks"] if t["format"] == "mine"} == {"mmlu", "perplexity"}
    con = sqlite3.connect(db)
    qc = con.execute("SELECT id, format, recipe, config FROM quant_configs WHERE format='mine'").fetchall()
    assert len(qc) == 1 and qc[0][2] == "checkpoint"
    assert json.loads(qc[0][3])["checkpoint_candidate"] == cand["checkpoint"]
    evals = con.execute("SELECT COUNT(*) FROM evaluations WHERE quant_config_id=?", (qc[0][0],)).fetchone()[0]
    assert evals == 2
    html = (tmp_path / "r.html").read_text()
    assert "Emulation fidelity per tensor" in html and "nvfp4-pack-quantized" in html
    assert "of elements identical to qgate&#39;s nvfp4" in html or "of elements identical to qgate's nvfp4" in html
    # an unchanged re-run finds every evaluation stored under the checkpoint's hash
    again = CliRunner().invoke(cli, args)
    assert json.loads(again.output[again.output.index("{\n"):])["evaluations_run"] == 0
