"""Checks: capabilities and system ioctls (abi.md rules 1-6).

Mirrors Documentation/virt/kvm/api.rst 4.1 KVM_GET_API_VERSION, 4.2 KVM_CREATE_VM, 4.4
KVM_CHECK_EXTENSION, 4.5 KVM_GET_VCPU_MMAP_SIZE and the capability numbers of 7.18 and 7.36,
as ``kvm_dev_ioctl()`` and ``kvm_vm_ioctl_check_extension_generic()`` (virt/kvm/kvm_main.c)
answer them."""
from __future__ import annotations

import os
import re

from .. import abi
from .._sys import ioctl
from .registry import Skip, check, expect, expect_eq, expect_errno, expect_ok

RING_MAX_BYTES = abi.KVM_DIRTY_RING_MAX_ENTRIES * 16


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _is_max_bytes(ctx, cap: int, value: int) -> None:
    """``value`` (cap's KVM_CHECK_EXTENSION) is the largest ring size in bytes, as api.rst
    7.36 says: a ring of that many bytes is accepted and one twice as big refused (E2BIG).
    A range test alone also passed 65536, the max in entries, which an early draft of the
    capability returned. Not held to today's 64 Ki entries: a kernel may raise it."""
    expect(_pow2(value) and value % 16 == 0 and value <= 1 << 31,
           "the size is a power of two, a whole number of 16-byte entries",
           "power of two", value)
    vm = ctx.vm()
    expect_ok(lambda: vm.enable_cap(cap, value), f"KVM_ENABLE_CAP({cap}, {value}): a ring "
              "of the advertised size")
    vm = ctx.vm()
    expect_errno(lambda: vm.enable_cap(cap, 2 * value), "E2BIG",
                 f"KVM_ENABLE_CAP({cap}, {2 * value}): twice the advertised size")
    ctx.diag(f"cap {cap}: {value} bytes accepted, {2 * value} refused "
             f"({value // 16} entries; {RING_MAX_BYTES // 16} in kernels since 5.11)")


@check("caps.ring.size", 1, "virt/kvm/kvm_main.c kvm_vm_ioctl_check_extension_generic() "
       "(KVM_DIRTY_RING_MAX_ENTRIES * sizeof(struct kvm_dirty_gfn)), "
       "kvm_vm_ioctl_enable_dirty_log_ring(); api.rst 7.36", fault="check_extension_lie")
def ring_size(ctx):
    """KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING) is the max ring size in bytes, same on VM fd"""
    sys_value = ctx.cap(abi.KVM_CAP_DIRTY_LOG_RING)
    vm_value = ctx.vm().check_extension(abi.KVM_CAP_DIRTY_LOG_RING)
    ctx.diag(f"KVM_CAP_DIRTY_LOG_RING = {sys_value} on /dev/kvm, {vm_value} on a VM fd")
    expect_eq(vm_value, sys_value, "value on the VM fd equals /dev/kvm's")
    # 0 passed here, and every ring check skipped: x86 has built the ring in since v5.11
    # (HAVE_KVM_DIRTY_RING; the plain ring is x86's, TSO), so 0 there is a lost ring
    expect(sys_value or os.uname().machine != "x86_64" or _release() < RING_SINCE,
           f"x86 with {os.uname().release} (the dirty ring is in every x86 kernel since v5.11)",
           "the max ring size in bytes", sys_value)
    if sys_value:
        _is_max_bytes(ctx, abi.KVM_CAP_DIRTY_LOG_RING, sys_value)


# KVM_CAP_DIRTY_LOG_RING_ACQ_REL (223) came with commit 17601bfed909 (v6.1); 5.11-6.0
# kernels offer only the plain ring, as Ctx.ring_cap() allows
ACQ_REL_SINCE = (6, 1)
RING_SINCE = (5, 11)      # KVM_CAP_DIRTY_LOG_RING (commit fb04a1eddb1a)


def _release() -> tuple:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


@check("caps.ring.acq_rel", 2, "virt/kvm/kvm_main.c kvm_vm_ioctl_check_extension_generic(); "
       "commit 17601bfed909 (v6.1); api.rst 7.36", fault="check_extension_lie")
def ring_acq_rel(ctx):
    """KVM_CAP_DIRTY_LOG_RING_ACQ_REL reports the same size as the plain ring on x86 (v6.1+)"""
    plain = ctx.require(abi.KVM_CAP_DIRTY_LOG_RING)
    acq = ctx.cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
    ctx.diag(f"RING = {plain}, RING_ACQ_REL = {acq}")
    if acq == 0 and _release() < ACQ_REL_SINCE:
        raise Skip(f"{os.uname().release} predates KVM_CAP_DIRTY_LOG_RING_ACQ_REL (v6.1)")
    if os.uname().machine == "x86_64":
        expect_eq(acq, plain, "x86 (TSO) advertises ACQ_REL with the plain ring's size")
    _is_max_bytes(ctx, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, acq)


@check("caps.ring.with_bitmap_x86", 3, "virt/kvm/kvm_main.c (CONFIG_NEED_KVM_DIRTY_RING_WITH_"
       "BITMAP, arm64 only)", fault="check_extension_lie")
def ring_with_bitmap(ctx):
    """KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is 0 on x86"""
    value = ctx.cap(abi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    if os.uname().machine != "x86_64":
        raise Skip("only x86 is expected to report 0")
    expect_eq(value, 0, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP on x86")


@check("caps.manual_protect2.value", 4, "virt/kvm/kvm_main.c "
       "kvm_vm_ioctl_check_extension_generic() (returns KVM_DIRTY_LOG_MANUAL_CAPS: "
       "include/linux/kvm_host.h, arch/x86/include/asm/kvm_host.h); api.rst 7.18",
       fault="check_extension_lie")
def manual_protect2(ctx):
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 offers MANUAL_PROTECT_ENABLE (x86: and INITIALLY_SET, 3)"""
    value = ctx.cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    ctx.diag(f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {value}")
    if os.uname().machine == "x86_64" and (ctx.cap(abi.KVM_CAP_DIRTY_LOG_RING) > 0 or
                                           ctx.cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0):
        # 0 was a SKIP (and 1 a pass) that hid every manual-protect and INITIALLY_SET check:
        # x86's KVM_DIRTY_LOG_MANUAL_CAPS has both bits since v5.7, before the ring (v5.11)
        expect_eq(value, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                  | abi.KVM_DIRTY_LOG_INITIALLY_SET,
                  "x86 with a dirty ring: MANUAL_PROTECT_ENABLE | INITIALLY_SET")
        return
    if value <= 0:
        raise Skip("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not offered by this kernel")
    expect(value & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE and not value & ~3,
           "value is KVM_DIRTY_LOG_MANUAL_CAPS: bit 0 set, only bits 0-1", "1 or 3", value)


@check("caps.manual_protect.obsolete", 4, "virt/kvm/kvm_main.c kvm_vm_ioctl_enable_cap_generic()"
       " (no case for 166: default) -> arch/x86/kvm/x86.c kvm_vm_ioctl_enable_cap() (default: "
       "-EINVAL); api.rst 7.18", fault="fake_success")
def manual_protect_obsolete(ctx):
    """The obsolete KVM_CAP_MANUAL_DIRTY_LOG_PROTECT (166) is not offered, cannot be enabled"""
    vm = ctx.vm()
    # rule 4's other half: no case for 166 in kvm_vm_ioctl_check_extension_generic()
    expect_eq(vm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT), 0,
              "KVM_CHECK_EXTENSION(166) on a VM fd")
    expect_errno(lambda: vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT, 1), "EINVAL",
                 "KVM_ENABLE_CAP(166)")


@check("caps.vcpu_mmap_size", 5, "virt/kvm/kvm_main.c kvm_dev_ioctl() KVM_GET_VCPU_MMAP_SIZE",
       fault="version_lie")
def vcpu_mmap_size(ctx):
    """KVM_GET_VCPU_MMAP_SIZE covers kvm_run, PIO and coalesced-MMIO pages, not the ring"""
    size = ctx.kvm.get_vcpu_mmap_size()
    page = os.sysconf("SC_PAGESIZE")
    ctx.diag(f"KVM_GET_VCPU_MMAP_SIZE = {size}")
    expect(size % page == 0, "a whole number of pages", f"multiple of {page}", size)
    if os.uname().machine == "x86_64":
        expect_eq(size, (abi.KVM_COALESCED_MMIO_PAGE_OFFSET + 1) * page,
                  "x86: kvm_run + PIO page + coalesced MMIO page")
    expect(size < abi.KVM_DIRTY_LOG_PAGE_OFFSET * page, "the ring (page 64 on) is not included",
           f"< {abi.KVM_DIRTY_LOG_PAGE_OFFSET * page}", size)


@check("caps.api_version", 6, "virt/kvm/kvm_main.c kvm_dev_ioctl(); api.rst 4.1",
       fault="version_lie")
def api_version(ctx):
    """KVM_GET_API_VERSION is 12; a non-zero argument is EINVAL"""
    expect_eq(ctx.kvm.get_api_version(), abi.KVM_API_VERSION, "KVM_GET_API_VERSION")
    expect_errno(lambda: ioctl(ctx.kvm.fd, abi.KVM_GET_API_VERSION, 1, "KVM_GET_API_VERSION"),
                 "EINVAL", "KVM_GET_API_VERSION with argument 1")


def _close_if_fd(result):
    if isinstance(result, int) and result > 2:
        os.close(result)


@check("caps.create_vm.bad_type", 6, "arch/x86/kvm/x86.c kvm_arch_init_vm(); api.rst 4.2",
       fault="fake_success")
def create_vm_bad_type(ctx):
    """KVM_CREATE_VM with an unknown machine type (99) is EINVAL"""
    def call():
        fd = ioctl(ctx.kvm.fd, abi.KVM_CREATE_VM, 99, "KVM_CREATE_VM")
        _close_if_fd(fd)
        return fd
    expect_errno(call, "EINVAL", "KVM_CREATE_VM(type 99)")


# kvm_vm_ioctl()'s default hands an unknown VM ioctl to kvm_arch_vm_ioctl(), whose own
# default differs: x86's is -ENOTTY, arm64's (arch/arm64/kvm/arm.c) -EINVAL
NOT_A_VM_IOCTL = {"x86_64": "ENOTTY", "aarch64": "EINVAL"}


@check("caps.create_vm.on_vm_fd", 6, "virt/kvm/kvm_main.c kvm_vm_ioctl() (default) -> "
       "arch/x86/kvm/x86.c kvm_arch_vm_ioctl() (default: -ENOTTY; arm64's arch/arm64/kvm/"
       "arm.c: -EINVAL)", fault="fake_success")
def create_vm_on_vm_fd(ctx):
    """KVM_CREATE_VM issued on a VM fd is not a VM ioctl: ENOTTY (arm64: EINVAL)"""
    machine = os.uname().machine
    if machine not in NOT_A_VM_IOCTL:
        raise Skip(f"the errno of an unknown VM ioctl is the architecture's; {machine} "
                   "has none recorded here")
    vm = ctx.vm()

    def call():
        fd = ioctl(vm.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        _close_if_fd(fd)
        return fd
    expect_errno(call, NOT_A_VM_IOCTL[machine], f"KVM_CREATE_VM on a VM fd ({machine})")
