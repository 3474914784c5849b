"""Stack a checkpoint's per-expert MoE weights into the [num_experts, ...] tensors the model holds."""

from __future__ import annotations

import re

import torch

# one expert's linear in the two on-disk conventions: Mixtral's w1/w3/w2, Qwen-MoE's gate/up/down_proj
_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
                     r"\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def stack_expert_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `state` with each MoE block's experts stacked under the model's names.

    `<block>.experts.<e>.{gate,up,down}` (or Mixtral's w1/w3/w2) become `<block>.experts.gate_up_proj`
    [E, 2I, H] (gate rows, then up rows) and `<block>.experts.down_proj` [E, H, I]; Mixtral's
    `block_sparse_moe` is renamed `mlp`. A state without per-expert names is returned unchanged.

    Raises:
        ValueError: an expert lacks one of its three weights, or expert indices have gaps.
    """
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        match = _EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        roles = experts.setdefault(match["block"], {}).setdefault(int(match["expert"]), {})
        roles[_ROLE[match["proj"]]] = tensor
    for block, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{block}: expert indices {sorted(by_expert)} are not 0..{len(by_expert) - 1}")
        incomplete = [e for e, roles in by_expert.items() if set(roles) != {"gate", "up", "down"}]
        if incomplete:
            raise ValueError(f"{block}: experts {incomplete} lack a gate, up or down weight")
        ordered = [by_expert[e] for e in range(len(by_expert))]
        out[f"{block}.experts.gate_up_proj"] = torch.stack([torch.cat([r["gate"], r["up"]]) for r in ordered])
        out[f"{block}.experts.down_proj"] = torch.stack([r["down"] for r in ordered])
    return out
