"""Serving a quantized checkpoint imports none of the calibration methods (a fresh interpreter checks)."""
import subprocess
import sys

CALIBRATION_MODULES = ("ember.quant.awq", "ember.quant.gptq", "ember.quant.calibration", "ember.quant.rotation",
                       "ember.quant.smoothquant", "ember.quant.api")


def test_loading_path_imports_no_calibration_method(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ember.quant import QuantConfig, quantize_model, save_quantized

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = QuantConfig(bits=8)
    quantize_model(hf, config)
    save_quantized(hf, tmp_path, config)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    code = ("import sys, torch\n"
            "from ember.loader.model_loader import load_model\n"
            f"model, _ = load_model({str(tmp_path)!r}, torch.float32)\n"
            "from ember.quant.linear import QuantLinear\n"
            "assert any(isinstance(m, QuantLinear) for m in model.modules())\n"
            f"print(sorted(set({CALIBRATION_MODULES!r}) & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
