"""harvest() (numpy) against harvest_reference() (struct, one entry at a time),
and dedupe(). Synthetic rings only: no KVM needed, nothing is timed here."""
import mmap
import random
import struct

import numpy as np
import pytest

from minivmm.dirty.harvest import (DIRTY, ENTRY_BYTES, RESET, HarvestResult, PageSets, Stage,
                                   dedupe, dirty_count, harvest, make_ring,
                                   publish, take)

U32 = 1 << 32


def entry(buf, entries, index):
    """(flags, slot, offset) at free-running index."""
    return struct.unpack_from("<IIQ", buf, (index & (entries - 1)) * ENTRY_BYTES)


def set_flags(buf, entries, index, flags):
    struct.pack_into("<I", buf, (index & (entries - 1)) * ENTRY_BYTES, flags)


def harvest_reference(buf, entries: int, fetch: int) -> HarvestResult:
    """The oracle the fast paths must equal (issue 3): one entry at a time with struct,
    written from api.rst 7.36 alone, sharing no code with harvest() or take()."""
    assert entries > 0 and entries & (entries - 1) == 0
    if memoryview(buf).nbytes < entries * ENTRY_BYTES:
        raise ValueError(f"buffer holds fewer than {entries} entries")
    fetch %= U32
    slots, offsets = [], []
    for i in range(fetch, fetch + entries):     # at most one full lap
        flags, slot, offset = entry(buf, entries, i)
        if flags & 3 != DIRTY:
            break
        slots.append(slot)
        offsets.append(offset)
        set_flags(buf, entries, i, RESET)
    count = len(slots)
    return HarvestResult(np.array(slots, np.uint32), np.array(offsets, np.uint64),
                         count, (fetch + count) % U32)


def assert_same(a: HarvestResult, b: HarvestResult):
    assert a.count == b.count == len(a.slots) == len(a.offsets)
    assert a.fetch == b.fetch
    assert a.slots.dtype == np.uint32 and b.slots.dtype == np.uint32
    assert a.offsets.dtype == np.uint64 and b.offsets.dtype == np.uint64
    np.testing.assert_array_equal(a.slots, b.slots)
    np.testing.assert_array_equal(a.offsets, b.offsets)


def both(buf, entries, fetch):
    """Run fast and reference on identical copies; the buffers must end equal."""
    fast_buf, ref_buf = bytearray(buf), bytearray(buf)
    fast = harvest(fast_buf, entries, fetch)
    ref = harvest_reference(ref_buf, entries, fetch)
    assert_same(fast, ref)
    assert fast_buf == ref_buf
    return fast, fast_buf


def fill(buf, entries, start, n, slot=lambda i: 1, offset=lambda i: i):
    for i in range(n):
        publish(buf, entries, start + i, slot(i), offset(i))


def test_empty_ring():
    buf = make_ring(64)
    res, after = both(buf, 64, 0)
    assert res.count == 0 and res.fetch == 0
    assert after == buf


def test_partial_run_then_next_harvest_continues():
    buf = make_ring(64)
    fill(buf, 64, 0, 10, slot=lambda i: 7, offset=lambda i: 100 + i)
    res, buf = both(buf, 64, 0)
    assert res.count == 10 and res.fetch == 10
    assert res.slots.tolist() == [7] * 10
    assert res.offsets.tolist() == list(range(100, 110))
    fill(buf, 64, 10, 5, offset=lambda i: 500 + i)
    res, _ = both(buf, 64, 10)
    assert res.count == 5 and res.offsets.tolist() == list(range(500, 505))


def test_run_wraps_around_the_end():
    entries = 64
    buf = make_ring(entries)
    fill(buf, entries, 60, 9, slot=lambda i: i, offset=lambda i: 1000 + i)
    res, after = both(buf, entries, 60)
    assert res.count == 9 and res.fetch == 69
    assert res.slots.tolist() == list(range(9))
    for i in range(9):
        assert entry(after, entries, 60 + i) == (2, i, 1000 + i)
    assert entry(after, entries, 69) == (0, 0, 0)


@pytest.mark.parametrize("entries", [64, 4096, 16384])
@pytest.mark.parametrize("start", [0, 1, 37])
def test_full_lap_takes_exactly_entries(entries, start):
    buf = make_ring(entries)
    fill(buf, entries, start, entries, slot=lambda i: i % 3, offset=lambda i: i)
    res, after = both(buf, entries, start)
    assert res.count == entries and res.fetch == start + entries
    assert res.offsets.tolist() == list(range(entries))
    # nothing left: a second harvest from the new fetch finds only RESET entries
    res2, _ = both(after, entries, res.fetch)
    assert res2.count == 0 and res2.fetch == res.fetch


@pytest.mark.parametrize("run", [4095, 4096, 4097, 12287, 12288, 12289])
@pytest.mark.parametrize("start", [0, 16384 - 4096, 16384 - 5])
def test_runs_across_scan_window_boundaries(run, start):
    # harvest() scans in growing windows (4096, 8192, ...); runs ending at or
    # next to a window edge, with and without wrap, must match the oracle
    entries = 16384
    buf = make_ring(entries)
    fill(buf, entries, start, run, slot=lambda i: i, offset=lambda i: i)
    set_flags(buf, entries, start + run + 1, 1)   # DIRTY beyond the gap: not taken
    res, _ = both(buf, entries, start)
    assert res.count == run


@pytest.mark.parametrize("stop_flags", [0, 2, 3, 6, 7, 0xFFFFFFFF])
def test_non_dirty_entries_stop_the_harvest(stop_flags):
    buf = make_ring(64)
    fill(buf, 64, 0, 20)
    set_flags(buf, 64, 8, stop_flags)
    res, after = both(buf, 64, 0)
    assert res.count == 8 and res.fetch == 8
    assert entry(after, 64, 8)[0] == stop_flags       # left untouched
    assert entry(after, 64, 9)[0] == 1                # beyond the stop: still DIRTY


def test_extra_flag_bits_do_not_block_dirty():
    # harvestable while flags & 3 == 1; the store is RESET exactly
    buf = make_ring(64)
    fill(buf, 64, 0, 3)
    set_flags(buf, 64, 1, 0x5)
    res, after = both(buf, 64, 0)
    assert res.count == 3
    assert [entry(after, 64, i)[0] for i in range(3)] == [2, 2, 2]


def test_harvested_flags_become_reset_with_slot_and_offset_unchanged():
    entries = 128
    buf = make_ring(entries)
    vals = [(0x10002 + i, (1 << 63) + 3 * i) for i in range(50)]
    fill(buf, entries, 100, 50, slot=lambda i: vals[i][0], offset=lambda i: vals[i][1])
    res, after = both(buf, entries, 100)
    assert res.count == 50
    assert list(zip(res.slots.tolist(), res.offsets.tolist())) == vals
    for i, (slot, off) in enumerate(vals):
        assert entry(after, entries, 100 + i) == (2, slot, off)


@pytest.mark.parametrize("fetch", [U32 - 5, U32 - 1, U32 + 3])
def test_fetch_index_wraps_at_2_32(fetch):
    entries = 64
    buf = make_ring(entries)
    fill(buf, entries, fetch, 10, offset=lambda i: i)
    res, after = both(buf, entries, fetch)
    assert res.count == 10
    assert res.fetch == (fetch + 10) % U32
    assert res.offsets.tolist() == list(range(10))
    # the new index, used modulo 2**32, addresses the entry after the run
    assert entry(after, entries, res.fetch) == (0, 0, 0)
    fill(after, entries, res.fetch, 1, offset=lambda i: 77)
    assert both(after, entries, res.fetch)[0].offsets.tolist() == [77]


def test_works_on_an_mmap_and_keeps_no_reference_to_it():
    entries = 4096
    m = mmap.mmap(-1, entries * ENTRY_BYTES)
    fill(m, entries, 4000, 200, slot=lambda i: 1, offset=lambda i: i)
    res = harvest(m, entries, 4000)
    assert res.count == 200 and res.offsets.tolist() == list(range(200))
    assert entry(m, entries, 4000) == (2, 1, 0)
    m.close()   # BufferError if any returned array were a view into the mapping
    assert res.offsets.tolist() == list(range(200))


def test_bad_arguments():
    with pytest.raises(ValueError, match="48 is not a power of two"):
        harvest(bytearray(48 * 16), 48, 0)
    with pytest.raises(ValueError, match="holds fewer than 64 entries"):
        harvest(bytearray(32 * 16), 64, 0)
    with pytest.raises(TypeError):
        harvest(bytes(64 * 16), 64, 0)
    with pytest.raises(ValueError):
        make_ring(100)
    ring = make_ring(64)
    for bad in (48, 0, -64):                           # the fast paths check their size too
        with pytest.raises(ValueError, match="not a power of two"):
            dirty_count(memoryview(ring).cast("I"), bad, 0)
        with pytest.raises(ValueError, match="not a power of two"):
            take(ring, memoryview(ring), bad, 0, 1, Stage(64))


@pytest.mark.parametrize("seed", range(300))
def test_random_scenarios_fast_equals_reference(seed):
    rnd = random.Random(seed)
    entries = rnd.choice([1, 2, 16, 64, 512, 4096, 8192])
    # mostly aligned runs; sometimes a fetch near 2**32
    fetch = rnd.randrange(U32) if rnd.random() < 0.7 else U32 - rnd.randrange(1, 2 * entries + 2)
    run = rnd.choice([0, entries, rnd.randrange(entries + 1), rnd.randrange(min(entries, 5) + 1)])
    buf = bytearray(rnd.randbytes(entries * ENTRY_BYTES))   # junk everywhere
    for i in range(run):
        publish(buf, entries, fetch + i, rnd.randrange(U32), rnd.randrange(1 << 64))
        if rnd.random() < 0.05:   # a DIRTY entry with stray high flag bits
            set_flags(buf, entries, fetch + i, 1 | (rnd.randrange(1 << 30) << 2))
    if run < entries:
        # the entry right after the run is not harvestable; junk beyond it may be
        set_flags(buf, entries, fetch + run, rnd.choice([0, 2, 3, rnd.randrange(U32) & ~1 | 2]))
        for i in range(run + 1, entries):
            if rnd.random() < 0.5:
                set_flags(buf, entries, fetch + i, 1)
    res, _ = both(buf, entries, fetch)
    assert res.count == run


# ---- dedupe -----------------------------------------------------------------

def test_dedupe_counts_duplicates_and_sorts():
    slots = [1, 1, 1, 1, 1, 1]
    offs = [9, 3, 9, 0, 3, 9]
    by_slot, dups, bogus = dedupe(slots, offs, {1: 16})
    assert list(by_slot) == [1]
    assert by_slot[1].tolist() == [0, 3, 9] and by_slot[1].dtype == np.uint64
    assert dups == 3 and bogus == []


def test_dedupe_many_slots_and_bogus():
    slots = np.array([1, 2, 1, 5, 2, 1, 2, 0x10001, 1], np.uint32)
    offs = np.array([4, 0, 4, 1, 7, 16, 7, 2, 15], np.uint64)
    by_slot, dups, bogus = dedupe(slots, offs, {1: 16, 2: 8, 0x10001: 4, 9: 100})
    assert by_slot.keys() == {1, 2, 0x10001}
    assert by_slot[1].tolist() == [4, 15]
    assert by_slot[2].tolist() == [0, 7]
    assert by_slot[0x10001].tolist() == [2]
    # slot 5 unknown, slot 1 offset 16 >= 16 pages; bogus are not duplicates
    assert bogus == [(5, 1), (1, 16)]
    assert dups == 2


def test_dedupe_all_bogus_and_empty():
    assert dedupe([], [], {1: 4}) == ({}, 0, [])
    by_slot, dups, bogus = dedupe([3, 3], [0, 0], {1: 4})
    assert by_slot == {} and dups == 0 and bogus == [(3, 0), (3, 0)]
    by_slot, dups, bogus = dedupe([1, 1], [4, 1 << 63], {1: 4})
    assert by_slot == {} and dups == 0 and bogus == [(1, 4), (1, 1 << 63)]


def test_dedupe_mismatched_lengths():
    with pytest.raises(ValueError):
        dedupe([1, 2], [0], {1: 4})


@pytest.mark.parametrize("seed", range(40))
def test_dedupe_random_against_python(seed):
    rnd = random.Random(seed)
    slot_pages = {s: rnd.choice([1, 8, 1000, 1 << 20]) for s in rnd.sample(range(8), 3)}
    n = rnd.choice([1, 10, 3000])
    pool = list(slot_pages) + [99]
    one = rnd.random() < 0.3
    slots = [pool[0] if one else rnd.choice(pool) for _ in range(n)]
    offs = [rnd.randrange(slot_pages.get(s, 50) + 2) if rnd.random() < 0.5
            else rnd.randrange(min(slot_pages.get(s, 50), 20) + 1) for s in slots]
    by_slot, dups, bogus = dedupe(np.array(slots, np.uint32), np.array(offs, np.uint64),
                                  slot_pages)
    want_bogus = [(s, o) for s, o in zip(slots, offs)
                  if s not in slot_pages or o >= slot_pages[s]]
    good = {}
    for s, o in zip(slots, offs):
        if s in slot_pages and o < slot_pages[s]:
            good.setdefault(s, set()).add(o)
    assert bogus == want_bogus
    assert {s: v.tolist() for s, v in by_slot.items()} == {s: sorted(v) for s, v in good.items()}
    assert dups == n - len(want_bogus) - sum(len(v) for v in good.values())


def test_harvest_then_dedupe():
    entries = 256
    buf = make_ring(entries)
    fill(buf, entries, 0, 200, slot=lambda i: i % 2, offset=lambda i: (i // 2) % 30)
    res = harvest(buf, entries, 0)
    by_slot, dups, bogus = dedupe(res.slots, res.offsets, {0: 30, 1: 30})
    assert by_slot[0].tolist() == list(range(30)) == by_slot[1].tolist()
    assert dups == 200 - 60 and bogus == []


def staged_take(buf, entries, fetch, stage):
    """What VcpuRing.take() does, on a synthetic ring: (count, new fetch)."""
    words = memoryview(buf).cast("I")
    count = dirty_count(words, entries, fetch)
    new = take(buf, memoryview(buf), entries, fetch, count, stage) if count else fetch & (U32 - 1)
    words.release()
    return count, new


def quiescent_ring(rnd, entries, fetch, run):
    """A ring as KVM leaves it: from the fetch index a run of DIRTY entries, then empty
    (0) entries, and behind the fetch index some RESET ones not yet reset."""
    buf = make_ring(entries)
    for i in range(run):
        publish(buf, entries, fetch + i, rnd.randrange(4), rnd.randrange(1 << 40))
    for i in range(1, rnd.randrange(entries - run + 1) if run < entries else 1):
        publish(buf, entries, fetch - i, 1, 5)
        set_flags(buf, entries, fetch - i, RESET)
    return buf


@pytest.mark.parametrize("seed", range(80))
def test_staged_take_equals_reference_on_a_quiescent_ring(seed):
    rnd = random.Random(seed)
    entries = rnd.choice([16, 64, 256, 4096])
    fetch = rnd.randrange(U32) if seed % 4 else U32 - rnd.randrange(1, entries)
    run = rnd.choice([0, 1, entries, rnd.randrange(entries + 1)])
    buf = quiescent_ring(rnd, entries, fetch, run)
    ref_buf, fast_buf = bytearray(buf), bytearray(buf)
    ref = harvest_reference(ref_buf, entries, fetch)
    stage = Stage(rnd.choice([1, entries]))        # capacity 1: take() must grow it
    count, new_fetch = staged_take(fast_buf, entries, fetch, stage)
    g = stage.entries()
    assert count == ref.count == run == stage.count and new_fetch == ref.fetch
    np.testing.assert_array_equal(g["slot"], ref.slots)
    np.testing.assert_array_equal(g["offset"], ref.offsets)
    assert (g["flags"] == DIRTY).all()             # copied before the RESET store
    assert fast_buf == ref_buf                     # same RESET marks, slot and offset kept
    del g
    stage.close()


@pytest.mark.parametrize("seed", range(40))
def test_stage_accumulates_several_takes_in_order(seed):
    # Several ring-full harvests between two collections land in one stage, in order.
    rnd = random.Random(seed)
    entries = rnd.choice([16, 64, 256])
    fetch, stage, ref_s, ref_o = rnd.randrange(U32), Stage(entries), [], []
    for _ in range(rnd.randrange(1, 8)):
        buf = quiescent_ring(rnd, entries, fetch, rnd.randrange(entries + 1))
        ref = harvest_reference(bytearray(buf), entries, fetch)
        ref_s += ref.slots.tolist()
        ref_o += ref.offsets.tolist()
        count, fetch = staged_take(buf, entries, fetch, stage)
        assert count == ref.count
    word0, offsets = stage.words()
    assert (word0 >> np.uint64(32)).tolist() == ref_s and offsets.tolist() == ref_o
    del word0, offsets
    stage.clear()
    assert stage.count == 0 and len(stage.entries()) == 0
    stage.close()


def test_dirty_count_sees_only_the_prefix_published_so_far():
    # While the vCPU runs, KVM appends behind the run: a count taken earlier stays valid
    # and the next one picks up exactly the new entries.
    entries, buf = 64, make_ring(64)
    words = memoryview(buf).cast("I")
    for i in range(10):
        publish(buf, entries, i, 1, i)
    assert dirty_count(words, entries, 0) == 10
    for i in range(10, 30):
        publish(buf, entries, i, 1, i)
    assert dirty_count(words, entries, 0) == 30
    for i in range(10):                                # harvested: RESET behind the fetch index
        set_flags(buf, entries, i, RESET)
    assert dirty_count(words, entries, 10) == 20
    for i in range(30, 64):
        publish(buf, entries, i, 1, i)
    assert dirty_count(words, entries, 10) == 54
    for i in range(64, 74):                            # reset by KVM, then pushed again
        publish(buf, entries, i, 1, i)
    assert dirty_count(words, entries, 10) == 64       # a full lap
    words.release()


@pytest.mark.parametrize("seed", range(60))
def test_a_guess_never_changes_the_count(seed):
    rnd = random.Random(seed)
    entries = rnd.choice([16, 64, 256])
    fetch = rnd.randrange(U32)
    run = rnd.choice([0, 1, entries, rnd.randrange(entries + 1)])
    buf = quiescent_ring(rnd, entries, fetch, run)
    words = memoryview(buf).cast("I")
    for guess in {0, 1, 2, run - 1, run, run + 1, entries - 1, entries, rnd.randrange(entries)}:
        assert dirty_count(words, entries, fetch, guess) == run
    words.release()


def _staged_with_hole():
    """A 64-entry ring with 40 DIRTY entries (slot 1, pages 0-39) but entry 5's flags 0,
    taken into a stage as the bisection takes it: (entries, buf, stage, count)."""
    entries, buf = 64, make_ring(64)
    for i in range(40):
        publish(buf, entries, i, 1, i)
    set_flags(buf, entries, 5, 0)                      # the hole
    stage = Stage(entries)
    count, _ = staged_take(buf, entries, 0, stage)
    return entries, buf, stage, count


def _tracker_over(stage, entries):
    """A RingTracker with vCPU 3's stage and no VM (nothing to reset)."""
    from types import SimpleNamespace
    from minivmm.dirty.tracker import RingTracker
    tracker = RingTracker(entries)
    tracker.rings = {3: SimpleNamespace(stage=stage)}
    tracker.page_sets = PageSets({1: 64})
    tracker._reset_locked = lambda: None
    return tracker


def test_a_hole_in_the_run_is_caught_at_collection():
    # KVM never leaves a non-DIRTY entry inside the run; if a kernel did, the bisection
    # could step over it, so the copy's flags are checked again when collecting.
    entries, buf, stage, count = _staged_with_hole()
    ps = PageSets({1: 64})
    holes = ps.add_words(*stage.words())
    by_slot, dups, bogus = ps.take()
    assert count == 40                                 # the bisection stepped over it
    assert holes == 1 and by_slot[1].tolist() == [i for i in range(40) if i != 5]
    stage.close()


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("entry", ["unique", "add_words"])
def test_page_sets_equal_dedupe(seed, entry):
    # PageSets (reusable maps), fed pairs (unique) or staged words (add_words), against
    # the stand-alone dedupe()
    rng = np.random.default_rng(seed)
    slot_pages = {0: 512, 1: int(rng.integers(1, 5000)), 7: 64}
    n = int(rng.integers(0, 3000))
    slots = rng.choice(np.array([0, 1, 1, 1, 7, 9], np.uint32), n).astype(np.uint32)
    if seed % 3 == 0:
        slots[:] = 1                                   # the common one-slot case
    offsets = rng.integers(0, 6000 if seed % 2 else 512, n).astype(np.uint64)
    if seed % 5 == 0 and n:
        offsets[0] = np.uint64(1 << 63)                # bogus even when read as signed
    word0 = (slots.astype(np.uint64) << np.uint64(32)) | np.uint64(DIRTY)
    ps = PageSets(slot_pages)
    for _ in range(2):                                 # the maps are reused: still right
        if entry == "unique":
            a, da, ba = ps.unique(slots, offsets)
        else:
            assert ps.add_words(word0, offsets) == 0
            a, da, ba = ps.take()
        b, db, bb = dedupe(slots, offsets, slot_pages)
        assert a.keys() == b.keys() and da == db and sorted(ba) == sorted(bb)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("seed", range(40))
def test_add_words_of_mixed_entries_equals_dedupe_of_the_dirty_ones(seed):
    # Staged words as a misbehaving kernel might leave them: several slots, some not
    # DIRTY (holes: left out and counted), some DIRTY with other flag bits set (taken,
    # as harvest() takes them), some in slots nobody logs (bogus).
    rng = np.random.default_rng(1000 + seed)
    slot_pages = {0: 512, 1: int(rng.integers(1, 5000)), 7: 64}
    n = int(rng.integers(1, 3000))
    slots = rng.choice(np.array([0, 1, 1, 1, 1, 7, 9], np.uint32), n).astype(np.uint32)
    flags = rng.choice(np.array([DIRTY] * 8 + [0, RESET, DIRTY | RESET, DIRTY | 4],
                                np.uint64), n)
    if seed % 4 == 0:
        flags[:] = DIRTY                               # only the slots are mixed
    offsets = rng.integers(0, 6000 if seed % 2 else 512, n).astype(np.uint64)
    word0 = (slots.astype(np.uint64) << np.uint64(32)) | flags
    ps = PageSets(slot_pages)
    holes = ps.add_words(word0, offsets)
    got, dups, bogus = ps.take()
    dirty = (flags & np.uint64(3)) == DIRTY
    want, wdups, wbogus = dedupe(slots[dirty], offsets[dirty], slot_pages)
    assert holes == n - int(dirty.sum())
    assert got.keys() == want.keys() and dups == wdups and sorted(bogus) == sorted(wbogus)
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("overrun", [False, True])
def test_holes_are_blamed_on_an_overrun_ring_when_there_was_one(overrun):
    # after a full lap or an overflow the holes are KVM's overwrites; the note blamed
    # out-of-order publishing whatever had happened to the ring
    entries, _, stage, _ = _staged_with_hole()
    tracker = _tracker_over(stage, entries)
    tracker.keep_raw = False
    if overrun:
        tracker._overrun.add(3)
    col = tracker._build_locked(None, 0.0)
    note, = col.lost
    assert note.startswith("vCPU 3: 1 entries taken as DIRTY were not DIRTY when copied")
    assert ("overrun" in note) == overrun and ("out of order" in note) != overrun
    stage.close()


def test_a_hole_is_not_among_the_vcpus_own_pages_either():
    # the per-vCPU view (Collection.raw, vcpu_pages) counted the untrusted entry's page
    # as found in the vCPU's ring while the collection left it out
    entries, _, stage, _ = _staged_with_hole()
    tracker = _tracker_over(stage, entries)
    col = tracker._build_locked(None, 0.0)
    want = [i for i in range(40) if i != 5]
    assert col.pages[1].tolist() == want
    assert col.vcpu_pages(3, 1).tolist() == want
    assert col.raw[3][1].tolist() == want
    stage.close()


def test_page_sets_take_offsets_of_any_integer_width():
    # 32-bit slots and offsets, as a caller's own arrays may be: values, not raw bytes
    for dtype in (np.uint32, np.int32, np.uint16):
        ps = PageSets({1: 100})
        by_slot, dups, bogus = ps.unique(np.array([1, 1, 1], np.uint32),
                                         np.array([5, 6, 5], dtype))
        assert {s: v.tolist() for s, v in by_slot.items()} == {1: [5, 6]}
        assert (dups, bogus) == (1, [])
