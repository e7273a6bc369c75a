"""FastLM's GPU loglikelihood batch: sized from free memory and the model's shape (pure arithmetic)."""

from __future__ import annotations

from types import SimpleNamespace

from qgate.evaluation import batch_budget as bb

GIB = 1 << 30
# Qwen2.5-1.5B and a 72B-size config, bf16
SMALL = bb.ModelShape(hidden=1536, intermediate=8960, layers=28, kv_width=2 * 128, dtype_bytes=2)
LARGE = bb.ModelShape(hidden=8192, intermediate=29568, layers=80, kv_width=8 * 128, dtype_bytes=2)


def test_per_token_cost_counts_one_layers_activations_and_every_layers_kv():
    act = 4 * 1536 + 2 * 256 + 3 * 8960 + 8 * 1536
    kv = 5 * 28 * 2 * 256
    assert bb.bytes_per_token(SMALL) == (act + kv) * 2
    # float32 doubles it; more layers add only KV
    assert bb.bytes_per_token(bb.ModelShape(1536, 8960, 28, 256, 4)) == 2 * bb.bytes_per_token(SMALL)
    assert bb.bytes_per_token(bb.ModelShape(1536, 8960, 56, 256, 2)) - bb.bytes_per_token(SMALL) == kv * 2


def test_a_small_model_on_a_big_gpu_gets_the_cap_and_512_rows():
    tokens = bb.gpu_batch_tokens(135 * GIB, SMALL)
    assert tokens == bb.CAP_TOKENS == 131072
    assert bb.gpu_max_batch(tokens) == 512


def test_the_budget_follows_free_memory_and_model_size():
    a = bb.gpu_batch_tokens(8 * GIB, SMALL)
    b = bb.gpu_batch_tokens(16 * GIB, SMALL)
    assert bb.FLOOR_TOKENS < a < b < bb.CAP_TOKENS
    assert a % 4096 == 0 and b % 4096 == 0
    assert a * bb.bytes_per_token(SMALL) <= 8 * GIB * bb.FREE_SHARE  # within a quarter of what is free
    big = bb.gpu_batch_tokens(200 * GIB, LARGE)
    assert bb.FLOOR_TOKENS < big < bb.gpu_batch_tokens(200 * GIB, SMALL)
    assert big * bb.bytes_per_token(LARGE) <= 200 * GIB * bb.FREE_SHARE
    assert bb.gpu_max_batch(big) == big // 256


def test_nearly_no_free_memory_still_gives_the_floor():
    assert bb.gpu_batch_tokens(0, LARGE) == bb.FLOOR_TOKENS
    assert bb.gpu_max_batch(bb.FLOOR_TOKENS) == 32


def test_model_shape_reads_a_transformers_config():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2)
    assert bb.model_shape(config, 2) == SMALL
    # a multimodal config's text part; no intermediate size given: 4 x hidden
    outer = SimpleNamespace(text_config=SimpleNamespace(hidden_size=64, num_attention_heads=4, num_hidden_layers=2))
    assert bb.model_shape(outer, 4) == bb.ModelShape(hidden=64, intermediate=256, layers=2, kv_width=64, dtype_bytes=4)
