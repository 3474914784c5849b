"""Greedy outputs of the bundled model do not depend on what else is in the batch."""

import random

from ember import SamplingParams


def test_32_prompts_together_equal_each_alone(bundled_llm_fp32):
    tokenizer = bundled_llm_fp32.get_tokenizer()
    rng = random.Random(0)
    words = "the a king queen river light ship sea garden wind story old new red blue night".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    together = bundled_llm_fp32.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, together):
        alone = bundled_llm_fp32.generate(prompt, params, use_tqdm=False)[0]
        assert alone.prompt_token_ids == tokenizer.encode(prompt)
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids, prompt
