"""One real `ember serve` subprocess on loopback for the server tests, with small limits."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server_helpers import API_KEY, MAX_BODY_BYTES, MAX_MODEL_LEN, MAX_QUEUED_REQUESTS, Server

STARTUP_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command(port: int) -> list[str]:
    # The `ember` entry point when the CLI dispatcher is present, else the subcommand module itself.
    module = ["-m", "ember.cli.main", "serve"] if importlib.util.find_spec("ember.cli.main") else \
        ["-m", "ember.cli.serve"]
    return [sys.executable, *module, "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
            "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64", "--max-num-seqs", "4",
            "--max-queued-requests", str(MAX_QUEUED_REQUESTS), "--max-request-body-bytes", str(MAX_BODY_BYTES),
            "--log-level", "warning"]


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_serve_command(port), stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ember serve not ready after {STARTUP_TIMEOUT_S}s: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        models = httpx.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        yield Server(base_url, models["data"][0]["id"], proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
