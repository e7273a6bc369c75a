"""The KV cache's name follows the installed transformers release; nothing qgate passes is deprecated.

Run under the newest supported transformers (the constraints file) by the test command, and under the
lowest supported one by .ci/run (see README, "Supported versions").
"""

from __future__ import annotations

import inspect
import logging
import warnings
from importlib import metadata

import pytest
import torch
from packaging.version import Version

from qgate.hf_cache import RENAMED_IN, cache_argument, output_cache
from qgate.models import build_tiny_model
from qgate.quantize import quantize_model


def test_cache_argument_is_the_name_the_installed_models_declare():
    installed = Version(metadata.version("transformers"))
    expected = "cache" if installed >= RENAMED_IN else "past_key_values"
    assert cache_argument() == expected
    for arch in ("llama", "qwen2"):
        model = build_tiny_model(arch, seed=0)
        assert expected in inspect.signature(model.forward).parameters, (arch, str(installed))
        assert expected in inspect.signature(model.model.forward).parameters, (arch, str(installed))


@pytest.fixture
def transformers_log(caplog):
    caplog.set_level(logging.WARNING, logger="transformers")
    return caplog


def test_kv_quantization_and_fast_lm_use_no_deprecated_argument(transformers_log):
    from lm_eval.api.instance import Instance

    from qgate.evaluation.fast_lm import FastLM
    from tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = build_tiny_model("qwen2", seed=3, vocab_size=len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (1, 10), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning/DeprecationWarning fails the test
        result = quantize_model(model, "mxfp8_e4m3", kv_quant="mxfp8_e4m3", progress=False)
        with torch.no_grad():
            out = model(ids, use_cache=True)
            keys = output_cache(out).layers[0].keys
            assert torch.equal(keys, __import__("qgate.backends", fromlist=["x"]).fake_quantize(keys, "mxfp8_e4m3"))
        result.remove_hooks()
        lm = FastLM(model, tokenizer)
        req = Instance("generate_until", {}, ("Q: hello?\nA:", {"until": ["\n\n"], "max_gen_toks": 6}), 0)
        lm.generate_until([req], disable_tqdm=True)
        assert lm.stats["decode_steps"] > 0  # FastLM's own decode ran, passing its caches
    deprecated = [r.getMessage() for r in transformers_log.records if "deprecat" in r.getMessage().lower()]
    assert deprecated == []
