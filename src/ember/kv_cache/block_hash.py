"""Content identity of full KV blocks: chained block hashes and the index of cached blocks."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

# A first block's salt: the request's `cache_salt` (str), or a tuple that also names the dense op set
# of a request admitted on the high-precision path (`Request.kv_salt`); None when unsalted.
Salt = Hashable | None

# hash_fn(parent_hash, token_ids, salt) -> int; parent_hash is None for a sequence's first block.
HashFn = Callable[[int | None, tuple[int, ...], Salt], int]


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...],
                      salt: Salt) -> int:
    """Default block hash, chained over the parent block's hash.

    It needs only to be fast and well spread: a hit is served only after the stored token ids,
    salt and parent prefix are compared, so a collision costs a miss, never wrong KV.
    """
    return hash((parent_hash, token_ids, salt))


@dataclass(frozen=True, slots=True)
class BlockContent:
    """What a cached full block holds.

    `uid` names the whole prefix ending at this block: a child stores its parent's uid, so a
    match is exact all the way back to the first block. A uid is never reused, so once a
    parent is evicted its children can no longer be reached through a re-filled parent.
    """

    block_hash: int
    parent_uid: int | None  # None for a sequence's first block
    token_ids: tuple[int, ...]
    salt: Salt  # set on first blocks only; later blocks inherit isolation via parent_uid
    uid: int

    def holds(self, parent_uid: int | None, token_ids: tuple[int, ...], salt: Salt) -> bool:
        """Whether this block's KV is exactly what the given prefix would compute."""
        return self.parent_uid == parent_uid and self.salt == salt and self.token_ids == token_ids


class BlockHashIndex:
    """Maps block hashes to the cached blocks carrying them; several when hashes collide.

    Invariants: each cached block appears once, under its own hash; no two cached blocks hold
    the same (parent_uid, token_ids, salt); uids are unique.
    """

    def __init__(self) -> None:
        self._by_hash: dict[int, dict[int, None]] = {}  # hash -> block ids in insertion order
        self._by_block: dict[int, BlockContent] = {}
        self._next_uid = 0

    def __len__(self) -> int:
        return len(self._by_block)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._by_block

    def get(self, block_id: int) -> BlockContent | None:
        """The content cached in `block_id`, or None if the block holds no cached content."""
        return self._by_block.get(block_id)

    def lookup(self, block_hash: int, parent_uid: int | None, token_ids: tuple[int, ...],
               salt: Salt) -> int | None:
        """The cached block holding exactly this content, or None."""
        for block_id in self._by_hash.get(block_hash, ()):
            if self._by_block[block_id].holds(parent_uid, token_ids, salt):
                return block_id
        return None

    def insert(self, block_id: int, block_hash: int, parent_uid: int | None,
               token_ids: tuple[int, ...], salt: Salt) -> BlockContent:
        """Record that `block_id` holds this content and give the prefix a fresh uid.

        Raises:
            ValueError: if the block is already cached or the content is already cached elsewhere.
        """
        if block_id in self._by_block:
            raise ValueError(f"block {block_id} is already cached")
        if self.lookup(block_hash, parent_uid, token_ids, salt) is not None:
            raise ValueError(f"content of block {block_id} is already cached")
        content = BlockContent(block_hash, parent_uid, token_ids, salt, self._next_uid)
        self._next_uid += 1
        self._by_block[block_id] = content
        self._by_hash.setdefault(block_hash, {})[block_id] = None
        return content

    def remove(self, block_id: int) -> None:
        """Forget the content of `block_id` (it is being evicted)."""
        content = self._by_block.pop(block_id)
        same_hash = self._by_hash[content.block_hash]
        del same_hash[block_id]
        if not same_hash:
            del self._by_hash[content.block_hash]

    def clear(self) -> None:
        """Forget every cached block (uids keep counting, so old ones never come back)."""
        self._by_hash.clear()
        self._by_block.clear()

    def check_invariants(self, block_size: int) -> None:
        """Raise AssertionError if the two maps disagree or content is duplicated."""
        num_listed = sum(len(ids) for ids in self._by_hash.values())
        assert num_listed == len(self._by_block), (
            f"{num_listed} blocks listed by hash but {len(self._by_block)} cached")
        keys, uids = set(), set()
        for block_id, content in self._by_block.items():
            assert block_id in self._by_hash.get(content.block_hash, {}), (
                f"block {block_id} missing under its hash")
            assert len(content.token_ids) == block_size, f"cached block {block_id} is not full"
            assert content.parent_uid is None or content.salt is None, (
                f"block {block_id} carries a salt but is not a first block")
            key = (content.parent_uid, content.token_ids, content.salt)
            assert key not in keys, f"block {block_id} duplicates cached content"
            assert content.uid not in uids, f"block {block_id} reuses uid {content.uid}"
            assert content.uid < self._next_uid, f"block {block_id} has unissued uid"
            keys.add(key)
            uids.add(content.uid)
