"""/metrics of a distributed engine: each worker's figures under an `engine` label, which workers are up,
and the KV bytes and time prefill/decode disaggregation moved, in total and per request."""

from types import SimpleNamespace

from ember.distributed.frontend import ClusterStats
from ember.engine.llm_engine import EngineStats
from ember.outputs import CompletionOutput, RequestOutput
from ember.server.metrics import ServerMetrics


def _samples(text: str, name: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{")}


def test_each_engine_is_labelled_and_a_down_one_reads_as_down():
    running = EngineStats(3, 1, 0.5, 0, 100, 40, 100, 64)
    stats = ClusterStats.combine({"0": running, "1": None}, kv_transfer_bytes=737280, kv_transfer_seconds=0.25)
    text = ServerMetrics(lambda: stats, lambda: (0, 0), lambda: "m").render().decode()
    assert _samples(text, "ember:num_requests_running") == {'ember:num_requests_running{engine="0",model_name="m"}': 3.0}
    assert _samples(text, "ember:prefix_cache_hits_total") == {'ember:prefix_cache_hits_total{engine="0",model_name="m"}': 64.0}
    assert _samples(text, "ember:engine_up") == {'ember:engine_up{engine="0",model_name="m"}': 1.0,
                                                  'ember:engine_up{engine="1",model_name="m"}': 0.0}
    assert _samples(text, "ember:kv_transfer_bytes_total") == {'ember:kv_transfer_bytes_total{model_name="m"}': 737280.0}
    assert _samples(text, "ember:kv_transfer_seconds_total") == {'ember:kv_transfer_seconds_total{model_name="m"}': 0.25}


def test_one_request_s_kv_transfer_goes_into_histograms():
    metrics = ServerMetrics(lambda: None, lambda: (0, 0), lambda: "m")
    output = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "", [5], finish_reason="length")], True)
    output.extra["kv_transfer"] = {"bytes": 1474560, "seconds": 0.004, "blocks_exported": 1, "blocks_imported": 1}
    metrics.observe_finished(SimpleNamespace(first_token_time=None), output)
    metrics.observe_finished(SimpleNamespace(first_token_time=None), RequestOutput(
        "plain", None, [1], [CompletionOutput(0, "", [5], finish_reason="stop")], True))  # no transfer: no sample
    text = metrics.render().decode()
    assert _samples(text, "ember:request_kv_transfer_bytes_sum") == {
        'ember:request_kv_transfer_bytes_sum{model_name="m"}': 1474560.0}
    assert _samples(text, "ember:request_kv_transfer_seconds_count") == {
        'ember:request_kv_transfer_seconds_count{model_name="m"}': 1.0}
