"""Frozen configuration of a quantization run and of the quantized checkpoint it produces."""
from __future__ import annotations

import dataclasses
from typing import Any

from ember.kernels.linear.spec import WeightScheme
from ember.quant.plan import LM_HEAD, OP_LINEARS, PRECISIONS

METHODS = ("rtn", "awq", "gptq", "smoothquant")
GROUP_SIZES = (32, 64, 128)
# Linear layers quantized by default; embeddings stay in float, and lm_head unless `lm_head` says otherwise.
DEFAULT_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
FORMAT_VERSION = 1
LM_HEAD_PRECISIONS = (None, "int8", "int4")
CHANNEL_ORDERS = ("saliency", "random")
# the ops ``method_args["channel_split"]`` weighs: a decoder layer's ops (plan.OP_LINEARS)
CHANNEL_SPLIT_OPS = tuple(OP_LINEARS)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; written verbatim to ``quantization_config.json``.

    Args:
        method: one of ``METHODS``.
        bits: weight bits, 8 or 4.
        group_size: input channels per scale for 4-bit weights (32, 64 or 128); ``None`` means
            one scale per output channel (required for 8-bit).
        symmetric: symmetric weights (no zero point) if True, else asymmetric (4-bit only).
        act_bits: 8 for dynamic int8 activations, else ``None``: per token with 8-bit weights (W8A8,
            SmoothQuant), per token and block of ``group_size`` input channels with 4-bit ones (W4A8,
            the Q8 blocks llama.cpp runs against its Q4 weights).
        rotate: whether a QuaRot-style Hadamard rotation was folded in before quantizing.
        modules: name suffixes of the linears to quantize.
        alpha: SmoothQuant migration strength; ``None`` for the method default.
        calibration: free-form description of the calibration data (source, number of samples,
            tokens per sample); ``None`` when the method needs none.
        method_args: extra method knobs. GPTQ: ``percdamp`` (0.01), ``act_order`` (True; static
            groups), ``block_size`` (128), ``clip_search`` (False; each group's range shrunk to minimize
            its rounding error weighted by the Hessian diagonal, ``rtn.weighted_qparams``). AWQ: ``n_grid`` (20), ``max_tokens`` (1024), ``clip``
            (True). SmoothQuant: ``smooth_down`` (True). Rotation: ``rotation_seed`` (0).
        precisions: per-linear exceptions to ``bits``, by full Hugging Face name: ``"bf16"`` keeps the
            linear in float, ``"int8"`` is symmetric per output channel, ``"int4"`` symmetric with
            ``group_size`` (64 when the base is 8-bit). Weight-only configs only.
        fallback_modules: full names of quantized linears that also keep their float weight in the
            checkpoint (``fallback_weight``), so a request can run them in high precision.
        lm_head: ``None`` keeps the LM head in float (tied to the embedding if the model ties them);
            ``"int8"`` gives it its own copy, RTN int8 per output channel, weight-only whatever
            ``act_bits`` says; ``"int4"`` the 4-bit scheme of the other linears, with their ``act_bits``
            (llama.cpp's GGUFs quantize the output matrix too).
        bf16_channels: GPTQ only: this fraction of each quantized linear's input channels (rounded down)
            stays in float, chosen by saliency (E[x_j^2] ||W[:, j]||^2 on the calibration data; one choice
            for the linears that read the same input, q/k/v and gate/up) and quantized last, so they absorb
            GPTQ's error updates. ``method_args``
            ``channel_order`` ``"random"`` (seed ``channel_seed``, 0) picks them at random instead, the
            control of the choice. ``method_args`` ``channel_split`` ({op: weight} over
            ``CHANNEL_SPLIT_OPS``, 1 for ops not named) shares each decoder layer's float bytes unevenly:
            op o keeps floor(lambda * weight_o * bf16_channels * K_o) channels, lambda scaling the weighted
            parameters back to the layer's, so the layer's float share stays at most ``bf16_channels``.
    Raises:
        ValueError: on any inconsistent combination.
    """

    method: str = "rtn"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    act_bits: int | None = None
    rotate: bool = False
    modules: tuple[str, ...] = DEFAULT_MODULES
    alpha: float | None = None
    calibration: dict[str, Any] | None = None
    method_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    precisions: dict[str, str] = dataclasses.field(default_factory=dict)
    fallback_modules: tuple[str, ...] = ()
    lm_head: str | None = None
    bf16_channels: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"4-bit weights need group_size in {GROUP_SIZES}, got {self.group_size}")
        if self.bits == 8 and (self.group_size is not None or not self.symmetric):
            raise ValueError("8-bit weights are symmetric per output channel (group_size=None)")
        if self.act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {self.act_bits}")
        if self.method == "smoothquant" and self.act_bits != 8:
            raise ValueError("smoothquant is W8A8: set bits=8, act_bits=8")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.modules:
            raise ValueError("modules must name at least one linear")
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "fallback_modules", tuple(self.fallback_modules))
        bad = {name: p for name, p in self.precisions.items() if p not in PRECISIONS}
        if bad:
            raise ValueError(f"precisions must be one of {PRECISIONS}, got {bad}")
        if self.precisions and self.act_bits is not None:
            raise ValueError("per-linear precisions are for weight-only configs (act_bits=None)")
        if self.lm_head not in LM_HEAD_PRECISIONS:
            raise ValueError(f"lm_head must be one of {LM_HEAD_PRECISIONS}, got {self.lm_head!r}")
        if not 0.0 <= self.bf16_channels < 1.0:
            raise ValueError(f"bf16_channels must be in [0, 1), got {self.bf16_channels}")
        if self.bf16_channels and self.method != "gptq":
            raise ValueError("bf16_channels needs method='gptq' (the kept channels absorb its error updates)")
        if self.method_args.get("clip_search") and (self.method != "gptq" or self.bits != 4):
            raise ValueError("clip_search is for GPTQ's 4-bit groups (AWQ searches its clipping by default)")
        if self.method_args.get("channel_order", "saliency") not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, "
                             f"got {self.method_args['channel_order']!r}")
        split = self.method_args.get("channel_split")
        if split is not None:
            if not self.bf16_channels:
                raise ValueError("channel_split shares the bf16_channels budget: set bf16_channels")
            if not isinstance(split, dict) or not split:
                raise ValueError(f"channel_split must map ops to weights, got {split!r}")
            bad_ops = sorted(set(split) - set(CHANNEL_SPLIT_OPS))
            if bad_ops:
                raise ValueError(f"channel_split ops must be among {CHANNEL_SPLIT_OPS}, got {bad_ops}")
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in split.values()):
                raise ValueError(f"channel_split weights must be positive numbers, got {split}")
        if self.lm_head == "int4" and self.bits != 4:
            raise ValueError("lm_head='int4' takes the 4-bit scheme of the other linears: set bits=4")

    def weight_scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.symmetric)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Name suffixes of every linear quantized: ``modules``, and ``lm_head`` when it is quantized."""
        return self.modules + ((LM_HEAD,) if self.lm_head is not None else ())

    def act_bits_for(self, name: str) -> int | None:
        """The activation bits of the linear ``name``: ``act_bits``, except for an int8 LM head (weight-only)."""
        return None if name == LM_HEAD and self.lm_head == "int8" else self.act_bits

    def scheme_for(self, name: str) -> WeightScheme | None:
        """The weight scheme of the linear ``name`` (full name), or None if it stays in float."""
        if name == LM_HEAD:
            return None if self.lm_head is None else (
                WeightScheme(8, None, True) if self.lm_head == "int8" else self.weight_scheme())
        precision = self.precisions.get(name)
        if precision is None:
            return self.weight_scheme()
        if precision == "bf16":
            return None
        if precision == "int8":
            return WeightScheme(8, None, True)
        if self.bits == 4:
            return self.weight_scheme()
        return WeightScheme(4, self.group_size or 64, True)

    def precision_of(self, name: str) -> str:
        """``"int4"``, ``"int8"`` or ``"bf16"`` for the linear ``name`` (full name)."""
        if name == LM_HEAD:
            return self.lm_head or "bf16"
        return self.precisions.get(name, f"int{self.bits}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["modules"] = list(self.modules)
        out["fallback_modules"] = list(self.fallback_modules)
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported quantization format_version {version}")
        data.pop("quantized_modules", None)  # checkpoint bookkeeping, not configuration
        data.pop("tied", None)
        data.pop("module_precisions", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown quantization_config keys: {sorted(unknown)}")
        return cls(**data)
