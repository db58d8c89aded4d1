"""Checks: what the dirty ring reports for guest writes (abi.md rules 28-33).

Every guest here runs at CPL3 in long mode (native on kvm_pvm, so the write-protection
fault path, not the emulator, produces the entries). The data slot is slot 1 at 1 GiB;
a few checks add slot 2 at 2 GiB (identity-mapped like the rest of the low 4 GiB) in
``before_vcpus``, before minivmm's own slots 0 and 1 exist.

The small helpers at the top are shared with checks_reset, checks_softfull and
checks_unsafe.
"""
from __future__ import annotations

import os
import re
import signal
import threading

import numpy as np

from .. import _sys, abi
from ..dirty.ringsize import pml_enabled, ring_limits
from ..dirty.verify import LCG_ADD, LCG_MUL, lcg_pages
from ..machine import KICK_SIGNAL
from .registry import Fail, Skip, check, expect, expect_eq

DIRTY, RESET = abi.KVM_DIRTY_GFN_F_DIRTY, abi.KVM_DIRTY_GFN_F_RESET
PAGE = 4096
DATA_SLOT = 1
EXTRA_SLOT, EXTRA_GPA = 2, 0x8000_0000      # a second data slot at 2 GiB
EXIT = "    xor eax, eax\n    out 0xf4, al\n"
# End of an iteration: sync with its number (r15, from 1), then the next one from label
# `iteration`, or exit after r14 of them.
NEXT_ITERATION = """    mov eax, r15d
    out 0xf0, eax
    cmp r15, r14
    je finished
    inc r15
    jmp iteration
finished:
""" + EXIT
# One step of the random guests' LCG (rbx = state, rsi = LCG_MUL, rdi = LCG_ADD), then the
# iteration number (r15) written to page (state >> 33) % r13 of the slot at r12; the same
# generator as guest_payloads/dirty_random.asm and dirty.verify.lcg_pages.
LCG_WRITE = """    mov rax, rbx
    imul rax, rsi
    add rax, rdi
    mov rbx, rax
    shr rax, 33
    xor edx, edx
    div r13
    shl rdx, 12
    mov qword ptr [r12 + rdx], r15
"""
CITE_PUSH = ("virt/kvm/kvm_main.c mark_page_dirty_in_slot(); virt/kvm/dirty_ring.c "
             "kvm_dirty_ring_push()")

_labels = [0]


def sync(tag: int) -> str:
    """Guest lines: report ``tag`` on the sync port (the host sees Event sync)."""
    return f"    mov eax, {tag}\n    out 0xf0, eax\n"


def write_pages(pages, value: int = 1, base: str = "rsi") -> str:
    """Guest lines: one qword store of ``value`` into each listed page (offset from base)."""
    return "".join(f"    mov qword ptr [{base} + {p * PAGE}], {value}\n" for p in pages)


def write_run(first: int, count: int, value: str = "1", base: str = "rsi") -> str:
    """Guest lines: a loop storing ``value`` into pages first .. first+count-1 in order.
    Clobbers rdi and r11 only."""
    _labels[0] += 1
    lbl = f"run_{_labels[0]}"
    return (f"    lea rdi, [{base} + {first * PAGE}]\n"
            f"    mov r11, {count}\n"
            f"{lbl}:\n"
            f"    mov qword ptr [rdi], {value}\n"
            f"    add rdi, {PAGE}\n"
            f"    dec r11\n"
            f"    jnz {lbl}\n")


def join_watchdogs() -> None:
    """Wait for Ctx.run_to_port's cancelled watchdog timers to end: a Timer thread that
    has not ended yet still holds the kvm_run struct, and the vCPU's mmap cannot be closed
    while it does (BufferError at cleanup, leaking the VM)."""
    for t in threading.enumerate():
        if isinstance(t, threading.Timer) and t.finished.is_set() and t is not \
                threading.current_thread():
            t.join(1.0)


def guest(ctx, body: str, **kw):
    """ctx.guest(), plus joining the run watchdogs before the machine is closed."""
    m = ctx.guest(body, **kw)
    ctx.on_close(join_watchdogs)        # closers run last-in first-out: before m.close
    return m


def add_extra_slot(flags: int, pages: int = 8):
    """A before_vcpus hook adding slot 2 (``pages`` pages at 2 GiB) with ``flags``."""
    def hook(m):
        m.vm.add_memory(EXTRA_SLOT, EXTRA_GPA, pages * PAGE, flags, "extra")
    return hook


def small_ring(ctx) -> tuple:
    """(entries, soft limit) of the smallest ring this host accepts, at least 256 entries."""
    ctx.ring_cap()
    entries = ctx.min_ring()
    return entries, entries - ring_limits(ctx.kvm)["reserved_entries"]


def dirty_run(ctx, ring, start: int = 0) -> list:
    """Raw (flags, slot, offset) of the consecutive DIRTY entries from position ``start``
    (through ctx.ring_entries, so faults apply), without harvesting."""
    out = []
    for e in ctx.ring_entries(ring, start, ring.entries):
        if e[0] & 3 != DIRTY:
            break
        out.append(e)
    return out


def first_seen(values) -> list:
    """The values in order of first appearance (a harvester's de-duplicated view)."""
    seen, out = set(), []
    for v in values:
        v = int(v)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def pairs(slots, offsets) -> list:
    return [(int(s), int(o)) for s, o in zip(slots, offsets)]


def expect_pages_in_order(offsets, expected: list, what: str) -> None:
    """Entries name exactly ``expected`` (every page at least once, nothing else), first
    appearances in that order; duplicates are allowed (rule 30)."""
    got = first_seen(offsets)
    if got != list(expected):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise Fail(what, f"{_short(expected)} (first appearances, in order)",
                   f"{_short(got)}; missing {_short(missing)}, unexpected {_short(extra)}")


def _short(values, n: int = 12) -> str:
    values = list(values)
    if len(values) <= n:
        return str(values)
    return f"[{', '.join(map(str, values[:n // 2]))}, ... ({len(values)} values) ..., " \
           f"{', '.join(map(str, values[-n // 2:]))}]"


# ---------------------------------------------------------------------------------------

@check("ring.entries.fields", (28, 33), CITE_PUSH + "; api.rst 7.36 (struct kvm_dirty_gfn)",
       fault="ring_offset_shift")
def entries_fields(ctx):
    """A guest write yields {flags=DIRTY, slot=(as_id<<16)|slot id, offset=gfn-base} per slot"""
    entries, _ = small_ring(ctx)
    flags = abi.KVM_MEM_LOG_DIRTY_PAGES
    m = guest(ctx, "    mov rax, 0x80000000\n" + write_pages([3]) + write_pages([5], base="rax")
                  + EXIT, pages=16, ring=entries, before_vcpus=add_extra_slot(flags))
    ctx.expect_event(ctx.run_to_port(m), "exit", "guest writes data page 3, slot-2 page 5")
    raw = ctx.ring_entries(m.rings[0], 0, 3)
    ctx.diag(f"ring positions 0-2: {raw}")
    expect_eq(raw[0], (DIRTY, (0 << 16) | DATA_SLOT, 3),
              "entry 0 (data slot 1 at 1 GiB, page 3): (flags, slot, offset)")
    expect_eq(raw[1], (DIRTY, (0 << 16) | EXTRA_SLOT, 5),
              "entry 1 (slot 2 at 2 GiB, page 5): offset relative to its own slot")
    expect_eq(raw[2][0], 0, "position 2 (never pushed) flags")
    expect_eq(raw[0][1] >> 16, 0, "as_id (slot >> 16) of a normal guest write")


@check("ring.entries.unlogged_slot", 29, "virt/kvm/kvm_main.c mark_page_dirty_in_slot() "
       "(kvm_slot_dirty_track_enabled)", fault="ring_spurious")
def entries_unlogged_slot(ctx):
    """Writes to a slot without KVM_MEM_LOG_DIRTY_PAGES are never logged in the ring"""
    entries, _ = small_ring(ctx)
    m = guest(ctx, write_run(0, 8) + "    mov rax, 0x80000000\n" + write_pages([1], base="rax")
                  + write_run(0, 8, "2") + EXIT, pages=8, ring=entries, data_flags=0,
                  before_vcpus=add_extra_slot(abi.KVM_MEM_LOG_DIRTY_PAGES))
    ctx.expect_event(ctx.run_to_port(m), "exit",
                     "guest writes 8 unlogged pages twice and one logged page")
    slots, offsets = ctx.harvest(m.rings[0])
    got = pairs(slots, offsets)
    ctx.diag(f"harvested (slot, offset): {got}")
    unlogged = [p for p in got if p[0] == DATA_SLOT]
    expect(not unlogged, "no entry names the slot without LOG_DIRTY_PAGES (slot 1)",
           "none", unlogged)
    expect(set(got) == {(EXTRA_SLOT, 1)}, "the logged slot's write is reported (the control)",
           [(EXTRA_SLOT, 1)], got)


@check("ring.entries.readonly_slot", 29, "arch/x86/kvm/mmu (write to a read-only memslot "
       "-> KVM_EXIT_MMIO); api.rst 4.35 KVM_MEM_READONLY", fault="ring_spurious")
def entries_readonly_slot(ctx):
    """A write to a READONLY|LOG slot exits KVM_EXIT_MMIO, is not applied and not logged"""
    entries, _ = small_ring(ctx)
    if not ctx.cap(abi.KVM_CAP_READONLY_MEM):
        raise Skip("KVM_CAP_READONLY_MEM is 0")
    flags = abi.KVM_MEM_READONLY | abi.KVM_MEM_LOG_DIRTY_PAGES
    body = (write_pages([1]) + "    mov rax, 0x80000000\n"
            "    mov qword ptr [rax + 4096], 0x1234\n"
            "    mov rbx, qword ptr [rax]\n"
            "    mov qword ptr [rsi + 2 * 4096], rbx\n" + EXIT)
    m = guest(ctx, body, pages=8, ring=entries, before_vcpus=add_extra_slot(flags))
    ro = m.vm.memory[EXTRA_SLOT]
    ro.write(EXTRA_GPA, (0x55).to_bytes(8, "little"))     # what the guest reads back
    ev = ctx.run_to_port(m)
    ctx.diag(f"first stop: {ev.kind} {ev.value} {ev.info}")
    ctx.expect_event(ev, "other", "the store into the read-only slot", abi.KVM_EXIT_MMIO)
    info = ev.info or {}
    expect(info.get("is_write") and info.get("phys_addr") == EXTRA_GPA + PAGE
           and info.get("len") == 8 and info.get("data") == 0x1234,
           "KVM_EXIT_MMIO describes the store", f"write of 8 bytes 0x1234 at {EXTRA_GPA + PAGE:#x}",
           info)
    ctx.expect_event(ctx.run_to_port(m), "exit", "the guest continues after the MMIO exit")
    slots, offsets = ctx.harvest(m.rings[0])
    got = pairs(slots, offsets)
    ctx.diag(f"harvested (slot, offset): {got}")
    expect(not [p for p in got if p[0] == EXTRA_SLOT],
           "no entry names the read-only slot", "none", got)
    expect_eq(ro.read(EXTRA_GPA + PAGE, 8), bytes(8), "read-only slot memory after the store")
    expect_eq(int.from_bytes(m.data.read(0x4000_0000 + 2 * PAGE, 8), "little"), 0x55,
              "the guest read the read-only slot's content")
    expect_eq(got, [(DATA_SLOT, 1), (DATA_SLOT, 2)],
              "the writes around it to the logged data slot (the control), in order")


@check("ring.entries.host_write", 29, CITE_PUSH + " (needs a running vCPU: host stores "
       "through the HVA never reach it)", fault="ring_spurious")
def entries_host_write(ctx):
    """Host writes through the userspace mapping of a logged slot are never logged"""
    entries, _ = small_ring(ctx)
    body = ("    mov rax, qword ptr [rsi + 4 * 4096]\n    mov rax, qword ptr [rsi + 5 * 4096]\n"
            + write_pages([1]) + sync(1) + write_pages([2]) + EXIT)
    m = guest(ctx, body, pages=16, ring=entries)
    for p in (6, 7, 8):                  # before the guest ever ran
        m.data.write(0x4000_0000 + p * PAGE, b"host" * 2)
    ctx.expect_event(ctx.run_to_port(m), "sync", "guest read pages 4-5, wrote page 1")
    for p in (1, 4, 5, 9):               # pages the guest has mapped, and a fresh one
        m.data.write(0x4000_0000 + p * PAGE + 64, b"host" * 2)
    ctx.expect_event(ctx.run_to_port(m), "exit", "guest wrote page 2")
    slots, offsets = ctx.harvest(m.rings[0])
    got = pairs(slots, offsets)
    ctx.diag(f"harvested (slot, offset): {got}")
    host = sorted({o for s, o in got if o in (4, 5, 6, 7, 8, 9)})
    expect(not host, "no entry for a page only the host wrote (4-9)", "none", host)
    expect_eq(first_seen(o for _, o in got), [1, 2],
              "the guest's own writes (pages 1, 2) are reported, in order")


@check("ring.entries.per_page", 30, CITE_PUSH + "; arch/x86/kvm/mmu (write-protection "
       "fault lifts protection until the reset)", fault="ring_offset_shift")
def entries_per_page(ctx):
    """Repeated writes to one page give at least one entry, all naming that page"""
    entries, _ = small_ring(ctx)
    body = "".join(write_pages([0], v) for v in range(1, 11)) + sync(1) + \
        "".join(write_pages([0], v) for v in range(11, 21)) + EXIT
    m = guest(ctx, body, pages=4, ring=entries)
    ctx.expect_event(ctx.run_to_port(m), "sync", "10 writes to page 0")
    first = dirty_run(ctx, m.rings[0])
    ctx.expect_event(ctx.run_to_port(m), "exit", "10 more writes to page 0 (no reset between)")
    both = dirty_run(ctx, m.rings[0])
    ctx.diag(f"entries after 10 writes: {len(first)}; after 20 (no reset): {len(both)} "
             "(rule 30: >= 1; 1 when the first write lifts write protection, one per "
             "write when the write is emulated)")
    expect(len(first) >= 1, "entries after 10 writes to one page", ">= 1", len(first))
    bad = [e for e in both if (e[1], e[2]) != (DATA_SLOT, 0)]
    expect(not bad, "every entry names data page 0", "(slot 1, offset 0) only", bad)
    expect(len(both) >= len(first), "entries are never withdrawn", f">= {len(first)}",
           len(both))


def pml_reversed_order() -> str | None:
    """Why entries may come out of order here: Intel PML on a kernel older than 6.14, whose
    vmx_flush_pml_buffer() read the PML log newest-first. None on any other host."""
    release = os.uname().release
    ver = re.match(r"(\d+)\.(\d+)", release)
    if not pml_enabled() or not ver or (int(ver[1]), int(ver[2])) >= (6, 14):
        return None
    return (f"known ordering: Intel PML is enabled and {release} is older than 6.14, where "
            "vmx_flush_pml_buffer() pushed each PML batch newest-first (fixed by commit "
            "37c3ddfe5238 \"KVM: VMX: read the PML log in the same order as it was written\")")


def _reversed_batches(got: list, expected: list) -> bool:
    """``got`` is ``expected`` cut into consecutive batches, each one reversed: what a
    newest-first PML flush makes of writes (a write that faults is a batch of one)."""
    pos, i = 0, 0
    while i < len(got):
        if got[i] not in expected[pos:]:
            return False
        end = expected.index(got[i], pos) + 1
        if got[i:i + end - pos] != expected[pos:end][::-1]:
            return False
        i, pos = i + end - pos, end
    return pos == len(expected)


def _in_write_order(ctx, offsets, expected: list, what: str) -> None:
    """expect_pages_in_order, except on a host with the known PML ordering (Intel PML before
    6.14), where each PML batch is pushed newest-first: that is the kernel's implemented
    order there, not a broken one (37c3ddfe5238: "Usually this doesn't matter"; api.rst
    promises no order), so batches in reverse pass and anything else still fails."""
    try:
        expect_pages_in_order(offsets, expected, what)
    except Fail:
        note = pml_reversed_order()
        if note:
            ctx.diag(note)
            if _reversed_batches(first_seen(offsets), list(expected)):
                ctx.diag(f"{what}: each PML batch newest-first, as that kernel pushes it")
                return
        raise


@check("ring.entries.order", 31, CITE_PUSH + " (dirty_index increments per push); "
       "arch/x86/kvm/vmx/vmx.c vmx_flush_pml_buffer() (with Intel PML; newest-first before "
       "commit 37c3ddfe5238, 6.14)", fault="ring_offset_shift")
def entries_order(ctx):
    """Entries appear in write order: pages 0..9, then (after a reset) a shuffled order (Intel PML before 6.14: each PML batch newest-first)"""
    entries, _ = small_ring(ctx)
    shuffled = [3, 7, 1, 9, 0, 5, 2, 8, 4, 6]
    m = guest(ctx, write_run(0, 10) + sync(1) + write_pages(shuffled, 2) + EXIT,
                  pages=10, ring=entries)
    ctx.expect_event(ctx.run_to_port(m), "sync", "guest writes pages 0..9 in order")
    _, offsets = ctx.harvest(m.rings[0])
    ctx.diag(f"sequential: {offsets.tolist()}")
    _in_write_order(ctx, offsets, list(range(10)), "offsets after writing pages 0..9")
    m.vm.reset_dirty_rings()
    ctx.expect_event(ctx.run_to_port(m), "exit", f"guest writes pages {shuffled}")
    _, offsets = ctx.harvest(m.rings[0])
    ctx.diag(f"shuffled: {offsets.tolist()}")
    _in_write_order(ctx, offsets, shuffled, "offsets after writing a shuffled order")


@check("ring.entries.wrap", 32, "virt/kvm/dirty_ring.c kvm_dirty_ring_push() "
       "(dirty_index & (size - 1)); api.rst 7.36", fault="ring_offset_shift")
def entries_wrap(ctx):
    """The ring wraps: over 4 laps of the smallest ring every entry names the right page"""
    entries, soft = small_ring(ctx)
    per_round = min(150, soft - 8)
    rounds = -(-4 * entries // per_round) + 1           # more than 4 laps
    body = "    mov r12, rsi\n    mov r13, 1\n"
    body += ("round_loop:\n" + write_run(0, per_round, "r13", base="r12") +
             "    mov eax, r13d\n    out 0xf0, eax\n"
             f"    add r12, {per_round * PAGE}\n    inc r13\n"
             f"    cmp r13, {rounds + 1}\n    jne round_loop\n" + EXIT)
    m = guest(ctx, body, pages=per_round * rounds, ring=entries)
    ring, total = m.rings[0], 0
    for r in range(rounds):
        ctx.expect_event(ctx.run_to_port(m), "sync", f"round {r + 1}", r + 1)
        start = ring.fetch
        slots, offsets = ctx.harvest(ring)
        want = list(range(r * per_round, (r + 1) * per_round))
        expect(set(slots.tolist()) <= {DATA_SLOT}, f"round {r + 1}: slot of every entry",
               {DATA_SLOT}, sorted(set(slots.tolist())))
        expect_pages_in_order(offsets, want, f"round {r + 1} (ring positions {start % entries}"
                              f"..{(start + len(offsets) - 1) % entries})")
        got = m.vm.reset_dirty_rings()
        expect_eq(got, len(offsets), f"round {r + 1}: KVM_RESET_DIRTY_RINGS count")
        total += len(offsets)
    ctx.expect_event(ctx.run_to_port(m), "exit", "guest finished")
    left = [e for e in ctx.ring_entries(ring) if e[0]]
    ctx.diag(f"{rounds} rounds of {per_round} pages: {total} entries = "
             f"{total / entries:.2f} laps of {entries}")
    expect(total >= 4 * entries, "entries pushed", f">= {4 * entries} (4 laps)", total)
    expect(not left, "every position reads flags 0 after the last reset", "none", left[:4])


@check("ring.entries.multi_vcpu", 28, CITE_PUSH + " (kvm_get_running_vcpu()->dirty_ring)",
       fault="ring_offset_shift")
def entries_multi_vcpu(ctx):
    """Two vCPUs writing their own pages at once: each page appears in its writer's ring only"""
    entries, _ = small_ring(ctx)
    # RSI is this vCPU's share: pages 0-7 for vCPU 0, 8-15 for vCPU 1
    m = guest(ctx, write_run(0, 8) + EXIT, vcpus=2, pages=16, ring=entries)
    events = {}                           # both vCPUs run at once, vCPU 1 in a thread
    other = threading.Thread(target=lambda: events.update({1: ctx.run_to_port(m, 1, 5.0)}),
                             name="ring.entries.multi_vcpu vcpu1", daemon=True)
    try:
        with _sys.fd_creation():    # Ctrl-C held back: stopped below, once started
            other.start()
        events[0] = ctx.run_to_port(m, 0, 5.0)
    except BaseException:       # Ctrl-C: stop vCPU 1 before its VM is closed under it
        if other.ident is None:
            raise
        m.states[1].vcpu.run_struct.immediate_exit = 1
        signal.pthread_kill(other.ident, KICK_SIGNAL)
        other.join(6.0)
        raise
    other.join(6.0)
    for i in (0, 1):
        ev = events.get(i)
        if ev is None:
            raise Fail(f"vCPU {i} returns from KVM_RUN", "an exit", "still running")
        ctx.expect_event(ev, "exit", f"vCPU {i} writes its 8 pages")
    want = {0: list(range(0, 8)), 1: list(range(8, 16))}
    for i in (0, 1):
        slots, offsets = ctx.harvest(m.rings[i])
        ctx.diag(f"vCPU {i} ring: {offsets.tolist()}")
        expect(set(slots.tolist()) <= {DATA_SLOT}, f"vCPU {i}: slots", {DATA_SLOT},
               sorted(set(slots.tolist())))
        expect_pages_in_order(offsets, want[i], f"vCPU {i}'s ring holds exactly its own pages")


# --- dirty_log_test-style correctness run ------------------------------------------------

RANDOM_BODY = f"""
    mov r12, rsi
    mov r13, rdx
    mov r14, rcx
    mov r15, 1
    mov rbx, r9
    mov rsi, {LCG_MUL}
    mov rdi, {LCG_ADD}
iteration:
    mov rcx, r10
write:
""" + LCG_WRITE + """    dec rcx
    jnz write
""" + NEXT_ITERATION


def lcg_plan(seed: int, pages: int, writes: int, iterations: int) -> list:
    """The pages RANDOM_BODY writes in each iteration (a set per iteration): the same
    generator as guest_payloads/dirty_random.asm, replayed by minivmm.dirty.verify."""
    return [set(lcg_pages(seed, pages, writes, it).tolist()) for it in range(1, iterations + 1)]


def first_words(mem, pages: int) -> np.ndarray:
    view = np.frombuffer(mem.map, dtype="<u8", count=pages * PAGE // 8)
    try:
        return view[::PAGE // 8].copy()
    finally:
        del view


@check("ring.entries.correctness", (28, 30, 32, 43, 45), "tools/testing/selftests/kvm/"
       "dirty_log_test.c (dirty-ring mode); api.rst 7.36", fault="ring_drop")
def entries_correctness(ctx):
    """dirty_log_test-style run: random writes of the iteration number; every page reported"""
    entries, soft = small_ring(ctx)
    # Sized for a 256-entry ring and scaled with the host's: each iteration dirties more
    # pages than the soft limit, so the run crosses it (1024 entries with Intel PML).
    scale = entries // 256
    pages, writes, iterations, seed = 2048 * scale, 600 * scale, 16, 0x5EED
    m = guest(ctx, RANDOM_BODY, pages=pages, ring=entries,
                  regs={"rcx": iterations, "r9": seed, "r10": writes})
    plan = lcg_plan(seed, pages, writes, iterations)
    ring, prev = m.rings[0], first_words(m.data, pages)
    totals = {"entries": 0, "dups": 0, "full": 0, "dirty": 0}
    for it in range(1, iterations + 1):
        got_s, got_o, full = [], [], 0
        while True:
            ev = ctx.run_to_port(m, timeout=5.0)
            if ev.kind != "ring-full":
                break
            full += 1
            if full > 4 * (writes // max(1, soft - 8) + 2):
                raise Fail(f"iteration {it}: ring-full exits", "a bounded number", full)
            s, o = ctx.harvest(ring)
            expect(len(o) > 0, f"iteration {it}: a ring-full exit has entries to harvest",
                   "> 0", 0)
            got_s.append(s), got_o.append(o)
            expect_eq(m.vm.reset_dirty_rings(), len(o), f"iteration {it}: reset count "
                      "after a ring-full exit")
        ctx.expect_event(ev, "sync", f"iteration {it} ends with a sync", it)
        s, o = ctx.harvest(ring)
        got_s.append(s), got_o.append(o)
        expect_eq(m.vm.reset_dirty_rings(), len(o), f"iteration {it}: reset count at the sync")
        slots, offsets = np.concatenate(got_s), np.concatenate(got_o)
        bad = sorted({(int(a), int(b)) for a, b in zip(slots, offsets)
                      if a != DATA_SLOT or not 0 <= b < pages})
        expect(not bad, f"iteration {it}: every entry names slot 1 and an offset < {pages}",
               "none outside", bad[:8])
        reported = set(offsets.tolist())
        cur = first_words(m.data, pages)
        changed = set(np.flatnonzero(cur != prev).tolist())
        prev = cur
        missed = sorted(changed - reported)
        expect(not missed, f"iteration {it}: every page whose content changed is reported",
               "none missed", f"{len(missed)} missed: {missed[:8]}")
        stale = sorted(p for p in reported if cur[p] != it)
        expect(not stale, f"iteration {it}: every reported page holds the iteration number",
               it, f"{len(stale)} pages otherwise: {[(p, int(cur[p])) for p in stale[:8]]}")
        if reported != plan[it - 1]:
            raise Fail(f"iteration {it}: reported pages are the pages the guest wrote",
                       f"{len(plan[it - 1])} planned pages",
                       f"missing {sorted(plan[it - 1] - reported)[:8]}, unexpected "
                       f"{sorted(reported - plan[it - 1])[:8]}")
        dups = len(offsets) - len(reported)   # a page re-written after a reset: allowed
        totals["entries"] += len(offsets)
        totals["dups"] += dups
        totals["full"] += full
        totals["dirty"] += len(reported)
    ctx.expect_event(ctx.run_to_port(m), "exit", "guest finished")
    ctx.diag(f"{iterations} iterations x {writes} random writes over {pages} pages, ring "
             f"{entries}: {totals['dirty']} dirty pages, {totals['entries']} entries, "
             f"{totals['dups']} duplicates, {totals['full']} ring-full exits")
    expect(totals["full"] >= 1, "the run crossed the soft limit at least once", ">= 1",
           totals["full"])
