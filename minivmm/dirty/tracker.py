"""One tracker interface over the dirty ring and the dirty bitmap, and the session that
runs a payload iteration by iteration, collecting and verifying at every sync.

Mirrors the collection protocols of Documentation/virt/kvm/api.rst 7.36
(harvest, then KVM_RESET_DIRTY_RINGS, then read the pages; KVM_EXIT_DIRTY_RING_FULL
asks for exactly that) and 4.8/4.117 (KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG
under KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2). One VM cannot use both on x86
(GET_DIRTY_LOG fails with ENXIO once the ring is on, abi.md rule 48), so "both"
means two VMs running the same payload side by side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
import traceback

import numpy as np

from .. import _sys, abi
from .._args import check_number, check_type, named
from .._sys import KvmError
from ..kvm import Kvm
from ..machine import Machine, MachineError, VcpuEnd, check_vcpus, start_thread
from ..payload import Payload, load
from ..x86 import layout as L
from .bitmap import SlotBitmap, enable_manual_protect, popcount
from .harvest import DIRTY, PageSets, dirty_count, take
from .pageset import PageSet
from .ring import (EMPTY_FULL_LIMIT, DirtyRingError, VcpuRing, enable_dirty_ring, finish_reset,
                   overflow_reason, ring_capability)
from .verify import ContentOracle, has_plan, plan

SLOT_NAMES = {L.SLOT_SYSTEM: "system", L.SLOT_DATA: "data"}
_EMPTY = np.empty(0, np.int64)


@dataclasses.dataclass
class Collection:
    """What one collection found, per slot, with its bookkeeping.

    ``sets`` holds each slot's pages as collected (PageSet: a page map or bitmap words
    and a count); ``pages`` gives them as sorted unique int64 indices, made on first use.
    """
    sets: dict                           # slot id -> PageSet (slots with >= 1 page)
    raw: dict | None                     # ring with keep_raw: vCPU -> (slots, offsets), DIRTY ones
    entries: int = 0                     # ring entries (or set bits) taken
    duplicates: int = 0
    bogus: list = dataclasses.field(default_factory=list)
    ring_full_exits: int = 0
    resets: list = dataclasses.field(default_factory=list)   # (returned, harvested)
    reset_retries: int = 0               # extra resets after a signal interrupted one
    lost: list = dataclasses.field(default_factory=list)     # evidence of lost entries
    collect_s: float = 0.0
    background_s: float = 0.0            # collecting while vCPUs ran (ring-full, reaper)
    ring_views: dict | None = None       # ring only, with show_ring: see ring_view_dict()
    _pages: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def pages(self) -> dict:
        """slot id -> sorted unique page indices (int64)."""
        if self._pages is None:
            self._pages = {s: p.indices() for s, p in self.sets.items()}
        return self._pages

    @property
    def reset_count_ok(self) -> bool:
        return all(got == want for got, want in self.resets)

    def vcpu_pages(self, index: int, slot: int) -> np.ndarray:
        """Ring only: the unique pages of ``slot`` found in vCPU ``index``'s ring."""
        slots, offsets = self.raw.get(index, (_EMPTY, _EMPTY))
        return np.unique(offsets[slots == slot]).astype(np.int64)


class Tracker:
    """Base: which slots log, what happens before vCPUs exist, how to collect."""
    name = "?"

    def __init__(self):
        self.lock = threading.Lock()
        self.machine = None
        self.slot_pages: dict = {}
        self._bound: dict = {}           # slot -> the GuestMemory tracked (bind())
        self.used = False     # given to a DirtySession: its rings, bitmaps and counts are that VM's

    def before_vcpus(self, machine) -> None:
        pass

    def on_vcpu(self, machine, st) -> None:
        pass

    def bind(self, machine) -> None:
        self.machine = machine
        self._bound = {slot: mem for slot, mem in machine.vm.memory.items()
                       if mem.flags & abi.KVM_MEM_LOG_DIRTY_PAGES}
        self.slot_pages = {slot: mem.pages for slot, mem in self._bound.items()}
        self.page_sets = PageSets(self.slot_pages)

    def check_slots(self) -> None:
        """Refuse a logged slot added (or replaced) since bind(): KVM logs it, but the page
        maps and bitmaps were made for the slots of then, so its pages would go untracked
        (dropped by the bitmap, counted as bogus by the ring)."""
        vm = self.machine.vm
        if vm is None:                   # closed: said later
            return
        for slot, mem in vm.memory.items():
            if mem.flags & abi.KVM_MEM_LOG_DIRTY_PAGES and (
                    self.slot_pages.get(slot) != mem.pages
                    or self._bound.get(slot, mem) is not mem):
                raise ValueError(
                    f"slot {slot} ({mem.name}) logs dirty pages but was added or replaced "
                    f"after this {self.name} tracker was set up, so it is not tracked: add "
                    "it before (in the tracker's before_vcpus), or without "
                    "KVM_MEM_LOG_DIRTY_PAGES")
        # a tracked slot removed (or replaced by one of the same size, which the loop above
        # did not tell apart): its page map, bitmap and content oracle are the old memory's,
        # and ring entries KVM pushed for the old slot would be credited to the new one
        for slot, mem in self._bound.items():
            if vm.memory.get(slot) is not mem or not mem.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
                raise ValueError(
                    f"slot {slot} ({mem.name}) was tracked by this {self.name} tracker but "
                    "has been removed, replaced or stopped logging dirty pages since it was "
                    "set up: change logged slots before the session, not during it")

    def poll(self) -> None:
        """Collect while vCPUs run (async mode); kept until the next collect()."""

    def collect(self) -> Collection:
        """Everything dirtied since the last collect."""
        raise NotImplementedError

    def on_ring_full(self, st):
        return VcpuEnd("unexpected-exit", detail={"exit": "DIRTY_RING_FULL without a ring"})


class RingTracker(Tracker):
    """Per-vCPU dirty rings: harvest each, then one KVM_RESET_DIRTY_RINGS for the VM."""
    name = "ring"

    def __init__(self, entries: int = 4096, allow_acq_rel: bool = True,
                 force_unavailable: bool = False):
        super().__init__()
        self.entries = entries
        self.allow_acq_rel, self.force_unavailable = allow_acq_rel, force_unavailable
        self.cap = None
        self.rings: dict[int, VcpuRing] = {}
        # Per-vCPU raw entries in each Collection (Collection.raw): a copy per collection,
        # wanted by the per-vCPU table; DirtySession turns it off when it does not verify.
        self.keep_raw = True
        # Entries each vCPU's stage has room for from the start (at least a lap);
        # DirtySession sets it from the payload's pages per vCPU.
        self.stage_entries = 0
        self._since_reset = 0
        self._resets, self._lost = [], []
        self._ring_full = self._reset_retries = 0
        self._empty_full: dict[int, int] = {}
        self._since_full: dict[int, int] = {}    # entries taken from ring i since its last full
        self._overrun: set[int] = set()   # rings KVM wrote past our index (a lap, an overflow)
        self._bg_s = 0.0
        self.show_ring = False            # record each ring's state around every collection

    def before_vcpus(self, machine) -> None:
        self.cap = ring_capability(machine.kvm, self.allow_acq_rel, self.force_unavailable)
        if self.cap is None:
            raise DirtyRingError("this kernel offers no dirty ring (KVM_CAP_DIRTY_LOG_RING is "
                                 "0): use --tracker bitmap")
        try:
            enable_dirty_ring(machine.vm, self.entries, self.cap)
        except DirtyRingError as e:
            # a size outside the host's range: name the argument (--ring-entries in the
            # CLI), as every other refused value is named; it said only "ring size 16..."
            raise named(DirtyRingError(f"ring_entries: {e}"), "ring_entries") from None

    def on_vcpu(self, machine, st) -> None:
        self.rings[st.index] = VcpuRing(st.vcpu, self.entries, self.stage_entries)

    def _harvest_locked(self, index: int, ring: VcpuRing, full: bool = False) -> int:
        """Move one ring's DIRTY entries into its stage (decoded at collect) and mark them
        RESET; returns how many. The vCPU may be running (dirty_count explains why).
        ``full``: this ring's vCPU is the one that exited DIRTY_RING_FULL, so the count
        is likely the one of its last ring-full exit (KVM stops it at the soft limit),
        which is tried first. One call for dirty_count and one for take(): right after
        KVM_RUN each Python call layer costs microseconds (docs/benchmarks.md)."""
        count = dirty_count(ring.words, ring.entries, ring.fetch, ring.last_full if full else 0)
        if count:
            if full:
                ring.last_full = count
            ring.fetch = take(ring.map, ring.view, ring.entries, ring.fetch, count, ring.stage)
            self._since_full[index] = self._since_full.get(index, 0) + count
            self._since_reset += count
            if count == ring.entries:
                self._lost.append(f"vCPU {index}: a harvest took a full lap of {ring.entries} "
                                  "entries: the ring was full, so later dirty pages may have "
                                  "overwritten entries")
                self._overrun.add(index)
        return count

    def _reset_locked(self) -> None:
        want = self._since_reset
        got = self.machine.vm.reset_dirty_rings()
        if got < want:                   # stopped part-way: finish it, and say what it costs
            first = got
            got, calls = finish_reset(self.machine.vm, got, want)
            self._reset_retries += calls
            if self._overrun:
                # KVM's reset index is its own: once it pushed past ours it stops at an
                # entry it wrote over, not RESET: the overrun, not a signal, cut it short
                rings = ", ".join(str(i) for i in sorted(self._overrun))
                why = (f": the ring of vCPU {rings} was overrun (noted), so KVM's indices no "
                       "longer match the VMM's; the pages of the entries not reset")
                source = ""
            else:
                why = (" (a pending signal or task work): the kernel drops the batch it was "
                       "on, so up to 64 of those pages")
                source = " (virt/kvm/dirty_ring.c, v6.17+)"
            self._lost.append(f"KVM_RESET_DIRTY_RINGS stopped after {first} of {want} entries"
                              f"{why} stay write-enabled and their next writes are not logged"
                              f"{source}")
        self._resets.append((got, want))
        self._since_reset = 0

    def poll(self) -> None:
        with self.lock:
            t0 = time.perf_counter()
            for i, ring in self.rings.items():
                self._harvest_locked(i, ring)
            if self._since_reset:
                self._reset_locked()
            self._bg_s += time.perf_counter() - t0

    def on_ring_full(self, st):
        # The clock starts before an uncontended acquire (the native baseline's too): right
        # after KVM_RUN that first call is the dearest step of the handler (~10-13 us here).
        # Waiting behind another vCPU's collection is not timed (that time is its).
        t0 = time.perf_counter()
        if not self.lock.acquire(False):
            self.lock.acquire()
            t0 = time.perf_counter()
        try:
            self._ring_full += 1
            # every ring, not only the full one: the others are likely close to full too
            for i, ring in self.rings.items():
                self._harvest_locked(i, ring, i == st.index)
            self._reset_locked()
            self._bg_s += time.perf_counter() - t0
            # Entries taken from this ring since its previous ring-full exit, by whichever
            # thread: none at all means KVM's index has run past ours (an overflow).
            n = self._since_full.pop(st.index, 0)
            if n:
                self._empty_full[st.index] = 0
                return None
            self._empty_full[st.index] = self._empty_full.get(st.index, 0) + 1
            if self._empty_full[st.index] < EMPTY_FULL_LIMIT:
                return None
            why = f"vCPU {st.index}: {overflow_reason()}"
            self._lost.append(why)
            self._overrun.add(st.index)
            return VcpuEnd("ring-overflow", detail={"error": why})
        finally:
            self.lock.release()

    def collect(self) -> Collection:
        """Harvest every ring, de-duplicate, reset."""
        # show_ring: each ring's flags before harvesting, after it (RESET marks) and after
        # KVM_RESET_DIRTY_RINGS, with the fetch indices (for the ring view)
        views = {} if self.show_ring else None
        with self.lock:
            t0 = time.perf_counter()
            for i, ring in self.rings.items():
                if views is None:
                    self._harvest_locked(i, ring)
                    continue
                before, fetch0 = ring.flags(), ring.fetch
                n = self._harvest_locked(i, ring)
                views[i] = {"entries": ring.entries, "fetch_before": fetch0,
                            "fetch_after": ring.fetch, "harvested": n,
                            "before": before, "harvested_flags": ring.flags()}
            col = self._build_locked(views, t0)
            col.ring_views = views
        return col

    def _build_locked(self, views: dict | None, t0: float) -> Collection:
        """De-duplicate the stages, then KVM_RESET_DIRTY_RINGS: in this order the entries
        just copied are still in the cache when they are read again. collect_s runs from
        ``t0`` (the harvest's start) to the end of the reset: harvest + de-duplication +
        reset, as the native baseline times it, without making the report."""
        raw, entries = ({} if self.keep_raw else None), 0
        for i, ring in self.rings.items():
            n = ring.stage.count
            if not n:
                continue
            holes = self.page_sets.add_words(*ring.stage.words())
            if raw is not None:
                c = ring.stage.entries().copy()  # the stage is reused: keep a copy
                if holes:                        # untrusted: not this vCPU's pages either
                    c = c[(c["flags"] & 3) == DIRTY]
                raw[i] = (c["slot"], c["offset"])
            if holes:
                # after a full lap or an overflow, KVM's writes past our index explain the
                # holes; without one, only out-of-order publishing does
                why = ("KVM wrote over them when the ring was overrun (a full lap or an "
                       "overflow, noted)" if i in self._overrun
                       else "the kernel published the ring out of order")
                self._lost.append(f"vCPU {i}: {holes} entries taken as DIRTY were not DIRTY "
                                  f"when copied: {why}; their pages are not trusted")
            entries += n
            ring.stage.clear()
        sets, dups, bogus = self.page_sets.take_sets()
        self._reset_locked()
        took = time.perf_counter() - t0
        if views is not None:
            for i, ring in self.rings.items():
                views[i].update(after_reset=ring.flags(), reset_returned=self._resets[-1][0])
        col = Collection(sets=sets, raw=raw, entries=entries, duplicates=dups,
                         bogus=bogus, ring_full_exits=self._ring_full, resets=self._resets,
                         lost=self._lost, collect_s=took, reset_retries=self._reset_retries)
        col.background_s = self._bg_s
        self._ring_full, self._resets, self._lost, self._bg_s = 0, [], [], 0.0
        self._reset_retries = 0
        return col


def initially_set_missing(offered: int) -> str:
    """Why --initially-set cannot be had, given KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's value;
    "" when it can."""
    if offered & abi.KVM_DIRTY_LOG_INITIALLY_SET:
        return ""
    return ("this kernel does not offer KVM_DIRTY_LOG_INITIALLY_SET "
            f"(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is {offered}, api.rst 7.18): drop "
            "--initially-set")


class BitmapTracker(Tracker):
    """KVM_GET_DIRTY_LOG per logged slot; with manual protect, KVM_CLEAR_DIRTY_LOG after."""
    name = "bitmap"

    def __init__(self, manual_protect: bool = True, initially_set: bool = False):
        if initially_set and not manual_protect:
            raise ValueError("KVM_DIRTY_LOG_INITIALLY_SET is an option of manual protect "
                             "(api.rst 7.18): drop --no-manual-protect or --initially-set")
        super().__init__()
        self.want_manual, self.initially_set = manual_protect, initially_set
        self.all_set_first = False
        self.manual = False
        self.bitmaps: dict[int, SlotBitmap] = {}
        self._acc: dict[int, np.ndarray] = {}    # bits polled since the last collect
        self._bg_s = 0.0

    def before_vcpus(self, machine) -> None:
        offered = machine.kvm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        if self.initially_set and (why := initially_set_missing(offered)):
            # asked for, so not dropped without a word (the run would not be what was asked)
            raise ValueError(why)
        if self.want_manual and offered & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            # the first GET then reports every page of each logged slot (api.rst 7.18)
            self.all_set_first = self.initially_set \
                and bool(offered & abi.KVM_DIRTY_LOG_INITIALLY_SET)
            enable_manual_protect(machine.vm, self.all_set_first)
            self.manual = True

    def bind(self, machine) -> None:
        super().bind(machine)
        self.bitmaps = {slot: SlotBitmap(machine.vm, slot, pages)
                        for slot, pages in self.slot_pages.items()}
        self._acc = {}

    def poll(self) -> None:
        with self.lock:
            t0 = time.perf_counter()
            for slot, bm in self.bitmaps.items():
                buf, n = bm.collect(self.manual)
                if n:
                    acc = self._acc.get(slot)
                    if acc is None:
                        self._acc[slot] = np.frombuffer(buf, np.uint64)
                    else:
                        np.bitwise_or(acc, np.frombuffer(buf, np.uint64), out=acc)
            self._bg_s += time.perf_counter() - t0

    def collect(self) -> Collection:
        with self.lock:
            t0 = time.perf_counter()
            sets, entries = {}, 0
            for slot, bm in self.bitmaps.items():
                words, n = bm.collect(self.manual)
                acc = self._acc.pop(slot, None)
                if acc is not None:               # bits a poll took (and cleared) earlier
                    np.bitwise_or(acc, np.frombuffer(words, np.uint64), out=acc)
                    words, n = acc, popcount(acc)
                if n:
                    sets[slot] = PageSet("bitmap", words, bm.npages, n)
                    entries += n
            took = time.perf_counter() - t0
            col = Collection(sets=sets, raw=None, entries=entries, collect_s=took)
            col.background_s, self._bg_s = self._bg_s, 0.0
        return col


def make_tracker(kind: str, ring_entries: int = 4096, manual_protect: bool = True,
                 initially_set: bool = False, force_no_ring: bool = False,
                 show_ring: bool = False) -> Tracker:
    if kind == "ring":
        tracker = RingTracker(ring_entries, force_unavailable=force_no_ring)
        tracker.show_ring = show_ring
        return tracker
    if kind == "bitmap":
        return BitmapTracker(manual_protect, initially_set)
    raise ValueError(f"unknown tracker {kind!r} (ring or bitmap)")


@dataclasses.dataclass
class IterationRecord:
    """One collection, verified: what the tracker reported against both oracles."""
    iteration: int | str
    tracker: str
    collection: Collection
    data_pages: np.ndarray               # reported data-slot pages, all vCPUs
    expected: np.ndarray | None          # plan oracle, all vCPUs (None: no plan)
    changed: np.ndarray                  # content oracle: pages whose content changed
    missed: np.ndarray                   # changed or planned but not reported
    extra: np.ndarray                    # reported but content unchanged
    rows: list                           # per-vCPU rows for the table
    scope: str = ""
    complete: bool = True                # every vCPU reached this sync (none stopped first)

    @property
    def ok(self) -> bool:
        c = self.collection
        return not len(self.missed) and c.reset_count_ok and not c.lost and not c.bogus

    def to_dict(self, with_pages: bool = True) -> dict:
        c = self.collection
        out = {"iteration": self.iteration,
               "pages": {SLOT_NAMES.get(s, str(s)): p.tolist() for s, p in c.pages.items()}
               if with_pages else {},
               "reported": len(self.data_pages),
               "complete": self.complete,
               "expected": None if self.expected is None else len(self.expected),
               "missed": len(self.missed), "missed_pages": self.missed.tolist()[:64],
               "extra": len(self.extra), "extra_pages": self.extra.tolist()[:64],
               "entries": c.entries, "duplicates": c.duplicates, "bogus": len(c.bogus),
               "ring_full_exits": c.ring_full_exits, "reset_count_ok": c.reset_count_ok,
               "resets": [list(r) for r in c.resets], "reset_retries": c.reset_retries,
               "lost": c.lost,
               "collect_s": round(c.collect_s, 6),
               "background_s": round(c.background_s, 6),
               "vcpus": self.rows, "content_scope": self.scope}
        views = c.ring_views
        if views:
            out["ring_view"] = {str(i): ring_view_dict(v) for i, v in views.items()}
        if with_pages:                       # without pages, none is claimed, not "data": []
            out["pages"].setdefault("data", [])
        return out


def ring_view_dict(v: dict) -> dict:
    """A ring's state at one collection, summarised: counts per state at each stage, the
    fetch indices (free running, and as ring positions) and what the reset returned."""
    def counts(flags):
        f = np.asarray(flags) & 3
        return {"dirty": int((f == 1).sum()), "reset": int(((f & 2) != 0).sum()),
                "empty": int((f == 0).sum())}
    n = v["entries"]
    return {"entries": n, "fetch_before": v["fetch_before"], "fetch_after": v["fetch_after"],
            "position_before": v["fetch_before"] % n, "position_after": v["fetch_after"] % n,
            "harvested": v["harvested"], "reset_returned": v["reset_returned"],
            "before_harvest": counts(v["before"]), "after_harvest": counts(v["harvested_flags"]),
            "after_reset": counts(v["after_reset"])}


class CollectionError(RuntimeError):
    """A collection failed in a vCPU or reaper thread; ``thread_traceback`` says where."""

    def __init__(self, message: str, thread_traceback: str = ""):
        super().__init__(message)
        self.thread_traceback = thread_traceback


MAX_ITERATIONS = 2 ** 32 - 1
# Collections a run may make: SYNCS_PER_ITERATION per iteration asked (a payload may sync a
# tag more than once, README) and EXTRA_SYNCS more. A guest that syncs for ever would
# otherwise pile up records until the timeout (30,000 a run and 250 MB in 20 s here)
SYNCS_PER_ITERATION, EXTRA_SYNCS = 4, 64
_NOTHING = object()      # no record arrived within the poll interval


class DirtySession:
    """A payload in a fresh VM with a tracker, run iteration by iteration.

    Each sync exit (out 0xf0) of every running vCPU is a barrier: the last vCPU to
    arrive collects, verifies and then lets all continue. ``collect="async"`` adds a
    reaper thread that harvests while the vCPUs run, as QEMU's does.
    """

    def __init__(self, payload: Payload | str, tracker: str | Tracker = "ring",
                 vcpus: int | None = None, pages: int = 4096, iterations: int = 5,
                 ring_entries: int = 4096, collect: str = "sync", manual_protect: bool = True,
                 initially_set: bool = False, stride: int = 4, seed: int = 1,
                 writes: int | None = None, force_no_ring: bool = False, kvm=None,
                 poll_interval_s: float = 0.001, show_ring: bool = False,
                 verify: bool = True):
        # a wrong type is a TypeError naming the argument, as everywhere else (README)
        check_type("collect", collect, str, '"sync" or "async"')
        check_type("tracker", tracker, (str, Tracker), '"ring", "bitmap" or a Tracker')
        if collect not in ("sync", "async"):
            raise ValueError(f"collect must be sync or async, not {collect!r}")
        if isinstance(tracker, Tracker) and tracker.used:
            raise ValueError(f"this {tracker.name} tracker served another DirtySession "
                             "already; make a new one")
        # a TypeError for a str, and True refused, as every other number of seconds is
        check_number("poll_interval_s", poll_interval_s, seconds=True)
        if not 0 < poll_interval_s < 1e9:
            raise named(ValueError("poll_interval_s must be a number of seconds above 0 "
                                   f"and below 1e9 (got {poll_interval_s!r})"),
                        "poll_interval_s")
        # here, not as Python's own errors from deep inside ("'<=' not supported", an
        # AttributeError); the ring size's range is the host's (ringsize.validate_entries)
        check_type("kvm", kvm, (Kvm, type(None)), "a minivmm Kvm or None")
        # as StepSession's dirty: a verify="no" was true, and verified
        for name, flag in (("manual_protect", manual_protect), ("initially_set", initially_set),
                           ("force_no_ring", force_no_ring), ("show_ring", show_ring),
                           ("verify", verify)):
            check_type(name, flag, bool, "True or False")
        check_number("ring_entries", ring_entries)
        # RCX = iterations, 0 looping until stopped (README, entry state); the sync tag is
        # 32 bits (EAX), so more would repeat tags
        for name, value, low, high in (("iterations", iterations, 0, MAX_ITERATIONS),
                                       ("stride", stride, 1, MAX_ITERATIONS),
                                       ("seed", seed, 0, 2 ** 64 - 1),
                                       ("writes", writes, 0, MAX_ITERATIONS)):
            if value is not None:      # a register: 64 bits at most
                check_number(name, value, low, high)
        self.payload = payload if isinstance(payload, Payload) else load(payload)
        self.tracker = tracker if isinstance(tracker, Tracker) else make_tracker(
            tracker, ring_entries, manual_protect, initially_set, force_no_ring, show_ring)
        self.tracker.used = True
        self.collect_mode, self.iterations_asked = collect, iterations
        # verify=False only collects (what the native baseline does): for benchmarks.
        # Nothing then reads the per-vCPU raw entries, so the ring need not copy them.
        self.verify = verify
        if not verify and isinstance(self.tracker, RingTracker):
            self.tracker.keep_raw = False
        self.poll_interval_s = poll_interval_s
        nvcpus = vcpus if vcpus is not None else (self.payload.vcpus or 1)
        check_number("vcpus", nvcpus, 1, error=MachineError)
        check_number("pages", pages, 1, error=MachineError)
        if pages < nvcpus:
            with contextlib.nullcontext(kvm) if kvm else Kvm() as k:
                check_vcpus(nvcpus, k)          # the vCPUs may be what is wrong
            raise named(MachineError(f"pages {pages} leaves some of the {nvcpus} vCPUs no page "
                                     "of their own to dirty: give at least one page per vCPU"),
                        "pages")
        # capped as an asked --writes is: pages past what can be mapped are refused below,
        # by Machine, not blamed on this derived register
        writes = writes if writes is not None else min(max(1, pages // nvcpus // 4),
                                                       MAX_ITERATIONS)
        if isinstance(self.tracker, RingTracker) and not self.tracker.stage_entries:
            # A vCPU's share of the data pages per iteration, and room for its page-table
            # pages, so that a collection does not grow the stage; at most 1 MiB each
            # (a sparse run over a huge slot dirties few of its pages; more still fit,
            # the stage doubles).
            share = -(-pages // nvcpus)
            self.tracker.stage_entries = min(share + share // 4 + 256, 65536)
        self.params = {"stride": stride, "seed": seed, "writes": writes}
        # the plan oracle knows the shipped payloads only (by name: a user's payload of the
        # same name gets none, only the content oracle)
        self._plan_name = self.payload.name if has_plan(self.payload) else None
        log = abi.KVM_MEM_LOG_DIRTY_PAGES
        self.machine = Machine(self.payload, vcpus=vcpus, pages=pages, kvm=kvm,
                               data_flags=log, system_flags=log,
                               before_vcpus=self.tracker.before_vcpus,
                               on_vcpu=self.tracker.on_vcpu,
                               regs={"rcx": iterations, "r8": stride, "r9": seed, "r10": writes})
        try:
            self.tracker.bind(self.machine)
            self.oracle = ContentOracle(self.machine.data, pages)
        except BaseException:
            self.machine.close()
            raise
        m = self.machine
        m.on_sync, m.on_ring_full, m.on_end = self._on_sync, self.tracker.on_ring_full, self._on_end
        self.nvcpus, self.pages = len(m.states), pages
        self.records: list[IterationRecord] = []
        self._cond = threading.Condition()
        self._arrived: dict[int, int] = {}
        self._ended: set[int] = set()      # vCPUs over (one may still be in _arrived)
        self._generation = 0
        # collections a run may make (None: iterations=0 runs until stopped). The vCPUs
        # queue at most one past it, which makes the consumer stop them (_stop_syncing);
        # without that cap a slow consumer let them queue more
        self._sync_limit = (SYNCS_PER_ITERATION * iterations + EXTRA_SYNCS
                            if iterations else None)
        self._queued = 0
        self._queue: queue.Queue = queue.Queue()
        self._gated = self._started = self._closed = self._syncs_stopped = False
        self._go = threading.Event()
        self._reaper_stop = threading.Event()
        self._failure: BaseException | None = None
        self._reaper: threading.Thread | None = None
        self.result = None

    # -- lifecycle --
    def close(self) -> None:
        """Stop the vCPUs and release the VM, its rings and bitmaps."""
        self._closed = True
        self._reaper_stop.set()
        self._go.set()
        me = threading.current_thread()
        if any(st.thread is me for st in self.machine.states):
            # From a vCPU thread (inside a collection): the others may be waiting at the
            # barrier this thread holds, so waiting for them would never end. Stop them
            # only; iterate() then says the session is closed, and a close() from the
            # consumer (its `with`) releases the machine.
            self.machine.stop("closed", wait=False)
            return
        reaper = self._reaper
        if reaper is not None and reaper is not me:
            reaper.join()   # its poll in flight would meet a closed VM (EBADF, unread)
        self.machine.close()

    def _check_open(self) -> None:
        # closed inside its own iterate() loop, or by another thread meanwhile
        if self._closed:
            raise MachineError("this DirtySession is closed")

    def __enter__(self) -> "DirtySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running --
    def run(self, timeout: float | None = 60.0) -> list:
        """Run to the end; return every IterationRecord (the final collection included).
        With iterations=0 the guest runs until stopped: the end is the timeout, which it
        therefore needs (its vCPUs then end as ``timeout``)."""
        if self.iterations_asked == 0 and timeout is None:
            raise named(ValueError("timeout: iterations=0 runs until stopped, so run() needs "
                                   "a timeout (or use iterate() and stop when you have seen "
                                   "enough)"), "timeout")
        return list(self.iterate(timeout, gated=False))

    def iterate(self, timeout: float | None = 60.0, gated: bool = True):
        """Yield an IterationRecord per collection; with gated=True the vCPUs stay paused
        at the barrier until the next record is asked for (step by step from Python).
        With iterations=0 records come until the timeout, or until the loop is left
        (break, close()), which stops the vCPUs. The timeout runs while a record is
        looked at: at it the paused vCPUs end (Machine.start's watchdog), not run on."""
        self._check_open()
        if self._started:     # its vCPUs have ended and its barrier counts are spent
            raise MachineError("this DirtySession has already run; make a new one")
        self.tracker.check_slots()     # here, not in a vCPU thread's first collection
        self._gated = gated
        # spent only once the vCPUs run: a timeout start() refuses leaves it unused
        try:
            self.machine.start(timeout)
        except MachineError:
            if self.machine._started:   # iterate() in two threads at once, or a start() by
                # hand: the Machine's "has already run" named no DirtySession
                raise MachineError("this DirtySession has already run (or is running); "
                                   "make a new one") from None
            raise
        self._started = True
        reaper = None
        try:
            if self.collect_mode == "async":
                # Ctrl-C held back until it runs: close() joins it, and a thread made but
                # not started cannot be joined (RuntimeError in the interrupt's place)
                with _sys.fd_creation():
                    thread = threading.Thread(target=self._reap, name="reaper", daemon=True)
                    start_thread(thread, "the dirty-ring reaper thread")
                    reaper = self._reaper = thread  # started only: joining it raised in place
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    item = _NOTHING
                # Checked at every record too: a guest that syncs often must still stop
                if self.machine.expired():
                    self._go.set()
                    if item is _NOTHING and all(st.done.is_set() for st in self.machine.states):
                        try:    # a collection the last vCPUs queued as they ended
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                if item is _NOTHING:
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                record = self._record(*item)
                self.records.append(record)
                yield record
                # a slot added meanwhile (the vCPUs wait for _go): here in the caller's
                # thread, not in the collections, whose time the bench measures
                self.tracker.check_slots()
                if self._sync_limit is not None and not self._syncs_stopped and \
                        len(self.records) > self._sync_limit:
                    self._stop_syncing()
                self._check_open()
                self._go.set()
            self._check_open()
            self.result = self.machine.wait()
        except BaseException:
            self._go.set()
            self.machine.stop("interrupted")
            raise
        finally:
            self._reaper_stop.set()
            if reaper is not None:
                reaper.join()
        self._check_open()
        if self._failure is not None:
            # the reaper failed after the last vCPU queued its end: its failure came
            # after that None in the queue, so the loop never took it
            raise self._failure
        try:
            final = self._record("final", self.tracker.collect(), self._snapshot())
        except (ValueError, BufferError, KvmError):
            self._check_open()          # closed meanwhile by another thread: say that
            raise
        if len(final.data_pages) or len(final.missed) or final.collection.pages:
            self.records.append(final)
            yield final

    def _stop_syncing(self) -> None:
        """Stop a guest that goes on syncing far past the iterations asked (the collections
        it queued meanwhile are still recorded)."""
        self._syncs_stopped = True
        self._go.set()
        self.machine.stop("too-many-syncs")
        # the limit, not len(self.records): vCPUs that do not wait for the consumer
        # (run(), the CLI) have queued more by the time it is read
        limit = self._sync_limit
        why = (f"more than {limit} collections for {self.iterations_asked} iteration(s) "
               f"asked (the limit: {SYNCS_PER_ITERATION} per iteration and {EXTRA_SYNCS} "
               "more): the payload syncs more than it should")
        for st in self.machine.states:
            if st.end is not None and st.end.reason == "too-many-syncs":
                st.end.detail["error"] = why

    def _reap(self) -> None:
        _sys.block_thread_signals()      # its resets are then never cut short (_sys)
        while not self._reaper_stop.wait(self.poll_interval_s):
            try:
                self.tracker.poll()
            except Exception as e:
                self._fail(e)
                return

    # -- the barrier (runs in vCPU threads) --
    def _on_sync(self, st, tag: int) -> None:
        with self._cond:
            self._arrived[st.index] = tag
            gen = self._generation
            if self._all_arrived_locked():
                self._complete_locked(st)
            else:
                while gen == self._generation and st.stop_reason is None:
                    self._cond.wait(0.05)

    def _on_end(self, st) -> None:
        with self._cond:
            self._ended.add(st.index)
            try:
                if self._arrived and self._all_arrived_locked():
                    self._complete_locked(st)
            finally:
                if len(self._ended) == self.nvcpus:
                    self._queue.put(None)

    def _all_arrived_locked(self) -> bool:
        # A vCPU stopped while it waited here stays in _arrived (its writes are complete)
        # but no longer runs: counted among the running, it completed the barrier before a
        # vCPU still on its way arrived, whose own collection then found its pages gone
        if not self._ended:             # the common case, at every sync: no set made
            return len(self._arrived) >= self.nvcpus
        return len(self._arrived.keys() - self._ended) >= self.nvcpus - len(self._ended)

    def _fail(self, error: BaseException) -> None:
        """A collection failed in a vCPU or reaper thread: hand it to the consumer, which
        stops the machine and raises CollectionError (rather than waiting for a record
        forever). Only text crosses over: the traceback's frames would keep that thread's
        views of its kvm_run page alive and the VM could not be closed."""
        if self._failure is None:
            text = "".join(traceback.format_exception(error))
            error.__traceback__ = None
            if isinstance(error, KvmError):    # still a KvmError, naming the same call
                self._failure = KvmError(error.call, error.errno, error.hint)
            else:
                self._failure = CollectionError(
                    f"collection failed in thread {threading.current_thread().name}: "
                    f"{type(error).__name__}: {error}", text)
            self._failure.thread_traceback = text
            self._queue.put(self._failure)

    def _complete_locked(self, st) -> None:
        # Only what needs the vCPUs paused happens here: collecting, and reading the
        # pages' contents; checking and reporting happen in the consumer's thread.
        iteration = max(self._arrived.values())
        # A vCPU stopped (timeout, error) before this sync has not written its whole plan
        synced = frozenset(i for i, tag in self._arrived.items() if tag == iteration)
        if self._sync_limit is None or self._queued <= self._sync_limit:
            try:
                col = self.tracker.collect()
                self._queue.put((iteration, col, self._snapshot(), synced))
                self._queued += 1
            except Exception as e:
                self._fail(e)
        self._arrived.clear()
        self._go.clear()
        if self._gated:
            while not self._go.wait(0.05) and st.stop_reason is None:
                pass
        self._generation += 1
        self._cond.notify_all()

    def _snapshot(self):
        return self.oracle.snapshot() if self.verify else None

    def _record(self, iteration, col: Collection, snap, synced=None) -> IterationRecord:
        data = col.pages.get(L.SLOT_DATA, _EMPTY)
        if snap is None:      # not verifying: the pages as collected, nothing checked
            return IterationRecord(iteration, self.tracker.name, col, data, None, _EMPTY,
                                   _EMPTY, _EMPTY, [], "not verified")
        plans = plan(self._plan_name, self.nvcpus, self.pages, iteration, self.params) \
            if isinstance(iteration, int) and self._plan_name else None
        if plans and synced is not None:
            plans = {i: want for i, want in plans.items() if i in synced} or None
        expected = np.unique(np.concatenate(list(plans.values()))) if plans else None
        if not isinstance(iteration, int):
            expected = None
        content = self.oracle.compare(snap, data)
        missed = content["missed"]
        if expected is not None:
            missed = np.union1d(missed, np.setdiff1d(expected, data, assume_unique=True))
        share = self.pages // self.nvcpus
        rows = []
        for i in range(self.nvcpus):
            lo, hi = i * share, (i + 1) * share if i < self.nvcpus - 1 else self.pages
            mine = data[(data >= lo) & (data < hi)]
            want = plans.get(i) if plans else None     # None: stopped before this sync
            row = {"vcpu": i, "reported": len(mine),
                   "expected": None if want is None else len(want),
                   "missed": int(((missed >= lo) & (missed < hi)).sum()),
                   "extra": len(np.setdiff1d(mine, want)) if want is not None else
                   int(((content["extra"] >= lo) & (content["extra"] < hi)).sum())}
            if col.raw is not None:
                ring_pages = col.vcpu_pages(i, L.SLOT_DATA)
                # a write lands in the writing vCPU's ring (abi.md rule 28)
                row["in_own_ring"] = len(ring_pages)
                row["foreign"] = int(((ring_pages < lo) | (ring_pages >= hi)).sum())
            rows.append(row)
        return IterationRecord(iteration, self.tracker.name, col, data, expected,
                               content["changed"], missed, content["extra"], rows,
                               content["scope"],
                               synced is None or len(synced) == self.nvcpus)


def compare_runs(a: list, b: list, completed_only: bool = False,
                 skip: tuple = ()) -> list:
    """Per-collection differences of the data-slot page sets of two runs ([] = agree).

    Collections are paired by iteration and, where a payload syncs more than once with
    one tag, by their order within it: keyed by iteration alone, only the last of them
    was compared and a difference in the others was reported as agreement.
    ``completed_only``: only the numbered iterations every vCPU of both runs completed
    (runs stopped by a timeout stop at different points; what follows is not comparable).
    ``skip``: iterations whose first collection is not compared. A difference says
    ``guests_differ`` when the pages whose content changed differ as well: the two
    guests wrote different pages (a payload using rdtsc, say, or a vCPU that a ring
    overflow stopped early)."""
    diffs = []
    amap, bmap = _by_collection(a), _by_collection(b)
    keys = (set(amap) | set(bmap)) - {(it, 0) for it in skip}
    if completed_only:
        keys = {k for k in (set(amap) & set(bmap)) - {(it, 0) for it in skip}
                if isinstance(k[0], int) and amap[k].complete and bmap[k].complete}
    # in the order collected (a payload may tag 3, 1, 1, 2), "final" last
    collected = {k: n for n, k in enumerate(dict.fromkeys(list(amap) + list(bmap)))}
    for key in sorted(keys, key=lambda k: (k[0] == "final", collected[k])):
        ra, rb = amap.get(key), bmap.get(key)
        pa = ra.data_pages if ra is not None else _EMPTY
        pb = rb.data_pages if rb is not None else _EMPTY
        if not np.array_equal(pa, pb):
            ca = getattr(ra, "changed", None) if ra is not None else _EMPTY
            cb = getattr(rb, "changed", None) if rb is not None else _EMPTY
            diff = {"iteration": key[0], "only_first": np.setdiff1d(pa, pb).tolist()[:64],
                    "only_second": np.setdiff1d(pb, pa).tolist()[:64],
                    "guests_differ": ca is not None and cb is not None
                    and not np.array_equal(ca, cb)}
            if key[1]:
                diff["repeat"] = key[1]      # the (repeat+1)-th collection with this tag
            diffs.append(diff)
    return diffs


def _by_collection(records: list) -> dict:
    """{(iteration, n): record}: n counts earlier collections with the same tag."""
    seen, out = {}, {}
    for r in records:
        n = seen.get(r.iteration, 0)
        seen[r.iteration] = n + 1
        out[(r.iteration, n)] = r
    return out
