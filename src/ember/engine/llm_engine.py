"""The synchronous engine: add requests, call `step()`, get outputs (schedule -> run -> postprocess)."""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from ember import envs
from ember.attention.layer_cache import KVCacheSpec
from ember.config import EngineConfig, default_num_threads
from ember.engine.drift import DriftMonitor, DriftReference
from ember.engine.eviction import EvictionManager, max_rows_needed
from ember.engine.model_runner import ModelRunner, ModelRunnerOutput
from ember.engine.output_processor import ParentState, check_stop
from ember.engine.precision import PrecisionManager, PrecisionState, check_precision
from ember.engine.prompt_truncation import encode_prompt, resolve_truncation
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.loader.model_loader import load_model, resolve_model_path
from ember.loader.tokenizer import Tokenizer
from ember.lora.manager import LoRAManager
from ember.lora.request import LoRARequest
from ember.outputs import Logprob, RequestOutput
from ember.quant.checkpoint import load_drift_reference
from ember.quant.kv_scales import resolve_kv_scales
from ember.request import Request, RequestStatus
from ember.sampling.bad_words import tokenize_bad_words
from ember.sampling_params import DENSE_PRECISION, SamplingParams
from ember.scheduler.output import SchedulerOutput
from ember.scheduler.scheduler import Scheduler
from ember.spec_decode.speculator import SpecDecodingStats, build_speculator
from ember.structured_output.manager import StructuredOutputManager

MAX_DEFAULT_MODEL_LEN = 8192
logger = logging.getLogger("ember.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens served from it
    num_precision_fallbacks_total: int = 0  # sequences switched to the high-precision path mid-flight
    kv_cache_blocks_used: int = 0  # KV blocks referenced by live requests
    kv_cache_fragmentation: float = 0.0  # empty slots in those blocks over their slots (0..1)
    spec_decoding: SpecDecodingStats | None = None  # drafted / accepted totals, with speculative decoding

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class LLMEngine:
    """Owns the scheduler, the KV-cache manager, the model runner and per-request output state."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, model_config, tokenizer: Tokenizer,
                 model_name: str, drift_reference: DriftReference | None = None,
                 kv_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """`kv_scales`: per layer (k_scale, v_scale) [KVH, D], needed by kv_cache_dtype int8-static."""
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_name = model_name
        max_len = config.max_model_len or min(model_config.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
        if max_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context length "
                             f"{model_config.max_position_embeddings}")
        self.config = config.replace(max_model_len=max_len)
        self.kv_spec = KVCacheSpec.for_model(model_config, getattr(torch, config.dtype), config.kv_cache_dtype,
                                             config.block_size, config.kv_outlier_residual, config.kv_outlier_factor,
                                             grouped=not config.disable_hybrid_kv_cache_manager)
        num_blocks = config.num_kv_blocks or int(config.kv_cache_memory_gib * 2**30 // self.kv_spec.bytes_per_block())
        eviction = config.eviction_config()  # compaction rewrites blocks in place: no prefix sharing then
        if eviction is not None and model_config.sliding_window:
            raise ValueError("--kv-eviction cannot run a model with sliding-window layers: compaction moves kept "
                             "tokens to other rows, and a window counts rows")
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size,
                                               config.enable_prefix_caching and eviction is None,
                                               windows=self.kv_spec.windows)
        chunk = config.long_prefill_token_threshold  # a request holds its kept rows plus one step's tokens
        if eviction is not None:
            chunk = min(chunk or eviction.budget_tokens, eviction.budget_tokens)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens, chunk)
        self.runner = ModelRunner(model, model_config, num_blocks, self.kv_spec, kv_scales)
        self.eviction = EvictionManager(eviction, self.kv_cache_manager, self.runner) if eviction else None
        self.precision = PrecisionManager(model)
        self.lora = (LoRAManager(model, model_config, config.max_loras, config.max_lora_rank,
                                 getattr(torch, config.dtype)) if config.enable_lora else None)
        self.runner.lora = self.lora
        self.num_precision_fallbacks_total = 0
        self.drift = self._drift_monitor(config, drift_reference)
        self.runner.keep_hidden = self.drift is not None
        # Grammars compile on the manager's own thread; xgrammar loads on the first constrained request.
        self.structured_output = StructuredOutputManager(tokenizer.hf, model_config.vocab_size)
        self.runner.structured_output = self.structured_output
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model_config.eos_token_id
        self.speculator = build_speculator(self.config, model_config, tokenizer, self.kv_spec, num_blocks)
        self._parents: dict[str, ParentState] = {}
        self._fault_token = envs.EMBER_TEST_FAULT_TOKEN  # tests only: a prompt holding it fails in the step
        self._counter = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Load the model and tokenizer the config names (the bundled model when None)."""
        torch.set_num_threads(config.num_threads or default_num_threads())
        torch.manual_seed(config.seed)
        path = resolve_model_path(config.model)
        # a bar on stderr only when it is a terminal and reading takes over 2 s (`ember.progress`)
        model, model_config = load_model(path, getattr(torch, config.dtype), config.kernel_policy(), progress=True)
        tokenizer = Tokenizer.from_path(path)
        name = config.model or "SmolLM2-135M-Instruct"
        reference = load_drift_reference(path) if config.precision_fallback and os.path.isdir(path) else None
        return cls(config, model, model_config, tokenizer, name,
                   DriftReference.from_dict(reference) if reference else None,
                   resolve_kv_scales(config.kv_cache_dtype, config.kv_scales, path))

    def _drift_monitor(self, config: EngineConfig, reference: DriftReference | None) -> DriftMonitor | None:
        """The activation monitor of `--precision-fallback`; it needs float copies and a drift reference."""
        if not config.precision_fallback:
            return None
        if not self.precision.has_dual_layers or reference is None:
            raise ValueError("precision fallback needs a quantized checkpoint with float copies of its ops and a "
                             "drift reference: write one with `ember quantize ... --fallback-copies sensitive|all`")
        if reference.module != "model.norm":
            raise ValueError(f"the drift reference watches {reference.module!r}; this engine watches model.norm")
        return DriftMonitor(reference, config.fallback_kl, config.fallback_skew)

    # ---- requests in -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Queue a request (fanned out into `params.n` sequences), on the base model or `lora_request`'s adapter.

        The request runs at `params.precision` (None: the engine's default, see `set_precision`) and
        keeps the enabled op set of this moment until it finishes.

        `params.truncate_prompt_tokens` cuts the prompt to its last k tokens before any length check
        (`prompt_token_ids` of the outputs are the kept ones); `params.bad_words` are tokenized here, once.

        Raises:
            ValueError: empty prompt, token id out of range (prompt, allowed_token_ids, bad words), a
                duplicate id, a prompt that cannot fit (prompt + max_tokens beyond max_model_len or the
                whole KV cache), truncate_prompt_tokens above max_model_len, precision "bf16" on a
                model without high-precision copies, or a LoRA adapter that cannot be loaded (LoRA not
                enabled, a bad directory, too high a rank, every slot busy).
        """
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        keep = resolve_truncation(params.truncate_prompt_tokens, self.config.max_model_len)
        token_ids = encode_prompt(self.tokenizer, prompt, keep)
        params = self._validate(token_ids, params)
        bad_words = tokenize_bad_words(params.bad_words, self.tokenizer, self.model_config.vocab_size)
        precision = self.precision.request_precision(params)
        lora_slot, lora_key = self._activate_lora(lora_request)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children = [Request(f"{request_id}#{i}" if params.n > 1 else request_id, token_ids, params,
                            self.eos_token_id, cache_salt, parent_id=request_id, index=i,
                            arrival_time=arrival)
                    for i in range(params.n)]
        self._parents[request_id] = ParentState(request_id, prompt_text, children, self.tokenizer)
        for child in children:
            child.bad_words_token_ids = bad_words  # shared, never modified
            child.lora_slot, child.lora_cache_key = lora_slot, lora_key
            if params.structured_outputs is not None:
                child.structured_output = self.structured_output.new_request(params.structured_outputs)
            self.precision.admit(child, precision)
            self.scheduler.add_request(child)

    def _activate_lora(self, lora_request: LoRARequest | None) -> tuple[int | None, int | None]:
        """(slot, prefix-cache key) of the request's adapter, loaded if needed; (None, None) for the base model."""
        if lora_request is None:
            return None, None
        return self._lora_manager().activate(lora_request, self.busy_lora_slots())

    def check_lora(self, lora_request: LoRARequest) -> None:
        """Read and check an adapter without loading it into a slot (the server's load endpoint).

        Raises:
            ValueError: LoRA is not enabled, or the adapter cannot be read or does not fit this model.
        """
        self._lora_manager().read(lora_request)

    def release_lora(self, lora_name: str) -> None:
        """Free an unloaded adapter's slot (at once if idle, else once its requests finish)."""
        if self.lora is not None:
            self.lora.release(lora_name, self.busy_lora_slots())

    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA adapters are not enabled: start the engine with enable_lora=True (--enable-lora)")
        return self.lora

    def busy_lora_slots(self) -> set[int]:
        """Adapter slots that unfinished requests use (never evicted or unloaded under them)."""
        return {seq.request.lora_slot for parent in self._parents.values() for seq in parent.children
                if seq.request.lora_slot is not None and not seq.request.is_finished}

    def _validate(self, token_ids: list[int], params: SamplingParams) -> SamplingParams:
        max_len = self.config.max_model_len
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(token_ids) >= max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but the maximum model length "
                             f"is {max_len} (prompt + at least one output token must fit)")
        if params.max_tokens is None:
            params = params.clone(max_tokens=max_len - len(token_ids))
        if len(token_ids) + params.max_tokens > max_len:
            raise ValueError(f"this model's maximum context length is {max_len} tokens; the request "
                             f"asks for {len(token_ids)} prompt + {params.max_tokens} output tokens")
        if params.logit_bias and any(not 0 <= t < vocab for t in params.logit_bias):
            err = ValueError(f"logit_bias token ids must be in [0, {vocab})")
            err.param = "logit_bias"
            raise err
        if params.allowed_token_ids and any(not 0 <= t < vocab for t in params.allowed_token_ids):
            err = ValueError(f"allowed_token_ids contains out-of-vocab token id (vocabulary size {vocab})")
            err.param = "allowed_token_ids"
            raise err
        rows = max_rows_needed(self.eviction and self.eviction.config, len(token_ids) + params.max_tokens,
                               self.scheduler.long_prefill_token_threshold)
        blocks_needed = self.kv_cache_manager.max_blocks_needed(rows, min(self.scheduler.long_prefill_token_threshold,
                                                                          self.config.max_num_batched_tokens))
        if blocks_needed > self.kv_cache_manager.num_blocks:
            raise ValueError(f"the request needs {blocks_needed} KV-cache blocks but the cache holds "
                             f"only {self.kv_cache_manager.num_blocks}")
        return params

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Drop requests at once and free their KV blocks; unknown ids are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            parent = self._parents.pop(request_id, None)
            if parent is not None:
                self._end_children(parent)

    def _end_children(self, parent: ParentState) -> None:
        """Abort every sample of `parent`: blocks freed, the monitors' state released."""
        child_ids = [c.request.request_id for c in parent.children]
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        for child_id in child_ids:
            for monitor in (self.drift, self.eviction):
                if monitor is not None:
                    monitor.release(child_id)

    # ---- the precision mask ------------------------------------------------------------------
    def set_request_precision(self, request_id: str, precision: str = DENSE_PRECISION) -> int:
        """Switch an in-flight request (a parent id: all its samples; or one sample's id) to the
        high-precision path of the ops it was admitted with, from its next sampled token on (see
        `Request.start_dense_path`). Call between steps. Returns how many sequences switched (0 for
        those already on it).

        Raises:
            ValueError: unknown or finished request, a precision other than "bf16" (a request does not
                go back to the quantized path), or a model without dual-precision layers.
        """
        check_precision(precision)
        if precision != DENSE_PRECISION:
            raise ValueError(f"an in-flight request can only switch to {DENSE_PRECISION!r}, got {precision!r}")
        self.precision.require_dual_layers()
        parent = self._parents.get(request_id)
        if parent is not None:
            requests = [c.request for c in parent.children if not c.request.is_finished]
        else:
            request = self.scheduler.requests.get(request_id)
            requests = [request] if request is not None else []
        if not requests:
            raise ValueError(f"no unfinished request {request_id!r}")
        num_switched = sum(request.start_dense_path() for request in requests)
        self.num_precision_fallbacks_total += num_switched
        return num_switched

    def set_precision(self, ops=None, default_precision: str | None = None) -> PrecisionState:
        """Change which ops have their high-precision path enabled (names or globs, see
        `PrecisionManager`) and/or the precision of new requests; requests in flight keep theirs.

        Raises:
            ValueError: no dual-precision layers, a pattern that matches no op, an unknown precision;
                nothing changes then.
        """
        return self.precision.update(ops, default_precision)

    def get_precision(self) -> PrecisionState:
        return self.precision.state()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def new_request_id(self) -> str:
        return str(next(self._counter))

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return the requests that progressed."""
        failed = self._fail_bad_grammars() if self.structured_output.num_failed_compiles else []
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            if not failed and self.scheduler.waiting:
                time.sleep(0.001)  # only grammars still compiling: let their thread run
            return failed
        start = time.perf_counter()
        runner_output = self.runner.execute(scheduler_output)
        if self.speculator is not None:
            self.speculator.observe_step(scheduler_output.scheduled, time.perf_counter() - start)
        outputs = failed + self._postprocess(scheduler_output, runner_output)
        if self.eviction is not None:
            self.eviction.after_step(scheduler_output, runner_output)
        if self.drift is not None:
            self._watch_drift(runner_output)
        if self.speculator is not None:  # drafts for the next step, which verifies them
            self.speculator.propose(self.scheduler.running)
        return outputs

    def _fail_bad_grammars(self) -> list[RequestOutput]:
        """Finish (as aborted) the waiting requests whose grammar failed to compile; the reason goes in
        `RequestOutput.extra["error"]`. Servers compile before admitting, so this is the offline path."""
        bad = [r for r in self.scheduler.waiting if r.structured_output is not None and r.structured_output.error]
        outputs: list[RequestOutput] = []
        for parent_id in dict.fromkeys(r.parent_id for r in bad):
            parent = self._parents.get(parent_id)
            if parent is not None:
                error = next(r.structured_output.error for r in bad if r.parent_id == parent_id)
                outputs.append(self._fail_request(parent, str(error)))
        return outputs

    def _watch_drift(self, runner_output: ModelRunnerOutput) -> None:
        """Feed each quantized request's newest rows to the drift monitor; a request whose window drifts
        runs its next tokens on the float copies (`set_request_precision`). Rows are the final normed
        hidden states, prompt rows included, so the first check comes with the first generated token."""
        ids, rows, counts = [], [], []
        for request, start, end in runner_output.row_spans:
            if request.is_finished or request.dense_from_position is not None:
                self.drift.release(request.request_id)
                continue
            first = max(start, end - self.drift.interval)  # only the newest window's worth of rows
            ids.append(request.request_id)
            rows.append(runner_output.hidden[first:end])
            counts.append(end - first)
        if not ids:
            return
        self.drift.observe(ids, torch.cat(rows), counts)
        for request_id in ids:
            check = self.drift.check(request_id)
            if check is not None and check.drifted:
                self.set_request_precision(request_id, DENSE_PRECISION)
                self.drift.release(request_id)

    def _postprocess(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        for entry in scheduler_output.scheduled:
            entry.request.num_computed_tokens += entry.num_new_tokens
        for chunk in runner_output.prompt_logprobs or ():  # scored prompt rows, kept until the prompt is whole
            self._parents[chunk.request.parent_id].add_prompt_logprobs(chunk)
        touched: dict[str, ParentState] = {}
        finished_ids: list[str] = []
        failed: dict[str, ParentState] = {}
        sampler_output = runner_output.sampler_output
        if sampler_output is not None:
            token_ids = sampler_output.sampled_token_ids.tolist()
            num_emitted = runner_output.num_emitted or [1] * len(token_ids)
            drafted = {e.request.request_id: len(e.spec_token_ids) for e in scheduler_output.scheduled
                       if e.spec_token_ids}
            now = time.monotonic()
            end = 0
            for request, count in zip(runner_output.sampled_requests, num_emitted):
                start, end = end, end + count
                parent = self._parents[request.parent_id]
                if parent.request_id in failed:
                    continue
                try:
                    if request.request_id in drafted:
                        self._settle_drafts(request, drafted[request.request_id], count - 1)
                    for row in range(start, end):  # the accepted drafts, then the target's own token
                        self._process_token(parent, request, token_ids[row], sampler_output, row, now)
                        if request.is_finished:
                            break
                except Exception:  # this request's own processing: it alone fails, the step goes on
                    logger.exception("request %s failed while processing its token", parent.request_id)
                    failed[parent.request_id] = parent
                    continue
                if request.is_finished:
                    finished_ids.append(request.request_id)
                touched[parent.request_id] = parent
        for request_id in finished_ids:
            request = self.scheduler.requests.get(request_id)
            if request is not None and request.parent_id not in failed:
                self.scheduler.finish_requests([request_id], request.status)
        outputs = [parent.make_output() for parent in touched.values() if parent.request_id not in failed]
        for output in outputs:
            if output.finished:
                del self._parents[output.request_id]
        return outputs + [self._fail_request(parent, "the request failed inside the engine", internal=True)
                          for parent in failed.values()]

    def _settle_drafts(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        """After verification: the rejected drafts' KV rows are no longer the request's (their slots are
        overwritten next step and blocks holding only them are freed); the round goes into the stats."""
        num_rejected = num_drafted - num_accepted
        if num_rejected:
            request.num_computed_tokens -= num_rejected
            self.kv_cache_manager.truncate(request, request.num_kv_tokens)
        self.speculator.record(request, num_drafted, num_accepted)

    def _process_token(self, parent: ParentState, request: Request, token: int, sampler_output, row: int,
                       now: float) -> None:
        """Append one sampled token to its sequence: grammar, counters, logprobs, text, stop checks."""
        if self._fault_token is not None and self._fault_token in request.prompt_token_ids:
            raise RuntimeError(f"injected fault: the prompt holds EMBER_TEST_FAULT_TOKEN {self._fault_token}")
        state = parent.children[request.index]
        request.append_output_token_id(token)
        if request.structured_output is not None:
            request.structured_output.accept(request.output_token_ids)
        self.generation_tokens_total += 1
        if request.num_output_tokens == 1:
            self.prompt_tokens_total += request.num_prompt_tokens
        if parent.first_token_time is None:
            parent.first_token_time = now
        if state.logprobs is not None:
            self._append_logprobs(state, sampler_output, row)
        prev_len = 0
        if state.detokenizer is not None:
            prev_len = len(state.detokenizer.text)
            state.detokenizer.add_tokens([token])
        check_stop(state, token, prev_len, self.config.max_model_len)

    def _fail_request(self, parent: ParentState, error: str, internal: bool = False) -> RequestOutput:
        """End every sample of a failed request: blocks freed, monitors released, and a finished output
        (finish_reason "abort") with `extra["error"]`; `extra["internal"]` marks a fault of ours rather than
        of the request's input (a server answers 500 for it)."""
        self._end_children(parent)
        for child in parent.children:  # a sample that had finished before the failure is aborted with the rest
            child.request.status = RequestStatus.FINISHED_ABORTED
        self._parents.pop(parent.request_id, None)
        output = parent.make_output()
        output.extra["error"] = error
        output.extra["internal"] = internal
        return output

    def _append_logprobs(self, state, sampler_output, row: int) -> None:
        k = state.request.sampling_params.logprobs
        ids = sampler_output.logprob_token_ids[row, :k + 1].tolist()
        values = sampler_output.logprobs[row, :k + 1].tolist()
        sampled_rank = int(sampler_output.sampled_token_ranks[row])
        entry = {ids[0]: Logprob(values[0], sampled_rank, self.tokenizer.decode([ids[0]], False))}
        for rank, (token, value) in enumerate(zip(ids[1:], values[1:]), start=1):
            entry.setdefault(token, Logprob(value, rank, self.tokenizer.decode([token], False)))
        state.logprobs.append(entry)
        state.cumulative_logprob += values[0]

    def get_stats(self) -> EngineStats:
        manager = self.kv_cache_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), manager.usage,
                           self.scheduler.num_preemptions_total, self.prompt_tokens_total,
                           self.generation_tokens_total, manager.num_queried_tokens, manager.num_hit_tokens,
                           self.num_precision_fallbacks_total, manager.num_used_blocks, manager.fragmentation,
                           self.speculator.stats.snapshot() if self.speculator is not None else None)
