"""Sliding-window perplexity against transformers' loss on the same windows."""

import math

import torch

from ember.eval.perplexity import perplexity
from ember.loader.model_loader import build_model, load_state


def reference_perplexity(model, ids, window, stride):
    """The sliding-window recipe from transformers' perplexity guide, on the HF model."""
    nll, count, prev_end = 0.0, 0, 0
    for start in range(0, len(ids), stride):
        end = min(start + window, len(ids))
        target_len = end - prev_end
        input_ids = torch.tensor([ids[start:end]])
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        with torch.inference_mode():
            loss = model(input_ids, labels=labels).loss
        n = (labels[:, 1:] != -100).sum().item()
        nll += loss.item() * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def test_perplexity_matches_transformers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    config, state = load_state(tiny_llama_dir)
    model = build_model(config, state, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = perplexity(model, ids, window=128, stride=64)
    expected, count = reference_perplexity(reference, ids, 128, 64)
    assert ours.num_tokens == count == 299
    assert abs(ours.perplexity - expected) / expected < 1e-4
