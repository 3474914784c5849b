"""--disable-kernels / --force-kernels reach every linear of a loaded model, and `ember kernels` reports it."""
import pytest
import torch

from ember.config import EngineConfig
from ember.kernels.linear.module import KernelLinear
from ember.kernels.linear.registry import KernelUnavailableError
from ember.loader.model_loader import load_model


def test_unknown_or_conflicting_names_fail_in_the_config():
    with pytest.raises(ValueError, match="unknown kernels"):
        EngineConfig(disable_kernels="woq_amx,no_such_kernel")
    with pytest.raises(ValueError, match="one per kind"):
        EngineConfig(force_kernels="amx_bf16,bf16_gemv")
    policy = EngineConfig(disable_kernels="woq_amx, w8a8_amx", force_kernels="int_mm_w8a8").kernel_policy()
    assert policy.disabled == {"woq_amx", "w8a8_amx"} and policy.forced == ("int_mm_w8a8",)


def test_policy_reaches_every_linear(tiny_llama_dir):
    config = EngineConfig(model=tiny_llama_dir, dtype="float32", disable_kernels="int8_gemv")
    model, _ = load_model(tiny_llama_dir, torch.float32, config.kernel_policy())
    linears = [m for m in model.modules() if isinstance(m, KernelLinear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    assert all(m.policy.disabled == {"int8_gemv"} for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_forced_kernel_that_cannot_run_fails_the_load(tiny_llama_dir):
    # oneDNN's bf16 kernel takes bfloat16 activations only: forcing it on a float32 model is an error
    config = EngineConfig(model=tiny_llama_dir, dtype="float32", force_kernels="onednn_bf16")
    with pytest.raises(KernelUnavailableError, match="onednn_bf16 was forced"):
        load_model(tiny_llama_dir, torch.float32, config.kernel_policy())


def test_kernels_command_reports_each_linear(tiny_llama_dir, capsys):
    from ember.cli.main import main

    main(["kernels", "--model", tiny_llama_dir, "--dtype", "float32", "--force-kernels", "dense_reference"])
    out = capsys.readouterr().out
    assert "CPU:" in out and "core" in out and "quant" in out
    for name in ("self_attn.q_proj", "mlp.down_proj", "lm_head"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert line.endswith("1+ dense_reference")
