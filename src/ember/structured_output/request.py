"""One sequence's structured-output state: its grammar (compiling or compiled) and its matcher."""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger("ember.structured_output")


class StructuredOutputRequest:
    """The constraint of one sequence.

    The matcher is made once the grammar is compiled and sees every output token after reasoning ends
    (with no reasoning parser, from the first). Invariant: the matcher has accepted exactly the output
    tokens from `reasoning_end_index` on.

    Args:
        grammar: the compile future from `StructuredOutputManager.compile`.
        make_matcher: compiled grammar -> a fresh matcher.
        is_reasoning_end: output token ids -> whether the reasoning section has ended; None: no reasoning.
    """

    def __init__(self, grammar: concurrent.futures.Future, make_matcher: Callable[[Any], Any],
                 is_reasoning_end: Callable[[list[int]], bool] | None = None) -> None:
        self.grammar = grammar
        self._make_matcher = make_matcher
        self._is_reasoning_end = is_reasoning_end
        self.matcher = None
        self.reasoning_end_index: int | None = None if is_reasoning_end else 0
        self.is_violated = False  # a token the grammar refused was sampled (the mask was not applied)

    @property
    def is_ready(self) -> bool:
        """The compile has finished (successfully or not): the scheduler may admit the sequence."""
        return self.grammar.done()

    @property
    def error(self) -> BaseException | None:
        """Why the compile failed; None while compiling or when it succeeded."""
        return self.grammar.exception() if self.grammar.done() else None

    def _ensure_matcher(self) -> Any:
        if self.matcher is None:
            self.matcher = self._make_matcher(self.grammar.result())
        return self.matcher

    @property
    def is_constraining(self) -> bool:
        """Whether the next token is masked: reasoning is over and the grammar has not terminated."""
        if self.reasoning_end_index is None or self.is_violated:
            return False
        return not self._ensure_matcher().is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._ensure_matcher().fill_next_token_bitmask(bitmask, row)

    def accept(self, output_token_ids: list[int]) -> bool:
        """Feed the newest output token (the last of `output_token_ids`); False if the grammar refused it."""
        if self.reasoning_end_index is None:
            if self._is_reasoning_end(output_token_ids):
                self.reasoning_end_index = len(output_token_ids)
            return True
        matcher = self._ensure_matcher()
        if self.is_violated or matcher.is_terminated():
            return True
        if not matcher.accept_token(output_token_ids[-1]):
            self.is_violated = True
            logger.warning("a sampled token %d left the grammar; the constraint stops here", output_token_ids[-1])
            return False
        return True
