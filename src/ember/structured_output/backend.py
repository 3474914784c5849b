"""The xgrammar backend: compiles a `StructuredOutputsParams` into a grammar and makes matchers for it.

xgrammar is imported on first use (it takes seconds), so engines that never constrain never pay for it.
"""

from __future__ import annotations

import hashlib
import json
import re

import importlib
from typing import Any

import torch

from ember.sampling_params import StructuredOutputsParams

# xgrammar prefixes its errors with "[hh:mm:ss] /path/file.cc:line: "; the reason is what follows.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] [^:]+:\d+: ")


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar that cannot be compiled; the message says why."""

    param = "structured_outputs"


def spec_key(params: StructuredOutputsParams) -> tuple:
    """A hashable key naming the grammar `params` compiles to (the LRU cache key): the constraint's text
    by its SHA-256, so a cached entry keeps 32 bytes of a schema, not the schema (up to the body limit)."""
    kind = params.kind
    if kind == "json":
        text = params.json if isinstance(params.json, str) else json.dumps(params.json, sort_keys=True)
    elif kind == "choice":
        text = json.dumps(list(params.choice))
    elif kind == "json_object":
        text = ""
    else:
        text = getattr(params, kind)
    return kind, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(), params.disable_any_whitespace


class XgrammarBackend:
    """Owns xgrammar's view of the vocabulary and its compiler.

    Args:
        hf_tokenizer: the `transformers` tokenizer the engine decodes with.
        vocab_size: the width of the model's logits (may exceed the tokenizer's length).
        num_threads: xgrammar's compile threads.
    """

    def __init__(self, hf_tokenizer, vocab_size: int, num_threads: int = 1) -> None:
        xgr = _xgrammar()
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size
        # the manager's LRU of compile futures is the one cache: xgrammar's own (unbounded by default) kept
        # every grammar ever compiled, ~0.4 MiB for a small schema, so distinct schemas grew a server without end
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=num_threads, cache_enabled=False)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compile one constraint (seconds at worst; callers run this off the step loop).

        Raises:
            GrammarError: the schema, regex or grammar is invalid or unsupported.
        """
        any_whitespace = not params.disable_any_whitespace
        try:
            kind = params.kind
            if kind == "json":
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                return self.compiler.compile_json_schema(schema, any_whitespace=any_whitespace)
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
            if kind == "regex":
                return self.compiler.compile_regex(params.regex)
            if kind == "choice":
                # JSON string escapes are valid EBNF string literals.
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
                return self.compiler.compile_grammar(f"root ::= {alternatives}")
            return self.compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"invalid {params.kind} for structured outputs: {_reason(exc)}") from None

    def matcher(self, grammar: Any) -> Any:
        """A fresh `xgrammar.GrammarMatcher` at the start of `grammar`."""
        return _xgrammar().GrammarMatcher(grammar)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """[num_rows, ceil(V / 32)] int32, every token allowed."""
        return _xgrammar().allocate_token_bitmask(num_rows, self.vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of tokens the bitmask forbids to -inf, in place, in the given rows only.

    Args: logits [B, V] float32; bitmask [B, ceil(V / 32)] int32 (bit j of word i allows token 32 i + j).
    """
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask, indices=rows)


def _xgrammar():
    return importlib.import_module("xgrammar")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return _LOG_PREFIX.sub("", text.splitlines()[0] if text else type(exc).__name__)
