"""Checks: mmap of the dirty ring on the vCPU fd, and fork (abi.md rules 20-27).

Accesses that must kill the process (SIGSEGV, SIGBUS) happen only in a forked child that
maps (where the mapping itself is under test), touches, reports each step through a pipe
and leaves with os._exit; the parent waits at most CHILD_TIMEOUT seconds, kills a stuck
child, and judges its termination signal and the steps it reported.
"""
from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import signal
import time

import numpy as np

from .. import _sys, abi
from .._sys import KvmError, ioctl
from .registry import Fail, check, expect, expect_eq, expect_errno, expect_ok

PAGE = mmap.PAGESIZE
RING_OFF = abi.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE      # host page size, as the selftests map it
CHILD_TIMEOUT = 10.0
MMAP = "virt/kvm/kvm_main.c kvm_vcpu_mmap()"
FAULT = "virt/kvm/kvm_main.c kvm_vcpu_fault() -> kvm_arch_vcpu_fault() (VM_FAULT_SIGBUS)"
RW = mmap.PROT_READ | mmap.PROT_WRITE


def _ring_vcpu(ctx, entries: int | None):
    """A fresh VM (with a ring of ``entries`` when given) and one bare vCPU fd (no Vcpu
    wrapper, so no kvm_run mapping: only the mapping under test touches the vCPU fd)."""
    vm = ctx.vm()
    if entries:
        ctx.enable_ring(vm, entries)
    fd = ioctl(vm.fd, abi.KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
    ctx.on_close(lambda: os.close(fd))
    return vm, fd


def _mapped(m) -> str:
    """What an unexpected mmap success shows in a failure message (not the object's repr)."""
    return f"a {len(m)}-byte mapping"


def _flags(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype="<u4")[0::4].copy()


def _in_child(body, timeout: float = CHILD_TIMEOUT):
    """Run ``body(say)`` in a forked child. Returns (kind, value, lines): kind is "signal"
    (value = signal number) or "exit" (value = exit code; 3 = body raised)."""
    r, w = os.pipe()
    pid = _sys.fork_child()
    if pid == 0:                                   # child: never returns into the caller
        code = 3
        try:
            os.close(r)
            faulthandler.disable()                 # pytest's handler would print a traceback
            for sig in (signal.SIGBUS, signal.SIGSEGV):
                signal.signal(sig, signal.SIG_DFL)

            def say(text):
                os.write(w, (text + "\n").encode())
            body(say)
            code = 0
        except BaseException as e:                 # noqa: BLE001 - report, never propagate
            try:
                os.write(w, f"raised {type(e).__name__}: {e}\n".encode())
            except BaseException:                  # noqa: BLE001
                pass
        finally:
            os._exit(code)
    os.close(w)
    done = 0
    try:
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                raise Fail("forked child", f"finished within {timeout:g} s", "stuck; killed")
            time.sleep(0.001)
        os.set_blocking(r, False)
        data = b""
        while True:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        if not done:                               # stuck, or the parent was interrupted
            _sys.reap(pid, kill=True)
    lines = data.decode(errors="replace").splitlines()
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status), lines
    return "exit", os.WEXITSTATUS(status), lines


def _expect_death(ctx, result, sig: int, steps, what: str) -> None:
    """The child reported ``steps`` (in order, as line prefixes) and then died of ``sig``."""
    kind, value, lines = result
    ctx.diag(f"child: {kind} {signal.Signals(value).name if kind == 'signal' else value}; "
             f"reported {lines}")
    for step in steps:
        expect(any(l.startswith(step) for l in lines), f"{what}: child step '{step}'",
               "reported", f"missing (child said {lines})")
    observed = (signal.Signals(value).name if kind == "signal" else f"exit {value}")
    expect(kind == "signal" and value == sig, what, signal.Signals(sig).name,
           f"{observed} (child said {lines})")


@check("ring.mmap.shared_rw", 20, f"{MMAP}; api.rst 7.36", fault="mmap_invert")
def shared_rw(ctx):
    """MAP_SHARED read/write mapping of the ring at page 64 works; every entry's flags is 0"""
    entries = ctx.min_ring(1024)
    vm, fd = _ring_vcpu(ctx, entries)
    m = expect_ok(lambda: ctx.mmap(fd, entries * 16, RING_OFF),
                  f"mmap(MAP_SHARED, RW, {entries * 16} bytes at page 64)")
    flags = _flags(m)
    expect_eq(len(flags), entries, "entries visible in the mapping")
    expect_eq(int(np.count_nonzero(flags)), 0, "entries with non-zero flags in a new ring")
    ctx.diag(f"{entries} entries mapped, all flags 0; non-zero bytes in the ring: "
             f"{np.count_nonzero(np.frombuffer(m, np.uint8))}")
    # Shared with the kernel's page, not a private copy: a second mapping sees a store.
    m[8:16] = (0x5A5A).to_bytes(8, "little")        # entry 0's offset field, flags stay 0
    other = expect_ok(lambda: ctx.mmap(fd, PAGE, RING_OFF), "a second mapping of ring page 0")
    expect_eq(int.from_bytes(other[8:16], "little"), 0x5A5A,
              "a store through one mapping, read through another")


@check("ring.mmap.private", 21, f"{MMAP} (kvm_page_in_dirty_ring && !VM_SHARED)",
       fault="mmap_invert")
def private(ctx):
    """MAP_PRIVATE of ring pages (first or last page of the mapping in the ring) is EINVAL"""
    entries = ctx.min_ring(1024)                    # 4 pages or more at 4 KiB
    vm, fd = _ring_vcpu(ctx, entries)
    cases = [(entries * 16, RING_OFF, mmap.PROT_READ, "whole ring, PROT_READ"),
             (entries * 16, RING_OFF, RW, "whole ring, PROT_READ|PROT_WRITE"),
             (PAGE, RING_OFF + PAGE, mmap.PROT_READ, "ring page 1 alone"),
             (2 * PAGE, RING_OFF - PAGE, mmap.PROT_READ, "pages 63-64 (last page in ring)")]
    for length, offset, prot, what in cases:
        expect_errno(lambda: _mapped(ctx.mmap(fd, length, offset, mmap.MAP_PRIVATE, prot)),
                     "EINVAL", f"mmap(MAP_PRIVATE, {what})")


@check("ring.mmap.exec", 22, f"{MMAP} (VM_EXEC); mm/mmap.c do_mmap() (path_noexec() with "
       "VM_EXEC: -EPERM), fs/anon_inodes.c SB_I_NOEXEC (commit 1ed95281c0c7, v6.16; stable 6.15.4 and LTS)",
       fault="mmap_invert")
def exec_(ctx):
    """A PROT_EXEC mapping of the ring fails: EINVAL (KVM) or EPERM (VFS, >= 6.16 or a stable backport)"""
    entries = ctx.min_ring()
    vm, fd = _ring_vcpu(ctx, entries)
    seen = []
    for flags, prot, what in ((mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_EXEC, "SHARED R-X"),
                              (mmap.MAP_SHARED, RW | mmap.PROT_EXEC, "SHARED RWX"),
                              (mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC,
                               "PRIVATE R-X")):
        e = expect_errno(lambda: _mapped(ctx.mmap(fd, entries * 16, RING_OFF, flags, prot)),
                         ("EINVAL", "EPERM"), f"mmap({what}) of the ring")
        seen.append(f"{what} -> {e.errno_name}")
    ctx.diag("; ".join(seen) + " (EPERM = refused by do_mmap: anon inodes are SB_I_NOEXEC; "
             "EINVAL = refused by kvm_vcpu_mmap)")


@check("ring.mmap.read_only", 23, f"{MMAP}; arch/x86/mm/fault.c access_error()",
       fault="mmap_invert")
def read_only(ctx):
    """A PROT_READ mapping of the ring works and reads 0; a store to it is SIGSEGV (child)"""
    entries = ctx.min_ring()
    vm, fd = _ring_vcpu(ctx, entries)
    m = expect_ok(lambda: ctx.mmap(fd, entries * 16, RING_OFF, mmap.MAP_SHARED, mmap.PROT_READ),
                  "mmap(MAP_SHARED, PROT_READ) of the ring")
    expect_eq(int(np.count_nonzero(_flags(m))), 0, "non-zero flags through the read-only map")
    view = np.frombuffer(m, np.uint8)
    addr = view.ctypes.data
    del view                                        # no exported buffer left: m can close

    def child(say):
        say(f"read {ctypes.c_uint32.from_address(addr).value}")
        say("storing")
        ctypes.c_uint32.from_address(addr).value = 0   # same value: harmless if it lands
        say("stored")
    _expect_death(ctx, _in_child(child), signal.SIGSEGV, ("read 0", "storing"),
                  "store to a PROT_READ ring mapping")


@check("ring.mmap.private_edges", 24, f"{MMAP} (only vm_pgoff and the last page are tested)",
       fault="mmap_invert")
def private_edges(ctx):
    """MAP_PRIVATE from page 63 to past the ring's end is accepted (only its ends are tested)"""
    entries = ctx.min_ring()
    vm, fd = _ring_vcpu(ctx, entries)
    end = abi.KVM_DIRTY_LOG_PAGE_OFFSET + entries * 16 // PAGE     # first page past the ring
    length = entries * 16 + 2 * PAGE                # page 63, the ring, page ``end``
    expect_ok(lambda: ctx.mmap(fd, length, RING_OFF - PAGE, mmap.MAP_PRIVATE, mmap.PROT_READ),
              f"mmap(MAP_PRIVATE, pages 63-{end}) whose first and last page are not ring "
              f"pages (ring: pages 64-{end - 1})")
    ctx.diag(f"pages 63-{end} accepted and left untouched (kvm_vcpu_mmap checks only the "
             "first and last page)")


@check("ring.mmap.single_page", 26, f"{MMAP}; virt/kvm/dirty_ring.c kvm_dirty_ring_get_page()",
       fault="mmap_invert")
def single_page(ctx):
    """Mapping one ring page alone (the 2nd) works and shows that page of the ring"""
    entries = ctx.min_ring(1024)
    vm, fd = _ring_vcpu(ctx, entries)
    one = expect_ok(lambda: ctx.mmap(fd, PAGE, RING_OFF + PAGE),
                    "mmap(MAP_SHARED, RW) of ring page 1 alone")
    expect_eq(int(np.count_nonzero(_flags(one))), 0, "non-zero flags in ring page 1")
    full = expect_ok(lambda: ctx.mmap(fd, entries * 16, RING_OFF), "mmap of the whole ring")
    first = PAGE // 16                              # first entry of ring page 1
    full[first * 16 + 8:first * 16 + 16] = (0xC0FFEE).to_bytes(8, "little")   # offset field
    expect_eq(int.from_bytes(one[8:16], "little"), 0xC0FFEE,
              f"entry {first} written through the whole-ring map, read through the page map")


@check("ring.mmap.past_ring", 25, f"{MMAP} (len not validated); {FAULT}", fault="mmap_invert")
def past_ring(ctx):
    """A mapping longer than the ring succeeds; its first page past the ring is SIGBUS (child)"""
    entries = ctx.min_ring()
    vm, fd = _ring_vcpu(ctx, entries)

    def child(say):
        m = ctx.mmap(fd, entries * 16 + PAGE, RING_OFF)
        say("mapped")
        say(f"ring {m[0]}")
        say("touching")
        m[entries * 16]                             # the page after the ring: not backed
        say("touched")
    _expect_death(ctx, _in_child(child), signal.SIGBUS, ("mapped", "ring 0", "touching"),
                  "first access one page past the ring")


@check("ring.mmap.wrong_offset", 25, f"{MMAP}; {FAULT}", fault="mmap_invert")
def wrong_offset(ctx):
    """A mapping starting at page 63 succeeds; ring page 64 reads, page 63 is SIGBUS (child)"""
    entries = ctx.min_ring()
    vm, fd = _ring_vcpu(ctx, entries)

    def child(say):
        m = ctx.mmap(fd, 2 * PAGE, RING_OFF - PAGE)
        say("mapped")
        say(f"ring {m[PAGE]}")
        say("touching")
        m[0]                                        # page 63: nothing there
        say("touched")
    _expect_death(ctx, _in_child(child), signal.SIGBUS, ("mapped", "ring 0", "touching"),
                  "first access of page 63")


@check("ring.mmap.no_ring", 25, f"{MMAP} (kvm->dirty_ring_size == 0); {FAULT}",
       fault="mmap_invert")
def no_ring(ctx):
    """Without a ring, mapping page 64 succeeds and its first access is SIGBUS (child)"""
    vm, fd = _ring_vcpu(ctx, None)

    def child(say):
        m = ctx.mmap(fd, PAGE, RING_OFF)
        say("mapped")
        say("touching")
        m[0]
        say("touched")
    _expect_death(ctx, _in_child(child), signal.SIGBUS, ("mapped", "touching"),
                  "first access of page 64 with no ring")


def _try(say, name, fn):
    try:
        say(f"{name} ok {fn()}")
    except KvmError as e:
        say(f"{name} err {e.errno_name}")


@check("ring.mmap.fork_eio", 27, "virt/kvm/kvm_main.c kvm_vm_ioctl(), kvm_vcpu_ioctl() "
       "(kvm->mm != current->mm: -EIO); api.rst 1 (General description: same process), "
       "2 (Restrictions: fork)", fault="errno_swap")
def fork_eio(ctx):
    """After fork(), VM and vCPU ioctls in the child are EIO; /dev/kvm ioctls still work"""
    vm, fd = _ring_vcpu(ctx, ctx.min_ring())
    regs = abi.kvm_regs()

    def child(say):
        _try(say, "vm.check_extension", lambda: vm.check_extension(abi.KVM_CAP_DIRTY_LOG_RING))
        _try(say, "vm.reset_dirty_rings", vm.reset_dirty_rings)
        _try(say, "vcpu.get_regs", lambda: ioctl(fd, abi.KVM_GET_REGS, ctypes.addressof(regs),
                                                 "KVM_GET_REGS"))
        _try(say, "kvm.get_api_version", ctx.kvm.get_api_version)
    kind, value, lines = _in_child(child)
    ctx.diag(f"child: {kind} {value}; {lines}")
    expect_eq((kind, value), ("exit", 0), "child finished normally")
    got = dict(l.split(" ", 1) for l in lines if " " in l)
    for name in ("vm.check_extension", "vm.reset_dirty_rings", "vcpu.get_regs"):
        expect_eq(got.get(name), "err EIO", f"{name} in the forked child")
    expect_eq(got.get("kvm.get_api_version"), f"ok {abi.KVM_API_VERSION}",
              "KVM_GET_API_VERSION on /dev/kvm in the forked child")
    # The parent still owns the VM.
    expect_eq(expect_ok(vm.reset_dirty_rings, "KVM_RESET_DIRTY_RINGS in the parent"), 0,
              "entries reset in the parent")
