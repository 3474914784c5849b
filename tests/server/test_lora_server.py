"""`ember serve --enable-lora`: adapters chosen by `model`, listed in /v1/models, loaded and unloaded while
serving; answers equal the offline engine's on the same adapter (itself checked against `peft`)."""

import pytest
from server_helpers import running_server

from ember import LLM, LoRARequest, SamplingParams

PROMPT = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "64", "--enable-lora",
         "--max-loras", "2", "--max-lora-rank", "8"]


@pytest.fixture(scope="module")
def lora_server(tiny_llama_dir, tiny_lora_adapters, tmp_path_factory):
    flags = ["--model", tiny_llama_dir, *FLAGS, "--lora-modules", f"all={tiny_lora_adapters['all'][0]}"]
    with running_server(flags, tmp_path_factory.mktemp("serve-lora")) as server:
        yield server


def _offline_text(tiny_llama_dir, lora_request) -> str:
    llm = LLM(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64, enable_lora=True,
              max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False,
                        lora_request=lora_request)[0].outputs[0].text


def _complete(server, model: str):
    return server.client().completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})


def test_adapters_are_served_listed_loaded_and_unloaded(lora_server, tiny_llama_dir, tiny_lora_adapters):
    base, http = lora_server.model, lora_server.http()
    cards = {card.id: card for card in lora_server.client().models.list().data}
    assert set(cards) == {base, "all"} and cards["all"].parent == base

    out = _complete(lora_server, "all")
    assert out.model == "all"
    assert out.choices[0].text == _offline_text(tiny_llama_dir, LoRARequest("all", 1, tiny_lora_adapters["all"][0]))
    assert _complete(lora_server, base).choices[0].text == _offline_text(tiny_llama_dir, None)

    qv_path = tiny_lora_adapters["qv"][0]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": qv_path}).status_code == 200
    assert {card.id for card in lora_server.client().models.list().data} == {base, "all", "qv"}
    assert _complete(lora_server, "qv").choices[0].text == _offline_text(tiny_llama_dir, LoRARequest("qv", 2, qv_path))
    chat = lora_server.client().chat.completions.create(model="qv", messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=4)
    assert chat.model == "qv"

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": qv_path})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and "not a PEFT adapter directory" in bad.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "qv"}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "qv"}).status_code == 404
    gone = http.post("/v1/completions", json={"model": "qv", "prompt": PROMPT, "max_tokens": 2})
    assert gone.status_code == 404
    assert _complete(lora_server, "all").choices[0].text == out.choices[0].text  # others keep serving


def test_lora_modules_flag_takes_vllm_forms_and_refuses_others():
    from ember.server.config import ServerConfig

    config = ServerConfig(lora_modules=["a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}'])
    assert config.lora_modules == ("a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}')
    assert config.lora_paths() == {"a": "/x", "b": "/y"}
    for bad in (["noequals"], ["=/x"], ["a="], ["a=/x", "a=/y"], ['{"name": "c"}'], ["{not json"]):
        with pytest.raises(ValueError, match="lora_modules entry"):
            ServerConfig(lora_modules=bad)
