"""The Python API misused as a script might: a refused argument leaves the object usable,
wrong types are named, a closed Machine says so, start()'s timeout holds without wait()."""
import gc
import os
import signal
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


def _vm_call(call):
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 0, 0x2000, abi.KVM_MEM_LOG_DIRTY_PAGES)
        call(vm)


@pytest.mark.parametrize("call,text", [
    # Python's own errors from inside: "'<=' not supported between instances of 'int' and
    # 'str'", "'float' object cannot be interpreted as an integer" (ctypes); slot_for(0.5)
    # found slot 0, a slot True was asked of KVM (ENOENT "slot True does not exist")
    (lambda vm: vm.slot_for("0"), "gpa must be an int, not str"),
    (lambda vm: vm.slot_for(0.5), "gpa must be an int, not float"),
    (lambda vm: vm.get_dirty_log("0", 0), "KVM_GET_DIRTY_LOG: slot must be an int, not str"),
    (lambda vm: vm.get_dirty_log(0.0, 0), "KVM_GET_DIRTY_LOG: slot must be an int, not float"),
    (lambda vm: vm.get_dirty_log(True, 0), "KVM_GET_DIRTY_LOG: slot must be an int, not bool"),
    (lambda vm: vm.clear_dirty_log("0", 0, 64, 0),
     "KVM_CLEAR_DIRTY_LOG: slot must be an int, not str"),
    (lambda vm: vm.clear_dirty_log(0, 0.0, 64, 0),
     "KVM_CLEAR_DIRTY_LOG: first_page must be an int, not float"),
    (lambda vm: vm.add_memory("1", 0x10000, 0x1000), "slot must be an int, not str"),
    (lambda vm: vm.add_memory(True, 0x10000, 0x1000), "slot must be an int, not bool"),
    (lambda vm: vm.remove_memory("0"), "slot must be an int, not str"),
    (lambda vm: vm.check_extension(True), "KVM_CHECK_EXTENSION: the argument must be an int, "
                                          "not bool"),
    (lambda vm: vm.enable_cap(True), "KVM_ENABLE_CAP: cap must be an int, not bool"),
    (lambda vm: vm.kvm.caps("KVM_CAP_NR_VCPUS"),
     "names must be a list of KVM_CAP_* names, not str"),
    (lambda vm: vm.create_vcpu(0).set_run_signals([1.5]),
     "signals must hold signal numbers (ints, or signal.Signals), not float"),
    (lambda vm: vm.create_vcpu(0).set_run_signals([True]),
     "signals must hold signal numbers (ints, or signal.Signals), not bool"),
    (lambda vm: vm.create_vcpu(0).set_run_signals(10),
     "signals must be a list of signal numbers or None, not int"),
    (lambda vm: vm.create_vcpu(0).set_guest_debug("1"),
     "KVM_SET_GUEST_DEBUG: control must be an int, not str"),
    (lambda vm: vm.create_vcpu(0).set_guest_debug(True),
     "KVM_SET_GUEST_DEBUG: control must be an int, not bool"),
])
def test_low_level_wrong_types_are_type_errors_that_name_the_argument(call, text):
    with pytest.raises(TypeError) as info:
        _vm_call(call)
    assert str(info.value) == text


def test_capabilities_and_cpuid_entries_are_checked_before_they_are_asked():
    with Kvm() as kvm:
        # an AttributeError from minivmm.abi; another constant was asked as a capability
        for bad in ("X", "KVM_RUN", 5):
            with pytest.raises(ValueError, match=rf"^names: no capability named {bad!r}"):
                kvm.caps([bad])
        assert kvm.caps(["KVM_CAP_NR_VCPUS"]) == {
            "KVM_CAP_NR_VCPUS": kvm.check_extension(abi.KVM_CAP_NR_VCPUS)}
        # ctypes' "Array length must be >= 0, not -1"; a bool was 1 entry (E2BIG)
        with pytest.raises(ValueError, match=r"^max_entries must be between 1 and 4294967295 "
                                             r"\(got -1\)$"):
            kvm.get_supported_cpuid(-1)
        with pytest.raises(TypeError, match="^max_entries must be an int, not bool$"):
            kvm.get_supported_cpuid(True)
        assert kvm.get_supported_cpuid().nent > 0


def test_a_run_signal_is_not_taken_as_its_int():
    # int(1.5) was signal 1 (SIGHUP let in during KVM_RUN); '10' was SIGUSR1
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        for bad in (1.5, "10"):
            with pytest.raises(TypeError):
                vcpu.set_run_signals([bad])
        vcpu.set_run_signals([signal.SIGUSR1, 12])      # Signals and ints still do
        vcpu.set_run_signals(None)


def test_elapsed_is_the_run_not_the_wait():
    # it was measured when wait() was called: a caller that waited late got a longer run
    with Machine(payload("hello_long")) as m:
        m.start(timeout=30)
        assert m.states[0].done.wait(30)
        time.sleep(1.0)
        result = m.wait()
    assert result.ok and result.elapsed_s < 0.9, result.elapsed_s
    with Machine(payload("spin")) as m:       # a timeout: until the vCPU was stopped
        result = m.run(timeout=0.3)
    assert 0.3 <= result.elapsed_s < 2, result.elapsed_s


@pytest.mark.parametrize("timeout", [float("inf"), 1e300])
def test_an_unbounded_timeout_leaves_no_traceback(timeout, monkeypatch):
    # the timeout's thread died in Event.wait(): "OverflowError: timestamp out of range for
    # platform time_t", a traceback on stderr
    died = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    with Machine(payload("spin")) as m:
        m.start(timeout=timeout)
        time.sleep(0.3)
        m.stop()
        assert m.wait().vcpus[0].end.reason == "stopped"
    assert not died, [d.exc_value for d in died]


@pytest.mark.parametrize("make,text", [
    # taken as given: verify="no" was true, and verified; regs=[...] an AttributeError on
    # .items(), before_vcpus=5 "'int' object is not callable" with the VM half made;
    # poll_interval_s True was 1 s, "0.01" a ValueError
    (lambda: DirtySession(payload("dirty_seq"), verify="no"),
     "verify must be True or False, not str"),
    (lambda: DirtySession(payload("dirty_seq"), manual_protect=1),
     "manual_protect must be True or False, not int"),
    (lambda: DirtySession(payload("dirty_seq"), poll_interval_s=True),
     "poll_interval_s must be a number of seconds, not bool"),
    (lambda: DirtySession(payload("dirty_seq"), poll_interval_s="0.01"),
     "poll_interval_s must be a number of seconds, not str"),
    # a ValueError ("collect must be sync or async, not None") for a wrong type
    (lambda: DirtySession(payload("dirty_seq"), collect=None),
     'collect must be "sync" or "async", not NoneType'),
    (lambda: DirtySession(payload("dirty_seq"), tracker=5),
     'tracker must be "ring", "bitmap" or a Tracker, not int'),
    (lambda: Machine(payload("hello_long"), regs=[("rax", 1)]),
     "regs must be a dict of register values or None, not list"),
    (lambda: Machine(payload("hello_long"), before_vcpus=5),
     "before_vcpus must be callable or None, not int"),
    (lambda: Machine(payload("hello_long"), on_vcpu="x"),
     "on_vcpu must be callable or None, not str"),
])
def test_session_and_machine_options_of_the_wrong_type_are_named(make, text):
    with pytest.raises(TypeError) as info:
        make()
    assert str(info.value) == text and info.value.argument == text.split()[0]


def test_an_image_path_is_a_path_not_a_file_descriptor():
    # open(5, "wb") wrote the image into fd 5, the vCPU's, and closed it: the run then
    # ended as kvm-error EBADF and close() raised
    with Machine(payload("hello_long")) as m:
        fd = m.states[0].vcpu.fd
        for bad in (fd, True):
            with pytest.raises(TypeError, match=r"^path must be a file path \(str or "
                                                rf"PathLike\), not {type(bad).__name__}$"):
                m.dump_image(bad)
        assert os.fstat(fd) and m.run(timeout=10).ok


def test_a_record_held_past_the_timeout_ends_the_session_there():
    # what the README says of iterate(): the timeout runs while a record is looked at;
    # the paused vCPUs end as `timeout` at it (start()'s watchdog), and run no further
    with DirtySession(payload("dirty_seq"), vcpus=2, pages=64, iterations=5,
                      ring_entries=small_ring()) as s:
        numbered = []
        for rec in s.iterate(timeout=0.5):
            if rec.iteration != "final":
                numbered.append(rec.iteration)
            if len(numbered) == 1:
                assert s.machine.states[0].done.wait(10), "the vCPUs ran past the timeout"
        assert numbered == [1]
        assert [st.end.reason for st in s.machine.states] == ["timeout", "timeout"]
