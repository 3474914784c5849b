"""Free-list of KV block ids kept as a bitmap of 64-bit words, lowest free id first."""

from __future__ import annotations

_WORD_BITS = 64
_FULL_WORD = (1 << _WORD_BITS) - 1


class BlockAllocator:
    """Hands out block ids in `[0, num_blocks)` from a bitmap, one bit per block.

    A set bit means the id is taken. Allocation finds the first zero bit, starting at a word
    hint, so the lowest free id always comes first and tests can predict exact ids.

    Invariants (see `check_invariants`):
      - the number of set bits equals `num_blocks - num_free`;
      - no bit at or above `num_blocks` is ever set;
      - every word below the hint is full, so the search may start there.
    """

    def __init__(self, num_blocks: int) -> None:
        """Args:
            num_blocks: size of the pool; must be positive.

        Raises:
            ValueError: if `num_blocks` is not a positive integer.
        """
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        num_words = -(-num_blocks // _WORD_BITS)
        self._words = [0] * num_words
        # The last word may be partial: its mask holds only the bits of real block ids.
        self._full_masks = [_FULL_WORD] * num_words
        tail_bits = num_blocks - (num_words - 1) * _WORD_BITS
        self._full_masks[-1] = (1 << tail_bits) - 1
        self._num_free = num_blocks
        self._hint = 0  # lowest word that may hold a zero bit

    @property
    def num_free(self) -> int:
        """Number of ids not currently allocated."""
        return self._num_free

    @property
    def num_allocated(self) -> int:
        """Number of ids currently allocated."""
        return self.num_blocks - self._num_free

    def allocate(self) -> int:
        """Take the lowest free block id.

        Returns:
            The block id, now marked allocated.

        Raises:
            RuntimeError: if every block is allocated.
        """
        if self._num_free == 0:
            raise RuntimeError(f"all {self.num_blocks} blocks are allocated")
        index = self._hint
        while self._words[index] == self._full_masks[index]:
            index += 1
        word = self._words[index]
        lowest_zero = ~word & (word + 1)  # isolates the lowest clear bit
        self._words[index] = word | lowest_zero
        self._num_free -= 1
        self._hint = index
        return index * _WORD_BITS + lowest_zero.bit_length() - 1

    def free(self, block_id: int) -> None:
        """Return `block_id` to the pool.

        Raises:
            ValueError: if the id is out of range or not allocated (a double free).
        """
        index, bit = self._locate(block_id)
        if not self._words[index] & bit:
            raise ValueError(f"block {block_id} is not allocated")
        self._words[index] &= ~bit
        self._num_free += 1
        if index < self._hint:
            self._hint = index

    def is_allocated(self, block_id: int) -> bool:
        """Whether `block_id` is currently taken.

        Raises:
            ValueError: if the id is out of range.
        """
        index, bit = self._locate(block_id)
        return bool(self._words[index] & bit)

    def _locate(self, block_id: int) -> tuple[int, int]:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside [0, {self.num_blocks})")
        return block_id // _WORD_BITS, 1 << (block_id % _WORD_BITS)

    def check_invariants(self) -> None:
        """Raise AssertionError if the bitmap and the counters disagree."""
        num_set = 0
        for index, (word, mask) in enumerate(zip(self._words, self._full_masks)):
            assert word & ~mask == 0, f"word {index} has bits beyond block {self.num_blocks - 1}"
            num_set += word.bit_count()
            if index < self._hint:
                assert word == mask, f"word {index} below hint {self._hint} has a free bit"
        assert 0 <= self._num_free <= self.num_blocks, f"num_free {self._num_free} out of range"
        assert num_set == self.num_blocks - self._num_free, (
            f"{num_set} bits set but {self.num_blocks - self._num_free} blocks counted allocated")
