"""Pipeline parallel (GPipe, Huang et al. 2019): one rank's stage of a Llama-form model, and the runner
that streams a step's micro-batches through the stages.

Rank r holds a contiguous share of the layers (rank 0 also the embedding, the last rank the final norm
and the LM head) and KV cache for its layers only. A step's batch is split by request into micro-batches;
hidden states go stage to stage with non-blocking send/recv, so stage 0 computes micro-batch k + 1 while
stage 1 computes k. The last stage samples and broadcasts the sampler's output, so every rank appends
the same tokens and its scheduler stays in lock step.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ember.distributed.parallel.process_group import GroupCoordinator
from ember.distributed.parallel.tensor_parallel import LLAMA_FORM, part_range
from ember.engine.model_runner import ModelRunner, ModelRunnerOutput
from ember.engine.prompt_logprobs import PromptLogprobsChunk, compute_prompt_logprobs
from ember.kernels.linear.registry import KernelPolicy
from ember.models.config import ModelConfig
from ember.models.layers.linear import should_fuse_projections, use_dense_kernels
from ember.models.layers.rotary import RotaryEmbedding
from ember.models.llama import LlamaForCausalLM
from ember.loader.model_loader import fuse_projections
from ember.sampling.metadata import SamplingMetadata
from ember.scheduler.output import ScheduledRequest, SchedulerOutput

PIPELINE_ARCHITECTURES = LLAMA_FORM + ("mixtral", "qwen2_moe", "qwen3_moe")  # a stage runs whole layers
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def check_pipeline_parallel(config: ModelConfig, pipeline_parallel_size: int) -> None:
    """Raise ValueError when `config` cannot be cut into `pipeline_parallel_size` stages."""
    if config.architecture not in PIPELINE_ARCHITECTURES:
        raise ValueError(f"pipeline parallel runs the Llama-form models ({', '.join(PIPELINE_ARCHITECTURES)}), "
                         f"not {config.architecture!r}")
    if pipeline_parallel_size > config.num_hidden_layers:
        raise ValueError(f"pipeline_parallel_size {pipeline_parallel_size} exceeds the model's "
                         f"{config.num_hidden_layers} layers: each stage needs at least one")


def stage_state(state: dict[str, torch.Tensor], config: ModelConfig, layers: tuple[int, int], is_first: bool,
                is_last: bool) -> dict[str, torch.Tensor]:
    """The stage's tensors of a Hugging Face-named state dict, its layers renumbered from 0."""
    out = {}
    for name, tensor in state.items():
        match = _LAYER_NAME.match(name)
        if match:
            index = int(match.group(1))
            if layers[0] <= index < layers[1]:
                out[f"model.layers.{index - layers[0]}.{name[match.end():]}"] = tensor
        elif name == "model.embed_tokens.weight" and is_first:
            out[name] = tensor
        elif name == "model.norm.weight" and is_last:
            out[name] = tensor
    if is_last:  # a tied head reads the embedding's rows
        out["lm_head.weight"] = state["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    return out


class PipelineStageModel(nn.Module):
    """Layers [start, end) of the model: token ids in (first stage) or hidden states in, final normed
    hidden states out (last stage) or the residual stream for the next stage."""

    def __init__(self, model: LlamaForCausalLM, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.model = model  # the Llama skeleton without the modules other stages own
        self.is_first = is_first
        self.is_last = is_last

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta, precision=None) -> torch.Tensor:
        """x: token ids [T] on the first stage, else hidden states [T, hidden] -> [T, hidden]."""
        inner = self.model.model
        if self.is_first:
            x = inner.embed_tokens(x)
        rope = inner.rotary(positions, x.dtype)
        for layer, kv_cache in zip(inner.layers, kv_caches):
            x = layer(x, rope, kv_cache, meta, precision)
        return inner.norm(x) if self.is_last else x

    def compute_logits(self, hidden: torch.Tensor, precision=None) -> torch.Tensor:
        return self.model.compute_logits(hidden, precision)


def build_pipeline_stage(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                         policy: KernelPolicy | None, rank: int, world_size: int) -> tuple[nn.Module, ModelConfig]:
    """Build stage `rank` of `world_size` from the full checkpoint `state` (HF names).

    Returns:
        (stage model, the ModelConfig the rank's engine runs with: its layers only, so its KV cache
        holds those).
    """
    check_pipeline_parallel(config, world_size)
    start, end = part_range(config.num_hidden_layers, world_size, rank)
    is_first, is_last = rank == 0, rank == world_size - 1
    local = dataclasses.replace(config, num_hidden_layers=end - start, tie_word_embeddings=False,
                                moe_layers=tuple(i - start for i in config.moe_layers if start <= i < end))
    with torch.device("meta"):
        model = LlamaForCausalLM(local)
    if not is_first:  # dropped modules are never loaded
        model.model.embed_tokens = None
    if not is_last:
        model.model.norm = model.lm_head = None
    model.load_weights(stage_state(state, config, (start, end), is_first, is_last), dtype)
    model.eval()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()  # float32 tables, built after the meta device
    if should_fuse_projections(dtype):
        fuse_projections(model)
    use_dense_kernels(model, dtype, policy)
    engine_config = dataclasses.replace(config, num_hidden_layers=end - start, moe_layers=local.moe_layers)
    return PipelineStageModel(model, is_first, is_last), engine_config


def split_micro_batches(entries: list, num_micro_batches: int) -> list[list]:
    """Cut the step's entries (in row order) into at most `num_micro_batches` non-empty runs of whole
    requests with about equal token counts."""
    num = max(1, min(num_micro_batches, len(entries)))
    total = sum(e.num_new_tokens for e in entries)
    groups: list[list] = [[]]
    tokens = 0
    for i, entry in enumerate(entries):
        groups[-1].append(entry)
        tokens += entry.num_new_tokens
        groups_left, entries_left = num - len(groups), len(entries) - i - 1
        if groups_left and entries_left >= groups_left and (
                tokens * num >= total * len(groups) or entries_left == groups_left):
            groups.append([])
    return groups


@dataclasses.dataclass
class _MicroBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: object  # AttentionMetadata
    logits_rows: list[int]
    sampled: list[ScheduledRequest]


class PipelineModelRunner(ModelRunner):
    """A `ModelRunner` for one pipeline stage: the same inputs and outputs, the forward spread over ranks.

    Built with `adopt` from the runner an `LLMEngine` made for the stage's model (its KV caches are already
    sized for the stage's layers). Every rank returns the same sampled tokens (and logprobs) each step.
    """

    group: GroupCoordinator
    num_micro_batches: int

    @classmethod
    def adopt(cls, runner: ModelRunner, group: GroupCoordinator, num_micro_batches: int) -> "PipelineModelRunner":
        """Take over `runner`'s state (model, caches, sampler, hooks) without allocating anything again."""
        stage = cls.__new__(cls)
        stage.__dict__.update(runner.__dict__)
        stage.group = group
        stage.num_micro_batches = num_micro_batches
        return stage

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.keep_hidden or self.record_attention or self.lora is not None:
            raise RuntimeError("pipeline parallel runs no activation monitor, eviction scoring or LoRA")
        # The base runner's row order: decode-shaped entries first, then prefill chunks.
        entries = sorted(scheduler_output.scheduled, key=lambda s: s.num_new_tokens - len(s.spec_token_ids) > 1)
        batches = [_MicroBatch(*self._prepare_inputs(group))
                   for group in split_micro_batches(entries, self.num_micro_batches)]
        hidden = self._run_stage(batches)
        result = self._sample(entries, batches, hidden) if self.group.is_last else None
        sampler_output, chunks = self.group.broadcast_object(result, self.group.world_size - 1)
        requests = {e.request.request_id: e.request for e in entries}
        sampled = [e.request for batch in batches for e in batch.sampled]
        prompt_logprobs = [PromptLogprobsChunk(requests[request_id], *rest) for request_id, *rest in chunks] or None
        return ModelRunnerOutput(sampled, sampler_output, prompt_logprobs=prompt_logprobs)

    def _run_stage(self, batches: list[_MicroBatch]) -> torch.Tensor | None:
        """Run this stage on every micro-batch; the last stage returns the step's hidden states [T, hidden]."""
        group, hidden_size = self.group, self.model_config.hidden_size
        received = []
        if not group.is_first:  # every shape is known up front: post all receives at once
            for tag, batch in enumerate(batches):
                buffer = torch.empty(len(batch.input_ids), hidden_size, dtype=self.dtype)
                received.append((buffer, group.irecv(buffer, group.rank - 1, tag)))
        sends, outputs = [], []
        for tag, batch in enumerate(batches):
            if group.is_first:
                x = batch.input_ids
            else:
                x, work = received[tag]
                work.wait()
            x = self.model(x, batch.positions, self.kv_caches, batch.meta)
            if group.is_last:
                outputs.append(x)
            else:  # the next stage starts on it while this one computes the next micro-batch
                sends.append((x, group.isend(x, group.rank + 1, tag)))
        for _, work in sends:
            work.wait()
        return torch.cat(outputs) if group.is_last else None

    def _sample(self, entries: list[ScheduledRequest], batches: list[_MicroBatch], hidden: torch.Tensor):
        """Last stage: prompt logprobs and the sampler over the step's hidden states, as `ModelRunner.execute`
        does; returns what the other ranks need (request objects replaced by ids)."""
        chunks = compute_prompt_logprobs(self.model, hidden, entries) or []
        packed = [(c.request.request_id, c.start, c.token_ids, c.logprobs, c.ranks) for c in chunks]
        rows, offset = [], 0
        for batch in batches:
            rows.extend(offset + row for row in batch.logits_rows)
            offset += len(batch.input_ids)
        if not rows:
            return None, packed
        logits = self.model.compute_logits(hidden[rows])  # [num sampled, vocab]
        requests = [e.request for batch in batches for e in batch.sampled]
        return self.sampler(logits, SamplingMetadata.from_requests(requests, self.model_config.vocab_size)), packed
