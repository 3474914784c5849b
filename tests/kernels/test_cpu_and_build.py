"""The CPU probe agrees with torch's own, a build's identity follows the CPU's flag set, and a missing
build means the reference path with one warning."""
import os
import subprocess
import sys
from dataclasses import replace

import torch

from ember.kernels.build import EXTENSIONS, build_identity, locate
from ember.kernels.cpu import cpu_features
from ember.kernels.ops import native_extension


def test_probe_agrees_with_torch_capability():
    cpu = cpu_features()
    capability = torch.backends.cpu.get_cpu_capability()  # torch's own dispatch probe: DEFAULT, AVX2, AVX512...
    if capability.startswith("AVX512"):
        assert cpu.avx512
    if capability in ("AVX2", "AVX512"):
        assert "avx2" in cpu.flags
    assert cpu.isa_tag in ("amx", "avx512bf16", "avx512vnni", "avx512", "avx2", "base")


def test_identity_follows_the_cpu_flag_set():
    cpu = cpu_features()
    spec = EXTENSIONS["quant"]
    assert build_identity(spec, cpu) == build_identity(spec, replace(cpu, model_name="another name"))
    avx2 = replace(cpu, flags=frozenset(f for f in cpu.flags if not f.startswith(("avx512", "amx"))), amx_granted=False)
    assert build_identity(spec, avx2) == build_identity(spec, replace(avx2, model_name="another name"))
    zen4 = replace(avx2, flags=avx2.flags | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"})
    amx = replace(zen4, flags=zen4.flags | {"amx_tile", "amx_bf16", "amx_int8"}, amx_granted=True)
    identities = {build_identity(spec, c) for c in (avx2, zen4, amx)}
    assert len(identities) == 3  # a build made for one of these CPUs is never found by another
    assert build_identity(spec, amx).startswith("amx-") and build_identity(spec, zen4).startswith("avx512bf16-")
    assert build_identity(EXTENSIONS["core"], cpu) != build_identity(spec, cpu)


def test_loaded_build_matches_this_cpu():
    module = native_extension("quant")
    if module is None:
        return  # nothing loaded (EMBER_DISABLE_NATIVE=1 or not built): nothing to check
    assert os.path.dirname(module.__file__) == locate(EXTENSIONS["quant"]).directory
    assert ("avx512_bf16" in module.isa) == cpu_features().avx512_bf16
    assert ("avx512_vnni" in module.isa) == cpu_features().avx512_vnni


def _run_without_build(tmp_path, extra_env):
    code = ("from ember.kernels.ops import core_ops, quant_ops\n"
            "import torch\n"
            "from ember.models.layers.norm import RMSNorm\n"
            "assert core_ops() is None and quant_ops() is None and core_ops() is None\n"
            "x = torch.randn(3, 8).bfloat16()\n"
            "norm = RMSNorm(8).bfloat16()\n"
            "assert torch.equal(norm(x), norm.reference_forward(x))\n")
    env = {**os.environ, "EMBER_KERNELS_DIR": str(tmp_path), "EMBER_KERNELS_JIT": "0", **extra_env}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_missing_build_runs_the_reference_path_with_one_warning(tmp_path):
    result = _run_without_build(tmp_path, {"EMBER_DISABLE_NATIVE": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("WARNING") == 1 and "ember kernels --build" in result.stderr


def test_disabled_native_code_warns_nothing(tmp_path):
    result = _run_without_build(tmp_path, {"EMBER_DISABLE_NATIVE": "1"})
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
