"""Owner of the paged KV cache's bookkeeping: block tables (one per KV-cache group), reference counts, prefix
cache."""

from __future__ import annotations

from collections import OrderedDict

from ember.kv_cache.block_allocator import BlockAllocator
from ember.kv_cache.block_hash import BlockHashIndex, HashFn, hash_block_tokens
from ember.kv_cache.block_import import BlockImport
from ember.kv_cache.groups import first_needed_block
from ember.kv_cache.invariants import check_manager_invariants
from ember.request import Request


class PrefixHit(list):
    """`get_computed_blocks`' hit: the first group's block ids (a list, as with one group), and in `windowed`
    each later group's table for the same tokens, None where its window no longer reaches."""

    def __init__(self, block_ids: list[int], windowed: list[list[int | None]] | None = None) -> None:
        super().__init__(block_ids)
        self.windowed = windowed or []


class KVCacheManager(BlockImport):
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

    KV-cache groups (`kv_cache.groups`; `windows` names each group's window, the first group's None): each
    request has a table per group, all as long as its first; a local group's table lets go of the blocks its
    window no longer reaches (None entries), as `allocate_slots` moves the request on. Each group caches its
    own blocks, under the same chained hashes; a local block's parent is the first group's block before it,
    so a hit needs the first group's whole prefix and each local group's blocks within the window before
    the first token left to compute.

    Internal fragmentation is counted as the scheduler asks for slots: a request's empty slots are
    its table's slots past the tokens its latest `allocate_slots` covered. Those slots sit in its
    unshared tail blocks (only full blocks are shared), so the per-request counts add up.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn | None = None, windows: tuple[int | None, ...] = (None,)) -> None:
        """Args:
            num_blocks: KV blocks in the pool.
            block_size: tokens per block.
            enable_prefix_caching: share and keep full blocks by content.
            hash_fn: `hash_fn(parent_hash, token_ids, salt) -> int`; defaults to
                `hash_block_tokens`. Injectable so tests can force collisions.
            windows: per KV-cache group, its sliding window (None: global); the first must be global.

        Raises:
            ValueError: if `num_blocks` or `block_size` is not a positive integer, or the first group has a window.
        """
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not windows or windows[0] is not None:
            raise ValueError(f"the first KV-cache group must be global (window None), got windows {windows}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = tuple(windows)
        self._hash_fn = hash_fn if hash_fn is not None else hash_block_tokens
        self._allocator = BlockAllocator(num_blocks)
        self._indexes = [BlockHashIndex() for _ in windows]  # a block is cached in its group's index only
        self._index = self._indexes[0]
        self._ref_counts = [0] * num_blocks
        self._num_used_blocks = 0
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._block_tables: dict[str, list[list[int | None]]] = {}  # per group; None: let go by a local group
        self._block_hashes: dict[str, list[int]] = {}  # chained hash per full block, computed once
        self._block_uids: dict[str, list[list[int | None]]] = {}  # per group, prefix uid per registered position
        self._num_covered_tokens: dict[str, int] = {}  # tokens the latest allocate_slots covered
        self._num_empty_slots = 0  # sum over tables of slots past their covered tokens
        self._num_table_blocks = 0  # blocks the tables list: a shared block counts once per table
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
        blocks to `allocate_slots` before anything else allocates. With local groups the hit is as long as
        every local group also holds the blocks of its window before the first token left (a `PrefixHit`).

        A request asking for prompt logprobs reads no cached blocks (as in vLLM): cached rows are not
        recomputed, so their logprobs would be missing. Its own full blocks are still registered.

        Returns:
            (block_ids, num_computed_tokens); ([], 0) when prefix caching is off or the request wants
            prompt logprobs.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return PrefixHit([]), 0
        bs = self.block_size
        max_blocks = self._num_cacheable_blocks(request, max(0, (request.num_tokens - 1) // bs))
        hashes = self._hashes_for(request, max_blocks)
        block_ids, uids = self._cached_chain(request.all_token_ids, request.kv_salt, hashes)
        hit = self._window_hits(request, hashes, uids, block_ids)
        num_computed_tokens = len(hit) * bs
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += num_computed_tokens
        return hit, num_computed_tokens

    def _lookup(self, group: int, token_ids: list[int], salt, hashes: list[int], i: int,
                parent_uid: int | None) -> int | None:
        """The block of `group` caching full block i of `token_ids` (its parent: the first group's block i - 1;
        `salt` keys block 0)."""
        bs = self.block_size
        return self._indexes[group].lookup(hashes[i], parent_uid, tuple(token_ids[i * bs:(i + 1) * bs]),
                                           salt if i == 0 else None)

    def _cached_chain(self, token_ids: list[int], salt, hashes: list[int]) -> tuple[list[int], list[int]]:
        """The first group's cached blocks holding the leading full blocks of `token_ids` (chained `hashes`, one
        per block looked for), and their uids; it stops at the first miss."""
        block_ids: list[int] = []
        uids: list[int] = []
        for i in range(len(hashes)):
            block_id = self._lookup(0, token_ids, salt, hashes, i, uids[-1] if uids else None)
            if block_id is None:
                break
            block_ids.append(block_id)
            uids.append(self._index.get(block_id).uid)
        return block_ids, uids

    def _window_hits(self, request: Request, hashes: list[int], uids: list[int], block_ids: list[int]) -> PrefixHit:
        """The first group's hit cut to the longest one every local group can serve, with their tables."""
        num_hit = len(block_ids)
        tokens, salt = request.all_token_ids, request.kv_salt
        found = [[self._lookup(g, tokens, salt, hashes, i, uids[i - 1] if i else None) for i in range(num_hit)]
                 for g in range(1, len(self.windows))]

        def first(group: int, n: int) -> int:
            return first_needed_block(self.windows[group], n * self.block_size, self.block_size)

        while num_hit and any(None in blocks[first(g, num_hit):num_hit] for g, blocks in enumerate(found, 1)):
            num_hit -= 1
        return PrefixHit(block_ids[:num_hit], [[None] * first(g, num_hit) + blocks[first(g, num_hit):num_hit]
                                               for g, blocks in enumerate(found, 1)])

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None, num_reserved_blocks: int = 0) -> bool:
        """Grow the request's block tables to cover its computed, hit and new tokens.

        The tables must cover `request.num_kv_tokens + len(new_computed_blocks) * block_size +
        num_new_tokens` tokens. `new_computed_blocks` (from `get_computed_blocks`, only when the request
        holds no blocks) are listed first, one reference each. A local group first lets go of the blocks its
        window no longer reaches from the first new token (whatever the outcome: no later step reads them).
        `num_reserved_blocks` must stay free afterwards (the scheduler keeps room for running requests).

        Returns:
            True on success; False, with nothing else changed, when too few blocks are available.

        Raises:
            ValueError: if `num_new_tokens` is negative, or `new_computed_blocks` is given to a
                request that already holds blocks, with caching off, or no longer holds the
                request's tokens.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be non-negative, got {num_new_tokens}")
        computed = new_computed_blocks or PrefixHit([])
        tables = self._block_tables.get(request.request_id)
        if computed:
            self._check_computed_blocks(request, tables, computed)
        bs = self.block_size
        start = request.num_kv_tokens + len(computed) * bs  # the first new token's row
        num_covered = start + num_new_tokens
        is_new = tables is None  # its tables (hit blocks first) are listed once the allocation is sure
        if is_new:
            windowed = getattr(computed, "windowed", None) or [[] for _ in self.windows[1:]]
            tables = [list(computed)] + [list(blocks) for blocks in windowed]
        else:
            self._release_out_of_window(tables, start)
        num_needed = -(-num_covered // bs)
        firsts = [first_needed_block(w, start, bs) for w in self.windows]
        num_to_allocate = sum(max(num_needed - max(len(t), first), 0) for t, first in zip(tables, firsts))
        if num_to_allocate > 0 or num_reserved_blocks > 0:
            # Hit blocks sitting in the evictable set are about to be revived, not evicted.
            num_revived = (sum(1 for t in tables for b in t if b is not None and self._ref_counts[b] == 0)
                           if is_new else 0)
            if num_to_allocate + num_reserved_blocks > self.num_free_blocks - num_revived:
                return False
        self._num_empty_slots -= self._empty_slots(request.request_id)
        if is_new:
            self._block_tables[request.request_id] = tables
            for block_id in (b for t in tables for b in t if b is not None):
                self._take_ref(block_id)
            self._num_table_blocks += sum(b is not None for t in tables for b in t)
        for table, first in zip(tables, firsts):
            table.extend([None] * max(first - len(table), 0))
            for _ in range(num_needed - len(table)):
                table.append(self._allocate_block())
                self._num_table_blocks += 1
        self._num_covered_tokens[request.request_id] = num_covered
        self._num_empty_slots += self._empty_slots(request.request_id)
        self._peak_usage = (max(self._peak_usage[0], self._num_used_blocks),
                            max(self._peak_usage[1], self._num_table_blocks))
        if self.enable_prefix_caching:
            num_full = self._num_cacheable_blocks(request, min(num_covered, request.num_tokens) // bs)
            self._register_full_blocks(request, tables, num_full)
        return True

    def _release_out_of_window(self, tables: list[list[int | None]], start: int) -> None:
        """Let go of each local table's blocks before the first one a query from row `start` on reads, oldest
        first (the evictable set then evicts them first). The let-go entries are a prefix of the table, so only
        the blocks after it are visited."""
        for window, table in zip(self.windows[1:], tables[1:]):
            end = first = min(first_needed_block(window, start, self.block_size), len(table))
            while first > 0 and table[first - 1] is not None:
                first -= 1
            for i in range(first, end):
                self._drop_ref(table[i])
                table[i] = None
            self._num_table_blocks -= end - first

    def free(self, request: Request) -> None:
        """Drop the request's references and its kept hashes.

        Blocks left unreferenced become evictable if they hold cached content, tail first so a
        request's last blocks are evicted before its shared head; the rest return to the pool.
        """
        self._block_hashes.pop(request.request_id, None)
        self._block_uids.pop(request.request_id, None)
        self._num_empty_slots -= self._empty_slots(request.request_id)
        self._num_covered_tokens.pop(request.request_id, None)
        for table in self._block_tables.pop(request.request_id, None) or []:
            for block_id in reversed(table):
                if block_id is not None:
                    self._num_table_blocks -= 1
                    self._drop_ref(block_id)

    def _drop_ref(self, block_id: int) -> None:
        """One reference less; an unreferenced block becomes evictable if cached, else free."""
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] > 0:
            return
        self._num_used_blocks -= 1
        if self._cached_in(block_id) is not None:
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
        tables = self._block_tables[request.request_id]
        num_kept = -(-num_rows // self.block_size)
        if num_rows < 0 or num_kept > len(tables[0]):
            raise ValueError(f"cannot keep {num_rows} rows of a {len(tables[0])}-block table")
        dropped = [b for table in tables for b in table[num_kept:] if b is not None]
        if any(self._ref_counts[b] != 1 or self._cached_in(b) is not None for b in dropped):
            raise ValueError("eviction may only free blocks its request alone holds")
        self._num_empty_slots -= self._empty_slots(request.request_id)
        for table in tables:
            del table[num_kept:]
        self._num_table_blocks -= len(dropped)
        for block_id in dropped:
            self._drop_ref(block_id)
        self._num_covered_tokens[request.request_id] = num_rows
        self._num_empty_slots += self._empty_slots(request.request_id)

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table in the first group ([] if it holds none)."""
        tables = self._block_tables.get(request_id)
        return list(tables[0]) if tables else []

    def get_group_block_ids(self, request_id: str) -> list[list[int | None]]:
        """Copies of the request's tables in the later (local) groups, None where a window let a block go;
        [] with one group."""
        return [list(table) for table in self._block_tables.get(request_id, [[]])[1:]]

    def max_blocks_needed(self, num_rows: int, max_step_tokens: int) -> int:
        """The most blocks a request of `num_rows` rows holds at once, over every group, when a step computes
        at most `max_step_tokens` of its tokens (a local group holds its window before the step's first
        token, and the step)."""
        bs = self.block_size
        full = -(-num_rows // bs)
        return sum(full if w is None else min(full, -(-(w - 1 + max_step_tokens) // bs) + 1) for w in self.windows)

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
        for index in self._indexes:
            index.clear()
        return True

    def _num_cacheable_blocks(self, request: Request, num_blocks: int) -> int:
        """`num_blocks` capped to the full blocks the request may share."""
        limit = request.num_cacheable_tokens
        return num_blocks if limit is None else min(num_blocks, limit // self.block_size)

    def _hashes_for(self, request: Request, num_blocks: int) -> list[int]:
        """The request's chained hashes for its first `num_blocks` full blocks, computed once."""
        hashes = self._block_hashes.setdefault(request.request_id, [])
        return self._chain_hashes(hashes, request.all_token_ids, request.kv_salt, num_blocks)

    def _chain_hashes(self, hashes: list[int], token_ids: list[int], salt, num_blocks: int) -> list[int]:
        """`hashes` (those of the leading blocks of `token_ids`) extended in place to `num_blocks` chained hashes."""
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(self._hash_fn(hashes[i - 1] if i else None, tuple(token_ids[i * bs:(i + 1) * bs]),
                                        salt if i == 0 else None))
        return hashes

    def _check_computed_blocks(self, request: Request, tables: list[list[int | None]] | None,
                               computed: list[int]) -> None:
        """Reject hit blocks handed over out of turn, or evicted since `get_computed_blocks`."""
        if not self.enable_prefix_caching:
            raise ValueError("new_computed_blocks given while prefix caching is off")
        if tables:
            raise ValueError(f"request {request.request_id!r} already holds blocks; "
                             "new_computed_blocks are only accepted at admission")
        windowed = getattr(computed, "windowed", [])
        if len(windowed) != len(self.windows) - 1:
            raise ValueError("a cache with local groups takes the PrefixHit of get_computed_blocks")
        bs, tokens = self.block_size, request.all_token_ids
        uids: list[int] = []
        for group, table in enumerate([computed, *windowed]):
            for i, block_id in enumerate(table):
                if block_id is None:
                    continue
                content = self._indexes[group].get(block_id)
                salt = request.kv_salt if i == 0 else None
                if content is None or not content.holds(uids[i - 1] if i else None,
                                                         tuple(tokens[i * bs:(i + 1) * bs]), salt):
                    raise ValueError(f"block {block_id} no longer holds block {i} of request "
                                     f"{request.request_id!r}")
                if group == 0:
                    uids.append(content.uid)

    def _empty_slots(self, request_id: str) -> int:
        """Slots of the request's tables past the tokens it last covered (0 before it has any); a table whose
        last block a window let go of holds none."""
        num_covered = self._num_covered_tokens.get(request_id)
        if num_covered is None:
            return 0
        return sum(len(table) * self.block_size - num_covered
                   for table in self._block_tables[request_id] if table and table[-1] is not None)

    def _cached_in(self, block_id: int) -> BlockHashIndex | None:
        """The index (of the group) caching `block_id`, or None."""
        return next((index for index in self._indexes if block_id in index), None)

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
            self._cached_in(block_id).remove(block_id)
        self._ref_counts[block_id] = 1
        self._num_used_blocks += 1
        return block_id

    def _register_full_blocks(self, request: Request, tables: list[list[int | None]], num_full: int) -> None:
        """Cache every table block, up to `num_full`, not yet registered for this request; each block's parent
        is the first group's block before it."""
        all_uids = self._block_uids.setdefault(request.request_id, [[] for _ in tables])
        if num_full <= len(all_uids[0]):
            return
        hashes = self._hashes_for(request, num_full)
        bs, tokens = self.block_size, request.all_token_ids
        chain = all_uids[0]
        for index, table, uids in zip(self._indexes, tables, all_uids):
            for i in range(len(uids), num_full):
                block_id = table[i]
                if block_id is None:  # a local group let it go before its tokens were known
                    uids.append(None)
                    continue
                content = index.get(block_id)  # set for prefix-hit blocks
                if content is None:
                    token_ids, parent_uid = tuple(tokens[i * bs:(i + 1) * bs]), chain[i - 1] if i else None
                    salt = request.kv_salt if i == 0 else None
                    twin = index.lookup(hashes[i], parent_uid, token_ids, salt)
                    if twin is None:
                        content = index.insert(block_id, hashes[i], parent_uid, token_ids, salt)
                    else:
                        # Same KV computed concurrently by another request: keep one cached copy,
                        # and chain this request's later blocks to it.
                        content = index.get(twin)
                uids.append(content.uid)

    def check_invariants(self) -> None:
        """Raise AssertionError describing the first inconsistency found (`kv_cache.invariants`)."""
        check_manager_invariants(self)
