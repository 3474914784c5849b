"""`ember serve --speculative-config`: the same greedy tokens as without it, and the counters on /metrics."""

import json
import re

import pytest
from server_helpers import running_server

from ember import LLM, SamplingParams

PROMPT = [40, 41, 42, 43, 44, 45, 40, 41, 42, 43, 44, 45, 40, 41, 42]  # a repeated run: prompt lookup hits
FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "64"]
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "min_acceptance_rate": 0.0, "draft_budget": "max"}


@pytest.fixture(scope="module")
def spec_server(tiny_llama_dir, tmp_path_factory):
    flags = ["--model", tiny_llama_dir, *FLAGS, "--speculative-config", json.dumps(SPEC)]
    with running_server(flags, tmp_path_factory.mktemp("serve-spec")) as server:
        yield server


def test_completions_match_the_plain_engine_and_metrics_count_drafts(spec_server, tiny_llama_dir):
    expected = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64).generate(
        {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        use_tqdm=False)[0].outputs[0]
    client = spec_server.client()
    out = client.completions.create(model=spec_server.model, prompt=PROMPT, max_tokens=40, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=spec_server.model, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == expected.text
    drafted = spec_server.metric("ember:spec_decode_num_draft_tokens_total")
    accepted = spec_server.metric("ember:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafted
    assert spec_server.metric("ember:spec_decode_num_drafts_total") > 0
    text = spec_server.http().get("/metrics").text
    per_position = [float(v) for v in re.findall(
        r'^ember:spec_decode_num_accepted_tokens_per_pos_total\{model_name="[^"]*",position="\d"\} (\S+)$',
        text, re.M)]
    assert len(per_position) == 3 and sum(per_position) == accepted
    assert per_position == sorted(per_position, reverse=True)  # position i+1 needs position i accepted
