"""`ember bench serve`: metric definitions on synthetic timings, and one short run against the test server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ember.benchmarks.client import RequestResult
from ember.benchmarks.metrics import calculate_metrics, parse_goodput
from ember.benchmarks.runner import arrival_gaps
from server_helpers import API_KEY


def test_poisson_and_gamma_gaps_have_the_requested_mean():
    for burstiness in (1.0, 0.5, 4.0):
        gaps = arrival_gaps(20000, request_rate=4.0, burstiness=burstiness, seed=0)
        assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_metrics_follow_vllm_definitions():
    fast = RequestResult(True, prompt_len=10, output_len=5, ttft=0.1, latency=0.5, itl=[0.1] * 4)
    slow = RequestResult(True, prompt_len=10, output_len=3, ttft=1.0, latency=2.0, itl=[0.5, 0.5])
    failed = RequestResult(False, error="HTTP 429")
    m = calculate_metrics([fast, slow, failed], duration_s=2.0, percentiles=[50, 99],
                          goodput_slos=parse_goodput(["ttft:500"]))
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_output_tokens"] == 8 and m["output_throughput"] == 4.0
    assert m["total_token_throughput"] == 14.0 and m["request_throughput"] == 1.0
    assert m["mean_ttft_ms"] == pytest.approx(550.0)
    assert m["mean_tpot_ms"] == pytest.approx((100.0 + 500.0) / 2)  # (latency - ttft) / (out - 1)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["request_goodput"] == 0.5  # only `fast` meets TTFT <= 500 ms
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])


def test_bench_serve_runs_against_the_server(server, tmp_path):
    port = server.base_url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "ember.cli.main", "bench", "serve", "--port", port, "--api-key", API_KEY,
           "--dataset-name", "sonnet", "--sonnet-input-len", "40", "--sonnet-prefix-len", "20",
           "--sonnet-output-len", "3", "--num-prompts", "2", "--ignore-eos", "--max-concurrency", "2",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "out.json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Mean TTFT (ms)" in done.stdout and "P99 E2EL (ms)" in done.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["completed"] == 2 and result["total_output_tokens"] == 6
    assert result["p99_ttft_ms"] > 0 and result["request_rate"] == "inf"
