"""Memory slots changed through the raw KVM_SET_USER_MEMORY_REGION as well as through
add_memory()/remove_memory(): vm.memory, vm.slot_sizes, SlotBitmap and the trackers stay
true to what KVM holds (api.rst 4.35; abi.md rules 61-63)."""
import subprocess
import sys

import numpy as np
import pytest

from minivmm import DirtySession, Kvm, KvmError, abi
from minivmm.dirty.bitmap import SlotBitmap
from minivmm.memory import GuestMemory

LOG = abi.KVM_MEM_LOG_DIRTY_PAGES
GPA = 1 << 30


def test_a_slot_deleted_by_the_raw_call_leaves_vm_memory_and_its_id_is_reusable():
    # it stayed in vm.memory: slot_for found it, add_memory() of its id was refused
    # ("remove it first") and remove_memory() failed with EINVAL, for ever
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(1, GPA, 0x10000, LOG)
        vm.set_user_memory_region(1, 0, GPA, 0x10000, mem.host_addr)    # logging off
        assert mem.flags == 0 and vm.slot_sizes == {1: 0x10000}
        vm.set_user_memory_region(1, 0, GPA + 0x100000, 0x10000, mem.host_addr)   # moved
        assert vm.slot_for(GPA + 0x100000) is mem and vm.slot_for(GPA) is None
        vm.set_user_memory_region(1, 0, 0, 0, 0)                          # deleted
        assert vm.memory == {} and vm.slot_sizes == {} and vm.slot_for(GPA + 0x100000) is None
        with pytest.raises(ValueError, match="slot 1 holds no memory"):
            vm.remove_memory(1)
        again = vm.add_memory(1, GPA, 0x20000)
        vm.remove_memory(1)
        assert again.map is None
    assert mem.map is None                        # still the VM's: freed at its close()


def test_the_same_memory_registered_again_is_a_slot_of_vm_memory_again():
    # delete and create: the only way to toggle KVM_MEM_READONLY (abi.md rule 61)
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(1, GPA, 0x10000)
        vm.set_user_memory_region(1, 0, 0, 0, 0)
        vm.set_user_memory_region(3, abi.KVM_MEM_READONLY, GPA, 0x10000, mem.host_addr)
        assert vm.memory == {3: mem} and (mem.slot, mem.flags, mem.name) == \
            (3, abi.KVM_MEM_READONLY, "slot3")
        vm.remove_memory(3)
        assert mem.map is None and vm.memory == {} and vm.slot_sizes == {}


def test_remove_memory_under_a_view_deletes_the_slot_and_the_vm_frees_it_later():
    # the mapping was dropped from every record: vm.close() never unmapped it
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(1, GPA, 0x10000)
        view = np.frombuffer(mem.map, np.uint8)
        with pytest.raises(BufferError, match="slot 1 is deleted.*VM's once the view is gone"):
            vm.remove_memory(1)
        assert vm.memory == {} and vm.slot_sizes == {}
        vm.add_memory(1, GPA, 0x10000)            # the id is free again
        with pytest.raises(BufferError, match="still alive"):
            vm.close()
        assert mem.map is not None
        del view
        vm.close()
        assert mem.map is None


def test_a_hand_made_slot_bitmap_is_refused_once_its_slot_is_re_created_bigger():
    # Not add_memory()'s slot, so vm.memory did not know it: KVM wrote the 1 Mi-page
    # slot's 128 KiB bitmap into the 8-byte buffer (a segfault), in a child to be safe
    code = """
from minivmm import Kvm, abi
from minivmm.dirty.bitmap import SlotBitmap
from minivmm.memory import GuestMemory
LOG = abi.KVM_MEM_LOG_DIRTY_PAGES
with Kvm() as kvm, kvm.create_vm() as vm, GuestMemory(5, 1 << 30, 64 * 4096) as small, \\
        GuestMemory(5, 1 << 30, 1 << 32) as big:
    vm.set_user_memory_region(5, LOG, 1 << 30, small.size, small.host_addr)
    bm = SlotBitmap(vm, 5, 64)
    bm.collect(False)
    vm.set_user_memory_region(5, 0, 1 << 30, 0, 0)
    vm.set_user_memory_region(5, LOG, 1 << 30, big.size, big.host_addr)
    try:
        bm.collect(False)
    except ValueError as e:
        print(e)
    for _ in range(50):
        bytearray(1 << 16)
    vm.set_user_memory_region(5, 0, 1 << 30, 0, 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "slot 5 now holds 1048576 pages, not the 64" in out.stdout


def test_a_hand_made_slot_bitmap_must_match_its_slot_from_the_start():
    with Kvm() as kvm, kvm.create_vm() as vm, GuestMemory(5, GPA, 65 * 4096) as mem:
        vm.set_user_memory_region(5, LOG, GPA, mem.size, mem.host_addr)
        with pytest.raises(ValueError, match="slot 5 holds 65 pages, not 64"):
            SlotBitmap(vm, 5, 64)
        assert SlotBitmap(vm, 5, 65).collect(False)[1] == 0
        vm.set_user_memory_region(5, 0, GPA, 0, 0)


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
@pytest.mark.parametrize("change", ["replaced", "removed", "log-off"])
def test_a_tracked_slot_changed_mid_session_is_refused(tracker, change):
    # A replacement of the same size passed the size check: the content oracle then read
    # the old, closed mapping (CollectionError: TypeError), and ring entries of the old
    # slot would have been credited to the new one; a removal failed the same way
    with DirtySession("dirty_seq", tracker=tracker, vcpus=1, pages=64, iterations=3) as s:
        records = s.iterate(timeout=30)
        next(records)
        vm = s.machine.vm
        mem = vm.memory[1]
        if change == "log-off":
            vm.set_user_memory_region(1, 0, mem.gpa, mem.size, mem.host_addr)
        else:
            vm.remove_memory(1)
            if change == "replaced":
                vm.add_memory(1, mem.gpa, mem.size, LOG, "data")
        msg = "added or replaced" if change == "replaced" else "removed, replaced or stopped"
        with pytest.raises(ValueError, match=f"slot 1 \\(data\\) .*{msg}"):
            list(records)


@pytest.mark.parametrize("size,words", [
    (0, "slot 7 of address space 0 does not exist"),
    (1 << 43, "over 2\\*\\*31 - 1 pages"),
])
def test_set_user_memory_region_einval_names_the_cause(size, words):
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(KvmError, match=f"KVM_SET_USER_MEMORY_REGION.*EINVAL.*{words}"):
            vm.set_user_memory_region(7, 0, GPA if size else 0, size, 0x10000000 if size else 0)
        with pytest.raises(KvmError, match="EINVAL.*address space \\(bits 16-31"):
            vm.set_user_memory_region(1 << 16 | 7, 0, 0, 0, 0)
        assert vm.slot_sizes == {}
