"""Engine configuration: one frozen dataclass whose fields are also the CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import typing
from dataclasses import dataclass, field

SUPPORTED_DTYPES = ("bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "int8", "int8-static")
KV_EVICTION_POLICIES = ("none", "streaming", "h2o", "snapkv")


class UsageContext(enum.Enum):
    """Who runs the engine (as vLLM's UsageContext); it picks the defaults of the step budget.

    Offline runs care about throughput, so as vLLM on CPU they batch up to 256 requests and 4096
    tokens a step; a server keeps steps shorter (128, 2048) for its inter-token latency, and so
    does an engine built directly from an `EngineConfig`.
    """

    ENGINE = "engine"  # LLMEngine.from_config(EngineConfig(...))
    OFFLINE = "offline"  # LLM, `ember generate`, `ember chat`
    SERVING = "serving"  # `ember serve`

    @property
    def defaults(self) -> dict[str, int]:
        """The value of each `EngineConfig` field this context fills in when it is left None."""
        if self is UsageContext.OFFLINE:
            return {"max_num_seqs": 256, "max_num_batched_tokens": 4096}
        return {"max_num_seqs": 128, "max_num_batched_tokens": 2048}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start; validated once, never mutated.

    Each field becomes a CLI flag (`max_num_seqs` -> `--max-num-seqs`); the metadata `help`
    is the flag's help text, and fields marked `cli: False` are not flags.
    Invariant: after construction `max_num_seqs` and `max_num_batched_tokens` are ints; when left
    None they are filled in from `usage_context` (see `UsageContext.defaults`).
    """

    model: str | None = field(default=None, metadata={
        "help": "GGUF file, Hugging Face model directory or quantized checkpoint; "
                "default: the bundled SmolLM2-135M-Instruct"})
    dtype: str = field(default="bfloat16", metadata={"help": "weights and activations: bfloat16 or float32"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest prompt + output in tokens; default: the model's context length, at most 8192"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    kv_cache_memory_gib: float = field(default=1.0, metadata={"help": "memory for the KV cache in GiB"})
    num_kv_blocks: int | None = field(default=None, metadata={
        "help": "number of KV-cache blocks (overrides --kv-cache-memory-gib)"})
    disable_hybrid_kv_cache_manager: bool = field(default=False, metadata={
        "help": "one block table for every layer: a sliding-window layer keeps the blocks behind its window (by "
                "default local and global layers have their own tables and a local one lets those blocks go)"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV-cache storage: auto (the model dtype), int8 (a scale per token and KV head, computed on write) "
                "or int8-static (per-channel scales calibrated offline: --kv-scales)"})
    kv_scales: str | None = field(default=None, metadata={
        "help": "int8-static: kv_scales.safetensors or its directory (`ember calibrate-kv`); default: the model's "
                "directory"})
    kv_outlier_residual: bool = field(default=False, metadata={
        "help": "int8-static: a token whose relative quantization error exceeds --kv-outlier-factor x the running "
                "mean gets a 4-bit residual"})
    kv_outlier_factor: float = field(default=3.0, metadata={"help": "outlier threshold over the mean relative error"})
    kv_eviction: str = field(default="none", metadata={
        "help": "keep each request's KV within --kv-budget-tokens: none, streaming (sinks + recent window), "
                "h2o (sinks + recent + heavy hitters by attention) or snapkv (what the latest 32 queries attend "
                "to); turns prefix caching off"})
    kv_budget_tokens: int | None = field(default=None, metadata={"help": "KV rows a request keeps with --kv-eviction"})
    kv_sink_tokens: int = field(default=4, metadata={"help": "first tokens streaming and h2o always keep"})
    max_num_seqs: int | None = field(default=None, metadata={"help": "most requests in one step"})
    max_num_batched_tokens: int | None = field(default=None, metadata={"help": "token budget of one step"})
    long_prefill_token_threshold: int | None = field(default=None, metadata={
        "help": "most tokens one request computes in a step (a long prompt's chunk); with --kv-eviction at most, "
                "and by default, the budget"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV of shared prompt prefixes"})
    seed: int = field(default=0, metadata={"help": "seed of the default random generator"})
    num_threads: int | None = field(default=None, metadata={
        "help": "intra-op threads; default: the number of physical cores"})
    disable_kernels: str | None = field(default=None, metadata={
        "help": "comma-separated linear kernels never to use, e.g. woq_amx,w8a8_amx (`ember kernels` lists them)"})
    force_kernels: str | None = field(default=None, metadata={
        "help": "comma-separated linear kernels to use for every layer of their kind (at most one per kind); "
                "loading fails if one cannot run here"})
    precision_fallback: bool = field(default=False, metadata={
        "help": "switch a request to the high-precision copies of its quantized ops when its activations drift "
                "from the checkpoint's calibrated reference (checked every 64 tokens)"})
    fallback_kl: float = field(default=0.02, metadata={
        "help": "precision fallback: KL of a request's 512-bin activation histogram against the reference"})
    fallback_skew: float = field(default=3.0, metadata={
        "help": "precision fallback: largest allowed change of the activations' skewness from the reference"})
    speculative_config: str | dict | None = field(default=None, metadata={
        "help": 'speculative decoding as JSON, e.g. {"method": "ngram", "num_speculative_tokens": 4, '
                '"prompt_lookup_min": 2, "prompt_lookup_max": 4} or {"method": "draft_model", "model": PATH, '
                '"num_speculative_tokens": 4} or {"method": "suffix"} (docs/speculative_decoding.md)'})
    enable_lora: bool = field(default=False, metadata={
        "help": "serve LoRA adapters (PEFT directories) next to the base model, mixed in one batch"})
    max_loras: int = field(default=1, metadata={"help": "LoRA adapters resident at once (and in one batch)"})
    max_lora_rank: int = field(default=16, metadata={"help": "the largest LoRA rank accepted"})
    usage_context: UsageContext = field(default=UsageContext.ENGINE, metadata={"cli": False})

    def __post_init__(self) -> None:
        # Frozen: the defaults are filled in here, once, before anyone can read the config.
        object.__setattr__(self, "usage_context", UsageContext(self.usage_context))
        for name, value in self.usage_context.defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be positive, got {self.kv_cache_memory_gib}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(f"long_prefill_token_threshold must be positive, got {self.long_prefill_token_threshold}")
        check_kv_cache_options(self.kv_cache_dtype, self.kv_outlier_residual, self.kv_outlier_factor)
        self.eviction_config()  # an unknown policy or a budget too small for it fails here
        if self.fallback_kl <= 0 or self.fallback_skew <= 0:
            raise ValueError(f"fallback_kl and fallback_skew must be positive, got {self.fallback_kl}, "
                             f"{self.fallback_skew}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")
        self.kernel_policy()  # unknown or conflicting kernel names fail here, with the known ones listed
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be positive, got {self.max_loras}, "
                             f"{self.max_lora_rank}")
        from ember.spec_decode.config import SpeculativeConfig

        # Held parsed (a SpeculativeConfig) from here on, whether it came as JSON, a dict or an instance.
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        if self.speculative_config is not None and (self.kv_eviction != "none" or self.precision_fallback):
            raise ValueError("speculative decoding cannot be combined with --kv-eviction or --precision-fallback")

    def kernel_policy(self):
        """The `KernelPolicy` every linear of the model gets (disabled and forced kernels)."""
        from ember.kernels.linear.registry import KernelPolicy, parse_kernel_names

        return KernelPolicy(disabled=frozenset(parse_kernel_names(self.disable_kernels)),
                            forced=parse_kernel_names(self.force_kernels))

    def eviction_config(self):
        """The `EvictionConfig` of --kv-eviction (None when off); its slack is one block."""
        if self.kv_eviction not in KV_EVICTION_POLICIES:
            raise ValueError(f"kv_eviction must be one of {KV_EVICTION_POLICIES}, got {self.kv_eviction!r}")
        if self.kv_eviction == "none":
            return None
        if self.kv_budget_tokens is None:
            raise ValueError(f"kv_eviction={self.kv_eviction!r} needs kv_budget_tokens")
        from ember.attention.eviction import EvictionConfig

        return EvictionConfig(self.kv_eviction, self.kv_budget_tokens, self.kv_sink_tokens, self.block_size)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def check_kv_cache_options(cache_dtype: str, outlier_residual: bool, outlier_factor: float) -> None:
    """Raise ValueError for an unknown KV-cache dtype, residuals without static scales or a bad factor."""
    if cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {cache_dtype!r}")
    if outlier_residual and cache_dtype != "int8-static":
        raise ValueError("kv_outlier_residual needs kv_cache_dtype='int8-static'")
    if outlier_factor <= 0:
        raise ValueError(f"kv_outlier_factor must be positive, got {outlier_factor}")


def default_num_threads() -> int:
    """Physical cores available to this process: hyper-threads share a core's matmul units."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        cores = {line for line in text.splitlines() if line.startswith(("physical id", "core id"))}
        siblings = [int(l.split(":")[1]) for l in text.splitlines() if l.startswith("siblings")]
        per_core = [int(l.split(":")[1]) for l in text.splitlines() if l.startswith("cpu cores")]
        if siblings and per_core and siblings[0] > per_core[0] and cores:
            return max(1, logical * per_core[0] // siblings[0])
    except (OSError, ValueError):
        pass
    return max(1, logical)


def add_config_cli_args(parser: argparse.ArgumentParser, cls: type = EngineConfig,
                        usage_context: UsageContext | None = None) -> None:
    """Add one `--flag` per dataclass field of `cls` (except fields marked `cli: False`), plus the short
    forms in its metadata `aliases` (e.g. `-tp`).

    `usage_context` is the command's (`EngineConfig` only): the help shows the defaults it fills
    in, and `config_from_cli_args` passes it on to the config, which resolves them.
    """
    hints = typing.get_type_hints(cls)
    shown = usage_context.defaults if usage_context is not None else {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        help_text = f.metadata.get("help", "")
        base = _base_type(hints[f.name])
        if base is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        else:
            extra = {"nargs": f.metadata["nargs"]} if "nargs" in f.metadata else {}
            parser.add_argument(*flags, dest=f.name, type=f.metadata.get("type", base), default=f.default,
                                help=f"{help_text} (default: {shown.get(f.name, f.default)})", **extra)
    if usage_context is not None:
        parser.set_defaults(usage_context=usage_context)


def config_from_cli_args(args: argparse.Namespace, cls: type = EngineConfig):
    """Build `cls` from the flags `add_config_cli_args` added (and the usage context it recorded)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.metadata.get("cli", True) or hasattr(args, f.name)})


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
