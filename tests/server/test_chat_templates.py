"""Template choice (`--chat-template`, the model's own, the shipped Hermes tool template) and the chat
options of `ember serve` (flags from ServerConfig fields, validated once)."""

from __future__ import annotations

import argparse

import jinja2
import pytest

from ember.config import add_config_cli_args, config_from_cli_args
from ember.server.chat_templates import ChatTemplates, shipped_template
from ember.server.config import ServerConfig

PLAIN = "{% for m in messages %}{{ m.content }}{% endfor %}"
WITH_TOOLS = "{% if tools %}{{ tools | length }} tools{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"


def test_selection_rules(tmp_path):
    templates = ChatTemplates()
    assert templates.select(PLAIN, uses_tools=False) is None
    assert templates.select(PLAIN, uses_tools=True) == shipped_template()
    assert templates.select(None, uses_tools=True) == shipped_template()
    assert templates.select(WITH_TOOLS, uses_tools=True) is None  # the model's own handles tools
    assert templates.select({"default": PLAIN, "tool_use": WITH_TOOLS}, uses_tools=True) is None
    path = tmp_path / "custom.jinja"
    path.write_text("custom")
    assert ChatTemplates(str(path)).select(WITH_TOOLS, uses_tools=False) == "custom"


def test_render_kwargs_see_tool_history():
    templates = ChatTemplates()
    assert templates.render_kwargs(PLAIN, [{"role": "user", "content": "hi"}], None) == {}
    history = [{"role": "tool", "content": "42", "tool_call_id": "a"}]
    assert templates.render_kwargs(PLAIN, history, None) == {"chat_template": shipped_template()}
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert templates.render_kwargs(WITH_TOOLS, [], tools) == {"tools": tools}


def test_hermes_template_renders_with_plain_jinja():
    # A reference renderer that is not transformers': stock Jinja with the same tojson behaviour.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False}
    messages = [{"role": "user", "content": "Add 2 and 3"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                {"role": "tool", "content": "5"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    text = env.from_string(shipped_template()).render(messages=messages, tools=tools, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}\n</tools>' in text
    assert text.endswith('<|im_start|>user\nAdd 2 and 3<|im_end|>\n<|im_start|>assistant\n<tool_call>\n'
                         '{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
                         '<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    plain = env.from_string(shipped_template()).render(messages=messages[:1], add_generation_prompt=False)
    assert plain == "<|im_start|>user\nAdd 2 and 3<|im_end|>\n"


def test_serve_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_cli_args(parser, ServerConfig)
    template = tmp_path / "t.jinja"
    template.write_text(PLAIN)
    args = parser.parse_args(["--chat-template", str(template), "--tool-call-parser", "mistral",
                              "--reasoning-parser", "qwen3"])
    config = config_from_cli_args(args, ServerConfig)
    assert (config.chat_template, config.tool_call_parser, config.reasoning_parser) == \
        (str(template), "mistral", "qwen3")
    defaults = config_from_cli_args(parser.parse_args([]), ServerConfig)
    assert (defaults.chat_template, defaults.tool_call_parser, defaults.reasoning_parser) == (None, "hermes", None)


@pytest.mark.parametrize("kwargs,match", [
    ({"tool_call_parser": "pythonic"}, "tool_call_parser"),
    ({"reasoning_parser": "o1"}, "reasoning_parser"),
    ({"chat_template": "/nonexistent/template.jinja"}, "chat_template"),
])
def test_bad_chat_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(**kwargs)
