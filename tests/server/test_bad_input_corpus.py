"""The bad-input corpus (docs/reliability.md): malformed bodies on every route of a real `ember serve`.

Every case answers its expected 4xx with vLLM's error body (naming the field where one is at fault), valid
edge cases answer 200, nothing answers 5xx, and a normal request on the same route succeeds after each.
"""

from __future__ import annotations

import json

import httpx
import pytest

from ember.server.protocol import MAX_JSON_DEPTH
from server_helpers import API_KEY

CHAT, CMPL, TOK, DETOK, ADMIN = "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/admin/precision"
BAD = "\ud800x"  # a lone UTF-16 surrogate; json.dumps writes it as the escape "\ud800"
MSG = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"messages": MSG, "max_tokens": 2, **fields}


def cmpl(**fields) -> dict:
    return {"prompt": "hello", "max_tokens": 2, **fields}


def user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

# Lone surrogates in every text field: (case id, path, body).
SURROGATES = [
    ("chat-content", CHAT, user(BAD)),
    ("chat-content-stream", CHAT, {**user(BAD), "stream": True}),
    ("chat-part-text", CHAT, user([{"type": "text", "text": BAD}])),
    ("chat-name", CHAT, chat(messages=[{"role": "user", "content": "hi", "name": BAD}])),
    ("chat-tool-call-id", CHAT, chat(messages=[*MSG, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                               {"role": "tool", "content": "1", "tool_call_id": BAD}])),
    ("chat-tool-call-arguments", CHAT, chat(messages=[*MSG, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "f", "arguments": BAD}}]}])),
    ("chat-tool-description", CHAT, chat(tools=[{**TOOL, "function": {**TOOL["function"], "description": BAD}}])),
    ("chat-response-format", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": BAD}}})),
    ("chat-template-kwargs", CHAT, chat(chat_template_kwargs={"x": BAD})),
    ("chat-documents", CHAT, chat(documents=[{"title": BAD, "text": "t"}])),
    ("chat-model", CHAT, chat(model=BAD)),
    ("chat-user", CHAT, chat(user=BAD)),
    ("chat-field-name", CHAT, chat(**{BAD: 1})),
    ("cmpl-prompt", CMPL, cmpl(prompt=BAD)),
    ("cmpl-prompt-stream", CMPL, cmpl(prompt=BAD, stream=True)),
    ("cmpl-prompt-list", CMPL, cmpl(prompt=["ok", BAD])),
    ("cmpl-stop", CMPL, cmpl(stop=BAD)),
    ("cmpl-stop-list", CMPL, cmpl(stop=["ok", BAD])),
    ("cmpl-logit-bias-key", CMPL, cmpl(logit_bias={BAD: 1.0})),
    ("cmpl-guided-regex", CMPL, cmpl(guided_regex=BAD)),
    ("cmpl-guided-choice", CMPL, cmpl(guided_choice=["a", BAD])),
    ("cmpl-structured-outputs", CMPL, cmpl(structured_outputs={"regex": BAD})),
    ("cmpl-request-id", CMPL, cmpl(request_id=BAD)),
    ("cmpl-suffix", CMPL, cmpl(suffix=BAD)),
    ("tokenize-prompt", TOK, {"prompt": BAD}),
    ("tokenize-messages", TOK, {"messages": [{"role": "user", "content": BAD}]}),
    ("detokenize-model", DETOK, {"tokens": [1], "model": BAD}),
    ("admin-ops", ADMIN, {"ops": [BAD]}),
]



def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = nested(900)  # parses, but would exhaust the stack of recursive readers (Jinja, json.dumps) on a busy stack

# (case id, path, body (dict -> JSON, bytes -> sent as is), status, param the error names or None)
CASES = [
    # nesting: too deep for the JSON parser, or deep inside free-form fields
    ("json-100k-deep", CMPL, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("deep-tool-parameters", CHAT, chat(tools=[{**TOOL, "function": {**TOOL["function"], "parameters": {
        "type": "object", "properties": {"x": {"default": DEEP}}}}}]), 400, "tools"),
    ("deep-template-kwargs", CHAT, chat(chat_template_kwargs={"x": DEEP}), 400, "chat_template_kwargs"),
    ("deep-tool-call-arguments", CHAT, chat(messages=[*MSG, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "f", "arguments": {"a": DEEP}}}]}]), 400, "messages"),
    ("deep-response-format", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"x": {"default": DEEP}}}}}), 400, "response_format"),
    ("deep-structured-outputs", CMPL, cmpl(structured_outputs={"json": {"default": DEEP}}), 400,
     "structured_outputs"),
    ("deep-extra-field", CMPL, cmpl(frobnicate=DEEP), 400, "frobnicate"),
    # chat: messages and content parts
    ("messages-empty", CHAT, {"messages": []}, 400, "messages"),
    ("messages-object", CHAT, {"messages": {"role": "user"}}, 400, "messages"),
    ("role-unknown", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("role-number", CHAT, {"messages": [{"role": 7, "content": "hi"}]}, 400, "messages"),
    ("part-without-type", CHAT, user([{"text": "hi"}]), 400, "messages"),
    ("part-type-unknown", CHAT, user([{"type": "hologram", "text": "hi"}]), 400, "messages"),
    ("part-text-missing", CHAT, user([{"type": "text"}]), 400, "messages"),
    ("part-not-object", CHAT, user(["hi"]), 400, "messages"),
    ("content-number", CHAT, user(5), 400, "messages"),
    ("part-image-valid-but-unsupported", CHAT, user([{"type": "image_url", "image_url": {"url": "data:,"}}]), 501,
     "messages"),
    ("part-image-and-bad-temperature", CHAT, {**user([{"type": "image_url", "image_url": {"url": "data:,"}}]),
                                              "temperature": -1}, 400, "temperature"),
    # chat: numbers out of range, wrong types, NaN
    ("temperature-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature"),
    ("temperature-negative", CHAT, chat(temperature=-0.5), 400, "temperature"),
    ("top-p-zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("min-p-above-one", CHAT, chat(min_p=1.5), 400, "min_p"),
    ("presence-penalty-3", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("repetition-penalty-zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("top-logprobs-negative", CHAT, chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max-completion-tokens-text", CHAT, chat(max_completion_tokens="ten"), 400, "max_completion_tokens"),
    ("logprobs-not-bool", CHAT, chat(logprobs="maybe"), 400, "logprobs"),
    ("n-zero", CHAT, chat(n=0), 400, "n"),
    ("n-negative", CHAT, chat(n=-3), 400, "n"),
    ("n-above-max", CHAT, chat(n=17), 400, "n"),
    ("seed-text", CHAT, chat(seed="lucky"), 400, "seed"),
    ("stream-not-bool", CHAT, chat(stream="often"), 400, "stream"),
    ("stream-options-list", CHAT, chat(stream=True, stream_options=[1]), 400, "stream_options"),
    ("tools-not-list", CHAT, chat(tools="all"), 400, "tools"),
    ("tool-choice-unknown-function", CHAT, chat(tools=[TOOL], tool_choice={"type": "function",
                                                                           "function": {"name": "g"}}), 400, None),
    ("response-format-unknown", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format"),
    ("continue-and-generation-prompt", CHAT, chat(continue_final_message=True), 400, "continue_final_message"),
    ("template-kwargs-reserved", CHAT, chat(chat_template_kwargs={"tokenize": True}), 400, "chat_template_kwargs"),
    ("per-request-chat-template", CHAT, chat(chat_template="{{ messages }}"), 400, "chat_template"),
    ("reasoning-effort-unknown", CHAT, chat(reasoning_effort="maximal"), 400, "reasoning_effort"),
    # chat: vLLM fields Ember does not implement; malformed values are a 400 first
    ("beam-search", CHAT, chat(use_beam_search=True), 501, "use_beam_search"),
    ("beam-search-malformed", CHAT, chat(use_beam_search="perhaps"), 400, "use_beam_search"),
    ("beam-search-and-bad-top-p", CHAT, chat(use_beam_search=True, top_p=-1), 400, "top_p"),
    ("chat-echo", CHAT, chat(echo=True), 501, "echo"),
    ("priority", CHAT, chat(priority=5), 400, "priority"),
    # completions
    ("prompt-empty-string", CMPL, cmpl(prompt=""), 400, "prompt"),
    ("prompt-list-empty-string", CMPL, cmpl(prompt=["a", ""]), 400, "prompt"),
    ("prompt-nested-too-deep", CMPL, cmpl(prompt=[[[1]]]), 400, "prompt"),
    ("prompt-2000", CMPL, cmpl(prompt=["a"] * 2000), 400, "prompt"),
    ("prompt-null", CMPL, cmpl(prompt=None), 400, "prompt"),
    ("best-of-and-top-p-invalid", CMPL, cmpl(best_of=-559, top_p=-7e16), 400, "top_p"),
    ("best-of-negative", CMPL, cmpl(best_of=-559), 400, "best_of"),
    ("best-of-below-n", CMPL, cmpl(best_of=1, n=2), 400, "best_of"),
    ("best-of-above-n", CMPL, cmpl(best_of=3), 501, "best_of"),
    ("suffix", CMPL, cmpl(suffix="end"), 501, "suffix"),
    ("suffix-and-nan", CMPL, b'{"prompt": "hi", "suffix": "x", "temperature": NaN}', 400, "temperature"),
    ("logprobs-negative", CMPL, cmpl(logprobs=-1), 400, "logprobs"),
    ("logprobs-above-max", CMPL, cmpl(logprobs=21), 400, "logprobs"),
    ("echo-text", CMPL, cmpl(echo="please"), 400, "echo"),
    ("max-tokens-zero-without-echo", CMPL, cmpl(max_tokens=0), 400, "max_tokens"),
    ("min-tokens-above-max", CMPL, cmpl(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    ("min-tokens-negative", CMPL, cmpl(min_tokens=-1), 400, "min_tokens"),
    ("top-k-minus-five", CMPL, cmpl(top_k=-5), 400, "top_k"),
    ("stop-10000", CMPL, cmpl(stop=["x"] * 10_000), 400, "stop"),
    ("stop-string-2000-chars", CMPL, cmpl(stop="x" * 2000), 400, "stop"),
    ("stop-token-ids-2000", CMPL, cmpl(stop_token_ids=list(range(2000))), 400, "stop_token_ids"),
    ("stop-token-id-negative", CMPL, cmpl(stop_token_ids=[-4]), 400, "stop_token_ids"),
    ("logit-bias-2000", CMPL, cmpl(logit_bias={str(i): 1.0 for i in range(2000)}), 400, "logit_bias"),
    ("logit-bias-infinity", CMPL, b'{"prompt": "hi", "logit_bias": {"5": -Infinity}}', 400, "logit_bias"),
    ("logit-bias-key-out-of-vocab", CMPL, cmpl(logit_bias={"99999999": 1.0}), 400, "logit_bias"),
    ("logit-bias-key-5000-digits", CMPL, cmpl(logit_bias={"9" * 5000: 1.0}), 400, "logit_bias"),
    ("prompt-logprobs-with-stream", CMPL, cmpl(prompt_logprobs=1, stream=True), 400, "prompt_logprobs"),
    ("request-id-too-long", CMPL, cmpl(request_id="r" * 300), 400, "request_id"),
    ("logits-processors", CMPL, cmpl(logits_processors=["my.module:Proc"]), 400, "logits_processors"),
    ("prompt-embeds", CMPL, cmpl(prompt_embeds="AAAA"), 501, "prompt_embeds"),
    ("length-penalty", CMPL, cmpl(length_penalty=2.0), 501, "length_penalty"),
    ("guided-decoding-backend", CMPL, cmpl(guided_decoding_backend="outlines"), 501, "guided_decoding_backend"),
    ("stream-bad-n", CMPL, cmpl(stream=True, n=0), 400, "n"),
    # tokenize and detokenize
    ("tokenize-both", TOK, {"prompt": "a", "messages": MSG}, 400, "prompt"),
    ("tokenize-neither", TOK, {}, 400, "prompt"),
    ("tokenize-messages-empty", TOK, {"messages": []}, 400, "messages"),
    ("tokenize-part-without-type", TOK, {"messages": [{"role": "user", "content": [{"text": "a"}]}]}, 400,
     "messages"),
    ("tokenize-image", TOK, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 501, "messages"),
    ("tokenize-prompt-number", TOK, {"prompt": 12}, 400, "prompt"),
    ("tokenize-chat-template", TOK, {"messages": MSG, "chat_template": "x"}, 400, "chat_template"),
    ("detokenize-text", DETOK, {"tokens": ["a"]}, 400, "tokens"),
    ("detokenize-negative", DETOK, {"tokens": [-1]}, 400, "tokens"),
    ("detokenize-out-of-vocab", DETOK, {"tokens": [10**9]}, 400, "tokens"),
    ("detokenize-missing", DETOK, {}, 400, "tokens"),
    # admin
    ("admin-unknown-field", ADMIN, {"opz": ["*"]}, 400, "opz"),
    ("admin-precision-number", ADMIN, {"default_precision": 5}, 400, "default_precision"),
    ("admin-precision-unknown", ADMIN, {"default_precision": "fp3"}, 400, None),
    ("admin-body-list", ADMIN, [1], 400, None),
    *[(f"surrogate-{name}", path, body, 400, None) for name, path, body in SURROGATES],
]

# Valid edge cases: each answers 200.
VALID = [
    ("nested-response-format-at-the-limit", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"x": {"default": nested(MAX_JSON_DEPTH - 6)}}}}})),
    ("unknown-field-ignored", CMPL, cmpl(frobnicate={"a": 1})),
    ("vllm-defaults-accepted", CHAT, chat(use_beam_search=False, length_penalty=1.0, priority=0, best_of=1,
                                          spaces_between_special_tokens=True, echo=False, user="u")),
    ("best-of-equals-n", CMPL, cmpl(best_of=2, n=2)),
    ("empty-content-string", CHAT, user("")),
    ("empty-part-list", CHAT, {"messages": [{"role": "system", "content": []}, *MSG], "max_tokens": 2}),
    ("text-part-with-extras", CHAT, user([{"type": "text", "text": "hi", "cache_control": {}}])),
    ("tokenize-empty-prompt", TOK, {"prompt": ""}),
    ("detokenize-empty", DETOK, {"tokens": []}),
    ("non-bmp-text", CMPL, cmpl(prompt="emoji \U0001F600 and \u00e9")),
]

# A normal request per route, sent after each case (a system message keeps the template's default one, and
# the prompt, short).
NORMAL = {CHAT: {"messages": [{"role": "system", "content": "Hi."}, *MSG], "max_tokens": 1},
          CMPL: cmpl(max_tokens=1), TOK: {"prompt": "hello"}, DETOK: {"tokens": [1, 2]}, ADMIN: None}


def _post(server, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=120)


def _assert_normal_request_works(server, path: str) -> None:
    if NORMAL[path] is None:
        response = httpx.get(server.base_url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    else:
        response = _post(server, path, NORMAL[path])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case_id,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_4xx_error_body(server, case_id, path, body, status, param):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["type"] and error["message"]
    assert "Traceback" not in error["message"] and "/src/ember" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    _assert_normal_request_works(server, path)


def test_a_surrogate_error_names_its_field(server):
    error = _post(server, CHAT, user([{"type": "text", "text": BAD}])).json()["error"]
    assert error["param"] == "messages" and "messages.0.content.0.text" in error["message"]
    assert "surrogate" in error["message"]
    assert _post(server, TOK, {"prompt": BAD}).json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("case_id,path,body", VALID, ids=[c[0] for c in VALID])
def test_valid_edge_case_is_served(server, case_id, path, body):
    response = _post(server, path, body)
    assert response.status_code == 200, response.text


def test_tokenize_and_detokenize_need_the_key(server):
    for path, body in ((TOK, {"prompt": "hi"}), (DETOK, {"tokens": [1]})):
        response = httpx.post(server.base_url + path, json=body, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == 401
        wrong = httpx.post(server.base_url + path, json=body, headers={"Authorization": "Bearer no"}, timeout=30)
        assert wrong.status_code == 401
        assert _post(server, path, body).status_code == 200


def test_continuous_usage_stats_put_the_usage_in_every_chunk(server):
    client = server.client()
    chunks = list(client.completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=4, temperature=0, stream=True,
        extra_body={"ignore_eos": True}, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    text_chunks = [c for c in chunks if c.choices]
    counts = [c.usage.completion_tokens for c in text_chunks]
    assert counts == sorted(set(counts)) and counts[-1] == 4  # grows with each chunk
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in text_chunks)
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices
    chat_chunks = list(client.chat.completions.create(
        model=server.model, messages=MSG, max_tokens=3, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chat_chunks)
    assert chat_chunks[0].usage.completion_tokens == 0  # the role chunk
    assert chat_chunks[-2].usage.completion_tokens == 3 and chat_chunks[-1].usage.completion_tokens == 3


def test_request_id_names_the_reply(server):
    body = server.client().completions.create(model=server.model, prompt="hi", max_tokens=1,
                                              extra_body={"request_id": "abc-123"})
    assert body.id == "cmpl-abc-123"
    # two requests with the same id both run: the engine's own ids stay unique
    again = server.client().chat.completions.create(model=server.model, messages=MSG, max_tokens=1,
                                                    extra_body={"request_id": "abc-123"})
    assert again.id == "chatcmpl-abc-123"


def test_tokenize_token_strs_and_template_options(server):
    http = server.http()
    out = http.post(TOK, json={"prompt": "hello world", "return_token_strs": True}).json()
    assert len(out["token_strs"]) == out["count"] and "".join(out["token_strs"]).replace("Ġ", " ") == "hello world"
    assert http.post(TOK, json={"prompt": "hello"}).json()["token_strs"] is None
    # continue_final_message leaves the assistant's message open: no end-of-turn marker after it
    history = [*MSG, {"role": "assistant", "content": "The answer is"}]
    open_ids = http.post(TOK, json={"messages": history, "continue_final_message": True,
                                    "add_generation_prompt": False}).json()["tokens"]
    text = http.post(DETOK, json={"tokens": open_ids}).json()["prompt"]
    assert text.endswith("The answer is")
    closed = http.post(TOK, json={"messages": history, "add_generation_prompt": False}).json()["tokens"]
    assert http.post(DETOK, json={"tokens": closed}).json()["prompt"].rstrip().endswith("<|im_end|>")
