"""vLLM's `bad_words`: words turned into token sequences once per request, and the tokens they ban each step.

A bad word is tokenized twice, as written (leading spaces stripped) and with one leading space, so it is
banned at the start of the text and after a space; the spaced form is kept only when it is a different
sequence of the same length. A sequence of one token is always banned; a longer one bans its last token
only while the request's newest output tokens equal the rest of it (prompt tokens never count).
"""

from __future__ import annotations

from typing import Protocol


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def tokenize_bad_words(bad_words: list[str], tokenizer: _Encoder, vocab_size: int) -> list[list[int]]:
    """The token sequences of `bad_words` (vLLM's `SamplingParams.update_from_tokenizer`).

    Args:
        bad_words: non-empty strings (duplicates already dropped by `SamplingParams`).
        tokenizer: anything with `encode(text, add_special_tokens=False)`.
        vocab_size: V, the width of the logits the sequences index.
    Returns:
        One list of token ids per kept variant, in the order of `bad_words`.
    Raises:
        ValueError (param "bad_words"): a word that tokenizes to nothing, or a token id outside [0, V).
    """
    sequences: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise _error("bad_words entries must tokenize to at least one token")
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        # The spaced form counts only when it starts with another token and keeps the length: a tokenizer
        # that merges the space differently yields the same word, not a new one.
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    bad = [t for seq in sequences for t in seq if not 0 <= t < vocab_size]
    if bad:
        raise _error(f"the model vocabulary size is {vocab_size}, but the following tokens were specified "
                     f"as bad: {bad}; all token ids must satisfy 0 <= token_id < {vocab_size}")
    return sequences


def banned_token_ids(sequences: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """The tokens the next step may not sample: each sequence's last token when the last len - 1 output
    tokens equal its prefix (vLLM's `apply_bad_words` for one row)."""
    banned = []
    num_output = len(output_token_ids)
    for seq in sequences:
        prefix_len = len(seq) - 1
        if prefix_len > num_output:
            continue
        if prefix_len == 0 or output_token_ids[num_output - prefix_len:] == seq[:-1]:
            banned.append(seq[-1])
    return banned


def _error(message: str) -> ValueError:
    err = ValueError(message)
    err.param = "bad_words"  # the server's 400 names the field
    return err
