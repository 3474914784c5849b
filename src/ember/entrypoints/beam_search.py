"""Beam search on the offline engine, as vLLM's `LLM.beam_search`: every step runs each live beam as a
one-token request and keeps the best `beam_width` continuations; beams share KV through the prefix cache.

Sharing: a beam's request is its whole sequence as a prompt. With prefix caching on, the full blocks of
that sequence were registered by the step that computed them, so the request only computes the tokens
past its last full cached block (at most `block_size`), and beams with a common prefix hold the same
blocks (reference counts of `KVCacheManager`). The last, partial block of each beam is its own.

Semantics are vLLM's: each beam's candidates are the sampled token plus its top 2 * beam_width by raw
logprob; a candidate ending in EOS (unless `ignore_eos`) completes at once, whatever its rank; the live
beams are the best `beam_width` other candidates; after `max_tokens` steps the completed and live beams
are ranked together by `get_beam_search_score`. Against Hugging Face `generate(num_beams=...)` (5.x),
which divides by the generated length (EOS included) and finalizes EOS only among the top `num_beams`
candidates, the two agree whenever no beam ends by EOS (here `ignore_eos` and there no EOS, or an EOS
that is never among a beam's candidates): then every returned beam has `max_tokens` tokens, the ranking
is the same, and Hugging Face's `sequences_scores` equal `cum_logprob / max_tokens ** length_penalty`.
They differ once beams end by EOS at different lengths (which length divides, which EOS candidates count,
and Hugging Face's `early_stopping`, which vLLM does not have: it always runs `max_tokens` steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from tqdm import tqdm

from ember.engine.prompt_truncation import encode_prompt
from ember.outputs import BeamSearchKVStats, BeamSearchOutput, BeamSearchSequence, RequestOutput
from ember.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from ember.entrypoints.llm import LLM

logger = logging.getLogger("ember.beam_search")


@dataclass
class _Instance:
    """The search state of one prompt: its live beams and the beams completed by EOS."""

    beams: list[BeamSearchSequence]
    cache_salt: str | None = None
    completed: list[BeamSearchSequence] = field(default_factory=list)


def get_beam_search_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None,
                          length_penalty: float = 1.0) -> float:
    """vLLM's ranking score: `cum_logprob / length ** length_penalty`, where the length counts the prompt
    and the generated tokens but not an ending EOS."""
    length = len(tokens) - (1 if tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (length ** length_penalty)


def beam_search(llm: "LLM", prompts: Sequence[tuple[str | list[int], str | None]], params: BeamSearchParams,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """Run the search for every prompt at once; see the module docstring and `LLM.beam_search`.

    `prompts` are (text or token ids, cache salt) pairs; text is tokenized as `LLM.generate` does.

    Raises:
        ValueError: a prompt that is empty, or whose length plus `max_tokens` exceeds `max_model_len`;
            nothing runs then.
        RuntimeError: the engine failed a beam's request (its blocks are freed, as every other request's).
    """
    engine = llm.engine
    instances = [_new_instance(engine, prompt, salt, params.max_tokens) for prompt, salt in prompts]
    manager = engine.kv_cache_manager
    if instances and not manager.enable_prefix_caching:
        logger.warning("prefix caching is off (enable_prefix_caching=False or KV eviction): beams share no "
                       "KV blocks and each step recomputes every beam")
    # As vLLM (after Hugging Face): 2 * beam_width candidates per beam, so that beam_width survive even
    # when the best ones end with EOS.
    step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature,
                                 detokenize=False)
    stats = BeamSearchKVStats()
    for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
        live = [(instance, beam) for instance in instances for beam in instance.beams]
        if not live:
            break
        manager.reset_peak_usage()
        results = llm.generate([{"prompt_token_ids": beam.tokens, "cache_salt": instance.cache_salt}
                                for instance, beam in live], step_params, use_tqdm=False)
        num_in_use, num_unshared = manager.peak_usage
        stats.num_blocks_in_use.append(num_in_use)
        stats.num_blocks_unshared.append(num_unshared)
        for instance in instances:
            _advance(instance, [r for (owner, _), r in zip(live, results) if owner is instance], params,
                     engine.eos_token_id)
    return [_finish(instance, params, engine, stats) for instance in instances]


def _new_instance(engine, prompt: str | list[int], salt: str | None, max_tokens: int) -> _Instance:
    """A search starting from the prompt's token ids, with one beam."""
    token_ids = encode_prompt(engine.tokenizer, prompt, None)
    max_len = engine.config.max_model_len
    if not token_ids:
        raise ValueError("the prompt is empty")
    if len(token_ids) + max_tokens > max_len:
        raise ValueError(f"this model's maximum context length is {max_len} tokens; the beam search asks for "
                         f"{len(token_ids)} prompt + {max_tokens} output tokens")
    return _Instance([BeamSearchSequence(list(token_ids), [])], salt)


def _advance(instance: _Instance, results: list[RequestOutput], params: BeamSearchParams,
             eos_token_id: int | None) -> None:
    """Extend each live beam by each of its candidates; EOS ones complete, the best others live on."""
    candidates: list[BeamSearchSequence] = []
    for beam, result in zip(instance.beams, results):
        if "error" in result.extra:  # the engine failed this beam's request alone; the search cannot go on
            raise RuntimeError(f"beam search step failed: {result.extra['error']}")
        entry = result.outputs[0].logprobs[0]  # token id -> Logprob of every candidate of this step
        for token_id, logprob in entry.items():
            cum_logprob = beam.cum_logprob + logprob.logprob
            if token_id == eos_token_id and not params.ignore_eos:
                tokens = beam.tokens + [token_id] if params.include_stop_str_in_output else beam.tokens
                instance.completed.append(BeamSearchSequence(tokens, beam.logprobs + [entry], cum_logprob,
                                                             finish_reason="stop", stop_reason=token_id))
            else:
                candidates.append(BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [entry],
                                                     cum_logprob))
    candidates.sort(key=lambda b: _score(b, params, eos_token_id), reverse=True)
    instance.beams = candidates[:params.beam_width]


def _finish(instance: _Instance, params: BeamSearchParams, engine, stats: BeamSearchKVStats) -> BeamSearchOutput:
    """The best `beam_width` of the completed and live beams, best first, with their text."""
    ranked = sorted(instance.completed + instance.beams, key=lambda b: _score(b, params, engine.eos_token_id),
                    reverse=True)
    best = ranked[:params.beam_width]
    for beam in best:
        beam.text = engine.tokenizer.decode(beam.tokens)
        beam.finish_reason = beam.finish_reason or "length"
    return BeamSearchOutput(best, stats)


def _score(beam: BeamSearchSequence, params: BeamSearchParams, eos_token_id: int | None) -> float:
    return get_beam_search_score(beam.tokens, beam.cum_logprob, eos_token_id, params.length_penalty)
