"""Every vLLM request field is implemented or refused, never silently ignored; request-body validation.

The field lists are vLLM's (its `ChatCompletionRequest`, `CompletionRequest` and tokenize requests in
vllm/entrypoints/openai, current and the older `guided_*` / `best_of` generation), not derived from Ember.
"""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from ember.server.errors import APIError
from ember.server.field_policy import REFUSED_FIELDS, check_request_fields
from ember.server.protocol import (MAX_JSON_DEPTH, MAX_LOGIT_BIAS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, ChatCompletionRequest,
                                   CompletionRequest, DetokenizeRequest, TokenizeRequest)

_SAMPLING = """frequency_penalty logit_bias n presence_penalty seed stop stream stream_options temperature top_p
    user use_beam_search top_k min_p repetition_penalty watermarking length_penalty stop_token_ids
    include_stop_str_in_output ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens
    truncate_prompt_tokens truncation_side prompt_logprobs logprob_token_ids allowed_token_ids bad_words
    response_format structured_outputs priority request_id session_id return_tokens_as_token_ids return_token_ids
    routed_experts_prompt_start return_token_offsets return_mm_kwargs cache_salt kv_transfer_params
    ec_transfer_params vllm_xargs repetition_detection thinking_token_budget stream_interval model best_of
    guided_json guided_regex guided_choice guided_grammar guided_decoding_backend guided_whitespace_pattern
    logits_processors"""
VLLM_CHAT_FIELDS = (_SAMPLING + """ messages logprobs top_logprobs max_tokens max_completion_tokens tools
    tool_choice reasoning_effort include_reasoning parallel_tool_calls echo add_generation_prompt
    continue_final_message add_special_tokens documents chat_template chat_template_kwargs media_io_kwargs
    mm_processor_kwargs return_prompt_text structural_tag""").split()
VLLM_COMPLETION_FIELDS = (_SAMPLING + """ prompt echo logprobs max_tokens suffix prompt_embeds
    add_special_tokens""").split()
VLLM_TOKENIZE_FIELDS = """model prompt add_special_tokens return_token_strs messages add_generation_prompt
    continue_final_message chat_template chat_template_kwargs mm_processor_kwargs tools""".split()
VLLM_DETOKENIZE_FIELDS = ["model", "tokens"]

ROUTES = [("chat", ChatCompletionRequest, VLLM_CHAT_FIELDS), ("completions", CompletionRequest, VLLM_COMPLETION_FIELDS),
          ("tokenize", TokenizeRequest, VLLM_TOKENIZE_FIELDS), ("detokenize", DetokenizeRequest, VLLM_DETOKENIZE_FIELDS)]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("route,model,vllm_fields", ROUTES, ids=[r[0] for r in ROUTES])
def test_every_vllm_field_is_implemented_or_refused(route, model, vllm_fields):
    declared, refused = set(model.model_fields), set(REFUSED_FIELDS[route])
    unclassified = sorted(set(vllm_fields) - declared - refused)
    assert not unclassified, f"vLLM fields neither implemented nor refused on {route}: {unclassified}"
    assert not declared & refused  # a declared field never reaches the refusal check


def _check(model, body: dict, route: str) -> None:
    check_request_fields(model.model_validate(body), route)


def test_refused_fields_at_vllm_defaults_pass_and_others_are_named():
    _check(CompletionRequest, {"prompt": "x", "use_beam_search": False, "length_penalty": 1, "priority": 0,
                               "best_of": 2, "n": 2, "spaces_between_special_tokens": True, "suffix": ""},
           "completions")
    with pytest.raises(APIError) as info:
        _check(CompletionRequest, {"prompt": "x", "use_beam_search": True}, "completions")
    assert (info.value.status_code, info.value.param) == (501, "use_beam_search")


def test_a_malformed_field_is_a_400_before_any_501():
    body = {"prompt": "x", "suffix": "tail", "length_penalty": "long"}
    with pytest.raises(APIError) as info:
        _check(CompletionRequest, body, "completions")
    assert (info.value.status_code, info.value.param) == (400, "length_penalty")


def test_best_of_below_n_is_invalid_and_above_n_unsupported():
    with pytest.raises(APIError) as below:
        _check(CompletionRequest, {"prompt": "x", "n": 3, "best_of": 2}, "completions")
    with pytest.raises(APIError) as above:
        _check(CompletionRequest, {"prompt": "x", "n": 1, "best_of": 2}, "completions")
    assert (below.value.status_code, above.value.status_code) == (400, 501)


def test_unknown_fields_are_logged_and_ignored(caplog):
    body = {**CHAT, "frobnicate": 1, "messages": [{"role": "user", "content": "hi", "mood": "calm"}],
            "stream": True, "stream_options": {"include_usage": True, "sparkle": 1}, "use_beam_search": False}
    with caplog.at_level(logging.WARNING, logger="ember.server"):
        _check(ChatCompletionRequest, body, "chat")
    [record] = [r for r in caplog.records if "ignored" in r.getMessage()]
    message = record.getMessage()
    assert "'frobnicate'" in message and "'messages.0.mood'" in message and "'stream_options.sparkle'" in message
    assert "use_beam_search" not in message  # a known vLLM field at its default is not "unknown"


def test_media_part_is_501_and_a_part_without_type_400():
    with pytest.raises(APIError) as info:
        _check(ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "chat")
    assert (info.value.status_code, info.value.param) == (501, "messages")
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})


@pytest.mark.parametrize("body", [
    '{"prompt": "\\ud800"}', '{"prompt": ["ok", "a\\udfffb"]}', '{"prompt": "x", "stop": {"\\ud83d": 1}}',
    '{"prompt": "x", "structured_outputs": {"json": {"properties": {"\\udc00": {}}}}}'])
def test_lone_surrogates_are_refused_anywhere(body):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(json.loads(body))
    [error] = info.value.errors()
    assert "surrogate" in error["msg"] and error["ctx"]["param"] in ("prompt", "stop", "structured_outputs")


def test_surrogate_pairs_are_valid_text():
    assert CompletionRequest.model_validate(json.loads('{"prompt": "\\ud83d\\ude00"}')).prompt == "\U0001F600"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_is_bounded_without_recursion():
    # depth of a value = its path length: response_format (1), "deep" (2), then one per list level
    CompletionRequest.model_validate({"prompt": "x", "response_format": {"deep": _nested(MAX_JSON_DEPTH - 2)}})
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": "x", "response_format": {"deep": _nested(MAX_JSON_DEPTH - 1)}})
    assert info.value.errors()[0]["ctx"]["param"] == "response_format"
    with pytest.raises(ValidationError):  # far deeper than Python's recursion limit: still a plain error
        CompletionRequest.model_validate({"prompt": "x", "response_format": {"deep": _nested(100_000)}})


@pytest.mark.parametrize("field,limit,item", [("stop", MAX_STOP_STRINGS, "s"),
                                              ("stop_token_ids", MAX_STOP_TOKEN_IDS, 7)])
def test_list_bounds(field, limit, item):
    CompletionRequest.model_validate({"prompt": "x", field: [item] * limit})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", field: [item] * (limit + 1)})


def test_logit_bias_bound():
    CompletionRequest.model_validate({"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS)}})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}})
