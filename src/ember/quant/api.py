"""Public entry point: quantize a Llama-style model in place with RTN, AWQ, GPTQ or SmoothQuant."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ember.kernels.linear.registry import KernelPolicy
from ember.kernels.linear.spec import QuantizedWeight, WeightScheme
from ember.progress import progress as progress_bar
from ember.quant.awq import apply_clip, awq_search_clip, awq_search_scales
from ember.quant.calibration import (ChannelStats, ForwardFn, LayerInputs, capture_activations,
                                     collect_layer_inputs, default_forward, find_decoder_layers, run_layer)
from ember.quant.config import QuantConfig
from ember.quant.gptq import HessianAccumulator, channel_saliency, gptq_quantize
from ember.quant.layout import fold_scales, scale_groups
from ember.quant.linear import QuantLinear
from ember.quant.plan import OP_LINEARS
from ember.quant.rotation import rotate_model, untie_embeddings
from ember.quant.rtn import quantize_weight
from ember.quant.smoothquant import smoothing_scales

# (decoder layer, its target linears, their inputs, each one's scheme) -> quantized weights
LayerFn = Callable[[nn.Module, dict[str, nn.Linear], LayerInputs, dict[str, WeightScheme]],
                   dict[str, QuantizedWeight]]


def target_linears(model: nn.Module, modules: Sequence[str]) -> dict[str, nn.Linear]:
    """``nn.Linear`` submodules whose name ends with one of ``modules`` (dotted suffixes or globs)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and any(
        name == s or name.endswith("." + s) or fnmatch.fnmatchcase(name, s) for s in modules)}


def _schemes(targets: dict[str, nn.Linear], config: QuantConfig, prefix: str = "") -> dict[str, WeightScheme]:
    """The scheme of each target that is quantized at all (``config.precisions`` may keep some in float)."""
    schemes = {name: config.scheme_for(prefix + name) for name in targets}
    return {name: scheme for name, scheme in schemes.items() if scheme is not None}


def _replace(model: nn.Module, weights: dict[str, QuantizedWeight], config: QuantConfig,
             policy: KernelPolicy | None) -> None:
    for name, weight in weights.items():
        linear = model.get_submodule(name)
        copy = linear.weight if name in config.fallback_modules else None  # as folded/rotated so far
        model.set_submodule(name, QuantLinear.from_quantized(weight, linear.bias, act_bits=config.act_bits_for(name),
                                                              policy=policy, fallback_weight=copy))


def quantize_model(model: nn.Module, config: QuantConfig | None = None, *,
                   calib_batches: Sequence[torch.Tensor] | None = None, forward: ForwardFn = default_forward,
                   policy: KernelPolicy | None = None, progress: bool = False, **config_kwargs: Any) -> list[str]:
    """Quantize the target linears of ``model`` in place, replacing them by ``QuantLinear``.

    Args:
        model: a Llama-style module tree with Hugging Face names (float weights).
        config: a ``QuantConfig``; or pass its fields as keyword arguments.
        calib_batches: token id tensors [batch, seq] for AWQ, GPTQ and SmoothQuant.
        forward: how to run the model on one batch (default: HF ``model(input_ids=..., use_cache=False)``).
        policy: kernel policy given to every ``QuantLinear``.
        progress: progress bars on stderr (per decoder layer for AWQ/GPTQ, per linear for RTN), shown
            only when stderr is a terminal (``ember.progress``).
    Returns:
        the full names of the replaced modules.
    Raises:
        ValueError: bad config, a group size that does not divide a layer's input size, or
            missing calibration data.
    """
    config = config or QuantConfig(**config_kwargs)
    if config.needs_calibration and not calib_batches:
        raise ValueError(f"method {config.method!r} needs calib_batches")
    model.eval()
    with torch.no_grad():
        if config.rotate:
            rotate_model(model, seed=int(config.method_args.get("rotation_seed", 0)))
        if config.method == "smoothquant":
            smooth_model(model, calib_batches, alpha=0.5 if config.alpha is None else config.alpha,
                         forward=forward, smooth_down=bool(config.method_args.get("smooth_down", True)),
                         progress=progress)
        if config.method in ("awq", "gptq"):
            layer_fn = _awq_layer_fn(config) if config.method == "awq" else _gptq_layer_fn(config)
            _quantize_layerwise(model, config, calib_batches, forward, layer_fn, policy, progress)
        if config.lm_head is not None:
            untie_embeddings(model)  # the embedding stays float; the head gets its own codes
        targets = target_linears(model, config.target_modules)  # whatever is still float: RTN
        schemes = _schemes(targets, config)
        bar = progress_bar(schemes.items(), desc="quantize rtn", unit="linear", enabled=progress and bool(schemes))
        _replace(model, {n: quantize_weight(targets[n].weight, s) for n, s in bar}, config, policy)
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


def _quantize_layerwise(model: nn.Module, config: QuantConfig, batches: Sequence[torch.Tensor],
                        forward: ForwardFn, layer_fn: LayerFn, policy: KernelPolicy | None, progress: bool) -> None:
    """Quantize decoder layers in order; each sees inputs produced by the already quantized layers."""
    prefix, layers = find_decoder_layers(model)
    inputs = collect_layer_inputs(model, batches, forward)
    bar = progress_bar(layers, desc=f"quantize {config.method}", unit="layer", enabled=progress)
    for index, layer in enumerate(bar):
        schemes = _schemes(target_linears(layer, config.modules), config, f"{prefix}.{index}.")
        targets = {name: layer.get_submodule(name) for name in schemes}
        if targets:
            weights = layer_fn(layer, targets, inputs, schemes)
            _replace(model, {f"{prefix}.{index}.{n}": w for n, w in weights.items()}, config, policy)
        inputs.hidden = run_layer(layer, inputs)


def _gptq_layer_fn(config: QuantConfig) -> LayerFn:
    args = config.method_args
    generator = torch.Generator().manual_seed(int(args.get("channel_seed", 0)))

    def layer_fn(layer: nn.Module, targets: dict[str, nn.Linear], inputs: LayerInputs,
                 schemes: dict[str, WeightScheme]) -> dict[str, QuantizedWeight]:
        hessians = HessianAccumulator()
        with capture_activations(layer, list(targets), reducer=hessians):
            run_layer(layer, inputs)
        kept = _kept_channels(targets, hessians.hessians, config.bf16_channels,
                              args.get("channel_order", "saliency"), generator, args.get("channel_split"))
        return {name: gptq_quantize(lin.weight, hessians.hessians[name], schemes[name],
                                    block_size=int(args.get("block_size", 128)),
                                    percdamp=float(args.get("percdamp", 0.01)),
                                    act_order=bool(args.get("act_order", True)), keep_channels=kept.get(name),
                                    clip_search=bool(args.get("clip_search", False)))
                for name, lin in targets.items()}
    return layer_fn


# linears of one module that read the same input (the engine fuses them): one choice of float channels, so the
# fused layer holds each kept channel once
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _kept_channels(targets: dict[str, nn.Linear], hessians: dict[str, torch.Tensor], fraction: float, order: str,
                   generator: torch.Generator, split: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The input channels each target keeps in float: the floor(fraction * K) most salient (or random) ones, one
    choice for each set of linears sharing an input (their saliencies added). With ``split`` ({op: weight}),
    a set of op o keeps floor(lambda * weight_o * fraction * K) instead, lambda = the targets' parameters over
    their weighted parameters, so the float share of all of them stays at most ``fraction``."""
    sets: dict[tuple[str, int], list[str]] = {}
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        shared = next((i for i, group in enumerate(SHARED_INPUTS) if leaf in group), None)
        sets.setdefault((parent, shared) if shared is not None else (name, -1), []).append(name)
    weights = {key: (split or {}).get(_split_op(names[0]), 1.0) for key, names in sets.items()}
    params = {key: sum(targets[n].weight.numel() for n in names) for key, names in sets.items()}
    scale = sum(params.values()) / sum(weights[key] * params[key] for key in sets)
    kept = {}
    for key, names in sets.items():
        cols = targets[names[0]].in_features
        count = min(int(scale * weights[key] * fraction * cols), cols)
        if not count:
            continue
        if order == "random":
            channels = torch.randperm(cols, generator=generator)[:count]
        else:
            saliency = channel_saliency([targets[n].weight for n in names], hessians[names[0]])
            channels = torch.topk(saliency, count).indices
        kept.update({n: channels.sort().values for n in names})
    return kept


# linear leaf name -> the op it is part of (q_proj -> qkv_proj, ...), as plan.OP_LINEARS groups them
_OP_OF_LEAF = {path.rpartition(".")[2]: op for op, paths in OP_LINEARS.items() for path in paths}


def _split_op(name: str) -> str:
    """The ``channel_split`` op a linear belongs to (its own leaf name outside the decoder ops)."""
    leaf = name.rpartition(".")[2]
    return _OP_OF_LEAF.get(leaf, leaf)


def _awq_layer_fn(config: QuantConfig) -> LayerFn:
    max_tokens = int(config.method_args.get("max_tokens", 1024))  # CPU budget: the grid runs the block 21 times
    n_grid = int(config.method_args.get("n_grid", 20))
    clip = bool(config.method_args.get("clip", True))

    def layer_fn(layer: nn.Module, targets: dict[str, nn.Linear], inputs: LayerInputs,
                 schemes: dict[str, WeightScheme]) -> dict[str, QuantizedWeight]:
        groups = [g for g in scale_groups(layer)
                  if all(n in targets for n in g.names) and len({schemes[n] for n in g.names}) == 1]
        with capture_activations(layer, list(targets)) as capture:
            run_layer(layer, inputs)
        sample = {name: torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])[:max_tokens]
                  for name, xs in capture.inputs.items()}
        for group in groups:
            # the whole MLP is the block for gate/up (AWQ inspects the module the scales affect)
            inspect = layer.mlp if group.names == ["mlp.gate_proj", "mlp.up_proj"] else None
            result = awq_search_scales(sample[group.input_key], group.linears, schemes[group.input_key],
                                       n_grid=n_grid, inspect=inspect)
            fold_scales(group, result.scales)
            for name in group.names:  # the linears now see x / s
                sample[name] = sample[name] / result.scales
        if clip:
            for name, lin in targets.items():
                if not name.endswith(("q_proj", "k_proj")):  # AWQ leaves q/k unclipped (attention logits)
                    apply_clip(lin.weight, awq_search_clip(sample[name], lin.weight, schemes[name], n_grid=n_grid))
        return {name: quantize_weight(lin.weight, schemes[name]) for name, lin in targets.items()}
    return layer_fn


def smooth_model(model: nn.Module, calib_batches: Sequence[torch.Tensor], *, alpha: float = 0.5,
                 forward: ForwardFn = default_forward, smooth_down: bool = True,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into the norms before q/k/v and gate/up, and into up_proj before down_proj.

    Smoothing down_proj matters for models with massive activations at its input (measured on
    SmolLM2-135M: perplexity delta 2.9% without, 1.5% with).

    Returns the scales per group, keyed by the first linear's full name. Float outputs are unchanged.
    ``progress``: a bar over the calibration batches (stderr, terminal only).
    """
    prefix, layers = find_decoder_layers(model)
    plan = []
    for index, layer in enumerate(layers):
        for group in scale_groups(layer):
            if not isinstance(group.prev, nn.Linear) or (smooth_down and group.names == ["mlp.down_proj"]):
                plan.append((f"{prefix}.{index}.{group.input_key}", group))
    stats = ChannelStats()
    with capture_activations(model, [name for name, _ in plan], reducer=stats):
        for batch in progress_bar(calib_batches, desc="smoothquant calibration", unit="batch", enabled=progress):
            forward(model, batch)
    applied = {}
    for name, group in plan:
        scales = smoothing_scales(stats.abs_max[name], group.linears, alpha)
        fold_scales(group, scales)
        applied[name] = scales
    return applied
