"""The layout DESIGN.md describes holds: no import circle in qgate/, stages never reach back, and the
commands that need no model start without torch.

The import graph is read from the source (module-level and function-level imports alike), so an
import hidden inside a function still counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qgate"


def module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the qgate modules it imports (``from qgate.x import y`` counts y when y is a module)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_code():
    graph = import_graph()
    assert "qgate.decide" in graph["qgate.gate"] and "qgate.decide" in graph["qgate.review.redecide"]
    assert "qgate.executors.units" in graph["qgate.gate"]  # a function-level import counts too
    assert {"qgate.store", "qgate.evaluation.runner"} <= graph["qgate.executors.units"]


def test_cycle_detection_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_qgate():
    assert find_cycle(import_graph()) is None


# which later stages a module must never import (DESIGN.md: imports point down the flow)
FORBIDDEN = {
    "qgate.formats": {"qgate.backends", "qgate.encoding", "qgate.quantize"},
    "qgate.recipes": {"qgate.backends", "qgate.quantize", "qgate.models"},
    "qgate.policy": {"qgate.store", "qgate.quantize", "qgate.evaluation", "qgate.models", "qgate.decide",
                     "qgate.gate", "qgate.review"},
    "qgate.decide": {"qgate.gate", "qgate.store", "qgate.review", "qgate.models", "qgate.quantize",
                     "qgate.evaluation", "qgate.executors"},
    # executors run units and write to the store; deciding, reviewing and reporting happen elsewhere
    "qgate.executors": {"qgate.gate", "qgate.decide", "qgate.review", "qgate.report", "qgate.policy"},
    "qgate.keys": {"qgate.gate", "qgate.review", "qgate.quantize", "qgate.models"},
    "qgate.review": {"qgate.gate", "qgate.quantize", "qgate.models"},
    "qgate.report": {"qgate.gate", "qgate.review", "qgate.quantize"},
    "qgate.store": {"qgate.gate", "qgate.review", "qgate.decide", "qgate.report", "qgate.executors"},
    # reads the store only: no model, no evaluation, no decision
    "qgate.export": {"qgate.gate", "qgate.quantize", "qgate.models", "qgate.evaluation", "qgate.review",
                     "qgate.decide"},
    "qgate.progress": {"qgate.gate", "qgate.evaluation", "qgate.models", "qgate.quantize", "qgate.store"},
    "qgate.noise": {"qgate.gate", "qgate.evaluation", "qgate.models", "qgate.quantize", "qgate.store"},
    # families are data: their parser reads files only, and never a model library or a later stage
    "qgate.families": {"qgate.models", "qgate.policy", "qgate.evaluation", "qgate.store", "qgate.gate",
                       "qgate.quantize", "qgate.decide"},
    "qgate.datadirs": {"qgate.families", "qgate.policy", "qgate.evaluation", "qgate.models", "qgate.gate"},
    "qgate.catalog": {"qgate.models", "qgate.quantize", "qgate.store", "qgate.gate", "qgate.evaluation.runner"},
    # checked before anything loads: never a later stage
    "qgate.offline": {"qgate.gate", "qgate.store", "qgate.decide", "qgate.models", "qgate.quantize"},
    "qgate.model_files": {"qgate.gate", "qgate.store", "qgate.decide", "qgate.quantize", "qgate.evaluation"},
    # decodes one checkpoint format: no stage of the flow
    "qgate.modelopt_checkpoint": {"qgate.gate", "qgate.store", "qgate.decide", "qgate.quantize", "qgate.evaluation",
                                  "qgate.models", "qgate.checkpoints"},
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_stages_never_reach_back(module):
    graph = import_graph()
    mine = [m for m in graph if m == module or m.startswith(module + ".")]
    bad = {(m, t) for m in mine for t in graph[m]
           for f in FORBIDDEN[module] if t == f or t.startswith(f + ".")}
    assert not bad, sorted(bad)


COMMANDS_WITHOUT_A_MODEL = [
    ["formats"],
    ["ls", "families"],
    ["ls", "suites"],
    ["ls", "tasks"],
    ["ls", "formats", "--json"],
    ["policy", "check", "qgate/policies/smollm2.yaml"],
    ["policy", "show", "smollm2"],
    ["policy", "diff", "qgate/policies/smollm2.yaml", "qgate/policies/smollm2.yaml", "--db", "{db}"],
    ["report", "latest", "--db", "{db}", "-o", "{tmp}/r.html"],
    ["verify", "{tmp}/r.html", "--db", "{db}"],
    ["signoff", "latest", "--reviewer", "r", "--approve", "--db", "{db}", "-o", "{tmp}/s.html"],
    ["policy", "redecide", "latest", "--policy", "qgate/policies/smollm2.yaml", "--db", "{db}"],
    ["export", "latest", "--lm-eval", "{tmp}/lm-eval", "--db", "{db}"],
]


def test_commands_that_need_no_model_do_not_import_torch(tmp_path):
    """Each command runs in a fresh interpreter; afterwards neither torch nor lm-eval is loaded."""
    db = tmp_path / "empty.db"
    from qgate.store import open_store

    with open_store(str(db)) as store:  # a real run with one decision, no model involved
        run = store.start_run(family="smollm2", formats=["nvfp4"], members=["m"], suite="smoke", suite_hash="s",
                              policy_hash="p", policy_text="", policy_path="p.yaml", versions={}, host="h", pid=1,
                              git_revision=None, backend="reference", device="cpu", sample_limit=None)
        store.record_decisions(run, policy_hash="p", decisions_rows=[], outcomes_rows=[
            {"member": "m", "format": "nvfp4", "outcome": "ships", "shipped_format": "nvfp4", "reasons": []}])
        store.finish_run(run, status="completed", outcome="ships", exit_code=0)
    probe = (
        "import sys\n"
        "from qgate.cli import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:], prog_name='qgate', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "except Exception as exc:  # a command may refuse this tiny store; what it imported is the point\n"
        "    print(type(exc).__name__, exc)\n"
        "heavy = sorted(m for m in ('torch', 'lm_eval', 'transformers', 'triton') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    for args in COMMANDS_WITHOUT_A_MODEL:
        argv = [a.format(db=db, tmp=tmp_path) for a in args]
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                              cwd=PACKAGE.parent, timeout=120)
        last = [line for line in done.stdout.splitlines() if line.startswith("HEAVY=")]
        assert last == ["HEAVY="], (argv, done.stdout[-2000:], done.stderr[-2000:])
