"""The offline API, shaped like vLLM's `LLM`: batch generation and chat on one engine."""

from __future__ import annotations

from typing import Sequence

from tqdm import tqdm

from ember.config import EngineConfig, UsageContext
from ember.distributed.launch import create_engine, split_parallel_kwargs
from ember.engine.llm_engine import LLMEngine
from ember.engine.precision import PrecisionState
from ember.lora.request import LoRARequest
from ember.entrypoints.beam_search import beam_search
from ember.outputs import BeamSearchOutput, RequestOutput
from ember.sampling_params import BeamSearchParams, SamplingParams

PromptType = str | dict


class LLM:
    """Generate for many prompts at once with continuous batching.

    `LLM(model=None, dtype="bfloat16", max_model_len=..., ...)`: keyword arguments are the
    fields of `EngineConfig` and of `ParallelConfig` (`data_parallel_size=2`, `tensor_parallel_size=2`,
    ...: the engine then runs in worker processes, see docs/distributed.md); `model=None` loads the
    bundled SmolLM2-135M-Instruct.
    The engine runs in the offline usage context: the step budget defaults to
    `UsageContext.OFFLINE.defaults` (throughput first, as vLLM's `LLM`).
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        kwargs, parallel_config = split_parallel_kwargs(kwargs)
        config = EngineConfig(model=model, usage_context=UsageContext.OFFLINE, **kwargs)
        self.engine = create_engine(config, parallel_config)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """Wrap an engine built elsewhere (e.g. a model given high-precision copies after loading)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        return llm

    def shutdown(self) -> None:
        """Stop the engine's worker processes, if it has any (a distributed engine)."""
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.

        Prompts are strings or `{"prompt_token_ids": [...]}` / `{"prompt": "..."}` dicts.
        `sampling_params` is one for all prompts or a list with one per prompt; so is `lora_request`
        (None: the base model), with `enable_lora=True`.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = _broadcast(sampling_params or SamplingParams(), SamplingParams, len(prompts), "sampling params")
        loras = _broadcast(lora_request, LoRARequest, len(prompts), "LoRA requests")
        for params in params_list:  # a bad schema, regex or grammar raises here, before anything runs
            if params.structured_outputs is not None:
                self.engine.structured_output.compile(params.structured_outputs).result()
        request_ids = []
        try:
            for prompt, params, lora in zip(prompts, params_list, loras):
                request_id = self.engine.new_request_id()
                salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
                self.engine.add_request(request_id, _prompt_input(prompt), params, cache_salt=salt,
                                        lora_request=lora)
                request_ids.append(request_id)
        except ValueError:
            self.engine.abort_request(request_ids)  # all or nothing
            raise
        return self._run(request_ids, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search for each prompt (vLLM's `LLM.beam_search`); outputs come back in prompt order, each
        with the best `params.beam_width` sequences, best first, and the call's KV block figures.

        Every step submits each live beam as a one-token request with `2 * beam_width` logprobs; the
        beams share their common prefix's KV blocks through the prefix cache (see
        `ember.entrypoints.beam_search`, which also says how this compares with Hugging Face).

        Raises:
            ValueError: a malformed or empty prompt, or a prompt plus `max_tokens` beyond `max_model_len`,
                before anything runs.
        """
        if not isinstance(self.engine, LLMEngine):
            raise ValueError("beam search reads the engine's KV-cache manager; it needs a single engine "
                             "(no data/tensor/pipeline parallel or P/D)")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        inputs = [(_prompt_input(p), p.get("cache_salt") if isinstance(p, dict) else None) for p in prompts]
        return beam_search(self, inputs, params, use_tqdm)

    def get_stats(self):
        """Engine counters: running/waiting requests, KV usage, preemptions, prefix-cache hits."""
        return self.engine.get_stats()

    def set_precision(self, ops: str | Sequence[str] | None = None,
                      default_precision: str | None = None) -> PrecisionState:
        """Change the runtime precision mask between calls: `ops` names the dual-precision ops whose
        high-precision path is enabled (module names, globs or dotted suffixes such as
        `model.layers.*.mlp.down_proj` or `down_proj`), `default_precision` ("quantized" or "bf16") what
        a request without `SamplingParams.precision` gets. None keeps the current value; requests
        already submitted keep the ops they were admitted with.

        Raises:
            ValueError: the model has no dual-precision layers, a pattern matches no op, or an unknown
                precision; the engine keeps serving with its previous state.
        """
        return self.engine.set_precision(ops, default_precision)

    def get_precision(self) -> PrecisionState:
        """The default precision, the enabled ops and every op that has a high-precision copy."""
        return self.engine.get_precision()

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate (on
        `lora_request`'s adapter, as `generate`)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tokenizer.encode(
            tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt),
            add_special_tokens=False)} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(request_ids)  # leave the engine clean for the next call
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]


def _prompt_input(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if isinstance(prompt, dict) and "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids'")


def _broadcast(value, single: type, count: int, what: str) -> list:
    """One `single` (or None) for every prompt, or a list with one per prompt (ValueError if not `count`)."""
    if value is None or isinstance(value, single):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"got {len(values)} {what} for {count} prompts")
    return values
