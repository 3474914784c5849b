"""Prefill/decode disaggregation on Ray (1 prefill + 1 decode worker, the bundled model in float32)
against one plain engine: identical greedy tokens, blocks served from the KV pool instead of recomputed,
bytes moved counted, bad requests refused while the engine keeps serving."""

import random

import pytest

from ember.config import EngineConfig
from ember.distributed.config import ParallelConfig
from ember.distributed.kv_transfer import check_pd_config
from ember.distributed.pd_engine import create_pd_engine
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams

ray = pytest.importorskip("ray")

CONFIG = EngineConfig(model=None, dtype="float32", num_kv_blocks=256)
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2-135M: layers, K and V, block_size, KV heads, head_dim, float32


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pd_engine(ray_cluster):
    engine = create_pd_engine(CONFIG, ParallelConfig(pd_disaggregation=True, num_prefill_workers=1,
                                                     num_decode_workers=1))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    """One plain engine in this process."""
    return LLMEngine.from_config(CONFIG.replace(num_threads=1))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run(engine, requests: dict) -> dict:
    """Add every (prompt, params) under its id, step until done; the final outputs by id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    return final


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randint(100, 49000) for _ in range(length)]


def token_ids(outputs: dict) -> dict:
    return {request_id: output.outputs[0].token_ids for request_id, output in outputs.items()}


def worker_stats(engine, name: str):
    return engine.get_stats().engines[name]


def test_greedy_tokens_match_one_engine(pd_engine, reference):
    rng = random.Random(0)
    requests = {f"r{i}": (random_prompt(rng, rng.randint(17, 128)), greedy(rng.randint(16, 24))) for i in range(16)}
    expected = run(reference, requests)
    before = pd_engine.get_stats().kv_transfer_bytes
    got = run(pd_engine, requests)
    assert token_ids(got) == token_ids(expected)
    moved = 0
    for request_id, (prompt, _) in requests.items():
        transfer = got[request_id].extra["kv_transfer"]
        # The prefill worker exports every full block; the decode worker fetches those a prefix hit may use.
        assert transfer["blocks_exported"] == len(prompt) // 16
        assert transfer["blocks_imported"] == (len(prompt) - 1) // 16
        assert got[request_id].num_cached_tokens == (len(prompt) - 1) // 16 * 16
        assert transfer["bytes"] == (transfer["blocks_exported"] + transfer["blocks_imported"]) * BLOCK_BYTES
        assert transfer["seconds"] > 0
        moved += transfer["bytes"]
    stats = pd_engine.get_stats()
    assert stats.kv_transfer_bytes - before == moved
    assert stats.kv_transfer_seconds > 0
    assert stats.generation_tokens_total >= sum(len(o.outputs[0].token_ids) for o in got.values())


def test_pool_serves_a_shared_prefix_instead_of_recomputing(pd_engine, reference):
    rng = random.Random(1)
    prefix = random_prompt(rng, 64)  # 4 blocks
    run(pd_engine, {"a": (prefix + random_prompt(rng, 20), greedy(1))})
    decode = pd_engine.workers[1]
    assert decode.handle.submit("reset_prefix_cache").result(timeout=30)
    # B's usable blocks are all in the pool: no prefill, the decode worker fetches them and computes 10 tokens.
    prompt_b = prefix + random_prompt(rng, 10)
    prefill_before = worker_stats(pd_engine, "prefill0").prompt_tokens_total
    hits_before = worker_stats(pd_engine, "decode0").prefix_cache_hits
    pool_before = pd_engine.pool_stats()
    out_b = run(pd_engine, {"b": (prompt_b, greedy(6))})["b"]
    assert out_b.extra["kv_transfer"]["blocks_imported"] == 4 and out_b.extra["kv_transfer"]["blocks_exported"] == 0
    assert out_b.num_cached_tokens == 64
    assert worker_stats(pd_engine, "prefill0").prompt_tokens_total == prefill_before
    assert worker_stats(pd_engine, "decode0").prefix_cache_hits - hits_before == 64
    assert pd_engine.pool_stats().num_hit_blocks - pool_before.num_hit_blocks == 4
    # C has two new full blocks: the prefill worker, its own cache emptied, fetches P's 4 blocks from the
    # pool and computes the rest; the decode worker holds P since B and fetches the 2 new blocks.
    assert pd_engine.workers[0].handle.submit("reset_prefix_cache").result(timeout=30)
    prompt_c = prefix + random_prompt(rng, 40)
    prefill_hits = worker_stats(pd_engine, "prefill0").prefix_cache_hits
    out_c = run(pd_engine, {"c": (prompt_c, greedy(6))})["c"]
    assert worker_stats(pd_engine, "prefill0").prefix_cache_hits - prefill_hits == 64
    assert out_c.extra["kv_transfer"]["blocks_exported"] == 2  # blocks 4 and 5 (104 tokens hold 6)
    assert out_c.extra["kv_transfer"]["blocks_imported"] == 4 + 2  # prefill's 4, decode's 2
    assert out_c.num_cached_tokens == 96
    expected = run(reference, {"b": (prompt_b, greedy(6)), "c": (prompt_c, greedy(6))})
    assert out_b.outputs[0].token_ids == expected["b"].outputs[0].token_ids
    assert out_c.outputs[0].token_ids == expected["c"].outputs[0].token_ids


def test_bad_requests_fail_cleanly_and_serving_goes_on(pd_engine, reference):
    rng = random.Random(2)
    max_len = pd_engine.config.max_model_len
    with pytest.raises(ValueError, match="maximum model length"):
        pd_engine.add_request("long", random_prompt(rng, max_len), greedy(4))
    with pytest.raises(ValueError, match="maximum context length"):  # checked before its prefill starts
        pd_engine.add_request("too-many", random_prompt(rng, 100), greedy(max_len))
    with pytest.raises(ValueError, match="token ids"):
        pd_engine.add_request("vocab", [10**9] * 40, greedy(4))
    with pytest.raises(ValueError, match="LoRA"):
        pd_engine.add_request("lora", [5] * 40, greedy(4), lora_request=object())
    assert not pd_engine.has_unfinished_requests()
    prompt = random_prompt(rng, 50)
    pd_engine.add_request("dup", prompt, greedy(4))
    with pytest.raises(ValueError, match="already in use"):
        pd_engine.add_request("dup", prompt, greedy(4))
    pd_engine.abort_request("dup")
    good = run(pd_engine, {"good": (prompt, greedy(4))})["good"]
    assert good.outputs[0].token_ids == run(reference, {"good": (prompt, greedy(4))})["good"].outputs[0].token_ids


def test_abort_in_either_stage_leaves_nothing(pd_engine):
    rng = random.Random(3)
    pd_engine.add_request("p", random_prompt(rng, 300), greedy(64))  # in prefill
    pd_engine.add_request("d", random_prompt(rng, 8), greedy(64))  # straight to decode
    for _ in range(3):
        pd_engine.step()
    pd_engine.abort_request(["p", "d", "unknown"])
    assert not pd_engine.has_unfinished_requests()
    for worker in pd_engine.workers:  # the workers dropped them too
        assert worker.handle.submit("call", lambda engine: engine.has_unfinished_requests()).result(30) is False


def test_options_the_transfer_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        check_pd_config(EngineConfig(kv_cache_dtype="int8"))
    with pytest.raises(ValueError, match="prefix caching"):
        check_pd_config(EngineConfig(enable_prefix_caching=False))
    with pytest.raises(ValueError, match="pd_disaggregation"):
        create_pd_engine(EngineConfig(), ParallelConfig())


def test_block_tables_per_window_group_are_refused():
    """A sliding-window model's local layers keep tables of their own; the transfer moves one per request."""
    from types import SimpleNamespace

    import torch

    from ember.attention.layer_cache import KVCacheSpec
    from ember.distributed.kv_transfer import KVTransfer
    from ember.models.config import ModelConfig

    config = ModelConfig(architecture="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         layer_types=("sliding_attention", "full_attention"), sliding_window=8)
    engine = SimpleNamespace(config=EngineConfig(),
                             kv_spec=KVCacheSpec.for_model(config, torch.float32, grouped=True))
    with pytest.raises(ValueError, match="disable-hybrid-kv-cache-manager"):
        KVTransfer(engine, pool=None)


def test_a_restart_is_seen_while_idle_and_its_clock_stops_between_steps(monkeypatch):
    """A decode worker that restarts while no request runs: the server's idle loop (`poll_workers`) pings
    it until it answers; an offline engine that nobody stepped for longer than `worker_timeout_s` does not
    take the restart for a hung one on its next step; a restart watched past the timeout still fails.
    No Ray here: scripted handles and clock."""
    import concurrent.futures
    from types import SimpleNamespace

    from ember.distributed import pd_engine as pd

    class Handle:
        pid = None

        def __init__(self):
            self.calls, self.futures = [], []

        def submit(self, method):
            self.calls.append(method)
            self.futures.append(concurrent.futures.Future())
            return self.futures[-1]

        def answer(self):
            self.futures[-1].set_result(SimpleNamespace(pid=4321))

        def kill(self):
            self.calls.append("kill")

        def restart(self):
            return True

    clock = [100.0]
    monkeypatch.setattr(pd.time, "monotonic", lambda: clock[0])
    engine = pd.PDEngine.__new__(pd.PDEngine)  # only the restart bookkeeping is exercised
    engine.parallel_config = ParallelConfig(pd_disaggregation=True, worker_timeout_s=30.0)
    engine._requests, engine._pending, engine._failed_outputs = {}, {}, []
    engine._watched_at = clock[0]

    def restarting():
        worker = pd._Worker("decode0", "decode", Handle(), state="restarting", retry_at=clock[0],
                            deadline=clock[0] + engine.parallel_config.worker_timeout_s)
        engine.workers = [worker]
        return worker

    worker = restarting()  # the server's idle loop polls once a second
    engine.poll_workers()
    assert worker.handle.calls == ["describe"]
    clock[0] += 1.0
    engine.poll_workers()  # no answer yet: still waiting
    worker.handle.answer()
    clock[0] += 1.0
    engine.poll_workers()
    assert worker.state == "ready" and worker.handle.pid == 4321 and worker.handle.calls == ["describe"]

    worker = restarting()  # an offline engine: nobody steps for three timeouts, then a request comes
    clock[0] += 90.0
    assert engine.step() == []  # the ping goes out and is not yet answered
    assert worker.handle.calls == ["describe"] and worker.state == "restarting"
    worker.handle.answer()
    engine.step()
    assert worker.state == "ready" and "kill" not in worker.handle.calls

    worker = restarting()  # watched all along, never answers: it fails after worker_timeout_s
    engine._watched_at = clock[0]
    for _ in range(31):
        clock[0] += 1.0
        engine.poll_workers()
    assert worker.handle.calls == ["describe", "kill"] and worker.num_failures == 1
    assert worker.state == "restarting" and worker.deadline == clock[0] + 30.0  # restarted again


def test_a_worker_whose_step_raises_keeps_none_of_the_requests_taken_from_it(pd_engine, reference, fail_next_step):
    """A raising step leaves the actor alive: the request failed for it must also leave its engine."""
    rng = random.Random(6)
    decode = pd_engine.workers[1]
    pd_engine.add_request("held", random_prompt(rng, 8), greedy(200))  # straight to the decode worker
    while not any(o.outputs[0].token_ids for o in pd_engine.step()):
        pass

    decode.handle.submit("call", fail_next_step).result(30)
    final = {}
    while pd_engine.has_unfinished_requests():
        final.update({o.request_id: o for o in pd_engine.step() if o.finished})
    assert final["held"].extra["status"] == 503 and "injected step failure" in final["held"].extra["error"]
    assert decode.handle.submit("call", lambda engine: engine.has_unfinished_requests()).result(30) is False
    prompt = random_prompt(rng, 40)
    after = run(pd_engine, {"after": (prompt, greedy(6))})
    assert token_ids(after)["after"] == run(reference, {"a": (prompt, greedy(6))})["a"].outputs[0].token_ids


@pytest.mark.slow
def test_a_dead_decode_worker_fails_its_streams_and_the_rest_is_served(pd_engine, reference):
    """Runs last: Ray restarts the killed worker (a fresh model load)."""
    rng = random.Random(4)
    pd_engine.add_request("streaming", random_prompt(rng, 8), greedy(400))  # straight to the decode worker
    while not any(o.outputs[0].token_ids for o in pd_engine.step()):
        pass
    fresh = random_prompt(rng, 70)
    pd_engine.add_request("fresh", fresh, greedy(8))  # nothing produced yet when the worker dies: retried
    pd_engine.workers[1].handle.kill()
    final = {}
    while pd_engine.has_unfinished_requests():
        final.update({o.request_id: o for o in pd_engine.step() if o.finished})
    assert final["streaming"].extra["status"] == 503 and "decode0" in final["streaming"].extra["error"]
    assert final["fresh"].outputs[0].token_ids == run(reference, {"f": (fresh, greedy(8))})["f"].outputs[0].token_ids
    assert pd_engine.get_stats().engines["decode0"] is not None


@pytest.mark.slow
def test_the_mp_executor_moves_kv_through_a_manager_pool(reference):
    engine = create_pd_engine(CONFIG, ParallelConfig(pd_disaggregation=True, distributed_executor_backend="mp"))
    try:
        rng = random.Random(5)
        requests = {f"m{i}": (random_prompt(rng, 30 + 25 * i), greedy(8)) for i in range(3)}
        got = run(engine, requests)
        expected = run(reference, requests)
        assert token_ids(got) == token_ids(expected)
        assert all(o.extra["kv_transfer"]["blocks_imported"] > 0 for o in got.values())
    finally:
        engine.shutdown()
