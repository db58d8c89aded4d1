"""The per-vCPU dirty ring: enabling it, mapping it, harvesting it.

Mirrors Documentation/virt/kvm/api.rst 7.36 (KVM_CAP_DIRTY_LOG_RING and
KVM_CAP_DIRTY_LOG_RING_ACQ_REL), ``kvm_vm_ioctl_enable_dirty_log_ring()`` in
virt/kvm/kvm_main.c and the ring itself in virt/kvm/dirty_ring.c. The ring of
``struct kvm_dirty_gfn`` lives at page KVM_DIRTY_LOG_PAGE_OFFSET (64) of the
vCPU mapping (arch/x86/include/uapi/asm/kvm.h), mapped MAP_SHARED and writable
(abi.md rules 20-23). Harvesting itself is in harvest.py.
"""
from __future__ import annotations

import mmap

import numpy as np

from .. import _sys, abi
from .harvest import ENTRY_BYTES, HarvestResult, Stage, harvest
from .ringsize import ring_limits, validate_entries


class DirtyRingError(ValueError):
    """A dirty-ring request refused before (or by) the kernel, with the reason."""


def ring_capability(kvm, allow_acq_rel: bool = True, disabled: bool = False) -> int | None:
    """The capability to enable: ACQ_REL when offered (as the kernel selftests prefer), else
    the plain ring, else None. ``disabled`` pretends the kernel has neither (for tests)."""
    if disabled:
        return None
    if allow_acq_rel and kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0:
        return abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    if kvm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING) > 0:
        return abi.KVM_CAP_DIRTY_LOG_RING
    return None


def enable_dirty_ring(vm, entries: int, cap: int | None = None) -> int:
    """KVM_ENABLE_CAP(dirty ring) with ``entries`` per vCPU; returns the capability used.

    The size is validated first (power of two, within the host's limits), and a VM
    that already has vCPUs is refused here with the reason the kernel would not give.
    """
    if cap is None:
        cap = ring_capability(vm.kvm)
        if cap is None:
            raise DirtyRingError("this kernel offers no dirty ring (KVM_CAP_DIRTY_LOG_RING "
                                 "and KVM_CAP_DIRTY_LOG_RING_ACQ_REL are 0): use the bitmap")
    try:
        validate_entries(entries, ring_limits(vm.kvm))
    except ValueError as e:
        raise DirtyRingError(str(e)) from None
    if vm.vcpus:
        raise DirtyRingError("enable the dirty ring before creating vCPUs: this VM already has "
                             f"{len(vm.vcpus)} (KVM refuses with EINVAL, api.rst 7.36)")
    vm.enable_cap(cap, entries * ENTRY_BYTES)      # Vm.enable_cap names the likely causes
    return cap


RESET_CALLS = 16      # KVM_RESET_DIRTY_RINGS calls per reset at most, the first included


# Ring-full exits in a row that find nothing to harvest before the vCPU is stopped:
# the kernel's ring index no longer matches ours (the ring overflowed, abi.md 6).
EMPTY_FULL_LIMIT = 3


def overflow_reason() -> str:
    """Why a vCPU is stopped after EMPTY_FULL_LIMIT empty ring-full exits (tracker, stepper)."""
    return (f"{EMPTY_FULL_LIMIT} KVM_EXIT_DIRTY_RING_FULL exits in a row found no DIRTY "
            "entry at the VMM's fetch index: the ring overflowed (KVM pushed past its size; "
            "entries were overwritten and their pages are lost)")


def finish_reset(vm, got: int, harvested: int) -> tuple:
    """Call KVM_RESET_DIRTY_RINGS again until ``harvested`` entries are reset, after a first
    call that reset only ``got``; returns (total reset, calls made here).

    The kernel stops a reset part-way when the thread has a signal pending
    (kvm_dirty_ring_reset(), commit 49005a2a3d2a) and returns what it had reset, not
    EINTR. Vm.reset_dirty_rings() holds signals back, so this is rare (task work can still
    do it), but what is left must still be reset. A call that resets nothing means
    nothing is left; the caller reports the shortfall.
    """
    calls = 0
    while got < harvested and calls < RESET_CALLS - 1:
        more = vm.reset_dirty_rings()
        calls += 1
        if not more:
            break
        got += more
    return got, calls


class VcpuRing:
    """One vCPU's ring as the VMM sees it: the shared mapping and the VMM's fetch index.

    Created right after KVM_CREATE_VCPU, so no harvester ever sees a vCPU without it.
    """

    def __init__(self, vcpu, entries: int, stage_entries: int = 0):
        # Mapping more than the kernel allocated faults (SIGBUS) at the first access
        # past its ring, so the size must be the one KVM_ENABLE_CAP was given.
        have = vcpu.vm.dirty_ring_bytes // ENTRY_BYTES
        if have != entries:
            raise DirtyRingError(f"vCPU {vcpu.id}: " + (
                f"this VM's dirty ring has {have} entries, not {entries}" if have else
                "no dirty ring is enabled on this VM (enable_dirty_ring() before the vCPUs)"))
        if vcpu.ring is not None:
            raise DirtyRingError(f"vCPU {vcpu.id}: its ring is already mapped (vcpu.ring)")
        self.vcpu, self.entries = vcpu, entries
        self.fetch = 0                      # free-running u32, as the kernel's indices
        self.last_full = 0                  # the count taken at its last ring-full exit
        # KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE, ring bytes long (api.rst 7.36); the host
        # page size (selftests)
        offset = mmap.PAGESIZE * abi.KVM_DIRTY_LOG_PAGE_OFFSET
        # Populated: its pages are mapped now, not by faults inside the first harvest
        self.map = _sys.map_shared(vcpu.fd, entries * ENTRY_BYTES, offset, "mmap(dirty ring)",
                                   populate=True, what=f"dirty ring, {entries} entries")
        # Views made once: the bytes (copied out by harvest.take()) and the u32 words
        # (read by the bisection of harvest.dirty_count()); the tracker uses both.
        self.view = memoryview(self.map)
        self.words = self.view.cast("I")
        # Taken entries, until the tracker collects them: room for a lap at least, or
        # for what the caller expects between two collections (growing costs a copy)
        self.stage = Stage(max(entries, stage_entries))
        vcpu.ring = self                    # Vcpu.close() closes it

    def close(self) -> None:
        if self.map is not None:
            self.words.release()            # the views pin the mapping
            self.view.release()
            self.stage.close()
            try:
                _sys.munmap(self.map, f"dirty ring, {self.entries} entries")
            except BufferError:             # mmap's own words name no mapping
                raise BufferError(f"vCPU {self.vcpu.id}: a view of its dirty ring (a numpy "
                                  "array or memoryview of ring.map) is still alive; delete "
                                  "it before closing") from None
            self.map = None

    def _check_open(self) -> None:
        if self.map is None:   # harvest(None) was a TypeError about memoryview
            raise DirtyRingError(f"vCPU {self.vcpu.id}: its dirty ring is closed (Vcpu.close() "
                                 "or its VM's close() unmapped it)")

    def harvest(self) -> HarvestResult:
        """Take every DIRTY entry from the fetch index on and mark it RESET (api.rst 7.36)."""
        self._check_open()
        result = harvest(self.map, self.entries, self.fetch)
        self.fetch = result.fetch
        return result

    def flags(self):
        """Every entry's DIRTY and RESET bits (flags & 3, the only ones defined), a byte
        each, for the ring view (index = position in the ring): the view keeps three per
        vCPU per collection, and as u32 copies 100 iterations of 8 vCPUs took 600 MB."""
        self._check_open()
        return (np.frombuffer(self.map, dtype="<u4", count=self.entries * 4)[0::4]
                & 3).astype(np.uint8)
