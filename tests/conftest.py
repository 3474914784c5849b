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
