"""FastLM's loglikelihood work outside the model, on the CPU: the saved requests answered by a tiny Qwen2
model with Qwen2.5's real vocabulary (its forward costs almost nothing), under cProfile.

    python bench/ll_overhead.py                      # .cache/eval-requests-standard.json, task mmlu
    python bench/ll_overhead.py --batch-tokens 131072 --max-batch 512 --top 30

The requests file and the offline Qwen2.5 tokenizer come from bench/eval.py (--save-requests, qwen_tokenizer).
Prints the machine load, FastLM's phases and counters, and the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval import REPO, load_requests, qwen_tokenizer  # noqa: E402


def tiny_qwen(vocab_size: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=Path, default=REPO / ".cache" / "eval-requests-standard.json")
    ap.add_argument("--task", default="mmlu")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    if not args.requests.is_file():
        print(f"--requests {args.requests}: no such file (write it with bench/eval.py --save-requests)",
              file=sys.stderr)
        return 2
    from qgate.evaluation.fast_lm import FastLM

    torch.set_num_threads(1)
    tokenizer = qwen_tokenizer()
    requests = load_requests(args.requests)[args.task]
    lm = FastLM(tiny_qwen(151936), tokenizer, batch_tokens=args.batch_tokens, max_batch=args.max_batch,
                decision_margin=0, profile=True)
    print(f"load before: {os.getloadavg()}")
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    lm.loglikelihood(requests, disable_tqdm=True)
    profiler.disable()
    print(f"wall {time.perf_counter() - started:.2f} s; load after: {os.getloadavg()}")
    print("phases:", {k: round(v, 3) for k, v in lm.phases.items()})
    print("stats:", lm.stats)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
