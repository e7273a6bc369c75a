"""JSON-schema adherence: generated items, extraction from model output, and scoring."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from qgate.errors import QgateError
from qgate.evaluation.jsonschema_task import LEVELS, aggregate, extract_json, generate_items, score_output


@pytest.fixture(scope="module")
def items():
    return {item["level_name"]: item for item in generate_items(7, seed=0)}


def scores(item, text):
    s = score_output(item, text)
    return s["parseable"], s["schema_valid"], s["value_correct"]


def test_items_are_deterministic_and_cycle_through_the_levels():
    first, again, other = generate_items(21, seed=3), generate_items(21, seed=3), generate_items(21, seed=4)
    assert first == again
    assert [i["prompt"] for i in first] != [i["prompt"] for i in other]
    assert [i["level_name"] for i in first] == list(LEVELS) * 3
    assert len({i["id"] for i in first}) == 21
    assert generate_items(0) == []
    with pytest.raises(QgateError):
        generate_items(-1)


def test_every_schema_is_valid_and_every_expected_answer_scores_full_marks():
    for item in generate_items(140, seed=11):
        Draft202012Validator.check_schema(item["schema"])
        assert json.dumps(item["schema"]) in item["prompt"]
        if item["level_name"] == "open":
            assert item["expected"] is None
            continue
        assert scores(item, json.dumps(item["expected"])) == (1, 1, 1)


def test_level_types(items):
    item = items["types"]
    assert "Claude, age 44, height 1.63 m" in item["prompt"] and "not active" in item["prompt"]
    assert scores(item, '{"name": "Claude", "age": 44, "height_m": 1.63, "active": false}') == (1, 1, 1)
    # age as a string: invalid type, and not the expected value
    assert scores(item, '{"name": "Claude", "age": "44", "height_m": 1.63, "active": false}') == (1, 0, 0)
    # valid types, wrong boolean
    assert scores(item, '{"name": "Claude", "age": 44, "height_m": 1.63, "active": true}') == (1, 1, 0)
    # 0 is not false
    assert scores(item, '{"name": "Claude", "age": 44, "height_m": 1.63, "active": 0}') == (1, 0, 0)
    assert scores(item, "The user is Claude, 44 years old.") == (0, 0, 0)


def test_level_required(items):
    item = items["required"]
    right = '{"first_name": "Niklaus", "last_name": "Lindqvist", "birth_year": 1969, "city": "Nairobi"}'
    assert scores(item, right) == (1, 1, 1)
    # optional fields may be added; unknown ones may not
    assert scores(item, right[:-1] + ', "nickname": "Nik"}') == (1, 1, 1)
    assert scores(item, right[:-1] + ', "age": 55}') == (1, 0, 1)
    # a missing required field
    assert scores(item, '{"first_name": "Niklaus", "last_name": "Lindqvist", "city": "Nairobi"}') == (1, 0, 0)


def test_level_enum(items):
    item = items["enum"]
    right = '{"product": "notebook", "size": "large", "color": "black", "shipping": "pickup", "quantity": 4}'
    assert scores(item, right) == (1, 1, 1)
    assert scores(item, right.replace('"large"', '"Large"')) == (1, 0, 0)  # not in the enum
    assert scores(item, right.replace('"pickup"', '"express"')) == (1, 1, 0)  # valid, but not what was asked


def test_level_nested(items):
    item = items["nested"]
    right = ('{"name": "Claude", "address": {"street": "Oak Avenue", "number": 83, "city": "Quebec", '
             '"floor": 6}}')
    assert scores(item, right) == (1, 1, 1)
    flat = '{"name": "Claude", "street": "Oak Avenue", "number": 83, "city": "Quebec", "floor": 6}'
    assert scores(item, flat) == (1, 0, 0)
    assert scores(item, right.replace('"floor": 6', '"floor": -1')) == (1, 0, 0)


def test_level_array(items):
    item = items["array"]
    right = ('{"owner": "Frances", "items": [{"name": "onion", "quantity": 11}, '
             '{"name": "tomato", "quantity": 9}, {"name": "banana", "quantity": 6}]}')
    assert scores(item, right) == (1, 1, 1)
    two_items = '{"owner": "Frances", "items": [{"name": "onion", "quantity": 11}, {"name": "tomato", "quantity": 9}]}'
    assert scores(item, two_items) == (1, 0, 0)  # minItems 3
    reordered = ('{"owner": "Frances", "items": [{"name": "tomato", "quantity": 9}, '
                 '{"name": "onion", "quantity": 11}, {"name": "banana", "quantity": 6}]}')
    assert scores(item, reordered) == (1, 1, 0)
    strings = '{"owner": "Frances", "items": ["onion", "tomato", "banana"]}'
    assert scores(item, strings) == (1, 0, 0)


def test_level_pattern(items):
    item = items["pattern"]
    assert "August 4, 2027" in item["prompt"]
    right = '{"order_id": "GLR-0155", "date": "2027-08-04", "email": "sophie@post.example"}'
    assert scores(item, right) == (1, 1, 1)
    assert scores(item, right.replace("2027-08-04", "August 4, 2027")) == (1, 0, 0)
    assert scores(item, right.replace("GLR-0155", "glr-155")) == (1, 0, 0)
    assert scores(item, right.replace("2027-08-04", "2027-04-08")) == (1, 1, 0)  # valid form, wrong date


def test_level_open_scores_validity_only(items):
    item = items["open"]
    good = ('{"id": "SR204", "title": "Orbit 2.0", "status": "active", '
            '"owner": {"name": "Ada", "role": "editor"}, "tags": ["cli", "release"], "score": 0.8}')
    assert scores(item, good) == (1, 1, None)
    assert scores(item, good.replace('"SR204"', '"sr-204"')) == (1, 0, None)
    assert scores(item, good.replace('"score": 0.8', '"score": 1.5')) == (1, 0, None)
    assert scores(item, "no JSON here") == (0, 0, None)


def test_extract_json_from_typical_outputs():
    assert extract_json('{"a": 1}') == {"a": 1}
    fenced = 'Sure! Here it is:\n```json\n{"a": {"b": [1, 2]}}\n```\nHope this helps.'
    assert extract_json(fenced) == {"a": {"b": [1, 2]}}
    assert extract_json('```\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('The answer {is} this: {"a": 1} and then {"b": 2}') == {"a": 1}
    assert extract_json('```json\n{"a": 1,\n```') is None  # truncated inside the fence
    assert extract_json('[1, 2, 3]') is None  # not an object
    assert extract_json('{"a": NaN}') is None  # not JSON
    assert extract_json("") is None
    assert extract_json('{"a": "}{"}') == {"a": "}{"}


def test_aggregate_rates():
    item_sets = generate_items(7, seed=0)
    outputs = [json.dumps(i["expected"]) if i["expected"] else "nothing" for i in item_sets]
    outputs[0] = "garbage"
    agg = aggregate([score_output(i, o) for i, o in zip(item_sets, outputs)])
    assert agg == {"parseable": 5 / 7, "schema_valid": 5 / 7, "value_correct": 5 / 6, "n": 7, "n_determined": 6}
    with pytest.raises(QgateError):
        aggregate([])
