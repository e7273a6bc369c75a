"""lm-eval's tokenization of loglikelihood requests, computed once per distinct string and in batches.

lm-eval's ``TemplateLM.loglikelihood`` encodes every request on its own: ``_encode_pair`` moves the
context's trailing spaces to the continuation, encodes context + continuation and the context (one
``tokenizer.encode`` call each) and takes the continuation as what follows the context's tokens; an empty
context becomes the prefix token. A multiple-choice question asks the same context with every choice, so
the same few-shot context (often over a thousand tokens) is encoded once per choice, one string at a time.
Here each distinct string is encoded once, with the very call HFLM's ``tok_encode`` makes (the same
``add_special_tokens`` decision, BOS-prefix rule included), and a fast tokenizer encodes them as one batch
(its Rust backend spreads a batch over the cores). The ids are the same; only the number of calls changes.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

_CHUNK = 1024  # strings per tokenizer call: bounds the memory of the backend's Encoding objects

# tok_encode's "no add_special_tokens argument" (the tokenizer's own default), as a dictionary key
_DEFAULT = "default"


def reproduces(lm) -> bool:
    """Whether ``encode_requests`` computes exactly what ``lm.loglikelihood`` would tokenize: the LM uses
    HFLM's ``tok_encode`` and lm-eval's ``_encode_pair`` unchanged, for a decoder-only model."""
    cls = type(lm)
    return (getattr(lm, "backend", None) == "causal" and cls.tok_encode is HFLM.tok_encode
            and cls._encode_pair is TemplateLM._encode_pair)


def encode_requests(lm, pairs: list[tuple[str, str]]) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """``((context, continuation), context ids, continuation ids)`` per pair, as TemplateLM.loglikelihood
    hands them to ``_loglikelihood_tokens``."""
    bos_text = lm.tokenizer.decode(lm.prefix_token_id)

    def special(string: str, add_special_tokens: bool | None = None):
        # HFLM.tok_encode's decision, for one string
        kwargs = _add_special_kwargs(add_special_tokens, lm.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, bos_text):
            kwargs["add_special_tokens"] = False
        return kwargs.get("add_special_tokens", _DEFAULT)

    plan = []  # per pair: ("empty", continuation key) or ("pair", whole key, context key)
    wanted: dict[tuple[str, object], None] = {}  # insertion-ordered set of (string, add_special_tokens)
    for context, continuation in pairs:
        if context == "":
            key = (continuation, special(continuation, False))
            plan.append(("empty", key))
            wanted[key] = None
            continue
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = context + continuation
        whole_key, context_key = (whole, special(whole)), (context, special(context))
        plan.append(("pair", whole_key, context_key))
        wanted[whole_key] = None
        wanted[context_key] = None

    ids = _encode_all(lm.tokenizer, list(wanted))
    out = []
    for (context, continuation), step in zip(pairs, plan):
        if step[0] == "empty":
            continuation_enc = ids[step[1]]
            if lm.prefix_token_id != continuation_enc[0]:
                context_enc, continuation_enc = [lm.prefix_token_id], list(continuation_enc)
            else:
                context_enc, continuation_enc = continuation_enc[:1], continuation_enc[1:]
        else:
            whole_enc, context_enc = ids[step[1]], list(ids[step[2]])
            continuation_enc = whole_enc[len(context_enc):]
        out.append(((context, continuation), context_enc, continuation_enc))
    return out


def _encode_all(tokenizer, keys: list[tuple[str, object]]) -> dict[tuple[str, object], list[int]]:
    """ids of every (string, add_special_tokens) key: ``tokenizer.encode(string, **kwargs)`` for each,
    batched where the tokenizer is a fast one (one backend call per chunk, the same ids)."""
    groups: dict[object, list[str]] = {}
    for string, flag in keys:
        groups.setdefault(flag, []).append(string)
    ids = {}
    for flag, strings in groups.items():
        kwargs = {} if flag == _DEFAULT else {"add_special_tokens": flag}
        if getattr(tokenizer, "is_fast", False):
            for lo in range(0, len(strings), _CHUNK):
                chunk = strings[lo : lo + _CHUNK]
                for string, encoded in zip(chunk, tokenizer(chunk, **kwargs)["input_ids"]):
                    ids[(string, flag)] = encoded
        else:
            for string in strings:
                ids[(string, flag)] = tokenizer.encode(string, **kwargs)
    return ids
