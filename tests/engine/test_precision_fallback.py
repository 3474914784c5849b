"""Per-request precision fallback: the drift monitor switches a request to its float copies exactly as a
manual `set_request_precision` at the same token would, and leaves the others alone."""
import pytest

from ember import LLM, SamplingParams

PROMPTS = [list(range(3 + i, 83 + i)) for i in range(4)]  # 80 tokens: the prompt fills the 64-token window


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory):
    from ember.cli.main import main

    out = tmp_path_factory.mktemp("fallback") / "int4-copies"
    main(["quantize", "--model", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32",
          "--fallback-copies", "all", "--num-samples", "2", "--calib-seq-len", "32", "--output", str(out)])
    return str(out)


def _run(llm, switch_at=None):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        if switch_at is not None:
            for request in list(engine.scheduler.running):
                if request.request_id in switch_at and request.num_output_tokens == switch_at[request.request_id]:
                    engine.set_request_precision(request.request_id, "bf16")
    return [outputs[f"r{i}"] for i in range(len(PROMPTS))]


def test_fallback_switches_like_a_manual_switch(checkpoint):
    calm = _run(LLM(model=checkpoint, dtype="float32", precision_fallback=True, fallback_kl=1e6, fallback_skew=1e6))
    plain = _run(LLM(model=checkpoint, dtype="float32"))
    assert [o.outputs[0].token_ids for o in calm] == [o.outputs[0].token_ids for o in plain]
    assert all(o.precision_switch_token is None for o in calm)

    llm = LLM(model=checkpoint, dtype="float32", precision_fallback=True, fallback_kl=1e-12, fallback_skew=1e6)
    drifted = _run(llm)
    assert all(o.precision_switch_token == 1 for o in drifted)  # checked with the first token: the prompt's window
    assert llm.get_stats().num_precision_fallbacks_total == len(PROMPTS)
    manual = _run(LLM(model=checkpoint, dtype="float32"), switch_at={f"r{i}": 1 for i in range(len(PROMPTS))})
    assert [o.outputs[0].token_ids for o in drifted] == [o.outputs[0].token_ids for o in manual]
    assert [o.outputs[0].token_ids for o in drifted] != [o.outputs[0].token_ids for o in plain]  # the switch matters


def test_fallback_needs_copies_and_a_reference(tiny_llama_dir):
    with pytest.raises(ValueError, match="fallback-copies"):
        LLM(model=tiny_llama_dir, dtype="float32", precision_fallback=True)
    with pytest.raises(ValueError, match="fallback_kl"):
        LLM(model=tiny_llama_dir, dtype="float32", precision_fallback=True, fallback_kl=0.0)


def test_one_request_forced_over_threshold_mid_generation(checkpoint, monkeypatch):
    """Batch of 8 with 40-token prompts: the window fills 24 tokens into the generation. One request is
    forced over threshold there; the other 7 keep their tokens, and it continues exactly like a request
    switched by hand at the same token (which the precision-mask tests check against Hugging Face)."""
    from ember.engine.drift import DriftCheck, DriftMonitor

    prompts = [list(range(5 + 3 * i, 45 + 3 * i)) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    real_check = DriftMonitor.check

    def forced(self, request_id):
        verdict = real_check(self, request_id)
        if verdict is not None and request_id == "3":
            return DriftCheck(verdict.kl, verdict.skew, True)
        return verdict

    plain = LLM(model=checkpoint, dtype="float32").generate([{"prompt_token_ids": p} for p in prompts], params,
                                                           use_tqdm=False)
    monkeypatch.setattr(DriftMonitor, "check", forced)
    llm = LLM(model=checkpoint, dtype="float32", precision_fallback=True, fallback_kl=1e6, fallback_skew=1e6)
    ids = [llm.engine.new_request_id() for _ in prompts]
    assert ids[3] == "3"
    for request_id, prompt in zip(ids, prompts):
        llm.engine.add_request(request_id, prompt, params)
    done = {}
    while llm.engine.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.engine.step() if o.finished})
    forced_out = done["3"]
    assert forced_out.precision_switch_token == 64 - 40 + 1  # the window filled with the 24th generated token
    for i in (0, 1, 2, 4, 5, 6, 7):
        assert done[ids[i]].outputs[0].token_ids == plain[i].outputs[0].token_ids
        assert done[ids[i]].precision_switch_token is None
    manual = _switched_by_hand(checkpoint, prompts[3], params, forced_out.precision_switch_token)
    assert forced_out.outputs[0].token_ids == manual
    assert manual != plain[3].outputs[0].token_ids  # the switch changes the continuation


def _switched_by_hand(checkpoint, prompt, params, at_token):
    engine = LLM(model=checkpoint, dtype="float32").engine
    engine.add_request("x", prompt, params)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        request = engine.scheduler.requests.get("x")
        if request is not None and request.num_output_tokens == at_token and request.dense_from_position is None:
            engine.set_request_precision("x", "bf16")
    return out.outputs[0].token_ids
