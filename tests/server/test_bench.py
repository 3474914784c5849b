"""`ember bench serve`: metric definitions on synthetic timings, and one short run against the test server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ember.benchmarks.client import RequestResult
from ember.benchmarks.metrics import calculate_metrics, parse_goodput
from ember.benchmarks.runner import arrival_gaps, sweep_figure
from ember.benchmarks.serve import sweep_subtitle
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


def _finished_requests(server) -> float:
    """Requests the server finished, summed over finish reasons (vLLM's counter on /metrics)."""
    text = server.http().get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


def test_bench_serve_runs_against_the_server(server, tmp_path):
    port = server.base_url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "ember.cli.main", "bench", "serve", "--port", port, "--api-key", API_KEY,
           "--dataset-name", "sonnet", "--sonnet-input-len", "40", "--sonnet-prefix-len", "20",
           "--sonnet-output-len", "3", "--num-prompts", "2", "--ignore-eos", "--max-concurrency", "2",
           "--num-warmup-requests", "3",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "out.json"]
    finished_before = _finished_requests(server)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Mean TTFT (ms)" in done.stdout and "P99 E2EL (ms)" in done.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    # the 3 warm-up requests reached the server before the measured 2, and no metric counts them
    assert _finished_requests(server) - finished_before == 3 + 2
    assert result["completed"] == 2 and result["total_output_tokens"] == 6 and result["num_warmup_requests"] == 3
    assert result["p99_ttft_ms"] > 0 and result["request_rate"] == "inf"
    assert result["input_len"] == 40 and result["output_len"] == 3 and result["model_id"] == server.model


def test_sweep_plot_says_what_it_measured():
    info = {"date": "20261206-104500", "model_id": "SmolLM2-135M-Instruct", "dataset_name": "random",
            "num_prompts": 200, "input_len": 1024, "output_len": 128, "ignore_eos": True,
            "num_warmup_requests": 8, "commit": "c767fa3"}
    subtitle = sweep_subtitle(info)
    keys = ("ttft", "tpot", "itl", "e2el")
    points = [{"request_rate": rate, **{f"p{p}_{k}_ms": rate * p for k in keys for p in (50, 99)}}
              for rate in (1.0, 2.0)]
    fig = sweep_figure(points, [50.0, 99.0], "ember bench serve: SmolLM2-135M-Instruct", subtitle)
    drawn = " ".join([fig.get_suptitle()] + [t.get_text() for t in fig.texts])
    for field in ("SmolLM2-135M-Instruct", "dataset random (200 prompts)", "input 1024 / output 128 tokens",
                  "8 warm-up requests", "2026-12-06 10:45", "c767fa3"):
        assert field in drawn, field
