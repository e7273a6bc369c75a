"""Produce ModelOpt (NVIDIA TensorRT Model Optimizer) checkpoints, as a separate program in its own environment.

nvidia-modelopt quantizes a transformers model in place and writes a "unified HF checkpoint"
(`export_hf_checkpoint`: config.json with quantization_config.quant_method "modelopt", hf_quant_config.json,
packed weights), the format vLLM, SGLang and TensorRT-LLM load. It runs on the CPU, but it pins its own
transformers range, so it lives in a venv of its own and only writes checkpoints that qgate then gates:

    python3 -m venv /tmp/modelopt-venv && . /tmp/modelopt-venv/bin/activate
    pip install torch==2.13.0 nvidia-modelopt==0.47.0 transformers==5.17.0 accelerate requests
    python bench/modelopt_produce.py fixture tests/data/modelopt      # the tiny committed fixture (CI)
    python bench/modelopt_produce.py model --model DIR --config W4A16_NVFP4_CFG --out OUT

`fixture` quantizes the tiny random Qwen2 of bench/llmc_produce.py (tiny_qwen2: weights from torch's generator
alone, so qgate's tests rebuild the same baseline) with two of ModelOpt's preset configs: W4A16_NVFP4_CFG
(NVFP4 weights, quant_algo W4A16_NVFP4) and FP8_DEFAULT_CFG (FP8 per-tensor weights and static per-tensor FP8
activations, quant_algo FP8). Calibration (the activation ranges FP8 needs; max calibration, no weight
search) runs on 8 generated sequences of 64 random byte tokens (seeded), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

FIXTURE_CONFIGS = ("W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG")
CALIBRATION_SEED = 1


def _llmc_produce():
    """bench/llmc_produce.py, for tiny_qwen2 and the byte tokenizer (it imports only torch and transformers)."""
    spec = importlib.util.spec_from_file_location("llmc_produce", Path(__file__).with_name("llmc_produce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def produce(model, tokenizer, config_name: str, out: Path, calibration, source_label: str) -> None:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    def forward_loop(m):
        with torch.no_grad():
            for ids in calibration:
                m(ids)

    mtq.quantize(model, getattr(mtq, config_name), forward_loop)
    export_hf_checkpoint(model, export_dir=out)
    tokenizer.save_pretrained(out)
    (out / "qgate-producer.json").write_text(json.dumps(
        {"tool": "nvidia-modelopt", "version": _version("nvidia-modelopt"), "transformers": _version("transformers"),
         "torch": _version("torch"), "config": config_name,
         "calibration": {"sequences": len(calibration), "tokens": int(calibration[0].shape[-1]),
                         "source": f"random token ids, torch seed {CALIBRATION_SEED}"},
         "source": source_label}, indent=1) + "\n")


def _random_calibration(vocab: int, n: int = 8, length: int = 64):
    import torch

    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(n)]


def fixture(out_root: Path) -> None:
    llmc = _llmc_produce()
    out_root.mkdir(parents=True, exist_ok=True)
    for config_name in FIXTURE_CONFIGS:
        model = llmc.tiny_qwen2()
        # ModelOpt's export reads the architecture from the config, which from_config leaves empty
        model.config.architectures = [type(model).__name__]
        folder = out_root / f"tiny-qwen2-{config_name.removesuffix('_CFG').lower()}"
        produce(model, llmc.byte_tokenizer(), config_name, folder, _random_calibration(model.config.vocab_size),
                f"tiny_qwen2() of bench/llmc_produce.py (seed {llmc.FIXTURE_SEED})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture", help="the tiny committed fixture")
    f.add_argument("out", type=Path)
    m = sub.add_parser("model", help="one ModelOpt preset config on a saved model")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--config", required=True, help="a modelopt.torch.quantization preset, e.g. W4A16_NVFP4_CFG")
    m.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "fixture":
        fixture(args.out)
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        produce(model, AutoTokenizer.from_pretrained(args.model), args.config, args.out,
                _random_calibration(model.config.vocab_size), str(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
