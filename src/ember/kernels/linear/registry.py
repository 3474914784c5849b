"""Every linear kernel in one registry, and the policy that picks one per layer and call size.

The candidates of each layer kind sit in one list in priority order; the first that is enabled, can run
the layer here (``LinearKernel.why_not``) and takes the call's token count wins, the kind's reference at
worst. A user can disable kernels by name or force one per kind; a forced kernel that cannot run raises.
"""

from __future__ import annotations

import dataclasses

import torch

from ember.kernels.linear.base import LinearKernel
from ember.kernels.linear.dense import DENSE_KERNELS, DENSE_REFERENCE
from ember.kernels.linear.reference import REFERENCE
from ember.kernels.linear.spec import DENSE, W4A8, W8A8, WEIGHT_ONLY, LinearSpec
from ember.kernels.linear.w4a8 import W4A8_VNNI
from ember.kernels.linear.w8a8 import W8A8_KERNELS
from ember.kernels.linear.weight_only import (INT4_DPBF16, INT4_WEIGHT_ONLY, INT8_DPBF16, INT8_WEIGHT_ONLY,
                                               WEIGHT_ONLY_KERNELS, WOQ_AMX)

KERNEL_REGISTRY: dict[str, LinearKernel] = {
    kernel.name: kernel for kernel in (*DENSE_KERNELS, REFERENCE, *WEIGHT_ONLY_KERNELS, *W8A8_KERNELS, W4A8_VNNI)}
REFERENCES = {DENSE: DENSE_REFERENCE, WEIGHT_ONLY: REFERENCE, W8A8: REFERENCE, W4A8: REFERENCE}
# the weight-only kernels on torch's packed layouts: only for ``packed_dtypes``, and few tokens beside BATCHED
PACKED = (INT4_WEIGHT_ONLY.name, INT8_WEIGHT_ONLY.name)
# the native weight-only kernels for batched calls (docs/performance.md, "Kernel limits")
BATCHED = (WOQ_AMX.name, INT8_DPBF16.name, INT4_DPBF16.name)


class KernelUnavailableError(RuntimeError):
    """A forced kernel cannot compute a layer here (CPU, native build, shape, dtype or call size)."""


def parse_kernel_names(text: str | None) -> tuple[str, ...]:
    """"a,b" -> ("a", "b"); raises ValueError naming the unknown ones."""
    names = tuple(name.strip() for name in (text or "").split(",") if name.strip())
    unknown = sorted(set(names) - set(KERNEL_REGISTRY))
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; known: {sorted(KERNEL_REGISTRY)}")
    return names


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Which kernel a linear uses for a call, by layer kind, activation dtype and token count.

    Args:
        disabled: kernel names never chosen (the references cannot be disabled).
        forced: kernel names, at most one per layer kind; every call of a layer of that kind takes it,
            and raises ``KernelUnavailableError`` if it cannot.
        dense_order / weight_only_order / w8a8_order / w4a8_order: candidates in priority order.
        packed_dtypes: activation dtypes for which torch's packed int4/int8 kernels are candidates
            (with float32 activations the int4 kernel is far slower than dequantize-then-matmul).
        max_packed_tokens: where a batched weight-only kernel (``BATCHED``: AMX tiles, or ``vdpbf16ps`` on
            panels without AMX) can run a layer, the packed kernels keep only calls up to this many tokens.
    Raises:
        ValueError: unknown names, a disabled reference, two forced kernels for one kind, a negative limit.
    """

    disabled: frozenset[str] = frozenset()
    forced: tuple[str, ...] = ()
    dense_order: tuple[str, ...] = tuple(kernel.name for kernel in DENSE_KERNELS)
    weight_only_order: tuple[str, ...] = tuple(kernel.name for kernel in WEIGHT_ONLY_KERNELS)
    w8a8_order: tuple[str, ...] = tuple(kernel.name for kernel in W8A8_KERNELS)
    w4a8_order: tuple[str, ...] = (W4A8_VNNI.name,)
    packed_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    max_packed_tokens: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        object.__setattr__(self, "forced", tuple(self.forced))
        names = set(self.disabled) | set(self.forced) | set(self.dense_order + self.weight_only_order
                                                               + self.w8a8_order + self.w4a8_order)
        unknown = sorted(names - set(KERNEL_REGISTRY))
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; known: {sorted(KERNEL_REGISTRY)}")
        references = sorted(self.disabled & {kernel.name for kernel in REFERENCES.values()})
        if references:
            raise ValueError(f"the reference kernels cannot be disabled: {references}")
        for kind in REFERENCES:
            claiming = [name for name in self.forced if kind in KERNEL_REGISTRY[name].kinds]
            if len(claiming) > 1:
                raise ValueError(f"forced kernels {claiming} both claim {kind} layers; force one per kind")
        if self.max_packed_tokens < 0:
            raise ValueError("max_packed_tokens must be >= 0")

    def forced_for(self, spec: LinearSpec) -> LinearKernel | None:
        return next((KERNEL_REGISTRY[name] for name in self.forced if spec.kind in KERNEL_REGISTRY[name].kinds), None)

    def check_forced(self, spec: LinearSpec, dtype: torch.dtype) -> None:
        """Raise ``KernelUnavailableError`` now if this layer's forced kernel cannot run it (at load)."""
        kernel = self.forced_for(spec)
        reason = None if kernel is None else kernel.why_not(spec, dtype)
        if reason is not None:
            raise KernelUnavailableError(f"kernel {kernel.name} was forced but cannot run {_describe(spec)}: {reason}")

    def select(self, spec: LinearSpec, num_tokens: int, dtype: torch.dtype) -> LinearKernel:
        """The kernel for one call of ``num_tokens`` tokens; a forced one or the first usable candidate."""
        forced = self.forced_for(spec)
        if forced is not None:
            self.check_forced(spec, dtype)
            if not forced.fits(spec, num_tokens):
                raise KernelUnavailableError(f"kernel {forced.name} was forced but takes at most "
                                             f"{forced.max_tokens(spec)} tokens, not {num_tokens}")
            return forced
        if spec.kind == WEIGHT_ONLY:
            return self._select_weight_only(spec, num_tokens, dtype)
        return next((kernel for kernel in self.candidates(spec.kind)
                     if self._usable(kernel, spec, num_tokens, dtype)), REFERENCES[spec.kind])

    def candidates(self, kind: str) -> list[LinearKernel]:
        """The enabled kernels of one layer kind, in priority order."""
        order = {DENSE: self.dense_order, WEIGHT_ONLY: self.weight_only_order, W8A8: self.w8a8_order,
                 W4A8: self.w4a8_order}[kind]
        return [KERNEL_REGISTRY[name] for name in order if name not in self.disabled]

    def _select_weight_only(self, spec: LinearSpec, num_tokens: int, dtype: torch.dtype) -> LinearKernel:
        kernels = self.candidates(WEIGHT_ONLY)
        beside_batched = any(kernel.name in BATCHED and kernel.supports(spec, dtype) for kernel in kernels)
        for kernel in kernels:
            if kernel.name in PACKED and (dtype not in self.packed_dtypes
                                          or (beside_batched and num_tokens > self.max_packed_tokens)):
                continue
            if self._usable(kernel, spec, num_tokens, dtype):
                return kernel
        return REFERENCE

    @staticmethod
    def _usable(kernel: LinearKernel, spec: LinearSpec, num_tokens: int, dtype: torch.dtype) -> bool:
        return kernel.supports(spec, dtype) and kernel.fits(spec, num_tokens) and num_tokens >= kernel.min_tokens


def _describe(spec: LinearSpec) -> str:
    return f"a {spec.kind} layer {spec.in_features} -> {spec.out_features}"
