"""The interface every linear kernel implements, and the tensors it is handed."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ember.kernels.linear.spec import LinearSpec, QuantizedWeight

Operands = Any  # whatever a kernel's prepare() packs for its run()


@dataclasses.dataclass(frozen=True)
class LinearWeights:
    """The tensors of one linear: a float weight [N, K] (dense) or quantized codes and scales; the bias [N];
    input channels kept in float beside the codes (``QuantizedWeight``'s channel_index [C], channel_weight
    [N, C]), which only kernels that fuse them read."""

    weight: torch.Tensor | None = None
    quantized: QuantizedWeight | None = None
    bias: torch.Tensor | None = None
    channel_index: torch.Tensor | None = None
    channel_weight: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class LinearKernel:
    """One way to compute y = x W^T (+ b).

    Args:
        name: the registry key (what users disable or force).
        kinds: the layer kinds it computes (``spec.LinearSpec.kind``).
        check: (spec, dtype) -> None when it can run the layer here, else the reason it cannot
            (CPU features, native build, shapes, activation dtype).
        prepare: (spec, weights, dtype) -> operands, built once per layer and dtype.
        run: (x [M, K], spec, operands) -> y [M, N] in x's dtype.
        fuses_bias: whether run() adds the bias itself (else the caller adds it, in x's dtype).
        fuses_channels: whether run() computes the float input channels too (``LinearWeights``), so the caller
            does not add them.
        max_tokens: (spec) -> the most tokens per call this kernel is chosen for, or None for no limit.
            Each limit lives here, once: the native GEMVs' row limit, the measured crossovers.
        min_tokens: the fewest tokens per call it is chosen for (a measured crossover: below it a later
            kernel is faster); a forced kernel takes fewer.
        native: (spec, operands) -> (tensors, integer argument) that the core extension's decode loop
            (``DecodeLayers``) passes this kernel by its name; None: the loop cannot call it.
    """

    name: str
    kinds: frozenset[str]
    check: Callable[[LinearSpec, torch.dtype], str | None]
    prepare: Callable[[LinearSpec, LinearWeights, torch.dtype], Operands]
    run: Callable[[torch.Tensor, LinearSpec, Operands], torch.Tensor]
    fuses_bias: bool = False
    fuses_channels: bool = False
    max_tokens: Callable[[LinearSpec], int | None] = lambda spec: None
    min_tokens: int = 1
    native: Callable[[LinearSpec, Operands], tuple[list[torch.Tensor], int]] | None = None

    def why_not(self, spec: LinearSpec, dtype: torch.dtype) -> str | None:
        """None if this kernel can compute ``spec`` for ``dtype`` activations here, else why not."""
        if spec.kind not in self.kinds:
            return f"{self.name} computes {'/'.join(sorted(self.kinds))} layers, not {spec.kind}"
        return self.check(spec, dtype)

    def supports(self, spec: LinearSpec, dtype: torch.dtype) -> bool:
        return self.why_not(spec, dtype) is None

    def fits(self, spec: LinearSpec, num_tokens: int) -> bool:
        limit = self.max_tokens(spec)
        return limit is None or num_tokens <= limit


def always(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return None


def require(*conditions: tuple[bool, str]) -> str | None:
    """The reason of the first condition that fails, or None."""
    return next((reason for ok, reason in conditions if not ok), None)
