"""Where scales can be folded in a Llama-style decoder layer (Hugging Face module names)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class ScaleGroup:
    """Linears sharing one input, and the op producing that input, into which 1/s can be folded.

    ``prev`` is an RMSNorm (its ``weight`` scales channels) or a Linear (its output rows scale them).
    ``names`` are the linears' names relative to the decoder layer.
    """

    prev: nn.Module
    names: list[str]
    linears: list[nn.Linear]

    @property
    def input_key(self) -> str:
        return self.names[0]


def _get(layer: nn.Module, path: str) -> nn.Module | None:
    mod: nn.Module | None = layer
    for part in path.split("."):
        mod = getattr(mod, part, None)
    return mod


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """The four foldable groups of a decoder layer (AWQ Sec. 3.2, SmoothQuant Sec. 4).

    q/k/v after ``input_layernorm``; gate/up after ``post_attention_layernorm``; down_proj after
    up_proj (elementwise product with act(gate) keeps channel scaling exact); o_proj after v_proj
    only when every attention head has its own value head (no grouped-query sharing: shapes equal).
    """
    groups = []
    attn = [n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    mlp_in = ["mlp.gate_proj", "mlp.up_proj"]
    for prev_name, names in (("input_layernorm", attn), ("post_attention_layernorm", mlp_in),
                             ("self_attn.v_proj", ["self_attn.o_proj"]), ("mlp.up_proj", ["mlp.down_proj"])):
        prev = _get(layer, prev_name)
        linears = [_get(layer, n) for n in names]
        if prev is None or any(not isinstance(m, nn.Linear) for m in linears):
            continue
        if isinstance(prev, nn.Linear) and prev.out_features != linears[0].in_features:
            continue
        groups.append(ScaleGroup(prev, names, linears))
    return groups


@torch.no_grad()
def fold_scales(group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the linears' input channels by ``scales`` [in] and divide the previous op by it.

    Float outputs are unchanged: prev(x) / s feeds W * s, and (x / s) (W s)^T = x W^T.
    """
    for lin in group.linears:
        lin.weight.mul_(scales.to(lin.weight.dtype).view(1, -1))
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(scales.to(prev.weight.dtype).view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(scales.to(prev.bias.dtype))
    else:
        prev.weight.div_(scales.to(prev.weight.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(scales.to(bias.dtype))
