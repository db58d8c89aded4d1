"""Machine: a VM, its memory, one thread per vCPU, the port devices, and the run policy.

Not a single ioctl's mirror: this is where policy lives (threads, timeouts,
devices). It follows the KVM_RUN protocol of Documentation/virt/kvm/api.rst
4.10 and section 5 ("The kvm_run structure"): exit_reason, the io and mmio
members, and ``immediate_exit`` plus a signal to kick a vCPU out of KVM_RUN
(api.rst 5, "immediate_exit"; measured in host-probes.md section 3).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import signal
import struct
import threading
import time
import traceback

from . import _sys, abi
from ._args import check_number, check_type, named
from ._kick import KICK_SIGNAL, install_kick_handler
from ._sys import KvmError
from .kvm import Kvm
from .payload import Payload, disassemble, disassemble_one, instructions_ending, load
from .x86 import debug
from .x86 import layout as L
from .x86.debug import DebugCause
from .x86.modes import (ERROR_CODE_VECTORS, EXCEPTION_NAMES, STUB_FRAME_LAYOUT,
                        cpu_pushed_frame, entry_register_problem, pushes_error_code,
                        setup_memory, setup_vcpu, stub_end)

# legacy prefixes (SDM vol. 2, 2.1.1); REX (0x40-0x4f) too, in 64-bit code only
_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3))
TRAP_VECTORS = (1, 3, 4)      # #DB (unless DR6 says otherwise: debug_cause), #BP, #OF
VEC_DB = 1
DEFAULT_PAGES = 64
# Console bytes kept per vCPU: a guest printing for ever must not fill the host's memory
# (the rest is counted, not kept; --json's escapes make the kept part up to 6 times bigger)
CONSOLE_LIMIT = 1 << 20
OK_ENDS = ("exit-port", "hlt")
# Ends the host gives a vCPU that was still running: it failed nothing itself, and may only
# have waited (a spin on a flag) for another whose guest did fail
HOST_STOPS = ("timeout", "stopped", "interrupted", "closed")
# The x86 INIT state's CS and RIP (SDM vol. 3, 10.1.4 "First Instruction Executed")
INIT_CS, INIT_CS_BASE, INIT_RIP = 0xF000, 0xFFFF0000, 0xFFF0

_IO, _HLT, _MMIO, _INTR = abi.KVM_EXIT_IO, abi.KVM_EXIT_HLT, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_INTR
_OUT = abi.KVM_EXIT_IO_OUT
_SYNC = L.PORT_SYNC
_REG_NAMES = frozenset(name for name, _ in abi.kvm_regs._fields_)
# The width of an offset (IP, SP, string-instruction RDI) in each mode
_ADDRESS_MASK = {"real": 0xFFFF, "protected": 0xFFFFFFFF, "long": (1 << 64) - 1}


class MachineError(ValueError):
    """A request the machine cannot honour (bad vCPU count, too many pages, ...)."""



@dataclasses.dataclass
class VcpuEnd:
    """How a vCPU finished."""
    reason: str                       # exit-port | hlt | exception | shutdown | timeout | ...
    code: int | None = None           # exit-port value
    vector: int | None = None         # exceptions
    rip: int | None = None
    instruction: str | None = None
    detail: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Ended as a payload should: the exit port with code 0, or HLT."""
        return self.reason in OK_ENDS and not self.code

    def to_dict(self) -> dict:
        out = {"reason": self.reason, "code": self.code, "vector": self.vector,
               "rip": self.rip, "instruction": self.instruction}
        out.update(self.detail)
        return out

    def summary(self) -> str:
        where = f" at {self.rip:#x}" if self.rip is not None else ""
        ins = f" ({self.instruction})" if self.instruction else ""
        if self.reason == "exit-port":
            return f"exited with code {self.code}"
        if self.reason == "unreadable-exception-frame":
            # RSP may be in memory with the frame running off its end, or (protected
            # mode) be an offset from a non-zero SS base: the frame is what is outside
            return (f"minivmm's exception stub reported with no frame to read (the frame at "
                    f"RSP {self.detail.get('rsp', 0):#x} is not in guest memory){where}{ins}")
        if self.reason == "exception-port-by-payload":
            return (f"the payload wrote minivmm's exception-report port "
                    f"{self.detail.get('port', 0):#x} itself (value "
                    f"{self.detail.get('value', 0):#x}); no CPU exception happened{where}{ins}")
        if self.reason == "exception":
            name = EXCEPTION_NAMES.get(self.vector, f"vector {self.vector}")
            # only where the CPU pushes one: for #DE, #UD, #BP... the 0 is the stub's own
            code = self.detail.get("error_code", 0)
            extra = (f", error code {code:#x}"
                     if self.vector in ERROR_CODE_VECTORS and code is not None else "")
            if self.vector == 14:
                extra += f", CR2 {self.detail.get('cr2', 0):#x}"
            if self.detail.get("debug"):
                extra = f": {debug.describe(self.detail['debug'])},"
            if not ins and self.detail.get("bytes"):
                ins = f" (no instruction decodes from bytes {self.detail['bytes']})"
            note = f"; {self.detail['host_note']}" if self.detail.get("host_note") else ""
            return f"CPU exception {name}{extra}{where}{ins}{note}"
        if self.reason == "unhandled-io":
            d = self.detail
            # a string IO exit (rep ins/outs) moves `count` items of `size` bytes
            times = f"{d['count']} x " if d.get("count", 1) > 1 else ""
            return (f"unhandled port I/O: {d['direction']} port {d['port']:#x}, "
                    f"{times}{d['size']} byte(s){where}{ins}")
        if self.reason == "unhandled-mmio":
            d = self.detail
            access = (f"{'write' if d['is_write'] else 'read'} of {d['len']} byte(s) at "
                      f"{d['phys_addr']:#x}")
            if d.get("slot") is not None:
                slot = f"slot {d['slot']} \"{d.get('slot_name', '')}\""
                if d.get("read_only"):
                    return (f"write to read-only memory ({slot}, KVM_MEM_READONLY): "
                            f"{d['len']} byte(s) at {d['phys_addr']:#x}{where}{ins}")
                return f"MMIO exit inside {slot}: {access}{where}{ins}"
            return f"access outside RAM (MMIO): {access}{where}{ins}"
        if self.reason == "shutdown":
            if self.detail.get("registers_lost"):
                last = f"; last known{where}{ins}" if where else ""
                return ("triple fault; the vCPU state was reset by KVM on SHUTDOWN (SVM), "
                        f"registers lost{last}")
            return f"triple fault (KVM_EXIT_SHUTDOWN){where}{ins}"
        if self.reason == "timeout":
            return f"stopped by the timeout{where}{ins}"
        if self.reason == "unexpected-exit" and self.detail.get("exit"):
            return f"unexpected exit {self.detail['exit']}{where}{ins}"
        # A host-side end (kvm-error, host-error, ring-overflow) is no use without its cause
        error = f": {self.detail['error']}" if self.detail.get("error") else ""
        if not error and self.detail.get("meaning"):
            # internal-error, fail-entry: what KVM's code says, not only in --json
            code = self.detail.get("suberror_name") or \
                f"{self.detail.get('hardware_entry_failure_reason', 0):#x}"
            insn = self.detail.get("insn_bytes")
            insn = f"; bytes KVM fetched at RIP: {insn}" if insn else ""
            error = f" ({code}: {self.detail['meaning']}{insn})"
        return f"{self.reason}{error}{where}{ins}"


class Console(bytearray):
    """A vCPU's console output: the first ``limit`` bytes (CONSOLE_LIMIT by default), and
    how many more the guest wrote, in ``dropped``."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = CONSOLE_LIMIT if limit is None else limit
        self.dropped = 0

    def write(self, data: bytes) -> None:
        room = self.limit - len(self)
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self.extend(data)

    def note(self) -> str:
        """One line saying what was dropped, or "" when nothing was."""
        if not self.dropped:
            return ""
        return (f"console output cut at {self.limit} bytes: {self.dropped} more "
                "byte(s) dropped")


class VcpuState:
    """A vCPU as the Machine drives it: its thread, console, exit counts and end."""

    def __init__(self, index: int, vcpu):
        self.index = index
        self.vcpu = vcpu
        self.console = Console()
        self.exit_counts: dict = {}
        self.syncs = 0
        self.end: VcpuEnd | None = None
        self.thread: threading.Thread | None = None
        # Set when the thread's loop is over. Waiting on it, not on Thread.join, because
        # on Python 3.11 a Ctrl-C inside join() can mark a live thread as stopped.
        self.done = threading.Event()
        self.ended_at: float | None = None    # time.monotonic() as the thread was over
        self.completed_by: int | None = None  # Machine._complete_pending_io's exit reason
        self.stop_reason: str | None = None   # set by the host to kick the vCPU out
        # True while `thread` may be signalled: cleared under kick_lock as the thread ends,
        # so that no kick reaches its id once it is gone (pthread_kill on an exited thread
        # signals whichever new thread got its id, or crashes on its unmapped stack)
        self.kickable = False
        # reentrant: a Python signal handler tripped just before a kick runs inside it, and
        # its own stop() kicks again
        self.kick_lock = threading.RLock()

    def exits_by_name(self) -> dict:
        names = {"io": 0, "hlt": 0, "mmio": 0}
        for reason, n in self.exit_counts.items():
            names[abi.EXIT_NAMES.get(reason, str(reason)).lower()] = n
        return names


@dataclasses.dataclass
class RunResult:
    """What a Machine run left: the payload, each vCPU's VcpuState (console, exit counts,
    end) and the wall time from start() until the last vCPU ended (``elapsed_s``, not
    until wait() was called). It holds the live vCPUs, so it cannot be pickled: to pass a
    result to another process (multiprocessing, a file), send ``to_dict()``, plain values
    that json and pickle both take."""
    payload: Payload
    vcpus: list
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return all(st.end is not None and st.end.ok for st in self.vcpus)

    def to_dict(self) -> dict:
        return {"payload": self.payload.name, "mode": self.payload.mode, "cpl": self.payload.cpl,
                "vcpus": [{"index": st.index,
                           "console": st.console.decode("utf-8", "replace"),
                           "console_dropped": st.console.dropped,
                           "end": st.end.to_dict() if st.end else None,
                           "exits": st.exits_by_name(),
                           "syncs": st.syncs} for st in self.vcpus],
                "elapsed_s": round(self.elapsed_s, 6), "ok": self.ok}


def check_vcpus(nvcpus: int, kvm: Kvm) -> None:
    check_number("vcpus", nvcpus, 1, kvm.max_vcpus(), note=" (KVM_CAP_MAX_VCPUS)",
                 error=MachineError)


class Machine:
    """A payload in a fresh VM: slot 0 (system) and slot 1 (data), one thread per vCPU.

    Use as a context manager; ``run()`` runs every vCPU until it ends or the timeout.
    A Machine runs once.

    ``payload``: a name in guest_payloads/, a path, or a Payload (assemble_source).
    ``vcpus``: default the payload's header, else 1. ``pages``: 4 KiB pages of the data slot,
    split evenly between the vCPUs. ``kvm``: an open Kvm to share (else one of its own).
    ``data_flags``/``system_flags``: the slots' KVM_MEM_* flags. ``regs``: entry registers
    by name (rax ... r15, rip, rflags) over the README's entry state; an RFLAGS with
    reserved or VM bits, or a RIP the mode cannot fetch from (beyond 32 bits, past 0xffff
    in real mode, or not canonical in long mode), is refused: stock VMX would fail the VM
    entry, or the first fetch fault.
    ``before_vcpus(machine)``: called before the slots and vCPUs are made (enable a VM
    capability there); ``on_vcpu(machine, state)``: after each vCPU is set up.

    Callbacks, attributes to set before run()/start(), called in the vCPU's thread:
    ``trace(state, exit_reason)`` after every KVM_RUN, ``on_sync(state, tag)`` at each
    ``out 0xf0``, ``on_ring_full(state)`` at KVM_EXIT_DIRTY_RING_FULL (return None to go
    on, or a VcpuEnd), ``on_end(state)`` when the vCPU is over. One that raises ends its
    vCPU as ``host-error`` (so does an on_ring_full returning anything else). wait() is
    refused in a callback: it would wait for the callback's own vCPU.
    """

    def __init__(self, payload: Payload | str, vcpus: int | None = None,
                 pages: int = DEFAULT_PAGES, kvm: Kvm | None = None,
                 data_flags: int = 0, system_flags: int = 0, before_vcpus=None,
                 on_vcpu=None, regs: dict | None = None):
        self.payload = payload if isinstance(payload, Payload) else load(payload)
        check_type("kvm", kvm, (Kvm, type(None)), "a minivmm Kvm or None")
        self._own_kvm = kvm is None
        self.kvm = kvm
        self.vm = None
        self.states: list[VcpuState] = []
        self.trace = None                 # callable(state, reason) for every exit, or None
        self.on_sync = None               # callable(state, tag) at a sync exit, or None
        self.on_ring_full = None          # callable(state) at KVM_EXIT_DIRTY_RING_FULL
        self.on_end = None                # callable(state) when a vCPU's thread is over
        self._start, self._deadline = time.monotonic(), None
        self._started = False             # start() once: its vCPUs' ends are then spent
        # start() and close() from two threads: close() must see every vCPU thread that
        # start() makes (or start() must see the close), else one runs on with its views
        # of a kvm_run page the close releases (BufferError, then EBADF in KVM_RUN).
        # Reentrant: a signal handler may stop() the Machine while start() holds it
        self._lock = threading.RLock()
        # how deep the calling thread is in _kick(): _kicking() for a signal handler run
        # there (RLock says who owns it only through its private _is_owned())
        self._kicks = threading.local()
        self._closing = False
        self._pid = None                  # the process whose start() made the vCPU threads
        self._watchdog: threading.Thread | None = None    # start(timeout)'s, see _watch()
        # Set once start() has made every vCPU thread, which waits for it before its first
        # KVM_RUN: vCPUs already looping took the host's CPUs from the threads still to be
        # made, and the timeout's watchdog comes after them (219 looping vCPUs on 2 CPUs:
        # start() took 30 s, --timeout 3)
        self._go = threading.Event()
        nvcpus = vcpus if vcpus is not None else (self.payload.vcpus or 1)
        # not an AttributeError on .items(), nor "'int' object is not callable" once the VM
        # is half made
        check_type("regs", regs, (dict, type(None)), "a dict of register values or None")
        for name, hook in (("before_vcpus", before_vcpus), ("on_vcpu", on_vcpu)):
            if hook is not None and not callable(hook):
                raise named(TypeError(f"{name} must be callable or None, not "
                                      f"{type(hook).__name__}"), name)
        for name, value in (regs or {}).items():
            if name not in _REG_NAMES:    # setattr on the ctypes struct would just add it
                raise MachineError(f"no register named {name!r} (one of "
                                   f"{', '.join(sorted(_REG_NAMES))})")
            # ctypes would keep the low 64 bits without a word
            check_number(f"regs[{name!r}]", value, 0, (1 << 64) - 1, error=MachineError)
            # kvm_pvm runs these; stock VMX fails the VM entry: refuse them on every host
            problem = entry_register_problem(self.payload.mode, name, value)
            if problem:
                raise named(MachineError(f"regs[{name!r}] {value:#x} {problem}"), "regs")
        # a float would reach the slot as a fraction
        check_number("pages", pages, 1, error=MachineError)
        if pages > L.MAX_DATA_PAGES:
            raise named(MachineError(f"pages {pages} is more than this machine can map "
                                     f"(at most {L.MAX_DATA_PAGES} pages, "
                                     f"{L.MAX_DATA_PAGES * 4096 >> 30} GiB)"), "pages")
        if self.payload.mode == "protected" and pages > L.PROTECTED_MAX_DATA_PAGES:
            # ESI would hold the low 32 bits of a share's base: a vCPU whose share starts
            # at 4 GiB or more would write another vCPU's share without a word
            raise named(MachineError(
                f"pages {pages} is more than a protected-mode payload can reach (its 32-bit "
                f"addresses end at 4 GiB: at most {L.PROTECTED_MAX_DATA_PAGES} pages from "
                "the data slot at 1 GiB)"), "pages")
        self.pages = pages
        if self.payload.mode == "real":
            check_number("vcpus", nvcpus, 1, L.REAL_MODE_MAX_VCPUS, error=MachineError,
                         note=" for a real-mode payload (SS names each vCPU's stack, "
                              "which must lie below 1 MiB)")
        try:
            if self.kvm is None:
                self.kvm = Kvm()
            check_vcpus(nvcpus, self.kvm)
            self.vm = self.kvm.create_vm()
            # VMX needs these for real mode (and ignores them with unrestricted guest); the
            # defaults near 4 GiB would collide with a data slot above 3 GiB
            # (kept for dump_image: the native baseline sets the same)
            tss = L.VMX_TSS if self.kvm.check_extension(abi.KVM_CAP_SET_TSS_ADDR) else 0
            idmap = L.VMX_IDENTITY_MAP \
                if self.kvm.check_extension(abi.KVM_CAP_SET_IDENTITY_MAP_ADDR) else 0
            if tss:
                self.vm.set_tss_addr(tss)
            if idmap:
                self.vm.set_identity_map_addr(idmap)
            self.vmx_pages = (tss, idmap)
            if before_vcpus:
                before_vcpus(self)
            sys_mem = self.vm.add_memory(L.SLOT_SYSTEM, 0, L.system_slot_size(nvcpus),
                                         system_flags, "system")
            try:
                self.vm.add_memory(L.SLOT_DATA, L.DATA_GPA, pages * L.PAGE, data_flags, "data")
            except MemoryError as e:
                raise named(MachineError(f"pages {pages}: {e}"), "pages") from None
            setup_memory(sys_mem, self.payload.mode, nvcpus, pages)
            sys_mem.write(L.CODE, self.payload.code)
            cpuid = self.kvm.get_supported_cpuid()
            share = pages // nvcpus
            for i in range(nvcpus):
                vcpu = self.vm.create_vcpu(i)
                vcpu.set_cpuid2(cpuid)
                init = {"rdi": i, "rsi": L.DATA_GPA + i * share * L.PAGE, "rdx": share, "rcx": 0}
                init.update(regs or {})
                setup_vcpu(vcpu, self.payload.mode, self.payload.cpl, i, init)
                st = VcpuState(i, vcpu)
                self.states.append(st)
                if on_vcpu:
                    on_vcpu(self, st)
        except BaseException:
            self.close()
            raise

    # -- lifecycle --
    def close(self) -> None:
        """Stop the vCPUs and release everything. From a callback (a vCPU's own thread,
        whose loop still holds its kvm_run page) it only stops them: the release is left
        to the close() of the Machine's owner (its ``with``)."""
        with self._lock:                # no vCPU thread starts from now on
            self._closing = True
        self.stop("closed")
        if self._in_vcpu_thread() or self._kicking():
            return
        watchdog = self._watchdog
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join()     # its vCPUs are over: it returns at once
        if self.vm is not None:
            try:
                self.vm.close()
            except BufferError:
                if not self._forked():
                    raise
                # the child of a fork: the parent's vCPU threads' frames came through it
                # (never to run) holding views of the kvm_run pages; the fds are closed,
                # this process's copies of those mappings go when it exits
            self.vm = None
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _vm(self):
        if self.vm is None:
            raise MachineError("this Machine is closed")
        return self.vm

    @property
    def data(self):
        return self._vm().memory[L.SLOT_DATA]

    @property
    def system(self):
        return self._vm().memory[L.SLOT_SYSTEM]

    def dump_image(self, path: str) -> None:
        """Write slots, registers and CPUID as a machine image for the native baseline.

        The format is documented in benchmarks/native/IMAGE_FORMAT.md; it lets a small
        C program run exactly the guest bytes and entry state this Machine would run.
        """
        # open() takes an int as a file descriptor: dump_image(5) wrote into the vCPU's fd
        # and closed it (KVM_RUN then failed with EBADF), True wrote to stdout and closed it
        check_type("path", path, (str, bytes, os.PathLike), "a file path (str or PathLike)")
        vm = self._vm()
        out = [b"MVMMIMG1", struct.pack("<IQQI", 2, *self.vmx_pages, len(vm.memory))]
        for slot, mem in sorted(self.vm.memory.items()):
            # slot 0 holds code, tables and stacks; the data slot starts out all zero
            content = bytes(mem.map).rstrip(b"\0") if slot == L.SLOT_SYSTEM else b""
            out.append(struct.pack("<IIQQQ", slot, mem.flags, mem.gpa, mem.size, len(content)))
            out.append(content)
        out.append(struct.pack("<I", len(self.states)))
        for st in self.states:
            out.append(bytes(st.vcpu.get_regs()) + bytes(st.vcpu.get_sregs()))
        cpuid = self.kvm.get_supported_cpuid()
        out.append(struct.pack("<I", cpuid.nent))
        out.extend(bytes(cpuid.entries[i]) for i in range(cpuid.nent))
        with open(path, "wb") as f:
            f.write(b"".join(out))

    # -- running --
    def run(self, timeout: float | None = None) -> RunResult:
        """Start one thread per vCPU, wait until all end (or the timeout), return the result.

        Ctrl-C (KeyboardInterrupt) stops every vCPU before it propagates.
        """
        self.start(timeout)
        return self.wait()

    def start(self, timeout: float | None = None) -> None:
        """Start the vCPU threads and return at once; wait() collects the result. The
        timeout stops the vCPUs whether or not wait() is called by then."""
        if timeout is not None:
            check_number("timeout", timeout, seconds=True)
            if not timeout >= 0:      # NaN too: it never expires
                raise named(MachineError(f"timeout must be a number of seconds, not negative "
                                         f"nor NaN (got {timeout})"), "timeout")
        try:
            with self._lock:            # a close() from another thread waits for every thread
                if self._closing:
                    raise MachineError("this Machine is closed")
                self._vm()
                if self._started:
                    # a vCPU thread per vCPU at most: a second one would wait in KVM_RUN behind
                    # the first, and the first could no longer be kicked (st.thread is the second)
                    raise MachineError("this Machine has already run; make a new one")
                self._started = True
                self._pid = os.getpid()
                install_kick_handler()      # the vCPU threads let the kick in themselves
                self._start = time.monotonic()
                self._deadline = None if timeout is None else self._start + timeout
                # The threads start with every signal blocked (a thread inherits its maker's
                # mask): a kick before their own block_thread_signals() would run the
                # program's SIGUSR1 handler instead of stopping KVM_RUN. Ctrl-C is held back
                # until every thread runs: a thread made but not started never ends, and
                # stop() (close()) would wait for it for ever
                failed = at = None
                with _sys.fd_creation(), _sys.signals_held():
                    try:
                        for st in self.states:
                            st.thread = threading.Thread(target=self._vcpu_thread, args=(st,),
                                                         name=f"vcpu{st.index}", daemon=True)
                            st.kickable = True
                            try:
                                start_thread(st.thread, f"the thread of vCPU {st.index}")
                            except OSError as e:
                                failed, at = e, st.index
                                break
                        if failed is None and self._deadline is not None:
                            # The timeout holds without a wait(): a start() whose caller does
                            # something else (or drops the Machine) must not leave a looping
                            # guest running past it. Made before the vCPUs run: after, this
                            # thread waited for it to start behind 1024 looping vCPUs on 2
                            # CPUs (--timeout 3 ended after 5 to 75 s)
                            watchdog = threading.Thread(target=self._watch, name="vcpu-watchdog",
                                                        daemon=True)
                            try:
                                start_thread(watchdog, "the vCPUs' timeout thread")
                                self._watchdog = watchdog     # close() joins it: a started one only
                            except OSError as e:
                                failed = e
                    finally:
                        self._go.set()      # the threads made run (a failed start stops them)
                    if at is not None:
                        # No thread will ever end this vCPU or the ones after it: stop() and
                        # wait() waited for them for ever. They end here, unrun
                        for st in self.states[at:]:
                            st.thread, st.kickable = None, False
                            st.end = VcpuEnd("host-error", detail={"error": str(failed)})
                            st.done.set()
        except KeyboardInterrupt:
            # The Ctrl-C held back while the threads were made is raised as that block
            # ends: stop the vCPUs it made, as wait() does (run() never reached wait(), and
            # they ran on, without a timeout for ever)
            self.stop("interrupted")
            raise
        if failed is not None:
            self.stop("stopped")    # the vCPUs already running (outside the lock: a
            raise failed            # callback's own stop() takes it)

    def _watch(self) -> None:
        """The timeout's thread: stops the vCPUs at the deadline, unless all end before."""
        for st in self.states:
            while True:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    # stop(wait=False), but without its self._lock (every vCPU thread exists
                    # by now): a fork() while this thread held it left the child's close()
                    # waiting for it for ever. wait() or close() waits for the vCPUs
                    for one in self.states:
                        if not one.done.is_set():
                            self._kick(one, "timeout")
                    return
                # in slices: a timeout of inf or 1e300 (accepted: a number of seconds) made
                # Event.wait() raise OverflowError and the thread die with a traceback
                if st.done.wait(min(left, 3600)):
                    break

    def expired(self) -> bool:
        """True once the timeout given to start() has passed; stops the vCPUs then."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.stop("timeout")
            return True
        return False

    def wait(self) -> RunResult:
        """Wait until every vCPU has ended (stopping them at the deadline)."""
        if not self._started:         # no vCPU thread would ever end
            self._vm()
            raise MachineError("this Machine has not been started: call start() first")
        if self._in_vcpu_thread():
            # it would wait for its own thread to end: until the timeout, or for ever
            raise MachineError("wait() called from a callback, in a vCPU's own thread: it "
                               "would wait for that vCPU to end; call it from another thread")
        if self._forked():
            raise MachineError(f"this Machine was started in process {self._pid}: its vCPU "
                               "threads did not come through the fork (close it here, wait "
                               "for it there)")
        try:
            for st in self.states:
                while not st.done.is_set():
                    left = None if self._deadline is None else self._deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self.stop("timeout")
                        break
                    st.done.wait(0.2 if left is None else min(left, 0.2))
        except KeyboardInterrupt:
            self.stop("interrupted")
            raise
        finally:
            self.stop("stopped")
        # until the last vCPU ended, not until this call: a wait() made late (start(),
        # other work, then wait()) would count the time the caller spent elsewhere
        ends = [st.ended_at for st in self.states if st.ended_at is not None]
        end = max(ends) if len(ends) == len(self.states) else time.monotonic()
        return RunResult(self.payload, self.states, end - self._start)

    def stop(self, reason: str = "stopped", wait: bool = True) -> None:
        """Kick every running vCPU out of KVM_RUN and (``wait``) wait until its thread is
        over.

        A second Ctrl-C while stopping does not cut this short: the vCPU threads
        must be gone before their kvm_run mappings can be released.
        """
        # Threads taken once: another stop() (a timer, close() elsewhere) may clear them.
        # Not while start() is making them (it waits for no vCPU: a callback's stop() here
        # only waits until every thread exists, and then kicks them all)
        with self._lock:
            running = [(st, st.thread) for st in self.states if st.thread is not None]
        if self._forked():
            # A child of fork() has none of the threads: their ids mean nothing here
            # (pthread_kill fails or signals another thread) and they never end here
            return
        me = threading.current_thread()
        for st, _ in running:
            if not st.done.is_set():
                self._kick(st, reason)
        if not wait or any(thread is me for _, thread in running) or self._kicking():
            # From a callback: another vCPU may be in a callback too, waiting for this
            # one to end (its own stop(), a barrier), so waiting here could never end.
            # Each kicked vCPU ends when its callback returns. From a signal handler run
            # inside this thread's own kick: the vCPU cannot end before that kick lets
            # go of its kick_lock, and the stop() that kicked waits for it then
            return
        interrupted = False
        for st, thread in running:
            while True:
                try:
                    if st.done.wait(0.05):
                        break
                    self._kick(st, reason)   # the signal came between two KVM_RUNs: again
                except KeyboardInterrupt:
                    interrupted = True
            thread.join()
            if st.thread is thread:
                st.thread = None
        if interrupted:
            raise KeyboardInterrupt

    def _forked(self) -> bool:
        """True in a child of fork() made while the vCPU threads existed (or later)."""
        return self._pid is not None and self._pid != os.getpid()

    def _kicking(self) -> bool:
        """True inside a signal handler that interrupted this thread's own _kick()."""
        return getattr(self._kicks, "depth", 0) > 0

    def _in_vcpu_thread(self) -> bool:
        me = threading.current_thread()
        return any(st.thread is me for st in self.states)

    def _kick(self, st: VcpuState, reason: str) -> None:
        thread = st.thread
        if thread is None:
            if st.stop_reason is None:
                st.stop_reason = reason
            return
        # The thread cannot end (its id freed, its VM closed) while the lock is held; no
        # signal handler runs here meanwhile (its stop() would wait for that end for ever).
        # Counted from before the lock is taken to after it is let go: a handler that runs
        # in between (a signal tripped just before, or taken by another thread) must not
        # wait, and the stop() it interrupted waits instead
        kicks = self._kicks
        kicks.depth = getattr(kicks, "depth", 0) + 1
        try:
            with _sys.signals_held(), st.kick_lock:
                if st.kickable:
                    st.vcpu.run_struct.immediate_exit = 1    # if it is between two KVM_RUNs
                # Set only once its next KVM_RUN cannot run the guest: a callback that
                # sees it lets the vCPU go as stopped (DirtySession's barrier). Set first, a
                # kicker short of the GIL (the watchdog behind 8 vCPU threads) left the
                # vCPU running on past syncs it was counted at for ~100 ms: collections cut
                # its iterations anywhere, and the plan oracle reported pages collected
                # one collection early as missed. Before the signal: one taken with no
                # reason set is the program's own SIGUSR1
                if st.stop_reason is None:
                    st.stop_reason = reason
                if not st.kickable:
                    return
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)   # if inside KVM_RUN
                except (ProcessLookupError, TypeError):
                    pass
        finally:
            kicks.depth -= 1

    def _vcpu_thread(self, st: VcpuState) -> None:
        try:
            # Signals stay blocked in this thread but for the kick, let in during KVM_RUN
            # only: a signal must not cut a KVM_RESET_DIRTY_RINGS short here (it drops
            # pages from dirty tracking, docs/abi-check.md), and holding them back per
            # reset would cost two calls at every ring-full exit
            _sys.block_thread_signals()
            st.vcpu.set_run_signals((KICK_SIGNAL,))
            self._go.wait()         # until start() has made every vCPU's thread
            self._vcpu_loop(st)
        except KvmError as e:
            st.end = VcpuEnd("kvm-error", detail={"error": str(e)})
            traceback.clear_frames(e.__traceback__)
        except BaseException as e:  # a bug, or a callback's SystemExit: still an end
            st.end = VcpuEnd("host-error", detail={"error": f"{type(e).__name__}: {e}"})
            # A callback may keep its exception (errors.append(e); raise): the frames of
            # _vcpu_loop in its traceback held views of the kvm_run page (run, io), and
            # the Machine's close() failed with BufferError, leaking the VM's fds
            traceback.clear_frames(e.__traceback__)
        finally:
            try:        # the mask is the vCPU's: a KVM_RUN from another thread must not keep it
                if st.vcpu.fd >= 0:
                    st.vcpu.set_run_signals(None)
            except OSError:     # a KvmError, or --trace-ioctls writing to a closed pipe:
                pass            # either way done.set() below must still run
            try:
                if self.on_end is not None:
                    self.on_end(st)
            except BaseException as e:  # not lost on stderr: the run is not ok
                was = st.end.summary() if st.end else "no end"
                st.end = VcpuEnd("host-error", detail={
                    "error": f"on_end raised {type(e).__name__}: {e} (the vCPU had {was})"})
            finally:
                with st.kick_lock:      # no kick for this thread's id from now on
                    st.kickable = False
                st.ended_at = time.monotonic()
                st.done.set()

    def _vcpu_loop(self, st: VcpuState) -> None:
        vcpu = st.vcpu
        run = vcpu.run_struct
        io = run.io
        kmap = vcpu.map
        counts = st.exit_counts
        console = st.console
        trace = self.trace
        on_sync = self.on_sync
        while st.end is None:
            reason = vcpu.run()
            counts[reason] = counts.get(reason, 0) + 1
            if trace is not None:
                trace(st, reason)
            if reason == _IO:
                port = io.port
                if io.direction == _OUT:
                    if port == _SYNC:              # the hot path: keep it short
                        st.syncs += 1
                        if on_sync is not None:
                            on_sync(st, int.from_bytes(vcpu.io_data()[:io.size], "little"))
                        continue
                    if port == L.PORT_DEBUGCON or port == L.PORT_CONSOLE:
                        console.write(vcpu.io_data())
                        continue
                    if port == L.PORT_EXIT:
                        st.end = self.end_at(st, "exit-port", code=kmap[io.data_offset],
                                             after=True, io_out=True)
                        break
                    if port == L.PORT_EXCEPTION:
                        st.end = self._exception_end(st)
                        break
                # an `in` from 0xe0 here is the payload's: a stub's own `in` comes only after
                # its `out 0xe0`, which has ended the vCPU above
                st.end = self.end_at(st, "unhandled-io", after=io.direction == _OUT,
                                     io_out=io.direction == _OUT,
                                     detail=_strip(vcpu.describe_exit(reason)))
            elif reason == _INTR:
                # the kick is blocked outside KVM_RUN, so it is still pending: take it, or
                # every KVM_RUN from now on would return EINTR at once
                taken = signal.sigtimedwait((KICK_SIGNAL,), 0)
                if st.stop_reason is not None:
                    run.immediate_exit = 0
                    st.end = self.end_at(st, st.stop_reason)
                elif taken is not None:
                    # not a kick (each sets stop_reason first): the program's own SIGUSR1,
                    # sent to the process, which KVM let in here. Hand it to the main
                    # thread, where Python runs its handler (or the program sigwait()s)
                    _forward_to_main_thread(KICK_SIGNAL)
                # else: a stray wake-up (job control), or a kick that has set immediate_exit
                # but not yet its reason (_kick); just re-enter
            elif reason == _HLT:
                st.end = self.end_at(st, "hlt", after=True)
            elif reason == _MMIO:
                detail = self.mmio_detail(st)
                st.end = self.end_at(st, "unhandled-mmio", after=self.mmio_after(st),
                                     detail=detail)
            elif reason == abi.KVM_EXIT_DIRTY_RING_FULL and self.on_ring_full is not None:
                end = self.on_ring_full(st)        # harvest, reset, re-enter (or an end)
                if end is not None and not isinstance(end, VcpuEnd):
                    # else it became the end itself, and RunResult.ok failed later with
                    # "'str' object has no attribute 'ok'" (a falsy 0 ended the vCPU too)
                    raise TypeError(f"on_ring_full must return None or a VcpuEnd, not "
                                    f"{type(end).__name__} ({end!r:.60})")
                st.end = end
            elif reason == abi.KVM_EXIT_SHUTDOWN:
                st.end = self.shutdown_end(st)
            elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
                st.end = self.end_at(st, "internal-error", registers=True,
                                     detail=_strip(vcpu.describe_exit(reason)))
            elif reason == abi.KVM_EXIT_FAIL_ENTRY:
                st.end = self.end_at(st, "fail-entry", registers=True,
                                     detail=_strip(vcpu.describe_exit(reason)))
            else:
                st.end = self.end_at(st, "unexpected-exit", registers=True,
                                     detail=unexpected_exit_detail(vcpu, reason))

    # -- reporting where a vCPU stopped --
    def registers(self, st: VcpuState) -> dict:
        """The vCPU's general registers and CR0-CR4, EFER, by name (for an end's report)."""
        regs, sregs = st.vcpu.get_regs(), st.vcpu.get_sregs()
        out = {name: getattr(regs, name) for name, _ in abi.kvm_regs._fields_}
        out.update(cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer,
                   cs=sregs.cs.selector, ss=sregs.ss.selector, cs_base=sregs.cs.base)
        return out

    def linear(self, st: VcpuState, rip: int, cs_base: int | None = None) -> int:
        """RIP to a guest-physical address (identity paging; real and protected mode add
        the CS base, the vCPU's unless ``cs_base`` is given: a protected-mode payload may
        load its own GDT with a code segment whose base is not 0)."""
        mode = self.payload.mode
        if mode == "long":
            return rip
        base = st.vcpu.get_sregs().cs.base if cs_base is None else cs_base
        return (base + rip) & _ADDRESS_MASK["protected"]

    def describe_instruction(self, st: VcpuState, rip: int, after: bool = False,
                             io_out: bool = False, cs_base: int | None = None,
                             made_by=None) -> str | None:
        """The instruction the CPU ran at rip, or (after=True) the one ending at rip, named
        (see executed); None when memory holds none that fits.

        ``made_by``: a predicate on an Instruction that the one ending at rip is known to
        satisfy (the exit proves it: is_out, is_hlt, ...). ``io_out``: the exit is an OUT.
        kvm_pvm has already moved RIP past it; VMX and SVM complete a userspace OUT on the
        next KVM_RUN (complete_fast_pio_out in arch/x86/kvm/x86.c), so RIP may still point
        at the out itself: accept both.
        """
        if self.in_stubs(st, rip, cs_base):
            # minivmm's own exception stubs: decode them linearly from the stub's start
            p = self.payload
            start = L.STUB_COMMON if rip > L.STUB_COMMON else rip & ~0xF
            code = self.system.read(start, stub_end(p.mode) - start)
            for ins in disassemble(code, start, p.mode):
                if (ins.address + ins.size if after else ins.address) == rip:
                    return f"{ins.text}  ; exception stub"
            return None
        if io_out:
            # `rep outsb` keeps RIP at itself until its count is done
            here, note = self.executed(st, rip, cs_base=cs_base)
            if here is not None and is_out(here):
                return instruction_name(here, note)
            after, made_by = True, made_by or is_out
        ins, note = self.executed(st, rip, after, cs_base, made_by)
        return instruction_name(ins, note) if ins is not None else None

    def executed(self, st: VcpuState, rip: int, after: bool = False,
                 cs_base: int | None = None, made_by=None) -> tuple:
        """(instruction, note): the instruction the CPU ran at rip, or (after=True) the one
        ending at rip, with the address it ran at (an IP in real mode); (None, "") when
        guest memory holds none.

        The listing's, with its source line, when memory still holds its bytes (and, after
        rip, it satisfies ``made_by``); else decoded from memory, line 0, the note saying
        how it stands to the listing: rewritten by the guest, or run from the middle of a
        listed instruction. The listing alone cannot tell: the guest may write new code
        over it, jump into an instruction, or run code it wrote elsewhere. After rip, what
        ran is found by trying each start up to 15 bytes back (the longest x86
        instruction): it must end at rip and satisfy ``made_by``; without ``made_by``, or
        with two different candidates, only a listed start rewritten in place is named.
        Real mode: the listing is found by linear address, whatever CS the code ran in."""
        p = self.payload
        lin = self.linear(st, rip, cs_base)
        cs_base = lin - rip               # read once (real, protected mode: an ioctl)
        shift = p.origin - p.load_address + cs_base       # rip + shift: a listing address
        mem = self._vm().slot_for(lin - 1 if after else lin)
        if mem is None:
            return None, ""
        if not after:
            ins = p.instruction_at(rip + shift)
            if ins is not None and mem.contains(lin, ins.size) \
                    and mem.read(lin, ins.size) == ins.raw:
                return _moved(ins, -shift), ""       # the common case: one compare
            one = self.decode_at(st, rip, cs_base)
            return (one, self._note(one, shift)) if one is not None else (None, "")
        ins = p.instruction_ending_at(rip + shift)
        if ins is not None and mem.contains(lin - ins.size, ins.size) \
                and mem.read(lin - ins.size, ins.size) == ins.raw \
                and (made_by is None or made_by(ins)):
            return _moved(ins, -shift), ""
        found = self.ending_at(st, rip, made_by, lin) if made_by is not None else []
        if len({one.text for one in found}) == 1:
            return found[0], self._note(found[0], shift)
        if made_by is None and ins is not None:      # rewritten in place, same boundaries?
            one = self.decode_at(st, rip - ins.size, cs_base)
            if one is not None and one.size == ins.size:
                return one, self._note(one, shift)
        return None, ""

    def ending_at(self, st: VcpuState, rip: int, made_by, lin: int | None = None) -> list:
        """Every instruction in guest memory that ends at rip and satisfies made_by,
        shortest first (addresses as rip's)."""
        lin = self.linear(st, rip) if lin is None else lin
        mem = self._vm().slot_for(lin - 1)
        if mem is None:
            return []
        # no further back than the slot's start or (real mode) IP 0
        lo = max(lin - 15, mem.gpa, lin - rip)
        return [one for one in instructions_ending(mem.read(lo, lin - lo), rip,
                                                   self.payload.mode) if made_by(one)]

    def _note(self, one, shift: int) -> str:
        """How an instruction decoded from memory stands to the listing."""
        p = self.payload
        start = one.address + shift
        ins = p.instruction_containing(start)
        if ins is None:
            # data run as prefixes of the listed instruction after it (`.byte 0x67` before
            # `ud2`): the CPU names the first prefix's address, which no line lists
            ins = p.instruction_ending_at(start + one.size)
            if ins is None or ins.address <= start or not self._intact(ins) or any(
                    p.instruction_containing(a) for a in range(start, ins.address)):
                return ""               # code the guest made elsewhere, or data
            # only prefixes: `.byte 0xcd` before `int3` runs as `int 0xcc`, an opcode
            # and its immediate, not int3 behind a prefix
            lead = one.raw[:ins.address - start]
            if one.raw[len(lead):] != ins.raw or not all(
                    b in _PREFIXES or (p.mode == "long" and 0x40 <= b <= 0x4F) for b in lead):
                return ""
            listed = "" if ins.text == one.text else f" ({ins.text})"
            return (f"line {ins.line}{listed}, after {ins.address - start} byte(s) of data "
                    "run as prefixes")
        if not self._intact(ins):
            return f"rewritten by the guest (line {ins.line}: {ins.text})"
        into = start - ins.address
        return f"run from byte {into} of line {ins.line} ({ins.text})"

    def _intact(self, ins) -> bool:
        """Whether guest memory still holds a listed instruction's bytes."""
        p = self.payload
        return self._whole_bytes(ins.address - p.origin + p.load_address, ins.size) == ins.raw

    def _whole_bytes(self, gpa: int, n: int) -> bytes | None:
        """The ``n`` bytes at guest-physical ``gpa`` when one slot holds them all, else None
        (guest_bytes reads a code address, through CS, and gives what the slot holds)."""
        mem = self._vm().slot_for(gpa)
        return mem.read(gpa, n) if mem is not None and mem.contains(gpa, n) else None

    def in_stubs(self, st, rip: int, cs_base: int | None = None) -> bool:
        """Whether rip is in minivmm's exception stubs' code. Real and protected mode: they
        run in a segment based at 0, so an IP in their range in another segment (cs_base,
        else the vCPU's) is the payload's own code."""
        if not L.STUBS <= rip <= stub_end(self.payload.mode):
            return False
        if self.payload.mode == "long":
            return True
        return (st.vcpu.get_sregs().cs.base if cs_base is None else cs_base) == 0

    def decode_at(self, st, address: int, cs_base: int | None = None):
        """The instruction guest memory holds at this code address, decoded there (not
        the listing's: no source line); None outside memory or where nothing decodes."""
        code = self.guest_bytes(st, address, 16, cs_base)
        return disassemble_one(code, address, self.payload.mode) if code else None

    def guest_bytes(self, st, address: int, n: int, cs_base: int | None = None) -> bytes:
        """Up to ``n`` bytes of guest memory at this code address (fewer at a slot's end;
        none outside memory)."""
        addr = self.linear(st, address, cs_base)
        mem = self._vm().slot_for(addr)
        return mem.read(addr, min(n, mem.gpa + mem.size - addr)) if mem is not None else b""

    def end_at(self, st, reason, code=None, after=False, registers=False, detail=None,
               io_out=False) -> VcpuEnd:
        """How a vCPU ended at its current RIP, with the instruction there named
        (describe_instruction's ``after``); the stepper uses it too. ``io_out``: the exit
        is an OUT, and RIP is reported past it on every host (out_exit_rip)."""
        # what the exit proves the instruction ending at rip was (Machine.executed)
        made_by = {"hlt": is_hlt, "unhandled-mmio": writes_memory}.get(reason)
        rip, _, instruction = self.exit_instruction(st, st.vcpu.get_regs(), after, made_by,
                                                    io_out, reason == "unhandled-mmio")
        end = VcpuEnd(reason, code=code, rip=rip, instruction=instruction,
                      detail=dict(detail or {}))
        if registers:
            end.detail["registers"] = self.registers(st)
        return end

    def exit_instruction(self, st, regs, after: bool, made_by=None, io_out: bool = False,
                         mmio: bool = False) -> tuple:
        """(rip, after, the instruction named) at an exit, for a vCPU's end and --trace
        alike: past an out (or at a repeating outs), RIP as out_exit_rip reports it and
        the out named by what the exit proves (out_made_by); after an MMIO write, the
        call whose write into a hole left RIP at its target (mmio_writer_end)."""
        rip = named = regs.rip
        if io_out:
            made_by = self.out_made_by(st, regs)
            rip, name_at = self.out_exit_rip(st, regs)
            named, after = rip, not name_at
        elif mmio and after:
            named = self.mmio_writer_end(st, regs)
        return rip, after, self.describe_instruction(st, named, after, made_by=made_by)

    def mmio_detail(self, st) -> dict:
        """The MMIO exit's fields, and the slot when the address is in one: a write to a
        KVM_MEM_READONLY slot exits as MMIO too (api.rst 4.35), and it is no access
        outside RAM."""
        detail = _strip(st.vcpu.describe_exit(abi.KVM_EXIT_MMIO))
        mem = self._vm().slot_for(detail["phys_addr"])
        if mem is not None:
            detail.update(slot=mem.slot, slot_name=mem.name,
                          read_only=bool(mem.flags & abi.KVM_MEM_READONLY))
        return detail

    def mmio_writer_end(self, st, regs) -> int:
        """Where the instruction that made an MMIO write ends: RIP, but a call leaves RIP at
        its target, where the instruction ending never ran (a `push rax` before the
        target's label was named): when the data written is a return address at which a
        call to RIP ends, that call's end."""
        mmio = st.vcpu.run_struct.mmio
        size, data = mmio.len, int.from_bytes(bytes(mmio.data)[:mmio.len], "little")
        del mmio                            # no view of kvm_run may outlive the call
        if data == regs.rip or size != {"real": 2, "protected": 4, "long": 8}[self.payload.mode]:
            return regs.rip

        def calls_rip(ins) -> bool:
            if ins.mnemonic.split()[-1] != "call":
                return False
            target = getattr(regs, ins.op_str, None)        # call rax
            if target is None:
                try:
                    target = int(ins.op_str, 0)             # call 0x10010
                except ValueError:
                    return False                            # where it went is not known
            return target == regs.rip
        ins, _ = self.executed(st, data, True, made_by=calls_rip)
        return data if ins is not None and calls_rip(ins) else regs.rip

    def mmio_after(self, st, regs=None) -> bool:
        """At an MMIO exit: True when RIP is past the instruction that made it (a write),
        False when RIP is at it: a read, or a write by a `rep movs`/`rep stos` that is
        still repeating (KVM keeps RIP at it until its count is done). Such a write is the
        string instruction's when RDI has just moved past the written address."""
        mmio = st.vcpu.run_struct.mmio
        is_write, phys = bool(mmio.is_write), mmio.phys_addr
        del mmio                            # no view of kvm_run may outlive the call
        if not is_write:
            return False
        regs = regs or st.vcpu.get_regs()
        ins = self.decode_at(st, regs.rip)
        words = ins.mnemonic.split() if ins is not None else []
        if len(words) < 2 or words[0] != "rep" or not words[-1].startswith(("movs", "stos")):
            return True
        width = {"b": 1, "w": 2, "d": 4, "q": 8}.get(words[-1][-1])
        mask = _ADDRESS_MASK[self.payload.mode]
        if width is None or not regs.rcx & mask:
            return True                     # the last repetition: RIP is past it
        step = -width if regs.rflags & 0x400 else width     # RFLAGS.DF
        # ES:EDI: a protected-mode payload's own GDT may give ES a base, as real mode's
        base = st.vcpu.get_sregs().es.base if self.payload.mode != "long" else 0
        return base + ((regs.rdi - step) & mask) != phys

    def out_exit_rip(self, st, regs) -> tuple:
        """(rip, name_at) for an IO exit at an OUT, the same on every host: rip past the
        out, name_at False (name the instruction ending at rip); or, for a string out that
        is still repeating, rip at it and name_at True.

        kvm_pvm moves RIP past a plain `out` before the exit; VMX/SVM leave it at the out
        and skip it on the next KVM_RUN (arch/x86/kvm/x86.c kvm_fast_pio_out() ->
        complete_fast_pio_out()). The instruction at RIP says which: it is the out only if
        it would make exactly this exit (port and size). A string out goes through the
        emulator (vmx.c handle_io -> kvm_emulate_instruction), which keeps RIP at a
        `rep outs` until its count is done, on every host."""
        made_by = self.out_made_by(st, regs)
        here = self.decode_at(st, regs.rip)
        if here is None or not made_by(here):
            return regs.rip, False          # past it already (kvm_pvm), or not decodable
        words = here.mnemonic.split()
        if words[-1] != "out":
            # A string out goes through KVM's emulator, which writes RIP past a plain outs
            # before this exit (x86_emulate_instruction's writeback, arch/x86/kvm/x86.c;
            # kvm_pvm too, measured): a plain one at RIP is the next instruction when one
            # ending at RIP made the exit (`outsb; outsb`)
            if words[0] != "rep" and self.ending_at(st, regs.rip, made_by):
                return regs.rip, False
            return regs.rip, True           # rep outs: RIP stays at it while it repeats
        if self.ending_at(st, regs.rip, made_by):
            # RIP at an out that would make this exit fits both hosts when one that would
            # too ends at RIP (`out X; out X`, or bytes that decode so): re-entering with
            # immediate_exit finishes a pending out without running the guest further
            # (api.rst 5, "immediate_exit"), so RIP is then past it anyway
            return self._complete_pending_io(st), False
        return regs.rip + here.size, False  # nothing before it made this exit: at it

    def out_made_by(self, st, regs):
        """At an IO exit for an OUT: a predicate telling the instructions that would make
        exactly this exit (an out or outs to this port with this size)."""
        io = st.vcpu.run_struct.io
        port, size = io.port, io.size
        del io                              # no view of kvm_run may outlive the call
        dx = regs.rdx & 0xFFFF

        def made_by(ins) -> bool:
            name = ins.mnemonic.split()[-1]
            if name == "out":
                where, _, reg = ins.op_str.partition(", ")
                width = {"al": 1, "ax": 2, "eax": 4}.get(reg)
            elif name in ("outsb", "outsw", "outsd"):
                where, width = "dx", {"b": 1, "w": 2, "d": 4}[name[-1]]
            else:
                return False
            return (dx if where == "dx" else int(where, 0), width) == (port, size)
        return made_by

    def _complete_pending_io(self, st) -> int:
        """Finish the pending IO with a KVM_RUN that runs no guest instruction; its RIP.
        That KVM_RUN's exit reason is kept in st.completed_by: KVM_EXIT_DEBUG when KVM
        guest debug's single-step took the out's step trap then (x86.c
        complete_fast_pio_out -> kvm_skip_emulated_instruction -> kvm_vcpu_do_singlestep),
        which writes kvm_run's exit_reason and its io fields over (the same union): the
        IO exit being handled is put back, so its port, size and data still read."""
        run = st.vcpu.run_struct
        reason, io = run.exit_reason, type(run.io).from_buffer_copy(run.io)
        held, run.immediate_exit = run.immediate_exit, 1
        try:
            st.completed_by = st.vcpu.run()     # EINTR (or a step trap's KVM_EXIT_DEBUG)
        finally:
            run.immediate_exit = held
            run.exit_reason, run.io = reason, io
        return st.vcpu.get_regs().rip

    def reset_by_kvm(self, st) -> bool:
        """True when the vCPU is in the INIT state after a KVM_EXIT_SHUTDOWN.

        svm.c shutdown_interception() reinitialises the VMCB (clear_page(), then
        kvm_vcpu_reset(vcpu, true); init_vmcb() in older kernels) before it returns
        KVM_EXIT_SHUTDOWN, so the registers read afterwards are the reset state, not the
        fault's; vmx.c handle_triple_fault() leaves them. A payload cannot get there
        itself: CS 0xf000 with base 0xffff0000 exists only after a reset (a real-mode CS
        load sets the base to 0xf0000, and minivmm's GDT has no selector 0xf000)."""
        regs, sregs = st.vcpu.get_regs(), st.vcpu.get_sregs()
        return (regs.rip == INIT_RIP and sregs.cs.selector == INIT_CS
                and sregs.cs.base == INIT_CS_BASE and not sregs.cr0 & 1)   # CR0.PE clear

    def shutdown_end(self, st, last_rip: int | None = None) -> VcpuEnd:
        """A triple fault (KVM_EXIT_SHUTDOWN), with the registers where KVM kept them.
        Where KVM reset the vCPU (SVM) they are lost: the end then says so and has only
        ``last_rip`` (the instruction the caller last knew the vCPU at), if given."""
        if not self.reset_by_kvm(st):
            return self.end_at(st, "shutdown", registers=True)
        ins = self.describe_instruction(st, last_rip) if last_rip is not None else None
        detail = {"registers_lost": True}
        if last_rip is not None:
            detail["rip_is"] = "last known"
        return VcpuEnd("shutdown", rip=last_rip, instruction=ins, detail=detail)

    def stub_frame(self, st, regs) -> dict | None:
        """The frame minivmm's exception stub left on the stack (x86/modes.py, in the
        payload's mode), its address under "_at"; None when it is not in guest memory.
        Outside long mode, where the CPU pushes no stack pointer, "rsp" is where the
        stack was before the exception."""
        mode = self.payload.mode
        fmt, fields = STUB_FRAME_LAYOUT[mode]
        size, mask = struct.calcsize(fmt), _ADDRESS_MASK[mode]
        if mode == "real":
            # 16-bit pushes wrap SP at 64 KiB: read each word at SS:((SP + 2i) & 0xffff)
            ss_base = st.vcpu.get_sregs().ss.base
            words = []
            for i in range(len(fields)):
                raw = self._whole_bytes(ss_base + ((regs.rsp + 2 * i) & mask), 2)
                if raw is None:
                    return None
                words.append(struct.unpack("<H", raw)[0])
            frame, at = dict(zip(fields, words)), ss_base + (regs.rsp & mask)
        else:
            # protected mode: at SS:ESP, whose base a payload's own GDT may make non-zero
            # (the stub's frame was read at ESP, giving another vector); 64-bit mode
            # ignores SS's base
            ss_base = st.vcpu.get_sregs().ss.base if mode == "protected" else 0
            at = (ss_base + (regs.rsp & mask)) & mask
            raw = self._whole_bytes(at, size)
            if raw is None:
                return None
            frame = dict(zip(fields, struct.unpack(fmt, raw)))
            if ss_base and not cpu_pushed_frame(mode, frame):
                self._cpu_part_without_ss_base(frame, regs.rsp, ss_base)
        if mode != "long":
            frame["rsp"] = (regs.rsp + size) & mask
        frame["_at"] = at
        return frame

    def _cpu_part_without_ss_base(self, frame: dict, esp: int, ss_base: int) -> None:
        """A host may push the CPU's part of a protected-mode frame (error code, EIP, CS,
        EFLAGS) at ESP as if SS's base were 0 (kvm_pvm, measured), where the SDM says SS's
        base + ESP, which the stub's own pushes (EAX, vector, its 0 error code) did use.
        Take that part from there when it is one the CPU could have pushed, and say so."""
        fields = ("error_code", "rip", "cs", "rflags")
        if not pushes_error_code(frame["vector"], "protected"):
            fields = fields[1:]                     # the stub's 0 is where it should be
        at = (esp + 4 * (6 - len(fields))) & 0xFFFFFFFF
        raw = self._whole_bytes(at, 4 * len(fields))
        if raw is None:
            return
        values = struct.unpack(f"<{len(fields)}I", raw)
        moved = dict(frame, **dict(zip(fields, values)))
        if cpu_pushed_frame("protected", moved):
            frame.update(moved, _host_note=f"this host pushed the CPU's frame at {at:#x}, "
                         f"as if SS's base were 0, not {ss_base:#x} (SDM vol. 3, 6.12.1)")

    def _exception_end(self, st) -> VcpuEnd:
        frame, end = self.stub_report(st, st.vcpu.get_regs())
        return end or self.exception_end(st, frame)

    def stub_report(self, st, regs) -> tuple:
        """(frame, None) for an out to the exception port made by minivmm's exception stub
        (x86/modes.py) with its frame readable at RSP; else (None, the vCPU's end): the
        payload wrote the port itself, or the stub's stack is outside guest memory."""
        # RIP is past the stub's out (kvm_pvm) or still at it (VMX/SVM): inside the stubs
        mode = self.payload.mode
        from_stub = self.in_stubs(st, regs.rip)
        frame = self.stub_frame(st, regs) if from_stub else None
        # A frame the CPU pushed names one of our code selectors; a payload that jumped
        # into the stubs leaves whatever its stack held (all zero, typically). The stubs
        # run at CPL0 (their gates say so): a CPL3 payload running their code does not
        if from_stub and st.vcpu.get_sregs().cs.selector & 3:
            from_stub = False
        if frame is not None and from_stub and cpu_pushed_frame(mode, frame):
            return frame, None
        from_stub = from_stub and frame is None
        value = int.from_bytes(st.vcpu.io_data()[:4], "little")
        reason = "unreadable-exception-frame" if from_stub else "exception-port-by-payload"
        return None, self.end_at(st, reason, after=True, io_out=True, registers=True,
                                 detail={"port": L.PORT_EXCEPTION, "value": value,
                                         "rsp": regs.rsp})

    def debug_cause(self, st, frame: dict) -> DebugCause:
        """What raised the #DB this stub frame reports (x86/debug.py), from the guest's DR6
        and DR7 at the stub's report (KVM_GET_DEBUGREGS: the stub itself touches no debug
        register). Kept in the frame: the stepper asks first, the end asks again."""
        if "_debug" in frame:
            return frame["_debug"]
        try:
            dr = st.vcpu.get_debugregs()
        except KvmError as e:           # no DR6 to read: the old rule, said to be a guess
            cause = debug.unknown(f"DR6 unreadable ({e})")
        else:
            cause = debug.classify(dr.dr6, dr.dr7, dr.db)
            frame["_debugregs"] = dr         # for reset_dr6, one KVM_GET_DEBUGREGS fewer
        if cause.kind == "icebp":
            self._find_icebp(st, frame, cause)
        frame["_debug"] = cause
        return cause

    def _find_icebp(self, st, frame: dict, cause: DebugCause) -> None:
        """A #DB with no cause in DR6 is INT1 (icebp). Hardware pushes the address past
        it; kvm_pvm was measured pushing the icebp's own address (native CPL3 code). The
        code in memory at RIP says which (Machine.executed: the guest may have written
        the icebp over its listing, or elsewhere), else a probe of this host decides; no
        icebp either way: `int 1` ending at RIP, or the cause is unknown."""
        at, cs_base = frame["rip"], self._frame_cs_base(st, frame)
        before, _ = self.executed(st, at, after=True, cs_base=cs_base, made_by=is_icebp)
        here, _ = self.executed(st, at, cs_base=cs_base)
        here = here is not None and is_icebp(here)
        if before is not None and here:     # `icebp; icebp`: only the host's behaviour tells
            if probe_icebp_rip(self.payload.mode, self.payload.cpl, self.kvm) == "at":
                before = None
            else:
                here = False
        if before is not None:
            cause.icebp_at = before.address
        elif here:
            cause.icebp_at = at
            cause.note = ("but this host pushed the icebp's own address (hardware pushes "
                          "the next instruction's)")
        elif self.executed(st, at, after=True, cs_base=cs_base,
                           made_by=int_n(VEC_DB))[0] is not None:
            cause.kind = "int-1"        # a software interrupt through the #DB gate
        else:
            cause.kind = "unknown"
            cause.note = ("DR6 names no cause and no icebp is at or before RIP: named as a "
                          "trap")

    def _frame_cs_base(self, st, frame: dict) -> int | None:
        """The cs_base (Machine.executed) of a stub frame's pushed RIP: real mode's pushed
        IP is an offset in the pushed CS's segment, and so is protected mode's EIP: the
        base of the pushed selector's descriptor (the stub runs in another CS, so the
        vCPU's says nothing). None in long mode, or where the descriptor is unreadable."""
        mode = self.payload.mode
        if mode == "real":
            return frame["cs"] << 4
        if mode != "protected":
            return None
        sregs = st.vcpu.get_sregs()
        table = sregs.ldt if frame["cs"] & 4 else sregs.gdt     # TI: GDT or LDT
        index = frame["cs"] & ~7
        if index + 7 > table.limit:
            return None
        d = self._whole_bytes(table.base + index, 8)
        if d is None:
            return None
        return d[2] | d[3] << 8 | d[4] << 16 | d[7] << 24          # SDM vol. 3, 3.4.5

    def reset_dr6(self, st, frame: dict | None = None) -> None:
        """Clear the guest's DR6 status bits (KVM_SET_DEBUGREGS) before its #DB stub
        resumes it, as a #DB handler must: the CPU never clears them (x86/debug.py).
        ``frame``: a #DB's, whose debug_cause has read the debug registers already (or
        found them unreadable: then nothing to clear)."""
        if frame is not None and "_debug" in frame:
            dr = frame.get("_debugregs")
            if dr is None:
                return
        else:
            dr = st.vcpu.get_debugregs()
        if dr.dr6 != debug.DR6_INIT:
            dr.dr6 = debug.DR6_INIT
            st.vcpu.set_debugregs(dr)

    def exception_end(self, st, frame: dict) -> VcpuEnd:
        """How a vCPU ended, from the exception frame its stub reported."""
        cr2 = st.vcpu.get_sregs().cr2
        # #DB traps and #BP (int3) push the address after the instruction (SDM vol. 3,
        # 6.5: traps); faults push the faulting instruction's own address
        vector = frame["vector"]
        trap, made_by = vector in TRAP_VECTORS, raises(vector)
        # real mode: the pushed IP is an offset in the pushed CS's segment (executed finds
        # the listing by linear address, whatever CS a far jump left)
        at, cs_base = frame["rip"], self._frame_cs_base(st, frame)
        # None where the CPU pushed none (#UD, #BP, anything in real mode): the 0 in the
        # frame is the stub's own, and --json said "error_code": 0 as if #GP(0)
        detail = {"error_code": frame["error_code"]
                  if pushes_error_code(vector, self.payload.mode) else None, "cr2": cr2,
                  "name": EXCEPTION_NAMES.get(vector, "?"),
                  "cs": frame["cs"], "rsp": frame["rsp"], "rflags": frame["rflags"]}
        if "_host_note" in frame:
            detail["host_note"] = frame["_host_note"]
        if vector == VEC_DB:
            # a code breakpoint or general detect is a fault; icebp is where it was found
            cause = self.debug_cause(st, frame)
            detail["debug"] = cause.to_dict()
            trap = not cause.fault
            if cause.icebp_at is not None:
                at, trap = cause.icebp_at, False
            elif cause.kind == "int-1":
                made_by = int_n(VEC_DB)     # what ran may be code the listing does not hold
        elif not trap:
            # `int n` is a software interrupt: the pushed address is past it, as for a
            # trap. Memory is searched only where the listing does not vouch for the bytes
            # before: a fault's own address may follow bytes that merely look like an int
            ins, note = self.executed(st, at, after=True, cs_base=cs_base)
            if ins is None or note:
                ins, note = self.executed(st, at, after=True, cs_base=cs_base,
                                          made_by=made_by)
            trap = ins is not None and made_by(ins)
        named = self.describe_instruction(st, at, after=trap, cs_base=cs_base,
                                          made_by=made_by)
        if named is None and not trap:
            # a #UD on bytes nothing decodes (data run as code): show them, not nothing
            raw = self.guest_bytes(st, at, 8, cs_base)
            if raw and disassemble_one(raw, at, self.payload.mode) is None:
                detail["bytes"] = raw.hex(" ")
        return VcpuEnd("exception", vector=vector, rip=frame["rip"], instruction=named,
                       detail=detail)


def probe_icebp_rip(mode: str, cpl: int, kvm: Kvm | None = None) -> str | None:
    """Where this host's #DB frame for an icebp points, in this mode and CPL: "after" it
    (as hardware), "at" it (kvm_pvm, native CPL3), or None (no #DB reached the stub:
    kvm_pvm's emulator cannot run icebp at all). A throwaway VM runs one icebp; cached."""
    key = (mode, cpl if mode == "long" else 0)
    if key not in _ICEBP_RIP:
        payload = Payload(name="icebp-probe", path="", mode=mode, cpl=key[1], vcpus=1,
                          description="", code=bytes((debug.ICEBP, 0xF4)),   # icebp; hlt
                          load_address=L.CODE, origin=0 if mode == "real" else L.CODE,
                          listing=[], header={})
        with Machine(payload, vcpus=1, pages=1, kvm=kvm) as m:
            st = m.states[0]
            start = st.vcpu.get_regs().rip
            found = None
            reason = st.vcpu.run()
            io = st.vcpu.run_struct.io
            reported = reason == _IO and io.port == L.PORT_EXCEPTION and io.direction == _OUT
            del io
            if reported:
                frame, _ = m.stub_report(st, st.vcpu.get_regs())
                if frame is not None and frame["vector"] == VEC_DB:
                    found = {start: "at", start + 1: "after"}.get(frame["rip"])
        _ICEBP_RIP[key] = found
    return _ICEBP_RIP[key]


_ICEBP_RIP: dict = {}


def instruction_name(ins, note: str = "") -> str:
    """An instruction as ends, traces and steps name it: with its source line, or with
    the note Machine.executed gave for code that is not the listing's."""
    if note:
        return f"{ins.text}  ; {note}"
    return ins.text + (f"  ; line {ins.line}" if ins.line else "")


def _moved(ins, by: int):
    """ins at an address ``by`` bytes on (the listing's, in the segment it ran in)."""
    return ins if not by else dataclasses.replace(ins, address=ins.address + by)


# What an exit proves about the instruction that ended at RIP (Machine.executed's made_by)
def is_out(ins) -> bool:
    return ins.mnemonic.split()[-1].startswith("out")


def is_hlt(ins) -> bool:
    return ins.mnemonic == "hlt"


def writes_memory(ins) -> bool:
    """A memory destination: what an MMIO write's instruction has (mov, stos, add ...),
    or a write to the stack, which names no memory operand (push, pushf, call, enter):
    with RSP in a hole, theirs is the write (else `call` was passed over for the `00 00`,
    `add byte ptr [rax], al`, ending its rel32)."""
    name = ins.mnemonic.split()[-1]
    return "[" in ins.op_str.split(",")[0] or name.startswith("push") or \
        name in ("call", "lcall", "enter")


def raises(vector: int):
    """The instructions that raise ``vector`` as a trap or software interrupt: int n,
    and int3, into, int1 for #BP, #OF, #DB (None for #DB: a TF trap follows any)."""
    short = {3: "int3", 4: "into"}.get(vector)
    if vector == 1:
        return None
    is_int = int_n(vector)

    def fits(ins) -> bool:
        return ins.mnemonic == short or is_int(ins)
    return fits


def int_n(vector: int):
    """`int vector` (CD ib), a software interrupt through that vector's gate."""
    def fits(ins) -> bool:
        return ins.mnemonic == "int" and _int_operand(ins.op_str) == vector
    return fits


def is_icebp(ins) -> bool:
    """INT1, the one-byte icebp (0xF1)."""
    return ins.mnemonic == "int1"


def _int_operand(op_str: str) -> int | None:
    try:
        return int(op_str, 0)
    except ValueError:
        return None


def start_thread(thread: threading.Thread, what: str) -> None:
    """thread.start(), or an OSError (EAGAIN) naming ``what`` and the likely limit:
    threading says only "can't start new thread" (a RuntimeError) where pthread_create()
    failed with EAGAIN."""
    try:
        thread.start()
    except RuntimeError as e:
        raise OSError(errno.EAGAIN, f"cannot start {what} ({e}): the host refused a new "
                      "thread (too many processes for RLIMIT_NPROC, ulimit -u, or no "
                      "memory for its stack, ulimit -v)") from None


def _forward_to_main_thread(sig: int) -> None:
    try:
        signal.pthread_kill(threading.main_thread().ident, sig)
    except (ProcessLookupError, TypeError):
        pass


def format_registers(regs: dict) -> str:
    """The registers of an end's detail on one line, as `run` and `step` print them."""
    return "    registers: " + " ".join(f"{k}={v:#x}" for k, v in regs.items())


def _strip(exit_info: dict) -> dict:
    return {k: v for k, v in exit_info.items() if k not in ("reason", "exit_reason")}


def unexpected_exit_detail(vcpu, reason: int) -> dict:
    """An unexpected exit's detail: its decoded fields, and which exit it was (_strip
    drops the name and number, which the end's reason, "unexpected-exit", does not say)."""
    name = abi.EXIT_NAMES.get(reason)
    detail = _strip(vcpu.describe_exit(reason))
    detail["exit"] = f"KVM_EXIT_{name} ({reason})" if name else f"exit reason {reason}"
    return detail


def run_payload(payload, vcpus=None, pages=DEFAULT_PAGES, timeout=None) -> RunResult:
    """One-call convenience: build a Machine, run it, close it."""
    with Machine(payload, vcpus=vcpus, pages=pages) as m:
        return m.run(timeout)
