"""Multi-LoRA against `peft`: each request of a batch mixing the base model and three adapters gets the
tokens of that adapter merged into the base weights (`merge_and_unload`) on its own."""

import pytest
import torch

pytest.importorskip("peft")

from ember import LLM, LoRARequest, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tiny_lora_adapters):
    return tiny_lora_adapters


def _greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (7, 33, 50)]


def _lora_requests(adapters) -> list[LoRARequest | None]:
    return [None] + [LoRARequest(name, i + 1, path) for i, (name, (path, _)) in enumerate(adapters.items())]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-qkv-gate-up"])
def test_mixed_batch_matches_each_merged_adapter(adapters, tiny_llama_dir, tiny_llama_hf, monkeypatch, fused):
    """Every prompt runs on the base and on each adapter in one batch (chunked prefill, identical prompts:
    the prefix cache must not share KV across adapters); fused q/k/v and gate/up get block-diagonal B."""
    import ember.loader.model_loader as model_loader

    monkeypatch.setattr(model_loader, "should_fuse_projections", lambda dtype: fused)
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=128,
              max_num_batched_tokens=40, enable_lora=True, max_loras=3, max_lora_rank=8)
    assert (llm.engine.runner.model.model.layers[0].self_attn.qkv_proj is not None) == fused
    prompts, loras = _prompts(), _lora_requests(adapters)
    batch = [(p, lora) for lora in loras for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], params, use_tqdm=False,
                           lora_request=[lora for _, lora in batch])
    references = {None: tiny_llama_hf, **{name: merged for name, (_, merged) in adapters.items()}}
    got = {}
    for (prompt, lora), output in zip(batch, outputs):
        name = lora.lora_name if lora else None
        got[name, len(prompt)] = output.outputs[0].token_ids
        assert output.outputs[0].token_ids == _greedy(references[name], prompt, 16), (name, len(prompt))
    assert all(got["all", len(p)] != got[None, len(p)] for p in prompts)  # the adapters do change tokens


def test_slots_are_reused_and_bad_adapters_fail_alone(adapters, tiny_llama_dir, tiny_llama_hf, tmp_path):
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64,
              enable_lora=True, max_loras=1, max_lora_rank=4)
    prompt, params = _prompts()[1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    path_qv, merged_qv = adapters["qv"]
    path_mlp, merged_mlp = adapters["mlp"]
    with pytest.raises(ValueError, match="rank 8, above max_lora_rank 4"):
        llm.generate({"prompt_token_ids": prompt}, params, lora_request=LoRARequest("all", 1, adapters["all"][0]))
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        llm.generate({"prompt_token_ids": prompt}, params, lora_request=LoRARequest("nope", 9, str(tmp_path)))
    # one slot: each adapter in turn evicts the last (idle) one and still gives its merged model's tokens
    for name, path, merged in [("qv", path_qv, merged_qv), ("mlp", path_mlp, merged_mlp), ("qv", path_qv, merged_qv)]:
        out = llm.generate({"prompt_token_ids": prompt}, params, lora_request=LoRARequest(name, 2, path))
        assert out[0].outputs[0].token_ids == _greedy(merged, prompt, 8), name
    # while a request holds the only slot, another adapter is refused and the running request is unharmed
    llm.engine.add_request("held", prompt, params, lora_request=LoRARequest("qv", 2, path_qv))
    with pytest.raises(ValueError, match="slots hold adapters that running requests use"):
        llm.engine.add_request("other", prompt, params, lora_request=LoRARequest("mlp", 3, path_mlp))
    outputs = llm._run(["held"], use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == _greedy(merged_qv, prompt, 8)
    assert llm.engine.kv_cache_manager.num_free_blocks == llm.engine.kv_cache_manager.num_blocks


def test_lora_request_needs_enable_lora(tiny_llama_dir, adapters):
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=128, num_kv_blocks=16)
    with pytest.raises(ValueError, match="enable_lora"):
        llm.generate("hello", SamplingParams(max_tokens=2), lora_request=LoRARequest("qv", 1, adapters["qv"][0]))


def test_chat_takes_a_lora_request(adapters, tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64, enable_lora=True,
              max_lora_rank=8)
    lora, params = LoRARequest("all", 1, adapters["all"][0]), SamplingParams(temperature=0, max_tokens=8,
                                                                             ignore_eos=True)
    messages = [{"role": "user", "content": "Beautiful is better than ugly."}]
    chat = llm.chat(messages, params, use_tqdm=False, lora_request=lora)[0]
    again = llm.generate({"prompt_token_ids": chat.prompt_token_ids}, params, use_tqdm=False, lora_request=lora)[0]
    base = llm.generate({"prompt_token_ids": chat.prompt_token_ids}, params, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == again.outputs[0].token_ids != base.outputs[0].token_ids
