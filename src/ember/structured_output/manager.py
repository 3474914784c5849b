"""Owns grammar compilation (an LRU cache of compile futures on one worker thread) and the per-step bitmask."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Callable

import torch

from ember.sampling_params import StructuredOutputsParams
from ember.structured_output.backend import XgrammarBackend, apply_bitmask, spec_key
from ember.structured_output.request import StructuredOutputRequest

DEFAULT_GRAMMAR_CACHE_SIZE = 128


class StructuredOutputManager:
    """Compiles each distinct constraint once, off the step loop, and builds the sampler's bitmask.

    Thread-safe `compile`: the server awaits the same futures from its event loop, so a bad schema is
    answered with a 400 before the request reaches the engine, and a slow compile delays only its own
    request (the scheduler admits a constrained sequence only once its grammar is ready).

    Args:
        hf_tokenizer / vocab_size: see `XgrammarBackend`.
        cache_size: how many compiled grammars are kept (least recently used dropped first).
        is_reasoning_end: with a reasoning parser, output token ids -> whether reasoning has ended;
            the constraint applies only after that.
    """

    def __init__(self, hf_tokenizer, vocab_size: int, cache_size: int = DEFAULT_GRAMMAR_CACHE_SIZE,
                 is_reasoning_end: Callable[[list[int]], bool] | None = None) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.is_reasoning_end = is_reasoning_end
        self._backend: XgrammarBackend | None = None
        self._backend_lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ember-grammar")
        self.num_failed_compiles = 0

    @property
    def backend(self) -> XgrammarBackend:
        """Built on first use (reading the vocabulary takes ~0.3 s), so unconstrained engines never pay."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = XgrammarBackend(self._hf_tokenizer, self.vocab_size)
            return self._backend

    def compile(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """The compile future of `params`' grammar: cached, or started now on the worker thread.

        A failed compile is not cached, so the next request with the same input is told again.
        """
        key = spec_key(params)
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, params)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _compile(self, params: StructuredOutputsParams):
        try:
            return self.backend.compile(params)
        except Exception:
            self.num_failed_compiles += 1  # lets the engine skip looking for failed requests until one exists
            raise

    def new_request(self, params: StructuredOutputsParams) -> StructuredOutputRequest:
        """The state of one constrained sequence (each of a request's n samples gets its own)."""
        return StructuredOutputRequest(self.compile(params), self._matcher, self.is_reasoning_end)

    def _matcher(self, grammar):
        return self.backend.matcher(grammar)  # the backend exists: it compiled `grammar`

    def build_bitmask(self, states: list[StructuredOutputRequest | None]) -> tuple[list[int], torch.Tensor] | None:
        """The step's token bitmask: (constrained rows, [B, ceil(V / 32)] int32), None when no row is.

        `states` holds one entry per sampled row (None for unconstrained sequences).
        """
        rows = [row for row, state in enumerate(states) if state is not None and state.is_constraining]
        if not rows:
            return None
        bitmask = self.backend.allocate_bitmask(len(states))
        for row in rows:
            states[row].fill_bitmask(bitmask, row)
        return rows, bitmask

    def apply_bitmask(self, logits: torch.Tensor, states: list[StructuredOutputRequest | None]) -> None:
        """Mask, in place, the tokens each constrained row's grammar forbids next (-inf); other rows untouched.

        Args: logits [B, V] float32, one row per entry of `states`.
        """
        mask = self.build_bitmask(states)
        if mask is not None:
            apply_bitmask(logits, mask[1], mask[0])

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

