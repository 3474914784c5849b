"""Reasoning parsers (deepseek_r1, qwen3): whole-text splits, streamed deltas split at every character
boundary (joined, they must equal the whole split), the end check structured output waits on, and
reasoning combined with tool calls."""

from __future__ import annotations

import json

import pytest

from ember.reasoning import REASONING_PARSER_REGISTRY, create_reasoning_parser
from ember.reasoning.abstract import partial_tag_len
from ember.server.chat_output import ChatOutputParser
from ember.server.tool_parsers import create_tool_parser

from stream_helpers import join_deltas, prefix_streams


class WordTokenizer:
    """A vocabulary where `<think>` and `</think>` are single tokens (ids 1 and 2), as in DeepSeek-R1/Qwen3;
    every other character is its own token."""

    SPECIAL = {"<think>": 1, "</think>": 2}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text in self.SPECIAL:
            return [self.SPECIAL[text]]
        return [ord(ch) + 10 for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        names = {v: k for k, v in self.SPECIAL.items()}
        return "".join(names.get(i) or chr(i - 10) for i in ids)


class CharTokenizer(WordTokenizer):
    """No tag tokens: `</think>` is spelled over several ids, like the bundled SmolLM2 tokenizer."""

    SPECIAL: dict = {}


# (parser, model output, reasoning, content) — None where the field is absent
SPLIT_CASES = [
    ("deepseek_r1", "Let me think. 2+2=4.</think>The answer is 4.", "Let me think. 2+2=4.", "The answer is 4."),
    ("deepseek_r1", "<think>\nplan</think>\n\nAnswer", "\nplan", "\n\nAnswer"),
    ("deepseek_r1", "  <think>x</think>y", "x", "y"),
    ("deepseek_r1", "still thinking when cut <", "still thinking when cut <", None),
    ("deepseek_r1", "</think>only content", None, "only content"),
    ("deepseek_r1", "a </think> b </think> c", "a ", " b </think> c"),
    ("qwen3", "<think>Check units.</think>It is 5 km.", "Check units.", "It is 5 km."),
    ("qwen3", "Plain answer with no thinking.", None, "Plain answer with no thinking."),
    ("qwen3", "Before <think>mid</think> after", "mid", "Before  after"),
    ("qwen3", "<think>cut short <\\thi", "cut short <\\thi", None),
    ("qwen3", "a stray </think> stays content", None, "a stray </think> stays content"),
    ("qwen3", "<think></think>", None, None),
    ("qwen3", "x <thin", None, "x <thin"),
]


@pytest.mark.parametrize("name,text,reasoning,content", SPLIT_CASES)
def test_whole_output_split(name, text, reasoning, content):
    parser = create_reasoning_parser(name, CharTokenizer())
    assert parser.extract_reasoning(text) == (reasoning, content)


@pytest.mark.parametrize("name,text,reasoning,content", SPLIT_CASES)
def test_streamed_deltas_join_to_the_whole_split(name, text, reasoning, content):
    parser = create_reasoning_parser(name, CharTokenizer())
    whole = parser.split(text, is_final=True)
    for steps in prefix_streams(text):
        previous, parts = "", []
        for i, current in enumerate(steps):
            parts.append(parser.extract_reasoning_streaming(previous, current, is_final=i == len(steps) - 1))
            previous = current
        assert "".join(p.reasoning for p in parts) == whole.reasoning, steps[0]
        assert "".join(p.content for p in parts) == whole.content, steps[0]


def test_a_partial_tag_is_held_back_until_decided():
    parser = create_reasoning_parser("deepseek_r1", CharTokenizer())
    assert parser.extract_reasoning_streaming("", "abc</thi").reasoning == "abc"
    step = parser.extract_reasoning_streaming("abc</thi", "abc</think>Hi")
    assert (step.reasoning, step.content) == ("", "Hi")
    assert partial_tag_len("x </thi", "</think>") == 5 and partial_tag_len("x", "</think>") == 0


@pytest.mark.parametrize("tokenizer_cls", [WordTokenizer, CharTokenizer])
def test_is_reasoning_end(tokenizer_cls):
    tokenizer = tokenizer_cls()
    parser = create_reasoning_parser("deepseek_r1", tokenizer)
    if tokenizer_cls is WordTokenizer:
        assert parser.end_token_id == 2 and parser.end_token_ids == [2] and parser.start_token_id == 1
    else:
        assert parser.end_token_id is None and len(parser.end_token_ids) == len("</think>")

    def ids(text: str) -> list[int]:
        out = []
        for i, piece in enumerate(text.split("|")):
            out += tokenizer.encode(piece) if i % 2 == 0 else tokenizer.encode(f"<{piece}>")
        return out

    assert not parser.is_reasoning_end(ids("thinking"))
    assert parser.is_reasoning_end(ids("done|/think|{"))
    assert not parser.is_reasoning_end(ids("old|/think|again|think|still"))
    assert parser.is_reasoning_end(ids("|think|a|/think|"))


def test_bundled_tokenizer_spells_think_over_several_tokens():
    from ember.loader.model_loader import default_model_path
    from ember.loader.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(default_model_path())
    parser = create_reasoning_parser("qwen3", tokenizer)
    assert parser.end_token_id is None and len(parser.end_token_ids) > 1  # so the text path is taken
    assert tokenizer.decode(parser.end_token_ids, skip_special_tokens=False) == "</think>"
    output = tokenizer.encode("I should answer.</think>{\"a\": 1}", add_special_tokens=False)
    assert parser.is_reasoning_end(output)
    assert not parser.is_reasoning_end(output[:3])


def test_reasoning_then_tool_call_streams_like_the_whole_message():
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    text = f"<think>Need the weather.</think>Checking.<tool_call>{json.dumps(call)}</tool_call>"

    def factory():
        return ChatOutputParser(create_reasoning_parser("qwen3", CharTokenizer()), create_tool_parser("hermes"))

    message = factory().message(text)
    assert message["reasoning_content"] == "Need the weather." and message["content"] == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == \
        [("get_weather", call["arguments"])]
    for steps in prefix_streams(text):
        parser = factory()
        joined = join_deltas([parser.delta(s, i == len(steps) - 1) for i, s in enumerate(steps)])
        assert joined["reasoning_content"] == message["reasoning_content"], steps[0]
        assert joined["content"] == message["content"], steps[0]
        assert [(c["name"], c["arguments"]) for c in joined["tool_calls"]] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def test_a_reasoning_parser_on_a_model_that_does_not_think():
    message = ChatOutputParser(create_reasoning_parser("qwen3", CharTokenizer())).message("Hello!")
    assert message == {"role": "assistant", "reasoning_content": None, "content": "Hello!"}


def test_registry():
    assert set(REASONING_PARSER_REGISTRY) >= {"deepseek_r1", "qwen3"}
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        create_reasoning_parser("nope", CharTokenizer())
