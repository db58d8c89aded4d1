"""Checks: KVM_RESET_DIRTY_RINGS (abi.md rules 34-41).

Never writes the wrapped offsets of CVE-2026-52969 (0xffffffffffffffc1 then 0): the bogus
entries below are far out of range, so even a kernel without the fix rejects them through
its ``offset + __fls(mask) >= npages`` test, and they never coalesce with a valid entry.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time

from .. import _sys
from .checks_entries import (DATA_SLOT, DIRTY, EXIT, RESET, dirty_run, expect_pages_in_order,
                             guest, small_ring, sync, write_pages, write_run)
from .registry import Fail, Skip, check, expect, expect_eq

CITE_RESET = ("virt/kvm/dirty_ring.c kvm_dirty_ring_reset(); virt/kvm/kvm_main.c "
              "kvm_vm_ioctl_reset_dirty_pages()")


@check("ring.reset.count_sum", 34, CITE_RESET, fault="reset_count_lie")
def reset_count_sum(ctx):
    """RESET returns the entries reset summed over vCPUs (5 + 7 = 12); a second call 0"""
    entries, _ = small_ring(ctx)
    # vCPU 0 writes 5 pages of its share, vCPU 1 seven of its own (RDI = index)
    body = ("    test rdi, rdi\n    jnz other\n" + write_run(0, 5) + EXIT +
            "other:\n" + write_run(0, 7) + EXIT)
    m = guest(ctx, body, vcpus=2, pages=16, ring=entries)
    for i in (0, 1):
        ctx.expect_event(ctx.run_to_port(m, i), "exit", f"vCPU {i} writes its pages")
    expect_eq(m.vm.reset_dirty_rings(), 0, "RESET before anything was harvested")
    counts = [len(ctx.harvest(m.rings[i])[1]) for i in (0, 1)]
    ctx.diag(f"harvested per vCPU: {counts}")
    expect_eq(counts, [5, 7], "entries harvested per vCPU (the control)")
    expect_eq(m.vm.reset_dirty_rings(), 12, "RESET after harvesting 5 + 7 entries")
    expect_eq(m.vm.reset_dirty_rings(), 0, "a second RESET")


@check("ring.reset.flags_zero", 35, "virt/kvm/dirty_ring.c kvm_dirty_ring_reset() "
       "(kvm_dirty_gfn_set_invalid)", fault="reset_skipped")
def reset_flags_zero(ctx):
    """Entries read DIRTY, then RESET once harvested, then 0 after KVM_RESET_DIRTY_RINGS"""
    entries, _ = small_ring(ctx)
    m = guest(ctx, write_run(0, 4) + EXIT, pages=8, ring=entries)
    ctx.expect_event(ctx.run_to_port(m), "exit", "guest writes pages 0-3")
    ring = m.rings[0]
    before = ctx.ring_entries(ring, 0, 5)
    expect_eq([e[0] for e in before], [DIRTY] * 4 + [0], "flags of positions 0-4 before harvest")
    _, offsets = ctx.harvest(ring)
    expect_pages_in_order(offsets, [0, 1, 2, 3], "harvested offsets")
    harvested = [e[0] for e in ctx.ring_entries(ring, 0, 5)]
    expect_eq(harvested, [RESET] * 4 + [0], "flags of positions 0-4 after harvest")
    got = m.vm.reset_dirty_rings()
    after = [e[0] for e in ctx.ring_entries(ring, 0, 5)]
    ctx.diag(f"flags before {[e[0] for e in before]}, harvested {harvested}, after reset "
             f"{after} (RESET returned {got})")
    expect_eq(after, [0] * 5, "flags of positions 0-4 after KVM_RESET_DIRTY_RINGS")


@check("ring.reset.gap", 36, "virt/kvm/dirty_ring.c kvm_dirty_ring_reset() (stops at the "
       "first entry without RESET: !kvm_dirty_gfn_harvested() -> break); virt/kvm/kvm_main.c "
       "kvm_vm_ioctl_reset_dirty_pages()", fault="reset_count_lie")
def reset_gap(ctx):
    """A gap at reset_index: 0 reset, later RESET entries wait until the gap is harvested"""
    entries, _ = small_ring(ctx)
    m = guest(ctx, write_run(0, 4) + EXIT, pages=8, ring=entries)
    ctx.expect_event(ctx.run_to_port(m), "exit", "guest writes pages 0-3")
    ring = m.rings[0]
    expect_eq(len(dirty_run(ctx, ring)), 4, "DIRTY entries before the test (the control)")
    for pos in (1, 2, 3):                        # harvest out of order: skip position 0
        ctx.set_flags(ring, pos, RESET)
    expect_eq(m.vm.reset_dirty_rings(), 0, "RESET with position 0 still DIRTY")
    flags = [e[0] for e in ctx.ring_entries(ring, 0, 4)]
    expect_eq(flags, [DIRTY, RESET, RESET, RESET], "flags after that RESET (nothing consumed)")
    ctx.set_flags(ring, 0, RESET)                # fill the gap
    got = m.vm.reset_dirty_rings()
    flags = [e[0] for e in ctx.ring_entries(ring, 0, 4)]
    ctx.diag(f"after filling the gap: RESET returned {got}, flags {flags}")
    expect_eq(got, 4, "RESET once the gap is filled")
    expect_eq(flags, [0, 0, 0, 0], "flags after it")


@check("ring.reset.flags3", 37, "virt/kvm/dirty_ring.c kvm_dirty_gfn_harvested() "
       "(flags & KVM_DIRTY_GFN_F_RESET); api.rst 7.36", fault="reset_count_lie")
def reset_flags3(ctx):
    """flags == 3 (DIRTY|RESET) counts as harvested"""
    entries, _ = small_ring(ctx)
    m = guest(ctx, write_run(0, 3) + EXIT, pages=8, ring=entries)
    ctx.expect_event(ctx.run_to_port(m), "exit", "guest writes pages 0-2")
    ring = m.rings[0]
    expect_eq(len(dirty_run(ctx, ring)), 3, "DIRTY entries (the control)")
    for pos in range(3):
        ctx.set_flags(ring, pos, DIRTY | RESET)
    got = m.vm.reset_dirty_rings()
    flags = [e[0] for e in ctx.ring_entries(ring, 0, 3)]
    ctx.diag(f"RESET returned {got}; flags now {flags}")
    expect_eq(got, 3, "RESET of three entries marked 3")
    expect_eq(flags, [0, 0, 0], "flags after it")


@check("ring.reset.bogus_entries", 38, "virt/kvm/dirty_ring.c kvm_reset_dirty_gfn() "
       "(as_id, slot id, missing memslot and offset + __fls(mask) >= npages are ignored); "
       "commit 577a8d3bae05 \"KVM: Reject wrapped offset in kvm_reset_dirty_gfn()\" "
       "(CVE-2026-52969) adds offset >= npages", fault="reset_count_lie")
def reset_bogus_entries(ctx):
    """Harvested entries with a bogus slot, as_id or offset are counted and ignored"""
    entries, _ = small_ring(ctx)
    npages = 16
    m = guest(ctx, write_run(0, 6) + sync(1) + write_pages([0, 5], 2) + EXIT,
              pages=npages, ring=entries)
    ctx.expect_event(ctx.run_to_port(m), "sync", "guest writes pages 0-5")
    ring = m.rings[0]
    _, offsets = ctx.harvest(ring)
    expect_pages_in_order(offsets, list(range(6)), "harvested offsets (the control)")
    # Rewritten after harvesting, as a buggy or hostile VMM could. Far out of range, never
    # the CVE-2026-52969 wrap pair; each differs in slot or lies >= 64 pages from its
    # neighbours, so none coalesces with a valid entry.
    bogus = {1: (999, 1), 2: (DATA_SLOT, npages + 1000), 3: ((1 << 16) | DATA_SLOT, 3),
             4: (DATA_SLOT, 1 << 40)}
    for pos, (slot, off) in bogus.items():
        ctx.set_entry(ring, pos, slot, off)
    ctx.diag(f"rewritten entries (position: slot, offset): {bogus}")
    got = m.vm.reset_dirty_rings()
    expect_eq(got, 6, "RESET counts every harvested entry, bogus ones included")
    flags = [e[0] for e in ctx.ring_entries(ring, 0, 6)]
    expect_eq(flags, [0] * 6, "flags of all six after the reset")
    # The VM is still healthy: page 0 (a valid entry) was re-armed and logs again.
    ctx.expect_event(ctx.run_to_port(m), "exit", "the guest runs on after the reset")
    _, offsets = ctx.harvest(ring)
    ctx.diag(f"after the reset the guest re-wrote pages 0 and 5: entries {offsets.tolist()}")
    expect(0 in offsets.tolist(), "page 0 (a valid entry) is logged again", "0 reported",
           offsets.tolist())


@check("ring.reset.relog", 39, "virt/kvm/dirty_ring.c kvm_reset_dirty_gfn() -> "
       "kvm_arch_mmu_enable_log_dirty_pt_masked() (re-protects the page)",
       fault="reset_skipped")
def reset_relog(ctx):
    """After harvest and reset, a new write to the same page is logged again"""
    entries, _ = small_ring(ctx)
    m = guest(ctx, write_pages([2], 1) + sync(1) + write_pages([2], 2) + sync(2)
              + write_pages([2], 3) + EXIT, pages=4, ring=entries)
    ring = m.rings[0]
    ctx.expect_event(ctx.run_to_port(m), "sync", "first write of page 2")
    _, first = ctx.harvest(ring)
    expect_pages_in_order(first, [2], "entries after the first write")
    count = m.vm.reset_dirty_rings()
    ctx.expect_event(ctx.run_to_port(m), "sync", "second write of page 2, after the reset")
    _, second = ctx.harvest(ring)
    ctx.expect_event(ctx.run_to_port(m), "exit", "third write, harvested but not reset")
    _, third = ctx.harvest(ring)
    ctx.diag(f"entries: first write {first.tolist()} (RESET returned {count}), after reset "
             f"{second.tolist()}, "
             f"without reset {third.tolist()} (0 where the first write lifts protection)")
    expect_pages_in_order(second, [2], "entries for the write after the reset")


@check("ring.reset.while_running", (41, 34), "tools/testing/selftests/kvm/dirty_log_test.c "
       "(reaps while the vCPU runs); " + CITE_RESET, fault="reset_count_lie")
def reset_while_running(ctx):
    """RESET while the vCPU runs: counts match, pages re-log, the guest keeps progressing"""
    entries, _ = small_ring(ctx)
    npages, stop_page = 16, 31
    # Rewrites pages 0-15 with a growing counter until the host sets a stop word.
    body = ("    mov r12, rsi\n    mov r13, 1\nloop_top:\n"
            + write_run(0, npages, "r13", base="r12")
            + f"    inc r13\n    mov rax, qword ptr [r12 + {stop_page * 4096}]\n"
            "    test rax, rax\n    jz loop_top\n" + EXIT)
    m = guest(ctx, body, pages=32, ring=entries)
    ring, result = m.rings[0], {}
    runner = threading.Thread(target=lambda: result.update(ev=ctx.run_to_port(m, 0, 5.0)),
                              name="ring.reset.while_running vcpu", daemon=True)
    cycles, progress = [], []
    try:
        # started inside the try, Ctrl-C held back: interrupted in start(), the finally
        # was skipped and the thread ran on into the closed VM (a traceback, EBADF)
        with _sys.fd_creation():
            runner.start()
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline and runner.is_alive():
            time.sleep(0.01)
            _, offsets = ctx.harvest(ring)
            got = m.vm.reset_dirty_rings()
            cycles.append((len(offsets), got))
            progress.append(int.from_bytes(m.data.read(0x4000_0000, 8), "little"))
    finally:
        m.data.write(0x4000_0000 + stop_page * 4096, (1).to_bytes(8, "little"))
        runner.join(6.0)
    if runner.is_alive():
        raise Fail("the vCPU thread ends after the stop word", "ended", "still running")
    ev = result.get("ev")
    ctx.diag(f"{len(cycles)} harvest+reset cycles while running; (harvested, reset) first "
             f"ones {cycles[:6]}; guest counter samples {progress[:3]}..{progress[-2:]}")
    expect(ev is not None and ev.kind == "exit", "the guest exits when told to", "exit",
           ev and (ev.kind, ev.value, ev.info))
    mismatch = [(i, c) for i, c in enumerate(cycles) if c[0] != c[1]]
    expect(not mismatch, "every RESET returns what was harvested since the last one",
           "equal", mismatch[:4])
    relogged = sum(1 for h, _ in cycles if h)
    expect(relogged >= 3, "cycles that found pages re-dirtied after a reset made while "
           "running", ">= 3", relogged)
    expect(len(set(progress)) >= 3 and progress == sorted(progress),
           "the guest's counter keeps growing across the resets", "increasing", progress[:8])


WRITE_SHARE = """
    mov rcx, rdx
    mov rdi, rsi
next:
    mov qword ptr [rdi], 1
    add rdi, 4096
    dec rcx
    jnz next
    xor eax, eax
    out 0xf4, al
"""


@contextlib.contextmanager
def _signal_storm(thread_id: int, every: float = 0.00005):
    """Signals at the thread ``thread_id`` every ``every`` seconds while the block runs.

    A Python thread sends the kick, but on a busy host it may not get a CPU while a reset
    runs; so on the main thread an interval timer (SIGALRM, a no-op handler) fires too:
    the kernel raises it on time whatever the scheduler does with our threads."""
    import signal
    from ..machine import KICK_SIGNAL
    stop = threading.Event()

    def storm():
        # SIGALRM is blocked here (the mask it was started with): the timer's signal is
        # for the calling thread; one caught here would reach Python late, after the
        # handler is restored
        while not stop.is_set():
            signal.pthread_kill(thread_id, KICK_SIGNAL)
            time.sleep(every)
    t = threading.Thread(target=storm, daemon=True)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})   # inherited by t
    try:
        t.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    timer = threading.get_ident() == thread_id == threading.main_thread().ident
    if timer:
        old_handler = signal.signal(signal.SIGALRM, lambda *_: None)
        old_timer = signal.setitimer(signal.ITIMER_REAL, every, every)
    try:
        yield
    finally:
        stop.set()
        t.join()
        if timer:
            # No SIGALRM may be left for after the handler is restored: one still pending
            # would kill (SIG_DFL), one already caught but not yet run by Python would be
            # "Signal 14 ignored due to race condition". So: block it, stop the timer, take
            # a raised one, let Python run the caught ones (at a function call), restore.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.sigtimedwait({signal.SIGALRM}, 0)
                for _ in range(3):
                    _run_pending_handlers()
                signal.signal(signal.SIGALRM, old_handler)
                if old_timer[0]:
                    signal.setitimer(signal.ITIMER_REAL, *old_timer)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _run_pending_handlers() -> None:
    """Nothing: calling a Python function is where CPython runs the handlers of signals
    its C handler has caught."""


@check("ring.reset.signal_partial", 40, "virt/kvm/dirty_ring.c kvm_dirty_ring_reset() "
       "(49005a2a3d2a: bail if a signal is pending); virt/kvm/kvm_main.c "
       "kvm_vm_ioctl_reset_dirty_pages()", fault="reset_count_lie")
def reset_signal_partial(ctx):
    """A signal during KVM_RESET_DIRTY_RINGS never makes it fail: a partial count, the rest later"""
    pages_per_vcpu, entries = 8192, 16384
    partial = []
    for attempt in range(3):
        m = ctx.guest(WRITE_SHARE, vcpus=2, pages=2 * pages_per_vcpu, ring=entries)
        for i in (0, 1):
            ctx.expect_event(ctx.run_to_port(m, i), "exit", f"vCPU {i} writes its share")
        harvested = sum(len(ctx.harvest(m.rings[i])[1]) for i in (0, 1))
        t0 = time.perf_counter()
        # signals not held back: this check is about what one does to the reset
        with _signal_storm(threading.get_ident()):
            first = m.vm.reset_dirty_rings(hold_signals=False)   # a KvmError (EINTR) fails it
        took = time.perf_counter() - t0
        rest = m.vm.reset_dirty_rings()
        if first < harvested:
            partial.append((first, harvested))
        ctx.diag(f"attempt {attempt}: under a signal storm the reset returned {first} in "
                 f"{took * 1e3:.2f} ms, then {rest}; harvested {harvested}")
        expect_eq(first + rest, harvested, "the counts of the interrupted reset and the "
                  "next one add up to what was harvested")
    if not partial:
        raise Skip("no signal cut a reset short in 3 attempts: this kernel may not stop "
                   "KVM_RESET_DIRTY_RINGS for signals (before v6.17), or none landed in time")
    ctx.diag(f"partial counts seen: {partial}")


# Two passes over the vCPU's share, with a sync between them: what the second pass writes
# must all be logged again, whatever happened to the reset in between
REWRITE_SHARE = """
    mov r8, 2
pass:
    mov rcx, rdx
    mov rdi, rsi
again:
    mov qword ptr [rdi], r8
    add rdi, 4096
    dec rcx
    jnz again
    mov eax, r8d
    out 0xf0, eax
    dec r8
    jnz pass
    xor eax, eax
    out 0xf4, al
"""


def _runs(pages) -> str:
    """'a-b, c' for sorted page numbers."""
    out, start = [], None
    for i, p in enumerate(pages):
        if start is None:
            start = p
        if i + 1 == len(pages) or pages[i + 1] != p + 1:
            out.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ", ".join(out)


@check("ring.reset.signal_rearms", 40, "virt/kvm/dirty_ring.c kvm_dirty_ring_reset() "
       "(49005a2a3d2a returns -EINTR at the top of its loop, before the final "
       "kvm_reset_dirty_gfn() of the batch it was coalescing)", fault="ring_offset_shift")
def reset_signal_rearms(ctx):
    """After resets that signals cut short, every page is logged again when rewritten"""
    pages = 8192
    entries = ctx.min_ring(16384)
    attempts = 10
    for attempt in range(attempts):
        m = guest(ctx, REWRITE_SHARE, pages=pages, ring=entries)
        ctx.expect_event(ctx.run_to_port(m), "sync", "the first pass over every page")
        harvested = len(ctx.harvest(m.rings[0])[1])
        # A stream of signals while this thread resets, call after call: each call that
        # a signal stops after some entries leaves the batch it was on
        calls, total = [], 0
        with _signal_storm(threading.get_ident()):
            for _ in range(2000):
                calls.append(m.vm.reset_dirty_rings(hold_signals=False))
                total += calls[-1]
                if total >= harvested:
                    break
        calls.append(m.vm.reset_dirty_rings())   # signals held back: the rest, if any
        expect_eq(sum(calls), harvested, "entries reset over all the calls")
        # Every call that reset something, but the last such, left entries for a later one
        # (the held-back one too): a signal stopped it after an entry. Calls that reset
        # nothing were stopped before their first entry, with no batch to drop.
        counts = [c for c in calls if c]
        if len(counts) < 2:
            continue                             # no call was cut short after an entry
        cuts = list(itertools.accumulate(counts))[:-1]
        ctx.diag(f"attempt {attempt}: {len(calls)} calls ({len(calls) - 1} with signals let "
                 f"in, the last with them held back) reset {counts[:8]}"
                 f"{' ...' if len(counts) > 8 else ''} of {harvested} entries: cut short "
                 f"after entry {', '.join(map(str, cuts[:8]))} (one entry per page, in order)")
        ctx.expect_event(ctx.run_to_port(m), "sync", "the second pass over every page")
        slots, offsets = ctx.harvest(m.rings[0])
        missing = sorted(set(range(pages)) - set(offsets[slots == DATA_SLOT].tolist()))
        if missing:
            ctx.diag(f"pages {_runs(missing)} were rewritten but not logged: a call cut short "
                     "counted them as reset without write-protecting them again (the batch "
                     "it was coalescing, up to 64 pages, is dropped on -EINTR)")
        expect_eq(len(missing), 0, f"pages of {pages} rewritten after the cut-short resets "
                  "and not logged")
        return
    raise Skip(f"no signal cut a reset short in {attempts} attempts: this kernel may not "
               "stop KVM_RESET_DIRTY_RINGS for signals (before v6.17), or no signal landed "
               "while one ran")
