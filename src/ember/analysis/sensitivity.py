"""Per-op quantization sensitivity: quantize one op alone, measure what it does to the model's output.

For each decoder op (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) and ``lm_head`` the
analysis records the KL divergence of the next-token distributions and the calibration perplexity
change with that op alone fake-quantized, and three statistics that need no perturbed forward: the
dispersion of its input channels, the spectral energy of its weight and the skewness of its output.
The model runs once unquantized to record reference log-probabilities, then layer by layer: the
hidden states entering layer i are kept, so each perturbed forward runs layers i..L-1 only. With
``restore=True`` it also measures each op's leave-one-out gain (``ember.analysis.restore``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ember.analysis.report import OpSensitivity, SensitivityReport, Thresholds
from ember.analysis.statistics import dispersion, kl_divergence, skewness, spectral_energy
from ember.kernels.linear.spec import WeightScheme
from ember.quant.awq import awq_search_clip, awq_search_scales
from ember.quant.calibration import (LayerInputs, capture_activations, collect_layer_inputs, find_decoder_layers,
                                     run_layer, swapped_weights)
from ember.quant.gptq import HessianAccumulator, gptq_quantize
from ember.quant.plan import LM_HEAD, OP_LINEARS, OpRef
from ember.quant.rtn import fake_quantize

METHODS = ("rtn", "gptq", "awq")
# (op, its linears, their shared input [tokens, K], the decoder layer or None) -> fake-quantized weights
Quantizer = Callable[[str, list[nn.Linear], torch.Tensor, nn.Module | None], list[torch.Tensor]]


def make_quantizer(method: str, scheme: WeightScheme, method_args: dict[str, Any] | None = None) -> Quantizer:
    """The fake quantization each method applies to one op seen alone (float inputs, float neighbours).

    GPTQ uses the Hessian of the op's calibration input; AWQ searches the op's input scales (the MLP
    is the block for gate/up, as in ``quantize_model``) and clips all but q/k; ops AWQ cannot scale
    (``lm_head``, ``o_proj`` under grouped-query attention) fall back to RTN, as in the full method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    args = dict(method_args or {})

    def rtn(op: str, linears: list[nn.Linear], x: torch.Tensor, layer: nn.Module | None) -> list[torch.Tensor]:
        return [fake_quantize(lin.weight, scheme) for lin in linears]

    def gptq(op: str, linears: list[nn.Linear], x: torch.Tensor, layer: nn.Module | None) -> list[torch.Tensor]:
        hessians = HessianAccumulator()
        hessians(op, x)
        return [gptq_quantize(lin.weight, hessians.hessians[op], scheme, act_order=bool(args.get("act_order", True)),
                              percdamp=float(args.get("percdamp", 0.01)),
                              clip_search=bool(args.get("clip_search", False)) and scheme.bits == 4).dequantize()
                for lin in linears]

    def awq(op: str, linears: list[nn.Linear], x: torch.Tensor, layer: nn.Module | None) -> list[torch.Tensor]:
        scalable = op in ("qkv_proj", "gate_up_proj", "down_proj") or (
            op == "o_proj" and layer is not None and layer.self_attn.v_proj.out_features == x.shape[-1])
        sample = x[: int(args.get("max_tokens", 1024))]
        scales = torch.ones(x.shape[-1])
        if scalable:
            inspect = layer.mlp if op == "gate_up_proj" else None
            scales = awq_search_scales(sample, linears, scheme, n_grid=int(args.get("n_grid", 20)), inspect=inspect).scales
        out = []
        for lin in linears:
            scaled = lin.weight.detach().float() * scales
            if op != "qkv_proj":  # AWQ leaves q/k unclipped; v shares their scales and stays unclipped here
                limit = awq_search_clip(sample / scales, scaled, scheme).unsqueeze(-1)
                rows, cols = scaled.shape
                grouped = scaled.view(rows, limit.shape[1], -1)
                scaled = torch.maximum(torch.minimum(grouped, limit), -limit).view(rows, cols)
            out.append(fake_quantize(scaled, scheme) / scales)
        return out

    return {"rtn": rtn, "gptq": gptq, "awq": awq}[method]


def _head_logprobs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head, log-softmax: [batch, seq, hidden] -> float32 [batch * seq, vocab]."""
    logits = model.lm_head(model.model.norm(hidden)).float()
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)


class _Scorer:
    """Calibration NLL of a set of log-probabilities and their KL against the reference ones."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self.shapes = [tuple(b.shape) for b in batches]
        self.targets = [b[:, 1:].reshape(-1, 1) for b in batches]  # the next token of each position
        self.reference: list[torch.Tensor] = []

    def nll_and_kl(self, logprobs: list[torch.Tensor]) -> tuple[float, float]:
        """(mean NLL of the next tokens, mean KL(reference || these) over every position)."""
        nll, kl, num_scored = 0.0, 0.0, 0
        for index, lp in enumerate(logprobs):
            batch, seq = self.shapes[index]
            predicting = lp.view(batch, seq, -1)[:, :-1].reshape(-1, lp.shape[-1])  # the last has no target
            nll -= float(predicting.gather(1, self.targets[index]).double().sum())
            num_scored += predicting.shape[0]
            if self.reference:
                kl += float(kl_divergence(self.reference[index], lp).sum())
        num_rows = sum(r.shape[0] for r in self.reference) or 1
        return nll / num_scored, kl / num_rows


def _ppl_change(nll: float, base_nll: float) -> float:
    return 100.0 * (math.exp(nll - base_nll) - 1.0)


def _tail(model: nn.Module, layers: nn.ModuleList, start: int, inputs: LayerInputs) -> list[torch.Tensor]:
    """Log-probabilities after running layers start..L-1 on ``inputs`` (hidden states entering ``start``)."""
    hidden = inputs.hidden
    for layer in layers[start:]:
        hidden = run_layer(layer, LayerInputs(hidden, inputs.kwargs))
    return [_head_logprobs(model, h) for h in hidden]


def _observe(layer: nn.Module, inputs: LayerInputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list]:
    """Run one layer: each op's input [tokens, K] and output [tokens, N_total], and the layer's outputs."""
    names = [n for linears in OP_LINEARS.values() for n in linears]
    with capture_activations(layer, names, outputs=True) as capture:
        outs = run_layer(layer, inputs)
    flat = lambda xs: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])  # noqa: E731
    op_inputs = {op: flat(capture.inputs[linears[0]]) for op, linears in OP_LINEARS.items()}
    op_outputs = {op: torch.cat([flat(capture.outputs[n]) for n in linears], dim=-1) for op, linears in OP_LINEARS.items()}
    return op_inputs, op_outputs, outs


@torch.no_grad()
def analyze_sensitivity(model: nn.Module, batches: Sequence[torch.Tensor], scheme: WeightScheme, *,
                        method: str = "rtn", thresholds: Thresholds = Thresholds(),
                        method_args: dict[str, Any] | None = None, progress: bool = False,
                        info: dict[str, Any] | None = None, restore: bool = False) -> SensitivityReport:
    """Sensitivity of every op of a float Hugging Face Llama-style causal LM to ``scheme`` under ``method``.

    Args:
        model: float model with ``model.layers``, ``model.norm`` and ``lm_head`` (left unchanged).
        batches: calibration token ids, each [batch, seq].
        scheme: the target weight scheme (e.g. int4 symmetric, groups of 64).
        method: ``rtn``, ``gptq`` or ``awq`` (see ``make_quantizer``).
        thresholds: when an op is flagged ``bf16``.
        progress: show a progress bar over the ops (stderr, terminal only: ``ember.progress``).
        info: model name and calibration description recorded in the report.
        restore: also measure ``restore_gain`` (about as long again: every op restored in the quantized model).
    Returns:
        a ``SensitivityReport`` with one entry per op, layer by layer, ``lm_head`` last.
    """
    from ember.progress import progress as progress_bar

    model.eval()
    quantize = make_quantizer(method, scheme, method_args)
    _, layers = find_decoder_layers(model)
    scorer = _Scorer(batches)
    inputs = collect_layer_inputs(model, batches)
    head_inputs: list[torch.Tensor] = []
    with capture_activations(model, [LM_HEAD]) as capture:
        scorer.reference = _tail(model, layers, 0, inputs)
        head_inputs = [h.reshape(-1, h.shape[-1]) for h in capture.inputs[LM_HEAD]]
    base_nll, _ = scorer.nll_and_kl(scorer.reference)
    results = []
    bar = progress_bar(total=len(layers) * len(OP_LINEARS) + 1, desc="sensitivity", unit="op", enabled=progress)
    for index, layer in enumerate(layers):
        op_inputs, op_outputs, outs = _observe(layer, inputs)
        for op, names in OP_LINEARS.items():
            linears = [layer.get_submodule(n) for n in names]
            with swapped_weights(linears, quantize(op, linears, op_inputs[op], layer)):
                nll, kl = scorer.nll_and_kl(_tail(model, layers, index, inputs))
            weight = torch.cat([lin.weight for lin in linears])
            results.append(OpSensitivity(OpRef(index, op), kl, dispersion(op_inputs[op]), spectral_energy(weight),
                                         skewness(op_outputs[op]), _ppl_change(nll, base_nll),
                                         num_weights=weight.numel()).flagged(thresholds))
            bar.update()
        inputs = LayerInputs(outs, inputs.kwargs)
    results.append(_lm_head_sensitivity(model, quantize, head_inputs, scorer, base_nll, thresholds))
    bar.update()
    bar.close()
    report = SensitivityReport(method=method, scheme=scheme, thresholds=thresholds, ops=results,
                               base_ppl=math.exp(base_nll), info=dict(info or {}))
    if restore:
        from ember.analysis.restore import with_restore_gains

        report = with_restore_gains(report, model, batches, method_args=method_args, progress=progress)
    return report


def _lm_head_sensitivity(model: nn.Module, quantize: Quantizer, head_inputs: list[torch.Tensor], scorer: _Scorer,
                         base_nll: float, thresholds: Thresholds) -> OpSensitivity:
    """The LM head alone: its input is the final normed hidden state, its output the logits."""
    head = model.lm_head
    x = torch.cat(head_inputs)
    fake = quantize(LM_HEAD, [head], x, None)[0].to(head.weight.dtype)
    logprobs = [torch.log_softmax((h @ fake.T).float(), dim=-1) for h in head_inputs]
    nll, kl = scorer.nll_and_kl(logprobs)
    logits = torch.cat([h[:256] @ head.weight.T for h in head_inputs])  # a sample: vocab-wide outputs are large
    return OpSensitivity(OpRef(None, LM_HEAD), kl, dispersion(x), spectral_energy(head.weight), skewness(logits),
                         _ppl_change(nll, base_nll), num_weights=head.weight.numel()).flagged(thresholds)
