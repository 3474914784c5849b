"""Hermes / Qwen tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call."""

from __future__ import annotations

from ember.reasoning.abstract import hold_back
from ember.server.tool_parsers.abstract import ToolParser, ToolParseResult, call_from_object
from ember.server.tool_parsers.json_scan import JSONScanError, scan_object, skip_whitespace


class HermesToolParser(ToolParser):
    """The format of ember's shipped `hermes_tools.jinja` template (and of Hermes 2/3 and Qwen2.5 models).

    Content is the text before the first `<tool_call>`; text between and after the blocks is dropped
    (as vLLM). Each block's JSON object ends the call, so a `</tool_call>` inside an argument string
    does not cut it, and a missing closing tag after a whole object is forgiven.
    """

    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def _parse(self, text: str, is_final: bool) -> ToolParseResult:
        first = text.find(self.start_tag)
        if first < 0:
            return ToolParseResult(hold_back(text, self.start_tag, is_final))
        calls = []
        pos = first
        while pos >= 0:
            i = skip_whitespace(text, pos + len(self.start_tag))
            if i == len(text):
                if is_final:
                    raise JSONScanError("a <tool_call> block is empty")
                break
            if text[i] != "{":
                raise JSONScanError("a <tool_call> block must hold a JSON object")
            scan = scan_object(text, i)
            calls.append(call_from_object(text, scan, ("arguments",)))
            if scan.end is None:
                break
            pos = text.find(self.start_tag, scan.end)
        return ToolParseResult(text[:first], calls)
