"""qgate's FastLM answers what lm-eval's HFLM (batch size 1) answers: same generations, same loglikelihoods.

The reference is always lm-eval's own HFLM on the same model object; nothing here is a stored number.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from qgate.evaluation.fast_lm import FastLM, _one_row_products  # noqa: E402
from tiny import byte_tokenizer  # noqa: E402

LL_TOL = 1e-4


def gen(i, context, until=("\n\n",), max_gen_toks=24, **extra):
    kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0, **extra}
    return Instance("generate_until", {}, (context, kwargs), i, ("t", i, 1))


def ll(i, context, continuation, doc_id):
    return Instance("loglikelihood", {}, (context, continuation), i, ("t", doc_id, 1))


def choice_requests(prefixes, questions, choices):
    """Multiple-choice requests: every question under every shared prefix, one request per choice."""
    reqs = []
    for p, prefix in enumerate(prefixes):
        for q, question in enumerate(questions):
            doc = p * len(questions) + q
            reqs += [ll(len(reqs), prefix + question, c, doc) for c in choices]
    return reqs


def assert_same_loglikelihoods(stock, fast, requests):
    for (a_ll, a_greedy), (b_ll, b_greedy) in zip(stock, fast):
        assert abs(a_ll - b_ll) <= LL_TOL
        assert a_greedy == b_greedy
    by_doc = {}
    for r, a, b in zip(requests, stock, fast):
        by_doc.setdefault(r.doc_id, []).append((a[0], b[0]))
    for pairs in by_doc.values():  # the best choice of every question is the same
        assert max(range(len(pairs)), key=lambda i: pairs[i][0]) == max(range(len(pairs)), key=lambda i: pairs[i][1])


# ------------------------------------------------------------------------------------------------
# the kernel facts exact decoding rests on (this machine's BLAS)


@pytest.mark.parametrize("rows", [2, 5, 16, 33])
@pytest.mark.parametrize("shape,bias", [((1536, 576), False), ((576, 1536), True), ((192, 576), True)])
def test_one_row_products_equal_batch_size_one(rows, shape, bias):
    torch.manual_seed(rows)
    w = torch.randn(*shape) * 0.05
    b = torch.randn(shape[0]) if bias else None
    x = torch.randn(rows, 1, shape[1])
    alone = torch.cat([F.linear(x[i : i + 1], w, b) for i in range(rows)])
    with _one_row_products():
        together = F.linear(x, w, b)
    assert torch.equal(together, alone)


def test_one_row_head_on_a_vocabulary_subset_equals_the_full_head():
    torch.manual_seed(0)
    w = torch.randn(49152, 576) * 0.05
    x = torch.randn(1, 1, 576) * 3
    full = F.linear(x, w)[0, 0]
    for n in (64, 128, 256):
        ids = torch.randperm(w.shape[0])[:n].sort().values
        assert torch.equal(F.linear(x, w[ids])[0, 0], full[ids])


def test_the_first_layer_probe_decides_a_split_prefill_as_the_whole_model_does():
    """SmolLM2's attention and MLP shapes (2 random layers): whether prefilling positions 512.. on the cache
    of the first 512 gives the whole forward's bits depends on the CPU's kernels (on an Intel Xeon with AMX
    the 1536 -> 576 product rounds 57-192 rows differently from more; on an AMD EPYC the attention's query
    blocks decide). FastLM asks the model's first layer; it must answer as the whole model does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qgate.evaluation.fast_lm import _first_layer_body, _split_prefill_matches

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=2, vocab_size=1000, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    probe = _first_layer_body(model.model)
    assert len(probe.layers) == 1 and probe.layers[0] is model.model.layers[0]
    assert len(model.model.layers) == 2 and model.model.config.num_hidden_layers == 2  # the model is untouched
    ids = torch.randint(0, 1000, (1400,)).tolist()
    fast_lm = FastLM(model, byte_tokenizer())
    plain, padded = {}, {}
    for rest in (5, 16, 17, 33, 40, 63, 100, 130, 175, 200, 256, 300, 600):
        tokens = ids[: 512 + rest]
        plain[rest] = _split_prefill_matches(model.model, tokens, 512, "cpu")
        padded[rest] = _split_prefill_matches(model.model, tokens, 512, "cpu", rest_rows=256)
        assert _split_prefill_matches(probe, tokens, 512, "cpu") == plain[rest], rest
        assert _split_prefill_matches(probe, tokens, 512, "cpu", rest_rows=256) == padded[rest], rest
        expected = 0 if plain[rest] and rest >= 16 else 256 if padded[rest] and rest < 256 else None
        assert fast_lm._split_prefill_rows(tokens, 512) == expected, rest
    assert fast_lm._split_prefill_rows(ids[:1000], 512) == fast_lm._split_prefill_rows(ids[1:1001], 512)
    assert fast_lm.stats["split_probes"] == len(plain) + 1  # one probing per (length, cut)
    # both answers occur on every CPU seen: 5 rows round differently everywhere, 256 and more nowhere
    assert not plain[5] and plain[256] and plain[600]
    # padded to 256 rows, a rest's products run in the whole prompt's many-row regime: on the Intel CPU
    # that turns the 63-175-token rests exact; on the AMD one they were already (the query blocks aside)
    assert all(padded[rest] or plain[rest] for rest in (63, 100, 130, 175))


def test_a_prompt_shares_its_prefix_only_where_the_probe_allows_and_another_prompt_uses_it():
    from qgate.evaluation.fast_lm import _Row, _shared_prompt_prefixes

    exemplars = list(range(1100))
    rows = [_Row(i, exemplars + [5000 + i] * n, [], [], 8, 1.0) for i, n in enumerate((40, 60, 90))]
    rows.append(_Row(3, exemplars[:1030] + [6000] * 5, [], [], 8, 1.0))  # 11 tokens after 1024
    rows.append(_Row(4, exemplars + [5004] * 300, [], [], 8, 1.0))
    rows.append(_Row(9, list(range(7000, 7700)), [], [], 8, 1.0))  # shares nothing
    asked = []

    def split_rows(prompt, cut):
        asked.append((len(prompt), cut))
        # this machine's kernels: the 60-token rest never gives the whole forward's bits, 11 tokens padded
        return None if len(prompt) == 1100 + 60 else 256 if len(prompt) - cut < 16 else 0

    users = _shared_prompt_prefixes(rows, split_rows)
    assert [r.shared for r in rows] == [1024, 0, 1024, 1024, 1024, 0]
    assert users == {tuple(exemplars[:1024]): 4}
    assert [r.rest_rows for r in rows] == [0, 0, 0, 256, 0, 0]
    assert sorted(asked) == [(1035, 1024), (1140, 1024), (1160, 1024), (1190, 1024), (1400, 1024)]
    lone = [_Row(i, exemplars + [5000 + i] * 40, [], [], 8, 1.0) for i in range(2)]
    assert _shared_prompt_prefixes(lone, lambda prompt, cut: 0 if prompt[-1] == 5000 else None) == {}
    assert [r.shared for r in lone] == [0, 0]  # a prefix only one prompt may use is not worth a separate run


# ------------------------------------------------------------------------------------------------
# a tiny Qwen2 (q/k/v biases, untied head), byte tokenizer: fast


@pytest.fixture(scope="module")
def tiny():
    from qgate.models import build_tiny_model

    tokenizer = byte_tokenizer()
    model = build_tiny_model("qwen2", seed=5, vocab_size=len(tokenizer))
    return model, tokenizer


PROMPTS = ["Question: what is 2+2?\nAnswer:", "abc", "The quick brown fox jumps over the lazy dog. " * 3,
           "def f(x):\n    return", "Once upon a time", "1, 2, 3, 4,"]


@pytest.mark.parametrize("decode,fixed_shapes", [("exact", False), ("batched", False), ("batched", True)])
def test_tiny_generation_equals_hflm(tiny, decode, fixed_shapes):
    """fixed_shapes: the step a GPU captures as a CUDA graph (all slots, whole buffer, masked), run eagerly."""
    model, tokenizer = tiny
    reqs = [gen(i, p, until=("\n\n", "!"), max_gen_toks=20 + 3 * i) for i, p in enumerate(PROMPTS)]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(reqs, disable_tqdm=True)
    fast_lm = FastLM(model, tokenizer, decode=decode, max_batch=4, decode_graph=fixed_shapes, profile=True)
    fast = fast_lm.generate_until(reqs, disable_tqdm=True)
    assert fast == stock
    # batched decode prefills the prompts waiting for free slots together; exact decode each prompt alone
    assert ("gen prefill (prompts together, batched decode)" in fast_lm.phases) == (decode == "batched")
    assert fast_lm.stats["decode_rows"] > fast_lm.stats["decode_steps"]  # rows really advanced together
    assert fast_lm.stats["hflm_generate"] == 0
    assert fast_lm.stats["fixed_shape_steps"] == (fast_lm.stats["decode_steps"] if fixed_shapes else 0)


def test_exact_decode_prefills_a_shared_prompt_prefix_once_and_equals_hflm():
    """Few-shot prompts sharing ~700 tokens: the first 512 run once, each prompt's rest on their cache."""
    from transformers import AutoModelForCausalLM

    from qgate.models import tiny_config

    tokenizer = byte_tokenizer()
    config = tiny_config("qwen2", vocab_size=len(tokenizer))
    config.max_position_embeddings = 2048
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config).eval()
    shots = "".join(f"Question: what is {a} times {b}?\nAnswer: {a * b}\n\n" for a, b in
                    [(12, 7), (3, 45), (101, 9), (8, 8), (66, 2), (9, 13), (40, 25), (7, 77), (31, 3), (5, 55),
                     (14, 14), (90, 1), (2, 999), (17, 4), (23, 6), (6, 12), (11, 11), (70, 3), (44, 4), (1, 1)])
    questions = ["what is 2 times 21?", "name a prime number above 100 and below 120, please?",
                 "how many legs do three spiders and two cats have together, counting carefully?", "what is 0?",
                 "is the product of two odd numbers odd or even, and why is that always the case for them?"]
    reqs = [gen(i, shots + f"Question: {q}\nAnswer:", until=("\n\n",), max_gen_toks=12 + i)
            for i, q in enumerate(questions)]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(reqs, disable_tqdm=True)
    fast_lm = FastLM(model, tokenizer, profile=True)
    assert fast_lm.decode == "exact"
    texts = fast_lm.generate_until(reqs, disable_tqdm=True)
    seen = (fast_lm.stats, fast_lm._split_verdicts, torch.get_num_threads())  # what a failure reports
    assert texts == stock, seen
    assert fast_lm.stats["shared_prefill_mismatch"] == 0, seen
    assert fast_lm.stats["split_probes"] == len(reqs), seen  # every prompt shares 512 tokens, has more after
    split = [q for q in reqs if fast_lm._split_verdicts[(len(q.args[0]), 512)] is not None]  # a token a byte
    assert len(split) >= 2, seen
    assert fast_lm.stats["shared_prefill_tokens"] == 512 * len(split), seen
    assert "gen prefill (shared prompt prefix, once)" in fast_lm.phases


def test_batched_decode_with_repetition_penalty_equals_hflm(tiny):
    model, tokenizer = tiny
    reqs = [gen(i, p, repetition_penalty=(1.3, 0.8, 1.0, 1.15)[i]) for i, p in enumerate(PROMPTS[:4])]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(reqs, disable_tqdm=True)
    fast_lm = FastLM(model, tokenizer, decode="batched", decode_graph=True, profile=True)
    assert fast_lm.generate_until(reqs, disable_tqdm=True) == stock
    assert "gen prefill (prompts together, batched decode)" in fast_lm.phases
    assert fast_lm.stats["fixed_shape_steps"] == 0  # penalized rows take the plain batched step


def test_repetition_penalty_and_unsupported_settings(tiny):
    model, tokenizer = tiny
    reqs = [gen(0, PROMPTS[0], repetition_penalty=1.3), gen(1, PROMPTS[2], repetition_penalty=0.8),
            gen(2, PROMPTS[3], no_repeat_ngram_size=2)]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(reqs, disable_tqdm=True)
    fast_lm = FastLM(model, tokenizer)
    assert fast_lm.generate_until(reqs, disable_tqdm=True) == stock
    assert fast_lm.stats["hflm_generate"] == 1  # n-gram blocking is left to HFLM itself


def test_tiny_loglikelihood_and_rolling_equal_hflm(tiny):
    model, tokenizer = tiny
    prefix = "Answer the questions.\n\nQ: 1+1?\nA: 2\n\nQ: 2+3?\nA: 5\n\n"
    reqs = choice_requests([prefix, "Other shots.\n\n" * 3], ["Q: 3+4?\nA:", "Q: 9-1?\nA: "], [" 7", " 8", " 12"])
    reqs += [ll(len(reqs), "", "hello world", 99), ll(len(reqs) + 1, "x", " y z", 98)]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    fast_lm = FastLM(model, tokenizer, min_shared_prefix=16)
    assert_same_loglikelihoods(stock.loglikelihood(reqs, disable_tqdm=True),
                               fast_lm.loglikelihood(reqs, disable_tqdm=True), reqs)
    assert fast_lm.stats["shared_prefix_tokens"] > 0  # the shared-prefix path ran

    texts = [Instance("loglikelihood_rolling", {}, (t,), i, ("t", i, 1)) for i, t in enumerate(
        ["short text", "A longer document that needs several windows. " * 4])]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=48)
    fast_lm = FastLM(model, tokenizer, max_length=48)
    for a, b in zip(stock.loglikelihood_rolling(texts, disable_tqdm=True),
                    fast_lm.loglikelihood_rolling(texts, disable_tqdm=True)):
        assert abs(a - b) <= LL_TOL * max(1.0, abs(a)) * 0.1


def test_fuller_padded_batches_answer_the_same(tiny):
    """min_fill (a GPU's default is lower: fewer, more padded forwards) changes the batching, not the answers."""
    model, tokenizer = tiny
    reqs = choice_requests(["Shared instructions for all of the questions.\n\n"],
                           ["Q: 3+4?\nA:", "Q: what is the sum of nine and one, in words?\nA:", "Q: 1?\nA:"],
                           [" 7", " ten", " 12"])
    reqs += [ll(len(reqs), "A context of another length entirely, with no shared prefix at all", " x", 97)]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    tight, full = (FastLM(model, tokenizer, min_shared_prefix=16, min_fill=f) for f in (0.8, 0.0))
    assert_same_loglikelihoods(stock, full.loglikelihood(reqs, disable_tqdm=True), reqs)
    assert_same_loglikelihoods(stock, tight.loglikelihood(reqs, disable_tqdm=True), reqs)
    assert full.stats["forward_tokens"] > tight.stats["forward_tokens"]  # padded into fewer forwards


def test_close_decisions_are_recomputed_as_hflm_does(tiny):
    model, tokenizer = tiny
    reqs = choice_requests(["Pick one.\n\n"], ["Q: a?\nA:", "Q: b?\nA:"], [" x", " y", " z"])
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    fast_lm = FastLM(model, tokenizer, decision_margin=1e9)  # every decision counts as close
    assert fast_lm.loglikelihood(reqs, disable_tqdm=True) == stock  # bit for bit: HFLM's own computation
    assert fast_lm.stats["exact_loglikelihood"] == len(reqs)


def test_models_with_quantization_hooks_are_left_to_hflm():
    """KV-cache quantization with a per-tensor scale (nvfp4) depends on how rows are batched: HFLM decides."""
    from qgate.models import build_tiny_model
    from qgate.quantize import quantize_model

    tokenizer = byte_tokenizer()
    model = build_tiny_model("llama", seed=2, vocab_size=len(tokenizer))
    quantize_model(model, "mxfp8_e4m3", kv_quant="nvfp4", progress=False)
    gens = [gen(i, p, max_gen_toks=12) for i, p in enumerate(PROMPTS[:3])]
    lls = choice_requests(["Shared prefix of the questions. " * 2], ["Q: a?\nA:", "Q: b?\nA:"], [" x", " yy"])
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    fast_lm = FastLM(model, tokenizer, min_shared_prefix=8)
    assert fast_lm.generate_until(gens, disable_tqdm=True) == stock.generate_until(gens, disable_tqdm=True)
    assert fast_lm.loglikelihood(lls, disable_tqdm=True) == stock.loglikelihood(lls, disable_tqdm=True)
    assert fast_lm.stats["hflm_hooked_calls"] == 2 and fast_lm.stats["decode_steps"] == 0


# ------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2():
    from qgate.models import load

    loaded = load(family="smollm2", device="cpu", progress=False)
    return loaded.model, loaded.tokenizer


@pytest.mark.slow
def test_smollm2_generation_identical_to_hflm(smollm2):
    model, tokenizer = smollm2
    shots = "".join(f"Question: What is {a} plus {b}?\nAnswer: {a} plus {b} is {a + b}. #### {a + b}\n\n"
                    for a, b in [(3, 4), (10, 7)])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name three fruits."}], tokenize=False,
                                         add_generation_prompt=True)
    reqs = [gen(0, shots + "Question: What is 6 plus 9?\nAnswer:", until=("Question:", "\n\n"), max_gen_toks=20),
            gen(1, chat, until=("<|im_end|>",), max_gen_toks=20), gen(2, "The capital of France is", until=(".",)),
            gen(3, "def fibonacci(n):", until=("\n\n",), max_gen_toks=20)]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(reqs, disable_tqdm=True)
    fast_lm = FastLM(model, tokenizer)
    assert fast_lm.decode == "exact"
    assert fast_lm.generate_until(reqs, disable_tqdm=True) == stock
    assert fast_lm.stats["decode_rows"] > fast_lm.stats["decode_steps"]


@pytest.mark.slow
def test_smollm2_multiple_choice_identical_to_hflm(smollm2):
    model, tokenizer = smollm2
    shots = ("The following are multiple choice questions (with answers) about arithmetic.\n\n"
             "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\nWhat is 3*3?\nA. 9\nB. 6\nC. 12\nD. 8\nAnswer: A\n\n")
    questions = ["What is 7-5?\nA. 1\nB. 3\nC. 2\nD. 4\nAnswer:", "What is 10/2?\nA. 2\nB. 4\nC. 8\nD. 5\nAnswer:"]
    reqs = choice_requests([shots], questions, [" A", " B", " C", " D"])
    reqs += [ll(len(reqs) + i, "The capital of France is", c, 50) for i, c in enumerate([" Paris", " London.", " a city"])]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    fast_lm = FastLM(model, tokenizer)
    fast = fast_lm.loglikelihood(reqs, disable_tqdm=True)
    assert_same_loglikelihoods(stock, fast, reqs)
    assert fast_lm.stats["shared_prefix_tokens"] > 0


# ------------------------------------------------------------------------------------------------
# the benchmark's plumbing (the benchmark itself runs both LMs for minutes: bench/NOTES-eval.md)


def test_bench_eval_cli_rejects_a_malformed_limit():
    from click.testing import CliRunner

    from qgate.cli import cli

    result = CliRunner().invoke(cli, ["bench", "eval", "--limit", "mmlu40"])
    assert result.exit_code == 2
    assert "mmlu40" in result.output and "TASK=N" in result.output


def test_bench_eval_cli_passes_fastlm_settings_to_the_benchmark(monkeypatch):
    """`qgate bench eval` hands its FastLM settings to bench/eval.py's own argument parser."""
    import types

    from click.testing import CliRunner

    import qgate.cli as cli_module

    seen = []
    monkeypatch.setattr(cli_module, "_bench_module",
                        lambda name: types.SimpleNamespace(main=lambda argv: seen.append((name, argv)) or 0))
    result = CliRunner().invoke(cli_module.cli, ["bench", "eval", "--min-fill", "0.5", "--no-decode-graph",
                                                 "--profile", "--trace", "tr", "--decode", "batched"])
    assert result.exit_code == 0, result.output
    ((name, argv),) = seen
    assert name == "eval"
    for flag, value in (("--min-fill", "0.5"), ("--trace", "tr"), ("--decode", "batched")):
        assert argv[argv.index(flag) + 1] == value
    assert "--no-decode-graph" in argv and "--profile" in argv and "--decode-graph" not in argv
    bad = CliRunner().invoke(cli_module.cli, ["bench", "eval", "--min-fill", "2"])
    assert bad.exit_code == 2 and "--min-fill" in bad.output and len(seen) == 1


def test_bench_saves_the_suite_requests(tmp_path):
    import json

    from qgate.cli import _bench_module

    bench = _bench_module("eval")
    out = tmp_path / "requests.json"
    assert bench.main(["--tasks", "mmlu,gsm_symbolic", "--limit", "mmlu=2", "--limit", "gsm_symbolic=1",
                       "--save-requests", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [r["request_type"] for r in saved["mmlu"]] == ["loglikelihood"] * 8  # 2 questions x 4 choices
    assert [r["args"][1] for r in saved["mmlu"][:4]] == [" A", " B", " C", " D"]
    assert saved["mmlu"][0]["args"][0].startswith("The following are multiple choice questions")
    (gen,) = saved["gsm_symbolic"]
    assert gen["request_type"] == "generate_until" and gen["args"][1]["max_gen_toks"] == 128
    assert "Question:" in gen["args"][1]["until"]
    loaded = bench.load_requests(out)
    assert loaded["mmlu"][5].args == tuple(saved["mmlu"][5]["args"]) and loaded["mmlu"][5].doc_id == saved["mmlu"][5]["doc_id"]


def test_profiled_fastlm_splits_its_time_into_phases_and_answers_the_same(tiny):
    model, tokenizer = tiny
    reqs = choice_requests(["Shared few-shot prefix of the questions. " * 2], ["Q: a?\nA:", "Q: b?\nA:"], [" x", " yy"])
    gens = [gen(i, p, max_gen_toks=10) for i, p in enumerate(PROMPTS[:4])]
    plain, profiled = FastLM(model, tokenizer, min_shared_prefix=8), FastLM(model, tokenizer, min_shared_prefix=8,
                                                                          profile=True, max_batch=3)
    assert plain.phases is None  # off: nothing is timed
    assert profiled.loglikelihood(reqs, disable_tqdm=True) == plain.loglikelihood(reqs, disable_tqdm=True)
    assert profiled.generate_until(gens, disable_tqdm=True) == plain.generate_until(gens, disable_tqdm=True)
    assert plain.phases is None
    phases = profiled.phases
    for name in ("ll batch build", "ll forward (shared prefixes)", "ll forward", "ll cache copies (prefix KV per row)",
                 "ll head + log-softmax", "gen prefill (each prompt alone)", "gen cache copies (prompt KV into its slot)",
                 "gen decode forward (one-row products, per-row attention)", "gen stop checks",
                 "gen head (batched head, bound, one-row recompute of contenders)"):
        assert phases[name] > 0, name
    assert abs(phases["gen prefill (each prompt alone)"] - profiled.stats["prefill_s"]) < 0.05


def test_bench_compares_fastlm_with_every_stock_batch_size(tiny, tmp_path):
    """bench/eval.py on a tiny model: each stock HFLM configuration and FastLM answer the same requests;
    the ratio is taken against the fastest stock configuration; FastLM's phases are recorded."""
    from qgate.cli import _bench_module

    bench = _bench_module("eval")
    model, tokenizer = tiny
    lls = choice_requests(["Shared few-shot prefix of the questions. " * 2], ["Q: a?\nA:", "Q: b?\nA:"], [" x", " yy"])
    gens = [gen(i, p, max_gen_toks=8) for i, p in enumerate(PROMPTS[:3])]
    rows = [bench.bench_task(name, bench.requests_runner(reqs), model, tokenizer, ["1", "2"],
                             {"min_shared_prefix": 8, "profile": True}, None, 64, True, trace=tmp_path)
            for name, reqs in (("mc", lls), ("gen", gens))]
    for name in ("mc", "gen"):  # --trace: torch.profiler's operator table of FastLM's run per task
        assert "aten::" in (tmp_path / f"fastlm-{name}-ops.txt").read_text()
    for row, reqs in zip(rows, (lls, gens)):
        assert [s.batch_size for s in row.stock] == ["1", "2"]
        assert row.requests == len(reqs) and row.identical
        assert all(s.identical_requests == len(reqs) for s in row.stock)
        assert row.best().wall_s == min(s.wall_s for s in row.stock)
        assert row.speedup == pytest.approx(row.best().wall_s / row.fast_s)
        assert row.fast_phases and sum(row.fast_phases.values()) <= row.fast_lm_s + 1e-6
    assert rows[0].stock[0].max_ll_diff <= LL_TOL
    assert rows[1].kind == "generate_until" and rows[1].stock[0].max_ll_diff is None
    data = bench.to_json(rows, {"device": "cpu"})
    assert [r["best_stock"] for r in data["rows"]] == [r.best().batch_size for r in rows]
    table = bench.format_table(rows, {})
    assert "HFLM bs=1 s" in table and "HFLM bs=2 s" in table and "FastLM phases" in table


@pytest.mark.parametrize("bad", ["0", "x", "16,auto:2", "-1"])
def test_bench_rejects_a_stock_batch_size_that_is_not_one(bad):
    from qgate.cli import _bench_module

    with pytest.raises(SystemExit, match="--stock"):
        _bench_module("eval").parse_stock(bad)


def test_bf16_models_score_in_float32_as_hflm_with_a_float32_softmax(tiny):
    """In bf16 a summed loglikelihood rounds to bf16's spacing (a perplexity moves by percents); FastLM
    computes log-probabilities in float32: equal to HFLM(softmax_dtype="float32"), not to HFLM's default."""
    import copy

    model, tokenizer = tiny
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    doc = "A longer document that needs several windows and many tokens to score. " * 6
    texts = [Instance("loglikelihood_rolling", {}, (doc,), 0, ("t", 0, 1))]
    fast = FastLM(model16, tokenizer).loglikelihood_rolling(texts, disable_tqdm=True)[0]
    stock32 = HFLM(pretrained=model16, tokenizer=tokenizer, batch_size=1,
                   softmax_dtype="float32").loglikelihood_rolling(texts, disable_tqdm=True)[0]
    stock16 = HFLM(pretrained=model16, tokenizer=tokenizer, batch_size=1).loglikelihood_rolling(texts, disable_tqdm=True)[0]
    assert abs(fast - stock32) <= 1e-4 * abs(stock32)
    assert torch.tensor(stock16, dtype=torch.bfloat16).item() == stock16  # the default sums in bf16 ...
    assert torch.tensor(fast, dtype=torch.bfloat16).item() != fast  # ... FastLM does not
