"""Owner of the paged KV cache's bookkeeping: block tables, reference counts, prefix cache."""

from __future__ import annotations

from collections import OrderedDict

from ember.kv_cache.block_allocator import BlockAllocator
from ember.kv_cache.block_hash import BlockHashIndex, HashFn, hash_block_tokens
from ember.request import Request


class KVCacheManager:
    """Maps each request to the KV blocks holding its tokens, sharing full blocks by content.

    A block is in exactly one of three states:
      - free: its allocator bit is clear;
      - used: referenced by one or more block tables (n > 1 samples and requests with a common
        prompt share full prefix blocks);
      - evictable: unreferenced but holding cached content; its allocator bit stays set and it
        is reused by a later prefix hit, or evicted least-recently-used first when clean blocks
        run out (eviction drops its hash entry).

    With prefix caching on, a full block is registered under a hash chained over its parent's
    hash, its token ids and (first block only) the request's `kv_salt` (its `cache_salt`, plus the
    dense op set of a request admitted on the high-precision path). A hit is served only after the
    token ids, salt and parent prefix are compared, so a collision never serves wrong KV. Only the
    first `request.num_cacheable_tokens` tokens are looked up or registered (a request that switched
    precision mid-flight shares only the KV from before the switch).
    Blocks are registered once the step that covers them is scheduled: the runner writes a
    step's KV before any attention of that step reads it.

    The scheduler calls `free` for every request that ends or is preempted; it also drops the
    hashes `get_computed_blocks` kept for the request.

    Internal fragmentation is counted as the scheduler asks for slots: a request's empty slots are
    its table's slots past the tokens its latest `allocate_slots` covered. Those slots sit in its
    unshared tail blocks (only full blocks are shared), so the per-request counts add up.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn | None = None) -> None:
        """Args:
            num_blocks: KV blocks in the pool.
            block_size: tokens per block.
            enable_prefix_caching: share and keep full blocks by content.
            hash_fn: `hash_fn(parent_hash, token_ids, salt) -> int`; defaults to
                `hash_block_tokens`. Injectable so tests can force collisions.

        Raises:
            ValueError: if `num_blocks` or `block_size` is not a positive integer.
        """
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn = hash_fn if hash_fn is not None else hash_block_tokens
        self._allocator = BlockAllocator(num_blocks)
        self._index = BlockHashIndex()
        self._ref_counts = [0] * num_blocks
        self._num_used_blocks = 0
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._block_tables: dict[str, list[int]] = {}
        self._block_hashes: dict[str, list[int]] = {}  # chained hash per full block, computed once
        self._block_uids: dict[str, list[int]] = {}  # prefix uid per registered table position
        self._num_covered_tokens: dict[str, int] = {}  # tokens the latest allocate_slots covered
        self._num_empty_slots = 0  # sum over tables of slots past their covered tokens
        self._num_table_blocks = 0  # sum of the tables' lengths: a shared block counts once per table
        self._peak_usage = (0, 0)  # most used blocks, most table blocks since `reset_peak_usage`
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: clean free blocks plus evictable cached ones."""
        return self._allocator.num_free + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests; cached-but-idle blocks count as free."""
        return self._num_used_blocks / self.num_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by live requests (each shared block counted once)."""
        return self._num_used_blocks

    @property
    def num_table_blocks(self) -> int:
        """Blocks the live requests' tables list, a shared block once per table: what they would hold if
        no block were shared."""
        return self._num_table_blocks

    @property
    def peak_usage(self) -> tuple[int, int]:
        """(most blocks in use, most table blocks) since `reset_peak_usage` or construction. Both only
        grow in `allocate_slots`, so the peaks are taken there (each on its own: they may differ in time)."""
        return self._peak_usage

    def reset_peak_usage(self) -> None:
        """Start a new window for `peak_usage` from the current usage."""
        self._peak_usage = (self._num_used_blocks, self._num_table_blocks)

    @property
    def fragmentation(self) -> float:
        """Empty slots in used blocks over all their slots, 0.0 when none is used.

        A slot counts as filled once a scheduled step covers its token (its KV is written in
        that step), so a request's empty slots are those past `num_computed_tokens` plus the
        tokens of its latest `allocate_slots`.
        """
        if self._num_used_blocks == 0:
            return 0.0
        return self._num_empty_slots / (self._num_used_blocks * self.block_size)

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit tokens over queried tokens since construction (0.0 before any query)."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Find the longest cached prefix of `request.all_token_ids`, in full blocks.

        At least one token is always left to compute (the model needs logits for it), so at most
        `(num_tokens - 1) // block_size` blocks are returned. No reference is taken: pass the
        blocks to `allocate_slots` before anything else allocates.

        A request asking for prompt logprobs reads no cached blocks (as in vLLM): cached rows are not
        recomputed, so their logprobs would be missing. Its own full blocks are still registered.

        Returns:
            (block_ids, num_computed_tokens); ([], 0) when prefix caching is off or the request wants
            prompt logprobs.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        bs = self.block_size
        max_blocks = self._num_cacheable_blocks(request, max(0, (request.num_tokens - 1) // bs))
        hashes = self._hashes_for(request, max_blocks)
        tokens = request.all_token_ids
        block_ids: list[int] = []
        parent_uid = None
        for i in range(max_blocks):
            salt = request.kv_salt if i == 0 else None
            block_id = self._index.lookup(hashes[i], parent_uid, tuple(tokens[i * bs:(i + 1) * bs]),
                                          salt)
            if block_id is None:
                break
            block_ids.append(block_id)
            parent_uid = self._index.get(block_id).uid
        num_computed_tokens = len(block_ids) * bs
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += num_computed_tokens
        return block_ids, num_computed_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> bool:
        """Grow the request's block table to cover its computed, hit and new tokens.

        The table must cover `request.num_computed_tokens + len(new_computed_blocks) *
        block_size + num_new_tokens` tokens. `new_computed_blocks` (from `get_computed_blocks`,
        only when the request holds no blocks) are appended first, one reference each.

        Returns:
            True on success; False, with nothing changed, when too few blocks are available.

        Raises:
            ValueError: if `num_new_tokens` is negative, or `new_computed_blocks` is given to a
                request that already holds blocks, with caching off, or no longer holds the
                request's tokens.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be non-negative, got {num_new_tokens}")
        computed = list(new_computed_blocks or [])
        table = self._block_tables.get(request.request_id, [])
        if computed:
            self._check_computed_blocks(request, table, computed)
        num_covered = request.num_kv_tokens + len(computed) * self.block_size + num_new_tokens
        num_to_allocate = -(-num_covered // self.block_size) - len(table) - len(computed)
        if num_to_allocate > 0:
            # Hit blocks sitting in the evictable set are about to be revived, not evicted.
            num_revived = sum(1 for block_id in computed if self._ref_counts[block_id] == 0)
            if num_to_allocate > self.num_free_blocks - num_revived:
                return False
        table = self._block_tables.setdefault(request.request_id, table)
        num_listed = len(table)
        self._num_empty_slots -= self._empty_slots(request.request_id)
        for block_id in computed:
            self._take_ref(block_id)
            table.append(block_id)
        for _ in range(num_to_allocate):
            table.append(self._allocate_block())
        self._num_covered_tokens[request.request_id] = num_covered
        self._num_empty_slots += self._empty_slots(request.request_id)
        self._num_table_blocks += len(table) - num_listed
        self._peak_usage = (max(self._peak_usage[0], self._num_used_blocks),
                            max(self._peak_usage[1], self._num_table_blocks))
        if self.enable_prefix_caching:
            num_full = self._num_cacheable_blocks(request, min(num_covered, request.num_tokens) // self.block_size)
            self._register_full_blocks(request, table, num_full)
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references and its kept hashes.

        Blocks left unreferenced become evictable if they hold cached content, tail first so a
        request's last blocks are evicted before its shared head; the rest return to the pool.
        """
        self._block_hashes.pop(request.request_id, None)
        self._block_uids.pop(request.request_id, None)
        self._num_empty_slots -= self._empty_slots(request.request_id)
        self._num_covered_tokens.pop(request.request_id, None)
        table = self._block_tables.pop(request.request_id, None) or []
        self._num_table_blocks -= len(table)
        for block_id in reversed(table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            self._num_used_blocks -= 1
            if block_id in self._index:
                self._evictable[block_id] = None  # most recently used end
            else:
                self._allocator.free(block_id)

    def truncate(self, request: Request, num_rows: int) -> None:
        """Keep only the blocks holding the request's first `num_rows` rows and free the rest: KV eviction
        compacted its kept tokens there, or speculative decoding rejected the drafts written past them.
        Those blocks are the request's own (eviction runs with prefix caching off; drafts are never
        registered, as they are not yet the request's tokens when their step is scheduled).

        Raises:
            ValueError: `num_rows` beyond what the table holds, or a block that is shared or cached.
        """
        table = self._block_tables[request.request_id]
        num_kept = -(-num_rows // self.block_size)
        if num_rows < 0 or num_kept > len(table):
            raise ValueError(f"cannot keep {num_rows} rows of a {len(table)}-block table")
        dropped = table[num_kept:]
        if any(self._ref_counts[b] != 1 or b in self._index for b in dropped):
            raise ValueError("eviction may only free blocks its request alone holds")
        self._num_empty_slots -= self._empty_slots(request.request_id)
        del table[num_kept:]
        self._num_table_blocks -= len(dropped)
        for block_id in dropped:
            self._ref_counts[block_id] = 0
            self._num_used_blocks -= 1
            self._allocator.free(block_id)
        self._num_covered_tokens[request.request_id] = num_rows
        self._num_empty_slots += self._empty_slots(request.request_id)

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] if it holds none)."""
        return list(self._block_tables.get(request_id, ()))

    def get_ref_count(self, block_id: int) -> int:
        """How many block tables hold `block_id`."""
        return self._ref_counts[block_id]

    def reset_prefix_cache(self) -> bool:
        """Evict every cached block. Refused (False) while any block is in use."""
        if self._num_used_blocks > 0:
            return False
        for block_id in self._evictable:
            self._allocator.free(block_id)
        self._evictable.clear()
        self._index.clear()
        return True

    # ---- blocks whose KV comes from elsewhere (prefill/decode disaggregation's KV pool) ----------
    def cached_prefix_blocks(self, token_ids: list[int], salt=None, max_blocks: int | None = None) -> list[int]:
        """The cached blocks holding the leading full blocks of `token_ids` (the first keyed by `salt`, a
        request's `kv_salt`), at most `max_blocks`. Takes no reference and leaves the hit counters alone.

        Returns:
            block ids in prefix order, [] with prefix caching off.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        num_blocks = len(token_ids) // bs if max_blocks is None else min(max_blocks, len(token_ids) // bs)
        block_ids: list[int] = []
        block_hash, parent_uid = None, None
        for i in range(num_blocks):
            tokens, block_salt = tuple(token_ids[i * bs:(i + 1) * bs]), salt if i == 0 else None
            block_hash = self._hash_fn(block_hash, tokens, block_salt)
            block_id = self._index.lookup(block_hash, parent_uid, tokens, block_salt)
            if block_id is None:
                break
            block_ids.append(block_id)
            parent_uid = self._index.get(block_id).uid
        return block_ids

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
        cached = self.cached_prefix_blocks(token_ids, salt, num_blocks)
        if num_blocks - len(cached) > self.num_free_blocks - sum(self._ref_counts[b] == 0 for b in cached):
            raise ValueError(f"{num_blocks - len(cached)} blocks to insert but {self.num_free_blocks} free")
        for block_id in cached:  # held while allocating, so the head cannot be evicted under it
            self._take_ref(block_id)
        new = [self._allocate_block() for _ in range(num_blocks - len(cached))]
        content = self._index.get(cached[-1]) if cached else None
        block_hash, parent_uid = (content.block_hash, content.uid) if content else (None, None)
        for i, block_id in enumerate(new, start=len(cached)):
            tokens, block_salt = tuple(token_ids[i * bs:(i + 1) * bs]), salt if i == 0 else None
            block_hash = self._hash_fn(block_hash, tokens, block_salt)
            parent_uid = self._index.insert(block_id, block_hash, parent_uid, tokens, block_salt).uid
        for block_id in reversed(cached + new):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._num_used_blocks -= 1
                self._evictable[block_id] = None  # most recently used end
        return new

    def _num_cacheable_blocks(self, request: Request, num_blocks: int) -> int:
        """`num_blocks` capped to the full blocks the request may share."""
        limit = request.num_cacheable_tokens
        return num_blocks if limit is None else min(num_blocks, limit // self.block_size)

    def _hashes_for(self, request: Request, num_blocks: int) -> list[int]:
        """The request's chained hashes for its first `num_blocks` full blocks, computed once."""
        hashes = self._block_hashes.setdefault(request.request_id, [])
        bs, tokens = self.block_size, request.all_token_ids
        for i in range(len(hashes), num_blocks):
            parent_hash = hashes[i - 1] if i > 0 else None
            salt = request.kv_salt if i == 0 else None
            hashes.append(self._hash_fn(parent_hash, tuple(tokens[i * bs:(i + 1) * bs]), salt))
        return hashes

    def _check_computed_blocks(self, request: Request, table: list[int],
                               computed: list[int]) -> None:
        """Reject hit blocks handed over out of turn, or evicted since `get_computed_blocks`."""
        if not self.enable_prefix_caching:
            raise ValueError("new_computed_blocks given while prefix caching is off")
        if table:
            raise ValueError(f"request {request.request_id!r} already holds blocks; "
                             "new_computed_blocks are only accepted at admission")
        bs, tokens = self.block_size, request.all_token_ids
        parent_uid = None
        for i, block_id in enumerate(computed):
            content = self._index.get(block_id)
            salt = request.kv_salt if i == 0 else None
            if content is None or not content.holds(parent_uid, tuple(tokens[i * bs:(i + 1) * bs]),
                                                     salt):
                raise ValueError(f"block {block_id} no longer holds block {i} of request "
                                 f"{request.request_id!r}")
            parent_uid = content.uid

    def _empty_slots(self, request_id: str) -> int:
        """Slots of the request's table past the tokens it last covered (0 before it has any)."""
        num_covered = self._num_covered_tokens.get(request_id)
        if num_covered is None:
            return 0
        return len(self._block_tables[request_id]) * self.block_size - num_covered

    def _take_ref(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._evictable[block_id]
            self._num_used_blocks += 1
        self._ref_counts[block_id] += 1

    def _allocate_block(self) -> int:
        """A block for new KV: a clean free one first, else the least recently used cached one."""
        if self._allocator.num_free > 0:
            block_id = self._allocator.allocate()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            self._index.remove(block_id)
        self._ref_counts[block_id] = 1
        self._num_used_blocks += 1
        return block_id

    def _register_full_blocks(self, request: Request, table: list[int], num_full: int) -> None:
        """Cache every table block, up to `num_full`, not yet registered for this request."""
        uids = self._block_uids.setdefault(request.request_id, [])
        if num_full <= len(uids):
            return
        hashes = self._hashes_for(request, num_full)
        bs, tokens = self.block_size, request.all_token_ids
        parent_uid = uids[-1] if uids else None
        for i in range(len(uids), num_full):
            content = self._index.get(table[i])  # set for prefix-hit blocks
            if content is None:
                token_ids = tuple(tokens[i * bs:(i + 1) * bs])
                salt = request.kv_salt if i == 0 else None
                twin = self._index.lookup(hashes[i], parent_uid, token_ids, salt)
                if twin is None:
                    content = self._index.insert(table[i], hashes[i], parent_uid, token_ids, salt)
                else:
                    # Same KV computed concurrently by another request: keep one cached copy,
                    # and chain this request's later blocks to it.
                    content = self._index.get(twin)
            uids.append(content.uid)
            parent_uid = content.uid

    def check_invariants(self) -> None:
        """Raise AssertionError describing the first inconsistency found."""
        self._allocator.check_invariants()
        self._index.check_invariants(self.block_size)
        assert self.enable_prefix_caching or len(self._index) == 0, "cached blocks with caching off"
        expected_refs = [0] * self.num_blocks
        for request_id, table in self._block_tables.items():
            assert len(set(table)) == len(table), f"request {request_id!r} lists a block twice"
            for block_id in table:
                expected_refs[block_id] += 1
            uids = self._block_uids.get(request_id, [])
            assert len(uids) <= len(table), f"request {request_id!r} registered past its table"
            for block_id, uid in zip(table, uids):
                content = self._index.get(block_id)
                assert content is None or content.uid == uid, (
                    f"request {request_id!r}: block {block_id} uid {content.uid} != {uid}")
        assert set(self._block_uids) <= set(self._block_tables), "uids kept for a freed request"
        assert set(self._num_covered_tokens) <= set(self._block_tables), "tokens kept for a freed request"
        empty = [self._empty_slots(request_id) for request_id in self._num_covered_tokens]
        assert min(empty, default=0) >= 0, "a table covers fewer slots than its tokens"
        assert sum(empty) == self._num_empty_slots, (
            f"{sum(empty)} empty slots in the tables but {self._num_empty_slots} counted")
        num_listed = sum(map(len, self._block_tables.values()))
        assert num_listed == self._num_table_blocks, (
            f"{num_listed} blocks listed by the tables but {self._num_table_blocks} counted")
        self._check_block_states(expected_refs)

    def _check_block_states(self, expected_refs: list[int]) -> None:
        num_used = 0
        for block_id, (refs, expected) in enumerate(zip(self._ref_counts, expected_refs)):
            assert refs == expected, f"block {block_id} ref count {refs}, tables hold {expected}"
            is_used = refs > 0
            is_evictable = block_id in self._evictable
            num_used += is_used
            assert not (is_used and is_evictable), f"block {block_id} used yet evictable"
            assert is_evictable == (not is_used and block_id in self._index), (
                f"block {block_id}: evictable={is_evictable}, refs={refs}, "
                f"cached={block_id in self._index}")
            assert self._allocator.is_allocated(block_id) == (is_used or is_evictable), (
                f"block {block_id}: allocator bit disagrees with refs={refs}, "
                f"evictable={is_evictable}")
        assert num_used == self._num_used_blocks, (
            f"{num_used} blocks referenced but {self._num_used_blocks} counted")
        assert self._allocator.num_free + len(self._evictable) + num_used == self.num_blocks, (
            "free + evictable + used blocks do not add up to num_blocks")
