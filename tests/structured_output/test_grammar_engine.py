"""Grammar compilation, the per-sequence matcher, the sampler's bitmask and the scheduler's wait, on the
bundled tokenizer; outputs are checked with `jsonschema` and `re`, not with our own code."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import pytest
import torch

from heap import HAS_MALLINFO2, live_heap_mib
from ember.request import Request
from ember.sampling_params import SamplingParams, StructuredOutputsParams
from ember.scheduler.scheduler import Scheduler
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.structured_output.manager import StructuredOutputManager
from ember.structured_output.request import StructuredOutputRequest

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def manager(bundled_llm_fp32):
    engine = bundled_llm_fp32.engine
    return StructuredOutputManager(engine.tokenizer.hf, engine.model_config.vocab_size, cache_size=2)


def test_compiles_once_per_constraint_and_evicts_least_recent(manager):
    a, b, c = (StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+"))
    first = manager.compile(a)
    assert manager.compile(StructuredOutputsParams(regex="a+")) is first  # the same grammar, cached
    manager.compile(b)
    manager.compile(a)  # a is now the most recent: c evicts b
    manager.compile(c)
    assert manager.compile(a) is first
    assert manager.compile(b) is not manager.compile(c)
    assert first.result() is not None


def test_cache_keys_name_a_schema_by_digest_not_by_its_text():
    """A dict schema and its JSON text are one grammar; a cached entry keeps 32 bytes of a 1 MiB schema."""
    import json
    import sys

    from ember.structured_output.backend import spec_key

    schema = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(40000)}}
    text = json.dumps(schema, sort_keys=True)
    assert len(text) > 2**20
    key = spec_key(StructuredOutputsParams(json=schema))
    assert key == spec_key(StructuredOutputsParams(json=text))
    assert key != spec_key(StructuredOutputsParams(json=text, disable_any_whitespace=True))
    assert sum(sys.getsizeof(part) for part in key) < 200
    assert spec_key(StructuredOutputsParams(choice=["a", "b"])) != spec_key(StructuredOutputsParams(choice=["a,b"]))


def test_a_failed_compile_is_reported_and_not_cached(manager):
    bad = StructuredOutputsParams(json={"type": "nosuchtype"})
    future = manager.compile(bad)
    with pytest.raises(ValueError, match="nosuchtype"):
        future.result()
    assert manager.compile(bad) is not future


def test_bitmask_masks_only_the_constrained_rows(manager, bundled_llm_fp32):
    tokenizer = bundled_llm_fp32.engine.tokenizer
    vocab = manager.vocab_size
    state = manager.new_request(StructuredOutputsParams(choice=["yes", "no"]))
    state.grammar.result()
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    masked = logits.clone()
    manager.apply_bitmask(masked, [None, state, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    # Reference: the tokens whose text starts one of the choices, from the tokenizer alone.
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in range(vocab)]
    allowed = {t for t in range(vocab) if texts[t] and ("yes".startswith(texts[t]) or "no".startswith(texts[t]))}
    kept = set(torch.nonzero(masked[1] > float("-inf")).flatten().tolist())
    assert kept == allowed
    assert torch.equal(masked[1, sorted(kept)], logits[1, sorted(kept)])


def test_reasoning_tokens_are_not_constrained():
    # A grammar that admits only "x"; reasoning ends at token 99 (a scripted token stream).
    grammar = concurrent.futures.Future()
    grammar.set_result("compiled")
    accepted = []

    class Matcher:
        def is_terminated(self):
            return False

        def accept_token(self, token):
            accepted.append(token)
            return token == 7

    state = StructuredOutputRequest(grammar, lambda g: Matcher(), lambda ids: 99 in ids)
    for output in ([5], [5, 6], [5, 6, 99]):
        assert not state.is_constraining
        assert state.accept(output)
    assert state.is_constraining and accepted == []
    assert state.accept([5, 6, 99, 7]) and accepted == [7]
    assert not state.accept([5, 6, 99, 7, 8]) and state.is_violated and not state.is_constraining


def test_grammar_starts_after_the_reasoning_parser_sees_the_end(bundled_llm_fp32):
    from ember.reasoning import create_reasoning_parser

    engine = bundled_llm_fp32.engine
    tokenizer = engine.tokenizer
    parser = create_reasoning_parser("deepseek_r1", tokenizer)
    manager = StructuredOutputManager(tokenizer.hf, engine.model_config.vocab_size,
                                      is_reasoning_end=parser.is_reasoning_end)
    state = manager.new_request(StructuredOutputsParams(choice=["yes", "no"]))
    state.grammar.result()
    output: list[int] = []
    for token in tokenizer.encode("Let me think.</think>", add_special_tokens=False):  # a scripted stream
        assert not state.is_constraining  # reasoning: no mask
        output.append(token)
        assert state.accept(output)
    assert state.reasoning_end_index == len(output) and state.is_constraining
    for token in tokenizer.encode("no", add_special_tokens=False) + [tokenizer.eos_token_id]:
        output.append(token)
        assert state.accept(output)
    assert state.matcher.is_terminated() and not state.is_constraining


def test_scheduler_passes_over_a_request_whose_grammar_compiles():
    scheduler = Scheduler(KVCacheManager(16, 4, enable_prefix_caching=False), 4, 64)
    pending = concurrent.futures.Future()
    slow = Request("slow", [1, 2, 3], SamplingParams())
    slow.structured_output = StructuredOutputRequest(pending, lambda g: None)
    fast = Request("fast", [4, 5, 6], SamplingParams())
    scheduler.add_request(slow)
    scheduler.add_request(fast)
    out = scheduler.schedule()
    assert [e.request.request_id for e in out.scheduled] == ["fast"]
    assert list(scheduler.waiting) == [slow]
    scheduler.check_invariants()
    pending.set_result("compiled")
    assert "slow" in [e.request.request_id for e in scheduler.schedule().scheduled]
    assert not scheduler.waiting


def test_offline_json_regex_and_choice(bundled_llm_fp32):
    llm = bundled_llm_fp32
    prompt = llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Reply in JSON: a person."}])
    outputs = llm.generate([prompt] * 3, [
        SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
        SamplingParams(temperature=1.0, seed=0, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}")),
        SamplingParams(temperature=1.0, seed=1, max_tokens=10,
                       structured_outputs=StructuredOutputsParams(choice=["left", "right"])),
    ], use_tqdm=False)
    json_out, regex_out, choice_out = (o.outputs[0] for o in outputs)
    jsonschema.validate(json.loads(json_out.text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", regex_out.text)
    assert choice_out.text in ("left", "right")
    assert json_out.finish_reason == regex_out.finish_reason == choice_out.finish_reason == "stop"


def test_bad_grammar_fails_its_request_only(bundled_llm_fp32):
    with pytest.raises(ValueError, match="regex"):
        bundled_llm_fp32.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    engine = bundled_llm_fp32.engine  # straight to the engine: the failure surfaces as an aborted output
    engine.add_request("bad", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= ")))
    engine.add_request("good", "hi", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert finals["bad"].outputs[0].finish_reason == "abort" and "grammar" in finals["bad"].extra["error"]
    assert finals["good"].outputs[0].finish_reason == "length" and len(finals["good"].outputs[0].token_ids) == 4


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc's mallinfo2 (2.33+)")
def test_distinct_schemas_past_the_cache_do_not_add_memory(manager):
    # a server sees schemas without end: past the manager's LRU (2 here) a compiled grammar must be freed
    def schema(i: int) -> StructuredOutputsParams:
        properties = {f"field_{i}": {"type": "string", "maxLength": 5 + i % 50}, "n": {"type": "integer", "minimum": i}}
        return StructuredOutputsParams(json={"type": "object", "required": [f"field_{i}"], "properties": properties})

    for i in range(10):
        manager.compile(schema(i)).result()
    before = live_heap_mib()
    for i in range(10, 110):
        manager.compile(schema(i)).result()
    # each of these grammars holds ~0.4 MiB: kept, the 100 would add ~40
    assert live_heap_mib() - before < 8
