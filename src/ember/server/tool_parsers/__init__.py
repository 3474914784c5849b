"""Tool-call parsers (`--tool-call-parser`): find the calls in a model's text, whole or streamed.

The registry maps a name to "module:Class"; a parser's module is imported only when it is created.
"""

from __future__ import annotations

from typing import Any

from ember.registry import create_registered

TOOL_PARSER_REGISTRY: dict[str, str] = {
    "hermes": "ember.server.tool_parsers.hermes:HermesToolParser",
    "llama3_json": "ember.server.tool_parsers.llama3_json:Llama3JsonToolParser",
    "mistral": "ember.server.tool_parsers.mistral:MistralToolParser",
}


def create_tool_parser(name: str, tokenizer: Any = None) -> Any:
    """The parser registered as `name`, bound to `tokenizer`.

    Raises:
        ValueError: `name` is not registered.
    """
    return create_registered(TOOL_PARSER_REGISTRY, name, "tool-call parser", tokenizer)
