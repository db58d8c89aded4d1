"""The ``minivmm`` command line.

Not an ABI mirror: it composes the layers below (Kvm, Machine, payloads) and
turns every user error into one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import codecs
import errno
import importlib
import importlib.util
import io
import json
import math
import os
import re
import sys
from pathlib import Path

from . import abi, __version__
from ._args import as_option
from ._entry import interrupted
from ._sys import KvmError, KvmUnavailable
from .payload import PayloadError, load, payload_dir

EXIT_OK, EXIT_GUEST_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# What --help and the README show: decimal, or hex after 0x, in ASCII digits. int(text, 0)
# also took 0o and 0b, underscores (1_0), spaces around, and any script's digits (an
# Arabic-Indic ١٠ was 10), none of which any of them says
_INTEGER = re.compile(r"-?(?:0[xX][0-9a-fA-F]+|[0-9]+)")


def _integer(text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not an integer: {text!r} (decimal, or hex "
                                         "after 0x)")
    digits = text.lstrip("-")
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "xX":
        raise argparse.ArgumentTypeError(f"not an integer: {text!r} (a leading 0 is "
                                         "ambiguous: octal or decimal? write it without)")
    try:
        value = int(text, 0)
    except ValueError:  # int() refuses past 4300 digits (sys.get_int_max_str_digits())
        value = None
    # Hex has no such limit, but the messages that name a value write it in decimal, and
    # str() of one past 4300 digits raised ValueError: a traceback. No count needs 128 bits
    if value is None or value.bit_length() > 128:
        hexa = digits[:2].lower() == "0x"
        raise argparse.ArgumentTypeError(f"out of range: a number of {len(digits) - 2 * hexa} "
                                         f"{'hex ' if hexa else ''}digits")
    return value


_SECONDS = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):     # nan compares false with everything: no deadline
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
    if not _SECONDS.fullmatch(text):
        # as _integer: float() also took 1_0, spaces around and any script's digits
        # (an Arabic-Indic ١٠ was 10 s)
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r} (decimal "
                                         "digits, as 10 or 0.5)")
    if value <= 0:      # every such option is a time limit: 0 would stop before starting
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:        # the bytes held as lone surrogates (surrogateescape), each written as \xNN
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _no_surrogates(value):
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_surrogates(v) for v in value]
    return value


def json_text(obj, **kw) -> str:
    """json.dumps(obj), valid to a strict parser: a payload file's name that is not UTF-8
    holds bytes Python keeps as lone surrogates, which json.dumps wrote as "\\udcff" (no
    character: RFC 8259 8.2, and parsers such as serde_json refuse it). Such bytes are
    written as backslash escapes, "x\\\\xff"."""
    text = json.dumps(obj, **kw)
    # a character past U+FFFF is written as a pair of \udXXX, and kept: _utf8 leaves it
    return json.dumps(_no_surrogates(obj), **kw) if "\\ud" in text else text


def _option_error(error: Exception, args) -> str:
    """as_option(error), but a vCPU count that came from the payload's header (no --vcpus
    given) is blamed on the header: the message named --vcpus, which nobody typed."""
    if getattr(error, "argument", None) == "vcpus" and args.vcpus is None:
        return f"the payload's ';! vcpus:' header: {error}"
    return as_option(error)


# -- caps --

DIRTY_CAPS = ("KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
              "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
              "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT")
OTHER_CAPS = ("KVM_CAP_NR_VCPUS", "KVM_CAP_MAX_VCPUS", "KVM_CAP_MAX_VCPU_ID",
              "KVM_CAP_NR_MEMSLOTS", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_SET_GUEST_DEBUG",
              "KVM_CAP_SET_GUEST_DEBUG2", "KVM_CAP_READONLY_MEM", "KVM_CAP_SYNC_MMU",
              "KVM_CAP_MULTI_ADDRESS_SPACE", "KVM_CAP_BINARY_STATS_FD")


def host_notes(vendor: str, sysfs: str | None = None) -> list:
    """Host quirks a user of this vendor module should know, one sentence each, found from
    the module's parameters under ``sysfs`` (default ringsize.SYSFS_MODULES, /sys/module;
    a directory of the same shape in tests). A missing parameter makes no note (no guess)."""
    from .dirty.ringsize import module_param, param_on

    def param(name):
        return module_param(vendor, name, sysfs)
    notes = []
    if vendor == "kvm_pvm":
        notes.append("kvm_pvm (software virtualization): guest code at CPL0, in real mode or in "
                     "protected mode is emulated instruction by instruction (thousands of times "
                     "slower, and emulated writes can overflow the dirty ring); 64-bit CPL3 code "
                     "runs natively, so long-mode payloads run at CPL3 by default")
    if vendor not in ("kvm_intel", "kvm_amd"):
        return notes
    pml = param("pml")
    if param_on(pml):
        notes.append(f"{vendor}.pml is on: KVM reserves the 512-entry PML log on top of its 64 "
                     "ring entries (kvm_dirty_ring_get_rsvd_entries(), virt/kvm/dirty_ring.c), "
                     "so the smallest dirty ring is 1024 entries")
    elif pml is not None:
        notes.append(f"{vendor}.pml is off: dirty pages are caught by write-protection faults "
                     "and the ring reserves only its 64 entries (smallest ring 256 entries)")
    if vendor == "kvm_intel":
        ug = param("unrestricted_guest")
        if ug is not None and not param_on(ug):
            notes.append("kvm_intel.unrestricted_guest is off: real-mode and unpaged guest code "
                         "runs through vm86 and an identity-mapped page table, in the TSS and "
                         "identity-map pages minivmm places just below the data slot "
                         "(KVM_SET_TSS_ADDR, KVM_SET_IDENTITY_MAP_ADDR; vmx.c enter_rmode())")
        if param_on(param("ept")) and param_on(param("eptad")):
            notes.append("kvm_intel.ept and eptad are on: with EPT A/D bits the CPU's guest "
                         "page-table walks count as writes (Intel SDM, \"Accessed and Dirty "
                         "Flags for EPT\"), so after every ring reset or bitmap clear the "
                         "guest's page-table pages are logged again and show up in the system "
                         "slot every iteration")
    else:
        notes.append("kvm_amd: a triple fault's KVM_EXIT_SHUTDOWN comes after KVM has reset "
                     "the vCPU (svm.c shutdown_interception(): the VMCB is undefined after a "
                     "shutdown, so KVM INITs it), so the registers reported at a shutdown are "
                     "the reset state, not the faulting ones")
    notes.append(f"{'VMX' if vendor == 'kvm_intel' else 'SVM'}: a port `out` exits to userspace "
                 "with RIP still at the instruction (x86.c kvm_fast_pio_out(); "
                 "complete_fast_pio_out() skips it at the next KVM_RUN), and minivmm reports "
                 "the address past it")
    return notes


def host_report(kvm) -> dict:
    from .kvm import vendor_module
    from .dirty.ringsize import PML_ENTRIES, min_entries_for, pml_enabled, ring_limits
    caps = kvm.caps(DIRTY_CAPS + OTHER_CAPS)
    vendor = vendor_module()
    limits = ring_limits(kvm)
    ring_cap = "KVM_CAP_DIRTY_LOG_RING_ACQ_REL" if caps["KVM_CAP_DIRTY_LOG_RING_ACQ_REL"] \
        else "KVM_CAP_DIRTY_LOG_RING" if caps["KVM_CAP_DIRTY_LOG_RING"] else None
    if ring_cap:
        verdict = (f"dirty ring supported via {ring_cap}: {limits['min_entries']} to "
                   f"{limits['max_entries']} entries per vCPU (power of two); "
                   f"bitmap manual protect {'on offer' if caps['KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2'] else 'absent'}")
    else:
        verdict = "dirty ring NOT supported by this kernel: only the KVM_GET_DIRTY_LOG bitmap"
    notes = host_notes(vendor)
    predicted = min_entries_for(abi.KVM_DIRTY_RING_RSVD_ENTRIES
                                + (PML_ENTRIES if pml_enabled() else 0))
    if limits.get("min_source") == "measured" and limits["min_entries"] != predicted:
        # the kernel, not sysfs, decides: say so when the two disagree
        notes.append(f"the smallest dirty ring measured here is {limits['min_entries']} "
                     f"entries, where the module parameters predict {predicted}: KVM reserves "
                     f"about {limits['reserved_entries']} entries (kvm_cpu_dirty_log_size() "
                     "differs from what sysfs shows)")
    return {"device": kvm.device, "api_version": kvm.get_api_version(),
            "vendor_module": vendor, "kernel": os.uname().release,
            "vcpu_mmap_size": kvm.get_vcpu_mmap_size(),
            "max_vcpus": caps["KVM_CAP_MAX_VCPUS"], "recommended_vcpus": caps["KVM_CAP_NR_VCPUS"],
            "capabilities": {k: caps[k] for k in DIRTY_CAPS + OTHER_CAPS},
            "ring": {"capability": ring_cap, **limits}, "dirty_ring_verdict": verdict,
            "notes": notes}


def cmd_caps(args) -> int:
    from .kvm import Kvm
    with Kvm() as kvm:
        rep = host_report(kvm)
    if args.json:
        print(json_text(rep, indent=2))
        return EXIT_OK
    print(f"KVM on {rep['kernel']} ({rep['device']}), API version {rep['api_version']}, "
          f"vendor module {rep['vendor_module']}")
    print(f"vCPU mmap size {rep['vcpu_mmap_size']} bytes; max vCPUs {rep['max_vcpus']} "
          f"(recommended {rep['recommended_vcpus']})")
    print("dirty-log capabilities:")
    for name in DIRTY_CAPS:
        print(f"  {name:40} {rep['capabilities'][name]}")
    print("other capabilities:")
    for name in OTHER_CAPS:
        print(f"  {name:40} {rep['capabilities'][name]}")
    for note in rep["notes"]:
        print(f"note: {note}")
    print(f"verdict: {rep['dirty_ring_verdict']}")
    return EXIT_OK


# -- payloads, disasm --

def cmd_payloads(args) -> int:
    from .payload import list_payloads, payload_dir
    if args.dir == "":     # list_payloads() takes it as no --dir: the shipped ones, unasked
        raise UsageError("--dir needs a directory name")
    rows = list_payloads(args.dir)
    if not rows:
        raise UsageError(f"no payloads in {args.dir or payload_dir()}")
    for name, mode, cpl, vcpus, desc in rows:
        extra = f" vcpus {vcpus}" if vcpus else ""
        print(f"{name:18} {mode:9} cpl {cpl}{extra:9} {desc}")
    return EXIT_OK


def cmd_disasm(args) -> int:
    from .payload import load
    p = load(args.payload)
    where = " (addresses are IP, CS = 0x1000)" if p.mode == "real" else ""
    print(f"; {p.path}: {p.mode} mode, cpl {p.cpl}, {len(p.code)} bytes loaded at "
          f"{p.load_address:#x}{where}")

    def data(start: int, end: int) -> None:
        # the bytes of .byte/.ascii/.space... and of alignment padding: loaded too, and
        # left out, the listing accounted for fewer bytes than it said were loaded
        for at in range(start, end, 8):
            raw = p.code[at - p.origin:min(at + 8, end) - p.origin]
            print(f"{at:#08x}  {raw.hex(' '):24} (data)")
    at = p.origin
    for ins in p.listing:
        data(at, ins.address)
        print(f"{ins.address:#08x}  {ins.raw.hex(' '):24} {ins.text:36} ; {ins.line}: "
              f"{ins.source}")
        at = ins.address + ins.size
    data(at, p.origin + len(p.code))
    return EXIT_OK


# -- run --

def _trace_printer(machine, stream, reader_gone=None):
    """The --trace callback, writing to a trace.Sink: beside --json (``reader_gone``), a
    trace reader that went away ends the trace, not the vCPU (it ended as host-error,
    BrokenPipeError, and the JSON said the guest failed)."""
    from .machine import is_hlt, writes_memory
    from .trace import Sink
    sink = Sink(stream, reader_gone)

    def trace(st, reason):
        if sink.stream is None:         # its reader went away
            return
        info = st.vcpu.describe_exit(reason)
        regs = st.vcpu.get_regs()
        io_out = reason == abi.KVM_EXIT_IO and info.get("direction") == "out"
        # after an out, an MMIO write or a hlt, RIP may be past the instruction; name it
        # as the vCPU's end would (the out that made this exit, a repeating string store),
        # by what the exit proves it was: the listing may not say (code the guest rewrote,
        # jumped into the middle of, or wrote elsewhere)
        after = reason == abi.KVM_EXIT_HLT
        made_by = is_hlt if after else None
        mmio = reason == abi.KVM_EXIT_MMIO
        if mmio:
            after, made_by = machine.mmio_after(st, regs), writes_memory
        rip, after, ins = machine.exit_instruction(st, regs, after, made_by, io_out, mmio)
        ins = ins or "?"
        fields = " ".join(f"{k}={_trace_value(k, v)}" for k, v in info.items()
                          if k not in ("reason", "exit_reason"))
        # whole lines under the ioctl trace's lock: --trace-ioctls may write to this stream
        sink.write(f"[vcpu{st.index} #{sum(st.exit_counts.values())}] "
                   f"{info['reason']:<14} {fields:44} rip={rip:#x}  "
                   f"{'by' if after else 'at'} {ins}")
    return trace


def _trace_value(key: str, value) -> str:
    """A --trace field as --trace-ioctls shows it: a flag as 0/1 (it was is_write=0x1),
    a number in hex but for a count, a suberror or a CPU, and a list of numbers in hex
    (internal.data was decimal)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value) if key in ("size", "count", "len", "suberror", "cpu") else f"{value:#x}"
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return "[" + ", ".join(f"{v:#x}" if v else "0" for v in value) + "]"
    return str(value)


def shown(line: str) -> str:
    """A guest's console line as the terminal gets it: control characters (ESC, BEL,
    backspace, C1 codes, bidi overrides...) escaped as in repr(), so that the guest cannot
    move the cursor, retitle or clear the terminal, or hide or forge minivmm's own lines.
    A tab stays a tab."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in line)


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def console_lines(text: str) -> list:
    """A console's lines: broken at CR, LF or CR LF only. str.splitlines() also broke at
    VT, FF, FS..RS, NEL and U+2028, which then showed as line breaks the guest never
    printed instead of escaped (shown()); and blank lines the guest did print are kept."""
    lines = _LINE_BREAK.split(text)
    if lines[-1] == "":            # the end of the last line, or no output at all
        lines.pop()
    return lines


def _output_closed(result) -> bool:
    """True when a vCPU ended because --trace or --trace-ioctls, which write from its
    thread, found the reader gone (`minivmm run ... --trace | head`): no guest failed."""
    return any(st.end is not None and st.end.reason == "host-error"
               and st.end.detail.get("error", "").startswith("BrokenPipeError")
               for st in result.vcpus)


def cmd_run(args) -> int:
    from .machine import HOST_STOPS, Machine, MachineError, format_registers
    if args.vcpus is not None and args.vcpus < 1:
        raise UsageError(f"--vcpus must be at least 1 (got {args.vcpus})")
    try:
        machine = Machine(args.payload, vcpus=args.vcpus, pages=args.pages)
    except MachineError as e:
        raise UsageError(_option_error(e, args)) from None
    with machine:
        if args.trace:
            machine.trace = _trace_printer(machine, *_trace_target(args.json))
        result = machine.run(timeout=args.timeout)
    # only stdout's reader: with --json the trace is on stderr, and the object still due
    if not args.json and _output_closed(result):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
    if args.json:
        print(json_text(result.to_dict()))
    else:
        p = result.payload
        print(f"{p.name}: {p.mode} mode" + (f", CPL{p.cpl}" if p.mode == "long" else "")
              + f", {len(result.vcpus)} vCPU(s), {result.elapsed_s * 1000:.1f} ms")
        for st in result.vcpus:
            for line in console_lines(st.console.decode("utf-8", "replace")):
                print(f"  vCPU {st.index} |" + (f" {shown(line)}" if line else ""))
            if st.console.dropped:
                print(f"  vCPU {st.index} | ({st.console.note()})")
            exits = ", ".join(f"{n} {k}" for k, n in st.exits_by_name().items() if n)
            print(f"  vCPU {st.index} ended: {st.end.summary()} [{exits or 'no exits'}]")
            regs = st.end.detail.get("registers")
            if regs:
                print(format_registers(regs))
    if not result.ok:
        bad = [st for st in result.vcpus if not (st.end and st.end.ok)]
        # The guest's own failure first: a vCPU the timeout stopped only waited (a loop, a
        # spin on a flag) for one that failed, and its line hid that failure
        st = next((st for st in bad if st.end and st.end.reason not in HOST_STOPS), bad[0])
        more = f" (and {len(bad) - 1} more vCPU(s))" if len(bad) > 1 else ""
        _say(f"minivmm: vCPU {st.index}: {st.end.summary()}{more}")
        return EXIT_GUEST_FAILED
    return EXIT_OK


# -- dirty --

def _run_dirty_session(args, tracker: str):
    from .dirty.tracker import DirtySession
    from .dirty.ring import DirtyRingError
    from .machine import MachineError
    try:
        session = DirtySession(args.payload, tracker=tracker, vcpus=args.vcpus, pages=args.pages,
                               iterations=args.iterations, ring_entries=args.ring_entries,
                               collect=args.collect, manual_protect=not args.no_manual_protect,
                               initially_set=args.initially_set, stride=args.stride,
                               seed=args.seed, writes=args.writes,
                               force_no_ring=os.environ.get("MINIVMM_FORCE_NO_RING") == "1",
                               show_ring=args.show_ring)
    except (DirtyRingError, MachineError, ValueError) as e:
        if isinstance(e, PayloadError):
            raise
        raise UsageError(_option_error(e, args)) from None
    with session:
        records = session.run(timeout=args.timeout)
        return session.tracker, records, session.result, session


def _plot_paths(path: str, show_ring: bool) -> list:
    return [path] + ([path[:-4] + "-rings.png"] if show_ring else [])


def _check_plot_path(path: str, show_ring: bool) -> None:
    """Refuse a picture path that cannot be written before the VMs run, not after: each
    file is opened for writing now (one that did not exist is removed again)."""
    if not path.lower().endswith(".png"):
        raise UsageError(f"--plot {path!r}: the picture is a PNG; give a FILE.png")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'minivmm[plot]'")
    try:    # found is not importable (a numpy it was not built for, PIL gone): now, not after
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--plot needs matplotlib, which failed to import: {e}") from None
    for target in _plot_paths(path, show_ring):
        existed = os.path.lexists(target)
        try:
            with open(target, "ab"):
                pass
        except OSError as e:
            raise UsageError(f"--plot: cannot write {target}: {e.strerror}") from None
        if not existed:
            os.remove(target)


# The dirty options that only set a register: the register, its default, and the
# shipped payload that reads it
PAYLOAD_PARAMS = (("stride", "r8", 4, "dirty_stride"), ("seed", "r9", 1, "dirty_random"),
                  ("writes", "r10", None, "dirty_random"))


def _check_payload_params(args) -> None:
    """Refuse --stride, --seed or --writes where they would be silently ignored: a shipped
    payload other than the one that reads the register, or a payload of the user's whose
    code never names it. Then fill in the defaults."""
    payload = args.payload
    shipped = Path(payload.path).resolve().parent == payload_dir().resolve()
    for option, reg, default, used_by in PAYLOAD_PARAMS:
        if getattr(args, option) is None:
            setattr(args, option, default)
            continue
        if shipped:
            ignored = payload.name != used_by
        else:
            named = re.compile(rf"\b{reg}[dwb]?\b")
            ignored = not any(named.search(ins.op_str) for ins in payload.listing)
        if ignored:
            raise UsageError(f"--{option} sets {reg.upper()}, which {payload.name} never "
                             f"reads (it is a parameter of {used_by})")


def cmd_dirty(args) -> int:
    from .dirty import report
    from .dirty.ring import ring_capability
    from .dirty.tracker import MAX_ITERATIONS
    from .kvm import Kvm
    # 0 (until stopped, as the Python API allows) would end only at --timeout, a failed run
    if not 1 <= args.iterations <= MAX_ITERATIONS:
        raise UsageError(f"--iterations must be between 1 and {MAX_ITERATIONS} "
                         f"(got {args.iterations})")
    if args.plot is not None:
        _check_plot_path(args.plot, args.show_ring)
    if args.tracker == "ring" and (args.initially_set or args.no_manual_protect):
        raise UsageError("--initially-set and --no-manual-protect are bitmap options; "
                         "use them with --tracker bitmap or both")
    if args.initially_set and args.no_manual_protect:   # before any VM runs, not after the ring's
        raise UsageError("KVM_DIRTY_LOG_INITIALLY_SET is an option of manual protect "
                         "(api.rst 7.18): drop --no-manual-protect or --initially-set")
    if args.tracker == "bitmap" and (args.show_ring or args.ring_entries is not None):
        raise UsageError("--show-ring and --ring-entries are ring options; use them with "
                         "--tracker ring or both")
    ring_options = [name for name, given in (("--show-ring", args.show_ring),
                                             ("--ring-entries", args.ring_entries is not None))
                    if given]
    if args.ring_entries is None:
        args.ring_entries = DEFAULT_RING_ENTRIES
    args.payload = load(args.payload)
    _check_payload_params(args)
    trackers = ["ring", "bitmap"] if args.tracker == "both" else [args.tracker]
    if args.tracker == "auto":
        with Kvm() as kvm:
            has_ring = ring_capability(kvm, disabled=os.environ.get("MINIVMM_FORCE_NO_RING") == "1")
        trackers = ["ring", "bitmap"] if has_ring else ["bitmap"]
        if not has_ring and ring_options:     # as --tracker bitmap refuses them
            raise UsageError(f"this kernel offers no dirty ring, so {' and '.join(ring_options)} "
                             "cannot apply (--tracker auto falls back to the bitmap)")
        if not has_ring:
            print("minivmm: note: this kernel offers no dirty ring; using the bitmap only",
                  file=sys.stderr)
    if args.initially_set:     # before the ring's run, not after it
        from .dirty.tracker import initially_set_missing
        with Kvm() as kvm:
            why = initially_set_missing(kvm.check_extension(
                abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
        if why:
            raise UsageError(why)
    runs = []
    nvcpus = None
    for kind in trackers:
        tracker, records, result, session = _run_dirty_session(args, kind)
        nvcpus = session.nvcpus
        runs.append((tracker, records, result))
    summary = report.to_json({"payload": session.payload.name,
                              "vcpus": nvcpus, "pages": args.pages,
                              "iterations": args.iterations, "collect": args.collect,
                              "ring_entries": args.ring_entries}, runs)
    ring_records = [recs for t, recs, _ in runs if t.name == "ring"]
    ring_plot = plot_error = None
    if args.plot:
        try:
            report.plot(summary, args.plot,
                        missed={t.name: dict(zip(report.collection_keys([r.iteration
                                                                        for r in recs]),
                                                 (r.missed.tolist() for r in recs)))
                                for t, recs, _ in runs})
            if args.show_ring and ring_records:
                ring_plot = _plot_paths(args.plot, True)[1]
                report.plot_rings(ring_records[0], ring_plot)
        except OSError as e:    # the disk filled up since _check_plot_path: keep the results
            plot_error = (f"--plot: cannot write {ring_plot or args.plot}: "
                          f"{e.strerror or e}")
    if args.json:
        print(json_text(summary))
    else:
        print(report.table(summary))
        if args.show_ring and ring_records:
            print(report.ring_view_text(ring_records[0]))
        if args.plot and not plot_error:
            print(f"picture: {args.plot}" + (f", rings: {ring_plot}" if ring_plot else ""))
    if plot_error:      # as when _check_plot_path finds it: status 2
        _say(f"minivmm: {plot_error}")
    if not summary["ok"]:
        if args.json:
            _say(f"minivmm: {report.verdict(summary)}")
        return EXIT_GUEST_FAILED
    return EXIT_USAGE if plot_error else EXIT_OK


DEFAULT_RING_ENTRIES = 4096


def _power_of_two_entries(text: str) -> int:
    value = _integer(text)
    if value <= 0 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"ring size {value} is not a power of two")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the rest is in --help)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minivmm", description="A tiny virtual machine monitor that drives /dev/kvm "
        "directly, one ioctl at a time.",
        epilog="Exit status: 0 ok; 1 a guest, an ioctl or the host failed; 2 bad input, or "
        "output that cannot be written; 130 Ctrl-C (abi-check: see its --help).")
    parser.add_argument("--version", action="version", version=f"minivmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parser.commands = sub.choices
    # Options every command takes.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--trace-ioctls", action="store_true",
                        help="print every ioctl minivmm issues, decoded (name, fd, the struct's "
                        "fields, result or errno, duration), and its mmaps and munmaps of guest "
                        "memory, kvm_run and dirty rings, on stdout; on stderr with --json "
                        "and for abi-check, whose output is for machines (there, a trace reader that "
                        "goes away ends the trace only)")

    p = sub.add_parser("caps", parents=[common], help="show the KVM capabilities that matter to minivmm")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_caps)

    p = sub.add_parser("payloads", parents=[common], help="list the shipped guest payloads")
    p.add_argument("--dir", help="directory to list (default: guest_payloads/, or "
                   "$MINIVMM_PAYLOADS when set)")
    p.set_defaults(func=cmd_payloads)

    p = sub.add_parser("disasm", parents=[common], help="assemble a payload and show its listing")
    p.add_argument("payload", help="a .asm file, or the name of a shipped payload")
    p.set_defaults(func=cmd_disasm)

    p = sub.add_parser("run", parents=[common], help="run a payload in a fresh VM")
    p.add_argument("payload", help="a .asm file, or the name of a shipped payload")
    p.add_argument("--vcpus", type=_integer, default=None,
                   help="number of vCPUs (default: the payload's header, else 1)")
    p.add_argument("--pages", type=_integer, default=64,
                   help="4 KiB pages in the data slot at 1 GiB (default 64)")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="S",
                   help="stop a guest that runs longer than this many seconds (default 10)")
    p.add_argument("--trace", action="store_true",
                   help="print every exit, decoded, with the instruction that caused it")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("dirty", parents=[common], help="run a dirtying payload and check what KVM reports dirty",
                       description="Run a payload that dirties guest memory, collect dirty pages "
                       "at every sync with the dirty ring, the bitmap, or both (two VMs side by "
                       "side), and verify them against what the guest really wrote.")
    p.add_argument("--payload", default="dirty_seq",
                   help="payload file or name (default dirty_seq; also dirty_stride, "
                   "dirty_random)")
    p.add_argument("--tracker", choices=["ring", "bitmap", "both", "auto"], default="auto",
                   help="dirty ring, bitmap, or both side by side (default auto: both when the "
                   "kernel offers the ring, else the bitmap)")
    p.add_argument("--vcpus", type=_integer, default=None,
                   help="number of vCPUs (default: the payload's header, else 1)")
    p.add_argument("--pages", type=_integer, default=4096, help="data-slot pages "
                   "(default 4096), split evenly between vCPUs")
    p.add_argument("--iterations", type=_integer, default=5, help="iterations (default 5)")
    p.add_argument("--ring-entries", type=_power_of_two_entries, default=None,
                   help=f"dirty ring entries per vCPU, a power of two (default "
                   f"{DEFAULT_RING_ENTRIES})")
    p.add_argument("--collect", choices=["sync", "async"], default="sync",
                   help="sync: collect at each sync exit with vCPUs paused; async: a reaper "
                   "thread harvests while vCPUs run, plus the sync collection (default sync)")
    p.add_argument("--no-manual-protect", action="store_true",
                   help="bitmap: do not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    p.add_argument("--initially-set", action="store_true",
                   help="bitmap: KVM_DIRTY_LOG_INITIALLY_SET (the first collection reports "
                   "every page; refused where the kernel lacks it)")
    p.add_argument("--stride", type=_integer, default=None,
                   help="dirty_stride: k (R8; default 4)")
    p.add_argument("--seed", type=_integer, default=None,
                   help="dirty_random: seed (R9; default 1)")
    p.add_argument("--writes", type=_integer, default=None,
                   help="dirty_random: writes per iteration (R10; default a quarter of the share)")
    p.add_argument("--timeout", type=_seconds, default=120.0, metavar="S",
                   help="stop the guest after this many seconds (default 120; with "
                   "--tracker both, each of its two runs, one after the other)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="write a picture of the pages per iteration")
    p.add_argument("--show-ring", action="store_true",
                   help="show each vCPU's ring around each collection: DIRTY, RESET and empty "
                   "entries, the fetch index, what KVM_RESET_DIRTY_RINGS returned (with --plot, "
                   "also FILE-rings.png)")
    p.set_defaults(func=cmd_dirty)
    for module in EXTRA_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if not e.name or not module.startswith(e.name):
                raise   # a real import error inside an existing command module
            continue
        mod.register(sub, common)
    for command in sub.choices.values():   # what _integer takes, where a count is asked for
        if command.epilog is None and any(a.type in (_integer, _power_of_two_entries)
                                          for a in command._actions):
            command.epilog = "A count is decimal, or hex after 0x."
    return parser


# Commands that live in their own modules; each has register(subparsers, common_parent).
EXTRA_COMMANDS = ("minivmm.step", "minivmm.abicheck.cli")


def _trace_target(machine_readable: bool) -> tuple:
    """(stream, reader_gone) of a trace (trace.Sink): stdout; or, beside output for
    machines (--json, abi-check), stderr, whose reader going away ends the trace only."""
    if not machine_readable:
        return sys.stdout, None
    return sys.stderr, lambda: _discard_stdout(sys.stderr)


def _install_ioctl_trace(args) -> None:
    if getattr(args, "trace_ioctls", False):
        from . import trace
        trace.install(*_trace_target(getattr(args, "json", False)
                                     or getattr(args, "report_on_stdout", False)))


# errnos of a write to stdout that lost the output: a full disk or /dev/full, a quota, a
# terminal that went away, a stdout opened read-only (1</dev/null). Reported in one line,
# never as a traceback.
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EBADF)
# errnos of the host running out: processes or threads (EAGAIN: ulimit -u, -v), open files
# (ulimit -n: a module imported mid-run, a file opened), memory. A failure of the run, said
# in one line, as MemoryError is
_LIMIT_ERRNOS = (errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def _prepare_streams() -> None:
    if sys.stderr is None:      # started with 2>&-: the one-line errors go nowhere, as asked
        sys.stderr = open(os.devnull, "w")
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is getattr(sys, f"__{name}__") and isinstance(stream, io.TextIOWrapper) \
                and isinstance(stream.buffer, io.RawIOBase):
            # python -u, PYTHONUNBUFFERED: the text layer writes straight to the fd and drops
            # what a short write left (CPython gh-85393); a signal makes one on a full pipe
            # (Ctrl-Z then fg), and a --json object was cut at 64 KiB, status 0. A buffered
            # writer writes it all; flushed at each line, as unbuffered output would be.
            # Over a raw stream of its own that leaves the fd open when it goes
            raw = io.FileIO(stream.fileno(), "w", closefd=False)
            stream = io.TextIOWrapper(io.BufferedWriter(raw), encoding=stream.encoding,
                                      errors=stream.errors, line_buffering=True)
            setattr(sys, name, stream)
        # a guest's console bytes that are not UTF-8 print as U+FFFD, a payload's path can
        # hold any bytes (surrogates in Python): where the stream cannot encode them (an
        # ASCII or ISO-8859-1 locale; surrogates under en_US.UTF-8, whose errors are
        # strict) print() raised UnicodeEncodeError. Write such characters as escapes.
        errors = getattr(stream, "errors", None)
        utf8 = codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "utf-8"
        if (errors == "strict" or errors == "surrogateescape" and not utf8) \
                and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _discard_stdout(stream=None) -> None:
    """Point fd 1 (or ``stream``'s) at /dev/null after a failed write, so that the
    interpreter's last flush of what is still buffered does not fail again ("Exception
    ignored", status 120)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, (stream or sys.stdout).fileno())
        os.close(fd)
    except (OSError, AttributeError, ValueError):   # no real fd (a test's capture)
        pass


def _discard_failed() -> bool:
    """After a failed write: discard each of stdout and stderr that cannot be written (the
    failed write stays in its buffer, so its flush fails again). It may be stderr's alone
    (--json --trace 2>&1 >out | head, or 2>/dev/full): stdout's output is still due.
    True when stdout was one."""
    failed = False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, AttributeError, ValueError):
            _discard_stdout(stream)
            failed = failed or stream is sys.stdout
    return failed


def _say(line: str) -> None:
    """One line on stderr, if it can be written: with 2>/dev/full or a stderr opened
    read-only there is nowhere to say it, and the status alone must (it was a traceback
    nobody saw, or status 120 at the interpreter's last flush)."""
    try:
        print(line, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, AttributeError, ValueError):
        _discard_stdout(sys.stderr)


def _restore_streams(saved: dict) -> None:
    """Put back the sys.stdout and sys.stderr main() found (and their error handlers): a
    program that calls main() keeps its own streams, not ours (under python -u, a
    line-buffered one, where its print(end="") waited for a newline)."""
    for name, (stream, errors) in saved.items():
        mine = getattr(sys, name)
        if mine is not stream:
            try:
                mine.close()        # flushes; our wrappers leave the fd open (closefd=False)
            except (OSError, AttributeError, ValueError):
                pass                # said already, or nowhere to say it
            setattr(sys, name, stream)
        if errors is not None and getattr(stream, "errors", errors) != errors:
            try:
                stream.reconfigure(errors=errors)
            except (OSError, AttributeError, ValueError):
                pass


def _before_command(parser, given: list) -> list:
    """The arguments before the first command name when they hold an option that is not
    minivmm's own (--help, --version, or an abbreviation argparse takes for one), else [].
    Found before argparse parses: it takes an early option's value for the command."""
    at = next((i for i, a in enumerate(given) if a in parser.commands), None)
    if not at or "--" in given[:at]:
        return []
    own = [o for o in parser._option_string_actions if o.startswith("--")]
    for a in given[:at]:
        a = str(a)
        if a in parser._option_string_actions or a.startswith("--") and len(a) > 2 \
                and any(o.startswith(a.split("=")[0]) for o in own):
            return []   # argparse's help or version (or its own error) comes first
    return given[:at] if any(str(a).startswith("-") for a in given[:at]) else []


def main(argv=None) -> int:
    from . import _sys
    saved = {name: (getattr(sys, name), getattr(getattr(sys, name), "errors", None))
             for name in ("stdout", "stderr")}
    tracer = _sys.tracer
    try:
        return _main(argv)
    finally:
        _sys.tracer = tracer        # --trace-ioctls traced into a stream that is going away
        _restore_streams(saved)


def _main(argv) -> int:
    try:
        _prepare_streams()
        parser = build_parser()                    # it loads the commands' modules
        given = sys.argv[1:] if argv is None else list(argv)
        early = _before_command(parser, given)
        if early:   # `minivmm --trace-ioctls caps` blamed caps, whose --help lists it; and
            # `--timeout 5 run X` took 5 for the command ("invalid choice: '5'")
            parser.error(f"unrecognized arguments: {' '.join(map(str, early))} (before "
                         "COMMAND only --help and --version; a command's options go "
                         "after it)")
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as done:      # --help, --version, or a usage error (status 2)
            if done.code in (0, None) and sys.stdout is not None:
                # argparse ignores a failed write of the help; what is still buffered
                # fails here, and is said in one line (a full disk: status 2)
                sys.stdout.flush()
            raise
        if extra:   # argparse would blame "minivmm", not the command that was given
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        if sys.stdout is None and not getattr(args, "report_on_stdout", False):
            # started with >&-: Python sets sys.stdout to None, print() drops every line
            # (status 0 and no output) and --trace, --trace-ioctls raised AttributeError;
            # abi-check, which can write to --output, says so itself
            raise UsageError("cannot write the output: stdout is closed")
        _install_ioctl_trace(args)
        status = args.func(args)
        if sys.stdout is not None:
            sys.stdout.flush()          # a full disk shows here, not at the interpreter's exit
        return status
    except KeyboardInterrupt:
        _say("minivmm: interrupted")
        return EXIT_INTERRUPTED
    except KvmUnavailable as e:
        _say(f"minivmm: {e}")
        return EXIT_USAGE
    except (UsageError, PayloadError) as e:
        _say(f"minivmm: {e}")
        return EXIT_USAGE
    except KvmError as e:
        _say(f"minivmm: {e}")
        return EXIT_GUEST_FAILED
    except BrokenPipeError:
        # the reader is gone (`| head`): what is still buffered must not fail again at the
        # interpreter's exit ("Exception ignored", status 120)
        _discard_failed()
        return EXIT_OK
    except OSError as e:
        # a write to stdout or stderr that lost the output (EAGAIN too: a full non-blocking
        # pipe, a parent's O_NONBLOCK), stdout's or stderr's alone (2>/dev/full): the other
        # stream's output is still due. EBADF and EAGAIN count only where a stream failed
        if e.filename is None and e.errno in _OUTPUT_ERRNOS + (errno.EAGAIN,):
            if _discard_failed() or e.errno not in (errno.EBADF, errno.EAGAIN) \
                    or e.errno == errno.EBADF and sys.stdout is None:
                _say(f"minivmm: cannot write the output: {e.strerror}")
                return EXIT_USAGE
            if e.errno == errno.EBADF:
                raise       # neither stream failed: a bad fd of ours, not the output's
        if e.errno in _LIMIT_ERRNOS:    # the host ran out (EAGAIN: of threads)
            where = f": {e.filename}" if e.filename is not None else ""
            _say(f"minivmm: {e.strerror}{where}")
            return EXIT_GUEST_FAILED
        raise
    except MemoryError as e:
        # the host refused guest memory (GuestMemory names the slot: the system slot's is
        # no option's fault), or Python itself ran out: a failure of the run, not of input
        # (an exception is true even when its text is empty: numpy raises MemoryError())
        _say(f"minivmm: {str(e) or 'out of memory'}")
        return EXIT_GUEST_FAILED
    except RuntimeError as e:
        if interrupted(e):                 # a Ctrl-C while a module loaded (Python 3.11)
            _say("minivmm: interrupted")
            return EXIT_INTERRUPTED
        from .dirty.tracker import CollectionError   # a bug of ours, in a vCPU thread
        if not isinstance(e, CollectionError):
            raise
        _say(f"minivmm: {e} (set MINIVMM_DEBUG=1 for where)")
        if os.environ.get("MINIVMM_DEBUG") == "1":
            _say(e.thread_traceback)
        return EXIT_GUEST_FAILED


if __name__ == "__main__":
    sys.exit(main())
