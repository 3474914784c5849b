"""Structured output through the official `openai` client against a real `ember serve`: every output
must pass the `jsonschema` validator (or `re.fullmatch`, or be one of the choices), greedy and sampled."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

from json_schemas import SCHEMAS

REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(cat|dog|bird)s?", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}",
           r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}", r"#[0-9a-f]{6}"]
CHOICES = [["yes", "no"], ["red", "green", "blue"], ["Paris", "London", "Rome", "Madrid"]]


def _client(server):
    # The test server queues at most 2 requests; a 429 is retried after its Retry-After, as agents do.
    return server.client(max_retries=20)


def _chat(server, content: str, **kwargs):
    return _client(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": content}], **kwargs)


def _map(fn, items):
    # Four at a time: the server batches them, as it would agents' calls.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(fn, items))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schemas_validate(server, temperature):
    def run(i):
        task, schema = SCHEMAS[i]
        out = _chat(server, f"Reply in JSON. {task}", max_tokens=160, temperature=temperature, seed=i,
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        return out.choices[0]

    choices = _map(run, range(len(SCHEMAS)))
    failures = []
    for (task, schema), choice in zip(SCHEMAS, choices):
        try:
            jsonschema.validate(json.loads(choice.message.content), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append((task, choice.finish_reason, choice.message.content, str(exc)[:200]))
    assert not failures, failures


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_and_choice(server, temperature):
    client = _client(server)

    def regex(i):
        out = client.completions.create(model=server.model, prompt="Answer: ", max_tokens=24, seed=i,
                                        temperature=temperature,
                                        extra_body={"structured_outputs": {"regex": REGEXES[i]}})
        return out.choices[0].text

    def choice(i):
        out = _chat(server, "Pick one.", max_tokens=8, temperature=temperature, seed=i,
                    extra_body={"guided_choice": CHOICES[i]})  # vLLM's older name
        return out.choices[0].message.content

    for pattern, text in zip(REGEXES, _map(regex, range(len(REGEXES)))):
        assert re.fullmatch(pattern, text), (pattern, text)
    for options, text in zip(CHOICES, _map(choice, range(len(CHOICES)))):
        assert text in options


def test_json_object(server):
    out = _chat(server, "Reply in JSON: a dog with a name and an age.", max_tokens=120, temperature=0,
                response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_stream_with_n_matches_non_stream(server):
    task, schema = SCHEMAS[4]  # a book: a nested object
    kwargs = dict(max_tokens=120, temperature=1.0, seed=5, n=2,
                  response_format={"type": "json_schema", "json_schema": {"name": "book", "schema": schema}})
    full = _chat(server, f"Reply in JSON. {task}", **kwargs)
    texts, reasons = ["", ""], [None, None]
    for chunk in _chat(server, f"Reply in JSON. {task}", stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    for choice in full.choices:
        assert texts[choice.index] == choice.message.content
        assert reasons[choice.index] == choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_truncated_output_reports_length_and_stop_strings_apply(server):
    schema = SCHEMAS[11][1]  # a team of players: longer than 5 tokens
    out = _chat(server, "Reply in JSON.", max_tokens=5, temperature=0,
                extra_body={"structured_outputs": {"json": schema}})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    out = _chat(server, "Reply in JSON.", max_tokens=100, temperature=0, stop=['"players"'],
                extra_body={"guided_json": schema})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content.startswith("{") and '"players"' not in out.choices[0].message.content


BAD_CONSTRAINTS = [
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}}}, "nosuchtype"),
    ({"structured_outputs": {"regex": "a[b"}}, "regex"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "grammar"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "exactly one"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "only one kind"),
    ({"response_format": {"type": "xml"}}, "xml"),
]


def test_bad_constraints_are_400_while_another_request_completes(server):
    client = _client(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.completions.create, model=server.model, prompt="Once upon a time",
                              max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
        for extra, reason in BAD_CONSTRAINTS:
            body = {k: v for k, v in extra.items() if k != "response_format"}
            with pytest.raises(openai.BadRequestError) as info:
                _chat(server, "Hi", max_tokens=8, response_format=extra.get("response_format", openai.NOT_GIVEN),
                      extra_body=body)
            assert reason in str(info.value)
        done = running.result(timeout=120)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 48
