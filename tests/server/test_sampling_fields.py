"""vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens through the OpenAI client on a real server."""

from __future__ import annotations

import pytest

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _tokenize(server, **body) -> list[int]:
    with server.http() as http:
        return http.post("/tokenize", json=body).json()["tokens"]


def _detokenize(server, token_id: int) -> str:
    with server.http() as http:
        return http.post("/detokenize", json={"tokens": [token_id]}).json()["prompt"]


def _complete(server, **kwargs):
    extra = kwargs.pop("extra_body", {})
    return server.client().completions.create(model=server.model, prompt=kwargs.pop("prompt", PROMPT),
                                              extra_body={"ignore_eos": True, **extra}, **kwargs)


def test_allowed_token_ids_greedy_and_random(server):
    allowed = _tokenize(server, prompt=" Paris London Rome.", add_special_tokens=False)
    texts = {_detokenize(server, t) for t in allowed}
    greedy = _complete(server, max_tokens=6, temperature=0, logprobs=0, extra_body={"allowed_token_ids": allowed})
    assert set(greedy.choices[0].logprobs.tokens) <= texts
    sampled = _complete(server, max_tokens=6, temperature=1.0, n=2, seed=3, logprobs=0,
                        extra_body={"allowed_token_ids": allowed})
    for choice in sampled.choices:
        assert set(choice.logprobs.tokens) <= texts


def test_bad_word_the_model_would_say_is_not_said(server):
    before = _complete(server, max_tokens=4, temperature=0, logprobs=0)
    word = before.choices[0].logprobs.tokens[0]  # greedy's first token, e.g. " Paris"
    assert word.strip()
    after = _complete(server, max_tokens=4, temperature=0, logprobs=0, extra_body={"bad_words": [word.strip()]})
    assert after.choices[0].logprobs.tokens[0] != word
    assert word not in after.choices[0].logprobs.tokens and word.strip() not in after.choices[0].logprobs.tokens


def test_truncation_keeps_the_last_k_tokens_before_the_length_checks(server):
    ids = _tokenize(server, prompt=PROMPT)
    cut = _complete(server, max_tokens=4, temperature=0, extra_body={"truncate_prompt_tokens": 3})
    alone = _complete(server, prompt=ids[-3:], max_tokens=4, temperature=0)
    assert cut.usage.prompt_tokens == 3
    assert cut.choices[0].text == alone.choices[0].text
    # 300 prompt tokens do not fit max_model_len 256; cut to 8 they do (max_tokens defaults to what fits).
    long_prompt = [ids[i % len(ids)] for i in range(300)]
    fitted = _complete(server, prompt=long_prompt, max_tokens=2, extra_body={"truncate_prompt_tokens": 8})
    assert fitted.usage.prompt_tokens == 8
    chat = server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=2,
                                                   extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5


@pytest.mark.parametrize("extra,param", [
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, 10**6]}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"allowed_token_ids": list(range(49153))}, "allowed_token_ids"),  # more than the vocabulary
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["w"] * 1025}, "bad_words"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 257}, "truncate_prompt_tokens"),  # above max_model_len
])
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_bad_values_are_400_naming_the_field(server, extra, param, route):
    body = {"model": server.model, "max_tokens": 2, **extra}
    body.update({"prompt": PROMPT} if route == "completions" else {"messages": MESSAGES})
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    with server.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
