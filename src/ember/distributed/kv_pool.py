"""The KV pool of prefill/decode disaggregation: full prompt blocks' KV addressed by their `block_keys`,
shared by every worker (a prefix cache one level above each engine's own) and bounded by bytes, LRU.

The blocks of one export travel as one chunk ([num_blocks, block_nbytes] bytes); the pool maps each key
to (chunk, row), and counts and evicts whole chunks: a chunk's bytes stay held while any of its keys
does. With Ray the chunk is an object in Ray's object store (the pool, an actor, keeps its ObjectRef, so
the bytes never pass through it or the driver); in process, and for the mp executor behind a
`multiprocessing` manager, the chunk is the array itself.
"""

from __future__ import annotations

import multiprocessing
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.managers import BaseManager
from typing import Any, Callable

import numpy as np

from ember.distributed.block_keys import BlockKey

DEFAULT_KV_POOL_BYTES = 2 * 2**30


@dataclass
class KVPoolStats:
    """What the pool holds and how it served (block counts)."""

    num_blocks: int
    num_bytes: int
    capacity_bytes: int
    num_queried_blocks: int  # blocks asked for by `get`
    num_hit_blocks: int  # of those, blocks served
    num_put_blocks: int  # blocks stored by `put`
    num_evicted_blocks: int


class KVPool:
    """LRU map BlockKey -> (chunk, row), at most `capacity_bytes` of chunks.

    Invariants: the held bytes are the whole chunks that any key still names (a chunk's memory lives
    until its last key goes, so that is what is counted) and never exceed the capacity; eviction takes
    least recently used chunks whole, with all their keys. A prefix's blocks are touched head last, so a
    prefix exported in several chunks loses its tail chunk before its head (a block is only useful while
    every block before it is present: lookups stop at the first missing key).
    """

    def __init__(self, capacity_bytes: int = DEFAULT_KV_POOL_BYTES) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"the KV pool's capacity must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: dict[BlockKey, tuple[Any, int]] = {}  # (chunk, row)
        # id(chunk) -> (chunk, its keys here, its bytes), least recently used first
        self._chunks: OrderedDict[int, tuple[Any, list[BlockKey], int]] = OrderedDict()
        self._num_bytes = 0
        self._counts = {"queried": 0, "hit": 0, "put": 0, "evicted": 0}

    def lookup(self, keys: list[BlockKey]) -> int:
        """How many leading `keys` are present (they count as used)."""
        num = 0
        while num < len(keys) and keys[num] in self._entries:
            num += 1
        self._touch(keys[:num])
        return num

    def get(self, keys: list[BlockKey]) -> list[tuple[Any, int]]:
        """(chunk, row) of each leading present key, in order; stops at the first missing one."""
        num = self.lookup(keys)
        self._counts["queried"] += len(keys)
        self._counts["hit"] += num
        return [self._entries[key] for key in keys[:num]]

    def put(self, keys: list[BlockKey], chunk: Any, block_nbytes: int) -> int:
        """Store row i of `chunk` (one row per key) under keys[i]; keys already present keep their old copy.
        Least recently used chunks are evicted to make room. A chunk larger than the whole pool keeps the
        rows that fit when it is an array (copied, so the rest is freed), else nothing.

        Returns:
            how many keys were stored.
        """
        new = [(row, key) for row, key in enumerate(keys) if key not in self._entries]
        if not new:
            self._touch(keys)
            return 0
        held = self._chunks.get(id(chunk))  # the same array again (in process): its bytes count once
        if held is None:
            nbytes = len(keys) * block_nbytes
            if nbytes > self.capacity_bytes:
                fit = self.capacity_bytes // max(block_nbytes, 1)
                if not isinstance(chunk, np.ndarray) or fit == 0:
                    return 0
                chunk, keys = chunk[:fit].copy(), keys[:fit]
                new, nbytes = [(row, key) for row, key in new if row < fit], fit * block_nbytes
                if not new:
                    return 0
            while self._chunks and self._num_bytes + nbytes > self.capacity_bytes:
                self._evict(self._chunks.popitem(last=False)[1])
            held = self._chunks[id(chunk)] = (chunk, [], nbytes)
            self._num_bytes += nbytes
        held[1].extend(key for _, key in new)
        self._entries.update((key, (chunk, row)) for row, key in new)
        self._counts["put"] += len(new)
        self._touch(keys)
        return len(new)

    def drop(self, keys: list[BlockKey]) -> None:
        """Forget `keys` (their bytes were lost, e.g. with the worker that owned them); a chunk none of whose
        keys is left is freed."""
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is None:
                continue
            chunk_id = id(entry[0])
            _, chunk_keys, nbytes = self._chunks[chunk_id]
            chunk_keys.remove(key)
            if not chunk_keys:
                del self._chunks[chunk_id]
                self._num_bytes -= nbytes

    def stats(self) -> KVPoolStats:
        c = self._counts
        return KVPoolStats(len(self._entries), self._num_bytes, self.capacity_bytes, c["queried"], c["hit"],
                           c["put"], c["evicted"])

    def _evict(self, held: tuple[Any, list[BlockKey], int]) -> None:
        _, chunk_keys, nbytes = held
        for key in chunk_keys:
            del self._entries[key]
        self._num_bytes -= nbytes
        self._counts["evicted"] += len(chunk_keys)

    def _touch(self, keys: list[BlockKey]) -> None:
        for key in reversed(keys):  # the head's chunk ends most recently used
            entry = self._entries.get(key)
            if entry is not None:
                self._chunks.move_to_end(id(entry[0]))


def as_segments(entries: list[tuple[Any, int]], resolve: Callable[[list], list],
                key: Callable[[Any], Any] = id) -> list[np.ndarray]:
    """Runs of consecutive rows of one chunk, as [rows, block_nbytes] views (no copy), in key order.
    `resolve` turns the distinct chunks into arrays (ray.get for ObjectRefs); `key` names a chunk (its
    id in process; ObjectRefs compare by object id, as one ref may arrive as several Python objects)."""
    distinct = list({key(chunk): chunk for chunk, _ in entries}.values())
    arrays = {key(chunk): array for chunk, array in zip(distinct, resolve(distinct))}
    segments: list[np.ndarray] = []
    start = 0
    for i in range(1, len(entries) + 1):
        if (i == len(entries) or key(entries[i][0]) != key(entries[i - 1][0])
                or entries[i][1] != entries[i - 1][1] + 1):
            chunk, row = entries[start]
            segments.append(arrays[key(chunk)][row:row + i - start])
            start = i
    return segments


class LocalKVPoolClient:
    """A worker's view of an in-process `KVPool` (tests) or of one behind a manager proxy (mp executor)."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def lookup(self, keys: list[BlockKey]) -> int:
        return self.pool.lookup(keys)

    def put(self, keys: list[BlockKey], blocks: np.ndarray) -> None:
        """Store `blocks` [len(keys), block_nbytes] uint8 under `keys`."""
        self.pool.put(keys, blocks, blocks.shape[1])

    def get(self, keys: list[BlockKey]) -> list[np.ndarray]:
        """The leading present blocks of `keys` as segments (see `as_segments`)."""
        return as_segments(self.pool.get(keys), lambda chunks: chunks)

    def drop(self, keys: list[BlockKey]) -> None:
        self.pool.drop(keys)

    def stats(self) -> KVPoolStats:
        return self.pool.stats()


class RayKVPoolClient:
    """A worker's view of the pool actor: blocks go into Ray's object store from the worker (which owns
    them: when it dies they are lost, and readers drop them as misses), the actor keeps only the refs."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def lookup(self, keys: list[BlockKey]) -> int:
        import ray

        return ray.get(self.actor.lookup.remote(keys))

    def put(self, keys: list[BlockKey], blocks: np.ndarray) -> None:
        import ray

        ref = ray.put(blocks)
        # Nested in a list, the ref reaches the actor unresolved: the actor borrows it, the bytes stay put.
        ray.get(self.actor.put.remote(keys, [ref], blocks.shape[1]))

    def get(self, keys: list[BlockKey]) -> list[np.ndarray]:
        import ray

        return as_segments(ray.get(self.actor.get.remote(keys)), ray.get, key=lambda ref: ref)

    def drop(self, keys: list[BlockKey]) -> None:
        import ray

        ray.get(self.actor.drop.remote(keys))

    def stats(self) -> KVPoolStats:
        import ray

        return ray.get(self.actor.stats.remote())


class RayKVPool(KVPool):
    """The pool as a Ray actor: `put` takes the chunk's ObjectRef boxed in a list, so Ray hands the actor
    the ref itself (a top-level ref argument would be resolved into the bytes)."""

    def put(self, keys: list[BlockKey], boxed_chunk: list, block_nbytes: int) -> int:
        return super().put(keys, boxed_chunk[0], block_nbytes)


class _PoolManager(BaseManager):
    """Serves one `KVPool` from a process of its own to the mp executor's worker processes."""


_PoolManager.register("KVPool", KVPool)


def create_kv_pool(backend: str, capacity_bytes: int = DEFAULT_KV_POOL_BYTES, max_restarts: int = 3):
    """A KV pool for the executor `backend` and a client of it that pickles into worker processes.

    Returns:
        (client, shutdown): `shutdown()` ends the pool.
    """
    if backend == "ray":
        from ember.distributed.ray_env import init_ray

        ray = init_ray()
        actor = ray.remote(RayKVPool).options(num_cpus=0, max_restarts=max_restarts).remote(capacity_bytes)
        return RayKVPoolClient(actor), lambda: ray.kill(actor, no_restart=True)
    if backend == "mp":
        manager = _PoolManager(ctx=multiprocessing.get_context("spawn"))
        manager.start()
        return LocalKVPoolClient(manager.KVPool(capacity_bytes)), manager.shutdown
    if backend == "local":
        return LocalKVPoolClient(KVPool(capacity_bytes)), lambda: None
    raise ValueError(f"unknown KV pool backend {backend!r}; expected ray, mp or local")
