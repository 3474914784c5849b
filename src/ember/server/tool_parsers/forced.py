"""The outputs that `tool_choice` "required" and a named function force with a grammar."""

from __future__ import annotations

from ember.server.tool_parsers.abstract import PartialToolCall, ToolParser, ToolParseResult, call_from_object
from ember.server.tool_parsers.json_scan import JSONScanError, scan_object_array, skip_whitespace


class NamedFunctionParser(ToolParser):
    """tool_choice names one function: the whole output is that call's arguments object (as vLLM).

    The call is kept even when the output was cut short (finish_reason "length"), as OpenAI does.
    """

    def __init__(self, function_name: str, tokenizer=None) -> None:
        super().__init__(tokenizer)
        self.function_name = function_name

    def _parse(self, text: str, is_final: bool) -> ToolParseResult:
        return ToolParseResult("", [PartialToolCall(self.function_name, text, is_final)])


class RequiredFunctionsParser(ToolParser):
    """tool_choice "required": the output is a JSON array of `{"name": ..., "parameters": {...}}`."""

    def _parse(self, text: str, is_final: bool) -> ToolParseResult:
        i = skip_whitespace(text, 0)
        if i == len(text):
            if is_final:
                raise JSONScanError("no calls")
            return ToolParseResult("")
        if text[i] != "[":
            raise JSONScanError("the calls must be a JSON array")
        scan = scan_object_array(text, i)
        if is_final and scan.end is None:
            raise JSONScanError("the call array is cut short")
        return ToolParseResult("", [call_from_object(text, item, ("parameters",)) for item in scan.items])
