"""Harvesting a per-vCPU dirty ring from userspace, and de-duplicating what it held.

Mirrors the userspace half of Documentation/virt/kvm/api.rst 7.36
(KVM_CAP_DIRTY_LOG_RING) against the kernel half in virt/kvm/dirty_ring.c
(``kvm_dirty_ring_push()`` produces, ``kvm_dirty_ring_reset()`` consumes what
we mark RESET). The ring is an array of ``struct kvm_dirty_gfn {u32 flags;
u32 slot; u64 offset;}``; no indices are shared, ``flags`` is the whole
handshake (abi.md section 2). Userspace keeps a free-running u32 fetch index
and must collect entries in order without skipping one.

On x86 (TSO) plain loads and stores really issued to the mapping suffice
(abi.md 2.8); numpy reads the mapping each call and never caches it.

Two ways in. harvest() scans with numpy and returns the entries (the API, the
tutorial, abi-check). The tracker's path is dirty_count() + take() into a Stage,
then PageSets at collection: right after KVM_RUN every distinct code path runs
cold on a nested host, so that path makes as few calls as it can
(docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

import numpy as np

from .. import _sys
from ..abi import KVM_DIRTY_GFN_F_DIRTY as DIRTY, KVM_DIRTY_GFN_F_RESET as RESET
from .pageset import PageSet

ENTRY_BYTES = 16
_U32 = 0xFFFFFFFF
# First scan window; it doubles while every entry in it is harvestable, so a
# nearly empty 65536-entry ring does not cost a snapshot of the whole array.
_FIRST_CHUNK = 4096
# Reductions called as ufuncs: ndarray.max() and .min() add a Python-level wrapper
_MAX, _MIN = np.maximum.reduce, np.minimum.reduce


@dataclass(frozen=True)
class HarvestResult:
    slots: np.ndarray    # uint32, as written by the kernel (as_id << 16 | slot id)
    offsets: np.ndarray  # uint64, page offset inside the slot
    count: int           # entries harvested (== len(slots))
    fetch: int           # new free-running fetch index, modulo 2**32


def _check_entries(entries: int) -> int:
    if entries <= 0 or entries & (entries - 1):
        raise ValueError(f"ring entries {entries} is not a power of two")
    return entries - 1


def _ring_view(buf, entries: int) -> np.ndarray:
    """(entries, 2) '<u8' view: word 0 = flags | slot << 32, word 1 = offset."""
    if memoryview(buf).nbytes < entries * ENTRY_BYTES:
        raise ValueError(f"buffer holds fewer than {entries} entries")
    ring = np.frombuffer(buf, dtype="<u8", count=entries * 2).reshape(entries, 2)
    if not ring.flags.writeable:
        raise TypeError("dirty ring buffer must be writable (RESET is stored into it)")
    return ring


def harvest(buf, entries: int, fetch: int) -> HarvestResult:
    """Take the run of DIRTY entries starting at ``fetch`` and mark them RESET.

    An entry is harvestable while ``flags & 3 == 1`` (DIRTY, not yet RESET);
    the run stops at the first other entry and is at most one full lap.
    """
    mask = _check_entries(entries)
    fetch &= _U32
    ring = _ring_view(buf, entries)             # (entries, 2) u64: word 1 = offset
    words = ring.view("<u4")                    # (entries, 4) u32: flags, slot, offset
    parts = []                                  # (start row, rows taken), contiguous runs
    pos, left, chunk = fetch & mask, entries, _FIRST_CHUNK
    while left:
        n = min(chunk, left, entries - pos)     # contiguous: stop at the array end
        # Read flags exactly once, into a snapshot, and decide only from it: an
        # entry the kernel publishes meanwhile is either taken whole or left for
        # the next harvest.
        f = words[pos:pos + n, 0].copy()
        stop = (f & 3) != DIRTY
        k = int(stop.argmax())                  # first non-harvestable (bool argmax exits early)
        if not stop[k]:
            k = n
        if k:
            parts.append((pos, k))
        left -= k
        if k < n:
            break
        pos, chunk = (pos + n) & mask, chunk * 2

    count = entries - left
    # Fresh output arrays, never views into buf (an mmap with live views cannot be closed).
    slots, offsets = np.empty(count, np.uint32), np.empty(count, np.uint64)
    j = 0
    for start, k in parts:
        # The kernel wrote slot and offset before flags (smp_wmb) and leaves a
        # DIRTY entry alone until we RESET it and KVM_RESET_DIRTY_RINGS clears
        # it, so reading them after the flags snapshot is complete on x86 (TSO).
        slots[j:j + k] = words[start:start + k, 1]
        offsets[j:j + k] = ring[start:start + k, 1]
        # flags = RESET exactly, one vectorized u32 store per run; slot and
        # offset stay as the kernel wrote them.
        words[start:start + k, 0] = RESET
        j += k
    return HarvestResult(slots, offsets, count, (fetch + count) & _U32)


def _zeroed(n: int) -> np.ndarray:
    """A zeroed bool array whose pages are already faulted in (written, not just
    mapped to the shared zero page as np.zeros leaves them)."""
    m = np.empty(n, dtype=bool)
    m.fill(False)
    return m


class PageSets:
    """De-duplication with one reusable page map per slot (no allocation per call).

    ``add()`` marks a batch of (slot, offset) pairs, ``take()`` returns what the batches
    since the last take covered and clears the maps: one pass per slot however many
    rings fed it. ``unique()`` is both at once, with the results of dedupe():
    (by_slot sorted unique offsets, duplicates, bogus). Offsets may be any integer
    array, strided views of staged entries included; pages come back as int64.
    """

    def __init__(self, slot_pages: dict):
        self.maps = {s: _zeroed(p) for s, p in slot_pages.items()}
        self._addr = {s: m.ctypes.data for s, m in self.maps.items()}
        self._ids = np.fromiter(self.maps, np.uint32, len(self.maps))
        self._marked, self._entries, self._bogus = set(), 0, []

    def add(self, slots, offsets) -> None:
        n = len(slots)
        if n == 0:
            return
        self._entries += n
        if offsets.dtype == np.int64:           # a page index >= 2**63 must count as bogus
            offsets = offsets.view(np.uint64)
        elif offsets.dtype != np.uint64:
            offsets = offsets.astype(np.uint64)
        first = slots[0]
        one_slot = first == slots[-1] and (slots == first).all()
        known = 0
        for s, seen in self.maps.items():
            if one_slot:
                if first != s:
                    continue
                o = offsets
            else:
                o = offsets[slots == s]
            known += len(o)
            self._mark(s, seen, o)
        if known != n:                           # entries naming a slot we do not log
            other = ~np.isin(slots, self._ids)
            self._bogus += list(zip(slots[other].tolist(), offsets[other].tolist()))

    def _mark(self, s: int, seen: np.ndarray, o: np.ndarray) -> None:
        """Mark slot ``s``'s pages ``o`` (uint64) in its map; out of range ones are bogus."""
        if not len(o):
            return
        if int(_MAX(o)) >= len(seen):           # one reduction on the common, clean path
            bad = o >= len(seen)
            self._bogus += [(s, int(x)) for x in o[bad]]
            o = o[~bad]
            if not len(o):
                return
        seen[o.view(np.int64)] = True            # every value < len(seen): same as signed
        self._marked.add(s)

    def add_words(self, word0, offsets) -> int:
        """add() for staged entries (Stage.words()); returns how many were not DIRTY when
        copied (left out: their slot and offset are not trustworthy).

        The common case, every entry DIRTY in one known slot with offsets in range, costs
        three reductions and one scatter. Entries of several slots (the first collection
        also finds the guest's page tables) cost one exact compare per logged slot.
        """
        n = len(word0)
        if n == 0:
            return 0
        key = int(word0[0])
        seen = self.maps.get(key >> 32)
        # min == max == key: every word equal, without a temporary array
        if key & 3 == DIRTY and seen is not None and int(_MAX(word0)) == key \
                and int(_MIN(word0)) == key and int(_MAX(offsets)) < len(seen):
            seen[offsets.view(np.int64)] = True
            self._marked.add(key >> 32)
            self._entries += n
            return 0
        taken, sels = 0, []
        for s, seen in self.maps.items():       # word0 == DIRTY | s << 32 exactly
            sel = word0 == (s << 32 | DIRTY)
            o = offsets[sel]
            taken += len(o)
            sels.append(sel)
            self._mark(s, seen, o)
        self._entries += taken
        if taken == n:
            return 0
        # The rest: not DIRTY (not trusted: left out), or DIRTY in a slot we do not log
        # or with other flag bits set too (add() sorts those out)
        ok = (word0 & 3) == DIRTY
        rest = ok & ~np.logical_or.reduce(sels) if sels else ok
        if rest.any():
            self.add((word0[rest] >> np.uint64(32)).astype(np.uint32), offsets[rest])
        return n - int(np.count_nonzero(ok))

    def take_sets(self):
        """(slot -> PageSet, duplicates, bogus) for the batches since the last take; the
        maps are cleared for the next ones. Counting is all the collection does: the
        sorted indices are made when a reader asks for them (PageSet.indices())."""
        sets, unique = {}, 0
        for s, seen in self.maps.items():
            if s not in self._marked:
                continue
            if self._entries * 64 < len(seen):   # few pages in a big slot: index them
                u = np.flatnonzero(seen)
                seen[u] = False
                page_set = PageSet.from_indices(u, len(seen))
            else:                                # hand over a copy of the map, zero ours
                copy = bytes(seen)               # plain C copies and counts: no numpy
                page_set = PageSet("map", copy, len(seen), copy.count(1))
                ctypes.memset(self._addr[s], 0, len(seen))
            sets[s] = page_set
            unique += page_set.count
        bogus = self._bogus
        dups = self._entries - len(bogus) - unique
        self._marked, self._entries, self._bogus = set(), 0, []
        return sets, dups, bogus

    def take(self):
        """take_sets() with sorted page indices (int64) per slot."""
        sets, dups, bogus = self.take_sets()
        return {s: p.indices() for s, p in sets.items()}, dups, bogus

    def unique(self, slots, offsets):
        self.add(slots, offsets)
        return self.take()


GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


def dirty_count(flags: memoryview, entries: int, fetch: int, guess: int = 0) -> int:
    """Length of the run of DIRTY entries from ``fetch``, found by bisection.

    KVM publishes a ring's entries strictly in order (one vCPU pushes, flags written
    last: ``kvm_dirty_ring_push()`` in virt/kvm/dirty_ring.c), so over one lap from the
    fetch index the DIRTY entries form a prefix. It only grows while the vCPU runs, and
    a DIRTY entry stays DIRTY until we RESET it, so bisection is exact for a paused
    vCPU and safe for a running one (an entry published meanwhile is left for the next
    harvest). A dozen reads instead of a scan; three when ``guess`` (the last count, as
    ring-full exits repeat) is right. The flags of every entry taken are read again
    from the copy at collection (PageSets.add_words), so a kernel that broke the
    ordering is caught there. ``flags``: the ring as a u32 memoryview (entry i's flags
    at 4 * i).
    """
    mask = entries - 1
    if entries <= 0 or entries & mask:       # no call on the hot path
        _check_entries(entries)
    fetch &= _U32
    if flags[(fetch & mask) * 4] & 3 != DIRTY:
        return 0
    if 1 < guess < entries and flags[((fetch + guess - 1) & mask) * 4] & 3 == DIRTY \
            and flags[((fetch + guess) & mask) * 4] & 3 != DIRTY:
        return guess
    if flags[((fetch + entries - 1) & mask) * 4] & 3 == DIRTY:
        return entries
    lo, hi = 0, entries - 1                   # DIRTY at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if flags[((fetch + mid) & mask) * 4] & 3 == DIRTY:
            lo = mid
        else:
            hi = mid
    return hi


class Stage:
    """Raw kvm_dirty_gfn entries taken from one ring and not yet collected.

    A page-aligned anonymous mapping kept from one collection to the next and grown by
    doubling, populated when it is made (MAP_POPULATE): fresh memory costs a page fault
    per 4 KiB at first touch, on a nested host ~11 us right after KVM_RUN
    (docs/benchmarks.md), far dearer than the copy itself.
    """

    def __init__(self, capacity: int):
        self.count = 0
        self._map = None
        self._grow(max(capacity, 1))

    def _grow(self, capacity: int) -> None:
        new = mmap.mmap(-1, capacity * ENTRY_BYTES,
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _sys.MAP_POPULATE)
        if self.count:
            new[:self.count * ENTRY_BYTES] = self._map[:self.count * ENTRY_BYTES]
        old, self._map, self.capacity = self._map, new, capacity
        self._array = np.frombuffer(new, dtype=GFN)
        pairs = self._array.view("<u8").reshape(capacity, 2)
        # word 0 = flags | slot << 32, word 1 = offset: views made once per buffer
        self._word0, self._offset = pairs[:, 0], pairs[:, 1]
        if old is not None:
            try:
                old.close()
            except BufferError:                  # a caller still holds a view: GC frees it
                pass

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more entries (doubling)."""
        if self.count + n > self.capacity:
            self._array = self._word0 = self._offset = None
            self._grow(max(2 * self.capacity, self.count + n))

    def entries(self) -> np.ndarray:
        """The staged entries (a GFN view, valid until the next take() or clear())."""
        return self._array[:self.count]

    def words(self) -> tuple:
        """(flags | slot << 32, offset) of the staged entries, as u64 views."""
        return self._word0[:self.count], self._offset[:self.count]

    def clear(self) -> None:
        self.count = 0

    def close(self) -> None:
        self._array = self._word0 = self._offset = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:          # a view of it is still alive: unmapped with it
                pass
            self._map = None


# RESET as the low byte of each flags word, for take()'s strided one-byte store
_RESET_BYTES = memoryview(bytes([RESET]) * 65536)


def take(ring, view: memoryview, entries: int, fetch: int, count: int, stage: Stage) -> int:
    """Copy ``count`` entries from ``fetch`` into ``stage`` and mark them RESET; returns
    the new fetch index. The entries must be DIRTY (dirty_count said so): KVM leaves a
    DIRTY entry alone until it is RESET and reset, so copying slot and offset after
    reading its flags is complete on x86 (TSO).

    ``ring``: the mapping (an mmap, or a bytearray in tests); ``view``: a memoryview of
    it. One copy and one strided store per contiguous run, two when the run wraps. The
    store writes only the low byte of each flags word: KVM writes flags whole as
    KVM_DIRTY_GFN_F_DIRTY (``kvm_dirty_gfn_set_dirtied()``), so the word becomes RESET.
    A byte store by the buffer's own slice assignment is a small C loop, three times
    cheaper than a numpy store right after KVM_RUN, when every code path starts cold;
    for the same reason the copies go straight into the stage's mapping, without a
    call per run.
    """
    mask = entries - 1
    if entries <= 0 or entries & mask:       # no call on the hot path
        _check_entries(entries)
    fetch &= _U32
    pos = fetch & mask
    first = min(count, entries - pos)
    if stage.count + count > stage.capacity:
        stage.reserve(count)
    at = stage.count * ENTRY_BYTES
    start, end = pos * ENTRY_BYTES, (pos + first) * ENTRY_BYTES
    dst = stage._map
    dst[at:at + end - start] = view[start:end]
    ring[start:end:ENTRY_BYTES] = _RESET_BYTES[:first]
    if count > first:                          # the run wraps past the ring's end
        at += end - start
        end = (count - first) * ENTRY_BYTES
        dst[at:at + end] = view[:end]
        ring[0:end:ENTRY_BYTES] = _RESET_BYTES[:count - first]
    stage.count += count
    return (fetch + count) & _U32


def dedupe(slots, offsets, slot_pages: dict[int, int]):
    """Group harvested (slot, offset) pairs by slot, sorted and de-duplicated.

    The stand-alone form, and the reference the tests hold PageSets (the tracker's
    reusable version) to.

    Returns ``(by_slot, duplicates, bogus)``: ``by_slot`` maps each slot that
    has at least one valid entry to its sorted unique offsets (uint64);
    ``duplicates`` counts valid entries beyond the first per page; ``bogus``
    lists ``(slot, offset)`` in harvest order for an unknown slot or an
    offset >= the slot's pages (KVM ignores those on reset, abi.md 2.7).
    """
    slots = np.asarray(slots, dtype=np.uint32)
    offsets = np.asarray(offsets, dtype=np.uint64)
    if slots.shape != offsets.shape or slots.ndim != 1:
        raise ValueError("slots and offsets must be 1-D arrays of equal length")
    n = len(slots)
    if n == 0:
        return {}, 0, []
    # Per-entry page limit; an unknown slot keeps 0, so each of its offsets is bogus.
    # One compare pass per known slot (~0.1-0.5 ns/entry) beats np.unique's sort.
    first = int(slots[0])
    if (slots == first).all():                  # the common case: one slot
        groups = {first: None}
        limit = np.uint64(slot_pages.get(first, 0))
    else:
        groups, limit = {}, np.zeros(n, np.uint64)
        for s, pages in slot_pages.items():
            sel = slots == s
            if sel.any():
                groups[s] = sel
                limit[sel] = pages
    bad = offsets >= limit
    bogus = []
    if bad.any():
        idx = np.flatnonzero(bad)
        bogus = list(zip(slots[idx].tolist(), offsets[idx].tolist()))
    by_slot, unique = {}, 0
    for s, sel in groups.items():
        keep = ~bad if sel is None else sel & ~bad
        offs = offsets[keep] if bogus or sel is not None else offsets
        if not len(offs):
            continue
        pages = slot_pages[s]
        if len(offs) * 128 < pages:
            # Few entries in a big slot: a sort is cheaper than zeroing and
            # scanning a page map of the whole slot.
            u = np.unique(offs)
        else:
            seen = np.zeros(pages, dtype=bool)  # page map: a few ns per entry
            seen[offs] = True
            u = np.flatnonzero(seen).astype(np.uint64)
        by_slot[s] = u
        unique += len(u)
    return by_slot, n - len(bogus) - unique, bogus


def make_ring(entries: int) -> bytearray:
    """A zeroed synthetic ring, as KVM_CREATE_VCPU's vzalloc leaves it."""
    _check_entries(entries)
    return bytearray(entries * ENTRY_BYTES)


def publish(buf, entries: int, index: int, slot: int, offset: int) -> None:
    """Write a DIRTY entry at free-running ``index`` like kvm_dirty_ring_push():
    slot and offset first, then flags (the kernel orders them with smp_wmb)."""
    at = (index & _check_entries(entries)) * ENTRY_BYTES
    struct.pack_into("<IQ", buf, at + 4, slot, offset)
    struct.pack_into("<I", buf, at, DIRTY)
