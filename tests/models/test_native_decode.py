"""The native decode loop (csrc/core/decode_layers.cpp, ember.models.native_decode): decode steps through it
give exactly the tokens and logprobs of the layer modules, and every step it cannot reproduce runs the modules."""
import pytest
import torch

from ember import LLM, SamplingParams
from ember.kernels.linear.dense import onednn_bf16_available
from ember.kernels.ops import core_ops, native_has
from ember.models.layers.linear import DenseLinear
from ember.models.native_decode import NativeDecode

needs_loop = pytest.mark.skipif(core_ops() is None or not hasattr(core_ops(), "DecodeLayers")
                                or not native_has("core", "avx512_bf16"),
                                reason="needs the core extension's decode loop and its bf16 kernels")
needs_vnni = pytest.mark.skipif(not (native_has("quant", "avx512_vnni") and native_has("quant", "avx512_bf16")),
                                reason="needs the native W4A8 kernel")

PROMPTS = [[5, 17, 33, 2 + i, 90, 41][: 3 + i % 4] + [7] * (i % 5) for i in range(6)]


@pytest.fixture
def native_steps(monkeypatch):
    """How many steps each token count ran through the native loop (the wrapped forward returned a tensor)."""
    counts: dict[int, int] = {}
    real = NativeDecode.forward

    def forward(self, x, *args):
        out = real(self, x, *args)
        if out is not None:
            counts[x.shape[0]] = counts.get(x.shape[0], 0) + 1
        return out

    monkeypatch.setattr(NativeDecode, "forward", forward)
    return counts


def _quantized_dir(tiny_llama_dir, tmp_path_factory, name: str, **config_args) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ember.quant.api import quantize_model
    from ember.quant.checkpoint import save_quantized
    from ember.quant.config import QuantConfig

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    config = QuantConfig(**{"method": "rtn", **config_args})
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 512, (2, 48), generator=gen) for _ in range(4)] if config.needs_calibration else None
    quantize_model(hf, config, calib_batches=batches)
    path = tmp_path_factory.mktemp(name)
    save_quantized(hf, path, config)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def w4a8_dir(tiny_llama_dir, tmp_path_factory):
    return _quantized_dir(tiny_llama_dir, tmp_path_factory, "tiny-llama-w4a8", bits=4, group_size=32,
                          symmetric=False, act_bits=8)


@pytest.fixture(scope="module")
def w8a8_dir(tiny_llama_dir, tmp_path_factory):
    return _quantized_dir(tiny_llama_dir, tmp_path_factory, "tiny-llama-w8a8", bits=8, act_bits=8)


@pytest.fixture(scope="module")
def int4_dir(tiny_llama_dir, tmp_path_factory):
    return _quantized_dir(tiny_llama_dir, tmp_path_factory, "tiny-llama-int4", bits=4, group_size=32)


@pytest.fixture(scope="module")
def int4_channels_dir(tiny_llama_dir, tmp_path_factory):  # GPTQ keeping a quarter of the input channels in float
    return _quantized_dir(tiny_llama_dir, tmp_path_factory, "tiny-llama-int4-channels", method="gptq", bits=4,
                          group_size=32, bf16_channels=0.25)


@pytest.fixture(scope="module")
def w4a8_channels_dir(tiny_llama_dir, tmp_path_factory):
    return _quantized_dir(tiny_llama_dir, tmp_path_factory, "tiny-llama-w4a8-channels", method="gptq", bits=4,
                          group_size=32, act_bits=8, bf16_channels=0.25)


@pytest.fixture(scope="module")
def int8_dir(tiny_llama_dir, tmp_path_factory):
    return _quantized_dir(tiny_llama_dir, tmp_path_factory, "tiny-llama-int8", bits=8)


def _generate(model_dir, monkeypatch, native: bool, prompts=PROMPTS, **llm_args):
    """Greedy tokens and top-3 logprobs; request i stops after 4 + 2 i tokens, so decode steps run 6 rows
    down to 1."""
    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "0" if native else "1")
    llm = LLM(model=model_dir, dtype="bfloat16", num_kv_blocks=64, max_model_len=256, **llm_args)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True, logprobs=3)
              for i in range(len(prompts))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outputs]


@needs_loop
@pytest.mark.parametrize("checkpoint,kv_cache_dtype", [("bf16", "auto"), ("bf16", "int8"),
                                                       pytest.param("w4a8", "auto", marks=needs_vnni),
                                                       pytest.param("w8a8", "auto", marks=needs_vnni),
                                                       ("int4", "auto"), ("int8", "auto"), ("int4_channels", "auto"),
                                                       pytest.param("w4a8_channels", "auto", marks=needs_vnni)])
def test_native_loop_gives_the_modules_tokens_and_logprobs(checkpoint, kv_cache_dtype, tiny_llama_dir, request,
                                                           monkeypatch, native_steps):
    model_dir = tiny_llama_dir if checkpoint == "bf16" else request.getfixturevalue(f"{checkpoint}_dir")
    expected = _generate(model_dir, monkeypatch, native=False, kv_cache_dtype=kv_cache_dtype)
    assert not native_steps  # switched off: every step ran the modules
    got = _generate(model_dir, monkeypatch, native=True, kv_cache_dtype=kv_cache_dtype)
    assert got == expected  # bit for bit: the same kernels on the same operands, in the same order
    # request i decodes 3 + 2 i steps: 3 steps of 6 rows, then 2 at each size down to the last request
    # alone; bf16 GEMV takes at most 4 rows, then AMX or oneDNN (all native entries), W4A8 every count;
    # weight-only: torch's packed int4 or the int8 GEMV up to 4 rows, then the dpbf16 kernels (woq_amx,
    # where AMX runs, has no native entry); W8A8: its GEMV up to 4 rows (w8a8_amx, first where AMX runs,
    # and fbgemm have none)
    if checkpoint in ("int4", "int8", "int4_channels"):
        largest = 4 if native_has("quant", "amx") else 6
    elif checkpoint == "w8a8":
        largest = 0 if native_has("quant", "amx") else 4
    else:
        largest = 6 if checkpoint.startswith("w4a8") or native_has("core", "amx") or onednn_bf16_available() else 4
    assert native_steps == {size: 3 if size == 6 else 2 for size in range(1, largest + 1)}


@needs_loop
def test_single_stream_runs_every_decode_step_natively(tiny_llama_dir, monkeypatch, native_steps):
    got = _generate(tiny_llama_dir, monkeypatch, native=True, prompts=PROMPTS[:1])
    assert native_steps == {1: 3}  # 4 tokens: the first from the prefill, 3 decode steps
    assert got == _generate(tiny_llama_dir, monkeypatch, native=False, prompts=PROMPTS[:1])


@needs_loop
def test_a_forward_hook_sends_decode_steps_back_to_the_modules(tiny_llama_dir, monkeypatch, native_steps):
    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "0")
    llm = LLM(model=tiny_llama_dir, dtype="bfloat16", num_kv_blocks=64, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert native_steps == {1: 5}
    model = llm.engine.runner.model
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        again = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        handle.remove()
    assert again == first
    assert native_steps == {1: 5}  # no native step while hooked
    assert len(seen) == 6  # the prefill and five decode steps reached the hooked module
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    assert native_steps == {1: 10}  # unhooked: native again


@needs_loop
def test_a_swapped_linear_rebuilds_the_loop(tiny_llama_dir, monkeypatch, native_steps):
    """Replacing a layer's module after a loop was built must reach the next decode step."""
    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "0")
    llm = LLM(model=tiny_llama_dir, dtype="bfloat16", num_kv_blocks=64, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    before = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)[0].outputs[0]
    mlp = llm.engine.runner.model.model.layers[0].mlp
    old = mlp.down_proj
    mlp.down_proj = DenseLinear(torch.nn.Linear(old.in_features, old.out_features, bias=False), old.policy)
    mlp.down_proj.weight = old.weight * 4
    got = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)[0].outputs[0]
    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "1")
    want = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs
    assert got.logprobs != before.logprobs  # the swap changed the step: the loop was rebuilt, not reused
    assert native_steps == {1: 10}  # before and after the swap


@needs_loop
def test_a_step_too_large_for_the_plan_cache_still_sees_reloaded_weights(tiny_llama_dir, monkeypatch, native_steps):
    """Plans of calls over PLAN_CACHE_MAX_TOKENS rows are not kept, so the loop built for such a step must
    notice new weights loaded in place (which drop the linear's prepared operands) some other way."""
    from ember.kernels.linear.module import PLAN_CACHE_MAX_TOKENS

    rows = PLAN_CACHE_MAX_TOKENS + 4
    prompts = [[5 + i % 40, 17, 33] for i in range(rows)]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=1)

    def run(llm):
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs)
                for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]

    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "0")
    llm = LLM(model=tiny_llama_dir, dtype="bfloat16", num_kv_blocks=2 * rows, max_model_len=64, max_num_seqs=rows,
              max_num_batched_tokens=4 * rows)
    before = run(llm)
    assert native_steps == {rows: 2}
    down = llm.engine.runner.model.model.layers[0].mlp.down_proj
    down.load_state_dict({"weight": down.weight.detach() * 4})  # copied into the same tensor
    got = run(llm)
    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "1")
    want = run(llm)
    assert native_steps == {rows: 4}
    assert got == want and got != before


def _mixed_precision_batch(ckpt, monkeypatch, native: bool):
    """Six requests on a tiny int4 checkpoint with bf16 copies of every linear: request 1 admitted in bf16,
    requests 4 and 5 admitted in bf16 after only layer 0's MLP kept its copies enabled, request 3 switched
    to bf16 at its second token; the rest quantized. Greedy tokens and top-3 logprobs of each."""
    monkeypatch.setenv("EMBER_DISABLE_NATIVE_DECODE", "0" if native else "1")
    engine = ckpt.make_engine(dtype="bfloat16", num_kv_blocks=64)
    for i, prompt in enumerate(PROMPTS):
        if i == 4:
            engine.set_precision(ops=["model.layers.0.mlp.*"])
        params = SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True, logprobs=3,
                                precision="bf16" if i in (1, 4, 5) else None)
        engine.add_request(str(i), prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0]
        request = engine.scheduler.requests.get("3")
        if request is not None and request.num_output_tokens == 2 and request.dense_from_position is None:
            engine.set_request_precision("3", "bf16")
    return [(finished[str(i)].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in finished[str(i)].logprobs])
            for i in range(len(PROMPTS))]


@needs_loop
def test_a_precision_mask_splits_rows_inside_the_loop(dual_precision_checkpoint, monkeypatch, native_steps):
    """Steps whose rows take different precisions run natively, each dual linear's halves on their rows, and
    give exactly the modules' tokens and logprobs (three row groups: all ops dense, layer 0's MLP dense,
    quantized; fewer dense rows than quantized ones, more, and request 5 alone with layer 0's MLP dense)."""
    expected = _mixed_precision_batch(dual_precision_checkpoint, monkeypatch, native=False)
    assert not native_steps
    got = _mixed_precision_batch(dual_precision_checkpoint, monkeypatch, native=True)
    assert got == expected
    assert native_steps == {size: 3 if size == 6 else 2 for size in range(1, 7)}  # every decode step
    all_quantized = _generate(dual_precision_checkpoint.path, monkeypatch, native=True)
    assert [tokens for tokens, _ in got] != [tokens for tokens, _ in all_quantized]  # the dense rows mattered
