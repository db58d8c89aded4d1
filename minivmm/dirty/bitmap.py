"""The dirty bitmap: KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG.

Mirrors Documentation/virt/kvm/api.rst 4.8 (KVM_GET_DIRTY_LOG), 4.117
(KVM_CLEAR_DIRTY_LOG) and 7.18 (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), with the
bitmap layout of ``kvm_dirty_bitmap_bytes()`` in include/linux/kvm_host.h:
ALIGN(npages, 64) / 8 bytes, bit i of the little-endian u64 words = page i of
the slot (abi.md rules 48-59).
"""
from __future__ import annotations

import ctypes

import numpy as np

from .. import abi
from ..memory import PAGE_SIZE

# Clear in pieces of contiguous words that hold dirty bits; gaps shorter than this
# many words are bridged (clearing a zero bit is a no-op) to save ioctls.
CLEAR_GAP_WORDS = 64
# Up to this many words (512 Ki pages, 2 GiB of 4 KiB pages) one CLEAR covers the whole
# slot: the kernel skips zero words, and finding pieces would cost more than it saves.
WHOLE_SLOT_WORDS = 8192


def enable_manual_protect(vm, initially_set: bool = False) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): GET no longer clears, CLEAR does."""
    flags = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if initially_set:
        flags |= abi.KVM_DIRTY_LOG_INITIALLY_SET
    vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
    return flags


def bitmap_words(npages: int) -> int:
    return (npages + 63) // 64


def decode(words: np.ndarray, npages: int) -> np.ndarray:
    """Set bits -> sorted page indices (uint64), touching only the non-zero words."""
    nz = np.flatnonzero(words)
    if not len(nz):
        return np.empty(0, np.uint64)
    bits = np.unpackbits(words[nz].astype("<u8").view(np.uint8), bitorder="little")
    idx = np.flatnonzero(bits)                      # 1-D: cheaper than a 2-D nonzero
    pages = nz[idx >> 6].astype(np.uint64) * np.uint64(64) + (idx & 63).astype(np.uint64)
    return pages[pages < npages]


def popcount(words) -> int:
    """Set bits in a bitmap (any contiguous buffer): one big int and its bit_count, two
    small C loops, cheaper right after KVM_RUN than numpy's ufunc machinery."""
    return int.from_bytes(words, "little").bit_count()


def encode(pages: np.ndarray, npages: int) -> np.ndarray:
    """Page indices -> a bitmap of u64 words (the inverse of decode)."""
    words = np.zeros(bitmap_words(npages), np.uint64)
    pages = np.asarray(pages, np.uint64)
    np.bitwise_or.at(words, (pages // 64).astype(np.intp),
                     np.left_shift(np.uint64(1), pages % np.uint64(64)))
    return words


class SlotBitmap:
    """A slot's dirty bitmap: GET into a fresh buffer, and CLEAR of what it held."""

    def __init__(self, vm, slot: int, npages: int):
        self.vm, self.slot, self.npages = vm, slot, npages
        self.nwords = bitmap_words(npages)
        self.clear_calls = 0
        # KVM writes the slot's whole bitmap whatever npages says: a smaller count
        # overran the buffer (a 1 Mi-page slot given 64 pages crashed the interpreter).
        # vm.slot_sizes knows every slot set through the Vm, add_memory()'s or not
        self._size = size = vm.slot_sizes.get(slot)
        if size is not None and size // PAGE_SIZE != npages:
            raise ValueError(f"slot {slot} holds {size // PAGE_SIZE} pages, not {npages}: its "
                             "dirty bitmap must be made for the slot's own size")

    def _check_slot(self, size) -> None:
        """KVM writes the slot's current bitmap size, whatever buffer it is given: a slot
        replaced by a bigger one (remove_memory and add_memory, or the raw calls) would
        overrun this one."""
        if size is not None and size // PAGE_SIZE != self.npages:
            raise ValueError(f"slot {self.slot} now holds {size // PAGE_SIZE} pages, not the "
                             f"{self.npages} its dirty bitmap was made for: it was replaced "
                             "since; make a new SlotBitmap (a new session) for it")
        self._size = size              # removed (GET says ENOENT) or the same size: fine

    def collect(self, clear: bool) -> tuple:
        """GET into a fresh buffer (the caller keeps it: a ctypes u64 array), count its set
        bits and, with ``clear``, CLEAR exactly those; returns (buffer, set bits)."""
        size = self.vm.slot_sizes.get(self.slot)
        if size != self._size:
            self._check_slot(size)
        buf = (ctypes.c_uint64 * self.nwords)()
        self.vm.get_dirty_log(self.slot, ctypes.addressof(buf))
        n = popcount(buf)
        if n and clear:
            self.clear_collected(buf)
        return buf, n

    def clear_collected(self, words) -> int:
        """KVM_CLEAR_DIRTY_LOG of exactly the set bits of ``words`` (u64 words: a numpy
        array or a ctypes array); returns the ioctl count. A slot of up to
        WHOLE_SLOT_WORDS words takes one call from page 0 over the whole slot: only the
        set bits are cleared and re-protected, zero words are skipped
        (``kvm_clear_dirty_log_protect()`` in virt/kvm/kvm_main.c). A bigger one takes
        clear()'s pieces."""
        if self.nwords > WHOLE_SLOT_WORDS:
            return self.clear(np.frombuffer(words, np.uint64))
        addr = words.ctypes.data if isinstance(words, np.ndarray) else ctypes.addressof(words)
        self.vm.clear_dirty_log(self.slot, 0, self.npages, addr)
        self.clear_calls += 1
        return 1

    def clear(self, words: np.ndarray) -> int:
        """KVM_CLEAR_DIRTY_LOG of exactly the set bits, in 64-page-aligned pieces.

        ``first_page`` is always a multiple of 64; ``num_pages`` too, except for a
        piece that ends at the slot's last page (api.rst 4.117). Returns the ioctl count.
        """
        nz = np.flatnonzero(words)
        if not len(nz):
            return 0
        breaks = np.flatnonzero(np.diff(nz) > CLEAR_GAP_WORDS)
        starts = np.concatenate(([nz[0]], nz[breaks + 1]))
        ends = np.concatenate((nz[breaks], [nz[-1]])) + 1
        words = np.ascontiguousarray(words, dtype=np.uint64)
        base = words.ctypes.data
        calls = 0
        for s, e in zip(starts.tolist(), ends.tolist()):
            first = s * 64
            num = min(e * 64, self.npages) - first
            self.vm.clear_dirty_log(self.slot, first, num, base + s * 8)
            calls += 1
        self.clear_calls += calls
        return calls
