"""`ember kernels`: what this CPU offers, which native builds are loaded, and which kernel each linear of
the loaded model takes at each call size; `--build` builds the native extensions (`make setup` runs it)."""

from __future__ import annotations

import argparse

from ember.config import EngineConfig, add_config_cli_args, config_from_cli_args

MAX_TOKENS = 4096  # call sizes shown: 1 .. MAX_TOKENS, the last run open-ended


def register(subparsers) -> None:
    parser = subparsers.add_parser("kernels", help="CPU features, native builds and the kernel of every linear",
                                   description=__doc__)
    parser.add_argument("--build", action="store_true", help="build the native extensions for this CPU first")
    parser.add_argument("--no-model", action="store_true", help="do not load a model (CPU and builds only)")
    add_config_cli_args(parser, EngineConfig)
    parser.set_defaults(func=cmd_kernels)


def cmd_kernels(args: argparse.Namespace) -> None:
    from ember.kernels.build import build_all

    if args.build:
        for name, library in build_all(verbose=True).items():
            print(f"built {name}: {library}")
    print("\n".join(describe_machine()))
    if not args.no_model:
        print("\n".join(describe_model(config_from_cli_args(args, EngineConfig))))


def describe_machine() -> list[str]:
    """The CPU probe, the native builds for it, and every registered kernel's kinds."""
    from ember import envs
    from ember.kernels.build import EXTENSIONS, locate
    from ember.kernels.cpu import cpu_features
    from ember.kernels.linear.registry import KERNEL_REGISTRY
    from ember.kernels.ops import native_extension

    cpu = cpu_features()
    flags = " ".join(flag if present else f"-{flag}" for flag, present in cpu.kernel_flags().items())
    lines = [f"CPU: {cpu.model_name} ({cpu.machine}), kernel ISA: {cpu.isa_tag}", f"  flags: {flags}",
             f"native builds (EMBER_KERNELS_DIR={envs.EMBER_KERNELS_DIR}):"]
    for name, spec in EXTENSIONS.items():
        where = locate(spec)
        module = native_extension(name)
        state = f"loaded, compiled for {' '.join(sorted(module.isa)) or 'base x86-64'}" if module else (
            "built, not loaded" if where.exists else "not built")
        lines.append(f"  {name:<6} {state}: {where.library}")
    lines.append("kernels (in priority order per kind): " + ", ".join(
        f"{name} [{'/'.join(sorted(kernel.kinds))}]" for name, kernel in KERNEL_REGISTRY.items()))
    return lines


def describe_model(config: EngineConfig) -> list[str]:
    """For each distinct linear of the model's first decoder layer and the LM head: which kernel takes
    which call sizes, and why the other kernels of its kind cannot run it here."""
    import torch

    from ember.kernels.linear.module import KernelLinear
    from ember.loader.model_loader import load_model, resolve_model_path

    dtype = getattr(torch, config.dtype)
    model, _ = load_model(resolve_model_path(config.model), dtype, config.kernel_policy())
    layers = {name.split("layers.0.")[-1]: module for name, module in model.named_modules()
              if isinstance(module, KernelLinear) and (".layers.0." in name or name.endswith("lm_head"))}
    lines = [f"model: {config.model or 'bundled SmolLM2-135M-Instruct'} ({config.dtype}); "
             f"tokens per call -> kernel:"]
    for name, layer in layers.items():
        runs = _runs([layer.select_kernel(n, dtype).name for n in range(1, MAX_TOKENS + 1)])
        lines.append(f"  {name:<20} {layer.spec.kind:<11} {layer.in_features:>5} -> {layer.out_features:<6} "
                     + ", ".join(runs))
    lines.extend(_refusals(layers, dtype))
    return lines


def _runs(picks: list[str]) -> list[str]:
    """Kernel names of calls of 1, 2, ... tokens as ranges: "1-4 int8_gemv", "5-1024 woq_amx", "1025+ ..."."""
    runs, start = [], 1
    for n in range(2, len(picks) + 2):
        if n > len(picks) or picks[n - 1] != picks[start - 1]:
            end = f"-{n - 1}" if n <= len(picks) else "+"
            runs.append(f"{start}{end if n - 1 > start or end == '+' else ''} {picks[start - 1]}")
            start = n
    return runs


def _refusals(layers: dict, dtype) -> list[str]:
    """Why each kernel of a layer's kind that never got picked cannot run it (first layer of each kind)."""
    seen, lines = set(), ["why other kernels are not used here:"]
    for layer in layers.values():
        kind = layer.spec.kind
        if kind in seen:
            continue
        seen.add(kind)
        for kernel in layer.policy.candidates(kind):
            reason = kernel.why_not(layer.spec, dtype)
            if reason is not None:
                lines.append(f"  {kernel.name}: {reason}")
    return lines
