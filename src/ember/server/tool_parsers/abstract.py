"""The tool-parser contract: model text -> content plus tool calls, the same whole or streamed."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ember.server.tool_parsers.json_scan import JSONScanError, ObjectScan


@dataclass
class PartialToolCall:
    """One call as far as the text goes.

    name: None until the name's string has closed. arguments: the arguments' JSON text so far, exactly
    as the model wrote it (an open object or array grows as text arrives; a string or number appears
    once it has closed). is_complete: the call's text has closed.
    """

    name: str | None
    arguments: str
    is_complete: bool


@dataclass
class ToolParseResult:
    """content: the text that is not a call; calls: in output order (empty when there are none)."""

    content: str
    calls: list[PartialToolCall] = field(default_factory=list)


class ToolParser:
    """Finds tool calls in a model's output; one subclass per output format.

    Subclasses implement `_parse`, raising `JSONScanError` when the text is not a well-formed call.
    `parse` turns that, and a call cut short in a final text, into the plain-content fallback: the
    whole text is content and there are no calls (as vLLM answers a malformed call).

    Invariant (what streaming relies on): for a text that grows by appending, `parse(text, False)`
    only grows — content by appending, calls by appending calls, a call's arguments by appending text,
    a name only from None to its value — and `parse(full_text, True)` extends every earlier result,
    unless the text turns out malformed after a call was already seen (then streaming has sent what
    it sent; the non-streaming answer is the fallback).

    Args:
        tokenizer: the served tokenizer (parsers that need token ids read it; the text parsers don't).
    """

    # None: keep the request's skip_special_tokens; False: the format's markers are special tokens
    # that detokenizing would drop, so the server keeps them.
    skip_special_tokens: bool | None = None

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def parse(self, text: str, is_final: bool = True) -> ToolParseResult:
        """Content and calls of the output so far; `is_final`: no more text will come."""
        try:
            result = self._parse(text, is_final)
        except JSONScanError:
            return ToolParseResult(text)
        if is_final and any(not call.is_complete for call in result.calls):
            return ToolParseResult(text)  # cut short inside a call
        return result

    def _parse(self, text: str, is_final: bool) -> ToolParseResult:
        raise NotImplementedError

    def make_tool_call_id(self) -> str:
        """A fresh tool-call id, vLLM's form."""
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


def call_from_object(text: str, scan: ObjectScan, argument_keys: tuple[str, ...]) -> PartialToolCall:
    """The call an object scan holds: its "name" and the first of `argument_keys` present.

    A closed object must be valid JSON with a string name; one without arguments gets "{}".

    Raises:
        JSONScanError: the closed object is not valid JSON, or its name is missing or not a string.
    """
    name = None
    span = scan.members.get("name")
    if span is not None and span[1] is not None:
        name = _loads(text[span[0]:span[1]])
        if not isinstance(name, str):
            raise JSONScanError("a tool call's name must be a string")
    if scan.end is not None:
        _loads(text[scan.start:scan.end])
        if name is None:
            raise JSONScanError("a tool call needs a name")
    key = next((k for k in argument_keys if k in scan.members), None)
    if key is None:
        arguments = "{}" if scan.end is not None else ""
    else:
        start, end = scan.members[key]
        if end is not None:
            arguments = text[start:end]
        else:  # an open object or array: everything after its opener belongs to it
            arguments = text[start:] if text[start] in "{[" else ""
    return PartialToolCall(name, arguments, scan.end is not None)


def _loads(fragment: str) -> Any:
    try:
        return json.loads(fragment)
    except ValueError:
        raise JSONScanError("a tool call is not valid JSON") from None
