"""Which chat template renders a request: `--chat-template`, the model's own, or the shipped Hermes tool
template for tool requests on a model whose template has no tool section."""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

HERMES_TEMPLATE = "hermes_tools.jinja"
_MENTIONS_TOOLS = re.compile(r"\btools\b")


@functools.cache
def shipped_template(name: str = HERMES_TEMPLATE) -> str:
    """The text of a template shipped in `ember/server/templates/`."""
    return resources.files("ember.server").joinpath("templates", name).read_text(encoding="utf-8")


class ChatTemplates:
    """Picks the template per request.

    Args:
        path: `--chat-template`: a Jinja file used for every chat request, or None.

    Raises:
        OSError: the file cannot be read (the server refuses to start).
    """

    def __init__(self, path: str | None = None) -> None:
        self.override: str | None = None
        if path is not None:
            with open(path, encoding="utf-8") as f:
                self.override = f.read()

    def select(self, model_template: str | dict | None, uses_tools: bool) -> str | None:
        """The template to render with, or None for the tokenizer's own.

        A tool request (tools offered, or tool calls / tool results in the history) on a model whose
        template never mentions `tools` gets the Hermes template; `--chat-template` overrides all.
        """
        if self.override is not None:
            return self.override
        if isinstance(model_template, dict):  # named templates ("default", "tool_use", ...)
            model_template = "\n".join(model_template.values())
        if uses_tools and not (model_template and _MENTIONS_TOOLS.search(model_template)):
            return shipped_template()
        return None

    def render_kwargs(self, model_template: str | dict | None, messages: list[dict],
                      tools: list[dict] | None) -> dict[str, Any]:
        """The extra `apply_chat_template` arguments for these messages and tools."""
        uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        kwargs: dict[str, Any] = {}
        template = self.select(model_template, uses_tools)
        if template is not None:
            kwargs["chat_template"] = template
        if tools:
            kwargs["tools"] = tools
        return kwargs
