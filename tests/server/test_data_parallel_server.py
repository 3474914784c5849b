"""`ember serve --data-parallel-size 2` on Ray: /health and /metrics cover both replicas, and a replica
killed during a 64-request run costs no hang: every request completes or gets a clear error, the server
keeps answering, and Ray restarts the replica, which rejoins."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from server_helpers import API_KEY, running_server, wait_until

pytest.importorskip("ray")

FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "128", "--data-parallel-size", "2",
         "--worker-timeout-s", "60"]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
REQUEST_TIMEOUT_S = 120.0


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray's raylet and its workers are started by the server)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _replica_pids(server_pid: int) -> list[int]:
    pids = []
    for pid in _descendants(server_pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::EngineWorker"):
            pids.append(pid)
    return sorted(pids)


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    with running_server(FLAGS, tmp_path_factory.mktemp("serve-dp")) as running:
        yield running


def _metric_lines(server, name: str) -> list[str]:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_health_and_metrics_cover_every_replica(dp_server):
    health = httpx.get(dp_server.base_url + "/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"engines": {"0": "ready", "1": "ready"}}
    http = dp_server.http()
    for i in range(4):
        r = http.post("/v1/completions", json={"prompt": f"Request {i} says", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
    lines = _metric_lines(dp_server, "ember:generation_tokens_total")
    assert len(lines) == 2 and {'engine="0"' in lines[0], 'engine="1"' in lines[1]} == {True}
    assert sum(float(line.rsplit(" ", 1)[1]) for line in lines) == 16
    assert len(_metric_lines(dp_server, "ember:engine_up")) == 2


def test_a_replica_killed_mid_run_fails_over(dp_server):
    pids = _replica_pids(dp_server.process.pid)
    assert len(pids) == 2
    http = dp_server.http(timeout=REQUEST_TIMEOUT_S)

    def one(i: int):
        start = time.monotonic()
        try:
            r = http.post("/v1/completions", json={"prompt": f"Story number {i}: once upon a time",
                                                   "max_tokens": 32, "temperature": 0, "ignore_eos": True})
            return r.status_code, r.json(), time.monotonic() - start
        except httpx.TimeoutException:
            return None, None, time.monotonic() - start

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(64)]
        assert wait_until(lambda: sum(f.done() for f in futures) >= 8, timeout_s=REQUEST_TIMEOUT_S)
        os.kill(pids[0], signal.SIGKILL)
        results = [f.result() for f in futures]
    statuses = [status for status, _, _ in results]
    assert None not in statuses  # no request hung past its timeout
    assert set(statuses) <= {200, 503}
    for status, body, _ in results:
        if status == 200:
            assert body["usage"]["completion_tokens"] == 32
        else:
            assert "replica" in body["error"]["message"]
    assert statuses.count(200) >= 32  # the live replica kept serving (and took the retried requests)
    # the server answers throughout, and Ray brings the replica back
    assert httpx.get(dp_server.base_url + "/health", timeout=10).status_code == 200
    assert wait_until(lambda: httpx.get(dp_server.base_url + "/health", timeout=10).json()["engines"]
                      == {"0": "ready", "1": "ready"}, timeout_s=120, interval_s=1)
    assert len(_replica_pids(dp_server.process.pid)) == 2
    r = http.post("/v1/completions", json={"prompt": "After the fault", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
