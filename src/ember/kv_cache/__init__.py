"""Paged KV-cache bookkeeping: the block allocator and the prefix-caching block manager."""

from ember.kv_cache.block_allocator import BlockAllocator
from ember.kv_cache.block_hash import BlockContent, BlockHashIndex, hash_block_tokens
from ember.kv_cache.kv_cache_manager import KVCacheManager

__all__ = [
    "BlockAllocator",
    "BlockContent",
    "BlockHashIndex",
    "KVCacheManager",
    "hash_block_tokens",
]
