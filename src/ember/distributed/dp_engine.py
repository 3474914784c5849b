"""Data parallel: N engine replicas in worker processes behind one front end and a prefix-aware router.

Each replica steps on its own: the front end keeps one step call in flight per busy replica and hands
back whichever finishes first, so a slow replica never holds the others. A replica that dies fails over:
its requests that have produced nothing yet are re-added elsewhere, the rest end with an error, and the
replica rejoins once it has been restarted (Ray restarts the actor; the mp backend starts a new process).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ember.config import EngineConfig
from ember.distributed.block_keys import BlockKey, block_keys
from ember.distributed.config import ParallelConfig
from ember.distributed.executor import abandon, create_worker, remote_error
from ember.distributed.frontend import ClusterStats, DistributedEngine, failed_output, worker_engine_config
from ember.distributed.router import PrefixRouter
from ember.distributed.worker import build_engine
from ember.engine.llm_engine import EngineStats
from ember.engine.prompt_truncation import encode_prompt, resolve_truncation
from ember.outputs import RequestOutput

logger = logging.getLogger("ember.distributed")

_IDLE_WAIT_S = 0.05  # how long `step` waits when every replica with work is restarting
# A restarting replica is asked `describe` again this long after an error, and a call that has not answered
# in _PROBE_TIMEOUT_S is asked again: Ray can lose a call submitted while the actor is between processes
# (it never completes, though the actor is back), and one lost probe must not keep a replica out.
_PROBE_RETRY_S = 1.0
_PROBE_TIMEOUT_S = 10.0
_NO_STATS = EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)  # a replica that has not stepped yet


@dataclass
class _Placed:
    """A request as the front end placed it: enough to place it again if its replica dies first."""

    request_id: str
    args: tuple  # (prompt, params, cache_salt)
    prompt_token_ids: list[int]
    keys: list[BlockKey]
    num_outputs: int = 0  # outputs already handed to the caller
    num_retries: int = 0


@dataclass
class _Replica:
    index: int
    handle: Any
    state: str = "loading"  # -> ready -> restarting -> ready ... | dead
    requests: dict[str, _Placed] = field(default_factory=dict)
    step_future: concurrent.futures.Future | None = None
    step_started: float = 0.0
    probe: concurrent.futures.Future | None = None  # describe() while loading or restarting
    probe_started: float = 0.0
    probe_after: float | None = None  # when to ask a restarting replica again (after a failed probe)
    stats: Any = None
    num_restarts: int = 0

    @property
    def label(self) -> str:
        return str(self.index)


class DataParallelEngine(DistributedEngine):
    """`data_parallel_size` replicas of the whole engine, each one worker with its share of the cores."""

    mode = "data parallel"

    def __init__(self, config: EngineConfig, parallel_config: ParallelConfig) -> None:
        super().__init__(config, parallel_config)
        size = parallel_config.data_parallel_size
        replica_config = worker_engine_config(config, size)
        self.router = PrefixRouter(size, parallel_config.routing_policy)
        self.replicas = [
            _Replica(i, create_worker(parallel_config.distributed_executor_backend, f"replica-{i}", build_engine,
                                      (replica_config,), num_cpus=1,
                                      max_restarts=parallel_config.max_worker_restarts))
            for i in range(size)]
        self._owner: dict[str, _Replica] = {}
        self._pending_failures: list[RequestOutput] = []  # requests ended by a replica's death, not yet returned
        self.num_requests_retried = 0  # re-placed after their replica died before they produced anything
        for replica in self.replicas:  # all load at once; wait for each
            replica.probe = replica.handle.submit("describe")
        for replica in self.replicas:
            info = replica.probe.result(timeout=parallel_config.worker_timeout_s * 5)
            replica.probe, replica.state, replica.handle.pid = None, "ready", info.pid
        self._adopt(info)

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params, arrival_time: float | None = None,
                    cache_salt: str | None = None, lora_request=None) -> None:
        """Route the request (see `PrefixRouter`) and add it on that replica.

        Raises:
            ValueError: what `LLMEngine.add_request` raises, or a LoRA request (not supported here).
            RuntimeError: no replica is alive.
        """
        self._check_request(lora_request)
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        keep = resolve_truncation(params.truncate_prompt_tokens, self.config.max_model_len)
        token_ids = encode_prompt(self.tokenizer, prompt, keep)
        placed = _Placed(request_id, (prompt, params, cache_salt), token_ids,
                         block_keys(token_ids, self.config.block_size, cache_salt))
        self._place(placed, exclude=None)

    def _place(self, placed: _Placed, exclude: _Replica | None) -> None:
        while True:
            loads = [len(r.requests) if r.state == "ready" and r is not exclude else None for r in self.replicas]
            replica = self.replicas[self.router.pick(placed.keys, loads)]
            future = replica.handle.submit("add_request", placed.request_id, *placed.args)
            try:
                future.result(timeout=self.parallel_config.worker_timeout_s)
            except ValueError as exc:  # the request's fault: the caller gets the engine's own error
                raise remote_error(exc) from None
            except Exception as exc:  # the replica died under us: mark it and try the next one
                self._fail_replica(replica, exc)
                continue
            self.router.record(replica.index, placed.keys)
            replica.requests[placed.request_id] = placed
            self._owner[placed.request_id] = replica
            return

    def abort_request(self, request_ids) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            replica = self._owner.pop(request_id, None)
            if replica is not None:
                replica.requests.pop(request_id, None)
                if replica.state == "ready":
                    replica.handle.submit("abort_request", [request_id])

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner) or bool(self._pending_failures)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Outputs of the first replica step(s) to finish (waiting at most until some replica finishes)."""
        self._poll_probes()
        for replica in self.replicas:
            if replica.state == "ready" and replica.requests and replica.step_future is None:
                replica.step_future = replica.handle.submit("step")
                replica.step_started = time.monotonic()
        outputs, self._pending_failures = self._pending_failures, []
        in_flight = {r.step_future: r for r in self.replicas if r.step_future is not None}
        if not in_flight:
            if not outputs:
                time.sleep(_IDLE_WAIT_S)
            return outputs
        timeout = self.parallel_config.worker_timeout_s
        oldest = min(r.step_started for r in in_flight.values())
        done, _ = concurrent.futures.wait(in_flight, timeout=max(0.0, oldest + timeout - time.monotonic()),
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            outputs.extend(self._collect(in_flight[future], future))
        for replica in in_flight.values():  # a replica that ran past the timeout counts as dead
            if replica.step_future is not None and time.monotonic() - replica.step_started > timeout:
                replica.handle.kill()
                self._fail_replica(replica, TimeoutError(f"no answer in {timeout:.0f} s"))
        outputs.extend(self._pending_failures)
        self._pending_failures = []
        return outputs

    def _collect(self, replica: _Replica, future: concurrent.futures.Future) -> list[RequestOutput]:
        replica.step_future = None
        try:
            result = future.result()
        except Exception as exc:
            self._fail_replica(replica, exc)
            return []
        replica.stats = result.stats
        outputs = []
        for output in result.outputs:
            placed = replica.requests.get(output.request_id)
            if placed is None:
                continue  # aborted meanwhile
            placed.num_outputs += 1
            output.extra["engine"] = replica.label  # which replica serves it (metrics label its tokens)
            if output.finished:
                del replica.requests[output.request_id]
                self._owner.pop(output.request_id, None)
            outputs.append(output)
        return outputs

    # ---- faults ------------------------------------------------------------------------------
    def _fail_replica(self, replica: _Replica, exc: BaseException) -> None:
        """The replica died: re-place its requests that produced nothing yet, fail the others, and wait
        for it to come back."""
        if replica.state in ("restarting", "dead"):
            return
        logger.error("replica %d failed (%s: %s); %d requests affected", replica.index, type(exc).__name__,
                     exc, len(replica.requests))
        replica.state, replica.step_future, replica.stats = "restarting", None, None
        self.router.forget(replica.index)
        orphans, replica.requests = list(replica.requests.values()), {}
        for placed in orphans:
            self._owner.pop(placed.request_id, None)
        abandon(replica.handle, [placed.request_id for placed in orphans])
        if replica.num_restarts < self.parallel_config.max_worker_restarts and replica.handle.restart():
            replica.num_restarts += 1
            self._probe(replica)
        else:
            replica.state = "dead"
        failures = []
        for placed in orphans:
            if placed.num_outputs == 0 and placed.num_retries == 0:
                placed.num_retries += 1
                try:
                    self._place(placed, exclude=replica)
                    self.num_requests_retried += 1
                    continue
                except (RuntimeError, ValueError):
                    pass
            failures.append(failed_output(placed.request_id, placed.prompt_token_ids,
                                          f"the engine replica serving this request failed ({type(exc).__name__}); "
                                          "retry the request"))
        self._pending_failures.extend(failures)

    def poll_workers(self) -> None:
        """While idle too: a replica that comes back after the last request finished must rejoin."""
        self._poll_probes()

    def _probe(self, replica: _Replica) -> None:
        """Ask a restarting replica `describe` (answered: it is back)."""
        replica.probe = replica.handle.submit("describe")
        replica.probe_started, replica.probe_after = time.monotonic(), None

    def _poll_probes(self) -> None:
        """A restarted replica rejoins once it answers `describe`."""
        now = time.monotonic()
        for replica in self.replicas:
            if replica.probe is None:
                if replica.state == "restarting" and replica.probe_after is not None and now >= replica.probe_after:
                    self._probe(replica)
                continue
            if not replica.probe.done():
                if replica.state == "restarting" and now - replica.probe_started > _PROBE_TIMEOUT_S:
                    logger.warning("replica %d: no answer to describe in %.0f s; asking again", replica.index,
                                   _PROBE_TIMEOUT_S)
                    self._probe(replica)
                continue
            probe, replica.probe = replica.probe, None
            try:
                info = probe.result()
            except Exception as exc:  # still restarting (Ray), or it died again
                if replica.state == "restarting" and replica.num_restarts <= self.parallel_config.max_worker_restarts:
                    logger.warning("replica %d not back yet: %s", replica.index, exc)
                    replica.probe_after = now + _PROBE_RETRY_S
                continue
            replica.state, replica.handle.pid = "ready", info.pid
            logger.info("replica %d is back (pid %d)", replica.index, info.pid)

    # ---- stats and lifecycle -----------------------------------------------------------------
    def replica_states(self) -> dict[str, str]:
        return {r.label: r.state for r in self.replicas}

    def get_stats(self) -> ClusterStats:
        """Summed over the live replicas; each replica's own under its label (None while it is down)."""
        return ClusterStats.combine({r.label: (r.stats or _NO_STATS) if r.state == "ready" else None
                                     for r in self.replicas})

    def kill_replica(self, index: int) -> None:
        """Kill one replica's process as a crash would (fault tests and drills)."""
        self.replicas[index].handle.kill()

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.handle.shutdown()
