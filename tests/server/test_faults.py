"""Faults against a real `ember serve`: a request that raises inside the engine step fails alone (500, or an
error event then [DONE] when streamed) while others complete; SIGTERM drains: in-flight requests finish,
or end with a clear 503 error when the drain times out; nothing new is admitted meanwhile."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import pytest

from server_helpers import API_KEY, running_server, wait_until

FAULT_TOKEN = 777  # EMBER_TEST_FAULT_TOKEN: a prompt holding this id raises in the engine step
FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "64", "--max-num-seqs", "4"]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _stream_events(http: httpx.Client, body: dict) -> list[str]:
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    with running_server(FLAGS, tmp_path_factory.mktemp("serve-faults"),
                        env={"EMBER_TEST_FAULT_TOKEN": str(FAULT_TOKEN)}) as running:
        yield running


def test_a_request_failing_inside_the_step_fails_alone(fault_server):
    http = fault_server.http()
    normal = {"prompt": [1, 2, 3, 4, 5], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    faulty = {"prompt": [1, 2, FAULT_TOKEN, 4], "max_tokens": 24, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        others = [pool.submit(http.post, "/v1/completions", json=normal) for _ in range(2)]
        failed = http.post("/v1/completions", json=faulty)
        events = _stream_events(http, faulty)
        results = [f.result(timeout=120) for f in others]
    assert failed.status_code == 500 and failed.json()["error"]["code"] == 500
    assert "error" in json.loads(events[-2]) and events[-1] == "[DONE]"
    for response in results:  # the requests batched with the faulty one were not touched
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] == "length"
        assert response.json()["usage"]["completion_tokens"] == 24
    assert http.get("/health").status_code == 200
    assert wait_until(lambda: fault_server.metric("ember:kv_cache_usage_perc") == 0.0)
    after = http.post("/v1/completions", json=normal)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize("timeout_s, max_tokens, finishes", [(240, 32, True), (0.5, 120, False)])
def test_sigterm_drains_requests_in_flight(tmp_path, timeout_s, max_tokens, finishes):
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with running_server(FLAGS + ["--shutdown-timeout-s", str(timeout_s)], tmp_path) as server:
        http = server.http()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            whole = pool.submit(http.post, "/v1/completions", json=body)
            streamed = pool.submit(_stream_events, http, body)
            assert wait_until(lambda: server.metric("ember:num_requests_running") == 2, timeout_s=60)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = http.post("/v1/completions", json=body)
            whole, events = whole.result(timeout=300), streamed.result(timeout=300)
        server.process.wait(timeout=60)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    if finishes:
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == max_tokens
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
    else:
        assert whole.status_code == 503 and "shutting down" in whole.json()["error"]["message"]
        assert "shutting down" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
