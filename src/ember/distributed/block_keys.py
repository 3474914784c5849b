"""Process-independent identities of full prompt blocks: chained digests that the router and the KV
pool compute the same way in every process (Python's `hash` of a string differs between processes)."""

from __future__ import annotations

import hashlib
import struct

BlockKey = bytes  # 16-byte digest naming a block's tokens and everything before them


def block_keys(token_ids: list[int], block_size: int, salt: str | None = None,
               max_blocks: int | None = None) -> list[BlockKey]:
    """One key per full block of `token_ids`, each chained over the previous one (and the salt on the first).

    Two prompts share the first k keys exactly when they share their first k full blocks (and salt).
    """
    num_blocks = len(token_ids) // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    parent = hashlib.blake2b((salt or "").encode(), digest_size=16).digest()
    keys = []
    for i in range(num_blocks):
        block = token_ids[i * block_size:(i + 1) * block_size]
        parent = hashlib.blake2b(parent + struct.pack(f"<{block_size}q", *block), digest_size=16).digest()
        keys.append(parent)
    return keys
