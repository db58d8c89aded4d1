"""The one door to the kernel: ``ioctl(2)`` through libc via ctypes, and KvmError.

Mirrors the calling convention of Documentation/virt/kvm/api.rst sections 1
("General description", which describes the file descriptors) and 4 ("API
description"): every KVM call is an ioctl on a file descriptor that returns -1
and sets errno on failure. ctypes releases
the GIL around the foreign call, so vCPU threads really run in parallel
inside KVM_RUN.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import mmap as _mmap
import os
import resource     # here: importing it once out of fds needs an fd of its own
import signal
import threading
import weakref

from .abi.ioctls import KVM_RUN

__all__ = ["KvmError", "KvmUnavailable", "ioctl", "errno_name", "mmap", "munmap", "map_shared",
           "libc"]

libc = ctypes.CDLL(None, use_errno=True)
_ioctl = libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

# A second handle without argtypes skips ctypes' argument conversion (~0.9 us of ~1.8 us
# per call here; half of it right after KVM_RUN, at every ring-full exit's reset). Only
# safe for small request numbers: without argtypes an int travels as a C int. KVM_RUN
# (0xAE80) uses it directly; ioctl() uses it for every argument-less call (_IO numbers).
_ioctl_fast = ctypes.CDLL(None, use_errno=True).ioctl
_ioctl_fast.restype = ctypes.c_int
_FAST_MAX = 2 ** 31

# pthread_sigmask through ctypes: ~1.6 us a block/restore pair, where signal.pthread_sigmask
# with every signal costs ~130 us (it converts Python sets both ways)
_sigmask = libc.pthread_sigmask
_sigmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_sigmask.restype = ctypes.c_int
_SIGSET = ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong)))   # glibc sigset_t
_ALL_SIGNALS = _SIGSET(*[~0 & (2 ** (8 * ctypes.sizeof(ctypes.c_ulong)) - 1)] * len(_SIGSET()))
_SIG_BLOCK, _SIG_SETMASK = signal.SIG_BLOCK, signal.SIG_SETMASK

# mmap flag to fault every page in when mapping (0 where the platform has none)
MAP_POPULATE = getattr(_mmap, "MAP_POPULATE", 0)

# Optional stand-in for every ioctl: tracer(fd, request, arg, name, hints, run=None)
# performs the call itself and returns its result or raises KvmError, as ioctl() does
# (minivmm.trace prints each call; abicheck.faults injects faults). None costs one
# attribute test per call. A tracer with mmap and munmap methods (minivmm.trace's) also
# stands in for mmap() and munmap() below; one without them leaves mappings untraced.
tracer = None


# Where Python's table picks glibc's alias, the kernel's own name (include/uapi/asm-generic/
# errno.h: EDEADLOCK is defined as EDEADLK; ENOTSUP is glibc's, the kernel returns EOPNOTSUPP)
_KERNEL_ERRNO_NAMES = {_errno.EDEADLK: "EDEADLK", _errno.EOPNOTSUPP: "EOPNOTSUPP"}


def errno_name(err: int) -> str:
    """The errno's name as the kernel headers (and strace) spell it."""
    return _KERNEL_ERRNO_NAMES.get(err) or _errno.errorcode.get(err, f"errno {err}")


class KvmError(OSError):
    """A KVM call failed. Names the call, the errno and, where known, the likely cause."""

    def __init__(self, call: str, err: int, hint: str | None = None):
        self.call = call
        self.hint = hint
        super().__init__(err, os.strerror(err) if err else "failed")

    def __reduce__(self):
        # OSError's own would call us with (errno, strerror): a KvmError raised in a worker
        # process could not be unpickled in the parent
        return type(self), (self.call, self.errno, self.hint)

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)

    def __str__(self) -> str:
        text = f"{self.call} failed: {self.errno_name} ({self.strerror})"
        return f"{text}: {self.hint}" if self.hint else text


class KvmUnavailable(KvmError):
    """/dev/kvm is missing or cannot be opened."""


@contextlib.contextmanager
def fd_creation():
    """Hold SIGINT back while a new fd is made and handed to its owner: a Ctrl-C landing
    in between would leak it (and a vCPU fd keeps its whole VM alive). The interrupt is
    raised as the block ends, once the fd is owned. (Also used where a thread is made and
    started: one made but never started could never be joined.)

    Blocking SIGINT in this thread is not enough in the main thread, where Python raises
    KeyboardInterrupt: a process-directed SIGINT goes to any other thread that lets it in
    (a threading.Timer, a user's thread) and its handler still runs here, and
    _thread.interrupt_main() raises with no signal at all. So the main thread's handler is
    swapped for one that only notes the interrupt, and the old one called as the block ends.
    """
    handler, held = None, []

    def hold(signum, frame):
        held.append(frame)
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):      # else SIG_DFL/SIG_IGN or not Python's: the mask alone
            signal.signal(signal.SIGINT, hold)
        else:
            handler = None
    # After the swap: pthread_sigmask() runs a pending handler once the mask is set, and a
    # KeyboardInterrupt raised there, before the try, left SIGINT blocked for good
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        # not where the block set its own (fork_child's child ignores SIGINT)
        restore = handler is not None and signal.getsignal(signal.SIGINT) is hold
        # the mask first, while hold() still takes what it lets in: the program's handler
        # raising between the two would leave SIGINT blocked
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if restore:
            signal.signal(signal.SIGINT, handler)
            if held:
                handler(signal.SIGINT, held[0])


def fork_child() -> int:
    """``os.fork()`` whose child ignores SIGINT. A Ctrl-C at the terminal reaches the whole
    process group; the parent alone reports it (and kills and reaps the child), so the user
    sees one line. SIGINT is held back across the fork: a child could otherwise take one
    before it starts ignoring it. The child is killed when the parent dies."""
    parent = os.getpid()
    with fd_creation():
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # The parent is the child's watchdog: killed outright (SIGTERM, SIGHUP, SIGKILL)
            # it reaps nothing, and a child looping in keystone spun on for ever. Die with
            # it (prctl(2) PR_SET_PDEATHSIG; the forking thread waits for the child)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 \
                    and os.getppid() != parent:     # it was gone before the prctl
                os._exit(1)
    return pid


_PR_SET_PDEATHSIG = 1       # include/uapi/linux/prctl.h


def reap(pid: int, kill: bool) -> int:
    """Wait for child ``pid``, killing it first if ``kill``; return its wait status."""
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return os.waitpid(pid, 0)[1]


class FdOwner:
    """Base of Kvm, Vm and Vcpu: objects that own a file descriptor of this process."""

    def __reduce_ex__(self, protocol):
        # A copy would share the fd and its one close: closing either leaves the other
        # calling the kernel with a number it may give to another VM. A pickle sent to
        # another process carries a number that means nothing there
        raise TypeError(f"a {type(self).__name__} cannot be copied or pickled: it owns a file "
                        "descriptor of this process; make a new one where it is needed")


def own_fd(owner, fd: int) -> "weakref.finalize":
    """Tie ``fd`` to ``owner``: call the result to close it (once); if the owner is dropped
    without close(), the garbage collector closes it, so a forgotten VM leaks no fd."""
    return weakref.finalize(owner, os.close, fd)


def ioctl(fd: int, request: int, arg=0, name: str = "ioctl", hints: dict | None = None,
          retry_eintr: bool = True) -> int:
    """Issue one ioctl; return its non-negative result or raise KvmError.

    ``hints`` maps an errno to a sentence explaining the likely cause. A call a signal
    interrupted (KVM_CREATE_VM can be) is issued again, as Python retries its own system
    calls (PEP 475), traced or not; a handler that raises stops it. Not KVM_RUN, whose
    EINTR is a kick or immediate_exit and the caller's to handle, nor with
    ``retry_eintr=False`` (a check that EINTR never happens).

    ``arg`` is the C ``unsigned long``: an int from 0 to 2**64 - 1. Anything else is
    refused here, as ctypes would pass None as 0, a str as its address and cut a larger
    int to its low 64 bits (a wrong call, not an error).
    """
    if arg.__class__ is not int or not 0 <= arg < _ARG_LIMIT:
        _check_arg(arg, name)
    retry = retry_eintr and request != KVM_RUN
    while True:
        if tracer is not None:
            try:
                return tracer(fd, request, arg, name, hints)
            except KvmError as e:
                if not retry or e.errno != _errno.EINTR:
                    raise
                continue
        if arg == 0 and request < _FAST_MAX:
            ret = _ioctl_fast(fd, request, None)
        else:
            ret = _ioctl(fd, request, arg)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if not retry or err != _errno.EINTR:
            raise failure(fd, name, err, hints)


_ARG_LIMIT = 2 ** 64


def _check_arg(arg, name: str) -> None:
    """Raise the TypeError or ValueError for an ioctl argument that is not a u64."""
    check_width(name, [("the argument", arg, 64)])


def check_width(name: str, fields) -> None:
    """Each (what, value, bits) an int that fits its C field: ctypes would keep the low
    bits without a word (a slot 2**32 becomes slot 0)."""
    for what, value, bits in fields:
        # a bool too: Python counts True as 1, but a slot, a cap or an address given
        # True is a mistake (README: a bool is refused where an id or a number is asked)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: {what} must be an int, not {type(value).__name__}")
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name}: {what} {value} does not fit in {bits} bits unsigned")


def ioctl_signals_held(fd: int, request: int, arg=0, name: str = "ioctl",
                       hints: dict | None = None) -> int:
    """ioctl() with every signal held back in this thread until it returns (delivered
    then). For KVM_RESET_DIRTY_RINGS: a pending signal stops kvm_dirty_ring_reset()
    part-way, and the batch of entries it was coalescing is counted as reset but never
    write-protected again, so later writes to those pages (up to 64) go unlogged
    (virt/kvm/dirty_ring.c, since commit 49005a2a3d2a, v6.17; abi.md rule 40)."""
    if getattr(_thread_state, "signals_blocked", False):
        return ioctl(fd, request, arg, name, hints)     # held back already (vCPU threads)
    with signals_held():
        return ioctl(fd, request, arg, name, hints)


_thread_state = threading.local()


@contextlib.contextmanager
def signals_held():
    """Every signal held back in this thread inside the block (delivered as it ends);
    threads started there begin with all of them blocked."""
    old = _SIGSET()
    _sigmask(_SIG_BLOCK, _ALL_SIGNALS, old)
    try:
        yield
    finally:
        _sigmask(_SIG_SETMASK, old, None)


def block_thread_signals() -> None:
    """Hold every signal back in this thread from now on (minivmm's own vCPU and reaper
    threads). A vCPU thread lets its kick in during KVM_RUN only (Vcpu.set_run_signals,
    api.rst 4.21), so its resets never need ioctl_signals_held's two extra calls."""
    _sigmask(_SIG_BLOCK, _ALL_SIGNALS, None)
    _thread_state.signals_blocked = True


def failure(fd: int, name: str, err: int, hints: dict | None) -> KvmError:
    """The KvmError for a failed ioctl, with the caller's hint for this errno, if any."""
    hint = (hints or {}).get(err)
    if hint is None and fd < 0:
        hint = "its /dev/kvm, VM or vCPU has been closed"
    elif hint is None and err == _errno.EIO:
        # kvm_vm_ioctl()/kvm_vcpu_ioctl() (virt/kvm/kvm_main.c): EIO when kvm->mm is not
        # the caller's or the VM is dead
        hint = ("this VM belongs to another process (after fork, api.rst 2, Restrictions), "
                "or KVM marked it dead after an internal error (see dmesg)")
    elif hint is None and err in (_errno.EMFILE, _errno.ENFILE):
        hint = _fd_limit_hint(err)
    return KvmError(name, err, hint)


def _fd_limit_hint(err: int) -> str:
    """Why a call that makes an fd (KVM_CREATE_VM, KVM_CREATE_VCPU) found none: each
    VM and each vCPU holds one for as long as it is open. Many VMs at once meet the
    process's open-file limit long before anything of KVM's (4000 here, at ulimit -n
    20000), and the bare EMFILE did not say which limit."""
    if err == _errno.ENFILE:
        return ("the system's open-file table is full (sysctl fs.file-max): every VM and "
                "every vCPU holds a file descriptor")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (f"this process has reached its open-file limit (ulimit -n, {soft}): every VM "
            "and every vCPU holds a file descriptor until closed; close the VMs you are "
            "done with or raise the limit")


def mmap(fd: int, length: int, flags: int, prot: int, offset: int = 0,
         what: str = "") -> _mmap.mmap:
    """``mmap.mmap()`` of ``fd`` (-1 with MAP_ANONYMOUS: guest memory), shown by the tracer
    when one is set (``what`` says what the mapping is for); raises OSError as mmap.mmap."""
    if tracer is not None:
        traced = getattr(tracer, "mmap", None)
        if traced is not None:
            return traced(fd, length, flags, prot, offset, what)
    return _mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)


def munmap(m: _mmap.mmap, what: str = "") -> None:
    """``m.close()``, the munmap() of a mapping mmap() made, shown by the tracer when one is
    set. Raises BufferError, and unmaps nothing, while a view of ``m`` is alive."""
    if tracer is not None:
        traced = getattr(tracer, "munmap", None)
        if traced is not None:
            return traced(m, what)
    m.close()


def map_shared(fd: int, length: int, offset: int = 0, name: str = "mmap",
               prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE,
               populate: bool = False, what: str = "") -> _mmap.mmap:
    """mmap a region of a KVM fd (kvm_run page, dirty ring) shared with the kernel;
    ``populate``: map every page now (MAP_POPULATE) rather than at its first touch.
    Unmap it with munmap()."""
    flags = _mmap.MAP_SHARED | (MAP_POPULATE if populate else 0)
    try:
        return mmap(fd, length, flags, prot, offset, what)
    except OSError as e:
        raise KvmError(name, e.errno or 0) from None
