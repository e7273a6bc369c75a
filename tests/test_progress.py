"""Progress: tqdm bars on a terminal, one line per step off it, requests counted inside a task, and no
change to tqdm (or to stderr) left behind in the process."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def test_plain_lines_one_per_step_with_counts():
    from qgate.progress import Progress

    out = io.StringIO()
    p = Progress(total=2, label="qgate", stream=out, bar=False, interval=3600)
    p.show("mmlu: evaluating")
    with p.within("mmlu loglikelihood", total=8) as sub:
        for _ in range(4):
            sub.update(2)  # within the interval: no line per update
    p.step("mmlu: done")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "qgate: [0/2] mmlu: evaluating"
    assert re.fullmatch(r"qgate: \[0/2\] mmlu loglikelihood: 8/8 requests, 0:0\d elapsed", lines[1]), lines[1]
    assert lines[2:] == ["qgate: [1/2] mmlu: done"]
    assert "\r" not in out.getvalue()


def test_plain_lines_inside_a_long_task_are_timed_and_carry_an_eta():
    from qgate.progress import Progress

    out = io.StringIO()
    p = Progress(total=1, stream=out, bar=False, interval=0)
    sub = p.within("humaneval generate_until", total=4)
    sub.update(1)
    sub.close()
    first = out.getvalue().splitlines()[0]
    assert re.fullmatch(r"qgate: \[0/1\] humaneval generate_until: 1/4 requests, \d+:\d\d elapsed, ETA \d+:\d\d",
                        first), first


def test_bars_on_a_terminal_show_counts_elapsed_and_eta():
    from qgate.progress import Progress

    tty = io.StringIO()
    p = Progress(total=4, label="qgate", stream=tty, bar=True)
    p.step("a: done")
    sub = p.within("a loglikelihood", total=10)
    sub.update(4)
    time.sleep(0.2)  # tqdm redraws at most every 0.1 s
    sub.update(6)
    text = tty.getvalue()
    assert "qgate:" in text and "1/4" in text and "a: done" in text
    assert "10/10" in text and re.search(r"\[\d\d:\d\d<\d\d:\d\d", text)  # elapsed < ETA, tqdm's format
    sub.close()
    p.close()


def test_qgate_leaves_tqdm_and_stderr_as_they_were():
    """In a fresh interpreter: the command line and a real evaluation through qgate's adapter (tiny
    random model, 2 MMLU documents) report progress; tqdm's constructor and sys.stderr stay untouched."""
    probe = (
        "import sys, io, tqdm, tqdm.std\n"
        "init, err = vars(tqdm.std.tqdm)['__init__'], sys.stderr  # the class's own entry, not a bound view\n"
        "from qgate.cli import cli\n"
        "try:\n"
        "    cli.main(['formats'], prog_name='qgate', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "from tiny import byte_tokenizer\n"
        "from qgate.models import build_tiny_model\n"
        "from qgate.evaluation.runner import evaluate_task\n"
        "from qgate.evaluation.suite import load_suite\n"
        "from qgate.progress import Progress\n"
        "tok = byte_tokenizer()\n"
        "model = build_tiny_model('qwen2', seed=5, vocab_size=len(tok))\n"
        "out = io.StringIO()\n"
        "p = Progress(total=1, stream=out, bar=False, interval=3600)\n"
        "r = evaluate_task(model, tok, load_suite('tests/data/gate_suite.yaml').task('mmlu'), limit=2, progress=p)\n"
        "p.step('mmlu: done')\n"
        "print(out.getvalue(), end='')\n"
        "print('N=%d' % r.n)\n"
        "print('UNTOUCHED=%s' % (vars(tqdm.std.tqdm)['__init__'] is init and tqdm.tqdm is tqdm.std.tqdm\n"
        "                        and not hasattr(tqdm.std.tqdm, '_qgate_quiet') and sys.stderr is err))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "UNTOUCHED=True" in lines, done.stdout
    assert "N=2" in lines
    # the task's requests (2 documents x 4 choices) were counted to their total, then the step
    assert any(re.fullmatch(r"qgate: \[0/1\] mmlu loglikelihood: 8/8 requests, .*", line) for line in lines), lines
    assert "qgate: [1/1] mmlu: done" in lines
    assert "Building contexts" not in done.stderr and "\r" not in done.stderr  # lm-eval's own bars stayed off


@pytest.mark.parametrize("name", ["tqdm", "tqdm.std", "tqdm.auto"])
def test_importing_qgate_patches_nothing_in_tqdm(name):
    code = (f"import importlib; m = importlib.import_module({name!r}); before = dict(vars(m.tqdm))\n"
            "import qgate.cli, qgate.progress, qgate.evaluation.runner, qgate.gate\n"
            "try:\n"
            "    qgate.cli.cli.main(['formats', '--json'], prog_name='qgate', standalone_mode=False)\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(dict(vars(m.tqdm)) == before)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]
