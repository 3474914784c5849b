"""`ember analyze sensitivity` then `ember quantize --keep-bf16 / --bf16-budget / --auto` on a tiny local
checkpoint; the written directories load with no flags and keep exactly the chosen ops in float."""
import csv
import json

import pytest

from ember import LLM, SamplingParams
from ember.cli.main import main

CALIB = ["--num-samples", "2", "--calib-seq-len", "32", "--num-threads", "1"]
SEARCH = ["--search-samples", "2", "--search-seq-len", "48"]


@pytest.fixture(scope="module")
def report(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis") / "sens.json"
    main(["analyze", "sensitivity", "--model", tiny_llama_dir, "--method", "rtn", "--group-size", "32",
          "--kl-threshold", "0", "--output", str(path), *CALIB])
    return json.loads(path.read_text())


def test_report_shape_and_plot(report, tmp_path_factory):
    assert report["bits"] == 4 and report["group_size"] == 32 and report["method"] == "rtn"
    assert len(report["layers"]) == 2 * 4 + 1 and report["layers"][-1]["op"] == "lm_head"
    assert set(report["layers"][0]) == {"layer", "op", "kl", "R", "energy", "skew", "dppl", "flag", "num_weights"}
    assert all(row["flag"] == "bf16" for row in report["layers"])  # --kl-threshold 0 flags every op
    assert set(report["spearman_vs_dppl"]) == {"kl", "R", "energy", "skew"}


def _generate(directory):
    llm = LLM(model=str(directory), dtype="float32", num_kv_blocks=32, max_model_len=128)
    return llm.generate({"prompt_token_ids": list(range(10, 30))},
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]


def test_keep_bf16_and_budget(report, tiny_llama_dir, tmp_path):
    report_path = tmp_path / "sens.json"
    report_path.write_text(json.dumps(report))
    keep = tmp_path / "keep"
    main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
          "--keep-bf16", str(report_path), "--output", str(keep), *CALIB])
    precisions = json.loads((keep / "quantization_config.json").read_text())["module_precisions"]
    assert set(precisions.values()) == {"bf16"}  # every op flagged: nothing quantized
    budget = tmp_path / "budget"
    main(["quantize", "--model", tiny_llama_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--sensitivity", str(report_path), "--bf16-budget", "0.3", "--output", str(budget), *CALIB])
    precisions = json.loads((budget / "quantization_config.json").read_text())["module_precisions"]
    top = max((r for r in report["layers"] if r["op"] != "lm_head"), key=lambda r: r["kl"])
    linears = {"qkv_proj": "self_attn.q_proj", "o_proj": "self_attn.o_proj", "gate_up_proj": "mlp.gate_proj",
               "down_proj": "mlp.down_proj"}
    assert precisions[f"model.layers.{top['layer']}.{linears[top['op']]}"] == "bf16"
    assert "int4" in precisions.values() and "bf16" in precisions.values()
    assert len(_generate(budget).outputs[0].token_ids) == 4


def test_auto_writes_plan_csv_and_plot(report, tiny_llama_dir, tmp_path):
    report_path = tmp_path / "sens.json"
    report_path.write_text(json.dumps(report))
    out = tmp_path / "auto"
    main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--auto",
          "--sensitivity", str(report_path), "--max-ppl-increase", "1000", "--output", str(out), *CALIB, *SEARCH])
    rows = (out / "precision_search.csv").read_text().splitlines()
    assert rows[0].startswith("label,int4,int8,bf16,weight_bytes,ppl,dppl_percent") and len(rows) >= 2
    written = [r for r in csv.DictReader((out / "precision_search.csv").open()) if r["written_dppl_percent"]]
    assert len(written) == 1 and written[0]["label"] == "bf16=0 int8=0"  # the choice, checked as written
    assert (out / "precision_search.png").stat().st_size > 10_000
    precisions = json.loads((out / "quantization_config.json").read_text())["module_precisions"]
    assert set(precisions.values()) == {"int4"}  # a bound this loose keeps everything at int4
    assert len(_generate(out).outputs[0].token_ids) == 4
    with pytest.raises(SystemExit, match="no plan"):
        main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--auto", "--sensitivity", str(report_path), "--max-ppl-increase", "-50",
              "--output", str(tmp_path / "none"), *CALIB, *SEARCH])


def test_fallback_copies_and_drift_reference(report, tiny_llama_dir, tmp_path):
    from ember.engine.drift import DriftReference
    from ember.quant.checkpoint import load_drift_reference

    report_path = tmp_path / "sens.json"
    report_path.write_text(json.dumps(report))
    out = tmp_path / "copies"
    main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
          "--fallback-copies", "all", "--output", str(out), *CALIB])
    payload = json.loads((out / "quantization_config.json").read_text())
    assert sorted(payload["fallback_modules"]) == payload["quantized_modules"] and len(payload["quantized_modules"]) == 14
    reference = DriftReference.from_dict(load_drift_reference(out))
    assert reference.module == "model.norm" and len(reference.probs) == 512 and reference.low < 0 < reference.high
    assert len(_generate(out).outputs[0].token_ids) == 4  # loads with the copies
    sensitive = tmp_path / "sensitive"
    main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
          "--sensitivity", str(report_path), "--bf16-budget", "0.2", "--fallback-copies", "sensitive",
          "--output", str(sensitive), *CALIB])
    payload = json.loads((sensitive / "quantization_config.json").read_text())
    kept = {n for n, p in payload["module_precisions"].items() if p == "bf16"}
    assert set(payload["fallback_modules"]) == set(payload["quantized_modules"])  # every op flagged at KL 0
    assert kept and not kept & set(payload["fallback_modules"])


def test_auto_latency_objective_measures_decode_time(report, tiny_llama_dir, tmp_path):
    report_path = tmp_path / "sens.json"
    report_path.write_text(json.dumps(report))
    out = tmp_path / "latency"
    main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--auto",
          "--objective", "latency", "--dtype", "float32", "--sensitivity", str(report_path),
          "--max-ppl-increase", "1000", "--output", str(out), *CALIB, *SEARCH])
    rows = list(csv.DictReader((out / "precision_search.csv").open()))
    timed = [r for r in rows if r["tpot_ms"]]
    assert timed and all(float(r["tpot_ms"]) > 0 for r in timed)
    assert json.loads((out / "quantization_config.json").read_text())["module_precisions"]


def test_restore_reuses_a_report_and_ranks_per_byte(report, tiny_llama_dir, tmp_path):
    report_path = tmp_path / "sens.json"
    report_path.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="no restore_gain"):
        main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--sensitivity", str(report_path), "--bf16-budget", "0.3", "--rank-by", "restore_per_byte",
              "--output", str(tmp_path / "refused"), *CALIB])
    with pytest.raises(SystemExit, match="measured with"):  # another group size than the report's
        main(["analyze", "sensitivity", "--model", tiny_llama_dir, "--method", "rtn", "--group-size", "64",
              "--restore", "--reuse", str(report_path), "--output", str(tmp_path / "x.json"), *CALIB])
    restored = tmp_path / "restored.json"
    main(["analyze", "sensitivity", "--model", tiny_llama_dir, "--method", "rtn", "--group-size", "32", "--restore",
          "--reuse", str(report_path), "--no-plot", "--output", str(restored), *CALIB])
    rows = json.loads(restored.read_text())["layers"]
    assert [r["kl"] for r in rows] == [r["kl"] for r in report["layers"]]  # the single-op figures are kept
    assert all("restore_gain" in r for r in rows) and rows[-1]["restore_gain"] == 0.0
    out = tmp_path / "budget"
    main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
          "--sensitivity", str(restored), "--bf16-budget", "0.3", "--rank-by", "restore_per_byte",
          "--output", str(out), *CALIB])
    precisions = json.loads((out / "quantization_config.json").read_text())["module_precisions"]
    top = max((r for r in rows if r["op"] != "lm_head"), key=lambda r: r["restore_gain"] / r["num_weights"])
    linears = {"qkv_proj": "self_attn.q_proj", "o_proj": "self_attn.o_proj", "gate_up_proj": "mlp.gate_proj",
               "down_proj": "mlp.down_proj"}
    assert precisions[f"model.layers.{top['layer']}.{linears[top['op']]}"] == "bf16"


def test_bf16_channels_clip_search_checkpoint_and_bad_flags(tiny_llama_dir, tmp_path):
    out = tmp_path / "channels"
    main(["quantize", "--model", tiny_llama_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--bf16-channels", "0.25", "--clip-search", "--output", str(out), *CALIB])
    recorded = json.loads((out / "quantization_config.json").read_text())
    assert recorded["bf16_channels"] == 0.25 and recorded["method_args"]["clip_search"] is True
    llm = LLM(model=str(out), dtype="float32", num_kv_blocks=32, max_model_len=128)
    q_proj = llm.engine.runner.model.model.layers[0].self_attn.q_proj
    assert q_proj.channel_index.numel() == q_proj.in_features // 4
    assert len(_generate(out).outputs[0].token_ids) == 4
    with pytest.raises(SystemExit, match="bf16_channels needs method='gptq'"):
        main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--bf16-channels", "0.25", "--output", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="clip_search is for GPTQ"):
        main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--clip-search", "--output", str(tmp_path / "bad")])


def test_bf16_channel_split_is_recorded_and_bad_splits_are_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "split"
    main(["quantize", "--model", tiny_llama_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--bf16-channels", "0.25", "--bf16-channel-split", "down_proj=2,gate_up_proj=0.5", "--output", str(out),
          *CALIB])
    recorded = json.loads((out / "quantization_config.json").read_text())
    assert recorded["method_args"]["channel_split"] == {"down_proj": 2.0, "gate_up_proj": 0.5}
    layer = LLM(model=str(out), dtype="float32", num_kv_blocks=32, max_model_len=128).engine.runner.model.model.layers[0]
    down = layer.mlp.down_proj
    gate_up = layer.mlp.up_proj if layer.mlp.gate_up_proj is None else layer.mlp.gate_up_proj  # fused in bf16 only
    assert down.channel_index.numel() > down.in_features // 4 > 0  # down_proj's channels cost the fewest bytes
    assert gate_up.channel_index.numel() < gate_up.in_features // 4
    for split, message in (("down_proj", "OP=WEIGHT"), ("down_proj=x", "OP=WEIGHT"), ("mlp=2", "among"),
                           ("down_proj=-1", "positive")):
        with pytest.raises(SystemExit, match=message):
            main(["quantize", "--model", tiny_llama_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
                  "--bf16-channels", "0.25", "--bf16-channel-split", split, "--output", str(tmp_path / "bad")])
