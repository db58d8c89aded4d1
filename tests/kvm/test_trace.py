"""--trace-ioctls on the real /dev/kvm: what the trace says, not just that it speaks."""
import errno
import io
import json
import mmap
import os
import re

import pytest

from minivmm import _sys, abi, trace
from minivmm._sys import KvmError
from minivmm.dirty.ring import VcpuRing, enable_dirty_ring
from minivmm.kvm import Kvm
from minivmm.machine import Machine
from tests.conftest import payload, run_cli
from tests.kvm.conftest import small_ring

LINE = re.compile(r"^ioctl\((?P<kind>[\w-]+) (?P<fd>\d+), (?P<name>\w+), (?P<arg>.*)\) = "
                  r"(?P<result>.+?)  <(?P<us>\d+\.\d) us>$")


MAP_LINE = re.compile(r"^mmap\((?:(?P<kind>[\w-]+) )?(?P<fd>-?\d+), (?P<length>0x\w+), (?P<prot>[\w|]+), "
                      r"(?P<flags>[\w|]+), offset (?P<offset>\w+)\) = (?P<result>.+?)"
                      r"(?:  \[(?P<what>.+)\])?  <\d+\.\d us>$")
UNMAP_LINE = re.compile(r"^munmap\((?P<addr>0x\w+), (?P<length>0x\w+)\) = 0"
                        r"(?:  \[(?P<what>.+)\])?  <\d+\.\d us>$")


def map_lines(text):
    """The mmap and munmap lines, parsed, in order; every one must be well-formed."""
    lines = [line for line in text.splitlines() if line.startswith(("mmap(", "munmap("))]
    parsed = [(MAP_LINE if line.startswith("mmap(") else UNMAP_LINE).match(line)
              for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    return parsed


def ioctl_lines(text):
    """The trace lines of a command's output, parsed; every one must be well-formed."""
    lines = [line for line in text.splitlines() if line.startswith("ioctl(")]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    return parsed


def index_of(lines, start, pred):
    for k in range(start, len(lines)):
        if pred(lines[k]):
            return k
    raise AssertionError(f"no matching line after #{start}")


def test_run_hello_long_trace_tells_the_whole_setup_in_order():
    proc = run_cli("run", "hello_long", "--trace-ioctls")
    assert proc.returncode == 0, proc.stderr
    assert "vCPU 0 | Hello from long mode" in proc.stdout    # the command's own output stays
    lines = ioctl_lines(proc.stdout)
    k = index_of(lines, 0, lambda m: m["name"] == "KVM_GET_API_VERSION")
    assert lines[k]["kind"] == "kvm" and lines[k]["result"] == "12"
    k = index_of(lines, k, lambda m: m["name"] == "KVM_CREATE_VM")
    vm_fd = lines[k]["result"]
    k = index_of(lines, k, lambda m: m["name"] == "KVM_SET_USER_MEMORY_REGION"
                 and m["arg"].startswith("{slot=0, ") and "guest_phys_addr=0," in m["arg"])
    assert (lines[k]["kind"], lines[k]["fd"]) == ("vm", vm_fd)
    k = index_of(lines, k, lambda m: m["name"] == "KVM_SET_USER_MEMORY_REGION"
                 and m["arg"].startswith("{slot=1, ")
                 and "guest_phys_addr=0x40000000," in m["arg"])
    k = index_of(lines, k, lambda m: m["name"] == "KVM_CREATE_VCPU" and m["arg"] == "0")
    vcpu_fd = lines[k]["result"]
    k = index_of(lines, k, lambda m: m["name"] == "KVM_SET_SREGS")
    sregs = lines[k]
    assert (sregs["kind"], sregs["fd"]) == ("vcpu0", vcpu_fd)
    assert re.search(r"cs=\{selector=0x\w+, dpl=3, l=1\}", sregs["arg"])    # CPL3, 64-bit
    assert re.search(r"ss=\{selector=0x\w+, dpl=3\}", sregs["arg"])
    assert "efer=0x500" in sregs["arg"]                                     # LME|LMA
    k = index_of(lines, k, lambda m: m["name"] == "KVM_RUN")
    assert lines[k]["kind"] == "vcpu0" and lines[k]["arg"] == "0"
    assert not [m.group(0) for m in lines if m["result"].startswith("-1")]


def test_json_on_stdout_trace_on_stderr_one_kvm_run_per_exit():
    proc = run_cli("run", "hello_long", "--json", "--trace-ioctls")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)                   # the trace stayed out of stdout
    runs = [m for m in ioctl_lines(proc.stderr) if m["name"] == "KVM_RUN"]
    vcpu = out["vcpus"][0]
    assert len(runs) == sum(vcpu["exits"].values()) == vcpu["exits"]["io"]
    # Each exit decoded from kvm_run: the console bytes, one OUT to 0xe9 at a time,
    # then the exit port.
    outs = [re.fullmatch(r"0 exit=IO \{direction=out, port=(0x\w+), size=1, count=1, "
                         r"data=(\w+)\}", m["result"]) for m in runs]
    assert all(outs), [m["result"] for m in runs]
    console = bytes(int(o[2], 16) for o in outs if o[1] == "0xe9").decode()
    assert console == vcpu["console"] == "Hello from long mode\n"
    assert outs[-1][1] == "0xf4" and outs[-1][2] == "0"


def test_threads_write_whole_lines_and_name_their_vcpu():
    proc = run_cli("run", payload("multi_vcpu"), "--vcpus", "4", "--json", "--trace-ioctls")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    all_lines = proc.stderr.splitlines()
    lines = ioctl_lines(proc.stderr)
    assert len(lines) + len(map_lines(proc.stderr)) == len(all_lines)   # whole trace lines
    for v in out["vcpus"]:
        runs = [m for m in lines if m["name"] == "KVM_RUN" and m["kind"] == f"vcpu{v['index']}"]
        assert len(runs) == sum(v["exits"].values())


def test_caps_trace_names_each_capability_asked():
    proc = run_cli("caps", "--json", "--trace-ioctls")
    assert proc.returncode == 0, proc.stderr
    caps = json.loads(proc.stdout)["capabilities"]
    asked = {m["arg"] for m in ioctl_lines(proc.stderr) if m["name"] == "KVM_CHECK_EXTENSION"}
    assert "KVM_CAP_DIRTY_LOG_RING_ACQ_REL" in asked
    assert set(caps) <= asked


def test_failed_enable_cap_is_traced_and_raises_the_same_error():
    def attempt():
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.create_vcpu(0)
            with pytest.raises(KvmError) as info:   # the ring must come before any vCPU
                vm.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096 * 16)
            return info.value

    plain = attempt()
    out = io.StringIO()
    with trace.tracing(out):
        traced = attempt()
    assert _sys.tracer is None
    assert (traced.errno, traced.call, str(traced)) == (plain.errno, plain.call, str(plain))
    assert traced.errno == errno.EINVAL
    line = [m for m in ioctl_lines(out.getvalue()) if m["name"] == "KVM_ENABLE_CAP"]
    assert len(line) == 1
    assert line[0]["kind"] == "vm"
    assert line[0]["arg"] == ("{cap=KVM_CAP_DIRTY_LOG_RING_ACQ_REL, flags=0, "
                              "args=[0x10000, 0, 0, 0]}")
    assert line[0]["result"] == "-1 EINVAL (Invalid argument)"


def test_reset_without_a_ring_fails_alike_on_the_fast_handle_and_traced():
    # Vm.reset_dirty_rings skips ioctl() for speed unless a tracer is set: both paths must
    # raise the same KvmError, and the traced one must show the call.
    def attempt():
        with Kvm() as kvm, kvm.create_vm() as vm:
            with pytest.raises(KvmError) as info:
                vm.reset_dirty_rings()
            return info.value

    plain = attempt()
    out = io.StringIO()
    with trace.tracing(out):
        traced = attempt()
    assert (traced.errno, traced.call, str(traced)) == (plain.errno, plain.call, str(plain))
    assert plain.errno == errno.EINVAL and plain.call == "KVM_RESET_DIRTY_RINGS"
    assert "the dirty ring is not enabled on this VM" in str(plain)
    line = [m for m in ioctl_lines(out.getvalue()) if m["name"] == "KVM_RESET_DIRTY_RINGS"]
    assert len(line) == 1 and line[0]["result"] == "-1 EINVAL (Invalid argument)"


def _outcome(result):
    d = result.to_dict()
    d.pop("elapsed_s")
    return d


def test_tracing_does_not_change_results_and_uninstall_turns_it_off():
    def run():
        with Machine("hello_long") as m:
            return _outcome(m.run(timeout=30))

    plain = run()
    out = io.StringIO()
    trace.install(out)
    try:
        traced = run()
    finally:
        trace.uninstall()
    assert _sys.tracer is None
    assert traced == plain and plain["ok"]
    assert sum(1 for m in ioctl_lines(out.getvalue()) if m["name"] == "KVM_RUN") == \
        sum(plain["vcpus"][0]["exits"].values())
    again = io.StringIO()
    trace.install(again)
    trace.uninstall()
    run()
    assert again.getvalue() == ""                   # off means silent


def test_kvm_run_exit_with_and_without_the_kvm_run_handed_over():
    """Given the vCPU's kvm_run, or reading it through a short mapping of the fd: same view."""
    out = io.StringIO()
    with Machine("hello_long") as m, trace.tracing(out) as t:
        vcpu = m.states[0].vcpu
        t(vcpu.fd, abi.KVM_RUN, 0, "KVM_RUN", None, run=vcpu.run_struct)
        t(vcpu.fd, abi.KVM_RUN, 0, "KVM_RUN")
    first, second = ioctl_lines(out.getvalue())
    assert first["result"] == "0 exit=IO {direction=out, port=0xe9, size=1, count=1, data=0x48}"
    assert second["result"] == "0 exit=IO {direction=out, port=0xe9, size=1, count=1, data=0x65}"
    assert first["kind"] == second["kind"] == "vcpu0"


def test_fd_numbers_reused_by_another_kind_are_named_afresh():
    out = io.StringIO()
    with Kvm() as kvm, trace.tracing(out):
        first, second = kvm.create_vm(), kvm.create_vm()
        first.check_extension(abi.KVM_CAP_USER_MEMORY)     # the tracer learns: fd N is a vm
        old_fd = first.fd
        first.close()
        try:
            vcpu = second.create_vcpu(0)                    # the lowest free number: N again
            assert vcpu.fd == old_fd
            vcpu.get_regs()
        finally:
            second.close()
    lines = ioctl_lines(out.getvalue())
    assert (lines[-1]["name"], lines[-1]["kind"], lines[-1]["fd"]) == \
        ("KVM_GET_REGS", "vcpu0", str(old_fd))


# -- the mmaps a VMM makes: kvm_run (api.rst 4.5, 4.10), dirty ring (7.36), guest memory --

def test_run_trace_shows_each_vcpus_kvm_run_mmap_and_its_munmap():
    proc = run_cli("run", payload("multi_vcpu"), "--vcpus", "2", "--json", "--trace-ioctls")
    assert proc.returncode == 0, proc.stderr
    order = proc.stderr.splitlines()
    ioctls, maps = ioctl_lines(proc.stderr), map_lines(proc.stderr)
    size = next(m["result"] for m in ioctls if m["name"] == "KVM_GET_VCPU_MMAP_SIZE")
    runs = [m for m in maps if m.re is MAP_LINE and m["what"] == "struct kvm_run"]
    created = [m for m in ioctls if m["name"] == "KVM_CREATE_VCPU"]
    assert [(m["kind"], m["fd"]) for m in runs] == \
        [(f"vcpu{m['arg']}", m["result"]) for m in created]
    for run, create in zip(runs, created):
        assert (run["length"], run["prot"], run["flags"], run["offset"]) == \
            (hex(int(size)), "PROT_READ|PROT_WRITE", "MAP_SHARED", "0")
        assert order.index(run.string) == order.index(create.string) + 1   # right after it
        unmap = [m for m in maps if m.re is UNMAP_LINE and m["addr"] == run["result"]]
        assert [(m["length"], m["what"]) for m in unmap] == [(run["length"], "struct kvm_run")]
    # each slot's userspace_addr is the address of a guest memory mapping just made
    regions = [m for m in ioctls if m["name"] == "KVM_SET_USER_MEMORY_REGION"]
    guest = [m for m in maps if m.re is MAP_LINE and m["what"].startswith("guest memory")]
    assert [re.search(r"userspace_addr=(0x\w+)", m["arg"])[1] for m in regions] == \
        [m["result"] for m in guest]
    assert {(m["kind"], m["fd"], m["flags"]) for m in guest} == \
        {(None, "-1", "MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE")}
    assert {m["addr"] for m in maps if m.re is UNMAP_LINE} == \
        {m["result"] for m in maps if m.re is MAP_LINE}   # every mapping unmapped at close


def test_dirty_ring_trace_shows_each_ring_mmap_at_page_64_with_the_rings_bytes():
    proc = run_cli("dirty", "--tracker", "ring", "--vcpus", "2", "--pages", "256",
                   "--iterations", "2", "--json", "--trace-ioctls")
    assert proc.returncode == 0, proc.stderr
    ioctls, maps = ioctl_lines(proc.stderr), map_lines(proc.stderr)
    vm_fd = next(m["result"] for m in ioctls if m["name"] == "KVM_CREATE_VM")
    ring_bytes = next(int(re.search(r"args=\[(0x\w+),", m["arg"])[1], 16) for m in ioctls
                      if m["name"] == "KVM_ENABLE_CAP" and m["fd"] == vm_fd
                      and "DIRTY_LOG_RING" in m["arg"] and m["result"] == "0")
    rings = [m for m in maps if m.re is MAP_LINE and m["what"].startswith("dirty ring")]
    assert [m["kind"] for m in rings] == ["vcpu0", "vcpu1"]
    for ring in rings:
        assert int(ring["offset"], 16) == abi.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE
        assert int(ring["length"], 16) == ring_bytes
        assert ring["what"] == f"dirty ring, {ring_bytes // 16} entries"
        assert (ring["prot"], ring["flags"]) == ("PROT_READ|PROT_WRITE", "MAP_SHARED|MAP_POPULATE")
        unmap = [m for m in maps if m.re is UNMAP_LINE and m["addr"] == ring["result"]]
        assert [m["length"] for m in unmap] == [ring["length"]]


def test_a_refused_ring_mmap_shows_its_errno_and_raises_as_untraced():
    entries = small_ring()

    def attempt():
        with Kvm() as kvm, kvm.create_vm() as vm:
            enable_dirty_ring(vm, entries)
            vcpu = vm.create_vcpu(0)
            with pytest.raises(KvmError) as info:   # EPERM (VFS, >= 6.16) or EINVAL (KVM)
                _sys.map_shared(vcpu.fd, entries * 16, abi.KVM_DIRTY_LOG_PAGE_OFFSET
                                * mmap.PAGESIZE, "mmap(dirty ring)",
                                prot=mmap.PROT_READ | mmap.PROT_EXEC, what="exec")
            return info.value

    plain = attempt()
    out = io.StringIO()
    with trace.tracing(out):
        traced = attempt()
    assert (traced.errno, traced.call) == (plain.errno, plain.call)
    assert plain.errno in (errno.EPERM, errno.EINVAL)
    line, = [m for m in map_lines(out.getvalue()) if m.re is MAP_LINE and m["what"] == "exec"]
    assert line["kind"] == "vcpu0" and line["prot"] == "PROT_READ|PROT_EXEC"
    assert line["result"] == f"-1 {plain.errno_name} ({plain.strerror})"


def test_ring_tracker_in_process_and_tracing_off_makes_no_map_lines():
    entries = small_ring()

    def session():
        with Kvm() as kvm, kvm.create_vm() as vm:
            enable_dirty_ring(vm, entries)
            VcpuRing(vm.create_vcpu(0), entries)

    out = io.StringIO()
    with trace.tracing(out):
        session()
    whats = [m["what"] for m in map_lines(out.getvalue())]
    ring = f"dirty ring, {entries} entries"
    assert whats == ["struct kvm_run", ring, ring, "struct kvm_run"]   # map, map, unmap, unmap
    off = io.StringIO()
    trace.install(off)
    trace.uninstall()
    session()
    assert off.getvalue() == ""


def test_a_kvm_run_failing_under_the_tracer_leaves_its_machine_closable(monkeypatch):
    # The tracer's frame holds the vCPU's kvm_run (its ``run`` argument): a KvmError raised
    # with that frame pinned the page, so leaving `with Machine` raised BufferError in the
    # KvmError's place (`minivmm step hello_long --trace-ioctls` printed a traceback when
    # the mechanism probe's KVM_RUN failed)
    from tests.conftest import failing_ioctl
    monkeypatch.setattr(_sys, "_ioctl", failing_ioctl(_sys._ioctl, abi.KVM_RUN, errno.EFAULT))
    out = io.StringIO()
    with trace.tracing(out):
        with pytest.raises(KvmError) as info:
            with Machine("hello_long", pages=1) as m:
                m.states[0].vcpu.run()
    assert (info.value.call, info.value.errno) == ("KVM_RUN", errno.EFAULT)
    assert m.vm is None                      # closed: the kvm_run page was released
    assert "KVM_RUN, 0) = -1 EFAULT" in out.getvalue()


def test_a_trace_line_that_cannot_be_written_leaks_no_new_fd():
    # The tracer writes its line after the call: a stream that failed there (a closed
    # file, a reader gone) raised with KVM_CREATE_VM's fd made but handed to nobody, and
    # the VM stayed open until the process ended
    class Failing(io.StringIO):
        def write(self, text):
            if "KVM_CREATE_VM" in text:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            return super().write(text)

    with Kvm() as kvm:
        kvm.get_vcpu_mmap_size()            # asked (and traced) before the fd count below
        before = os.listdir("/proc/self/fd")
        with trace.tracing(Failing()):
            with pytest.raises(BrokenPipeError):
                kvm.create_vm()
        assert len(os.listdir("/proc/self/fd")) == len(before)
