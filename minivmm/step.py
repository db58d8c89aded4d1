"""``minivmm step``: single-step a payload, one instruction per line; ``--dirty`` ties every
dirty-ring entry to the instruction that produced it.

Two ways to step, because which one works depends on the host (host-probes.md sections 2
and 4; abi.md section 6):

* **KVM guest debug** (Documentation/virt/kvm/api.rst 4.87 KVM_SET_GUEST_DEBUG):
  ``KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP`` makes KVM return ``KVM_EXIT_DEBUG``
  after every instruction (``kvm_run.debug.arch``: exception 1, ``pc`` = the next
  instruction). Breakpoints use ``KVM_GUESTDBG_USE_HW_BP`` with DR0 = the address and
  DR7 = 1 (local enable, execute). On VMX/SVM hosts this works in every mode; on
  ``kvm_pvm`` only for code it emulates (real mode, protected mode, long mode at CPL0).
* **In-guest stepping**, for native CPL3 code on ``kvm_pvm``: the VMM sets RFLAGS.TF
  with KVM_SET_REGS. The CPU then raises a debug exception (#DB, vector 1) after every
  instruction, a trap whose saved RIP is the next instruction (Intel SDM vol. 3, 18.3.1.4
  "Single-Step Exception Condition" and 6.15 "Interrupt 1"). The #DB goes through the
  guest IDT to minivmm's exception stub (x86/modes.py), which reports it with
  ``out 0xe0`` and asks with ``in 0xe0`` whether to resume; the host answers 1 and the
  stub's ``iretq`` restores RFLAGS with TF still set, so the next instruction traps too.
  A #DB is a step only when the guest's DR6 says single-step (BS; KVM_GET_DEBUGREGS,
  x86/debug.py): the payload's own breakpoint or icebp ends the stepping as an exception.
  DR6 keeps its bits until cleared, so the stepper clears it after each step.
  Breakpoints are an ``int3`` byte written over the instruction; its #BP (vector 3)
  reaches the stub the same way.

Either way the rule of host-probes.md 2 holds: an ``out`` leaves with its KVM_EXIT_IO and
the step trap after it is lost, so that IO exit counts as the ``out``'s step.

``auto`` decides at run time: for long-mode CPL3 code it single-steps one instruction
with KVM guest debug on a throwaway VM and keeps guest debug only if that gives a
KVM_EXIT_DEBUG in the payload (on kvm_pvm the #DB lands in the guest's stub instead).
"""
from __future__ import annotations

import dataclasses
import re
import signal
import struct
import sys
import threading
import traceback
import weakref
import time

from . import _sys, abi
from ._args import as_option, check_number, check_type, named
from .kvm import Kvm, vendor_module
from .machine import (KICK_SIGNAL, Console, Machine, MachineError, VcpuEnd,
                      format_registers, install_kick_handler, instruction_name, is_hlt,
                      _forward_to_main_thread, start_thread, unexpected_exit_detail)
from .payload import Payload, load
from .x86 import layout as L
from .x86.modes import STUB_FRAME_FIELDS

MECHANISMS = ("auto", "guest-debug", "in-guest")
GUEST_DEBUG, IN_GUEST = "guest-debug", "in-guest"
MECHANISM_TEXT = {
    GUEST_DEBUG: "KVM guest debug (KVM_SET_GUEST_DEBUG, KVM_GUESTDBG_SINGLESTEP: one "
                 "KVM_EXIT_DEBUG per instruction)",
    IN_GUEST: "in-guest stepping (RFLAGS.TF; each #DB trap reported by minivmm's stub "
              "over port 0xe0)",
}

TF = 0x100                  # RFLAGS.TF, trap flag (SDM vol. 1, 3.4.3.3)
# The status flags plus DF: what an instruction changes. IF and IOPL are left out on
# purpose: kvm_pvm drops IOPL and sets IF on its own (host-probes.md 1), which is no
# instruction's doing.
FLAGS_SHOWN = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800   # CF PF AF ZF SF DF OF
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# What else an instruction may change, from KVM_GET_SREGS: the segment selectors (`mov ds,
# ax`, a far jump) and the control registers and EFER (`mov cr0, eax` entering protected
# mode, `mov cr3`, `wrmsr`). CR2 is left out: only a fault writes it, and a fault ends.
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
CONTROL = ("cr0", "cr3", "cr4", "efer")
VEC_DB, VEC_BP = 1, 3
INT3 = 0xCC
RING_ENTRIES = 4096
DEFAULT_COUNT = 1000
DEFAULT_PAGES = 16
DEFAULT_MAX_TIME = 60.0     # seconds for a whole session: --count 0 on a spinning guest ends
PROBE_EXITS = 8             # exits the guest-debug probe waits for a verdict

_IO, _DEBUG, _HLT, _INTR = abi.KVM_EXIT_IO, abi.KVM_EXIT_DEBUG, abi.KVM_EXIT_HLT, abi.KVM_EXIT_INTR
_OUT = abi.KVM_EXIT_IO_OUT


class StepError(ValueError):
    """A step request that cannot be honoured (bad breakpoint, mechanism, vCPU)."""


# -- what one step is --

@dataclasses.dataclass
class RingEntry:
    """One dirty-ring entry, tied to the step at whose exit it was harvested."""
    index: int        # free-running ring index (the VMM's fetch index + position)
    vcpu: int
    slot: int
    page: int         # page offset inside the slot (kvm_dirty_gfn.offset)
    by: str           # "payload", or "stub" for minivmm's own #DB stub's stack writes
    what: str = ""    # for system pages: which part of slot 0 it is

    @property
    def slot_name(self) -> str:
        return {L.SLOT_SYSTEM: "system", L.SLOT_DATA: "data"}.get(self.slot, f"slot {self.slot}")

    def to_dict(self) -> dict:
        return {"entry": self.index, "vcpu": self.vcpu, "slot": self.slot,
                "slot_name": self.slot_name, "page": self.page, "by": self.by,
                "what": self.what}


@dataclasses.dataclass
class Step:
    number: int
    address: int              # the instruction executed (payload address space: IP in real mode)
    next: int                 # where execution continues
    raw: bytes
    instruction: str
    line: int                 # source line, 0 when not from the payload's listing
    changed: dict             # register -> value after the instruction (rip left out)
    event: str                # how the host learned of it: debug-exit | db-trap | io-exit | hlt
    io: dict | None = None    # for an `out`: port, value and size (bytes)
    dirty: list | None = None  # RingEntry list with --dirty
    note: str = ""            # when the step is not exactly one instruction (stepping lost)

    def to_dict(self, mechanism: str) -> dict:
        out = {"step": self.number, "address": self.address, "next": self.next,
               "bytes": self.raw.hex(), "instruction": self.instruction, "line": self.line,
               "changed": self.changed, "event": self.event, "mechanism": mechanism}
        if self.io is not None:
            out["io"] = self.io
        if self.dirty is not None:
            out["dirty"] = [e.to_dict() for e in self.dirty]
        if self.note:
            out["note"] = self.note
        return out


# -- choosing the mechanism --

def probe_guest_debug(payload: Payload, kvm: Kvm | None = None) -> tuple:
    """Single-step the payload's first instruction(s) with KVM guest debug on a throwaway
    VM. Returns (works, evidence): works is True when a KVM_EXIT_DEBUG arrived with the pc
    in the payload, False when the step went somewhere else (the guest's #DB stub, a
    triple fault), None when the payload ended before a verdict."""
    try:
        m = Machine(payload, vcpus=1, pages=1, kvm=kvm)
    except MachineError as e:
        if getattr(e, "argument", None) != "pages":
            raise
        # its one data page could not be mapped: the probe's own size, not the caller's
        # pages (a MachineError would be reported as the user's --pages)
        raise MemoryError(f"guest-debug probe VM: {e}") from None
    with m:
        vcpu = m.states[0].vcpu
        vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
        for _ in range(PROBE_EXITS):
            reason = vcpu.run()
            info = vcpu.describe_exit(reason)
            if reason == _DEBUG:
                pc = info["pc"]
                if m.in_stubs(m.states[0], pc):
                    return False, (f"the step's #DB was delivered to the guest's own #DB "
                                   f"handler (KVM_EXIT_DEBUG at pc {pc:#x}, inside minivmm's "
                                   "exception stubs), not reported to the VMM")
                return True, f"KVM_EXIT_DEBUG at pc {pc:#x}, the payload's next instruction"
            if reason == abi.KVM_EXIT_SHUTDOWN:
                return False, "the single-step ended in KVM_EXIT_SHUTDOWN"
            if reason == _IO and info["direction"] == "out" and info["port"] == L.PORT_EXCEPTION:
                return False, (f"the step raised vector {info['data']} in the guest's stub "
                               "instead of a KVM_EXIT_DEBUG")
            if reason == _IO and info["direction"] == "out" and info["port"] != L.PORT_EXIT:
                continue            # an `out` replaces its debug exit: look at the next one
            break
        return None, f"no verdict: the probe saw {info['reason']} first"


def choose_mechanism(payload: Payload, requested: str = "auto", kvm: Kvm | None = None) -> tuple:
    """(mechanism, why) for this payload on this host."""
    if not isinstance(requested, str) or requested not in MECHANISMS:
        raise named(StepError(f"unknown mechanism {requested!r} "
                              f"(expected one of {', '.join(MECHANISMS)})"), "mechanism")
    if requested == IN_GUEST and payload.mode != "long":
        raise named(StepError(f"mechanism in-guest needs long mode (the #DB stub lives in "
                              f"the long-mode IDT); {payload.name} is a {payload.mode}-mode "
                              "payload"), "mechanism")
    if requested != "auto":
        return requested, "asked for with --mechanism"
    vendor = vendor_module()
    if payload.mode != "long" or payload.cpl == 0:
        where = f"{payload.mode} mode" if payload.mode != "long" else "long mode at CPL0"
        note = (" (kvm_pvm emulates it, so KVM sees every instruction)"
                if vendor == "kvm_pvm" else "")
        return GUEST_DEBUG, f"{where} code can be stepped by KVM itself{note}"
    works, evidence = probe_guest_debug(payload, kvm)
    if works:
        return GUEST_DEBUG, f"probe on a throwaway VM: {evidence}"
    return IN_GUEST, (f"probe on a throwaway VM: {evidence}; KVM guest debug cannot step "
                      f"native CPL3 code on this host (vendor module {vendor})")


def _check_forced_break(payload: Payload, bp: int, kvm: Kvm | None) -> None:
    """--mechanism guest-debug with --break: refuse where the probe shows KVM guest debug
    never reaches the VMM from this code. Its hardware breakpoint would then be ignored
    (host-probes.md 2: native CPL3 on kvm_pvm) and the payload would run past it."""
    if payload.mode != "long" or payload.cpl == 0:
        return                           # emulated everywhere it matters: KVM sees it
    works, evidence = probe_guest_debug(payload, kvm)
    if works is False:
        raise named(StepError(f"mechanism guest-debug cannot break at {bp:#x}: probe on a "
                              f"throwaway VM: {evidence}; KVM guest debug does not see this "
                              "native CPL3 code on this host (vendor module "
                              f"{vendor_module()}), so its hardware breakpoint would never "
                              "fire; use the in-guest mechanism (--mechanism in-guest) or "
                              "auto"), "mechanism")


# -- breakpoints --

# What --break takes, as the CLI's counts do (cli._integer): an address in decimal, or hex
# after 0x, and a line number in decimal, ASCII digits only. int(text, 0) also took 0o, 0b,
# 1_0 and any script's digits (an Arabic-Indic line:١٢ was line 12), none of which is said
_ADDRESS = re.compile(r"-?(?:0[xX][0-9a-fA-F]+|[0-9]+)")
_LINE_NUMBER = re.compile(r"[0-9]+")


def resolve_break(payload: Payload, text: str | int) -> int:
    """An address (an int, or a string in decimal, or hex after 0x), ``line:N`` (N in
    decimal), or a label of the payload, to the address of an instruction in its listing
    (payload address space: IP in real mode)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise named(TypeError("breakpoint must be an address (int or str), line:N or a "
                              f"label, not {type(text).__name__}"), "breakpoint")
    # an int is held to the listing too: an int3 (or DR0) inside an instruction would
    # change what the guest runs
    text = f"{text:#x}" if isinstance(text, int) else text.strip()
    said = _cut(text)      # as the messages name it: a 5000-digit value was echoed whole
    starts = {ins.address: ins for ins in payload.listing}
    if text.lower().startswith("line:"):
        try:
            if not _LINE_NUMBER.fullmatch(text[5:]):
                raise ValueError
            no = int(text[5:], 10)
        except ValueError:      # past int()'s 4300 digits too
            raise named(StepError(f"breakpoint {said}: expected line:N with N a line number "
                                  "(decimal)"), "breakpoint") from None
        for ins in payload.listing:
            if ins.line == no:
                return ins.address
        raise named(StepError(f"breakpoint {said}: line {no} of {payload.path} holds no "
                              "instruction"), "breakpoint")
    if _ADDRESS.fullmatch(text):
        try:
            addr = int(text, 0)
        except ValueError:      # a leading 0 (octal or decimal?), or past 4300 digits
            raise named(StepError(f"breakpoint {said}: not an address: decimal without a "
                                  "leading 0, or hex after 0x"), "breakpoint") from None
    else:
        addr = _label_address(payload, text)
    if addr not in starts:
        first, last = payload.listing[0], payload.listing[-1]
        raise named(StepError(f"breakpoint {said}: {_cut(f'{addr:#x}')} is not the start of an "
                              f"instruction of {payload.name} (its instructions span "
                              f"{first.address:#x}..{last.address + last.size - 1:#x}; see "
                              "`minivmm disasm`)"), "breakpoint")
    return addr


def _cut(text: str, limit: int = 40) -> str:
    """``text`` as a message names it: at most ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _label_address(payload: Payload, name: str) -> int:
    # the labels the assembler saw, not the file re-read: a Payload from assemble_source()
    # has none, and a pipe (`minivmm step <(...)`) is empty the second time
    labels = payload.labels
    if name not in labels:
        shown = ", ".join(sorted(labels)) or "none"
        raise named(StepError(f"breakpoint {_cut(name)}: not a number (decimal, or hex after 0x), "
                              f"line:N, or a label of {payload.name} (labels: {shown})"),
                    "breakpoint")
    for ins in payload.listing:          # the first instruction at or after the label
        if ins.address >= labels[name]:
            return ins.address
    raise named(StepError(f"breakpoint {name}: the label is followed by no instruction "
                          "(data?)"), "breakpoint")


# -- stepping --

class StepSession:
    """A payload in a fresh Machine, stepped in the calling thread (not Machine.run()).

    Iterate over it for Step objects; ``end`` says why the guest stopped, ``stopped``
    (with ``end`` None) that the host stopped stepping a guest still running. Use as a
    context manager. ``timeout`` bounds the wait for any one step (a guest that stops
    trapping, or a breakpoint never reached); ``max_time`` (None: no bound) the whole
    session from its first step, the run to the breakpoint included.
    """

    def __init__(self, payload: Payload | str, mechanism: str = "auto", vcpus: int = 1,
                 vcpu: int = 0, pages: int = DEFAULT_PAGES, iterations: int = 1,
                 breakpoint: str | int | None = None, dirty: bool = False,
                 timeout: float = 10.0, kvm: Kvm | None = None,
                 max_time: float | None = DEFAULT_MAX_TIME):
        self.payload = payload if isinstance(payload, Payload) else load(payload)
        p = self.payload
        check_number("vcpus", vcpus, 1, error=StepError)
        check_number("vcpu", vcpu, error=StepError)
        if not 0 <= vcpu < vcpus:
            raise named(StepError(f"vcpu {vcpu} does not exist: the machine has {vcpus} "
                                  f"vCPU(s) (0..{vcpus - 1})"), "vcpu")
        check_number("iterations", iterations, 0, (1 << 64) - 1, error=StepError)   # RCX
        check_type("dirty", dirty, bool, "True or False")
        check_type("kvm", kvm, (Kvm, type(None)), "a minivmm Kvm or None")
        check_number("timeout", timeout, seconds=True, positive=True, error=StepError)
        if max_time is not None:
            check_number("max_time", max_time, seconds=True, positive=True, error=StepError)
        self.bp = None if breakpoint is None else resolve_break(p, breakpoint)
        self.mechanism, self.why = choose_mechanism(p, mechanism, kvm)
        if self.bp is not None and mechanism == GUEST_DEBUG:
            _check_forced_break(p, self.bp, kvm)
        self.timeout = timeout
        self.max_time = max_time
        self.stopped: dict | None = None   # why the host stopped early (end stays None)
        self._session_deadline = None      # monotonic end of max_time, from the first step
        self.rings: dict = {}
        kwargs = {}
        if dirty:
            from .dirty.ring import (DirtyRingError, VcpuRing, enable_dirty_ring,
                                     ring_capability)
            log = abi.KVM_MEM_LOG_DIRTY_PAGES

            def before_vcpus(m):
                if ring_capability(m.kvm) is None:
                    raise named(StepError("dirty needs the dirty ring, and this kernel "
                                          "offers none (KVM_CAP_DIRTY_LOG_RING is 0)"), "dirty")
                try:
                    enable_dirty_ring(m.vm, RING_ENTRIES)
                except DirtyRingError as e:
                    raise named(StepError(f"dirty: {e}"), "dirty") from None

            def on_vcpu(m, st):
                self.rings[st.index] = VcpuRing(st.vcpu, RING_ENTRIES)
            # Slot 0 logs too, as in `minivmm dirty`: the payload's stack, the page tables
            # (accessed/dirty bits) and the stub's own frames are writes worth seeing.
            kwargs = dict(data_flags=log, system_flags=log, before_vcpus=before_vcpus,
                          on_vcpu=on_vcpu)
        self.dirty = dirty
        try:
            self.machine = Machine(p, vcpus=vcpus, pages=pages, kvm=kvm,
                                   regs={"rcx": iterations}, **kwargs)
        except MachineError as e:
            raise named(StepError(str(e)), getattr(e, "argument", None)) from None
        self.st = self.machine.states[vcpu]
        self.vcpu = self.st.vcpu
        self.ring = self.rings.get(vcpu)
        self.end: VcpuEnd | None = None
        self.steps = 0
        self.console = Console()
        self.syncs = 0
        self.pre_break_entries = 0       # ring entries harvested while running to --break
        self.stub_entries = 0            # ring entries written by the #DB stub itself
        self._pending_dirty = []         # harvested at a ring-full exit, for the next step
        self._empty_full = 0             # ring-full exits in a row that harvested nothing
        self.elapsed_s = 0.0             # time spent stepping (setup_s not included)
        self.setup_s = 0.0               # time spent running freely to the breakpoint
        self._system_pages = _system_page_names(self.machine, vcpu)
        self._stub_answer = None         # the answer owed to the stub's `in eax, 0xe0`
        self._started = False
        # RIP just past an out whose step was reported while KVM still had it pending
        # (VMX/SVM): the step trap its completion raises is that out's, not a new one.
        self._late_trap = None
        self._code = (None, None, "")    # (pc, instruction, note) read before the step ran
        # Watchdog: a thread that kicks KVM_RUN out (immediate_exit + signal, as
        # Machine does) when one step takes longer than the timeout.
        self._lock = threading.Lock()
        self._stepping = threading.Lock()     # held by the thread in next_step()
        self._stepper = None                  # and that thread's id
        self._deadline = None
        self._closed = False
        self._ident = None
        self._watchdog = None
        # The kick is blocked in the stepping thread while a step is armed (a kick can come
        # only then) and let in during KVM_RUN only, as in Machine's vCPU threads: let in
        # for good, a kick landing outside KVM_RUN ran the program's own SIGUSR1 handler
        self._mask = None                # the thread's own mask, put back by _no_deadline
        self._run_mask = None            # the mask KVM_SET_SIGNAL_MASK was last given for
        self._kicked = False             # a kick was sent during this step
        self._foreign = False            # a SIGUSR1 that was no kick was taken: pass it on

    # -- lifecycle --
    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._deadline is not None and self._ident != threading.get_ident():
                # A step in flight in another thread: end it now (as the watchdog does; the
                # thread lives while _deadline is set), and wait below until it has left.
                # Else the VM was released under it: its next KVM_RUN went to the closed
                # fd's number, which the kernel may have given to another VM
                self._kick_locked()
        # the thread in next_step(), not the last one to enter KVM_RUN: a close() from a
        # thread that stepped earlier skipped this and released the VM under the step
        if self._stepper != threading.get_ident():
            with self._stepping:     # no step from now on: next_step() says closed
                pass
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        self.vcpu = self.st = self.ring = None
        self.rings.clear()
        self.machine.close()

    def __enter__(self) -> "StepSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if tb is not None:
            # The stepping runs in this thread: frames an exception (a Ctrl-C) left
            # mid-harvest or mid-KVM_RUN hold views of the ring or the kvm_run page,
            # which would make close() fail in their place
            traceback.clear_frames(tb)
        self.close()

    def __iter__(self):
        return self.run()

    def run(self, count: int | None = None):
        """Yield Step objects until the guest ends, the timeout, max_time, or ``count``
        steps (None or 0: no limit)."""
        if count is not None:            # now, not at the generator's first step
            check_number("count", count, 0, error=StepError)
        return self._run(count)

    def _run(self, count: int | None):
        t0, setup0 = time.perf_counter(), self.setup_s
        try:
            while self.end is None and (not count or self.steps < count):
                step = self.next_step()
                if step is None:
                    break
                yield step
        finally:
            self.elapsed_s += time.perf_counter() - t0 - (self.setup_s - setup0)

    # -- the stepping loop --
    def next_step(self) -> Step | None:
        """Run until the next instruction completes; None (and ``end`` or ``stopped``
        set) when it cannot. One thread at a time: a step from another thread meanwhile
        is refused (StepError)."""
        # Two threads stepping at once raced: an AttributeError ('pc', read before the
        # other's _start set it), or each took half the traps and the session ended as
        # a made-up `hlt` in the stubs where the guest exited with code 0
        if not self._stepping.acquire(False):
            if self._closed:                # close() from another thread holds it
                raise MachineError("this StepSession is closed")
            raise StepError("this StepSession is stepping in another thread: step it from "
                            "one thread at a time")
        self._stepper = threading.get_ident()
        try:
            if self._closed:
                raise MachineError("this StepSession is closed")
            return self._next_step()
        finally:
            self._stepper = None
            self._stepping.release()

    def _next_step(self) -> Step | None:
        if self.end is not None or self.stopped is not None:
            return None
        if not self._started:
            self._start()
            if self.end is not None or self.stopped is not None:
                return None
        if self._out_of_time():
            return None
        # What runs is read before it runs: the instruction may write over itself, or
        # (real mode) move CS, which changes what its address reads afterwards
        self._code = (self.pc, *self.machine.executed(self.st, self.pc))
        try:
            if not self._arm():
                return None
            if self.mechanism == IN_GUEST:
                return self._next_in_guest()
            return self._next_guest_debug()
        finally:
            self._no_deadline()

    def _arm(self) -> bool:
        """Set the step's deadline and thread for the watchdog and close(); False (and
        ``stopped``) when close() came first. _no_deadline() must follow either way."""
        self._kicked = self._foreign = False
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, (KICK_SIGNAL,))
        if self._mask != self._run_mask:
            # during KVM_RUN: the thread's own mask, with the kick let in
            self.vcpu.set_run_signals([n for n in range(1, 65) if n not in self._mask]
                                      + [KICK_SIGNAL])
            self._run_mask = self._mask
        # Under the lock close() reads them with: a close() from another thread just before
        # saw no step in flight and kicked none, its watchdog stopped watching, and the run
        # to an unreached --break went on for ever, close() waiting for it; one just after
        # the deadline but before KVM_RUN had no thread id to kick (TypeError, VM left open)
        with self._lock:
            if self._closed:
                self.stopped = {"reason": "closed"}
                return False
            self._ident = threading.get_ident()
            self._deadline = self._step_deadline()
        return True

    def _no_deadline(self) -> None:
        # Under the watchdog's lock: once the step returns, the thread that stepped may
        # end, and a kick by its id would reach whichever thread took that id next
        with self._lock:
            self._deadline = None
        mask, self._mask = self._mask, None
        if mask is None:
            return
        try:    # no kick comes from now on: take one still pending before the mask is back
            if signal.sigtimedwait((KICK_SIGNAL,), 0) is not None and not self._kicked:
                self._pass_on()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self._foreign:
            _forward_to_main_thread(KICK_SIGNAL)

    def _pass_on(self) -> None:
        # The program's own SIGUSR1, sent to the process, which KVM let in here: hand it to
        # the main thread, where Python runs its handler (as Machine does). Stepping in the
        # main thread, only once its mask is back: sent to itself now, it stayed pending
        # and made every KVM_RUN return EINTR at once
        if threading.current_thread() is threading.main_thread():
            self._foreign = True
        else:
            _forward_to_main_thread(KICK_SIGNAL)

    def _step_deadline(self) -> float:
        deadline = time.monotonic() + self.timeout
        if self._session_deadline is not None:
            deadline = min(deadline, self._session_deadline)
        return deadline

    def _out_of_time(self) -> bool:
        """True (and ``stopped`` set) once max_time has passed."""
        if self._session_deadline is None or time.monotonic() < self._session_deadline:
            return False
        self.stopped = {"reason": "max-time", "max_time_s": self.max_time}
        return True

    def _start(self) -> None:
        self._started = True
        if self.max_time is not None:
            self._session_deadline = time.monotonic() + self.max_time
        install_kick_handler()
        # The watchdog holds the session weakly: a session dropped without close() is then
        # garbage, and its VM's fds go back (a bound method would keep it, and its thread,
        # alive for ever)
        with _sys.fd_creation():   # Ctrl-C held back: close() joins a started thread only
            dog = threading.Thread(target=_watch, args=(weakref.ref(self),),
                                   name="step-watchdog", daemon=True)
            start_thread(dog, "the stepper's watchdog thread")
            self._watchdog = dog    # a started one only: close() joining it raised in place
        regs = self.vcpu.get_regs()
        self.pc = regs.rip
        self.regs = self._state(regs)
        if self.bp is not None and self.bp != self.pc:
            t0 = time.perf_counter()
            try:
                if not self._arm():
                    return
                self._run_to_breakpoint()
            finally:
                self._no_deadline()
                self.setup_s = time.perf_counter() - t0   # the run to --break, not a step
            return
        if self.mechanism == GUEST_DEBUG:
            self.vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
        else:
            regs.rflags |= TF            # KVM_SET_REGS: the first instruction will trap
            self.vcpu.set_regs(regs)

    def _enter(self) -> int:
        """KVM_RUN once; a kick by the watchdog comes back as KVM_EXIT_INTR."""
        while True:
            reason = self.vcpu.run()
            if reason != _INTR:
                return reason
            # the kick is blocked outside KVM_RUN, so it is still pending: take it, or
            # every KVM_RUN from now on would return EINTR at once
            if signal.sigtimedwait((KICK_SIGNAL,), 0) is not None and not self._kicked:
                self._pass_on()          # not a kick (each sets _kicked first)
            run = self.vcpu.run_struct
            if self._deadline is not None and time.monotonic() < self._deadline \
                    and not self._closed:
                run.immediate_exit = 0   # a stale kick or a stray signal: enter again
                continue
            run.immediate_exit = 0
            return reason

    def _watch_once(self) -> bool:
        """One look of the watchdog: kick a step past its deadline; False once closed."""
        with self._lock:
            if self._closed:
                return False
            deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline and self._ident:
                self._kick_locked()
        return True

    def _kick_locked(self) -> None:
        """End the armed step's KVM_RUN (under _lock): immediate_exit if it is between two,
        the kick if it is inside one; _kicked tells the kick from the program's SIGUSR1."""
        self.vcpu.run_struct.immediate_exit = 1
        self._kicked = True
        try:
            signal.pthread_kill(self._ident, KICK_SIGNAL)
        except ProcessLookupError:
            pass

    # KVM guest debug: every exit is one instruction, or the end.
    def _next_guest_debug(self) -> Step | None:
        while True:
            reason = self._enter()
            if reason == _DEBUG:
                regs = self.vcpu.get_regs()
                late, self._late_trap = self._late_trap, None
                if regs.rip == late:
                    continue                 # the out's own step, already reported
                if self.machine.in_stubs(self.st, regs.rip):   # real mode: at CS 0 only
                    self._end_in_stub()
                    return None
                step = self._step(regs, "debug-exit")
                if step.instruction == "hlt":
                    # Measured on kvm_pvm: a single-stepped hlt gives KVM_EXIT_DEBUG past
                    # it and no KVM_EXIT_HLT; the next KVM_RUN would run on into whatever
                    # follows. The guest meant to stop here. (Where KVM halts instead,
                    # the KVM_EXIT_HLT is handled in _common_exit.)
                    self.end = VcpuEnd("hlt", rip=regs.rip, instruction=self._named(step),
                                       detail={"note": "KVM_EXIT_DEBUG replaced KVM_EXIT_HLT"})
                return step
            step = self._common_exit(reason)
            if step is not False:
                return step

    # In-guest: the #DB stub reports each trap with `out 0xe0`, then asks with `in 0xe0`.
    def _next_in_guest(self) -> Step | None:
        while True:
            reason = self._enter()
            if reason == _IO and self.vcpu.run_struct.io.port == L.PORT_EXCEPTION:
                if self.vcpu.run_struct.io.direction != _OUT:
                    self._answer_stub()
                    continue
                regs = self.vcpu.get_regs()
                frame = self._stub_frame(regs)
                if frame is None:
                    return None
                # a #DB is this session's step if DR6 says single-step (or cannot say: as
                # before); the payload's own breakpoint or icebp ends it, as any exception
                if frame["vector"] != VEC_DB or \
                        not self.machine.debug_cause(self.st, frame).is_step:
                    self._end_exception(frame)
                    return None
                # DR6 keeps its bits until cleared: leave it clean for the next #DB
                self.machine.reset_dr6(self.st, frame)
                late, self._late_trap = self._late_trap, None
                if frame["rip"] == late:
                    self._stub_answer = 1    # the out's own trap, already reported
                    continue
                # The stub pushed rax; RIP, RSP and RFLAGS are the CPU's frame; every other
                # register is still the payload's (the stub touches no other).
                regs.rax, regs.rip, regs.rsp = frame["rax"], frame["rip"], frame["rsp"]
                regs.rflags = frame["rflags"] & ~TF
                self._stub_answer = 1    # resume: iretq restores RFLAGS with TF set
                return self._step(regs, "db-trap", stub_rsp=frame["_at"], frame=frame)
            step = self._common_exit(reason)
            if step is not False:
                return step

    def _common_exit(self, reason, free_run: bool = False):
        """Exits both mechanisms treat alike. Returns a Step, None (the end), or False
        (nothing to report: enter again). ``free_run``: on the way to --break, where
        self.pc is not where the guest is."""
        known_pc = None if free_run else self.pc
        vcpu = self.vcpu
        if reason == _IO:
            io = vcpu.run_struct.io
            port, out, size = io.port, io.direction == _OUT, io.size
            del io                          # no view of kvm_run may outlive the session
            if not out:
                self.end = self._end_here("unhandled-io", detail=_strip(vcpu.describe_exit(reason)))
                return None
            value = int.from_bytes(vcpu.io_data()[:size], "little")
            regs = vcpu.get_regs()
            if port == L.PORT_EXCEPTION:
                # VMX/SVM deliver the fault natively (vmx.c handle_ud re-injects #UD; #GP
                # and #PF are not intercepted with EPT) and the interrupt gate clears TF,
                # so the stub runs unstepped and its report arrives here: an exception,
                # not a step (kvm_pvm steps into the stub instead: _end_in_stub)
                if self._end_reported(regs) is not None:
                    return None
                # else the payload wrote the port itself (the end says so): its out ran,
                # so it is a step like any other
            # An `out` ends in its IO exit: this exit is the out's step. On kvm_pvm RIP is
            # already past it and its step trap is lost (host-probes 2).
            past = self._past_pending_out(regs)
            note = self._untraced_to(past, self.machine.out_made_by(self.st, regs), "out")
            step = self._step(past, "io-exit", io={"port": port, "value": value, "size": size})
            step.note = note
            if self.end is not None:            # the payload's own write to port 0xe0
                return step
            if port in (L.PORT_CONSOLE, L.PORT_DEBUGCON):
                self.console.write(vcpu.io_data())
            elif port == L.PORT_SYNC:
                self.syncs += 1
            elif port == L.PORT_EXIT:
                # past the out on every host, as kvm_pvm leaves it (Machine.out_exit_rip)
                self.end = VcpuEnd("exit-port", code=value & 0xFF, rip=past.rip,
                                   instruction=self._named(step))
            else:
                self.end = self._end_here("unhandled-io", after=True, io_out=True,
                                          detail=_strip(vcpu.describe_exit(reason)))
            if self.mechanism == IN_GUEST and self.end is None:
                self._keep_tf(regs)
            return step
        if reason == _HLT:
            regs = self.vcpu.get_regs()
            note = self._untraced_to(regs, is_hlt, "hlt")
            step = self._step(regs, "hlt")
            step.note = note
            self.end = VcpuEnd("hlt", rip=regs.rip, instruction=self._named(step))
            return step
        if reason == _INTR:
            if self._closed:                # close() from another thread kicked it
                self.stopped = {"reason": "closed"}
            elif not self._out_of_time():
                self.end = self._end_here("timeout", detail={"timeout_s": self.timeout})
            return None
        if reason == abi.KVM_EXIT_DIRTY_RING_FULL and self.ring is not None:
            got = self._harvest()           # the next step reports them
            self._pending_dirty.extend(got)
            return None if self._ring_overflowed(got) else False
        detail = self.machine.mmio_detail(self.st) if reason == abi.KVM_EXIT_MMIO \
            else _strip(vcpu.describe_exit(reason))
        if reason == abi.KVM_EXIT_MMIO:
            # a write leaves RIP past its instruction, a read at it (host-probes.md 6)
            self.end = self._end_here("unhandled-mmio", after=detail["is_write"], detail=detail)
            return None
        if reason == abi.KVM_EXIT_SHUTDOWN:
            # where SVM reset the vCPU, the instruction being stepped is the last RIP known
            # (none while running freely to --break)
            self.end = _without_tf(self.machine.shutdown_end(self.st, last_rip=known_pc))
            self.end.detail.update(detail)
            return None
        name = {abi.KVM_EXIT_INTERNAL_ERROR: "internal-error",
                abi.KVM_EXIT_FAIL_ENTRY: "fail-entry"}.get(reason, "unexpected-exit")
        if name == "unexpected-exit":
            detail = unexpected_exit_detail(vcpu, reason)
        # as Machine does: a guest that died this way is worth its registers
        self.end = self._end_here(name, detail=detail, registers=True)
        return None

    def _past_pending_out(self, regs):
        """regs as the out leaves them. VMX/SVM exit with RIP still at a fast `out` and
        skip it on the next KVM_RUN; with TF or KVM single-step set, that skip raises
        a step of its own (complete_fast_pio_out -> kvm_skip_emulated_instruction ->
        kvm_vcpu_do_singlestep, arch/x86/kvm/x86.c): _late_trap marks it so that
        the stepping loops drop it instead of reporting the out twice. Where RIP is,
        Machine.out_exit_rip tells from the code, not from self.pc: a guest that cleared
        TF itself reaches the out untraced (_untraced_to). Written from the kernel
        source; kvm_pvm never takes this path."""
        self.st.completed_by = None
        rip, name_at = self.machine.out_exit_rip(self.st, regs)
        if name_at or rip == regs.rip:
            return regs                  # past it already (kvm_pvm), or a repeating outs
        past = type(regs).from_buffer_copy(regs)
        past.rip = rip
        # out_exit_rip may have finished the out already: under KVM guest debug that
        # KVM_RUN was its step trap (KVM_EXIT_DEBUG), none is left to drop; in-guest, the
        # #DB it queued still reaches the stub
        self._late_trap = None if self.st.completed_by == _DEBUG else rip
        return past

    def _untraced_to(self, regs, made_by, what: str) -> str:
        """"" when the instruction being stepped made this exit (``made_by``: an out to
        its port, a hlt). Else the guest ran on untraced (it cleared TF itself with popf
        or iretq, say) up to such an instruction ending at RIP (in regs, past it): the
        step is moved to it, and the note says so."""
        ins, _ = self._instruction(self.pc)
        if ins is not None and made_by(ins):
            return ""
        found = self.machine.ending_at(self.st, regs.rip, made_by)
        if not found:
            return ""
        ins = found[0]
        was = self.pc
        self.pc = ins.address
        # `was` never trapped: the guest's last step (its popf, say) was the one before it
        return (f"stepping lost from {was:#x} on: the guest ran untraced up to this {what} "
                "(it cleared RFLAGS.TF itself?); the registers changed over all of it")

    def _keep_tf(self, regs) -> None:
        # Measured here, TF survives an `out` (the next instruction traps), so this does
        # nothing; should a host drop it, set it again. KVM_SET_REGS with the `out` still
        # pending is safe: RIP is left where KVM put it (past the out, or at it on VMX/SVM,
        # where KVM skips the out only if RIP is unchanged: complete_fast_pio_out).
        # The vCPU's own registers: Machine.out_exit_rip may have completed the out
        if not regs.rflags & TF:
            regs = self.vcpu.get_regs()
            regs.rflags |= TF
            self.vcpu.set_regs(regs)

    def _answer_stub(self) -> None:
        answer = 1 if self._stub_answer else 0
        self.vcpu.set_io_data(struct.pack("<I", answer))
        self._stub_answer = None

    def _write_frame(self, frame: dict, **fields) -> None:
        mem = self.machine.vm.slot_for(frame["_at"])
        for name, value in fields.items():
            mem.write(frame["_at"] + 8 * STUB_FRAME_FIELDS.index(name), struct.pack("<Q", value))

    # -- a step's record --
    def _state(self, regs, frame: dict | None = None) -> dict:
        """The registers a step compares: regs' general registers and RFLAGS, and the
        vCPU's segment selectors and control registers. ``frame``: the #DB stub's, whose
        CS and SS are the payload's (the vCPU's own are the stub's; the others it keeps)."""
        out = _regs_dict(regs)
        sregs = self.vcpu.get_sregs()
        out.update({name: getattr(sregs, name).selector for name in SEGMENTS})
        out.update({name: getattr(sregs, name) for name in CONTROL})
        if frame is not None:
            out["cs"], out["ss"] = frame["cs"], frame["ss"]
        return out

    def _step(self, regs, event: str, io=None, stub_rsp=None, frame=None) -> Step:
        """The instruction at self.pc has completed; regs is the state after it (frame:
        the #DB stub's that reported it, for in-guest stepping)."""
        addr = self.pc
        now = self._state(regs, frame)
        changed = {k: v for k, v in now.items() if self.regs.get(k) != v and k != "rflags"}
        if (now["rflags"] ^ self.regs["rflags"]) & FLAGS_SHOWN:
            changed["rflags"] = now["rflags"]
        before, self.regs, self.pc = self.regs, now, regs.rip
        self.steps += 1
        ins, _ = self._instruction(addr)
        raw, text, line = (ins.raw, ins.text, ins.line) if ins else (b"", "(undecodable)", 0)
        step = Step(self.steps, addr, regs.rip, raw, text, line, changed, event, io)
        if ins is not None:
            step.note = _empty_rep(ins, before["rcx"], self.payload.mode, changed)
        if self.ring is not None:
            step.dirty, self._pending_dirty = self._pending_dirty + self._harvest(stub_rsp), []
        return step

    def _ring_overflowed(self, got: list) -> bool:
        """After a ring-full exit's harvest: True (and ``end`` set) when it is the
        EMPTY_FULL_LIMIT-th in a row to find nothing, i.e. the ring overflowed."""
        from .dirty.ring import EMPTY_FULL_LIMIT, overflow_reason   # --dirty has loaded it
        if got:
            self._empty_full = 0
            return False
        self._empty_full += 1
        if self._empty_full < EMPTY_FULL_LIMIT:
            return False
        self.end = self._end_here("ring-overflow", detail={"why": overflow_reason()})
        return True

    def _named(self, step: Step) -> str:
        """The step's instruction as `run` names it in an end (with its source line)."""
        ins, note = self._instruction(step.address)
        return instruction_name(ins, note) if ins is not None else step.instruction

    def _instruction(self, addr: int) -> tuple:
        """(instruction, note) at addr as Machine.executed names it: the listing's with its
        source line while memory holds its bytes, else decoded from memory (line 0).
        The step's own is the one read before it ran."""
        if self._code[0] == addr:
            return self._code[1:]
        return self.machine.executed(self.st, addr)

    def _harvest(self, stub_rsp=None) -> list:
        """Take what this vCPU's ring gained since the last step, then reset (api.rst 7.36),
        so that the next write to the same page produces an entry at its own step."""
        first = self.ring.fetch
        got = self.ring.harvest()
        if not got.count:
            return []
        self.machine.vm.reset_dirty_rings()
        # The stub's frame (CPU frame + its pushes) occupies [rsp, rsp + 64): entries for
        # those pages at a #DB report are the stub's writes, not the payload's.
        stub_pages = set()
        if stub_rsp is not None:
            stub_pages = {stub_rsp // L.PAGE, (stub_rsp + 8 * len(STUB_FRAME_FIELDS) - 1) // L.PAGE}
        out = []
        for k in range(got.count):
            slot, page = int(got.slots[k]) & 0xFFFF, int(got.offsets[k])
            by, what = "payload", ""
            if slot == L.SLOT_SYSTEM:
                what = self._system_pages.get(page, "")
                if page in stub_pages:
                    by, what = "stub", "the #DB stub's exception frame"
                    self.stub_entries += 1
            out.append(RingEntry((first + k) & 0xFFFFFFFF, self.st.index, slot, page, by, what))
        return out

    # -- breakpoints --
    def _run_to_breakpoint(self) -> None:
        """Run freely (console and sync outs serviced) until the instruction at self.bp."""
        bp = self.bp
        lin = self.machine.linear(self.st, bp)
        code = self.machine.vm.slot_for(lin)
        saved = code.read(lin, 1)

        def restore():                   # put the instruction's first byte back
            # unless the guest wrote over our int3 itself: its byte is the one to keep
            if self.mechanism == IN_GUEST and code.read(lin, 1) == bytes((INT3,)):
                code.write(lin, saved)
        if self.mechanism == GUEST_DEBUG:
            debugreg = [lin, 0, 0, 0, 0, 0, 0, 0x1]          # DR0 = address, DR7 = L0, execute
            self.vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP,
                                      debugreg)
        else:
            code.write(lin, bytes((INT3,)))
        frame = None                     # the #BP stub's, in-guest
        while True:
            reason = self._enter()
            vcpu = self.vcpu
            if reason == _DEBUG and self.mechanism == GUEST_DEBUG:
                regs = vcpu.get_regs()
                # DR0 matches the linear address: real-mode code may reach it at another
                # CS:IP (Machine.executed finds such code in the listing the same way)
                if self.machine.linear(self.st, regs.rip) != lin:
                    continue
                # A hardware breakpoint fires again on every entry, RF or not (host-probes
                # 2): stepping on without it is what steps over it.
                vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
                break
            if reason == _IO and vcpu.run_struct.io.port == L.PORT_EXCEPTION:
                if vcpu.run_struct.io.direction != _OUT:
                    self._answer_stub()
                    continue
                regs = vcpu.get_regs()
                frame = self._stub_frame(regs)
                restore()
                if frame is None:
                    self.end.detail["breakpoint"] = f"{bp:#x} never reached"
                    return
                if frame["vector"] != VEC_BP or frame["rip"] != bp + 1:
                    self._end_exception(frame)
                    return
                # int3 is a trap: the frame's RIP is past it. With the instruction back in
                # place, send the guest back to it with TF set: the next #DB is its step.
                self._write_frame(frame, rip=bp, rflags=frame["rflags"] | TF)
                regs.rax, regs.rip, regs.rsp = frame["rax"], bp, frame["rsp"]
                regs.rflags = frame["rflags"]
                self._stub_answer = 1
                break
            if reason == _IO:
                io = vcpu.run_struct.io
                port, out = io.port, io.direction == _OUT
                del io
                if out and port in (L.PORT_CONSOLE, L.PORT_DEBUGCON):
                    self.console.write(vcpu.io_data())
                    continue
                if out and port == L.PORT_SYNC:
                    self.syncs += 1
                    continue
                restore()                       # the end names what is really there
                if out and port == L.PORT_EXIT:
                    self.end = self._end_here("exit-port", after=True, io_out=True)
                    self.end.code = vcpu.io_data()[0]
                else:
                    self.end = self._end_here("unhandled-io", after=out, io_out=out,
                                              detail=_strip(vcpu.describe_exit(reason)))
            elif reason == _HLT:
                restore()
                self.end = self._end_here("hlt", after=True)
            elif reason == abi.KVM_EXIT_DIRTY_RING_FULL and self.ring is not None:
                got = self._harvest()
                self.pre_break_entries += len(got)
                if not self._ring_overflowed(got):
                    continue
            else:
                restore()
                regs = vcpu.get_regs()
                self._common_exit(reason, free_run=True)   # timeout, shutdown, ...: no step
                if self.mechanism == IN_GUEST and regs.rip == bp and self.end is not None \
                        and self.end.reason == "internal-error":
                    # kvm_pvm cannot deliver an int3 from the code it emulates (host-probes
                    # 2): the breakpoint was reached, its int3 ended the guest
                    self.end.detail["why"] = (
                        f"the breakpoint's int3 at {bp:#x} was reached, but KVM could not "
                        "deliver it (an int3 in code KVM emulates, such as CPL0 code on "
                        "kvm_pvm, ends in KVM_EXIT_INTERNAL_ERROR); use --mechanism "
                        "guest-debug (or auto) for this code")
            restore()
            if self.end is None:                # --max-time: the guest may still get there
                self.stopped["breakpoint"] = f"{bp:#x} not reached yet"
            else:
                self.end.detail["breakpoint"] = f"{bp:#x} never reached"
            return
        # bp, or its IP in another segment; in-guest, the #BP stub's frame has CS and SS
        self.pc, self.regs = regs.rip, self._state(regs, frame)
        if self.ring is not None:
            self.pre_break_entries += len(self._harvest())

    # -- ends --
    def _end_here(self, reason: str, after: bool = False, detail=None,
                  io_out: bool = False, registers: bool = False) -> VcpuEnd:
        # io_out: RIP is reported past the out on every host (Machine.out_exit_rip)
        return _without_tf(self.machine.end_at(self.st, reason, after=after, detail=detail,
                                               io_out=io_out, registers=registers))

    def _stub_frame(self, regs) -> dict | None:
        """The exception stub's frame for this out to the exception port; None (and
        ``end`` set) when the payload wrote the port itself or the frame is unreadable."""
        frame, end = self.machine.stub_report(self.st, regs)
        if end is not None:
            self.end = _without_tf(end)
        return frame

    def _end_exception(self, frame: dict) -> None:
        self.end = self.machine.exception_end(self.st, frame)
        # the frame's RFLAGS carry the stepper's TF (in-guest stepping, or the TF the
        # breakpoint's frame was given): not the guest's, as in _without_tf
        if "rflags" in self.end.detail:
            self.end.detail["rflags"] &= ~TF

    def _end_in_stub(self) -> None:
        """KVM guest debug stepped into minivmm's exception stub: an exception was
        delivered. Run the stub unstepped to its report and end with what it says."""
        self.vcpu.set_guest_debug(0)
        reason = self._enter()
        io = self.vcpu.run_struct.io
        reported = reason == _IO and io.port == L.PORT_EXCEPTION and io.direction == _OUT
        del io
        if not reported:
            self.end = self._end_here("unexpected-exit",
                                      detail=unexpected_exit_detail(self.vcpu, reason))
            return
        frame = self._end_reported(self.vcpu.get_regs())
        if frame is not None and frame["vector"] == VEC_DB and \
                self.machine.debug_cause(self.st, frame).is_step:
            self.end.detail["why"] = ("KVM guest debug's single-step trap went to the guest's "
                                      "#DB handler instead of the VMM: this host cannot step "
                                      "native CPL3 code with KVM guest debug; use "
                                      "--mechanism in-guest (or auto)")

    def _end_reported(self, regs) -> dict | None:
        """End with the exception the stub reported by this out to the exception port, and
        return its frame; or None, with what stub_report found instead (the payload wrote
        the port itself, the frame is unreadable)."""
        frame = self._stub_frame(regs)
        if frame is not None:
            self._end_exception(frame)
        return frame


def _watch(ref) -> None:
    """The step watchdog's thread: ends with its session's close(), or once the session is
    gone (dropped without close())."""
    while True:
        session = ref()
        if session is None or not session._watch_once():
            return
        del session
        time.sleep(0.05)


def _without_tf(end: VcpuEnd) -> VcpuEnd:
    """The end with TF cleared from its registers: TF is the stepper's, not the guest's."""
    regs = end.detail.get("registers")
    if regs:
        regs["rflags"] &= ~TF
    return end


def _regs_dict(regs) -> dict:
    out = {name: getattr(regs, name) for name in GPRS}
    out["rflags"] = regs.rflags & ~TF
    return out


_PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67))
_STRING_OPS = ("movs", "stos", "lods", "outs", "ins", "cmps", "scas")


def _empty_rep(ins, rcx: int, mode: str, changed: dict) -> str:
    """The note for a rep-prefixed string instruction that started with its count at 0:
    it repeats nothing and only moves RIP (SDM vol. 2, REP/REPE/REPNE), which a step
    showing no change would otherwise leave unexplained. "" for any other."""
    words = ins.mnemonic.split()
    if len(words) < 2 or not words[0].startswith("rep") or not words[-1].startswith(_STRING_OPS):
        return ""
    # the count is CX, ECX or RCX by address size, which an 0x67 prefix changes
    override = False
    for b in ins.raw:
        if b == 0x67:
            override = True
        elif b not in _PREFIXES and not (mode == "long" and 0x40 <= b <= 0x4F):
            break
    size = {"real": (16, 32), "protected": (32, 16), "long": (64, 32)}[mode][override]
    if rcx & ((1 << size) - 1):
        return ""
    reg = {16: "CX", 32: "ECX", 64: "RCX"}[size]
    return f"{reg} = 0: no repetition" + ("" if changed else ", no change")


def _strip(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("reason", "exit_reason")}


def _system_page_names(machine: Machine, vcpu: int) -> dict:
    """What each interesting page of slot 0 is, for the --dirty report."""
    names = {L.PML4 // L.PAGE: "page tables: PML4", L.PDPT // L.PAGE: "page tables: PDPT"}
    for g in range(L.PD_MAX):
        names[(L.PD_BASE + g * L.PAGE) // L.PAGE] = f"page tables: page directory for GiB {g}"
    for i in range(len(machine.states)):
        block = L.vcpu_block(i)
        names[(block + L.EXC_STACK_TOP_OFF - 1) // L.PAGE] = f"vCPU {i}'s exception stack"
        names[(block + L.USER_STACK_TOP_OFF - 1) // L.PAGE] = f"vCPU {i}'s stack"
    for off in range(0, L.CODE_MAX, L.PAGE):
        names[(L.CODE + off) // L.PAGE] = "payload code"
    return names


# -- the command --

def format_step(step: Step) -> str:
    notes = [f"{k}={v:#x}" for k, v in step.changed.items()]
    if step.io is not None:
        port, value = step.io["port"], step.io["value"]
        # a wider out prints all its bytes, low first (`out dx, ax` with 0x4241: 'AB')
        text = value.to_bytes(step.io.get("size", 1), "little").decode("latin-1")
        named = {L.PORT_CONSOLE: f"console {text!r}", L.PORT_DEBUGCON: f"console {text!r}",
                 L.PORT_SYNC: f"sync {value}", L.PORT_EXIT: f"exit {value & 0xFF}"}
        notes.append(named.get(port, f"port {port:#x} <- {value:#x}"))
    if step.note:
        notes.append(f"({step.note})")
    line = f"; line {step.line}" if step.line else ";"
    return (f"step {step.number:<4} {step.address:#07x}  {step.raw.hex(' '):<21} "
            f"{step.instruction:<32} {line:<10} {' '.join(notes)}").rstrip()


def format_entry(step: Step, e: RingEntry) -> str:
    if e.slot == L.SLOT_DATA:
        target = f"data page {e.page}"
    else:
        target = f"{e.slot_name} page {e.page:#x}" + (f" ({e.what})" if e.what else "")
    who = f"{step.instruction} at {step.address:#x}" if e.by == "payload" \
        else f"minivmm's #DB stub (reporting the step of {step.instruction})"
    return f"    {who} dirtied {target}, ring entry {e.index} of vCPU {e.vcpu}"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def cmd_step(args) -> int:
    from .cli import EXIT_GUEST_FAILED, EXIT_OK, UsageError, _say, json_text
    if args.count < 0:
        raise UsageError(f"--count must not be negative (got {args.count})")
    if not 0 <= args.iterations < 1 << 64:     # it is RCX
        raise UsageError(f"--iterations must be between 0 and {(1 << 64) - 1} "
                         f"(got {args.iterations})")
    payload = load(args.payload)
    try:
        session = StepSession(payload, mechanism=args.mechanism, vcpus=args.vcpus,
                              vcpu=args.vcpu, pages=args.pages, iterations=args.iterations,
                              breakpoint=args.breakpoint, dirty=args.dirty,
                              timeout=args.timeout, max_time=args.max_time)
    except StepError as e:
        raise UsageError(as_option(e)) from None
    out = sys.stdout
    with session:
        p = session.payload
        where = f"{p.mode} mode" + (f", CPL{p.cpl}" if p.mode == "long" else "")
        header = (f"stepping {p.name} ({where}) on vCPU {args.vcpu} of {args.vcpus} with "
                  f"{MECHANISM_TEXT[session.mechanism]}; why: {session.why}")
        if not args.json:
            print(header, file=out)
            if session.bp is not None:
                print(f"breakpoint at {session.bp:#x}", file=out)
        shown_stub = 0
        for step in session.run(args.count or None):
            if args.json:
                print(json_text(step.to_dict(session.mechanism)), file=out)
                continue
            print(format_step(step), file=out)
            for e in step.dirty or ():
                if e.by == "stub":
                    shown_stub += 1
                    continue
                print(format_entry(step, e), file=out)
        end, stopped = session.end, session.stopped
        rate = session.steps / session.elapsed_s if session.elapsed_s else 0.0
        # wall time: the free run to --break (which a --timeout may have ended) included
        total_s = session.setup_s + session.elapsed_s
        summary = {"ok": end is None or end.ok,       # as run's and dirty's: the exit status
                   "end": end.to_dict() if end else stopped or {"reason": "count",
                                                                "count": args.count},
                   "steps": session.steps, "mechanism": session.mechanism,
                   "why": session.why, "payload": p.name, "vcpu": args.vcpu,
                   "breakpoint": session.bp,
                   "console": session.console.decode("utf-8", "replace"),
                   "console_dropped": session.console.dropped,
                   "syncs": session.syncs, "elapsed_s": round(total_s, 6),
                   "run_to_break_s": round(session.setup_s, 6),
                   "stepping_s": round(session.elapsed_s, 6),
                   "steps_per_s": round(rate, 1)}
        if args.dirty:
            summary.update(stub_entries=session.stub_entries,
                           entries_before_breakpoint=session.pre_break_entries)
        if args.json:
            print(json_text(summary), file=out)
        else:
            if stopped is not None:
                bp = stopped.get("breakpoint")
                print(f"stopped after {_n(session.steps, 'step')}: --max-time "
                      f"{stopped['max_time_s']:g} s reached" + (f" ({bp})" if bp else ""),
                      file=out)
            elif end is None:
                print(f"stopped after {_n(session.steps, 'step')} (--count {args.count})",
                      file=out)
            else:
                why = end.detail.get("why") or end.detail.get("breakpoint")
                print(f"guest ended after {_n(session.steps, 'step')}: {end.summary()}"
                      + (f" ({why})" if why else ""), file=out)
                regs = end.detail.get("registers")
                if regs:                # as `minivmm run` shows them
                    print(format_registers(regs), file=out)
            if session.console:
                print(f"console: {session.console.decode('utf-8', 'replace')!r}", file=out)
            if session.console.dropped:
                print(f"note: {session.console.note()}", file=out)
            if shown_stub:
                print(f"note: {shown_stub} more ring entries were the #DB stub writing its "
                      "exception frame on the exception stack (slot 0), once per step; not "
                      "shown (they are in --json, \"by\": \"stub\")", file=out)
            if args.dirty and session.pre_break_entries:
                print(f"note: {session.pre_break_entries} ring entries came from the free "
                      "run before the breakpoint", file=out)
            if session.setup_s:
                then = f", then {rate:.0f} steps/s" if session.steps else ""
                print(f"{_n(session.steps, 'step')} in {total_s * 1000:.1f} ms "
                      f"({session.setup_s * 1000:.1f} ms of it running freely to the "
                      f"breakpoint{then})", file=out)
            else:
                print(f"{_n(session.steps, 'step')} in {session.elapsed_s * 1000:.1f} ms "
                      f"({rate:.0f} steps/s)", file=out)
    ok = end is None or end.ok
    if not ok:      # as `minivmm run` says it: --json leaves stdout to the JSON lines
        _say(f"minivmm: vCPU {args.vcpu}: {end.summary()}")
    return EXIT_OK if ok else EXIT_GUEST_FAILED


def register(subparsers, common) -> None:
    from .cli import _integer, _seconds
    p = subparsers.add_parser(
        "step", parents=[common], help="single-step a payload, one instruction per line",
        description="Single-step a payload: per step the address, bytes, disassembly, source "
        "line and the registers that changed. KVM guest debug steps emulated code; native "
        "CPL3 code on kvm_pvm is stepped from inside the guest (RFLAGS.TF and a #DB stub). "
        "With --dirty, every dirty-ring entry is tied to the instruction that produced it.")
    p.add_argument("payload", help="a .asm file, or the name of a shipped payload")
    p.add_argument("--count", type=_integer, default=DEFAULT_COUNT,
                   help=f"stop after this many steps (default {DEFAULT_COUNT}; 0 = until the "
                   "guest ends)")
    p.add_argument("--break", dest="breakpoint", metavar="ADDR",
                   help="run freely up to this instruction, then step from it: an address "
                   "(decimal, or hex after 0x: 0x10014), line:N, or a label")
    p.add_argument("--mechanism", choices=MECHANISMS, default="auto",
                   help="how to step (default auto: probe whether KVM guest debug can step "
                   "this code on this host, else step inside the guest)")
    p.add_argument("--vcpus", type=_integer, default=1,
                   help="vCPUs in the machine (default 1; only the stepped one runs)")
    p.add_argument("--vcpu", type=_integer, default=0, help="which vCPU to step (default 0)")
    p.add_argument("--pages", type=_integer, default=DEFAULT_PAGES,
                   help=f"4 KiB pages in the data slot (default {DEFAULT_PAGES})")
    p.add_argument("--iterations", type=_integer, default=1,
                   help="RCX at entry: iterations for the dirty_* payloads (default 1)")
    p.add_argument("--dirty", action="store_true",
                   help="enable the dirty ring, harvest after every step and show which "
                   "instruction produced each entry")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="S",
                   help="give up when one step (or the run to --break) takes longer than this "
                   "many seconds (default 10)")
    p.add_argument("--max-time", type=_seconds, default=DEFAULT_MAX_TIME, metavar="S",
                   help=f"stop stepping after S seconds in all, the run to --break included "
                   f"(default {DEFAULT_MAX_TIME:g}; bounds --count 0 on a guest that never "
                   "ends; exit status 0, as a --count stop)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per step per line, then one summary object")
    p.set_defaults(func=cmd_step)
