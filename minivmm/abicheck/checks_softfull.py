"""Checks: the soft limit and KVM_EXIT_DIRTY_RING_FULL (abi.md rules 42-46).

The guest runs at CPL3, where kvm_pvm executes it natively and the exit is exact (abi.md 6):
every push goes through a write-protection fault, after which the vCPU re-enters through
vcpu_enter_guest() and its request check.
"""
from __future__ import annotations

from .checks_entries import (DATA_SLOT, EXIT, first_seen, first_words, guest, small_ring,
                             write_run)
from .registry import Fail, check, expect, expect_eq

CITE_FULL = ("virt/kvm/dirty_ring.c kvm_dirty_ring_push(), kvm_dirty_ring_check_request(); "
             "arch/x86/kvm/x86.c vcpu_enter_guest()")
# The filler writes this many distinct pages more than its ring holds (300 on 256 entries)
BEYOND_RING = 44


def _filler(ctx):
    """A guest writing more distinct pages than the ring holds, once each (value 1), on
    the smallest ring this host accepts."""
    entries, soft = small_ring(ctx)
    pages = entries + BEYOND_RING
    m = guest(ctx, write_run(0, pages) + EXIT, pages=pages, ring=entries)
    return m, entries, soft, pages


@check("ring.softfull.exit", (42, 43, 46), CITE_FULL, fault="hide_ring_full")
def softfull_exit(ctx):
    """Crossing the soft limit exits KVM_EXIT_DIRTY_RING_FULL with soft <= used <= entries"""
    m, entries, soft, pages = _filler(ctx)
    ev = ctx.run_to_port(m)
    ctx.expect_event(ev, "ring-full", f"a guest writing {pages} distinct pages, ring of "
                     f"{entries}")
    slots, offsets = ctx.harvest(m.rings[0])
    used = len(offsets)
    ctx.diag(f"ring of {entries} entries, soft limit {soft}: {used} entries at the first "
             f"KVM_EXIT_DIRTY_RING_FULL (abi.md 6: exactly {soft} at CPL3 on kvm_pvm)")
    expect(soft <= used <= entries, "entries at the exit (rule 46)",
           f"{soft} <= used <= {entries}", used)
    expect(set(slots.tolist()) == {DATA_SLOT}, "entries name the data slot", {DATA_SLOT},
           set(slots.tolist()))
    expect_eq(first_seen(offsets), list(range(len(first_seen(offsets)))),
              "entries are the guest's first pages, in order")


@check("ring.softfull.repeat", 44, CITE_FULL + " (the request is re-armed while soft-full)",
       fault="hide_ring_full")
def softfull_repeat(ctx):
    """KVM_RUN again without a reset exits DIRTY_RING_FULL at once, even after a harvest"""
    m, entries, soft, pages = _filler(ctx)
    ring, vcpu = m.rings[0], m.states[0].vcpu
    ctx.expect_event(ctx.run_to_port(m), "ring-full", "first exit")
    snapshot = ctx.ring_entries(ring)
    rip = vcpu.get_regs().rip
    for k in range(3):
        ctx.expect_event(ctx.run_to_port(m), "ring-full", f"KVM_RUN #{k + 2} without a reset")
    expect_eq(ctx.ring_entries(ring), snapshot, "the ring after re-entering (nothing pushed)")
    expect_eq(vcpu.get_regs().rip, rip, "the guest's RIP after re-entering (no progress)")
    n = len(ctx.harvest(ring)[1])
    ctx.expect_event(ctx.run_to_port(m), "ring-full",
                     f"KVM_RUN after harvesting {n} entries but before KVM_RESET_DIRTY_RINGS")
    expect_eq(vcpu.get_regs().rip, rip, "RIP after a harvest without reset")
    ctx.diag(f"RIP stayed at {rip:#x} over 4 re-entries; {n} entries harvested")
    expect_eq(m.vm.reset_dirty_rings(), n, "RESET count")
    ev = ctx.run_to_port(m)
    expect(ev.kind in ("ring-full", "exit") and vcpu.get_regs().rip != rip,
           "after the reset the guest makes progress", "progress (next ring-full or exit)",
           f"{ev.kind}, RIP {vcpu.get_regs().rip:#x}")


@check("ring.softfull.resume", (45, 43, 30), CITE_FULL + "; api.rst 7.36",
       fault="hide_ring_full")
def softfull_resume(ctx):
    """After harvest + reset the guest resumes where it stopped and every page is reported"""
    m, entries, soft, pages = _filler(ctx)
    ring, reported, total, fulls, counts = m.rings[0], set(), 0, 0, []
    while True:
        ev = ctx.run_to_port(m)
        if ev.kind != "ring-full":
            break
        fulls += 1
        if fulls > 2 * (pages // max(1, soft - 8) + 2):
            raise Fail("ring-full exits for one pass over the pages", "a bounded number", fulls)
        _, offsets = ctx.harvest(ring)
        counts.append(len(offsets))
        reported.update(offsets.tolist())
        total += len(offsets)
        expect_eq(m.vm.reset_dirty_rings(), len(offsets), f"RESET count at ring-full #{fulls}")
    ctx.expect_event(ev, "exit", "the guest completes after the ring-full exits", 0)
    _, offsets = ctx.harvest(ring)
    counts.append(len(offsets))
    reported.update(offsets.tolist())
    total += len(offsets)
    dups = total - len(reported)
    ctx.diag(f"{pages} pages: {fulls} ring-full exit(s), entries per harvest {counts}, "
             f"{dups} duplicate(s) (abi.md 6: one per ring-full exit at CPL3)")
    expect(fulls >= 1, "ring-full exits", ">= 1", fulls)
    missing = sorted(set(range(pages)) - reported)
    expect(not missing, "every written page is reported", "none missing", missing[:8])
    expect_eq(sorted(reported), list(range(pages)), "reported pages")
    words = first_words(m.data, pages)
    expect(bool((words == 1).all()), "every page holds the guest's value (the guest completed "
           "each write it was stopped in)", "1 everywhere",
           [int(i) for i in (words != 1).nonzero()[0][:8]])
