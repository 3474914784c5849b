"""The engine's precision state: which dual-precision ops have their high-precision path enabled and
the precision new requests get; changed between steps, snapshotted into each request at admission."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable

from torch import nn

from ember.models.layers.precision import dual_layers
from ember.request import Request
from ember.sampling_params import DENSE_PRECISION, PRECISIONS, SamplingParams


@dataclass(frozen=True)
class PrecisionState:
    """A snapshot of the precision state (what `LLMEngine.get_precision` reports).

    default_precision: what a request that names none gets ("quantized" or "bf16").
    enabled_ops: op names whose dense path new "bf16" requests (and requests switched later) use.
    available_ops: every op that has a high-precision copy.
    """

    default_precision: str
    enabled_ops: tuple[str, ...]
    available_ops: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"default_precision": self.default_precision, "enabled_ops": list(self.enabled_ops),
                "available_ops": list(self.available_ops)}


class PrecisionManager:
    """Owns the enabled op set and the default precision; every op with a copy starts enabled.

    A request keeps the op set it was admitted with (`Request.precision_ops`), so a change applies to
    new requests only and in-flight ones finish as they began. Ops are named by module name; a pattern
    may also use the Hugging Face names of a fused layer's parts (`q_proj` for `qkv_proj`), the fused
    name of an unfused part (`qkv_proj` for `q_proj`), globs, and may be a dotted suffix
    (`down_proj`, `mlp.down_proj`: that op in every layer).
    """

    def __init__(self, model: nn.Module) -> None:
        layers = dual_layers(model)
        self._match_names = {name: layers[name].match_names for name in sorted(layers)}
        self.enabled_ops = frozenset(layers)
        self.default_precision = PRECISIONS[0]

    @property
    def has_dual_layers(self) -> bool:
        return bool(self._match_names)

    def state(self) -> PrecisionState:
        return PrecisionState(self.default_precision, tuple(sorted(self.enabled_ops)), tuple(self._match_names))

    def update(self, ops: str | Iterable[str] | None = None,
               default_precision: str | None = None) -> PrecisionState:
        """Replace the enabled op set and/or the default precision (None keeps it); all or nothing.
        An empty `ops` list disables every dense path (requests at "bf16" then run quantized).

        Raises:
            ValueError: the model has no dual-precision layers, a pattern matches no op, or the
                precision is unknown; the state is unchanged then.
        """
        self.require_dual_layers()
        if default_precision is not None:
            check_precision(default_precision, "default_precision")
        enabled = self.resolve(ops) if ops is not None else self.enabled_ops
        self.enabled_ops = enabled
        self.default_precision = default_precision or self.default_precision
        return self.state()

    def resolve(self, patterns: str | Iterable[str]) -> frozenset[str]:
        """The op names the patterns match (see the class docstring); each pattern must match one."""
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        ops: set[str] = set()
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise _error(f"op patterns must be non-empty strings, got {pattern!r}", "ops")
            matched = {name for name, aliases in self._match_names.items()
                       if any(fnmatchcase(a, pattern) or fnmatchcase(a, "*." + pattern) for a in aliases)}
            if not matched:
                some = ", ".join(list(self._match_names)[:3])
                raise _error(f"op pattern {pattern!r} matches no layer with a high-precision copy "
                             f"(e.g. {some})", "ops")
            ops |= matched
        return frozenset(ops)

    def request_precision(self, params: SamplingParams) -> str:
        """The precision a new request runs at; raises ValueError for "bf16" without dual layers."""
        precision = params.precision or self.default_precision
        if precision == DENSE_PRECISION and not self.has_dual_layers:
            raise _error("precision 'bf16' needs a model with high-precision copies of its quantized "
                         "layers, and this one has none", "precision")
        return precision

    def admit(self, request: Request, precision: str) -> None:
        """Give a new request the current op set, and the dense path from its first token for "bf16"."""
        request.precision_ops = self.enabled_ops
        if precision == DENSE_PRECISION:
            request.dense_from_position = 0

    def require_dual_layers(self) -> None:
        if not self.has_dual_layers:
            raise _error("the model has no dual-precision layers (no high-precision copies of its quantized "
                         "ops), so its precision cannot be changed", "ops")


def check_precision(precision: str, param: str = "precision") -> None:
    if precision not in PRECISIONS:
        raise _error(f"{param} must be one of {list(PRECISIONS)}, got {precision!r}", param)


def _error(message: str, param: str) -> ValueError:
    err = ValueError(message)
    err.param = param  # the server's error body names the field
    return err
