"""``--trace-ioctls``: every ioctl minivmm issues, decoded, one line each, like strace, and
the mmap()s it makes for KVM: the vCPU fd's ``struct kvm_run`` and dirty ring, guest memory.

Mirrors three pieces of the kernel ABI:

- the ioctl request encoding of ``include/uapi/asm-generic/ioctl.h``: bits 30-31 are the
  direction (_IOC_WRITE = 1: userspace passes a struct in; _IOC_READ = 2: the kernel fills
  it), bits 16-29 the argument's size, 8-15 the type (KVMIO = 0xAE), 0-7 the number. The
  direction says *when* the argument means something: a struct going in is decoded before
  the call, one coming out after it (both for _IOWR);
- the argument structs of ``include/uapi/linux/kvm.h`` (minivmm.abi.structs), printed
  field by field with flags and capability numbers by name, and, after KVM_RUN, the exit
  the kernel wrote into ``struct kvm_run``;
- the vCPU fd's mmap layout: KVM_GET_VCPU_MMAP_SIZE bytes at offset 0 hold ``struct
  kvm_run`` (api.rst 4.5, 4.10), the dirty ring lies at KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE
  and is the ring's bytes long (api.rst 7.36); guest memory is anonymous memory whose
  address KVM_SET_USER_MEMORY_REGION then receives as userspace_addr (api.rst 4.35).

A line looks like::

    ioctl(vm 5, KVM_SET_USER_MEMORY_REGION, {slot=1, flags=LOG_DIRTY_PAGES, ...}) = 0  <12.3 us>
    ioctl(vcpu0 7, KVM_RUN, 0) = 0 exit=IO {direction=out, port=0xe9, ...}  <45.1 us>
    ioctl(vm 5, KVM_ENABLE_CAP, {cap=KVM_CAP_DIRTY_LOG_RING_ACQ_REL, ...}) = -1 EINVAL (...)
    mmap(vcpu0 7, 0x3000, PROT_READ|PROT_WRITE, MAP_SHARED, offset 0) = 0x7f...  [struct kvm_run]
    munmap(0x7f..., 0x3000) = 0  [struct kvm_run]

and a call from a forked child (abi-check's fork checks) starts with ``[pid N]``. The
address of a mapping is read from Python's mmap object (a ctypes or numpy view made and
dropped at once); a mapping Python refuses before mmap(2) (ValueError) or the garbage
collector unmaps (no close()) is not shown, nor the dup() of the fd Python's mmap keeps.

Off by default and free when off: ``_sys.ioctl``, ``_sys.mmap`` and ``_sys.munmap`` only
test ``_sys.tracer is not None``. When on, the tracer is that ``_sys.tracer``: it issues the
ioctl (or mmap, munmap) itself and fails exactly as ``_sys`` does. The duration covers the
call alone, not the decoding or the printing.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import threading
import time

from . import _sys
from .abi import constants as c
from .abi import ioctls as i
from .abi import structs as s

__all__ = ["Tracer", "install", "uninstall", "tracing", "ioc_dir", "fd_kind_from_link",
           "decode", "decode_arg", "describe_exit", "write_line", "map_address", "IOC_WRITE",
           "IOC_READ"]

# include/uapi/asm-generic/ioctl.h
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
_IOC_DIRSHIFT = 30


def ioc_dir(request: int) -> int:
    """_IOC_DIR: IOC_WRITE (struct in), IOC_READ (struct out), both, or IOC_NONE (a value)."""
    return (request >> _IOC_DIRSHIFT) & 3


# -- formatting of single values --

def _hex(v: int) -> str:
    return hex(v) if v else "0"


def _flags(value: int, names: dict) -> str:
    """Bits by name, joined with '|' like C; leftover bits in hex; 0 stays 0."""
    if not value:
        return "0"
    parts = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(names)
    return "|".join(parts + ([hex(rest)] if rest else []))


def _bit_names(prefix: str) -> dict:
    return {v: k[len(prefix):] for k, v in vars(c).items()
            if k.startswith(prefix) and isinstance(v, int)}


_MEM_FLAGS = _bit_names("KVM_MEM_")            # LOG_DIRTY_PAGES, READONLY
_GUESTDBG_FLAGS = _bit_names("KVM_GUESTDBG_")  # ENABLE, SINGLESTEP, USE_SW_BP, ...


def _cap(v: int) -> str:
    return c.CAP_NAMES.get(v, str(v))


# -- the structs, field by field (each decoder takes a ctypes instance) --

def _fields(obj, spec) -> str:
    return "{" + ", ".join(f"{name}={fmt(getattr(obj, name))}" for name, fmt in spec) + "}"


_MEMORY_REGION = (("slot", str), ("flags", lambda v: _flags(v, _MEM_FLAGS)),
                  ("guest_phys_addr", _hex), ("memory_size", _hex), ("userspace_addr", _hex))
_REGS = tuple((name, _hex) for name, _ in s.kvm_regs._fields_)
_DIRTY_LOG = (("slot", str), ("dirty_bitmap", _hex))
_CLEAR_DIRTY_LOG = (("slot", str), ("first_page", str), ("num_pages", str),
                    ("dirty_bitmap", _hex))


def _segment(seg, with_l: bool) -> str:
    text = f"selector={_hex(seg.selector)}, dpl={seg.dpl}"
    return "{" + text + (f", l={seg.l}" if with_l else "") + "}"


def _sregs(sr) -> str:
    # 312 bytes of state; what says which mode and privilege the vCPU is in is enough here.
    return (f"{{cs={_segment(sr.cs, True)}, ss={_segment(sr.ss, False)}, cr0={_hex(sr.cr0)}, "
            f"cr3={_hex(sr.cr3)}, cr4={_hex(sr.cr4)}, efer={_hex(sr.efer)}}}")


# args[0] of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is a flag word (include/uapi/linux/kvm.h;
# api.rst 7.18); not _bit_names("KVM_DIRTY_LOG_"), which would take in PAGE_OFFSET too
_PROTECT2_FLAGS = {c.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: "MANUAL_PROTECT_ENABLE",
                   c.KVM_DIRTY_LOG_INITIALLY_SET: "INITIALLY_SET"}


def _enable_cap(ec) -> str:
    args = [_hex(a) for a in ec.args]
    if ec.cap == c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
        args[0] = _flags(ec.args[0], _PROTECT2_FLAGS)
    args = ", ".join(args)
    return f"{{cap={_cap(ec.cap)}, flags={_hex(ec.flags)}, args=[{args}]}}"


def _guest_debug(dbg) -> str:
    text = f"control={_flags(dbg.control, _GUESTDBG_FLAGS)}"
    regs = list(dbg.arch.debugreg)
    if any(regs):   # the debug registers only matter with USE_HW_BP
        text += ", debugreg=[" + ", ".join(_hex(r) for r in regs) + "]"
    return "{" + text + "}"


def _debugregs(d) -> str:
    db = ", ".join(_hex(r) for r in d.db)
    return f"{{db=[{db}], dr6={_hex(d.dr6)}, dr7={_hex(d.dr7)}, flags={_hex(d.flags)}}}"


def _cpuid2(cp) -> str:
    return f"{{nent={cp.nent}}}"     # the entries themselves would be 40 bytes each


def _signal_mask(o) -> str:
    """struct kvm_signal_mask and the sigset after it: the signals let in during KVM_RUN."""
    if o.len != 8:
        return f"{{len={o.len}}}"
    blocked = int.from_bytes(ctypes.string_at(ctypes.addressof(o) + 4, 8), "little")
    let_in = ", ".join(_signal_name(n) for n in range(1, 65) if not blocked >> (n - 1) & 1)
    return f"{{len=8, let in during KVM_RUN: {let_in or 'none'}}}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:              # a real-time signal has no name of its own
        return str(number)


_DECODERS = {
    s.kvm_userspace_memory_region: lambda o: _fields(o, _MEMORY_REGION),
    s.kvm_regs: lambda o: _fields(o, _REGS),
    s.kvm_sregs: _sregs,
    s.kvm_enable_cap: _enable_cap,
    s.kvm_dirty_log: lambda o: _fields(o, _DIRTY_LOG),
    s.kvm_clear_dirty_log: lambda o: _fields(o, _CLEAR_DIRTY_LOG),
    s.kvm_guest_debug: _guest_debug,
    s.kvm_debugregs: _debugregs,
    s.kvm_cpuid2: _cpuid2,
    s.kvm_signal_mask: _signal_mask,
    ctypes.c_uint64: lambda o: f"[{_hex(o.value)}]",   # KVM_SET_IDENTITY_MAP_ADDR: a u64 *
}


def decode(obj) -> str:
    """One of the structs minivmm passes to KVM, as ``{field=value, ...}``."""
    decoder = _DECODERS.get(type(obj))
    if decoder is None and isinstance(obj, ctypes.Structure) and hasattr(obj, "nent"):
        decoder = _cpuid2          # a cpuid2_type(n) instance: the header is what we show
    if decoder is None:
        raise TypeError(f"no decoder for {type(obj).__name__}")
    return decoder(obj)


# The struct behind each request that takes a pointer.
_ARG_TYPES = {
    i.KVM_GET_SUPPORTED_CPUID: s.kvm_cpuid2,    # header only: nent
    i.KVM_SET_CPUID2: s.kvm_cpuid2,
    i.KVM_GET_DIRTY_LOG: s.kvm_dirty_log,
    i.KVM_SET_USER_MEMORY_REGION: s.kvm_userspace_memory_region,
    i.KVM_SET_IDENTITY_MAP_ADDR: ctypes.c_uint64,
    i.KVM_ENABLE_CAP: s.kvm_enable_cap,
    i.KVM_CLEAR_DIRTY_LOG: s.kvm_clear_dirty_log,
    i.KVM_GET_REGS: s.kvm_regs,
    i.KVM_SET_REGS: s.kvm_regs,
    i.KVM_GET_SREGS: s.kvm_sregs,
    i.KVM_SET_SREGS: s.kvm_sregs,
    i.KVM_SET_GUEST_DEBUG: s.kvm_guest_debug,
    i.KVM_GET_DEBUGREGS: s.kvm_debugregs,
    i.KVM_SET_DEBUGREGS: s.kvm_debugregs,
    i.KVM_SET_SIGNAL_MASK: s.kvm_signal_mask,
}

# _IO requests take a value, not a pointer; how to show it.
_VALUE_FORMATS = {
    i.KVM_CHECK_EXTENSION: _cap,
    i.KVM_SET_TSS_ADDR: _hex,
}

# Requests whose result is a new fd: its number may have named something else before.
_NEW_FD = {i.KVM_CREATE_VM, i.KVM_CREATE_VCPU, i.KVM_GET_STATS_FD}


def _addr(arg) -> int:
    if isinstance(arg, ctypes.c_void_p):
        return arg.value or 0
    return int(arg or 0)


def decode_arg(request: int, arg) -> str:
    """The argument of ``request`` as it is in memory now (a pointer) or as passed (a value)."""
    if ioc_dir(request) == IOC_NONE:
        return _VALUE_FORMATS.get(request, str)(_addr(arg))
    addr = _addr(arg)
    cls = _ARG_TYPES.get(request)
    if cls is None or not addr:
        return _hex(addr)
    return decode(cls.from_address(addr))


# -- KVM_RUN: which exit, from struct kvm_run --

def describe_exit(run, data_at=None) -> str:
    """``exit=NAME {details}`` for the exit recorded in ``run`` (a kvm_run).

    ``data_at(offset, n)`` returns n bytes of the vCPU mapping at offset (where an IO exit
    leaves its data, page KVM_PIO_PAGE_OFFSET); without it the data is not shown.
    """
    reason = run.exit_reason
    text = f"exit={c.EXIT_NAMES.get(reason, str(reason))}"
    if reason == c.KVM_EXIT_IO:
        io = run.io
        out = io.direction == c.KVM_EXIT_IO_OUT
        text += (f" {{direction={'out' if out else 'in'}, port={io.port:#x}, size={io.size}, "
                 f"count={io.count}")
        if out and data_at is not None and io.size:
            raw = data_at(io.data_offset, io.size)   # the first element; OUTS may send more
            if raw is not None:
                text += f", data={_hex(int.from_bytes(raw, 'little'))}"
        text += "}"
    elif reason == c.KVM_EXIT_MMIO:
        m = run.mmio
        text += f" {{phys_addr={m.phys_addr:#x}, len={m.len}, is_write={m.is_write}"
        if m.is_write:
            text += f", data={_hex(int.from_bytes(bytes(m.data)[:m.len], 'little'))}"
        text += "}"
    elif reason == c.KVM_EXIT_FAIL_ENTRY:
        f = run.fail_entry
        text += (f" {{hardware_entry_failure_reason={f.hardware_entry_failure_reason:#x}, "
                 f"cpu={f.cpu}}}")
    elif reason == c.KVM_EXIT_INTERNAL_ERROR:
        e = run.internal
        data = ", ".join(_hex(e.data[k]) for k in range(min(e.ndata, 16)))
        text += f" {{suberror={e.suberror}, data=[{data}]}}"
    elif reason == c.KVM_EXIT_SYSTEM_EVENT:
        text += f" {{type={run.system_event.type}}}"
    elif reason == c.KVM_EXIT_DEBUG:
        d = run.debug.arch
        text += f" {{exception={d.exception}, pc={d.pc:#x}, dr6={d.dr6:#x}, dr7={d.dr7:#x}}}"
    return text


_PIO_END = (c.KVM_PIO_PAGE_OFFSET + 1) * mmap.PAGESIZE


def _exit_from_struct(run) -> str:
    base = ctypes.addressof(run)

    def data_at(offset, n):
        return ctypes.string_at(base + offset, n) if offset + n <= _PIO_END else None
    return describe_exit(run, data_at)


def _exit_from_fd(fd: int) -> str:
    # Nobody handed us the vCPU's kvm_run: map its first pages for a moment (the same kernel
    # pages the VMM sees). Unmapped at once, so the tracer never keeps a closed vCPU alive.
    try:
        view = mmap.mmap(fd, _PIO_END, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return "exit=?"
    with view:
        run = s.kvm_run.from_buffer_copy(view, 0)
        return describe_exit(run, lambda off, n: view[off:off + n] if off + n <= len(view)
                             else None)


# -- mmap --

_PROT_NAMES = {mmap.PROT_READ: "PROT_READ", mmap.PROT_WRITE: "PROT_WRITE",
               mmap.PROT_EXEC: "PROT_EXEC"}
# include/uapi/asm-generic/mman-common.h, mman.h
_MAP_NAMES = {mmap.MAP_SHARED: "MAP_SHARED", mmap.MAP_PRIVATE: "MAP_PRIVATE",
              mmap.MAP_ANONYMOUS: "MAP_ANONYMOUS",
              getattr(mmap, "MAP_NORESERVE", 0x4000): "MAP_NORESERVE",
              getattr(mmap, "MAP_POPULATE", 0x8000): "MAP_POPULATE"}


def map_address(m) -> int | None:
    """Where ``m`` (a Python mmap) is mapped; None once closed. Python does not say: a view
    of its buffer does, dropped as this returns so that close() still works."""
    try:
        try:
            view = ctypes.c_char.from_buffer(m)
            return ctypes.addressof(view)
        except TypeError:   # read-only (PROT_READ): ctypes wants a writable buffer
            import numpy as np
            view = np.frombuffer(m, np.uint8)
            return view.__array_interface__["data"][0]
    except ValueError:      # closed
        return None


# -- which fd --

def fd_kind_from_link(link: str) -> str:
    """What /proc/self/fd/N points at, named as minivmm knows it: kvm, vm, vcpuN."""
    if link == "/dev/kvm":
        return "kvm"
    if link == "anon_inode:kvm-vm":
        return "vm"
    if link.startswith("anon_inode:kvm-vcpu:"):
        return "vcpu" + link[len("anon_inode:kvm-vcpu:"):]
    return link[len("anon_inode:"):] if link.startswith("anon_inode:") else link


# One lock for every line of a trace, this module's and the exit trace's (``run --trace``):
# vCPU threads share the stream, and print() writes a line and its newline in two calls,
# between which another thread's line lands.
_output_lock = threading.Lock()


def write_line(stream, text: str) -> None:
    """Write ``text`` and its newline as one piece, never inside another trace line."""
    with _output_lock:
        stream.write(text + "\n")
        stream.flush()


class Sink:
    """Where a trace's lines go (this module's, and `run --trace`'s exits).

    Where the trace runs beside a command's own output (on stderr for --json and
    abi-check), its reader gone (`2>&1 >out.json | head`) ends the trace, not the
    command, whose output is still due: ``reader_gone()`` is called once, to discard what
    the stream still holds, and later lines are dropped. None: the BrokenPipeError is
    the caller's (`| head`)."""

    def __init__(self, stream, reader_gone=None):
        self.stream = stream            # None once its reader went away
        self.reader_gone = reader_gone

    def write(self, text: str) -> None:
        stream = self.stream
        if stream is None:
            return
        try:
            write_line(stream, text)
        except BrokenPipeError:
            if self.reader_gone is None:
                raise
            if self.stream is not None:
                self.stream = None
                self.reader_gone()


class Tracer(Sink):
    """The callable ``_sys.tracer``: issue one ioctl, print it decoded, one line."""

    def __init__(self, stream, reader_gone=None):
        super().__init__(stream, reader_gone)
        # A forked child inherits the tracer: its lines say so, as strace -f does, or a
        # child's EIO would read as the VM failing its owner (api.rst 2, Restrictions)
        self._pid = os.getpid()
        # fd -> (st_dev, st_ino, kind). fstat is cheaper than readlink and tells /dev/kvm
        # from the anon inodes; but every KVM fd shares one anon inode, so a vm fd number
        # that comes back as a vcpu fd is caught where it is made: fd-creating results are
        # forgotten (_NEW_FD) and read again on their first use.
        self._kinds: dict = {}

    def fd_kind(self, fd: int) -> str:
        try:
            st = os.fstat(fd)
        except OSError:
            return "fd"
        known = self._kinds.get(fd)
        if known is not None and known[0] == st.st_dev and known[1] == st.st_ino:
            return known[2]
        try:
            kind = fd_kind_from_link(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            kind = "fd"
        self._kinds[fd] = (st.st_dev, st.st_ino, kind)
        return kind

    def __call__(self, fd, request, arg=0, name="ioctl", hints=None, run=None):
        """Same contract as ``_sys.ioctl``. ``run``: the vCPU's kvm_run, for KVM_RUN's exit."""
        direction = ioc_dir(request)
        before = _safe_decode(request, arg) if direction & IOC_WRITE or not direction else None
        t0 = time.perf_counter()
        ret = _sys._ioctl(fd, request, arg)
        seconds = time.perf_counter() - t0
        err = ctypes.get_errno() if ret < 0 else 0
        argtext = before
        if direction & IOC_READ:
            if ret < 0:      # the kernel wrote nothing useful: show what went in, or where
                argtext = before if before is not None else _hex(_addr(arg))
            else:
                after = _safe_decode(request, arg)
                argtext = after if before is None or before == after else f"{before} => {after}"
        if ret < 0:
            result = f"-1 {_sys.errno_name(err)} ({os.strerror(err)})"
        else:
            result = str(ret)
            if request == i.KVM_RUN:
                result += " " + (_exit_from_struct(run) if run is not None
                                 else _exit_from_fd(fd))
            elif request in _NEW_FD:
                self._kinds.pop(ret, None)
        label = i.IOCTL_NAMES.get(request) or name
        try:
            self.write(f"{self._who()}ioctl({self.fd_kind(fd)} {fd}, {label}, "
                        f"{argtext}) = {result}  <{seconds * 1e6:.1f} us>")
        except BaseException:
            # the caller gets the write's error, never the new fd: closed here, or a VM
            # (and its memory) stayed open until the process ended
            if ret >= 0 and request in _NEW_FD:
                os.close(ret)
            raise
        if ret < 0:
            raise _sys.failure(fd, name, err, hints)
        return ret

    def _who(self) -> str:
        pid = os.getpid()
        return f"[pid {pid}] " if pid != self._pid else ""

    def mmap(self, fd, length, flags, prot, offset=0, what=""):
        """Same contract as ``_sys.mmap``: map, print one line, return the mmap object."""
        where = f"{self.fd_kind(fd)} {fd}" if fd >= 0 else "-1"
        prot_text = _flags(prot, _PROT_NAMES) if prot else "PROT_NONE"
        call = (f"mmap({where}, {_hex(length)}, {prot_text}, {_flags(flags, _MAP_NAMES)}, "
                f"offset {_hex(offset)})")
        t0 = time.perf_counter()
        try:
            m = mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)
        except OSError as e:
            seconds = time.perf_counter() - t0
            err = e.errno or 0
            self._map_line(f"{call} = -1 {_sys.errno_name(err)} ({os.strerror(err)})", what,
                           seconds)
            raise
        # (a ValueError or OverflowError is Python refusing before mmap(2): no line)
        seconds = time.perf_counter() - t0
        address = map_address(m)
        self._map_line(f"{call} = {hex(address) if address is not None else '?'}", what,
                       seconds)
        return m

    def munmap(self, m, what=""):
        """Same contract as ``_sys.munmap``: close ``m``, print one line if it was mapped."""
        address = map_address(m)
        if address is None:         # closed already: nothing to unmap
            m.close()
            return
        length = len(m)
        t0 = time.perf_counter()
        m.close()                   # a BufferError unmaps nothing, so prints nothing
        seconds = time.perf_counter() - t0
        self._map_line(f"munmap({address:#x}, {_hex(length)}) = 0", what, seconds)

    def _map_line(self, text, what, seconds):
        label = f"  [{what}]" if what else ""
        self.write(f"{self._who()}{text}{label}  <{seconds * 1e6:.1f} us>")


def _safe_decode(request, arg) -> str:
    # A trace must never break the call it traces.
    try:
        return decode_arg(request, arg)
    except Exception:   # noqa: BLE001
        return _hex(_addr(arg))


def install(stream, reader_gone=None) -> Tracer:
    """Trace every ioctl from now on to ``stream``; returns the tracer."""
    tracer = Tracer(stream, reader_gone)
    _sys.tracer = tracer
    return tracer


def uninstall() -> None:
    """Stop tracing: ``_sys.ioctl`` is back to its one attribute test."""
    _sys.tracer = None


@contextlib.contextmanager
def tracing(stream):
    """``with tracing(io.StringIO()) as t:`` trace inside the block, restore after it."""
    previous = _sys.tracer
    tracer = install(stream)
    try:
        yield tracer
    finally:
        _sys.tracer = previous
