"""Tensor parallel: a two-rank shard of random tiny checkpoints against `transformers`' logits (ranks as
threads over a real gloo group), the bundled model over two Ray workers against one engine, and the
configurations it refuses."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from ember.attention.layer_cache import KVCacheSpec, create_layer_caches
from ember.attention.metadata import AttentionMetadata, PrefillChunk
from ember.config import EngineConfig
from ember.distributed.config import ParallelConfig
from ember.distributed.parallel.engine import ModelParallelEngine, check_model_parallel_config
from ember.distributed.parallel.process_group import create_gloo_group, free_address
from ember.distributed.parallel.tensor_parallel import (TensorParallelShard, build_tensor_parallel_model,
                                                        check_tensor_parallel, split_sizes)
from ember.loader.model_loader import load_state
from ember.models.config import ModelConfig
from ember.sampling_params import SamplingParams

# ---- helpers (test_pipeline_parallel imports them) ---------------------------------------------------------


def run_threads(fn, world_size: int = 2, timeout_s: float = 60.0) -> list:
    """`fn(rank, init_method)` on `world_size` threads that meet at one loopback address; the results in rank
    order (a rank's exception is raised here)."""
    host, port = free_address()
    results, errors = [None] * world_size, []

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, f"tcp://{host}:{port}")
        except BaseException as exc:  # noqa: BLE001 - raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def run_ranks(fn, world_size: int = 2, timeout_s: float = 60.0) -> list:
    """`fn(group)` on `world_size` threads, each a rank of one gloo group over loopback TCP."""
    return run_threads(lambda rank, init: fn(create_gloo_group(init, rank, world_size, timeout_s)),
                       world_size, timeout_s)


def prefill(model, config: ModelConfig, x: torch.Tensor, dtype: torch.dtype = torch.float32,
            block_size: int = 16) -> torch.Tensor:
    """One fresh sequence `x` (token ids, or hidden states for a later pipeline stage) through `model`
    over a paged KV cache in `dtype` shaped by `config` (the rank's own); what the model returns."""
    num_tokens = len(x)
    num_blocks = -(-num_tokens // block_size)
    spec = KVCacheSpec("auto", dtype, config.num_hidden_layers, config.num_key_value_heads,
                       config.head_dim, block_size)
    meta = AttentionMetadata(slot_mapping=torch.arange(num_tokens), num_decode_tokens=0,
                             decode_block_tables=None, decode_seq_lens=None,
                             prefills=[PrefillChunk(0, num_tokens, 0, torch.arange(num_blocks), None)])
    with torch.inference_mode():
        return model(x, torch.arange(num_tokens), create_layer_caches(spec, num_blocks), meta)


def bundled_prompts(num_prompts: int = 16) -> list[tuple[list[int], int]]:
    """(prompt token ids, new tokens): lengths 2..62 and 16..24 new tokens."""
    gen = torch.Generator().manual_seed(7)
    return [(torch.randint(100, 40000, (2 + (i * 23) % 61,), generator=gen).tolist(), 16 + i % 9)
            for i in range(num_prompts)]


def generate(engine, prompts: list[tuple[list[int], int]], **options) -> dict[str, list[int]]:
    """Every prompt run to its end on `engine` (an LLMEngine or a model-parallel one), all in one batch;
    the token ids by request id. Greedy with EOS ignored unless `options` say otherwise."""
    options = {"temperature": 0.0, "ignore_eos": True, **options}
    for i, (prompt, max_tokens) in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, **options))
    tokens = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                assert "error" not in output.extra, output.extra
                tokens[output.request_id] = output.outputs[0].token_ids
    return tokens


# ---- the shard's math -------------------------------------------------------------------------------------

def test_uneven_splits_keep_whole_kv_groups():
    assert split_sizes(3, 2) == [2, 1] and split_sizes(49152, 2) == [24576, 24576] and split_sizes(5, 3) == [2, 2, 1]
    smollm = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64)  # SmolLM2-135M's shapes
    shards = [TensorParallelShard(smollm, rank, 2) for rank in range(2)]
    assert [s.q_heads for s in shards] == [(0, 6), (6, 9)] and [s.kv_heads for s in shards] == [(0, 2), (2, 3)]
    local = [s.engine_config() for s in shards]  # the KV cache holds each rank's heads only
    assert [(c.num_attention_heads, c.num_key_value_heads, c.vocab_size) for c in local] == [(6, 2, 49152),
                                                                                            (3, 1, 49152)]


def _tiny_hf_model(kind: str):
    """A random tiny checkpoint with splits that do not divide evenly: 3 KV heads, odd vocabulary and MLP."""
    import transformers as tf

    shapes = dict(vocab_size=501, hidden_size=48, intermediate_size=99, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if kind == "llama-tied":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**shapes, tie_word_embeddings=True))
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**shapes, head_dim=16, attention_bias=True, tie_word_embeddings=False))
    with torch.no_grad():  # HF starts biases at 0 and norms at 1: randomise them so a lost one shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
    return model


# bfloat16 fuses q/k/v and gate/up after sharding; its tolerance is ~5x the unsharded model's own error here.
@pytest.mark.parametrize("kind, dtype, tolerance", [("llama-tied", torch.float32, 1e-4),
                                                    ("qwen3-biases", torch.float32, 1e-4),
                                                    ("llama-tied", torch.bfloat16, 2e-2)])
def test_two_rank_shard_matches_transformers_logits(kind, dtype, tolerance, tmp_path):
    reference = _tiny_hf_model(kind).eval()
    reference.save_pretrained(tmp_path)
    config, state = load_state(str(tmp_path))
    token_ids = torch.randint(3, config.vocab_size, (53,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(token_ids[None]).logits[0]

    def rank_logits(group):
        model, local_config = build_tensor_parallel_model(config, state, dtype, None, group)
        hidden = prefill(model, local_config, token_ids, dtype)
        with torch.inference_mode():
            return model.compute_logits(hidden)

    logits = run_ranks(rank_logits)
    assert logits[0].shape == expected.shape
    assert (logits[0] - expected).abs().max().item() < tolerance
    assert torch.equal(logits[0], logits[1])  # every rank samples from the same logits


# ---- refused configurations -------------------------------------------------------------------------------

TP2 = ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="mp")


@pytest.mark.parametrize("option, message", [
    (dict(enable_lora=True), "LoRA adapters"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "speculative decoding"),
    (dict(kv_eviction="streaming", kv_budget_tokens=64), "KV eviction"),
    (dict(kv_cache_dtype="int8-static"), "int8-static"),
])
def test_unsupported_engine_options_are_refused_before_workers_start(option, message):
    with pytest.raises(ValueError, match=f"{message}.*not supported with tensor parallel"):
        ModelParallelEngine(EngineConfig(model=None, **option), TP2)


def test_models_that_cannot_be_split_are_refused(tmp_path):
    smollm = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64)
    with pytest.raises(ValueError, match="exceeds the model's 3 KV heads"):
        check_tensor_parallel(smollm, 4)
    moe = ModelConfig("mixtral", 512, 64, 96, 2, 4, 2, 16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=96, moe_layers=(0, 1))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        check_tensor_parallel(moe, 2)
    with pytest.raises(ValueError, match="not 'gemma3'"):
        check_tensor_parallel(ModelConfig("gemma3", 512, 64, 96, 2, 4, 2, 16), 2)
    (tmp_path / "quantization_config.json").write_text(json.dumps({"method": "rtn"}))
    with pytest.raises(ValueError, match="quantized checkpoint"):
        check_model_parallel_config(EngineConfig(model=str(tmp_path)), TP2)
    with pytest.raises(ValueError, match="tensor_parallel_size or pipeline_parallel_size > 1"):
        check_model_parallel_config(EngineConfig(), ParallelConfig())


# ---- whole engines over two Ray workers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def uneven_checkpoint(tmp_path_factory, save_tiny_checkpoint) -> str:
    """The tiny Llama of `_tiny_hf_model("llama-tied")` (3 KV heads, vocabulary 501) with a tokenizer."""
    return save_tiny_checkpoint(_tiny_hf_model("llama-tied"), tmp_path_factory.mktemp("tiny-uneven"))


def tiny_prompts(num_prompts: int = 6, vocab_size: int = 501) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(3, vocab_size, (1 + 11 * i,), generator=gen).tolist(), 8 + i) for i in range(num_prompts)]


def plain_engine(model: str | None, **config):
    from ember.engine.llm_engine import LLMEngine

    return LLMEngine.from_config(EngineConfig(model=model, dtype="float32", num_threads=1, **config))


@pytest.fixture(scope="module")
def tiny_tp_engine(ray_cluster, uneven_checkpoint):
    engine = ModelParallelEngine(EngineConfig(model=uneven_checkpoint, dtype="float32", max_model_len=128),
                                 ParallelConfig(tensor_parallel_size=2, worker_timeout_s=60))
    yield engine
    engine.shutdown()


def test_tensor_parallel_engine_matches_one_engine(tiny_tp_engine, uneven_checkpoint):
    reference = generate(plain_engine(uneven_checkpoint, max_model_len=128), tiny_prompts())
    assert tiny_tp_engine.mode == "tensor parallel"
    assert tiny_tp_engine.model_config.num_key_value_heads == 3  # the full model's, not a rank's
    assert generate(tiny_tp_engine, tiny_prompts()) == reference
    assert generate(tiny_tp_engine, tiny_prompts(), logprobs=2, prompt_logprobs=1) == reference  # LM head rerun
    assert tiny_tp_engine.get_stats().generation_tokens_total == 2 * sum(len(t) for t in reference.values())
    # Random sampling: every rank draws the same tokens from the all-gathered logits (the front end checks
    # every step that the ranks agree, and would fail the requests otherwise).
    sampled = generate(tiny_tp_engine, tiny_prompts(), temperature=1.0, top_p=0.9)
    assert len(sampled) == len(reference) and not tiny_tp_engine.is_dead


def test_rejected_requests_leave_the_ranks_consistent(tiny_tp_engine):
    from ember.sampling_params import StructuredOutputsParams

    before = generate(tiny_tp_engine, tiny_prompts()[:2])
    with pytest.raises(ValueError, match="maximum context length"):  # every rank refuses: none holds it
        tiny_tp_engine.add_request("too-long", [5] * 100, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="structured outputs.*background thread"):
        tiny_tp_engine.add_request("json", [5, 6], SamplingParams(structured_outputs=StructuredOutputsParams(json={})))
    with pytest.raises(ValueError, match="LoRA adapters"):
        tiny_tp_engine.add_request("lora", [5, 6], SamplingParams(), lora_request=object())
    assert not tiny_tp_engine.has_unfinished_requests()
    assert generate(tiny_tp_engine, tiny_prompts()[:2]) == before


def test_a_killed_ray_rank_fails_requests_and_the_group_reforms(tiny_tp_engine, uneven_checkpoint):
    """A rank's process dies: its requests end with a 503 error, and every rank restarts into a new group
    (a single rank cannot rejoin gloo), which serves as before."""
    for i, (prompt, _) in enumerate(tiny_prompts(3)):
        tiny_tp_engine.add_request(f"k{i}", prompt, SamplingParams(max_tokens=60, ignore_eos=True))
    tiny_tp_engine.step()
    tiny_tp_engine._workers[0].kill()  # the actor's process dies, as a crash
    outputs = tiny_tp_engine.step()
    assert sorted(o.request_id for o in outputs) == ["k0", "k1", "k2"]
    assert all(o.finished and "tensor parallel rank 0" in o.extra["error"] and o.extra["status"] == 503
               for o in outputs)
    assert not tiny_tp_engine.is_dead and tiny_tp_engine.num_restarts == 1
    assert set(tiny_tp_engine.replica_states().values()) == {"ready"}
    reference = generate(plain_engine(uneven_checkpoint, max_model_len=128), tiny_prompts())
    assert generate(tiny_tp_engine, tiny_prompts()) == reference


# ---- the bundled model (the must-show) ------------------------------------------------------------

@pytest.mark.slow
def test_bundled_model_tensor_parallel_greedy_matches_one_engine(ray_cluster):
    """16 prompts of 2..62 tokens, 16..24 new tokens each, float32: TP=2 (SmolLM2's 3 KV heads split 2 + 1,
    9 query heads 6 + 3) gives one engine's greedy tokens."""
    config = dict(max_model_len=512, num_kv_blocks=128)
    reference = generate(plain_engine(None, **config), bundled_prompts())
    engine = ModelParallelEngine(EngineConfig(model=None, dtype="float32", **config),
                                 ParallelConfig(tensor_parallel_size=2, worker_timeout_s=120))
    try:
        assert generate(engine, bundled_prompts()) == reference
    finally:
        engine.shutdown()
