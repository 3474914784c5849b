"""Tokenizer and chat template, read from the GGUF metadata or a Hugging Face directory."""

from __future__ import annotations

import logging
import os
import shutil

from transformers import AutoTokenizer

from ember import envs

logger = logging.getLogger(__name__)


def _cache_dir_for(gguf_path: str) -> str:
    """Where the tokenizer converted from a GGUF file is kept (keyed by file name, size, mtime)."""
    root = envs.EMBER_CACHE_DIR
    stat = os.stat(gguf_path)
    key = f"{os.path.basename(gguf_path)}-{stat.st_size}-{stat.st_mtime_ns}"
    return os.path.join(root, "tokenizers", key)


class Tokenizer:
    """A thin wrapper over a `transformers` fast tokenizer with the calls the engine makes."""

    def __init__(self, hf_tokenizer) -> None:
        # As vLLM's tokenizer for generation: truncation (`encode(max_length=)`) keeps a prompt's end.
        hf_tokenizer.truncation_side = "left"
        self.hf = hf_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size: int = len(hf_tokenizer)
        self.all_special_ids = set(hf_tokenizer.all_special_ids)

    @classmethod
    def from_path(cls, path: str) -> "Tokenizer":
        """Load from a GGUF file (its embedded vocab, merges and template) or a model directory."""
        if os.path.isfile(path):
            return cls(_load_gguf_tokenizer(path))
        return cls(AutoTokenizer.from_pretrained(path))

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of `text`; with `max_length`, at most that many, cut on the left (special tokens kept)."""
        if max_length is None:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        return self.hf.encode(text, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(token_ids)

    @property
    def chat_template(self) -> str | dict | None:
        """The model's own chat template (None when it has none)."""
        return getattr(self.hf, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render `messages` with the model's chat template (or `chat_template=` text) into prompt text;
        other keywords (`tools`, ...) reach the template as variables."""
        if not kwargs.get("chat_template") and not self.chat_template:
            raise ValueError("this model has no chat template; use completions with a plain prompt")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)


def _load_gguf_tokenizer(path: str):
    """Convert the GGUF vocabulary once (seconds), then reuse the saved fast tokenizer (~0.2 s)."""
    cache = _cache_dir_for(path)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception as err:  # a damaged cache is rebuilt below
            logger.warning("ignoring tokenizer cache %s: %s", cache, err)
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cache, ignore_errors=True)  # a damaged cache is replaced
        os.replace(tmp, cache)
    except OSError as err:  # read-only home, or another process won the race: convert next time
        logger.info("cannot cache the tokenizer in %s: %s", cache, err)
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer

