"""`minivmm abi-check`: run the checks and report in KTAP (default), JSON or JUnit.

Not a kernel ABI mirror: the command line only; what is checked is in the checks_*.py modules."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys

from . import report
from .runner import host_header, load_checks, pattern_error, run_one, select

EXIT_CANNOT_RUN = 2
# open(/dev/kvm) errnos that mean this machine has no KVM for us: no node (ENOENT), no
# permission, or a node with no driver behind it (ENXIO, ENODEV: the module not loaded)
_NO_KVM_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV)


def register(sub, common) -> None:
    p = sub.add_parser("abi-check", parents=[common],
                       help="numbered, cited regression checks of KVM's dirty-log ABI (KTAP)",
                       description="Run numbered, cited checks of the dirty ring and dirty "
                       "bitmap ABI against the running kernel, each in a fresh VM, and report "
                       "in KTAP. Exit status: 0 all passed or skipped, 1 a failure or an "
                       "error, 4 all skipped (also: no /dev/kvm, or no permission), 2 cannot run "
                       "(a device that is not KVM's, a report that cannot be written), 130 interrupted.")
    p.add_argument("--list", action="store_true", help="list the checks (id, rules, citation; "
                   "as text, or JSON with --format json), needs no KVM")
    p.add_argument("-k", metavar="PATTERN", dest="pattern",
                   help="only checks whose id matches PATTERN anywhere, as with pytest -k: "
                   "a substring, or a glob with * ? [...] (reset and reset* select the same), "
                   "case-insensitive")
    p.add_argument("--format", choices=["ktap", "json", "junit"], default="ktap",
                   help="report format: KTAP (default), one JSON object, or JUnit XML")
    p.add_argument("--unsafe", action="store_true",
                   help="also run checks that may WARN or taint the kernel")
    p.add_argument("--output", metavar="FILE", help="write the report here instead of stdout")
    # The report is for machines (KTAP, JSON, JUnit): --trace-ioctls goes to stderr
    p.set_defaults(func=cmd_abi_check, report_on_stdout=True)


def cmd_abi_check(args) -> int:
    from ..cli import UsageError
    from ..kvm import Kvm
    from .._sys import KvmUnavailable
    load_checks()
    if args.pattern is not None and (why := pattern_error(args.pattern)):
        raise UsageError(why)
    specs = select(args.pattern)
    if args.list and args.format == "junit":
        raise UsageError("--list prints text (the default) or --format json, not junit")
    if args.pattern and not specs:
        raise UsageError(f"no check id matches {args.pattern!r} (see --list)")
    if args.output == "":      # it would be taken as "no --output": stdout
        print("minivmm abi-check: --output needs a file name", file=sys.stderr)
        return EXIT_CANNOT_RUN
    # KTAP goes out a check at a time, as kselftest.h line-buffers its output: a check
    # that hangs, or a runner's timeout, leaves the plan and the results before it
    stream = args.format == "ktap" and not args.list
    created = args.output is not None and not os.path.lexists(args.output)
    try:   # opened before any check runs: a bad path costs nothing and is no failure
        out = _open_output(args.output, stream) if args.output is not None else sys.stdout
    except OSError as e:
        print(f"minivmm abi-check: cannot write --output {args.output}: {e.strerror}",
              file=sys.stderr)
        return EXIT_CANNOT_RUN
    if out is None:    # started with stdout closed (>&-): Python leaves sys.stdout None
        print("minivmm abi-check: cannot write the report to stdout: it is closed (give "
              "--output FILE)", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        if args.list:
            text = report.listing_json(specs) if args.format == "json" \
                else report.listing(specs)
            return _write(out, text, args.output) or 0
        try:
            kvm = Kvm()
        except KvmUnavailable as e:
            # a device that is not KVM's (a directory, a symlink loop...), or no fd left:
            # misconfigured, not a machine without KVM
            if not e.call.startswith("open ") or e.errno not in _NO_KVM_ERRNOS:
                print(f"minivmm abi-check: cannot run: {e}", file=sys.stderr)
                return EXIT_CANNOT_RUN
            # No KVM here (no device, no permission): the kernel's KVM selftests skip then
            # (open_path_or_exit() in tools/testing/selftests/kvm/lib/kvm_util.c exits
            # KSFT_SKIP), so a fleet runner counts this machine as skipped, not failed
            print(f"minivmm abi-check: skipped: {e}", file=sys.stderr)
            return _write(out, report.skipped_all(args.format, str(e)), args.output) \
                or report.KSFT_SKIP
        results = []
        with kvm:
            header = host_header(kvm)
            if stream and (err := _write(out, report.ktap_head(header, len(specs)),
                                         args.output)):
                return err
            try:
                for spec in specs:
                    results.append(run_one(spec, kvm, args.unsafe))
                    if stream and (err := _write(out, report.ktap_result(len(results),
                                                                         results[-1]),
                                                 args.output)):
                        return err
            except KeyboardInterrupt:
                # TAP 13's "Bail out!", as kselftest.h's ksft_exit_fail_msg() prints it
                # (ktap.rst has no such line): the run was stopped, the missing results are
                # not failures of the kernel
                if stream:
                    _write(out, f"Bail out! interrupted (SIGINT) after {len(results)} of "
                           f"{len(specs)} checks\n", args.output)
                elif created:     # no document: no file either
                    with contextlib.suppress(OSError):
                        os.unlink(args.output)
                raise
        text = report.ktap_totals(results) if stream else \
            {"json": report.to_json, "junit": report.junit}[args.format](results, header)
        return _write(out, text, args.output) or report.exit_status(results)
    finally:
        if out is not sys.stdout:
            with contextlib.suppress(OSError):   # a failed write was reported already
                out.close()


def _open_output(path: str, stream: bool):
    """--output, opened for writing before any check runs. A JSON or JUnit document is
    whole or absent: a regular file is emptied only when the document is ready (a Ctrl-C
    left an empty file over the last report), so it is opened without O_TRUNC, and without
    O_APPEND, which an append-only file (chattr +a) would allow until the truncate at the
    end. Anything else (/dev/null, a fifo, a terminal) is opened as before: there is no
    report to keep, and ftruncate() on it is EINVAL."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:         # none yet (made here), or open() says why not
        regular = True
    if stream or not regular:
        return open(path, "w")
    out = open(path, "w", opener=lambda p, flags: os.open(p, flags & ~os.O_TRUNC, 0o666))
    out.empty_first = True
    return out


def _write(out, text: str, name: str | None) -> int | None:
    """Write the report; EXIT_CANNOT_RUN (not 1, a failed check) if it cannot be."""
    try:
        if getattr(out, "empty_first", False):    # the whole document, over the last one
            out.truncate(0)
        out.write(text)
        out.flush()
    except OSError as e:
        print(f"minivmm abi-check: cannot write the report to {name or 'stdout'}: "
              f"{e.strerror}", file=sys.stderr)
        if out is sys.stdout:     # else the interpreter's last flush fails again (status 120)
            from ..cli import _discard_stdout
            _discard_stdout()
        return EXIT_CANNOT_RUN
    return None
