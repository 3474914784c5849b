"""The runtime precision mask over HTTP: /admin/precision behind the API key, the `precision` extra field,
the fallback counter. The shared `ember serve` (bundled model, no high-precision copies) answers the
refusals; a uvicorn server on loopback around the tiny int4 engine with float copies answers the rest."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest

from ember import SamplingParams
from server_helpers import API_KEY, Server

ADMIN = "/admin/precision"
PROMPT = list(range(40, 60))


def _assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    if param is not None:
        assert error["param"] == param
    return error


def test_admin_route_needs_the_api_key(server):
    for response in (httpx.get(server.base_url + ADMIN, timeout=30),
                     httpx.post(server.base_url + ADMIN, json={"default_precision": "bf16"}, timeout=30),
                     httpx.get(server.base_url + ADMIN, headers={"Authorization": "Bearer wrong"}, timeout=30)):
        assert _assert_error(response, 401)["type"] == "AuthenticationError"


def test_model_without_copies_reports_none_and_refuses_changes(server):
    with server.http() as http:
        state = http.get(ADMIN).json()
        assert state == {"default_precision": "quantized", "enabled_ops": [], "available_ops": []}
        error = _assert_error(http.post(ADMIN, json={"default_precision": "bf16"}), 400, "ops")
        assert "no dual-precision layers" in error["message"]
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="high-precision copies"):
        client.completions.create(model=server.model, prompt="hi", max_tokens=2, extra_body={"precision": "bf16"})
    with pytest.raises(openai.BadRequestError, match="precision must be one of"):
        client.completions.create(model=server.model, prompt="hi", max_tokens=2, extra_body={"precision": "fp8"})
    out = client.completions.create(model=server.model, prompt="hi", max_tokens=2,
                                    extra_body={"precision": "quantized", "ignore_eos": True})
    assert out.usage.completion_tokens == 2
    assert server.metric("ember:precision_fallbacks_total") == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dual_server(dual_precision_checkpoint):
    """The FastAPI app of `ember serve` under uvicorn on loopback, around the dual-precision tiny engine
    (the loader cannot attach float copies from a checkpoint yet, so `ember serve` cannot build it)."""
    import uvicorn

    from ember.server.app import build_app
    from ember.server.config import ServerConfig

    port = _free_port()
    app = build_app(lambda: dual_precision_checkpoint.make_engine(num_kv_blocks=64),
                    ServerConfig(port=port, api_key=API_KEY, log_level="warning"))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the dual-precision server did not start"
        time.sleep(0.2)
    yield Server(base_url, "tiny-dual", None)
    uv.should_exit = True
    thread.join(30)


def _complete(server: Server, **extra) -> str:
    out = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True, **extra})
    return out.choices[0].text


def test_admin_changes_the_mask_of_new_requests(dual_server, dual_precision_checkpoint):
    from ember import LLM

    offline = LLM.from_engine(dual_precision_checkpoint.make_engine(num_kv_blocks=64))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def offline_text(precision: str) -> str:
        return offline.generate({"prompt_token_ids": PROMPT}, params.clone(precision=precision),
                                use_tqdm=False)[0].outputs[0].text

    with dual_server.http() as http:
        state = http.get(ADMIN).json()
        assert state["default_precision"] == "quantized" and len(state["available_ops"]) == 14
        assert state["enabled_ops"] == state["available_ops"]
        assert _complete(dual_server) == offline_text("quantized")
        assert _complete(dual_server, precision="bf16") == offline_text("bf16") != offline_text("quantized")

        state = http.post(ADMIN, json={"ops": ["model.layers.*.mlp.down_proj"], "default_precision": "bf16"}).json()
        assert state["enabled_ops"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
        assert http.get(ADMIN).json() == state
        offline.set_precision(ops=["down_proj"])
        assert _complete(dual_server) == offline_text("bf16")  # the new default, with the new op set


def test_bad_admin_input_is_a_400_and_changes_nothing(dual_server):
    with dual_server.http() as http:
        before = http.get(ADMIN).json()
        assert "matches no layer" in _assert_error(http.post(ADMIN, json={"ops": ["model.layers.5.mlp.down_proj"]}),
                                                   400, "ops")["message"]
        _assert_error(http.post(ADMIN, json={"default_precision": "fp4"}), 400, "default_precision")
        _assert_error(http.post(ADMIN, json={"opps": ["down_proj"]}), 400)  # unknown field
        _assert_error(http.post(ADMIN, json={"ops": "down_proj"}), 400)  # not a list
        assert http.get(ADMIN).json() == before
    assert _complete(dual_server)  # still serving
    text = httpx.get(dual_server.base_url + "/metrics", timeout=30).text
    assert 'ember:precision_fallbacks_total{model_name="tiny-dual"} 0.0' in text


def test_metrics_count_fallbacks():
    from ember.server.metrics import ServerMetrics
    from fake_engine import FakeStats

    stats = FakeStats()
    stats.num_precision_fallbacks_total = 3
    text = ServerMetrics(lambda: stats, lambda: (0, 0), lambda: "m").render().decode()
    assert 'ember:precision_fallbacks_total{model_name="m"} 3.0' in text
