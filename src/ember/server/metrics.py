"""Prometheus metrics of the server: every figure under an `ember:` name, and the ones vLLM also exports
under vLLM's own `vllm:` name, type, labels and buckets, so vLLM's dashboards and alerts read ours
(docs/metrics.md has the table)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ember.outputs import RequestOutput

# Bucket edges are vLLM's (vllm/v1/metrics/loggers.py), so dashboards built for it read ours.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)  # also vLLM's inter-token latency buckets
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM builds 1-2-5 token-count buckets up to max_model_len; ours are fixed (the histograms exist before
# the engine has loaded), up to 1M tokens.
_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(7) for m in (1, 2, 5) if m * 10 ** e <= 1_000_000)
_KV_BYTES_BUCKETS = tuple(2.0 ** e for e in range(16, 34, 2))  # 64 KiB .. 8 GiB
_KV_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# vLLM v1 labels every engine metric with the served model and the engine's index ("0" for one engine).
VLLM_LABELS = ["model_name", "engine"]
_DEFAULT_ENGINE = "0"

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (name after the prefix, help, EngineStats attribute, also exported as `vllm:`)
_ENGINE_GAUGES = (
    ("num_requests_running", "Requests in the engine's running batch.", "num_running", True),
    ("num_requests_waiting", "Requests waiting in the engine's queue.", "num_waiting", True),
    ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", "kv_cache_usage", True),
    ("kv_cache_blocks_used", "KV-cache blocks referenced by live requests.", "kv_cache_blocks_used", False),
    ("kv_cache_fragmentation_perc", "Empty token slots in the used KV-cache blocks over their slots (0..1).",
     "kv_cache_fragmentation", False),
)
_ENGINE_COUNTERS = (  # exposed with a `_total` suffix
    ("num_preemptions", "Requests preempted by the scheduler.", "num_preemptions_total", True),
    ("prompt_tokens", "Prompt tokens processed.", "prompt_tokens_total", True),
    ("generation_tokens", "Tokens generated.", "generation_tokens_total", True),
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries", True),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits", True),
    ("precision_fallbacks", "Sequences switched to the high-precision path mid-flight.",
     "num_precision_fallbacks_total", False),
)


class _EngineStatsCollector:
    """Reads the engine's latest stats snapshot at scrape time (gauges and engine-owned totals)."""

    def __init__(self, get_stats: Callable[[], Any], get_queue: Callable[[], tuple[int, int]],
                 model_name: Callable[[], str]) -> None:
        self.get_stats = get_stats
        self.get_queue = get_queue
        self.model_name = model_name

    def collect(self):
        stats, model = self.get_stats(), self.model_name()
        engines = getattr(stats, "engines", None)
        if engines is None:  # one engine: `ember:` labelled by model only, `vllm:` as vLLM's engine "0"
            yield from _engine_metrics("ember:", [([model], stats)], ["model_name"], False)
            yield from _engine_metrics("vllm:", [([model, _DEFAULT_ENGINE], stats)], VLLM_LABELS, True)
            spec = getattr(stats, "spec_decoding", None)
            if spec is not None:
                yield from _spec_decode_counters("ember:", spec, ["model_name"], [model])
                yield from _spec_decode_counters("vllm:", spec, VLLM_LABELS, [model, _DEFAULT_ENGINE])
        else:  # a distributed engine: every worker's own figures, labelled `engine` as vLLM's data parallel
            rows = [([model, label], s) for label, s in engines.items() if s is not None]
            yield from _engine_metrics("ember:", rows, VLLM_LABELS, False)
            yield from _engine_metrics("vllm:", rows, VLLM_LABELS, True)
            yield from _cluster_metrics(stats, model)
        num_queued, num_queued_tokens = self.get_queue()
        for name, doc, v in (
                ("ember:num_requests_queued", "Admitted requests without a first token yet.", num_queued),
                ("ember:num_tokens_queued", "Prompt tokens of the queued requests.", num_queued_tokens)):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([model], float(v))
            yield g


def _engine_metrics(prefix: str, rows: list[tuple[list[str], Any]], labels: list[str], vllm_only: bool):
    """The engine gauges and totals under `prefix`, one sample per (label values, stats) row; with
    `vllm_only`, just those vLLM exports too."""
    for table, family in ((_ENGINE_GAUGES, GaugeMetricFamily), (_ENGINE_COUNTERS, CounterMetricFamily)):
        for name, doc, attr, in_vllm in table:
            if vllm_only and not in_vllm:
                continue
            metric = family(prefix + name, doc, labels=labels)
            for label, stats in rows:
                metric.add_metric(label, _value(stats, attr))
            yield metric


def _value(stats: Any, name: str) -> float:
    return float(getattr(stats, name, 0) or 0) if stats is not None else 0.0


def _cluster_metrics(stats: Any, model: str):
    """A distributed engine's own figures: which workers are up, and the KV bytes and time P/D moved."""
    up = GaugeMetricFamily("ember:engine_up", "1 while the engine worker serves, 0 while it is down or restarting.",
                           labels=["model_name", "engine"])
    for label, engine_stats in stats.engines.items():
        up.add_metric([model, label], 0.0 if engine_stats is None else 1.0)
    yield up
    for name, doc, attr in (
            ("ember:kv_transfer_bytes", "KV-cache bytes moved between workers (prefill/decode disaggregation).",
             "kv_transfer_bytes"),
            ("ember:kv_transfer_seconds", "Time spent moving KV-cache blocks between workers.", "kv_transfer_seconds")):
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([model], _value(stats, attr))
        yield c


def _spec_decode_counters(prefix: str, spec, labels: list[str], values: list[str]):
    """Speculative decoding's totals under vLLM's names (`spec_decode_*`); the acceptance rate is
    accepted / draft tokens, the mean acceptance length 1 + accepted / drafts."""
    for name, doc, total in (
            ("spec_decode_num_drafts", "Verification rounds (a request's drafts in one step).", spec.num_drafts),
            ("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", spec.num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens)):
        c = CounterMetricFamily(prefix + name, doc, labels=labels)
        c.add_metric(values, float(total))
        yield c
    c = CounterMetricFamily(prefix + "spec_decode_num_accepted_tokens_per_pos",
                            "Draft tokens accepted, by position in the draft.", labels=labels + ["position"])
    for position, total in enumerate(spec.accepted_per_position):
        c.add_metric(values + [str(position)], float(total))
    yield c


class _VllmRequestMetrics:
    """The request-level series under vLLM's names: outcome counter and latency / size histograms, each
    labelled (model_name, engine) as vLLM v1's."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram("vllm:" + name, doc, VLLM_LABELS, buckets=buckets, registry=registry)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       VLLM_LABELS + ["finished_reason"], registry=registry)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _TPOT_BUCKETS)
        # vLLM <= 0.10's name for the inter-token latency (hidden since 0.11): older dashboards query it
        self.tpot = histogram("time_per_output_token_seconds",
                              "Histogram of time per output token in seconds. "
                              "DEPRECATED: Use vllm:inter_token_latency_seconds instead.", _TPOT_BUCKETS)
        self.request_tpot = histogram("request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.", _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _E2E_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.",
                                       _TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens", "Number of generation tokens processed.",
                                           _TOKEN_BUCKETS)


class ServerMetrics:
    """Owns one registry (no process-global state): request outcomes, latency histograms, engine stats.

    The request-level series are observed twice, under `ember:` (labelled by model) and under `vllm:`
    (labelled by model and engine: the replica that served it with data parallelism, else "0").
    """

    def __init__(self, get_stats: Callable[[], Any], get_queue: Callable[[], tuple[int, int]],
                 model_name: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.request_success = Counter(
            "ember:request_success", "Finished requests by finish reason.",
            labels + ["finished_reason"], registry=self.registry)
        self.request_rejected = Counter(
            "ember:request_rejected", "Requests refused before reaching the engine, by status code.",
            labels + ["code"], registry=self.registry)
        self.ttft = Histogram("ember:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("ember:time_per_output_token_seconds", "Mean time per output token after the first.",
                              labels, buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("ember:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_E2E_BUCKETS, registry=self.registry)
        # prefill/decode disaggregation: what one request's KV blocks cost to move (export + import)
        self.kv_transfer_bytes = Histogram(
            "ember:request_kv_transfer_bytes", "KV-cache bytes moved for one request (P/D disaggregation).",
            labels, buckets=_KV_BYTES_BUCKETS, registry=self.registry)
        self.kv_transfer_seconds = Histogram(
            "ember:request_kv_transfer_seconds", "Time spent moving one request's KV-cache blocks (P/D).",
            labels, buckets=_KV_SECONDS_BUCKETS, registry=self.registry)
        self.vllm = _VllmRequestMetrics(self.registry)
        self.registry.register(_EngineStatsCollector(get_stats, get_queue, model_name))

    def observe_tokens(self, stream: Any, output: RequestOutput, num_new_tokens: int, gap_s: float) -> None:
        """Record one step's new tokens of a request after its first: one inter-token latency sample per
        step, as vLLM (several tokens arrive at once with speculative decoding)."""
        del stream, num_new_tokens  # vLLM counts the step, not its tokens
        engine = str(output.extra.get("engine", _DEFAULT_ENGINE))
        self.vllm.itl.labels(self.model_name(), engine).observe(gap_s)
        self.vllm.tpot.labels(self.model_name(), engine).observe(gap_s)

    def observe_finished(self, stream: Any, output: RequestOutput | None) -> None:
        """Record one ended request; `output` is None when it was aborted (client gone)."""
        label = self.model_name()
        if output is None:
            self.request_success.labels(label, "abort").inc()
            self.vllm.request_success.labels(label, _DEFAULT_ENGINE, "abort").inc()
            return
        engine = str(output.extra.get("engine", _DEFAULT_ENGINE))
        for completion in output.outputs:
            self.request_success.labels(label, completion.finish_reason or "abort").inc()
            self.vllm.request_success.labels(label, engine, completion.finish_reason or "abort").inc()
        transfer = output.extra.get("kv_transfer")
        if transfer is not None:
            self.kv_transfer_bytes.labels(label).observe(transfer["bytes"])
            self.kv_transfer_seconds.labels(label).observe(transfer["seconds"])
        if stream.first_token_time is None:
            return
        self._observe_latencies(stream, output, label, engine)

    def _observe_latencies(self, stream: Any, output: RequestOutput, label: str, engine: str) -> None:
        """TTFT, e2e, per-request TPOT and token counts of a request that produced tokens."""
        ttft = stream.first_token_time - stream.arrival_time
        e2e = stream.last_token_time - stream.arrival_time
        num_tokens = max(len(c.token_ids) for c in output.outputs)
        for ttft_h, e2e_h in ((self.ttft.labels(label), self.e2e.labels(label)),
                              (self.vllm.ttft.labels(label, engine), self.vllm.e2e.labels(label, engine))):
            ttft_h.observe(ttft)
            e2e_h.observe(e2e)
        self.vllm.prompt_tokens.labels(label, engine).observe(len(output.prompt_token_ids))
        self.vllm.generation_tokens.labels(label, engine).observe(sum(len(c.token_ids) for c in output.outputs))
        if num_tokens > 1:
            tpot = (stream.last_token_time - stream.first_token_time) / (num_tokens - 1)
            self.tpot.labels(label).observe(tpot)
            self.vllm.request_tpot.labels(label, engine).observe(tpot)

    def observe_rejected(self, status_code: int) -> None:
        self.request_rejected.labels(self.model_name(), str(status_code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
