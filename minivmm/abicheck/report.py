"""Reporters: KTAP (Documentation/dev-tools/ktap.rst, as the kernel's selftests print),
JSON, and JUnit XML for CI systems; plus the kselftest exit status."""
from __future__ import annotations

import json
import re
import socket
from xml.sax.saxutils import escape, quoteattr

from ..cli import _utf8, json_text

KSFT_PASS, KSFT_FAIL, KSFT_SKIP = 0, 1, 4


def exit_status(results) -> int:
    """kselftest convention: 0 all passed or skipped, 1 any failure or error, 4 everything
    skipped. An error (a bug in a check) is 1 as in kselftest.h, whose ksft_finished() exits
    KSFT_FAIL unless every test passed, was skipped or failed as expected."""
    if any(r.status in ("fail", "error") for r in results):
        return KSFT_FAIL
    if results and all(r.status == "skip" for r in results):
        return KSFT_SKIP
    return KSFT_PASS


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# XML 1.0 (2.2 Characters) holds no C0 control but tab, LF and CR, nor U+FFFE/U+FFFF;
# quoteattr() and escape() pass them through, and the document is not well-formed
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml(text) -> str:
    """Text for the JUnit document, which says UTF-8: bytes that are not (a
    MINIVMM_KVM_DEVICE path's, held as lone surrogates) and characters XML cannot hold
    written as backslash escapes, as json_text() writes them."""
    return _NOT_XML.sub(lambda m: ascii(m[0])[1:-1], _utf8(str(text)))


def ktap(results, header: dict) -> str:
    return (ktap_head(header, len(results))
            + "".join(ktap_result(n, r) for n, r in enumerate(results, 1))
            + ktap_totals(results))


def ktap_head(header: dict, planned: int) -> str:
    """The version line, the host header as diagnostics, and the plan."""
    out = ["KTAP version 1",
           f"# minivmm abi-check on {header['kernel']} ({header['machine']}), "
           f"vendor module {header['vendor_module']}"]
    out.append("# capabilities: " + " ".join(f"{k[8:]}={v}"
                                              for k, v in header["capabilities"].items()))
    out.append(f"# {header['cve']}")
    out.append(f"1..{planned}")
    return "\n".join(out) + "\n"


def ktap_result(n: int, r) -> str:
    """Check number n: its diagnostics, then its result line."""
    out = [f"# {r.id}: {r.summary} [abi.md rule(s) {', '.join(map(str, r.rules))}; "
           f"{r.cite}]"]
    for d in r.diagnostics:
        out.append(f"# {_one_line(d)}")
    if r.status == "pass":
        out.append(f"ok {n} {r.id}")
    elif r.status == "skip":
        out.append(f"ok {n} {r.id} # SKIP {_one_line(r.reason)}")
    elif r.status == "error":
        # A bug in the check, not a kernel failure: Documentation/dev-tools/ktap.rst's ERROR
        # directive on a "not ok" line, and error:N in the totals, where kselftest.h's
        # ksft_test_result_error() counts it
        out.append(f"not ok {n} {r.id} # ERROR {_one_line(r.reason)}")
    else:
        out.append(f"# FAIL {r.id}: {_one_line(r.reason)}")
        out.append(f"not ok {n} {r.id}")
    return "\n".join(out) + "\n"


def ktap_totals(results) -> str:
    """kselftest.h ksft_print_cnts()'s line."""
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip", "error")}
    return (f"# Totals: pass:{counts['pass']} fail:{counts['fail']} xfail:0 xpass:0 "
            f"skip:{counts['skip']} error:{counts['error']}\n")


def skipped_all(fmt: str, reason: str) -> str:
    """The report of a run that could not start any check for want of KVM: KTAP's plan of
    no tests with a SKIP directive, as kselftest.h's ksft_exit_skip() prints before any
    test, or the empty JSON and JUnit documents saying why."""
    if fmt == "json":
        return json_text({"header": None, "skipped": reason, "results": [],
                          "exit_status": KSFT_SKIP}, indent=2) + "\n"
    if fmt == "junit":
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                '<testsuites><testsuite name="minivmm-abi-check" tests="0" failures="0" '
                'skipped="0" errors="0" time="0.000"><properties>'
                f'<property name="skipped" value={quoteattr(_xml(reason))}/></properties>'
                '</testsuite></testsuites>\n')
    return f"KTAP version 1\n1..0 # SKIP {_one_line(reason)}\n"


def to_json(results, header: dict) -> str:
    # the same keys as skipped_all()'s document: "skipped" is null when checks ran
    return json_text({"header": header, "skipped": None, "results": [
        {"n": n, "id": r.id, "status": r.status, "reason": r.reason, "rules": list(r.rules),
         "cite": r.cite, "summary": r.summary, "diagnostics": r.diagnostics,
         "seconds": round(r.seconds, 4)} for n, r in enumerate(results, 1)],
        "exit_status": exit_status(results)}, indent=2) + "\n"


def junit(results, header: dict) -> str:
    fails = sum(r.status == "fail" for r in results)
    skips = sum(r.status == "skip" for r in results)
    errors = sum(r.status == "error" for r in results)
    total = sum(r.seconds for r in results)
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuites><testsuite name="minivmm-abi-check" tests="{len(results)}" '
           f'failures="{fails}" skipped="{skips}" errors="{errors}" time="{total:.3f}" '
           f'hostname={quoteattr(_xml(socket.gethostname()))}>',
           "<properties>" + "".join(
               f"<property name={quoteattr(k)} value={quoteattr(_xml(v))}/>"
               for k, v in [("kernel", header["kernel"]),
                            ("vendor_module", header["vendor_module"]),
                            *header["capabilities"].items()]) + "</properties>"]
    for r in results:
        out.append(f'<testcase classname="abi_check.{escape(r.id.split(".")[0])}" '
                   f'name={quoteattr(r.id)} time="{r.seconds:.3f}">')
        if r.status == "fail":
            out.append(f"<failure message={quoteattr(_xml(_one_line(r.reason)))}>"
                       f"{escape(_xml(chr(10).join(r.diagnostics)))}</failure>")
        elif r.status == "error":    # JUnit's word for a test that broke, not one that failed
            out.append(f"<error message={quoteattr(_xml(_one_line(r.reason)))}>"
                       f"{escape(_xml(chr(10).join(r.diagnostics)))}</error>")
        elif r.status == "skip":
            out.append(f"<skipped message={quoteattr(_xml(_one_line(r.reason)))}/>")
        out.append(f"<system-out>{escape(r.summary + ' | ' + r.cite)}</system-out></testcase>")
    out.append("</testsuite></testsuites>")
    return "\n".join(out) + "\n"


def listing(specs) -> str:
    out = []
    for s in specs:
        flags = " [unsafe]" if s.unsafe else ""
        out.append(f"{s.id}{flags}\n    rules {', '.join(map(str, s.rules))}; {s.cite}\n"
                   f"    {s.summary}")
    return "\n".join(out) + "\n"


def listing_json(specs) -> str:
    return json.dumps({"checks": [{"id": s.id, "rules": list(s.rules), "cite": s.cite,
                                   "summary": s.summary, "unsafe": s.unsafe}
                                  for s in specs]}, indent=2) + "\n"


def markdown_table(specs) -> str:
    out = ["| # | check | abi.md rules | citation | what it checks |", "|---|---|---|---|---|"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")      # a bare | would start a new cell
    for n, s in enumerate(specs, 1):
        flags = " (unsafe)" if s.unsafe else ""
        out.append(f"| {n} | `{s.id}`{flags} | {', '.join(map(str, s.rules))} | "
                   f"{cell(s.cite)} | {cell(s.summary)} |")
    return "\n".join(out) + "\n"
