"""The reasoning-parser contract: whole-text and streamed splits of `<think>…</think>`, and the end check
structured output waits on before it constrains anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class ReasoningSplit:
    """One output cut in two. Both are strings (possibly empty), never None."""

    reasoning: str
    content: str


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none).

    That suffix may still become `tag` once more text arrives, so a streaming parser holds it back.
    """
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def hold_back(text: str, tag: str, is_final: bool) -> str:
    """`text` without a trailing partial `tag` (unless the text is final: then nothing more can come)."""
    return text if is_final else text[:len(text) - partial_tag_len(text, tag)]


class ReasoningParser:
    """Splits the reasoning section (between `start_tag` and `end_tag`) from the answer.

    Parsing works on text, not token ids: tokenizers without a dedicated `<think>` token (the bundled
    SmolLM2's) spell the tags over several tokens, and text covers both cases alike.

    Invariant (what streaming relies on): for a text that grows by appending, each field of
    `split(text, is_final=False)` only grows by appending, and `split(full_text, is_final=True)` extends
    every earlier split. So the streamed deltas of `extract_reasoning_streaming`, joined, are exactly
    the non-streaming `split`. Text that may still become a tag is held back until it is decided.

    Args:
        tokenizer: anything with `encode(text, add_special_tokens=False)` and
            `decode(ids, skip_special_tokens=False)` (ember's `Tokenizer` or a `transformers` one).

    Attributes:
        start_token_id / end_token_id: the tag's id when the vocabulary spells it as one token, else None.
        end_token_ids: how the tokenizer spells `end_tag` on its own (one id or several).
    """

    start_tag = "<think>"
    end_tag = "</think>"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.end_token_ids: list[int] = list(tokenizer.encode(self.end_tag, add_special_tokens=False))
        self.start_token_id = _single_token_id(tokenizer, self.start_tag)
        self.end_token_id = self.end_token_ids[0] if len(self.end_token_ids) == 1 else None

    def split(self, text: str, is_final: bool = True) -> ReasoningSplit:
        """Cut the output so far into reasoning and content; `is_final`: no more text will come."""
        raise NotImplementedError

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """vLLM's non-streaming call: (reasoning, content) of a finished output, empty parts as None."""
        parts = self.split(text, is_final=True)
        return parts.reasoning or None, parts.content or None

    def extract_reasoning_streaming(self, previous_text: str, current_text: str,
                                    is_final: bool = False) -> ReasoningSplit:
        """The (reasoning, content) the output gained from `previous_text` to `current_text`."""
        before = self.split(previous_text, is_final=False)
        after = self.split(current_text, is_final=is_final)
        return ReasoningSplit(after.reasoning[len(before.reasoning):], after.content[len(before.content):])

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """Whether the reasoning section is over in `token_ids` (structured output starts after it).

        As vLLM: the last end tag must come after the last start tag. With a single-token `</think>`
        this scans the ids; otherwise it decodes them and looks at the text (the tags span several
        tokens, and a tag may begin or end inside a token, so an id pattern would miss some).
        """
        if self.end_token_id is not None:
            for token_id in reversed(token_ids):
                if token_id == self.end_token_id:
                    return True
                if token_id == self.start_token_id:
                    return False
            return False
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=False)
        return text.rfind(self.end_tag) > text.rfind(self.start_tag)


def _single_token_id(tokenizer: Any, tag: str) -> int | None:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None
