"""Prompt logprobs through the OpenAI client: completions `echo` + `logprobs` (also `max_tokens: 0` and
streamed) and vLLM's `prompt_logprobs` extra parameter, checked against the offline engine."""

from __future__ import annotations

import openai
import pytest

from ember import SamplingParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
TOLERANCE = 1e-5  # the same engine code on the same prompt alone: equal but for JSON round-trips


def offline(llm, token_ids: list[int], k: int):
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k)
    return llm.generate({"prompt_token_ids": token_ids}, params, use_tqdm=False)[0]


def check_echo_logprobs(lp, reference, num_generated: int) -> None:
    """The prompt's tokens lead the logprobs, as vLLM's echo writes them, with the offline values."""
    prompt_ids, expected = reference.prompt_token_ids, reference.prompt_logprobs
    num_prompt = len(prompt_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_prompt + num_generated
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, num_prompt):
        actual = expected[i][prompt_ids[i]]
        assert lp.tokens[i] == actual.decoded_token
        assert abs(lp.token_logprobs[i] - actual.logprob) < TOLERANCE
        top = lp.top_logprobs[i]
        assert max(top.values()) >= lp.token_logprobs[i]
        assert top[actual.decoded_token] == lp.token_logprobs[i]
        best = [e for e in expected[i].values() if e.rank == 1]
        assert best and abs(top[best[0].decoded_token] - best[0].logprob) < TOLERANCE
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset[:num_prompt - 1], lp.text_offset[1:], lp.tokens))


def test_completion_echo_logprobs_equal_offline(server, server_twin_llm):
    client = server.client()
    ids = server_twin_llm.get_tokenizer().encode(PROMPT)
    reference = offline(server_twin_llm, ids, 2)
    out = client.completions.create(model=server.model, prompt=PROMPT, echo=True, logprobs=2, max_tokens=3,
                                    temperature=0, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 3
    check_echo_logprobs(choice.logprobs, reference, 3)
    assert choice.text.startswith(PROMPT)
    plain = client.completions.create(model=server.model, prompt=PROMPT, logprobs=2, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    assert choice.text == PROMPT + plain.text  # the generated part is what a request without echo gets
    assert choice.logprobs.tokens[len(ids):] == plain.logprobs.tokens
    assert choice.logprobs.token_logprobs[len(ids):] == plain.logprobs.token_logprobs
    assert choice.logprobs.text_offset[len(ids)] == len(PROMPT)


def test_completion_echo_max_tokens_zero_returns_the_prompt_only(server, server_twin_llm):
    client = server.client()
    ids = server_twin_llm.get_tokenizer().encode(PROMPT)
    reference = offline(server_twin_llm, ids, 1)
    full = client.completions.create(model=server.model, prompt=ids, echo=True, logprobs=1, max_tokens=0,
                                     temperature=0)
    choice = full.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    check_echo_logprobs(choice.logprobs, reference, 0)
    chunks = [c for c in client.completions.create(model=server.model, prompt=ids, echo=True, logprobs=1,
                                                   max_tokens=0, temperature=0, stream=True) if c.choices]
    assert len(chunks) == 1
    assert chunks[0].choices[0].text == PROMPT and chunks[0].choices[0].finish_reason == "length"
    assert chunks[0].choices[0].logprobs.model_dump() == choice.logprobs.model_dump()
    with pytest.raises(openai.BadRequestError):  # zero tokens without echo is nothing to do
        client.completions.create(model=server.model, prompt=ids, max_tokens=0)


def test_streamed_echo_sends_the_prompt_first(server, server_twin_llm):
    client = server.client()
    body = dict(model=server.model, prompt=PROMPT, echo=True, logprobs=3, max_tokens=4, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**body).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**body, stream=True) if c.choices]
    num_prompt = len(server_twin_llm.get_tokenizer().encode(PROMPT))
    assert chunks[0].text.startswith(PROMPT)
    assert len(chunks[0].logprobs.tokens) > num_prompt  # the whole prompt, then the first generated token
    assert "".join(c.text for c in chunks) == full.text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(c.logprobs, key) for c in chunks), []) == getattr(full.logprobs, key)


def test_prompt_logprobs_parameter_on_chat_and_completions(server, server_twin_llm):
    client = server.client()
    tokenizer = server_twin_llm.get_tokenizer()
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 2})
    ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True),
                           add_special_tokens=False)
    assert chat.usage.prompt_tokens == len(ids)
    reference = offline(server_twin_llm, ids, 2).prompt_logprobs
    served = chat.model_extra["prompt_logprobs"]
    assert len(served) == len(ids) and served[0] is None
    for i in range(1, len(ids)):
        assert set(served[i]) == {str(t) for t in reference[i]}
        assert next(iter(served[i])) == str(ids[i])  # the actual token first, as vLLM writes it
        for token_id, expected in reference[i].items():
            entry = served[i][str(token_id)]
            assert entry["rank"] == expected.rank and entry["decoded_token"] == expected.decoded_token
            assert abs(entry["logprob"] - expected.logprob) < TOLERANCE
    completion = client.completions.create(model=server.model, prompt=ids, max_tokens=1, temperature=0,
                                           extra_body={"prompt_logprobs": 2}).choices[0]
    assert completion.model_extra["prompt_logprobs"] == served
    assert "prompt_logprobs" not in client.chat.completions.create(model=server.model, messages=MESSAGES,
                                                                   max_tokens=1).model_extra


@pytest.mark.parametrize("body", [
    {"extra_body": {"prompt_logprobs": 21}},  # the server's max_logprobs is 20
    {"extra_body": {"prompt_logprobs": -1}},
    {"extra_body": {"prompt_logprobs": 1}, "stream": True},  # vLLM refuses them on streams
    {"echo": True, "logprobs": 21},
])
def test_prompt_logprobs_limits(server, body):
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=1, **body)
