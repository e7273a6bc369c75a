"""SQNR and perplexity of qgate's round-to-nearest emulations and of quantized checkpoints, on one baseline.

    python bench/ckpt_measure.py --formats mxfp4,nvfp4,mxfp4@rot32 --checkpoint NAME=DIR ... [--docs N] [--json out.json]

FORMAT@rotN is the format under the uniform recipe with qgate's block-wise Hadamard rotation of block N.

Perplexity is the smoke suite's `perplexity` task (the gate's and `qgate quantize`'s), on the same documents
for every row. SQNR is over the decoder blocks' linear weights against the baseline's (signal and noise
energies summed over tensors, as `qgate quantize` reports it). A checkpoint is dequantized by
compressed-tensors (qgate.checkpoints.load_candidate); a rotated checkpoint's weights live in the rotated
basis, so its weight SQNR is not comparable and is left out (its perplexity is).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def _sqnr(base: dict, model) -> float | None:
    import torch

    signal = noise = 0.0
    for name, p in model.named_parameters():
        if ".layers." not in name or p.dim() != 2 or name not in base or base[name].shape != p.shape:
            continue
        b = base[name].float()
        if torch.equal(b, p.data.float()):
            continue
        signal += float(b.square().sum(dtype=torch.float64))
        noise += float((p.data.float() - b).square().sum(dtype=torch.float64))
    return 10 * math.log10(signal / noise) if noise > 0 else None


def main(argv=None) -> int:
    import torch

    from qgate.checkpoints import CheckpointCandidate, load_candidate, resolve_candidate
    from qgate.evaluation.runner import evaluate_task
    from qgate.models import load
    from qgate.ppl_check import perplexity_task
    from qgate.quantize import quantize_model
    from qgate.recipes import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="smollm2")
    ap.add_argument("--formats", default="mxfp4,nvfp4")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-baseline", action="store_true", help="Skip the baseline's perplexity (measured before).")
    args = ap.parse_args(argv)
    task = perplexity_task()
    rows = []

    def ppl(model, tokenizer) -> float:
        return evaluate_task(model, tokenizer, task, limit=args.docs).value

    loaded = load(args.family, device="cpu", dtype="float32", progress=False)
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    if not args.no_baseline:
        t = time.time()
        rows.append({"name": "baseline", "sqnr_db": None, "perplexity": ppl(loaded.model, loaded.tokenizer),
                     "seconds": round(time.time() - t, 1)})
        print(rows[-1], file=sys.stderr, flush=True)
    for fmt in [f for f in args.formats.split(",") if f]:
        loaded.model.load_state_dict(base, strict=False)
        t = time.time()
        name, _, rot = fmt.partition("@rot")
        recipe = load_recipe("uniform") if not rot else load_recipe(
            {"name": f"uniform-rot{rot}", "rules": [r.to_dict() for r in load_recipe("uniform").rules],
             "rotation": int(rot)})
        result = quantize_model(loaded.model, name, recipe, progress=False)
        rows.append({"name": f"{name} RTN{' + rotation ' + rot if rot else ''} (qgate)", "sqnr_db": result.summary()["sqnr_db"],
                     "perplexity": ppl(loaded.model, loaded.tokenizer), "seconds": round(time.time() - t, 1)})
        print(rows[-1], file=sys.stderr, flush=True)
    loaded.model.load_state_dict(base, strict=False)
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        resolved = resolve_candidate(CheckpointCandidate(name, path))
        t = time.time()
        model, tokenizer = load_candidate(resolved, "cpu", torch.float32, progress=False)
        rotated = bool(resolved.quantization_config.get("transform_config"))
        rows.append({"name": name, "scheme": resolved.scheme_text(), "rotated": rotated,
                     "sqnr_db": None if rotated else _sqnr(base, model),
                     "perplexity": ppl(model, tokenizer), "seconds": round(time.time() - t, 1)})
        print(rows[-1], file=sys.stderr, flush=True)
        del model
    docs = args.docs or "all"
    print(f"perplexity: smoke/{task.name} ({task.metric}), documents: {docs}")
    for r in rows:
        sq = f"{r['sqnr_db']:.2f} dB" if r.get("sqnr_db") is not None else "-"
        print(f"{r['name']:<28} SQNR {sq:>9}  perplexity {r['perplexity']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
