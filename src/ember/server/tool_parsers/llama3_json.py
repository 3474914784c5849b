"""Llama 3.x JSON tool calls: the output is `{"name": ..., "parameters": {...}}` objects, `;`-separated."""

from __future__ import annotations

from ember.server.tool_parsers.abstract import ToolParser, ToolParseResult, call_from_object
from ember.server.tool_parsers.json_scan import JSONScanError, scan_object, skip_whitespace


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1-3.3's JSON-based tool calling (vLLM's `llama3_json`).

    An output that starts (after whitespace and an optional `<|python_tag|>`) with `{` is a list of
    calls separated by `;`, and has no content; any other output is all content. The arguments are
    under "parameters" (Meta's templates) or "arguments".
    """

    python_tag = "<|python_tag|>"

    def _parse(self, text: str, is_final: bool) -> ToolParseResult:
        i = skip_whitespace(text, 0)
        if text.startswith(self.python_tag, i):
            i = skip_whitespace(text, i + len(self.python_tag))
        elif not is_final and self.python_tag.startswith(text[i:]):
            return ToolParseResult("")  # nothing decided yet: the output may still open a call
        if i == len(text) or text[i] != "{":
            if not is_final and i == len(text):
                return ToolParseResult("")
            return ToolParseResult(text)
        calls = []
        while True:
            scan = scan_object(text, i)
            calls.append(call_from_object(text, scan, ("parameters", "arguments")))
            if scan.end is None:
                return ToolParseResult("", calls)
            i = skip_whitespace(text, scan.end)
            if i < len(text) and text[i] == ";":
                i = skip_whitespace(text, i + 1)
            elif i < len(text):
                raise JSONScanError("calls must be separated by ';'")
            if i == len(text):
                return ToolParseResult("", calls)
            if text[i] != "{":
                raise JSONScanError("a call must be a JSON object")
