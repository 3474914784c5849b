"""Building the native extensions for this CPU, and finding the build that fits the running process.

Two extensions: ``core`` (paged decode attention, fused bfloat16 norm/RoPE/activation, dense bfloat16
linears; -ffast-math) and ``quant`` (the quantized linears; exact rounding, no fast math). Both are
compiled with -march=native, so a build belongs to one instruction set: it lives in a folder named by
its identity (the CPU's flag set, torch and Python versions, compiler flags and source contents) and is
only ever loaded by a process whose identity matches. ``make setup`` builds both
(``ember kernels --build``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from ember import envs
from ember.kernels.cpu import CpuFeatures, cpu_features

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
INCLUDE = os.path.join(CSRC, "include")


@dataclass(frozen=True)
class ExtensionSpec:
    """One native extension: its sources (relative to ``csrc/``) and whether it may use fast math."""

    name: str
    sources: tuple[str, ...]
    fast_math: bool

    def cflags(self) -> list[str]:
        # without fast math, also no fused multiply-add contraction: results round like PyTorch's
        rounding = ["-ffast-math"] if self.fast_math else ["-ffp-contract=off"]
        return ["-O3", "-march=native", "-fopenmp", *rounding]

    def source_paths(self) -> list[str]:
        return [os.path.join(CSRC, source) for source in self.sources]


EXTENSIONS: dict[str, ExtensionSpec] = {spec.name: spec for spec in (
    ExtensionSpec("core", ("core/module.cpp", "core/paged_decode.cpp", "core/paged_decode_int8.cpp",
                           "core/fused_ops.cpp", "core/bf16_gemv.cpp", "core/bf16_dpbf16.cpp",
                           "core/bf16_amx.cpp", "core/decode_layers.cpp",
                           "core/paged_prefill.cpp"), fast_math=True),
    ExtensionSpec("quant", ("quant/quant_ops.cpp", "quant/woq_amx.cpp", "quant/w8a8_amx.cpp", "quant/int8_gemv.cpp",
                            "quant/w4a8_vnni.cpp", "quant/woq_dpbf16.cpp"), fast_math=False),
)}


def build_identity(spec: ExtensionSpec, cpu: CpuFeatures | None = None) -> str:
    """``<isa>-<cpu flags digest>-<digest of torch, Python, flags and sources>``: the build's folder name."""
    import torch

    cpu = cpu or cpu_features()
    digest = hashlib.sha256()
    for part in (torch.__version__, sys.version, " ".join(spec.cflags()), cpu.flags_digest):
        digest.update(part.encode())
    headers = sorted(os.path.join(INCLUDE, name) for name in os.listdir(INCLUDE))
    for path in [*spec.source_paths(), *headers]:
        with open(path, "rb") as f:
            digest.update(f.read())
    return f"{cpu.isa_tag}-{cpu.flags_digest}-{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class BuildLocation:
    """Where one extension's build for this process lives, and the module name it was built under."""

    directory: str
    module_name: str

    @property
    def library(self) -> str:
        return os.path.join(self.directory, self.module_name + ".so")

    @property
    def exists(self) -> bool:
        return os.path.isfile(self.library)


def locate(spec: ExtensionSpec) -> BuildLocation:
    identity = build_identity(spec)
    return BuildLocation(os.path.join(envs.EMBER_KERNELS_DIR, identity),
                         f"ember_{spec.name}_{identity.rsplit('-', 1)[-1]}")


def load_built(spec: ExtensionSpec) -> ModuleType | None:
    """Import the build of ``spec`` made for this process's identity, or None if there is none."""
    import torch  # noqa: F401  (the extension links against libtorch, which must be loaded first)

    where = locate(spec)
    if not where.exists:
        return None
    module_spec = importlib.util.spec_from_file_location(where.module_name, where.library)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def build(spec: ExtensionSpec, *, verbose: bool = True) -> ModuleType:
    """Compile ``spec`` for this CPU into its identity folder (ninja, so unchanged sources are not rebuilt).

    Raises whatever the compiler raises (no compiler, no headers, a compile error).
    """
    from torch.utils.cpp_extension import load

    where = locate(spec)
    os.makedirs(where.directory, exist_ok=True)
    if verbose:
        print(f"ember: building native kernels '{spec.name}' for this CPU ({cpu_features().isa_tag}) "
              f"into {where.directory}", file=sys.stderr, flush=True)
    return load(name=where.module_name, sources=spec.source_paths(), extra_cflags=spec.cflags(),
                extra_ldflags=["-fopenmp"], extra_include_paths=[INCLUDE], build_directory=where.directory,
                verbose=verbose)


def build_all(*, verbose: bool = True) -> dict[str, str]:
    """Build every extension; returns each one's library path."""
    libraries = {}
    for name, spec in EXTENSIONS.items():
        build(spec, verbose=verbose)
        libraries[name] = locate(spec).library
    return libraries
