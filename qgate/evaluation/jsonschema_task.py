"""JSON-schema adherence: prompts that ask for a JSON object valid against a given schema.

No package ships JSONSchemaBench's data, so the items are generated here, deterministically from a
seed, in seven levels of growing difficulty:

  types     flat object, string/integer/number/boolean fields, all required
  required  required and optional fields, no additional properties
  enum      values restricted to an enum
  nested    an object inside the object
  array     an array of objects with a fixed length
  pattern   strings that must match regular expressions (dates to reformat, ids, emails)
  open      all of the above, nothing dictated by the prompt: only validity is scored

Each item: id, level, level_name, prompt, schema and expected (the values the prompt dictates, a
complete valid answer itself; None for the open level).

Scores per output: parseable (a JSON object could be read), schema_valid (the `jsonschema`
library, Draft 2020-12), value_correct (every expected value present and equal; None when the
prompt leaves the values open).
"""

from __future__ import annotations

import json
import random
import re

from qgate.errors import QgateError

LEVELS = ("types", "required", "enum", "nested", "array", "pattern", "open")

_NAMES = ("Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances", "Edsger",
          "Radia", "Tim", "Katherine", "Hedy", "Claude", "Sophie", "Niklaus", "Donald", "Leslie", "Annie")
_SURNAMES = ("Moreau", "Okafor", "Lindqvist", "Tanaka", "Silva", "Novak", "Haddad", "Kowalski", "Reyes", "Brandt")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Quebec", "Tunis", "Perth", "Gdansk", "Porto", "Cusco",
           "Bergen")
_STREETS = ("Harbor Street", "Mill Lane", "Oak Avenue", "Station Road", "River Walk", "Market Square", "Hill Road")
_PRODUCTS = ("shirt", "mug", "lamp", "backpack", "notebook", "scarf", "kettle", "umbrella")
_SIZES = ("small", "medium", "large")
_COLORS = ("red", "green", "blue", "black", "white", "yellow")
_SHIPPING = ("standard", "express", "pickup")
_FOODS = ("apple", "pear", "carrot", "onion", "lemon", "potato", "tomato", "banana", "cucumber", "plum")
_ROLES = ("admin", "editor", "viewer")
_DOMAINS = ("example.org", "mail.test", "post.example")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")

_INSTRUCTIONS = ("Reply with a single JSON object that validates against this JSON Schema:\n{schema}\n\n"
                 "{facts}\nAnswer with the JSON object only.")


def _obj(properties: dict, required: list[str], closed: bool = True) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _level_types(rng: random.Random):
    name, age = rng.choice(_NAMES), rng.randint(18, 90)
    height = round(rng.uniform(1.50, 1.99), 2)
    active = rng.random() < 0.5
    schema = _obj({"name": {"type": "string"}, "age": {"type": "integer"},
                   "height_m": {"type": "number"}, "active": {"type": "boolean"}},
                  ["name", "age", "height_m", "active"], closed=False)
    facts = (f"The user's name is {name}, age {age}, height {height} m, and the account is "
             f"{'active' if active else 'not active'}.")
    return schema, facts, {"name": name, "age": age, "height_m": height, "active": active}


def _level_required(rng: random.Random):
    first, last, city = rng.choice(_NAMES), rng.choice(_SURNAMES), rng.choice(_CITIES)
    year = rng.randint(1950, 2005)
    schema = _obj({"first_name": {"type": "string"}, "last_name": {"type": "string"},
                   "birth_year": {"type": "integer", "minimum": 1900, "maximum": 2025},
                   "city": {"type": "string"}, "nickname": {"type": "string"}, "phone": {"type": "string"}},
                  ["first_name", "last_name", "birth_year", "city"])
    facts = f"{first} {last} was born in {year} and lives in {city}. Nickname and phone are unknown."
    return schema, facts, {"first_name": first, "last_name": last, "birth_year": year, "city": city}


def _level_enum(rng: random.Random):
    product, size, color = rng.choice(_PRODUCTS), rng.choice(_SIZES), rng.choice(_COLORS)
    shipping, quantity = rng.choice(_SHIPPING), rng.randint(1, 9)
    schema = _obj({"product": {"type": "string"}, "size": {"enum": list(_SIZES)},
                   "color": {"type": "string", "enum": list(_COLORS)},
                   "shipping": {"enum": list(_SHIPPING)}, "quantity": {"type": "integer", "minimum": 1}},
                  ["product", "size", "color", "shipping", "quantity"])
    facts = (f"A customer orders {quantity} {size} {color} {product}{'s' if quantity > 1 else ''} "
             f"(product: {product}) with {shipping} shipping.")
    return schema, facts, {"product": product, "size": size, "color": color, "shipping": shipping,
                           "quantity": quantity}


def _level_nested(rng: random.Random):
    name, street, city = rng.choice(_NAMES), rng.choice(_STREETS), rng.choice(_CITIES)
    number, floor = rng.randint(1, 200), rng.randint(0, 12)
    address = _obj({"street": {"type": "string"}, "number": {"type": "integer"},
                    "city": {"type": "string"}, "floor": {"type": "integer", "minimum": 0}},
                   ["street", "number", "city", "floor"])
    schema = _obj({"name": {"type": "string"}, "address": address}, ["name", "address"])
    facts = f"{name} lives at {street} {number}, floor {floor}, in {city}."
    return schema, facts, {"name": name, "address": {"street": street, "number": number, "city": city,
                                                     "floor": floor}}


def _level_array(rng: random.Random):
    owner, count = rng.choice(_NAMES), rng.randint(2, 4)
    foods = rng.sample(_FOODS, count)
    items = [{"name": food, "quantity": rng.randint(1, 12)} for food in foods]
    item_schema = _obj({"name": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                       ["name", "quantity"])
    schema = _obj({"owner": {"type": "string"},
                   "items": {"type": "array", "items": item_schema, "minItems": count, "maxItems": count}},
                  ["owner", "items"])
    listed = ", ".join(f"{it['name']} (quantity {it['quantity']})" for it in items)
    facts = f"{owner}'s shopping list, in this order: {listed}."
    return schema, facts, {"owner": owner, "items": items}


def _level_pattern(rng: random.Random):
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(3))
    order_id = f"{letters}-{rng.randint(0, 9999):04d}"
    year, month, day = rng.randint(2015, 2030), rng.randint(1, 12), rng.randint(1, 28)
    user = rng.choice(_NAMES).lower()
    email = f"{user}@{rng.choice(_DOMAINS)}"
    schema = _obj({"order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                   "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                   "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+(\\.[a-z]+)+$"}},
                  ["order_id", "date", "email"])
    facts = (f"Order {order_id} was placed on {_MONTHS[month - 1]} {day}, {year} by {email}. "
             "Write the date as YYYY-MM-DD.")
    return schema, facts, {"order_id": order_id, "date": f"{year:04d}-{month:02d}-{day:02d}", "email": email}


def _level_open(rng: random.Random):
    kind = rng.choice(("library book", "museum exhibit", "train ticket", "software release"))
    schema = _obj({
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "title": {"type": "string", "minLength": 3},
        "status": {"enum": ["draft", "active", "archived"]},
        "owner": _obj({"name": {"type": "string"}, "role": {"enum": list(_ROLES)}}, ["name", "role"]),
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 5},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    }, ["id", "title", "status", "owner", "tags", "score"])
    facts = f"Invent a plausible record for a fictional {kind}."
    return schema, facts, None


_BUILDERS = (_level_types, _level_required, _level_enum, _level_nested, _level_array, _level_pattern,
             _level_open)


def generate_items(n: int, seed: int = 0) -> list[dict]:
    """n items cycling through the levels (item i has level i % 7 + 1), reproducible from `seed`."""
    if n < 0:
        raise QgateError(f"jsonschema task: n={n}; expected a non-negative number of items")
    rng = random.Random(f"qgate-jsonschema-{seed}")
    items = []
    for i in range(n):
        index = i % len(LEVELS)
        schema, facts, expected = _BUILDERS[index](rng)
        prompt = _INSTRUCTIONS.format(schema=json.dumps(schema), facts=facts)
        items.append({"id": f"jsonschema-{seed}-{i}", "level": index + 1, "level_name": LEVELS[index],
                      "prompt": prompt, "schema": schema, "expected": expected})
    return items


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_FENCED = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def _first_object_in(text: str):
    for match in re.finditer(r"\{", text):
        try:
            value, _ = _DECODER.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def extract_json(text: str):
    """The first JSON object in a model's output (inside ``` fences if there are any), or None."""
    for block in _FENCED.findall(text):
        value = _first_object_in(block)
        if value is not None:
            return value
    return _first_object_in(text)


def _matches(expected, actual) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(_matches(e, a) for e, a in zip(expected, actual)))
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, (int, float)):
        return isinstance(actual, (int, float)) and abs(expected - actual) <= 1e-9 * max(1.0, abs(expected))
    if isinstance(expected, str):
        return isinstance(actual, str) and actual.strip() == expected
    return expected == actual


def score_output(item: dict, text: str) -> dict:
    """parseable / schema_valid as 0 or 1; value_correct 0 or 1, or None when the prompt leaves values open."""
    from jsonschema import Draft202012Validator

    value = extract_json(text)
    parseable = value is not None
    valid = parseable and Draft202012Validator(item["schema"]).is_valid(value)
    expected = item.get("expected")
    correct = None if expected is None else int(parseable and _matches(expected, value))
    return {"parseable": int(parseable), "schema_valid": int(valid), "value_correct": correct}


def aggregate(scores: list[dict]) -> dict:
    """Rates over all items; value_correct over the items whose values are determined."""
    if not scores:
        raise QgateError("jsonschema task: no scored outputs to aggregate")
    determined = [s["value_correct"] for s in scores if s["value_correct"] is not None]
    return {
        "parseable": sum(s["parseable"] for s in scores) / len(scores),
        "schema_valid": sum(s["schema_valid"] for s in scores) / len(scores),
        "value_correct": sum(determined) / len(determined) if determined else None,
        "n": len(scores),
        "n_determined": len(determined),
    }
