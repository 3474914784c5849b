"""Reasoning parsers: split a model's `<think>…</think>` section from its answer (`--reasoning-parser`).

The registry maps a name to "module:Class"; a parser's module is imported only when it is created.
"""

from __future__ import annotations

from typing import Any

from ember.registry import create_registered

REASONING_PARSER_REGISTRY: dict[str, str] = {
    "deepseek_r1": "ember.reasoning.deepseek_r1:DeepSeekR1ReasoningParser",
    "qwen3": "ember.reasoning.qwen3:Qwen3ReasoningParser",
}


def create_reasoning_parser(name: str, tokenizer: Any) -> Any:
    """The parser registered as `name`, bound to `tokenizer` (ember's `Tokenizer` or a `transformers` one).

    Raises:
        ValueError: `name` is not registered.
    """
    return create_registered(REASONING_PARSER_REGISTRY, name, "reasoning parser", tokenizer)
