"""Policy files (loading, merging, validation messages) and task decisions (pure, on synthetic samples)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qgate.errors import QgateError
from qgate.decide import decide_task, gate_effect
from qgate.evaluation.suite import suite_task_names
from qgate.policy import TaskPolicy, load_policy

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
family: smollm2
members: [smollm2-135m-instruct]
suite: smoke
formats:
  nvfp4: {recipe: uniform}
fallback: [fp8]
tasks:
  mmlu:
    max_drop: 2.0
    inconclusive: fail
  perplexity:
    metric: word_perplexity
    min_recovery: 0.95
"""


# ---- loading --------------------------------------------------------------------------------------

def test_shipped_policies_load_and_validate():
    for family in ("smollm2", "qwen2.5"):
        pol = load_policy(family)
        assert pol.family == family and pol.members and pol.suite == "smoke"
        assert [c.format for c in pol.fallback] == ["fp8"]
        assert len(pol.hash) == 64 and pol.text == (REPO / "qgate" / "policies" / f"{family}.yaml").read_text()
    smol = load_policy("smollm2")
    assert smol.task_policy("perplexity").min_recovery == 0.90
    assert smol.task_policy("mmlu").blocking is False
    assert smol.task_policy("needle").max_drop == 10.0
    assert load_policy(REPO / "qgate" / "policies" / "default.yaml").family == "default"


def test_family_file_merges_over_default(tmp_path):
    pol = load_policy(write(tmp_path, GOOD))
    mmlu = pol.task_policy("mmlu")
    assert (mmlu.max_drop, mmlu.inconclusive, mmlu.confidence, mmlu.blocking) == (2.0, "fail", 0.95, True)
    ppl = pol.task_policy("perplexity")
    assert ppl.min_recovery == 0.95 and ppl.max_drop is None and ppl.metric == "word_perplexity"
    # a task the file does not list takes the defaults of policies/default.yaml
    needle = pol.task_policy("needle")
    assert needle.max_drop == 2.0 and needle.inconclusive == "warn" and needle.task == "needle"
    assert pol.format_choice("nvfp4").recipe == "uniform" and pol.format_choice("mxfp4").recipe == "uniform"


def test_family_file_without_members_gates_its_first_model_under_default_thresholds():
    pol = load_policy("llama")
    assert pol.family == "llama" and pol.path.endswith("llama.yaml")
    assert [m.name for m in pol.members] == ["llama-3.2-1b-instruct"]
    assert [c.format for c in pol.fallback] == ["fp8"]
    assert pol.defaults == load_policy(REPO / "qgate" / "policies" / "default.yaml").defaults


def test_family_registered_in_code_without_a_file_runs_under_default(monkeypatch):
    from qgate import families

    fam = families.Family("codefam", (families.Member("codefam-1b", "hub", "org/codefam-1b"),), "codefam-1b")
    monkeypatch.setitem(families._FAMILIES, "codefam", fam)
    pol = load_policy("codefam")
    assert pol.family == "codefam" and pol.path.endswith("default.yaml")
    assert [m.name for m in pol.members] == ["codefam-1b"]


def test_hash_depends_on_content_not_formatting(tmp_path):
    a = load_policy(write(tmp_path, GOOD, "a.yaml"))
    b = load_policy(write(tmp_path, "# a comment\n" + GOOD.replace("max_drop: 2.0", "max_drop: 2"), "b.yaml"))
    c = load_policy(write(tmp_path, GOOD.replace("max_drop: 2.0", "max_drop: 2.5"), "c.yaml"))
    assert a.hash == b.hash != c.hash
    assert a.text != b.text


@pytest.mark.parametrize("text,expected", [
    (GOOD.replace("    max_drop: 2.0\n", "    max_dorp: 2.0\n"),
     r"p\.yaml:9: tasks\.mmlu\.max_dorp: unknown key \(did you mean 'max_drop'\?\)"),
    (GOOD.replace("max_drop: 2.0", "max_drop: -1"),
     r"p\.yaml:9: tasks\.mmlu\.max_drop: negative threshold -1"),
    (GOOD.replace("  nvfp4: {recipe: uniform}", "  nvfp5: {recipe: uniform}"),
     r"p\.yaml:5: formats\.nvfp5: unknown format 'nvfp5' \(did you mean 'nvfp4'\?\)"),
    (GOOD.replace("fallback: [fp8]", "fallback: [fp9]"),
     r"p\.yaml:6: fallback\[0\]: unknown format 'fp9'"),
    (GOOD.replace("  mmlu:\n", "  mmlx:\n"),
     r"p\.yaml:8: tasks\.mmlx: unknown task: suite 'smoke' has no task 'mmlx' \(did you mean 'mmlu'\?\)"),
    (GOOD.replace("inconclusive: fail", "inconclusive: maybe"),
     r"p\.yaml:10: tasks\.mmlu\.inconclusive: expected one of pass, fail, warn, got 'maybe'"),
    (GOOD.replace("min_recovery: 0.95", "min_recovery: 1.5"),
     r"p\.yaml:13: tasks\.perplexity\.min_recovery: min_recovery 1\.5 out of range"),
    (GOOD.replace("min_recovery: 0.95", "min_recovery: 0.95\n    max_drop: 1"),
     r"tasks\.perplexity\.min_recovery: give either max_drop"),
    (GOOD.replace("suite: smoke", "suite: smok"), r"p\.yaml:3: suite: suite 'smok' not found"),
    (GOOD.replace("family: smollm2\n", "family: smollm2\nfalback: [fp8]\n"),
     r"p\.yaml:2: falback: unknown key \(did you mean 'fallback'\?\)"),
    (GOOD.replace("members: [smollm2-135m-instruct]", "members: smollm2"), r"p\.yaml:2: members: expected a non-empty list"),
    (GOOD.replace("tasks:\n", "tasks:\n  - mmlu\n").split("  mmlu:\n")[0], r"p\.yaml:\d+: tasks: expected a mapping"),
    ("family: smollm2\nformats: {nvfp4: {recipe: uniform}\n", r"p\.yaml:\d+: not valid YAML"),
    (GOOD.replace("family: smollm2\n", ""), r"p\.yaml:1: family: missing"),
    (GOOD.replace("    max_drop: 2.0\n", "    max_drop: lots\n"), r"tasks\.mmlu\.max_drop: expected an allowed drop"),
    (GOOD.replace("fallback: [fp8]", "fallback: [fp8, mxfp8_e4m3, fp8]"),
     r"p\.yaml:6: fallback\[2\]: fp8 is already entry 0 of the fallback chain"),
    (GOOD.replace("fallback: [fp8]", "fallback: [nvfp4]"),
     r"p\.yaml:6: fallback\[0\]: nvfp4 is a candidate format of this policy; a candidate cannot be its own fallback"),
])
def test_malformed_policies_give_one_line_with_file_line_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(QgateError) as info:
        load_policy(path, suite_tasks=suite_task_names)  # as `qgate policy check` and `qgate run` load it
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    import re

    assert re.search(expected, message), message


def test_unknown_family_names_the_known_ones():
    with pytest.raises(QgateError, match=r"unknown family 'smolm2'.*did you mean 'smollm2'.*known families: .*qwen2\.5"):
        load_policy("smolm2")


def test_cli_policy_check_and_show(tmp_path):
    bad = write(tmp_path, GOOD.replace("max_drop: 2.0", "max_drop: -3"), "bad.yaml")
    from click.testing import CliRunner

    from qgate.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, list(args))

    ok = run("policy", "check", str(REPO / "qgate" / "policies" / "smollm2.yaml"), str(REPO / "qgate" / "policies" / "qwen2.5.yaml"))
    assert ok.exit_code == 0, ok.output
    assert "smollm2.yaml: ok" in ok.stdout and "qwen2.5.yaml: ok" in ok.stdout
    failed = run("policy", "check", str(bad))
    assert failed.exit_code == 2
    assert failed.stderr.strip().count("\n") == 0
    assert f"{bad}:9: tasks.mmlu.max_drop: negative threshold -3" in failed.stderr
    shown = run("policy", "show", "smollm2")
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line.strip()}
    assert "keep >= 0.9 of baseline" in rows["perplexity"] and "word_perplexity" in rows["perplexity"]
    assert "10 pts" in rows["needle"] and "advisory" in rows["mmlu"]
    assert run("policy", "show", "nosuchfamily").exit_code == 2


# ---- decisions --------------------------------------------------------------------------------------

def samples(values, prefix="d"):
    return [{"doc_id": f"{prefix}{i}", "doc_hash": f"h{i}", "scores": {"acc": v}} for i, v in enumerate(values)]


def binary_pair(n, both, base_only, cand_only):
    base = [1] * both + [1] * base_only + [0] * cand_only + [0] * (n - both - base_only - cand_only)
    cand = [1] * both + [0] * base_only + [1] * cand_only + [0] * (n - both - base_only - cand_only)
    return samples(base), samples(cand)


TP = TaskPolicy(task="mmlu", metric="acc", max_drop=1.0, confidence=0.95, inconclusive="warn")


def test_identical_results_on_many_samples_pass():
    base, cand = binary_pair(2000, 1000, 0, 0)
    d = decide_task(base, cand, TP, True, True)
    assert d.verdict == "pass" and d.delta == 0 and d.n == 2000 and d.p_value == 1.0
    assert d.ci_low >= -1.0
    assert d.reason.startswith("mmlu: +0.0 pts, 95% CI [") and d.reason.endswith(": pass")


def test_a_clear_drop_beyond_the_threshold_fails_with_its_reason():
    # 1000 samples, 40 lost and 17 gained: -2.3 points, significant
    base, cand = binary_pair(1000, 500, 40, 17)
    d = decide_task(base, cand, TP, True, True)
    assert d.verdict == "fail"
    assert d.delta == pytest.approx(-2.3)
    assert d.ci_high < 0 and d.ci_low < -2.3
    assert d.threshold == -1.0 and d.unit == "pts"
    assert d.reason == (f"mmlu: -2.3 pts, 95% CI [{d.ci_low:+.1f}, {d.ci_high:+.1f}], allowed -1.0, n=1000: fail")
    assert d.discordant == (40, 17)


def test_twenty_samples_one_flip_is_inconclusive_and_says_how_many_would_decide():
    base, cand = binary_pair(20, 10, 1, 0)  # one flip = 5 points
    d = decide_task(base, cand, TP, True, True)
    assert d.verdict == "inconclusive"
    assert d.delta == pytest.approx(-5.0)
    assert d.samples_needed is not None and d.samples_needed > 20
    assert f"about {d.samples_needed} samples would decide" in d.reason


def test_an_estimate_on_the_allowed_drop_says_no_number_of_samples_decides():
    # 18/20 -> 16/20 against an allowed -10 pts: -0.1 only up to float rounding, which advised
    # "about 448784877754822708872548639047680 samples"
    base, cand = binary_pair(20, 16, 2, 0)
    d = decide_task(base, cand, TaskPolicy("humaneval", metric="acc", max_drop=10.0), True, True)
    assert d.verdict == "inconclusive" and d.samples_needed is None
    assert d.reason == ("humaneval: -10.0 pts, 95% CI [-29.4, +8.1], allowed -10.0, n=20: inconclusive "
                        "(the estimate sits exactly on the allowed drop: more samples decide only if it moves)")


def test_samples_needed_follows_the_side_that_would_decide():
    # 5 lost of 100, none gained: -5.0 pts, CI [-9.6, -0.3] already clear of zero, but exact McNemar
    # p = 0.0625. Against an allowed -4 a fail would decide: 6 lost answers, at 5% about 114 samples
    # (measuring the 1 point to the threshold instead advised about 1,825).
    base, cand = binary_pair(100, 50, 5, 0)
    beyond = decide_task(base, cand, TaskPolicy("mmlu", metric="acc", max_drop=4.0), True, True)
    assert beyond.verdict == "inconclusive" and beyond.ci_high < 0 and beyond.p_value == 0.0625
    assert beyond.samples_needed == 114
    # against an allowed -6 only a pass can decide: the lower end must come up from -9.6 to -6
    inside = decide_task(base, cand, TaskPolicy("mmlu", metric="acc", max_drop=6.0), True, True)
    assert inside.verdict == "inconclusive" and 1000 < inside.samples_needed < 3000


def test_inconclusive_and_advisory_effects():
    base, cand = binary_pair(20, 10, 1, 0)
    d = decide_task(base, cand, TP, True, True)
    assert gate_effect(d, TP) == "warn"
    assert gate_effect(d, TaskPolicy("mmlu", max_drop=1.0, inconclusive="fail")) == "fail"
    assert gate_effect(d, TaskPolicy("mmlu", max_drop=1.0, inconclusive="pass")) == "pass"
    base, cand = binary_pair(1000, 500, 40, 17)
    failing = decide_task(base, cand, TP, True, True)
    assert gate_effect(failing, TP) == "fail"
    assert gate_effect(failing, TaskPolicy("mmlu", max_drop=1.0, blocking=False)) == "warn"


def test_min_recovery_converts_to_points_of_the_baseline():
    base, cand = binary_pair(4000, 2000, 0, 0)  # baseline accuracy 50%
    d = decide_task(base, cand, TaskPolicy("mmlu", metric="acc", min_recovery=0.98), True, True)
    assert d.threshold == pytest.approx(-1.0)  # 2% of 50 points
    assert d.verdict == "pass"


def test_perplexity_from_loglikelihoods_and_word_counts():
    # 200 documents; the candidate loses 0.05 nats per word on every document: perplexity x exp(0.05)
    rng = __import__("numpy").random.default_rng(0)
    words = rng.integers(50, 400, 200)
    nats = rng.uniform(2.5, 3.5, 200)

    def docs(extra):
        return [{"doc_id": i, "doc_hash": f"h{i}",
                 "scores": {"loglikelihood": float(-(n + extra) * w), "words": int(w),
                            "word_perplexity": math.exp(n + extra)}} for i, (n, w) in enumerate(zip(nats, words))]

    base, cand = docs(0.0), docs(0.05)
    corpus = math.exp(float((nats * words).sum() / words.sum()))
    tight = decide_task(base, cand, TaskPolicy("perplexity", metric="word_perplexity", min_recovery=0.99), False)
    assert not tight.binary and tight.unit == ""
    assert tight.baseline == pytest.approx(corpus)  # corpus-level, not the mean of per-document values
    assert tight.delta == pytest.approx(corpus * (math.exp(0.05) - 1))
    assert tight.threshold == pytest.approx(corpus * (1 / 0.99 - 1))
    assert tight.verdict == "fail" and tight.ci_low > tight.threshold
    loose = decide_task(base, cand, TaskPolicy("perplexity", metric="word_perplexity", min_recovery=0.90), False)
    assert loose.verdict == "pass" and loose.ci_high <= loose.threshold
    assert "(" in loose.reason and "->" in loose.reason and loose.reason.endswith(": pass")


def test_samples_are_paired_by_document_and_hash():
    base = samples([1, 1, 0, 1])
    cand = samples([1, 0, 0, 1])
    cand[3]["doc_hash"] = "other"  # a different document under the same id is not a pair
    cand = cand[1:] + [{"doc_id": "extra", "scores": {"acc": 1}}]
    d = decide_task(base, cand, TP, True, True)
    assert d.n == 2  # d1 and d2 pair; d0 has no partner, d3's hash differs
    assert "1 samples differ" in d.reason and "1 samples without a pair" in d.reason


def test_no_pairs_is_inconclusive_not_an_error():
    d = decide_task(samples([1, 0]), samples([1, 0], prefix="x"), TP, True, True)
    assert d.verdict == "inconclusive" and d.n == 0 and "no paired samples" in d.reason


def test_lower_is_better_direction_for_plain_continuous_metrics():
    base = [{"doc_id": i, "scores": {"loss": 2.0 + 0.001 * i}} for i in range(300)]
    cand = [{"doc_id": i, "scores": {"loss": 2.5 + 0.001 * i}} for i in range(300)]
    tp = TaskPolicy("loss", metric="loss", max_drop=0.1)
    d = decide_task(base, cand, tp, higher_is_better=False)
    assert d.delta == pytest.approx(0.5) and d.threshold == pytest.approx(0.1) and d.verdict == "fail"
    better = decide_task(cand, base, tp, higher_is_better=False)
    assert better.verdict == "pass"


def test_recipes_by_name_inline_rules_or_file(tmp_path):
    (tmp_path / "mixed.yaml").write_text("name: mine\nrules:\n  - {match: 'v_proj$', format: mxfp8_e4m3}\n"
                                         "  - {match: 'layers\\.\\d+\\.', format: $candidate}\n")
    text = GOOD.replace("  nvfp4: {recipe: uniform}\n",
                        "  nvfp4: {recipe: mixed.yaml}\n"
                        "  mxfp4:\n    recipe:\n      - {match: 'proj$', format: $candidate}\n")
    pol = load_policy(write(tmp_path, text))
    assert pol.format_choice("nvfp4").recipe == str(tmp_path / "mixed.yaml")
    assert pol.format_choice("mxfp4").recipe == {"name": "inline", "rules": [{"match": "proj$", "format": "$candidate"}]}
    bad = load_policy  # an unknown built-in name, and a rule with an unknown format, name file and line
    with pytest.raises(QgateError, match=r"p\.yaml:5: formats\.nvfp4\.recipe: unknown recipe 'unifrom'.*"
                                         r"did you mean 'uniform'"):
        bad(write(tmp_path, GOOD.replace("recipe: uniform", "recipe: unifrom")))
    with pytest.raises(QgateError, match=r"p\.yaml:7: formats\.mxfp4\.recipe: .*unknown format 'fp3'"):
        bad(write(tmp_path, text.replace("format: $candidate}\n", "format: fp3}\n", 1)
                  .replace("{recipe: mixed.yaml}", "{recipe: uniform}")))
