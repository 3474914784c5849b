"""Tensor parallel (Megatron-LM, Shoeybi et al. 2019): one rank's shard of a Llama-form model.

Each rank holds whole KV heads with their query heads (column-parallel q/k/v), the matching columns of
o_proj (row-parallel), a slice of the MLP's intermediate columns (gate/up column-parallel, down_proj
row-parallel) and a slice of the vocabulary (embedding rows, LM-head rows). A transformer block costs two
all-reduces (after o_proj, after down_proj); the embedding one more, and the LM head all-gathers its
logits so every rank samples from the full vocabulary. Splits need not be even: SmolLM2-135M's 3 KV heads
go 2 + 1 over two ranks.

The checkpoint is sharded as a state dict (Hugging Face names) before the model is built, so each rank
builds, fuses and prepares kernels only for its own shard.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel.process_group import GroupCoordinator
from ember.kernels.linear.registry import KernelPolicy
from ember.loader.model_loader import build_model
from ember.models.config import ModelConfig

LLAMA_FORM = ("llama", "qwen2", "qwen3")  # dense architectures of models/llama.py


def split_sizes(total: int, num_parts: int) -> list[int]:
    """`total` items over `num_parts` as evenly as possible, larger parts first: (3, 2) -> [2, 1]."""
    base, extra = divmod(total, num_parts)
    return [base + (i < extra) for i in range(num_parts)]


def part_range(total: int, num_parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` of `split_sizes(total, num_parts)`."""
    sizes = split_sizes(total, num_parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


def check_tensor_parallel(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raise ValueError when `config` cannot be split over `tensor_parallel_size` ranks."""
    if config.moe_layers:
        raise ValueError("tensor parallel does not split mixture-of-experts layers yet")
    if config.architecture not in LLAMA_FORM:
        raise ValueError(f"tensor parallel runs the dense Llama-form models ({', '.join(LLAMA_FORM)}), "
                         f"not {config.architecture!r}")
    if tensor_parallel_size > config.num_key_value_heads:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} exceeds the model's "
                         f"{config.num_key_value_heads} KV heads: each rank needs at least one")


@dataclasses.dataclass(frozen=True)
class TensorParallelShard:
    """What rank `rank` of `world_size` holds of a model: head, column and vocabulary ranges."""

    config: ModelConfig  # the full model's
    rank: int
    world_size: int

    @property
    def kv_heads(self) -> tuple[int, int]:
        return part_range(self.config.num_key_value_heads, self.world_size, self.rank)

    @property
    def q_heads(self) -> tuple[int, int]:
        group = self.config.num_attention_heads // self.config.num_key_value_heads  # queries per KV head
        start, end = self.kv_heads
        return start * group, end * group

    @property
    def intermediate(self) -> tuple[int, int]:
        return part_range(self.config.intermediate_size, self.world_size, self.rank)

    @property
    def vocab(self) -> tuple[int, int]:
        return part_range(self.config.vocab_size, self.world_size, self.rank)

    def engine_config(self) -> ModelConfig:
        """The config the rank's engine sees: local heads (its KV cache holds only these), full vocabulary."""
        (q0, q1), (k0, k1), (i0, i1) = self.q_heads, self.kv_heads, self.intermediate
        return dataclasses.replace(self.config, num_attention_heads=q1 - q0, num_key_value_heads=k1 - k0,
                                   intermediate_size=i1 - i0)

    def model_config(self) -> ModelConfig:
        """The config the shard's modules are built with: also the local vocabulary."""
        v0, v1 = self.vocab
        return dataclasses.replace(self.engine_config(), vocab_size=v1 - v0)

    def shard_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of a Hugging Face-named state dict; norms and anything unknown are replicated."""
        head_dim = self.config.head_dim
        rows = {"q_proj": self.q_heads, "k_proj": self.kv_heads, "v_proj": self.kv_heads}
        out = {}
        for name, tensor in state.items():
            module, _, kind = name.rpartition(".")
            leaf = module.rpartition(".")[2]
            if leaf in rows:  # column-parallel: output rows of whole heads
                start, end = rows[leaf]
                out[name] = tensor[start * head_dim:end * head_dim]
            elif leaf in ("gate_proj", "up_proj"):
                out[name] = tensor[slice(*self.intermediate)]
            elif leaf == "o_proj" and kind == "weight":  # row-parallel: input columns
                q0, q1 = self.q_heads
                out[name] = tensor[:, q0 * head_dim:q1 * head_dim]
            elif leaf == "down_proj":
                out[name] = tensor[:, slice(*self.intermediate)]
            elif leaf == "o_proj":  # the bias is added once, after the all-reduce sums the partial outputs
                out[name] = tensor if self.rank == 0 else torch.zeros_like(tensor)
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = tensor[slice(*self.vocab)]
            else:
                out[name] = tensor
        return {name: t.contiguous() for name, t in out.items()}


class RowParallelLinear(nn.Module):
    """A linear over this rank's input columns whose partial outputs are summed over the ranks."""

    def __init__(self, linear: nn.Module, group: GroupCoordinator) -> None:
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + rows) of the embedding: ids outside embed to zeros, then the
    all-reduce gives every rank the full lookup (exactly one rank contributes each row)."""

    def __init__(self, embedding: nn.Embedding, vocab_start: int, group: GroupCoordinator) -> None:
        super().__init__()
        self.embedding = embedding
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start  # [T]
        inside = (local >= 0) & (local < self.embedding.num_embeddings)
        x = self.embedding(torch.where(inside, local, 0))  # [T, hidden]
        return self.group.all_reduce(x.masked_fill_(~inside[:, None], 0))


class VocabParallelLMHead(nn.Module):
    """The LM head over this rank's vocabulary rows; logits of every rank are all-gathered (each padded
    to the largest slice, as gloo gathers equal shapes) so every rank holds [N, vocab] and samples alike."""

    def __init__(self, head: nn.Module, vocab_sizes: list[int], group: GroupCoordinator) -> None:
        super().__init__()
        self.head = head
        self.vocab_sizes = vocab_sizes  # every rank's slice, in rank order
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.head(hidden)  # [N, local vocab]
        padded = F.pad(local, (0, max(self.vocab_sizes) - local.shape[-1]))
        parts = self.group.all_gather(padded)
        return torch.cat([part[:, :size] for part, size in zip(parts, self.vocab_sizes)], dim=-1)


def build_tensor_parallel_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                                policy: KernelPolicy | None, group: GroupCoordinator) -> tuple[nn.Module, ModelConfig]:
    """Build this rank's shard of the model in `state` (the full checkpoint, HF names).

    Returns:
        (model, the ModelConfig the rank's engine runs with: local head counts, full vocabulary).
    Raises:
        ValueError: see `check_tensor_parallel`.
    """
    check_tensor_parallel(config, group.world_size)
    shard = TensorParallelShard(config, group.rank, group.world_size)
    model = build_model(shard.model_config(), shard.shard_state(state), dtype, policy)
    for layer in model.model.layers:
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, group)
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, shard.vocab[0], group)
    model.lm_head = VocabParallelLMHead(model.lm_head, split_sizes(config.vocab_size, group.world_size), group)
    return model, shard.engine_config()
