"""Vcpu: a vCPU file descriptor and its mmapped ``struct kvm_run``.

Mirrors the "vCPU ioctls" of Documentation/virt/kvm/api.rst section 4:
4.10 KVM_RUN, 4.11/4.12 KVM_GET/SET_REGS, 4.13/4.14 KVM_GET/SET_SREGS,
KVM_SET_CPUID2, 4.87 KVM_SET_GUEST_DEBUG, 4.33/4.34 KVM_GET/SET_DEBUGREGS;
and section 5, "The kvm_run structure" (page 0 of the vCPU mapping; x86 page
layout in arch/x86/include/uapi/asm/kvm.h: PIO data at page 1, coalesced MMIO
at 2, dirty ring from page 64).
"""
from __future__ import annotations

import ctypes
import errno
import os

from . import _sys, abi
from ._args import named
from ._sys import KvmError, ioctl

_EINTR = errno.EINTR


def _closed(vcpu, call: str) -> KvmError:
    return KvmError(call, errno.EBADF, f"vCPU {vcpu.id} is closed")


class _Closed:
    """Stands for ``run_struct`` once the vCPU is closed (the instance's own attribute
    hides it until then, so the hot path pays nothing)."""

    def __get__(self, vcpu, owner=None):
        if vcpu is None:
            return self
        raise _closed(vcpu, "kvm_run")


class Vcpu(_sys.FdOwner):
    """A vCPU created by Vm.create_vcpu(); closed by its Vm."""

    run_struct = _Closed()

    def __init__(self, vm, fd: int, vcpu_id: int):
        self.vm, self.fd, self.id = vm, fd, vcpu_id
        self.map = None
        self.ring = None      # a minivmm.dirty.ring.VcpuRing once the ring is mapped
        try:
            # KVM_GET_VCPU_MMAP_SIZE bytes at offset 0 (api.rst 4.5, 4.10)
            self.map = _sys.map_shared(fd, vm.vcpu_mmap_size, 0, "mmap(kvm_run)",
                                       what="struct kvm_run")
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise
        self._close_fd = _sys.own_fd(self, fd)
        self.run_struct = abi.kvm_run.from_buffer(self.map)
        assert abi.KVM_RUN < 2 ** 31     # _sys._ioctl_fast passes it as a C int
        self._run_args = (fd, abi.KVM_RUN, None)

    def close(self) -> None:
        held = None
        if self.ring is not None:
            try:
                self.ring.close()
                self.ring = None
            except BufferError as e:
                # a view of the ring: the kvm_run page and the fd still go, as with a
                # view of kvm_run; close() again once the view is gone unmaps the ring
                held = e
        try:
            self._close_run()
        except BufferError:
            if held is None:
                raise
        if held is not None:
            raise held

    def _close_run(self) -> None:
        """Unmap kvm_run and close the fd (the fd even while a view holds the page)."""
        if self.map is not None:
            if "run_struct" in self.__dict__:
                del self.run_struct
            try:
                _sys.munmap(self.map, "struct kvm_run")
            except BufferError:
                # still close the fd; the mapping (and the duplicate fd mmap keeps)
                # goes at a close() after the last view is gone
                if self.fd >= 0:
                    self._close_fd()
                    self.fd = -1
                raise BufferError(f"vCPU {self.id}: a view of its kvm_run page (e.g. "
                                  "run_struct.io) is still alive; delete it before closing"
                                  ) from None
            self.map = None
        if self.fd >= 0:
            self._close_fd()
            self.fd = -1

    # -- KVM_RUN: the hot path, kept lean --
    def run(self) -> int:
        """KVM_RUN: enter the guest until it exits; return kvm_run.exit_reason.

        Returns KVM_EXIT_INTR when the call was interrupted (EINTR): then the
        kernel may not have written exit_reason, so it is not read (host-probes.md 3).
        """
        if self.fd < 0:     # never reach an fd number that may now be another vCPU's
            raise _closed(self, "KVM_RUN")
        if _sys.tracer is not None:
            try:   # hand the tracer our kvm_run so it can name the exit
                _sys.tracer(self.fd, abi.KVM_RUN, 0, "KVM_RUN", _RUN_HINTS, run=self.run_struct)
            except KvmError as e:
                if e.errno == _EINTR:
                    return abi.KVM_EXIT_INTR
                # without the tracer's frames: they hold run_struct, so an exception kept
                # while the VM closes (a `with Machine` left by it) would pin the kvm_run
                # page and close() would raise BufferError in the KvmError's place
                raise e.with_traceback(None)
            return self.run_struct.exit_reason
        if _sys._ioctl_fast(*self._run_args) < 0:
            err = ctypes.get_errno()
            if err == _EINTR:
                return abi.KVM_EXIT_INTR
            raise _sys.failure(self.fd, "KVM_RUN", err, _RUN_HINTS)
        return self.run_struct.exit_reason

    # -- registers --
    def get_regs(self) -> abi.kvm_regs:
        """KVM_GET_REGS (api.rst 4.11)."""
        regs = abi.kvm_regs()
        ioctl(self.fd, abi.KVM_GET_REGS, ctypes.addressof(regs), "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        """KVM_SET_REGS (api.rst 4.12)."""
        ioctl(self.fd, abi.KVM_SET_REGS, _address(regs, abi.kvm_regs), "KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        """KVM_GET_SREGS (api.rst 4.13)."""
        sregs = abi.kvm_sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, ctypes.addressof(sregs), "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        """KVM_SET_SREGS (api.rst 4.14)."""
        ioctl(self.fd, abi.KVM_SET_SREGS, _address(sregs, abi.kvm_sregs), "KVM_SET_SREGS",
              {errno.EINVAL: "inconsistent control registers or segments (e.g. long mode "
                             "without the LM CPUID bit: call set_cpuid2 first)"})

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2: the CPUID the guest sees (api.rst, KVM_SET_CPUID2); needed for long mode."""
        if not hasattr(cpuid, "nent") or not isinstance(cpuid, ctypes.Structure):
            raise TypeError(f"set_cpuid2 needs a kvm_cpuid2, not {type(cpuid).__name__}")
        # The kernel reads nent entries from here: more than the buffer holds would hand
        # it the heap (as _address() guards set_regs and set_sregs)
        room = (ctypes.sizeof(cpuid) - 8) // ctypes.sizeof(abi.kvm_cpuid_entry2)
        if not 0 <= cpuid.nent <= room:
            raise ValueError(f"set_cpuid2: nent is {cpuid.nent} but the buffer holds {room} "
                             "entries (make it with abi.cpuid2_type(n))")
        ioctl(self.fd, abi.KVM_SET_CPUID2, ctypes.addressof(cpuid), "KVM_SET_CPUID2")

    def set_run_signals(self, signals) -> None:
        """KVM_SET_SIGNAL_MASK (api.rst 4.21): during KVM_RUN only ``signals`` are let in;
        any of them pending makes KVM_RUN return EINTR. A thread that blocks them outside
        KVM_RUN must then take the pending one itself (sigtimedwait): KVM does not deliver
        a signal the thread's own mask blocks. ``None``: no mask of its own again (the
        calling thread's applies; the setting belongs to the vCPU, not to a thread)."""
        if signals is None:
            ioctl(self.fd, abi.KVM_SET_SIGNAL_MASK, 0, "KVM_SET_SIGNAL_MASK")
            return
        if isinstance(signals, (str, bytes)) or not hasattr(signals, "__iter__"):
            raise named(TypeError("signals must be a list of signal numbers or None, not "
                                  f"{type(signals).__name__}"), "signals")
        blocked = (1 << 64) - 1
        for sig in signals:
            # int() took 1.5 as signal 1 and '10' as 10, and True is no signal number
            if isinstance(sig, bool) or not isinstance(sig, int):
                raise named(TypeError("signals must hold signal numbers (ints, or "
                                      f"signal.Signals), not {type(sig).__name__}"), "signals")
            if not 1 <= int(sig) <= 64:        # a larger one was silently dropped
                raise ValueError(f"KVM_SET_SIGNAL_MASK: no signal {sig} (1-64)")
            blocked &= ~(1 << (int(sig) - 1))
        arg = (ctypes.c_uint8 * 12)()             # struct kvm_signal_mask, len 8, sigset
        ctypes.memmove(arg, (8).to_bytes(4, "little") + blocked.to_bytes(8, "little"), 12)
        ioctl(self.fd, abi.KVM_SET_SIGNAL_MASK, ctypes.addressof(arg), "KVM_SET_SIGNAL_MASK")

    def set_guest_debug(self, control: int, debugreg=None) -> None:
        """KVM_SET_GUEST_DEBUG: single-step and breakpoints (api.rst 4.87)."""
        _sys.check_width("KVM_SET_GUEST_DEBUG", [("control", control, 32)])   # a u32 field
        dbg = abi.kvm_guest_debug(control=control)
        if len(debugreg or ()) > len(dbg.arch.debugreg):
            raise ValueError(f"at most {len(dbg.arch.debugreg)} debug registers (DR0-DR7)")
        # u64s: ctypes would keep the low bits (a breakpoint at 2**64 + a would be at a)
        _sys.check_width("KVM_SET_GUEST_DEBUG", [(f"debugreg[{i}]", value, 64)
                                             for i, value in enumerate(debugreg or ())])
        for i, value in enumerate(debugreg or ()):
            dbg.arch.debugreg[i] = value
        ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, ctypes.addressof(dbg), "KVM_SET_GUEST_DEBUG")

    def get_debugregs(self) -> abi.kvm_debugregs:
        """KVM_GET_DEBUGREGS (api.rst 4.33, KVM_CAP_DEBUGREGS): the guest's own DR0-DR3,
        DR6 and DR7, not the host's guest-debug ones. A vCPU ioctl (arch/x86/kvm/x86.c
        kvm_arch_vcpu_ioctl; older copies of api.rst called it a vm ioctl). EINVAL: the
        guest's state is protected (SEV-ES, TDX)."""
        regs = abi.kvm_debugregs()
        ioctl(self.fd, abi.KVM_GET_DEBUGREGS, ctypes.addressof(regs), "KVM_GET_DEBUGREGS")
        return regs

    def set_debugregs(self, regs: abi.kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS (api.rst 4.34). EINVAL: flags not 0, or DR6/DR7 with bits
        set above bit 31."""
        ioctl(self.fd, abi.KVM_SET_DEBUGREGS, _address(regs, abi.kvm_debugregs),
              "KVM_SET_DEBUGREGS")

    # -- reading an exit --
    def _io_exit(self, call: str) -> tuple:
        """(direction, port, bytes, data_offset) of the current IO exit, as plain ints: a
        view kept in a raising frame would pin the kvm_run page past the VM's close."""
        # Outside an IO exit the union holds another exit's fields (data_offset 0 before
        # the first run): bytes written there would land on kvm_run itself
        reason = self.run_struct.exit_reason
        if reason != abi.KVM_EXIT_IO:
            name = abi.EXIT_NAMES.get(reason, str(reason))
            if reason == abi.KVM_EXIT_UNKNOWN:
                name += ", or it has not run yet"
            raise ValueError(f"{call}: the vCPU is not at an IO exit: its last exit is {name}")
        io = self.run_struct.io
        return io.direction, io.port, io.size * io.count, io.data_offset

    def io_data(self) -> bytes:
        """The bytes of the current KVM_EXIT_IO (they live at kvm_run + io.data_offset)."""
        _, _, size, off = self._io_exit("io_data")
        return self.map[off:off + size]

    def set_io_data(self, data: bytes) -> None:
        """Answer an IN: KVM copies these bytes into the guest on the next KVM_RUN.
        Exactly io.size * io.count of them, at an IN exit only."""
        direction, port, size, off = self._io_exit("set_io_data")
        if direction != abi.KVM_EXIT_IO_IN:
            raise ValueError(f"set_io_data: the current exit is an OUT to port {port:#x}, "
                             "not an IN to answer")
        data = memoryview(data).cast("B")
        if len(data) != size:
            raise ValueError(f"set_io_data: this IN reads {size} byte(s), got {len(data)}")
        self.map[off:off + size] = data

    def describe_exit(self, reason: int | None = None) -> dict:
        """The current exit, decoded into plain values (for traces and reports)."""
        run = self.run_struct
        reason = run.exit_reason if reason is None else reason
        out: dict = {"reason": abi.EXIT_NAMES.get(reason, str(reason)), "exit_reason": reason}
        if reason == abi.KVM_EXIT_IO:
            io = run.io
            out.update(direction="out" if io.direction == abi.KVM_EXIT_IO_OUT else "in",
                       port=io.port, size=io.size, count=io.count)
            if io.direction == abi.KVM_EXIT_IO_OUT:
                out["data"] = int.from_bytes(self.io_data()[:io.size], "little")
        elif reason == abi.KVM_EXIT_MMIO:
            m = run.mmio
            out.update(phys_addr=m.phys_addr, len=m.len, is_write=bool(m.is_write))
            if m.is_write:
                out["data"] = int.from_bytes(bytes(m.data)[:m.len], "little")
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            f = run.fail_entry
            out.update(hardware_entry_failure_reason=f.hardware_entry_failure_reason, cpu=f.cpu,
                       meaning=entry_failure_meaning(f.hardware_entry_failure_reason))
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            i = run.internal
            out.update(suberror=i.suberror,
                       suberror_name=INTERNAL_ERROR_NAMES.get(i.suberror, "unknown"),
                       meaning=INTERNAL_ERROR_MEANINGS.get(
                           i.suberror, f"internal error suberror {i.suberror}"),
                       data=[i.data[k] for k in range(min(i.ndata, 16))])
            insn = emulation_failure_bytes(i.suberror, out["data"])
            if insn is not None:
                out["insn_bytes"] = insn
        elif reason == abi.KVM_EXIT_DEBUG:
            d = run.debug.arch
            out.update(exception=d.exception, pc=d.pc, dr6=d.dr6, dr7=d.dr7)
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            e = run.system_event
            out.update(type=e.type, data=[e.data[k] for k in range(min(e.ndata, 16))])
        return out


# KVM_EXIT_FAIL_ENTRY. VMX (vmx.c __vmx_handle_exit()) reports the full exit reason of a
# failed VM entry, bit 31 set over a basic exit reason (Intel SDM vol. 3, appendix C), or,
# when VMLAUNCH/VMRESUME itself failed, the VM-instruction error number (bit 31 clear).
# SVM (svm.c svm_handle_exit()) reports VMCB exit code SVM_EXIT_ERR (VMEXIT_INVALID, -1;
# a u32 in older kernels).
VMX_ENTRY_FAILURE = 1 << 31
VMX_ENTRY_FAILURES = {
    33: "VM-entry failure due to invalid guest state (set kvm_intel.dump_invalid_vmcs=1 "
        "and dmesg shows the VMCS at the next failure)",
    34: "VM-entry failure due to MSR loading (an entry in the VM-entry MSR-load list was "
        "refused)",
    41: "VM-entry failure due to a machine-check event during VM entry",
}
VMX_INSTRUCTION_ERRORS = {
    7: "VM entry with invalid control field(s)",
    8: "VM entry with invalid host-state field(s)",
    26: "VM entry with events blocked by MOV SS",
}
SVM_EXIT_ERR = (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)

# KVM_EXIT_INTERNAL_ERROR suberrors (include/uapi/linux/kvm.h); 4 is not in abi yet
INTERNAL_ERROR_NAMES = {
    abi.KVM_INTERNAL_ERROR_EMULATION: "KVM_INTERNAL_ERROR_EMULATION",
    abi.KVM_INTERNAL_ERROR_SIMUL_EX: "KVM_INTERNAL_ERROR_SIMUL_EX",
    abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "KVM_INTERNAL_ERROR_DELIVERY_EV",
    4: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
}
INTERNAL_ERROR_MEANINGS = {
    1: "KVM could not emulate an instruction",
    2: "an exception occurred while KVM was delivering another one (simultaneous exceptions)",
    3: "an event could not be delivered: the exit happened during event delivery (data: "
       "vectoring info, exit reason, exit qualification)",
    4: "the hardware exited with a reason KVM does not handle (data: the exit reason, then "
       "the host CPU)",
}


# KVM_INTERNAL_ERROR_EMULATION's data is struct emulation_failure (include/uapi/linux/
# kvm.h, an ABI since 5.14): data[0] flags; with this flag, data[1] and data[2] hold
# insn_size (a byte) and 15 instruction bytes
EMULATION_FLAG_INSTRUCTION_BYTES = 1


def emulation_failure_bytes(suberror: int, data: list) -> str | None:
    """The instruction bytes KVM could not emulate, as hex ("d9 00"), from an internal
    error's data; None where it gives none (another suberror, no flag: a fetch from
    outside memory, or a kernel before 5.14, whose ndata is 0)."""
    if suberror != abi.KVM_INTERNAL_ERROR_EMULATION or len(data) < 3 \
            or not data[0] & EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    raw = data[1].to_bytes(8, "little") + data[2].to_bytes(8, "little")
    return raw[1:1 + min(raw[0], 15)].hex(" ")


def entry_failure_meaning(reason: int) -> str:
    """One line for KVM_EXIT_FAIL_ENTRY's hardware_entry_failure_reason."""
    if reason in SVM_EXIT_ERR:
        return ("SVM VMRUN failed: invalid VMCB state (VMEXIT_INVALID; set "
                "kvm_amd.dump_invalid_vmcb=1 and dmesg shows the VMCB at the next failure)")
    if reason & VMX_ENTRY_FAILURE and reason < 1 << 32:
        basic = reason & 0xFFFF
        return VMX_ENTRY_FAILURES.get(
            basic, f"VMX VM-entry failure, basic exit reason {basic}")
    if reason in VMX_INSTRUCTION_ERRORS:
        return (f"VMX VMLAUNCH/VMRESUME failed, VM-instruction error {reason}: "
                f"{VMX_INSTRUCTION_ERRORS[reason]}")
    return f"unknown entry failure reason {reason:#x}"


_RUN_HINTS = {
    errno.EFAULT: "the guest touched host memory that is not mapped",
    errno.ENOEXEC: "the vCPU state is not runnable (were registers set?)",
    # EIO (another process's VM, or a dead one) has _sys.failure()'s hint, as every call
    # arch/x86/kvm/mmu/mmu.c make_mmu_pages_available(): the shadow MMU's page budget is
    # set from the memory slots (kvm_arch_commit_memory_region), 0 until the first one.
    # Seen on kvm_pvm in real and protected mode (long mode shuts down first: no CR3 page)
    errno.ENOSPC: "KVM's shadow MMU has no page to spare: its budget is 0 while the VM has "
                  "no memory slot (add memory before KVM_RUN; KVM_SET_NR_MMU_PAGES also sets "
                  "it)",
    # Two sources. The VM's first KVM_RUN starts its NX huge page recovery task (arch/x86/
    # kvm/mmu/mmu.c, kvm_mmu_start_lpage_recovery(), by call_once() from
    # kvm_mmu_post_init_vm(), the first call in kvm_arch_vcpu_ioctl_run(), so a failure is
    # tried again at the next KVM_RUN), whose vhost_task_create() error KVM_RUN returns:
    # copy_process()'s EAGAIN at the user's process limit or the cgroup's pids.max
    # (kernel/cgroup/pids.c pids_try_charge(): no exemption for root; measured). And
    # kvm_arch_vcpu_ioctl_run() (arch/x86/kvm/x86.c): a vCPU in KVM_MP_STATE_UNINITIALIZED
    # blocks and returns -EAGAIN when woken without a signal
    errno.EAGAIN: "one of: the VM's first KVM_RUN could not start KVM's "
                  "kvm-nx-lpage-recovery task (a process limit: the user's, ulimit -u, "
                  "which root is exempt from, or the cgroup's pids.max, which binds root "
                  "too); or the vCPU was waiting for INIT/SIPI "
                  "(KVM_MP_STATE_UNINITIALIZED: an application processor of a VM with an "
                  "in-kernel local APIC, KVM_CREATE_IRQCHIP) and an event woke it: check "
                  "KVM_GET_MP_STATE and run it again",
    # kvm_vcpu_ioctl() (virt/kvm/kvm_main.c) and kvm_arch_vcpu_ioctl_run() (arch/x86/kvm/x86.c)
    errno.EINVAL: "one of: KVM_RUN given an argument (it takes none); kvm_run.kvm_valid_regs "
                  "or kvm_dirty_regs with a bit beyond KVM_SYNC_X86_*; registers handed in "
                  "through kvm_dirty_regs that KVM refuses (KVM_CAP_SYNC_REGS, api.rst 5)",
}


def _address(struct, cls) -> int:
    # The kernel reads sizeof(cls) bytes from here: a smaller struct would hand it the heap
    if not isinstance(struct, cls):
        raise TypeError(f"expected {cls.__name__}, not {type(struct).__name__}")
    return ctypes.addressof(struct)
