"""The driver side of tensor and pipeline parallel: one engine to `LLM` and the server, world_size ranks
behind it, every request, abort and step sent to all of them in the same order."""

from __future__ import annotations

import concurrent.futures
import logging

from ember.config import EngineConfig
from ember.distributed.config import ParallelConfig
from ember.distributed.executor import RankPlacement, create_worker, remote_error
from ember.distributed.frontend import DistributedEngine, failed_output, worker_engine_config
from ember.distributed.parallel.rank import (ModelParallelWorker, build_rank_engine, check_float_checkpoint,
                                            step_fingerprint)
from ember.engine.llm_engine import EngineStats
from ember.loader.model_loader import resolve_model_path
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger("ember.distributed")


class RankFailure(RuntimeError):
    """A rank died, timed out or drifted from rank 0: the engine cannot go on."""


def check_model_parallel_config(config: EngineConfig, parallel_config: ParallelConfig) -> None:
    """Raise ValueError for what the ranks could not run in lock step (checked before any worker starts)."""
    if parallel_config.world_size < 2 or parallel_config.data_parallel_size > 1 or parallel_config.pd_disaggregation:
        raise ValueError("a model-parallel engine needs tensor_parallel_size or pipeline_parallel_size > 1 "
                         "(and neither data parallel nor P/D disaggregation)")
    mode = "tensor parallel" if parallel_config.tensor_parallel_size > 1 else "pipeline parallel"
    refused = {
        "LoRA adapters (enable_lora)": config.enable_lora,
        "speculative decoding": config.speculative_config is not None,
        "KV eviction (its scores are per rank)": config.kv_eviction != "none",
        "precision fallback (it needs a quantized checkpoint)": config.precision_fallback,
        "kv_cache_dtype int8-static (its scales are not sharded)": config.kv_cache_dtype == "int8-static",
    }
    for what, is_set in refused.items():
        if is_set:
            raise ValueError(f"{what} is not supported with {mode}")
    check_float_checkpoint(resolve_model_path(config.model))


class ModelParallelEngine(DistributedEngine):
    """Tensor parallel (TP) or pipeline parallel (PP) over `parallel_config.world_size` worker ranks.

    Each rank runs a whole `LLMEngine` on its shard (TP) or stage (PP) of the model; the ranks join one
    gloo group hosted by rank 0. Outputs are rank 0's (TP: every rank samples from the all-gathered logits;
    PP: the last rank broadcasts its samples). A rank that dies or stops answering within
    `worker_timeout_s` ends the engine: its requests finish with an error and new ones are refused.

    Raises:
        ValueError: an option the ranks cannot run in lock step, or a model that cannot be split.
    """

    def __init__(self, config: EngineConfig, parallel_config: ParallelConfig) -> None:
        check_model_parallel_config(config, parallel_config)
        super().__init__(config, parallel_config)
        self.mode = "tensor parallel" if parallel_config.tensor_parallel_size > 1 else "pipeline parallel"
        self._timeout = parallel_config.worker_timeout_s
        self._requests: dict[str, str | list[int]] = {}  # unfinished request id -> its prompt
        self._dead: str | None = None  # why the engine stopped
        self._workers = []
        self._placement: RankPlacement | None = None
        self._rank_config = worker_engine_config(config, parallel_config.world_size)
        self.num_restarts = 0
        try:
            self._start(self._rank_config)
        except BaseException:
            self._stop_workers(kill=True)  # ranks that joined would wait for the others until the timeout
            raise

    def _start(self, config: EngineConfig) -> None:
        pc = self.parallel_config
        # TP all-reduces twice a layer: its ranks share a machine; PP stages may spread over machines
        self._placement = RankPlacement(pc.distributed_executor_backend, pc.world_size,
                                        "STRICT_PACK" if pc.tensor_parallel_size > 1 else "PACK", self._timeout)
        self._workers = [create_worker(pc.distributed_executor_backend, f"{self.mode} rank {rank}", build_rank_engine,
                                       (config, pc, rank), num_cpus=1, max_restarts=0,
                                       worker_class=ModelParallelWorker,
                                       scheduling_strategy=self._placement.strategies[rank])
                         for rank in range(pc.world_size)]  # a restarted rank could not rejoin the group
        host, port = self._wait([self._workers[0].submit("free_address")])[0]
        infos = self._wait([w.submit("start", f"tcp://{host}:{port}") for w in self._workers], reraise=True)
        for worker, info in zip(self._workers, infos):
            worker.pid = info.pid
        self._adopt(infos[0])
        self._stats = self._wait([self._workers[0].submit("get_stats")])[0]

    def _wait(self, futures: list[concurrent.futures.Future], reraise: bool = False) -> list:
        """Every future's result, in order. A ValueError (with `reraise`, any error) of a rank is raised as
        it is; anything else, or no answer within the timeout, raises RankFailure."""
        done, pending = concurrent.futures.wait(futures, self._timeout, concurrent.futures.FIRST_EXCEPTION)
        for rank, future in enumerate(futures):
            if future in done and future.exception() is not None:
                error = future.exception()
                error = remote_error(error)
                if reraise or isinstance(error, ValueError):
                    raise error
                raise RankFailure(f"{self.mode} rank {rank} failed: {type(error).__name__}: {error}")
        if pending:
            rank = futures.index(next(iter(pending)))
            raise RankFailure(f"{self.mode} rank {rank} did not answer within {self._timeout:g} s")
        return [f.result() for f in futures]

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None, lora_request=None) -> None:
        """Queue the request on every rank; a ValueError (of every rank alike) leaves none of them holding it.

        Raises:
            ValueError: what `LLMEngine.add_request` raises, LoRA, or structured outputs.
            RankFailure: the engine is dead.
        """
        self._revive()
        self._check_alive()
        self._check_request(lora_request)
        if params.structured_outputs is not None:  # grammars compile on a thread: ranks could schedule apart
            raise self._unsupported("structured outputs (grammars compile on a background thread, so the ranks "
                                    "could admit a request in different steps)")
        futures = [w.submit("add_request", request_id, prompt, params, cache_salt=cache_salt) for w in self._workers]
        try:
            self._wait(futures)
        except ValueError:  # every rank validates alike; undo wherever it was taken all the same
            concurrent.futures.wait(futures, self._timeout)
            accepted = [w for w, f in zip(self._workers, futures) if f.done() and f.exception() is None]
            self._guarded([w.submit("abort_request", [request_id]) for w in accepted])
            raise
        except RankFailure as exc:
            self._die(str(exc))
            raise
        self._requests[request_id] = prompt

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            self._requests.pop(request_id, None)
        if self._dead is None and ids:
            self._guarded([w.submit("abort_request", ids) for w in self._workers])

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step on every rank; rank 0's outputs. A failed rank fails every unfinished request instead."""
        if self._dead is None:
            try:
                results = self._wait([w.submit("step") for w in self._workers])
            except (RankFailure, ValueError) as exc:
                self._die(str(exc))
            else:
                return self._step_outputs(results)
        outputs = self._fail_all()
        self._revive()
        return outputs

    def _step_outputs(self, results: list) -> list[RequestOutput]:
        """Rank 0's outputs, once every other rank's fingerprint agrees with them; the requests' bookkeeping."""
        first = results[0]
        expected = step_fingerprint(first.outputs)
        for rank, fingerprint in enumerate(results[1:], start=1):
            if fingerprint != expected:
                self._die(f"{self.mode} rank {rank} produced other tokens than rank 0")
                return self._fail_all()
        self._stats = first.stats
        for output in first.outputs:
            if output.finished:
                self._requests.pop(output.request_id, None)
            elif output.request_id in self._requests:
                self._requests[output.request_id] = output.prompt_token_ids
        return first.outputs

    def get_stats(self) -> EngineStats:
        """Rank 0's stats after the latest step (every rank holds the same requests)."""
        return self._stats

    def replica_states(self) -> dict[str, str]:
        """Each rank's state for /health: "ready", or "dead" once any rank failed."""
        state = "dead" if self._dead is not None else "ready"
        return {f"rank{rank}": state for rank in range(self.parallel_config.world_size)}

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    # ---- failure and shutdown --------------------------------------------------------------------
    def _revive(self) -> None:
        """After a failure, start every rank again and re-form the group (at most `max_worker_restarts`
        times): a single rank cannot rejoin a gloo group, so the whole group restarts. Blocks while the
        ranks load."""
        if self._dead is None or self._dead == "shut down" or self.num_restarts >= self.parallel_config.max_worker_restarts:
            return
        self.num_restarts += 1
        logger.warning("restarting the %s ranks (restart %d)", self.mode, self.num_restarts)
        try:
            self._start(self._rank_config)
        except Exception as exc:
            self._stop_workers(kill=True)
            self._dead = f"restart failed: {type(exc).__name__}: {exc}"
            logger.error("%s restart failed: %s", self.mode, exc)
            return
        self._dead = None

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise RankFailure(f"the {self.mode} engine is down: {self._dead}")

    def _guarded(self, futures: list[concurrent.futures.Future]) -> None:
        try:
            self._wait(futures)
        except (RankFailure, ValueError) as exc:
            self._die(str(exc))

    def _die(self, reason: str) -> None:
        """Mark the engine dead and stop every rank; the next `step` fails the unfinished requests."""
        if self._dead is None:
            logger.error("%s engine down: %s", self.mode, reason)
            self._dead = reason
            self._stop_workers(kill=True)

    def _fail_all(self) -> list[RequestOutput]:
        """A finished output with the error for every unfinished request (they are forgotten then)."""
        error = f"the {self.mode} engine is down: {self._dead}"
        outputs = [failed_output(request_id, self._prompt_ids(prompt), error)
                   for request_id, prompt in self._requests.items()]
        self._requests.clear()
        return outputs

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)

    def _stop_workers(self, kill: bool) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            try:
                if kill:  # a rank blocked in a collective would not read a polite shutdown
                    worker.kill()
                worker.shutdown()
            except Exception:  # already gone
                logger.debug("stopping %s failed", worker.name, exc_info=True)
        if self._placement is not None:
            self._placement.remove()

    def shutdown(self) -> None:
        """Stop every rank (idempotent); the engine takes no requests after."""
        self._stop_workers(kill=False)
        if self._dead is None:
            self._dead = "shut down"


def create_model_parallel_engine(engine_config: EngineConfig, parallel_config: ParallelConfig) -> ModelParallelEngine:
    """The tensor or pipeline parallel engine `parallel_config` asks for (workers started, model loaded)."""
    return ModelParallelEngine(engine_config, parallel_config)
