"""Selecting and running checks, each in its own fresh VM(s), and the host header.

Not a kernel ABI mirror; the header's CVE line compares the release against the stable
releases that carry commit 577a8d3bae05 (CVE-2026-52969), a version comparison only."""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import os
import re
import time
import traceback

from .. import abi
from .._sys import KvmError
from ..kvm import vendor_module
from .ctx import Ctx
from .registry import HOST_LIMIT_ERRNOS, REGISTRY, Fail, Skip

CHECK_MODULES = ("caps", "ring_enable", "ring_mmap", "entries", "reset", "softfull",
                 "bitmap", "memslots", "misc", "unsafe")


def load_checks() -> dict:
    """Import every checks_* module (each registers its checks) and return the registry."""
    for name in CHECK_MODULES:
        try:
            importlib.import_module(f"minivmm.abicheck.checks_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"minivmm.abicheck.checks_{name}":
                raise
    # Numbered in CHECK_MODULES' order, whichever module a program imported first (the
    # KTAP test numbers and the docs table must not depend on it); stable within a module
    rank = {f"minivmm.abicheck.checks_{n}": i for i, n in enumerate(CHECK_MODULES)}
    ordered = sorted(REGISTRY.values(), key=lambda s: rank.get(s.fn.__module__, len(rank)))
    if list(REGISTRY.values()) != ordered:
        REGISTRY.clear()
        REGISTRY.update((s.id, s) for s in ordered)
    return REGISTRY


@dataclasses.dataclass
class Result:
    id: str
    status: str                      # pass | fail | skip | error (a bug in the check)
    reason: str = ""
    diagnostics: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    rules: tuple = ()
    cite: str = ""
    summary: str = ""


def pattern_error(pattern: str) -> str | None:
    """Why ``-k pattern`` can select nothing useful, or None if it is a usable glob."""
    if not pattern:
        return "-k needs a pattern (an empty one would select every check)"
    if any(c.isspace() for c in pattern):   # `-k "ring and not reset"` is pytest's, not ours
        return (f"-k {pattern!r}: one glob without spaces, not a pytest-style expression "
                "(check ids have no spaces)")
    i = 0
    while i < len(pattern):     # fnmatch takes an unclosed [ literally: no id has one
        if pattern[i] == "[":
            j = i + 1 + (pattern[i + 1:i + 2] == "!")
            j = pattern.find("]", j + (pattern[j:j + 1] == "]"))
            if j < 0:
                return f"-k {pattern!r}: the [ at position {i + 1} is never closed with ]"
            i = j
        i += 1
    return None


def select(pattern: str | None = None, ids=None) -> list:
    """The checks whose id matches ``pattern``: a glob that may match any part of the id,
    case-insensitively, as pytest -k matches a substring (``reset``, ``reset*`` and
    ``*reset*`` select the same checks)."""
    specs = list(load_checks().values())
    if ids:
        specs = [s for s in specs if s.id in ids]
    if pattern is not None:
        pat = f"*{pattern.lower()}*"
        specs = [s for s in specs if fnmatch.fnmatchcase(s.id, pat)]
    return specs


def run_one(spec, kvm, unsafe: bool = False) -> Result:
    res = Result(spec.id, "pass", rules=spec.rules, cite=spec.cite, summary=spec.summary)
    if spec.unsafe and not unsafe:
        res.status, res.reason = "skip", "needs --unsafe (may WARN or taint the kernel)"
        return res
    ctx = Ctx(kvm, unsafe)
    t0 = time.perf_counter()
    try:
        spec.fn(ctx)
    except Skip as e:
        res.status, res.reason = "skip", str(e)
    except Fail as e:
        res.status, res.reason = "fail", str(e)
    except Exception as e:
        if isinstance(e, OSError) and e.errno in HOST_LIMIT_ERRNOS:
            # no fd left (ulimit -n): the host's limit stopped the check, the kernel
            # answered nothing wrong. An ERROR naming it, not "not ok" blaming the kernel
            res.status, res.reason = "error", f"host limit, not the kernel's: {e}"
        elif isinstance(e, KvmError):
            res.status, res.reason = "fail", f"unexpected error: {e}"
        else:   # the tool's bug, not the kernel's: KTAP's ERROR, not a failure
            res.status, res.reason = "error", f"check raised {type(e).__name__}: {e}"
            res.diagnostics.extend(traceback.format_exc().rstrip().splitlines()[-6:])
    finally:
        ctx.close()
        res.seconds = time.perf_counter() - t0
    res.diagnostics[:0] = ctx.diagnostics
    return res


HEADER_CAPS = ("KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
               "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
               "KVM_CAP_MAX_VCPUS", "KVM_CAP_NR_MEMSLOTS", "KVM_CAP_MULTI_ADDRESS_SPACE")

# CVE-2026-52969 (commit 577a8d3bae05, abi.md 5): first fixed release of each stable line.
CVE_FIXED = {(5, 15): (5, 15, 209), (6, 1): (6, 1, 175), (6, 6): (6, 6, 141),
             (6, 12): (6, 12, 91), (6, 18): (6, 18, 33), (7, 0): (7, 0, 10)}


def cve_line(release: str) -> str:
    """Informational: is this kernel version at or past the CVE-2026-52969 fix? (no PoC run)"""
    nums = []
    for part in release.split("-")[0].split(".")[:3]:
        # the leading digits only: Void's "6.6.30_1" is 6.6.30, not 6.6.301 (past the fix),
        # and "6.18rc1" is 6.18; [0-9], as int() refuses a superscript that isdigit() takes
        digits = re.match(r"[0-9]*", part)[0]
        nums.append(int(digits) if digits else 0)
    while len(nums) < 3:
        nums.append(0)
    ver = tuple(nums)
    fixed = CVE_FIXED.get(ver[:2])
    if fixed:
        state = "at or past the fix" if ver >= fixed else "BEFORE the fix"
        return (f"CVE-2026-52969 (wrapped offset in kvm_reset_dirty_gfn): {release} is {state} "
                f"({'.'.join(map(str, fixed))}); version comparison only, no exploit is run")
    if ver < (5, 11, 0):
        return (f"CVE-2026-52969: {release} is not affected: the dirty ring it is in came "
                "with 5.11")
    if ver >= (7, 1, 0):
        return f"CVE-2026-52969: {release} is newer than every fixed release listed (7.0.10)"
    return (f"CVE-2026-52969: no fixed release known for the {ver[0]}.{ver[1]} line "
            f"(affected from 5.11); version comparison only")


def host_header(kvm) -> dict:
    return {"kernel": os.uname().release, "machine": os.uname().machine,
            "vendor_module": vendor_module(),
            "capabilities": {n: kvm.check_extension(getattr(abi, n)) for n in HEADER_CAPS},
            "cve": cve_line(os.uname().release)}
