"""Checks: vCPU creation, VM setup ioctls that only work before vCPUs, immediate_exit, and
the arm64-only ring-with-bitmap mode (abi.md rules 64-67).

Mirrors Documentation/virt/kvm/api.rst 4.7 KVM_CREATE_VCPU, 4.40 KVM_SET_IDENTITY_MAP_ADDR,
section 5 (``kvm_run.immediate_exit``) and 7.36 (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)."""
from __future__ import annotations

import os

from .. import abi
from .._sys import KvmError, ioctl
from ..x86 import layout as L
from .checks_bitmap import LOG, SCRATCH_GPA, get_pages
from .registry import Skip, check, expect, expect_eq, expect_errno, expect_ok

MAIN = "virt/kvm/kvm_main.c"
IDENTITY_MAP_ADDR = 0xFFFBC000
TSS_ADDR = 0xFFFBD000
SENTINEL = 0xDEAD


def _create_vcpu_raw(vm, vcpu_id: int) -> int:
    """KVM_CREATE_VCPU without the Vcpu wrapper (a refused id must not be mmapped);
    closes any fd it gets back."""
    fd = ioctl(vm.fd, abi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
    if fd > 2:
        os.close(fd)
    return fd


@check("misc.vcpu.duplicate_id", 64, f"{MAIN} kvm_vm_ioctl_create_vcpu() "
       "(kvm_get_vcpu_by_id -> EEXIST); api.rst 4.7", fault="errno_swap")
def vcpu_duplicate_id(ctx):
    """KVM_CREATE_VCPU with an id that already exists is EEXIST"""
    vm = ctx.vm()
    vm.create_vcpu(0)
    expect_ok(lambda: vm.create_vcpu(1), "KVM_CREATE_VCPU(1) (control: a new id)")
    expect_errno(lambda: _create_vcpu_raw(vm, 0), "EEXIST", "KVM_CREATE_VCPU(0) a second time")
    expect_errno(lambda: _create_vcpu_raw(vm, 1), "EEXIST", "KVM_CREATE_VCPU(1) a second time")


@check("misc.vcpu.id_limit", 64, f"{MAIN} kvm_vm_ioctl_create_vcpu() (id >= "
       "KVM_MAX_VCPU_IDS); api.rst 4.7 (KVM_CREATE_VCPU, KVM_CAP_MAX_VCPU_ID)", fault="errno_swap")
def vcpu_id_limit(ctx):
    """KVM_CREATE_VCPU with id >= KVM_CAP_MAX_VCPU_ID is EINVAL; the id just below works"""
    vm = ctx.vm()
    max_id = vm.check_extension(abi.KVM_CAP_MAX_VCPU_ID) or \
        vm.check_extension(abi.KVM_CAP_MAX_VCPUS)
    ctx.diag(f"KVM_CAP_MAX_VCPU_ID = {max_id} (VM fd)")
    expect(max_id > 0, "KVM_CAP_MAX_VCPU_ID is positive", "> 0", max_id)
    expect_ok(lambda: vm.create_vcpu(max_id - 1), f"KVM_CREATE_VCPU({max_id - 1}) (the highest id)")
    expect_errno(lambda: _create_vcpu_raw(vm, max_id), "EINVAL", f"KVM_CREATE_VCPU({max_id})")
    expect_errno(lambda: _create_vcpu_raw(vm, 1 << 31), "EINVAL", "KVM_CREATE_VCPU(2^31)")


@check("misc.identity_map.after_vcpu", 65, "arch/x86/kvm/x86.c kvm_arch_vm_ioctl() "
       "KVM_SET_IDENTITY_MAP_ADDR (kvm->created_vcpus -> EINVAL); api.rst 4.40",
       fault="errno_swap")
def identity_map_after_vcpu(ctx):
    """KVM_SET_IDENTITY_MAP_ADDR is EINVAL once a vCPU exists (and works before)"""
    ctx.require_x86_always(abi.KVM_CAP_SET_IDENTITY_MAP_ADDR)
    vm = ctx.vm()
    expect_ok(lambda: vm.set_identity_map_addr(IDENTITY_MAP_ADDR),
              f"KVM_SET_IDENTITY_MAP_ADDR({IDENTITY_MAP_ADDR:#x}) before any vCPU (control)")
    vm.create_vcpu(0)
    expect_errno(lambda: vm.set_identity_map_addr(IDENTITY_MAP_ADDR), "EINVAL",
                 "KVM_SET_IDENTITY_MAP_ADDR after KVM_CREATE_VCPU")
    # KVM_SET_TSS_ADDR has no vCPU test in x86.c; what the vendor module does with it is
    # host behaviour, not ABI: report it, do not judge it.
    try:
        vm.set_tss_addr(TSS_ADDR)
        ctx.diag(f"KVM_SET_TSS_ADDR({TSS_ADDR:#x}) after a vCPU: 0 (abi.md rule 65 says 0 on "
                 "kvm_pvm; with VMX and unrestricted_guest it is 0 too)")
    except KvmError as e:
        ctx.diag(f"KVM_SET_TSS_ADDR({TSS_ADDR:#x}) after a vCPU: {e.errno_name} (abi.md rule 65 "
                 "recorded 0 on kvm_pvm; not ABI, so not judged)")


@check("misc.immediate_exit", 66, "arch/x86/kvm/x86.c kvm_arch_vcpu_ioctl_run() "
       "(!vcpu->wants_to_run -> -EINTR); api.rst 5 (immediate_exit), KVM_CAP_IMMEDIATE_EXIT",
       fault="errno_swap")
def immediate_exit(ctx):
    """immediate_exit = 1: KVM_RUN returns -1/EINTR at once, the guest does not run"""
    ctx.require_x86_always(abi.KVM_CAP_IMMEDIATE_EXIT)
    m = ctx.guest("    xor eax, eax\n    out 0xf4, al", pages=1)
    vcpu = m.states[0].vcpu
    run = vcpu.run_struct
    rip0 = vcpu.get_regs().rip
    run.exit_reason = SENTINEL
    run.immediate_exit = 1
    expect_errno(lambda: ioctl(vcpu.fd, abi.KVM_RUN, 0, "KVM_RUN"), "EINTR",
                 "KVM_RUN with immediate_exit = 1")
    reason = run.exit_reason
    rip1 = vcpu.get_regs().rip
    run.immediate_exit = 0
    # api.rst 5 gives exit_reason a meaning only when KVM_RUN returns 0: what it holds after
    # the EINTR is reported, not judged (x86 leaves it; a kernel may set KVM_EXIT_INTR)
    ctx.diag(f"kvm_run.exit_reason after the EINTR: {reason:#x} (written as {SENTINEL:#x} "
             f"before the call{'; left as it was' if reason == SENTINEL else ''})")
    expect_eq(rip1, rip0, "RIP after the EINTR (the guest did not run)")
    # control: without immediate_exit the same vCPU runs and exit_reason is written
    ioctl(vcpu.fd, abi.KVM_RUN, 0, "KVM_RUN")
    expect_eq((run.exit_reason, run.io.port), (abi.KVM_EXIT_IO, L.PORT_EXIT),
              "KVM_RUN with immediate_exit = 0 (control): exit_reason, port")


@check("misc.ring_with_bitmap", 67, f"{MAIN} kvm_vm_ioctl_enable_cap_generic() "
       "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, kvm_use_dirty_bitmap(); api.rst 7.36",
       fault="fake_success")
def ring_with_bitmap(ctx):
    """RING_WITH_BITMAP (arm64): needs the ring, flags 0 and no memslots; then GET works"""
    cap = abi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
    if ctx.cap(cap) <= 0:
        raise Skip(f"KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is 0 on this {os.uname().machine} "
                   "kernel: the mode exists only with CONFIG_NEED_KVM_DIRTY_RING_WITH_BITMAP "
                   "(arm64); x86 logs everything in the ring")
    vm = ctx.vm()
    expect_errno(lambda: vm.enable_cap(cap, 0), "EINVAL", "ENABLE_CAP(225) before the ring")
    ctx.enable_ring(vm)
    expect_errno(lambda: vm.enable_cap(cap, 0, flags=1), "EINVAL", "ENABLE_CAP(225), flags 1")
    expect_ok(lambda: vm.enable_cap(cap, 0), "ENABLE_CAP(225) with the ring, no memslots")
    vm.add_memory(1, SCRATCH_GPA, 64 * 4096, LOG)
    expect_eq(get_pages(vm, 1, 64), [], "KVM_GET_DIRTY_LOG with ring + bitmap (not ENXIO)")
    vm2 = ctx.vm()
    ctx.enable_ring(vm2)
    vm2.add_memory(1, SCRATCH_GPA, 64 * 4096, LOG)
    expect_errno(lambda: vm2.enable_cap(cap, 0), "EINVAL",
                 "ENABLE_CAP(225) once a memslot exists")
