"""The `qgate` command line: one click group, each command a thin call into the module that owns the job."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

import click

from qgate import __version__
from qgate.crash import EXIT_INTERNAL, one_line, write_crash_log
from qgate.checkpoints import parse_candidate_option
from qgate.errors import QgateError, UsageError
from qgate.evaluation.runner import evaluate_task, make_lm, print_results_table, select_tasks
from qgate.evaluation.suite import load_suite, suite_task_names
from qgate.footprint import footprint, parse_bandwidth
from qgate.formats import get_format, list_formats
from qgate.offline import check_hub_data
from qgate.gate import run_gate
from qgate.policy import load_policy
from qgate.progress import Progress, use_bar
from qgate.report.data import open_existing_store, resolve_run_id
from qgate.report.render import render_run
from qgate.review.changes import policy_table
from qgate.review.output import review_markdown, review_text
from qgate.review.redecide import diff, redecide
from qgate.signoff import sign_off, verify_report
from qgate.summary import append_step_summary, console_text, junit_xml, markdown


class QgateGroup(click.Group):
    """Turns QgateError into one line on stderr and exit code 2, and any other exception into one line
    naming a log file that holds its traceback, exit code 4: never a traceback on the terminal."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QgateError as exc:
            click.echo(f"qgate: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, reported as one line
            try:
                where = f"details in {write_crash_log(exc)}"
            except OSError as log_exc:
                where = f"no log written: {log_exc}"
            click.echo(f"qgate: internal error: {one_line(exc)} ({where})", err=True)
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=QgateGroup)
@click.version_option(__version__, prog_name="qgate")
def cli():
    """Decide whether a quantized LLM checkpoint may ship."""
    from qgate import noise

    noise.install()  # known library chatter (torchao's CUDA extensions on a CPU machine...) stays off stderr


@cli.command("formats")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def formats_cmd(as_json):
    """List the numeric formats: element type, block size, scale (E8M0 with its rule), bits per value, largest value."""
    rows = [f.describe() for f in list_formats()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "element", "block", "scale", "bits/value", "largest")
    table = [header] + [
        (r["name"], r["element"], str(r["block_size"] or "-"),
         r["scale"] + (f'/{r["scale_rule"]}' if r["scale_rule"] else ""), f'{r["bits_per_value"]:g}',
         f'{r["max_value"]:g}' if r["max_value"] is not None else "-")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@cli.command("ls")
@click.argument("kind", type=click.Choice(["families", "suites", "tasks", "formats"]))
@click.option("--include-path", "include_path", default=None, type=click.Path(file_okay=False),
              help="tasks: also list the lm-eval tasks of this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON on stdout.")
def ls_cmd(kind, include_path, as_json):
    """List what qgate knows by name: families (and where their weights come from), suites, tasks, formats."""
    from qgate.catalog import listing, table

    rows = listing(kind, include_path)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in table(kind, rows):
        click.echo(line)


@cli.command("report")
@click.argument("run")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the HTML file (default: reports/<family>-<run>.html).")
@click.option("--db", default=None, help="Database URL or SQLite path (default: $QGATE_DB or ./qgate.db).")
def report_cmd(run, output, db):
    """Render the HTML sign-off report of RUN (a run number or 'latest') and print its path."""
    from qgate.report.data import open_existing_store, resolve_run_id
    from qgate.report.render import render_run

    with open_existing_store(db) as store:
        path = render_run(store, resolve_run_id(store, run), output)
    click.echo(str(path))


@cli.command("signoff")
@click.argument("run")
@click.option("--reviewer", required=True, help="Who signs (name or e-mail).")
@click.option("--approve/--reject", "approve", default=None, help="The reviewer's decision (one is required).")
@click.option("--comment", default=None, help="Why; required with --override.")
@click.option("--override", is_flag=True, help="Approve a run the gate blocked (needs --comment; recorded as an override).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the signed report (default: the run's report path).")
@click.option("--db", default=None, help="Database URL or SQLite path (default: $QGATE_DB or ./qgate.db).")
def signoff_cmd(run, reviewer, approve, comment, override, output, db):
    """Record a sign-off of RUN with the digest of what was approved, and re-render its report."""
    from qgate.report.data import open_existing_store
    from qgate.signoff import sign_off

    if approve is None:
        raise UsageError("qgate signoff: give --approve or --reject")
    with open_existing_store(db) as store:
        row, path = sign_off(store, run, reviewer=reviewer, approve=approve, comment=comment, override=override,
                             path=output)
    click.echo(f"run {row['run_id']}: {row['decision']} by {row['reviewer']}"
               f"{' (override)' if row['override'] else ''} at {row['created_at']}")
    click.echo(f"digest {row['digest']}")
    click.echo(str(path))


@cli.command("export")
@click.argument("run")
@click.option("--lm-eval", "lm_eval_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write lm-eval's results JSON and per-sample JSONL into (one subfolder per model).")
@click.option("--db", default=None, help="Database URL or SQLite path (default: $QGATE_DB or ./qgate.db).")
@click.option("--json", "as_json", is_flag=True, help="Print the written files as JSON.")
def export_cmd(run, lm_eval_dir, db, as_json):
    """Write RUN's evaluations (baseline and every candidate) in the files `lm_eval --output_path DIR
    --log_samples` writes, from the store alone; prints the paths."""
    from qgate.export import export_lm_eval

    with open_existing_store(db) as store:
        files = export_lm_eval(store, resolve_run_id(store, run), lm_eval_dir)
    if as_json:
        click.echo(json.dumps({"files": [str(f) for f in files]}, indent=2))
        return
    for path in files:
        click.echo(str(path))


@cli.command("verify")
@click.argument("report", type=click.Path(dir_okay=False))
@click.option("--db", default=None, help="Database URL or SQLite path (default: $QGATE_DB or ./qgate.db).")
def verify_cmd(report, db):
    """Check a signed REPORT.html against the database: exit 0 intact, 1 changed since sign-off, 2 bad input."""
    from qgate.report.data import open_existing_store
    from qgate.signoff import verify_report

    with open_existing_store(db) as store:
        result = verify_report(store, report)
    for line in result.lines():
        click.echo(line)
    sys.exit(0 if result.intact else 1)


RUN_EXIT_CODES = """\b
Exit codes:
  0  every requested candidate ships
  1  blocked: a member x format has no passing candidate and no passing fallback
  2  usage or input error (malformed policy, unknown family/format/member...); nothing is written
  3  ships only through the policy's fallback chain (e.g. "ship fp8 instead");
     a CI job may count 3 as a pass or a fail
  4  internal error: qgate itself failed (one line names the log file with the traceback);
     the run is recorded as failed
"""


MODEL_HELP = ("A model instead of a family's members: a hub id (owner/name, with --revision), a model directory "
              "or a .gguf file. --family is then optional.")


@cli.command("run", epilog=RUN_EXIT_CODES)
@click.option("--family", default=None, help="Model family (policies/<family>.yaml); optional with --model.")
@click.option("--model", "model", default=None, metavar="ID_OR_PATH", help=MODEL_HELP)
@click.option("--revision", default=None, help="Hub revision of --model (branch, tag or commit).")
@click.option("--include-path", "include_path", default=None, type=click.Path(file_okay=False),
              help="A folder of your own lm-eval task YAML files (suite tasks may name them).")
@click.option("--format", "formats", multiple=True,
              help="Candidate format (repeatable; default: the policy's candidate formats).")
@click.option("--member", default=None, help="Gate only this member of the family.")
@click.option("--suite", default=None, help="Suite name or YAML file (default: the policy's suite).")
@click.option("--policy", "policy_path", default=None, type=click.Path(dir_okay=False),
              help="Policy file (default: policies/<family>.yaml over policies/default.yaml).")
@click.option("--db", default=None, help="Database URL or SQLite path (default: $QGATE_DB or ./qgate.db).")
@click.option("--backend", default=None, help="Quantization backend (default: the best for the device).")
@click.option("--limit", type=int, default=None, help="At most N samples per task (caps the suite's limits).")
@click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: in this process; ray: each member x format a Ray task (results meet in --db).")
@click.option("--ray-address", default=None,
              help="Ray cluster to run on with --executor ray (default: $RAY_ADDRESS, else a local one).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--junit", "junit", type=click.Path(dir_okay=False), default=None,
              help="Write JUnit XML: one test case per member x format x task.")
@click.option("--candidate", "candidates", multiple=True, metavar="NAME=PATH",
              help="Also gate a quantized checkpoint (compressed-tensors directory or hub id) as candidate NAME "
                   "(repeatable; alone, only these are gated).")
@click.option("--report/--no-report", default=True, help="Render the HTML report at the end (default: on).")
@click.option("-o", "--output", "report_output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the HTML report (default: reports/<family>-<run>.html).")
def run_cmd(family, model, revision, include_path, formats, member, suite, policy_path, db, backend, limit, device,
            executor, ray_address, as_json, junit, report, report_output, candidates):
    """Quantize, evaluate baseline and candidates, apply the policy, record and report the decision.

    Results are stored by content hash: a re-run with the same inputs evaluates nothing again, and
    a run that was killed resumes where it stopped. Progress goes to stderr, the summary to stdout.
    """

    def _terminated(signum, frame):  # CI cancels with SIGTERM: record the run as interrupted, like Ctrl-C
        raise KeyboardInterrupt

    if model is not None:
        from qgate.hub import check_model

        check_model(model, revision)  # an uncached hub model offline fails before the gate's modules load
    from qgate.gate import run_gate
    from qgate.summary import append_step_summary, console_text, junit_xml, markdown

    signal.signal(signal.SIGTERM, _terminated)
    try:
        result = run_gate(family, list(formats) or None, member=member, suite=suite, policy=policy_path, db=db,
                          backend=backend, limit=limit, device=device, report=report, report_path=report_output,
                          model=model, revision=revision, include_path=include_path,
                          candidates=[parse_candidate_option(c) for c in candidates],
                          executor=executor, ray_address=ray_address)
    except KeyboardInterrupt:
        click.echo("qgate: interrupted; the evaluations stored so far are reused by the next run", err=True)
        sys.exit(130)
    data = result.to_dict()
    click.echo(json.dumps(data, indent=2) if as_json else console_text(data))
    if junit:
        with open(junit, "w", encoding="utf-8") as fh:
            fh.write(junit_xml(data))
    append_step_summary(markdown(data))
    sys.exit(result.exit_code)


@cli.group("policy")
def policy_group():
    """Policy files: check one, show a family's thresholds, diff two versions, re-decide a stored run."""


@policy_group.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def policy_check_cmd(files):
    """Validate policy FILES: one line per problem (file:line: key: what), exit 2 if any."""
    for path in files:
        policy = load_policy(path, suite_tasks=suite_task_names)
        click.echo(f"{path}: ok ({policy.family}: {len(policy.members)} member(s), "
                   f"{len(policy.formats)} format(s), fallback {[c.format for c in policy.fallback]}, "
                   f"{len(policy.tasks)} task threshold(s), hash {policy.hash[:12]})")


@policy_group.command("show")
@click.argument("family")
@click.option("--policy", "policy_path", default=None, type=click.Path(dir_okay=False),
              help="A policy file instead of policies/<family>.yaml.")
@click.option("--suite", "suite_name", default=None, help="Size the table for this suite (default: the policy's).")
@click.option("--json", "as_json", is_flag=True, help="Print the effective policy as JSON.")
def policy_show_cmd(family, policy_path, suite_name, as_json):
    """Print FAMILY's thresholds per task of its suite as a table (for policy-file reviews), with each task's
    sample count and the smallest drop that count can detect."""
    policy = load_policy(policy_path or family, suite_tasks=suite_task_names)
    if as_json:
        click.echo(json.dumps(dict(policy.to_dict(), hash=policy.hash, path=policy.path), indent=2))
        return
    if suite_name:
        suite = load_suite(suite_name)  # named on the command line: a bad name is an error
    else:
        try:
            suite = load_suite(policy.suite)
        except QgateError:
            suite = None
    click.echo(policy_table(policy, suite))


POLICY_DIFF_EXIT_CODES = """\b
Exit codes:
  0  no stored decision would flip under NEW
  1  some stored decision (or gate outcome) would flip
  2  bad input: a malformed policy, a missing file or git revision
"""


@policy_group.command("diff", epilog=POLICY_DIFF_EXIT_CODES)
@click.argument("old")
@click.argument("new")
@click.option("--db", default=None, help="Database URL or SQLite path (default: $QGATE_DB or ./qgate.db).")
@click.option("--json", "as_json", is_flag=True, help="Print the review as JSON.")
def policy_diff_cmd(old, new, db, as_json):
    """What changing policy OLD into NEW changes: settings in words, and stored decisions re-decided
    under NEW from stored per-sample results (no model is loaded). OLD and NEW are files or REV:path
    (read with git show, e.g. main:policies/smollm2.yaml). Markdown goes to $GITHUB_STEP_SUMMARY when set."""
    from qgate.review.output import review_markdown, review_text
    from qgate.review.redecide import diff
    from qgate.summary import append_step_summary

    review = diff(old, new, db)
    click.echo(json.dumps(review.to_dict(), indent=2) if as_json else review_text(review))
    append_step_summary(review_markdown(review))
    sys.exit(review.exit_code)


@policy_group.command("redecide")
@click.argument("run")
@click.option("--policy", "policy_spec", required=True, help="Policy file (or REV:path) to decide the run under.")
@click.option("--db", default=None, help="Database URL or SQLite path (default: $QGATE_DB or ./qgate.db).")
@click.option("--json", "as_json", is_flag=True, help="Print the new decision set as JSON.")
def policy_redecide_cmd(run, policy_spec, db, as_json):
    """Decide stored RUN (a number or 'latest') again under another policy, from its stored samples, and
    record it as a new decision set; earlier sets stay and the report shows them as history."""
    from qgate.review.redecide import redecide

    result = redecide(run, policy_spec, db)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.text())


@cli.command("quantize")
@click.option("--family", default="smollm2", show_default=True, help="Model family.")
@click.option("--member", default=None, help="Family member (default: the family's default).")
@click.option("--model", "--model-path", "model_path", default=None, metavar="ID_OR_PATH",
              help="A hub id, model directory or .gguf file instead of the family's checkpoint (--model-path: the same).")
@click.option("--revision", default=None, help="Hub revision of --model (branch, tag or commit).")
@click.option("--format", "fmt", required=True, help="Candidate format ($candidate in the recipe), e.g. nvfp4.")
@click.option("--recipe", default="uniform", show_default=True, help="Built-in recipe (uniform, uniform-all, mixed-fp4) or a .yaml file.")
@click.option("--backend", default=None, help="Quantization backend (default: the best for the device).")
@click.option("--promote", default=None, metavar="FORMAT@BOUND", help="Promote blocks with relative error above BOUND to FORMAT, e.g. mxfp8_e4m3@0.3.")
@click.option("--act-quant", default=None, is_flag=False, flag_value="weight", metavar="[FORMAT]",
              help="Also quantize the inputs of quantized Linears (alone: each weight's own format).")
@click.option("--kv-quant", default=None, metavar="FORMAT", help="Also quantize keys (after RoPE) and values in the KV cache.")
@click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
@click.option("--docs", type=click.IntRange(min=1), default=None,
              help="At most N documents of the perplexity task (default: all of the smoke suite's).")
@click.option("--json", "as_json", is_flag=True, help="Print statistics and perplexities as JSON.")
def quantize_cmd(family, member, model_path, revision, fmt, recipe, backend, promote, act_quant, kv_quant, device,
                 docs, as_json):
    """Quantize a family member in memory; print the per-tensor log and perplexity before and after. Stores nothing."""
    from qgate.ppl_check import quantize_and_check

    act = True if act_quant == "weight" else (act_quant or False)
    result, check = quantize_and_check(
        family, member, fmt, recipe, model_path=model_path, revision=revision, backend=backend, promote=promote,
        act_quant=act, kv_quant=kv_quant, device=device, docs=docs, progress=not as_json,
    )
    if as_json:
        payload = {"summary": result.summary(), "config": result.config(), "check": check,
                   "tensors": [t.to_dict() for t in result.tensors]}
        click.echo(json.dumps(payload, indent=2))
        return
    for line in result.log_lines():
        click.echo(line)
    click.echo(
        f"perplexity {check['perplexity_before']:.3f} -> {check['perplexity_after']:.3f} "
        f"({100 * check['perplexity_change']:+.2f}%, {check['metric']}, task {check['task']}) on "
        f"{check['documents']} documents of {check['data']}"
    )


@cli.command("export-checkpoint")
@click.option("--family", default="smollm2", show_default=True, help="Model family.")
@click.option("--member", default=None, help="Family member (default: the family's default).")
@click.option("--model-path", default=None, type=click.Path(), help="Local model directory or .gguf file instead of the registered checkpoint.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--format", "fmt", required=True, help="Format ($candidate in the recipe): nvfp4, mxfp4, mxfp6_e2m3, mxfp8_e4m3 (and _rceil), fp8, fp8_channel.")
@click.option("--recipe", default="uniform", show_default=True, help="Built-in recipe or a .yaml file.")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False), help="New or empty directory to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the written tensors and quantization_config as JSON.")
def export_checkpoint_cmd(family, member, model_path, revision, fmt, recipe, output, as_json):
    """Write a compressed-tensors checkpoint of the fake-quantized model (loads in vLLM and transformers)."""
    from qgate.checkpoint_export import export_checkpoint

    result = export_checkpoint(output, fmt, recipe, family=family, member=member, model_path=model_path,
                               revision=revision, progress=not as_json)
    if as_json:
        click.echo(json.dumps({"directory": str(result.directory), "quantization_config": result.quantization_config,
                               "tensors": [vars(t) for t in result.tensors]}, indent=2))
        return
    formats = sorted({t.compression for t in result.tensors})
    click.echo(f"wrote {result.directory}: {len(result.tensors)} tensors in {', '.join(formats)} "
               f"(compressed-tensors {result.quantization_config.get('version', '?')})")


@cli.command("footprint")
@click.option("--model", "model", required=True, metavar="ID|DIR|config.json",
              help="Hub id, model directory, config.json, .gguf file or family[/member].")
@click.option("--format", "fmt", required=True, help="Format ($candidate in the recipe); bf16 for the baseline.")
@click.option("--recipe", default="uniform", show_default=True, help="Built-in recipe (uniform, uniform-all, mixed-fp4) or a .yaml file.")
@click.option("--bandwidth", default=None, metavar="BYTES_PER_S",
              help="Memory bandwidth for the decode roofline, e.g. 3.35e12 or 4.8TB/s (default: H100 SXM, 3.35e12).")
@click.option("--revision", default=None, help="Hub revision of the config.")
@click.option("--json", "as_json", is_flag=True, help="Print an object with total_bytes, groups, tokens_per_s.")
def footprint_cmd(model, fmt, recipe, bandwidth, revision, as_json):
    """Parameters and bytes per tensor group from the config alone (meta device), and the decode roofline."""
    result = footprint(model, fmt, recipe, bandwidth=parse_bandwidth(bandwidth), revision=revision)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    for line in result.table_lines():
        click.echo(line)

def _bench_module(name: str):
    """bench/<name>.py of the source checkout qgate runs from (benchmarks are not packaged)."""

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not path.is_file():
        raise QgateError(f"{path}: not found; benchmarks run from a source checkout of qgate")
    spec = importlib.util.spec_from_file_location(f"qgate_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@cli.group("bench")
def bench_group():
    """Benchmarks (bench/ of a source checkout)."""


@bench_group.command("kernels")
@click.option("--size-mib", type=click.IntRange(min=1), default=512, show_default=True, help="Size of the bf16 test tensor.")
@click.option("--formats", default="", help="Comma-separated formats (default: every quantized format).")
@click.option("--peers/--no-peers", default=True, help="Also time torchao and microxcaling where installed.")
@click.option("--mx-path", default=None, type=click.Path(file_okay=False), help="Folder holding microxcaling's `mx` package.")
@click.option("--model", is_flag=True, help="Add the whole-model figure (random Qwen2.5-7B-shaped weights on the GPU).")
@click.option("--json-file", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write every number here.")
@click.option("--sweep", is_flag=True, help="First choose this GPU's tile shapes by a measured sweep (cached per device name).")
@click.option("--rep-ms", type=click.IntRange(min=1), default=200, show_default=True, help="Timing window per measurement.")
@click.option("--budget-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peers not started within this many seconds are listed as skipped.")
def bench_kernels_cmd(size_mib, formats, peers, mx_path, model, json_path, sweep, rep_ms, budget_s):
    """Fake-quantization kernels vs a device copy and peers on one CUDA GPU: GB/s, % of copy, speedups."""
    bench = _bench_module("kernels")
    names = tuple(get_format(f.strip()).name for f in formats.split(",") if f.strip()) or None
    deadline = time.monotonic() + budget_s if budget_s else None
    res = bench.run(size_mib, names, peers, mx_path, rep_ms=rep_ms, deadline=deadline, sweep=sweep)
    if model:
        res.model = bench.model_figure()
    if json_path:
    
        Path(json_path).write_text(json.dumps(bench.to_json(res), indent=2))
    click.echo(bench.format_table(res))


@bench_group.command("eval")
@click.option("--suite", default="smoke", show_default=True, help="Suite whose task definitions and limits are used.")
@click.option("--tasks", default="mmlu,gsm_symbolic", show_default=True, help="Comma-separated suite tasks.")
@click.option("--limit", "limits", multiple=True, help="TASK=N samples (repeatable; default: the suite's limit).")
@click.option("--size", type=click.Choice(["smoke", "standard"]), default="smoke", show_default=True,
              help="smoke: the suite's limits; standard: mmlu=570 (10 per subject), gsm_symbolic=64.")
@click.option("--stock", default=None, help="Stock HFLM batch sizes to compare with (default: 1,16 on the CPU, "
              "1,16,auto on a GPU).")
@click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
@click.option("--requests", "requests_path", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Answer the requests saved in this JSON file instead of running the suite's tasks.")
@click.option("--save-requests", "save_path", default=None, type=click.Path(dir_okay=False),
              help="Only write the suite tasks' requests to this JSON file.")
@click.option("--random-model", type=click.Choice(["qwen2.5-1.5b"]), default=None,
              help="Random weights of this configuration (throughput only; needs --tokenizer qwen).")
@click.option("--tokenizer", type=click.Choice(["model", "qwen"]), default=None,
              help="The model's own (default), or Qwen2.5's (the default with a random model).")
@click.option("--decode", type=click.Choice(["exact", "batched"]), default=None,
              help="FastLM's decoding (default: exact on the CPU, batched on a GPU).")
@click.option("--min-fill", type=click.FloatRange(0.0, 1.0), default=None,
              help="FastLM: a padded batch takes rows of at least this fraction of its longest "
                   "(default 0.8 on the CPU, 0.4 on a GPU).")
@click.option("--decode-graph/--no-decode-graph", default=None,
              help="FastLM's fixed-shape batched decode step, a CUDA graph on a GPU (default: on a GPU).")
@click.option("--profile/--no-profile", default=None,
              help="Time FastLM's phases (default: on the CPU; on a GPU it adds synchronizes).")
@click.option("--trace", "trace_dir", default=None, type=click.Path(file_okay=False),
              help="Profile FastLM's runs with torch.profiler: an operator table per task in this folder.")
@click.option("--json-file", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write every number here.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Also write every number to a timestamped JSON file in this folder.")
def bench_eval_cmd(suite, tasks, limits, size, stock, device, requests_path, save_path, random_model, tokenizer, decode,
                   min_fill, decode_graph, profile, trace_dir, json_path, out_dir):
    """qgate's FastLM vs lm-eval's stock hf model (batch sizes 1, 16, auto) on the same requests: time, identity."""
    argv = ["--suite", suite, "--tasks", tasks, "--size", size]
    for item in (stock or "").split(","):
        if stock is not None and not (item.strip().isdigit() and int(item) > 0) and item.strip() != "auto":
            raise QgateError(f"--stock {stock!r}: expected batch sizes (positive integers or auto), e.g. 1,16,auto")
    for item in limits:
        if "=" not in item or not item.partition("=")[2].isdigit():
            raise QgateError(f"--limit {item!r}: expected TASK=N, e.g. mmlu=40")
        argv += ["--limit", item]
    for flag, value in (("--device", device), ("--requests", requests_path), ("--save-requests", save_path),
                        ("--random-model", random_model), ("--tokenizer", tokenizer), ("--decode", decode),
                        ("--json", json_path), ("--min-fill", min_fill), ("--trace", trace_dir),
                        ("--stock", stock), ("--out", out_dir)):
        if value is not None:
            argv += [flag, str(value)]
    for name, value in (("decode-graph", decode_graph), ("profile", profile)):
        if value is not None:
            argv.append(f"--{name}" if value else f"--no-{name}")
    code = _bench_module("eval").main(argv)
    if code:
        sys.exit(code)


@cli.command("eval")
@click.option("--family", default="smollm2", show_default=True, help="Model family.")
@click.option("--model", "model", default=None, metavar="ID_OR_PATH", help=MODEL_HELP)
@click.option("--revision", default=None, help="Hub revision of --model (branch, tag or commit).")
@click.option("--include-path", "include_path", default=None, type=click.Path(file_okay=False),
              help="A folder of your own lm-eval task YAML files (for the suite's tasks and --tasks).")
@click.option("--member", default=None, help="Family member (default: the family's default member).")
@click.option("--format", "fmt", default=None, help="Fake-quantize into this format first (default: bf16 = none).")
@click.option("--suite", default="smoke", show_default=True, help="Suite name (smoke, standard, full) or YAML file.")
@click.option("--limit", type=int, default=None, help="At most N samples per task (overrides the suite's limits).")
@click.option("--tasks", default=None,
              help="Comma-separated tasks: the suite's, or any lm-eval task (registry or --include-path).")
@click.option("--max-batch", type=int, default=None,
              help="At most N sequences per forward pass (default: the evaluation adapter's own, 32).")
@click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print every task result (with all samples) as JSON on stdout.")
@click.option("--json-file", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every task result (with all samples) to this JSON file.")
def eval_cmd(family, model, revision, include_path, member, fmt, suite, limit, tasks, max_batch, device, as_json,
             json_path):
    """Evaluate a model (optionally fake-quantized) on a suite and print task, metric, value, stderr, n."""
    spec = load_suite(suite, include_path=include_path)
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else spec.task_names()
    selected = select_tasks(spec, names, include_path)
    if limit is not None and limit <= 0:
        raise QgateError(f"--limit: expected a positive integer, got {limit}")
    check_hub_data(selected)  # offline and not cached: one line now, not minutes of retries after the model loads
    if fmt is not None:
        fmt = get_format(fmt).name
    if model is not None:
        from qgate.hub import check_model

        check_model(model, revision)  # before torch loads: an uncached hub model offline fails at once
    from qgate.models import load, load_member, resolve_model

    bar = Progress(total=len(selected), label="qgate")
    if model is not None:
        loaded = load_member(resolve_model(model, revision), device=device, progress=bar.bar)
    else:
        loaded = load(family, member, device=device, progress=bar.bar)
    bar.note(f"model: {loaded.spec.describe()} ({loaded.checkpoint_hash[:19]}), {loaded.device}, {loaded.dtype}")
    if fmt and fmt != "bf16":
        from qgate.quantize import quantize_model

        quantize_model(loaded.model, fmt, progress=bar.bar)
        bar.note(f"fake-quantized into {fmt}")
    lm = make_lm(loaded.model, loaded.tokenizer, max_batch=max_batch)
    results = []
    with bar:
        for task in selected:
            started = time.time()
            bar.show(f"{task.name}: evaluating")
            results.append(evaluate_task(loaded.model, loaded.tokenizer, task, limit=limit, lm=lm, progress=bar))
            r = results[-1]
            bar.step(f"{task.name}: {r.primary_metric}={r.value if r.value is not None else float('nan'):.4f} "
                     f"n={r.n} ({time.time() - started:.1f}s)")
    payload = json.dumps([r.to_dict() for r in results], indent=1, allow_nan=False)
    if json_path:
        Path(json_path).write_text(payload)
    if as_json:
        click.echo(payload)
    else:
        print_results_table(results)


def main():  # console-script entry point
    cli(prog_name="qgate")


if __name__ == "__main__":
    sys.exit(main())
