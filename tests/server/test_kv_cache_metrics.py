"""/metrics carries the KV cache's blocks in use and internal fragmentation from the engine's stats."""

from ember import LLM, SamplingParams
from ember.server.metrics import ServerMetrics


def _gauges(stats) -> dict[str, float]:
    text = ServerMetrics(lambda: stats, lambda: (0, 0), lambda: "m").render().decode()
    names = ("ember:kv_cache_blocks_used", "ember:kv_cache_fragmentation_perc")
    return {name: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            for name in names if line.startswith(name + '{model_name="m"}')}


def test_gauges_follow_the_engine_through_a_request(tiny_llama_dir):
    engine = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=16, max_model_len=64,
                 enable_prefix_caching=False).engine
    assert engine.kv_cache_manager.block_size == 16
    engine.add_request("r", list(range(3, 23)), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # prefill: 20 tokens in 2 blocks of 16
    assert _gauges(engine.get_stats()) == {"ember:kv_cache_blocks_used": 2.0,
                                           "ember:kv_cache_fragmentation_perc": 12 / 32}
    engine.step()  # one decode token
    assert _gauges(engine.get_stats())["ember:kv_cache_fragmentation_perc"] == 11 / 32
    while engine.has_unfinished_requests():
        engine.step()
    assert _gauges(engine.get_stats()) == {"ember:kv_cache_blocks_used": 0.0,
                                           "ember:kv_cache_fragmentation_perc": 0.0}


def test_gauges_read_zero_before_the_engine_reports():
    assert _gauges(None) == {"ember:kv_cache_blocks_used": 0.0, "ember:kv_cache_fragmentation_perc": 0.0}
