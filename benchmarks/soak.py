"""A bounded mixed-traffic soak against `ember serve`: chat, completions, streaming, mid-stream disconnects,
bad inputs, tokenize and JSON-schema chats (a new schema each) from several workers, with the server's RSS,
KV usage and open requests sampled.

Starts its own server (bundled model) unless `--url` is given. Prints one JSON object: request counts by
kind and outcome, unexpected errors (5xx or transport failures), RSS first / last / max and its slope over
the last `--slope-minutes`, KV usage and open requests at the end, and every sample.

    .venv/bin/python benchmarks/soak.py --minutes 30 --json-out soak.json
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402

API_KEY = "soak-key"
WORDS = "the a king queen speak love war night day sword crown river house bright dark old young".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS / KV samples")
    parser.add_argument("--slope-minutes", type=float, default=10.0, help="RSS slope over this last stretch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


class Traffic:
    """One worker's request mix; counts outcomes per kind. Unexpected: any 5xx or a transport failure."""

    def __init__(self, base_url: str, seed: int) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.unexpected: list[str] = []

    def text(self, lo: int = 5, hi: int = 60) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def one(self) -> None:
        kind = self.rng.choices(["chat", "completion", "stream", "disconnect", "bad", "tokenize", "n2", "schema"],
                                weights=[3, 3, 3, 2, 2, 1, 1, 2])[0]
        try:
            status = getattr(self, "_" + kind)()
        except httpx.HTTPError as exc:
            status = f"transport {type(exc).__name__}"
        key = f"{kind}:{status}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if not isinstance(status, int) or status >= 500:
            self.unexpected.append(key)

    def _params(self) -> dict:
        return {"max_tokens": self.rng.randint(4, 32), "temperature": self.rng.choice([0.0, 0.8]),
                "seed": self.rng.randint(0, 1000)}

    def _chat(self) -> int:
        body = {"messages": [{"role": "user", "content": self.text()}], **self._params()}
        return self.http.post("/v1/chat/completions", json=body).status_code

    def _completion(self) -> int:
        body = {"prompt": self.text(20, 300), "logprobs": self.rng.choice([None, 2]), **self._params()}
        return self.http.post("/v1/completions", json=body).status_code

    def _n2(self) -> int:
        body = {"prompt": self.text(), "n": 2, **self._params(), "temperature": 0.8}
        return self.http.post("/v1/completions", json=body).status_code

    def _schema(self) -> int:
        # a new JSON schema nearly every time, as clients send them: compiled grammars must not pile up
        field = self.rng.choice(WORDS) + str(self.rng.randint(0, 10**6))
        schema = {"type": "object", "required": [field],
                  "properties": {field: {"type": "string", "maxLength": self.rng.randint(3, 40)},
                                 "n": {"type": "integer", "minimum": self.rng.randint(0, 1000)}}}
        body = {"messages": [{"role": "user", "content": self.text()}], **self._params(),
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
        return self.http.post("/v1/chat/completions", json=body).status_code

    def _stream(self) -> int:
        body = {"messages": [{"role": "user", "content": self.text()}], "stream": True, **self._params()}
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and '"error"' in line:
                    return 500
            return response.status_code

    def _disconnect(self) -> int:
        body = {"prompt": self.text(), "stream": True, "max_tokens": 200, "ignore_eos": True}
        with self.http.stream("POST", "/v1/completions", json=body) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= self.rng.randint(1, 6):
                    break  # leave mid-stream: the server must abort and free the request
            return response.status_code

    def _bad(self) -> int:
        body = self.rng.choice([
            {"prompt": "x", "max_tokens": -1}, {"prompt": "x", "temperature": "hot"},
            {"prompt": "x", "logit_bias": {"nope": 1}}, {"prompt": "", "max_tokens": 4},
            {"prompt": "x" * 5000, "max_tokens": 4}, {"prompt": "x", "n": 10_000},
            {"prompt": "x", "structured_outputs": {"regex": "("}}, {"messages": "not a list"}])
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status = self.http.post(path, json=body).status_code
        return status if status != 200 else 500  # every one of these must be refused

    def _tokenize(self) -> int:
        return self.http.post("/tokenize", json={"prompt": self.text()}).status_code


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def server_gauges(base_url: str) -> dict:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    wanted = {"ember:kv_cache_usage_perc": "kv_usage", "ember:num_requests_running": "running",
              "ember:num_requests_waiting": "waiting"}
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] = float(line.rsplit(" ", 1)[1])
    return out


def slope_mib_per_min(samples: list[dict], minutes: float) -> float:
    """Least-squares slope of RSS against time over the samples of the last `minutes`."""
    end = samples[-1]["t_min"]
    points = [(s["t_min"], s["rss_mib"]) for s in samples if s["t_min"] >= end - minutes]
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (r - mean_r) for t, r in points) / var if var else 0.0


def run(args: argparse.Namespace) -> dict:
    base_url = f"http://127.0.0.1:{args.port}"
    command = [sys.executable, "-m", "ember.cli.main", "serve", "--port", str(args.port), "--api-key", API_KEY,
               "--dtype", args.dtype, "--max-model-len", "1024", "--max-queued-requests", "64",
               "--log-level", "warning"]
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("ember serve did not start")
            time.sleep(1)
        return soak(args, base_url, server.pid)
    finally:
        wl.stop_process(server, 30)


def soak(args: argparse.Namespace, base_url: str, pid: int) -> dict:
    stop = threading.Event()
    workers = [Traffic(base_url, seed) for seed in range(args.workers)]

    def loop(worker: Traffic) -> None:
        while not stop.is_set():
            worker.one()

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
    start = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    while time.monotonic() - start < args.minutes * 60:
        samples.append({"t_min": round((time.monotonic() - start) / 60, 3), "rss_mib": round(rss_mib(pid), 1),
                        **server_gauges(base_url)})
        time.sleep(args.sample_s)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    time.sleep(2)
    final = {"rss_mib": round(rss_mib(pid), 1), **server_gauges(base_url)}
    counts: dict[str, int] = {}
    for w in workers:
        for key, value in w.counts.items():
            counts[key] = counts.get(key, 0) + value
    rss = [s["rss_mib"] for s in samples]
    return {"minutes": args.minutes, "workers": args.workers, "num_requests": sum(counts.values()),
            "counts": dict(sorted(counts.items())), "unexpected": sum(len(w.unexpected) for w in workers),
            "unexpected_kinds": sorted({k for w in workers for k in w.unexpected}),
            "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "rss_max_mib": max(rss),
            "rss_slope_last_mib_per_min": round(slope_mib_per_min(samples, args.slope_minutes), 3),
            "final": final, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wl.emit(run(args), args.json_out)


if __name__ == "__main__":
    main()
