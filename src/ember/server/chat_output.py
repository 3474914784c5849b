"""One chat choice's output text -> OpenAI message fields (reasoning_content, content, tool_calls), whole or
as the deltas of a stream. Reasoning is split off first; the tool parser reads what remains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ember.server.tool_parsers.abstract import PartialToolCall, ToolParser


@dataclass
class _SentCall:
    id: str
    name: str
    arguments: str


class ChatOutputParser:
    """Parses one choice; make one per choice and request (a streaming parser remembers what it sent).

    Args:
        reasoning_parser: splits reasoning off (`ember.reasoning`), or None.
        tool_parser: finds tool calls in the content, or None (the content is plain text).
        max_tool_calls: keep at most this many calls (1 when `parallel_tool_calls` is false), or None.
        finishes_with_tool_calls: calls turn finish_reason "stop" into "tool_calls".

    With neither parser the message is the text itself, as before tool calling existed.
    """

    def __init__(self, reasoning_parser: Any = None, tool_parser: ToolParser | None = None,
                 max_tool_calls: int | None = None, finishes_with_tool_calls: bool = True) -> None:
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self.max_tool_calls = max_tool_calls
        self.finishes_with_tool_calls = finishes_with_tool_calls
        self._sent_reasoning = ""
        self._sent_content = ""
        self._sent_calls: list[_SentCall] = []
        self._has_message_calls = False

    @property
    def has_tool_calls(self) -> bool:
        """The message, or what the stream sent so far, has at least one tool call."""
        return self._has_message_calls or bool(self._sent_calls)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """The choice's finish_reason: "tool_calls" for an output that stopped after calling tools."""
        if engine_reason == "stop" and self.finishes_with_tool_calls and self.has_tool_calls:
            return "tool_calls"
        return engine_reason

    def message(self, text: str) -> dict:
        """The non-streaming `message` of a finished output (role, content, and the parsed parts)."""
        reasoning, content, calls = self._parse(text, is_final=True)
        message: dict[str, Any] = {"role": "assistant"}
        if self.reasoning_parser is not None:
            message["reasoning_content"] = reasoning or None
        if not calls:
            message["content"] = content if self.reasoning_parser is None else content or None
            return message
        message["content"] = content or None
        self._has_message_calls = True
        message["tool_calls"] = [_tool_call(self.tool_parser.make_tool_call_id(), c.name, c.arguments)
                                 for c in calls]
        return message

    def delta(self, text: str, is_final: bool) -> dict:
        """What `text` (the whole output so far) adds to what this parser already sent, as a `delta`.

        Fields appear only when they grew; text that may still turn into a marker is held back until
        it is decided, or until `is_final`. Joined, the deltas equal `message` — except for a call that
        turns out malformed after its name was sent: the stream keeps what it sent and adds nothing,
        where `message` falls back to the whole text as content.
        """
        reasoning, content, calls = self._parse(text, is_final)
        if self._sent_calls and not calls:
            # Malformed after a call was announced: the fallback content would repeat the call's text.
            content = self._sent_content
        delta: dict[str, Any] = {}
        if len(reasoning) > len(self._sent_reasoning) and reasoning.startswith(self._sent_reasoning):
            delta["reasoning_content"] = reasoning[len(self._sent_reasoning):]
            self._sent_reasoning = reasoning
        if len(content) > len(self._sent_content) and content.startswith(self._sent_content):
            delta["content"] = content[len(self._sent_content):]
            self._sent_content = content
        tool_deltas = self._tool_call_deltas(calls)
        if tool_deltas:
            delta["tool_calls"] = tool_deltas
        return delta

    def _parse(self, text: str, is_final: bool) -> tuple[str, str, list[PartialToolCall]]:
        reasoning, content = "", text
        if self.reasoning_parser is not None:
            split = self.reasoning_parser.split(text, is_final)
            reasoning, content = split.reasoning, split.content
        if self.tool_parser is None:
            return reasoning, content, []
        result = self.tool_parser.parse(content, is_final)
        calls = result.calls if self.max_tool_calls is None else result.calls[:self.max_tool_calls]
        return reasoning, result.content, calls

    def _tool_call_deltas(self, calls: list[PartialToolCall]) -> list[dict]:
        """vLLM's streamed calls: the first delta of a call has index, id, type and name; later ones add
        `function.arguments` fragments. A call is announced only once its name is known."""
        deltas = []
        for index, call in enumerate(calls):
            if call.name is None:
                break
            entry: dict[str, Any] = {"index": index}
            if index == len(self._sent_calls):
                sent = _SentCall(self.tool_parser.make_tool_call_id(), call.name, "")
                self._sent_calls.append(sent)
                entry.update(id=sent.id, type="function", function={"name": call.name})
            sent = self._sent_calls[index]
            if len(call.arguments) > len(sent.arguments) and call.arguments.startswith(sent.arguments):
                entry.setdefault("function", {})["arguments"] = call.arguments[len(sent.arguments):]
                sent.arguments = call.arguments
            if len(entry) > 1:
                deltas.append(entry)
        return deltas


def _tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
