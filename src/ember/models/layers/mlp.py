"""The gated feed-forward block (Shazeer, 2020): SwiGLU, or GeGLU with the tanh GELU (Gemma)."""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels.ops import core_ops
from ember.models.layers.linear import fuse_linears
from ember.models.layers.precision import PrecisionMask, apply_linear

# Hugging Face activation name -> function applied to the gate
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        self.is_silu = activation == "silu"  # the fused native op is SiLU-mul
        self.act_fn = ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace gate/up by one [gate; up] projection: one matmul per step instead of two."""
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, precision: PrecisionMask | None = None) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = apply_linear(self.gate_up_proj, x, precision)
            ops = core_ops() if gate_up.dtype == torch.bfloat16 and self.is_silu else None
            if ops is not None:  # one fused op instead of chunk + silu + mul
                return apply_linear(self.down_proj, ops.silu_mul_bf16(gate_up), precision)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = apply_linear(self.gate_proj, x, precision), apply_linear(self.up_proj, x, precision)
        return apply_linear(self.down_proj, self.act_fn(gate) * up, precision)
