"""Tool-call parsers (hermes, llama3_json, mistral, and the grammar-forced formats) on representative model
texts, whole and streamed at every character boundary. The expected calls are the Python objects the texts
were written from (json.dumps), so `json.loads` is the reference, not our scanner."""

from __future__ import annotations

import json
import re

import pytest

from ember.server.chat_output import ChatOutputParser
from ember.server.tool_parsers import TOOL_PARSER_REGISTRY, create_tool_parser
from ember.server.tool_parsers.forced import NamedFunctionParser, RequiredFunctionsParser
from ember.server.tool_parsers.json_scan import JSONScanError, scan_object, scan_value

from stream_helpers import join_deltas, prefix_streams

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
SEARCH = {"name": "search", "arguments": {"query": "tool calling", "filters": {"year": [2023, 2024]}, "top_k": 3}}
TRICKY = {"name": "render", "arguments": {"html": "</tool_call> {braces} [brackets] \"quotes\" \\ é 🌍;",
                                          "empty": {}, "list": [], "flag": True, "none": None, "x": -1.5e3}}
NO_ARGS = {"name": "now", "arguments": {}}


def hermes(*calls: dict, sep: str = "\n") -> str:
    return sep.join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls)


def as_llama(call: dict) -> dict:
    return {"name": call["name"], "parameters": call["arguments"]}


# (parser, model text, expected content, expected calls as (name, arguments object))
CALL_CASES = [
    ("hermes", hermes(WEATHER), None, [WEATHER]),
    ("hermes", hermes(WEATHER, SEARCH), None, [WEATHER, SEARCH]),
    ("hermes", "Let me check that.\n" + hermes(WEATHER), "Let me check that.\n", [WEATHER]),
    ("hermes", hermes(TRICKY, NO_ARGS, sep=" and then "), None, [TRICKY, NO_ARGS]),
    ("hermes", '<tool_call>{"name": "now"}</tool_call>', None, [NO_ARGS]),  # arguments left out
    ("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', None, [{"name": "f", "arguments": {"a": 1}}]),
    ("hermes", '<tool_call>{"name":"f","arguments":{"a":[1,{"b":"}"}]}}', None,  # no closing tag
     [{"name": "f", "arguments": {"a": [1, {"b": "}"}]}}]),
    ("llama3_json", json.dumps(as_llama(WEATHER)), None, [WEATHER]),
    ("llama3_json", "; ".join(json.dumps(as_llama(c)) for c in (WEATHER, SEARCH)), None, [WEATHER, SEARCH]),
    ("llama3_json", "<|python_tag|>" + json.dumps(TRICKY, ensure_ascii=False), None, [TRICKY]),
    ("llama3_json", "\n " + json.dumps(as_llama(NO_ARGS)), None, [NO_ARGS]),
    ("mistral", "[TOOL_CALLS]" + json.dumps([WEATHER]), None, [WEATHER]),
    ("mistral", "[TOOL_CALLS] " + json.dumps([WEATHER, TRICKY], ensure_ascii=False), None, [WEATHER, TRICKY]),
    ("mistral", "Checking now. [TOOL_CALLS]" + json.dumps([SEARCH]), "Checking now. ", [SEARCH]),
]

# (parser, model text): not a (well-formed) call, so the whole text is the content
CONTENT_CASES = [
    ("hermes", "The weather in Paris is mild; <b>bring</b> a coat."),
    ("hermes", "<tool_call>get_weather(city='Paris')</tool_call>"),
    ("hermes", '<tool_call>{"name": 7, "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("llama3_json", "The answer is 42."),
    ("llama3_json", 'Sure: {"name": "f", "parameters": {}}'),
    ("llama3_json", '{"answer": 42}'),
    ("mistral", "No tools needed [TOOL] here."),
    ("mistral", '[TOOL_CALLS] {"name": "f", "arguments": {}}'),
]

# malformed only after the call's name was complete: (parser, text, content a stream has sent)
LATE_MALFORMED_CASES = [
    ("hermes", 'Hm. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', "Hm. "),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', ""),  # not JSON
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}} and more', ""),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}, 3]', ""),
]

# cut short: whole text is content when the stream has ended (non-streaming only, see ToolParser)
TRUNCATED_CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    ("hermes", "Let me see <tool_call>"),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city"'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}'),
]


def _check_calls(message: dict, expected_calls: list[dict]) -> None:
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == [c["name"] for c in expected_calls]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [c["arguments"] for c in expected_calls]
    assert all(c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("name,text,content,calls", CALL_CASES)
def test_calls_are_found(name, text, content, calls):
    message = ChatOutputParser(None, create_tool_parser(name)).message(text)
    assert message["content"] == content
    _check_calls(message, calls)


@pytest.mark.parametrize("name,text", CONTENT_CASES + TRUNCATED_CASES + [c[:2] for c in LATE_MALFORMED_CASES])
def test_anything_else_is_content(name, text):
    message = ChatOutputParser(None, create_tool_parser(name)).message(text)
    assert message == {"role": "assistant", "content": text}


def _stream(parser_factory, steps: list[str]) -> dict:
    parser = parser_factory()
    deltas = [parser.delta(step, is_final=i == len(steps) - 1) for i, step in enumerate(steps)]
    return join_deltas(deltas)


@pytest.mark.parametrize("name,text", [(c[0], c[1]) for c in CALL_CASES] + CONTENT_CASES)
def test_streamed_deltas_join_to_the_whole_message(name, text):
    def factory():
        return ChatOutputParser(None, create_tool_parser(name))

    message = factory().message(text)
    expected_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    for steps in prefix_streams(text):
        joined = _stream(factory, steps)
        assert (joined["content"] or None) == (message["content"] or None), steps[0]
        assert [(c["name"], c["arguments"]) for c in joined["tool_calls"]] == expected_calls, steps[0]
        assert all(c["type"] == "function" and c["id"] for c in joined["tool_calls"])


@pytest.mark.parametrize("name,text,sent_content", LATE_MALFORMED_CASES)
def test_a_stream_never_repeats_a_call_as_content(name, text, sent_content):
    for steps in prefix_streams(text):
        joined = _stream(lambda: ChatOutputParser(None, create_tool_parser(name)), steps)
        if joined["tool_calls"]:  # the name was complete before the malformed part arrived
            assert joined["content"] == sent_content, steps[0]
        else:
            assert joined["content"] == text, steps[0]


def test_first_delta_of_a_call_has_id_type_and_name():
    parser = ChatOutputParser(None, create_tool_parser("hermes"))
    text = hermes(WEATHER, SEARCH)
    deltas = [d for d in (parser.delta(text[:k], False) for k in range(1, len(text) + 1)) if d]
    firsts = {}
    for delta in deltas:
        for call in delta["tool_calls"]:
            firsts.setdefault(call["index"], call)
    assert sorted(firsts) == [0, 1]
    for index, call in firsts.items():
        assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
        assert call["function"]["name"] == [WEATHER, SEARCH][index]["name"]
    later = [c for d in deltas for c in d["tool_calls"] if c is not firsts[c["index"]]]
    assert later and all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in later)


def test_hermes_content_holds_back_a_partial_tag_until_decided():
    parser = ChatOutputParser(None, create_tool_parser("hermes"))
    assert parser.delta("Hi <tool_", False) == {"content": "Hi "}
    assert parser.delta("Hi <tool_x", False) == {"content": "<tool_x"}
    assert parser.delta("Hi <tool_x <tool", True) == {"content": " <tool"}


def test_mistral_ids_and_special_tokens():
    parser = create_tool_parser("mistral")
    assert parser.skip_special_tokens is False
    message = ChatOutputParser(None, parser).message("[TOOL_CALLS]" + json.dumps([WEATHER, SEARCH]))
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in message["tool_calls"])
    assert create_tool_parser("hermes").skip_special_tokens is None


def test_named_function_output_is_the_arguments():
    args = {"city": "Paris", "days": [1, 2]}
    text = json.dumps(args)

    def factory():
        return ChatOutputParser(None, NamedFunctionParser("get_weather"), finishes_with_tool_calls=False)

    parser = factory()
    message = parser.message(text)
    assert message["content"] is None
    _check_calls(message, [{"name": "get_weather", "arguments": args}])
    assert parser.finish_reason("stop") == "stop"  # OpenAI and vLLM answer "stop" for a named function
    for steps in prefix_streams(text):
        joined = _stream(factory, steps)
        assert [(c["name"], c["arguments"]) for c in joined["tool_calls"]] == [("get_weather", text)]


def test_required_output_is_a_list_of_calls():
    calls = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "now", "parameters": {}}]
    text = json.dumps(calls)

    def factory():
        return ChatOutputParser(None, RequiredFunctionsParser())

    parser = factory()
    message = parser.message(text)
    _check_calls(message, [{"name": c["name"], "arguments": c["parameters"]} for c in calls])
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    for steps in prefix_streams(text):
        joined = _stream(factory, steps)
        assert [(c["name"], json.loads(c["arguments"])) for c in joined["tool_calls"]] == \
            [(c["name"], c["parameters"]) for c in calls]
    assert factory().message(text[:-3]) == {"role": "assistant", "content": text[:-3]}


def test_parallel_tool_calls_false_keeps_the_first_call():
    message = ChatOutputParser(None, create_tool_parser("hermes"), max_tool_calls=1).message(hermes(WEATHER, SEARCH))
    _check_calls(message, [WEATHER])


def test_plain_text_without_parsers_is_unchanged():
    parser = ChatOutputParser()
    assert parser.message("") == {"role": "assistant", "content": ""}
    assert parser.delta("ab", False) == {"content": "ab"} and parser.delta("abc", True) == {"content": "c"}
    assert parser.finish_reason("stop") == "stop"


def test_registry_names_and_errors():
    assert {"hermes", "llama3_json", "mistral"} <= set(TOOL_PARSER_REGISTRY)
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        create_tool_parser("nope")


@pytest.mark.parametrize("text,end", [('"a\\"b" ', 6), ("[1, [2], {\"]\": 3}]x", 18), ("12,", 2), ("12", None),
                                      ("{\"a\": \"}", None), ("true}", 4)])
def test_scan_value_ends(text, end):
    assert scan_value(text, 0) == end


def test_scan_errors():
    with pytest.raises(JSONScanError):
        scan_value("[1, 2}", 0)
    with pytest.raises(JSONScanError):
        scan_object('{"a" 1}', 0)
    with pytest.raises(JSONScanError):
        scan_value("?", 0)
