"""The host running out (threads, processes, memory): a clear error, everything released,
no hang and no traceback."""
import errno
import gc
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT, in_child, payload
from tests.kvm.conftest import start_thread_named


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _refuse_thread(name: str):
    """Make threading.Thread.start() fail for the thread ``name`` as it does when
    pthread_create() fails (RLIMIT_NPROC reached, no room for a stack under ulimit -v)."""
    real = threading.Thread.start

    def start(self):
        if self.name == name:
            raise RuntimeError("can't start new thread")
        return real(self)
    threading.Thread.start = start


@pytest.mark.parametrize("thread", ["vcpu1", "reaper", "step-watchdog"])
def test_a_thread_the_host_refuses_is_a_clear_error_and_leaves_nothing(thread):
    # Machine.start() left vCPU 1 made but never started: close() waited for it for ever
    # (found with `ulimit -v 190000; minivmm run multi_vcpu --vcpus 8`, and as a non-root
    # user under `prlimit --nproc=3`). DirtySession's and StepSession's close() raised
    # "cannot join thread before it is started" in the refusal's place
    def body():
        fds = _fds()
        _refuse_thread(thread)
        try:
            start_thread_named(thread, vcpus=3)     # vCPU 2 comes after the refused one
        except OSError as e:
            error = f"OSError {errno.errorcode.get(e.errno)} {e.strerror}"
        else:
            return "no error"
        gc.collect()
        left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        return f"{error} | threads left {left} | fds {_fds() - fds:+d}"
    out = in_child(body)
    what = {"vcpu1": "the thread of vCPU 1", "reaper": "the dirty-ring reaper thread",
            "step-watchdog": "the stepper's watchdog thread"}[thread]
    assert out.startswith(f"OSError EAGAIN cannot start {what}"), out
    assert "RLIMIT_NPROC" in out
    assert out.endswith("| threads left [] | fds +0"), out


def test_the_cli_says_a_refused_vcpu_thread_in_one_line():
    code = ("import sys, threading\n"
            "from tests.kvm.test_host_limits import _refuse_thread\n"
            "_refuse_thread('vcpu2')\n"
            "from minivmm.cli import main\n"
            f"sys.exit(main(['run', {payload('multi_vcpu')!r}, '--vcpus', '4']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("minivmm: cannot start the thread of vCPU 2"), line
    assert "RLIMIT_NPROC" in line and proc.stdout == ""


def test_vms_past_the_open_file_limit_name_it():
    # Thousands of VMs fit in KVM; the open-file limit comes first, and KVM_CREATE_VM,
    # KVM_CREATE_VCPU and the open of /dev/kvm failed with a bare EMFILE, no hint
    def body():
        import resource
        from minivmm import Kvm, KvmError, vcpu, vm
        assert vcpu and vm      # imported now: an import needs an fd too
        kvm = Kvm()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 6
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        filler = []
        try:
            while True:             # every free number below the limit taken, then 3 let go
                filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            for fd in filler[-3:]:
                os.close(fd)
        vms, said = [], []
        try:
            while len(vms) < 20:
                vms.append(kvm.create_vm())
        except KvmError as e:
            said.append(str(e))
        try:
            vms[0].create_vcpu(0)
        except KvmError as e:
            said.append(str(e))
        try:
            Kvm()
        except KvmError as e:
            said.append(str(e))
        return "\n".join(said)
    said = in_child(body).splitlines()
    assert [line.split(" failed: ")[0] for line in said] == \
        ["KVM_CREATE_VM", "KVM_CREATE_VCPU", "open /dev/kvm"], said
    for line in said:
        assert "EMFILE" in line and "open-file limit (ulimit -n, " in line, line
