"""What a check works with: fresh VMs, guests, ring and mmap access, diagnostics.

Not a kernel ABI mirror: test plumbing over the layers that are (minivmm.vm, vcpu, dirty.ring).

Every kernel access a check makes goes through the layers below (minivmm._sys.ioctl
and minivmm._sys.map_shared) or through the Ctx methods here, so that the fault
injector (faults.py) can stand between the check and the kernel.
"""
from __future__ import annotations

import dataclasses
import mmap as _mmap
import os
import signal
import struct
import threading

import numpy as np

from .. import _sys, abi
from ..dirty import harvest as _harvest
from ..dirty.ring import VcpuRing, enable_dirty_ring
from ..dirty.ringsize import ring_limits
from ..machine import KICK_SIGNAL, Machine
from ..payload import assemble_source
from .registry import Fail, Skip


@dataclasses.dataclass
class Event:
    kind: str            # sync | exit | ring-full | other | timeout | stopped
    value: int | None = None
    info: dict | None = None


class Ctx:
    """One check's resources; everything it opens is closed when the check ends."""

    def __init__(self, kvm, unsafe: bool = False):
        self.kvm, self.unsafe = kvm, unsafe
        self.diagnostics: list[str] = []
        self._closers: list = []

    # -- bookkeeping --
    def diag(self, text: str) -> None:
        self.diagnostics.append(text)

    def close(self) -> None:
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as e:   # a close failure is a finding, not a crash
                self.diag(f"cleanup: {type(e).__name__}: {e}")

    def on_close(self, fn) -> None:
        self._closers.append(fn)

    # -- capabilities --
    def cap(self, cap: int) -> int:
        return self.kvm.check_extension(cap)

    def ring_cap(self) -> int:
        """The dirty-ring capability to use (ACQ_REL preferred), or Skip."""
        if self.cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0:
            return abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        if self.cap(abi.KVM_CAP_DIRTY_LOG_RING) > 0:
            return abi.KVM_CAP_DIRTY_LOG_RING
        raise Skip("the kernel offers no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)")

    def require(self, cap: int, name: str | None = None) -> int:
        value = self.cap(cap)
        if value <= 0:
            raise Skip(f"{name or abi.CAP_NAMES.get(cap, cap)} is not offered by this kernel")
        return value

    def require_x86_always(self, cap: int) -> int:
        """require(), but on x86 a 0 fails: arch/x86/kvm/x86.c kvm_vm_ioctl_check_extension()
        answers 1 for ``cap`` unconditionally, and a skip would hide the check it guards."""
        if os.uname().machine != "x86_64":
            return self.require(cap)
        value = self.cap(cap)
        if value <= 0:
            raise Fail(f"{abi.CAP_NAMES.get(cap, cap)} on x86, which answers it "
                       "unconditionally (kvm_vm_ioctl_check_extension())", 1, value)
        return value

    # -- VMs --
    def vm(self):
        """A fresh, empty VM."""
        vm = self.kvm.create_vm()
        self.on_close(vm.close)
        return vm

    def min_ring(self, wanted: int = 256) -> int:
        """Entries of a ring of at least ``wanted`` that this host accepts: KVM refuses less
        than its reserved entries rounded up to a power of two (1024 with Intel PML)."""
        return max(wanted, ring_limits(self.kvm)["min_entries"])

    def enable_ring(self, vm, entries: int | None = None) -> int:
        """KVM_ENABLE_CAP(ring) of ``entries`` (default: the host's smallest ring) on
        ``vm``; returns the capability used."""
        cap = self.ring_cap()
        vm.enable_cap(cap, (entries or self.min_ring()) * 16)
        return cap

    def guest(self, body: str, vcpus: int = 1, pages: int = 16, ring: int | None = None,
              data_flags: int = abi.KVM_MEM_LOG_DIRTY_PAGES, cpl: int = 3,
              regs: dict | None = None, before_vcpus=None) -> Machine:
        """A long-mode machine running ``body`` (Intel syntax) at CPL``cpl``.

        Slot 0 = system (not logged), slot 1 = data at 1 GiB (``pages``, flags
        ``data_flags``); ``ring`` entries per vCPU when given, mapped at vCPU creation.
        """
        # The guests are x86 code set up with x86-only ioctls (KVM_SET_SREGS, CPUID): on
        # arm64 those are EINVAL (arch/arm64/kvm/guest.c kvm_arch_vcpu_ioctl_set_sregs())
        # and KVM_RUN needs KVM_ARM_VCPU_INIT, so a correct kernel would fail the check
        if os.uname().machine != "x86_64":
            raise Skip(f"the check's guest is x86 code; this host is {os.uname().machine}")
        src = f";! mode: long\n;! cpl: {cpl}\n{body}\n"
        payload = assemble_source(src, "abi-check guest")
        rings = {}

        def before(m):
            if ring:
                cap = self.ring_cap()
                enable_dirty_ring(m.vm, ring, cap)
            if before_vcpus:
                before_vcpus(m)

        def on_vcpu(m, st):
            if ring:
                rings[st.index] = VcpuRing(st.vcpu, ring)

        m = Machine(payload, vcpus=vcpus, pages=pages, kvm=self.kvm, data_flags=data_flags,
                    before_vcpus=before, on_vcpu=on_vcpu, regs=regs)
        m.rings = rings
        self.on_close(m.close)
        return m

    def run_to_port(self, m: Machine, index: int = 0, timeout: float = 10.0) -> Event:
        """Run one vCPU in this thread until a sync (0xf0) or exit (0xf4) port, a ring-full
        exit or anything else. Console bytes are skipped. A watchdog stops a stuck guest."""
        st = m.states[index]
        vcpu, run, io = st.vcpu, st.vcpu.run_struct, st.vcpu.run_struct.io
        me = threading.get_ident()
        fired = []

        def kick():
            fired.append(True)
            run.immediate_exit = 1
            signal.pthread_kill(me, KICK_SIGNAL)

        dog = threading.Timer(timeout, kick)
        try:
            # Ctrl-C held back while it starts: one raised inside start() (waiting for the
            # new thread) skipped the cancel below, and the process, interrupted, waited
            # at exit for this non-daemon timer to fire (10 s after `minivmm abi-check`)
            with _sys.fd_creation():
                dog.start()
            while True:
                reason = vcpu.run()
                if reason == abi.KVM_EXIT_IO and io.direction == abi.KVM_EXIT_IO_OUT:
                    if io.port in (0xE9, 0x3F8):
                        continue
                    value = int.from_bytes(vcpu.io_data()[:io.size], "little")
                    if io.port == 0xF0:
                        return Event("sync", value)
                    if io.port == 0xF4:
                        return Event("exit", value)
                if reason == abi.KVM_EXIT_DIRTY_RING_FULL:
                    return Event("ring-full")
                if reason == abi.KVM_EXIT_INTR and (fired or run.immediate_exit):
                    # the watchdog's kick, or another thread's (a check stopping this vCPU
                    # at Ctrl-C): immediate_exit, left set, made every KVM_RUN return EINTR
                    # at once, and this loop spun until the watchdog fired
                    run.immediate_exit = 0
                    return Event("timeout" if fired else "stopped",
                                 info={"rip": vcpu.get_regs().rip})
                if reason == abi.KVM_EXIT_INTR:
                    continue
                return Event("other", reason, vcpu.describe_exit(reason))
        finally:
            dog.cancel()
            if dog.ident is not None:   # not if Ctrl-C came before the block let it start
                dog.join()    # the timer thread holds the kvm_run view until it is over

    def expect_event(self, ev: Event, kind: str, what: str, value=None) -> None:
        if ev.kind != kind or (value is not None and ev.value != value):
            raise Fail(what, f"{kind}{'' if value is None else ' ' + str(value)}",
                       f"{ev.kind} {ev.value if ev.value is not None else ''}"
                       f"{' ' + str(ev.info) if ev.info else ''}".strip())

    # -- the ring, as a check sees it --
    def ring_entries(self, ring: VcpuRing, start: int = 0, count: int | None = None) -> list:
        """Raw (flags, slot, offset) of ring positions start.. (no harvesting)."""
        count = ring.entries if count is None else count
        out = []
        for i in range(start, start + count):
            out.append(struct.unpack_from("<IIQ", ring.map, (i % ring.entries) * 16))
        return out

    def harvest(self, ring: VcpuRing):
        """Harvest one ring (fetch index onwards, mark RESET): (slots, offsets) arrays."""
        r = _harvest.harvest(ring.map, ring.entries, ring.fetch)
        ring.fetch = r.fetch
        return r.slots.astype(np.int64), r.offsets.astype(np.int64)

    def set_flags(self, ring: VcpuRing, position: int, flags: int) -> None:
        struct.pack_into("<I", ring.map, (position % ring.entries) * 16, flags)

    def set_entry(self, ring: VcpuRing, position: int, slot: int, offset: int) -> None:
        struct.pack_into("<IQ", ring.map, (position % ring.entries) * 16 + 4, slot, offset)

    def mmap(self, fd: int, length: int, offset: int, flags: int = _mmap.MAP_SHARED,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE):
        """mmap a KVM fd; raises KvmError("mmap", errno) on failure (like _sys.map_shared)."""
        try:
            m = _sys.mmap(fd, length, flags, prot, offset)     # traced under --trace-ioctls
        except OSError as e:
            raise _sys.KvmError("mmap", e.errno or 0) from None
        self.on_close(lambda: _sys.munmap(m))
        return m

    def get_dirty_log(self, vm, slot: int, npages: int) -> np.ndarray:
        """KVM_GET_DIRTY_LOG into a fresh buffer of ALIGN(npages, 64) / 8 bytes."""
        words = np.zeros((npages + 63) // 64, np.uint64)
        vm.get_dirty_log(slot, words.ctypes.data)
        return words
