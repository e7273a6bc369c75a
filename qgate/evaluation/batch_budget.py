"""How many tokens one loglikelihood forward of FastLM may hold on a GPU: sized from free memory and the model.

A fixed budget is wrong both ways: small enough for a 70B model leaves a 1.5B model's forwards launch-bound
(an H200 scored 5-shot MMLU 1.7x faster with 131,072 tokens per forward than with 32,768), large enough for
a 1.5B model runs a big one out of memory. No torch here: the inputs are plain numbers (pure, testable).
"""

from __future__ import annotations

from dataclasses import dataclass

# Most tokens in one forward: past this a forward is long enough that launches no longer matter.
CAP_TOKENS = 131072
# Fewest: FastLM's CPU default; below this a GPU forward is launch-bound anyway.
FLOOR_TOKENS = 4096
# Share of the free memory a forward's transient memory may take: the rest covers what the estimate
# leaves out (the LM head's float32 log-softmax over 2,048 positions, the attention mask, allocator slack).
FREE_SHARE = 0.25
# Tokens per row the default row cap allows: 32,768 tokens in 128 rows, measured fine on an H100/H200.
TOKENS_PER_ROW = 256
MAX_ROWS = 512


@dataclass(frozen=True)
class ModelShape:
    hidden: int  # hidden size (= attention heads x head dim for the models FastLM batches)
    intermediate: int  # MLP inner width
    layers: int
    kv_width: int  # key/value heads x head dim
    dtype_bytes: int  # bytes per activation value


def model_shape(config, dtype_bytes: int) -> ModelShape:
    """The sizes the budget needs, from a transformers config (a multimodal one's text_config)."""
    config = getattr(config, "text_config", None) or config
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", None) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return ModelShape(hidden=max(hidden, heads * head_dim), intermediate=intermediate,
                      layers=int(config.num_hidden_layers), kv_width=kv_heads * head_dim, dtype_bytes=int(dtype_bytes))


def bytes_per_token(shape: ModelShape) -> int:
    """Transient memory per token of one FastLM loglikelihood forward (no gradients).

    Activations live one layer at a time: residual, normed input and attention output (3 hidden), queries
    and keys/values (hidden + 2 kv_width), the MLP's gate, up and their product (3 intermediate), and keys
    and values expanded to every attention head for SDPA with a mask, over a shared-prefix batch's buffer
    of up to 4 positions per token (8 hidden). The KV caches outlive a layer: the shared-prefix pass keeps
    its cache (1 position per token of budget) while its members run on a buffer of up to 4 (FastLM's
    remainder batches), so 5 positions per token, every layer, keys and values.
    """
    activations = 4 * shape.hidden + 2 * shape.kv_width + 3 * shape.intermediate + 8 * shape.hidden
    kv_cache = 5 * shape.layers * 2 * shape.kv_width
    return (activations + kv_cache) * shape.dtype_bytes


def gpu_batch_tokens(free_bytes: int, shape: ModelShape) -> int:
    """Token budget of one forward: a quarter of the free memory over the per-token cost, in steps of 4,096
    tokens, between FLOOR_TOKENS and CAP_TOKENS."""
    tokens = int(FREE_SHARE * free_bytes) // bytes_per_token(shape)
    tokens = tokens // FLOOR_TOKENS * FLOOR_TOKENS
    return max(FLOOR_TOKENS, min(CAP_TOKENS, tokens))


def gpu_max_batch(batch_tokens: int) -> int:
    """Rows per forward / decode step that go with a token budget (128 rows at 32,768 tokens, 512 at most)."""
    return max(32, min(MAX_ROWS, batch_tokens // TOKENS_PER_ROW))
