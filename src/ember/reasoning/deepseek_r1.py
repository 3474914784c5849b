"""DeepSeek-R1's reasoning format: the output begins inside reasoning, `</think>` ends it."""

from __future__ import annotations

from ember.reasoning.abstract import ReasoningParser, ReasoningSplit, hold_back


class DeepSeekR1ReasoningParser(ReasoningParser):
    """Everything before the first `</think>` is reasoning, everything after it is content.

    The chat template opens `<think>` in the prompt, so the output usually starts inside the reasoning;
    a `<think>` the model writes itself at the start (after any whitespace) is dropped. An output with
    no `</think>` (cut short) is all reasoning, as in vLLM.
    """

    def split(self, text: str, is_final: bool = True) -> ReasoningSplit:
        body = text
        stripped = text.lstrip()
        if stripped.startswith(self.start_tag):
            body = stripped[len(self.start_tag):]
        elif not is_final and self.start_tag.startswith(stripped):
            return ReasoningSplit("", "")  # the output may still open with <think>
        end = body.find(self.end_tag)
        if end >= 0:
            return ReasoningSplit(body[:end], body[end + len(self.end_tag):])
        return ReasoningSplit(hold_back(body, self.end_tag, is_final), "")
