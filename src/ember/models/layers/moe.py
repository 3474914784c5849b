"""The sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE): a top-k softmax
router, SwiGLU experts run on grouped token batches, and Qwen2-MoE's shared expert behind a sigmoid gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.layers.mlp import GatedMLP
from ember.models.layers.precision import PrecisionMask, apply_linear


class RoutedExperts(nn.Module):
    """`num_experts` SwiGLU MLPs stored stacked (the layout of `transformers`' expert modules).

    Each expert runs once per step on the tokens routed to it, gathered into one matmul, so the cost
    grows with the number of experts hit, not with the number of tokens.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # [E, 2I, H]: each expert's gate rows then its up rows; [E, H, I]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], expert_ids and routing weights [T, k] -> the weighted sum of each token's experts [T, H]."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)  # [T * k], assignment a belongs to token a // top_k
        order = flat_ids.argsort(stable=True)  # assignments grouped by expert, tokens ascending
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        flat_weights = weights.reshape(-1)
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            assignments = order[start:start + count]
            start += count
            tokens = assignments // top_k
            gate, up = F.linear(x[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])  # [count, H]
            out.index_add_(0, tokens, (y * flat_weights[assignments, None]).to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """Router -> top-k experts (probabilities renormalised over the k when `norm_topk_prob`), plus an
    optional shared expert whose output is scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE)."""

    def __init__(self, hidden_size: int, num_experts: int, num_experts_per_tok: int, intermediate_size: int,
                 norm_topk_prob: bool, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        self.top_k = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = RoutedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_intermediate_size else None

    def forward(self, x: torch.Tensor, precision: PrecisionMask | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]. The router's softmax runs in float32, as in the reference."""
        router_logits = apply_linear(self.gate, x, precision)  # [T, E]
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, expert_ids, weights.to(x.dtype))
        if self.shared_expert is not None:
            shared_gate = torch.sigmoid(apply_linear(self.shared_expert_gate, x, precision))
            out = out + shared_gate * self.shared_expert(x, precision)
        return out
