"""A client that leaves frees its KV blocks at once; a burst beyond the queue limit gets 429, the rest finish."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai

from server_helpers import API_KEY, MAX_QUEUED_REQUESTS, wait_until

LONG = {"prompt": "Tell me a very long story about a dragon.", "max_tokens": 230, "temperature": 0,
        "ignore_eos": True}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _aborted(server) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    lines = [l for l in text.splitlines() if l.startswith("ember:request_success_total{") and '"abort"' in l]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def _idle(server) -> bool:
    return (server.metric("ember:kv_cache_usage_perc") == 0.0
            and server.metric("ember:num_requests_running") == 0.0
            and server.metric("ember:num_requests_waiting") == 0.0)


def test_stream_disconnect_aborts_and_frees_kv(server):
    assert wait_until(lambda: _idle(server), timeout_s=60)
    aborted_before = _aborted(server)
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    assert "error" not in json.loads(line[6:])
                    events += 1
                    if events == 3:
                        # The request holds KV blocks while it streams.
                        assert server.metric("ember:kv_cache_usage_perc") > 0.0
                        break  # leaving the iterator closes the connection
    # Closing the stream mid-way (230 tokens would take far longer) aborts the request.
    assert wait_until(lambda: _idle(server), timeout_s=15), "KV blocks not freed after disconnect"
    assert wait_until(lambda: _aborted(server) >= aborted_before + 1, timeout_s=5)


def test_non_stream_disconnect_aborts_and_frees_kv(server):
    assert wait_until(lambda: _idle(server), timeout_s=60)
    aborted_before = _aborted(server)
    try:
        httpx.post(server.base_url + "/v1/completions", json=LONG, headers=HEADERS, timeout=2.0)
        raise AssertionError("the long request should not finish within the client timeout")
    except httpx.ReadTimeout:
        pass  # the client gives up and closes the connection
    assert wait_until(lambda: _idle(server), timeout_s=15), "KV blocks not freed after disconnect"
    assert _aborted(server) >= aborted_before + 1


def test_overload_gets_429_and_the_rest_finish(server):
    assert wait_until(lambda: _idle(server), timeout_s=60)
    client = server.client()
    num_requests = 4 * MAX_QUEUED_REQUESTS + 2

    def one(i: int):
        try:
            out = client.completions.create(model=server.model, prompt=f"Count to {i}:", max_tokens=4,
                                            temperature=0, extra_body={"ignore_eos": True})
            return out.usage.completion_tokens
        except openai.RateLimitError as exc:
            return exc.response.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(num_requests) as pool:
        results = list(pool.map(one, range(num_requests)))
    finished = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if not isinstance(r, int)]
    assert finished and refused, results
    assert all(r == 4 for r in finished)
    assert all(r is not None and int(r) >= 0 for r in refused)  # Retry-After present
    assert server.metric("ember:request_rejected_total") >= len(refused)
    # The server is still healthy and serving.
    assert wait_until(lambda: _idle(server), timeout_s=30)
    assert client.completions.create(model=server.model, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
