"""The asyncio engine wrapper on a fake engine: streaming, abort, admission limits, failed steps."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.async_engine import AsyncEngine, RequestStream
from ember.server.errors import APIError
from ember.server.serving import merge_streams
from fake_engine import FakeEngine


def _run(coro_fn, **engine_kwargs):
    async def main():
        fake = FakeEngine(poison="POISON")
        engine = AsyncEngine(lambda: fake, **engine_kwargs)
        engine.start()
        assert await asyncio.to_thread(engine.wait_ready, 10)
        try:
            return await asyncio.wait_for(coro_fn(engine, fake), timeout=30)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def test_stream_yields_cumulative_outputs_until_finished():
    async def body(engine, fake):
        stream = await engine.add_request("r1", [5, 6], SamplingParams(max_tokens=4))
        texts = [o.outputs[0].text async for o in stream]
        assert texts[-1] == "abcd" and all("abcd".startswith(t) for t in texts)
        assert engine.num_queued_requests == 0 and not fake.requests
    _run(body)


def test_abort_removes_request_from_engine():
    async def body(engine, fake):
        stream = await engine.add_request("r1", [5], SamplingParams(max_tokens=200))
        stream.abort()
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        assert not fake.requests
    _run(body)


def test_engine_value_error_reaches_the_caller_only():
    async def body(engine, fake):
        with pytest.raises(ValueError):
            await engine.add_request("bad", [], SamplingParams(max_tokens=2))
        assert engine.num_queued_requests == 0
        stream = await engine.add_request("good", [5], SamplingParams(max_tokens=2))
        assert [o async for o in stream][-1].finished
    _run(body)


def test_failed_step_fails_in_flight_requests_and_engine_recovers():
    async def body(engine, fake):
        poisoned = await engine.add_request("p", fake.tokenizer.encode("POISON"), SamplingParams(max_tokens=3))
        with pytest.raises(APIError) as info:
            async for _ in poisoned:
                pass
        assert info.value.status_code == 500 and "boom" not in info.value.message
        assert engine.is_ready and not fake.requests
        stream = await engine.add_request("after", [5], SamplingParams(max_tokens=2))
        assert [o async for o in stream][-1].outputs[0].text == "ab"
    _run(body)


def test_queue_limits_answer_429_with_retry_after():
    async def body(engine, fake):
        fake.step_gate.clear()  # no step runs, so admitted requests stay queued
        first = await engine.add_request("a", [5] * 10, SamplingParams(max_tokens=50))
        with pytest.raises(APIError) as info:
            await engine.add_request("b", [5], SamplingParams(max_tokens=2))
        assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "3"
        fake.step_gate.set()
        assert [o async for o in first][-1].finished
        assert engine.num_queued_requests == 0 and engine.num_queued_tokens == 0
        second = await engine.add_request("b", [5], SamplingParams(max_tokens=2))
        assert [o async for o in second][-1].finished
    _run(body, max_queued_requests=1, retry_after_s=3)


def test_requests_being_prepared_hold_a_place_in_the_queue_until_added():
    """A request holds a place from arrival (template, tokenization, grammar compile), so a burst beyond
    the limit is refused before that work; adding it gives the place up, so a running request whose
    handler waits for the end (no streaming) does not keep one."""
    async def body(engine, fake):
        release = asyncio.Event()

        async def prepare_then_add(request_id):
            with engine.preparing():
                await release.wait()  # still being prepared
                stream = await engine.add_request(request_id, [5], SamplingParams(max_tokens=2))
                return [o async for o in stream][-1]  # still inside: a handler that waits for the end

        fake.step_gate.clear()
        tasks = [asyncio.create_task(prepare_then_add(rid)) for rid in ("a", "b")]
        await asyncio.sleep(0.05)
        assert engine.num_preparing == 2 and engine.num_queued_requests == 0
        with pytest.raises(APIError) as info:
            with engine.preparing():
                raise AssertionError("a third request must not be prepared")
        assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "1"
        release.set()
        await asyncio.sleep(0.05)  # both added, both waiting for their outputs
        assert engine.num_preparing == 0 and engine.num_queued_requests == 2
        fake.step_gate.set()
        assert all(o.finished for o in await asyncio.gather(*tasks))
        with engine.preparing():  # everything finished: a place is free again
            assert engine.num_preparing == 1
        assert engine.num_preparing == 0
    _run(body, max_queued_requests=2)


def test_token_limit_counts_prompt_tokens():
    async def body(engine, fake):
        fake.step_gate.clear()
        first = await engine.add_request("a", [5] * 8, SamplingParams(max_tokens=2))
        with pytest.raises(APIError) as info:
            await engine.add_request("b", [5] * 3, SamplingParams(max_tokens=2))
        assert info.value.status_code == 429 and engine.num_queued_tokens == 8
        fake.step_gate.set()
        assert [o async for o in first][-1].finished
    _run(body, max_queued_tokens=10)


def test_not_ready_is_503():
    async def main():
        engine = AsyncEngine(lambda: FakeEngine())
        with pytest.raises(APIError) as info:
            await engine.add_request("x", [5], SamplingParams())
        assert info.value.status_code == 503
    asyncio.run(main())


def test_an_idle_loop_polls_a_distributed_engine_s_workers():
    """With no request running the loop does not step, so a distributed engine's restarted worker could only
    rejoin with the next request; the idle loop calls `poll_workers` (here: counted) so it rejoins on its own."""
    polls = []

    async def body(engine, fake):
        fake.poll_workers = lambda: polls.append(1)
        await asyncio.sleep(2.5)  # the idle loop wakes at least once a second
        return len(polls)

    assert _run(body) >= 2


def test_a_reader_that_stops_reading_holds_the_newest_output_not_a_backlog():
    def output(request_id: str, num_tokens: int, finished: bool = False) -> RequestOutput:
        tokens = list(range(num_tokens))  # cumulative: each output carries every token so far
        return RequestOutput(request_id, None, [1], [CompletionOutput(0, "x" * num_tokens, tokens)], finished)

    async def body():
        streams = [RequestStream(f"r{i}", 1, lambda request_id: None) for i in range(2)]
        merged = merge_streams(streams)
        streams[0].put(output("r0", 1))
        assert (await anext(merged))[0] == 0  # the client reads one event, then stops reading
        sent = []
        for num_tokens in range(2, 52):
            for stream in streams:
                item = output(stream.request_id, num_tokens)
                sent.append(weakref.ref(item))
                stream.put(item)
                del item
            await asyncio.sleep(0)  # the event loop runs on while the client is away
        gc.collect()
        kept = [ref() for ref in sent if ref() is not None]
        # stream 1's read that completed while the client was away, and each stream's newest output
        assert len(kept) <= 3, [(o.request_id, len(o.outputs[0].token_ids)) for o in kept]
        del kept
        for stream in streams:
            stream.put(output(stream.request_id, 60, finished=True))
        rest = [(i, len(o.outputs[0].token_ids), o.finished) async for i, o in merged]
        # the client reads on: the outputs still held, then each stream's final one, nothing lost at the end
        assert sorted(r for r in rest if r[2]) == [(0, 60, True), (1, 60, True)]
        assert all(n in (51, 60) or (i == 1 and n == 2) for i, n, _ in rest), rest

    asyncio.run(body())
