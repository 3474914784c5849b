"""The OpenAI Python client against a real `ember serve`: chat, completions, streaming, n, logprobs, usage."""

from __future__ import annotations

import math

import httpx

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _tokenize(server, **body) -> int:
    return server.http().post("/tokenize", json=body, timeout=30).json()["count"]


def test_models_version_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/version").json()["version"]


def test_tokenize_detokenize_round_trip(server):
    http = server.http()  # /tokenize and /detokenize need the API key too
    tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith(PROMPT)


def test_completion_greedy_usage_and_stream_agree(server):
    client = server.client()
    full = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.prompt_tokens == _tokenize(server, prompt=PROMPT)
    assert full.usage.completion_tokens == 4
    assert full.usage.total_tokens == full.usage.prompt_tokens + 4

    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_non_stream_and_stream(server):
    client = server.client()
    full = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    assert full.usage.prompt_tokens == _tokenize(server, messages=MESSAGES)
    assert full.usage.completion_tokens == 4

    stream = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].usage.completion_tokens == 4


def test_n_equals_two(server):
    client = server.client()
    out = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4, n=2,
                                         temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, n=2, stream=True,
                                            seed=7, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_chat_logprobs(server):
    out = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(entry.token for entry in content) == out.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-4)  # greedy picks the most likely


def test_completion_logprobs(server):
    out = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0,
                                             logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) >= 2 for t in lp.top_logprobs)


def test_seeded_sampling_is_reproducible(server):
    client = server.client()

    def sample(seed: int) -> str:
        # A hot temperature flattens the distribution, so different seeds all but surely differ.
        return client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=2.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first  # the seed matters


def test_stop_string(server):
    client = server.client()
    base = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = base.split()
    stop = words[1] if len(words) > 1 else base[2:4]
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert base.startswith(out.text)
    assert out.model_extra.get("stop_reason") == stop


def test_batch_of_prompts(server):
    out = server.client().completions.create(model=server.model, prompt=[PROMPT, "Once upon a time"],
                                             max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 6


def test_token_id_prompt(server):
    ids = server.http().post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = server.client().completions.create(model=server.model, prompt=ids, max_tokens=4, temperature=0)
    by_text = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)



def _counter(server, name: str) -> float:
    try:
        return server.metric(name + "_total")
    except KeyError:
        return server.metric(name)


def test_repeated_prompt_is_a_prefix_cache_hit_in_metrics(server):
    prompt = "Once upon a midnight dreary, while I pondered, weak and weary, " * 3
    client = server.client()
    client.completions.create(model=server.model, prompt=prompt, max_tokens=1)
    hits_before = _counter(server, "ember:prefix_cache_hits")
    queries_before = _counter(server, "ember:prefix_cache_queries")
    client.completions.create(model=server.model, prompt=prompt, max_tokens=1)
    num_prompt_tokens = _tokenize(server, prompt=prompt)
    assert _counter(server, "ember:prefix_cache_queries") - queries_before >= num_prompt_tokens
    # Every full 16-token block of the repeated prompt is served from the cache.
    assert _counter(server, "ember:prefix_cache_hits") - hits_before == (num_prompt_tokens - 1) // 16 * 16
