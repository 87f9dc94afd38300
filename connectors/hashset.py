"""A set of 64-bit hashes in 16 bytes per member: the ids a bulk pull has written, without the ids.

A Python ``set`` of ints costs ~90 bytes per member (the int object plus the table slot); a pull of
millions of resources would hold that much per resource only to notice a repeated id. ``HashSet`` keeps
the hashes themselves in one flat ``array('Q')`` (open addressing, linear probing, at most half full),
so the memory is one machine word per slot and nothing per member beyond it.
"""

from __future__ import annotations

from array import array

__all__ = ["HashSet"]

_MASK = (1 << 64) - 1
_EMPTY = 0  # marks a free slot; a member whose 64 bits are all zero is kept in a flag instead


class HashSet:
    """Members are ints (any Python ``hash()``); equal after reduction to 64 bits means equal."""

    def __init__(self, capacity: int = 1024) -> None:
        size = 16
        while size < capacity * 2:
            size *= 2
        self._slots = array("Q", bytes(8 * size))
        self._size = 0
        self._zero = False

    def __len__(self) -> int:
        return self._size

    def add(self, value: int) -> bool:
        """Add ``value``; True when it was not there yet."""
        key = value & _MASK
        if key == _EMPTY:
            added = not self._zero
            self._zero = True
            self._size += added
            return added
        index = self._slot(key)
        if self._slots[index] == key:
            return False
        self._slots[index] = key
        self._size += 1
        if self._size * 2 > len(self._slots):
            self._grow()
        return True

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        key = value & _MASK
        if key == _EMPTY:
            return self._zero
        return self._slots[self._slot(key)] == key

    def _slot(self, key: int) -> int:
        """Where ``key`` is, else the free slot where it would go (the table is never full)."""
        slots = self._slots
        mask = len(slots) - 1
        index = key & mask
        while True:
            held = slots[index]
            if held in (_EMPTY, key):
                return index
            index = (index + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        slots = array("Q", bytes(16 * len(old)))
        mask = len(slots) - 1
        for key in old:
            if key == _EMPTY:
                continue
            index = key & mask
            while slots[index] != _EMPTY:
                index = (index + 1) & mask
            slots[index] = key
        self._slots = slots
