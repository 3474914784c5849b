"""Qwen3's reasoning format: the model opens `<think>` itself; without it the whole output is content."""

from __future__ import annotations

from ember.reasoning.abstract import ReasoningParser, ReasoningSplit, hold_back


class Qwen3ReasoningParser(ReasoningParser):
    """Reasoning is the text between the output's first `<think>` and the `</think>` after it.

    Output without `<think>` is all content (a model that does not think, or Qwen3 with thinking
    switched off), and a stray `</think>` alone stays content. Text before `<think>` is content too. An
    output cut short inside the reasoning (no `</think>` yet) is reasoning up to its end, as vLLM's
    current qwen3 parser does when thinking is on.

    Newer Qwen templates (Qwen3.5, the 2507 thinking models) open `<think>` in the prompt, so only
    `</think>` appears in the output: serve those with `deepseek_r1`.
    """

    def split(self, text: str, is_final: bool = True) -> ReasoningSplit:
        start = text.find(self.start_tag)
        if start < 0:
            return ReasoningSplit("", hold_back(text, self.start_tag, is_final))
        before = text[:start]
        rest = text[start + len(self.start_tag):]
        end = rest.find(self.end_tag)
        if end >= 0:
            return ReasoningSplit(rest[:end], before + rest[end + len(self.end_tag):])
        return ReasoningSplit(hold_back(rest, self.end_tag, is_final), before)
