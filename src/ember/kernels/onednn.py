"""The bound on torch's oneDNN primitive caches, set before the process's first oneDNN call.

Every oneDNN matmul primitive torch creates (one per input shape) stays alive in two caches: oneDNN's
own primitive cache and ideep's LRU cache, 1024 entries each by default; an entry in either keeps it.
A bfloat16 primitive of this model holds 1-4 MiB (JIT code and buffers, more with more rows), and a
server's prompt steps bring a new row count nearly every step, so a 20-minute soak grew RSS by 700 MiB
and random row counts reach 3 GiB (docs/reliability.md). Both caches read their capacity from the
environment once, at their first use; no torch API sets it later.
"""

from __future__ import annotations

import os

# entries per cache: a prompt step uses 4-5 shapes (one per linear kind), so 64 keeps a dozen row counts;
# creating a missed primitive costs ~1 ms, within noise of an engine's steps (docs/reliability.md)
PRIMITIVE_CACHE_CAPACITY = 64
CACHE_CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_primitive_caches(capacity: int = PRIMITIVE_CACHE_CAPACITY) -> None:
    """Cap both caches at `capacity` entries unless the environment already names a capacity.

    It takes effect only before the process's first oneDNN primitive; `import ember` calls it.
    """
    for name in CACHE_CAPACITY_VARIABLES:
        os.environ.setdefault(name, str(capacity))
