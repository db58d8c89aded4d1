"""minivmm.trace's mmap and munmap lines without KVM: anonymous memory and /dev/null.

The vCPU fd's own mappings (kvm_run, the dirty ring) are in tests/kvm/test_trace.py.
"""
import ctypes
import errno
import io
import mmap
import os
import re
import sys

import pytest

from minivmm import _sys, trace
from minivmm.memory import GuestMemory

ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
RW = mmap.PROT_READ | mmap.PROT_WRITE
MMAP = re.compile(r"^mmap\((?P<fd>.+?), (?P<length>0x\w+), (?P<prot>[\w|]+), (?P<flags>[\w|]+), "
                  r"offset (?P<offset>\w+)\) = (?P<result>.+?)(?:  \[(?P<what>.+)\])?"
                  r"  <\d+\.\d us>$")
MUNMAP = re.compile(r"^munmap\((?P<addr>0x\w+), (?P<length>0x\w+)\) = 0"
                    r"(?:  \[(?P<what>.+)\])?  <\d+\.\d us>$")


@pytest.fixture
def traced():
    out = io.StringIO()
    with trace.tracing(out):
        yield out


def lines(out):
    return out.getvalue().splitlines()


def test_anonymous_mapping_shows_its_address_and_munmap_the_same(traced):
    m = _sys.mmap(-1, 0x3000, ANON, RW, 0, "scratch")
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(anchor)
    del anchor
    _sys.munmap(m, "scratch")
    first, second = lines(traced)
    mm, mu = MMAP.match(first), MUNMAP.match(second)
    assert mm and mu, (first, second)
    assert (mm["fd"], mm["length"], mm["prot"], mm["flags"], mm["offset"], mm["what"]) == \
        ("-1", "0x3000", "PROT_READ|PROT_WRITE", "MAP_PRIVATE|MAP_ANONYMOUS", "0", "scratch")
    assert int(mm["result"], 16) == int(mu["addr"], 16) == address
    assert (mu["length"], mu["what"]) == ("0x3000", "scratch")


def test_guest_memory_line_gives_the_host_addr_kvm_receives(traced):
    mem = GuestMemory(2, 0x10000, 0x4000, name="data")
    host_addr = mem.host_addr
    mem.close()
    first, second = lines(traced)
    mm, mu = MMAP.match(first), MUNMAP.match(second)
    assert mm["flags"] == "MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE"
    assert int(mm["result"], 16) == int(mu["addr"], 16) == host_addr
    assert mm["what"] == mu["what"] == "guest memory for slot 2 (data)"


def test_read_only_mapping_still_shows_its_address(traced):
    # ctypes wants a writable buffer; the address comes from a numpy view instead
    m = _sys.mmap(-1, 0x1000, ANON, mmap.PROT_READ)
    _sys.munmap(m)
    first, second = lines(traced)
    mm, mu = MMAP.match(first), MUNMAP.match(second)
    assert mm["prot"] == "PROT_READ" and mm["what"] is None
    assert mm["result"] == mu["addr"] and mm["result"].startswith("0x")


def test_failed_mmap_shows_the_errno_and_raises_as_untraced():
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as plain:
            _sys.mmap(fd, 0x1000, mmap.MAP_SHARED, mmap.PROT_READ)
        out = io.StringIO()
        with trace.tracing(out), pytest.raises(OSError) as traced:
            _sys.mmap(fd, 0x1000, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    assert traced.value.errno == plain.value.errno == errno.ENODEV
    line, = lines(out)
    m = MMAP.match(line)
    assert m["fd"] == f"/dev/null {fd}" and m["flags"] == "MAP_SHARED"
    assert m["result"] == "-1 ENODEV (No such device)"


def test_map_shared_failure_is_the_kvm_error_it_was(traced):
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(_sys.KvmError) as info:
            _sys.map_shared(fd, 0x1000, 0x40000, "mmap(dirty ring)", prot=mmap.PROT_READ,
                            what="dirty ring, 256 entries")
    finally:
        os.close(fd)
    assert (info.value.call, info.value.errno) == ("mmap(dirty ring)", errno.ENODEV)
    m = MMAP.match(lines(traced)[0])
    assert (m["offset"], m["what"]) == ("0x40000", "dirty ring, 256 entries")


def test_munmap_with_a_live_view_unmaps_and_prints_nothing(traced):
    m = _sys.mmap(-1, 0x1000, ANON, RW)
    view = memoryview(m)
    with pytest.raises(BufferError):
        _sys.munmap(m)
    view.release()
    _sys.munmap(m)
    _sys.munmap(m)                          # closed already: no second munmap line
    assert [line.split("(")[0] for line in lines(traced)] == ["mmap", "munmap"]


def _profiled(fn, *args):
    """fn's calls, itself included: (event, function) for Python and C functions alike."""
    seen = []
    sys.setprofile(lambda frame, event, arg: seen.append(
        (event, getattr(arg, "__name__", None) if event == "c_call" else frame.f_code.co_name)))
    try:
        result = fn(*args)
    finally:
        sys.setprofile(None)
    return result, [e for e in seen if e[0] in ("call", "c_call")][:-1]   # not setprofile


def test_off_the_helpers_only_test_the_tracer_and_map():
    assert _sys.tracer is None
    m, calls = _profiled(_sys.mmap, -1, 0x1000, ANON, RW, 0, "scratch")
    assert calls == [("call", "mmap")]           # mmap.mmap() itself: a type, not profiled
    _, calls = _profiled(_sys.munmap, m, "scratch")
    assert calls == [("call", "munmap"), ("c_call", "close")]
    fd = os.open("/dev/zero", os.O_RDWR)
    try:
        m, calls = _profiled(_sys.map_shared, fd, 0x1000, 0, "mmap(kvm_run)")
        m.close()
    finally:
        os.close(fd)
    assert calls == [("call", "map_shared"), ("call", "mmap")]


def test_a_tracer_without_map_methods_leaves_mappings_untraced(monkeypatch):
    # abicheck.faults' stand-ins are plain functions: mappings still work, unshown
    seen = []
    monkeypatch.setattr(_sys, "tracer", lambda *args, **kw: seen.append(args))
    _sys.munmap(_sys.mmap(-1, 0x1000, ANON, RW, 0, "scratch"))
    mem = GuestMemory(0, 0, 0x1000)
    mem.close()
    assert seen == []


def test_a_forked_child_marks_its_mmap_lines(traced):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: one mapping, then gone
        try:
            _sys.munmap(_sys.mmap(-1, 0x1000, ANON, RW))
            os.write(w, traced.getvalue().encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    assert [line.split("(")[0] for line in text.splitlines()] == \
        [f"[pid {pid}] mmap", f"[pid {pid}] munmap"]
