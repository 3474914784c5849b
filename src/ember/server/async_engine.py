"""Drives the synchronous engine from one background thread and streams its outputs to asyncio.

All engine calls (add, abort, step, admin calls) happen on that thread; the event loop talks to it
through a command list, and outputs come back with `call_soon_threadsafe` into one slot per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

from ember.outputs import RequestOutput
from ember.server.errors import APIError

logger = logging.getLogger("ember.server")

# The place the current task holds through `AsyncEngine.preparing` ([True] while held): its first
# `add_request` gives it up, from then on the request counts as queued.
_PREPARING: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("ember_preparing", default=None)

# Consecutive failed steps after which the engine is declared dead (/health turns 503).
_MAX_CONSECUTIVE_STEP_FAILURES = 3


class RequestStream:
    """The outputs of one request, in order; iterating ends after the finished output.

    Outputs are cumulative, so a slow reader only needs the latest one: one slot holds the newest
    output not yet read (an error, once put, stays). A client that stops reading a stream therefore
    holds one output, not every output since (each carrying all tokens so far).
    """

    def __init__(self, request_id: str, num_prompt_tokens: int, on_abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_output_tokens = 0  # over all samples, as of the latest output
        self.is_queued = True  # admitted, no token yet
        self.finished = False
        self._pending: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self._on_abort = on_abort

    def put(self, item: RequestOutput | BaseException) -> None:
        if not isinstance(self._pending, BaseException):
            self._pending = item
            self._ready.set()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            await self._ready.wait()
            item, self._pending = self._pending, None
            self._ready.clear()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
                yield item
                return
            yield item

    def abort(self) -> None:
        """Stop generating (client gone); the engine frees the request's KV blocks."""
        if not self.finished:
            self.finished = True
            self._on_abort(self.request_id)


class AsyncEngine:
    """Owns the engine thread; admits requests under the queue limits.

    Args:
        engine_factory: builds the engine; called on the engine thread, so a slow load does not
            block the server (it answers 503 until ready).
        max_queued_requests / max_queued_tokens: admission limits (see `ServerConfig`).
        on_finished: called on the event loop with (stream, final output) for metrics.
        on_tokens: called on the event loop with (stream, output, new tokens, seconds since the previous
            tokens) for each output that brings tokens after the first (inter-token latency).
    """

    def __init__(self, engine_factory: Callable[[], Any], max_queued_requests: int = 256,
                 max_queued_tokens: int = 65536, retry_after_s: int = 1,
                 on_finished: Callable[[RequestStream, RequestOutput | None], None] | None = None,
                 on_tokens: Callable[[RequestStream, RequestOutput, int, float], None] | None = None) -> None:
        self.engine_factory = engine_factory
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.retry_after_s = retry_after_s
        self.on_finished = on_finished
        self.on_tokens = on_tokens
        self.engine: Any = None
        self.state = "created"  # -> loading -> ready | dead -> stopped
        self.stats: Any = None  # the engine's latest EngineStats
        self.num_queued_requests = 0
        self.num_queued_tokens = 0
        self.num_preparing = 0  # requests being tokenized or having their grammar compiled (`preparing`)
        self._streams: dict[str, RequestStream] = {}
        self._commands: list[tuple] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_event = threading.Event()
        self.is_draining = False  # set by `drain`: no new requests

    # ---- lifecycle (event loop) ----
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.state = "loading"
        self._thread = threading.Thread(target=self._thread_main, name="ember-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready_event.wait(timeout)
        return self.is_ready

    async def shutdown(self) -> None:
        with self._cond:
            self.state = "stopped" if self.state != "dead" else self.state
            self._commands.append(("stop",))
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        for stream in list(self._streams.values()):
            stream.put(APIError("server is shutting down", 503))
        self._streams.clear()

    @property
    def is_ready(self) -> bool:
        """The engine is loaded and serving (also while draining: requests in flight still need it)."""
        return self.state == "ready"

    @property
    def is_accepting(self) -> bool:
        """New requests are admitted: ready and not draining (what /health reports)."""
        return self.is_ready and not self.is_draining

    def worker_states(self) -> dict[str, str] | None:
        """Each worker's state by label for a distributed engine ("ready", "restarting", "dead"), else None."""
        states = getattr(self.engine, "replica_states", None)
        return states() if states is not None and self.is_ready else None

    async def drain(self, timeout_s: float) -> int:
        """Graceful stop (SIGTERM): admit nothing new (503), let the requests in flight finish for up to
        `timeout_s`, then end the rest with a 503 error (streams get an error event, then [DONE]).
        Returns how many were ended that way."""
        self.is_draining = True
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = list(self._streams)
        if leftover:
            logger.warning("shutting down: %d requests did not finish within %.0f s", len(leftover), timeout_s)
            self._fail(leftover, APIError("the server is shutting down; the request did not finish in time", 503))
            self._submit(("abort", leftover))
        return len(leftover)

    # ---- requests (event loop) ----
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any,
                          lora_request: Any = None) -> RequestStream:
        """Admit and submit one request (on `lora_request`'s adapter, if given); raises APIError (429/503)
        or the engine's ValueError."""
        self._give_up(_PREPARING.get())
        self._admit(len(prompt_token_ids))
        stream = RequestStream(request_id, len(prompt_token_ids), self.abort)
        self._streams[request_id] = stream
        self._count_queued(stream, +1)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("add", request_id, prompt_token_ids, params, lora_request, future))
        try:
            await asyncio.wrap_future(future)
        except BaseException:
            self._forget(stream)
            self._submit(("abort", [request_id]))
            raise
        return stream

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps (admin changes); its result or exception."""
        if self.state != "ready":
            raise APIError("the engine is not ready", 503, headers=self._retry_header())
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("call", fn, future))
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._forget(stream)
            stream.finished = True
            if self.on_finished is not None:
                self.on_finished(stream, None)
        self._submit(("abort", [request_id]))

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Hold a place while a request is prepared (template, tokenization, grammar compile) before
        `add_request`: refused at once with 429 when the queued requests and those being prepared already
        fill `max_queued_requests`, so a flood beyond the limit is turned away before that work, not after."""
        self._check_open()
        if self.num_queued_requests + self.num_preparing + 1 > self.max_queued_requests:
            raise self._queue_full()
        self.num_preparing += 1
        place = [True]
        token = _PREPARING.set(place)
        try:
            yield
        finally:
            _PREPARING.reset(token)
            self._give_up(place)

    def _give_up(self, place: list[bool] | None) -> None:
        if place is not None and place[0]:
            place[0] = False
            self.num_preparing -= 1

    def _check_open(self) -> None:
        if self.is_draining:
            raise APIError("the server is shutting down", 503)
        if self.state != "ready":
            raise APIError("the engine is not ready", 503, headers=self._retry_header())

    def _queue_full(self) -> APIError:
        return APIError(f"too many queued requests (limit {self.max_queued_requests}); retry later",
                        429, headers=self._retry_header())

    def _admit(self, num_prompt_tokens: int) -> None:
        self._check_open()
        if self.num_queued_requests + 1 > self.max_queued_requests:
            raise self._queue_full()
        # A lone request larger than the token limit is still admitted, or it could never run.
        if self.num_queued_requests and self.num_queued_tokens + num_prompt_tokens > self.max_queued_tokens:
            raise APIError(f"too many queued prompt tokens (limit {self.max_queued_tokens}); retry later",
                           429, headers=self._retry_header())

    def _retry_header(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    def _count_queued(self, stream: RequestStream, sign: int) -> None:
        self.num_queued_requests += sign
        self.num_queued_tokens += sign * stream.num_prompt_tokens

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.request_id, None) is not None and stream.is_queued:
            stream.is_queued = False
            self._count_queued(stream, -1)

    def _submit(self, command: tuple) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _dispatch(self, outputs: list[RequestOutput], stats: Any) -> None:
        """Event loop side of a step: route each output to its request's queue."""
        if stats is not None:
            self.stats = stats
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            num_tokens = sum(len(c.token_ids) for c in output.outputs)
            if num_tokens > stream.num_output_tokens:
                if stream.first_token_time is None:
                    stream.first_token_time = now
                elif self.on_tokens is not None:
                    self.on_tokens(stream, output, num_tokens - stream.num_output_tokens, now - stream.last_token_time)
                stream.num_output_tokens = num_tokens
                stream.last_token_time = now
                if stream.is_queued:
                    stream.is_queued = False
                    self._count_queued(stream, -1)
            error = output.extra.get("error") if output.finished else None
            if error is not None:  # the engine failed this request alone (or the replica serving it died: 503)
                stream.put(APIError("Internal server error", 500) if output.extra.get("internal")
                           else APIError(error, output.extra.get("status", 400)))
            else:
                stream.put(output)
            if output.finished:
                self._forget(stream)
                if self.on_finished is not None:
                    self.on_finished(stream, output)

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                self._forget(stream)
                stream.put(exc)

    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed during shutdown
            pass

    # ---- engine thread ----
    def _thread_main(self) -> None:
        try:
            self.engine = self.engine_factory()
            self._post(self._dispatch, [], self.engine.get_stats())
            self.state = "ready"
        except Exception:
            logger.exception("engine failed to load")
            self.state = "dead"
            return
        finally:
            self._ready_event.set()
        logger.info("engine ready")
        try:
            self._run_loop()
        except Exception:  # a bug outside step(): stop admitting, fail whoever is waiting
            logger.exception("engine loop crashed")
            self.state = "dead"
            self._post(self._fail_all)
        finally:
            if hasattr(self.engine, "shutdown"):  # a distributed engine stops its workers
                self.engine.shutdown()

    def _fail_all(self) -> None:
        self._fail(list(self._streams), APIError("Internal server error", 500))

    def _run_loop(self) -> None:
        active: set[str] = set()
        failures = 0
        while True:
            with self._cond:
                if not self._commands and not self.engine.has_unfinished_requests():
                    self._cond.wait(timeout=1.0)
                commands, self._commands = self._commands, []
            for command in commands:
                if command[0] == "stop":
                    return
                self._apply(command, active)
            if not self.engine.has_unfinished_requests():
                poll = getattr(self.engine, "poll_workers", None)  # distributed engines: restarted workers rejoin
                if poll is not None:
                    poll()
                self._post(self._dispatch, [], self.engine.get_stats())
                continue
            try:
                outputs = self.engine.step()
                failures = 0
            except Exception as exc:
                failures = self._on_step_error(exc, active, failures + 1)
                if self.state == "dead":
                    return
                continue
            active.difference_update(o.request_id for o in outputs if o.finished)
            self._post(self._dispatch, outputs, self.engine.get_stats())

    def _apply(self, command: tuple, active: set[str]) -> None:
        if command[0] == "add":
            _, request_id, prompt_token_ids, params, lora_request, future = command
            if not future.set_running_or_notify_cancel():
                return  # the client left before the engine saw the request
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, lora_request=lora_request)
            except BaseException as exc:
                future.set_exception(exc)
                return
            active.add(request_id)
            future.set_result(None)
        elif command[0] == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:
                    future.set_exception(exc)
        elif command[0] == "abort":
            ids = [i for i in command[1] if i in active]
            active.difference_update(ids)
            if ids:
                try:
                    self.engine.abort_request(ids)
                except Exception:
                    logger.exception("abort of %s failed", ids)

    def _on_step_error(self, exc: Exception, active: set[str], failures: int) -> int:
        """A failed step fails the requests it may have touched (all in flight); the server lives on."""
        logger.exception("engine step failed; failing %d in-flight requests", len(active))
        ids = sorted(active)
        active.clear()
        try:
            self.engine.abort_request(ids)
        except Exception:
            logger.exception("abort after a failed step failed")
        self._post(self._fail, ids, APIError("Internal server error", 500))
        if failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
            logger.error("engine failed %d steps in a row; marking it dead", failures)
            self.state = "dead"
        return failures
