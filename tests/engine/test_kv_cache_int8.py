"""The engine over an int8 KV cache: static scales calibrated against Hugging Face's own cache, outputs
unchanged by prefix caching and preemption, logits near the float model's, and the CLI round trip."""

import json
import subprocess
import sys

import pytest
import torch

from ember import LLM, SamplingParams
from ember.attention.layer_cache import create_layer_caches
from ember.eval.perplexity import model_cache_spec, window_logits
from ember.loader.model_loader import load_model
from ember.quant.kv_scales import calibrate_kv_scales, load_kv_scales, save_kv_scales


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return load_model(tiny_llama_dir, torch.float32)[0]


@pytest.fixture(scope="module")
def calibration_ids():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 512, (1, n), generator=gen) for n in (40, 64, 23)]


@pytest.fixture(scope="module")
def scales_dir(tiny_model, calibration_ids, tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-scales")
    save_kv_scales(path, calibrate_kv_scales(tiny_model, calibration_ids), {"test": True})
    return str(path)


def test_static_scales_are_the_absmax_of_transformers_cached_keys_and_values(tiny_llama_dir, tiny_model,
                                                                             calibration_ids):
    """Hugging Face caches keys after the rotary embedding, as Ember does: its cache is the reference."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    num_layers = hf.config.num_hidden_layers
    absmax = [[torch.zeros(2, 16), torch.zeros(2, 16)] for _ in range(num_layers)]  # [KVH, D]
    with torch.no_grad():
        for ids in calibration_ids:
            cache = hf(ids, use_cache=True).past_key_values
            for layer in range(num_layers):
                keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [1, KVH, S, D]
                for i, x in enumerate((keys, values)):
                    absmax[layer][i] = torch.maximum(absmax[layer][i], x[0].abs().amax(1))
    scales = calibrate_kv_scales(tiny_model, calibration_ids)
    for layer in range(num_layers):
        torch.testing.assert_close(scales[layer][0], absmax[layer][0] / 127, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scales[layer][1], absmax[layer][1] / 127, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cache_dtype", ["int8", "int8-static"])
def test_int8_logits_stay_near_transformers_and_differ_from_the_float_cache(tiny_llama_dir, tiny_model, scales_dir,
                                                                             cache_dtype):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(12)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    scales = load_kv_scales(scales_dir) if cache_dtype == "int8-static" else None
    caches = create_layer_caches(model_cache_spec(tiny_model, cache_dtype), 5, scales)
    logits = window_logits(tiny_model, ids, caches, chunk_size=16).log_softmax(-1)
    kl = (reference.exp() * (reference - logits)).sum(-1)  # KL(HF || int8 KV) per position
    # The random model's logits are flat: a float cache gives ~4e-7 at most, a 4-bit cache ~1e-4.
    assert kl.max() < 5e-6, kl.max()
    dense = window_logits(tiny_model, ids, create_layer_caches(model_cache_spec(tiny_model, "auto"), 5), chunk_size=16)
    assert not torch.equal(dense.log_softmax(-1), logits)  # the codes really are in the path


@pytest.mark.parametrize("cache_dtype", ["int8", "int8-static"])
def test_outputs_unchanged_by_prefix_caching_chunking_and_preemption(tiny_llama_dir, scales_dir, cache_dtype):
    gen = torch.Generator().manual_seed(13)
    system = torch.randint(3, 512, (48,), generator=gen).tolist()
    prompts = [{"prompt_token_ids": system + torch.randint(3, 512, (int(n),), generator=gen).tolist()}
               for n in torch.randint(1, 40, (10,), generator=gen)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kv = dict(kv_cache_dtype=cache_dtype, kv_scales=scales_dir if cache_dtype == "int8-static" else None)
    roomy = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=256, max_model_len=256,
                enable_prefix_caching=False, **kv)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # Prefix caching, 16-token prefill chunks and a cache too small for the batch: preemptions.
    tight = LLM(model=tiny_llama_dir, dtype="float32", num_kv_blocks=14, max_model_len=256,
                max_num_batched_tokens=16, **kv)
    outputs = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions_total > 0 and tight.get_stats().prefix_cache_hits > 0
    assert outputs == expected
    tight.engine.scheduler.check_invariants()


def test_int8_fits_more_blocks_in_the_same_memory(tiny_llama_dir):
    blocks = {dtype: LLM(model=tiny_llama_dir, dtype="float32", kv_cache_memory_gib=0.001, max_model_len=256,
                         kv_cache_dtype=dtype).engine.kv_cache_manager.num_blocks for dtype in ("auto", "int8")}
    # 2 KV heads x 16 dims: 128 bytes a float32 row against 32 codes + 2 float32 scales.
    assert blocks["int8"] == int(2**30 * 0.001 // (16 * 2 * 2 * (32 + 8)))
    assert blocks["auto"] == int(2**30 * 0.001 // (16 * 2 * 2 * 128))


def test_int8_static_without_scales_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="calibrate-kv"):
        LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, kv_cache_dtype="int8-static")


def test_calibrate_kv_then_perplexity_cli(tiny_llama_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Beautiful is better than ugly. Explicit is better than implicit. " * 30)
    ember = [sys.executable, "-m", "ember.cli.main"]
    out = tmp_path / "scales"
    subprocess.run([*ember, "calibrate-kv", "--model", tiny_llama_dir, "--calib-file", str(text), "--num-samples",
                    "2", "--calib-seq-len", "32", "--output", str(out)], check=True, capture_output=True)
    assert (out / "kv_scales.safetensors").is_file()
    results = {}
    for flags in ([], ["--kv-cache-dtype", "int8-static", "--kv-scales", str(out), "--kv-outlier-residual"]):
        run = subprocess.run([*ember, "eval", "perplexity", "--model", tiny_llama_dir, "--file", str(text),
                              "--dtype", "float32", "--window", "64", "--stride", "32", "--prefill-chunk", "16",
                              *flags], check=True, capture_output=True, text=True)
        results[bool(flags)] = json.loads(run.stdout)
    static = results[True]
    assert static["kv_cache"]["kv_cache_dtype"] == "int8-static" and 0 <= static["kv_cache"]["outlier_share"] < 0.5
    assert static["perplexity"] == pytest.approx(results[False]["perplexity"], rel=0.02)
    assert static["perplexity"] != results[False]["perplexity"]
