"""Run the benchmark workloads on a llama.cpp server and print one JSON object.

Starts `llama-server` on a free loopback port (one slot per W1 request, 2 threads by default),
sends W1 concurrently to `/completion` as token-id prompts, W2 and the prefill probe as single
streams, then stops the server. Standard library only:

    python benchmarks/peers/llamacpp_bench.py --gguf /work/peers/smollm2-135m-instruct-bf16.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import workloads as wl  # noqa: E402

DEFAULT_SERVER = os.environ.get("EMBER_LLAMA_SERVER", "/work/peers/llama.cpp/build/bin/llama-server")
DEFAULT_GGUF = os.environ.get("EMBER_LLAMA_GGUF", "/work/peers/smollm2-135m-instruct-bf16.gguf")
REQUEST_TIMEOUT_S = 1800


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=DEFAULT_SERVER, help="llama-server binary ($EMBER_LLAMA_SERVER)")
    parser.add_argument("--gguf", default=DEFAULT_GGUF, help="model file ($EMBER_LLAMA_GGUF)")
    parser.add_argument("--server-log", default=None, help="file for the server's output (default: discarded)")
    parser.add_argument("--server-args", default="", help="extra llama-server flags, e.g. '--poll 0'")
    wl.add_workload_args(parser)
    return parser.parse_args(argv)


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    """One slot per concurrent request, each with room for max_model_len tokens."""
    threads = args.threads or wl.default_threads()
    parallel = args.max_num_seqs or args.num_requests
    command = [args.server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(parallel), "-c", str(parallel * args.max_model_len),
               "-t", str(threads), "-tb", str(threads)]
    if args.max_num_batched_tokens:
        command += ["-b", str(args.max_num_batched_tokens)]
    return command + shlex.split(args.server_args)


def _die_with_parent() -> None:
    """In the server's process: have the kernel stop it when this runner dies, even by SIGKILL."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the `finally` in `run` still stops it
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_ready(base_url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Poll /health until the model is loaded; raises if the server exits or never gets ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {process.returncode}")
        try:
            if _get_json(base_url + "/health").get("status") == "ok":
                return
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"llama-server not ready after {timeout_s} s")


def _body(request: wl.BenchRequest, stream: bool) -> bytes:
    # temperature 0 is greedy; cache_prompt off so no request reuses another's KV.
    return json.dumps({"prompt": request.prompt_token_ids, "n_predict": request.max_tokens,
                       "ignore_eos": True, "temperature": 0.0, "cache_prompt": False,
                       "return_tokens": True, "stream": stream}).encode()


def _post(base_url: str, body: bytes):
    request = urllib.request.Request(base_url + "/completion", data=body,
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S)


def complete(base_url: str, request: wl.BenchRequest) -> dict:
    with _post(base_url, _body(request, stream=False)) as response:
        return json.loads(response.read())


def run_offline(base_url: str, requests: list[wl.BenchRequest]) -> dict:
    """Every request in flight at once, one client thread each."""
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=len(requests))
    try:
        results = list(pool.map(lambda r: complete(base_url, r), requests))
    finally:
        # On SIGTERM do not wait for requests in flight: stopping the server ends them.
        pool.shutdown(wait=False, cancel_futures=True)
    elapsed = time.perf_counter() - start
    return wl.throughput_metrics(requests, [r["tokens_predicted"] for r in results], elapsed)


def run_stream(base_url: str, request: wl.BenchRequest) -> dict:
    """One streamed request, timed on the client; the server's own timings ride along."""
    start = time.perf_counter()
    first_token = None
    token_ids: list[int] = []
    final: dict = {}
    with _post(base_url, _body(request, stream=True)) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[len("data: "):])
            token_ids += chunk.get("tokens", [])
            if first_token is None and token_ids:
                first_token = time.perf_counter()
            if chunk.get("stop"):
                final = chunk
                break
    end = time.perf_counter()
    metrics = wl.stream_metrics(start, first_token, end, len(token_ids))
    metrics["first_token_ids"] = token_ids[:8]
    timings = final.get("timings", {})
    metrics["server_prompt_ms"] = timings.get("prompt_ms")
    metrics["server_tpot_ms"] = timings.get("predicted_per_token_ms")
    return metrics


def run(args: argparse.Namespace) -> dict:
    """Start the server, warm up once, run the selected workloads, stop the server."""
    for path, what in ((args.server, "llama-server binary"), (args.gguf, "GGUF model")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = server_command(args, port)
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        wait_ready(base_url, process)
        result = _run_workloads(args, base_url, command)
        result["peak_rss_mib"] = wl.process_peak_rss_mib(process.pid)
        return result
    finally:
        wl.stop_process(process, timeout_s=10)
        if log is not subprocess.DEVNULL:
            log.close()


def _run_workloads(args: argparse.Namespace, base_url: str, command: list[str]) -> dict:
    parts = wl.selected(args.workload)
    if not args.no_warmup:
        run_offline(base_url, wl.build_warmup())
        run_stream(base_url, wl.build_warmup()[0])
    props = _get_json(base_url + "/props")
    result: dict = {"engine": "llama.cpp", "version": props.get("build_info"), "model": args.gguf,
                    "dtype": "as stored in the GGUF", "threads": args.threads or wl.default_threads(),
                    "server_command": command, "args": vars(args)}
    if "w1" in parts:
        result["w1"] = run_offline(base_url, wl.build_w1(num_requests=args.num_requests))
    if "w2" in parts:
        result["w2"] = run_stream(base_url, wl.build_w2())
    if "prefill" in parts:
        prefill = run_stream(base_url, wl.build_prefill())
        result["prefill"] = {"num_prompt_tokens": wl.PREFILL_LEN, "ttft_ms": prefill["ttft_ms"],
                             "server_prompt_ms": prefill["server_prompt_ms"]}
    return result


def main(argv: list[str] | None = None) -> None:
    # SIGTERM (a timeout, compare.py) unwinds through `run`'s `finally`, which stops the server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args(argv)
    wl.emit(run(args), args.json_out)


if __name__ == "__main__":
    main()
