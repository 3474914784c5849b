"""The tokenizer read from the GGUF metadata, and its on-disk cache, against transformers."""

import os

import pytest


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    return tmp_path


TEXTS = ["Hello world!", "  leading spaces\nand émojis 🎉 and <|im_start|> specials", "def f(x):\n\treturn x**2"]


def test_cached_tokenizer_equals_direct_gguf_conversion(bundled_gguf, fresh_cache):
    from transformers import AutoTokenizer

    from ember.loader.tokenizer import Tokenizer

    folder, name = os.path.split(bundled_gguf)
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    first = Tokenizer.from_path(bundled_gguf)  # converts and writes the cache
    assert any(fresh_cache.rglob("tokenizer.json"))
    cached = Tokenizer.from_path(bundled_gguf)  # reads the cache
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    for tok in (first, cached):
        assert tok.eos_token_id == reference.eos_token_id
        for text in TEXTS:
            ids = reference.encode(text)
            assert tok.encode(text) == ids
            assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tok.apply_chat_template(messages) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)

