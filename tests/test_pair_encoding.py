"""FastLM tokenizes loglikelihood requests in batches, each distinct string once: the ids must be exactly
those lm-eval's own per-request tokenization (TemplateLM.loglikelihood -> _encode_pair -> tok_encode) gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402

from qgate.evaluation import pair_encoding  # noqa: E402
from qgate.evaluation.fast_lm import FastLM  # noqa: E402
from tiny import byte_tokenizer  # noqa: E402

SHOTS = "Answer with a letter.\n\nQ: one?\nA. x\nB. y\nAnswer: A\n\n"
PAIRS = [
    (SHOTS + "Q: two?\nAnswer:", " A"), (SHOTS + "Q: two?\nAnswer:", " B"),  # one context, several choices
    (SHOTS + "Q: three?\nAnswer: ", "C"),  # trailing space moves to the continuation
    ("Tabs and spaces \t ", "end"), ("x", " y z"), ("naïve café —", " ünïcode ✓"),
    ("", "hello world"),  # empty context: the prefix token is the context
    ("<s>already starts with BOS", " text"),  # no second BOS (lm-eval's has_bos_prefix rule)
    ("line\n", "\nnext"), (SHOTS + "Q: two?\nAnswer:", " A"),  # a request asked twice
]


def bos_byte_tokenizer():
    """The byte tokenizer plus a BOS token that encoding prepends (add_special_tokens decides)."""
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def stock_tokenization(lm, pairs):
    """What lm-eval hands to _loglikelihood_tokens, computed by lm-eval's own loglikelihood."""
    seen = {}
    original = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda requests, **kw: seen.setdefault("requests", requests)
    try:
        TemplateLM.loglikelihood(lm, [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                 disable_tqdm=True)
    finally:
        lm._loglikelihood_tokens = original
    return seen["requests"]


@pytest.fixture(scope="module")
def model():
    from qgate.models import build_tiny_model

    return build_tiny_model("qwen2", seed=1, vocab_size=len(byte_tokenizer()) + 1)


@pytest.mark.parametrize("tokenizer,add_bos", [(byte_tokenizer, None), (bos_byte_tokenizer, None),
                                               (bos_byte_tokenizer, False), (byte_tokenizer, True)])
def test_batched_ids_equal_lm_evals_per_request_ids(model, tokenizer, add_bos):
    lm = FastLM(model, tokenizer(), add_bos_token=add_bos)
    assert pair_encoding.reproduces(lm)
    expected = stock_tokenization(lm, PAIRS)
    assert pair_encoding.encode_requests(lm, PAIRS) == expected
    if tokenizer is bos_byte_tokenizer and add_bos is None:  # the rules were exercised, not bypassed
        ctx = {p: c for p, (_, c, _) in zip(PAIRS, expected)}
        assert ctx[PAIRS[0]][0] == lm.tokenizer.bos_token_id
        assert ctx[PAIRS[7]].count(lm.tokenizer.bos_token_id) == 1


def test_an_lm_with_its_own_tokenization_keeps_lm_evals_path(model):
    class Lowercasing(FastLM):
        def tok_encode(self, string, **kw):
            return super().tok_encode(string.lower(), **kw)

    lm = Lowercasing(model, byte_tokenizer())
    assert not pair_encoding.reproduces(lm)
    reqs = [Instance("loglikelihood", {}, ("ABC def", " G"), 0)]
    stock = FastLM(model, byte_tokenizer()).loglikelihood([Instance("loglikelihood", {}, ("abc def", " g"), 0)],
                                                          disable_tqdm=True)
    assert lm.loglikelihood(reqs, disable_tqdm=True) == stock


SAVED = Path(__file__).resolve().parents[1] / ".cache"


@pytest.mark.skipif(not (SAVED / "eval-requests-standard.json").is_file()
                    or not (SAVED / "qwen2.5-tokenizer" / "tokenizer.json").is_file(),
                    reason="saved MMLU requests and the offline Qwen2.5 tokenizer (bench/eval.py) not present")
def test_batched_ids_equal_lm_evals_on_saved_mmlu_requests_with_qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from qgate.models import build_tiny_model

    tokenizer = PreTrainedTokenizerFast.from_pretrained(SAVED / "qwen2.5-tokenizer")
    pairs = [tuple(r["args"]) for r in json.loads((SAVED / "eval-requests-standard.json").read_text())["mmlu"][:200]]
    lm = FastLM(build_tiny_model("qwen2", seed=1, vocab_size=len(tokenizer)), tokenizer)
    assert pair_encoding.encode_requests(lm, pairs) == stock_tokenization(lm, pairs)
