"""Helpers the server tests share: the running server handle and a bounded poll."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-key"
MAX_MODEL_LEN = 256
MAX_QUEUED_REQUESTS = 2
MAX_BODY_BYTES = 1 << 20
STARTUP_TIMEOUT_S = 240.0


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    model: str
    process: subprocess.Popen

    def client(self, **kwargs):
        from openai import OpenAI
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120.0)
        return OpenAI(base_url=self.base_url + "/v1", api_key=API_KEY, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 120.0)
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)

    def metric(self, name: str) -> float:
        """The value of one unlabelled-by-us sample of /metrics (first line starting with `name{`)."""
        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)



def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.2) -> bool:
    """Poll `predicate` until true or the deadline; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(flags: list[str], log_dir: Path, env: dict[str, str] | None = None):
    """`ember serve` on a free loopback port with the API key and `flags` (and extra environment `env`);
    yields a `Server` once /health answers 200 and stops the process on exit (its log is in `log_dir`)."""
    port = free_port()
    log_path = log_dir / "serve.log"
    command = [sys.executable, "-m", "ember.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--api-key", API_KEY, "--log-level", "warning", *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, base_url, log_path)
            models = httpx.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
            yield Server(base_url, models["data"][0]["id"], proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ember serve exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"ember serve not ready after {STARTUP_TIMEOUT_S}s: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
