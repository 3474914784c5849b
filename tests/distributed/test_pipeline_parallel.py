"""Pipeline parallel: two stages of random tiny checkpoints against `transformers`' logits, whole engines
(micro-batches, chunked prefill, logprobs) against one engine, a killed rank over the mp backend, the
bundled model over two Ray workers, and the configurations it refuses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ember.config import EngineConfig
from ember.distributed.config import ParallelConfig
from ember.distributed.parallel.engine import ModelParallelEngine, RankFailure
from ember.distributed.parallel.pipeline_parallel import (PipelineModelRunner, build_pipeline_stage,
                                                          check_pipeline_parallel, split_micro_batches)
from ember.distributed.parallel.rank import build_rank_engine
from ember.loader.model_loader import load_state
from ember.models.config import ModelConfig
from ember.sampling_params import SamplingParams
from test_tensor_parallel import (_tiny_hf_model, bundled_prompts, generate, plain_engine, prefill, run_ranks,
                                  run_threads, tiny_prompts)


def test_micro_batches_hold_whole_requests_and_balance_tokens():
    entries = [SimpleNamespace(num_new_tokens=n) for n in (1, 1, 1, 1, 40, 8)]
    groups = split_micro_batches(entries, 2)
    assert [[e.num_new_tokens for e in g] for g in groups] == [[1, 1, 1, 1, 40], [8]]
    assert sum(groups, []) == entries  # row order kept
    for count in range(1, 7):  # never an empty micro-batch, never more than asked or than requests
        for num in (1, 2, 3, 8):
            groups = split_micro_batches(entries[:count], num)
            assert len(groups) == min(num, count) and all(groups) and sum(groups, []) == entries[:count]


def test_models_that_cannot_be_cut_are_refused():
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        check_pipeline_parallel(ModelConfig("llama", 512, 64, 96, 2, 4, 2, 16), 3)
    with pytest.raises(ValueError, match="not 'gemma3'"):
        check_pipeline_parallel(ModelConfig("gemma3", 512, 64, 96, 2, 4, 2, 16), 2)
    with pytest.raises(ValueError, match="LoRA adapters.*not supported with pipeline parallel"):
        ModelParallelEngine(EngineConfig(enable_lora=True), ParallelConfig(pipeline_parallel_size=2))


def _mixtral():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=256)
    return tf.MixtralForCausalLM(config)


@pytest.mark.parametrize("kind, dtype, tolerance", [("llama-tied", torch.float32, 1e-4),
                                                    ("mixtral", torch.float32, 1e-4),
                                                    ("llama-tied", torch.bfloat16, 2e-2)])
def test_two_stages_match_transformers_logits(kind, dtype, tolerance, tmp_path):
    reference = (_tiny_hf_model(kind) if kind == "llama-tied" else _mixtral()).eval()
    reference.save_pretrained(tmp_path)
    config, state = load_state(str(tmp_path))
    token_ids = torch.randint(3, config.vocab_size, (41,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(token_ids[None]).logits[0]

    def run_stage(group):
        stage, local_config = build_pipeline_stage(config, state, dtype, None, group.rank, group.world_size)
        assert local_config.num_hidden_layers < config.num_hidden_layers  # its own layers' KV cache only
        if group.is_first:
            assert stage.model.lm_head is None and stage.model.model.norm is None
            group.isend(prefill(stage, local_config, token_ids, dtype), 1).wait()
            return None
        assert stage.model.model.embed_tokens is None
        hidden = torch.empty(len(token_ids), config.hidden_size, dtype=dtype)
        group.irecv(hidden, 0).wait()
        with torch.inference_mode():
            return stage.compute_logits(prefill(stage, local_config, hidden, dtype))

    logits = run_ranks(run_stage)[1]
    assert (logits - expected).abs().max().item() < tolerance


def test_pipeline_engines_match_one_engine(tiny_llama_dir):
    """Two rank engines as threads, stepped independently (their collectives keep them in lock step): small
    step budgets force chunked prefill and micro-batches that mix decodes and prefill chunks; greedy tokens,
    sampled logprobs and prompt logprobs equal one engine's on every rank."""
    config = EngineConfig(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64,
                          max_num_batched_tokens=48, num_threads=1)
    prompts = [(torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist(), 12)
               for n in (3, 30, 70, 9, 17)]
    options = dict(logprobs=2, prompt_logprobs=1)

    def collect(engine):
        outputs = {}
        for i, (prompt, max_tokens) in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                               ignore_eos=True, **options))
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
        return {k: (o.outputs[0].token_ids, [sorted(d) for d in o.outputs[0].logprobs],
                    [v.logprob for d in o.outputs[0].logprobs for v in d.values()],
                    [sorted(d) if d else None for d in o.prompt_logprobs]) for k, o in outputs.items()}

    def rank_engine(rank_id, init_method):
        engine = build_rank_engine(config, ParallelConfig(pipeline_parallel_size=2), rank_id, init_method).engine
        assert isinstance(engine.runner, PipelineModelRunner) and len(engine.runner.kv_caches) == 1
        return collect(engine)

    ranks = run_threads(rank_engine)
    reference = collect(plain_engine(tiny_llama_dir, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=48))
    assert ranks[0].keys() == reference.keys()
    assert all(len(top_ids) == 12 and len(prompt_top) == len(prompt)
               for (_, top_ids, _, prompt_top), (prompt, _) in zip(reference.values(), prompts))
    for request_id, (token_ids, top_ids, values, prompt_top) in reference.items():
        for result in ranks:
            assert result[request_id][0] == token_ids and result[request_id][1] == top_ids
            assert result[request_id][3] == prompt_top
            assert torch.allclose(torch.tensor(result[request_id][2]), torch.tensor(values), atol=1e-4)


def test_mp_backend_runs_and_a_killed_rank_fails_requests_without_hanging(tiny_llama_dir):
    engine = ModelParallelEngine(
        EngineConfig(model=tiny_llama_dir, dtype="float32", max_model_len=128),
        ParallelConfig(pipeline_parallel_size=2, distributed_executor_backend="mp", worker_timeout_s=30,
                       max_worker_restarts=0))  # the engine stays down (the TP test covers the restart)
    try:
        assert engine.mode == "pipeline parallel" and engine.model_config.num_hidden_layers == 2
        reference = generate(plain_engine(tiny_llama_dir, max_model_len=128), tiny_prompts(4, 512))
        assert generate(engine, tiny_prompts(4, 512)) == reference
        for i, (prompt, _) in enumerate(tiny_prompts(4, 512)):
            engine.add_request(f"k{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        engine._workers[1].kill()  # SIGKILL, as a crash
        outputs = engine.step()
        assert sorted(o.request_id for o in outputs) == ["k0", "k1", "k2", "k3"]
        assert all(o.finished and "pipeline parallel" in o.extra["error"] and o.extra["status"] == 503
                   for o in outputs)
        assert engine.is_dead and not engine.has_unfinished_requests()
        assert set(engine.replica_states().values()) == {"dead"}
        with pytest.raises(RankFailure, match="engine is down"):
            engine.add_request("late", [5, 6], SamplingParams(max_tokens=2))
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_bundled_model_pipeline_parallel_greedy_matches_one_engine(ray_cluster):
    """16 prompts of 2..62 tokens, 16..24 new tokens each, float32: PP=2 (SmolLM2's 30 layers 15 + 15, two
    micro-batches a step) over Ray gives one engine's greedy tokens."""
    config = dict(max_model_len=512, num_kv_blocks=128)
    reference = generate(plain_engine(None, **config), bundled_prompts())
    engine = ModelParallelEngine(EngineConfig(model=None, dtype="float32", **config),
                                 ParallelConfig(pipeline_parallel_size=2, worker_timeout_s=120))
    try:
        assert generate(engine, bundled_prompts()) == reference
    finally:
        engine.shutdown()
