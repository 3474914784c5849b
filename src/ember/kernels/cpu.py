"""The one CPU capability probe: which instruction sets this CPU (and its OS) offers the kernels."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import platform
from dataclasses import dataclass

# /proc/cpuinfo flag names of the instruction sets the kernels are written for, strongest last
KERNEL_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8")

_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@dataclass(frozen=True)
class CpuFeatures:
    """What one CPU offers: its model name, its /proc/cpuinfo flags and whether the OS grants AMX tiles.

    ``flags`` is the whole flag set (it also names the build identity, since native code is compiled
    with -march=native); the properties answer the questions kernel checks ask.
    """

    model_name: str
    machine: str
    flags: frozenset[str]
    amx_granted: bool

    @property
    def avx512(self) -> bool:
        return {"avx512f", "avx512bw", "avx512vl"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return self.avx512 and "avx512_bf16" in self.flags

    @property
    def avx512_vnni(self) -> bool:
        return self.avx512 and "avx512_vnni" in self.flags

    @property
    def vnni(self) -> bool:
        """Non-saturating u8 x s8 dot products (AVX512-VNNI or AVX-VNNI)."""
        return self.avx512_vnni or "avx_vnni" in self.flags

    @property
    def amx(self) -> bool:
        """AMX-BF16 and AMX-INT8 tiles, granted to this process by the OS."""
        return self.amx_granted and {"amx_tile", "amx_bf16", "amx_int8"} <= self.flags and self.avx512_bf16

    @property
    def isa_tag(self) -> str:
        """The strongest instruction set the kernels use here: amx, avx512bf16, avx512vnni, avx512, avx2 or base."""
        for tag, present in (("amx", self.amx), ("avx512bf16", self.avx512_bf16), ("avx512vnni", self.avx512_vnni),
                             ("avx512", self.avx512), ("avx2", "avx2" in self.flags)):
            if present:
                return tag
        return "base"

    @property
    def flags_digest(self) -> str:
        """Short digest of the whole flag set: two CPUs share a native build only if it matches."""
        return hashlib.sha256(" ".join(sorted(self.flags)).encode()).hexdigest()[:10]

    def kernel_flags(self) -> dict[str, bool]:
        """Each flag of ``KERNEL_FLAGS``: present or not (AMX ones only where the OS grants tiles)."""
        return {flag: flag in self.flags and (self.amx_granted or not flag.startswith("amx")) for flag in KERNEL_FLAGS}


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                    break  # the first processor speaks for all
    except OSError:
        pass
    return model, flags


def _request_amx() -> bool:
    """Linux keeps AMX tile data disabled per process until asked (arch_prctl ARCH_REQ_XCOMP_PERM)."""
    if platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def cpu_features() -> CpuFeatures:
    """Probe this CPU once per process (AMX tile permission is requested here, if the CPU has tiles)."""
    model, flags = _read_cpuinfo()
    granted = "amx_tile" in flags and _request_amx()
    return CpuFeatures(model, platform.machine(), flags, granted)
