"""/metrics under vLLM's names: every vLLM metric we claim, with vLLM's type and labels, beside the `ember:`
ones with the same values; and the Grafana dashboard in docs/ queries only metrics that exist."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ember.distributed.frontend import ClusterStats
from ember.engine.llm_engine import EngineStats
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.async_engine import AsyncEngine
from ember.server.metrics import ServerMetrics
from fake_engine import FakeEngine

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "ember_dashboard.json"

# vLLM v1's metric families (name without the `_total` a counter's sample carries) and their types
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, sample_name: str, **labels) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for s in families[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((sample_name, labels))


def _assert_vllm_names_and_types(families: dict, model: str) -> None:
    for name, kind in VLLM_METRICS.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, (name, families[name].type)
        samples = [s for s in families[name].samples if not s.name.endswith("_created")]
        assert samples, name
        extra = {"finished_reason"} if name == "vllm:request_success" else {"le"} if kind == "histogram" else set()
        for s in samples:
            assert set(s.labels) - {"le"} <= {"model_name", "engine"} | extra, (name, s.labels)
            assert s.labels["model_name"] == model and s.labels["engine"] == "0", (name, s.labels)


def _output(request_id: str, num_prompt: int, num_tokens: int, reason: str = "length") -> RequestOutput:
    return RequestOutput(request_id, None, list(range(num_prompt)),
                         [CompletionOutput(0, "", list(range(num_tokens)), finish_reason=reason)], True)


def test_every_vllm_metric_has_vllm_s_type_labels_and_the_ember_value():
    stats = EngineStats(2, 1, 0.375, 4, 120, 30, 96, 48)
    metrics = ServerMetrics(lambda: stats, lambda: (0, 0), lambda: "m")
    for gap in (0.02, 0.03, 0.5):  # three steps after the first token
        metrics.observe_tokens(None, _output("r", 3, 4), 1, gap)
    metrics.observe_finished(SimpleNamespace(arrival_time=0.0, first_token_time=0.25, last_token_time=0.85),
                             _output("r", 3, 4))
    metrics.observe_finished(None, None)  # a client that went away
    families = _families(metrics.render().decode())
    _assert_vllm_names_and_types(families, "m")
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total"):
        assert _value(families, "vllm:" + name) == _value(families, "ember:" + name), name
    assert _value(families, "vllm:kv_cache_usage_perc") == 0.375
    assert _value(families, "vllm:prefix_cache_hits_total") == 48
    assert _value(families, "vllm:request_success_total", finished_reason="length") == 1
    assert _value(families, "vllm:request_success_total", finished_reason="abort") == 1
    assert _value(families, "vllm:inter_token_latency_seconds_count") == 3
    assert abs(_value(families, "vllm:inter_token_latency_seconds_sum") - 0.55) < 1e-9
    assert _value(families, "vllm:time_to_first_token_seconds_sum") == 0.25
    assert _value(families, "vllm:e2e_request_latency_seconds_sum") == 0.85
    assert abs(_value(families, "vllm:request_time_per_output_token_seconds_sum") - 0.2) < 1e-9  # 0.6 s / 3
    assert _value(families, "vllm:request_prompt_tokens_sum") == 3
    assert _value(families, "vllm:request_generation_tokens_sum") == 4
    bucket_edges = [s.labels["le"] for s in families["vllm:inter_token_latency_seconds"].samples
                    if s.name.endswith("_bucket")]
    assert bucket_edges[:3] == ["0.01", "0.025", "0.05"] and bucket_edges[-2:] == ["80.0", "+Inf"]  # vLLM's


def test_a_distributed_engine_labels_each_worker_and_the_replica_that_served():
    stats = ClusterStats.combine({"0": EngineStats(3, 0, 0.5, 0, 10, 5, 0, 0),
                                  "1": EngineStats(1, 2, 0.25, 0, 20, 7, 0, 0)})
    metrics = ServerMetrics(lambda: stats, lambda: (0, 0), lambda: "m")
    output = _output("r", 2, 2)
    output.extra["engine"] = "1"  # set by the data-parallel engine on the final output
    metrics.observe_finished(SimpleNamespace(arrival_time=0.0, first_token_time=0.1, last_token_time=0.2), output)
    families = _families(metrics.render().decode())
    assert _value(families, "vllm:num_requests_running", engine="0") == 3
    assert _value(families, "vllm:num_requests_running", engine="1") == 1
    assert _value(families, "vllm:generation_tokens_total", engine="1") == 7
    assert _value(families, "vllm:e2e_request_latency_seconds_count", engine="1") == 1


def test_async_engine_reports_one_inter_token_gap_per_step_after_the_first():
    metrics = ServerMetrics(lambda: None, lambda: (0, 0), lambda: "fake-model")

    async def main():
        engine = AsyncEngine(FakeEngine, on_finished=metrics.observe_finished, on_tokens=metrics.observe_tokens)
        engine.start()
        assert await asyncio.to_thread(engine.wait_ready, 10)
        try:
            stream = await engine.add_request("r1", [5, 6], SamplingParams(max_tokens=5))
            async for _ in stream:
                pass
        finally:
            await engine.shutdown()
    asyncio.run(main())
    families = _families(metrics.render().decode())
    assert _value(families, "vllm:inter_token_latency_seconds_count") == 4  # 5 tokens, one per step
    assert _value(families, "vllm:time_to_first_token_seconds_count") == 1
    assert _value(families, "vllm:request_generation_tokens_sum") == 5


# ---- the Grafana dashboard ----

def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else "")
    return exprs


def _queried_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\bvllm:[a-zA-Z0-9_:]+", e)}


def _sample_names(families: dict) -> set[str]:
    return {s.name for f in families.values() for s in f.samples}


def test_dashboard_panels_query_the_vllm_metrics_we_export():
    exprs = _dashboard_queries()
    queried = _queried_metrics(exprs)
    # running/waiting, KV usage, prefix hit rate, tokens/s, TTFT / ITL / e2e quantiles are all there
    for needed in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:generation_tokens_total",
                   "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:e2e_request_latency_seconds_bucket"):
        assert needed in queried, needed
    assert sum("histogram_quantile(0.99" in e for e in exprs) >= 3
    metrics = ServerMetrics(lambda: EngineStats(1, 0, 0.1, 0, 5, 5, 4, 2), lambda: (0, 0), lambda: "m")
    metrics.observe_tokens(None, _output("r", 2, 2), 1, 0.01)
    metrics.observe_finished(SimpleNamespace(arrival_time=0.0, first_token_time=0.1, last_token_time=0.2),
                             _output("r", 2, 2))
    missing = queried - _sample_names(_families(metrics.render().decode()))
    assert not missing, f"the dashboard queries metrics ServerMetrics does not export: {sorted(missing)}"


# ---- against a real `ember serve` (the session's `server` fixture) ----

def test_live_metrics_page_has_every_vllm_metric_and_every_dashboard_query(server):
    with server.client() as client:
        stream = client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=6,
                                           temperature=0.0, stream=True)
        assert sum(1 for _ in stream) >= 1
    families = _families(httpx.get(server.base_url + "/metrics", timeout=30).text)
    _assert_vllm_names_and_types(families, server.model)
    assert _value(families, "vllm:inter_token_latency_seconds_count") >= 1
    assert _value(families, "vllm:generation_tokens_total") == _value(families, "ember:generation_tokens_total") > 0
    missing = _queried_metrics(_dashboard_queries()) - _sample_names(families)
    assert not missing, f"the dashboard queries metrics `ember serve` does not export: {sorted(missing)}"
