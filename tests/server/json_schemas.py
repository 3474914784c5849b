"""Twenty JSON schemas of the kinds agents send: nested objects, bounded arrays, enums, required fields,
number ranges and string patterns. Each is paired with a short instruction for the model."""

from __future__ import annotations

SCHEMAS: list[tuple[str, dict]] = [
    ("A person.", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("A city and its country.", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 1}}, "required": ["city", "country"]}),
    ("The weather.", {"type": "object", "properties": {
        "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]},
        "temperature_c": {"type": "number", "minimum": -50, "maximum": 60}},
        "required": ["condition", "temperature_c"], "additionalProperties": False}),
    ("A shopping list.", {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4}},
        "required": ["items"], "additionalProperties": False}),
    ("A book.", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 50},
        "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 20},
                                                    "last": {"type": "string", "maxLength": 20}},
                   "required": ["first", "last"], "additionalProperties": False},
        "year": {"type": "integer", "minimum": 1450, "maximum": 2030}},
        "required": ["title", "author", "year"], "additionalProperties": False}),
    ("A product code.", {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "in_stock": {"type": "boolean"}},
        "required": ["sku", "in_stock"], "additionalProperties": False}),
    ("A date.", {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"}},
        "required": ["date"], "additionalProperties": False}),
    ("A rating.", {"type": "object", "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": {"type": "string", "maxLength": 60}},
        "required": ["stars"], "additionalProperties": False}),
    ("A list of three scores.", {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100},
                                 "minItems": 3, "maxItems": 3}),
    ("A colour in RGB.", {"type": "object", "properties": {
        c: {"type": "integer", "minimum": 0, "maximum": 255} for c in ("r", "g", "b")},
        "required": ["r", "g", "b"], "additionalProperties": False}),
    ("A traffic light state.", {"enum": ["red", "amber", "green"]}),
    ("A team of players.", {"type": "object", "properties": {
        "team": {"type": "string", "maxLength": 30},
        "players": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                             "number": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["name", "number"], "additionalProperties": False}}},
        "required": ["team", "players"], "additionalProperties": False}),
    ("An email address.", {"type": "object", "properties": {
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org|net)$"}},
        "required": ["email"], "additionalProperties": False}),
    ("A yes or no answer with a confidence.", {"type": "object", "properties": {
        "answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["answer", "confidence"], "additionalProperties": False}),
    ("A recipe.", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30},
        "ingredients": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        "minutes": {"type": "integer", "minimum": 1, "maximum": 240}},
        "required": ["name", "ingredients", "minutes"], "additionalProperties": False}),
    ("A point in 3D.", {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}, "z": {"type": "number"}},
        "required": ["x", "y", "z"], "additionalProperties": False}),
    ("A user account.", {"type": "object", "properties": {
        "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
        "role": {"enum": ["admin", "editor", "viewer"]}, "active": {"type": "boolean"}},
        "required": ["username", "role", "active"], "additionalProperties": False}),
    ("A flight.", {"type": "object", "properties": {
        "from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "seats": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["from", "to", "seats"], "additionalProperties": False}),
    ("Tags for a photo.", {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["beach", "city", "night", "people", "food"]},
                 "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False}),
    ("An order with a shipping address.", {"type": "object", "properties": {
        "order_id": {"type": "integer", "minimum": 1000, "maximum": 9999},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 30}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"], "additionalProperties": False}},
        "required": ["order_id", "address"], "additionalProperties": False}),
]
