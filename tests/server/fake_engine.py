"""A tiny stand-in for `LLMEngine` (same interface) for tests of the asyncio wrapper without a model."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ember.outputs import CompletionOutput, Logprob, RequestOutput


class CharTokenizer:
    """One token per byte; id 0 is EOS."""

    eos_token_id = 0
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b or 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


@dataclass
class FakeConfig:
    max_model_len: int = 256


class FakeEngine:
    """Emits 'a', 'b', 'c', ... one token per step per sample; fails a step when a prompt holds `poison`."""

    model_name = "fake-model"

    def __init__(self, max_model_len: int = 256, poison: str | None = None) -> None:
        self.config = FakeConfig(max_model_len)
        self.tokenizer = CharTokenizer()
        self.poison = self.tokenizer.encode(poison) if poison else None
        self.requests: dict[str, tuple[list[int], object, list[list[int]]]] = {}
        self.stats = FakeStats()
        self.step_gate = threading.Event()  # clear it to hold the engine between steps
        self.step_gate.set()

    def add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None) -> None:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) + (params.max_tokens or 0) > self.config.max_model_len:
            raise ValueError("prompt + max_tokens exceeds max_model_len")
        self.requests[request_id] = (ids, params, [[] for _ in range(params.n)])

    def abort_request(self, request_ids) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if not self.step_gate.wait(timeout=10):
            raise RuntimeError("step gate left closed")
        outputs = []
        for request_id, (ids, params, samples) in list(self.requests.items()):
            if self.poison and _contains(ids, self.poison):
                raise RuntimeError("boom")
            for sample in samples:
                sample.append(ord("a") + len(sample) % 26)
            done = len(samples[0]) >= params.max_tokens
            outs = [CompletionOutput(i, self.tokenizer.decode(s), list(s),
                                     logprobs=[{t: Logprob(-0.5, 1)} for t in s] if params.logprobs is not None else None,
                                     finish_reason="length" if done else None) for i, s in enumerate(samples)]
            outputs.append(RequestOutput(request_id, None, ids, outs, done))
            if done:
                del self.requests[request_id]
        self.stats.num_running = len(self.requests)
        return outputs

    def get_stats(self) -> FakeStats:
        return self.stats


def _contains(ids: list[int], needle: list[int]) -> bool:
    return any(ids[i:i + len(needle)] == needle for i in range(len(ids) - len(needle) + 1))
