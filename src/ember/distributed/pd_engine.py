"""Prefill/decode disaggregation's front end: prompts are prefilled on prefill workers into the KV pool,
then decoded on decode workers that fetch the blocks they lack; outputs stream from the decode side.

Request lifecycle:
  1. `add_request` tokenizes the prompt and looks its full blocks up in the pool. When the pool lacks some
     of the blocks a prefix hit could use, a decode worker checks the request (errors raise here) and the
     least loaded prefill worker (by queued prompt tokens) gets it; otherwise it goes straight to 3.
  2. The prefill worker imports the pool's leading blocks, computes the rest of the prompt (one token,
     thrown away) and exports its new full blocks to the pool; its step lists the request as prefilled.
  3. The least loaded decode worker (by requests) fetches the blocks it lacks, installs them as cached
     prefix blocks and adds the request: it computes the last partial block and decodes.
Every worker has at most one step in flight; `step` returns as soon as any of them finishes, so a long
prefill never holds back the decode streams.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from ember.config import EngineConfig
from ember.distributed.block_keys import block_keys
from ember.distributed.config import ParallelConfig
from ember.distributed.executor import abandon, create_worker, remote_error
from ember.distributed.frontend import ClusterStats, DistributedEngine, failed_output, worker_engine_config
from ember.distributed.kv_pool import DEFAULT_KV_POOL_BYTES, create_kv_pool
from ember.distributed.kv_transfer import PDWorker, TransferRecord, check_pd_config
from ember.distributed.worker import build_engine
from ember.engine.llm_engine import EngineStats
from ember.engine.prompt_truncation import encode_prompt, resolve_truncation
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger("ember.distributed")

UNWATCHED_GAP_S = 2.0  # longer between two steps or polls: the engine sat idle, and a restart's clock stops
MAX_STEP_WAIT_S = 0.05  # `step` returns after this long with nothing finished (the caller adds requests then)
PING_RETRY_S = 0.5  # a restarting worker is pinged this often until it answers


@dataclass
class _PDRequest:
    """The front end's record of one request: where it is and what its KV transfers cost."""

    request_id: str
    prompt: str | list[int]
    token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    arrival_time: float
    worker: "_Worker | None" = None  # the prefill or decode worker holding it (None: waiting for one)
    num_outputs: int = 0
    transfer: dict = field(default_factory=lambda: {"bytes": 0, "seconds": 0.0, "blocks_exported": 0,
                                                    "blocks_imported": 0})


@dataclass
class _Worker:
    """One prefill or decode worker: its handle, its requests and its step in flight."""

    name: str
    role: str  # "prefill" or "decode"
    handle: Any
    requests: dict[str, _PDRequest] = field(default_factory=dict)
    stats: EngineStats | None = None
    future: concurrent.futures.Future | None = None
    deadline: float = 0.0  # of the call in flight, or of a restart
    num_failures: int = 0
    state: str = "ready"  # "ready", "restarting" (pinged until it answers) or "dead"
    retry_at: float = 0.0  # next ping of a restarting worker

    @property
    def load(self) -> int:
        """Queued prompt tokens of a prefill worker; requests of a decode worker."""
        if self.role == "prefill":
            return sum(len(r.token_ids) for r in self.requests.values())
        return len(self.requests)


def kv_pool_capacity(parallel_config: ParallelConfig) -> int:
    """The pool's bytes: `kv_buffer_size` (vLLM's name) of --kv-transfer-config, else 2 GiB."""
    if parallel_config.kv_transfer_config is None:
        return DEFAULT_KV_POOL_BYTES
    size = json.loads(parallel_config.kv_transfer_config).get("kv_buffer_size", DEFAULT_KV_POOL_BYTES)
    if not isinstance(size, (int, float)) or size <= 0:
        raise ValueError(f"kv_transfer_config kv_buffer_size must be a positive number of bytes, got {size!r}")
    return int(size)


class PDEngine(DistributedEngine):
    """Prefill workers, decode workers and the KV pool between them, behind the `LLMEngine` interface.

    Raises:
        ValueError: engine options the KV transfer cannot serve (see `check_pd_config`).
    """

    mode = "prefill/decode disaggregation"

    def __init__(self, config: EngineConfig, parallel_config: ParallelConfig) -> None:
        check_pd_config(config)
        super().__init__(config, parallel_config)
        backend = parallel_config.distributed_executor_backend
        counts = {"prefill": parallel_config.num_prefill_workers, "decode": parallel_config.num_decode_workers}
        worker_config = worker_engine_config(config, sum(counts.values()))
        self.pool, self._close_pool = create_kv_pool(backend, kv_pool_capacity(parallel_config),
                                                     parallel_config.max_worker_restarts)
        self.workers = [
            _Worker(f"{role}{i}", role, create_worker(
                backend, f"{role}{i}", build_engine, (worker_config, self.pool), num_cpus=worker_config.num_threads,
                max_restarts=parallel_config.max_worker_restarts, worker_class=PDWorker))
            for role, count in counts.items() for i in range(count)]
        try:  # every worker loads at once (a process worker starts on its first call)
            startup = parallel_config.worker_timeout_s * 5
            for method in ("describe", "get_stats"):
                futures = [w.handle.submit(method) for w in self.workers]
                answers = [self._result(w, f, method, startup) for w, f in zip(self.workers, futures)]
                for worker, answer in zip(self.workers, answers):
                    if method == "describe":
                        worker.handle.pid, info = answer.pid, answer
                    else:
                        worker.stats = answer
        except BaseException:
            self.shutdown()
            raise
        self._adopt(info)
        self._requests: dict[str, _PDRequest] = {}
        self._pending: dict[str, _PDRequest] = {}  # waiting for a decode worker to come back
        self._watched_at = time.monotonic()  # the last step or poll (see `_watch`)
        self._failed_outputs: list[RequestOutput] = []
        self.kv_transfer_bytes = 0
        self.kv_transfer_seconds = 0.0

    # ---- requests in -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None, lora_request=None) -> None:
        """Queue a request (see the module docstring for its path).

        Raises:
            ValueError: what `LLMEngine.add_request` raises for it (checked on a decode worker), LoRA.
            RuntimeError: no decode worker answered.
        """
        self._check_request(lora_request)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        keep = resolve_truncation(params.truncate_prompt_tokens, self.config.max_model_len)
        request = _PDRequest(request_id, prompt, encode_prompt(self.tokenizer, prompt, keep), params, cache_salt,
                             arrival_time if arrival_time is not None else time.monotonic())
        can_check = bool(self._ready("decode"))  # else (all restarting) errors come back as failed outputs
        if self._needs_prefill(request):
            if can_check:
                self._call_decode("check_request", prompt, params, cache_salt)
            self._requests[request_id] = request
            self._send_to_prefill(request)
        else:
            self._requests[request_id] = request
            self._admit(request, sync=can_check)

    def _needs_prefill(self, request: _PDRequest) -> bool:
        """Whether the pool lacks some of the blocks a prefix hit could serve (and the KV may be shared:
        prompt logprobs need every prompt row computed, a precision request keys its KV apart)."""
        params, block_size = request.params, self.config.block_size
        if params.prompt_logprobs is not None or params.precision is not None:
            return False
        if not self._ready("prefill"):
            return False
        num_usable = (len(request.token_ids) - 1) // block_size
        if num_usable == 0:
            return False
        keys = block_keys(request.token_ids, block_size, request.cache_salt, max_blocks=num_usable)
        try:
            return self.pool.lookup(keys) < num_usable
        except Exception as exc:  # a dead pool: prefill anyway (the export fails soft too)
            logger.warning("KV pool lookup failed: %s", exc)
            return True

    def _send_to_prefill(self, request: _PDRequest) -> None:
        worker = min(self._ready("prefill"), key=lambda w: w.load, default=None)
        if worker is None:
            self._admit(request, sync=False)
            return
        request.worker = worker
        worker.requests[request.request_id] = request
        worker.handle.submit("prefill", request.request_id, request.token_ids, request.cache_salt)

    def _admit(self, request: _PDRequest, sync: bool) -> None:
        """Hand the request to the least loaded ready decode worker (it waits while all restart);
        with `sync`, wait and raise its ValueError."""
        request.worker = None
        worker = min(self._ready("decode"), key=lambda w: w.load, default=None)
        if worker is None:
            if any(w.state == "restarting" for w in self._role("decode")):
                self._pending[request.request_id] = request
            else:
                self._fail(request, "no decode worker is alive")
            return
        request.worker = worker
        worker.requests[request.request_id] = request
        args = (request.request_id, request.prompt, request.params, request.token_ids, request.cache_salt,
                request.arrival_time)
        if not sync:
            worker.handle.submit("admit", *args)
            return
        try:
            self._call(worker, "admit", *args, raise_errors=True)
        except ValueError:
            self._forget(request)
            raise
        except Exception as exc:  # the worker failed: the request is placed again with its others
            self._on_worker_failure(worker, exc)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Drop requests wherever they are; unknown ids are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            request = self._requests.get(request_id)
            if request is not None:
                worker = request.worker
                self._forget(request)
                if worker is not None and worker.state == "ready":
                    worker.handle.submit("abort_request", [request_id])

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._failed_outputs)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Keep one step in flight per busy worker; return the outputs of those that finished within
        `MAX_STEP_WAIT_S` (the first to finish ends the wait). A worker past `worker_timeout_s` counts as dead."""
        self._watch()
        self._start_steps()
        running = {w.future: w for w in self.workers if w.future is not None}
        outputs: list[RequestOutput] = []
        if not running and self._pending:  # only restarts to wait for: do not spin
            time.sleep(MAX_STEP_WAIT_S)
        if running:
            wait_s = min(MAX_STEP_WAIT_S, max(0.0, min(w.deadline for w in running.values()) - time.monotonic()))
            done, _ = concurrent.futures.wait(running, wait_s, concurrent.futures.FIRST_COMPLETED)
            for future in done:
                outputs.extend(self._finish_step(running[future], future))
            now, timeout_s = time.monotonic(), self.parallel_config.worker_timeout_s
            for worker in running.values():
                if worker.future is not None and now > worker.deadline:
                    self._on_worker_failure(worker, TimeoutError(f"no answer within {timeout_s} s"), kill=True)
            self._start_steps()
        outputs.extend(self._failed_outputs)
        self._failed_outputs = []
        return outputs

    def poll_workers(self) -> None:
        """While idle too (the server's loop calls this when no request runs): a restarting worker is
        pinged and rejoins once it answers, or fails when its restart outlives `worker_timeout_s`.
        Otherwise a restart that ended between requests stayed unseen, and the next request's step
        found its deadline long past and killed the worker that had come back."""
        now = self._watch()
        for worker in self.workers:
            if worker.state != "restarting":
                continue
            if worker.future is None:
                if now >= worker.retry_at:
                    worker.future = worker.handle.submit("describe")
            elif worker.future.done():
                self._finish_step(worker, worker.future)
            elif now > worker.deadline:
                timeout_s = self.parallel_config.worker_timeout_s
                self._on_worker_failure(worker, TimeoutError(f"no answer within {timeout_s} s"), kill=True)

    def _watch(self) -> float:
        """The time now. A restart's `worker_timeout_s` runs only while the engine steps or polls: after a
        gap (an offline engine between two `generate` calls), every restarting worker's deadline moves by
        it, so a restart nobody could watch is not taken for a hung one."""
        now = time.monotonic()
        unwatched = now - self._watched_at
        if unwatched > UNWATCHED_GAP_S:
            for worker in self.workers:
                if worker.state == "restarting":
                    worker.deadline += unwatched
        self._watched_at = now
        return now

    def _start_steps(self) -> None:
        """A step for each busy worker that is ready, a ping for each restarting one that is due."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.future is not None:
                continue
            if worker.state == "restarting" and now >= worker.retry_at:
                worker.future = worker.handle.submit("describe")
            elif worker.state == "ready" and worker.requests:
                worker.future = worker.handle.submit("step")
                worker.deadline = now + self.parallel_config.worker_timeout_s

    def _finish_step(self, worker: _Worker, future: concurrent.futures.Future) -> list[RequestOutput]:
        worker.future = None
        try:
            result = future.result()
        except Exception as exc:
            if worker.state == "restarting" and _is_restarting(exc):
                worker.retry_at = time.monotonic() + PING_RETRY_S
            else:
                self._on_worker_failure(worker, exc)
            return []
        if worker.state == "restarting":  # the ping's answer: back in service
            logger.info("worker %s is back (pid %d)", worker.name, result.pid)
            worker.state, worker.handle.pid = "ready", result.pid
            pending, self._pending = list(self._pending.values()), {}
            for request in pending:
                self._admit(request, sync=False)
            return []
        worker.stats = result.stats
        for record in result.transfers:
            self._record_transfer(record)
        for request_id, error in result.failed.items():
            self._on_request_error(worker, request_id, error)
        for request_id in result.prefilled:
            request = worker.requests.pop(request_id, None)
            if request is not None:
                self._admit(request, sync=False)
        outputs = []
        for output in result.outputs:
            request = self._requests.get(output.request_id)
            if request is None or request.worker is not worker:
                continue  # aborted, or retried elsewhere
            request.num_outputs += 1
            if output.finished:
                output.extra["kv_transfer"] = dict(request.transfer)
                self._forget(request)
            outputs.append(output)
        return outputs

    def _record_transfer(self, record: TransferRecord) -> None:
        self.kv_transfer_bytes += record.num_bytes
        self.kv_transfer_seconds += record.seconds
        request = self._requests.get(record.request_id)
        if request is not None:
            request.transfer["bytes"] += record.num_bytes
            request.transfer["seconds"] += record.seconds
            request.transfer[f"blocks_{record.direction}ed"] += record.num_blocks

    def _on_request_error(self, worker: _Worker, request_id: str, error: str) -> None:
        """A prefill that failed is decoded from scratch (the decode worker's engine reports a real error);
        a decode worker's admission that failed ends the request."""
        request = worker.requests.get(request_id)
        if request is None:
            return
        if worker.role == "prefill":
            logger.warning("prefill of request %s failed (%s); its decode worker computes the prompt",
                           request_id, error)
            del worker.requests[request_id]
            self._admit(request, sync=False)
        else:
            self._fail(request, error)

    def _on_worker_failure(self, worker: _Worker, exc: BaseException, kill: bool = False) -> None:
        """A dead, hung or raising worker: restarted while restarts last (pinged until it answers, within
        `worker_timeout_s`); its requests that produced nothing are placed again (a prefill's on a decode
        worker), the others end with an error."""
        logger.error("worker %s failed: %s", worker.name, exc)
        worker.future, worker.stats = None, None
        if kill:
            try:
                worker.handle.kill()
            except Exception:
                pass
        else:
            abandon(worker.handle, list(worker.requests))
        worker.num_failures += 1
        if worker.num_failures <= self.parallel_config.max_worker_restarts and worker.handle.restart():
            worker.state, worker.retry_at = "restarting", time.monotonic()
            worker.deadline = worker.retry_at + self.parallel_config.worker_timeout_s
        else:
            worker.state = "dead"
        orphans, worker.requests = list(worker.requests.values()), {}
        for request in orphans:
            if request.num_outputs == 0:
                self._admit(request, sync=False)
            else:
                self._fail(request, f"worker {worker.name} failed: {exc}")

    def _fail(self, request: _PDRequest, error: str) -> None:
        self._forget(request)
        self._failed_outputs.append(failed_output(request.request_id, request.token_ids, error))

    def _forget(self, request: _PDRequest) -> None:
        self._requests.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        if request.worker is not None:
            request.worker.requests.pop(request.request_id, None)

    # ---- calls, stats, shutdown --------------------------------------------------------------
    def _role(self, role: str) -> list[_Worker]:
        return [w for w in self.workers if w.role == role]

    def _ready(self, role: str) -> list[_Worker]:
        return [w for w in self.workers if w.role == role and w.state == "ready"]

    def _call(self, worker: _Worker, method: str, *args, **kwargs) -> Any:
        """A call that waits (at most `worker_timeout_s`); a worker's exception is raised as itself."""
        future = worker.handle.submit(method, *args, **kwargs)
        return self._result(worker, future, method, self.parallel_config.worker_timeout_s)

    @staticmethod
    def _result(worker: _Worker, future: concurrent.futures.Future, method: str, timeout_s: float) -> Any:
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"worker {worker.name} did not answer {method} within {timeout_s} s") from None
        except Exception as exc:
            raise remote_error(exc) from None

    def _call_decode(self, method: str, *args) -> Any:
        """`_call` on the least loaded live decode worker, the next one if it fails (not a ValueError)."""
        for worker in sorted(self._ready("decode"), key=lambda w: w.load):
            try:
                return self._call(worker, method, *args)
            except ValueError:
                raise
            except Exception as exc:
                self._on_worker_failure(worker, exc)
        raise RuntimeError("no decode worker is alive")

    def replica_states(self) -> dict[str, str]:
        """Each worker's state by name: "ready", "restarting" or "dead" (the server's /health lists them)."""
        return {w.name: w.state for w in self.workers}

    def get_stats(self) -> ClusterStats:
        """Every worker's stats summed (see `ClusterStats`), except the prompt and generation totals: those
        are the decode workers' (the caller's tokens; a prefill's one token and prompt would count twice)."""
        engines = {w.name: w.stats if w.state == "ready" else None for w in self.workers}
        stats = ClusterStats.combine(engines, kv_transfer_bytes=self.kv_transfer_bytes,
                                     kv_transfer_seconds=self.kv_transfer_seconds)
        decode = [w.stats for w in self._ready("decode") if w.stats is not None]
        stats.prompt_tokens_total = sum(s.prompt_tokens_total for s in decode)
        stats.generation_tokens_total = sum(s.generation_tokens_total for s in decode)
        return stats

    def pool_stats(self):
        """The KV pool's `KVPoolStats`."""
        return self.pool.stats()

    def shutdown(self) -> None:
        for worker in getattr(self, "workers", []):
            try:
                worker.handle.shutdown()
            except Exception:
                logger.exception("shutdown of worker %s failed", worker.name)
        if getattr(self, "_close_pool", None) is not None:
            self._close_pool()
            self._close_pool = None


def _is_restarting(exc: BaseException) -> bool:
    """Whether a call failed only because Ray is still restarting the actor (not a new failure)."""
    return any(cls.__name__ == "ActorUnavailableError" for cls in type(exc).__mro__)


def create_pd_engine(engine_config: EngineConfig, parallel_config: ParallelConfig) -> PDEngine:
    """The front end of `--pd-disaggregation` (or `--kv-transfer-config`).

    Raises:
        ValueError: `parallel_config` does not ask for disaggregation, or engine options it cannot serve.
    """
    if not parallel_config.pd_disaggregation:
        raise ValueError("create_pd_engine needs pd_disaggregation (or a kv_transfer_config)")
    return PDEngine(engine_config, parallel_config)
