"""Calibration hooks: captured tensors are the real ones and every hook is removed."""
import pytest
import torch

from ember.quant.calibration import (ChannelStats, capture_activations, collect_layer_inputs, match_modules,
                                     run_layer, sample_calibration_batches)


def _num_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_inputs_outputs_and_remove(tiny_llama):
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad(), capture_activations(tiny_llama, ["*.mlp.down_proj"], outputs=True) as cap:
        tiny_llama(ids)
        assert _num_hooks(tiny_llama) == 2
    assert _num_hooks(tiny_llama) == 0
    assert sorted(cap.inputs) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    down = tiny_llama.model.layers[1].mlp.down_proj
    x = cap.inputs["model.layers.1.mlp.down_proj"][0]
    assert x.shape == (2, 8, 256)
    torch.testing.assert_close(cap.outputs["model.layers.1.mlp.down_proj"][0], down(x))


def test_hooks_removed_on_exception(tiny_llama):
    with pytest.raises(RuntimeError, match="boom"):
        with capture_activations(tiny_llama, ["*q_proj", "*k_proj"]):
            assert _num_hooks(tiny_llama) == 4
            raise RuntimeError("boom")
    assert _num_hooks(tiny_llama) == 0


def test_no_match_is_an_error(tiny_llama):
    with pytest.raises(ValueError):
        with capture_activations(tiny_llama, ["*nothing*"]):
            pass
    assert _num_hooks(tiny_llama) == 0
    assert len(match_modules(tiny_llama, ["model.layers.0.self_attn.*_proj"])) == 4


def test_channel_stats_reducer(tiny_llama):
    ids = torch.randint(0, 256, (3, 5))
    stats = ChannelStats()
    with torch.no_grad(), capture_activations(tiny_llama, ["model.layers.0.self_attn.q_proj"], reducer=stats) as cap:
        tiny_llama(ids)
        tiny_llama(ids[:1])
    assert not cap.inputs  # reduced, not stored
    name = "model.layers.0.self_attn.q_proj"
    assert stats.num_tokens[name] == 20 and stats.abs_max[name].shape == (128,)


def test_layer_replay_matches_model(tiny_llama):
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        hidden = tiny_llama(ids, output_hidden_states=True).hidden_states
    before = _num_hooks(tiny_llama)  # transformers keeps its own output-recording hooks
    inputs = collect_layer_inputs(tiny_llama, [ids])
    assert _num_hooks(tiny_llama) == before
    torch.testing.assert_close(inputs.hidden[0], hidden[0])
    out = run_layer(tiny_llama.model.layers[0], inputs)
    torch.testing.assert_close(out[0], hidden[1], rtol=1e-5, atol=1e-5)


def test_sample_calibration_batches():
    stream = torch.arange(1000)
    batches = sample_calibration_batches(stream, num_samples=5, seq_len=64, seed=3)
    assert len(batches) == 5 and all(b.shape == (1, 64) for b in batches)
    assert all(torch.equal(b[0], torch.arange(int(b[0, 0]), int(b[0, 0]) + 64)) for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, sample_calibration_batches(stream, 5, 64, seed=3)))
    with pytest.raises(ValueError):
        sample_calibration_batches(torch.arange(10), 1, 64)
