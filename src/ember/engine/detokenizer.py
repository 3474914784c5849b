"""Incremental detokenization: the text a growing list of sampled token ids spells, piece by piece."""

from __future__ import annotations

from ember.loader.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text without re-decoding the whole sequence.

    Keeps two offsets into the ids (as vLLM and HF's TextStreamer do): text is emitted only
    once the trailing tokens decode to complete characters (no U+FFFD from a split UTF-8 byte).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-6:])  # a little context for leading spaces
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (may be empty)."""
        self.token_ids.extend(new_token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(self.token_ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
