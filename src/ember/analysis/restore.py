"""Leave-one-out sensitivity: quantize every decoder op, then restore one op at a time to float inside
that quantized model and measure how much calibration perplexity the op alone wins back.

Single-op costs (``dppl``) are measured in an otherwise float model and miss how the errors compound;
this measures each op where it will sit, among the quantized others. The decoder is quantized in order,
as ``quantize_model`` does: each layer's ops are quantized from the inputs the already quantized layers
produce. The hidden states entering each layer of the quantized model are kept, so restoring an op of
layer i reruns layers i..L-1 only. ``lm_head`` is tied to the embedding and stays float in the quantized
checkpoints, so it is not quantized here and has nothing to restore.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn

from ember.analysis.report import SensitivityReport
from ember.analysis.sensitivity import Quantizer, _observe, _Scorer, _tail, make_quantizer
from ember.quant.calibration import LayerInputs, collect_layer_inputs, find_decoder_layers, run_layer, swapped_weights
from ember.quant.plan import OP_LINEARS, OpRef


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """``gains``: per decoder op, the calibration perplexity drop when that op alone is restored to float
    in the fully quantized model, in % of the float model's perplexity (so the gains and ``quantized_dppl``
    share a unit); ``quantized_dppl``: every decoder op quantized, % over the float model."""

    gains: dict[OpRef, float]
    base_ppl: float
    quantized_ppl: float

    @property
    def quantized_dppl(self) -> float:
        return 100.0 * (self.quantized_ppl / self.base_ppl - 1.0)


@torch.no_grad()
def measure_restore_gains(model: nn.Module, batches: Sequence[torch.Tensor], quantize: Quantizer, *,
                          progress: bool = False) -> RestoreResult:
    """Each decoder op's leave-one-out gain (see the module docstring); ``model`` is left unchanged.

    Args:
        model: float Hugging Face Llama-style causal LM.
        batches: calibration token ids, each [batch, seq].
        quantize: the method's fake quantizer (``make_quantizer``).
        progress: a progress bar over the ops (stderr, terminal only).
    Returns:
        a ``RestoreResult`` with one gain per decoder op.
    """
    from ember.progress import progress as progress_bar

    model.eval()
    _, layers = find_decoder_layers(model)
    scorer = _Scorer(batches)
    inputs = collect_layer_inputs(model, batches)
    base_nll, _ = scorer.nll_and_kl(_tail(model, layers, 0, inputs))
    entering: list[LayerInputs] = []  # hidden states entering each layer of the quantized model
    linears: dict[OpRef, list[nn.Linear]] = {}
    originals: dict[OpRef, list[torch.Tensor]] = {}  # the float weights (swapping replaces .data, not its values)
    with contextlib.ExitStack() as quantized:
        for index, layer in enumerate(layers):
            entering.append(inputs)
            op_inputs, _, _ = _observe(layer, inputs)  # the layer still float, its inputs from quantized layers
            fakes = {}
            for op, names in OP_LINEARS.items():
                ref = OpRef(index, op)
                linears[ref] = [layer.get_submodule(n) for n in names]
                originals[ref] = [m.weight.data for m in linears[ref]]
                fakes[ref] = quantize(op, linears[ref], op_inputs[op], layer)
            for ref, weights in fakes.items():  # swapped in together: o_proj saw float q/k/v, as in quantize_model
                quantized.enter_context(swapped_weights(linears[ref], weights))
            inputs = LayerInputs(run_layer(layer, inputs), inputs.kwargs)
        quantized_nll, _ = scorer.nll_and_kl(_tail(model, layers, len(layers), inputs))
        nlls = _restore_each(model, layers, entering, linears, originals, scorer, progress_bar(
            total=len(linears), desc="restore", unit="op", enabled=progress))
    to_percent = lambda nll: 100.0 * math.exp(nll - base_nll)  # noqa: E731
    return RestoreResult({ref: to_percent(quantized_nll) - to_percent(nll) for ref, nll in nlls.items()},
                         math.exp(base_nll), math.exp(quantized_nll))


def _restore_each(model: nn.Module, layers: nn.ModuleList, entering: list[LayerInputs],
                  linears: dict[OpRef, list[nn.Linear]], originals: dict[OpRef, list[torch.Tensor]],
                  scorer: _Scorer, bar) -> dict[OpRef, float]:
    """Calibration NLL of the quantized model with each op in turn given back its float weights."""
    nlls = {}
    for ref, ms in linears.items():
        with swapped_weights(ms, originals[ref]):
            nlls[ref], _ = scorer.nll_and_kl(_tail(model, layers, ref.layer, entering[ref.layer]))
        bar.update()
    bar.close()
    return nlls


def with_restore_gains(report: SensitivityReport, model: nn.Module, batches: Sequence[torch.Tensor], *,
                       method_args: dict[str, Any] | None = None, progress: bool = False) -> SensitivityReport:
    """``report`` with each op's ``restore_gain`` measured under the report's method and scheme, and the
    fully quantized model's ``quantized_ppl``. ``lm_head`` gets 0 (it stays float, see above); ops of a
    report from before ``num_weights`` was recorded get it from ``model``."""
    measured = measure_restore_gains(model, batches, make_quantizer(report.method, report.scheme, method_args),
                                     progress=progress)
    size = lambda ref: sum(model.get_submodule(n).weight.numel() for n in ref.linear_names())  # noqa: E731
    ops = [dataclasses.replace(op, restore_gain=measured.gains.get(op.ref, 0.0),
                               num_weights=op.num_weights or size(op.ref)) for op in report.ops]
    return dataclasses.replace(report, ops=ops, quantized_ppl=measured.quantized_ppl)
