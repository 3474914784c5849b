"""Mistral tool calls: `[TOOL_CALLS]` and then a JSON array of `{"name": ..., "arguments": {...}}`."""

from __future__ import annotations

import random
import string

from ember.reasoning.abstract import hold_back
from ember.server.tool_parsers.abstract import ToolParser, ToolParseResult, call_from_object
from ember.server.tool_parsers.json_scan import JSONScanError, scan_object_array, skip_whitespace

_ID_ALPHABET = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    """Mistral 7B v0.3 / Mixtral / Nemo style (the pre-v11 array format).

    Content is the text before `[TOOL_CALLS]`. `[TOOL_CALLS]` is a control token, so the server keeps
    special tokens in the text for this parser. Ids are 9 letters and digits, because Mistral's chat
    templates refuse any other tool-call id in the history (vLLM does the same).
    """

    bot_token = "[TOOL_CALLS]"
    skip_special_tokens = False

    def _parse(self, text: str, is_final: bool) -> ToolParseResult:
        first = text.find(self.bot_token)
        if first < 0:
            return ToolParseResult(hold_back(text, self.bot_token, is_final))
        i = skip_whitespace(text, first + len(self.bot_token))
        if i == len(text):
            if is_final:
                raise JSONScanError("[TOOL_CALLS] is not followed by calls")
            return ToolParseResult(text[:first])
        if text[i] != "[":
            raise JSONScanError("[TOOL_CALLS] must be followed by a JSON array")
        scan = scan_object_array(text, i)
        calls = [call_from_object(text, item, ("arguments",)) for item in scan.items]
        if is_final and scan.end is None:
            raise JSONScanError("the call array is cut short")
        return ToolParseResult(text[:first], calls)

    def make_tool_call_id(self) -> str:
        return "".join(random.choices(_ID_ALPHABET, k=9))
