"""Randomized differential fuzzer: the dirty-ring fast path (dirty_count + take + Stage +
PageSets, strung together by RingTracker; and harvest() + dedupe()) against a plain
Python oracle written from api.rst 7.36 and virt/kvm/dirty_ring.c, over a model of the
kernel's half (push: slot, offset, then flags = DIRTY; reset: from reset_index while
flags & RESET, flags = 0). Synthetic rings only, no KVM.

    .venv/bin/python tests/fuzz_ring.py [cases] [first seed]

Not collected by pytest (reproducers of what it finds go to tests/unit/).
"""
from __future__ import annotations

import mmap
import random
import re
import struct
import sys
import time
from types import SimpleNamespace

import numpy as np

from minivmm.dirty.harvest import (DIRTY, ENTRY_BYTES, RESET, PageSets, Stage, dedupe,
                                   harvest, make_ring)
from minivmm.dirty.ring import EMPTY_FULL_LIMIT
from minivmm.dirty.tracker import RingTracker

U32 = 1 << 32
SIZES = [1 << k for k in range(4, 17)]          # 16 .. 65536 entries


def flags_at(buf, entries, i):
    return struct.unpack_from("<I", buf, (i & (entries - 1)) * ENTRY_BYTES)[0]


def set_flags(buf, entries, i, f):
    struct.pack_into("<I", buf, (i & (entries - 1)) * ENTRY_BYTES, f & 0xFFFFFFFF)


def entry(buf, entries, i):
    return struct.unpack_from("<IIQ", buf, (i & (entries - 1)) * ENTRY_BYTES)


class KernelRing:
    """The kernel's half of one ring (dirty_ring.c), on the buffer the VMM maps."""

    def __init__(self, entries, start, use_mmap=False):
        # a bytearray, or an mmap as VcpuRing maps (take()'s strided store differs by type)
        self.entries = entries
        self.buf = mmap.mmap(-1, entries * ENTRY_BYTES) if use_mmap else make_ring(entries)
        self.dirty_index = self.reset_index = start & (U32 - 1)

    def used(self):
        return (self.dirty_index - self.reset_index) & (U32 - 1)

    def push(self, slot, offset):
        at = (self.dirty_index & (self.entries - 1)) * ENTRY_BYTES
        struct.pack_into("<IQ", self.buf, at + 4, slot, offset)
        struct.pack_into("<I", self.buf, at, DIRTY)
        self.dirty_index = (self.dirty_index + 1) & (U32 - 1)

    def reset(self, limit=None):
        n = 0
        while flags_at(self.buf, self.entries, self.reset_index) & RESET:
            if limit is not None and n >= limit:
                break
            set_flags(self.buf, self.entries, self.reset_index, 0)
            self.reset_index = (self.reset_index + 1) & (U32 - 1)
            n += 1
        return n


class FakeRing:
    """What RingTracker uses of a VcpuRing, over a synthetic buffer."""

    def __init__(self, kring, fetch, stage_cap):
        self.entries, self.map = kring.entries, kring.buf
        self.view = memoryview(self.map)
        self.words = self.view.cast("I")
        self.fetch, self.last_full = fetch, 0
        self.stage = Stage(stage_cap)

    def flags(self):
        return np.frombuffer(self.map, dtype="<u4", count=self.entries * 4)[0::4].copy()


class FakeVm:
    def __init__(self, krings, rnd):
        self.krings, self.rnd, self.interrupt = krings, rnd, False
        self.calls = []                 # (limit, returned) of each call, for the oracle

    def reset_dirty_rings(self):
        # A pending signal may stop it part-way (v6.17+): return what was reset
        limit = self.rnd.randrange(0, 40) if self.interrupt and self.rnd.random() < 0.5 else None
        total = 0
        for k in self.krings:
            n = k.reset(None if limit is None else max(limit - total, 0))
            total += n
        self.calls.append((limit, total))
        return total


class Mismatch(AssertionError):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def gen_entry(rnd, slot_pages):
    known = list(slot_pages)
    r = rnd.random()
    if r < 0.85 and known:
        s = rnd.choice(known)
    else:
        s = rnd.choice([3, 99, 0x10001, 0x7FFF, 0xFFFFFFFF, rnd.randrange(U32)])
    pages = slot_pages.get(s, 64)
    r = rnd.random()
    if r < 0.5:
        o = rnd.randrange(min(pages, 40))                    # dense: duplicates
    elif r < 0.9:
        o = rnd.randrange(pages)
    elif r < 0.94:
        o = pages + rnd.randrange(3)                         # just out of range
    elif r < 0.97:
        o = (1 << 63) + rnd.randrange(1 << 20)               # negative as int64
    else:
        o = rnd.choice([(1 << 64) - 1, (1 << 32) + 1, rnd.randrange(1 << 64)])
    return s, o


class World:
    def __init__(self, rnd, adversarial):
        self.rnd, self.adv = rnd, adversarial
        # small rings mostly (the oracle is a Python loop), every size sometimes
        self.entries = rnd.choice(SIZES) if rnd.random() < 0.15 else rnd.choice(SIZES[:6])
        n = rnd.choice([1, 1, 2, 3, 4])
        ids = rnd.sample([0, 1, 2, 5, 0x10000, 0x10001, 0x7FFF], rnd.randrange(1, 4))
        self.slot_pages = {s: rnd.choice([1, 7, 64, 500, 4096, 1 << 16]) for s in ids}
        r = rnd.random()
        if r < 0.4:
            start = U32 - rnd.randrange(1, 3 * self.entries)     # u32 wrap of the index ahead
        elif r < 0.6:
            start = 0
        else:
            start = rnd.randrange(U32)
        use_mmap = rnd.random() < 0.3
        self.krings = [KernelRing(self.entries, start, use_mmap) for _ in range(n)]
        self.tracker = RingTracker(self.entries)
        self.tracker.keep_raw = rnd.random() < 0.5
        self.tracker.show_ring = rnd.random() < 0.2
        self.vm = FakeVm(self.krings, rnd)
        self.vm.interrupt = rnd.random() < 0.15
        self.tracker.machine = SimpleNamespace(vm=self.vm)
        self.tracker.slot_pages = dict(self.slot_pages)
        self.tracker.page_sets = PageSets(self.slot_pages)
        self.tracker.rings = {i: FakeRing(k, start, rnd.choice([1, 2, 17, self.entries]))
                              for i, k in enumerate(self.krings)}
        # oracle state
        self.obuf = [bytearray(k.buf) for k in self.krings]
        self.ofetch = [start] * n
        self.opending = [[] for _ in range(n)]     # raw (flags, slot, offset) taken
        self.o_since_reset = 0
        self.o_since_full = {}
        self.o_empty_full = {}
        self.o_overrun = set()
        self.o_lost = []                           # (kind, vcpu or None, number)
        self.o_resets = []
        self.o_ring_full = 0
        self.o_unreset = 0
        self.o_kreset = [k.reset_index for k in self.krings]   # oracle's copy of reset_index
        self.tainted = [False] * n                 # adversarial write happened on ring i

    # -- kernel actions (applied to the real buffer and the oracle's copy alike) --
    def push(self, i, k):
        kr = self.krings[i]
        for _ in range(k):
            if kr.used() >= self.entries:
                if not self.adv:
                    break
                self.tainted[i] = True             # an overflow: KVM WARNs and overwrites
            s, o = gen_entry(self.rnd, self.slot_pages)
            kr.push(s, o)
        self.obuf[i][:] = kr.buf

    def corrupt(self, i):
        kr, e, rnd = self.krings[i], self.entries, self.rnd
        self.tainted[i] = True
        kind = rnd.randrange(4)
        fetch = self.ofetch[i]
        if kind == 0 and kr.used():                # a hole inside the published run
            j = fetch + rnd.randrange(max(1, (kr.dirty_index - fetch) & (U32 - 1)))
            set_flags(kr.buf, e, j, rnd.choice([0, RESET, DIRTY | RESET, 0x100, 0xFFFFFFFE,
                                                0xFFFFFFFF, 0x1C]))
        elif kind == 1:                             # DIRTY with garbage bits
            j = fetch + rnd.randrange(e)
            if flags_at(kr.buf, e, j) & 3 == DIRTY:
                set_flags(kr.buf, e, j, DIRTY | rnd.randrange(1, 1 << 30) << 2)
        elif kind == 2:                             # a stray DIRTY anywhere in the lap
            j = fetch + rnd.randrange(e)
            set_flags(kr.buf, e, j, DIRTY | (rnd.randrange(4) << 8))
        else:                                       # junk slot/offset in a DIRTY entry
            j = fetch + rnd.randrange(e)
            at = (j & (e - 1)) * ENTRY_BYTES
            struct.pack_into("<IQ", kr.buf, at + 4, rnd.randrange(U32), rnd.randrange(1 << 64))
        self.obuf[i][:] = kr.buf

    # -- the oracle --
    def o_harvest(self, i, count, full=False):
        """Check the fast path's count for ring i and apply it to the oracle."""
        e, buf, fetch = self.entries, self.obuf[i], self.ofetch[i]
        f = [flags_at(buf, e, fetch + j) & 3 == DIRTY for j in range(e)]
        ref = next((j for j, d in enumerate(f) if not d), e)
        prefix = not any(f[ref:])
        if prefix:
            check(count == ref, f"ring {i}: fast took {count}, the DIRTY run is {ref} "
                  f"(fetch {fetch:#x}, entries {e})")
        else:
            # a kernel that broke the ordering: any boundary of the run will do, as long
            # as every entry taken is checked again at collection
            check(0 <= count <= e and (count == 0) == (not f[0]), f"ring {i}: count {count}")
            check(count == e or not f[count], f"ring {i}: count {count} stops at a DIRTY entry")
            check(count == 0 or f[count - 1], f"ring {i}: count {count} after a non-DIRTY")
        for j in range(count):
            fl, s, o = entry(buf, e, fetch + j)
            self.opending[i].append((fl, s, o))
            at = ((fetch + j) & (e - 1)) * ENTRY_BYTES
            buf[at] = RESET                          # low byte only (take())
        self.ofetch[i] = (fetch + count) & (U32 - 1)
        self.o_since_reset += count
        self.o_since_full[i] = self.o_since_full.get(i, 0) + count
        if count and count == e:
            self.o_lost.append(("lap", i, e))
            self.o_overrun.add(i)
        return count

    def o_kernel_reset(self, limit):
        total = 0
        for i, buf in enumerate(self.obuf):
            e, n = self.entries, 0
            while flags_at(buf, e, self.o_kreset[i]) & RESET:
                if limit is not None and total + n >= limit:
                    break
                set_flags(buf, e, self.o_kreset[i], 0)
                self.o_kreset[i] = (self.o_kreset[i] + 1) & (U32 - 1)
                n += 1
            total += n
        return total

    def o_reset(self, got):
        want = self.o_since_reset
        # the kernel's count, run on the oracle's copies with the same interruptions:
        # must match what the tracker saw; a short first call is finished by more calls
        # (ring.finish_reset: while short, until one resets nothing, 16 calls at most)
        calls, self.vm.calls = self.vm.calls, []
        check(calls, "no KVM_RESET_DIRTY_RINGS call")
        total = 0
        for n, (limit, returned) in enumerate(calls):
            r = self.o_kernel_reset(limit)
            check(r == returned, f"reset call {n}: kernel model {returned}, oracle {r}")
            total += r
            last = n == len(calls) - 1
            more_expected = total < want and n < 15 and (r or n == 0)
            check(more_expected != last, f"reset calls {calls} for {want} harvested")
        check(got == total, f"reset: tracker recorded {got}, the kernel reset {total}")
        if not any(self.tainted):
            # entries an interrupted reset left are reset by the next one
            left = self.o_unreset + want - total
            check(left >= 0 and (left == 0 or any(lim is not None for lim, _ in calls)),
                  f"reset count {total} for {want} harvested, {self.o_unreset} left before, "
                  "on a clean ring")
            self.o_unreset = left
        if calls[0][1] < want:
            self.o_lost.append(("reset", None, want))
        self.o_resets.append((got, want))
        self.o_since_reset = 0

    def compare_rings(self, where):
        for i, k in enumerate(self.krings):
            ring = self.tracker.rings[i]
            check(ring.fetch == self.ofetch[i],
                  f"{where}: ring {i} fetch {ring.fetch:#x} != oracle {self.ofetch[i]:#x}")
            if k.buf[:] != self.obuf[i]:
                a = np.frombuffer(bytes(k.buf[:]), np.uint8)
                b = np.frombuffer(bytes(self.obuf[i]), np.uint8)
                d = np.flatnonzero(a != b)
                raise Mismatch(f"{where}: ring {i} bytes differ at {d[:8].tolist()} "
                               f"(entry {d[0] // 16})")
            check(k.reset_index == self.o_kreset[i], f"{where}: ring {i} reset_index")

    # -- operations on the fast path, each checked against the oracle --
    def fetches(self):
        return [r.fetch for r in self.tracker.rings.values()]

    def op_poll(self):
        before = self.fetches()
        self.tracker.poll()
        counts = [(r.fetch - b) & (U32 - 1) for r, b in zip(self.tracker.rings.values(), before)]
        # a full lap moves the index by entries, which mod 2**32 is still entries
        for i, c in enumerate(counts):
            self.o_harvest(i, c)
        if self.o_since_reset:
            self.o_reset(self.tracker._resets[-1][0])
        self.compare_rings("poll")

    def op_ring_full(self, i, guess_mode):
        ring = self.tracker.rings[i]
        kr, e = self.krings[i], self.entries
        run = (kr.dirty_index - ring.fetch) & (U32 - 1)
        ring.last_full = {"right": run, "wrong": self.rnd.randrange(e + 2),
                          "stale": ring.last_full, "edge": self.rnd.choice([0, 1, 2, e - 1, e])
                          }[guess_mode]
        before = self.fetches()
        end = self.tracker.on_ring_full(SimpleNamespace(index=i))
        self.o_ring_full += 1
        counts = [(r.fetch - b) & (U32 - 1) for r, b in zip(self.tracker.rings.values(), before)]
        for j, c in enumerate(counts):
            self.o_harvest(j, c, full=(j == i))
            if j == i and c:
                check(ring.last_full == c, f"last_full {ring.last_full} != {c}")
        self.o_reset(self.tracker._resets[-1][0])
        n = self.o_since_full.pop(i, 0)
        want_end = False
        if n:
            self.o_empty_full[i] = 0
        else:
            self.o_empty_full[i] = self.o_empty_full.get(i, 0) + 1
            if self.o_empty_full[i] >= EMPTY_FULL_LIMIT:
                want_end = True
                self.o_lost.append(("overflow", i, 0))
                self.o_overrun.add(i)
        check((end is not None) == want_end, f"on_ring_full returned {end}, want end={want_end}")
        if want_end:
            check(end.reason == "ring-overflow", f"end reason {end.reason}")
        self.compare_rings("ring_full")

    def op_collect(self):
        before = self.fetches()
        col = self.tracker.collect()
        counts = [(r.fetch - b) & (U32 - 1) for r, b in zip(self.tracker.rings.values(), before)]
        for i, c in enumerate(counts):
            self.o_harvest(i, c)
        # the oracle's collection: every entry taken, flags as copied
        good, bogus, holes, accepted, total = {}, [], {}, 0, 0
        raw = {}
        for i, pend in enumerate(self.opending):
            total += len(pend)
            trusted = [(s, o) for fl, s, o in pend if fl & 3 == DIRTY]
            if pend:        # a vCPU's own entries: the trusted ones (DIRTY when copied)
                raw[i] = ([s for s, _ in trusted], [o for _, o in trusted])
            for fl, s, o in pend:
                if fl & 3 != DIRTY:
                    holes[i] = holes.get(i, 0) + 1
                    continue
                accepted += 1
                if s in self.slot_pages and o < self.slot_pages[s]:
                    good.setdefault(s, set()).add(o)
                else:
                    bogus.append((s, o))
            if holes.get(i):
                self.o_lost.append(("holes", i, holes[i]))
        uniq = sum(len(v) for v in good.values())
        self.o_reset(col.resets[-1][0])
        got_sets = {s: p.indices().tolist() for s, p in col.sets.items()}
        check(got_sets == {s: sorted(v) for s, v in good.items()},
              f"collect: page sets differ: fast {summ(got_sets)} oracle {summ(good)}")
        for s, p in col.sets.items():
            check(p.count == len(good[s]), f"PageSet count {p.count} != {len(good[s])}")
            check(p.npages == self.slot_pages[s], "PageSet npages")
        check(sorted(col.bogus) == sorted(bogus), f"bogus {col.bogus[:5]} != {bogus[:5]}")
        check(col.duplicates == accepted - len(bogus) - uniq,
              f"duplicates {col.duplicates} != {accepted - len(bogus) - uniq}")
        check(col.entries == total, f"entries {col.entries} != {total}")
        check(col.ring_full_exits == self.o_ring_full, "ring_full_exits")
        check(col.resets == self.o_resets, f"resets {col.resets} != {self.o_resets}")
        if self.tracker.keep_raw:
            got_raw = {i: (a.tolist(), b.tolist()) for i, (a, b) in col.raw.items()}
            check(got_raw == raw, "raw entries differ")
        check(norm_lost(col.lost, self) == self.o_lost,
              f"lost notes {norm_lost(col.lost, self)} != {self.o_lost}\n{col.lost}")
        self.o_lost, self.o_resets, self.o_ring_full = [], [], 0
        self.opending = [[] for _ in self.opending]
        for r in self.tracker.rings.values():
            check(r.stage.count == 0, "stage not cleared")
        self.compare_rings("collect")
        return col

    def close(self):
        for r in self.tracker.rings.values():
            r.words.release()
            r.view.release()
            r.stage.close()
        for k in self.krings:
            if isinstance(k.buf, mmap.mmap):
                k.buf.close()


def summ(d):
    return {s: (len(v), sorted(v)[:6]) for s, v in d.items()}


def norm_lost(lost, w):
    out = []
    for note in lost:
        if m := re.match(r"vCPU (\d+): a harvest took a full lap of (\d+)", note):
            out.append(("lap", int(m[1]), int(m[2])))
        elif m := re.match(r"KVM_RESET_DIRTY_RINGS stopped after \d+ of (\d+)", note):
            out.append(("reset", None, int(m[1])))
        elif m := re.match(r"vCPU (\d+): (\d+) entries taken as DIRTY were not DIRTY", note):
            i = int(m[1])
            overrun = "overrun" in note
            check(overrun == (i in w.o_overrun), f"hole note blames the wrong cause: {note}")
            out.append(("holes", i, int(m[2])))
        elif m := re.match(r"vCPU (\d+): \d+ KVM_EXIT_DIRTY_RING_FULL exits in a row", note):
            out.append(("overflow", int(m[1]), 0))
        else:
            raise Mismatch(f"unexpected lost note {note!r}")
    return out


def run_world(seed):
    rnd = random.Random(seed)
    w = World(rnd, adversarial=rnd.random() < 0.3)
    steps = 0
    try:
        for _ in range(rnd.randrange(1, 25)):
            op = rnd.random()
            i = rnd.randrange(len(w.krings))
            if op < 0.35:
                r = rnd.random()
                k = (w.entries if r < 0.1 else rnd.randrange(w.entries + 1) if r < 0.4
                     else rnd.randrange(min(w.entries, 50) + 1))
                w.push(i, k)
                continue
            if op < 0.42 and w.adv:
                w.corrupt(i)
                continue
            if op < 0.55:
                w.op_poll()
            elif op < 0.8:
                w.op_ring_full(i, rnd.choice(["right", "wrong", "stale", "edge"]))
            else:
                w.op_collect()
            steps += 1
        w.op_collect()
        steps += 1
    finally:
        w.close()
    return steps


# ---- the stand-alone functions: harvest() and dedupe() / PageSets -----------------------

def harvest_case(rnd):
    e = rnd.choice(SIZES) if rnd.random() < 0.2 else rnd.choice(SIZES[:7])
    fetch = rnd.choice([rnd.randrange(U32), U32 - rnd.randrange(1, 2 * e + 2), 0])
    buf = bytearray(make_ring(e))
    run = rnd.choice([0, e, rnd.randrange(e + 1), rnd.randrange(min(e, 5) + 1)])
    for j in range(run):
        at = ((fetch + j) & (e - 1)) * ENTRY_BYTES
        struct.pack_into("<IIQ", buf, at, DIRTY if rnd.random() < 0.95 else
                         DIRTY | rnd.randrange(1 << 30) << 2, rnd.randrange(U32),
                         rnd.randrange(1 << 64))
    if run < e:
        set_flags(buf, e, fetch + run, rnd.choice([0, RESET, 3, 0x100, 0xFFFFFFFE]))
        for j in range(run + 1, e):
            if rnd.random() < 0.3:
                set_flags(buf, e, fetch + j, rnd.choice([DIRTY, RESET, 0]))
    ref = bytearray(buf)
    res = harvest(buf, e, fetch)
    slots, offs = [], []
    for j in range(e):
        fl, s, o = entry(ref, e, fetch + j)
        if fl & 3 != DIRTY:
            break
        slots.append(s)
        offs.append(o)
        set_flags(ref, e, fetch + j, RESET)          # harvest() stores the whole word
    check(res.count == len(slots) == run, f"harvest count {res.count} != {len(slots)}")
    check(res.fetch == (fetch + run) % U32, "harvest fetch")
    check(res.slots.tolist() == slots and res.offsets.tolist() == offs, "harvest entries")
    check(buf == ref, "harvest: ring bytes differ")


def dedupe_case(rnd):
    ids = rnd.sample([0, 1, 2, 5, 0x10001], rnd.randrange(0, 4))
    slot_pages = {s: rnd.choice([1, 3, 64, 1000, 1 << 20]) for s in ids}
    n = rnd.choice([0, 1, 2, 10, 200, 3000])
    pairs = [gen_entry(rnd, slot_pages) for _ in range(n)]
    if rnd.random() < 0.3 and pairs:
        pairs = [(pairs[0][0], o) for _, o in pairs]
    slots = np.array([s for s, _ in pairs], np.uint32)
    offs = np.array([o for _, o in pairs], np.uint64)
    good, bogus = {}, []
    for s, o in pairs:
        if s in slot_pages and o < slot_pages[s]:
            good.setdefault(s, set()).add(o)
        else:
            bogus.append((s, o))
    want = {s: sorted(v) for s, v in good.items()}
    wdups = n - len(bogus) - sum(len(v) for v in good.values())
    by, dups, bg = dedupe(slots, offs, slot_pages)
    check({s: v.tolist() for s, v in by.items()} == want, "dedupe sets")
    check(dups == wdups and bg == bogus, f"dedupe dups/bogus {dups} {wdups}")
    ps = PageSets(slot_pages)
    how = rnd.randrange(3)
    cut = rnd.randrange(n + 1)
    for a, b in ((0, cut), (cut, n)):                 # two batches, one take
        if how == 0:
            ps.add(slots[a:b], offs[a:b])
        elif how == 1:
            ps.add(slots[a:b], offs[a:b].view(np.int64))
        else:
            w0 = (slots[a:b].astype(np.uint64) << np.uint64(32)) | np.uint64(DIRTY)
            check(ps.add_words(w0, offs[a:b]) == 0, "add_words holes")
    got, d2, b2 = ps.take()
    check({s: v.tolist() for s, v in got.items()} == want, "PageSets sets")
    check(d2 == wdups and sorted(b2) == sorted(bogus), f"PageSets dups/bogus {d2} {wdups}")


def main():
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    seed0 = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    t0, steps, fails = time.time(), 0, 0
    for seed in range(seed0, seed0 + cases):
        rnd = random.Random(seed ^ 0x5EED)
        try:
            harvest_case(rnd)
            dedupe_case(rnd)
            steps += 2 + run_world(seed)
        except Mismatch as e:
            fails += 1
            print(f"seed {seed}: {e}")
            if fails >= 20:
                break
    print(f"{cases} worlds, {steps} checked steps, {fails} failures, {time.time() - t0:.0f}s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
