"""The Python API from a caller's side: errors name keyword arguments, wrong types are
refused plainly, a VM outlives its Kvm, KVM_RUN's errors are explained, results cross
processes as dicts."""
import ctypes
import errno
import json
import os
import pickle
import subprocess
import sys

import pytest

from minivmm import DirtySession, Kvm, KvmError, Machine, MachineError, abi
from minivmm.payload import assemble_source
from minivmm.step import StepError, StepSession
from minivmm.vcpu import _RUN_HINTS
from tests.conftest import ROOT, payload, run_cli
from tests.unit.test_cli_errors import one_line_error


def _step_run(count):
    with StepSession(payload("hello_long")) as s:
        s.run(count)


@pytest.mark.parametrize("make,error,text", [
    (lambda: Machine(payload("hello_long"), pages=0), MachineError,
     "pages must be at least 1 (got 0)"),
    (lambda: Machine(payload("hello_long"), vcpus=0), MachineError,
     "vcpus must be between 1 and"),
    (lambda: StepSession(payload("hello_long"), vcpus=0), StepError,
     "vcpus must be at least 1 (got 0)"),
    (lambda: StepSession(payload("hello_long"), vcpu=1), StepError, "vcpu 1 does not exist"),
    (lambda: StepSession(payload("hello_long"), breakpoint="nowhere"), StepError,
     "breakpoint nowhere: not a number"),
    # an int was taken as it was: in-guest stepping wrote its int3 inside the lea at
    # 0x10000, and the guest ran other code (REX + int3), or died of #UD
    (lambda: StepSession(payload("hello_long"), breakpoint=0x10001), StepError,
     "breakpoint 0x10001: 0x10001 is not the start of an instruction"),
    (lambda: StepSession(payload("hello_long"), breakpoint=-5), StepError,
     "breakpoint -0x5: -0x5 is not the start of an instruction"),
    (lambda: _step_run(-1), StepError,
     "count must be at least 0 (got -1)"),
    (lambda: DirtySession(payload("dirty_seq"), vcpus=0), MachineError,
     "vcpus must be at least 1 (got 0)"),
    (lambda: DirtySession(payload("dirty_seq"), vcpus=4, pages=3), MachineError,
     "pages 3 leaves some of the 4 vCPUs"),
    (lambda: DirtySession(payload("dirty_stride"), stride=0), ValueError,
     "stride must be between 1 and"),
    (lambda: DirtySession(payload("dirty_seq"), iterations=2 ** 32), ValueError,
     "iterations must be between 0 and"),
])
def test_api_errors_name_the_keyword_argument_not_the_option(make, error, text):
    with pytest.raises(error) as info:
        make()
    assert str(info.value).startswith(text) and "--" not in str(info.value), info.value


@pytest.mark.parametrize("args,text", [
    (["run", payload("hello_long"), "--pages", "0"], "--pages must be at least 1 (got 0)"),
    (["step", "hello_long", "--break", "nowhere"], "--break nowhere: not a number"),
    (["dirty", "--vcpus", "4", "--pages", "3"], "--pages 3 leaves some of the 4 vCPUs"),
    (["dirty", "--iterations", "0"], "--iterations must be between 1 and 4294967295"),
])
def test_the_cli_still_names_its_options(args, text):
    assert text in one_line_error(run_cli(*args))


def _run(timeout):
    with Machine(payload("hello_long")) as m:
        m.run(timeout=timeout)


def _create_vcpu(vcpu_id):
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_vcpu(vcpu_id)


@pytest.mark.parametrize("call,text", [
    (lambda: Machine(payload("hello_long"), vcpus="2"), "vcpus must be an int, not str"),
    (lambda: Machine(payload("hello_long"), vcpus=True), "vcpus must be an int, not bool"),
    (lambda: Machine(payload("hello_long"), pages=True), "pages must be an int, not bool"),
    (lambda: Machine(payload("hello_long"), regs={"rax": "1"}),
     "regs['rax'] must be an int, not str"),
    (lambda: _run("5"), "timeout must be a number of seconds, not str"),
    (lambda: _create_vcpu("0"), "vcpu_id must be an int, not str"),
    (lambda: StepSession(payload("hello_long"), timeout="1"),
     "timeout must be a number of seconds, not str"),
    (lambda: StepSession(payload("hello_long"), breakpoint=True),
     "breakpoint must be an address (int or str), line:N or a label, not bool"),
    (lambda: StepSession(payload("hello_long"), breakpoint=3.5),
     "breakpoint must be an address (int or str), line:N or a label, not float"),
    (lambda: _step_run("3"), "count must be an int, not str"),
    (lambda: DirtySession(payload("dirty_seq"), iterations="3"),
     "iterations must be an int, not str"),
])
def test_wrong_types_are_named(call, text):
    # they were Python's own comparison errors ("'<=' not supported ...") from deep inside
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == text


def test_a_vm_makes_and_runs_vcpus_after_its_kvm_is_closed():
    kvm = Kvm()
    vm = kvm.create_vm()
    kvm.close()        # the VM fd holds the VM (api.rst 2); the kvm_run size was kept
    with vm:
        vm.add_memory(0, 0xFFFF0000, 0x10000).write(0xFFFF0000, b"\xf4" * 0x10000)
        vcpu = vm.create_vcpu(0)       # was KVM_GET_VCPU_MMAP_SIZE ... EBADF
        assert vcpu.run() == abi.KVM_EXIT_HLT


def test_kvm_run_errors_say_their_causes():
    assert "no memory slot" in _RUN_HINTS[errno.ENOSPC]
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.run()
        except KvmError as e:
            # ENOSPC where the shadow MMU has no pages yet (kvm_pvm; tdp_mmu=N); a host with
            # TDP has none to budget and may run the guest into an exit instead
            assert e.errno == errno.ENOSPC and "no memory slot" in str(e), e
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 0xFFFF0000, 0x10000)
        vcpu = vm.create_vcpu(0)
        offset = abi.kvm_run.kvm_valid_regs.offset
        ctypes.memmove(ctypes.addressof(vcpu.run_struct) + offset,
                       (1 << 40).to_bytes(8, "little"), 8)      # no such KVM_SYNC_X86_* bit
        with pytest.raises(KvmError) as info:
            vcpu.run()
        assert info.value.errno == errno.EINVAL and "kvm_valid_regs" in str(info.value)


class _kvm_msi(ctypes.Structure):          # include/uapi/linux/kvm.h struct kvm_msi
    _fields_ = [("address_lo", ctypes.c_uint32), ("address_hi", ctypes.c_uint32),
                ("data", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("devid", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 12)]


def test_kvm_run_eagain_names_a_vcpu_woken_before_its_init():
    # KVM_RUN's EAGAIN was a bare "Resource temporarily unavailable", which reads as a host
    # limit. kvm_arch_vcpu_ioctl_run() (arch/x86/kvm/x86.c) returns it for a vCPU in
    # KVM_MP_STATE_UNINITIALIZED (an AP of a VM with an in-kernel APIC) that an event woke
    # without a signal pending: here a broadcast INIT sent through KVM_SIGNAL_MSI
    import signal
    import threading
    from ioctl_opt import IO, IOW
    from minivmm import _sys
    with Kvm() as kvm, kvm.create_vm() as vm:
        _sys.ioctl(vm.fd, IO(0xAE, 0x60), 0, "KVM_CREATE_IRQCHIP")
        vm.add_memory(0, 0xFFFF0000, 0x10000)
        vm.create_vcpu(0)
        ap = vm.create_vcpu(1)          # not the BSP: UNINITIALIZED until INIT and SIPI
        seen = []

        def run():
            try:
                seen.append(ap.run())
            except KvmError as e:
                seen.append(e)
        old = signal.signal(signal.SIGUSR1, lambda *a: None)
        try:
            t = threading.Thread(target=run)
            t.start()
            t.join(0.3)                     # blocked in kvm_vcpu_block()
            msi = _kvm_msi(address_lo=0xFEE00000 | 0xFF << 12, data=5 << 8)   # INIT, all
            delivered = _sys.ioctl(vm.fd, IOW(0xAE, 0xA5, _kvm_msi), ctypes.addressof(msi),
                                   "KVM_SIGNAL_MSI")
            t.join(5)
            while t.is_alive():             # never woken: a signal ends it (EINTR)
                signal.pthread_kill(t.ident, signal.SIGUSR1)
                t.join(0.1)
        finally:
            signal.signal(signal.SIGUSR1, old)
    if not delivered or not isinstance(seen[0], KvmError):
        pytest.skip(f"the INIT did not end KVM_RUN with an error here ({delivered=}, {seen})")
    e = seen[0]
    assert (e.call, e.errno) == ("KVM_RUN", errno.EAGAIN), e
    assert "KVM_MP_STATE_UNINITIALIZED" in str(e) and "ulimit -u" in str(e), e


def test_iterations_zero_runs_until_the_timeout():
    with DirtySession(payload("dirty_seq"), tracker="bitmap", vcpus=1, pages=8,
                      iterations=0) as s:
        with pytest.raises(ValueError, match="iterations=0 runs until stopped"):
            s.run(timeout=None)      # would never end
        records = s.run(timeout=0.5)
    assert len(records) > 2 and all(r.ok for r in records)
    assert [st.end.reason for st in s.result.vcpus] == ["timeout"]
    with DirtySession(payload("dirty_seq"), tracker="ring", vcpus=1, pages=8,
                      iterations=0) as s:
        for record in s.iterate(timeout=None):
            if record.iteration == 3:
                break                # leaving the loop stops the vCPUs
    assert record.iteration == 3


def test_a_run_result_crosses_processes_as_its_dict():
    with Machine(payload("hello_long")) as m:
        result = m.run(timeout=10)
    assert "to_dict()" in type(result).__doc__
    with pytest.raises(TypeError):
        pickle.dumps(result)         # it holds the live vCPUs
    d = result.to_dict()
    assert json.loads(json.dumps(d)) == d and pickle.loads(pickle.dumps(d)) == d
    assert d["vcpus"][0]["console"] == "Hello from long mode\n" and d["ok"]


GENERAL_DETECT = """\
;! mode: long
;! cpl: 0
    mov rax, 0x2000          ; DR7.GD
    mov dr7, rax
    mov rbx, dr0             ; #DB general-detect, unless GD was cleared
    xor eax, eax
    out 0xf4, al
"""


def test_general_detect_never_fires_under_in_guest_stepping_as_the_readme_says():
    p = assemble_source(GENERAL_DETECT, "gd.asm")
    with Machine(p) as m:
        end = m.run(timeout=10).vcpus[0].end
    assert end.reason == "exception" and end.vector == 1, end.summary()
    assert "general-detect" in end.summary()
    with StepSession(p, mechanism="in-guest") as s:
        steps = list(s.run())
    assert s.end.reason == "exit-port" and s.end.code == 0, s.end.summary()
    assert len(steps) == 5
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "DR7.GD (general detect) never fires" in readme


@pytest.mark.parametrize("make,error,text", [
    # each failed deep inside (AttributeError on "x".create_vm, or a StepError naming no
    # argument), or was taken as given ("yes" for dirty)
    (lambda: Machine(payload("hello_long"), kvm="x"), TypeError,
     "kvm must be a minivmm Kvm or None, not str"),
    (lambda: StepSession(payload("hello_long"), kvm="x"), TypeError,
     "kvm must be a minivmm Kvm or None, not str"),
    (lambda: StepSession(payload("hello_long"), dirty="yes"), TypeError,
     "dirty must be True or False, not str"),
    (lambda: StepSession(payload("hello_long"), mechanism=None), StepError,
     "unknown mechanism None (expected one of auto, guest-debug, in-guest)"),
])
def test_wrong_objects_are_named_as_the_argument_they_came_in(make, error, text):
    with pytest.raises(error) as info:
        make()
    assert str(info.value) == text
    assert info.value.argument in ("kvm", "dirty", "mechanism")


_PIDS_CGROUP = "/sys/fs/cgroup/pids"          # cgroup v1's pids hierarchy


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir(_PIDS_CGROUP),
                    reason="needs root and cgroup v1's pids controller")
def test_kvm_run_eagain_at_a_cgroups_pids_max_is_not_said_to_spare_root(tmp_path):
    # The VM's first KVM_RUN starts kvm-nx-lpage-recovery (a task of this process): a
    # cgroup at its pids.max refuses it with EAGAIN, root or not. The hint had said only
    # ulimit -u, "which root is exempt from".
    group = os.path.join(_PIDS_CGROUP, f"minivmm-test-{os.getpid()}")
    os.mkdir(group)
    child = ("import os, sys\n"
             "from minivmm import Kvm, KvmError\n"
             f"g = {group!r}\n"
             "open(g + '/cgroup.procs', 'w').write(str(os.getpid()))\n"
             "with Kvm() as kvm, kvm.create_vm() as vm:\n"
             "    vm.add_memory(0, 0xFFFF0000, 0x10000).write(0xFFFF0000, b'\\xf4' * 0x10000)\n"
             "    vcpu = vm.create_vcpu(0)\n"
             "    open(g + '/pids.max', 'w').write(open(g + '/pids.current').read())\n"
             "    try:\n"
             "        vcpu.run()\n"
             "    except KvmError as e:\n"
             "        print(e.errno, e)\n"
             "        sys.exit(0)\n"
             "    print('ran')\n")
    try:
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    finally:
        os.rmdir(group)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("ran"):
        pytest.skip("KVM_RUN started no task here (no NX huge page recovery, or it is "
                    "hard-disabled)")
    assert out.stdout.startswith(f"{errno.EAGAIN} "), out.stdout
    assert "pids.max" in out.stdout and "ulimit -u" in out.stdout, out.stdout
