"""The real-model gate as a benchmark: a family member x candidate formats on a suite sized to decide.

Spreads the work over the GPUs of one machine as one `qgate run` process per task x format, all on one
shared SQLite store: for each task, the first format's process evaluates the baseline too; once it has, the
other formats' processes for that task start together (a baseline is computed once, never raced). Processes
go round-robin over the GPUs, at most --procs-per-gpu at a time on each (one process keeps an H200 about
15% busy; three or four fill it). Then the full gate runs once more: every evaluation is in the store, so
that run only decides, renders the report and prints JSON. Evaluations already in the store (--db) are
not repeated, so a larger suite reuses whatever tasks did not change.
The "mixed-fp4" candidate (the mixed-fp4 recipe around nvfp4) is gated through a second policy file,
derived from the family's, because a policy names each format once.

Writes into --out: gate-<policy>.json, report-<policy>.html, quality.md (per format x task: scores, delta,
interval, p, decision, n, evaluation time; the family verdict), log-<task>-<format>.txt.

    python bench/quality_gate.py --family qwen2.5-coder --member qwen2.5-coder-0.5b-instruct \
        --suite standard-offline --gpus 2 --db /tmp/quality.db --out /tmp/quality

On one CPU-only machine pass --gpus 1 --device cpu (and --limit N to keep it short).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["nvfp4", "mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "fp8"]
# relative cost of a task's evaluation (generation length x samples), to balance the GPUs
COST = {"ifeval": 6, "humaneval": 2, "gsm_symbolic": 2, "json_schema": 2, "needle": 2, "mmlu": 2, "perplexity": 1}


def qgate(*args: str) -> list[str]:
    return [sys.executable, "-c", "from qgate.cli import main; main()", *args]


def task_suites(suite_path: Path, out: Path) -> dict[str, Path]:
    """One suite file per task of the suite (same task entries, so the same evaluation keys)."""
    suite = yaml.safe_load(suite_path.read_text())
    paths = {}
    for task in suite["tasks"]:
        path = out / f"suite-{task['name']}.yaml"
        path.write_text(yaml.safe_dump({**suite, "suite": f"{suite['suite']}-{task['name']}".replace("_", "-"),
                                        "tasks": [task]}, sort_keys=False))
        paths[task["name"]] = path
    return paths


class GpuSlots:
    """Round-robin GPU choice with at most `per_gpu` processes on each at once."""

    def __init__(self, gpus: int, per_gpu: int):
        self._next = itertools.cycle(range(gpus))
        self._free = {g: threading.Semaphore(per_gpu) for g in range(gpus)}
        self._lock = threading.Lock()

    def run(self, cmd: list[str], env: dict, log: Path, device: str) -> int:
        with self._lock:
            gpu = next(self._next)
        with self._free[gpu]:
            env = dict(env)
            if device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            with open(log, "w") as fh:
                return subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def evaluate_all(jobs: dict[str, list[tuple[str, list[str]]]], slots: GpuSlots, device: str, out: Path) -> None:
    """jobs: task -> [(label, qgate run args)], the first of each list also computing the task's baseline."""

    def chain(task: str, runs: list[tuple[str, list[str]]]) -> None:
        first, rest = runs[0], runs[1:]
        slots.run(qgate(*first[1]), os.environ, out / f"log-{task}-{first[0]}.txt", device)
        threads = [threading.Thread(target=slots.run, args=(qgate(*args), os.environ,
                                                             out / f"log-{task}-{label}.txt", device))
                   for label, args in rest]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"{task}: evaluated", flush=True)

    chains = [threading.Thread(target=chain, args=(task, runs)) for task, runs in jobs.items()]
    for t in chains:
        t.start()
    for t in chains:
        t.join()


def mixed_policy(family: str, out: Path) -> Path:
    policy = yaml.safe_load((ROOT / "qgate" / "policies" / f"{family}.yaml").read_text())
    policy["formats"] = {"nvfp4": {"recipe": "mixed-fp4"}}
    policy["description"] = f"{policy.get('description', '')} (benchmark: the mixed-fp4 recipe around nvfp4)"
    path = out / f"{family}-mixed.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen2.5-coder")
    ap.add_argument("--member", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--suite", default="standard-offline")
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--procs-per-gpu", type=int, default=4, help="qgate processes sharing one GPU at a time")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--db", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--finalize-only", action="store_true", help="only the deciding runs (evaluations stored)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    suite_path = Path(args.suite) if args.suite.endswith((".yaml", ".yml")) else ROOT / "qgate" / "suites" / f"{args.suite}.yaml"
    mixed = mixed_policy(args.family, args.out)
    common = ["--family", args.family, "--member", args.member, "--db", args.db, "--device", args.device]
    if args.limit:
        common += ["--limit", str(args.limit)]
    fmt_args = [a for f in args.formats for a in ("--format", f)]
    started = time.time()
    if not args.finalize_only:
        # the costliest tasks start first, so their chains are not the last to finish
        tasks = sorted(task_suites(suite_path, args.out).items(), key=lambda kv: -COST.get(kv[0], 2))
        jobs = {}
        for task, part in tasks:
            runs = [(f, ["run", *common, "--suite", str(part), "--format", f, "--no-report"]) for f in args.formats]
            runs.append(("mixed-fp4", ["run", *common, "--suite", str(part), "--policy", str(mixed),
                                       "--format", "nvfp4", "--no-report"]))
            jobs[task] = runs
        evaluate_all(jobs, GpuSlots(args.gpus, args.procs_per_gpu), args.device, args.out)
        print(f"evaluations done in {time.time() - started:.0f} s", flush=True)
    results = {}
    for name, extra in (("main", fmt_args), ("mixed", ["--policy", str(mixed), "--format", "nvfp4"])):
        cmd = qgate("run", *common, "--suite", str(suite_path), *extra, "--json",
                    "-o", str(args.out / f"report-{name}.html"))
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        (args.out / f"gate-{name}.json").write_text(done.stdout)
        (args.out / f"gate-{name}.stderr").write_text(done.stderr)
        try:
            results[name] = json.loads(done.stdout)
        except ValueError:
            print(f"{name}: exit {done.returncode}, no JSON; stderr tail:\n{done.stderr[-2000:]}", flush=True)
    table = quality_table(results)
    (args.out / "quality.md").write_text(table)
    print(table)
    print(f"total {time.time() - started:.0f} s")
    return 0


def _fmt(v, spec=".1f"):
    return "" if v is None else format(v, spec)


def quality_table(results: dict) -> str:
    lines = ["| candidate | task | baseline | candidate | delta | 95% CI | p | allowed | decision | n | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for name, res in results.items():
        for t in res.get("tasks", []):
            label = "mixed-fp4" if name == "mixed" and t["format"] == "nvfp4" else t["format"]
            key = (label, t["task"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(  # scores as decided: points for pass/fail metrics, the metric's units otherwise
                f"| {label} | {t['task']} | {_fmt(t.get('baseline'), '.2f')} | {_fmt(t.get('candidate'), '.2f')}"
                f" | {_fmt(t['delta'], '+.2f')} | [{_fmt(t['ci_low'], '+.2f')}, {_fmt(t['ci_high'], '+.2f')}]"
                f" | {_fmt(t['p_value'], '.3g')} | {_fmt(t['threshold'], '+.2f')} | {t['verdict']} | {t['n']}"
                f" | {_fmt(t.get('seconds'), '.0f')} |")
        for m in res.get("members", []):
            lines.append(f"\n{name}: {m.get('member')} {m.get('format')}: {m.get('outcome')} "
                         f"(ships {m.get('shipped_format') or '-'})")
        lines.append(f"{name}: outcome {res.get('outcome')}, exit {res.get('exit_code')}\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
