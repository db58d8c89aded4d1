"""The Python API misused as a script might: a refused argument leaves the object usable,
wrong types are named, a closed Machine says so, start()'s timeout holds without wait()."""
import gc
import os
import threading
import time

import pytest

from minivmm import DirtySession, Kvm, Machine, MachineError, abi
from minivmm.dirty.tracker import RingTracker
from tests.conftest import payload
from tests.kvm.conftest import small_ring


def _session(**kw):
    return DirtySession(payload("dirty_seq"), vcpus=2, pages=64, iterations=2,
                        ring_entries=small_ring(), **kw)


@pytest.mark.parametrize("bad,error", [(-1, MachineError), ("5", TypeError)])
def test_a_refused_timeout_does_not_spend_the_session(bad, error):
    # iterate() marked the session as run before start() checked the timeout: the next
    # call said "this DirtySession has already run; make a new one" though nothing ran
    with _session() as s:
        with pytest.raises(error, match="timeout"):
            s.run(timeout=bad)
        assert all(r.ok for r in s.run(timeout=30))


def test_a_closed_session_says_it_is_the_session():
    s = _session()
    s.close()
    with pytest.raises(MachineError, match="this DirtySession is closed"):
        s.run(timeout=5)           # was "this Machine is closed"


@pytest.mark.parametrize("value,name", [("4096", "str"), (4096.0, "float"),
                                        (True, "bool"), (None, "NoneType")])
def test_ring_entries_of_the_wrong_type_are_named(value, name):
    # were "'<=' not supported between instances of 'str' and 'int'", "unsupported
    # operand type(s) for &", and True taken as a ring of 1 entry ("too small")
    with pytest.raises(TypeError) as info:
        DirtySession(payload("dirty_seq"), ring_entries=value)
    assert str(info.value) == f"ring_entries must be an int, not {name}"
    with pytest.raises(TypeError, match=f"ring size must be an int, not {name}"):
        with Machine(payload("dirty_seq"), before_vcpus=RingTracker(value).before_vcpus):
            pass


def test_a_session_given_a_wrong_kvm_names_it():
    # an AttributeError ('int' object has no attribute 'max_vcpus') where pages < vcpus
    with pytest.raises(TypeError, match="kvm must be a minivmm Kvm or None, not int"):
        DirtySession(payload("dirty_seq"), vcpus=4, pages=2, kvm=1)


def test_a_closed_machine_says_so_when_asked_about_an_instruction():
    m = Machine(payload("hello_long"))
    st = m.states[0]
    m.close()
    # were AttributeError: 'NoneType' object has no attribute 'slot_for'
    for use in (lambda: m.describe_instruction(st, 0x10000),
                lambda: m.executed(st, 0x10000), lambda: m.guest_bytes(st, 0x10000, 4)):
        with pytest.raises(MachineError, match="this Machine is closed"):
            use()


def test_identity_map_address_and_debug_registers_are_not_cut_to_64_bits():
    # ctypes kept the low 64 bits: 2**64 + a set address a, a breakpoint at a
    with Kvm() as kvm, kvm.create_vm() as vm:
        big = (1 << 64) + 0xFEFFC000
        with pytest.raises(ValueError, match=f"addr {big} does not fit in 64 bits"):
            vm.set_identity_map_addr(big)
        with pytest.raises(ValueError, match="addr -8192 does not fit in 64 bits"):
            vm.set_identity_map_addr(-0x2000)
        vcpu = vm.create_vcpu(0)
        with pytest.raises(ValueError, match=rf"debugreg\[0\] {(1 << 64) + 0x10000} does"):
            vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP,
                                 [(1 << 64) + 0x10000])
        with pytest.raises(TypeError, match=r"debugreg\[1\] must be an int, not str"):
            vcpu.set_guest_debug(0, [0, "0x10000"])


def test_the_timeout_given_to_start_holds_without_wait():
    # It was enforced by wait() alone: a looping guest ran on past it until wait() was
    # called, and for ever in a Machine dropped after start() (its thread and fds too)
    with Machine(payload("spin")) as m:
        m.start(timeout=0.3)
        assert m.states[0].done.wait(10), "the vCPU ran past its timeout"
        assert m.wait().vcpus[0].end.reason == "timeout"
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()

    def drop():
        Machine(payload("spin")).start(timeout=0.2)
    drop()
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_run_that_ends_before_its_timeout_leaves_no_thread_behind():
    threads = threading.active_count()
    with Machine(payload("hello_long")) as m:
        assert m.run(timeout=60).ok
    assert threading.active_count() == threads      # the timeout's thread is gone too
