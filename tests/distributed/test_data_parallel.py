"""Data parallel on the bundled model: two replicas give one engine's greedy outputs, prompts that share a
prefix meet on one replica, and a replica killed mid-run fails over (retried or a clear error, never a hang)."""

import random

import pytest

from ember import LLM, SamplingParams
from ember.config import EngineConfig
from ember.distributed.config import ParallelConfig
from ember.distributed.dp_engine import DataParallelEngine

ENGINE = dict(dtype="float32", max_model_len=512, num_kv_blocks=256)


def _prompts(count=16, seed=0):
    """Token-id prompts of 5..90 tokens (several blocks), as W1 draws them."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randint(100, 49052) for _ in range(rng.randint(5, 90))]} for _ in range(count)]


def _greedy(max_tokens=20):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference_outputs():
    llm = LLM(**ENGINE)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), _greedy(), use_tqdm=False)]


def test_two_replicas_match_one_engine(ray_cluster, reference_outputs):
    llm = LLM(data_parallel_size=2, **ENGINE)
    try:
        outputs = llm.generate(_prompts(), _greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == reference_outputs
        engines = llm.get_stats().engines
        assert set(engines) == {"0", "1"}
        assert all(s.generation_tokens_total > 0 for s in engines.values())  # both replicas worked
    finally:
        llm.shutdown()


def _run(engine, requests):
    """Add (id, prompt, params) requests and step until done; id -> final output."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def test_shared_prefixes_meet_on_one_replica_and_hit_its_cache(ray_cluster):
    engine = DataParallelEngine(EngineConfig(**ENGINE), ParallelConfig(data_parallel_size=2))
    try:
        rng = random.Random(1)
        systems = [[rng.randint(100, 49052) for _ in range(64)] for _ in range(2)]  # four blocks each
        # one request per system prompt first, so each replica caches one of them
        warm = _run(engine, [(f"warm{s}", systems[s] + [7], _greedy(2)) for s in range(2)])
        home = {s: warm[f"warm{s}"].extra["engine"] for s in range(2)}
        assert home[0] != home[1]  # idle replicas: the two prompts are spread
        users = [(f"u{s}-{u}", systems[s] + [rng.randint(100, 49052) for _ in range(9)], _greedy(2))
                 for u in range(3) for s in range(2)]
        finished = _run(engine, users)
        assert all(finished[rid].extra["engine"] == home[int(rid[1])] for rid, _, _ in users)
        stats = engine.get_stats()
        assert stats.prefix_cache_hits == 6 * 64  # every user's four system blocks came from the cache
    finally:
        engine.shutdown()


def test_bad_requests_get_the_engine_s_own_error_and_the_replicas_serve_on(ray_cluster, reference_outputs):
    engine = DataParallelEngine(EngineConfig(**ENGINE), ParallelConfig(data_parallel_size=2))
    try:
        with pytest.raises(ValueError, match=r"^prompt token ids must be integers in \[0, 49152\)$"):
            engine.add_request("bad", [1, 2, 10**6], _greedy())
        with pytest.raises(ValueError, match="maximum context length is 512") as too_long:
            engine.add_request("long", [5] * 500, _greedy(100))
        assert "Ray" not in str(too_long.value) and "Traceback" not in str(too_long.value)
        with pytest.raises(ValueError, match="logit_bias") as biased:
            engine.add_request("bias", [5, 6], SamplingParams(logit_bias={10**6: 1.0}))
        assert biased.value.param == "logit_bias"  # the server's 400 names the field
        with pytest.raises(ValueError, match="LoRA adapters is not supported with data parallel"):
            engine.add_request("lora", [5, 6], _greedy(), lora_request=object())
        assert not engine.has_unfinished_requests()
        good = _run(engine, [(str(i), p["prompt_token_ids"], _greedy()) for i, p in enumerate(_prompts()[:4])])
        assert [good[str(i)].outputs[0].token_ids for i in range(4)] == reference_outputs[:4]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("backend", [pytest.param("mp", marks=pytest.mark.slow), "ray"])
def test_a_killed_replica_fails_over_and_rejoins(ray_cluster, backend):
    engine = DataParallelEngine(EngineConfig(**ENGINE), ParallelConfig(
        data_parallel_size=2, distributed_executor_backend=backend, routing_policy="round_robin",
        worker_timeout_s=60))
    try:
        prompts = _prompts(12, seed=2)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt["prompt_token_ids"], _greedy(24))
        victim_ids = set(engine.replicas[0].requests)
        finished, steps = {}, 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
            steps += 1
            if steps == 4:
                engine.kill_replica(0)
        assert set(finished) == {str(i) for i in range(12)}  # none lost, none hung
        errors = {rid for rid, o in finished.items() if "error" in o.extra}
        assert errors and errors <= victim_ids  # only the dead replica's requests may fail...
        for rid in errors:
            assert finished[rid].extra["status"] == 503 and "replica" in finished[rid].extra["error"]
        for rid in set(finished) - errors:  # ...the others ran to the end
            assert len(finished[rid].outputs[0].token_ids) == 24
        # the replica comes back and serves again
        deadline_steps = 0
        while engine.replica_states()["0"] != "ready" and deadline_steps < 2000:
            engine.step()
            deadline_steps += 1
        assert engine.replica_states() == {"0": "ready", "1": "ready"}
        after = _run(engine, [(f"after{i}", p["prompt_token_ids"], _greedy(4)) for i, p in enumerate(prompts[:4])])
        assert all(len(o.outputs[0].token_ids) == 4 and "error" not in o.extra for o in after.values())
    finally:
        engine.shutdown()


def test_a_replica_whose_step_raises_keeps_none_of_the_requests_taken_from_it(ray_cluster, fail_next_step):
    """The actor stays alive when its step raises (Ray restarts only a dead one): the requests the front
    end placed again or failed must also leave that replica's engine, or they hold its KV blocks."""
    engine = DataParallelEngine(EngineConfig(**ENGINE), ParallelConfig(
        data_parallel_size=2, routing_policy="round_robin", worker_timeout_s=60))
    try:
        prompts = _prompts(8, seed=3)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt["prompt_token_ids"], _greedy(16))
        victim = engine.replicas[0]
        victim_ids = set(victim.requests)
        for _ in range(3):
            engine.step()
        victim.handle.submit("call", fail_next_step).result(30)
        finished = {}
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert set(finished) == {str(i) for i in range(8)}
        errors = {rid for rid, o in finished.items() if "error" in o.extra}
        assert errors and errors <= victim_ids
        assert victim.handle.submit("call", lambda e: e.has_unfinished_requests()).result(30) is False
        assert victim.handle.submit("call", lambda e: e.get_stats().kv_cache_blocks_used).result(30) == 0
        after = _run(engine, [(f"after{i}", p["prompt_token_ids"], _greedy(4)) for i, p in enumerate(prompts[:4])])
        assert all(len(o.outputs[0].token_ids) == 4 and "error" not in o.extra for o in after.values())
    finally:
        engine.shutdown()


def test_a_restarting_replica_is_asked_again_after_an_error_or_a_lost_call(monkeypatch):
    """Ray can lose a call submitted while an actor is between processes (its future never completes,
    though the actor is back): a probe with no answer in _PROBE_TIMEOUT_S is asked again, and after an
    error ("the actor is restarting") the next probe waits _PROBE_RETRY_S. No Ray here: a scripted handle."""
    import concurrent.futures
    from types import SimpleNamespace

    from ember.distributed import dp_engine

    answers = ["error", "lost", "back"]
    submitted = []

    class Handle:
        pid = None

        def submit(self, method):
            submitted.append(method)
            future = concurrent.futures.Future()
            answer = answers[len(submitted) - 1]
            if answer == "error":
                future.set_exception(RuntimeError("The actor is restarting"))
            elif answer == "back":
                future.set_result(SimpleNamespace(pid=4321))
            return future

    clock = [100.0]
    monkeypatch.setattr(dp_engine.time, "monotonic", lambda: clock[0])
    engine = DataParallelEngine.__new__(DataParallelEngine)  # only the probe bookkeeping is exercised
    engine.parallel_config = ParallelConfig(data_parallel_size=2, max_worker_restarts=3)
    replica = dp_engine._Replica(0, Handle(), state="restarting", num_restarts=1)
    engine.replicas = [replica]
    engine._probe(replica)
    engine._poll_probes()  # the error: no new call yet
    assert len(submitted) == 1 and replica.state == "restarting"
    clock[0] += dp_engine._PROBE_RETRY_S
    engine._poll_probes()  # asked again: this call is lost
    assert len(submitted) == 2
    clock[0] += dp_engine._PROBE_TIMEOUT_S / 2
    engine._poll_probes()
    assert len(submitted) == 2 and replica.state == "restarting"  # still waiting for it
    clock[0] += dp_engine._PROBE_TIMEOUT_S
    engine._poll_probes()  # no answer in time: asked again
    assert len(submitted) == 3
    engine._poll_probes()
    assert replica.state == "ready" and replica.handle.pid == 4321 and submitted == ["describe"] * 3
