"""Checks: memory slots as dirty tracking sees them (abi.md rules 60-63).

KVM_SET_USER_MEMORY_REGION (v1): which flags it takes, which changes of an existing
slot it refuses, overlaps, deleting, moving a logged slot, and what happens to ring
entries of a slot that is deleted (and whose id is then reused).
"""
from __future__ import annotations

import numpy as np

from .. import abi
from ..x86 import layout as L
from .checks_bitmap import (LOG, PAGE, RO, SCRATCH_GPA, get_pages, host_memory,
                            run_exit, run_sync, writes_body)
from .registry import check, expect, expect_eq, expect_errno, expect_ok

MAIN = "virt/kvm/kvm_main.c"
# The 6.18 name; older kernels call it __kvm_set_memory_region() (renamed in Sean
# Christopherson's 2025 series adding kvm_set_internal_memslot())
SET_REGION = f"{MAIN} kvm_set_memory_region()"


@check("memslot.flags.invalid_v1", 60, f"{MAIN} kvm_vm_ioctl() KVM_SET_USER_MEMORY_REGION "
       "(KVM_SET_USER_MEMORY_REGION_V1_FLAGS = LOG_DIRTY_PAGES | READONLY, v6.8+ with "
       "KVM_SET_USER_MEMORY_REGION2), check_memory_region_flags(); api.rst 4.35",
       fault="errno_swap")
def flags_invalid(ctx):
    """KVM_SET_USER_MEMORY_REGION (v1) refuses flags other than LOG_DIRTY_PAGES, READONLY: EINVAL"""
    vm = ctx.vm()
    mem = host_memory(ctx, 16)
    good = [0, LOG]
    if ctx.cap(abi.KVM_CAP_READONLY_MEM):
        good += [RO, RO | LOG]
    else:
        ctx.diag("KVM_CAP_READONLY_MEM is 0: READONLY not tried as a valid flag")
    for slot, flags in enumerate(good, 1):
        gpa = SCRATCH_GPA + slot * (1 << 20)
        expect_ok(lambda: vm.set_user_memory_region(slot, flags, gpa, mem.size, mem.host_addr),
                  f"slot {slot} with flags {flags:#x} (valid)")
    for bit in (2, 3, 4, 16, 31):
        flags = LOG | (1 << bit)
        gpa = SCRATCH_GPA + (64 << 20) + bit * (1 << 20)
        note = ", KVM_MEM_GUEST_MEMFD: KVM_SET_USER_MEMORY_REGION2 only" if bit == 2 else ""
        expect_errno(lambda: vm.set_user_memory_region(10 + bit, flags, gpa, mem.size,
                                                       mem.host_addr),
                     "EINVAL", f"new slot with flags {flags:#x} (bit {bit}{note})")
    expect_errno(lambda: vm.set_user_memory_region(1, 1 << 2, SCRATCH_GPA + (1 << 20),
                                                   mem.size, mem.host_addr),
                 "EINVAL", "changing existing slot 1's flags to KVM_MEM_GUEST_MEMFD")


@check("memslot.modify.einval", 61, f"{SET_REGION} (modify an existing "
       "slot); api.rst 4.35", fault="errno_swap")
def modify_einval(ctx):
    """Resizing a slot, changing its userspace_addr or toggling READONLY is EINVAL"""
    vm = ctx.vm()
    mem, other = host_memory(ctx, 32), host_memory(ctx, 16)
    gpa, size = SCRATCH_GPA, 16 * PAGE
    vm.set_user_memory_region(1, LOG, gpa, size, mem.host_addr)
    expect_ok(lambda: vm.set_user_memory_region(1, LOG, gpa, size, mem.host_addr),
              "the same region again (no change)")
    expect_ok(lambda: vm.set_user_memory_region(1, 0, gpa, size, mem.host_addr),
              "toggling LOG_DIRTY_PAGES off (a flags-only change)")
    expect_ok(lambda: vm.set_user_memory_region(1, LOG, gpa, size, mem.host_addr),
              "toggling LOG_DIRTY_PAGES on again")
    expect_errno(lambda: vm.set_user_memory_region(1, LOG, gpa, 2 * size, mem.host_addr),
                 "EINVAL", "growing slot 1 from 16 to 32 pages")
    expect_errno(lambda: vm.set_user_memory_region(1, LOG, gpa, size // 2, mem.host_addr),
                 "EINVAL", "shrinking slot 1 from 16 to 8 pages")
    expect_errno(lambda: vm.set_user_memory_region(1, LOG, gpa, size, other.host_addr),
                 "EINVAL", "giving slot 1 a new userspace_addr")
    expect_errno(lambda: vm.set_user_memory_region(1, LOG, gpa, size, mem.host_addr + size),
                 "EINVAL", "giving slot 1 a userspace_addr 16 pages further")
    if ctx.cap(abi.KVM_CAP_READONLY_MEM):
        expect_errno(lambda: vm.set_user_memory_region(1, LOG | RO, gpa, size, mem.host_addr),
                     "EINVAL", "turning READONLY on for slot 1")
        vm.set_user_memory_region(2, RO, gpa + (1 << 20), size, other.host_addr)
        expect_errno(lambda: vm.set_user_memory_region(2, 0, gpa + (1 << 20), size,
                                                       other.host_addr),
                     "EINVAL", "turning READONLY off for slot 2")
    else:
        ctx.diag("KVM_CAP_READONLY_MEM is 0: READONLY toggling not tried")


@check("memslot.overlap.eexist", 61, f"{SET_REGION} "
       "(kvm_check_memslot_overlap); api.rst 4.35", fault="errno_swap")
def overlap_eexist(ctx):
    """A new or moved slot overlapping another slot's guest-physical range is EEXIST"""
    vm = ctx.vm()
    mem = host_memory(ctx, 64)
    base = SCRATCH_GPA
    vm.set_user_memory_region(1, 0, base, 16 * PAGE, mem.host_addr)
    expect_ok(lambda: vm.set_user_memory_region(2, 0, base + 16 * PAGE, 16 * PAGE,
                                                mem.host_addr + 16 * PAGE),
              "slot 2 right after slot 1 (adjacent, no overlap)")
    expect_errno(lambda: vm.set_user_memory_region(3, 0, base + 8 * PAGE, 16 * PAGE,
                                                   mem.host_addr + 32 * PAGE),
                 "EEXIST", "slot 3 over the second half of slot 1 and the first of slot 2")
    expect_errno(lambda: vm.set_user_memory_region(3, 0, base - 15 * PAGE, 16 * PAGE,
                                                   mem.host_addr + 32 * PAGE),
                 "EEXIST", "slot 3 whose last page is slot 1's first")
    expect_errno(lambda: vm.set_user_memory_region(3, 0, base + 4 * PAGE, PAGE,
                                                   mem.host_addr + 32 * PAGE),
                 "EEXIST", "slot 3, one page inside slot 1")
    expect_errno(lambda: vm.set_user_memory_region(2, 0, base + 8 * PAGE, 16 * PAGE,
                                                   mem.host_addr + 16 * PAGE),
                 "EEXIST", "moving slot 2 onto the second half of slot 1")
    expect_ok(lambda: vm.set_user_memory_region(3, 0, base - 16 * PAGE, 16 * PAGE,
                                                mem.host_addr + 32 * PAGE),
              "slot 3 right before slot 1 (adjacent)")


@check("memslot.delete.absent", 61, f"{SET_REGION} (memory_size 0, "
       "no old slot or old->npages == 0); api.rst 4.35", fault="errno_swap")
def delete_absent(ctx):
    """Deleting a slot that does not exist (memory_size 0) is EINVAL"""
    vm = ctx.vm()
    mem = host_memory(ctx, 16)
    expect_errno(lambda: vm.set_user_memory_region(7, 0, SCRATCH_GPA, 0, 0), "EINVAL",
                 "deleting slot 7, never created")
    vm.set_user_memory_region(1, LOG, SCRATCH_GPA, mem.size, mem.host_addr)
    expect_ok(lambda: vm.set_user_memory_region(1, 0, SCRATCH_GPA, 0, 0), "deleting slot 1")
    expect_errno(lambda: vm.set_user_memory_region(1, 0, SCRATCH_GPA, 0, 0), "EINVAL",
                 "deleting slot 1 a second time")
    expect_errno(lambda: vm.set_user_memory_region(1, LOG, SCRATCH_GPA, 0, mem.host_addr),
                 "EINVAL", "deleting slot 1 again, with its old flags and userspace_addr")


@check("memslot.move.keeps_bitmap", 62, f"{MAIN} kvm_prepare_memory_region() (KVM_MR_MOVE "
       "keeps old->dirty_bitmap); api.rst 4.35", fault="bitmap_flip")
def move_keeps_bitmap(ctx):
    """Moving a logged slot (same size and userspace_addr, new GPA) keeps its dirty bitmap"""
    npages = 64
    m = ctx.guest(writes_body([[0, 5, 63]]), pages=npages)
    run_sync(ctx, m, 1)
    data = m.data
    new_gpa = 2 * L.GIB
    expect_ok(lambda: m.vm.set_user_memory_region(1, LOG, new_gpa, data.size, data.host_addr),
              f"moving slot 1 from {data.gpa:#x} to {new_gpa:#x}")
    expect_eq(get_pages(m.vm, 1, npages), [0, 5, 63],
              "GET after the move (the guest wrote pages 0, 5, 63 before it)")
    expect_eq(get_pages(m.vm, 1, npages), [], "GET again (the moved slot's bitmap still clears)")


@check("memslot.delete.ring_entries", 63, "virt/kvm/dirty_ring.c kvm_dirty_ring_reset(), "
       "kvm_reset_dirty_gfn(); Peter Xu, kvm@ 2025-05-20", fault="reset_count_lie")
def delete_ring_entries(ctx):
    """Deleting a slot leaves its ring entries; RESET counts (and skips) them; the id is reusable"""
    entries = ctx.min_ring()
    m = ctx.guest(writes_body([list(range(8)), [2, 5]]), pages=8, ring=entries,
              data_flags=LOG)
    ring = m.rings[0]
    run_sync(ctx, m, 1)
    before = [e for e in ctx.ring_entries(ring, 0, 64) if e[0] & abi.KVM_DIRTY_GFN_F_DIRTY]
    expect(len(before) >= 8 and all(s == L.SLOT_DATA for _, s, _ in before)
           and sorted({o for _, _, o in before}) == list(range(8)),
           "ring entries after the guest wrote pages 0..7 of slot 1",
           "DIRTY entries for slot 1, offsets 0..7", before)
    ctx.diag(f"{len(before)} DIRTY entries for 8 pages before the delete")
    data = m.data
    expect_ok(lambda: m.vm.set_user_memory_region(1, 0, data.gpa, 0, 0), "deleting slot 1")
    after = [e for e in ctx.ring_entries(ring, 0, 64) if e[0] & abi.KVM_DIRTY_GFN_F_DIRTY]
    expect_eq(after, before, "ring entries after deleting the slot (left in place)")
    slots, offsets = ctx.harvest(ring)
    expect_eq(len(slots), len(before), "entries harvested after the delete")
    expect_eq(m.vm.reset_dirty_rings(), len(before),
              "KVM_RESET_DIRTY_RINGS count (entries naming the deleted slot are counted)")
    expect_eq(m.vm.reset_dirty_rings(), 0, "a second KVM_RESET_DIRTY_RINGS")
    expect_ok(lambda: m.vm.set_user_memory_region(1, LOG, data.gpa, data.size, data.host_addr),
              "re-creating slot 1 (same id, GPA and memory)")
    run_sync(ctx, m, 2)                 # the guest writes pages 2 and 5
    slots, offsets = ctx.harvest(ring)
    expect(len(slots) >= 2 and set(slots.tolist()) == {L.SLOT_DATA}
           and sorted(set(offsets.tolist())) == [2, 5],
           "entries after the guest wrote pages 2, 5 of the re-created slot 1",
           "slot 1, offsets {2, 5}", list(zip(slots.tolist(), offsets.tolist())))
    expect_eq(m.vm.reset_dirty_rings(), len(slots), "KVM_RESET_DIRTY_RINGS count after reuse")
    run_exit(ctx, m)
    content = np.frombuffer(data.map, dtype="<u8")[::PAGE // 8].tolist()
    expect_eq(content, [1, 1, 2, 1, 1, 2, 1, 1], "first qword of each page (the guest's writes "
              "reached the same memory through the re-created slot)")
