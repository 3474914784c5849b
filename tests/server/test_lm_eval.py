"""lm-evaluation-harness (`lm-eval`, its `local-completions` model) scores a local multiple-choice task
against `ember serve`; each per-choice loglikelihood equals the offline engine's prompt logprobs."""

from __future__ import annotations

import json

import pytest
import yaml

from ember import SamplingParams
from server_helpers import API_KEY, MAX_MODEL_LEN

TASK = "ember_tiny_mc"
TOLERANCE = 1e-3  # nats, on the sum over a continuation's tokens
ITEMS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which planet is known as the red planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What do bees make?", ["milk", "silk", "wax paper", "honey"], 3),
    ("What colour is the sky on a clear day?", ["blue", "green", "purple", "black"], 0),
    ("Which animal says moo?", ["a cat", "a cow", "a dog", "a duck"], 1),
    ("What is two plus two?", ["three", "five", "four", "twenty-two"], 2),
    ("Water freezes at how many degrees Celsius?", ["100", "50", "-40", "0"], 3),
]


def write_task(folder) -> None:
    """A JSONL dataset and the task YAML that reads it (`dataset_path: json`): nothing is downloaded."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    config = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice",
              "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "choices", "doc_to_target": "answer",
              "metric_list": [{"metric": "acc"}]}
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split for causal models: trailing spaces of the context move to the continuation, the
    whole text is encoded once (no special tokens) and the context's tokens are cut off its front."""
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces:
        context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    num_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    return whole[:num_context], whole[num_context:]


def offline_score(llm, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's prompt logprobs, and whether each of its tokens was the most likely."""
    token_ids = context_ids + continuation_ids
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    scored = llm.generate({"prompt_token_ids": token_ids}, params, use_tqdm=False)[0].prompt_logprobs
    steps = [scored[i] for i in range(len(context_ids), len(token_ids))]
    chosen = [step[token_id].logprob for step, token_id in zip(steps, continuation_ids)]
    is_greedy = all(lp >= max(e.logprob for e in step.values()) for lp, step in zip(chosen, steps))
    return sum(chosen), is_greedy


def test_lm_eval_loglikelihoods_equal_offline_prompt_logprobs(server, server_twin_llm, tmp_path, monkeypatch):
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": API_KEY,
                        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}.items():
        monkeypatch.setenv(name, value)  # local-completions sends OPENAI_API_KEY as its bearer token
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    write_task(tmp_path)
    tokenizer_dir = tmp_path / "tokenizer"
    server_twin_llm.get_tokenizer().hf.save_pretrained(tokenizer_dir)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server.base_url}/v1/completions", "model": server.model,
                    "tokenizer": str(tokenizer_dir), "tokenizer_backend": "huggingface", "num_concurrent": 1,
                    "max_retries": 1, "max_length": MAX_MODEL_LEN},
        tasks=[TASK], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    samples = results["samples"][TASK]
    assert len(samples) == len(ITEMS)
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0

    from transformers import AutoTokenizer
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    scored = [(args, resp) for sample in samples for args, resp in zip(sample["arguments"], sample["filtered_resps"])]
    assert len(scored) == 4 * len(ITEMS)
    worst = 0.0
    for (context, continuation), (loglikelihood, is_greedy) in scored:
        token_ids = encode_pair(hf_tokenizer, context, continuation)
        expected, expected_greedy = offline_score(server_twin_llm, *token_ids)
        worst = max(worst, abs(loglikelihood - expected))
        assert abs(loglikelihood - expected) < TOLERANCE, (context, continuation)
        assert is_greedy == expected_greedy, (context, continuation)
    print(f"max |lm-eval - offline| loglikelihood over {len(scored)} choices: {worst:.2e}")
