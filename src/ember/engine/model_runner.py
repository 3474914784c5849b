"""Owns the model, the KV-cache tensors and every per-step tensor: inputs in, sampled tokens out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember.attention.eviction import AttentionMassRecorder
from ember.attention.layer_cache import KVCacheSpec, create_layer_caches
from ember.attention.metadata import build_attention_metadata, with_group_tables
from ember.engine.prompt_logprobs import PromptLogprobsChunk, compute_prompt_logprobs
from ember.models.config import ModelConfig
from ember.models.layers.precision import PrecisionMask
from ember.sampling.metadata import SamplingMetadata
from ember.sampling.sampler import Sampler, SamplerOutput
from ember.scheduler.output import ScheduledRequest, SchedulerOutput
from ember.spec_decode.rejection_sampler import expand_rows, verify


@dataclass
class ModelRunnerOutput:
    """Sampled tokens of the requests whose scheduled tokens reached their end this step."""

    sampled_requests: list  # list[Request] whose tokens the sampler output rows hold, in order
    sampler_output: SamplerOutput | None
    # With `keep_hidden`: the step's final hidden states [num_rows, hidden] and which rows each
    # scheduled request owns, (request, first row, end row), for the precision-fallback monitor.
    hidden: torch.Tensor | None = None
    row_spans: list | None = None
    # With `record_attention`: (request, [new tokens, KV rows] attention mass summed over heads and layers).
    attention_mass: list | None = None
    # The prompt logprobs of this step's prompt rows, for requests with `prompt_logprobs` (None: none asked).
    prompt_logprobs: list[PromptLogprobsChunk] | None = None
    # With draft tokens in the step: how many tokens each sampled request emitted (its accepted drafts plus
    # one; the sampler output holds them back to back). None: one token each.
    num_emitted: list[int] | None = None


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, num_blocks: int, kv_spec: KVCacheSpec,
                 kv_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """`kv_spec` sets the cache's dtype and geometry; `kv_scales` are int8-static's per-layer scales."""
        self.model = model
        self.model_config = model_config
        self.kv_spec = kv_spec
        self.block_size = kv_spec.block_size
        self.num_blocks = num_blocks
        self.dtype = kv_spec.model_dtype
        self.sampler = Sampler()
        self.kv_caches = create_layer_caches(kv_spec, num_blocks, kv_scales)
        self.keep_hidden = False  # set by the engine when it watches activations (precision fallback)
        self.record_attention = False  # set by the engine when its eviction policy scores tokens
        self.structured_output = None  # the engine's StructuredOutputManager: fills grammar bitmasks
        self.lora = None  # the engine's LoRAManager, with --enable-lora: told each step's adapter rows

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # Decode-shaped entries (one new token, plus any drafts) first, then prefill chunks: the
        # attention backend batches the former and walks the latter.
        entries = sorted(scheduler_output.scheduled, key=lambda s: s.num_new_tokens - len(s.spec_token_ids) > 1)
        input_ids, positions, meta, logits_rows, sampled_entries = self._prepare_inputs(entries)
        if self.record_attention:
            meta.attention_mass = AttentionMassRecorder(
                [e.num_new_tokens for e in entries], [e.request.num_kv_tokens + e.num_new_tokens for e in entries])
        precision = build_precision_mask(entries)  # None unless some row takes a dense path
        spans = _row_spans(entries) if self.lora is not None or self.keep_hidden else None
        if self.lora is not None:
            self.lora.set_batch(len(input_ids), [(r.lora_slot, start, end) for r, start, end in spans
                                                 if r.lora_slot is not None])
        hidden = self.model(input_ids, positions, self.kv_caches, meta, precision)
        kept = (hidden, spans) if self.keep_hidden else (None, None)
        mass = list(zip((e.request for e in entries), meta.attention_mass.mass)) if self.record_attention else None
        prompt_logprobs = compute_prompt_logprobs(self.model, hidden, entries, precision)
        if not sampled_entries:
            return ModelRunnerOutput([], None, *kept, mass, prompt_logprobs)
        head_precision = precision.select(logits_rows) if precision is not None else None
        logits = self.model.compute_logits(hidden[logits_rows], head_precision)  # [num_sampled rows, vocab]
        sampled = [e.request for e in sampled_entries]
        drafts = [e.spec_token_ids for e in sampled_entries]
        speculating = any(drafts)  # some request verifies drafts: k + 1 rows for each that has k
        rows = expand_rows(sampled, drafts) if speculating else sampled
        if self.structured_output is not None and any(r.structured_output is not None for r in rows):
            # As vLLM: the grammar masks the logits in place before sampling, so logprobs are the masked ones.
            self.structured_output.apply_bitmask(logits, [r.structured_output for r in rows])
        metadata = SamplingMetadata.from_requests(rows, self.model_config.vocab_size)
        if not speculating:
            return ModelRunnerOutput(sampled, self.sampler(logits, metadata), *kept, mass, prompt_logprobs)
        sampler_output, num_emitted = verify(self.sampler, logits, metadata, drafts)
        return ModelRunnerOutput(sampled, sampler_output, *kept, mass, prompt_logprobs, num_emitted)

    def read_kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of every layer's K and V rows of `block_ids` (prefill/decode disaggregation exports them):
        [num_blocks, num_layers, 2 (K, V), block_size, KVH, D] in the cache dtype.

        Raises:
            ValueError: a quantized KV cache (its codes and scales do not move yet).
        """
        self._check_movable_kv()
        index = torch.tensor(block_ids, dtype=torch.int64)
        return torch.stack([torch.stack((c.key[index], c.value[index]), dim=1) for c in self.kv_caches], dim=1)

    def write_kv_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Overwrite the K and V rows of `block_ids` in every layer with `kv`, shaped as `read_kv_blocks`
        returns it (an import of blocks computed elsewhere).

        Raises:
            ValueError: a quantized KV cache, or `kv` of another shape or dtype.
        """
        self._check_movable_kv()
        spec = self.kv_spec
        shape = (len(block_ids), spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        if tuple(kv.shape) != shape or kv.dtype != spec.model_dtype:
            raise ValueError(f"KV blocks must be {shape} {spec.model_dtype}, got {tuple(kv.shape)} {kv.dtype}")
        index = torch.tensor(block_ids, dtype=torch.int64)
        for layer, cache in enumerate(self.kv_caches):
            cache.key.index_copy_(0, index, kv[:, layer, 0])
            cache.value.index_copy_(0, index, kv[:, layer, 1])

    def _check_movable_kv(self) -> None:
        if self.kv_spec.is_quantized:
            raise ValueError(f"KV blocks of a {self.kv_spec.cache_dtype} cache cannot be moved; "
                             "use kv_cache_dtype auto")

    def _prepare_inputs(self, entries: list[ScheduledRequest]):
        input_ids: list[int] = []
        positions: list[int] = []
        # Attention rows: per sequence its block table, KV rows already cached (fewer than the position
        # after eviction) and new tokens. A request verifying drafts gives one decode row per position,
        # each seeing one more row of KV than the last (all of the step's K/V is written before attention).
        tables: list[list[int]] = []
        group_tables: list[list[list[int | None]]] = [[] for _ in entries[0].group_block_ids]  # local groups'
        context_lens: list[int] = []
        query_lens: list[int] = []
        logits_rows: list[int] = []
        sampled = []  # the entries whose next token(s) are sampled this step
        for entry in entries:
            request, num_new = entry.request, entry.num_new_tokens
            start = request.num_computed_tokens
            end = start + num_new
            num_spec = len(entry.spec_token_ids)
            num_rows = num_new if num_spec else 1
            tables.extend([entry.block_ids] * num_rows)
            for group, table in zip(group_tables, entry.group_block_ids):
                group.extend([table] * num_rows)
            if num_spec:
                context_lens.extend(range(request.num_kv_tokens, request.num_kv_tokens + num_new))
                query_lens.extend([1] * num_new)
            else:
                context_lens.append(request.num_kv_tokens)
                query_lens.append(num_new)
            input_ids.extend(request.all_token_ids[start:end - num_spec])
            input_ids.extend(entry.spec_token_ids)  # drafts sit after the request's last known token
            positions.extend(range(start, end))
            if end - num_spec == request.num_tokens:  # all known tokens computed: sample the next one(s)
                logits_rows.extend(range(len(input_ids) - num_spec - 1, len(input_ids)))
                sampled.append(entry)
        positions_t = torch.tensor(positions, dtype=torch.int64)
        # Slots follow cache rows; positions (RoPE) stay the tokens' own, also after eviction.
        evicted = any(e.request.num_evicted_tokens for e in entries)
        positions_or_none = None if evicted else positions_t
        meta = build_attention_metadata(tables, context_lens, query_lens, self.block_size, positions_or_none)
        if group_tables:
            with_group_tables(meta, group_tables, query_lens, self.block_size, positions_t)
        return torch.tensor(input_ids, dtype=torch.int64), positions_t, meta, logits_rows, sampled


def _row_spans(entries: list[ScheduledRequest]) -> list:
    """(request, first row, end row) of each entry, in the order `_prepare_inputs` lays rows out."""
    spans, offset = [], 0
    for entry in entries:
        spans.append((entry.request, offset, offset + entry.num_new_tokens))
        offset += entry.num_new_tokens
    return spans


def build_precision_mask(entries: list[ScheduledRequest]) -> PrecisionMask | None:
    """The step's precision mask: the rows of each request at positions >= its `dense_from_position`
    take the dense path of the ops it was admitted with. Rows are laid out as `_prepare_inputs` lays
    them (entry after entry); None (no extra cost) when every row is quantized."""
    spans, offset = [], 0
    for entry in entries:
        request, start = entry.request, entry.request.num_computed_tokens
        dense_from = request.dense_from_position
        if dense_from is not None and request.precision_ops:
            first = max(dense_from - start, 0)
            spans.append((request.precision_ops, offset + first, offset + entry.num_new_tokens))
        offset += entry.num_new_tokens
    return PrecisionMask.from_spans(offset, spans) if spans else None
