"""Fault injection: make the kernel (as a check sees it) lie, so that every check is
shown able to fail. Used by the test suite; each check names the fault it must catch.
Not a kernel ABI mirror: it falsifies what the kernel answers, never calls it differently.

The injector stands where every kernel access passes: minivmm._sys.ioctl (through its
``tracer`` hook), minivmm._sys.map_shared, and the Ctx methods that read the ring, mmap
and run guests.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno

import numpy as np

from .. import _sys, abi
from .._sys import KvmError
from . import ctx as ctxmod

FAULTS: dict = {}


def fault(name: str, doc: str):
    """Register a context-manager factory under ``name``."""
    def deco(fn):
        cm = contextlib.contextmanager(fn)
        cm.doc = doc
        FAULTS[name] = cm
        return cm
    return deco


@contextlib.contextmanager
def _ioctl_hook(change):
    """Install ``change(name, request, arg, ret, err) -> (ret, err)`` around every ioctl."""
    def tracer(fd, request, arg, name, hints, run=None):
        ret = _sys._ioctl(fd, request, arg)
        err = ctypes.get_errno() if ret < 0 else 0
        ret, err = change(name, request, arg, ret, err)
        if ret < 0:
            raise _sys.failure(fd, name, err, hints)
        return ret
    with _patch(_sys, "tracer", tracer):
        yield


@contextlib.contextmanager
def _patch(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@fault("errno_swap", "every failing ioctl reports ENOTTY instead of its real errno")
def errno_swap():
    with _ioctl_hook(lambda n, q, a, ret, err: (ret, errno.ENOTTY if ret < 0 else 0)):
        yield


@fault("fake_success", "every failing ioctl reports success (0)")
def fake_success():
    with _ioctl_hook(lambda n, q, a, ret, err: (0, 0) if ret < 0 else (ret, err)):
        yield


_VM_CALLS = ("KVM_ENABLE_CAP", "KVM_SET_USER_MEMORY_REGION", "KVM_GET_DIRTY_LOG",
             "KVM_CLEAR_DIRTY_LOG", "KVM_RESET_DIRTY_RINGS")


@fault("vm_calls_fail", "KVM_ENABLE_CAP, memslot and dirty-log ioctls fail with EINVAL")
def vm_calls_fail():
    def change(name, q, a, ret, err):
        if name.startswith(_VM_CALLS):
            return -1, errno.EINVAL
        return ret, err
    with _ioctl_hook(change):
        yield


@fault("small_rings_refused", "KVM_ENABLE_CAP refuses dirty rings under 16 KiB with EINVAL "
       "(a kernel that reserves more entries than it should)")
def small_rings_refused():
    def change(name, q, a, ret, err):
        if q == abi.KVM_ENABLE_CAP and ret >= 0:
            cap = abi.kvm_enable_cap.from_address(a)
            if cap.cap in (abi.KVM_CAP_DIRTY_LOG_RING, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) \
                    and (cap.args[0] & 0xFFFFFFFF) < 16384:
                return -1, errno.EINVAL
        return ret, err
    with _ioctl_hook(change):
        yield


def _one_more(*calls):
    """The named ioctls answer one more than the kernel did (when they succeed)."""
    return _ioctl_hook(lambda name, q, a, ret, err:
                       (ret + 1, err) if name in calls and ret >= 0 else (ret, err))


@fault("check_extension_lie", "KVM_CHECK_EXTENSION answers one more than the kernel")
def check_extension_lie():
    with _one_more("KVM_CHECK_EXTENSION"):
        yield


@fault("ring_cap_in_entries", "KVM_CHECK_EXTENSION of the ring capabilities answers the max "
       "in entries (65536), not bytes")
def ring_cap_in_entries():
    caps = (abi.KVM_CAP_DIRTY_LOG_RING, abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
    with _ioctl_hook(lambda name, q, a, ret, err:
                     (ret // 16, err) if name == "KVM_CHECK_EXTENSION" and a in caps
                     and ret > 0 else (ret, err)):
        yield


@fault("version_lie", "system ioctls (API version, vCPU mmap size) answer one more")
def version_lie():
    with _one_more("KVM_GET_API_VERSION", "KVM_GET_VCPU_MMAP_SIZE"):
        yield


@fault("reset_count_lie", "KVM_RESET_DIRTY_RINGS returns one more than it reset")
def reset_count_lie():
    with _one_more("KVM_RESET_DIRTY_RINGS"):
        yield


@fault("bitmap_flip", "KVM_GET_DIRTY_LOG hands back its bitmap with bit 0 flipped")
def bitmap_flip():
    def change(name, q, a, ret, err):
        if name == "KVM_GET_DIRTY_LOG" and ret >= 0:
            from ..abi import kvm_dirty_log
            log = kvm_dirty_log.from_address(a)
            word = ctypes.c_uint64.from_address(log.dirty_bitmap)
            word.value ^= 1
        return ret, err
    with _ioctl_hook(change):
        yield


@contextlib.contextmanager
def _ring_reads(on_harvest, on_entries):
    """Patch both ways a check reads a ring: Ctx.harvest's (slots, offsets) go through
    ``on_harvest``, Ctx.ring_entries' raw (flags, slot, offset) list through ``on_entries``."""
    real_h, real_e = ctxmod.Ctx.harvest, ctxmod.Ctx.ring_entries

    def harvest(self, ring):
        return on_harvest(*real_h(self, ring))

    def entries(self, ring, start=0, count=None):
        return on_entries(real_e(self, ring, start, count))
    with _patch(ctxmod.Ctx, "harvest", harvest), _patch(ctxmod.Ctx, "ring_entries", entries):
        yield


def _dirty_positions(out):
    return [i for i, e in enumerate(out) if e[0] & 1]


@fault("ring_drop", "ring harvests and raw ring reads lose their last DIRTY entry")
def ring_drop():
    def entries(out):
        dirty = _dirty_positions(out)
        if dirty:
            out[dirty[-1]] = (0, 0, 0)
        return out
    with _ring_reads(lambda s, o: (s[:-1], o[:-1]), entries):
        yield


@fault("ring_spurious", "ring harvests gain an entry for page 4 of slots 1 and 2, written by "
       "no guest there (as a kernel logging an unlogged or read-only slot, or a host write)")
def ring_spurious():
    def harvest(s, o):
        return (np.concatenate([s, np.array([1, 2], s.dtype)]),
                np.concatenate([o, np.array([4, 4], o.dtype)]))
    with _ring_reads(harvest, lambda out: out):
        yield


@fault("ring_duplicate", "ring harvests repeat their first entry; raw reads repeat it too")
def ring_duplicate():
    def harvest(s, o):
        if len(s):
            return np.concatenate([s, s[:1]]), np.concatenate([o, o[:1]])
        return s, o

    def entries(out):
        dirty = _dirty_positions(out)
        if dirty and dirty[-1] + 1 < len(out):
            out[dirty[-1] + 1] = out[dirty[0]]
        return out
    with _ring_reads(harvest, entries):
        yield


@fault("ring_offset_shift", "ring entries report offset + 1 (the gfn+1 bug the 2025 selftest "
                            "rework exposed)")
def ring_offset_shift():
    with _ring_reads(lambda s, o: (s, o + 1),
                     lambda out: [(f, s, o + 1 if f & 1 else o) for f, s, o in out]):
        yield


@fault("hide_ring_full", "KVM_RUN's KVM_EXIT_DIRTY_RING_FULL is reported as an unknown exit")
def hide_ring_full():
    real = ctxmod.Ctx.run_to_port

    def run_to_port(self, m, index=0, timeout=10.0):
        ev = real(self, m, index, timeout)
        if ev.kind == "ring-full":
            return ctxmod.Event("other", 0, {"reason": "UNKNOWN (injected)"})
        return ev
    with _patch(ctxmod.Ctx, "run_to_port", run_to_port):
        yield


@fault("mmap_invert", "mmap of a KVM fd fails with ENOMEM where the kernel allowed it, and "
                      "succeeds (anonymous memory) where the kernel refused it")
def mmap_invert():
    import mmap as _mmap
    real = ctxmod.Ctx.mmap

    def fake(self, fd, length, offset, flags=_mmap.MAP_SHARED,
             prot=_mmap.PROT_READ | _mmap.PROT_WRITE):
        try:
            real(self, fd, length, offset, flags, prot)
        except KvmError:
            m = _mmap.mmap(-1, length)
            self.on_close(m.close)
            return m
        raise KvmError("mmap", errno.ENOMEM)

    def fake_shared(fd, length, offset=0, name="mmap", **_):   # prot, populate, what
        raise KvmError(name, errno.ENOMEM)
    with _patch(ctxmod.Ctx, "mmap", fake), _patch(_sys, "map_shared", fake_shared):
        yield


@contextlib.contextmanager
def _never_reaches_kernel(call: str):
    """``call`` returns 0 without reaching the kernel; every other ioctl is untouched."""
    old = _sys.tracer

    def tracer(fd, request, arg, name, hints, run=None):
        if name == call:
            return 0
        if old is not None:
            return old(fd, request, arg, name, hints, run=run)
        ret = _sys._ioctl(fd, request, arg)
        if ret < 0:
            err = ctypes.get_errno()
            raise _sys.failure(fd, name, err, hints)
        return ret
    with _patch(_sys, "tracer", tracer):
        yield


@fault("clear_log_ignored", "KVM_CLEAR_DIRTY_LOG reports success (0) without clearing or "
                            "re-protecting anything")
def clear_log_ignored():
    with _never_reaches_kernel("KVM_CLEAR_DIRTY_LOG"):
        yield


@fault("reset_skipped", "KVM_RESET_DIRTY_RINGS returns 0 without reaching the kernel "
                        "(harvested entries are never recycled, pages never re-armed)")
def reset_skipped():
    with _never_reaches_kernel("KVM_RESET_DIRTY_RINGS"):
        yield
