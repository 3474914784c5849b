"""Reads a request's output constraint: OpenAI's `response_format`, vLLM's `structured_outputs` and the older
`guided_*` fields, into one `StructuredOutputsParams` (or None)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ember.sampling_params import StructuredOutputsParams
from ember.server.errors import APIError

# vLLM's pre-0.10 names, still accepted: request field -> StructuredOutputsParams field.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
_PARAM_FIELDS = {f.name for f in dataclasses.fields(StructuredOutputsParams)}


def structured_outputs_from_request(req: Any) -> StructuredOutputsParams | None:
    """The constraint a chat or completions request asks for; a malformed or conflicting one is a 400.

    Raises:
        APIError: two constraints at once, an unknown `response_format` type, a `json_schema` format
            without a schema, unknown `structured_outputs` keys.
    """
    found: list[tuple[str, StructuredOutputsParams]] = []
    response_format = getattr(req, "response_format", None)
    if response_format:
        params = _from_response_format(response_format)
        if params is not None:
            found.append(("response_format", params))
    if getattr(req, "structured_outputs", None) is not None:
        found.append(("structured_outputs", _from_fields(req.structured_outputs, "structured_outputs")))
    guided = {target: getattr(req, name) for name, target in GUIDED_FIELDS.items()
              if getattr(req, name, None) is not None}
    if guided:
        found.append((next(iter(guided)), _from_fields(guided, "guided_json")))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(f"only one kind of structured outputs constraint may be given, got {names}", 400, found[1][0])
    return found[0][1] if found else None


def _from_response_format(response_format: dict) -> StructuredOutputsParams | None:
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError("response_format json_schema needs json_schema.schema, a JSON schema object",
                           400, "response_format")
        return StructuredOutputsParams(json=schema)
    raise APIError(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                   400, "response_format")


def _from_fields(fields: dict, param: str) -> StructuredOutputsParams:
    if not isinstance(fields, dict):
        raise APIError(f"{param} must be an object", 400, param)
    unknown = sorted(set(fields) - _PARAM_FIELDS)
    if unknown:
        raise APIError(f"unknown {param} fields: {unknown}", 400, param)
    try:
        return StructuredOutputsParams(**fields)
    except (TypeError, ValueError) as exc:
        raise APIError(str(exc), 400, param) from None
