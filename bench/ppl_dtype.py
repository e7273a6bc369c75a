"""Is a perplexity delta the format's, or the baseline's compute precision's? Per-document answer.

Evaluates one loglikelihood task (default: the suite's perplexity) for the baseline and each format with
the model held in each dtype (e.g. bfloat16 and float32 on a GPU), the weights restored between formats,
and prints per dtype x format the corpus word perplexity and bits per byte, then the documents whose
per-word loglikelihood moves most between baseline and format, in every dtype side by side. A delta that
appears in bfloat16 and vanishes in float32 is the baseline's precision, not the format's.

    python bench/ppl_dtype.py --family qwen2.5-coder --member qwen2.5-coder-0.5b-instruct \
        --suite standard-offline --formats mxfp8_e4m3 nvfp4 --dtypes bfloat16 float32 --out ppl.json

Writes every document's loglikelihood per dtype x format into --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def per_doc(result) -> list[dict]:
    return [{"doc": s["doc_id"], "loglikelihood": s["scores"]["loglikelihood"], "words": s["scores"]["words"],
             "bytes": s["scores"]["bytes"]} for s in result.samples]


def corpus(docs: list[dict]) -> tuple[float, float]:
    ll = sum(d["loglikelihood"] for d in docs)
    return math.exp(-ll / sum(d["words"] for d in docs)), -ll / sum(d["bytes"] for d in docs) / math.log(2)


def main() -> int:
    from qgate.evaluation.runner import evaluate_task
    from qgate.evaluation.suite import load_suite
    from qgate.models import load
    from qgate.quantize import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen2.5-coder")
    ap.add_argument("--member", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--suite", default="standard-offline")
    ap.add_argument("--task", default="perplexity")
    ap.add_argument("--formats", nargs="+", default=["mxfp8_e4m3", "nvfp4"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--device")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--top", type=int, default=6, help="documents shown per format")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    task = load_suite(args.suite).task(args.task)
    results: dict[str, dict[str, list[dict]]] = {}
    for dtype in args.dtypes:
        loaded = load(args.family, args.member, device=args.device, dtype=dtype, progress=False)
        original = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        results[dtype] = {}
        for fmt in ["bf16", *args.formats]:
            loaded.model.load_state_dict(original)
            if fmt != "bf16":
                quantize_model(loaded.model, fmt, progress=False)
            started = time.time()
            docs = per_doc(evaluate_task(loaded.model, loaded.tokenizer, task, limit=args.limit))
            results[dtype][fmt] = docs
            ppl, bpb = corpus(docs)
            print(f"{dtype:9s} {fmt:11s} word perplexity {ppl:9.3f}  bits/byte {bpb:.4f}  "
                  f"({len(docs)} docs, {time.time() - started:.1f} s)", flush=True)
        del loaded, original
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    first = args.dtypes[0]
    for fmt in args.formats:
        base = results[first]["bf16"]
        moved = sorted(range(len(base)), key=lambda i: -abs(
            (results[first][fmt][i]["loglikelihood"] - base[i]["loglikelihood"]) / base[i]["words"]))
        print(f"\n{fmt}: documents moving most in {first} (nats per word, format minus baseline; + = format better)")
        print("doc   words  " + "  ".join(f"{d:>12s}" for d in args.dtypes)
              + "  " + "  ".join(f"base {d:>7s}" for d in args.dtypes[1:]))
        for i in moved[:args.top]:
            deltas = [(results[d][fmt][i]["loglikelihood"] - results[d]["bf16"][i]["loglikelihood"]) / base[i]["words"]
                      for d in args.dtypes]
            base_shift = [(results[d]["bf16"][i]["loglikelihood"] - base[i]["loglikelihood"]) / base[i]["words"]
                          for d in args.dtypes[1:]]
            print(f"{base[i]['doc']:>4} {base[i]['words']:6d}  " + "  ".join(f"{x:+12.3f}" for x in deltas)
                  + "  " + "  ".join(f"{x:+12.3f}" for x in base_shift))
    args.out.write_text(json.dumps({"task": task.name, "suite": args.suite, "member": args.member,
                                    "device": str(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
                                    "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
