"""KV-cache groups: which layers share a block table, and the window that lets a local layer's table let go of
old blocks.

A model with only global (full-attention) layers has one group: every layer reads the same blocks. A model that
interleaves sliding-window (local) layers with global ones (Gemma 3) splits its layers into groups of equal size
`width`, the global layers' groups first, then the local ones'. Each group has a block table of its own per
request; a local group's table drops the blocks that fell out of its window, so a long request holds
~window / block_size blocks there instead of one per block of its length (vLLM's hybrid KV-cache manager).

All groups draw block ids from one pool. Layer j of every group stores its K/V in the same tensors (buffer j), so
a block id costs `width` layers of memory and whichever group holds it owns those rows; one id is held by one
group at a time, never two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SLIDING = "sliding_attention"


@dataclass(frozen=True)
class KVCacheGroup:
    """The layers sharing a block table; `window` (None: a global group) is the keys each query sees, its own
    included."""

    layers: tuple[int, ...]
    window: int | None = None



def first_needed_block(window: int | None, position: int, block_size: int) -> int:
    """The first block a query at `position` (or any later one) reads: a global group (window None) reads from
    block 0, a local one from the block holding row position - window + 1."""
    if window is None:
        return 0
    return max(position - window + 1, 0) // block_size


def kv_cache_groups(num_layers: int, layer_types: tuple[str, ...] = (),
                    sliding_window: int | None = None) -> tuple[KVCacheGroup, ...]:
    """The model's groups: one of every layer unless it has both global and local layers; then
    width = gcd(#global, #local) layers per group, global groups first, layers in model order.

    A model whose layers are all local keeps one group with no window: the first group anchors the prefix
    cache's chain of blocks, so it never drops any (such a model keeps every block, as before groups).
    """
    local = [i for i, kind in enumerate(layer_types) if kind == SLIDING]
    full = [i for i in range(num_layers) if i not in set(local)]
    if not local or not full:
        return (KVCacheGroup(tuple(range(num_layers))),)
    width = math.gcd(len(full), len(local))
    groups = [KVCacheGroup(tuple(full[i:i + width])) for i in range(0, len(full), width)]
    groups += [KVCacheGroup(tuple(local[i:i + width]), sliding_window) for i in range(0, len(local), width)]
    return tuple(groups)


def buffer_of_layers(groups: tuple[KVCacheGroup, ...]) -> dict[int, tuple[int, int]]:
    """layer -> (its group, its buffer: the position in its group, whose tensors it shares with that position in
    every other group)."""
    return {layer: (g, j) for g, group in enumerate(groups) for j, layer in enumerate(group.layers)}
