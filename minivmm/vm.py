"""Vm: a VM file descriptor.

Mirrors the "VM ioctls" of Documentation/virt/kvm/api.rst section 4, one
method each: 4.7 KVM_CREATE_VCPU, 4.8 KVM_GET_DIRTY_LOG, 4.35
KVM_SET_USER_MEMORY_REGION, 4.37 KVM_ENABLE_CAP, 4.40
KVM_SET_IDENTITY_MAP_ADDR, 4.36 KVM_SET_TSS_ADDR, 4.117 KVM_CLEAR_DIRTY_LOG,
and KVM_RESET_DIRTY_RINGS (section 7.36 KVM_CAP_DIRTY_LOG_RING).
"""
from __future__ import annotations

import ctypes
import errno

from . import _sys, abi
from ._args import check_number
from ._sys import check_width, ioctl
from .memory import GuestMemory, _index

# Made once: the reset runs at every ring-full exit
_RESET_HINTS = {errno.EINVAL: "the dirty ring is not enabled on this VM"}

_RING_HINTS = {
    errno.EINVAL: "enable the dirty ring once, before the first KVM_CREATE_VCPU, with a "
                  "power-of-two size of at least one page (api.rst 7.36)",
    errno.E2BIG: "the ring is larger than KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING) allows"}


# kvm_set_memory_region(): the slot field's checks
_SLOT_RANGE = ("a slot id not below KVM_CAP_NR_MEMSLOTS or an address space (bits 16-31 of "
               "slot) not below KVM_CAP_MULTI_ADDRESS_SPACE (1 when it is 0)")

# kvm_get_dirty_log_protect() and kvm_get_dirty_log(): the slot field's checks
_GET_EINVAL = ("the slot id is not below KVM_CAP_NR_MEMSLOTS or its address space "
               "(bits 16-31) does not exist")

# kvm_clear_dirty_log_protect(): every EINVAL it returns, not only the alignment ones
# (a range past the slot's end was blamed on alignment, api.rst 4.117)
_CLEAR_EINVAL = ("first_page must be a multiple of 64, num_pages too unless the range ends "
                 "at the slot's last page, and [first_page, first_page + num_pages) must lie "
                 "inside the slot; or " + _GET_EINVAL)

# the u32 and u64 fields of the dirty-log structs: ctypes would keep their low bits
_U32, _U64 = 1 << 32, 1 << 64


class Vm(_sys.FdOwner):
    """A VM created by Kvm.create_vm(). Owns its vCPUs and the memory it was given."""

    def __init__(self, kvm, fd: int, vcpu_mmap_size: int):
        self.kvm = kvm
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size    # KVM_GET_VCPU_MMAP_SIZE (api.rst 4.5)
        self._close_fd = _sys.own_fd(self, fd)
        self.dirty_ring_bytes = 0   # per vCPU, once KVM_ENABLE_CAP(dirty ring) succeeded
        self.vcpus: list = []
        self.memory: dict[int, GuestMemory] = {}
        # add_memory()'s memory whose slot is gone (deleted by the raw call, or by
        # remove_memory() while a view held it): still the VM's to free at close()
        self._unslotted: list[GuestMemory] = []
        # every slot KVM holds, as set through set_user_memory_region(), whoever called it:
        # slot field (as_id << 16 | id) -> memory_size. A SlotBitmap is sized from it:
        # KVM writes the slot's whole bitmap, whatever buffer it is given
        self.slot_sizes: dict[int, int] = {}

    # -- lifecycle: vCPUs first, then the VM fd, then the memory behind it --
    def close(self) -> None:
        """Close vCPUs, the VM fd and the memory; if one part fails (a live view of a
        mapping), the rest is still closed and the first failure raised at the end.
        Delete the view and call close() again to release that part too."""
        errors = []

        def released(part) -> bool:
            try:
                part.close()
                return True
            except BufferError as e:
                errors.append(e)
                return False

        # A part a live view still holds stays listed, so that close() again, once the
        # view is gone, releases it (its mapping, and the vCPU fd's duplicate in it)
        self.vcpus[:] = [vcpu for vcpu in self.vcpus if not released(vcpu)]
        if self.fd >= 0:
            self._close_fd()
            self.fd = -1
        self.slot_sizes.clear()          # the VM is gone, and its slots with it
        held = {slot: mem for slot, mem in self.memory.items() if not released(mem)}
        self.memory.clear()
        self.memory.update(held)
        self._unslotted[:] = [mem for mem in self._unslotted if not released(mem)]
        if errors:
            raise errors[0]

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one method per ioctl --
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (api.rst 4.4, KVM_CAP_CHECK_EXTENSION_VM)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int,
                               host_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, move, change or (size 0) delete a slot."""
        check_width("KVM_SET_USER_MEMORY_REGION",
                    [("slot", slot, 32), ("flags", flags, 32), ("gpa", gpa, 64),
                     ("size", size, 64), ("host_addr", host_addr, 64)])
        region = abi.kvm_userspace_memory_region(slot, flags, gpa, size, host_addr)
        # kvm_set_memory_region(): deleting a slot that does not exist is EINVAL too
        einval = (f"slot {slot & 0xFFFF} of address space {slot >> 16} does not exist (size "
                  "0 deletes a slot), bad flags or an unaligned address, or " if not size else
                  "bad flags, unaligned address or size, over 2**31 - 1 pages, a live slot "
                  "resized or given another host address, an address beyond the guest's "
                  "physical address width, or ") + _SLOT_RANGE
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region),
              "KVM_SET_USER_MEMORY_REGION",
              {errno.EEXIST: "the range overlaps another slot",
               errno.EINVAL: einval,
               errno.EFAULT: "the host memory is not mapped"})
        self._slot_changed(slot, flags, gpa, size, host_addr)

    def _slot_changed(self, slot: int, flags: int, gpa: int, size: int, host_addr: int) -> None:
        """Keep vm.memory and slot_sizes true to KVM after a call that succeeded, the raw
        one too: a slot deleted by it stayed in vm.memory (remove_memory() then failed
        with EINVAL, so add_memory() could never have its id again), a flag toggled by it
        was not seen by the trackers, and a SlotBitmap of a slot re-created bigger
        overran its buffer."""
        mem = self.memory.get(slot)         # keys are ids of address space 0: the field
        if not size:
            self.slot_sizes.pop(slot, None)
            if mem is not None:
                del self.memory[slot]
                self._unslotted.append(mem)
            return
        self.slot_sizes[slot] = size
        if mem is not None:
            # KVM changes only the flags or the address of a live slot (api.rst 4.35)
            mem.flags, mem.gpa = flags, gpa
            return
        for i, mem in enumerate(self._unslotted):
            # add_memory()'s memory deleted, then registered again whole (to toggle
            # KVM_MEM_READONLY, which KVM changes only that way): it is a slot again
            if mem.map is not None and mem.host_addr == host_addr and mem.size == size \
                    and slot < 1 << 16:
                del self._unslotted[i]
                if mem.name == f"slot{mem.slot}":
                    mem.name = f"slot{slot}"
                mem.slot, mem.flags, mem.gpa = slot, flags, gpa
                self.memory[slot] = mem
                return

    def create_vcpu(self, vcpu_id: int):
        """KVM_CREATE_VCPU: a new vCPU with this id; maps its kvm_run page."""
        from .vcpu import Vcpu
        check_number("vcpu_id", vcpu_id)
        if vcpu_id < 0:
            raise ValueError(f"vCPU id {vcpu_id} is negative")
        with _sys.fd_creation():
            fd = ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU",
                       {errno.EEXIST: f"vCPU id {vcpu_id} already exists",
                        errno.EINVAL: f"vCPU id {vcpu_id} is above KVM's maximum"})
            vcpu = Vcpu(self, fd, vcpu_id)
            self.vcpus.append(vcpu)
        return vcpu

    def enable_cap(self, cap: int, *args: int, flags: int = 0, hints: dict | None = None) -> int:
        """KVM_ENABLE_CAP on the VM fd (api.rst 4.37)."""
        arg = abi.kvm_enable_cap()
        check_width("KVM_ENABLE_CAP", [("cap", cap, 32), ("flags", flags, 32)]
                    + [(f"args[{i}]", v, 64) for i, v in enumerate(args)])
        if len(args) > len(arg.args):
            raise ValueError(f"KVM_ENABLE_CAP takes at most {len(arg.args)} arguments, "
                             f"got {len(args)}")
        arg.cap, arg.flags = cap, flags
        for i, value in enumerate(args):
            arg.args[i] = value
        name = abi.CAP_NAMES.get(cap, str(cap))
        ring = cap in (abi.KVM_CAP_DIRTY_LOG_RING, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
        ret = ioctl(self.fd, abi.KVM_ENABLE_CAP, ctypes.addressof(arg),
                    f"KVM_ENABLE_CAP({name})", _RING_HINTS if ring and hints is None else hints)
        if ring:
            # what VcpuRing may map, no more: KVM takes args[0] as a u32 (abi.md rule 12)
            self.dirty_ring_bytes = args[0] & 0xFFFFFFFF
        return ret

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        """KVM_GET_DIRTY_LOG: copy the slot's dirty bitmap to bitmap_addr (api.rst 4.8)."""
        # cheap, at every collection; the class test first: a str failed the comparison
        # as Python's own TypeError, a float passed it and failed inside ctypes
        if not (slot.__class__ is int and bitmap_addr.__class__ is int
                and 0 <= slot < _U32 and 0 <= bitmap_addr < _U64):
            check_width("KVM_GET_DIRTY_LOG", [("slot", slot, 32),
                                              ("dirty_bitmap", bitmap_addr, 64)])
        arg = abi.kvm_dirty_log(slot=slot, dirty_bitmap=bitmap_addr)
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, ctypes.addressof(arg), "KVM_GET_DIRTY_LOG",
              {errno.EINVAL: _GET_EINVAL,
               errno.ENOENT: f"slot {slot} does not exist or does not log dirty pages",
               errno.ENXIO: "the dirty ring is enabled on this VM; the bitmap is not "
                            "available (api.rst 7.36)"})

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap_addr: int) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set (api.rst 4.117)."""
        if not (slot.__class__ is int and num_pages.__class__ is int
                and first_page.__class__ is int and bitmap_addr.__class__ is int
                and 0 <= slot < _U32 and 0 <= num_pages < _U32 and 0 <= first_page < _U64
                and 0 <= bitmap_addr < _U64):
            check_width("KVM_CLEAR_DIRTY_LOG",
                        [("slot", slot, 32), ("num_pages", num_pages, 32),
                         ("first_page", first_page, 64), ("dirty_bitmap", bitmap_addr, 64)])
        arg = abi.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                      dirty_bitmap=bitmap_addr)
        ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG, ctypes.addressof(arg), "KVM_CLEAR_DIRTY_LOG",
              {errno.EINVAL: _CLEAR_EINVAL,
               errno.ENOENT: f"slot {slot} does not exist or does not log dirty pages",
               errno.ENXIO: "the dirty ring is enabled on this VM"})

    def reset_dirty_rings(self, hold_signals: bool = True) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every harvested entry; returns how many (api.rst 7.36).

        Signals are held back during the call (``hold_signals``): one that arrives during
        the reset stops it part-way and, since v6.17, leaves up to 64 pages unprotected, so
        their next writes are not logged (_sys.ioctl_signals_held). Only abi-check turns
        this off, to observe it."""
        if hold_signals:
            return _sys.ioctl_signals_held(self.fd, abi.KVM_RESET_DIRTY_RINGS, 0,
                                           "KVM_RESET_DIRTY_RINGS", _RESET_HINTS)
        # signals let in to be observed: an EINTR is reported, not retried
        return ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS",
                     _RESET_HINTS, retry_eintr=False)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages VMX needs for real mode (api.rst 4.36); address by value."""
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page VMX needs (api.rst 4.40); a pointer to a u64."""
        check_width("KVM_SET_IDENTITY_MAP_ADDR", [("addr", addr, 64)])
        value = ctypes.c_uint64(addr)
        ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.addressof(value),
              "KVM_SET_IDENTITY_MAP_ADDR",
              {errno.EINVAL: "must be set before the first vCPU is created"})

    # -- conveniences --
    def add_memory(self, slot: int, gpa: int, size: int, flags: int = 0,
                   name: str = "") -> GuestMemory:
        """Map anonymous memory and register it as a slot. The VM owns and frees it."""
        check_number("slot", slot)      # not a '<=' TypeError, nor a slot True
        if not 0 <= slot < 1 << 16:     # the u32 slot's low half; the high half is as_id
            raise ValueError(f"slot {slot} is out of range (0..65535, at most "
                             "KVM_CAP_NR_MEMSLOTS of them)")
        if slot in self.memory:
            raise ValueError(f"slot {slot} already holds memory: remove it first "
                             "(remove_memory)")
        mem = GuestMemory(slot, gpa, size, flags, name)
        try:
            self.set_user_memory_region(slot, flags, gpa, size, mem.host_addr)
        except BaseException:
            mem.close()
            raise
        self.memory[slot] = mem
        return mem

    def remove_memory(self, slot: int) -> None:
        """Delete a slot add_memory() made (KVM_SET_USER_MEMORY_REGION, size 0) and free
        its memory; its id may then be given to add_memory() again. With the dirty ring,
        harvest and reset first: an entry carries only the slot's id, so one KVM pushed
        for this slot reads as the next one's of that id (KVM's reset, too, applies it to
        whatever slot has the id then: dirty_ring.c kvm_reset_dirty_gfn(); abi.md rule 63)."""
        check_number("slot", slot)      # a str '0' was "slot 0 holds no memory"
        mem = self.memory.get(slot)
        if mem is None:
            raise ValueError(f"slot {slot} holds no memory of add_memory()")
        self.set_user_memory_region(slot, 0, mem.gpa, 0, 0)    # moves it to _unslotted
        try:
            mem.close()
        except BufferError as e:
            # the slot is gone; the mapping stays the VM's until the view is
            raise BufferError(f"{e}; slot {slot} is deleted, and its memory is freed by its "
                              "close() or the VM's once the view is gone") from None
        self._unslotted.remove(mem)

    def slot_for(self, gpa: int) -> GuestMemory | None:
        """The slot add_memory() made that holds guest-physical address ``gpa``, or None."""
        gpa = _index("gpa", gpa)        # a float fell inside a slot, a str failed '<='
        for mem in self.memory.values():
            if mem.contains(gpa):
                return mem
        return None
