"""Calibration through forward hooks: capture module inputs/outputs by name pattern, layer-wise replay."""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

# Called as reducer(module_name, tensor) instead of storing the tensor.
Reducer = Callable[[str, torch.Tensor], None]
ForwardFn = Callable[[nn.Module, torch.Tensor], Any]


def default_forward(model: nn.Module, input_ids: torch.Tensor) -> Any:
    """Run a Hugging Face style causal LM without a KV cache (replayed layers must not append to one)."""
    return model(input_ids=input_ids, use_cache=False)


def match_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Modules whose full name matches any glob in ``patterns`` (``fnmatch``, e.g. ``*.mlp.down_proj``)."""
    return {name: mod for name, mod in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot capture a {type(value).__name__}")


@dataclasses.dataclass
class ActivationCapture:
    """Captured tensors per module name: ``inputs[name]`` (first positional input) and ``outputs[name]``."""

    inputs: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def capture_activations(model: nn.Module, patterns: Sequence[str], *, inputs: bool = True,
                        outputs: bool = False, reducer: Reducer | None = None,
                        output_reducer: Reducer | None = None) -> Iterator[ActivationCapture]:
    """Capture inputs and/or outputs of the modules matching ``patterns`` while the block runs.

    Args:
        model: any module tree; names are those of ``model.named_modules()``.
        patterns: glob patterns on full module names.
        inputs / outputs: which side to capture.
        reducer / output_reducer: if given, called with (name, detached tensor) instead of storing,
            e.g. to keep running statistics without holding every batch in memory.
    Yields:
        an ``ActivationCapture`` filled as forwards run.
    Raises:
        ValueError: if no module matches. Hooks are removed on exit, even on exception.
    """
    modules = match_modules(model, patterns)
    if not modules:
        raise ValueError(f"no module matches {list(patterns)}")
    capture = ActivationCapture()
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple, result: Any) -> None:
            if inputs:
                _store(capture.inputs, reducer, name, _first_tensor(args))
            if outputs:
                _store(capture.outputs, output_reducer, name, _first_tensor(result))
        return hook

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(make_hook(name)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def _store(bucket: dict, reducer: Reducer | None, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    if reducer is not None:
        reducer(name, tensor)
    else:
        bucket.setdefault(name, []).append(tensor)


class ChannelStats:
    """Running per-input-channel statistics of captured activations (a ``Reducer``).

    ``abs_max[name]`` and ``abs_mean[name]`` are float32 [channels]; ``num_tokens[name]`` counts rows.
    """

    def __init__(self) -> None:
        self.abs_max: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.num_tokens: dict[str, int] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        flat = tensor.reshape(-1, tensor.shape[-1]).abs().float()  # [tokens, channels]
        peak, total = flat.amax(dim=0), flat.sum(dim=0)
        if name in self.abs_max:
            self.abs_max[name] = torch.maximum(self.abs_max[name], peak)
            self.abs_sum[name] += total
            self.num_tokens[name] += flat.shape[0]
        else:
            self.abs_max[name], self.abs_sum[name], self.num_tokens[name] = peak, total, flat.shape[0]

    def abs_mean(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.num_tokens[name]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: ``model.layers`` (causal LM wrapper) or ``layers`` (bare backbone)."""
    for prefix in ("model.layers", "layers"):
        mod: Any = model
        for part in prefix.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList):
            return prefix, mod
    raise ValueError("model has no decoder stack at model.layers or layers")


@contextlib.contextmanager
def swapped_weights(linears: Sequence[nn.Module], weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily give ``linears`` the ``weights`` (cast to their dtype; restored on exit, even on error)."""
    saved = [lin.weight.data for lin in linears]
    try:
        for lin, weight in zip(linears, weights):
            lin.weight.data = weight.to(lin.weight.dtype)
        yield
    finally:
        for lin, weight in zip(linears, saved):
            lin.weight.data = weight


class _StopForward(Exception):
    """Raised by the layer-0 catcher so calibration does not run the whole model."""


@dataclasses.dataclass
class LayerInputs:
    """Per calibration batch: the hidden states entering a decoder layer and its keyword arguments."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


def collect_layer_inputs(model: nn.Module, batches: Sequence[torch.Tensor],
                         forward: ForwardFn = default_forward) -> LayerInputs:
    """Run each batch up to the first decoder layer and record what it receives (positions, masks...)."""
    _, layers = find_decoder_layers(model)
    record = LayerInputs([], [])

    def catcher(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        record.hidden.append(hidden.detach())
        record.kwargs.append(dict(kwargs, **({} if not args[1:] else {"_args": args[1:]})))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    forward(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return record


def run_layer(layer: nn.Module, layer_inputs: LayerInputs) -> list[torch.Tensor]:
    """Replay one decoder layer on recorded inputs; returns its output hidden states per batch."""
    outs = []
    with torch.no_grad():
        for hidden, kwargs in zip(layer_inputs.hidden, layer_inputs.kwargs):
            kwargs = dict(kwargs)
            extra = kwargs.pop("_args", ())
            outs.append(_first_tensor(layer(hidden, *extra, **kwargs)))
    return outs


def sample_calibration_batches(token_ids: torch.Tensor, num_samples: int, seq_len: int,
                               seed: int = 0) -> list[torch.Tensor]:
    """Random windows of a token stream as calibration batches, each [1, seq_len] (fixed seed).

    Raises:
        ValueError: if the stream is shorter than one window or the counts are not positive.
    """
    token_ids = token_ids.reshape(-1)
    if num_samples <= 0 or seq_len <= 0:
        raise ValueError("num_samples and seq_len must be positive")
    if token_ids.numel() < seq_len:
        raise ValueError(f"need at least {seq_len} tokens, got {token_ids.numel()}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len + 1, (num_samples,), generator=gen)
    return [token_ids[s:s + seq_len].view(1, -1) for s in starts.tolist()]
