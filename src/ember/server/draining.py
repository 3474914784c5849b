"""Graceful stop: on SIGTERM (or the first SIGINT) the server stops admitting, lets the requests in flight
finish up to `--shutdown-timeout-s`, ends the rest with a clear 503 error, and only then exits."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

import uvicorn

from ember.server.async_engine import AsyncEngine


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before its own shutdown. A second signal exits at once (uvicorn's
    force exit)."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, timeout_s: float) -> None:
        super().__init__(config)
        self.async_engine = async_engine
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = self._drain_task is None and not self.should_exit
        if not first or self._loop is None or sig not in (signal.SIGTERM, signal.SIGINT):
            if self._drain_task is not None:
                self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it once it has shut down
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.async_engine.drain(self.timeout_s)
        finally:
            self.should_exit = True
