"""Checks: enabling the dirty ring with KVM_ENABLE_CAP on the VM fd (abi.md rules 7-19).

Every call goes to the kernel directly (``Vm.enable_cap``, raw ioctls), never through
minivmm's own size validation or its refusal after KVM_CREATE_VCPU, so the kernel's answer
is what is checked. Each probe runs in a fresh VM.
"""
from __future__ import annotations

import ctypes
import os

from .. import abi
from .._sys import ioctl
from ..dirty.ringsize import (PAGE, PML_ENTRIES, min_entries_for, module_param, param_on,
                              ring_limits)
from ..kvm import vendor_module
from .registry import Skip, check, expect, expect_eq, expect_errno, expect_ok

RSVD = abi.KVM_DIRTY_RING_RSVD_ENTRIES

ENABLE = "virt/kvm/kvm_main.c kvm_vm_ioctl_enable_dirty_log_ring()"
GENERIC = "virt/kvm/kvm_main.c kvm_vm_ioctl_enable_cap_generic()"


def _max_bytes(ctx, cap: int) -> int:
    value = ctx.cap(cap)
    if value <= 0:
        raise Skip(f"{abi.CAP_NAMES.get(cap, cap)} is 0 on this kernel")
    return value


def _vcpu_fd(ctx, vm, vcpu_id: int = 0) -> int:
    """KVM_CREATE_VCPU without minivmm's Vcpu wrapper (no kvm_run mapping): a bare fd."""
    fd = ioctl(vm.fd, abi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
    ctx.on_close(lambda: os.close(fd))
    return fd


def _enable_each(ctx, cap: int, sizes, errno_name: str, what: str) -> None:
    """Each size in a fresh VM: KVM_ENABLE_CAP(cap, size) must fail with errno_name."""
    for size in sizes:
        vm = ctx.vm()
        e = expect_errno(lambda: vm.enable_cap(cap, size), errno_name,
                         f"{what}: KVM_ENABLE_CAP({cap}, args[0]={size:#x})")
        ctx.diag(f"args[0]={size:#x} -> {e.errno_name}")


def _expected_min_bytes() -> tuple:
    """The smallest ring sizes (bytes) this host's kernel may accept, and why: one page,
    or 16 KiB where a 512-entry hardware log (PML) is reserved too. Only kvm_intel and
    kvm_amd can have one; a kvm_amd without a ``pml`` parameter, or a vendor module sysfs
    does not show (kvm_intel with PML included), is taken either way."""
    vendor = vendor_module()
    pml = module_param(vendor, "pml") if vendor in ("kvm_intel", "kvm_amd") else None
    # "unknown" on x86 only: arm64 has no PML, and there one page stays the minimum
    unknown_x86 = vendor == "unknown" and os.uname().machine == "x86_64"
    if (vendor in ("kvm_intel", "kvm_amd") or unknown_x86) and pml is None:
        return {PAGE, min_entries_for(RSVD + PML_ENTRIES) * 16}, \
            f"{vendor} without a pml parameter: with or without a PML reserve"
    if param_on(pml):
        return {min_entries_for(RSVD + PML_ENTRIES) * 16}, \
            f"{vendor} pml={pml}: {RSVD} + {PML_ENTRIES} reserved entries"
    return {min_entries_for(RSVD) * 16}, \
        f"{vendor}{f' pml={pml}' if pml else ''}: no hardware log, {RSVD} reserved entries"


@check("ring.enable.sizes", 7, f"{ENABLE}; virt/kvm/dirty_ring.c "
       "kvm_dirty_ring_get_rsvd_entries(); api.rst 7.36", fault="small_rings_refused")
def sizes(ctx):
    """Every power-of-two size from the minimum (a page; 16 KiB with PML) to the max is accepted"""
    cap = ctx.ring_cap()
    max_bytes = _max_bytes(ctx, cap)
    # measured by minivmm's own probe (a page, doubling): a kernel that wrongly refuses
    # small rings would move it up, so it is held to what the reserve allows
    min_bytes = ring_limits(ctx.kvm)["min_entries"] * 16
    allowed, why = _expected_min_bytes()
    ctx.diag(f"smallest size accepted: {min_bytes} bytes; expected "
             f"{' or '.join(map(str, sorted(allowed)))} ({why})")
    expect(min_bytes in allowed, f"the smallest ring KVM_ENABLE_CAP({cap}) accepts is "
           f"{min_bytes} bytes, not {' or '.join(map(str, sorted(allowed)))} ({why})")
    size, tried = min_bytes, []
    while size <= max_bytes:
        vm = ctx.vm()
        expect_ok(lambda: vm.enable_cap(cap, size),
                  f"KVM_ENABLE_CAP({cap}, {size}) before any vCPU")
        tried.append(size)
        size *= 2
    ctx.diag(f"cap {cap}: accepted each of {len(tried)} sizes {tried[0]}..{tried[-1]} bytes, "
             "each in a fresh VM")


@check("ring.enable.zero", 8, ENABLE, fault="errno_swap")
def zero(ctx):
    """A ring size of 0 is EINVAL"""
    _enable_each(ctx, ctx.ring_cap(), (0,), "EINVAL", "size 0")


@check("ring.enable.not_pow2", 9, f"{ENABLE} (!size || (size & (size - 1)))", fault="errno_swap")
def not_pow2(ctx):
    """Sizes that are not a power of two (12288, 4112) are EINVAL"""
    _enable_each(ctx, ctx.ring_cap(), (12288, 4112), "EINVAL", "not a power of two")


@check("ring.enable.too_small", 10, f"{ENABLE} (size < rsvd entries or < PAGE_SIZE)",
       fault="errno_swap")
def too_small(ctx):
    """Power-of-two sizes below one page (2048, 1024) are EINVAL"""
    _enable_each(ctx, ctx.ring_cap(), (2048, 1024), "EINVAL", "smaller than a page")


@check("ring.enable.too_big", 11, f"{ENABLE} (size > KVM_DIRTY_RING_MAX_ENTRIES * 16)",
       fault="errno_swap")
def too_big(ctx):
    """Power-of-two sizes above the capability's max (2 x max, 2^31) are E2BIG"""
    cap = ctx.ring_cap()
    max_bytes = _max_bytes(ctx, cap)
    _enable_each(ctx, cap, sorted({2 * max_bytes, 1 << 31}), "E2BIG", "larger than the max")


@check("ring.enable.u32_truncation", 12, f"{GENERIC} (args[0] passed as u32)",
       fault="errno_swap")
def u32_truncation(ctx):
    """args[0] is truncated to u32: 2^32 is EINVAL (size 0), 2^32 | 65536 enables 65536 B"""
    cap = ctx.ring_cap()
    _enable_each(ctx, cap, (1 << 32,), "EINVAL", "2^32 truncates to 0")
    vm = ctx.vm()
    expect_ok(lambda: vm.enable_cap(cap, (1 << 32) | 65536),
              "KVM_ENABLE_CAP(args[0] = 2^32 | 65536) enables a 65536-byte ring")
    # The ring really is enabled: a second enable is refused as "already set" (rule 13).
    expect_errno(lambda: vm.enable_cap(cap, 65536), "EINVAL",
                 "second enable after the truncated one (the ring is set)")


@check("ring.enable.twice", 13, f"{ENABLE} (kvm->dirty_ring_size already set)",
       fault="errno_swap")
def twice(ctx):
    """A second enable is EINVAL (same cap, or ACQ_REL after RING); E2BIG wins for huge sizes"""
    cap = ctx.ring_cap()
    size = ctx.min_ring(1024) * 16      # valid on its own: only "already set" refuses it
    vm = ctx.vm()
    expect_ok(lambda: vm.enable_cap(cap, size), f"first KVM_ENABLE_CAP ({size} bytes)")
    expect_errno(lambda: vm.enable_cap(cap, size), "EINVAL", "same cap, same size again")
    expect_errno(lambda: vm.enable_cap(cap, 2 * size), "EINVAL",
                 f"same cap, another size ({2 * size} bytes)")
    big = 2 * _max_bytes(ctx, cap)
    expect_errno(lambda: vm.enable_cap(cap, big), "E2BIG",
                 f"second enable with {big} bytes (size is checked before 'already set')")
    if (ctx.cap(abi.KVM_CAP_DIRTY_LOG_RING) > 0
            and ctx.cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0):
        vm2 = ctx.vm()
        expect_ok(lambda: vm2.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING, size),
                  "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)")
        expect_errno(lambda: vm2.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, size),
                     "EINVAL", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL after KVM_CAP_DIRTY_LOG_RING")
    else:
        ctx.diag("only one ring capability offered: ACQ_REL-after-RING not probed")


@check("ring.enable.after_vcpu", 14, f"{ENABLE} (kvm->created_vcpus); api.rst 7.36",
       fault="errno_swap")
def after_vcpu(ctx):
    """Enabling after KVM_CREATE_VCPU is EINVAL (not EBUSY)"""
    cap = ctx.ring_cap()
    # A size this host accepts (16384 bytes with Intel PML, which refuses 4096 with EINVAL
    # too): the EINVAL must come from the vCPU. The control proves the size is valid.
    size = ctx.min_ring() * 16
    expect_ok(lambda: ctx.vm().enable_cap(cap, size),
              f"KVM_ENABLE_CAP({cap}, {size}) without a vCPU (the control)")
    vm = ctx.vm()
    _vcpu_fd(ctx, vm, 0)
    expect_errno(lambda: vm.enable_cap(cap, size), "EINVAL",
                 f"KVM_ENABLE_CAP({cap}, {size}) after a vCPU")


@check("ring.enable.flags_ignored", 15, f"{GENERIC} (cap->flags not checked for the ring)",
       fault="vm_calls_fail")
def flags_ignored(ctx):
    """A non-zero kvm_enable_cap.flags is ignored: the ring is enabled (0)"""
    cap = ctx.ring_cap()
    size = ctx.min_ring() * 16
    for flags in (1, 0xFFFFFFFF):
        vm = ctx.vm()
        expect_ok(lambda: vm.enable_cap(cap, size, flags=flags),
                  f"KVM_ENABLE_CAP(cap {cap}, {size} bytes, flags={flags:#x})")
        # Not a no-op success: the ring is now set, so a second enable is refused.
        expect_errno(lambda: vm.enable_cap(cap, size), "EINVAL",
                     f"second enable after the one with flags={flags:#x} (the ring is set)")
    ctx.diag(f"flags 0x1 and 0xffffffff both accepted ({size}-byte ring)")


@check("ring.enable.after_memslots", 16, "virt/kvm/kvm_main.c kvm_use_dirty_bitmap(), "
       "kvm_get_dirty_log_protect(); api.rst 7.36", fault="errno_swap")
def after_memslots(ctx):
    """Enabling after memslots exist works; GET_DIRTY_LOG on a logged slot is then ENXIO"""
    cap = ctx.ring_cap()
    vm = ctx.vm()
    pages = 16
    vm.add_memory(0, 0, pages * 4096, abi.KVM_MEM_LOG_DIRTY_PAGES, "abi-check")
    before = expect_ok(lambda: ctx.get_dirty_log(vm, 0, pages),
                       "KVM_GET_DIRTY_LOG on the logged slot before the ring")
    expect_eq(int(before.sum()), 0, "bitmap of an untouched slot")
    size = ctx.min_ring() * 16
    expect_ok(lambda: vm.enable_cap(cap, size),
              f"KVM_ENABLE_CAP({cap}, {size}) after a memslot exists")
    expect_errno(lambda: ctx.get_dirty_log(vm, 0, pages), "ENXIO",
                 "KVM_GET_DIRTY_LOG on the slot that had a bitmap, after the ring")


@check("ring.enable.with_bitmap_x86", 17, f"{GENERIC} (CONFIG_NEED_KVM_DIRTY_RING_WITH_"
       "BITMAP, arm64 only)", fault="errno_swap")
def with_bitmap_x86(ctx):
    """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) is EINVAL on x86, before/after ring"""
    if os.uname().machine != "x86_64":
        raise Skip("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP exists on arm64; rule 17 is for x86")
    cap = ctx.ring_cap()
    wb = abi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
    vm = ctx.vm()
    expect_errno(lambda: vm.enable_cap(wb, 0), "EINVAL", "KVM_ENABLE_CAP(225) without a ring")
    vm = ctx.vm()
    size = ctx.min_ring() * 16
    expect_ok(lambda: vm.enable_cap(cap, size), f"KVM_ENABLE_CAP(ring, {size} bytes)")
    expect_errno(lambda: vm.enable_cap(wb, 0), "EINVAL", "KVM_ENABLE_CAP(225) after the ring")


@check("ring.enable.on_vcpu_fd", 18, "virt/kvm/kvm_main.c kvm_vcpu_ioctl() -> "
       "arch/x86/kvm/x86.c kvm_vcpu_ioctl_enable_cap()", fault="errno_swap")
def on_vcpu_fd(ctx):
    """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) on a vCPU fd is EINVAL"""
    vm = ctx.vm()
    fd = _vcpu_fd(ctx, vm, 0)
    arg = abi.kvm_enable_cap(cap=abi.KVM_CAP_DIRTY_LOG_RING)
    arg.args[0] = ctx.min_ring() * 16      # a size the VM fd would accept
    expect_errno(lambda: ioctl(fd, abi.KVM_ENABLE_CAP, ctypes.addressof(arg),
                               "KVM_ENABLE_CAP"), "EINVAL", "KVM_ENABLE_CAP(192) on a vCPU fd")


@check("ring.enable.reset_without_ring", 19, "virt/kvm/kvm_main.c "
       "kvm_vm_ioctl_reset_dirty_pages() (!kvm->dirty_ring_size)", fault="errno_swap")
def reset_without_ring(ctx):
    """KVM_RESET_DIRTY_RINGS on a VM without a ring is EINVAL"""
    vm = ctx.vm()
    expect_errno(vm.reset_dirty_rings, "EINVAL", "KVM_RESET_DIRTY_RINGS without a ring")


@check("ring.enable.reset_no_vcpus", 19, "virt/kvm/kvm_main.c "
       "kvm_vm_ioctl_reset_dirty_pages()", fault="reset_count_lie")
def reset_no_vcpus(ctx):
    """KVM_RESET_DIRTY_RINGS with a ring but no vCPUs returns 0"""
    vm = ctx.vm()
    entries = ctx.min_ring()
    expect_ok(lambda: ctx.enable_ring(vm, entries), f"KVM_ENABLE_CAP(ring, {entries * 16} bytes)")
    expect_eq(expect_ok(vm.reset_dirty_rings, "KVM_RESET_DIRTY_RINGS"), 0,
              "entries reset with no vCPUs")
