"""vLLM's `truncate_prompt_tokens`: keep a prompt's last k tokens, before any length check.

Text is tokenized with the tokenizer's own truncation on the left (as vLLM's generation tokenizer, whose
`truncation_side` is "left"), so special tokens it adds, such as a BOS, stay and count within the k;
token-id prompts keep their last k ids.
"""

from __future__ import annotations


def resolve_truncation(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The number of prompt tokens to keep: None (all), -1 -> `max_model_len`, else the value itself.

    Raises:
        ValueError (param "truncate_prompt_tokens"): not an integer >= 1 or -1, or above `max_model_len`.
    """
    k = truncate_prompt_tokens
    if k is None:
        return None
    if not isinstance(k, int) or isinstance(k, bool) or not (k >= 1 or k == -1):
        raise _error(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {k!r}")
    if k == -1:
        return max_model_len
    if k > max_model_len:
        raise _error(f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({max_model_len}). "
                     "Please, select a smaller truncation size.")
    return k


def truncate_token_ids(token_ids: list[int], k: int | None) -> list[int]:
    """The last `k` ids (all of them when k is None or the prompt is no longer)."""
    return list(token_ids) if k is None or len(token_ids) <= k else list(token_ids[-k:])


def encode_prompt(tokenizer, prompt: str | list[int], k: int | None, add_special_tokens: bool = True) -> list[int]:
    """Prompt text or ids -> at most `k` token ids (see the module docstring for what text keeps)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens, max_length=k)
    return truncate_token_ids(prompt, k)


def _error(message: str) -> ValueError:
    err = ValueError(message)
    err.param = "truncate_prompt_tokens"  # the server's 400 names the field
    return err
