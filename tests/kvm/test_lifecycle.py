"""File descriptors and mappings are released deterministically."""
import gc
import os

import pytest

from minivmm import Kvm, KvmError
from minivmm.machine import Machine, MachineError
from tests.conftest import payload


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _maps():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_thousand_vms_leak_nothing():
    with Kvm() as kvm:
        for _ in range(20):           # warm-up: lazy imports and caches settle
            with kvm.create_vm() as vm:
                vm.add_memory(0, 0, 0x10000)
                vm.create_vcpu(0)
        fds, maps = _fds(), _maps()
        for _ in range(1000):
            with kvm.create_vm() as vm:
                vm.add_memory(0, 0, 0x10000)
                vcpu = vm.create_vcpu(0)
                assert vcpu.run_struct.exit_reason == 0
        assert _fds() == fds
        assert _maps() == maps


def _kvm_maps():
    with open("/proc/self/maps") as f:
        return [line for line in f if "kvm" in line]


def test_machines_release_everything_even_after_a_failure():
    names = ("hello_long", "exception", "mmio")
    for name in names:                # warm-up: capstone, thread stacks, allocator arenas
        for _ in range(3):
            with Machine(payload(name)) as m:
                m.run(timeout=10)
    fds, maps = _fds(), _maps()
    for name in names:
        for _ in range(20):
            with Machine(payload(name)) as m:
                m.run(timeout=10)
                assert len(_kvm_maps()) == 1      # this machine's one kvm_run mapping
    assert _fds() == fds
    assert _kvm_maps() == []
    # Each machine maps two guest slots; a leak would add 120 lines here. glibc may
    # still add a malloc arena for a new vCPU thread (2 lines each), hence the slack.
    assert _maps() - maps <= 8


def test_kvm_closes_on_error_inside_with():
    fds = _fds()
    with pytest.raises(KvmError, match="KVM_CREATE_VCPU failed: EEXIST"):
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.create_vcpu(0)
            vm.create_vcpu(0)     # EEXIST
    assert _fds() == fds


def test_a_closed_vcpu_never_runs_the_vcpu_that_took_its_fd_number():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        old = vm.create_vcpu(0)
        number = old.fd
        vm.close()
        with Machine(payload("spin"), kvm=kvm) as m:
            new = m.states[0].vcpu
            assert number in (new.fd, new.vm.fd)       # the kernel reuses the lowest fd
            rip = new.get_regs().rip
            with pytest.raises(KvmError, match="KVM_RUN failed: EBADF.*vCPU 0 is closed"):
                old.run()
            with pytest.raises(KvmError, match="KVM_GET_REGS failed: EBADF.*been closed"):
                old.get_regs()
            assert new.get_regs().rip == rip          # nothing ran it
            old.close()                                # closing again is harmless


def test_a_closed_machine_says_so():
    m = Machine(payload("hello_long"))
    data = m.data
    m.close()
    for use in (m.run, lambda: m.data, lambda: m.system, lambda: m.dump_image("/dev/null")):
        with pytest.raises(MachineError, match="this Machine is closed"):
            use()
    with pytest.raises(ValueError, match="data is closed"):
        data.read(data.gpa, 8)


def test_a_second_close_with_a_view_alive_raises_the_same_clear_error():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        io = vcpu.run_struct.io
        for _ in range(2):
            with pytest.raises(BufferError, match="still alive"):
                vcpu.close()
        assert vcpu.fd == -1
        del io
        vcpu.close()
        vm.close()


def test_objects_dropped_without_close_give_their_fds_back():
    # The standard way is a with block; a forgotten close must still not leak
    with Kvm() as kvm:
        Machine(payload("spin"), kvm=kvm).close()     # warm-up
        fds = _fds()
        for _ in range(20):
            Machine(payload("spin"), kvm=kvm)
            kvm.create_vm().create_vcpu(0)
        gc.collect()
        assert _fds() == fds
    fds = _fds()
    Kvm()
    gc.collect()
    assert _fds() == fds


def test_dirty_sessions_release_rings_stages_and_bitmaps():
    # Each ring session maps a ring and a stage per vCPU; none may outlive the session.
    from minivmm.dirty.tracker import DirtySession

    def one(i):
        with DirtySession(payload("dirty_seq"), tracker="ring" if i % 2 else "bitmap",
                          vcpus=2, pages=256, iterations=2, ring_entries=256) as s:
            assert all(r.ok for r in s.run(timeout=30))
    for i in range(4):
        one(i)
    fds, maps = _fds(), _maps()
    for i in range(40):
        one(i)
    assert _fds() == fds
    # A leak would add at least one mapping per session (40); malloc may add an arena or
    # two for the vCPU threads, which is not one.
    assert _maps() - maps <= 4
    assert not _kvm_maps()
