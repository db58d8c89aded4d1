"""The check registry and the vocabulary checks are written in. Not a kernel ABI mirror.

Each check is a function ``fn(ctx)`` registered with a stable id, the abi.md rule
numbers it covers, a citation (kernel file and function, or api.rst section), and
the name of a fault (faults.py) under which it must report ``not ok``: a check no
fault can make fail would be a defect, and the test suite proves each one can.
"""
from __future__ import annotations

import dataclasses
import errno
import re
from typing import Callable

from .._sys import KvmError


@dataclasses.dataclass
class CheckSpec:
    id: str
    rules: tuple
    cite: str
    summary: str
    fn: Callable
    fault: str                 # faults.FAULTS key that must turn this check into "not ok"
    unsafe: bool = False       # may WARN or taint the kernel: only with --unsafe
    slow: bool = False


REGISTRY: dict[str, CheckSpec] = {}
# This process or the system out of file descriptors (ulimit -n): the host's limit, never
# the kernel's answer to a rule; a check stopped by it is an ERROR, not a failure
HOST_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)
_ID = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


def check(id: str, rules, cite: str, fault: str, unsafe: bool = False, slow: bool = False):
    """Register ``fn(ctx)`` as a check. The docstring's first line is its summary."""
    def deco(fn):
        if not _ID.match(id):
            raise ValueError(f"check id {id!r} must be dotted lowercase words")
        if id in REGISTRY:
            raise ValueError(f"check id {id!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else id
        REGISTRY[id] = CheckSpec(id, tuple(rules if isinstance(rules, (list, tuple))
                                           else (rules,)), cite, summary, fn, fault, unsafe, slow)
        return fn
    return deco


class Skip(Exception):
    """The check does not apply here (capability absent, other architecture...)."""


class Fail(AssertionError):
    """The kernel did not behave as the rule says: expected vs observed."""

    def __init__(self, what: str, expected=None, observed=None):
        self.what, self.expected, self.observed = what, expected, observed
        text = what
        if expected is not None or observed is not None:
            text += f": expected {expected}, observed {observed}"
        super().__init__(text)


def expect(cond: bool, what: str, expected=None, observed=None) -> None:
    if not cond:
        raise Fail(what, expected, observed)


def expect_eq(observed, expected, what: str) -> None:
    if observed != expected:
        raise Fail(what, expected, observed)


def expect_errno(fn, errno_names, what: str):
    """Call fn(); it must raise KvmError with one of ``errno_names`` (a name or a tuple)."""
    names = (errno_names,) if isinstance(errno_names, str) else tuple(errno_names)
    try:
        result = fn()
    except KvmError as e:
        if e.errno_name not in names:
            if e.errno in HOST_LIMIT_ERRNOS:
                raise
            raise Fail(what, " or ".join(names), e.errno_name) from None
        return e
    raise Fail(what, " or ".join(names), f"success ({result!r})")


def expect_ok(fn, what: str):
    """Call fn(); it must succeed. Returns its result."""
    try:
        return fn()
    except KvmError as e:
        if e.errno in HOST_LIMIT_ERRNOS:
            raise
        raise Fail(what, "success", e.errno_name) from None
