"""Shared fixtures: a random tiny Llama checkpoint written locally, and the bundled model."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random 2-layer Llama (GQA, untied head) saved with save_pretrained; no hub access."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    _train_tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def save_tiny_checkpoint():
    """`save_tiny_checkpoint(hf_model, path)`: write a `transformers` model and a tiny tokenizer to `path`."""
    def save(model, path) -> str:
        model.save_pretrained(path)
        _train_tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
        return str(path)
    return save


# Three LoRA adapters of the tiny Llama that differ in rank, targets and scaling (rsLoRA).
TINY_LORA_ADAPTERS = {
    "all": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"]),
    "qv": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "mlp": dict(r=2, lora_alpha=8, target_modules=["o_proj", "down_proj", "up_proj"], use_rslora=True),
}


@pytest.fixture(scope="session")
def tiny_lora_adapters(tiny_llama_hf, tmp_path_factory):
    """name -> (PEFT adapter directory, the tiny Llama with that adapter merged in by `peft`)."""
    import copy

    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    made = {}
    for seed, (name, options) in enumerate(TINY_LORA_ADAPTERS.items()):
        torch.manual_seed(seed)
        # init_lora_weights=False: random A and B (PEFT's default zero B would make the adapter a no-op)
        peft_model = get_peft_model(copy.deepcopy(tiny_llama_hf), LoraConfig(init_lora_weights=False, **options))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(0.3)  # a delta that changes greedy tokens without swamping the base
        path = tmp_path_factory.mktemp(f"lora-{name}")
        peft_model.save_pretrained(path)
        made[name] = (str(path), peft_model.merge_and_unload().eval())
    return made


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir):
    """The tiny Llama in `transformers`, float32: the numeric reference."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_greedy(tiny_llama_hf):
    """`hf_greedy(prompt_ids, max_new_tokens)`: the reference's greedy continuation (EOS not special)."""
    def generate(prompt: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = tiny_llama_hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return generate


def _train_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE trained here on a little text, with a ChatML-style template."""
    import this  # noqa: F401  (the Zen of Python, as training text)
    import codecs

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = codecs.decode(__import__("this").s, "rot13")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return fast


@pytest.fixture(scope="session")
def bundled_gguf():
    from ember.loader.model_loader import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def bundled_llm_fp32():
    from ember import LLM
    return LLM(dtype="float32", max_model_len=1024, num_kv_blocks=512)


class DualPrecisionCheckpoint:
    """The tiny Llama quantized (RTN int4, groups of 32: enough to change greedy tokens) and saved as a
    checkpoint, with the float weights of its linears, for the runtime precision mask tests."""

    def __init__(self, path: str, float_weights: dict, hf_quantized) -> None:
        self.path = path
        self.float_weights = float_weights  # Hugging Face linear name -> float32 weight
        self.hf_quantized = hf_quantized  # the HF model holding the same QuantLinears

    def make_engine(self, dtype: str = "float32", ops=None, **config):
        """An engine on the checkpoint whose linears (all, or the names in `ops`) carry float copies."""
        from ember.config import EngineConfig
        from ember.engine.llm_engine import LLMEngine
        from ember.loader.model_loader import load_model
        from ember.loader.tokenizer import Tokenizer
        from ember.models.layers.precision import attach_fallback_copies

        engine_config = EngineConfig(model=self.path, dtype=dtype, **{"max_model_len": 256, **config})
        model, model_config = load_model(self.path, getattr(torch, dtype))
        copies = {n: w for n, w in self.float_weights.items() if ops is None or n in ops}
        attach_fallback_copies(model, copies, getattr(torch, dtype))
        return LLMEngine(engine_config, model, model_config, Tokenizer.from_path(self.path), "tiny-dual")


@pytest.fixture(scope="session")
def dual_precision_checkpoint(tiny_llama_dir, tmp_path_factory) -> DualPrecisionCheckpoint:
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ember.quant.api import quantize_model
    from ember.quant.checkpoint import save_quantized
    from ember.quant.config import QuantConfig

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    float_weights = {name: module.weight.detach().clone() for name, module in hf.named_modules()
                     if isinstance(module, nn.Linear) and name != "lm_head"}
    config = QuantConfig(method="rtn", bits=4, group_size=32)
    quantize_model(hf, config)
    path = tmp_path_factory.mktemp("tiny-llama-int4")
    save_quantized(hf, path, config)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return DualPrecisionCheckpoint(str(path), float_weights, hf)
