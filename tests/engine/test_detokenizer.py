"""The incremental detokenizer against a full decode of the same token ids."""

import pytest

TEXTS = ["Hello world!", "  leading spaces\nand émojis 🎉 and <|im_start|> specials", "def f(x):\n\treturn x**2"]


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_incremental_detokenizer_matches_full_decode(bundled_gguf, fresh_cache):
    from ember.engine.detokenizer import IncrementalDetokenizer
    from ember.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_path(bundled_gguf)
    for text in TEXTS:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, prompt_token_ids=[1, 2, 3])
        pieces = [detok.add_tokens([i]) for i in ids]
        assert "".join(pieces) == detok.text == tok.decode(ids)
