"""Checks that may WARN or taint the kernel: run only with ``--unsafe`` (abi.md rule 47).

``ring.overflow.emulated``: guest code at CPL0 writing many pages into a small ring. Where
CPL0 code runs natively (VMX, SVM) the soft-full exit holds the ring within its size and
this passes. On kvm_pvm, CPL0 code is emulated in batches (``pvm_emul_batch`` = 1024
instructions) with no request check in between, so the ring can be pushed past its size:
``WARN_ON_ONCE`` in ``kvm_dirty_ring_push()`` (virt/kvm/dirty_ring.c), overwritten entries,
lost dirty pages, and afterwards ring-full exits with nothing to harvest (abi.md 6). The
probe detects and reports that; every loop in it is bounded, so it cannot hang.
"""
from __future__ import annotations

import subprocess
import time

import numpy as np

from ..dirty.ring import EMPTY_FULL_LIMIT   # empty ring-full exits in a row: give up
from .checks_entries import EXIT, first_words, guest, small_ring, write_run
from .registry import Fail, check

WARN_SITE = "kvm_dirty_ring_push"
MAX_EVENTS = 64
WALL_S = 5.0


def _kernel_log_hits() -> int | None:
    """How many kernel-log lines name the WARN site (None when dmesg is unreadable)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=2.0)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return sum(1 for line in out.stdout.splitlines() if WARN_SITE in line)


@check("ring.overflow.emulated", 47, "virt/kvm/dirty_ring.c kvm_dirty_ring_push() "
       "(WARN_ON_ONCE(used >= size)); abi.md 6 (kvm_pvm emulated guest code)",
       fault="hide_ring_full", unsafe=True)
def overflow_emulated(ctx):
    """Emulated (CPL0) guest writes never push the ring past its size or lose a page"""
    entries, soft = small_ring(ctx)
    pages = 8 * entries
    m = guest(ctx, write_run(0, pages) + EXIT, pages=pages, ring=entries, cpl=0)
    ring = m.rings[0]
    log_before = _kernel_log_hits()
    evidence, harvests, reported = [], [], set()
    empty_in_row, fulls, end, full_laps = 0, 0, None, []
    deadline = time.monotonic() + WALL_S
    for _ in range(MAX_EVENTS):
        left = deadline - time.monotonic()
        if left <= 0:
            end = "wall-clock bound reached"
            break
        ev = ctx.run_to_port(m, timeout=max(0.5, left))
        if ev.kind != "ring-full":
            end = f"{ev.kind} {ev.value if ev.value is not None else ''}".strip()
            break
        fulls += 1
        _, offsets = ctx.harvest(ring)
        n = len(offsets)
        harvests.append(n)
        reported.update(offsets.tolist())
        got = m.vm.reset_dirty_rings()
        if got != n:
            evidence.append(f"ring-full #{fulls}: RESET returned {got} for {n} harvested")
        if n >= entries:
            full_laps.append(fulls)
        if n == 0:
            empty_in_row += 1
            if empty_in_row == 1:
                evidence.append(f"ring-full #{fulls}: KVM_EXIT_DIRTY_RING_FULL with nothing "
                                "to harvest at the VMM's fetch index (the kernel's index no "
                                "longer matches: entries were overwritten)")
            if empty_in_row >= EMPTY_FULL_LIMIT:
                end = f"stopped after {EMPTY_FULL_LIMIT} empty ring-full exits in a row"
                break
        else:
            empty_in_row = 0
    else:
        end = f"stopped after {MAX_EVENTS} exits"
    _, offsets = ctx.harvest(ring)
    harvests.append(len(offsets))
    reported.update(offsets.tolist())
    words = first_words(m.data, pages)
    changed = set(np.flatnonzero(words).tolist())
    lost = sorted(changed - reported)
    if end != "exit 0":
        evidence.append(f"the guest did not complete ({end}); it wrote {len(changed)} of "
                        f"{pages} pages")
    if lost:
        evidence.append(f"{len(lost)} page(s) whose content changed were never reported, "
                        f"e.g. {lost[:6]}")
    if full_laps:
        # Not proof alone (used == size is within rule 46), but 64 entries past the soft
        # limit: any further push before the exit overwrote an un-harvested entry.
        suspect = (f"{len(full_laps)} of {fulls} ring-full exits (#{full_laps[0]}"
                   f"{'..' + str(full_laps[-1]) if len(full_laps) > 1 else ''}) harvested a "
                   f"full lap of {entries} entries (soft limit {soft})")
        (evidence.insert(0, suspect) if evidence else ctx.diag(f"suspect: {suspect}"))
    log_after = _kernel_log_hits()
    ctx.diag(f"ring {entries} entries (soft limit {soft}), CPL0 guest writing {pages} pages: "
             f"{fulls} ring-full exit(s), entries per harvest {harvests[:10]}"
             f"{' ...' if len(harvests) > 10 else ''}, end: {end}")
    ctx.diag(f"pages written {len(changed)}, reported {len(reported)}, lost {len(lost)}")
    if log_before is None:
        ctx.diag("kernel log not readable: cannot look for the WARNING")
    else:
        ctx.diag(f"kernel log lines naming {WARN_SITE}: {log_before} before, {log_after} after "
                 "(WARN_ON_ONCE: only the first overflow since boot is logged)")
    if evidence:
        # strongest first: lost pages, then a stuck ring, then the rest
        rank = ("never reported", "nothing to harvest", "did not complete")
        evidence.sort(key=lambda e: next((i for i, r in enumerate(rank) if r in e), len(rank)))
        for e in evidence:
            ctx.diag(f"evidence: {e}")
        raise Fail("rule 47: the dirty ring overflowed under emulated guest writes "
                   f"({len(evidence)} piece(s) of evidence)", "used <= entries, every dirty "
                   "page reported", "; ".join(evidence[:3]))
