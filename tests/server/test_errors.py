"""Malformed and unserviceable requests get vLLM-shaped errors, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server_helpers import API_KEY, MAX_BODY_BYTES, MAX_MODEL_LEN

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def _chat(**fields) -> dict:
    return {"messages": MSG, "max_tokens": 2, **fields}


def _cmpl(**fields) -> dict:
    return {"prompt": "hello", "max_tokens": 2, **fields}


# (case id, path, body: dict -> JSON, bytes -> sent raw, expected status)
CASES = [
    # wrong types
    ("messages-not-list", CHAT, {"messages": "hi"}, 400),
    ("temperature-string", CHAT, _chat(temperature="hot"), 400),
    ("prompt-number", CMPL, {"prompt": 5}, 400),
    ("max-tokens-string", CMPL, _cmpl(max_tokens="many"), 400),
    ("n-fraction", CMPL, _cmpl(n=1.5), 400),
    ("stop-number", CMPL, _cmpl(stop=5), 400),
    ("message-missing-role", CHAT, {"messages": [{"content": "hi"}]}, 400),
    ("body-is-list", CHAT, [1, 2, 3], 400),
    # huge numbers
    ("max-tokens-huge", CMPL, _cmpl(max_tokens=10**30), 400),
    ("max-tokens-float-huge", CMPL, b'{"prompt": "hello", "max_tokens": 1e300}', 400),
    ("n-huge", CMPL, _cmpl(n=10**9), 400),
    ("seed-beyond-int64", CMPL, _cmpl(seed=2**70), 400),
    ("logprobs-huge", CMPL, _cmpl(logprobs=10**6), 400),
    ("top-logprobs-huge", CHAT, _chat(logprobs=True, top_logprobs=10**6), 400),
    ("temperature-overflow", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', 400),
    ("stop-token-id-huge", CMPL, _cmpl(stop_token_ids=[10**12]), 400),
    ("prompt-token-id-huge", CMPL, {"prompt": [10**12], "max_tokens": 2}, 400),
    ("prompt-token-id-negative", CMPL, {"prompt": [-1], "max_tokens": 2}, 400),
    ("negative-max-tokens", CMPL, _cmpl(max_tokens=-1), 400),
    # NaN and infinities (Python's JSON parser accepts these literals)
    ("temperature-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("top-p-infinity", CMPL, b'{"prompt": "hi", "top_p": Infinity}', 400),
    ("logit-bias-nan", CMPL, b'{"prompt": "hi", "logit_bias": {"5": NaN}}', 400),
    ("logit-bias-bad-key", CMPL, _cmpl(logit_bias={"five": 1.0}), 400),
    # empty inputs
    ("empty-messages", CHAT, {"messages": []}, 400),
    ("empty-prompt-list", CMPL, {"prompt": []}, 400),
    ("empty-prompt-ids", CMPL, {"prompt": [[]]}, 400),
    ("stop-empty-string", CMPL, _cmpl(stop=[""]), 400),
    # bytes that are not JSON
    ("invalid-utf8", CMPL, b'{"prompt": "\xff\xfe\xfd", "max_tokens": 2}', 400),
    ("not-json", CHAT, b"{this is not json", 400),
    ("empty-body", CHAT, b"", 400),
    # size and length limits
    ("body-10mb", CMPL, json.dumps({"prompt": "a " * (5 * 2**20)}).encode(), 413),
    ("prompt-too-long", CMPL, {"prompt": list(range(100, 100 + MAX_MODEL_LEN + 10)), "max_tokens": 1}, 400),
    ("prompt-plus-max-tokens", CMPL, {"prompt": "hello", "max_tokens": MAX_MODEL_LEN}, 400),
    ("chat-too-long", CHAT, {"messages": [{"role": "user", "content": "word " * 2000}]}, 400),
    # unknown model, unknown route, unsupported features
    ("unknown-model", CHAT, _chat(model="gpt-17"), 404),
    ("unknown-route", "/v1/embeddings-nope", {"input": "x"}, 404),
    ("tool-without-name", CHAT, _chat(tools=[{"type": "function", "function": {}}]), 400),
    ("tool-choice-required-without-tools", CHAT, _chat(tool_choice="required"), 400),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 501),
    ("suffix", CMPL, _cmpl(suffix="end"), 501),
    ("stream-options-without-stream", CMPL, _cmpl(stream_options={"include_usage": True}), 400),
]


def _post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=120)


def _assert_error_body(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"] and error["type"]
    assert "Traceback" not in error["message"] and "/src/ember" not in error["message"]


@pytest.mark.parametrize("case_id,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_rejected_cleanly(server, case_id, path, body, status):
    _assert_error_body(_post(server, path, body), status)
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200


def test_error_param_names_the_field(server):
    error = _post(server, CHAT, _chat(temperature=-1.0)).json()["error"]
    assert error["param"] == "temperature"
    assert _post(server, CHAT, _chat(model="nope")).json()["error"]["param"] == "model"


def test_body_limit_is_the_configured_one(server):
    assert _post(server, CMPL, b"{" + b" " * (MAX_BODY_BYTES + 1) + b"}").status_code == 413


def test_auth_required_on_v1_only(server):
    no_key = httpx.post(server.base_url + CHAT, json=_chat(), timeout=30)
    _assert_error_body(no_key, 401)
    wrong = httpx.post(server.base_url + CHAT, json=_chat(), headers={"Authorization": "Bearer nope"}, timeout=30)
    _assert_error_body(wrong, 401)
    _assert_error_body(httpx.get(server.base_url + "/v1/models", timeout=30), 401)
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    assert httpx.get(server.base_url + "/metrics", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_sees_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=MSG, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="hello", max_tokens=MAX_MODEL_LEN * 4)
    assert "maximum context length" in info.value.message


def test_huge_top_k_and_temperature_still_generate(server):
    # Values past any sensible range that are still valid are clamped, not crashed on.
    out = _post(server, CMPL, _cmpl(top_k=10**30, temperature=1e30, repetition_penalty=1e30, seed=-5))
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] >= 1


def test_good_request_after_all_bad_ones(server):
    out = server.client().chat.completions.create(model=server.model, messages=MSG, max_tokens=3,
                                                  temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content and out.usage.completion_tokens == 3
