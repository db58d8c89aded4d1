"""File descriptors and mappings are released deterministically."""
import errno
import gc
import os
import time

import pytest

from minivmm import Kvm, KvmError, KvmUnavailable, abi
from minivmm.machine import Machine, MachineError
from tests.conftest import in_child, payload
from tests.kvm.conftest import small_ring


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


def _kvm_fds():
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [link for link in fds if "kvm-v" in link]


def test_vm_close_again_once_the_view_is_gone_releases_what_it_held():
    # The first close() raised and forgot the vCPU and the memory: following its advice
    # (delete the view, close again) freed nothing while the objects lived; the mmap's
    # duplicate of the vCPU fd kept the VM alive in the kernel
    with Kvm() as kvm:
        vm = kvm.create_vm()
        mem = vm.add_memory(0, 0, 0x10000)
        vcpu = vm.create_vcpu(0)
        io, view = vcpu.run_struct.io, memoryview(mem.map)
        with pytest.raises(BufferError, match="still alive"):
            vm.close()
        assert vm.fd == -1 and vcpu.fd == -1
        del io, view
        vm.close()
        assert _kvm_fds() == [] and _kvm_maps() == []
        assert mem.map is None and vcpu.map is None


def test_a_view_of_a_dirty_ring_is_named_and_the_vcpu_fd_still_closed():
    # mmap's "cannot close exported pointers exist" named nothing, and the vCPU's fd and
    # kvm_run page stayed open, unlike with a view of kvm_run (test above)
    import numpy as np
    from minivmm.dirty.ring import DirtyRingError, VcpuRing, enable_dirty_ring
    entries = small_ring()
    with Kvm() as kvm:
        vm = kvm.create_vm()
        enable_dirty_ring(vm, entries)
        vcpu = vm.create_vcpu(0)
        ring = VcpuRing(vcpu, entries)
        view = np.frombuffer(ring.map, np.uint32)
        with pytest.raises(BufferError, match="vCPU 0: a view of its dirty ring"):
            vm.close()
        assert vm.fd == -1 and vcpu.fd == -1 and vcpu.map is None
        del view
        vm.close()
        assert _kvm_fds() == [] and _kvm_maps() == []
        # harvesting a closed ring says so (was a TypeError about memoryview)
        with pytest.raises(DirtyRingError, match="vCPU 0: its dirty ring is closed"):
            ring.harvest()


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
                          vcpus=2, pages=256, iterations=2, ring_entries=small_ring()) as s:
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


def test_stop_from_a_callback_on_the_vcpus_own_thread_returns():
    # It used to wait for its own thread to end: a hang the run timeout could not break
    with Machine(payload("hello_long")) as m:
        exits = []

        def trace(st, reason):
            exits.append(reason)
            if len(exits) == 2:
                m.stop("enough")
        m.trace = trace
        r = m.run(timeout=20)
    # the kick shows up as one more exit, KVM_EXIT_INTR, then the vCPU ends
    assert r.vcpus[0].end.reason == "enough" and exits[2:] == [abi.KVM_EXIT_INTR]


def test_stops_from_two_threads_at_once_do_not_race():
    import threading
    errors = []

    def stop(m):
        try:
            m.stop()
        except Exception as e:         # raised in the timer's thread: record it
            errors.append(e)
    for i in range(30):
        with Machine(payload("spin")) as m:
            m.start(timeout=10)
            timer = threading.Timer(0.002 * (i % 5), stop, (m,))
            timer.start()
            m.wait()                   # its own stop() at the end meets the timer's
            timer.join()
    assert errors == []


def test_a_close_from_another_thread_while_start_makes_the_threads(monkeypatch):
    # close() landed between two vCPU threads of start(): it stopped the threads made so
    # far, then released the kvm_run page of one that start() made next, still running:
    # BufferError, that vCPU ended as kvm-error (EBADF) and a second close() raised too
    import threading
    from minivmm import machine as machine_module
    errors, closers = [], []

    def close(m):
        try:
            m.close()
        except Exception as e:         # raised in the closer's thread: record it
            errors.append(e)

    class Thread(threading.Thread):
        def start(self):
            if self.name == "vcpu1":   # vCPU 0 runs; a close from elsewhere comes now
                closers.append(threading.Thread(target=close, args=(m,)))
                closers[-1].start()
                time.sleep(0.3)
            super().start()
    monkeypatch.setattr(machine_module.threading, "Thread", Thread)
    m = Machine(payload("spin"), vcpus=3)
    m.start(timeout=10)
    closers[0].join()
    m.close()
    assert errors == []
    assert [st.end.reason for st in m.states] == ["closed"] * 3
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu")]


def test_ctrl_c_just_after_an_fd_is_made_leaks_nothing(monkeypatch):
    # The interrupt lands right after the ioctl returns the new fd: it is held back
    # until the fd has an owner, which then closes it
    import signal
    from minivmm import kvm as kvm_mod
    from minivmm import vm as vm_mod
    with Kvm() as kvm:
        with kvm.create_vm() as vm:      # warm-up
            vm.create_vcpu(0)
        fds = _fds()
        for mod, make in ((kvm_mod, lambda: kvm.create_vm()),
                          (vm_mod, lambda: holder.append(kvm.create_vm()) or
                           holder[-1].create_vcpu(0))):
            holder = []
            real = mod.ioctl

            def interrupted(*a, **kw):
                fd = real(*a, **kw)
                os.kill(os.getpid(), signal.SIGINT)
                return fd
            monkeypatch.setattr(mod, "ioctl", interrupted)
            with pytest.raises(KeyboardInterrupt):
                make()
            monkeypatch.setattr(mod, "ioctl", real)
            for vm in holder:
                vm.close()
        gc.collect()
        assert _fds() == fds


def _ctrl_c(how: str, taker=None) -> None:
    """A Ctrl-C as it reaches a program with threads: _thread.interrupt_main(), or a
    SIGINT to the process that ``taker``, a thread started earlier (so not blocking it
    as the main thread does), takes: its Python handler then raises in the main thread."""
    import _thread
    import signal
    if how == "interrupt_main":
        _thread.interrupt_main()
    else:
        assert taker.is_alive()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["interrupt_main", "sigint-to-another-thread"])
def test_ctrl_c_just_after_a_vcpu_fd_is_made_leaks_nothing_with_threads(monkeypatch, how):
    # Blocking SIGINT in the main thread did not hold these back: each interrupted
    # create_vcpu leaked the vCPU fd (and with it the whole VM) for the process's life
    import threading
    from minivmm import vm as vm_mod
    real = vm_mod.ioctl
    done = threading.Event()
    taker = threading.Thread(target=done.wait, daemon=True)
    taker.start()
    with Kvm() as kvm:
        with kvm.create_vm() as vm:      # warm-up
            vm.create_vcpu(0)
        fds = _fds()
        for _ in range(5):
            with kvm.create_vm() as vm:
                def interrupted(*a, **kw):
                    fd = real(*a, **kw)
                    _ctrl_c(how, taker)
                    return fd
                monkeypatch.setattr(vm_mod, "ioctl", interrupted)
                with pytest.raises(KeyboardInterrupt):
                    vm.create_vcpu(0)
                monkeypatch.setattr(vm_mod, "ioctl", real)
                assert len(vm.vcpus) == 1     # owned before the interrupt was raised
        gc.collect()
        assert _fds() == fds
    done.set()


@pytest.mark.parametrize("thread", ["vcpu1", "reaper", "step-watchdog"])
def test_ctrl_c_as_a_thread_starts_is_one_keyboard_interrupt(monkeypatch, thread):
    # A Ctrl-C landing in Thread.start() before the thread ran left one that never would:
    # Machine.close() then waited for vCPU 1 for ever; DirtySession's and StepSession's
    # close() raised RuntimeError (cannot join thread before it is started) in its place
    import _thread
    import threading
    from tests.kvm.conftest import start_thread_named
    real = threading.Thread.start

    def start(self):
        if self.name == thread:
            _thread.interrupt_main()
        return real(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    fds, t0 = _fds(), time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        start_thread_named(thread)
    assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == thread]
    gc.collect()
    assert _fds() == fds


def test_a_step_session_dropped_without_close_gives_its_fds_and_thread_back():
    # Its watchdog thread held the session (a bound method), so neither the session
    # nor its VM was ever garbage: 4 fds and a thread per forgotten session
    import threading
    from minivmm.step import StepSession
    list(StepSession(payload("hello_long")).run(count=2))     # warm-up
    time.sleep(0.2)
    gc.collect()
    fds = _fds()
    for _ in range(10):
        list(StepSession(payload("hello_long")).run(count=2))
    gc.collect()
    time.sleep(0.2)                   # the watchdogs see their session gone (50 ms polls)
    assert _fds() == fds
    assert not [t for t in threading.enumerate() if t.name == "step-watchdog"]


def test_structs_of_the_wrong_type_are_refused_before_the_kernel():
    # KVM_SET_SREGS reads 312 bytes: a 144-byte kvm_regs would hand it the heap next to it
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(TypeError, match="expected kvm_sregs, not kvm_regs"):
            vcpu.set_sregs(vcpu.get_regs())
        with pytest.raises(TypeError, match="expected kvm_regs"):
            vcpu.set_regs(vcpu.get_sregs())
        with pytest.raises(TypeError, match="kvm_cpuid2"):
            vcpu.set_cpuid2(vcpu.get_regs())
        with pytest.raises(ValueError, match="DR0-DR7"):
            vcpu.set_guest_debug(1, [0] * 9)
        with pytest.raises(ValueError, match="negative"):
            vm.create_vcpu(-1)


def test_guest_memory_and_slot_bounds():
    import numpy as np
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0, 0x2000)
        with pytest.raises(ValueError, match="outside"):
            mem.read(0, -1)
        words = np.arange(4, dtype=np.uint64)
        mem.write(0x1000, words)                      # 32 bytes, not 4
        assert mem.read(0x1000, 32) == words.tobytes()
        with pytest.raises(ValueError, match="outside"):
            mem.write(0x2000 - 16, words)
        with pytest.raises(ValueError, match="slot 4294967298 is out of range"):
            vm.add_memory((1 << 32) + 2, 0x200000, 0x1000)
        with pytest.raises(ValueError, match="below 2\\*\\*52"):
            vm.add_memory(1, (1 << 64) + 0x100000, 0x1000)
        assert sorted(vm.memory) == [0]
        with pytest.raises(ValueError, match="slot 0 already holds memory"):
            vm.add_memory(0, 0x100000, 0x1000)


def test_io_data_is_refused_outside_the_io_exit_it_belongs_to():
    # Before the first exit data_offset is 0: set_io_data wrote over kvm_run itself
    # (immediate_exit), and every KVM_RUN after it returned KVM_EXIT_INTR without running
    from minivmm.payload import assemble_source
    code = assemble_source(";! mode: real\nin ax, 0x60\nout 0xe9, al\nhlt").code
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 0, 0x20000).write(0x10000, code)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.selector, sregs.cs.base = 0x1000, 0x10000
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = 0, 2
        vcpu.set_regs(regs)
        for use in (lambda: vcpu.set_io_data(b"QQ"), vcpu.io_data):
            with pytest.raises(ValueError, match="not at an IO exit: its last exit is UNKNOWN"):
                use()
        assert vcpu.run_struct.immediate_exit == 0
        assert vcpu.run() == abi.KVM_EXIT_IO
        with pytest.raises(ValueError, match="this IN reads 2 byte\\(s\\), got 1"):
            vcpu.set_io_data(b"Q")
        vcpu.set_io_data(b"AB")
        assert vcpu.run() == abi.KVM_EXIT_IO and vcpu.io_data() == b"A"
        with pytest.raises(ValueError, match="an OUT to port 0xe9, not an IN"):
            vcpu.set_io_data(b"A")
        assert vcpu.run() == abi.KVM_EXIT_HLT


def test_fd_owners_refuse_to_be_copied_or_pickled():
    # A copy shared the fd and its one close: closing the copy left the original with a
    # number the next VM took, and the original's ioctls then went to that VM
    import copy
    import pickle
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        for obj in (kvm, vm, vcpu):
            name = type(obj).__name__
            for clone in (copy.copy, copy.deepcopy, pickle.dumps):
                with pytest.raises(TypeError, match=f"a {name} cannot be copied or pickled"):
                    clone(obj)


def test_a_forked_child_using_its_parents_vm_is_told_why():
    # KVM_RUN named the fork on EIO; every other VM and vCPU ioctl gave a bare EIO
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)

        def uses():
            said = []
            for use in (vcpu.get_regs, lambda: vm.add_memory(0, 0, 0x1000)):
                try:
                    use()
                except KvmError as e:
                    said.append(str(e))
            return " | ".join(said)
        lines = in_child(uses).split(" | ")
    assert len(lines) == 2
    for line in lines:
        assert "EIO" in line and "belongs to another process (after fork" in line, line


def test_a_closed_vcpus_exit_data_says_closed():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        vm.close()
        for use in (vcpu.io_data, vcpu.describe_exit):
            with pytest.raises(KvmError, match="vCPU 0 is closed"):
                use()


def test_an_ioctl_interrupted_by_a_signal_is_retried(monkeypatch):
    # KVM_CREATE_VM can return EINTR when a signal lands (a program with an interval
    # timer saw it fail 1 time in 10): like Python's own calls (PEP 475), it is retried
    import ctypes
    import errno
    from minivmm import _sys
    calls = []

    def interrupted_once(real):
        def call(fd, request, arg):
            if request == abi.KVM_CREATE_VM:
                calls.append(request)
                if len(calls) == 1:
                    ctypes.set_errno(errno.EINTR)
                    return -1
            return real(fd, request, arg)
        return call
    monkeypatch.setattr(_sys, "_ioctl_fast", interrupted_once(_sys._ioctl_fast))
    with Kvm() as kvm:
        with kvm.create_vm() as vm:
            assert vm.fd >= 0
    assert len(calls) == 2


def test_a_session_can_run_in_a_worker_thread_after_import_minivmm():
    # The kick handler must be installed by the main thread; the package's names load
    # lazily, so `import minivmm` itself installs it
    import subprocess
    import sys
    script = ("import threading, minivmm\n"
              "out = []\n"
              "def work():\n"
              "    try:\n"
              "        with minivmm.DirtySession('dirty_seq', tracker='ring', vcpus=1, pages=64,\n"
              "                                  iterations=2) as s:\n"
              "            out.append(all(r.ok for r in s.run(timeout=30)))\n"
              "    except Exception as e:\n"
              "        out.append(repr(e))\n"
              "t = threading.Thread(target=work); t.start(); t.join(); print(out)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "[True]", proc.stdout + proc.stderr


def test_a_traced_ioctl_interrupted_by_a_signal_is_retried_too(monkeypatch):
    # --trace-ioctls must not change what the program does: the retry covers the tracer
    import errno
    from minivmm import _sys
    seen = []

    def tracer(fd, request, arg, name, hints, run=None):
        seen.append(name)
        if name == "KVM_CREATE_VM" and seen.count(name) == 1:
            raise _sys.KvmError(name, errno.EINTR)
        return _sys._ioctl(fd, request, arg)
    with Kvm() as kvm:
        monkeypatch.setattr(_sys, "tracer", tracer)
        vm = kvm.create_vm()
        monkeypatch.setattr(_sys, "tracer", None)
        vm.close()
    assert seen.count("KVM_CREATE_VM") == 2


def test_an_unheld_reset_reports_eintr_instead_of_retrying(monkeypatch):
    # abi-check's ring.reset.signal_partial checks that a signal never makes the reset
    # fail with EINTR: with signals let in, an EINTR must reach it
    import errno
    from minivmm import _sys
    from minivmm.dirty.ring import enable_dirty_ring
    from tests.conftest import failing_ioctl
    from tests.kvm.conftest import small_ring
    reset_fails = failing_ioctl(_sys._ioctl_fast, abi.KVM_RESET_DIRTY_RINGS, errno.EINTR)
    with Kvm() as kvm, kvm.create_vm() as vm:
        enable_dirty_ring(vm, small_ring())
        monkeypatch.setattr(_sys, "_ioctl_fast", reset_fails)
        with pytest.raises(KvmError) as e:
            vm.reset_dirty_rings(hold_signals=False)
        assert e.value.errno_name == "EINTR"


def test_a_vcpus_signal_mask_does_not_outlive_its_thread():
    # KVM_SET_SIGNAL_MASK belongs to the vCPU: after Machine.run() a KVM_RUN of the same
    # vCPU from this thread must be interruptible by this thread's signals again
    import signal
    import threading

    class Alarm(Exception):
        pass

    def alarm(signum, frame):
        raise Alarm
    old = signal.signal(signal.SIGALRM, alarm)
    try:
        with Machine(payload("spin")) as m:
            assert m.run(timeout=0.1).vcpus[0].end.reason == "timeout"
            from minivmm.machine import KICK_SIGNAL
            st = m.states[0]
            st.vcpu.run_struct.immediate_exit = 0
            fired, me = threading.Event(), threading.get_ident()

            def safety_net():       # the kick gets through either way: no hang if it fails
                fired.set()
                signal.pthread_kill(me, KICK_SIGNAL)
            safety = threading.Timer(5, safety_net)
            safety.start()
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            try:
                with pytest.raises(Alarm):
                    while not fired.is_set():
                        st.vcpu.run()
            finally:
                safety.cancel()
            assert time.monotonic() - t0 < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_stepper_started_from_a_vcpu_callback_can_still_be_stopped():
    # A thread started in a callback inherits the vCPU thread's all-blocked mask; the
    # stepper runs its vCPU in its own thread and kicks it at --max-time, so it must let
    # the kick back in (the run to an unreached breakpoint is one long KVM_RUN)
    import threading
    from minivmm.payload import assemble_source
    from minivmm.step import StepSession
    from tests.kvm.test_step import SPIN_NEVER
    stopped, blocked = [], []

    def spawn(st, tag):
        def inner():
            import signal
            from minivmm.machine import KICK_SIGNAL
            blocked.append(KICK_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, []))
            p = assemble_source(SPIN_NEVER, "never.asm")
            with StepSession(p, breakpoint=p.listing[1].address, timeout=30,
                             max_time=0.3) as s:
                list(s.run())
                stopped.append(s.stopped["reason"])
        t = threading.Thread(target=inner, daemon=True)
        t.start()
        t.join(10)
    with Machine(payload("bench_out"), regs={"rcx": 1}) as m:
        m.on_sync = spawn
        assert m.run(timeout=30).ok
    assert blocked == [True] and stopped == ["max-time"]


def _in_child(script: str, timeout: float = 60):
    """Run ``script`` in a fresh interpreter (a hang ends as a failure, not a stuck run)."""
    import subprocess
    import sys
    from tests.conftest import ROOT
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_the_programs_signal_mask_is_left_as_it_was():
    # A program that blocks SIGUSR1 (to sigwait for it) keeps it blocked through a
    # Machine, a DirtySession and a StepSession, and a SIGUSR1 sent to the process
    # meanwhile still waits for it: a vCPU thread that takes one in KVM_RUN hands it on
    import signal
    from minivmm import DirtySession
    from minivmm.step import StepSession
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        with Machine(payload("hello_long")) as m:
            assert m.run(timeout=20).ok
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == blocked
        with DirtySession(payload("dirty_seq"), tracker="ring", vcpus=1, pages=64,
                          iterations=2, ring_entries=small_ring()) as s:
            s.run(timeout=20)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == blocked
        with StepSession(payload("hello_long")) as s:
            assert len(list(s.run(count=3))) == 3
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == blocked
        for _ in range(3):
            with Machine(payload("spin"), vcpus=2) as m:
                m.start(timeout=20)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.1)
                m.stop()
            assert signal.sigtimedwait({signal.SIGUSR1}, 1) is not None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_a_machine_runs_once():
    # A second start() used to run a second thread on each vCPU: it waited in KVM_RUN
    # behind the first, the first could no longer be kicked, and wait() never returned.
    # A run after a timeout returned the old result at once.
    proc = _in_child(
        "from minivmm import Machine, MachineError\n"
        "with Machine('guest_payloads/spin.asm') as m:\n"
        "    m.start(timeout=0.3)\n"
        "    try:\n"
        "        m.start(timeout=0.3)\n"
        "    except MachineError as e:\n"
        "        print(e)\n"
        "    print(m.wait().vcpus[0].end.reason)\n"
        "    try:\n"
        "        m.run(timeout=5)\n"
        "    except MachineError as e:\n"
        "        print(e)\n", timeout=30)
    assert proc.stdout.splitlines() == ["this Machine has already run; make a new one",
                                        "timeout",
                                        "this Machine has already run; make a new one"], \
        proc.stdout + proc.stderr


def test_stop_and_close_from_the_callbacks_of_several_vcpus_return():
    # Each callback's stop() waited for the other vCPUs, which were waiting in their own
    # callbacks for it: a deadlock the run's timeout could not break
    proc = _in_child(
        "import time\n"
        "from minivmm import Machine\n"
        "for how in ('stop', 'close'):\n"
        "    with Machine('guest_payloads/bench_out.asm', vcpus=2, regs={'rcx': 0}) as m:\n"
        "        until = time.monotonic() + 0.1\n"
        "        def on_sync(st, tag):\n"
        "            if time.monotonic() > until:\n"
        "                getattr(m, how)() if how == 'close' else m.stop('enough')\n"
        "        m.on_sync = on_sync\n"
        "        r = m.run(timeout=10)\n"
        "        print(how, sorted({st.end.reason for st in r.vcpus}))\n"
        "    with Machine('guest_payloads/multi_vcpu.asm', vcpus=4) as m:\n"
        "        m.on_end = lambda st: getattr(m, how)()\n"
        "        m.run(timeout=10)\n"
        "        print(how, 'returned')\n", timeout=30)
    assert proc.stdout.splitlines() == ["stop ['enough']", "stop returned",
                                        "close ['closed']", "close returned"], \
        proc.stdout + proc.stderr


def test_ioctl_arguments_that_are_not_a_u64_are_refused_not_converted():
    # ctypes would pass None as 0, a str as its address and cut 2**64 + n to n
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(TypeError, match="KVM_CHECK_EXTENSION: the argument must be an int"):
            kvm.check_extension(None)
        with pytest.raises(ValueError, match="does not fit in 64 bits"):
            kvm.check_extension((1 << 64) + abi.KVM_CAP_MAX_VCPUS)
        with pytest.raises(ValueError, match="does not fit in 64 bits"):
            vm.create_vcpu(1 << 64)                   # would have made vCPU 0
        with pytest.raises(TypeError, match="KVM_SET_TSS_ADDR"):
            vm.set_tss_addr("0xfffbd000")
        assert vm.vcpus == []
        vm.create_vcpu(0)


def test_memory_slot_fields_are_not_cut_to_their_c_width():
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0, 0x2000)
        with pytest.raises(ValueError, match="slot 4294967296 does not fit in 32 bits"):
            vm.set_user_memory_region(1 << 32, 0, 0, 0, 0)     # would delete slot 0
        with pytest.raises(ValueError, match="flags 4294967296 does not fit in 32 bits"):
            vm.add_memory(1, 0x100000, 0x1000, flags=1 << 32)
        assert sorted(vm.memory) == [0]
        with pytest.raises(KvmError, match="EEXIST"):           # slot 0 is still there
            vm.set_user_memory_region(5, 0, 0, 0x1000, mem.host_addr)


def test_a_slot_id_in_use_names_a_way_to_free_it_that_works():
    # the advice was "set_user_memory_region with size 0", after which add_memory still
    # refused: the VM keeps the memory (the slot may be re-created over it)
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0, 0x2000)
        with pytest.raises(ValueError, match="remove it first \\(remove_memory\\)"):
            vm.add_memory(0, 0, 0x4000)
        vm.remove_memory(0)
        assert 0 not in vm.memory and mem.map is None
        assert vm.add_memory(0, 0, 0x4000).size == 0x4000
        with pytest.raises(ValueError, match="slot 3 holds no memory"):
            vm.remove_memory(3)


def test_set_cpuid2_refuses_more_entries_than_its_buffer_holds():
    # the kernel would read nent entries: the rest from the heap past the buffer
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        buf = abi.cpuid2_type(1)()
        buf.nent = 200
        with pytest.raises(ValueError, match="nent is 200 but the buffer holds 1"):
            vcpu.set_cpuid2(buf)
        vcpu.set_cpuid2(kvm.get_supported_cpuid())


def test_wait_before_start_is_refused():
    # wait() with no start() waited for vCPU threads that never were: a hang
    proc = _in_child(
        "from minivmm import Machine, MachineError\n"
        "with Machine('guest_payloads/spin.asm') as m:\n"
        "    try:\n"
        "        m.wait()\n"
        "    except MachineError as e:\n"
        "        print(e)\n"
        "    m.start(timeout=0.3)\n"
        "    print(m.wait().vcpus[0].end.reason)\n", timeout=30)
    assert proc.stdout.splitlines() == ["this Machine has not been started: call start() first",
                                        "timeout"], proc.stdout + proc.stderr


def test_a_nan_timeout_is_refused():
    with Machine(payload("spin")) as m:
        with pytest.raises(MachineError, match="NaN"):
            m.run(timeout=float("nan"))               # never expired: a hang


def test_machine_registers_and_pages_are_checked():
    with pytest.raises(MachineError, match="no register named 'RAX'"):
        Machine(payload("hello_long"), regs={"RAX": 5})   # was silently ignored
    with pytest.raises(TypeError, match="pages must be an int, not float"):
        Machine(payload("hello_long"), pages=8.5)


@pytest.mark.parametrize("where", ["on_end", "trace"])
def test_a_callbacks_exception_ends_the_vcpu_visibly(where):
    # on_end's exception went to threading.excepthook only, and the run stayed ok; a
    # SystemExit in trace left the vCPU with no end at all
    def boom(*_):
        raise SystemExit("callback gave up") if where == "trace" else ValueError("bad")
    with Machine(payload("hello_long")) as m:
        setattr(m, where, boom)
        r = m.run(timeout=20)
    st, = r.vcpus
    assert not r.ok and st.end.reason == "host-error"
    if where == "on_end":
        assert st.end.detail["error"] == ("on_end raised ValueError: bad (the vCPU had "
                                          "exited with code 0)")
    else:
        assert st.end.detail["error"] == "SystemExit: callback gave up"
    # the summary, the documented way to print an end, said only "host-error"
    assert st.end.summary() == f"host-error: {st.end.detail['error']}"


def test_a_callback_that_keeps_its_exception_does_not_hold_the_vm_open():
    # The kept exception's traceback held _vcpu_loop's frame and its views of the kvm_run
    # page: close() (the `with`) raised BufferError in place of the result, fds leaked
    kept = []

    def trace(st, reason):
        try:
            raise ValueError("looked at later")
        except ValueError as e:
            kept.append(e)
            raise
    with Machine(payload("hello_long")) as m:     # what a first run loads, mapped now
        m.trace = lambda *_: None
        m.run(timeout=20)
    fds, maps = _fds(), _maps()
    with Machine(payload("hello_long")) as m:
        m.trace = trace
        r = m.run(timeout=20)
    assert r.vcpus[0].end.summary() == "host-error: ValueError: looked at later"
    assert m.vm is None and (_fds(), _maps()) == (fds, maps)
    assert kept[0].__traceback__ is not None        # still the user's, with its lines


def test_wait_from_a_callback_is_refused_not_a_wait_for_itself():
    # wait() in a vCPU's own thread waited for that thread to end: for ever without a
    # timeout, else until it (a 3 ms run took the whole timeout)
    got = []

    def on_end(st):
        try:
            m.wait()
        except MachineError as e:
            got.append(str(e))
    with Machine(payload("hello_long")) as m:
        m.on_end = on_end
        t0 = time.monotonic()
        r = m.run(timeout=10)
    assert r.ok and time.monotonic() - t0 < 5
    assert got == ["wait() called from a callback, in a vCPU's own thread: it would wait "
                   "for that vCPU to end; call it from another thread"]


@pytest.mark.parametrize("value", ["stop", True, 0])
def test_on_ring_full_returning_neither_none_nor_an_end_is_named(value):
    # The value became the vCPU's end: RunResult.ok then raised "'str' object has no
    # attribute 'ok'", and a 0 ended the vCPU as if it were an end
    from minivmm import DirtySession
    calls = []

    def on_ring_full(st):
        calls.append(st.index)
        return value
    with DirtySession(payload("dirty_seq"), tracker="ring", vcpus=1, pages=4096,
                      iterations=2, ring_entries=small_ring()) as s:
        s.machine.on_ring_full = on_ring_full
        s.run(timeout=60)
        st, = s.result.vcpus
    assert calls and not s.result.ok
    assert st.end.summary() == (f"host-error: TypeError: on_ring_full must return None or a "
                                f"VcpuEnd, not {type(value).__name__} ({value!r})")


def test_enable_cap_signal_mask_and_guest_debug_arguments_fit_their_fields():
    # a fifth argument was an IndexError from ctypes; signal 65 was dropped from the mask
    # without a word; a guest-debug control over 32 bits was cut to its low half
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(ValueError, match="at most 4 arguments"):
            vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096, 0, 0, 0, 0)
        with pytest.raises(ValueError, match="flags 4294967296 does not fit in 32 bits"):
            vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096, flags=1 << 32)
        vcpu = vm.create_vcpu(0)
        with pytest.raises(ValueError, match="no signal 65"):
            vcpu.set_run_signals([65])
        with pytest.raises(ValueError, match="control 1099511627776 does not fit"):
            vcpu.set_guest_debug(1 << 40)
        vcpu.set_guest_debug(0)


def test_a_failed_signal_mask_reset_at_the_end_still_ends_the_vcpu(monkeypatch):
    # `minivmm run X --trace-ioctls | head` hung past its --timeout: the tracer's
    # BrokenPipeError from the vCPU thread's last KVM_SET_SIGNAL_MASK skipped done.set()
    import threading
    from minivmm.vcpu import Vcpu
    real = Vcpu.set_run_signals

    def set_run_signals(self, signals):
        real(self, signals)
        if signals is None:
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(Vcpu, "set_run_signals", set_run_signals)
    m = Machine(payload("hello_long"))
    result = []
    waiter = threading.Thread(target=lambda: result.append(m.run(timeout=5)), daemon=True)
    waiter.start()
    waiter.join(15)
    if waiter.is_alive():       # closing would wait for the vCPU thread for ever too
        pytest.fail("Machine.run() never returned after the vCPU thread ended")
    m.close()
    assert result[0].vcpus[0].end.reason == "exit-port"


@pytest.mark.parametrize("err,not_kvm", [(errno.ENOTTY, True), (errno.EINVAL, True),
                                         (errno.ENOMEM, False), (errno.EFAULT, False)])
def test_api_version_errors_blame_the_device_only_when_it_is_not_kvm(monkeypatch, err, not_kvm):
    # every errno was "does not answer KVM's ioctls: is it the KVM device?", the KVM
    # device's own ENOMEM included (found by fault injection)
    from minivmm import _sys
    from tests.conftest import failing_ioctl
    for entry in ("_ioctl", "_ioctl_fast"):       # arg 0 takes the fast handle
        monkeypatch.setattr(_sys, entry, failing_ioctl(getattr(_sys, entry),
                                                       abi.KVM_GET_API_VERSION, err))
    with pytest.raises(KvmUnavailable) as info:
        Kvm()
    assert info.value.errno == err and info.value.call == "KVM_GET_API_VERSION"
    assert ("is it the KVM device?" in str(info.value)) == not_kvm


def test_a_step_session_closed_from_another_thread_ends_its_stepping_first():
    # close() released the VM under the stepping thread, whose next KVM_RUN went to the
    # closed fd's number (EBADF here; another VM's vCPU once the kernel reuses it)
    import threading
    from minivmm.step import StepSession
    fds = _fds()
    for _ in range(3):
        s = StepSession(payload("spin"), timeout=5, max_time=30)
        out, started = [], threading.Event()

        def step():
            try:
                for _ in s.run():
                    started.set()
                out.append(("stopped", s.stopped))
            except Exception as e:
                out.append(f"{type(e).__name__}: {e}")
            started.set()
        t = threading.Thread(target=step)
        t.start()
        assert started.wait(20)
        s.close()
        t.join(20)
        assert not t.is_alive()
        assert out[0] in ("MachineError: this StepSession is closed",
                          ("stopped", {"reason": "closed"})), out
    assert _fds() == fds


_NEVER = ";! mode: long\nspin:\n    jmp spin\nnever:\n    nop\n"


@pytest.mark.parametrize("at", ["before the deadline", "before KVM_RUN"])
def test_a_close_from_another_thread_as_a_step_begins_stops_it(tmp_path, at):
    # The run to a --break never reached, close() from another thread landing as it
    # began: before its deadline was set, close() kicked nothing and its watchdog stopped
    # watching, so the guest ran on and close() waited for it for ever; after it but
    # before KVM_RUN, close() raised TypeError (no thread id yet) and left the VM open
    import signal
    import threading
    from minivmm.machine import KICK_SIGNAL
    from minivmm.step import StepSession
    f = tmp_path / "never.asm"
    f.write_text(_NEVER)
    fds = _fds()
    s = StepSession(str(f), breakpoint="never", timeout=2, max_time=None)
    vcpu, closing, got = s.vcpu, [], []

    def close():
        try:
            s.close()
            got.append("closed")
        except Exception as e:
            got.append(f"{type(e).__name__}: {e}")

    def hook(real):
        def call(*a):
            if not closing:         # close() from another thread, here in the first step
                closing.append(threading.Thread(target=close, daemon=True))
                closing[0].start()
                closing[0].join(0.5)    # as far as it goes while this step is not over
            return real(*a)
        return call
    if at == "before the deadline":
        s._state = hook(s._state)           # read just before the deadline is set
    else:
        s.machine.linear = hook(s.machine.linear)   # the run to --break's first call
    out = []
    stepper = threading.Thread(target=lambda: out.append(_try(s.next_step)), daemon=True)
    stepper.start()
    stepper.join(10)
    closing[0].join(10)
    hung = stepper.is_alive()
    if hung:                                # let the looping guest go before failing
        vcpu.run_struct.immediate_exit = 1
        signal.pthread_kill(stepper.ident, KICK_SIGNAL)
        stepper.join(10)
    assert not hung, "the step ran on past close() (and past its 2 s timeout)"
    assert got == ["closed"] and out == [None] and s.stopped["reason"] == "closed"
    assert s.machine.vm is None and _fds() == fds


def test_a_close_from_a_thread_that_stepped_before_waits_for_anothers_step():
    # close() skipped its wait when called by the thread that last entered KVM_RUN, not
    # the one stepping now: the VM was released under a step of another thread
    import threading
    from minivmm.step import StepSession
    s = StepSession(payload("spin"), timeout=5, max_time=None)
    assert s.next_step().instruction == "mov al, 0x2e"     # stepped here first
    closed, out = threading.Event(), []
    executed = s.machine.executed

    def hook(*a):                   # the other thread's step, before its guest runs
        if threading.current_thread() is not threading.main_thread():
            closed.wait(1)
        return executed(*a)
    s.machine.executed = hook
    other = threading.Thread(target=lambda: out.append(_try(s.next_step)))
    other.start()
    time.sleep(0.2)
    s.close()
    closed.set()
    alive = other.is_alive()
    other.join(10)
    assert not alive, "close() returned while another thread's step was in flight"
    assert out == [None] and s.stopped == {"reason": "closed"}


def _try(call):
    try:
        return call()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
