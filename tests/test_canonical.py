"""Canonical JSON and the content hashes built on it, pinned site by site.

Stored databases and data caches are keyed on these hashes: a change of spelling (ASCII escapes,
NaN, key order of non-string keys) would orphan them, so every site's hash of a non-ASCII value is
pinned here.
"""

from __future__ import annotations

import math

import pytest

from qgate.canonical import canonical_json, content_hash
from qgate.evaluation import data
from qgate.evaluation.suite import Suite, TaskSpec

NON_ASCII = {"text": "Grüße — 東京 ✓", "tuple": ("ä", 1), "n": 2, "x": 0.5, "none": None}


def test_canonical_json_spelling_and_hash():
    assert canonical_json(NON_ASCII) == ('{"n":2,"none":null,"text":"Grüße — 東京 ✓","tuple":["ä",1],"x":0.5}')
    assert content_hash(NON_ASCII) == "85261cd42c8862111a639ab4d785b59481380dd175a757866728ca67c500f0de"
    # NaN/inf become null, non-string keys become strings (then sorted as strings)
    assert canonical_json({"a": math.nan, 10: "x", 2: "y"}) == '{"10":"x","2":"y","a":null}'


def test_the_older_spellings_are_parameters():
    assert canonical_json({"a": math.nan, "t": ("é",)}, safe=False) == '{"a":NaN,"t":["é"]}'
    assert canonical_json({10: "x", 2: "y"}, safe=False) == '{"2":"y","10":"x"}'
    assert canonical_json({"t": "é"}, ensure_ascii=True) == '{"t":"\\u00e9"}'
    with pytest.raises(TypeError):
        canonical_json({"o": object()}, safe=False)


def _task(**extra) -> TaskSpec:
    return TaskSpec(name="pin", lm_eval_task="qgate_pin", data={"source": "pin_src", "note": "naïve"}, num_fewshot=0,
                    metric="acc", higher_is_better=True, per_sample="binary", generation={"until": ["。", "\n"]},
                    system_instruction="Réponds en français — 短く", **extra)


def test_suite_hashes_are_pinned():
    task = _task()
    assert task.hash == "6e3cf2e85a0b08b567d6b045936bd42e646e24503c938249fa6180647b37a993"
    assert Suite("pin", [task]).hash == "c2e18467aa0d2dfbe721523e59afac82b909eb3a6deccdae4d09ad2348093209"


def test_task_config_hash_is_pinned(monkeypatch):
    import lm_eval

    from qgate.evaluation import runner

    monkeypatch.setattr(runner, "__version__", "0.0.pin")
    monkeypatch.setattr(lm_eval, "__version__", "0.0.pin", raising=False)
    # this key spells non-ASCII text as \u escapes (json.dumps's default), unlike the others
    assert runner._config_hash(_task(), 7, "ab" * 32) == "a31d9ef881765fa766cb237cdc43a2de6bde12baf3e6f599dabca2e453018e06"


class _Tokenizer:
    def get_vocab(self):
        return {"ü": 3, "東": 1, "a": 2}


def test_offline_data_keys_and_bytes_are_pinned(tmp_path, monkeypatch):
    monkeypatch.setenv("QGATE_CACHE", str(tmp_path))
    rows = [{"split": "test", "text": "Grüße — 東京 ✓", "nested": {"b": [1, 2.5], "a": None}},
            # data rows keep json.dumps's own spelling: NaN stays NaN, integer keys sort as numbers
            {"split": "test", "score": math.nan, "by_int": {10: "x", 2: "y"}}]
    monkeypatch.setitem(data.SOURCES, "pin_src",
                        data.Source(lambda params, tok: (rows, f"pinned rows, {params['label']}"),
                                    {"label": "ß"}, {"label": (lambda v: isinstance(v, str), "text")}))
    made = data.materialize("pin_src", {"label": "東京"})
    assert made.path.name == "pin_src-b0a5d244aca05a82f843.jsonl"
    assert made.sha256 == "1cbcdd8a06ff4868b79c7552265db00847af7157b2ebab7a6a98bd4e48c331d7"
    lines = made.path.read_text(encoding="utf-8").splitlines()
    assert lines[1] == '{"by_int":{"2":"y","10":"x"},"score":NaN,"split":"test"}'
    assert data._derived_seed("ü", 3, ("東", None)) == 12079616355925633454
    assert data.tokenizer_fingerprint(_Tokenizer()) == "d60bf155a7a6c0e7"


def test_signoff_digest_is_pinned():
    from qgate.report.payload import digest_of, payload_text

    payload = {"format": "qgate-signoff/1", "run": {"id": 1, "host": "hôte"},
               "results": [{"task": "ifeval", "reason": "−2.3 pts ✓", "value": math.inf}], "report_sha256": "0" * 64}
    assert payload_text(payload) == ('{"format":"qgate-signoff/1","report_sha256":"' + "0" * 64 + '","results":'
                                     '[{"reason":"−2.3 pts ✓","task":"ifeval","value":null}],"run":{"host":"hôte","id":1}}')
    assert digest_of(payload) == "7edaba71dd47d69758ee0e8a6fe9ebaf3ecb9e22fab621ab89c657470ac3b3a4"
