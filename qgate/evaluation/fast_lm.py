"""qgate's lm-eval model: the answers of lm-eval's `hf` model (HFLM at batch size 1), computed faster.

FastLM *is* an HFLM: tokenization of context and continuation (trailing-space handling, add_bos_token,
empty contexts), left truncation, rolling windows, stop sequences, EOS, max_gen_toks, the think-token and
chat-template handling all come from lm-eval's own code. Only the model arithmetic is scheduled differently:

loglikelihood
    Requests with the same model input are scored once. Inputs that share a long token prefix (a subject's
    few-shot exemplars, a question asked with several answers) run the prefix once and the rest on its KV
    cache. Everything else is batched by a token budget, longest first, right-padded (causal attention never
    looks right, so padding changes no real position). The LM head and log-softmax run only on the scored
    positions. Values differ from HFLM's by float rounding (about 1e-5 in float32); wherever rounding could
    change a decision - which choice of a question scores best, whether a continuation is greedy - the
    requests involved are recomputed exactly as HFLM computes them.

loglikelihood_rolling
    HFLM's windows, all batched together.

generate_until
    Greedy decoding of many rows at once, each row finishing on its own (stop sequence, EOS, max_gen_toks)
    and a waiting request taking its place. With ``decode="exact"`` (the default on the CPU) every row
    computes what HFLM at batch size 1 computes, to the bit: its prompt is prefilled alone (a prefix it
    shares with other prompts, such as few-shot exemplars, once for all of them where the kernels give the
    same bits that way, checked at run time); in decode steps
    each matrix product runs as a batch of one-row products (MKL's one-row kernel, not the many-row one,
    whose rounding differs) and attention runs per row on that row's own slot of the KV buffer; the LM head
    runs batched, a rounding-error bound picks the few tokens the one-row head could rank first, and only
    those are recomputed with one-row arithmetic to take the argmax. With ``decode="batched"`` (the default
    elsewhere) rows share one preallocated KV buffer and plain batched products: much faster on a GPU,
    equal up to rounding.

Decode settings HFLM would pass through to ``generate`` and that this module does not implement (sampling,
beams, n-gram blocking, ...) are sent to HFLM itself, so every request is answered either way. So is all
work on a model carrying forward hooks (qgate's activation and KV-cache quantization): a hook may compute
over a whole tensor (one scale for all rows), which a different batching would change.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_eval_utils
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from qgate.evaluation import batch_budget, pair_encoding
from qgate.hf_cache import cache_argument

# Generation-config fields that add logits processors to greedy decoding, with their neutral values.
# repetition_penalty is implemented here; any other active one sends the request to HFLM.
_UNSUPPORTED_GREEDY_SETTINGS = {
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "num_beams": (None, 1),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "assistant_model": (None,),
    "prompt_lookup_num_tokens": (None,),
    "stop_strings": (None,),
    "token_healing": (None, False),
    "max_time": (None,),
}
# gen_kwargs keys a greedy request may carry; sampling-only knobs are inert when do_sample is False
_GREEDY_KWARGS = {"do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty"}

_FP32_UNIT_ROUNDOFF = 2.0**-24
# a batch of right-padded sequences takes only sequences at least this fraction of its longest: padding
# is computed like real tokens (a CPU gains nothing from rows beyond ~1k tokens per forward anyway).
_MIN_FILL = 0.8
# On a GPU a forward of a few thousand tokens costs its launches (tens of ms for a 28-layer HF model), not
# its arithmetic: fewer, fuller forwards win over less padding. The standard MMLU requests (570 questions)
# take 44 forwards (73,760 tokens) at 0.8 and 9 forwards (103,272 tokens) at 0.4.
_MIN_FILL_GPU = 0.4
# Exact decode may prefill a prompt as a prefix shared with other prompts, then its own rest on that prefix's
# cache, only where that gives the bits of the whole-prompt forward. Whether it does depends on the CPU's
# kernels (measured, tests/test_fast_lm.py): PyTorch's CPU flash attention walks the keys in blocks of 512
# counted from position 0, so the cut must be a multiple of 512, and products of fewer than ~16 rows round
# differently on every CPU seen; beyond that it varies. On an AMD EPYC (MKL, AVX-512) the attention's query
# blocks decide it; on an Intel Xeon with AMX the MLP's down projection (1536 -> 576) rounds a product of
# 57-192 rows differently from a larger one. A rest's products can run zero-padded to _PADDED_REST_ROWS
# rows (sliced after), in the many-row regime of the whole prompt's products on both CPUs. A probe decides
# each (prompt length, cut): the model's first decoder layer run on the real tokens, whole and split
# (plain, else padded), compared to the bit (every layer runs the same kernels on the same shapes).
# FastLM also compares the first shared prefill of each call with the whole-prompt one through the whole
# model, bit for bit.
_PREFILL_BLOCK = 512
_MIN_PREFILL_SUFFIX = 16  # a plain rest of fewer rows differs on every CPU seen: only padded is probed
_PADDED_REST_ROWS = 256


def _split_prefill_candidate(length: int, cut: int) -> bool:
    """Whether a split of a `length`-token prompt at `cut` is worth probing (see _PREFILL_BLOCK)."""
    return cut > 0 and cut % _PREFILL_BLOCK == 0 and length > cut


@contextlib.contextmanager
def _products_of_at_least(rows: int):
    """Inside (rows > 0): a linear map on a [1, M, K] input with M < rows runs on the input zero-padded to
    `rows` rows and returns the first M, so that MKL uses its many-row kernel, as on the whole prompt."""
    if not rows:
        yield
        return

    def linear(original, input, weight, bias=None):
        if input.dim() == 3 and input.shape[0] == 1 and 1 < input.shape[1] < rows:
            m = input.shape[1]
            return original(F.pad(input, (0, 0, 0, rows - m)), weight, bias)[:, :m]
        return original(input, weight, bias)

    with _linear_replaced_by(linear):
        yield


@contextlib.contextmanager
def _linear_replaced_by(linear):
    """Inside: F.linear(input, weight, bias) calls linear(original F.linear, input, weight, bias)."""
    original = F.linear
    F.linear = lambda input, weight, bias=None: linear(original, input, weight, bias)
    try:
        yield
    finally:
        F.linear = original


def _first_layer_body(base):
    """The transformer body running only its first decoder layer (the same modules and weights), for
    probing kernels on a model's shapes at a fraction of a forward's cost; None where the body has no
    `layers` list to cut."""
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0 or not hasattr(base, "config"):
        return None
    body = copy.copy(base)
    body._modules = dict(base._modules)
    body._modules["layers"] = torch.nn.ModuleList([layers[0]])
    body.config = copy.copy(base.config)
    body.config.num_hidden_layers = 1
    if getattr(base.config, "layer_types", None):  # a cache built from the config has a layer per entry
        body.config.layer_types = list(base.config.layer_types[:1])
    return body


def _prefill_split(body, tokens: list[int], cut: int, device, rest_rows: int = 0) -> tuple[torch.Tensor, list]:
    """Positions cut.. of `tokens` run through `body` on a cache holding the first `cut` (cut 0: the whole
    prompt in one forward), their products padded to `rest_rows` rows (0: none): their hidden states and
    the cache's (keys, values) per layer."""
    cache = _new_dynamic_cache(body.config)
    with torch.no_grad():
        if cut:
            body(input_ids=torch.tensor([tokens[:cut]], device=device), **{cache_argument(): cache}, use_cache=True)
        with _products_of_at_least(rest_rows):
            hidden = body(input_ids=torch.tensor([tokens[cut:]], device=device), **{cache_argument(): cache},
                          use_cache=True).last_hidden_state
    return hidden[0, -(len(tokens) - cut):], _cache_layers(cache)


def _split_prefill_matches(body, tokens: list[int], cut: int, device, rest_rows: int = 0) -> bool:
    """Whether prefilling `tokens` split at `cut` (the rest's products padded to `rest_rows` rows) gives, to
    the bit, the hidden states and KV of one forward."""
    whole_hidden, whole_kv = _prefill_split(body, tokens, 0, device)
    split_hidden, split_kv = _prefill_split(body, tokens, cut, device, rest_rows)
    return torch.equal(whole_hidden[cut:], split_hidden) and _same_kv(whole_kv, split_kv)


def _same_kv(layers_a: list, layers_b: list) -> bool:
    """Whether two caches' (keys, values) per layer are equal to the bit (a layer never run: None in both)."""
    return all(a is b or (a is not None and b is not None and torch.equal(a, b))
               for pair_a, pair_b in zip(layers_a, layers_b) for a, b in zip(pair_a, pair_b))


# ------------------------------------------------------------------------------------------------
# model access


def _decoder_and_head(model):
    """The transformer body (returns hidden states) and the LM head of a causal LM, or (None, None)."""
    get_decoder = getattr(model, "get_decoder", None)
    base = get_decoder() if callable(get_decoder) else getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None or not hasattr(head, "weight"):
        return None, None
    return base, head


def _logit_softcap(model) -> float | None:
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and getattr(config, "text_config", None) is not None:
        cap = getattr(config.text_config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache, across the 4.x and 5.x layouts."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(cache[i][0], cache[i][1]) for i in range(len(cache))]


def _new_dynamic_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


def _has_forward_hooks(model) -> bool:
    """Hooks (activation or KV-cache quantization, ...) may compute per tensor, e.g. one scale over all
    rows of a batch; a schedule that batches rows differently from HFLM could then change the answers."""
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def _full_attention_only(config) -> bool:
    """Per-row decode attention reads each row's whole cache: sliding-window layers would need a window."""
    config = getattr(config, "text_config", None) or config
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return False
    return not getattr(config, "use_sliding_window", False)


# ------------------------------------------------------------------------------------------------
# exact batched decode: one-row products and per-row attention


# A one-row product reads its whole weight matrix, so a decode step of many rows reads a weight too large
# for a core's L2 cache once per row from further away. Cut into blocks of output features, each block is
# read from L2 by every row after the first. A one-row product's values do not depend on which output
# features it computes alongside (a multiple of 64 of them; tests/test_fast_lm.py), so the bits stay.
# Measured on a 2-core Intel Xeon at 16 rows: SmolLM2's MLP products 1.5-1.7x faster (with, without bias);
# smaller weights and fewer rows gain nothing.
_OUTPUT_BLOCK_BYTES = 512 * 1024
_OUTPUT_BLOCKS_FROM_BYTES = 2 * 1024 * 1024
_OUTPUT_BLOCKS_FROM_ROWS = 8


def _output_block(weight: torch.Tensor, rows: int) -> int:
    """Output features per block for `rows` one-row products with `weight` [N, K]; 0: the whole weight."""
    size = weight.shape[0] * weight.shape[1] * weight.element_size()
    if rows < _OUTPUT_BLOCKS_FROM_ROWS or size <= _OUTPUT_BLOCKS_FROM_BYTES:
        return 0
    step = _OUTPUT_BLOCK_BYTES // (weight.shape[1] * weight.element_size()) // 64 * 64
    return step if 0 < step < weight.shape[0] else 0


@contextlib.contextmanager
def _one_row_products():
    """Inside: a linear map applied to a [B, 1, K] input runs as B one-row products (one bmm).

    MKL computes a one-row product with a kernel whose rounding differs from its many-row kernel; a batched
    matrix product of B single rows uses the one-row arithmetic for each, so every row gets exactly the
    numbers HFLM's batch-size-1 decode step gets (checked against it in the tests).
    """

    def rows_times(input, weight, bias):
        n = input.shape[0]
        w = weight.t().unsqueeze(0).expand(n, -1, -1)
        if bias is None:
            return torch.bmm(input, w)
        return torch.baddbmm(bias.view(1, 1, -1).expand(n, 1, -1), input, w)

    def linear(original, input, weight, bias=None):
        if input.dim() == 3 and input.shape[1] == 1 and input.shape[0] > 1:
            step = _output_block(weight, input.shape[0])
            if not step:
                return rows_times(input, weight, bias)
            return torch.cat([rows_times(input, weight[j : j + step], None if bias is None else bias[j : j + step])
                              for j in range(0, weight.shape[0], step)], dim=2)
        return original(input, weight, bias)

    with _linear_replaced_by(linear):
        yield


class _RowKV:
    """Keys (or values) of each row of a decode step, each its own [1, heads, length, dim] tensor."""

    def __init__(self, views: list[torch.Tensor]):
        self.views = views


@contextlib.contextmanager
def _per_row_attention():
    """Inside: SDPA attention given _RowKV keys runs once per row, on that row's cache alone."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, **kwargs):
        if not isinstance(key, _RowKV):
            return original(module, query, key, value, attention_mask, **kwargs)
        outs = [original(module, query[i : i + 1], k, v, None, **kwargs)[0]
                for i, (k, v) in enumerate(zip(key.views, value.views))]
        return torch.cat(outs, dim=0), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = original
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


class _RowCache:
    """The KV cache of an exact decode step: rows write into their slots of the shared buffer; attention
    then gets each row's own valid prefix of its slot (a view), never a padded batch."""

    is_compileable = False

    def __init__(self, slots: "_SlotCache", rows: list["_Row"]):
        self.slots = slots
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        kb, vb = self.slots.k[layer_idx], self.slots.v[layer_idx]
        kb[self.slots.slots, :, self.slots.positions] = key_states[:, :, 0]
        vb[self.slots.slots, :, self.slots.positions] = value_states[:, :, 0]
        keys = [kb[r.slot : r.slot + 1, :, : r.cached + 1] for r in self.rows]
        values = [vb[r.slot : r.slot + 1, :, : r.cached + 1] for r in self.rows]
        return _RowKV(keys), _RowKV(values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(row.cached for row in self.rows) + 1


class _SlotCache:
    """One preallocated KV buffer of `slots` rows for batched decode; rows write at their own positions."""

    is_compileable = False

    def __init__(self, n_layers, slots, heads, capacity, head_dim, dtype, device):
        shape = (slots, heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slots = None  # LongTensor [A]: the slot of each active row
        self.positions = None  # LongTensor [A]: where each row's new token goes
        self.length = 0  # attention span of this step (max position + 1)
        self.all_slots = False

    def load(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for (k, v), kb, vb in zip(layers, self.k, self.v):
            n = k.shape[2]
            kb[slot, :, :n].copy_(k[0])
            vb[slot, :, :n].copy_(v[0])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb[self.slots, :, self.positions] = key_states[:, :, 0]
        vb[self.slots, :, self.positions] = value_states[:, :, 0]
        if self.all_slots:
            return kb[:, :, : self.length], vb[:, :, : self.length]
        return kb[self.slots, :, : self.length], vb[self.slots, :, : self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class _StaticStep:
    """A batched decode step with fixed shapes: every slot of the KV buffer, attention over its whole capacity
    (a mask from each slot's position), inputs in preallocated tensors. Free slots compute on a dummy token at
    position 0 and their output is ignored. Fixed shapes let a GPU capture the step once as a CUDA graph and
    replay it: one launch per step instead of a few hundred small kernels launched from Python, which made
    the eager step launch-bound (tens of ms per step for a 1.5B model). Elsewhere the same step runs eagerly.
    """

    def __init__(self, lm: "FastLM", slots: _SlotCache, capture: bool):
        self.lm, self.slots = lm, slots
        count, capacity = slots.k[0].shape[0], slots.k[0].shape[2]
        device = slots.k[0].device
        self.ids = torch.zeros(count, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(count, 1, dtype=torch.long, device=device)
        self.every_slot = torch.arange(count, device=device)
        self.span = torch.arange(capacity, device=device).view(1, -1)
        self.capture = capture
        self.failed = False  # capture was tried and failed
        self.graph = None
        self.tokens = None  # the graph's output: next token of every slot

    def _forward(self) -> torch.Tensor:
        slots = self.slots
        slots.slots, slots.positions = self.every_slot, self.positions[:, 0]
        slots.length, slots.all_slots = self.span.shape[1], True
        mask = (self.span <= self.positions).view(len(self.every_slot), 1, 1, -1)
        hidden = self.lm._base(input_ids=self.ids, position_ids=self.positions, attention_mask=mask,
                               **{cache_argument(): slots}, use_cache=True).last_hidden_state
        return self.lm._head_logits(hidden)[:, -1].float().argmax(dim=-1)

    def _capture_graph(self) -> None:
        # warm-up on a side stream (the documented recipe), then capture; both compute this very step, and
        # rewriting a step's keys/values at the same positions with the same values is harmless
        stream = torch.cuda.Stream(self.ids.device)
        stream.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream(self.ids.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.tokens = self._forward()
        self.graph = graph

    def __call__(self, active: list[_Row]) -> list[int]:
        count = len(self.every_slot)
        ids, positions = [0] * count, [0] * count
        for row in active:
            ids[row.slot], positions[row.slot] = row.generated[-1], row.cached
        self.ids.copy_(torch.tensor(ids, dtype=torch.long).view(count, 1))
        self.positions.copy_(torch.tensor(positions, dtype=torch.long).view(count, 1))
        if self.capture and self.graph is None:
            try:
                self._capture_graph()
            except Exception:  # a model whose forward cannot be captured (host syncs, ...): this step runs
                self.capture, self.graph, self.failed = False, None, True  # eagerly, later ones the plain way
                self.lm.stats["decode_graph_failed"] += 1
        if self.graph is not None:
            self.graph.replay()
            tokens = self.tokens.tolist()
        else:
            tokens = self._forward().tolist()
        return [tokens[row.slot] for row in active]


class _PrefixCache:
    """Rows of prefix keys/values (row i: prefix `owners[i]` of a batched prefix pass) plus room for suffixes.

    layers: per layer (keys, values) of the prefix pass, [groups, heads, longest prefix, dim]; the suffix of
    every row is written from position `start` on.
    """

    is_compileable = False

    def __init__(self, layers, owners: list[int], start: int, suffix: int):
        index = torch.tensor(owners, device=layers[0][0].device)
        self.start = start
        self.k, self.v = [], []
        for k, v in layers:
            kb = k.new_zeros(len(owners), k.shape[1], start + suffix, k.shape[3])
            vb = v.new_zeros(len(owners), v.shape[1], start + suffix, v.shape[3])
            n = min(start, k.shape[2])
            kb[:, :, :n] = k.index_select(0, index)[:, :, :n]
            vb[:, :, :n] = v.index_select(0, index)[:, :, :n]
            self.k.append(kb)
            self.v.append(vb)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = key_states.shape[2]
        self.k[layer_idx][:, :, self.start : self.start + n] = key_states
        self.v[layer_idx][:, :, self.start : self.start + n] = value_states
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.k[layer_idx].shape[2]


# ------------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class _Unit:
    """One distinct model input of loglikelihood requests and the requests scored on it."""

    tokens: list[int]
    need: int = 0  # the last `need` positions' next-token distributions are scored
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation)


@dataclass
class _Row:
    """One generation request in flight."""

    index: int
    prompt: list[int]
    until: list[str]
    windows: list[int]  # tokens to look back for each stop sequence (as lm-eval's stopping criterion)
    max_new: int
    penalty: float
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens in this row's cache
    slot: int = -1  # batched decode: the row's slot in the shared cache
    seen: torch.Tensor | None = None  # token ids for the repetition penalty
    shared: int = 0  # exact decode: leading prompt tokens prefilled once for every row sharing them
    rest_rows: int = 0  # exact decode: the rest's products padded to this many rows (0: not padded)


def _shared_prompt_prefixes(rows: list[_Row], split_rows) -> dict[tuple, int]:
    """Set each row's `shared`: the longest prefix it has in common with another row, cut to a multiple of
    _PREFILL_BLOCK, where `split_rows(prompt, cut)` says how prefilling the rest on that prefix gives the
    whole forward's bits (`rest_rows`: 0 plain, else padded to that many rows; None: it does not); else 0.
    A prefix left to a single row is not shared (it would save nothing). Returns the rows of each shared
    prefix (its tokens as a tuple)."""
    ordered = sorted(rows, key=lambda r: r.prompt)
    common = [_lcp(a.prompt, b.prompt) for a, b in zip(ordered, ordered[1:])]
    for i, row in enumerate(ordered):
        longest = max(common[i - 1] if i > 0 else 0, common[i] if i < len(common) else 0)
        cut = longest // _PREFILL_BLOCK * _PREFILL_BLOCK
        rest_rows = split_rows(row.prompt, cut) if _split_prefill_candidate(len(row.prompt), cut) else None
        row.shared, row.rest_rows = (0, 0) if rest_rows is None else (cut, rest_rows)
    users: dict[tuple, int] = {}
    for row in rows:
        if row.shared:
            key = tuple(row.prompt[: row.shared])
            users[key] = users.get(key, 0) + 1
    for row in rows:
        if row.shared and users[tuple(row.prompt[: row.shared])] == 1:
            del users[tuple(row.prompt[: row.shared])]
            row.shared = row.rest_rows = 0
    return users


class _SharedPrefixes:
    """Exact decode: the prompt prefixes rows share (see _shared_prompt_prefixes) and, once run, their KV,
    kept until the last row sharing one has been prefilled."""

    def __init__(self, rows: list[_Row], split_rows):
        self.waiting = _shared_prompt_prefixes(rows, split_rows)  # rows still to prefill on each prefix
        self.kv: dict[tuple, list] = {}
        self.usable = bool(self.waiting)
        self.checked = False  # the first shared prefill was compared with the whole-prompt one

    def take(self, row: _Row):
        """The KV of the row's prefix if already run (counting the row as served), else None."""
        key = tuple(row.prompt[: row.shared])
        layers = self.kv.get(key)
        if layers is not None:
            self._served(key)
        return layers

    def keep(self, row: _Row, layers):
        key = tuple(row.prompt[: row.shared])
        self.kv[key] = layers
        self._served(key)
        return layers

    def _served(self, key: tuple) -> None:
        self.waiting[key] -= 1
        if not self.waiting[key]:
            self.kv.pop(key, None)

    def stop(self) -> None:
        self.usable = False
        self.kv.clear()


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _progress(total: int, desc: str, disable: bool, report=None):
    """Where a call's progress goes: ``report(desc, total)`` (qgate's own progress) when given, else a
    tqdm bar of its own on a terminal."""
    if report is not None:
        return report(desc, total)
    from tqdm import tqdm

    from qgate.progress import use_bar

    return tqdm(total=total, desc=desc, disable=disable or not use_bar(), leave=False)


class _PhaseTimer:
    """Adds the wall time of a `with` block to phases[name] (after a synchronize on a GPU)."""

    __slots__ = ("phases", "name", "sync", "started")

    def __init__(self, phases: dict, name: str, sync: bool):
        self.phases, self.name, self.sync = phases, name, sync

    def __enter__(self):
        if self.sync:
            torch.cuda.synchronize()
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        if self.sync:
            torch.cuda.synchronize()
        self.phases[self.name] = self.phases.get(self.name, 0.0) + time.perf_counter() - self.started
        return False


_NO_TIMER = contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# the LM


class FastLM(HFLM):
    """An lm-eval LM around an already-loaded causal LM: HFLM's answers (batch size 1), scheduled for speed.

    batch_tokens: token budget of one forward pass (rows x padded length) for loglikelihood scoring; on a GPU
        by default sized from its free memory and the model (``batch_budget``), 4,096 on the CPU.
    max_batch: most rows in one forward pass / decode step (GPU default: batch_tokens / 256, 512 at most).
    decode: "exact" (bit-identical to HFLM at batch size 1; needs SDPA attention) or "batched".
    softmax_dtype (passed to HFLM): float32 unless given; HFLM's own default is the model's dtype.
    min_fill: a padded batch takes only rows at least this fraction of its longest (0.8 on the CPU, 0.4 on a
        GPU, where fewer forwards matter more than padding).
    min_shared_prefix: inputs sharing at least this many leading tokens run that prefix once.
    kv_budget_bytes: on the CPU, the most memory the decode KV buffer may take (fewer rows if needed).
    decision_margin: log-probability gap under which a loglikelihood decision (best choice, is-greedy) is
        recomputed exactly; None picks one from the model's dtype; 0 never recomputes (throughput runs).
    decode_graph: run batched decode steps with fixed shapes (all slots, the buffer's whole length), which a
        GPU captures once as a CUDA graph and replays (default: on a GPU; rows with a repetition penalty, or a
        model whose step cannot be captured, take the plain batched step).
    profile: time each phase (batch building, forward, LM head, cache copies, exact recompute, ...) into
        ``self.phases`` (seconds per phase name; on a GPU each phase ends with a synchronize). Off: no timing.
    """

    def __init__(self, model, tokenizer, *, batch_tokens: int | None = None, max_batch: int | None = None,
                 decode: str | None = None, min_shared_prefix: int = 32, decision_margin: float | None = None,
                 kv_budget_bytes: int = 2 << 30, max_length: int | None = None, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, truncation: bool = False, profile: bool = False,
                 decode_graph: bool | None = None, min_fill: float | None = None, **hflm_kwargs):
        # log-probabilities in float32 whatever the model's dtype: in bf16 a document's summed loglikelihood
        # is rounded to bf16's spacing (32 nats near -7000), which moves a perplexity by several percent and
        # ties close multiple-choice answers. Stock HFLM does the same with softmax_dtype="float32".
        hflm_kwargs.setdefault("softmax_dtype", "float32")
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1,
                         max_length=max_length, add_bos_token=add_bos_token, prefix_token_id=prefix_token_id,
                         truncation=truncation, **hflm_kwargs)
        on_cuda = self.device.type == "cuda"
        if on_cuda:  # sized from the GPU's free memory and the model (batch_budget explains the estimate)
            # free: the device's, plus what this process's allocator holds cached but unused (reusable)
            free = (torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device)
                    - torch.cuda.memory_allocated(self.device))
            default_tokens = batch_budget.gpu_batch_tokens(
                free,
                batch_budget.model_shape(self.model.config, next(self.model.parameters()).element_size()))
            self.batch_tokens = int(batch_tokens or default_tokens)
            self.max_batch = int(max_batch or batch_budget.gpu_max_batch(self.batch_tokens))
        else:
            self.batch_tokens = int(batch_tokens or 4096)
            self.max_batch = int(max_batch or 32)
        decode = decode or ("batched" if on_cuda else "exact")
        if decode not in ("exact", "batched"):
            raise ValueError(f"decode must be 'exact' or 'batched', got {decode!r}")
        self.min_shared_prefix = max(1, int(min_shared_prefix))
        self.min_fill = float(min_fill if min_fill is not None else (_MIN_FILL_GPU if on_cuda else _MIN_FILL))
        self.kv_budget_bytes = int(kv_budget_bytes)  # decode KV buffer cap on the CPU (a GPU uses half its free memory)
        self._base, self._head = _decoder_and_head(self.model)
        attn = getattr(self.model.config, "_attn_implementation", None)
        if decode == "exact" and not (attn == "sdpa" and _full_attention_only(self.model.config)):
            decode = "batched"
        self.decode = decode
        # batched decode steps with fixed shapes (every slot, whole capacity), captured as a CUDA graph on a GPU
        self.decode_graph = (on_cuda if decode_graph is None else bool(decode_graph)) and decode == "batched"
        dtype = next(self.model.parameters()).dtype
        if decision_margin is None:
            decision_margin = 1e-3 if dtype == torch.float32 else 0.25
        self.decision_margin = float(decision_margin)
        self._softcap = _logit_softcap(self.model)
        self._instances = None  # the Instances of the loglikelihood call in progress (for choice groups)
        # progress_report(desc, total) -> an object with update(n) and close(): where requests done are
        # reported (qgate.progress.Progress.within); None: a tqdm bar on a terminal
        self.progress_report = None
        # how often the slow, exact paths ran: loglikelihoods recomputed as HFLM does, decode steps whose
        # next token had several contenders, requests HFLM generated itself
        self.stats = {"exact_loglikelihood": 0, "exact_head_rows": 0, "hflm_generate": 0, "hflm_hooked_calls": 0,
                      "shared_prefix_tokens": 0, "forward_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "decode_rows": 0,
                      "fixed_shape_steps": 0, "decode_graph_failed": 0,
                      "shared_prefill_tokens": 0, "shared_prefill_mismatch": 0, "split_probes": 0,
                      "shared_prefill_padded": 0}
        self.phases: dict[str, float] | None = {} if profile else None
        # (prompt length, cut) -> how a split prefill keeps the bits (rest_rows, 0: plain), None: it does not
        self._split_verdicts: dict[tuple[int, int], int | None] = {}
        self._probe_body = None  # the body cut to its first layer, built on the first probe

    def _phase(self, name: str):
        """A timer for one phase when profiling (see ``profile``), else a no-op context."""
        if self.phases is None:
            return _NO_TIMER
        return _PhaseTimer(self.phases, name, self.device.type == "cuda")

    # -- loglikelihood ------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._instances = requests
        # HFLM's tokenizing bar is redundant beside the scoring progress reported here
        disable_tqdm = disable_tqdm or self.progress_report is not None
        try:
            if self.enable_thinking or not pair_encoding.reproduces(self):
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            # lm-eval's tokenization of the requests (the same ids), each distinct string once, in batches:
            # encoding every request alone was most of FastLM's time outside the model on MMLU
            with self._phase("ll tokenize (each distinct string once, batched)"):
                encoded = pair_encoding.encode_requests(self, [req.args for req in requests])
            return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)
        finally:
            self._instances = None

    def _own_schedule(self) -> bool:
        """False when FastLM must leave the computation to HFLM itself (no separable head, or hooks)."""
        if self._base is None:
            return False
        if _has_forward_hooks(self.model):
            self.stats["hflm_hooked_calls"] += 1
            return False
        return True

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """requests: ((context, continuation), context tokens, continuation tokens), as HFLM receives them."""
        if not self._own_schedule():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results, robust = self._score(requests, disable_tqdm)
        redo: set[int] = set()
        if self.decision_margin > 0:  # 0 (or less) trades exact decisions for speed: never recompute
            redo = {i for i, ok in enumerate(robust) if not ok}
            instances = self._instances if self._instances is not None and len(self._instances) == len(requests) else None
            redo |= self._close_choices(requests, results, instances)
        if redo:
            order = sorted(redo)
            self.stats["exact_loglikelihood"] += len(order)
            with self._phase("ll exact recompute (HFLM)"):
                exact = HFLM._loglikelihood_tokens(self, [requests[i] for i in order], disable_tqdm=True)
            for i, r in zip(order, exact):
                results[i] = r
        for i, (key, _, _) in enumerate(requests):
            if key is not None and i not in redo:
                self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if not self._own_schedule():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            rolling = [lm_eval_utils.make_disjoint_window(w) for w in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((None, ctx, cont) for ctx, cont in rolling)
            counts.append(len(rolling))
        scored, _ = self._score(windows, disable_tqdm)
        out, pos = [], 0
        for req, n in zip(requests, counts):
            total = sum(ll for ll, _ in scored[pos : pos + n])
            pos += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    def _close_choices(self, requests, results, instances) -> set[int]:
        """Requests of a question whose best choice rounding could change (raw or length-normalized)."""
        groups: dict = {}
        for i, (key, _, _) in enumerate(requests):
            if key is None:
                continue
            inst = instances[i] if instances is not None else None
            doc = getattr(inst, "doc_id", None)
            gkey = (getattr(inst, "task_name", None), doc) if doc is not None else ("context", key[0])
            groups.setdefault(gkey, []).append(i)
        redo: set[int] = set()
        for members in groups.values():
            if len(members) < 2:
                continue
            conts = [requests[i][0][1] for i in members]
            lls = [results[i][0] for i in members]
            # rounding moves a value by at most ~margin per scored token: raw, and per character (acc_norm)
            errors = [self.decision_margin * len(requests[i][2]) for i in members]
            orderings = [(lls, errors)]
            for length in (len, lambda c: len(c.lstrip())):
                sizes = [max(1, length(c)) for c in conts]
                orderings.append(([ll / s for ll, s in zip(lls, sizes)], [e / s for e, s in zip(errors, sizes)]))
            for values, errs in orderings:
                top = sorted(values, reverse=True)
                if top[0] - top[1] <= 2 * max(errs):
                    redo.update(members)
                    break
        return redo

    def _score(self, requests, disable_tqdm: bool):
        """(logprob, is_greedy) per request, and whether is_greedy is beyond rounding's reach."""
        with self._phase("ll batch build"):
            units: dict[tuple, _Unit] = {}
            max_length = self.max_length  # a property that resolves the config on every access
            for i, (_, ctx, cont) in enumerate(requests):
                assert len(ctx) > 0 and len(cont) > 0 and len(cont) <= max_length
                x = (ctx + cont)[-(max_length + 1) :][:-1]
                unit = units.get(tuple(x))
                if unit is None:
                    unit = units[tuple(x)] = _Unit(x)
                unit.need = max(unit.need, len(cont))
                unit.requests.append((i, cont))
            singles, groups = self._plan(list(units.values()))
        results: list = [None] * len(requests)
        robust: list = [True] * len(requests)
        bar = _progress(len(requests), "loglikelihood", disable_tqdm, self.progress_report)
        with torch.no_grad():
            if groups:
                self._run_groups(groups, results, robust, bar)
            singles.sort(key=lambda u: -len(u.tokens))
            batch: list[_Unit] = []
            for unit in singles:
                if batch and ((len(batch) + 1) * len(batch[0].tokens) > self.batch_tokens or len(batch) >= self.max_batch
                              or len(unit.tokens) < self.min_fill * len(batch[0].tokens)):
                    self._run_singles(batch, results, robust, bar)
                    batch = []
                batch.append(unit)
            if batch:
                self._run_singles(batch, results, robust, bar)
        bar.close()
        return results, robust

    def _plan(self, units: list[_Unit]):
        """Split units into those run alone and groups that share a prefix of >= min_shared_prefix tokens."""
        units = sorted(units, key=lambda u: u.tokens)
        singles, groups = [], []
        current: list[_Unit] = []
        shared = 0
        for unit in units:
            room = len(unit.tokens) - unit.need  # the prefix must end before the first scored position
            if current:
                candidate = min(shared, room, _lcp(current[-1].tokens, unit.tokens))
                if candidate >= self.min_shared_prefix:
                    current.append(unit)
                    shared = candidate
                    continue
                self._close_group(current, shared, singles, groups)
            current, shared = [unit], room
        if current:
            self._close_group(current, shared, singles, groups)
        return singles, groups

    def _close_group(self, members, shared, singles, groups) -> None:
        if len(members) > 1 and shared >= self.min_shared_prefix:
            groups.append((shared, members))
        else:
            singles.extend(members)

    def _run_singles(self, units: list[_Unit], results, robust, bar) -> None:
        with self._phase("ll batch build"):
            width = max(len(u.tokens) for u in units)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(units), width), pad, dtype=torch.long)
            for r, u in enumerate(units):
                ids[r, : len(u.tokens)] = torch.tensor(u.tokens, dtype=torch.long)
            rows, cols = [], []
            for r, u in enumerate(units):
                rows.extend([r] * u.need)
                cols.extend(range(len(u.tokens) - u.need, len(u.tokens)))
        with self._phase("ll forward"):
            hidden = self._base(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
            picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
        self.stats["forward_tokens"] += ids.numel()
        self._finish_units(units, picked, results, robust, bar)

    def _run_groups(self, groups: list[tuple[int, list[_Unit]]], results, robust, bar) -> None:
        """Prefixes of many groups in one forward, then their members' remainders in budget-sized batches."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        groups = sorted(groups, key=lambda g: -g[0])
        start = 0
        while start < len(groups):
            n = 1  # right-padded prefixes: causal attention keeps every row's prefix positions its own
            while (start + n < len(groups) and n < self.max_batch
                   and (n + 1) * groups[start][0] <= self.batch_tokens
                   and groups[start + n][0] >= self.min_fill * groups[start][0]):
                n += 1
            chunk = groups[start : start + n]
            start += n
            with self._phase("ll batch build"):
                ids = torch.full((n, chunk[0][0]), pad, dtype=torch.long)
                for r, (plen, members) in enumerate(chunk):
                    ids[r, :plen] = torch.tensor(members[0].tokens[:plen], dtype=torch.long)
                    self.stats["shared_prefix_tokens"] += plen * (len(members) - 1)  # tokens not recomputed
            cache = _new_dynamic_cache(self.model.config)
            with self._phase("ll forward (shared prefixes)"):
                self._base(input_ids=ids.to(self.device), **{cache_argument(): cache}, use_cache=True)
            self.stats["forward_tokens"] += ids.numel()
            layers = _cache_layers(cache)
            rows = [(r, u) for r, (_, members) in enumerate(chunk) for u in members]
            self._run_remainders(chunk, layers, rows, results, robust, bar)

    def _run_remainders(self, chunk, layers, rows, results, robust, bar) -> None:
        """Each unit's tokens after its group's prefix, attending to that prefix through a shared KV buffer.

        Buffer row layout: the group's prefix at [0, P_g), unused slots up to P (the longest prefix of the
        batch), the unit's own tokens from P on; the mask lets each row see its prefix and its own past.
        """
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = sorted(rows, key=lambda ru: -(len(ru[1].tokens) - chunk[ru[0]][0]))
        kv_budget = 4 * self.batch_tokens
        start = 0
        while start < len(rows):
            width = len(rows[start][1].tokens) - chunk[rows[start][0]][0]
            n, longest = 1, chunk[rows[start][0]][0]
            while start + n < len(rows) and n < self.max_batch and (n + 1) * width <= self.batch_tokens:
                g, u = rows[start + n]
                if len(u.tokens) - chunk[g][0] < self.min_fill * width:
                    break
                longest_next = max(longest, chunk[g][0])
                if (n + 1) * (longest_next + width) > kv_budget:
                    break
                longest = longest_next
                n += 1
            batch = rows[start : start + n]
            start += n
            with self._phase("ll batch build"):
                plens = torch.tensor([chunk[g][0] for g, _ in batch], device=self.device)
                ids = torch.full((n, width), pad, dtype=torch.long)
                for r, (g, u) in enumerate(batch):
                    tail = u.tokens[chunk[g][0]:]
                    ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                positions = plens.view(-1, 1) + torch.arange(width, device=self.device).view(1, -1)
                col = torch.arange(longest + width, device=self.device).view(1, 1, -1)
                q = torch.arange(width, device=self.device).view(1, -1, 1)
                mask = (col < plens.view(-1, 1, 1)) | ((col >= longest) & (col - longest <= q))
                sel_rows, sel_cols = [], []
                for r, (g, u) in enumerate(batch):
                    end = len(u.tokens) - chunk[g][0]
                    sel_rows.extend([r] * u.need)
                    sel_cols.extend(range(end - u.need, end))
            with self._phase("ll cache copies (prefix KV per row)"):
                cache = _PrefixCache(layers, [g for g, _ in batch], longest, width)
            with self._phase("ll forward"):
                hidden = self._base(input_ids=ids.to(self.device), position_ids=positions,
                                    attention_mask=mask.unsqueeze(1), **{cache_argument(): cache},
                                    use_cache=True).last_hidden_state
                picked = hidden[torch.tensor(sel_rows, device=hidden.device),
                                torch.tensor(sel_cols, device=hidden.device)]
            self.stats["forward_tokens"] += ids.numel()
            self._finish_units([u for _, u in batch], picked, results, robust, bar)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _finish_units(self, units: list[_Unit], hidden: torch.Tensor, results, robust, bar, chunk: int = 2048):
        """hidden: the scored positions of `units`, in order. Fills results/robust of their requests."""
        with self._phase("ll head + log-softmax"):
            self._score_positions(units, hidden, results, robust, chunk)
        bar.update(sum(len(u.requests) for u in units))

    def _score_positions(self, units: list[_Unit], hidden: torch.Tensor, results, robust, chunk: int) -> None:
        target_rows, target_tokens, owners = [], [], []
        offset = 0
        for u in units:
            for i, cont in u.requests:
                first = offset + u.need - len(cont)
                target_rows.extend(range(first, first + len(cont)))
                target_tokens.extend(cont)
                owners.append((i, len(cont)))
            offset += u.need
        best_id, best, second, target_lp = [], [], [], []
        rows_t = torch.tensor(target_rows, device=hidden.device)
        toks_t = torch.tensor(target_tokens, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            lp = F.log_softmax(self._head_logits(hidden[lo : lo + chunk]), dim=-1, dtype=self.softmax_dtype)
            top = lp.topk(2, dim=-1).values
            best_id.append(lp.argmax(dim=-1))
            best.append(top[:, 0])
            second.append(top[:, 1])
            sel = (rows_t >= lo) & (rows_t < lo + chunk)
            target_lp.append((sel.nonzero().squeeze(1), lp[rows_t[sel] - lo, toks_t[sel]]))
        best_id, best, second = torch.cat(best_id), torch.cat(best), torch.cat(second)
        tlp = torch.empty(len(target_rows), dtype=best.dtype, device=hidden.device)
        for where, values in target_lp:
            tlp[where] = values
        greedy_row = best_id[rows_t] == toks_t
        # distance of each scored token from flipping: to the runner-up if it is the argmax, else to the argmax
        margin = torch.where(greedy_row, best[rows_t] - second[rows_t], best[rows_t] - tlp).float().cpu()
        greedy_row, tlp_cpu = greedy_row.cpu(), tlp.cpu()  # one transfer, not one per request
        # one-token continuations (multiple choice) read plain Python numbers: no tensor op per request
        tlp_list, greedy_list, margin_list = tlp_cpu.tolist(), greedy_row.tolist(), margin.tolist()
        threshold = torch.tensor(self.decision_margin, dtype=margin.dtype).item()  # as the tensor comparison rounds it
        pos = 0
        for i, n in owners:
            if n == 1:
                results[i] = (tlp_list[pos], greedy_list[pos])
                robust[i] = margin_list[pos] > threshold
                pos += 1
                continue
            values = tlp_cpu[pos : pos + n]
            is_greedy = bool(greedy_row[pos : pos + n].all())
            m = margin[pos : pos + n]
            if is_greedy:
                robust[i] = bool(m.min() > self.decision_margin)
            else:
                robust[i] = bool(m[~greedy_row[pos : pos + n]].max() > self.decision_margin)
            results[i] = (float(values.sum()), is_greedy)
            pos += n

    # -- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False):
        if not self._own_schedule():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results: list = [None] * len(requests)
        rows, fallback = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            penalty = self._greedy_penalty(kwargs)
            if penalty is None:
                fallback.append(i)
                continue
            max_ctx_len = self.max_length - max_gen_toks
            assert max_ctx_len > 0, (f"requested max tokens to generate ({max_gen_toks}) must be less than "
                                     f"the model's maximum sequence length ({self.max_length})")
            ids, _ = self.tok_batch_encode([context], left_truncate_len=max_ctx_len, truncation=self.truncation)
            windows = [len(self.tokenizer.encode(s, add_special_tokens=False)) + 2 for s in until]
            rows.append(_Row(i, ids[0].tolist(), until, windows, max_gen_toks, penalty))
        if fallback:
            self.stats["hflm_generate"] += len(fallback)
            for i, text in zip(fallback, HFLM.generate_until(self, [requests[i] for i in fallback], disable_tqdm=True)):
                results[i] = text
        if rows:
            bar = _progress(len(rows), "generate_until", disable_tqdm, self.progress_report)
            with torch.no_grad():
                for row in self._decode(rows, bar):
                    text = self._finish_text(row)
                    results[row.index] = text
                    self.cache_hook.add_partial("generate_until", requests[row.index].args, text)
            bar.close()
        return results

    def _greedy_penalty(self, kwargs: dict) -> float | None:
        """The repetition penalty of a greedy request, or None if HFLM must run it (sampling, beams, ...)."""
        if kwargs.get("do_sample"):
            return None
        if set(kwargs) - _GREEDY_KWARGS:
            return None
        config = self.model.generation_config
        for name, neutral in _UNSUPPORTED_GREEDY_SETTINGS.items():
            value = getattr(config, name, None)
            if value not in neutral and value != []:
                return None
        penalty = kwargs.get("repetition_penalty", getattr(config, "repetition_penalty", None))
        return float(penalty) if penalty is not None else 1.0

    def _finish_text(self, row: _Row) -> str:
        """HFLM's post-processing of one row's generated tokens."""
        tokens = row.generated
        if isinstance(self.think_end_token, int):
            marks = [j for j, t in enumerate(tokens) if t == self.think_end_token]
            if marks:
                tokens = tokens[marks[-1] + 1 :]
        text = self.tok_decode(tokens)
        if isinstance(self.think_end_token, int):
            text = text.lstrip()
        return postprocess_generated_text(
            generation=text, stop=row.until,
            think_end_token=self.think_end_token if isinstance(self.think_end_token, str) else None)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def _stopped(self, row: _Row, token: int, eos_ids: set[int]) -> bool:
        if len(row.generated) >= row.max_new or token in eos_ids:
            return True
        for stop, window in zip(row.until, row.windows):
            if stop in self.tokenizer.decode(row.generated[-window:]):
                return True
        return False

    def _slot_count(self, rows: list[_Row], layers) -> int:
        """Rows decoded together: max_batch, fewer if their KV cache would not fit the memory budget."""
        capacity = max(len(r.prompt) + r.max_new for r in rows)
        per_token = sum(k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
                        for k, v in layers)
        if self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] // 2
        else:
            budget = self.kv_budget_bytes
        return max(1, min(self.max_batch, len(rows), budget // max(1, capacity * per_token)))

    def _decode(self, rows: list[_Row], bar):
        """Yield each row once it has finished; up to max_batch rows advance together, each in its own slot
        of one preallocated KV buffer (a finished row's slot goes to the next waiting row)."""
        eos_ids = self._eos_ids()
        exact = self.decode == "exact"
        shared = _SharedPrefixes(rows, self._split_prefill_rows) if exact else None
        # exact decode: rows sharing a prompt prefix one after the other, so each prefix's KV is freed early
        pending = deque(sorted(rows, key=(lambda r: r.prompt) if exact else (lambda r: -len(r.prompt))))
        active: list[_Row] = []
        head_norms = None
        slots, free = None, []
        static = None  # the fixed-shape step (decode_graph), built with the KV buffer's first use
        while pending or active:
            while pending and (slots is None or free):
                batch = [pending.popleft()]
                if not exact and slots is not None:  # batched decode: prompts for the free slots prefilled together
                    while (pending and len(batch) < len(free)
                           and (len(batch) + 1) * len(batch[0].prompt) <= self.batch_tokens):
                        batch.append(pending.popleft())
                started = time.perf_counter()
                if exact and batch[0].shared and shared.usable:
                    prefilled = [self._prefill_on_shared_prefix(batch[0], shared)]
                elif len(batch) == 1:
                    with self._phase("gen prefill (each prompt alone)"):
                        prefilled = [self._prefill(batch[0])]
                else:
                    with self._phase("gen prefill (prompts together, batched decode)"):
                        prefilled = self._prefill_together(batch)
                self.stats["prefill_s"] += time.perf_counter() - started
                for row, (layers, token) in zip(batch, prefilled):
                    row.generated.append(token)
                    if self._stopped(row, token, eos_ids):
                        bar.update(1)
                        yield row
                        continue
                    row.cached = len(row.prompt)
                    if slots is None:  # shapes are known after the first prefill
                        k0 = layers[0][0]
                        count = self._slot_count(rows, layers)
                        slots = _SlotCache(len(layers), count, k0.shape[1],
                                           max(len(r.prompt) + r.max_new for r in rows), k0.shape[3], k0.dtype,
                                           k0.device)
                        free = list(range(count))
                    row.slot = free.pop(0)  # lowest free slot first: a full batch reads the cache without a gather
                    with self._phase("gen cache copies (prompt KV into its slot)"):
                        slots.load(row.slot, layers)
                    active.append(row)
            if not active:
                continue
            active.sort(key=lambda r: r.slot)
            started = time.perf_counter()
            if exact:
                if head_norms is None:
                    head_norms = self._head.weight.float().norm(dim=1)
                tokens = self._exact_step(active, slots, head_norms)
            elif (self.decode_graph and not (static is not None and static.failed)
                  and all(row.penalty == 1.0 for row in active)):
                if static is None:
                    static = _StaticStep(self, slots, capture=self.device.type == "cuda")
                with self._phase("gen decode step (fixed shapes, CUDA graph on a GPU)"):
                    tokens = static(active)
                self.stats["fixed_shape_steps"] += 1
            else:
                tokens = self._batched_step(active, slots)
            self.stats["decode_s"] += time.perf_counter() - started
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(active)
            still, done = [], []
            with self._phase("gen stop checks"):
                for row, token in zip(active, tokens):
                    row.cached += 1
                    row.generated.append(token)
                    (done if self._stopped(row, token, eos_ids) else still).append(row)
            for row in done:
                bar.update(1)
                free.append(row.slot)
                free.sort()
                yield row
            active = still

    def _prefill(self, row: _Row):
        """Run one prompt alone, exactly as generate() at batch size 1 does; return its KV and first token."""
        cache = _new_dynamic_cache(self.model.config)
        return self._prefill_into(cache, row, row.prompt)

    def _prefill_into(self, cache, row: _Row, tokens: list[int], rest_rows: int = 0):
        """Run `tokens` (the row's prompt, or its rest after a prefix already in `cache`, its products padded
        to `rest_rows` rows); its KV and first token (the head on one row, as generate() computes it)."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        with _products_of_at_least(rest_rows):
            hidden = self._base(input_ids=ids, **{cache_argument(): cache}, use_cache=True).last_hidden_state
        logits = self._head_logits(hidden[:, -1:, :])[:, -1].float()
        if row.penalty != 1.0:
            row.seen = torch.tensor(row.prompt, dtype=torch.long, device=self.device)
            logits = self._penalize(logits, [row])
        return _cache_layers(cache), int(logits.argmax(dim=-1))

    def _split_prefill_rows(self, tokens: list[int], cut: int) -> int | None:
        """How this model on this machine prefills `tokens` split at `cut` to the whole forward's bits: 0
        plain, _PADDED_REST_ROWS with the rest's products padded, None not at all. Probed once per (length,
        cut) on the first decoder layer (see _PREFILL_BLOCK)."""
        key = (len(tokens), cut)
        if key not in self._split_verdicts:
            rest = len(tokens) - cut
            ways = [0] if rest >= _MIN_PREFILL_SUFFIX else []
            if rest < _PADDED_REST_ROWS:
                ways.append(_PADDED_REST_ROWS)
            verdict = None
            with self._phase("gen prefill (probe: first layer, split vs whole)"):
                if self._probe_body is None:
                    self._probe_body = _first_layer_body(self._base) or False
                for rest_rows in ways if self._probe_body is not False else []:
                    if _split_prefill_matches(self._probe_body, tokens, cut, self.device, rest_rows):
                        verdict = rest_rows
                        break
            self._split_verdicts[key] = verdict
            self.stats["split_probes"] += 1
        return self._split_verdicts[key]

    def _prefill_on_shared_prefix(self, row: _Row, shared: "_SharedPrefixes"):
        """Exact decode: the row's shared prefix (run once for every row sharing it), then the rest of its
        prompt on a cache holding that prefix. The first row of a call is also prefilled whole and compared
        to the bit (keys, values, first token); on any difference sharing stops for the call."""
        prefix = shared.take(row)
        if prefix is None:
            with self._phase("gen prefill (shared prompt prefix, once)"):
                cache = _new_dynamic_cache(self.model.config)
                ids = torch.tensor([row.prompt[: row.shared]], dtype=torch.long, device=self.device)
                self._base(input_ids=ids, **{cache_argument(): cache}, use_cache=True)
                prefix = shared.keep(row, _cache_layers(cache))
        with self._phase("gen prefill (rest of the prompt on its shared prefix)"):
            cache = _new_dynamic_cache(self.model.config)
            for i, (k, v) in enumerate(prefix):
                cache.update(k, v, i)
            result = self._prefill_into(cache, row, row.prompt[row.shared :], row.rest_rows)
        if not shared.checked:
            with self._phase("gen prefill (check: the first shared prompt whole)"):
                whole = self._prefill(row)
            shared.checked = True
            if whole[1] != result[1] or not _same_kv(whole[0], result[0]):
                self.stats["shared_prefill_mismatch"] += 1
                shared.stop()
                return whole
        self.stats["shared_prefill_tokens"] += row.shared
        self.stats["shared_prefill_padded"] += bool(row.rest_rows)
        return result

    def _prefill_together(self, rows: list[_Row]):
        """Batched decode only: the prompts in one right-padded forward (causal attention never looks right,
        so no real position sees padding); each row's KV and first token, as ``_prefill`` returns them."""
        lengths = [len(r.prompt) for r in rows]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : lengths[r]] = torch.tensor(row.prompt, dtype=torch.long)
        ids = ids.to(self.device)
        cache = _new_dynamic_cache(self.model.config)
        hidden = self._base(input_ids=ids, **{cache_argument(): cache}, use_cache=True).last_hidden_state
        last = torch.tensor(lengths, device=hidden.device) - 1
        logits = self._head_logits(hidden[torch.arange(len(rows), device=hidden.device), last].unsqueeze(1))[:, -1]
        logits = logits.float()
        for r, row in enumerate(rows):
            if row.penalty != 1.0:
                row.seen = ids[r, : lengths[r]]
        if any(row.penalty != 1.0 for row in rows):
            logits = self._penalize(logits, rows)
        tokens = logits.argmax(dim=-1).tolist()
        layers = _cache_layers(cache)
        return [([(k[r : r + 1, :, :n], v[r : r + 1, :, :n]) for k, v in layers], tokens[r])
                for r, n in enumerate(lengths)]

    @staticmethod
    def _penalize(scores: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """transformers' RepetitionPenaltyLogitsProcessor, row by row (each row's own prompt + output)."""
        scores = scores.clone()
        for r, row in enumerate(rows):
            if row.penalty == 1.0:
                continue
            seen = row.seen
            picked = scores[r].gather(0, seen)
            picked = torch.where(picked < 0, picked * row.penalty, picked / row.penalty)
            scores[r] = scores[r].scatter(0, seen, picked)
        return scores

    def _step_inputs(self, active: list[_Row]):
        for row in active:
            if row.penalty != 1.0:
                row.seen = torch.cat([row.seen, torch.tensor(row.generated[-1:], device=row.seen.device)])
        ids = torch.tensor([[row.generated[-1]] for row in active], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.cached] for row in active], dtype=torch.long, device=self.device)
        return ids, positions

    def _exact_step(self, active: list[_Row], slots: _SlotCache, head_norms: torch.Tensor) -> list[int]:
        with self._phase("gen step inputs"):
            ids, positions = self._step_inputs(active)
            slots.slots = torch.tensor([row.slot for row in active], dtype=torch.long, device=self.device)
            slots.positions = positions[:, 0]
            dummy_mask = torch.ones(len(active), 1, 1, 1, dtype=torch.bool, device=self.device)
        with self._phase("gen decode forward (one-row products, per-row attention)"):
            with _one_row_products(), _per_row_attention():
                hidden = self._base(input_ids=ids, position_ids=positions, attention_mask=dummy_mask,
                                    **{cache_argument(): _RowCache(slots, active)}, use_cache=True).last_hidden_state
        with self._phase("gen head (batched head, bound, one-row recompute of contenders)"):
            return self._exact_next_tokens(active, hidden, head_norms)

    def _exact_next_tokens(self, active: list[_Row], hidden: torch.Tensor, head_norms: torch.Tensor) -> list[int]:
        scores = self._head_logits(hidden)[:, -1].float()
        if any(row.penalty != 1.0 for row in active):
            scores = self._penalize(scores, active)
        best = scores.argmax(dim=-1, keepdim=True)
        # A logit of the batched head differs from the one-row head's by at most 2 gamma_K |w_n| |x| (any
        # summation order; Cauchy-Schwarz), stretched by the repetition penalty. Tokens whose batched score
        # plus that bound reaches the best score minus its bound are the only ones the one-row head could
        # rank first: recompute just those, with one-row arithmetic, and take their argmax.
        k = hidden.shape[-1]
        gamma = k * _FP32_UNIT_ROUNDOFF / (1 - k * _FP32_UNIT_ROUNDOFF)
        x_norm = hidden[:, -1].float().norm(dim=-1)
        stretch = torch.tensor([max(r.penalty, 1 / r.penalty) for r in active], device=x_norm.device)
        bound = (2.02 * gamma * x_norm * stretch).unsqueeze(1) * head_norms.unsqueeze(0)
        if self._head.weight.dtype != torch.float32:  # the head's output is rounded to a narrower type
            bound = bound + 2 * torch.finfo(self._head.weight.dtype).eps * scores.abs()
        floor = scores.gather(1, best) - bound.gather(1, best)
        contenders = (scores + bound) >= floor
        tokens = []
        for r, row in enumerate(active):
            ids = contenders[r].nonzero().flatten()
            self.stats["exact_head_rows"] += int(len(ids) > 1)
            tokens.append(self._one_row_argmax(hidden[r : r + 1], ids, row))
        return tokens

    def _one_row_argmax(self, hidden: torch.Tensor, ids: torch.Tensor, row: _Row) -> int:
        """argmax over `ids` of the one-row LM head (+ softcap, penalty), as generate() at batch size 1.

        The one-row product's value for a vocabulary row does not depend on which other rows are computed
        with it as long as their number is a multiple of 16 (MKL's vector block; checked in the tests), so
        the contenders are padded to a multiple of 64 with copies of the first.
        """
        n = len(ids)
        padded = torch.cat([ids, ids[:1].expand((-n) % 64)])
        bias = self._head.bias[padded] if getattr(self._head, "bias", None) is not None else None
        logits = F.linear(hidden, self._head.weight[padded], bias)[0, -1, :n]
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        logits = logits.float()
        if row.penalty != 1.0:
            hit = torch.isin(ids, row.seen)
            penalized = torch.where(logits < 0, logits * row.penalty, logits / row.penalty)
            logits = torch.where(hit, penalized, logits)
        return int(ids[int(logits.argmax())])

    def _batched_step(self, active: list[_Row], slots: _SlotCache) -> list[int]:
        with self._phase("gen step inputs"):
            ids, positions = self._step_inputs(active)
            slots.slots = torch.tensor([row.slot for row in active], dtype=torch.long, device=self.device)
            slots.positions = positions[:, 0]
            slots.length = max(row.cached for row in active) + 1
            slots.all_slots = len(active) == slots.k[0].shape[0]
            span = torch.arange(slots.length, device=self.device).view(1, -1)
            mask = (span <= positions).view(len(active), 1, 1, slots.length)
        with self._phase("gen decode forward (batched)"):
            hidden = self._base(input_ids=ids, position_ids=positions, attention_mask=mask,
                                **{cache_argument(): slots}, use_cache=True).last_hidden_state
        with self._phase("gen head (batched)"):
            scores = self._head_logits(hidden)[:, -1].float()
            if any(row.penalty != 1.0 for row in active):
                scores = self._penalize(scores, active)
            return scores.argmax(dim=-1).tolist()
