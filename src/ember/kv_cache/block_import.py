"""Blocks whose KV comes from elsewhere (prefill/decode disaggregation's KV pool): finding the cached prefix of a
token sequence without a request, and registering blocks whose KV the caller writes. A part of `KVCacheManager`
(its base class), kept apart as the KV transfer is its one user."""

from __future__ import annotations


class BlockImport:
    """`KVCacheManager`'s methods for imported KV blocks; they use its block pool and prefix-cache index."""

    def cached_prefix_blocks(self, token_ids: list[int], salt=None, max_blocks: int | None = None) -> list[int]:
        """The cached blocks holding the leading full blocks of `token_ids` (the first keyed by `salt`, a
        request's `kv_salt`), at most `max_blocks`. Takes no reference and leaves the hit counters alone.

        Returns:
            block ids in prefix order, [] with prefix caching off.

        Raises:
            ValueError: a cache with local groups (their windows are not moved between engines).
        """
        self._check_one_group()
        if not self.enable_prefix_caching:
            return []
        num_blocks = len(token_ids) // self.block_size
        return self._cached_prefix(token_ids, salt, num_blocks if max_blocks is None else min(max_blocks, num_blocks))[0]

    def _check_one_group(self) -> None:
        if len(self.windows) > 1:
            raise ValueError("prefill/decode KV transfer does not support models with sliding-window layers "
                             "(local KV-cache groups)")

    def _cached_prefix(self, token_ids: list[int], salt, num_blocks: int) -> tuple[list[int], list[int]]:
        """(the cached blocks holding the leading ones of the first `num_blocks` full blocks of `token_ids`, the
        chained hashes of all `num_blocks`)."""
        hashes = self._chain_hashes([], token_ids, salt, num_blocks)
        return self._cached_chain(token_ids, salt, hashes)[0], hashes

    def insert_cached_blocks(self, token_ids: list[int], num_blocks: int, salt=None) -> list[int]:
        """Cache the first `num_blocks` full blocks of `token_ids` with KV the caller writes (fetched from
        a KV pool): the leading ones cached already stay, each other one gets a block of its own that is
        registered as cached and left evictable, so a request's `get_computed_blocks` finds it.

        The caller must write the new blocks' KV before the next step runs. Like `free`, the blocks join
        the evictable set tail first (a prefix's head is evicted last).

        Returns:
            the ids of the newly registered blocks, in prefix order (positions len(cached) .. num_blocks - 1).

        Raises:
            ValueError: prefix caching off, `num_blocks` beyond the full blocks of `token_ids`, or fewer free
                blocks than the new ones need (nothing changes then).
        """
        bs = self.block_size
        if not self.enable_prefix_caching:
            raise ValueError("cached blocks can only be inserted with prefix caching on")
        if not 0 <= num_blocks <= len(token_ids) // bs:
            raise ValueError(f"{len(token_ids)} tokens hold {len(token_ids) // bs} full blocks, not {num_blocks}")
        self._check_one_group()
        cached, hashes = self._cached_prefix(token_ids, salt, num_blocks)
        if num_blocks - len(cached) > self.num_free_blocks - sum(self._ref_counts[b] == 0 for b in cached):
            raise ValueError(f"{num_blocks - len(cached)} blocks to insert but {self.num_free_blocks} free")
        for block_id in cached:  # held while allocating, so the head cannot be evicted under it
            self._take_ref(block_id)
        new = [self._allocate_block() for _ in range(num_blocks - len(cached))]
        parent_uid = self._index.get(cached[-1]).uid if cached else None
        for i, block_id in enumerate(new, start=len(cached)):
            tokens, block_salt = tuple(token_ids[i * bs:(i + 1) * bs]), salt if i == 0 else None
            parent_uid = self._index.insert(block_id, hashes[i], parent_uid, tokens, block_salt).uid
        for block_id in reversed(cached + new):
            self._drop_ref(block_id)  # cached: each unreferenced one turns evictable
        return new
