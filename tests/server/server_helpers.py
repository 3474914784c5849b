"""Helpers the server tests share: the running server handle and a bounded poll."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import httpx

API_KEY = "test-key"
MAX_MODEL_LEN = 256
MAX_QUEUED_REQUESTS = 2
MAX_BODY_BYTES = 1 << 20


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
