"""QuaRot-style rotation: fold RMSNorm weights into linears, rotate the residual stream by a Hadamard."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ember.quant.calibration import find_decoder_layers
from ember.quant.hadamard import random_hadamard

_INPUT_SIDE = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_OUTPUT_SIDE = ("self_attn.o_proj", "mlp.down_proj")


def _get(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
    return root


def _backbone(model: nn.Module) -> nn.Module:
    prefix, _ = find_decoder_layers(model)
    return model.model if prefix == "model.layers" else model


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix if the two share storage; returns whether it did."""
    head, embed = getattr(model, "lm_head", None), _backbone(model).embed_tokens
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return True


@torch.no_grad()
def _scale_inputs(linear: nn.Linear, gain: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.double() * gain.view(1, -1)).to(linear.weight.dtype))


@torch.no_grad()
def fold_norm_weights(model: nn.Module) -> None:
    """Move every RMSNorm gain into the linears it feeds and set the gain to 1 (exact in float).

    RMSNorm(x) * g feeds W: (RMSNorm(x) * g) W^T = RMSNorm(x) (W diag(g))^T. With unit gains the
    norm commutes with any orthogonal Q: RMSNorm(x Q) = RMSNorm(x) Q since ||x Q|| = ||x||.
    """
    backbone = _backbone(model)
    for layer in find_decoder_layers(model)[1]:
        for norm_name, linears in _INPUT_SIDE.items():
            norm = _get(layer, norm_name)
            for name in linears:
                _scale_inputs(_get(layer, name), norm.weight.double())
            norm.weight.fill_(1.0)
    head = getattr(model, "lm_head", None)
    if head is not None:
        _scale_inputs(head, backbone.norm.weight.double())
    backbone.norm.weight.fill_(1.0)


@torch.no_grad()
def _rotate(weight: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> None:
    w = weight.double()
    w = left @ w if left is not None else w
    w = w @ right if right is not None else w
    weight.copy_(w.to(weight.dtype))


@torch.no_grad()
def _rotate_value_heads(layer: nn.Module, seed: int) -> None:
    """Per-head Hadamard on attention values: v_proj output side, o_proj input side (QuaRot Sec. 4)."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    rot = random_hadamard(head_dim, seed)  # [head_dim, head_dim]
    v_w = attn.v_proj.weight
    v_rot = rot.T @ v_w.double().view(-1, head_dim, v_w.shape[1])  # [num_kv_heads, head_dim, hidden]
    v_w.copy_(v_rot.reshape(v_w.shape).to(v_w.dtype))
    if attn.v_proj.bias is not None:
        bias = attn.v_proj.bias
        bias.copy_((bias.double().view(-1, head_dim) @ rot).reshape(-1).to(bias.dtype))
    o_w = attn.o_proj.weight
    o_rot = o_w.double().view(o_w.shape[0], -1, head_dim) @ rot  # [hidden, num_heads, head_dim]
    o_w.copy_(o_rot.reshape(o_w.shape).to(o_w.dtype))


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, rotate_values: bool = True) -> torch.Tensor:
    """Fold norms and rotate the residual stream by Q = diag(+-1) H / sqrt(hidden) in place.

    Embedding E -> E Q; q/k/v/gate/up/lm_head W -> W Q (input side); o_proj/down_proj W -> Q^T W,
    bias -> b Q (output side). With ``rotate_values`` each value head is also rotated by a
    head_dim Hadamard folded into v_proj/o_proj. Float outputs are unchanged; the rotated weights
    and activations have spread-out outliers, which makes them easier to quantize.
    Tied embeddings are untied first. Returns Q (float64 [hidden, hidden]).
    """
    untie_embeddings(model)
    fold_norm_weights(model)
    backbone = _backbone(model)
    hidden = backbone.embed_tokens.weight.shape[1]
    rot = random_hadamard(hidden, seed)
    _rotate(backbone.embed_tokens.weight, None, rot)
    for index, layer in enumerate(find_decoder_layers(model)[1]):
        for names in _INPUT_SIDE.values():
            for name in names:
                _rotate(_get(layer, name).weight, None, rot)
        for name in _OUTPUT_SIDE:
            linear = _get(layer, name)
            _rotate(linear.weight, rot.T, None)
            if linear.bias is not None:
                linear.bias.copy_((linear.bias.double() @ rot).to(linear.bias.dtype))
        if rotate_values:
            _rotate_value_heads(layer, seed + 1 + index)
    head = getattr(model, "lm_head", None)
    if head is not None:
        _rotate(head.weight, None, rot)
    return rot
