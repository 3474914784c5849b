"""A scanner for JSON that is still being generated: where members and values start and end, before the
text is complete. It decides structure only; `json.loads` still validates each finished call."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

WHITESPACE = " \t\n\r"
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_STRUCTURE = re.compile(r'["{}\[\]]')
_SCALAR_END = re.compile(r'[\s,:}\]]')
_CLOSER = {"{": "}", "[": "]"}


class JSONScanError(ValueError):
    """The text cannot be the start of the JSON shape a parser expects (a malformed tool call)."""


@dataclass
class ObjectScan:
    """A JSON object scanned from `start`.

    members: key -> (value start, value end or None while the value is still open); keys whose name
        has not closed yet are absent. end: index after the closing brace, None while open.
    """

    start: int
    members: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None


@dataclass
class ArrayScan:
    """A JSON array of objects scanned from `start`; the last item may be open. end: None while open."""

    start: int
    items: list[ObjectScan] = field(default_factory=list)
    end: int | None = None


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def scan_string(text: str, pos: int) -> int | None:
    """Index after the string opening at `text[pos]` (a quote), None if it has not closed yet."""
    match = _STRING.match(text, pos)
    return match.end() if match else None


def scan_value(text: str, pos: int) -> int | None:
    """Index after the JSON value starting at `text[pos]`, None if the text ends before it does.

    A number at the very end of the text counts as open (more digits may follow).

    Raises:
        JSONScanError: no JSON value starts with that character, or a bracket closes the wrong opener.
    """
    first = text[pos]
    if first == '"':
        return scan_string(text, pos)
    if first in "{[":
        return _scan_container(text, pos)
    if first in "-0123456789tfn":
        match = _SCALAR_END.search(text, pos)
        return match.start() if match else None
    raise JSONScanError(f"no JSON value starts with {first!r}")


def _scan_container(text: str, pos: int) -> int | None:
    openers = [text[pos]]
    i = pos + 1
    while True:
        match = _STRUCTURE.search(text, i)
        if match is None:
            return None
        char, i = match.group(), match.start()
        if char == '"':
            end = scan_string(text, i)
            if end is None:
                return None
            i = end
            continue
        if char in _CLOSER:
            openers.append(char)
        elif _CLOSER[openers.pop()] != char:
            raise JSONScanError(f"{char!r} closes a different bracket")
        elif not openers:
            return i + 1
        i += 1


def scan_object(text: str, pos: int) -> ObjectScan:
    """Scan the object opening at `text[pos]` (a brace) as far as the text goes.

    Raises:
        JSONScanError: the text so far cannot be a JSON object.
    """
    scan = ObjectScan(pos)
    i = skip_whitespace(text, pos + 1)
    if i < len(text) and text[i] == "}":
        scan.end = i + 1
        return scan
    while i < len(text):
        if text[i] != '"':
            raise JSONScanError("an object key must be a string")
        key_end = scan_string(text, i)
        if key_end is None:
            return scan
        key = _decode_key(text[i:key_end])
        i = skip_whitespace(text, key_end)
        if i == len(text):
            return scan
        if text[i] != ":":
            raise JSONScanError("':' must follow an object key")
        i = skip_whitespace(text, i + 1)
        if i == len(text):
            return scan
        value_end = scan_value(text, i)
        scan.members[key] = (i, value_end)
        if value_end is None:
            return scan
        i = skip_whitespace(text, value_end)
        if i == len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] != ",":
            raise JSONScanError("',' or '}' must follow an object member")
        i = skip_whitespace(text, i + 1)
    return scan


def scan_object_array(text: str, pos: int) -> ArrayScan:
    """Scan the array of objects opening at `text[pos]` (a bracket) as far as the text goes.

    Raises:
        JSONScanError: the text so far cannot be a JSON array of objects.
    """
    scan = ArrayScan(pos)
    i = skip_whitespace(text, pos + 1)
    if i < len(text) and text[i] == "]":
        scan.end = i + 1
        return scan
    while i < len(text):
        if text[i] != "{":
            raise JSONScanError("each item must be a JSON object")
        item = scan_object(text, i)
        scan.items.append(item)
        if item.end is None:
            return scan
        i = skip_whitespace(text, item.end)
        if i == len(text):
            return scan
        if text[i] == "]":
            scan.end = i + 1
            return scan
        if text[i] != ",":
            raise JSONScanError("',' or ']' must follow an array item")
        i = skip_whitespace(text, i + 1)
    return scan


def _decode_key(token: str) -> str:
    try:
        return json.loads(token)
    except ValueError:
        raise JSONScanError(f"invalid object key {token}") from None
